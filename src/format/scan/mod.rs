//! The one reader of a shard's metadata: [`scan`] reads the superblock, the
//! counter words, every directory entry below the high-water mark (and the
//! published ones past it), resolves overlapping segments, checks the data
//! files the directory refers to, and picks the roots. It returns what
//! recovery restores and every [`Finding`] met on the way, located by file,
//! entry and byte offset. Recovery (`alloc::recover`) applies the result and
//! fails on the first finding that [`refuses open`](Defect::refuses_open);
//! the inspector reports them all.
//!
//! The rules decided here, once:
//! * Overlapping segments: sorted by (file, first block), each compared with
//!   the last one kept; the higher generation is the later segment and wins
//!   (equal generations: the one met first in that order).
//! * Roots: for a name, the valid slot with the highest sequence number (a
//!   tie: the lower slot index). Two names in one slot pair come from damage:
//!   the higher sequence number keeps the pair (a tie: the lower slot index).
//! * A segment that ends past its data file and whose generation is at or
//!   above the durable generation ([`DURABLE_GEN_OFFSET`]) lost its file's
//!   growth to a power loss before any sync promised it: dropped (a
//!   warning). Below it, live slots past the end are damage: refused.
//! * A root whose target is not live in this shard (freed, or its segment
//!   released) is *dangling*: a warning, kept as it is; the library's
//!   `root(name)` returns it and pinning it fails with `NotAllocated`.

use super::entry::{EntryHeader, HeaderDefect};
use super::handle::Handle;
use super::manifest::{self, MANIFEST_BYTES, Manifest};
use super::roots::RootDefect;
use super::{
    DURABLE_GEN_OFFSET, GEN_OFFSET, HWM_OFFSET, META_PAGE_BYTES, ROOTS_OFFSET, decode_counter,
    directory_end_bytes, entry_capacity, generation_after, issued_later,
};
use crate::error::Result;

mod data_files;
mod entries;
mod findings;
mod overlaps;
mod roots_pick;

pub use findings::{Defect, Finding, FindingFile, Severity};

use data_files::{check_data_files, drop_lost_growth};
use entries::{scan_entries, scan_past_mark};
use overlaps::resolve_overlaps;

/// How far past the bytes that the high-water mark needs the metadata file
/// is scanned for entries published beyond the mark (the file grows in
/// 1 MiB steps, so a correct file holds at most that much beyond).
pub const PAST_HWM_SCAN_BYTES: u64 = 2 * 1024 * 1024;

/// The bytes of a metadata file of `meta_bytes` bytes whose high-water
/// mark word is `mark` (`None`: the file is too short to hold it) that
/// [`scan`] can need to read: the directory up to the mark and
/// [`PAST_HWM_SCAN_BYTES`] past it. A torn or unreadable mark refuses the
/// shard, and the scan then reads every entry the file holds for its report
/// (skipping the file's holes): a reader that only needs the refusal
/// (recovery) can stop at the root table. Never
/// more than `meta_bytes`: a file grown past what its directory needs (a
/// sparse file of any size) costs nothing more to open.
pub fn scan_extent(meta_bytes: u64, mark: Option<u64>) -> u64 {
    let end = match mark.and_then(decode_counter) {
        Some(h) => past_mark_limit(h),
        None => super::DIR_OFFSET,
    };
    end.min(meta_bytes)
}

/// Where the scan for entries published past the mark `h` stops.
fn past_mark_limit(h: u32) -> u64 {
    directory_end_bytes(h).saturating_add(PAST_HWM_SCAN_BYTES)
}

/// Positioned reads of a metadata file.
pub trait MetaSource {
    /// Read as much of `buf` as the file holds at `off`; the bytes read
    /// (short only at the end of the file).
    ///
    /// # Errors
    ///
    /// An I/O error of the read.
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<usize>;

    /// The first region at or after `off` that may hold non-zero bytes, as
    /// `[start, end)`; `None` when the rest of the file is holes. The walk
    /// of the directory skips what lies between (a sparse file of any size
    /// costs what it holds, whatever its mark says). The default skips
    /// nothing.
    ///
    /// # Errors
    ///
    /// An I/O error of the lookup.
    fn data_region(&mut self, off: u64) -> Result<Option<(u64, u64)>> {
        Ok(Some((off, u64::MAX)))
    }
}

/// What is known of a data file that the directory refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFileLen {
    /// There is no file of that name.
    Missing,
    /// Something is there but not a regular file (reported elsewhere).
    Unknown,
    /// A regular file of this many bytes.
    Bytes(u64),
}

/// What the shard's superblock holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Superblock {
    /// Shorter than a superblock, or all zero: creation never finished.
    Blank,
    /// Present but invalid (see the findings).
    Invalid,
    /// Valid: the geometry it records and its shard index.
    Valid(Manifest, u16),
}

/// A published, valid directory entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentScan {
    /// Directory entry index (the segment id in handles).
    pub entry: u32,
    /// The decoded header.
    pub header: EntryHeader,
    /// Live slots (bits set below the slot count).
    pub live: u32,
    /// True when recovery drops it: it overlaps a later segment, or a power
    /// loss took its data file's growth before a sync promised it.
    pub dropped: bool,
    /// Bitmap words covering the slots (bits past the slot count cleared).
    pub bitmap: Vec<u64>,
}

impl SegmentScan {
    /// Byte offset of slot `slot` in the data file.
    pub fn slot_offset(&self, slot: u32) -> u64 {
        self.header.start_offset() + slot as u64 * self.header.slot_bytes() as u64
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

    /// The handle of slot `slot`.
    // Used by the inspector (feature `cli`).
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub fn handle(&self, shard: u16, dir_tag: u32, slot: u32) -> Handle {
        Handle::of_slot(shard, dir_tag, self.entry, &self.header, slot)
    }
}

/// A root as recovery restores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootScan {
    /// Root slot index.
    pub slot: usize,
    /// Sequence number.
    pub seq: u64,
    /// The name.
    pub name: String,
    /// The handle it names.
    pub handle: Handle,
    /// Whether the handle names a live slot of this shard (else dangling).
    pub live: bool,
}

/// Everything one scan of a shard's metadata found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardScan {
    /// The superblock.
    pub superblock: Superblock,
    /// The directory high-water mark, when readable and not torn.
    pub hwm: Option<u32>,
    /// Directory entries that fit in the file.
    pub entry_capacity: u64,
    /// Entries below the mark that were read.
    pub entries_scanned: u32,
    /// Free entries below the mark, and the entries of dropped segments.
    /// Entries in holes of a file whose source knows them
    /// ([`MetaSource::data_region`]) are not read, nor listed here: they
    /// are counted in [`free_entries_in_holes`](Self::free_entries_in_holes).
    pub free_entries: Vec<u32>,
    /// Free entries below the mark in holes of the file, skipped unread
    /// (a hole holds zeros: no entry). Always 0 for a source that does
    /// not know holes.
    pub free_entries_in_holes: u64,
    /// The same entries, as ranges `[first, end)` in entry order (a range
    /// per hole: recovery lists those below the file's last data as free).
    pub free_entry_holes: Vec<(u32, u32)>,
    /// Entries below the mark that failed validation.
    pub entries_corrupt: u32,
    /// Valid segments below the mark (dropped ones included), entry order.
    pub segments: Vec<SegmentScan>,
    /// The roots kept, by name.
    pub roots: Vec<RootScan>,
    /// Valid root slots that lost to another (recovery clears them).
    pub root_slots_to_clear: Vec<usize>,
    /// The highest valid root sequence number.
    pub max_root_seq: u64,
    /// The next segment generation to issue.
    pub next_generation: u32,
    /// The durable generation word ([`DURABLE_GEN_OFFSET`]): `Some(0)` in
    /// directories that predate it, `None` when unreadable or torn.
    pub durable_generation: Option<u32>,
    /// Every problem, in the order found.
    pub findings: Vec<Finding>,
}

impl ShardScan {
    /// The segments recovery keeps.
    pub fn kept_segments(&self) -> impl Iterator<Item = &SegmentScan> + '_ {
        self.segments.iter().filter(|s| !s.dropped)
    }

    /// The first finding that makes recovery refuse the shard.
    pub fn refusal(&self) -> Option<&Finding> {
        self.findings.iter().find(|f| f.defect.refuses_open())
    }

    fn push(&mut self, severity: Severity, entry: Option<u32>, offset: Option<u64>, d: Defect) {
        self.findings.push(Finding {
            severity,
            file: FindingFile::Meta,
            entry,
            offset,
            defect: d,
        });
    }
}

/// What [`scan`] checks a shard against.
pub struct ScanTarget<'a> {
    /// The directory's geometry.
    pub geometry: &'a Manifest,
    /// The shard index.
    pub shard: u16,
    /// Bytes of the metadata file.
    pub meta_bytes: u64,
    /// The data file numbered `n`.
    pub data_file: &'a dyn Fn(u32) -> DataFileLen,
}

/// Scan one shard's metadata. Reads only; bounded by the file's size.
///
/// # Errors
///
/// The I/O errors of `src`. Damage is not an error: it is a [`Finding`].
pub fn scan(src: &mut dyn MetaSource, t: &ScanTarget<'_>) -> Result<ShardScan> {
    let mut s = ShardScan {
        superblock: Superblock::Blank,
        hwm: None,
        entry_capacity: entry_capacity(t.meta_bytes),
        entries_scanned: 0,
        free_entries: Vec::new(),
        free_entries_in_holes: 0,
        free_entry_holes: Vec::new(),
        entries_corrupt: 0,
        segments: Vec::new(),
        roots: Vec::new(),
        root_slots_to_clear: Vec::new(),
        max_root_seq: 0,
        next_generation: 1,
        durable_generation: None,
        findings: Vec::new(),
    };
    s.superblock = scan_superblock(src, t, &mut s)?;
    s.hwm = scan_mark(src, t.meta_bytes, &mut s)?;
    let readable = u32::try_from(s.entry_capacity).unwrap_or(u32::MAX);
    let scan_to = match s.hwm {
        Some(h) => {
            let need = directory_end_bytes(h);
            if t.meta_bytes < need {
                let d = Defect::MetaTruncated {
                    size_bytes: t.meta_bytes,
                    need_bytes: need,
                    hwm: h,
                    readable,
                };
                s.push(Severity::Error, None, None, d);
            }
            h.min(readable)
        }
        // Unknown mark: check every entry the file holds.
        None => readable,
    };
    // The file's holes hold no entry: `scan_entries` skips them, so a
    // sparse file costs what it holds whatever its mark says.
    let mut pages = Pages::new(src);
    scan_entries(&mut pages, t, scan_to, &mut s)?;
    if let Some(h) = s.hwm {
        // Beside a writer (a directory open elsewhere), the mark may have
        // risen since it was read, and entries been published under the
        // new mark: the writer raises the mark first. Read again after the
        // entries, it covers every entry that was published before they
        // were read, so none is reported as past it. (Recovery holds the
        // lock: for it the two reads agree.)
        let later = mark_word(&mut pages)?
            .and_then(decode_counter)
            .filter(|&l| l >= h)
            .unwrap_or(h);
        scan_past_mark(&mut pages, later, readable, &mut s)?;
        // And again after those: the writer may have raised it and
        // published under it while they were read. An entry below the mark
        // now was published under it.
        let last_word = mark_word(&mut pages)?;
        if let Some(last) = last_word.and_then(decode_counter).filter(|&l| l >= later) {
            s.findings.retain(|f| {
                !(matches!(f.defect, Defect::PublishedPastMark { .. })
                    && f.entry.is_some_and(|e| e < last))
            });
        }
        // A mark that reads as a fresh file's (all zero, which no writer
        // ever stores) in a shard that was used was lost: a non-zero mark
        // is durable before any data file is made (by the creation, or by
        // the first writable open after a creation cut short). Recovery
        // would open the shard empty and hand out the slots of every
        // allocation again. (Used: an entry published past it, or the
        // first data file there, which the first segment makes: entries
        // released since read as never published.)
        let zeroed = last_word == Some(0);
        let published = s.findings.iter().find_map(|f| match f.defect {
            Defect::PublishedPastMark { .. } => f.entry,
            _ => None,
        });
        if zeroed && (published.is_some() || (t.data_file)(0) != DataFileLen::Missing) {
            let d = Defect::MarkZeroed { entry: published };
            s.push(Severity::Error, None, Some(HWM_OFFSET), d);
        }
    }
    let persisted = match pages.get(GEN_OFFSET, 8)? {
        Some(b) => decode_counter(super::u64_at(b, 0)).unwrap_or(0),
        None => 0,
    };
    s.durable_generation = match pages.get(DURABLE_GEN_OFFSET, 8)? {
        Some(b) => decode_counter(super::u64_at(b, 0)),
        None => None,
    };
    let durable = s.durable_generation.unwrap_or(0);
    let gens = s.segments.iter().map(|x| x.header.generation);
    s.next_generation = next_generation(persisted, durable, readable, gens);
    resolve_overlaps(&mut s);
    drop_lost_growth(t, &mut s);
    check_data_files(t, &mut s);
    if t.meta_bytes > ROOTS_OFFSET {
        roots_pick::scan_roots(&mut pages, t, &mut s)?;
    }
    if t.meta_bytes < super::DIR_OFFSET {
        let d = Defect::RootTableTruncated {
            size_bytes: t.meta_bytes,
        };
        s.push(Severity::Error, None, Some(ROOTS_OFFSET), d);
    }
    Ok(s)
}

/// The generation to issue next: from the words, past every segment found
/// that was issued at or after them (a segment can reach the disk before
/// the word that counted it), and never before the durable generation: a
/// segment published after the reopen has growth no sync covered, and
/// must not count as covered. (The durable word can be ahead of the next
/// one's: a segment dropped for lost growth, then a sync, with the next
/// generation's word stale.) Generations wrap, so "at or after" is in
/// wrapping order, and within `entries` (the directory's capacity) of the
/// words: the segments published since the words last reached the disk
/// each took an entry of their own (an entry is reused only after a sync,
/// which writes the words), while any segment further on is an old one
/// (issued 2^31 or more publications ago, it lies "ahead" in wrapping
/// order too). The durable word lags a sync behind the next one's, so
/// with only it readable, twice that many. A shard with neither word (made
/// before they existed, or both torn) takes the largest generation found.
fn next_generation(
    persisted: u32,
    durable: u32,
    entries: u32,
    gens: impl Iterator<Item = u32>,
) -> u32 {
    let (from, reach) = match (persisted, durable) {
        (0, 0) => return gens.max().map_or(1, generation_after),
        (0, d) => (d, entries.saturating_mul(2)),
        (p, 0) => (p, entries),
        (p, d) if issued_later(d, p) && d.wrapping_sub(p) <= entries => (d, entries),
        (p, _) => (p, entries),
    };
    let ahead = gens
        .map(|g| g.wrapping_sub(from))
        .filter(|&d| d < reach.max(1))
        .map(|d| d + 1)
        .max()
        .unwrap_or(0);
    // 0 is never issued: the one after `u32::MAX` is 1.
    match from.wrapping_add(ahead) {
        0 => 1,
        n => n,
    }
}

fn scan_superblock(
    src: &mut dyn MetaSource,
    t: &ScanTarget<'_>,
    s: &mut ShardScan,
) -> Result<Superblock> {
    let mut sb = [0u8; MANIFEST_BYTES];
    let n = src.read_at(0, &mut sb)?;
    if n < sb.len() || sb.iter().all(|&b| b == 0) {
        return Ok(Superblock::Blank);
    }
    let (m, shard) = match Manifest::decode(&sb, "superblock") {
        Ok(v) => v,
        Err(e) => {
            let detail = match e {
                crate::error::Error::Corrupt { detail, .. } => detail,
                e => e.to_string(),
            };
            s.push(
                Severity::Error,
                None,
                Some(0),
                Defect::SuperblockInvalid { detail },
            );
            return Ok(Superblock::Invalid);
        }
    };
    let g = t.geometry;
    if m.dir_id != g.dir_id {
        let d = Defect::SuperblockOtherDirectory {
            on_disk: m.dir_id,
            manifest: g.dir_id,
        };
        s.push(Severity::Error, None, Some(manifest::OFF_DIR_ID as u64), d);
    }
    if shard != t.shard {
        let d = Defect::SuperblockOtherShard {
            on_disk: shard,
            folder: t.shard,
        };
        s.push(Severity::Error, None, Some(manifest::OFF_SHARD as u64), d);
    }
    let fields = [
        ("shard count", m.shard_count as u64, g.shard_count as u64),
        ("window bytes", m.window_bytes, g.window_bytes),
        ("max file bytes", m.max_file_bytes, g.max_file_bytes),
    ];
    for (field, on_disk, manifest) in fields {
        if on_disk != manifest {
            let d = Defect::SuperblockDisagrees {
                field,
                on_disk,
                manifest,
            };
            s.push(Severity::Error, None, Some(0), d);
        }
    }
    Ok(Superblock::Valid(m, shard))
}

/// The high-water mark word read again from the file (`None` past its end).
fn mark_word(pages: &mut Pages<'_>) -> Result<Option<u64>> {
    Ok(pages.fresh(HWM_OFFSET, 8)?.map(|b| super::u64_at(b, 0)))
}

fn scan_mark(src: &mut dyn MetaSource, size: u64, s: &mut ShardScan) -> Result<Option<u32>> {
    let mut b = [0u8; 8];
    if src.read_at(HWM_OFFSET, &mut b)? < 8 {
        let d = Defect::MarkUnreadable { size_bytes: size };
        s.push(Severity::Error, None, Some(HWM_OFFSET), d);
        return Ok(None);
    }
    let word = u64::from_le_bytes(b);
    let hwm = decode_counter(word);
    if hwm.is_none() {
        s.push(
            Severity::Error,
            None,
            Some(HWM_OFFSET),
            Defect::MarkTorn { word },
        );
    }
    Ok(hwm)
}

/// Page-at-a-time reads of a metadata file (entries never straddle pages).
pub(crate) struct Pages<'a> {
    src: &'a mut dyn MetaSource,
    page: Option<u64>,
    len: usize,
    buf: Vec<u8>,
}

impl<'a> Pages<'a> {
    /// [`MetaSource::data_region`] of the file.
    fn data_region(&mut self, off: u64) -> Result<Option<(u64, u64)>> {
        self.src.data_region(off)
    }

    fn new(src: &'a mut dyn MetaSource) -> Pages<'a> {
        Pages {
            src,
            page: None,
            len: 0,
            buf: vec![0; META_PAGE_BYTES as usize],
        }
    }

    /// As [`get`](Self::get), read again from the file even when its page
    /// was the last one read.
    fn fresh(&mut self, off: u64, len: usize) -> Result<Option<&[u8]>> {
        self.page = None;
        self.get(off, len)
    }

    /// `len` bytes at `off` (inside one page), or `None` past the end.
    pub(crate) fn get(&mut self, off: u64, len: usize) -> Result<Option<&[u8]>> {
        let page = off / META_PAGE_BYTES;
        let at = (off % META_PAGE_BYTES) as usize;
        debug_assert!(at + len <= META_PAGE_BYTES as usize);
        if self.page != Some(page) {
            self.page = None;
            self.len = self.src.read_at(page * META_PAGE_BYTES, &mut self.buf)?;
            self.page = Some(page);
        }
        Ok((at + len <= self.len).then(|| &self.buf[at..at + len]))
    }
}

#[cfg(test)]
mod tests {
    use super::next_generation;

    #[test]
    fn the_next_generation_follows_the_newest_in_wrapping_order() {
        let next = |p, d, gens: &[u32]| next_generation(p, d, 1000, gens.iter().copied());
        // Neither word: the largest found.
        assert_eq!(next(0, 0, &[]), 1);
        assert_eq!(next(0, 0, &[3, 9, 4]), 10);
        assert_eq!(next(0, 0, &[u32::MAX]), 1);
        // The words, and the segments at or after them, in any order.
        assert_eq!(next(7, 5, &[3, 4]), 7);
        assert_eq!(next(7, 5, &[8, 3, 7]), 9);
        assert_eq!(next(5, 7, &[3]), 7);
        for gens in [[u32::MAX - 1, 1, 2], [2, u32::MAX - 1, 1], [1, 2, u32::MAX]] {
            assert_eq!(next(u32::MAX - 1, u32::MAX - 1, &gens), 3, "{gens:?}");
        }
        // A durable word past the wrap, the next one's word before it.
        assert_eq!(next(u32::MAX, 2, &[u32::MAX - 3]), 2);
        // Segments far behind the words are older, not newer, also those
        // less than 2^31 ahead of them in wrapping order.
        assert_eq!(next(3, 2, &[u32::MAX - 10, (1 << 31) + 10]), 3);
        assert_eq!(
            next((1 << 31) + 2, (1 << 31) + 2, &[1, 2, 3, 4]),
            (1 << 31) + 2
        );
        assert_eq!(
            next((1 << 31) + 100, (1 << 31) + 100, &[1, 5]),
            (1 << 31) + 100
        );
        assert_eq!(next(7, 7, &[7 + 999, 7 + 1000]), 7 + 1000);
        // Only the durable word, a sync behind: twice as far.
        assert_eq!(next(0, 7, &[7 + 1500]), 7 + 1501);
        assert_eq!(next(0, 7, &[7 + 2000]), 7);
    }
}
