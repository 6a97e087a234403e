//! The on-disk format, in one place: the data directory's file and folder
//! names, the manifest, each shard's metadata file (`meta.seg`), the size
//! class table and the encoding of a [`Handle`]. Pure encoding and decoding,
//! plus [`scan`]: the one reader of a shard's metadata, used by recovery and
//! by the inspector alike. This module imports nothing but [`crate::error`].
//!
//! All integers are little-endian. Every record fits in one 512-byte sector
//! and carries a CRC-32C, so a torn write is detected (storage devices write
//! a sector atomically; the format relies on nothing larger).
//!
//! ## Data directory
//!
//! `MANIFEST` (see [`manifest`]), `LOCK`, and one folder per shard
//! (`shard-NNN`, [`shard_folder_name`]) holding `meta.seg` ([`META_FILE`]) and
//! the data files `data-NNNNNN.seg` ([`data_file_name`]).
//!
//! ## Shard metadata file (`shard-NNN/meta.seg`)
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 48 | superblock: the manifest's fields, with the shard index in the reserved bytes 14..16 |
//! | 512 | 8 | directory high-water mark: `mark | !mark << 32`, one aligned store |
//! | 520 | 8 | next segment generation, encoded the same way (0: unknown) |
//! | 528 | 8 | durable generation, encoded the same way (0: written before it existed) |
//! | 4096 | 256 KiB | 2048 root slots of 128 bytes (see [`roots`]) |
//! | 266240 | … | segment directory: 7 entries of 576 bytes per 4 KiB page (see [`entry`]) |

pub mod classes;
pub mod entry;
pub mod handle;
pub mod manifest;
pub mod roots;
pub mod scan;

pub use entry::EntryHeader;
pub use handle::{BadHandle, HANDLE_BYTES, Handle};
pub use manifest::{MANIFEST_BYTES, Manifest};
pub use roots::{MAX_ROOT_NAME_BYTES, RootSlot};

/// Current on-disk format version.
/// Version 2: 2048 root slots (the directory starts at 266240).
pub const FORMAT_VERSION: u32 = 2;

/// Name of a shard's metadata file.
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub const META_FILE: &str = "meta.seg";

/// Name of a data directory's manifest file.
pub const MANIFEST_FILE: &str = "MANIFEST";

/// File name of data file `n` in a shard folder (`data-000042.seg`).
pub fn data_file_name(n: u32) -> String {
    format!("data-{n:06}.seg")
}

/// Name of the folder of shard `i` (`shard-003`).
pub fn shard_folder_name(i: u16) -> String {
    format!("shard-{i:03}")
}

/// The number of a data file name made by [`data_file_name`], or `None` for
/// any other name (including non-canonical spellings such as `data-1.seg`).
// Used by the inspector (feature `cli`).
#[cfg_attr(not(feature = "cli"), allow(dead_code))]
pub fn parse_data_file_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("data-")?.strip_suffix(".seg")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = digits.parse().ok()?;
    (data_file_name(n) == name).then_some(n)
}

/// Page size the metadata layout is built on.
pub const META_PAGE_BYTES: u64 = 4096;
/// Missing data files in a row below a file a kept segment names that a
/// scan reports as damage (`scan::Defect::DataFileGap`), refusing the
/// shard. A shard leaves a number unused for each first segment of a
/// file cancelled (or failed) while the next file's first segment is
/// published, so its own gaps are as wide as such cancellations at once.
/// The bound keeps the number of files recovery takes (every number up to
/// the highest named) within this many per file present.
pub const DATA_FILE_GAP_MAX: u32 = 4096;
/// Sector size: the unit a device writes atomically.
pub const SECTOR_BYTES: u64 = 512;
/// Byte offset of the superblock.
pub const SUPERBLOCK_OFFSET: u64 = 0;
/// Byte offset of the directory high-water mark (one sector past the
/// superblock, alone in its 8-byte word).
pub const HWM_OFFSET: u64 = SUPERBLOCK_OFFSET + SECTOR_BYTES;
/// Byte offset of the next segment generation to issue, encoded like the
/// high-water mark (`next | !next << 32`; zero in directories that predate
/// it). Recovery never issues a generation below it, so a segment released
/// before a restart does not get its old generation back.
pub const GEN_OFFSET: u64 = HWM_OFFSET + 8;
/// Byte offset of the durable generation, encoded like the high-water mark
/// (zero in directories that predate it). A completed sync stores here the
/// generation that was next to issue when it began: every segment of a
/// lower generation has its data file's growth durable (the sync wrote it
/// back). A segment of this generation or higher may have been published
/// after the latest completed sync, so none of its allocations was promised;
/// if a power loss took its data file's growth (the file ends before the
/// segment does), recovery drops it. The data file's growth is therefore
/// not synced when a segment is published. Zero: every segment's growth was
/// made durable before it was published (directories written before this
/// word existed); recovery sets the word when it opens such a directory.
pub const DURABLE_GEN_OFFSET: u64 = GEN_OFFSET + 8;
/// Byte offset of the root table (the second page).
pub const ROOTS_OFFSET: u64 = META_PAGE_BYTES;
/// Root slots.
pub const ROOT_SLOTS: usize = 2048;
/// Bytes per root slot.
pub const ROOT_SLOT_BYTES: u64 = 128;
/// Byte offset of the segment directory (right after the root table).
pub const DIR_OFFSET: u64 = ROOTS_OFFSET + ROOT_SLOTS as u64 * ROOT_SLOT_BYTES;
/// Bytes of an entry header; the bitmap follows.
pub const ENTRY_HEADER_BYTES: u64 = 64;
/// Words of an entry's bitmap (one bit per slot).
pub const BITMAP_WORDS: usize = (classes::MAX_SLOTS / 64) as usize;
/// Bytes per directory entry: header, then bitmap.
pub const ENTRY_BYTES: u64 = ENTRY_HEADER_BYTES + BITMAP_WORDS as u64 * 8;
/// Directory entries per 4 KiB page (no entry straddles a page).
pub const ENTRIES_PER_PAGE: u64 = META_PAGE_BYTES / ENTRY_BYTES;

const _: () = assert!(ENTRY_BYTES == 576 && ENTRIES_PER_PAGE == 7);
const _: () = assert!(DIR_OFFSET == 266_240);
const _: () = assert!(DURABLE_GEN_OFFSET + 8 <= ROOTS_OFFSET);
const _: () = assert!(MANIFEST_BYTES as u64 <= SECTOR_BYTES);
const _: () = assert!(DIR_OFFSET.is_multiple_of(META_PAGE_BYTES));
// A root slot pair (2k, 2k + 1) lies inside one 512-byte sector.
const _: () = assert!(
    ROOTS_OFFSET.is_multiple_of(SECTOR_BYTES) && SECTOR_BYTES.is_multiple_of(2 * ROOT_SLOT_BYTES)
);
const _: () = assert!(ROOT_SLOTS.is_multiple_of(2));
// Every entry header lies inside one 512-byte sector.
const _: () = {
    let mut k = 0;
    while k < ENTRIES_PER_PAGE {
        assert!((k * ENTRY_BYTES) % SECTOR_BYTES + ENTRY_HEADER_BYTES <= SECTOR_BYTES);
        k += 1;
    }
};

/// Byte offset of directory entry `i` in the metadata file.
#[inline]
pub fn entry_offset(i: u32) -> u64 {
    DIR_OFFSET
        + (i as u64 / ENTRIES_PER_PAGE) * META_PAGE_BYTES
        + (i as u64 % ENTRIES_PER_PAGE) * ENTRY_BYTES
}

/// Byte offset of the bitmap of directory entry `i`.
#[inline]
pub fn bitmap_offset(i: u32) -> u64 {
    entry_offset(i) + ENTRY_HEADER_BYTES
}

/// Byte offset of root slot `i`.
#[inline]
pub fn root_offset(i: usize) -> u64 {
    ROOTS_OFFSET + i as u64 * ROOT_SLOT_BYTES
}

/// Bytes a metadata file needs to hold `entries` directory entries.
pub fn directory_end_bytes(entries: u32) -> u64 {
    match entries.checked_sub(1) {
        None => DIR_OFFSET,
        Some(last) => entry_offset(last) + ENTRY_BYTES,
    }
}

/// Directory entries that fit entirely in a metadata file of `size` bytes.
pub fn entry_capacity(size: u64) -> u64 {
    if size < DIR_OFFSET {
        return 0;
    }
    let rest = size - DIR_OFFSET;
    (rest / META_PAGE_BYTES) * ENTRIES_PER_PAGE
        + ((rest % META_PAGE_BYTES) / ENTRY_BYTES).min(ENTRIES_PER_PAGE)
}

/// The generation issued after `g`. Generations wrap: 1 follows
/// `u32::MAX`, and 0 (a fresh file's word) is never issued.
#[inline]
pub(crate) fn generation_after(g: u32) -> u32 {
    g.wrapping_add(1).max(1)
}

/// Whether generation `a` was issued later than generation `b`. They wrap
/// ([`generation_after`]), so they compare in wrapping order: `a` is later
/// when it lies less than 2^31 issues ahead of `b`. (A shard issues one
/// per segment it publishes, so a live segment issued 2^31 publications
/// ago compares as newer: the scan's next generation looks only a
/// directory's worth of entries past the words, and the overlap check,
/// which only damage makes, takes it as the newer.)
#[inline]
pub(crate) fn issued_later(a: u32, b: u32) -> bool {
    let ahead = a.wrapping_sub(b);
    ahead != 0 && ahead < 1 << 31
}

/// Encode a counter word (the high-water mark, the next generation).
#[inline]
pub fn encode_counter(value: u32) -> u64 {
    value as u64 | ((!value as u64) << 32)
}

/// Decode a counter word (`None` when torn or corrupt; an all-zero word is
/// a fresh file: 0).
#[inline]
pub fn decode_counter(w: u64) -> Option<u32> {
    if w == 0 {
        return Some(0);
    }
    let lo = w as u32;
    let hi = (w >> 32) as u32;
    (hi == !lo).then_some(lo)
}

/// A little-endian `u32` at `o` (`b` holds it: callers check lengths).
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// A little-endian `u64` at `o`.
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_offsets_never_straddle_pages() {
        for i in 0..1000u32 {
            let o = entry_offset(i);
            assert_eq!(o / 4096, (o + ENTRY_BYTES - 1) / 4096);
        }
    }

    #[test]
    fn counter_word() {
        assert_eq!(decode_counter(encode_counter(12345)), Some(12345));
        assert_eq!(decode_counter(0), Some(0));
        assert_eq!(decode_counter(12345), None);
    }

    #[test]
    fn capacity_matches_entry_offsets() {
        for size in [0, DIR_OFFSET, DIR_OFFSET + 575, DIR_OFFSET + 576, 1 << 20] {
            let cap = entry_capacity(size);
            if cap > 0 {
                assert!(entry_offset(cap as u32 - 1) + ENTRY_BYTES <= size);
            }
            assert!(entry_offset(cap as u32) + ENTRY_BYTES > size);
        }
        assert_eq!(directory_end_bytes(7), DIR_OFFSET + 7 * ENTRY_BYTES);
        assert_eq!(directory_end_bytes(0), DIR_OFFSET);
    }

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
}
