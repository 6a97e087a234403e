//! Offline, read-only inspection of a data directory: the library side of the
//! `segalloc` command-line tool (`stat`, `verify`, `live`), in the spirit of
//! LMDB's `mdb_stat` and PMDK's `pmempool info` / `pmempool check`.
//!
//! [`read_dir`] reads the manifest and every shard's `meta.seg` with plain
//! positioned reads (no mmap), lists the data files, and returns a
//! [`DirReport`]: the figures, the state that recovery would restore (live
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
//! **Architecture invariants:**
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
//!   files and by [`PAST_HWM_SCAN_BYTES`].
//! * The view of the live state mirrors `SegmentAllocator`'s recovery step by
//!   step (entry decoding, overlap resolution by generation, the free space
//!   rebuild, root selection by sequence number), so the figures are those a
//!   reopened allocator would report.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::alloc::classes::{self, BLOCK_BYTES, CLASSES};
use crate::datadir::{DataDir, LOCK_FILE, MANIFEST_FILE};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::meta::{self, EntryHeader, Manifest, RootSlot};

/// Name of a shard's metadata file.
pub const META_FILE: &str = "meta.seg";

/// How far past the bytes that the high-water mark needs the metadata file
/// is scanned for entries published beyond the mark (the file grows in
/// 1 MiB steps, so a correct file holds at most that much beyond).
pub const PAST_HWM_SCAN_BYTES: u64 = 2 * 1024 * 1024;

/// Bytes of a metadata page (the unit read at a time).
const PAGE_BYTES: u64 = meta::META_PAGE_BYTES;

/// Entry indices shown in a line before it says "…".
const LIST_MAX: usize = 8;

/// File name of data file `n` in a shard folder (`data-000042.seg`).
pub fn data_file_name(n: u32) -> String {
    crate::alloc::data_file_name(n)
}

/// Name of the folder of shard `i` (`shard-003`).
///
/// Mirrors `DataDir::shard_dir`, which needs an open directory.
pub fn shard_folder_name(i: u16) -> String {
    format!("shard-{i:03}")
}

/// The number of a data file name made by [`data_file_name`], or `None` for
/// any other name (including non-canonical spellings such as `data-1.seg`).
pub fn parse_data_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("data-")?.strip_suffix(".seg")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    (data_file_name(n) == name).then_some(n)
}

// ---------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------

/// How serious a [`Problem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Something recovery copes with, or a loss that the durability contract
    /// allows (e.g. live slots past the end of a data file read as zeros).
    Warning,
    /// Damage, or a state that recovery refuses or silently repairs.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// One thing found wrong in a data directory, located as precisely as
/// possible.
///
/// Displays as one line:
/// `error: shard 0: shard-000/meta.seg: entry 3: offset 0x9480: entry checksum mismatch …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Error or warning.
    pub severity: Severity,
    /// The shard concerned, if any.
    pub shard: Option<u16>,
    /// The file concerned, relative to the data directory
    /// (`MANIFEST`, `shard-000/meta.seg`, `shard-001/data-000002.seg`).
    pub file: Option<String>,
    /// The segment directory entry concerned, if any.
    pub entry: Option<u32>,
    /// The byte offset in `file` of the structure concerned, if any.
    pub offset: Option<u64>,
    /// What is wrong.
    pub detail: String,
}

impl Problem {
    /// True for [`Severity::Error`].
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.severity)?;
        if let Some(s) = self.shard {
            write!(f, "shard {s}: ")?;
        }
        if let Some(file) = &self.file {
            write!(f, "{file}: ")?;
        }
        if let Some(e) = self.entry {
            write!(f, "entry {e}: ")?;
        }
        if let Some(o) = self.offset {
            write!(f, "offset {o:#x}: ")?;
        }
        f.write_str(&self.detail)
    }
}

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
}

// ---------------------------------------------------------------------------
// Report types
// ---------------------------------------------------------------------------

/// What is known about the directory's lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockStatus {
    /// Nobody else had the directory open: the lock was taken for the
    /// duration of the read and released.
    Taken,
    /// Another instance holds the lock: the figures may be moving.
    HeldElsewhere,
    /// There is no `LOCK` file (the directory was copied, or never opened by
    /// the library); none was created, so no instance can be holding it.
    NoLockFile,
    /// Whether the directory is in use could not be told (e.g. `LOCK` cannot
    /// be opened for writing on a read-only file system, or the manifest is
    /// damaged); the reason.
    Unknown(String),
}

/// A file's size and the space the file system allocated to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// File name within its folder.
    pub name: String,
    /// Size in bytes (`st_size`).
    pub size_bytes: u64,
    /// 512-byte blocks allocated (`st_blocks`): less than the size for a
    /// sparse file.
    pub blocks_512: u64,
}

impl FileInfo {
    /// Bytes allocated on disk (`st_blocks × 512`).
    pub fn allocated_bytes(&self) -> u64 {
        self.blocks_512.saturating_mul(512)
    }

    fn from_metadata(name: &str, m: &Metadata) -> FileInfo {
        FileInfo {
            name: name.to_string(),
            size_bytes: m.len(),
            blocks_512: m.blocks(),
        }
    }
}

/// A data file of a shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataFileInfo {
    /// The file number (handles name it).
    pub number: u32,
    /// Name, size and allocation.
    pub file: FileInfo,
    /// Windows its size spans (`⌈size / window_bytes⌉`): the mappings it
    /// needs when fully in use.
    pub windows: u64,
}

/// A published, valid segment directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Directory entry index (the segment id in handles).
    pub entry: u32,
    /// The decoded header.
    pub header: EntryHeader,
    /// Slot size of its class.
    pub slot_bytes: u32,
    /// Live slots (bits set below the slot count).
    pub live: u32,
    /// True when recovery would drop it: it overlaps a segment of a higher
    /// generation.
    pub dropped: bool,
    /// Bitmap words covering the slots, with bits past the slot count
    /// cleared (those are reported as problems).
    bitmap: Vec<u64>,
}

impl SegmentInfo {
    /// Byte offset of the segment in its data file.
    pub fn start_offset(&self) -> u64 {
        self.header.block as u64 * BLOCK_BYTES
    }
    /// Segment length in bytes.
    pub fn segment_bytes(&self) -> u64 {
        self.header.blocks as u64 * BLOCK_BYTES
    }
    /// Byte offset of slot `slot` in the data file.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.start_offset() + slot as u64 * self.slot_bytes as u64
    }
    /// Whether slot `slot` is live.
    pub fn is_live(&self, slot: u32) -> bool {
        slot < self.header.slots
            && self
                .bitmap
                .get((slot / 64) as usize)
                .is_some_and(|w| w & (1u64 << (slot % 64)) != 0)
    }
    /// The live slot indices, ascending.
    pub fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.bitmap.iter().enumerate().flat_map(|(wi, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let b = bits.trailing_zeros();
                bits &= bits - 1;
                Some(wi as u32 * 64 + b)
            })
        })
    }
}

/// A named root, as recovery would restore it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    /// Root slot index.
    pub slot: usize,
    /// Sequence number.
    pub seq: u64,
    /// The name.
    pub name: String,
    /// The handle it names.
    pub handle: Handle,
    /// Whether the handle names a live slot of this shard.
    pub valid: bool,
}

/// The use of one size class in a shard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassUsage {
    /// Class id.
    pub class_id: u8,
    /// Slot size.
    pub slot_bytes: u32,
    /// Segments of the class.
    pub segments: u64,
    /// Bytes of those segments.
    pub segment_bytes: u64,
    /// Slots in those segments.
    pub slots: u64,
    /// Live slots.
    pub live: u64,
    /// Bytes of live slots.
    pub live_bytes: u64,
}

/// Free runs of blocks below the high-water marks of the data files, as the
/// allocator's free-space map would hold them after recovery (split at
/// window boundaries).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FreeRuns {
    /// Number of runs.
    pub count: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Bytes of the largest.
    pub largest_bytes: u64,
}

/// Everything read about one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardReport {
    /// Shard index.
    pub index: u16,
    /// Folder name (`shard-000`).
    pub folder: String,
    /// Tag the shard's handles carry (low 32 bits of the directory id).
    pub dir_tag: u32,
    /// `meta.seg`, when present as a regular file.
    pub meta: Option<FileInfo>,
    /// Whether `meta.seg` holds a superblock (not blank).
    pub initialised: bool,
    /// The directory high-water mark, when readable and not torn.
    pub hwm: Option<u32>,
    /// Directory entries that fit in `meta.seg`.
    pub entry_capacity: u64,
    /// Entries below the mark that were read.
    pub entries_scanned: u32,
    /// Entries below the mark that are free.
    pub entries_free: u32,
    /// Entries below the mark that failed validation.
    pub entries_corrupt: u32,
    /// Valid segments below the mark (including those recovery would drop;
    /// see [`SegmentInfo::dropped`]), in entry order.
    pub segments: Vec<SegmentInfo>,
    /// Data files present, by number.
    pub data_files: Vec<DataFileInfo>,
    /// Roots recovery would restore, by name.
    pub roots: Vec<RootInfo>,
    /// Free space below the high-water marks.
    pub free_runs: FreeRuns,
}

impl ShardReport {
    fn new(index: u16, dir_tag: u32) -> ShardReport {
        ShardReport {
            index,
            folder: shard_folder_name(index),
            dir_tag,
            meta: None,
            initialised: false,
            hwm: None,
            entry_capacity: 0,
            entries_scanned: 0,
            entries_free: 0,
            entries_corrupt: 0,
            segments: Vec::new(),
            data_files: Vec::new(),
            roots: Vec::new(),
            free_runs: FreeRuns::default(),
        }
    }

    /// The segments recovery would keep.
    pub fn kept_segments(&self) -> impl Iterator<Item = &SegmentInfo> + '_ {
        self.segments.iter().filter(|s| !s.dropped)
    }

    /// Entries in use (kept segments).
    pub fn entries_in_use(&self) -> u64 {
        self.kept_segments().count() as u64
    }

    /// Live allocations.
    pub fn allocations_live(&self) -> u64 {
        self.kept_segments().map(|s| s.live as u64).sum()
    }

    /// Bytes of live slots.
    pub fn bytes_live(&self) -> u64 {
        self.kept_segments()
            .map(|s| s.live as u64 * s.slot_bytes as u64)
            .sum()
    }

    /// Bytes of segments in use (the allocator's `bytes_allocated`).
    pub fn segment_bytes(&self) -> u64 {
        self.kept_segments().map(|s| s.segment_bytes()).sum()
    }

    /// Bytes inside segments in use that hold no live slot (free slots and
    /// the tails no slot covers).
    pub fn free_bytes_in_segments(&self) -> u64 {
        self.segment_bytes() - self.bytes_live()
    }

    /// `free_bytes_in_segments / segment_bytes` (0 without segments).
    pub fn fragmentation(&self) -> f64 {
        ratio(self.free_bytes_in_segments(), self.segment_bytes())
    }

    /// Windows the data files' sizes span.
    pub fn windows_spanned(&self) -> u64 {
        self.data_files.iter().map(|f| f.windows).sum()
    }

    /// Distinct windows holding at least one segment in use.
    pub fn windows_in_use(&self, window_bytes: u64) -> u64 {
        let mut w: Vec<(u32, u64)> = self
            .kept_segments()
            .map(|s| (s.header.file, s.start_offset() / window_bytes.max(1)))
            .collect();
        w.sort_unstable();
        w.dedup();
        w.len() as u64
    }

    /// Use per size class (classes with segments only), by class id.
    pub fn classes(&self) -> Vec<ClassUsage> {
        let mut m: BTreeMap<u8, ClassUsage> = BTreeMap::new();
        for s in self.kept_segments() {
            let c = m.entry(s.header.class_id).or_insert_with(|| ClassUsage {
                class_id: s.header.class_id,
                slot_bytes: s.slot_bytes,
                ..ClassUsage::default()
            });
            c.segments += 1;
            c.segment_bytes += s.segment_bytes();
            c.slots += s.header.slots as u64;
            c.live += s.live as u64;
            c.live_bytes += s.live as u64 * s.slot_bytes as u64;
        }
        m.into_values().collect()
    }

    /// The handle of slot `slot` of `seg`.
    pub fn handle(&self, seg: &SegmentInfo, slot: u32) -> Handle {
        Handle {
            shard: self.index,
            class_id: seg.header.class_id,
            file: seg.header.file,
            segment: seg.entry,
            generation: seg.header.generation,
            length: seg.slot_bytes,
            offset: seg.slot_offset(slot),
            dir_tag: self.dir_tag,
        }
    }

    /// The live allocations in the order recovery lists them (segment by
    /// segment, slot by slot).
    pub fn live(&self) -> impl Iterator<Item = Handle> + '_ {
        self.kept_segments()
            .flat_map(move |s| s.live_slots().map(move |slot| self.handle(s, slot)))
    }

    /// The data file numbered `n`, if present.
    pub fn data_file(&self, n: u32) -> Option<&DataFileInfo> {
        self.data_files
            .binary_search_by_key(&n, |f| f.number)
            .ok()
            .map(|i| &self.data_files[i])
    }
}

/// Figures summed over the shards.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Shards read.
    pub shards: u64,
    /// Data files.
    pub data_files: u64,
    /// Bytes of data files (sizes).
    pub data_bytes: u64,
    /// Bytes allocated to data files on disk.
    pub data_allocated_bytes: u64,
    /// Bytes of metadata files.
    pub metadata_bytes: u64,
    /// Bytes allocated to metadata files on disk.
    pub metadata_allocated_bytes: u64,
    /// Windows the data files span.
    pub windows_spanned: u64,
    /// Entries below the high-water marks.
    pub entries_hwm: u64,
    /// Entries in use.
    pub entries_in_use: u64,
    /// Free entries below the marks.
    pub entries_free: u64,
    /// Segments in use.
    pub segments: u64,
    /// Bytes of segments in use.
    pub segment_bytes: u64,
    /// Live allocations.
    pub allocations_live: u64,
    /// Bytes of live slots.
    pub bytes_live: u64,
    /// Free bytes inside segments in use.
    pub free_bytes_in_segments: u64,
    /// `free_bytes_in_segments / segment_bytes`.
    pub fragmentation: f64,
    /// Free runs below the marks.
    pub free_runs: FreeRuns,
    /// Roots.
    pub roots: u64,
}

/// Everything read about a data directory.
#[derive(Clone, Debug, PartialEq)]
pub struct DirReport {
    /// The directory.
    pub path: PathBuf,
    /// What is known about its lock.
    pub lock: LockStatus,
    /// The manifest, when it is valid.
    pub manifest: Option<Manifest>,
    /// The geometry the shards were read with: the manifest, or (when it is
    /// unusable) the first valid superblock; `None` when neither exists.
    pub geometry: Option<Manifest>,
    /// The shards, by index.
    pub shards: Vec<ShardReport>,
    /// Every problem found, in the order found.
    pub problems: Vec<Problem>,
}

impl DirReport {
    /// The problems of [`Severity::Error`].
    pub fn errors(&self) -> impl Iterator<Item = &Problem> + '_ {
        self.problems.iter().filter(|p| p.is_error())
    }

    /// The problems of [`Severity::Warning`].
    pub fn warnings(&self) -> impl Iterator<Item = &Problem> + '_ {
        self.problems.iter().filter(|p| !p.is_error())
    }

    /// Every live allocation, shard by shard.
    pub fn live(&self) -> impl Iterator<Item = Handle> + '_ {
        self.shards.iter().flat_map(|s| s.live())
    }

    /// Figures summed over the shards.
    pub fn totals(&self) -> Totals {
        let mut t = Totals {
            shards: self.shards.len() as u64,
            ..Totals::default()
        };
        for s in &self.shards {
            t.data_files += s.data_files.len() as u64;
            for f in &s.data_files {
                t.data_bytes += f.file.size_bytes;
                t.data_allocated_bytes += f.file.allocated_bytes();
            }
            if let Some(m) = &s.meta {
                t.metadata_bytes += m.size_bytes;
                t.metadata_allocated_bytes += m.allocated_bytes();
            }
            t.windows_spanned += s.windows_spanned();
            t.entries_hwm += s.hwm.unwrap_or(0) as u64;
            t.entries_in_use += s.entries_in_use();
            t.entries_free += s.entries_free as u64;
            t.segments += s.entries_in_use();
            t.segment_bytes += s.segment_bytes();
            t.allocations_live += s.allocations_live();
            t.bytes_live += s.bytes_live();
            t.free_bytes_in_segments += s.free_bytes_in_segments();
            t.free_runs.count += s.free_runs.count;
            t.free_runs.bytes += s.free_runs.bytes;
            t.free_runs.largest_bytes = t.free_runs.largest_bytes.max(s.free_runs.largest_bytes);
            t.roots += s.roots.len() as u64;
        }
        t.fragmentation = ratio(t.free_bytes_in_segments, t.segment_bytes);
        t
    }
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
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
/// [`Error::Io`] when the directory or a file in it cannot be read (missing
/// directory, permissions, I/O errors); [`Error::InvalidConfig`] when `path`
/// is a symlink or not a directory; [`Error::Corrupt`] when `path` has
/// neither a manifest nor shard folders (not a data directory). Damaged
/// contents are not errors: they are [`DirReport::problems`].
pub fn read_dir(path: impl AsRef<Path>) -> Result<DirReport> {
    let dir = path.as_ref();
    match classify(dir)? {
        Kind::Dir => {}
        Kind::Missing => {
            return Err(Error::io(
                "stat",
                Some(dir),
                io::Error::from(io::ErrorKind::NotFound),
            ));
        }
        Kind::Symlink => {
            return Err(Error::InvalidConfig(format!(
                "{} is a symlink; segalloc does not follow symlinks in a data directory",
                dir.display()
            )));
        }
        Kind::File(_) | Kind::Other => {
            return Err(Error::InvalidConfig(format!(
                "{} is not a directory",
                dir.display()
            )));
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
        for (name, kind) in &listing {
            let Some(i) = name
                .strip_prefix("shard-")
                .and_then(|d| d.parse::<u16>().ok())
            else {
                continue;
            };
            if i >= g.shard_count && *name == shard_folder_name(i) {
                Reporter {
                    out: &mut problems,
                    shard: None,
                    file: Some(name.clone()),
                }
                .warn(
                    None,
                    None,
                    format!(
                        "shard folder beyond the {} shards of the directory ({}); ignored",
                        g.shard_count,
                        kind.describe()
                    ),
                );
            }
        }
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

/// Check a data directory; every problem found (empty when clean).
///
/// # Errors
///
/// As [`read_dir`].
pub fn verify(path: impl AsRef<Path>) -> Result<Vec<Problem>> {
    Ok(read_dir(path)?.problems)
}

// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// What a path is, without following a symlink.
#[derive(Debug)]
enum Kind {
    Missing,
    Symlink,
    Dir,
    File(Metadata),
    Other,
}

impl Kind {
    fn describe(&self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Symlink => "a symlink",
            Kind::Dir => "a directory",
            Kind::File(_) => "a regular file",
            Kind::Other => "a special file",
        }
    }
}

fn classify(p: &Path) -> Result<Kind> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Kind::Missing),
        Err(e) => Err(Error::io("stat", Some(p), e)),
        Ok(m) => {
            let t = m.file_type();
            Ok(if t.is_symlink() {
                Kind::Symlink
            } else if t.is_dir() {
                Kind::Dir
            } else if t.is_file() {
                Kind::File(m)
            } else {
                Kind::Other
            })
        }
    }
}

/// The entries of a folder, sorted by name (non-UTF-8 names lossily).
fn list_dir(dir: &Path) -> Result<Vec<(String, Kind)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("read_dir", Some(dir), e))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io("read_dir", Some(dir), e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        v.push((name, classify(&e.path())?));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Open a regular file for reading without following a symlink or blocking
/// on a special file.
fn open_regular(p: &Path) -> Result<(File, Metadata)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| Error::io("open", Some(p), e))?;
    let m = f.metadata().map_err(|e| Error::io("fstat", Some(p), e))?;
    if !m.is_file() {
        return Err(Error::io(
            "open",
            Some(p),
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file (replaced while being read?)",
            ),
        ));
    }
    Ok((f, m))
}

/// Read as much of `buf` as the file holds at `off`; the bytes read.
fn read_at_most(f: &File, off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Sequential page reads of a metadata file (entries never straddle pages).
struct Pages<'a> {
    f: &'a File,
    path: &'a Path,
    page: Option<u64>,
    len: usize,
    buf: Vec<u8>,
}

impl<'a> Pages<'a> {
    fn new(f: &'a File, path: &'a Path) -> Pages<'a> {
        Pages {
            f,
            path,
            page: None,
            len: 0,
            buf: vec![0; PAGE_BYTES as usize],
        }
    }

    /// `len` bytes at `off` (inside one page), or `None` past the end.
    fn get(&mut self, off: u64, len: usize) -> Result<Option<&[u8]>> {
        let page = off / PAGE_BYTES;
        let at = (off % PAGE_BYTES) as usize;
        debug_assert!(at + len <= PAGE_BYTES as usize);
        if self.page != Some(page) {
            self.len = read_at_most(self.f, page * PAGE_BYTES, &mut self.buf)
                .map_err(|e| Error::io("read", Some(self.path), e))?;
            self.page = Some(page);
        }
        Ok((at + len <= self.len).then(|| &self.buf[at..at + len]))
    }
}

// ---------------------------------------------------------------------------
// Manifest and lock
// ---------------------------------------------------------------------------

fn read_manifest(
    dir: &Path,
    listing: &[(String, Kind)],
    problems: &mut Vec<Problem>,
) -> Result<Option<Manifest>> {
    let p = dir.join(MANIFEST_FILE);
    let mut r = Reporter {
        out: problems,
        shard: None,
        file: Some(MANIFEST_FILE.to_string()),
    };
    match classify(&p)? {
        Kind::File(_) => {}
        Kind::Missing => {
            if !listing.iter().any(|(n, _)| n.starts_with("shard-")) {
                return Err(Error::Corrupt {
                    what: p.display().to_string(),
                    detail:
                        "manifest missing and no shard folders (not a segalloc data directory?)"
                            .into(),
                });
            }
            r.error(None, None, "missing, but shard folders exist");
            return Ok(None);
        }
        k => {
            r.error(
                None,
                None,
                format!("is {}, not a regular file (not followed)", k.describe()),
            );
            return Ok(None);
        }
    }
    let (f, m) = open_regular(&p)?;
    let mut buf = [0u8; meta::MANIFEST_BYTES];
    let n = read_at_most(&f, 0, &mut buf).map_err(|e| Error::io("read", Some(&p), e))?;
    if m.len() != meta::MANIFEST_BYTES as u64 {
        r.error(
            None,
            None,
            format!("is {} bytes, expected {}", m.len(), meta::MANIFEST_BYTES),
        );
    }
    if n < meta::MANIFEST_BYTES {
        return Ok(None);
    }
    match Manifest::decode(&buf, MANIFEST_FILE) {
        Ok((man, reserved)) => {
            if reserved != 0 {
                r.warn(
                    None,
                    Some(14),
                    format!("reserved bytes 14..16 are {reserved:#06x}, not 0"),
                );
            }
            // The library refuses a manifest of the wrong length; so do we.
            Ok((m.len() == meta::MANIFEST_BYTES as u64).then_some(man))
        }
        Err(Error::Corrupt { detail, .. }) => {
            r.error(None, Some(0), detail);
            Ok(None)
        }
        Err(e) => {
            r.error(None, Some(0), e.to_string());
            Ok(None)
        }
    }
}

/// Find out whether the directory is open elsewhere, without creating
/// anything. Returns the lock guard to hold while reading.
fn probe_lock(
    dir: &Path,
    manifest_ok: bool,
    problems: &mut Vec<Problem>,
) -> Result<(Option<DataDir>, LockStatus)> {
    let p = dir.join(LOCK_FILE);
    match classify(&p)? {
        // `open_read_only` would create it (O_CREAT): don't.
        Kind::Missing => return Ok((None, LockStatus::NoLockFile)),
        Kind::File(_) => {}
        k => {
            Reporter {
                out: problems,
                shard: None,
                file: Some(LOCK_FILE.to_string()),
            }
            .error(
                None,
                None,
                format!(
                    "is {}, not a regular file: the library cannot lock the directory",
                    k.describe()
                ),
            );
            return Ok((
                None,
                LockStatus::Unknown(format!("{LOCK_FILE} is {}", k.describe())),
            ));
        }
    }
    if !manifest_ok {
        // `open_read_only` reads the manifest before the lock.
        return Ok((
            None,
            LockStatus::Unknown("the manifest is unusable, so the lock was not tried".into()),
        ));
    }
    match DataDir::open_read_only(dir) {
        Ok((dd, false)) => Ok((Some(dd), LockStatus::Taken)),
        Ok((_, true)) => Ok((None, LockStatus::HeldElsewhere)),
        // Opening LOCK read-write fails on a read-only file system or without
        // write permission: read on, but say so.
        Err(Error::Io { op, source, .. }) => Ok((
            None,
            LockStatus::Unknown(format!("{op} of {LOCK_FILE} failed: {source}")),
        )),
        Err(e @ Error::Corrupt { .. }) => Ok((None, LockStatus::Unknown(e.to_string()))),
        Err(e) => Err(e),
    }
}

/// When the manifest is unusable: the geometry of the first valid superblock.
fn geometry_from_superblocks(
    dir: &Path,
    listing: &[(String, Kind)],
    problems: &mut Vec<Problem>,
) -> Result<Option<Manifest>> {
    for (name, kind) in listing {
        let Some(i) = name
            .strip_prefix("shard-")
            .and_then(|d| d.parse::<u16>().ok())
        else {
            continue;
        };
        if !matches!(kind, Kind::Dir) || *name != shard_folder_name(i) {
            continue;
        }
        let p = dir.join(name).join(META_FILE);
        if !matches!(classify(&p)?, Kind::File(_)) {
            continue;
        }
        let (f, _) = open_regular(&p)?;
        let mut sb = [0u8; meta::MANIFEST_BYTES];
        let n = read_at_most(&f, 0, &mut sb).map_err(|e| Error::io("read", Some(&p), e))?;
        if n < sb.len() {
            continue;
        }
        if let Ok((m, _)) = Manifest::decode(&sb, "superblock") {
            Reporter {
                out: problems,
                shard: None,
                file: Some(MANIFEST_FILE.to_string()),
            }
            .warn(
                None,
                None,
                format!("unusable; the geometry is taken from {name}/{META_FILE}'s superblock"),
            );
            return Ok(Some(m));
        }
    }
    Reporter {
        out: problems,
        shard: None,
        file: Some(MANIFEST_FILE.to_string()),
    }
    .error(
        None,
        None,
        "unusable, and no shard has a valid superblock: the shards cannot be read",
    );
    Ok(None)
}

// ---------------------------------------------------------------------------
// Shards
// ---------------------------------------------------------------------------

fn scan_shard(
    dir: &Path,
    g: &Manifest,
    idx: u16,
    problems: &mut Vec<Problem>,
) -> Result<ShardReport> {
    let mut rep = ShardReport::new(idx, g.dir_tag());
    let folder = rep.folder.clone();
    let fpath = dir.join(&folder);
    {
        let mut r = Reporter {
            out: problems,
            shard: Some(idx),
            file: Some(folder.clone()),
        };
        match classify(&fpath)? {
            Kind::Dir => {}
            Kind::Missing => {
                r.warn(
                    None,
                    None,
                    "shard folder is missing: the shard holds nothing (opening recreates it)",
                );
                return Ok(rep);
            }
            k => {
                r.error(
                    None,
                    None,
                    format!("is {}, not a directory (not followed)", k.describe()),
                );
                return Ok(rep);
            }
        }
    }

    // Data files and strays.
    let listing = list_dir(&fpath)?;
    let mut present_any: Vec<u32> = Vec::new();
    for (name, kind) in &listing {
        let mut r = Reporter {
            out: problems,
            shard: Some(idx),
            file: Some(format!("{folder}/{name}")),
        };
        if name == META_FILE {
            continue;
        }
        let Some(n) = parse_data_file_name(name) else {
            r.warn(None, None, "unexpected entry in the shard folder; ignored");
            continue;
        };
        present_any.push(n);
        match kind {
            Kind::File(m) => {
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
            k => r.error(
                None,
                None,
                format!(
                    "data file is {}, not a regular file: segalloc does not follow it",
                    k.describe()
                ),
            ),
        }
    }
    rep.data_files.sort_by_key(|f| f.number);
    present_any.sort_unstable();

    // meta.seg.
    let mlabel = format!("{folder}/{META_FILE}");
    let mpath = fpath.join(META_FILE);
    let mut r = Reporter {
        out: problems,
        shard: Some(idx),
        file: Some(mlabel.clone()),
    };
    match classify(&mpath)? {
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
            return Ok(rep);
        }
        k => {
            r.error(
                None,
                None,
                format!("is {}, not a regular file (not followed)", k.describe()),
            );
            return Ok(rep);
        }
    }
    let (f, m) = open_regular(&mpath)?;
    let size = m.len();
    rep.meta = Some(FileInfo::from_metadata(META_FILE, &m));
    let rd = |off: u64, buf: &mut [u8]| {
        read_at_most(&f, off, buf).map_err(|e| Error::io("read", Some(&mpath), e))
    };

    // Superblock.
    let mut sb = [0u8; meta::MANIFEST_BYTES];
    let n = rd(0, &mut sb)?;
    let mut hwm_buf = [0u8; 8];
    let hwm_n = rd(meta::HWM_OFFSET, &mut hwm_buf)?;
    let hwm_word = (hwm_n == 8).then(|| u64::from_le_bytes(hwm_buf));
    // As recovery: a file shorter than a superblock, or an all-zero one, is
    // blank, and opening the shard re-creates the metadata.
    let blank = n < sb.len() || sb.iter().all(|&b| b == 0);
    if blank {
        let marked = hwm_word.is_some_and(|w| w != 0);
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
            return Ok(rep);
        }
    } else {
        rep.initialised = true;
        match Manifest::decode(&sb, "superblock") {
            Err(Error::Corrupt { detail, .. }) => {
                r.error(None, Some(0), format!("superblock: {detail}"))
            }
            Err(e) => r.error(None, Some(0), format!("superblock: {e}")),
            Ok((m, shard)) => {
                if m.dir_id != g.dir_id {
                    r.error(
                        None,
                        Some(16),
                        format!(
                            "superblock belongs to another data directory (id {:#018x}, the manifest's is {:#018x})",
                            m.dir_id, g.dir_id
                        ),
                    );
                }
                if shard != idx {
                    r.error(
                        None,
                        Some(14),
                        format!("superblock says shard {shard}, the folder is shard {idx}"),
                    );
                }
                let fields = [
                    ("shard count", m.shard_count as u64, g.shard_count as u64),
                    ("window bytes", m.window_bytes, g.window_bytes),
                    ("max file bytes", m.max_file_bytes, g.max_file_bytes),
                ];
                for (what, on_disk, want) in fields {
                    if on_disk != want {
                        r.error(
                            None,
                            Some(0),
                            format!(
                                "superblock disagrees with the manifest: {what} {on_disk}, manifest {want}"
                            ),
                        );
                    }
                }
            }
        }
    }

    // High-water mark.
    let hwm = match hwm_word {
        None => {
            r.error(
                None,
                Some(meta::HWM_OFFSET),
                format!(
                    "metadata truncated: {size} bytes, too short for the directory high-water mark"
                ),
            );
            None
        }
        Some(w) => {
            let h = meta::decode_hwm(w);
            if h.is_none() {
                r.error(
                    None,
                    Some(meta::HWM_OFFSET),
                    format!("directory high-water mark is torn (word {w:#018x})"),
                );
            }
            h
        }
    };
    rep.hwm = hwm;
    rep.entry_capacity = entry_capacity(size);
    let readable = u32::try_from(rep.entry_capacity).unwrap_or(u32::MAX);
    let scan_to = match hwm {
        Some(h) => {
            let need = bytes_for_entries(h);
            if size < need {
                r.error(
                    None,
                    None,
                    format!(
                        "metadata truncated: {size} bytes, the directory needs {need} (high-water mark {h}); entries {readable}..{h} cannot be read"
                    ),
                );
            }
            h.min(readable)
        }
        // Unknown mark: check every entry the file holds.
        None => readable,
    };

    // Entries.
    let window_blocks = g.window_bytes / BLOCK_BYTES;
    let file_blocks = g.max_file_bytes / BLOCK_BYTES;
    let mut pages = Pages::new(&f, &mpath);
    for i in 0..scan_to {
        let off = meta::entry_offset(i);
        let Some(raw) = pages.get(off, meta::ENTRY_BYTES as usize)? else {
            break;
        };
        rep.entries_scanned += 1;
        let (h, bm) = raw.split_at(meta::ENTRY_HEADER_BYTES as usize);
        let state = u64::from_le_bytes(h[0..8].try_into().expect("8 bytes"));
        let e = match EntryHeader::decode(h) {
            Err(why) => {
                rep.entries_corrupt += 1;
                r.error(
                    Some(i),
                    Some(off),
                    format!("{why} (state word {state:#018x})"),
                );
                continue;
            }
            Ok(None) => {
                rep.entries_free += 1;
                continue;
            }
            Ok(Some(e)) => e,
        };
        if h[28..].iter().any(|&b| b != 0) {
            r.warn(
                Some(i),
                Some(off + 28),
                "reserved header bytes 28..64 are not zero",
            );
        }
        let (b0, b1) = (e.block as u64, e.block as u64 + e.blocks as u64);
        let mut bad = false;
        if e.blocks == 0 || b1 > file_blocks {
            r.error(
                Some(i),
                Some(off),
                format!(
                    "segment blocks {b0}..{b1} of data file {} lie outside the maximum file size ({file_blocks} blocks)",
                    e.file
                ),
            );
            bad = true;
        } else if b0 / window_blocks != (b1 - 1) / window_blocks {
            r.error(
                Some(i),
                Some(off),
                format!(
                    "segment blocks {b0}..{b1} of data file {} cross the window boundary at block {}",
                    e.file,
                    (b0 / window_blocks + 1) * window_blocks
                ),
            );
            bad = true;
        }
        let words = e.slots.div_ceil(64) as usize;
        let mut bitmap = Vec::with_capacity(words);
        let mut past = 0u32;
        let mut first_past: Option<(u32, usize)> = None;
        for w in 0..meta::BITMAP_WORDS {
            let word = u64::from_le_bytes(bm[w * 8..w * 8 + 8].try_into().expect("8 bytes"));
            let valid = e.slots.saturating_sub(w as u32 * 64).min(64);
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            let extra = word & !mask;
            if extra != 0 {
                past += extra.count_ones();
                first_past.get_or_insert((w as u32 * 64 + extra.trailing_zeros(), w));
            }
            if w < words {
                bitmap.push(word & mask);
            }
        }
        if let Some((slot, w)) = first_past {
            r.error(
                Some(i),
                Some(off + meta::ENTRY_HEADER_BYTES + w as u64 * 8),
                format!(
                    "bitmap marks {past} slot(s) past the segment's {} slots (first: slot {slot}, bitmap word {w})",
                    e.slots
                ),
            );
        }
        if bad {
            rep.entries_corrupt += 1;
            continue;
        }
        let slot_bytes = classes::class(e.class_id)
            .map(|c| c.slot_bytes)
            .unwrap_or(CLASSES[0].slot_bytes);
        let live = bitmap.iter().map(|w| w.count_ones()).sum();
        rep.segments.push(SegmentInfo {
            entry: i,
            header: e,
            slot_bytes,
            live,
            dropped: false,
            bitmap,
        });
    }

    // Entries published past the mark: recovery never sees them.
    if let Some(h) = hwm {
        let limit_bytes = bytes_for_entries(h).saturating_add(PAST_HWM_SCAN_BYTES);
        let mut i = h;
        while i < readable && meta::entry_offset(i) + meta::ENTRY_BYTES <= limit_bytes {
            let off = meta::entry_offset(i);
            let Some(raw) = pages.get(off, meta::ENTRY_HEADER_BYTES as usize)? else {
                break;
            };
            if let Ok(Some(_)) = EntryHeader::decode(raw) {
                r.warn(
                    Some(i),
                    Some(off),
                    format!(
                        "entry past the high-water mark {h} is published; recovery ignores it (its allocations are lost)"
                    ),
                );
            }
            i += 1;
        }
    }

    resolve_overlaps(&mut rep.segments, &mut r);
    drop(r);
    check_data_files(&rep, &folder, &present_any, problems);
    rep.free_runs = free_runs(&rep, &present_any, g);
    if size > meta::ROOTS_OFFSET {
        rep.roots = scan_roots(&mut pages, &rep, &mlabel, problems)?;
    }
    if size < meta::DIR_OFFSET {
        Reporter {
            out: problems,
            shard: Some(idx),
            file: Some(mlabel),
        }
        .error(
            None,
            Some(meta::ROOTS_OFFSET),
            format!(
                "metadata truncated: {size} bytes, the root table ends at {}",
                meta::DIR_OFFSET
            ),
        );
    }
    Ok(rep)
}

/// Directory entries that fit entirely in a metadata file of `size` bytes.
fn entry_capacity(size: u64) -> u64 {
    if size < meta::DIR_OFFSET {
        return 0;
    }
    let rest = size - meta::DIR_OFFSET;
    (rest / PAGE_BYTES) * meta::ENTRIES_PER_PAGE
        + ((rest % PAGE_BYTES) / meta::ENTRY_BYTES).min(meta::ENTRIES_PER_PAGE)
}

/// Bytes a metadata file needs for `hwm` entries (as recovery computes it).
fn bytes_for_entries(hwm: u32) -> u64 {
    if hwm == 0 {
        meta::DIR_OFFSET
    } else {
        meta::entry_offset(hwm - 1) + meta::ENTRY_BYTES
    }
}

/// Mark the segments recovery drops (its exact algorithm), and report every
/// overlapping pair found by a sweep.
fn resolve_overlaps(segs: &mut [SegmentInfo], r: &mut Reporter<'_>) {
    let end = |s: &SegmentInfo| s.header.block as u64 + s.header.blocks as u64;
    let mut order: Vec<usize> = (0..segs.len()).collect();
    // Stable, like recovery's sort of entries found in index order.
    order.sort_by_key(|&k| (segs[k].header.file, segs[k].header.block));

    // Recovery: compare with the last kept run only.
    let mut keep: Vec<usize> = Vec::new();
    for &k in &order {
        if let Some(&p) = keep.last() {
            let (pe, e) = (&segs[p].header, &segs[k].header);
            if pe.file == e.file && end(&segs[p]) > e.block as u64 {
                let loser = if pe.generation < e.generation { p } else { k };
                segs[loser].dropped = true;
                if loser == p {
                    keep.pop();
                    keep.push(k);
                }
                continue;
            }
        }
        keep.push(k);
    }

    // Report: each segment that starts inside the furthest-reaching earlier
    // segment of its file.
    let mut reach: Option<(u32, u64, usize)> = None; // (file, end, index)
    for &k in &order {
        let s = &segs[k];
        if let Some((file, rend, o)) = reach
            && file == s.header.file
            && (s.header.block as u64) < rend
        {
            let other = &segs[o];
            let verdict = match (s.dropped, other.dropped) {
                (true, false) => {
                    format!("recovery keeps entry {} and drops this one", other.entry)
                }
                (false, true) => {
                    format!("recovery keeps this one and drops entry {}", other.entry)
                }
                (true, true) => "recovery drops both".to_string(),
                (false, false) => "recovery keeps both (a bug)".to_string(),
            };
            r.error(
                    Some(s.entry),
                    Some(meta::entry_offset(s.entry)),
                    format!(
                        "segment blocks {}..{} (generation {}) of {} overlaps entry {} (blocks {}..{}, generation {}); {verdict}",
                        s.header.block,
                        end(s),
                        s.header.generation,
                        data_file_name(s.header.file),
                        other.entry,
                        other.header.block,
                        end(other),
                        other.header.generation,
                    ),
                );
        }
        let e = end(s);
        reach = match reach {
            Some((file, rend, o)) if file == s.header.file && rend >= e => Some((file, rend, o)),
            _ => Some((s.header.file, e, k)),
        };
    }
}

/// Referenced data files that are missing; live slots past the end of their
/// file.
fn check_data_files(
    rep: &ShardReport,
    folder: &str,
    present_any: &[u32],
    problems: &mut Vec<Problem>,
) {
    let mut missing: BTreeMap<u32, (Vec<u32>, u64, bool)> = BTreeMap::new();
    for s in &rep.segments {
        if present_any.binary_search(&s.header.file).is_err() {
            let m = missing
                .entry(s.header.file)
                .or_insert((Vec::new(), 0, false));
            m.0.push(s.entry);
            if !s.dropped {
                m.1 += s.live as u64;
                m.2 = true;
            }
        }
    }
    for (n, (entries, live, kept)) in missing {
        let mut r = Reporter {
            out: problems,
            shard: Some(rep.index),
            file: Some(format!("{folder}/{}", data_file_name(n))),
        };
        r.error(
            None,
            None,
            format!(
                "data file is missing but referenced by {} segment(s) (entries {}) holding {live} live slot(s){}",
                entries.len(),
                list(&entries),
                if kept {
                    ""
                } else {
                    "; recovery drops them all as overlaps"
                }
            ),
        );
    }
    for s in rep.kept_segments() {
        let Some(df) = rep.data_file(s.header.file) else {
            continue;
        };
        let size = df.file.size_bytes;
        if s.start_offset() + s.segment_bytes() <= size || s.live == 0 {
            continue;
        }
        let mut past = 0u64;
        let mut first = None;
        for slot in s.live_slots() {
            if s.slot_offset(slot) + s.slot_bytes as u64 > size {
                past += 1;
                first.get_or_insert(slot);
            }
        }
        if let Some(slot) = first {
            Reporter {
                out: problems,
                shard: Some(rep.index),
                file: Some(format!("{folder}/{}", df.file.name)),
            }
            .warn(
                Some(s.entry),
                Some(s.slot_offset(slot)),
                format!(
                    "{past} live slot(s) of {} bytes lie past the end of the file ({size} bytes; first: slot {slot}): they read as zeros",
                    s.slot_bytes
                ),
            );
        }
    }
}

/// Free runs as recovery's free-space rebuild makes them.
fn free_runs(rep: &ShardReport, present_any: &[u32], g: &Manifest) -> FreeRuns {
    let window_blocks = g.window_bytes / BLOCK_BYTES;
    let file_blocks = g.max_file_bytes / BLOCK_BYTES;
    let mut runs: Vec<(u32, u64, u64)> = rep
        .kept_segments()
        .map(|s| (s.header.file, s.header.block as u64, s.header.blocks as u64))
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

/// The root table: every slot checked, the winners returned by name.
fn scan_roots(
    pages: &mut Pages<'_>,
    rep: &ShardReport,
    mlabel: &str,
    problems: &mut Vec<Problem>,
) -> Result<Vec<RootInfo>> {
    let mut r = Reporter {
        out: problems,
        shard: Some(rep.index),
        file: Some(mlabel.to_string()),
    };
    let mut valid: Vec<(usize, RootSlot, Handle)> = Vec::new();
    for i in 0..meta::ROOT_SLOTS {
        let off = meta::root_offset(i);
        let Some(b) = pages.get(off, meta::ROOT_SLOT_BYTES as usize)? else {
            break;
        };
        let seq = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
        if seq == 0 {
            continue;
        }
        let Some(slot) = RootSlot::decode(b) else {
            r.error(
                None,
                Some(off),
                format!(
                    "root slot {i} (seq {seq}): {}; recovery ignores it",
                    explain_root(b)
                ),
            );
            continue;
        };
        match Handle::from_bytes(&slot.handle) {
            Ok(h) => valid.push((i, slot, h)),
            Err(e) => r.error(
                None,
                Some(off + 76),
                format!(
                    "root slot {i} ({:?}, seq {seq}): {e}; recovery drops it",
                    slot.name
                ),
            ),
        }
    }
    // Recovery's choice: the highest seq, the first slot on a tie.
    let mut best: HashMap<&str, usize> = HashMap::new();
    for (k, (_, s, _)) in valid.iter().enumerate() {
        match best.get(s.name.as_str()) {
            Some(&b) if valid[b].1.seq >= s.seq => {}
            _ => {
                best.insert(s.name.as_str(), k);
            }
        }
    }
    let mut by_name: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (k, (_, s, _)) in valid.iter().enumerate() {
        by_name.entry(s.name.as_str()).or_default().push(k);
    }
    for (name, ks) in &by_name {
        if ks.len() > 1 {
            let w = best[name];
            let slots: Vec<String> = ks
                .iter()
                .map(|&k| format!("{} (seq {})", valid[k].0, valid[k].1.seq))
                .collect();
            r.error(
                None,
                Some(meta::root_offset(valid[ks[0]].0)),
                format!(
                    "root name {name:?} is in {} slots: {}; recovery keeps slot {} and clears the others",
                    ks.len(),
                    slots.join(", "),
                    valid[w].0
                ),
            );
        }
    }
    // A pair of slots (2k, 2k + 1) belongs to one name; two names in one
    // pair come from damage, and recovery keeps the later record.
    let mut winners: Vec<(&str, usize)> = best.iter().map(|(n, &k)| (*n, k)).collect();
    winners.sort_by_key(|&(_, k)| (std::cmp::Reverse(valid[k].1.seq), valid[k].0));
    let mut pair_owner: HashMap<usize, usize> = HashMap::new();
    winners.retain(|&(name, k)| {
        let slot = valid[k].0;
        match pair_owner.get(&(slot / 2)) {
            None => {
                pair_owner.insert(slot / 2, k);
                true
            }
            Some(&o) => {
                r.error(
                    None,
                    Some(meta::root_offset(slot)),
                    format!(
                        "root {name:?} (slot {slot}, seq {}) shares the slot pair of root {:?} (slot {}, seq {}); recovery keeps the later record and drops this one",
                        valid[k].1.seq, valid[o].1.name, valid[o].0, valid[o].1.seq
                    ),
                );
                false
            }
        }
    });
    let mut roots = Vec::new();
    for (name, k) in winners {
        let (slot, s, h) = &valid[k];
        let why = root_target_problem(rep, h);
        if let Some(why) = &why {
            r.error(
                None,
                Some(meta::root_offset(*slot)),
                format!("root {name:?} (slot {slot}): handle {h} {why}"),
            );
        }
        roots.push(RootInfo {
            slot: *slot,
            seq: s.seq,
            name: s.name.clone(),
            handle: *h,
            valid: why.is_none(),
        });
    }
    roots.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(roots)
}

/// Why a root slot that [`RootSlot::decode`] rejected is invalid.
fn explain_root(b: &[u8]) -> String {
    let crc = u32::from_le_bytes(b[120..124].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..120]) {
        return "checksum mismatch".into();
    }
    let n = b[8] as usize;
    if n == 0 || n > meta::ROOT_NAME_MAX {
        return format!("name length {n} out of range 1..=64");
    }
    if std::str::from_utf8(&b[12..12 + n]).is_err() {
        return "name is not UTF-8".into();
    }
    "invalid".into()
}

/// Why a root's handle does not name a live slot of this shard, if it does
/// not (mirrors `SegmentAllocator::locate` and its liveness check).
fn root_target_problem(rep: &ShardReport, h: &Handle) -> Option<String> {
    if h.dir_tag != rep.dir_tag {
        return Some(format!(
            "belongs to another data directory (tag {:#010x}, this one {:#010x})",
            h.dir_tag, rep.dir_tag
        ));
    }
    if h.shard != rep.index {
        return Some(format!("names shard {}", h.shard));
    }
    let Some(seg) = rep
        .segments
        .iter()
        .find(|s| s.entry == h.segment && !s.dropped)
    else {
        return Some(format!("names entry {}, which holds no segment", h.segment));
    };
    if seg.header.generation != h.generation {
        return Some(format!(
            "has generation {}, the segment has {} (released and reused since)",
            h.generation, seg.header.generation
        ));
    }
    if seg.header.class_id != h.class_id {
        return Some(format!(
            "has class {}, the segment has {}",
            h.class_id, seg.header.class_id
        ));
    }
    if seg.header.file != h.file {
        return Some(format!(
            "names data file {}, the segment is in {}",
            h.file, seg.header.file
        ));
    }
    let start = seg.start_offset();
    let slot_bytes = seg.slot_bytes as u64;
    let end = start + seg.header.slots as u64 * slot_bytes;
    if h.offset < start || h.offset >= end || !(h.offset - start).is_multiple_of(slot_bytes) {
        return Some(format!(
            "offset {:#x} is not a slot of the segment (slots at {start:#x}..{end:#x} every {slot_bytes} bytes)",
            h.offset
        ));
    }
    let slot = ((h.offset - start) / slot_bytes) as u32;
    if !seg.is_live(slot) {
        return Some(format!("points at slot {slot}, which is free"));
    }
    None
}

/// `a, b, c` (the first few, then the count).
fn list(v: &[u32]) -> String {
    let mut s: Vec<String> = v.iter().take(LIST_MAX).map(|x| x.to_string()).collect();
    if v.len() > LIST_MAX {
        s.push(format!("… {} more", v.len() - LIST_MAX));
    }
    s.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_file_names_roundtrip() {
        for n in [0, 1, 999_999, 1_000_000, u32::MAX] {
            assert_eq!(parse_data_file_name(&data_file_name(n)), Some(n));
        }
        for bad in [
            "data-1.seg",
            "data-.seg",
            "data-00000a.seg",
            "meta.seg",
            "data-000001.se",
        ] {
            assert_eq!(parse_data_file_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn capacity_matches_entry_offsets() {
        for size in [
            0,
            meta::DIR_OFFSET,
            meta::DIR_OFFSET + 575,
            meta::DIR_OFFSET + 576,
            1 << 20,
        ] {
            let cap = entry_capacity(size);
            if cap > 0 {
                assert!(meta::entry_offset(cap as u32 - 1) + meta::ENTRY_BYTES <= size);
            }
            assert!(meta::entry_offset(cap as u32) + meta::ENTRY_BYTES > size);
        }
        assert_eq!(
            bytes_for_entries(7),
            meta::DIR_OFFSET + 7 * meta::ENTRY_BYTES
        );
    }

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
