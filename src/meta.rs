//! The on-disk format: the data directory's manifest and each shard's
//! metadata file (`meta.seg`). Pure encoding and decoding; no I/O.
//!
//! All integers are little-endian. Every record fits in one 512-byte sector
//! and carries a CRC-32C, so a torn write is detected (storage devices write
//! a sector atomically; the format relies on nothing larger).
//!
//! ## Manifest (`MANIFEST`, 48 bytes, written once at creation)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SEGALLOC` |
//! | 8 | 4 | format version |
//! | 12 | 2 | shard count |
//! | 14 | 2 | reserved, 0 |
//! | 16 | 8 | directory id (random) |
//! | 24 | 8 | window bytes |
//! | 32 | 8 | maximum data file bytes |
//! | 40 | 4 | class table id |
//! | 44 | 4 | CRC-32C of bytes 0..44 |
//!
//! ## Shard metadata file (`shard-NNN/meta.seg`)
//!
//! | offset | size | content |
//! |---|---|---|
//! | 0 | 48 | superblock: the manifest's fields, with the shard index in the reserved bytes 14..16 |
//! | 512 | 8 | directory high-water mark: `hwm | !hwm << 32`, one aligned store |
//! | 520 | 8 | next segment generation, encoded the same way (0: unknown) |
//! | 4096 | 256 KiB | 2048 root slots of 128 bytes |
//! | 266240 | … | segment directory: 7 entries of 576 bytes per 4 KiB page |
//!
//! Root slot (128 bytes): `seq u64` (0 = free) · `name_len u8` · 3 reserved ·
//! `name [u8; 64]` · `handle [u8; 40]` · 4 reserved · `crc u32` of bytes
//! 0..120 · 4 reserved. The valid slot with the highest `seq` wins for a name.
//! A name keeps its record in one pair of slots `(2k, 2k + 1)`, which share a
//! sector: a replacement writes the other slot of the pair, then clears the
//! old one, so a torn write leaves the old or the new record, never neither.
//!
//! Directory entry (576 bytes): a 64-byte header, then a 512-byte bitmap
//! (4096 slots, bit `i` of word `i / 64` = slot `i` in use).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | state: 0 = free; else `0x5E6D | class << 16 | version << 24 | generation << 32`, stored last |
//! | 8 | 4 | data file number |
//! | 12 | 4 | first block (64 KiB) |
//! | 16 | 4 | blocks |
//! | 20 | 4 | slots |
//! | 24 | 4 | CRC-32C of bytes 0..24 |
//! | 28 | 36 | reserved, 0 |

use crate::alloc::classes;
use crate::error::{Error, Result};

/// Current on-disk format version.
/// Version 2: 2048 root slots (the directory starts at 266240).
pub const FORMAT_VERSION: u32 = 2;

/// Encoded manifest / superblock size.
pub const MANIFEST_BYTES: usize = 48;
const MANIFEST_MAGIC: &[u8; 8] = b"SEGALLOC";

/// Byte offset of the directory high-water mark.
pub const HWM_OFFSET: u64 = 512;
/// Byte offset of the next segment generation to issue, encoded like the
/// high-water mark (`next | !next << 32`; zero in directories that predate
/// it). Recovery never issues a generation below it, so a segment released
/// before a restart does not get its old generation back.
pub const GEN_OFFSET: u64 = HWM_OFFSET + 8;
/// Byte offset of the root table.
pub const ROOTS_OFFSET: u64 = 4096;
/// Root slots.
pub const ROOT_SLOTS: usize = 2048;
/// Bytes per root slot.
pub const ROOT_SLOT_BYTES: u64 = 128;
/// Longest root name.
pub const ROOT_NAME_MAX: usize = 64;
/// Byte offset of the segment directory.
pub const DIR_OFFSET: u64 = ROOTS_OFFSET + ROOT_SLOTS as u64 * ROOT_SLOT_BYTES;
/// Bytes per directory entry.
pub const ENTRY_BYTES: u64 = 576;
/// Directory entries per 4 KiB page (no entry straddles a page).
pub const ENTRIES_PER_PAGE: u64 = 7;
/// Page size the layout is built on.
pub const META_PAGE_BYTES: u64 = 4096;
/// Bytes of the entry header; the bitmap follows.
pub const ENTRY_HEADER_BYTES: u64 = 64;
/// Words of an entry's bitmap.
pub const BITMAP_WORDS: usize = (classes::SLOTS_MAX / 64) as usize;

const ENTRY_MAGIC: u64 = 0x5E6D;
const ENTRY_VERSION: u64 = 1;

const _: () = assert!(ENTRY_HEADER_BYTES + BITMAP_WORDS as u64 * 8 == ENTRY_BYTES);
const _: () = assert!(ENTRIES_PER_PAGE * ENTRY_BYTES <= META_PAGE_BYTES);
const _: () = assert!(DIR_OFFSET.is_multiple_of(META_PAGE_BYTES));
const _: () = assert!(512u64.is_multiple_of(ROOT_SLOT_BYTES));
// A root slot pair (2k, 2k + 1) lies inside one 512-byte sector.
const _: () =
    assert!(ROOTS_OFFSET.is_multiple_of(512) && 512u64.is_multiple_of(2 * ROOT_SLOT_BYTES));
const _: () = assert!(ROOT_SLOTS.is_multiple_of(2));
// Every entry header lies inside one 512-byte sector.
const _: () = {
    let mut k = 0;
    while k < ENTRIES_PER_PAGE {
        assert!((k * ENTRY_BYTES) % 512 + ENTRY_HEADER_BYTES <= 512);
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

/// Byte offset of root slot `i`.
#[inline]
pub fn root_offset(i: usize) -> u64 {
    ROOTS_OFFSET + i as u64 * ROOT_SLOT_BYTES
}

/// The data directory's identity and geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Number of shards.
    pub shard_count: u16,
    /// Random id of the directory; its low 32 bits tag every handle.
    pub dir_id: u64,
    /// Window size.
    pub window_bytes: u64,
    /// Maximum data file size.
    pub max_file_bytes: u64,
    /// Class table id.
    pub class_table_id: u32,
}

impl Manifest {
    /// Tag that handles of this directory carry.
    pub fn dir_tag(&self) -> u32 {
        self.dir_id as u32
    }

    /// Encode; `shard` fills the reserved field (superblocks) or is 0.
    pub fn encode(&self, shard: u16) -> [u8; MANIFEST_BYTES] {
        let mut b = [0u8; MANIFEST_BYTES];
        b[0..8].copy_from_slice(MANIFEST_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..14].copy_from_slice(&self.shard_count.to_le_bytes());
        b[14..16].copy_from_slice(&shard.to_le_bytes());
        b[16..24].copy_from_slice(&self.dir_id.to_le_bytes());
        b[24..32].copy_from_slice(&self.window_bytes.to_le_bytes());
        b[32..40].copy_from_slice(&self.max_file_bytes.to_le_bytes());
        b[40..44].copy_from_slice(&self.class_table_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate; returns the manifest and the shard field.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] naming `what` for any inconsistency.
    pub fn decode(b: &[u8], what: &str) -> Result<(Manifest, u16)> {
        let corrupt = |detail: &str| Error::Corrupt {
            what: what.to_string(),
            detail: detail.to_string(),
        };
        if b.len() < MANIFEST_BYTES {
            return Err(corrupt("truncated"));
        }
        if &b[0..8] != MANIFEST_MAGIC {
            return Err(corrupt("bad magic"));
        }
        let crc = u32::from_le_bytes(b[44..48].try_into().expect("4"));
        if crc != crc32c::crc32c(&b[..44]) {
            return Err(corrupt("checksum mismatch"));
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let m = Manifest {
            version: u32::from_le_bytes(b[8..12].try_into().expect("4")),
            shard_count: u16::from_le_bytes([b[12], b[13]]),
            dir_id: u64_at(16),
            window_bytes: u64_at(24),
            max_file_bytes: u64_at(32),
            class_table_id: u32::from_le_bytes(b[40..44].try_into().expect("4")),
        };
        let shard = u16::from_le_bytes([b[14], b[15]]);
        if m.version != FORMAT_VERSION {
            return Err(corrupt(&format!(
                "unsupported format version {}",
                m.version
            )));
        }
        if m.class_table_id != classes::CLASS_TABLE_ID {
            return Err(corrupt(&format!(
                "unknown class table {}",
                m.class_table_id
            )));
        }
        if m.shard_count == 0
            || m.window_bytes == 0
            || !m
                .window_bytes
                .is_multiple_of(crate::config::SEGMENT_BYTES_MAX)
            || m.max_file_bytes == 0
            || !m.max_file_bytes.is_multiple_of(m.window_bytes)
            || m.max_file_bytes / classes::BLOCK_BYTES > u32::MAX as u64
        {
            return Err(corrupt("geometry out of range"));
        }
        Ok((m, shard))
    }
}

/// Encode the directory high-water mark word.
#[inline]
pub fn encode_hwm(hwm: u32) -> u64 {
    hwm as u64 | ((!hwm as u64) << 32)
}

/// Decode the directory high-water mark word (`None` when torn or corrupt;
/// an all-zero word is a fresh file: 0).
#[inline]
pub fn decode_hwm(w: u64) -> Option<u32> {
    if w == 0 {
        return Some(0);
    }
    let lo = w as u32;
    let hi = (w >> 32) as u32;
    (hi == !lo).then_some(lo)
}

/// A directory entry's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryHeader {
    /// Size class.
    pub class_id: u8,
    /// Generation (distinguishes reuses of the same entry or run).
    pub generation: u32,
    /// Data file number.
    pub file: u32,
    /// First 64 KiB block.
    pub block: u32,
    /// Length in blocks.
    pub blocks: u32,
    /// Slots.
    pub slots: u32,
}

impl EntryHeader {
    /// The state word (stored last when an entry is published).
    pub fn state_word(&self) -> u64 {
        ENTRY_MAGIC
            | (self.class_id as u64) << 16
            | ENTRY_VERSION << 24
            | (self.generation as u64) << 32
    }

    /// The header bytes 8..28 (fields and checksum), to write before the
    /// state word.
    pub fn body(&self) -> [u8; 20] {
        let mut b = [0u8; 24];
        b[0..8].copy_from_slice(&self.state_word().to_le_bytes());
        b[8..12].copy_from_slice(&self.file.to_le_bytes());
        b[12..16].copy_from_slice(&self.block.to_le_bytes());
        b[16..20].copy_from_slice(&self.blocks.to_le_bytes());
        b[20..24].copy_from_slice(&self.slots.to_le_bytes());
        let crc = crc32c::crc32c(&b);
        let mut out = [0u8; 20];
        out[..16].copy_from_slice(&b[8..24]);
        out[16..20].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decode a 64-byte header. `Ok(None)` for a free entry.
    ///
    /// # Errors
    ///
    /// A description of what is inconsistent (the caller wraps it).
    pub fn decode(h: &[u8]) -> std::result::Result<Option<EntryHeader>, &'static str> {
        if h.len() < ENTRY_HEADER_BYTES as usize {
            return Err("truncated entry");
        }
        let state = u64::from_le_bytes(h[0..8].try_into().expect("8"));
        if state == 0 {
            return Ok(None);
        }
        let crc = u32::from_le_bytes(h[24..28].try_into().expect("4"));
        if crc != crc32c::crc32c(&h[0..24]) {
            return Err("entry checksum mismatch");
        }
        if state & 0xFFFF != ENTRY_MAGIC || (state >> 24) & 0xFF != ENTRY_VERSION {
            return Err("bad entry magic or version");
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4"));
        let e = EntryHeader {
            class_id: (state >> 16) as u8,
            generation: (state >> 32) as u32,
            file: u32_at(8),
            block: u32_at(12),
            blocks: u32_at(16),
            slots: u32_at(20),
        };
        let Some(c) = classes::class(e.class_id) else {
            return Err("unknown size class");
        };
        if e.slots != c.slots || e.blocks as u64 * classes::BLOCK_BYTES != c.segment_bytes as u64 {
            return Err("geometry does not match the size class");
        }
        Ok(Some(e))
    }
}

/// A named root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootSlot {
    /// Sequence number (higher wins).
    pub seq: u64,
    /// The name.
    pub name: String,
    /// The encoded handle.
    pub handle: [u8; crate::handle::HANDLE_BYTES],
}

impl RootSlot {
    /// Encode into 128 bytes.
    pub fn encode(&self) -> [u8; ROOT_SLOT_BYTES as usize] {
        let mut b = [0u8; ROOT_SLOT_BYTES as usize];
        b[0..8].copy_from_slice(&self.seq.to_le_bytes());
        let name = self.name.as_bytes();
        debug_assert!(name.len() <= ROOT_NAME_MAX);
        b[8] = name.len() as u8;
        b[12..12 + name.len()].copy_from_slice(name);
        b[76..116].copy_from_slice(&self.handle);
        let crc = crc32c::crc32c(&b[..120]);
        b[120..124].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode; `Ok(None)` for a free or torn slot (a torn slot is the
    /// unfinished half of an update whose previous version is still valid).
    pub fn decode(b: &[u8]) -> Option<RootSlot> {
        if b.len() < ROOT_SLOT_BYTES as usize {
            return None;
        }
        let seq = u64::from_le_bytes(b[0..8].try_into().expect("8"));
        if seq == 0 {
            return None;
        }
        let crc = u32::from_le_bytes(b[120..124].try_into().expect("4"));
        if crc != crc32c::crc32c(&b[..120]) {
            return None;
        }
        let n = b[8] as usize;
        if n == 0 || n > ROOT_NAME_MAX {
            return None;
        }
        let name = std::str::from_utf8(&b[12..12 + n]).ok()?.to_string();
        let mut handle = [0u8; crate::handle::HANDLE_BYTES];
        handle.copy_from_slice(&b[76..116]);
        Some(RootSlot { seq, name, handle })
    }
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
    fn header_roundtrip() {
        let c = classes::CLASSES[3];
        let h = EntryHeader {
            class_id: 3,
            generation: 77,
            file: 2,
            block: 100,
            blocks: (c.segment_bytes as u64 / classes::BLOCK_BYTES) as u32,
            slots: c.slots,
        };
        let mut raw = [0u8; 64];
        raw[0..8].copy_from_slice(&h.state_word().to_le_bytes());
        raw[8..28].copy_from_slice(&h.body());
        assert_eq!(EntryHeader::decode(&raw).unwrap(), Some(h));
        raw[13] ^= 1;
        assert!(EntryHeader::decode(&raw).is_err());
    }

    #[test]
    fn hwm_word() {
        assert_eq!(decode_hwm(encode_hwm(12345)), Some(12345));
        assert_eq!(decode_hwm(0), Some(0));
        assert_eq!(decode_hwm(12345), None);
    }

    #[test]
    fn manifest_and_root_roundtrip() {
        let m = Manifest {
            version: FORMAT_VERSION,
            shard_count: 4,
            dir_id: 0xabcdef,
            window_bytes: 1 << 30,
            max_file_bytes: 1 << 36,
            class_table_id: classes::CLASS_TABLE_ID,
        };
        let b = m.encode(3);
        assert_eq!(Manifest::decode(&b, "t").unwrap(), (m, 3));
        let r = RootSlot {
            seq: 9,
            name: "btree".into(),
            handle: [7; 40],
        };
        assert_eq!(RootSlot::decode(&r.encode()), Some(r));
    }
}
