//! A root slot (128 bytes). A name keeps its record in one pair of slots
//! `(2k, 2k + 1)`, which share a sector: a replacement writes the other slot
//! of the pair, then clears the old one, so a torn write leaves the old or
//! the new record, never neither. The valid slot with the highest sequence
//! number wins for a name (see [`super::scan`] for the tie-breaks).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | sequence number (0 = free) |
//! | 8 | 1 | name length (1..=64) |
//! | 9 | 3 | reserved |
//! | 12 | 64 | name (UTF-8, zero padded) |
//! | 76 | 40 | the encoded handle |
//! | 116 | 4 | reserved |
//! | 120 | 4 | CRC-32C of bytes 0..120 |
//! | 124 | 4 | reserved |

use super::handle::HANDLE_BYTES;
use super::{ROOT_SLOT_BYTES, u32_at, u64_at};

/// Longest root name.
pub const MAX_ROOT_NAME_BYTES: usize = 64;

/// Byte offset of the sequence number.
pub const OFF_SEQ: usize = 0;
/// Byte offset of the name length.
pub const OFF_NAME_LEN: usize = OFF_SEQ + 8;
/// Byte offset of the name.
pub const OFF_NAME: usize = OFF_NAME_LEN + 4;
/// Byte offset of the handle.
pub const OFF_HANDLE: usize = OFF_NAME + MAX_ROOT_NAME_BYTES;
/// Byte offset of the checksum (of bytes `0..OFF_CRC`).
pub const OFF_CRC: usize = OFF_HANDLE + HANDLE_BYTES + 4;
const _: () = assert!(OFF_HANDLE == 76 && OFF_CRC == 120);
const _: () = assert!(OFF_CRC + 8 == ROOT_SLOT_BYTES as usize);

/// Why a root slot in use was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootDefect {
    /// Fewer than 128 bytes.
    Truncated,
    /// The checksum does not match.
    Checksum,
    /// The name length is 0 or above 64.
    NameLength(u8),
    /// The name is not UTF-8.
    NameNotUtf8,
}

impl std::fmt::Display for RootDefect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RootDefect::Truncated => f.write_str("truncated"),
            RootDefect::Checksum => f.write_str("checksum mismatch"),
            RootDefect::NameLength(n) => write!(f, "name length {n} out of range 1..=64"),
            RootDefect::NameNotUtf8 => f.write_str("name is not UTF-8"),
        }
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
    pub handle: [u8; HANDLE_BYTES],
}

impl RootSlot {
    /// Encode into 128 bytes.
    pub fn encode(&self) -> [u8; ROOT_SLOT_BYTES as usize] {
        let mut b = [0u8; ROOT_SLOT_BYTES as usize];
        b[OFF_SEQ..OFF_NAME_LEN].copy_from_slice(&self.seq.to_le_bytes());
        let name = self.name.as_bytes();
        debug_assert!(name.len() <= MAX_ROOT_NAME_BYTES);
        let n = name.len().min(MAX_ROOT_NAME_BYTES);
        b[OFF_NAME_LEN] = n as u8;
        b[OFF_NAME..OFF_NAME + n].copy_from_slice(&name[..n]);
        b[OFF_HANDLE..OFF_HANDLE + HANDLE_BYTES].copy_from_slice(&self.handle);
        let crc = crc32c::crc32c(&b[..OFF_CRC]);
        b[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The sequence number of a raw slot (0: free).
    pub fn raw_seq(b: &[u8]) -> u64 {
        u64_at(b, OFF_SEQ)
    }

    /// Decode; `Ok(None)` for a free slot, `Err` for a slot in use that is
    /// invalid (the unfinished half of an update whose previous version is
    /// still valid, or damage).
    ///
    /// # Errors
    ///
    /// What is wrong.
    pub fn decode(b: &[u8]) -> Result<Option<RootSlot>, RootDefect> {
        if b.len() < ROOT_SLOT_BYTES as usize {
            return Err(RootDefect::Truncated);
        }
        let seq = Self::raw_seq(b);
        if seq == 0 {
            return Ok(None);
        }
        if u32_at(b, OFF_CRC) != crc32c::crc32c(&b[..OFF_CRC]) {
            return Err(RootDefect::Checksum);
        }
        let n = b[OFF_NAME_LEN];
        if n == 0 || n as usize > MAX_ROOT_NAME_BYTES {
            return Err(RootDefect::NameLength(n));
        }
        let name = std::str::from_utf8(&b[OFF_NAME..OFF_NAME + n as usize])
            .map_err(|_| RootDefect::NameNotUtf8)?
            .to_string();
        let mut handle = [0u8; HANDLE_BYTES];
        handle.copy_from_slice(&b[OFF_HANDLE..OFF_HANDLE + HANDLE_BYTES]);
        Ok(Some(RootSlot { seq, name, handle }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_roundtrip() {
        let r = RootSlot {
            seq: 9,
            name: "btree".into(),
            handle: [7; 40],
        };
        let mut b = r.encode();
        assert_eq!(RootSlot::decode(&b), Ok(Some(r)));
        b[OFF_NAME] ^= 1;
        assert_eq!(RootSlot::decode(&b), Err(RootDefect::Checksum));
        assert_eq!(RootSlot::decode(&[0u8; 128]), Ok(None));
    }
}
