//! A segment directory entry (576 bytes): a 64-byte header, then a 512-byte
//! bitmap (4096 slots, bit `i % 64` of word `i / 64` = slot `i` in use).
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
//! | 64 | 512 | bitmap: 64 little-endian words |

use super::classes::{self, BLOCK_BYTES};
use super::{BITMAP_WORDS, ENTRY_HEADER_BYTES, u32_at, u64_at};

/// Byte offset of the state word.
pub const OFF_STATE: usize = 0;
/// Byte offset of the data file number.
pub const OFF_FILE: usize = OFF_STATE + 8;
/// Byte offset of the first block.
pub const OFF_BLOCK: usize = OFF_FILE + 4;
/// Byte offset of the block count.
pub const OFF_BLOCKS: usize = OFF_BLOCK + 4;
/// Byte offset of the slot count.
pub const OFF_SLOTS: usize = OFF_BLOCKS + 4;
/// Byte offset of the checksum (of bytes `0..OFF_CRC`).
pub const OFF_CRC: usize = OFF_SLOTS + 4;
/// Byte offset of the reserved bytes.
pub const OFF_RESERVED: usize = OFF_CRC + 4;
const _: () = assert!(OFF_RESERVED == 28 && OFF_RESERVED <= ENTRY_HEADER_BYTES as usize);

const MAGIC: u64 = 0x5E6D;
const VERSION: u64 = 1;

/// Why an entry header was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderDefect {
    /// Fewer than 64 bytes.
    Truncated,
    /// The checksum does not match.
    Checksum,
    /// The state word's magic or version is wrong.
    MagicOrVersion,
    /// The class id is not in the table.
    UnknownClass,
    /// Slots or blocks disagree with the class.
    Geometry,
}

impl HeaderDefect {
    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            HeaderDefect::Truncated => "truncated entry",
            HeaderDefect::Checksum => "entry checksum mismatch",
            HeaderDefect::MagicOrVersion => "bad entry magic or version",
            HeaderDefect::UnknownClass => "unknown size class",
            HeaderDefect::Geometry => "geometry does not match the size class",
        }
    }
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
        MAGIC | (self.class_id as u64) << 16 | VERSION << 24 | (self.generation as u64) << 32
    }

    /// The header bytes `OFF_FILE..OFF_RESERVED` (fields and checksum), to
    /// write before the state word.
    pub fn body(&self) -> [u8; OFF_RESERVED - OFF_FILE] {
        let mut b = [0u8; OFF_RESERVED];
        b[OFF_STATE..OFF_FILE].copy_from_slice(&self.state_word().to_le_bytes());
        b[OFF_FILE..OFF_BLOCK].copy_from_slice(&self.file.to_le_bytes());
        b[OFF_BLOCK..OFF_BLOCKS].copy_from_slice(&self.block.to_le_bytes());
        b[OFF_BLOCKS..OFF_SLOTS].copy_from_slice(&self.blocks.to_le_bytes());
        b[OFF_SLOTS..OFF_CRC].copy_from_slice(&self.slots.to_le_bytes());
        let crc = crc32c::crc32c(&b[..OFF_CRC]);
        b[OFF_CRC..OFF_RESERVED].copy_from_slice(&crc.to_le_bytes());
        let mut out = [0u8; OFF_RESERVED - OFF_FILE];
        out.copy_from_slice(&b[OFF_FILE..]);
        out
    }

    /// The state word of a raw header (0: free).
    pub fn raw_state(h: &[u8]) -> u64 {
        u64_at(h, OFF_STATE)
    }

    /// Decode a 64-byte header. `Ok(None)` for a free entry.
    ///
    /// # Errors
    ///
    /// What is inconsistent.
    pub fn decode(h: &[u8]) -> Result<Option<EntryHeader>, HeaderDefect> {
        if h.len() < ENTRY_HEADER_BYTES as usize {
            return Err(HeaderDefect::Truncated);
        }
        let state = Self::raw_state(h);
        if state == 0 {
            return Ok(None);
        }
        if u32_at(h, OFF_CRC) != crc32c::crc32c(&h[..OFF_CRC]) {
            return Err(HeaderDefect::Checksum);
        }
        if state & 0xFFFF != MAGIC || (state >> 24) & 0xFF != VERSION {
            return Err(HeaderDefect::MagicOrVersion);
        }
        let e = EntryHeader {
            class_id: (state >> 16) as u8,
            generation: (state >> 32) as u32,
            file: u32_at(h, OFF_FILE),
            block: u32_at(h, OFF_BLOCK),
            blocks: u32_at(h, OFF_BLOCKS),
            slots: u32_at(h, OFF_SLOTS),
        };
        let Some(c) = classes::class(e.class_id) else {
            return Err(HeaderDefect::UnknownClass);
        };
        if e.slots != c.slots || e.blocks as u64 * BLOCK_BYTES != c.segment_bytes as u64 {
            return Err(HeaderDefect::Geometry);
        }
        Ok(Some(e))
    }

    /// Byte offset of the segment in its data file.
    pub fn start_offset(&self) -> u64 {
        self.block as u64 * BLOCK_BYTES
    }

    /// One past the last block.
    pub fn end_block(&self) -> u64 {
        self.block as u64 + self.blocks as u64
    }

    /// Slot size of the class (the class is valid once decoded).
    pub fn slot_bytes(&self) -> u32 {
        classes::class(self.class_id).map_or(0, |c| c.slot_bytes)
    }
}

/// The mask of the valid bits of bitmap word `w` for `slots` slots.
pub fn word_mask(slots: u32, w: usize) -> u64 {
    let valid = slots.saturating_sub(w as u32 * 64).min(64);
    if valid == 64 {
        u64::MAX
    } else {
        (1u64 << valid) - 1
    }
}

/// Decode the 512-byte bitmap that follows a header.
pub fn decode_bitmap(b: &[u8]) -> [u64; BITMAP_WORDS] {
    let mut words = [0u64; BITMAP_WORDS];
    for (w, word) in words.iter_mut().enumerate() {
        *word = u64_at(b, w * 8);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip() {
        let c = classes::CLASSES[3];
        let h = EntryHeader {
            class_id: 3,
            generation: 77,
            file: 2,
            block: 100,
            blocks: (c.segment_bytes as u64 / BLOCK_BYTES) as u32,
            slots: c.slots,
        };
        let mut raw = [0u8; 64];
        raw[OFF_STATE..OFF_FILE].copy_from_slice(&h.state_word().to_le_bytes());
        raw[OFF_FILE..OFF_RESERVED].copy_from_slice(&h.body());
        assert_eq!(EntryHeader::decode(&raw).unwrap(), Some(h));
        raw[13] ^= 1;
        assert_eq!(EntryHeader::decode(&raw), Err(HeaderDefect::Checksum));
    }
}
