//! CRC-32C of the short records the examples write and read back (the
//! kv_server's records, the demo's 12-byte seals): one pass of the CPU's
//! `crc32` instruction over 8-byte words when it has SSE 4.2, the `crc32c`
//! crate otherwise. The crate's general routine prepares three interleaved
//! streams, which costs more than the whole checksum of a record of a few
//! hundred bytes (sealing a `SET`'s record with the crate took 284 of its
//! 2,635 instructions, callgrind). The tests check that both agree.

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
}
