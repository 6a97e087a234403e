//! The manifest (`MANIFEST`, 48 bytes, written once at creation) and the
//! superblock of each `meta.seg` (the same fields, with the shard index in
//! the reserved bytes).
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SEGALLOC` |
//! | 8 | 4 | format version |
//! | 12 | 2 | shard count |
//! | 14 | 2 | reserved, 0 (superblock: the shard index) |
//! | 16 | 8 | directory id (random) |
//! | 24 | 8 | window bytes |
//! | 32 | 8 | maximum data file bytes |
//! | 40 | 4 | class table id |
//! | 44 | 4 | CRC-32C of bytes 0..44 |

use super::classes::{self, BLOCK_BYTES, MAX_SEGMENT_BYTES};
use super::{FORMAT_VERSION, u32_at, u64_at};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"SEGALLOC";

/// Byte offset of the magic.
pub const OFF_MAGIC: usize = 0;
/// Byte offset of the format version.
pub const OFF_VERSION: usize = OFF_MAGIC + 8;
/// Byte offset of the shard count.
pub const OFF_SHARD_COUNT: usize = OFF_VERSION + 4;
/// Byte offset of the shard index (superblocks; 0 in the manifest).
pub const OFF_SHARD: usize = OFF_SHARD_COUNT + 2;
/// Byte offset of the directory id.
pub const OFF_DIR_ID: usize = OFF_SHARD + 2;
/// Byte offset of the window size.
pub const OFF_WINDOW_BYTES: usize = OFF_DIR_ID + 8;
/// Byte offset of the maximum data file size.
pub const OFF_MAX_FILE_BYTES: usize = OFF_WINDOW_BYTES + 8;
/// Byte offset of the class table id.
pub const OFF_CLASS_TABLE: usize = OFF_MAX_FILE_BYTES + 8;
/// Byte offset of the checksum.
pub const OFF_CRC: usize = OFF_CLASS_TABLE + 4;
/// Encoded manifest / superblock size.
pub const MANIFEST_BYTES: usize = OFF_CRC + 4;
const _: () = assert!(MANIFEST_BYTES == 48);

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

/// Whether `b` begins as a segalloc manifest does (its magic), whatever
/// follows: a file named `MANIFEST` that another program wrote does not.
pub(crate) fn has_magic(b: &[u8]) -> bool {
    b.starts_with(MAGIC)
}

/// Test support: [`Manifest`]'s encoding, for tests that forge images.
#[cfg(feature = "test-support")]
pub fn encode(m: &Manifest, shard: u16) -> [u8; MANIFEST_BYTES] {
    m.encode(shard)
}

/// Test support: [`Manifest`]'s decoding, for tests that forge images.
///
/// # Errors
///
/// As the decoding of a manifest: [`Error::Corrupt`] naming `what`.
#[cfg(feature = "test-support")]
pub fn decode(b: &[u8], what: &str) -> Result<(Manifest, u16)> {
    Manifest::decode(b, what)
}

impl Manifest {
    /// Tag that handles of this directory carry.
    pub fn dir_tag(&self) -> u32 {
        self.dir_id as u32
    }

    /// 64 KiB blocks per window.
    pub fn window_blocks(&self) -> u64 {
        self.window_bytes / BLOCK_BYTES
    }

    /// 64 KiB blocks per data file at most.
    pub fn file_blocks(&self) -> u64 {
        self.max_file_bytes / BLOCK_BYTES
    }

    /// Encode; `shard` fills the reserved field (superblocks) or is 0.
    pub(crate) fn encode(&self, shard: u16) -> [u8; MANIFEST_BYTES] {
        let mut b = [0u8; MANIFEST_BYTES];
        b[OFF_MAGIC..OFF_VERSION].copy_from_slice(MAGIC);
        b[OFF_VERSION..OFF_SHARD_COUNT].copy_from_slice(&self.version.to_le_bytes());
        b[OFF_SHARD_COUNT..OFF_SHARD].copy_from_slice(&self.shard_count.to_le_bytes());
        b[OFF_SHARD..OFF_DIR_ID].copy_from_slice(&shard.to_le_bytes());
        b[OFF_DIR_ID..OFF_WINDOW_BYTES].copy_from_slice(&self.dir_id.to_le_bytes());
        b[OFF_WINDOW_BYTES..OFF_MAX_FILE_BYTES].copy_from_slice(&self.window_bytes.to_le_bytes());
        b[OFF_MAX_FILE_BYTES..OFF_CLASS_TABLE].copy_from_slice(&self.max_file_bytes.to_le_bytes());
        b[OFF_CLASS_TABLE..OFF_CRC].copy_from_slice(&self.class_table_id.to_le_bytes());
        let crc = crc32c::crc32c(&b[..OFF_CRC]);
        b[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate; returns the manifest and the shard field.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] naming `what` for any inconsistency.
    pub(crate) fn decode(b: &[u8], what: &str) -> Result<(Manifest, u16)> {
        let corrupt = |detail: &str| Error::Corrupt {
            what: what.to_string(),
            detail: detail.to_string(),
        };
        if b.len() < MANIFEST_BYTES {
            return Err(corrupt("truncated"));
        }
        if &b[OFF_MAGIC..OFF_VERSION] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        if u32_at(b, OFF_CRC) != crc32c::crc32c(&b[..OFF_CRC]) {
            return Err(corrupt("checksum mismatch"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let m = Manifest {
            version: u32_at(b, OFF_VERSION),
            shard_count: u16_at(OFF_SHARD_COUNT),
            dir_id: u64_at(b, OFF_DIR_ID),
            window_bytes: u64_at(b, OFF_WINDOW_BYTES),
            max_file_bytes: u64_at(b, OFF_MAX_FILE_BYTES),
            class_table_id: u32_at(b, OFF_CLASS_TABLE),
        };
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
            || !m.window_bytes.is_multiple_of(MAX_SEGMENT_BYTES)
            || m.max_file_bytes == 0
            || !m.max_file_bytes.is_multiple_of(m.window_bytes)
            || m.file_blocks() > u32::MAX as u64
        {
            return Err(corrupt("geometry out of range"));
        }
        Ok((m, u16_at(OFF_SHARD)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_roundtrip() {
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
        let mut bad = b;
        bad[OFF_WINDOW_BYTES] ^= 1;
        assert!(Manifest::decode(&bad, "t").is_err());
    }
}
