//! The inspector's report types.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::Serialize;

use crate::format::classes::BLOCK_BYTES;
use crate::format::scan::{RootScan, SegmentScan};
use crate::format::{Handle, Manifest, shard_folder_name};

pub use crate::format::scan::Severity;

/// One thing found wrong in a data directory, located as precisely as
/// possible.
///
/// Displays as one line:
/// `error: shard 0: shard-000/meta.seg: entry 3: offset 0x9480: entry checksum mismatch …`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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

impl LockStatus {
    /// One word: `free`, `held-elsewhere`, `no-lock-file`, `unknown`.
    pub fn word(&self) -> &'static str {
        match self {
            LockStatus::Taken => "free",
            LockStatus::HeldElsewhere => "held-elsewhere",
            LockStatus::NoLockFile => "no-lock-file",
            LockStatus::Unknown(_) => "unknown",
        }
    }
}

/// A file's size and the space the file system allocated to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileInfo {
    /// File name within its folder.
    pub name: String,
    /// Size in bytes (`st_size`).
    pub size_bytes: u64,
    /// 512-byte blocks allocated (`st_blocks`): less than the size for a
    /// sparse file.
    pub blocks_512: u64,
    /// Bytes allocated on disk (`st_blocks × 512`, saturating).
    pub allocated_bytes: u64,
}

impl FileInfo {
    pub(super) fn from_metadata(name: &str, m: &Metadata) -> FileInfo {
        FileInfo {
            name: name.to_string(),
            size_bytes: m.len(),
            blocks_512: m.blocks(),
            allocated_bytes: m.blocks().saturating_mul(512),
        }
    }
}

/// A data file of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DataFileInfo {
    /// Name, size and allocation.
    #[serde(flatten)]
    pub file: FileInfo,
    /// The file number (handles name it).
    pub number: u32,
    /// Windows its size spans (`⌈size / window_bytes⌉`): the mappings it
    /// needs when fully in use.
    pub windows: u64,
}

/// A published, valid segment directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    scan: SegmentScan,
}

impl SegmentInfo {
    pub(super) fn new(scan: SegmentScan) -> SegmentInfo {
        SegmentInfo { scan }
    }
    /// Directory entry index (the segment id in handles).
    pub fn entry(&self) -> u32 {
        self.scan.entry
    }
    /// Size class.
    pub fn class_id(&self) -> u8 {
        self.scan.header.class_id
    }
    /// Generation.
    pub fn generation(&self) -> u32 {
        self.scan.header.generation
    }
    /// Data file number.
    pub fn file(&self) -> u32 {
        self.scan.header.file
    }
    /// First 64 KiB block in the data file.
    pub fn first_block(&self) -> u32 {
        self.scan.header.block
    }
    /// Slots.
    pub fn slots(&self) -> u32 {
        self.scan.header.slots
    }
    /// Slot size of its class.
    pub fn slot_bytes(&self) -> u32 {
        self.scan.header.slot_bytes()
    }
    /// Live slots.
    pub fn live(&self) -> u32 {
        self.scan.live
    }
    /// True when recovery drops it: it overlaps a segment of a higher
    /// generation.
    pub fn dropped(&self) -> bool {
        self.scan.dropped
    }
    /// Byte offset of the segment in its data file.
    pub fn start_offset(&self) -> u64 {
        self.scan.header.start_offset()
    }
    /// Segment length in bytes.
    pub fn segment_bytes(&self) -> u64 {
        self.scan.header.blocks as u64 * BLOCK_BYTES
    }
    /// Byte offset of slot `slot` in the data file.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.scan.slot_offset(slot)
    }
    /// Whether slot `slot` is live.
    pub fn is_live(&self, slot: u32) -> bool {
        self.scan.is_live(slot)
    }
    /// The live slot indices, ascending.
    pub fn live_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.scan.live_slots()
    }
}

/// A named root, as recovery restores it.
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
    /// Whether the handle names a live slot of this shard; `false`: the root
    /// is dangling (its target was freed).
    pub valid: bool,
}

impl From<&RootScan> for RootInfo {
    fn from(r: &RootScan) -> RootInfo {
        RootInfo {
            slot: r.slot,
            seq: r.seq,
            name: r.name.clone(),
            handle: r.handle,
            valid: r.live,
        }
    }
}

/// The use of one size class in a shard.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClassUsage {
    /// Class id.
    #[serde(rename = "class")]
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

/// Free runs of blocks below the used ends of the data files, as the
/// allocator's free-space map would hold them after recovery (split at
/// window boundaries). Saturating: hostile metadata cannot wrap them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FreeRuns {
    /// Number of runs.
    pub count: u64,
    /// Bytes in them.
    pub bytes: u64,
    /// Bytes of the largest.
    pub largest_bytes: u64,
}

impl FreeRuns {
    /// Add `other` (saturating).
    pub fn add(&mut self, other: &FreeRuns) {
        self.count = self.count.saturating_add(other.count);
        self.bytes = self.bytes.saturating_add(other.bytes);
        self.largest_bytes = self.largest_bytes.max(other.largest_bytes);
    }
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
    /// Free space below the used ends of the data files.
    pub free_runs: FreeRuns,
}

impl ShardReport {
    pub(super) fn new(index: u16, dir_tag: u32) -> ShardReport {
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
        self.segments.iter().filter(|s| !s.dropped())
    }

    /// Entries in use (kept segments).
    pub fn entries_in_use(&self) -> u64 {
        self.kept_segments().count() as u64
    }

    /// Live allocations.
    pub fn allocations_live(&self) -> u64 {
        sum(self.kept_segments().map(|s| s.live() as u64))
    }

    /// Bytes of live slots.
    pub fn bytes_live(&self) -> u64 {
        sum(self
            .kept_segments()
            .map(|s| (s.live() as u64).saturating_mul(s.slot_bytes() as u64)))
    }

    /// Bytes of segments in use (the allocator's `bytes_allocated`).
    pub fn segment_bytes(&self) -> u64 {
        sum(self.kept_segments().map(|s| s.segment_bytes()))
    }

    /// Bytes inside segments in use that hold no live slot (free slots and
    /// the tails no slot covers).
    pub fn free_bytes_in_segments(&self) -> u64 {
        self.segment_bytes().saturating_sub(self.bytes_live())
    }

    /// `free_bytes_in_segments / segment_bytes` (0 without segments).
    pub fn fragmentation(&self) -> f64 {
        ratio(self.free_bytes_in_segments(), self.segment_bytes())
    }

    /// Windows the data files' sizes span.
    pub fn windows_spanned(&self) -> u64 {
        sum(self.data_files.iter().map(|f| f.windows))
    }

    /// Distinct windows holding at least one segment in use.
    pub fn windows_in_use(&self, window_bytes: u64) -> u64 {
        let mut w: Vec<(u32, u64)> = self
            .kept_segments()
            .map(|s| (s.file(), s.start_offset() / window_bytes.max(1)))
            .collect();
        w.sort_unstable();
        w.dedup();
        w.len() as u64
    }

    /// Use per size class (classes with segments only), by class id.
    pub fn classes(&self) -> Vec<ClassUsage> {
        let mut m: BTreeMap<u8, ClassUsage> = BTreeMap::new();
        for s in self.kept_segments() {
            let c = m.entry(s.class_id()).or_insert_with(|| ClassUsage {
                class_id: s.class_id(),
                slot_bytes: s.slot_bytes(),
                ..ClassUsage::default()
            });
            c.segments += 1;
            c.segment_bytes = c.segment_bytes.saturating_add(s.segment_bytes());
            c.slots += s.slots() as u64;
            c.live += s.live() as u64;
            c.live_bytes = c
                .live_bytes
                .saturating_add(s.live() as u64 * s.slot_bytes() as u64);
        }
        m.into_values().collect()
    }

    /// The handle of slot `slot` of `seg`.
    pub fn handle(&self, seg: &SegmentInfo, slot: u32) -> Handle {
        seg.scan.handle(self.index, self.dir_tag, slot)
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

/// Figures summed over the shards (saturating: hostile metadata or huge
/// sparse files cannot wrap them).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
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
    /// Entries below the shards' directory high-water marks.
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

impl Totals {
    fn add_shard(&mut self, s: &ShardReport) {
        let add = |a: &mut u64, b: u64| *a = a.saturating_add(b);
        add(&mut self.shards, 1);
        add(&mut self.data_files, s.data_files.len() as u64);
        for f in &s.data_files {
            add(&mut self.data_bytes, f.file.size_bytes);
            add(&mut self.data_allocated_bytes, f.file.allocated_bytes);
        }
        if let Some(m) = &s.meta {
            add(&mut self.metadata_bytes, m.size_bytes);
            add(&mut self.metadata_allocated_bytes, m.allocated_bytes);
        }
        add(&mut self.windows_spanned, s.windows_spanned());
        add(&mut self.entries_hwm, s.hwm.unwrap_or(0) as u64);
        add(&mut self.entries_in_use, s.entries_in_use());
        add(&mut self.entries_free, s.entries_free as u64);
        add(&mut self.segments, s.entries_in_use());
        add(&mut self.segment_bytes, s.segment_bytes());
        add(&mut self.allocations_live, s.allocations_live());
        add(&mut self.bytes_live, s.bytes_live());
        add(&mut self.free_bytes_in_segments, s.free_bytes_in_segments());
        self.free_runs.add(&s.free_runs);
        add(&mut self.roots, s.roots.len() as u64);
    }
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
        let mut t = Totals::default();
        for s in &self.shards {
            t.add_shard(s);
        }
        t.fragmentation = ratio(t.free_bytes_in_segments, t.segment_bytes);
        t
    }
}

fn sum(it: impl Iterator<Item = u64>) -> u64 {
    it.fold(0, u64::saturating_add)
}

fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}
