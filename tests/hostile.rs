//! Hostile input: fuzzed handles, forged and mutated on-disk files,
//! symlinks, files cut short or locked away behind our back, and the modes
//! of what we create.
//!
//! Complements `alloc_corruption.rs` (which flips bytes in the used part of
//! `meta.seg`, cuts it at every sector, forges directory entries, and damages
//! every byte of the manifest) and `alloc_errors.rs` (which covers the
//! second opener, `AlreadyOpen`, from this and another process).
//!
//! Findings pinned down here (behaviour as it is):
//! * A data file replaced by a symlink is never followed: the shard opens,
//!   and every access to that file fails with `Error::Io { op: "open" }`
//!   naming it (`ELOOP`). `meta.seg`, `LOCK`, `MANIFEST` or a shard folder
//!   as a symlink: opening fails (`Io` / ELOOP for the files,
//!   `InvalidConfig` "is a symlink" for the others). The data directory
//!   itself may be reached through a symlink: the path given is resolved.
//! * A data file cut short while the directory was closed: a writable pin of
//!   a slot past the cut **reads zeros** (the file is grown back by
//!   `fallocate`; the allocator keeps no checksum of data), a read-only pin
//!   of it fails with `InvalidRange`; slots before the cut are intact.
//!   (`meta.seg` cut short is `Corrupt`: `alloc_corruption.rs`.)
//! * `meta.seg` unreadable (mode 000): `Error::Io { op: "open" }` naming it.
//!   Root bypasses permission bits, so as root the check runs in a child
//!   process switched to uid/gid 65534 (`nobody`).
//!
//! `SEGALLOC_HOSTILE_CASES` scales the number of fuzz cases (default 1).

mod common;

use std::cell::Cell;
use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::{
    check_pattern, check_reopened, handle_seed, is_root, open_shard, run, small_cfg, write_pattern,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use segalloc::config::MIB;
use segalloc::format::classes::{CLASS_COUNT, CLASSES};
use segalloc::format::{self as meta, Manifest};
use segalloc::{Config, DataDir, Error, HANDLE_BYTES, Handle, Shard};

fn cases(base: u32) -> u32 {
    let scale: u32 = common::number_from_env("SEGALLOC_HOSTILE_CASES", 1);
    base * scale.max(1)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(PropConfig {
        cases,
        failure_persistence: None,
        ..PropConfig::default()
    })
}

/// Re-sign bytes 0..36 of a handle encoding (CRC-32C at 36..40).
fn resign(mut b: [u8; HANDLE_BYTES]) -> [u8; HANDLE_BYTES] {
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

// ---------------------------------------------------------------------------
// Handles.
// ---------------------------------------------------------------------------

/// Any bytes: never a panic; what decodes re-encodes to the same bytes.
#[test]
fn random_bytes_never_panic_from_bytes() {
    runner(cases(20_000))
        .run(&proptest::collection::vec(any::<u8>(), 0..100), |b| {
            if let Ok(h) = Handle::from_bytes(&b) {
                prop_assert_eq!(&h.to_bytes()[..], &b[..]);
            }
            Ok(())
        })
        .unwrap();
}

/// A valid encoding with random fields.
fn valid_handle() -> impl Strategy<Value = [u8; HANDLE_BYTES]> {
    (
        0..CLASS_COUNT,
        any::<u16>(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
    )
        .prop_map(|(class, shard, file, segment, generation, offset, tag)| {
            let mut b = [0u8; HANDLE_BYTES];
            b[0] = 0xA5;
            b[1] = 1;
            b[2] = class as u8;
            b[4..6].copy_from_slice(&shard.to_le_bytes());
            b[8..12].copy_from_slice(&file.to_le_bytes());
            b[12..16].copy_from_slice(&segment.to_le_bytes());
            b[16..20].copy_from_slice(&generation.to_le_bytes());
            b[20..24].copy_from_slice(&CLASSES[class].slot_bytes.to_le_bytes());
            b[24..32].copy_from_slice(&(offset & !15).to_le_bytes());
            b[32..36].copy_from_slice(&tag.to_le_bytes());
            resign(b)
        })
}

/// Any valid handle with any single bit flipped is rejected.
#[test]
fn single_bit_flips_are_rejected() {
    runner(cases(20_000))
        .run(&(valid_handle(), 0..HANDLE_BYTES * 8), |(b, bit)| {
            let h = Handle::from_bytes(&b).expect("a valid encoding decodes");
            prop_assert_eq!(h.to_bytes(), b);
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(
                Handle::from_bytes(&c).is_err(),
                "flip of bit {} accepted",
                bit
            );
            Ok(())
        })
        .unwrap();
}

/// Mutations of valid encodings: byte changes (re-signed or not), cuts,
/// extensions. Never a panic; a mutation that is not re-signed never
/// decodes to another handle.
#[test]
fn mutated_handles_never_panic() {
    let mutation = (
        proptest::collection::vec((0..HANDLE_BYTES, 1u8..=255), 1..6),
        any::<bool>(),
        0..4u8,
    );
    runner(cases(20_000))
        .run(
            &(valid_handle(), mutation),
            |(b, (edits, resigned, shape))| {
                let mut c = b;
                for (at, x) in edits {
                    c[at] ^= x;
                }
                if resigned {
                    c = resign(c);
                }
                let bytes: Vec<u8> = match shape {
                    0 => c.to_vec(),
                    1 => c[..c.len() - 1].to_vec(),
                    2 => [&c[..], &[0]].concat(),
                    _ => c[..20].to_vec(),
                };
                // Anything else is a BadHandle (the only error type).
                if let Ok(h) = Handle::from_bytes(&bytes) {
                    prop_assert!(shape == 0);
                    prop_assert!(resigned || c == b, "damage accepted without a checksum");
                    prop_assert_eq!(h.to_bytes(), c);
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Well-formed handles that name nothing real, used against a live shard:
/// typed errors only, and nothing changes.
#[test]
fn fuzzed_handles_against_a_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut hs = Vec::new();
        for i in 0..300u64 {
            let a = shard.allocate(1 + i * 997 % 70_000).await.unwrap();
            write_pattern(a.pin(), a.len().min(256), handle_seed(&a.handle(), 0));
            hs.push(a.handle());
        }
        for h in hs.iter().step_by(4) {
            shard.free(*h).unwrap();
        }
        let live: BTreeSet<Handle> = shard.live().collect();
        let tag = hs[0].dir_tag();
        // Patch a real handle's fields (same directory, shard 0) so the
        // checks behind the tag and shard are reached.
        let strategy = (
            0..hs.len(),
            proptest::collection::vec((8usize..36, any::<u8>()), 1..4),
            any::<bool>(),
        );
        let (mut ok, mut typed) = (0u64, 0u64);
        let outcomes = std::cell::RefCell::new(Vec::new());
        runner(cases(5000))
            .run(&strategy, |(i, edits, keep_tag)| {
                let mut b = hs[i].to_bytes();
                for (at, x) in edits {
                    b[at] = x;
                }
                if keep_tag {
                    b[32..36].copy_from_slice(&tag.to_le_bytes());
                }
                b[3] = 0;
                b[6] = 0;
                b[7] = 0;
                let Ok(h) = Handle::from_bytes(&resign(b)) else {
                    return Ok(()); // class/length/alignment rejected
                };
                outcomes.borrow_mut().push(h);
                Ok(())
            })
            .unwrap();
        for h in outcomes.into_inner() {
            let known = live.contains(&h);
            let pin = shard.pin(h).await;
            let try_pin = shard.try_pin(h);
            let is_live = shard.allocator().is_live(&h);
            assert_eq!(is_live, known, "{h}");
            match (&pin, known) {
                (Ok(_), true) => ok += 1,
                (
                    Err(
                        Error::NotAllocated { .. }
                        | Error::ForeignHandle { .. }
                        | Error::WrongShard { .. },
                    ),
                    false,
                ) => typed += 1,
                other => panic!("pin of {h}: {other:?} (live: {known})"),
            }
            assert_eq!(try_pin.is_err(), !known, "{h}: {try_pin:?}");
            if !known {
                // Never a free of something that is not live.
                match shard.free(h) {
                    Err(
                        Error::NotAllocated { .. }
                        | Error::DoubleFree { .. }
                        | Error::ForeignHandle { .. }
                        | Error::WrongShard { .. },
                    ) => {}
                    other => panic!("free of {h}: {other:?}"),
                }
            }
        }
        assert_eq!(shard.live().collect::<BTreeSet<_>>(), live);
        for h in &live {
            let pin = shard.pin(*h).await.unwrap();
            assert!(check_pattern(&pin, pin.len().min(256), handle_seed(h, 0)));
        }
        eprintln!("fuzzed handles: {ok} named live slots, {typed} typed errors");
        assert!(typed > 100);
    });
}

// ---------------------------------------------------------------------------
// On-disk files.
// ---------------------------------------------------------------------------

/// A closed directory with allocations of several classes, some freed, and
/// roots; returns the live set.
fn fixture(cfg: &Config) -> (BTreeSet<Handle>, Vec<(String, Handle)>) {
    run(async {
        let shard = open_shard(cfg).await.unwrap();
        let mut hs = Vec::new();
        for i in 0..240u64 {
            let size = [16, 100, 1000, 5000, 40_000, 300_000][i as usize % 6] + i;
            let a = shard.allocate(size).await.unwrap();
            write_pattern(a.pin(), a.len().min(512), handle_seed(&a.handle(), 0));
            hs.push(a.handle());
        }
        for h in hs.iter().step_by(3) {
            shard.free(*h).unwrap();
        }
        for (i, h) in hs.iter().skip(1).step_by(3).step_by(13).enumerate() {
            shard.set_root(&format!("r{i}"), *h).unwrap();
        }
        shard.sync().await.unwrap();
        (shard.live().collect(), shard.roots())
    })
}

#[derive(Debug)]
enum Reopened {
    Ok(BTreeSet<Handle>, Vec<(String, Handle)>),
    Typed(#[allow(dead_code)] String),
}

/// Reopen shard 0 of `cfg`; on success the state must be consistent.
fn reopen(cfg: &Config) -> Reopened {
    run(async {
        let opened = async {
            let dd = Arc::new(DataDir::open(cfg)?);
            Shard::open(dd, cfg, 0).await
        };
        match opened.await {
            Ok(shard) => {
                let (live, roots) = check_reopened(&shard).await;
                Reopened::Ok(live, roots)
            }
            Err(e @ (Error::Corrupt { .. } | Error::Mismatch { .. })) => {
                Reopened::Typed(e.to_string())
            }
            Err(e) => panic!("reopen: untyped or unexpected error {e:?}"),
        }
    })
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("shard-000").join("meta.seg")
}

/// Whole sectors of `meta.seg` replaced (zeros, ones, random bytes),
/// anywhere in the file, and the file extended with garbage.
#[test]
fn meta_sectors_replaced_and_file_extended() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = fixture(&cfg);
    let path = meta_path(tmp.path());
    let original = std::fs::read(&path).unwrap();
    let sectors = original.len() / 512;
    let used = {
        let w = u64::from_le_bytes(original[512..520].try_into().unwrap());
        let hwm = meta::decode_counter(w).unwrap();
        (meta::entry_offset(hwm - 1) + meta::ENTRY_BYTES) as usize / 512 + 1
    };
    let sector = prop_oneof![4 => 0..used, 1 => 0..sectors];
    let fill = prop_oneof![Just(Some(0u8)), Just(Some(0xff)), Just(None)];
    let strategy = (
        proptest::collection::vec((sector, fill, any::<u64>()), 1..4),
        0usize..3,
    );
    let (same, other, typed) = (Cell::new(0), Cell::new(0), Cell::new(0));
    runner(cases(800))
        .run(&strategy, |(damage, extend)| {
            let mut b = original.clone();
            for &(s, fill, seed) in &damage {
                let bytes = &mut b[s * 512..(s + 1) * 512];
                match fill {
                    Some(x) => bytes.fill(x),
                    None => bytes.copy_from_slice(&common::pattern(seed, 512)),
                }
            }
            // Garbage past the end: never read.
            b.extend(common::pattern(extend as u64, extend * 40_000));
            std::fs::write(&path, &b).unwrap();
            match reopen(&cfg) {
                Reopened::Ok(live, roots) => {
                    if (live.clone(), roots.clone()) == want {
                        same.set(same.get() + 1);
                    } else {
                        other.set(other.get() + 1);
                        // Only bitmap and root sectors are unchecked: a
                        // damaged one changes liveness or drops a root,
                        // never adds a root.
                        prop_assert!(roots.iter().all(|r| want.1.contains(r)));
                    }
                }
                Reopened::Typed(_) => typed.set(typed.get() + 1),
            }
            Ok(())
        })
        .unwrap();
    // Only garbage past the end: the same state.
    let mut b = original.clone();
    b.extend(vec![0xAB; 100_000]);
    std::fs::write(&path, &b).unwrap();
    match reopen(&cfg) {
        Reopened::Ok(live, roots) => assert_eq!((live, roots), want),
        other => panic!("garbage past the end: {other:?}"),
    }
    eprintln!(
        "meta sectors: {} same state, {} other consistent state, {} typed errors",
        same.get(),
        other.get(),
        typed.get()
    );
}

/// A metadata file made sparse and huge (100 GiB) while closed: the open
/// maps only what the directory's high-water mark needs (and the stretch
/// past it that recovery looks at), so it neither pins a window per 16 MiB
/// nor, under a cap of 64 windows, fails after `pin_timeout` ("all 64
/// mapping windows are pinned").
#[test]
fn a_huge_sparse_metadata_file_opens_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::builder(tmp.path())
        .shards(1)
        .window_bytes(common::WINDOW)
        .growth_step_bytes(common::STEP)
        .pin_timeout(std::time::Duration::from_secs(2))
        .max_windows(64)
        .build()
        .unwrap();
    let want = fixture(&cfg);
    let path = meta_path(tmp.path());
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(100 << 30).unwrap();
    drop(f);
    let started = std::time::Instant::now();
    run(async {
        let shard = open_shard(&cfg)
            .await
            .unwrap_or_else(|e| panic!("open after {:?}: {e}", started.elapsed()));
        let took = started.elapsed();
        assert!(took < cfg.pin_timeout(), "the open took {took:?}");
        let pinned = shard.mappings().stats().pinned_windows;
        assert!(pinned <= 2, "{pinned} windows pinned after the open");
        assert_eq!(check_reopened(&shard).await, want);
        // Still usable: a new allocation survives a sync and a reopen.
        let a = shard.allocate(100).await.unwrap();
        a.write_at(0, b"after").unwrap();
        shard.sync().await.unwrap();
    });
    match reopen(&cfg) {
        Reopened::Ok(live, _) => assert_eq!(live.len(), want.0.len() + 1),
        other => panic!("second reopen: {other:?}"),
    }
    // With its high-water mark torn as well, the open is refused, and at
    // once.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5A; 8], meta::HWM_OFFSET).unwrap();
    drop(f);
    let started = std::time::Instant::now();
    match reopen(&cfg) {
        Reopened::Typed(e) => assert!(e.contains("high-water mark"), "{e}"),
        other => panic!("torn mark: {other:?}"),
    }
    assert!(started.elapsed() < cfg.pin_timeout());
}

/// Manifests and superblocks forged with valid checksums: random fields,
/// or a consistent but different geometry (manifest, superblock and
/// configuration agree; the directory entries do not).
#[test]
fn forged_manifests_and_superblocks() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = fixture(&cfg);
    let mpath = tmp.path().join("MANIFEST");
    let spath = meta_path(tmp.path());
    let manifest = std::fs::read(&mpath).unwrap();
    let meta_bytes = std::fs::read(&spath).unwrap();
    let (m, _) = meta::manifest::decode(&manifest, "fixture").unwrap();
    let field = (
        prop_oneof![Just(m.version), any::<u32>()],
        prop_oneof![Just(m.shard_count), any::<u16>()],
        prop_oneof![Just(m.dir_id), any::<u64>()],
        prop_oneof![
            Just(m.window_bytes),
            (0u64..8).prop_map(|k| k * 16 * MIB),
            any::<u64>()
        ],
        prop_oneof![
            Just(m.max_file_bytes),
            (0u64..8).prop_map(|k| k * 16 * MIB),
            any::<u64>()
        ],
        prop_oneof![Just(m.class_table_id), any::<u32>()],
        any::<bool>(),
        0u16..3,
    );
    let (ok, typed) = (Cell::new(0), Cell::new(0));
    runner(cases(500))
        .run(
            &field,
            |(version, shard_count, dir_id, window, max_file, table, both, shard)| {
                let forged = Manifest {
                    version,
                    shard_count,
                    dir_id,
                    window_bytes: window,
                    max_file_bytes: max_file,
                    class_table_id: table,
                };
                std::fs::write(&mpath, meta::manifest::encode(&forged, 0)).unwrap();
                let mut sb = meta_bytes.clone();
                if both {
                    sb[..meta::MANIFEST_BYTES]
                        .copy_from_slice(&meta::manifest::encode(&forged, shard));
                }
                std::fs::write(&spath, &sb).unwrap();
                // Open with the configuration the forged manifest asks for when
                // it is a valid one, else with the original.
                let c = Config::builder(tmp.path())
                    .shards(shard_count.clamp(1, 4) as usize)
                    .window_bytes(window)
                    .growth_step_bytes(MIB)
                    .max_file_bytes(max_file)
                    .build()
                    .unwrap_or_else(|_| cfg.clone());
                let opened = run(async {
                    let dd = Arc::new(DataDir::open(&c)?);
                    Shard::open(dd, &c, 0).await.map(|s| s.live().count())
                });
                match opened {
                    Ok(_) => ok.set(ok.get() + 1),
                    Err(
                        Error::Corrupt { .. } | Error::Mismatch { .. } | Error::InvalidConfig(_),
                    ) => typed.set(typed.get() + 1),
                    Err(e) => prop_assert!(false, "forged manifest: {:?}", e),
                }
                // Folders a forged shard count made.
                for i in 1..5 {
                    let _ = std::fs::remove_dir_all(tmp.path().join(format!("shard-{i:03}")));
                }
                Ok(())
            },
        )
        .unwrap();
    // Consistent geometry changes, checked for consistency when they open.
    for (window, max_file) in [(32, 64), (16, 16), (48, 96), (16, 32), (64, 1024)] {
        let forged = Manifest {
            window_bytes: window * MIB,
            max_file_bytes: max_file * MIB,
            ..m
        };
        std::fs::write(&mpath, meta::manifest::encode(&forged, 0)).unwrap();
        let mut sb = meta_bytes.clone();
        sb[..meta::MANIFEST_BYTES].copy_from_slice(&meta::manifest::encode(&forged, 0));
        std::fs::write(&spath, &sb).unwrap();
        let c = Config::builder(tmp.path())
            .shards(1)
            .window_bytes(window * MIB)
            .growth_step_bytes(MIB)
            .max_file_bytes(max_file * MIB)
            .build()
            .unwrap();
        let r = match reopen(&c) {
            Reopened::Ok(live, _) => format!("opened, {} live, consistent", live.len()),
            Reopened::Typed(e) => e,
        };
        eprintln!("geometry {window} MiB windows, {max_file} MiB files: {r}");
    }
    std::fs::write(&mpath, &manifest).unwrap();
    std::fs::write(&spath, &meta_bytes).unwrap();
    match reopen(&cfg) {
        Reopened::Ok(live, roots) => assert_eq!((live, roots), want),
        other => panic!("restored: {other:?}"),
    }
    eprintln!(
        "forged manifests: {} opened, {} typed errors",
        ok.get(),
        typed.get()
    );
}

// ---------------------------------------------------------------------------
// Symlinks.
// ---------------------------------------------------------------------------

fn expect_symlink_error(r: segalloc::Result<()>, name: &str, what: &str) {
    match r {
        Err(Error::InvalidConfig(msg)) => {
            assert!(
                msg.contains("symlink") && msg.contains(name),
                "{what}: {msg}"
            )
        }
        Err(Error::Io {
            op: "open",
            path: Some(p),
            source,
        }) => {
            assert!(p.ends_with(name), "{what}: {p:?}");
            assert_eq!(source.raw_os_error(), Some(nix::libc::ELOOP), "{what}");
        }
        other => panic!("{what}: {other:?}"),
    }
}

fn open_all(cfg: &Config) -> segalloc::Result<()> {
    run(async {
        let dd = Arc::new(DataDir::open(cfg)?);
        Shard::open(dd, cfg, 0).await.map(drop)
    })
}

/// Move `p` aside and put a symlink to the moved copy in its place; returns
/// the copy's path.
fn replace_with_symlink(p: &Path, aside: &Path) -> PathBuf {
    let target = aside.join(p.file_name().unwrap());
    std::fs::rename(p, &target).unwrap();
    std::os::unix::fs::symlink(&target, p).unwrap();
    target
}

fn undo_symlink(p: &Path, target: &Path) {
    std::fs::remove_file(p).unwrap();
    std::fs::rename(target, p).unwrap();
}

#[test]
fn symlinks_are_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let aside = tmp.path().join("aside");
    std::fs::create_dir(&aside).unwrap();
    let cfg = small_cfg(&dir);
    let want = fixture(&cfg);

    // The data directory itself is resolved: the path given may be a link.
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    open_all(&small_cfg(&link)).expect("a data directory reached through a symlink");

    // MANIFEST, LOCK, the shard folder, meta.seg.
    for rel in ["MANIFEST", "LOCK", "shard-000", "shard-000/meta.seg"] {
        let p = dir.join(rel);
        let target = replace_with_symlink(&p, &aside);
        let before = std::fs::read(&target).ok();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        expect_symlink_error(open_all(&cfg), &name, rel);
        if let Some(b) = before {
            assert_eq!(
                std::fs::read(&target).ok(),
                Some(b),
                "{rel}: target changed"
            );
        }
        undo_symlink(&p, &target);
    }

    // A data file: the shard's open is refused, naming it (the link is
    // never followed); the target is untouched.
    let data = dir.join("shard-000").join("data-000000.seg");
    let target = replace_with_symlink(&data, &aside);
    let (bytes, mtime) = (
        std::fs::read(&target).unwrap(),
        std::fs::metadata(&target).unwrap().mtime_nsec(),
    );
    run(async {
        match open_shard(&cfg).await {
            Err(Error::Corrupt { what, detail }) => {
                assert!(what.ends_with("data-000000.seg"), "{what}");
                assert!(detail.contains("not a regular file"), "{detail}");
            }
            Ok(_) => panic!("a shard opened over a symlinked data file"),
            Err(e) => panic!("open over a symlinked data file: {e:?}"),
        }
        assert!(
            !common::open_paths_under(&aside)
                .iter()
                .any(|p| p == &target)
        );
    });
    assert_eq!(
        std::fs::read(&target).unwrap(),
        bytes,
        "data file target changed"
    );
    assert_eq!(std::fs::metadata(&target).unwrap().mtime_nsec(), mtime);
    undo_symlink(&data, &target);
    // A dangling link in place of a data file: the file is missing.
    std::fs::rename(&data, aside.join("moved")).unwrap();
    std::os::unix::fs::symlink(aside.join("nowhere"), &data).unwrap();
    assert!(matches!(reopen(&cfg), Reopened::Typed(_)));
    std::fs::remove_file(&data).unwrap();
    std::fs::rename(aside.join("moved"), &data).unwrap();
    match reopen(&cfg) {
        Reopened::Ok(live, _) => assert!(live.is_superset(&want.0)),
        other => panic!("restored: {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Files cut short, permissions, modes.
// ---------------------------------------------------------------------------

fn read_only_cfg(dir: &Path) -> Config {
    Config::builder(dir)
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .read_only(true)
        .build()
        .unwrap()
}

/// A data file cut short while closed: live slots lie past its end, their
/// bytes are lost. Read-only and writable opens alike refuse the shard with
/// `DataFileTruncated` (the file, the bytes its live slots need, its size),
/// and neither grows the file back.
#[test]
fn data_file_truncated_while_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let needed = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut end = 0;
        for _ in 0..200 {
            let a = shard.allocate(20_000).await.unwrap();
            write_pattern(a.pin(), a.len(), handle_seed(&a.handle(), 0));
            end = end.max(a.handle().offset() + a.handle().len() as u64);
        }
        shard.sync().await.unwrap();
        end
    });
    let data = tmp.path().join("shard-000").join("data-000000.seg");
    let size = std::fs::metadata(&data).unwrap().len();
    for cut in [size / 2, 0] {
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let refused = |r: segalloc::Result<Shard>, what: &str| match r {
            Err(Error::DataFileTruncated {
                path,
                needed_bytes,
                actual_bytes,
            }) => {
                assert!(path.ends_with("shard-000/data-000000.seg"), "{what}");
                assert_eq!((needed_bytes, actual_bytes), (needed, cut), "{what}");
            }
            other => panic!("{what} open of a data file cut at {cut}: {other:?}"),
        };
        run(async {
            let (dd, _) = DataDir::open_read_only(tmp.path()).unwrap();
            let r = Shard::open(Arc::new(dd), &read_only_cfg(tmp.path()), 0).await;
            refused(r, "read-only");
            refused(open_shard(&cfg).await, "writable");
        });
        assert_eq!(
            std::fs::metadata(&data).unwrap().len(),
            cut,
            "left as found"
        );
    }
}

const ENV_PERM_DIR: &str = "SEGALLOC_HOSTILE_PERM_DIR";

/// Child half of [`unreadable_meta_is_a_clear_io_error`]: open and say how.
#[test]
fn hostile_child_open() {
    let Ok(dir) = std::env::var(ENV_PERM_DIR) else {
        return;
    };
    let r = open_all(&small_cfg(Path::new(&dir)));
    println!("@@{}", describe(&r));
}

fn describe(r: &segalloc::Result<()>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(Error::Io { op, path, source }) => format!(
            "io {op} {} {} | {}",
            path.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            source.raw_os_error().unwrap_or(0),
            r.as_ref().unwrap_err()
        ),
        Err(e) => format!("other {e:?}"),
    }
}

/// `meta.seg` with mode 000 while closed: a clear `Io` error naming it.
#[test]
fn unreadable_meta_is_a_clear_io_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = small_cfg(&dir);
    let want = fixture(&cfg);
    let meta = meta_path(&dir);
    std::fs::set_permissions(&meta, std::fs::Permissions::from_mode(0o000)).unwrap();
    let answer = if is_root() {
        // Root reads anything: ask a child running as nobody (65534).
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        for e in walk(&dir) {
            std::os::unix::fs::lchown(&e, Some(65534), Some(65534)).unwrap();
        }
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "hostile_child_open",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ENV_PERM_DIR, &dir)
            .uid(65534)
            .gid(65534)
            .output();
        match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
                .lines()
                .find_map(|l| l.find("@@").map(|at| l[at + 2..].to_string()))
                .unwrap_or_else(|| {
                    panic!(
                        "no answer from the child: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    )
                }),
            other => {
                eprintln!(
                    "unreadable_meta_is_a_clear_io_error: SKIPPED: cannot run a child as uid 65534: {other:?}"
                );
                return;
            }
        }
    } else {
        describe(&open_all(&cfg))
    };
    eprintln!("meta.seg mode 000: {answer}");
    assert!(
        answer.starts_with(&format!("io open {} {}", meta.display(), nix::libc::EACCES)),
        "{answer}"
    );
    assert!(
        answer.contains("meta.seg") && answer.contains("ermission denied"),
        "{answer}"
    );
    // Readable again: everything is there.
    std::fs::set_permissions(&meta, std::fs::Permissions::from_mode(0o600)).unwrap();
    match reopen(&cfg) {
        Reopened::Ok(live, roots) => assert_eq!((live, roots), want),
        other => panic!("{other:?}"),
    }
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut v = vec![p.to_path_buf()];
    if std::fs::symlink_metadata(p).unwrap().is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            v.extend(walk(&e.unwrap().path()));
        }
    }
    v
}

/// Files are created 0600 and folders 0700 (whatever the umask allows).
#[test]
fn files_are_0600_and_folders_0700() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("new").join("d");
    let cfg = Config::builder(&dir)
        .shards(2)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        for i in 0..2 {
            let shard = Shard::open(dd.clone(), &cfg, i).await.unwrap();
            shard.allocate(100).await.unwrap();
            shard.sync().await.unwrap();
        }
    });
    let mut seen = (0, 0);
    for p in walk(&dir) {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o777;
        if m.is_dir() {
            assert_eq!(mode & !0o700, 0, "{}: {mode:o}", p.display());
            assert_eq!(mode & 0o700, 0o700, "{}: {mode:o}", p.display());
            seen.0 += 1;
        } else {
            assert!(m.is_file(), "{}", p.display());
            assert_eq!(mode, 0o600, "{}: {mode:o}", p.display());
            seen.1 += 1;
        }
    }
    // d, 2 shard folders; MANIFEST, LOCK, 2 × (meta.seg + a data file).
    assert_eq!(seen, (3, 6), "{:?}", walk(&dir));
}

/// The mapping manager a shard hands out (`Shard::mappings`) pins files by
/// number, and any number can be made: its safe calls, and its registry's
/// (`Shard::files`), refuse the files the allocator keeps its data and
/// metadata in. A writable pin of `meta.seg`
/// let safe code wipe the slot bitmaps (a live allocation then read as
/// free, and the shard no longer opened), and a pin of a run `trim` had
/// punched out of a data file, written on a full disk, was a SIGBUS.
#[test]
fn the_managers_safe_calls_refuse_the_allocators_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&tmp.path().join("heap"));
    let own = tmp.path().join("own.dat");
    let (kept, freed) = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut hs = Vec::new();
        for i in 0..4u64 {
            let a = shard.allocate(1 << 20).await.unwrap();
            write_pattern(a.pin(), a.len(), i);
            hs.push(a.into_handle());
        }
        let kept = shard.allocate(100).await.unwrap();
        kept.write_at(0, b"precious").unwrap();
        let kept = kept.into_handle();
        shard.sync().await.unwrap();
        let freed = hs[..3].to_vec();
        for h in &freed {
            shard.free(*h).unwrap();
        }
        shard.sync().await.unwrap();
        assert!(shard.trim().await.unwrap() > 0, "trim punched nothing");

        let mm = shard.mappings();
        let files = shard.files().stats().files as u32;
        let mut refused = 0;
        for id in (0..files).map(segalloc::FileId) {
            let reserved = shard.files().reserved_bytes(id).unwrap();
            let refusal = |r: &segalloc::Result<()>| matches!(r, Err(Error::AllocatorFile { file_id }) if *file_id == id.0);
            for at in [0, freed[0].offset(), freed[2].offset() + 4096] {
                let r = mm.try_pin(id, at, 4096, true).map(|_| ());
                assert!(refusal(&r), "try_pin of file {id:?} at {at}: {r:?}");
                let r = mm.pin(id, at, 4096, true).await.map(|_| ());
                assert!(refusal(&r), "pin of file {id:?} at {at}: {r:?}");
                let r = mm.pin(id, at, 4096, false).await.map(|_| ());
                assert!(refusal(&r), "read-only pin of file {id:?} at {at}: {r:?}");
            }
            let r = mm.reserve(id, reserved + (64 << 20), 1 << 20).await;
            assert!(refusal(&r), "reserve of file {id:?}: {r:?}");
            // Nor does its registry open or grow them for safe code (a
            // lease hands out the descriptor).
            let r = shard.files().acquire(id, 0).await.map(drop);
            assert!(refusal(&r), "acquire of file {id:?}: {r:?}");
            let r = shard
                .files()
                .grow(id, reserved + (64 << 20))
                .await
                .map(drop);
            assert!(refusal(&r), "grow of file {id:?}: {r:?}");
            let path = shard.files().path(id).unwrap();
            // SAFETY: nothing is mapped through the lease (it is refused).
            let r = unsafe { shard.files().acquire_path(&path, 0) }
                .await
                .map(drop);
            assert!(refusal(&r), "acquire_path of {path:?}: {r:?}");
            shard.files().mark_reserved(id, u64::MAX);
            assert_eq!(shard.files().reserved_bytes(id).unwrap(), reserved);
            refused += 1;
        }
        assert!(refused >= 2, "meta.seg and a data file: {refused}");
        // A file of the user's own, registered with the shard's registry,
        // is pinned as before.
        let f = common::register(shard.files(), &own);
        let p = mm.pin(f, 0, 64, true).await.unwrap();
        p.write_at(0, b"mine").unwrap();
        drop(p);
        // Nothing of the allocator's changed.
        assert!(shard.allocator().is_live(&kept));
        let mut buf = [0u8; 8];
        shard.pin(kept).await.unwrap().read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"precious");
        let p = shard.pin(hs[3]).await.unwrap();
        assert!(check_pattern(&p, p.len(), 3));
        (kept, freed)
    });
    // The shard opens again with the same allocations.
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert!(shard.allocator().is_live(&kept));
        assert!(freed.iter().all(|h| !shard.allocator().is_live(h)));
    });
}

/// An unknown `FileId` is refused without growing the manager's file
/// table: one past five million kept 190 MiB, and `u32::MAX` asked for
/// 160 GiB and aborted the process.
#[test]
fn unknown_file_ids_cost_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (_files, mm) = common::manager(tmp.path(), 8, 4);
    let rss_kib = || -> u64 {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    run(async {
        let before = rss_kib();
        for id in [5_000_000, 5_000_001, 40_000_000, u32::MAX].map(segalloc::FileId) {
            let r = mm.try_pin(id, 0, 16, false).map(|_| ());
            assert!(
                matches!(r, Err(Error::UnknownFile(n)) if n == id.0),
                "{r:?}"
            );
            let r = mm.pin(id, 0, 16, true).await.map(|_| ());
            assert!(
                matches!(r, Err(Error::UnknownFile(n)) if n == id.0),
                "{r:?}"
            );
        }
        let after = rss_kib();
        assert!(
            after < before + 16 * 1024,
            "refused pins kept {} MiB",
            (after - before) / 1024
        );
    });
}
