//! Size classes and segment geometry.
//!
//! Classes run from 16 B to 16 MiB: every 16 B up to 128 B, then eight
//! classes per doubling (128 × (1 + i/8)), so a request of at least 128 B
//! wastes at most 1/9 < 12.5 % of its slot (mimalloc's bound).
//!
//! A segment of a class is a run of 64 KiB blocks holding `slots` slots of
//! the class's size, at most 4096 (one 512-byte bitmap). Its size is chosen
//! per class, at compile time: the largest multiple of 64 KiB up to
//! `max(1 MiB, size)` whose tail (the bytes no slot uses) is at most 1/64 of
//! the segment; failing that, the one with the least tail.
//!
//! | sizes | step | classes |
//! |---|---|---|
//! | 16 B – 128 B | 16 B | 8 |
//! | 128 B – 16 MiB | 1/8 of the lower power of two | 136 |

/// The largest segment (and allocation): 16 MiB. Windows are multiples of it.
pub const MAX_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// Segments are made of 64 KiB blocks.
pub const BLOCK_BYTES: u64 = 64 * 1024;
/// The most slots a segment holds (its bitmap has 4096 bits).
pub const MAX_SLOTS: u32 = 4096;
/// The largest allocation.
pub const MAX_ALLOC_BYTES: u64 = MAX_SEGMENT_BYTES;
/// Number of classes.
pub const CLASS_COUNT: usize = 8 + 8 * 17;
/// Identifies the class table in the manifest; bumped if the table changes.
pub const CLASS_TABLE_ID: u32 = 1;

/// Geometry of one size class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Class {
    /// Slot size in bytes.
    pub slot_bytes: u32,
    /// Segment size in bytes (a multiple of 64 KiB).
    pub segment_bytes: u32,
    /// Slots per segment (≤ 4096).
    pub slots: u32,
    /// `u64::MAX / slot_bytes + 1`: divides by the slot size with a multiply
    /// (exact for any dividend below 2^32; offsets inside a segment are).
    pub div_magic: u64,
}

impl Class {
    /// `(n / slot_bytes, n % slot_bytes)` for `n < 2^32`, without a division.
    #[inline(always)]
    pub fn div_rem(&self, n: u64) -> (u64, u64) {
        debug_assert!(n < 1 << 32);
        let q = ((self.div_magic as u128 * n as u128) >> 64) as u64;
        (q, n - q * self.slot_bytes as u64)
    }
}

const fn class_size(i: usize) -> u64 {
    if i < 8 {
        16 * (i as u64 + 1)
    } else {
        let j = i - 8;
        let base = 128u64 << (j / 8);
        base + base / 8 * (j as u64 % 8 + 1)
    }
}

const fn geometry(slot: u64) -> Class {
    let cap = if slot > 1024 * 1024 {
        slot
    } else {
        1024 * 1024
    };
    let cap_blocks = cap.div_ceil(BLOCK_BYTES);
    let k_min = slot.div_ceil(BLOCK_BYTES);
    // Largest k whose tail is at most 1/64 and whose slot count fits.
    let mut k = cap_blocks;
    while k >= k_min {
        let seg = k * BLOCK_BYTES;
        let slots = seg / slot;
        let tail = seg - slots * slot;
        if slots >= 1 && slots <= MAX_SLOTS as u64 && tail * 64 <= seg {
            return Class {
                slot_bytes: slot as u32,
                segment_bytes: seg as u32,
                slots: slots as u32,
                div_magic: u64::MAX / slot + 1,
            };
        }
        k -= 1;
    }
    // Least tail fraction otherwise (ties: the smaller segment).
    let mut best_k = k_min;
    let mut best_num = u64::MAX;
    let mut best_den = 1u64;
    let mut k = k_min;
    while k <= cap_blocks {
        let seg = k * BLOCK_BYTES;
        let slots = seg / slot;
        if slots >= 1 && slots <= MAX_SLOTS as u64 {
            let tail = seg - slots * slot;
            // tail/seg < best_num/best_den ?
            if best_num == u64::MAX || tail * best_den < best_num * seg {
                best_k = k;
                best_num = tail;
                best_den = seg;
            }
        }
        k += 1;
    }
    let seg = best_k * BLOCK_BYTES;
    Class {
        slot_bytes: slot as u32,
        segment_bytes: seg as u32,
        slots: (seg / slot) as u32,
        div_magic: u64::MAX / slot + 1,
    }
}

const fn build_table() -> [Class; CLASS_COUNT] {
    let mut t = [Class {
        slot_bytes: 0,
        segment_bytes: 0,
        slots: 0,
        div_magic: 0,
    }; CLASS_COUNT];
    let mut i = 0;
    while i < CLASS_COUNT {
        t[i] = geometry(class_size(i));
        i += 1;
    }
    t
}

/// The class table.
pub static CLASSES: [Class; CLASS_COUNT] = build_table();

const _: () = assert!(class_size(CLASS_COUNT - 1) == MAX_ALLOC_BYTES);
const _: () = {
    let t = build_table();
    let mut i = 0;
    while i < CLASS_COUNT {
        let c = t[i];
        assert!(c.slots >= 1 && c.slots <= MAX_SLOTS);
        assert!((c.segment_bytes as u64).is_multiple_of(BLOCK_BYTES));
        assert!(c.segment_bytes as u64 <= MAX_SEGMENT_BYTES);
        assert!(c.slot_bytes.is_multiple_of(16));
        i += 1;
    }
};

/// The class that serves `size` bytes (`1..=16 MiB`), or `None`.
#[inline]
pub fn class_of(size: u64) -> Option<u8> {
    if size == 0 || size > MAX_ALLOC_BYTES {
        return None;
    }
    if size <= 128 {
        return Some(((size - 1) / 16) as u8);
    }
    // 128 < size: find the doubling, then the eighth.
    let s = size - 1;
    let log = 63 - s.leading_zeros() as u64; // floor(log2(size - 1)), ≥ 7
    let base = 1u64 << log;
    let eighth = (s - base) / (base / 8); // 0..=7
    let idx = 8 + (log - 7) * 8 + eighth;
    Some(idx as u8)
}

/// The geometry of class `id`, or `None` for an id out of range.
#[inline]
pub fn class(id: u8) -> Option<&'static Class> {
    CLASSES.get(id as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_maps_to_the_smallest_fitting_class() {
        let mut sizes: Vec<u64> = (1..=4096).collect();
        for c in CLASSES.iter() {
            let s = c.slot_bytes as u64;
            sizes.extend([s - 1, s, s + 1]);
        }
        for size in sizes {
            if size == 0 || size > MAX_ALLOC_BYTES {
                assert_eq!(class_of(size), None);
                continue;
            }
            let id = class_of(size).unwrap() as usize;
            assert!(
                CLASSES[id].slot_bytes as u64 >= size,
                "size {size} class {id}"
            );
            if id > 0 {
                assert!(
                    (CLASSES[id - 1].slot_bytes as u64) < size,
                    "size {size} not minimal"
                );
            }
        }
    }

    #[test]
    fn waste_is_bounded() {
        for w in CLASSES.windows(2) {
            let (lo, hi) = (w[0].slot_bytes as u64, w[1].slot_bytes as u64);
            if lo >= 128 {
                // Worst request: lo + 1 in a slot of hi.
                let waste = (hi - (lo + 1)) as f64 / hi as f64;
                assert!(waste <= 0.125, "{lo}->{hi}: {waste}");
            }
        }
        for c in CLASSES.iter() {
            let tail = c.segment_bytes as u64 - c.slots as u64 * c.slot_bytes as u64;
            assert!(tail * 8 <= c.segment_bytes as u64, "{c:?}");
        }
    }

    #[test]
    fn div_rem_matches_division() {
        for c in CLASSES.iter() {
            let seg = c.segment_bytes as u64;
            let s = c.slot_bytes as u64;
            for n in (0..seg)
                .step_by(7)
                .chain([0, s - 1, s, s + 1, seg - 1, (1 << 32) - 1])
            {
                assert_eq!(c.div_rem(n), (n / s, n % s), "{c:?} {n}");
            }
        }
    }

    #[test]
    fn table_shape() {
        assert_eq!(CLASSES[0].slot_bytes, 16);
        assert_eq!(CLASSES[7].slot_bytes, 128);
        assert_eq!(CLASSES[8].slot_bytes, 144);
        assert_eq!(CLASSES[CLASS_COUNT - 1].slot_bytes as u64, MAX_ALLOC_BYTES);
        assert_eq!(CLASSES[CLASS_COUNT - 1].slots, 1);
    }
}
