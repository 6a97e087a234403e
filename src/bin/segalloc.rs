//! `segalloc`: the operator's tool for a data directory, like LMDB's
//! `mdb_stat` or PMDK's `pmempool info` / `pmempool check`.
//!
//! ```text
//! segalloc stat DIR [--json]     figures: files, windows, entries, classes, fragmentation
//! segalloc verify DIR            every problem, one per line; exit 0 clean, 1 problems
//! segalloc live DIR [--shard N]  live handles (Handle::to_hex), then the roots
//! ```
//!
//! The tool only reads (see [`segalloc::inspect`]): it never recovers,
//! repairs, maps or creates anything. When another process has the directory
//! open it says so on stderr and reads on. Exit status: 0 success (for
//! `verify`: no errors; warnings alone do not fail it), 1 problems found by
//! `verify`, 2 usage or I/O errors (or a directory whose shards cannot be
//! read at all). A root whose allocation was freed is dangling: `verify`
//! reports it as a warning and `live` marks it `(dangling)`, as the library
//! keeps it; data files cut short under live allocations are errors.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use segalloc::Manifest;
use segalloc::inspect::{self, DirReport, LockStatus, ShardReport};

#[derive(Parser, Debug)]
#[command(
    name = "segalloc",
    version,
    about = "Inspect and check a segalloc data directory (read-only)",
    after_help = "Exit status: 0 success, 1 problems found (verify), 2 usage or I/O error."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Figures of the manifest and every shard: data files, windows,
    /// directory entries, segments per class, live allocations,
    /// fragmentation; totals.
    Stat {
        /// The data directory.
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check everything that can be checked offline and print every problem,
    /// one per line (exit 1 when any error is found; warnings alone exit 0).
    Verify {
        /// The data directory.
        dir: PathBuf,
    },
    /// List the live allocations (handle hex, shard, file, offset, slot
    /// size), one per line, then the roots.
    Live {
        /// The data directory.
        dir: PathBuf,
        /// Only this shard.
        #[arg(long)]
        shard: Option<u16>,
    },
}

const EXIT_PROBLEMS: u8 = 1;
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let dir = match &cli.cmd {
        Cmd::Stat { dir, .. } | Cmd::Verify { dir } | Cmd::Live { dir, .. } => dir.clone(),
    };
    let report = match inspect::read_dir(&dir) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("segalloc: {}: {e}", dir.display());
            return ExitCode::from(EXIT_ERROR);
        }
    };
    lock_note(&report);
    let out = io::stdout();
    let mut out = BufWriter::new(out.lock());
    let code = match &cli.cmd {
        Cmd::Stat { json, .. } => stat(&report, *json, &mut out),
        Cmd::Verify { .. } => verify(&report, &mut out),
        Cmd::Live { shard, .. } => live(&report, *shard, &mut out),
    };
    match code.and_then(|c| out.flush().map(|()| c)) {
        Ok(c) => ExitCode::from(c),
        // `segalloc live DIR | head`: the reader is gone, nothing is wrong.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("segalloc: writing the output: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

fn lock_note(r: &DirReport) {
    match &r.lock {
        LockStatus::Taken => {}
        LockStatus::HeldElsewhere => {
            eprintln!("note: directory is open in another process; figures may be moving")
        }
        LockStatus::NoLockFile => eprintln!(
            "note: {} has no LOCK file (copied, or never opened by the library); none was created, so nothing can be holding it",
            r.path.display()
        ),
        LockStatus::Unknown(why) => eprintln!(
            "note: could not tell whether the directory is open elsewhere ({why}); figures may be moving"
        ),
    }
}

/// Exit status for `stat` and `live` when the shards could not be read.
fn unreadable(r: &DirReport) -> Option<u8> {
    if r.geometry.is_some() {
        return None;
    }
    for p in &r.problems {
        eprintln!("{p}");
    }
    eprintln!("segalloc: {}: the shards cannot be read", r.path.display());
    Some(EXIT_ERROR)
}

fn problems_note(r: &DirReport) {
    let (e, w) = (r.errors().count(), r.warnings().count());
    if e + w > 0 {
        eprintln!(
            "note: {e} error(s) and {w} warning(s) found; run `segalloc verify {}` for details",
            r.path.display()
        );
    }
}

// ---------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------

fn verify(r: &DirReport, out: &mut impl Write) -> io::Result<u8> {
    for p in &r.problems {
        writeln!(out, "{p}")?;
    }
    let (e, w) = (r.errors().count(), r.warnings().count());
    let t = r.totals();
    if e == 0 {
        writeln!(
            out,
            "verify: clean ({w} warning(s)); {} shard(s), {} segment(s), {} live allocation(s), {} root(s)",
            t.shards, t.segments, t.allocations_live, t.roots
        )?;
        Ok(0)
    } else {
        writeln!(out, "verify: {e} error(s), {w} warning(s)")?;
        Ok(EXIT_PROBLEMS)
    }
}

// ---------------------------------------------------------------------------
// live
// ---------------------------------------------------------------------------

fn live(r: &DirReport, shard: Option<u16>, out: &mut impl Write) -> io::Result<u8> {
    if let Some(code) = unreadable(r) {
        return Ok(code);
    }
    if let Some(n) = shard
        && n as usize >= r.shards.len()
    {
        eprintln!(
            "segalloc: shard {n} out of range (the directory has {} shards)",
            r.shards.len()
        );
        return Ok(EXIT_ERROR);
    }
    problems_note(r);
    let shards: Vec<&ShardReport> = r
        .shards
        .iter()
        .filter(|s| shard.is_none_or(|n| n == s.index))
        .collect();
    for s in &shards {
        for h in s.live() {
            writeln!(
                out,
                "{} shard={} file={} offset={:#x} slot_bytes={}",
                h.to_hex(),
                h.shard(),
                inspect::data_file_name(h.file_id()),
                h.offset(),
                h.len()
            )?;
        }
    }
    for s in &shards {
        for root in &s.roots {
            writeln!(
                out,
                "root shard={} {:?} -> {}{}",
                s.index,
                root.name,
                root.handle.to_hex(),
                if root.valid { "" } else { " (dangling)" }
            )?;
        }
    }
    Ok(0)
}

// ---------------------------------------------------------------------------
// stat (text)
// ---------------------------------------------------------------------------

/// `1.5 GiB` style, exact below 1 KiB.
fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn stat(r: &DirReport, json: bool, out: &mut impl Write) -> io::Result<u8> {
    if let Some(code) = unreadable(r) {
        return Ok(code);
    }
    problems_note(r);
    if json {
        let summary = r.stat_summary().expect("checked by unreadable()");
        serde_json::to_writer(&mut *out, &summary).map_err(io::Error::from)?;
        writeln!(out)?;
    } else {
        stat_text(r, out)?;
    }
    Ok(0)
}

fn stat_text(r: &DirReport, out: &mut impl Write) -> io::Result<()> {
    let g = r.geometry.as_ref().expect("checked by unreadable()");
    writeln!(out, "data directory {}", r.path.display())?;
    writeln!(out, "  lock: {}", r.lock.word())?;
    writeln!(
        out,
        "manifest{}: format {}, {} shard(s), window {} ({} B), max file {} ({} B), class table {}, directory id {:#018x}",
        if r.manifest.is_none() {
            " (unusable; from a superblock)"
        } else {
            ""
        },
        g.version,
        g.shard_count,
        human(g.window_bytes),
        g.window_bytes,
        human(g.max_file_bytes),
        g.max_file_bytes,
        g.class_table_id,
        g.dir_id
    )?;
    for s in &r.shards {
        shard_text(s, g, out)?;
    }
    totals_text(r, out)
}

/// The text figures of one shard.
fn shard_text(s: &ShardReport, g: &Manifest, out: &mut impl Write) -> io::Result<()> {
    writeln!(out, "shard {} ({})", s.index, s.folder)?;
    match &s.meta {
        Some(m) => writeln!(
            out,
            "  {}: {} ({} B), {} allocated",
            m.name,
            human(m.size_bytes),
            m.size_bytes,
            human(m.allocated_bytes)
        )?,
        None => writeln!(out, "  {}: absent", inspect::META_FILE)?,
    }
    writeln!(out, "  data files: {}", s.data_files.len())?;
    for f in &s.data_files {
        writeln!(
            out,
            "    {}  size {} ({} B)  allocated {} ({} blocks of 512 B)  windows {}",
            f.file.name,
            human(f.file.size_bytes),
            f.file.size_bytes,
            human(f.file.allocated_bytes),
            f.file.blocks_512,
            f.windows
        )?;
    }
    writeln!(
        out,
        "  windows spanned: {} (holding segments: {})",
        s.windows_spanned(),
        s.windows_in_use(g.window_bytes)
    )?;
    let hwm = s
        .hwm
        .map(|h| h.to_string())
        .unwrap_or_else(|| "unreadable".into());
    writeln!(
        out,
        "  directory entries: high-water mark {hwm}, in use {}, free {}{}, room for {} in {}",
        s.entries_in_use(),
        s.entries_free,
        if s.entries_corrupt > 0 {
            format!(", corrupt {}", s.entries_corrupt)
        } else {
            String::new()
        },
        s.entry_capacity,
        inspect::META_FILE
    )?;
    classes_text(s, out)?;
    writeln!(
        out,
        "  live: {} allocation(s), {} ({} B) in {} segment(s) of {} ({} B)",
        s.allocations_live(),
        human(s.bytes_live()),
        s.bytes_live(),
        s.entries_in_use(),
        human(s.segment_bytes()),
        s.segment_bytes()
    )?;
    writeln!(
        out,
        "  fragmentation: {} of segment bytes free ({} B); free runs below the used ends of the data files: {} ({} B, largest {} B)",
        pct(s.fragmentation()),
        s.free_bytes_in_segments(),
        s.free_runs.count,
        s.free_runs.bytes,
        s.free_runs.largest_bytes
    )?;
    writeln!(out, "  roots: {}", s.roots.len())?;
    Ok(())
}

/// The per-class table of one shard.
fn classes_text(s: &ShardReport, out: &mut impl Write) -> io::Result<()> {
    let classes = s.classes();
    if !classes.is_empty() {
        writeln!(
            out,
            "  {:>5} {:>10} {:>8} {:>12} {:>10} {:>10} {:>12}",
            "class", "slot B", "segments", "segment B", "slots", "live", "live B"
        )?;
        for c in &classes {
            writeln!(
                out,
                "  {:>5} {:>10} {:>8} {:>12} {:>10} {:>10} {:>12}",
                c.class_id,
                c.slot_bytes,
                c.segments,
                c.segment_bytes,
                c.slots,
                c.live,
                c.live_bytes
            )?;
        }
    }
    Ok(())
}

/// The text figures summed over the shards.
fn totals_text(r: &DirReport, out: &mut impl Write) -> io::Result<()> {
    let t = r.totals();
    writeln!(out, "totals")?;
    writeln!(
        out,
        "  data files: {}, {} ({} B), {} allocated; metadata {} ({} B)",
        t.data_files,
        human(t.data_bytes),
        t.data_bytes,
        human(t.data_allocated_bytes),
        human(t.metadata_bytes),
        t.metadata_bytes
    )?;
    writeln!(
        out,
        "  windows spanned: {}; directory entries: {} below the marks, {} in use, {} free",
        t.windows_spanned, t.entries_hwm, t.entries_in_use, t.entries_free
    )?;
    writeln!(
        out,
        "  live: {} allocation(s), {} ({} B) in {} segment(s) of {} ({} B)",
        t.allocations_live,
        human(t.bytes_live),
        t.bytes_live,
        t.segments,
        human(t.segment_bytes),
        t.segment_bytes
    )?;
    let meta_pct = if t.data_bytes > 0 {
        format!(
            " (metadata {} of data)",
            pct(t.metadata_bytes as f64 / t.data_bytes as f64)
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "  fragmentation: {} of segment bytes free; free runs: {} ({} B){meta_pct}",
        pct(t.fragmentation),
        t.free_runs.count,
        t.free_runs.bytes
    )?;
    writeln!(
        out,
        "  roots: {}; problems: {} error(s), {} warning(s)",
        t.roots,
        r.errors().count(),
        r.warnings().count()
    )?;
    Ok(())
}
