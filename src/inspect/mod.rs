//! Offline, read-only inspection of a data directory: the library side of the
//! `segalloc` command-line tool (`stat`, `verify`, `live`), in the spirit of
//! LMDB's `mdb_stat` and PMDK's `pmempool info` / `pmempool check`. Built
//! with the `cli` feature (on by default); the summary the tool prints as
//! JSON ([`StatSummary`] and the types in it) serializes with `serde`.
//!
//! [`read_dir`] reads the manifest and every shard's `meta.seg` with plain
//! positioned reads (no mmap), lists the data files, and returns a
//! [`DirReport`]: the figures, the state that recovery restores (live
//! slots, roots), and every [`Problem`] met on the way. [`verify`] returns
//! the problems only. Nothing stops at the first problem.
//!
//! ```no_run
//! # fn main() -> segalloc::Result<()> {
//! let report = segalloc::inspect::read_dir("/tmp/segalloc-example")?;
//! for p in &report.problems {
//!     eprintln!("{p}");
//! }
//! let t = report.totals();
//! println!("{} live allocations, {} bytes", t.allocations_live, t.bytes_live);
//! for h in report.live() {
//!     println!("{h}");
//! }
//! # Ok(()) }
//! ```
//!
//! A problem of severity [`Severity::Error`] is damage (recovery refuses the
//! shard, or repairs it); a [`Severity::Warning`] is a state recovery copes
//! with or the API allows. In particular a root whose allocation was freed
//! is *dangling*: a warning, listed by `segalloc live` as `(dangling)`; the
//! library keeps it as it is.
//!
//! **Architecture invariants:**
//! * The metadata is read by the crate's one metadata scan, the very scan recovery
//!   applies: what the report says recovery keeps is what it keeps. This
//!   module adds only what needs the file system (folders, file kinds, the
//!   lock, stray files) and the figures.
//! * Nothing here writes, truncates, maps or creates a file. The one call
//!   with a side effect is [`DataDir::open_read_only`], made only when `LOCK`
//!   already exists (that call opens `LOCK` with `O_CREAT`, and would create
//!   it otherwise): it tells whether the directory is open elsewhere, and the
//!   lock it may take is held for the duration of the read only.
//! * No path inside the directory is followed through a symlink: each one is
//!   classified with `symlink_metadata` and opened with
//!   `O_NOFOLLOW | O_NONBLOCK` (a FIFO planted in place of a file cannot
//!   hang the reader), then checked again with `fstat`.
//! * Hostile input (truncated, corrupted, oversized or misplaced files)
//!   yields problems, never a panic; the work is bounded by the sizes of the
//!   files; every figure is summed with saturating arithmetic.

mod fs;
mod report;
mod summary;

use fs::*;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::datadir::{DataDir, LOCK_FILE, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::format::classes::BLOCK_BYTES;
use crate::format::manifest::{OFF_DIR_ID, OFF_SHARD};
use crate::format::scan::{
    self, DataFileLen, Finding, FindingFile, MetaSource, ScanTarget, ShardScan, Superblock,
};
use crate::format::{self, Manifest};

pub use crate::format::{META_FILE, data_file_name, parse_data_file_name, shard_folder_name};
pub use report::{
    ClassUsage, DataFileInfo, DirReport, FileInfo, FreeRuns, LockStatus, Problem, RootInfo,
    SegmentInfo, Severity, ShardReport, Totals,
};
pub use summary::{
    EntriesSummary, FragmentationSummary, ManifestSummary, ShardSummary, StatSummary,
};

/// Appends problems with a fixed shard and file.
struct Reporter<'a> {
    out: &'a mut Vec<Problem>,
    shard: Option<u16>,
    file: Option<String>,
}

impl Reporter<'_> {
    fn push(
        &mut self,
        severity: Severity,
        entry: Option<u32>,
        offset: Option<u64>,
        detail: String,
    ) {
        self.out.push(Problem {
            severity,
            shard: self.shard,
            file: self.file.clone(),
            entry,
            offset,
            detail,
        });
    }
    fn error(&mut self, entry: Option<u32>, offset: Option<u64>, detail: impl Into<String>) {
        self.push(Severity::Error, entry, offset, detail.into());
    }
    fn warn(&mut self, entry: Option<u32>, offset: Option<u64>, detail: impl Into<String>) {
        self.push(Severity::Warning, entry, offset, detail.into());
    }
    /// The error for a path that is `found`, not `wanted` ("a regular
    /// file", "a directory"): it is not followed.
    fn wrong_kind(&mut self, found: &Kind, wanted: &str) {
        self.error(
            None,
            None,
            format!("is {}, not {wanted} (not followed)", found.describe()),
        );
    }
}

// ---------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------

/// Read a data directory: figures, live state and problems.
///
/// Takes the directory's lock only through [`DataDir::open_read_only`], and
/// only when `LOCK` exists; see [`LockStatus`]. Never writes.
///
/// # Errors
///
/// [`Error::DirNotFound`] when `path` does not exist;
/// [`Error::NotADirectory`] when it is not a directory (a symlink to a
/// directory is followed: nothing inside it is); [`Error::NotDataDir`] when
/// it has neither a manifest nor shard folders (or a deletion of it did not
/// finish); [`Error::Io`] when the directory or a file in it cannot be read
/// (permissions, I/O errors). Damaged contents are not errors: they are
/// [`DirReport::problems`].
pub fn read_dir(path: impl AsRef<Path>) -> Result<DirReport> {
    let dir = path.as_ref();
    match classify(dir)? {
        Kind::Dir => {}
        Kind::Missing => {
            return Err(Error::DirNotFound {
                path: dir.to_path_buf(),
            });
        }
        Kind::Symlink => {
            // The path the user gives may be a symlink (the library
            // resolves it too); nothing inside the directory is followed.
            let resolved = std::fs::canonicalize(dir).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => Error::NotADirectory {
                    path: dir.to_path_buf(),
                    kind: "a symlink to a missing directory",
                },
                _ => Error::io("canonicalize", Some(dir), e),
            })?;
            if !resolved.is_dir() {
                return Err(Error::NotADirectory {
                    path: dir.to_path_buf(),
                    kind: "a symlink to a file",
                });
            }
            return read_dir(resolved);
        }
        Kind::File(_) => {
            return Err(Error::NotADirectory {
                path: dir.to_path_buf(),
                kind: "a regular file",
            });
        }
        Kind::Other => {
            return Err(Error::NotADirectory {
                path: dir.to_path_buf(),
                kind: "a special file",
            });
        }
    }
    let listing = list_dir(dir)?;
    let mut problems = Vec::new();
    let manifest = read_manifest(dir, &listing, &mut problems)?;
    let (_guard, lock) = probe_lock(dir, manifest.is_some(), &mut problems)?;

    let geometry = match manifest {
        Some(m) => Some(m),
        None => geometry_from_superblocks(dir, &listing, &mut problems)?,
    };
    let mut shards = Vec::new();
    if let Some(g) = &geometry {
        stray_shard_folders(&listing, g, &mut problems);
        for i in 0..g.shard_count {
            shards.push(scan_shard(dir, g, i, &mut problems)?);
        }
    }
    Ok(DirReport {
        path: dir.to_path_buf(),
        lock,
        manifest,
        geometry,
        shards,
        problems,
    })
}

/// Shard folders beyond the directory's shard count, and entries segalloc
/// does not make: `DataDir::destroy` and `clear` (the demo's `--fresh`)
/// refuse the directory while one is there.
fn stray_shard_folders(listing: &[(String, Kind)], g: &Manifest, problems: &mut Vec<Problem>) {
    for (name, kind) in listing {
        let why = match shard_index_of(name).filter(|&i| *name == shard_folder_name(i)) {
            Some(i) if i >= g.shard_count => format!(
                "shard folder beyond the {} shards of the directory ({}); ignored",
                g.shard_count,
                kind.describe()
            ),
            None if !crate::datadir::is_own_top_file(name, matches!(kind, Kind::Dir)) => format!(
                "an entry segalloc does not make ({}): ignored, but DataDir::destroy and clear \
                 refuse the directory while it is there",
                kind.describe()
            ),
            _ => continue,
        };
        Reporter {
            out: problems,
            shard: None,
            file: Some(name.clone()),
        }
        .warn(None, None, why);
    }
}

/// Check a data directory; every problem found (empty when clean).
///
/// # Errors
///
/// As [`read_dir`].
pub fn verify(path: impl AsRef<Path>) -> Result<Vec<Problem>> {
    Ok(read_dir(path)?.problems)
}

// ---------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------

/// A metadata file read with positioned reads.
struct FileSource<'a> {
    f: &'a File,
    path: &'a Path,
}

impl MetaSource for FileSource<'_> {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<usize> {
        read_at_most(self.f, off, buf).map_err(|e| Error::io("read", Some(self.path), e))
    }

    fn data_region(&mut self, off: u64) -> Result<Option<(u64, u64)>> {
        use std::os::fd::AsFd;
        crate::sys::data_region(self.f.as_fd(), off)
            .map_err(|e| Error::io("lseek", Some(self.path), e))
    }
}

fn scan_shard(
    dir: &Path,
    g: &Manifest,
    idx: u16,
    problems: &mut Vec<Problem>,
) -> Result<ShardReport> {
    let mut rep = ShardReport::new(idx, g.dir_tag());
    let folder = rep.folder.clone();
    let fpath = dir.join(&folder);
    if !check_folder(&fpath, &folder, idx, problems)? {
        return Ok(rep);
    }
    let present_any = list_data_files(&fpath, g, &mut rep, problems)?;
    let mlabel = format!("{folder}/{META_FILE}");
    let mpath = fpath.join(META_FILE);
    let mut r = Reporter {
        out: problems,
        shard: Some(idx),
        file: Some(mlabel),
    };
    if !check_meta_present(&mpath, &present_any, &mut r)? {
        return Ok(rep);
    }
    let (f, m) = open_regular(&mpath)?;
    rep.meta = Some(FileInfo::from_metadata(META_FILE, &m));
    let data_file = |n: u32| match rep.data_file(n) {
        Some(d) => DataFileLen::Bytes(d.file.size_bytes),
        None if present_any.binary_search(&n).is_ok() => DataFileLen::Unknown,
        None => DataFileLen::Missing,
    };
    let target = ScanTarget {
        geometry: g,
        shard: idx,
        meta_bytes: m.len(),
        data_file: &data_file,
    };
    let found = scan::scan(
        &mut FileSource {
            f: &f,
            path: &mpath,
        },
        &target,
    )?;
    if found.superblock == Superblock::Blank {
        if !blank_problems(&found, &present_any, &mut r) {
            return Ok(rep);
        }
    } else {
        rep.initialised = true;
    }
    drop(r);
    for finding in &found.findings {
        problems.push(problem(idx, &folder, finding));
    }
    fill_from_scan(&mut rep, found);
    rep.free_runs = free_runs(&rep, &present_any, g);
    Ok(rep)
}

/// The shard folder is a directory (else reported; `false`).
fn check_folder(fpath: &Path, folder: &str, idx: u16, problems: &mut Vec<Problem>) -> Result<bool> {
    let mut r = Reporter {
        out: problems,
        shard: Some(idx),
        file: Some(folder.to_string()),
    };
    match classify(fpath)? {
        Kind::Dir => Ok(true),
        Kind::Missing => {
            r.warn(
                None,
                None,
                "shard folder is missing: the shard holds nothing (opening recreates it)",
            );
            Ok(false)
        }
        k => {
            r.wrong_kind(&k, "a directory");
            Ok(false)
        }
    }
}

/// Data files and strays; returns the numbers of every data file name
/// present (regular or not), sorted.
fn list_data_files(
    fpath: &Path,
    g: &Manifest,
    rep: &mut ShardReport,
    problems: &mut Vec<Problem>,
) -> Result<Vec<u32>> {
    let listing = list_dir(fpath)?;
    let mut present_any: Vec<u32> = Vec::new();
    for (name, kind) in &listing {
        let mut r = Reporter {
            out: problems,
            shard: Some(rep.index),
            file: Some(format!("{}/{name}", rep.folder)),
        };
        if name == META_FILE {
            continue;
        }
        let Some(n) = parse_data_file_name(name) else {
            r.warn(None, None, "unexpected entry in the shard folder; ignored");
            continue;
        };
        present_any.push(n);
        let Kind::File(m) = kind else {
            r.error(
                None,
                None,
                format!(
                    "data file is {}, not a regular file: segalloc does not follow it",
                    kind.describe()
                ),
            );
            continue;
        };
        let info = FileInfo::from_metadata(name, m);
        if info.size_bytes > g.max_file_bytes {
            r.warn(
                None,
                None,
                format!(
                    "{} bytes, larger than the maximum data file size {}",
                    info.size_bytes, g.max_file_bytes
                ),
            );
        }
        rep.data_files.push(DataFileInfo {
            number: n,
            windows: info.size_bytes.div_ceil(g.window_bytes),
            file: info,
        });
    }
    rep.data_files.sort_by_key(|f| f.number);
    present_any.sort_unstable();
    Ok(present_any)
}

/// `meta.seg` is a regular file (else reported; `false`).
fn check_meta_present(mpath: &Path, present_any: &[u32], r: &mut Reporter<'_>) -> Result<bool> {
    match classify(mpath)? {
        Kind::File(_) => {}
        Kind::Missing => {
            if present_any.is_empty() {
                r.warn(None, None, "missing: the shard has never been opened");
            } else if present_any.binary_search(&0).is_ok() {
                r.error(
                    None,
                    None,
                    format!(
                        "missing, but the folder holds {} data file(s): recovery refuses to open the shard",
                        present_any.len()
                    ),
                );
            } else {
                r.error(
                    None,
                    None,
                    format!(
                        "missing, but the folder holds {} data file(s): opening the shard would start an empty directory over them",
                        present_any.len()
                    ),
                );
            }
            return Ok(false);
        }
        k => {
            r.wrong_kind(&k, "a regular file");
            return Ok(false);
        }
    }
    Ok(true)
}

/// Report a blank superblock; `false` when the shard is simply unused.
fn blank_problems(found: &ShardScan, present_any: &[u32], r: &mut Reporter<'_>) -> bool {
    let marked = found.hwm.is_none_or(|h| h != 0);
    if present_any.binary_search(&0).is_ok() {
        r.error(
            None,
            Some(0),
            "superblock is blank but data files exist: recovery refuses to open the shard",
        );
    } else if marked || !present_any.is_empty() {
        r.error(
            None,
            Some(0),
            format!(
                "superblock is blank but the shard has {}: opening it would re-initialise meta.seg and lose every segment",
                if marked {
                    "a directory high-water mark"
                } else {
                    "data files"
                }
            ),
        );
    } else {
        r.warn(
            None,
            Some(0),
            "superblock is blank (creation never finished): opening the shard starts it afresh",
        );
        return false;
    }
    true
}

/// A scan finding as a problem of shard `idx`.
fn problem(idx: u16, folder: &str, f: &Finding) -> Problem {
    let file = match f.file {
        FindingFile::Meta => format!("{folder}/{META_FILE}"),
        FindingFile::Data(n) => format!("{folder}/{}", data_file_name(n)),
    };
    Problem {
        severity: f.severity,
        shard: Some(idx),
        file: Some(file),
        entry: f.entry,
        offset: f.offset,
        detail: f.defect.to_string(),
    }
}

fn fill_from_scan(rep: &mut ShardReport, found: ShardScan) {
    rep.hwm = found.hwm;
    rep.entry_capacity = found.entry_capacity;
    rep.entries_scanned = found.entries_scanned;
    let dropped = found.segments.iter().filter(|s| s.dropped).count();
    rep.entries_free = ((found.free_entries.len() - dropped) as u32)
        .saturating_add(u32::try_from(found.free_entries_in_holes).unwrap_or(u32::MAX));
    rep.entries_corrupt = found.entries_corrupt;
    rep.roots = found.roots.iter().map(RootInfo::from).collect();
    rep.segments = found.segments.into_iter().map(SegmentInfo::new).collect();
}

/// Free runs as recovery's free-space rebuild makes them.
fn free_runs(rep: &ShardReport, present_any: &[u32], g: &Manifest) -> FreeRuns {
    let window_blocks = g.window_bytes / BLOCK_BYTES;
    let file_blocks = g.max_file_bytes / BLOCK_BYTES;
    let mut runs: Vec<(u32, u64, u64)> = rep
        .kept_segments()
        .map(|s| {
            (
                s.file(),
                s.first_block() as u64,
                s.segment_bytes() / BLOCK_BYTES,
            )
        })
        .collect();
    runs.sort_unstable();
    let mut file_count = runs.iter().map(|r| r.0 as u64 + 1).max().unwrap_or(0);
    while file_count <= u32::MAX as u64 && present_any.binary_search(&(file_count as u32)).is_ok() {
        file_count += 1;
    }
    let mut out = FreeRuns::default();
    // Gaps are counted arithmetically, window by window: a hostile entry may
    // name file 4 000 000 000 or a geometry of millions of windows per file.
    let mut add_gap = |from: u64, to: u64| gap_runs(&mut out, from, to, window_blocks);
    let mut hwm: BTreeMap<u32, u64> = BTreeMap::new();
    let mut cursor: HashMap<u32, u64> = HashMap::new();
    for &(file, block, blocks) in &runs {
        let c = cursor.entry(file).or_insert(0);
        if block > *c {
            add_gap(*c, block);
        }
        *c = (*c).max(block + blocks);
        let h = hwm.entry(file).or_insert(0);
        *h = (*h).max(block + blocks);
    }
    // Files before the last: free up to the maximum file size.
    let last = file_count.saturating_sub(1);
    let mut with_runs = 0u64;
    for (&f, &h) in hwm.range(..) {
        if (f as u64) < last {
            with_runs += 1;
            add_gap(h, file_blocks);
        }
    }
    // Files before the last without a segment: entirely free windows.
    let empty = last - with_runs;
    let per_file = file_blocks / window_blocks;
    if empty > 0 && per_file > 0 {
        out.count = out.count.saturating_add(empty.saturating_mul(per_file));
        out.bytes = out.bytes.saturating_add(
            empty
                .saturating_mul(file_blocks)
                .saturating_mul(BLOCK_BYTES),
        );
        out.largest_bytes = out.largest_bytes.max(window_blocks * BLOCK_BYTES);
    }
    out
}

/// Add the free runs of blocks `from..to` of one file, split at window
/// boundaries, without iterating over the windows.
fn gap_runs(out: &mut FreeRuns, from: u64, to: u64, window_blocks: u64) {
    let mut add = |blocks: u64, n: u64| {
        if blocks > 0 && n > 0 {
            out.count = out.count.saturating_add(n);
            out.bytes = out
                .bytes
                .saturating_add(n.saturating_mul(blocks).saturating_mul(BLOCK_BYTES));
            out.largest_bytes = out.largest_bytes.max(blocks * BLOCK_BYTES);
        }
    };
    if from >= to {
        return;
    }
    let first_end = ((from / window_blocks + 1) * window_blocks).min(to);
    add(first_end - from, 1);
    let last_start = ((to / window_blocks) * window_blocks).max(first_end);
    add(window_blocks, (last_start - first_end) / window_blocks);
    add(to - last_start, 1);
}

/// The shard index a folder name like `shard-001` claims, if any (the
/// caller checks it is the canonical name).
pub(crate) fn shard_index_of(name: &str) -> Option<u16> {
    name.strip_prefix("shard-")?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gap_runs_split_at_windows_like_a_loop() {
        for (from, to) in [
            (0, 0),
            (0, 16),
            (3, 16),
            (3, 17),
            (0, 100),
            (5, 80),
            (16, 48),
            (17, 47),
        ] {
            let mut fast = FreeRuns::default();
            gap_runs(&mut fast, from, to, 16);
            let mut slow = FreeRuns::default();
            let mut at = from;
            while at < to {
                let end = ((at / 16 + 1) * 16).min(to);
                slow.count += 1;
                slow.bytes += (end - at) * BLOCK_BYTES;
                slow.largest_bytes = slow.largest_bytes.max((end - at) * BLOCK_BYTES);
                at = end;
            }
            assert_eq!(fast, slow, "{from}..{to}");
        }
    }
}
