//! CRC-32C of the short records the examples write and read back (the
//! kv_server's records, the demo's 12-byte seals): one pass of the CPU's
//! `crc32` instruction over 8-byte words when it has SSE 4.2, the `crc32c`
//! crate otherwise. The crate's general routine prepares three interleaved
//! streams, which costs more than the whole checksum of a record of a few
//! hundred bytes (sealing a `SET`'s record with the crate took 284 of its
//! 2,635 instructions, callgrind). The tests check that both agree.
//!
//! Each example that includes this file uses a part of it: the demo
//! `append12` and `append12_words` (its 12-byte seals), the kv_server
//! `append`.

#![allow(dead_code)]

/// [`crc32c::crc32c_append`]: the CRC-32C of the bytes checksummed into
/// `crc` followed by `data`.
#[inline]
pub fn append(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2, the only feature `append_sse42`
        // is compiled for.
        return unsafe { append_sse42(crc, data) };
    }
    crc32c::crc32c_append(crc, data)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn append_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u32, _mm_crc32_u64};
    let mut state = u64::from(!crc);
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        state = _mm_crc32_u64(state, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut state = state as u32;
    let mut rest = words.remainder();
    if let Some((w, tail)) = rest.split_first_chunk::<4>() {
        state = _mm_crc32_u32(state, u32::from_le_bytes(*w));
        rest = tail;
    }
    for &b in rest {
        state = _mm_crc32_u8(state, b);
    }
    !state
}

/// [`append`] of exactly 12 bytes (the demo's record header): one `crc32`
/// instruction over 8 bytes and one over 4 when the CPU has SSE 4.2 (the
/// general pass spends about 38 instructions on 12 bytes, most of them
/// splitting the slice).
#[inline]
pub fn append12(crc: u32, data: &[u8; 12]) -> u32 {
    let (low, high) = data.split_first_chunk::<8>().expect("12 bytes");
    let high: &[u8; 4] = high.try_into().expect("4 bytes");
    append12_words(crc, u64::from_le_bytes(*low), u32::from_le_bytes(*high))
}

/// [`append12`] of the bytes `low.to_le_bytes()` then `high.to_le_bytes()`,
/// for a caller that has the header's fields in registers: assembling
/// them in memory with 4-byte stores and reading 8 bytes back stalls the
/// load until the stores retire.
#[inline]
pub fn append12_words(crc: u32, low: u64, high: u32) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE 4.2, the only feature `append12_sse42`
        // is compiled for.
        return unsafe { append12_sse42(crc, low, high) };
    }
    let mut bytes = [0u8; 12];
    bytes[..8].copy_from_slice(&low.to_le_bytes());
    bytes[8..].copy_from_slice(&high.to_le_bytes());
    crc32c::crc32c_append(crc, &bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn append12_sse42(crc: u32, low: u64, high: u32) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u32, _mm_crc32_u64};
    let state = _mm_crc32_u64(u64::from(!crc), low) as u32;
    !_mm_crc32_u32(state, high)
}

#[cfg(test)]
mod tests {
    /// Every length up to a few records, from several starting states,
    /// split at every point: the same checksum as the crate's.
    #[test]
    fn agrees_with_the_crate() {
        let data: Vec<u8> = (0..700u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in 0..data.len() {
            let d = &data[..len];
            for start in [0u32, 1, 0xdead_beef, u32::MAX] {
                assert_eq!(
                    super::append(start, d),
                    crc32c::crc32c_append(start, d),
                    "len {len}"
                );
            }
            let split = len / 3;
            let crc = super::append(super::append(0, &d[..split]), &d[split..]);
            assert_eq!(crc, crc32c::crc32c(d), "len {len} split at {split}");
        }
    }

    /// The `crc32` instruction pass itself (what `append` uses on a CPU
    /// with SSE 4.2), so that the test above does not compare the crate
    /// with itself there.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_sse42_pass_agrees_with_the_crate() {
        if !std::arch::is_x86_feature_detected!("sse4.2") {
            eprintln!("no SSE 4.2: nothing to check");
            return;
        }
        let data: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(40_503) >> 3) as u8)
            .collect();
        for len in 0..data.len() {
            for start in [0u32, 0x1234_5678, u32::MAX] {
                // SAFETY: the CPU has SSE 4.2 (checked above).
                let fast = unsafe { super::append_sse42(start, &data[..len]) };
                assert_eq!(
                    fast,
                    crc32c::crc32c_append(start, &data[..len]),
                    "len {len}"
                );
            }
        }
    }

    /// The 12-byte routine, both ways, against the crate: every byte value
    /// in every position, from several starting states.
    #[test]
    fn append12_agrees_with_the_crate() {
        for pos in 0..12 {
            for v in 0..=255u8 {
                let mut d = [0x5Au8; 12];
                d[pos] = v;
                for start in [0u32, 1, 0x5EA1_0003, u32::MAX] {
                    let want = crc32c::crc32c_append(start, &d);
                    assert_eq!(super::append12(start, &d), want, "pos {pos} value {v}");
                    #[cfg(target_arch = "x86_64")]
                    if std::arch::is_x86_feature_detected!("sse4.2") {
                        let (low, high) = d.split_at(8);
                        // SAFETY: the CPU has SSE 4.2 (checked just above).
                        let fast = unsafe {
                            super::append12_sse42(
                                start,
                                u64::from_le_bytes(low.try_into().unwrap()),
                                u32::from_le_bytes(high.try_into().unwrap()),
                            )
                        };
                        assert_eq!(fast, want, "sse4.2 pass, pos {pos} value {v}");
                    }
                }
            }
        }
    }
}
