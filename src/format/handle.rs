//! `Handle`: the durable address of an allocation, and its encoding.
//!
//! A handle is `Copy`, 40 bytes when encoded, little-endian, and checksummed,
//! so it can be stored inside other allocations and decoded after a restart
//! (the layout is in [`Handle`]'s docs).

use super::classes;

/// Bytes that do not decode to a [`Handle`], and why. Converts into
/// [`Error::BadHandle`](crate::Error::BadHandle), so `?` works in functions
/// that return [`segalloc::Result`](crate::Result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadHandle {
    /// What is wrong with the bytes.
    pub reason: &'static str,
}

impl std::fmt::Display for BadHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a valid handle: {}", self.reason)
    }
}

impl std::error::Error for BadHandle {}

/// Encoded size of a [`Handle`].
pub const HANDLE_BYTES: usize = 40;

const MAGIC: u8 = 0xA5;
const VERSION: u8 = 1;

const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = OFF_MAGIC + 1;
const OFF_CLASS: usize = OFF_VERSION + 1;
const OFF_RESERVED0: usize = OFF_CLASS + 1;
const OFF_SHARD: usize = OFF_RESERVED0 + 1;
const OFF_RESERVED1: usize = OFF_SHARD + 2;
const OFF_FILE: usize = OFF_RESERVED1 + 2;
const OFF_SEGMENT: usize = OFF_FILE + 4;
const OFF_GENERATION: usize = OFF_SEGMENT + 4;
const OFF_LENGTH: usize = OFF_GENERATION + 4;
const OFF_OFFSET: usize = OFF_LENGTH + 4;
const OFF_DIR_TAG: usize = OFF_OFFSET + 8;
const OFF_CRC: usize = OFF_DIR_TAG + 4;
const _: () = assert!(OFF_CRC + 4 == HANDLE_BYTES);

/// The durable address of an allocation: shard, file, segment, offset,
/// length and class, plus the segment's generation and a tag of the data
/// directory, so a stale handle or one from another directory is rejected.
///
/// [`to_bytes`](Self::to_bytes) encodes it in [`HANDLE_BYTES`] (40)
/// bytes, little-endian and checksummed, to be stored inside other
/// allocations and decoded after a restart by
/// [`from_bytes`](Self::from_bytes):
///
/// | offset | size | field |
/// |---|---|---|
/// | 0 | 1 | magic `0xA5` |
/// | 1 | 1 | format version (1) |
/// | 2 | 1 | size class |
/// | 3 | 1 | reserved, 0 |
/// | 4 | 2 | shard |
/// | 6 | 2 | reserved, 0 |
/// | 8 | 4 | data file number |
/// | 12 | 4 | segment id |
/// | 16 | 4 | segment generation |
/// | 20 | 4 | slot length in bytes |
/// | 24 | 8 | byte offset of the slot in the data file |
/// | 32 | 4 | data-directory tag (low 32 bits of its random id) |
/// | 36 | 4 | CRC-32C of bytes 0..36 |
///
/// ```
/// use segalloc::Handle;
/// // `h`: the handle of an allocation (`Allocation::handle`).
/// # let h = Handle::example();
/// let bytes = h.to_bytes();
/// assert_eq!(Handle::from_bytes(&bytes)?, h);
/// assert!(Handle::from_bytes(&[0u8; 40]).is_err());
/// # Ok::<(), segalloc::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle {
    pub(crate) shard: u16,
    pub(crate) class_id: u8,
    pub(crate) file: u32,
    pub(crate) segment: u32,
    pub(crate) generation: u32,
    pub(crate) length: u32,
    pub(crate) offset: u64,
    pub(crate) dir_tag: u32,
}

impl Handle {
    /// The shard that owns the allocation.
    pub fn shard(&self) -> u16 {
        self.shard
    }
    /// The size class.
    pub fn class_id(&self) -> u8 {
        self.class_id
    }
    /// The data file number within the shard.
    pub fn file_id(&self) -> u32 {
        self.file
    }
    /// The segment id within the shard.
    pub fn segment_id(&self) -> u32 {
        self.segment
    }
    /// The segment's generation when the slot was allocated.
    pub fn generation(&self) -> u32 {
        self.generation
    }
    /// Byte offset of the slot in its data file.
    pub fn offset(&self) -> u64 {
        self.offset
    }
    /// Usable length: the slot size of the class (at least the requested size).
    pub fn len(&self) -> u32 {
        self.length
    }
    /// Always false: allocations are at least 16 bytes.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }
    /// Tag of the data directory the handle belongs to.
    pub fn dir_tag(&self) -> u32 {
        self.dir_tag
    }

    /// The same handle at `offset`: a handle of another slot of the same
    /// segment when `offset` is one.
    #[inline(always)]
    pub(crate) fn at(&self, offset: u64) -> Handle {
        Handle { offset, ..*self }
    }

    /// The fixed-size little-endian encoding.
    pub fn to_bytes(&self) -> [u8; HANDLE_BYTES] {
        let mut b = [0u8; HANDLE_BYTES];
        b[OFF_MAGIC] = MAGIC;
        b[OFF_VERSION] = VERSION;
        b[OFF_CLASS] = self.class_id;
        b[OFF_SHARD..OFF_SHARD + 2].copy_from_slice(&self.shard.to_le_bytes());
        b[OFF_FILE..OFF_FILE + 4].copy_from_slice(&self.file.to_le_bytes());
        b[OFF_SEGMENT..OFF_SEGMENT + 4].copy_from_slice(&self.segment.to_le_bytes());
        b[OFF_GENERATION..OFF_GENERATION + 4].copy_from_slice(&self.generation.to_le_bytes());
        b[OFF_LENGTH..OFF_LENGTH + 4].copy_from_slice(&self.length.to_le_bytes());
        b[OFF_OFFSET..OFF_OFFSET + 8].copy_from_slice(&self.offset.to_le_bytes());
        b[OFF_DIR_TAG..OFF_DIR_TAG + 4].copy_from_slice(&self.dir_tag.to_le_bytes());
        let crc = crc32c::crc32c(&b[..OFF_CRC]);
        b[OFF_CRC..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and validate an encoding made by [`to_bytes`](Self::to_bytes).
    ///
    /// Validation is structural (length, magic, version, checksum, class,
    /// slot length, alignment); whether the allocation exists is checked
    /// when the handle is used.
    ///
    /// # Errors
    ///
    /// [`BadHandle`] with the reason (it converts into
    /// [`Error::BadHandle`](crate::Error::BadHandle)).
    pub fn from_bytes(bytes: &[u8]) -> Result<Handle, BadHandle> {
        let bad = |reason: &'static str| Err(BadHandle { reason });
        if bytes.len() != HANDLE_BYTES {
            return bad("wrong length (a handle is 40 bytes)");
        }
        if bytes[OFF_MAGIC] != MAGIC {
            return bad("bad magic byte");
        }
        if bytes[OFF_VERSION] != VERSION {
            return bad("unknown handle version");
        }
        let crc = u32::from_le_bytes(bytes[OFF_CRC..].try_into().expect("4 bytes"));
        if crc != crc32c::crc32c(&bytes[..OFF_CRC]) {
            return bad("checksum mismatch");
        }
        if bytes[OFF_RESERVED0] != 0 || bytes[OFF_RESERVED1..OFF_RESERVED1 + 2] != [0, 0] {
            return bad("reserved bytes are not zero");
        }
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let h = Handle {
            class_id: bytes[OFF_CLASS],
            shard: u16::from_le_bytes([bytes[OFF_SHARD], bytes[OFF_SHARD + 1]]),
            file: u32_at(OFF_FILE),
            segment: u32_at(OFF_SEGMENT),
            generation: u32_at(OFF_GENERATION),
            length: u32_at(OFF_LENGTH),
            offset: u64::from_le_bytes(
                bytes[OFF_OFFSET..OFF_OFFSET + 8]
                    .try_into()
                    .expect("8 bytes"),
            ),
            dir_tag: u32_at(OFF_DIR_TAG),
        };
        let Some(class) = classes::class(h.class_id) else {
            return bad("unknown size class");
        };
        if h.length != class.slot_bytes {
            return bad("length does not match the size class");
        }
        if !h.offset.is_multiple_of(16) {
            return bad("misaligned offset");
        }
        Ok(h)
    }

    /// The handle of slot `slot` of the segment in directory entry `entry`.
    // Used by the inspector (feature `cli`).
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) fn of_slot(
        shard: u16,
        dir_tag: u32,
        entry: u32,
        e: &super::EntryHeader,
        slot: u32,
    ) -> Handle {
        let slot_bytes = e.slot_bytes();
        Handle {
            shard,
            class_id: e.class_id,
            file: e.file,
            segment: entry,
            generation: e.generation,
            length: slot_bytes,
            offset: e.start_offset() + slot as u64 * slot_bytes as u64,
            dir_tag,
        }
    }

    /// A syntactically valid handle for documentation examples.
    #[doc(hidden)]
    pub fn example() -> Handle {
        Handle {
            shard: 0,
            class_id: 0,
            file: 0,
            segment: 0,
            generation: 1,
            length: 16,
            offset: 0,
            dir_tag: 0xdead_beef,
        }
    }
}

impl Handle {
    /// [`to_bytes`](Self::to_bytes) as 80 lowercase hex digits: the form
    /// `segalloc live` prints, which [`from_hex`](Self::from_hex) reads
    /// back. (`Handle` has no `FromStr`: its `Display` form, for people,
    /// does not name a handle.)
    ///
    /// ```
    /// # fn f(h: segalloc::Handle) -> Result<(), segalloc::BadHandle> {
    /// let text = h.to_hex();
    /// assert_eq!(segalloc::Handle::from_hex(&text)?, h);
    /// # Ok(())
    /// # }
    /// ```
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * HANDLE_BYTES);
        for b in self.to_bytes() {
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 15)] as char);
        }
        s
    }

    /// A handle from its [`to_hex`](Self::to_hex) form (either case;
    /// surrounding whitespace is not accepted), checked as
    /// [`from_bytes`](Self::from_bytes) checks bytes.
    ///
    /// # Errors
    ///
    /// [`BadHandle`] for text that is not 80 hex digits, or whose bytes
    /// are not a handle.
    pub fn from_hex(text: &str) -> Result<Handle, BadHandle> {
        let text = text.as_bytes();
        if text.len() != 2 * HANDLE_BYTES {
            return Err(BadHandle {
                reason: "wrong length (a handle in hex is 80 digits)",
            });
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut bytes = [0u8; HANDLE_BYTES];
        for (b, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            let (Some(hi), Some(lo)) = (digit(pair[0]), digit(pair[1])) else {
                return Err(BadHandle {
                    reason: "not a hex digit",
                });
            };
            *b = hi << 4 | lo;
        }
        Handle::from_bytes(&bytes)
    }
}

impl std::fmt::Display for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}@{:#x}+{}",
            self.shard, self.file, self.segment, self.offset, self.length
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_every_single_byte_flip_is_rejected() {
        let h = Handle {
            shard: 3,
            class_id: 9,
            file: 7,
            segment: 1234,
            generation: 99,
            length: classes::CLASSES[9].slot_bytes,
            offset: 1 << 33,
            dir_tag: 0x1234_5678,
        };
        let b = h.to_bytes();
        assert_eq!(Handle::from_bytes(&b).unwrap(), h);
        assert_eq!(h.at(16).at(h.offset), h);
        for i in 0..HANDLE_BYTES {
            for bit in 0..8 {
                let mut c = b;
                c[i] ^= 1 << bit;
                assert!(Handle::from_bytes(&c).is_err(), "flip {i}:{bit} accepted");
            }
        }
        assert!(Handle::from_bytes(&b[..39]).is_err());
    }

    #[test]
    fn hex_roundtrips_and_rejects_what_is_not_a_handle() {
        let h = Handle {
            shard: 1,
            class_id: 2,
            file: 3,
            segment: 4,
            generation: 5,
            length: classes::CLASSES[2].slot_bytes,
            offset: classes::CLASSES[2].slot_bytes as u64 * 6,
            dir_tag: 0xfeed_beef,
        };
        let text = h.to_hex();
        assert_eq!(text.len(), 80);
        assert!(
            text.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_eq!(Handle::from_hex(&text), Ok(h));
        assert_eq!(Handle::from_hex(&text.to_ascii_uppercase()), Ok(h));
        let reason = |t: &str| Handle::from_hex(t).unwrap_err().reason;
        assert!(reason(&text[..78]).starts_with("wrong length"));
        assert!(reason(&format!("{text}00")).starts_with("wrong length"));
        assert!(reason(&format!(" {}", &text[1..])).starts_with("not a hex digit"));
        assert!(reason(&format!("{}g", &text[..79])).starts_with("not a hex digit"));
        // Multi-byte text of the right byte length.
        assert!(reason(&format!("é{}", &text[2..])).starts_with("not a hex digit"));
        // A digit changed: the checksum (or another check) refuses it.
        let mut flipped = text.into_bytes();
        flipped[20] = if flipped[20] == b'0' { b'1' } else { b'0' };
        assert!(Handle::from_hex(std::str::from_utf8(&flipped).unwrap()).is_err());
    }
}
