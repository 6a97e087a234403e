//! The module layering that ARCHITECTURE.md documents holds in the code.
//!
//! ARCHITECTURE.md lists the crate's modules in layers, lowest first,
//! between the `layers:begin` and `layers:end` markers. A module may use a
//! module of a lower layer, never one of its own layer or above. A layer
//! may name a submodule (`format::handle`): its files and paths to it are
//! then ranked apart from the rest of their module. This test
//! reads every file under `src/` (except `lib.rs` and the binaries), finds
//! each `crate::` path it names, and fails on any that goes against that
//! order, or on a module the document does not place. So the direction is
//! a checked rule, not a convention, and the document cannot drift from the
//! code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Module name → layer (0 lowest), from ARCHITECTURE.md.
fn layers() -> BTreeMap<String, usize> {
    let doc = std::fs::read_to_string(Path::new(ROOT).join("ARCHITECTURE.md")).unwrap();
    let begin = doc
        .find("layers:begin")
        .expect("ARCHITECTURE.md: no layers:begin marker");
    let end = doc
        .find("layers:end")
        .expect("ARCHITECTURE.md: no layers:end marker");
    let mut out = BTreeMap::new();
    let block = &doc[begin..end];
    let lines = block
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with("```"));
    for (rank, line) in lines.enumerate() {
        let line = line.trim();
        // "N. a b c" or "a b c"; anything after "--" is a comment.
        let line = line.split("--").next().unwrap();
        let line = line.trim_start_matches(|c: char| c.is_ascii_digit() || c == '.');
        for m in line.split_whitespace() {
            let m = m.trim_matches('`');
            assert!(
                out.insert(m.to_string(), rank).is_none(),
                "ARCHITECTURE.md places `{m}` twice"
            );
        }
    }
    assert!(
        out.len() > 5,
        "ARCHITECTURE.md: the layer list is too short: {out:?}"
    );
    out
}

/// Name → module for the crate root's `pub use module::{A, B};` lines
/// (also `pub use module::A;` and `pub use module::sub::A as B;`).
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let text = lib.replace('\n', " ");
    for stmt in text.split(';') {
        let stmt = stmt.trim();
        let Some(path) = stmt
            .strip_prefix("pub use ")
            .or_else(|| stmt.strip_prefix("pub(crate) use "))
        else {
            continue;
        };
        let path = path.trim().trim_start_matches("crate::");
        let module: String = path
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let names = match path.find('{') {
            Some(at) => path[at + 1..].trim_end_matches('}').to_string(),
            None => path.rsplit("::").next().unwrap_or("").to_string(),
        };
        for n in names.split(',') {
            let n = n.trim();
            let n = n.rsplit(" as ").next().unwrap_or(n);
            let n = n.rsplit("::").next().unwrap_or(n).trim();
            if !n.is_empty() && n != "self" {
                out.insert(n.to_string(), module.clone());
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module a file of `src/` belongs to: its top-level module, or
/// `top::sub` when the layers place that submodule apart (`None` for the
/// crate root and the binaries).
fn module_of(src: &Path, file: &Path, layers: &BTreeMap<String, usize>) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts = rel.components().map(|c| {
        c.as_os_str()
            .to_str()
            .unwrap()
            .trim_end_matches(".rs")
            .to_string()
    });
    let first = parts.next()?;
    if matches!(first.as_str(), "lib" | "main" | "bin") {
        return None;
    }
    if let Some(sub) = parts.next() {
        let dotted = format!("{first}::{sub}");
        if layers.contains_key(&dotted) {
            return Some(dotted);
        }
    }
    Some(first)
}

/// The first name of each comma-separated path in `body` (part of a
/// grouped import `crate::{a, b::c}`), as found on line `line`.
fn push_group(body: &str, line: usize, out: &mut Vec<(String, usize)>) {
    for part in body.split(',') {
        let name: String = part
            .trim()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && name != "self" {
            out.push((name, line));
        }
    }
}

/// Every top-level module that `text` names through `crate::` (in `use`
/// lines, grouped imports `crate::{a, b::c}` and paths in code), with the
/// line it is on. Comments are skipped.
fn crate_refs(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut in_group = false;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split("//").next().unwrap();
        if in_group {
            // Inside `use crate::{ ... }` spread over lines.
            push_group(line, i + 1, &mut out);
            if line.contains('}') {
                in_group = false;
            }
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                push_group(group.split('}').next().unwrap(), i + 1, &mut out);
                if !group.contains('}') {
                    in_group = true;
                }
            } else {
                // `top` or `top::sub` (the caller keeps what the layers name).
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
                    .collect();
                let mut it = name.split("::").filter(|p| !p.is_empty());
                let name = match (it.next(), it.next()) {
                    (Some(top), Some(sub)) => format!("{top}::{sub}"),
                    (Some(top), None) => top.to_string(),
                    _ => String::new(),
                };
                if !name.is_empty() {
                    out.push((name, i + 1));
                }
            }
            rest = &after[1.min(after.len())..];
        }
    }
    out
}

#[test]
fn every_import_follows_the_documented_layers() {
    let layers = layers();
    let src = Path::new(ROOT).join("src");
    let reexports = reexports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file, &layers) else {
            continue;
        };
        let Some(&rank) = layers.get(&module) else {
            wrong.push(format!(
                "{}: module `{module}` is not placed in ARCHITECTURE.md's layers",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (used, line) in crate_refs(&text) {
            // `top::sub` counts as its own module only when the layers place
            // it; otherwise as `top`.
            let used = match used.split_once("::") {
                Some(_) if layers.contains_key(&used) => used,
                Some((top, _)) => top.to_string(),
                None => used,
            };
            if used == module {
                continue;
            }
            // An item the crate root re-exports (`crate::Error`) counts as
            // a use of the module it comes from.
            let used = reexports.get(&used).cloned().unwrap_or(used);
            if used == module {
                continue;
            }
            let Some(&used_rank) = layers.get(&used) else {
                wrong.push(format!(
                    "{}:{line}: `crate::{used}` is neither a placed module nor a re-export",
                    file.display()
                ));
                continue;
            };
            if used_rank >= rank {
                wrong.push(format!(
                    "{}:{line}: `{module}` (layer {rank}) uses `{used}` (layer {used_rank})",
                    file.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against ARCHITECTURE.md's layers:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_reference_reader_finds_grouped_and_inline_paths() {
    let refs = crate_refs(
        "use crate::a::X;\nuse crate::{b, c::Y};\nuse crate::{\n    d::Z,\n    e,\n};\nlet x = crate::f::g(); // crate::h\n",
    );
    let names: Vec<&str> = refs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a::X", "b", "c", "d", "e", "f::g"]);
}

/// Lines of the files under `src/<dir>` (or, with `outside`, of every other
/// file under `src/`) that contain one of `needles`, as `path:line: text`.
fn lines_naming(dir: &str, outside: bool, needles: &[&str]) -> Vec<String> {
    let src = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        if file.starts_with(src.join(dir)) == outside {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text.lines().enumerate() {
            if needles.iter().any(|n| line.contains(n)) {
                out.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    out
}

/// Only the io layer drives the control ring for operations whose futures
/// were dropped: it reaps them by itself, and the layers above only wait
/// for what they need (a descriptor, a window) to be released.
#[test]
fn only_io_reaps_abandoned_operations() {
    let wrong = lines_naming("io", true, &["abandoned_in_flight", ".settle()"]);
    assert!(
        wrong.is_empty(),
        "code above the io layer drives the ring for abandoned operations:\n{}",
        wrong.join("\n")
    );
}

/// A file's reserved size is written by the file layer alone: nothing it
/// hands out is a writable cell (the mapping layer reads a read-only view).
#[test]
fn files_hands_out_no_writable_cell() {
    let wrong: Vec<String> = lines_naming("files", false, &["Cell<"])
        .into_iter()
        .filter(|l| {
            let code = l.splitn(3, ':').nth(2).unwrap_or("").trim_start();
            code.starts_with("pub") && code.contains("fn ") && code.contains("->")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the file layer hands out a writable cell:\n{}",
        wrong.join("\n")
    );
}
