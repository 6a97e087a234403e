//! Counters, gauges and the iterator over live allocations.

#![warn(clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;

use super::SegmentAllocator;
use crate::format::Handle;
use crate::format::classes::{BLOCK_BYTES, CLASSES};

/// Counters and gauges of an allocator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AllocStats {
    /// Live allocations.
    pub allocations_live: u64,
    /// Bytes of live slots.
    pub live_bytes: u64,
    /// Bytes of segments in use (allocated to a class).
    pub allocated_bytes: u64,
    /// Bytes reserved on disk for data (blocks allocated in data files).
    pub reserved_bytes: u64,
    /// Bytes of the metadata file.
    pub metadata_bytes: u64,
    /// Segments in use.
    pub segments: u64,
    /// Data files.
    pub data_files: u64,
    /// Directory entries of released segments not reusable yet: waiting
    /// for the next sync, or for the running sync that covers them to
    /// complete.
    pub quarantined_entries: u64,
    /// `allocate` calls that succeeded.
    pub allocs: u64,
    /// `free` calls that succeeded.
    pub frees: u64,
    /// Successful syncs.
    pub syncs: u64,
    /// Data file `fdatasync`s started by [`sync`](super::SegmentAllocator::sync)
    /// (only files that may hold changes are synced).
    pub data_file_syncs: u64,
    /// Live allocations per class, `(slot_bytes, count)`, non-zero only.
    pub live_per_class: Vec<(u32, u64)>,
    /// Microseconds the last recovery took.
    pub recovery_us: u64,
    /// When the last successful sync finished, in milliseconds since the
    /// Unix epoch (0: never since open).
    pub last_sync_unix_ms: u64,
    /// Former name of `live_bytes` (the same figure).
    #[deprecated(since = "0.1.0", note = "renamed to `live_bytes`")]
    pub bytes_live: u64,
    /// Former name of `allocated_bytes` (the same figure).
    #[deprecated(since = "0.1.0", note = "renamed to `allocated_bytes`")]
    pub bytes_allocated: u64,
    /// Former name of `reserved_bytes` (the same figure).
    #[deprecated(since = "0.1.0", note = "renamed to `reserved_bytes`")]
    pub bytes_reserved: u64,
}

impl SegmentAllocator {
    /// The live allocations, segment by segment.
    pub fn live(&self) -> LiveIter<'_> {
        LiveIter {
            alloc: self,
            seg: 0,
            generation: 0,
            word: 0,
            bits: 0,
        }
    }

    /// Number of live allocations.
    pub fn live_count(&self) -> u64 {
        self.st.borrow().live_per_class.iter().sum()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> AllocStats {
        let st = self.st.borrow();
        let mut s = st.stats.clone();
        s.segments = st.segments_live;
        debug_assert_eq!(
            s.segments,
            st.segments.iter().filter(|s| s.is_some()).count() as u64
        );
        s.allocated_bytes = (st.space.used_blocks() - st.space.free_blocks()) * BLOCK_BYTES;
        s.quarantined_entries = (st.released.entries.len() + st.covered_entries) as u64;
        s.data_file_syncs = self.syncs.data_file_syncs.get();
        s.allocations_live = st.live_per_class.iter().sum();
        s.live_bytes = (st.live_per_class.iter().zip(CLASSES.iter()))
            .map(|(n, c)| n * u64::from(c.slot_bytes))
            .sum();
        s.data_files = self.data_files.borrow().len() as u64;
        s.reserved_bytes = self
            .data_files
            .borrow()
            .iter()
            .map(|&id| self.files.reserved_bytes(id).unwrap_or(0))
            .sum();
        s.metadata_bytes = self.files.reserved_bytes(self.meta_file).unwrap_or(0);
        s.live_per_class = st
            .live_per_class
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (CLASSES[i].slot_bytes, *n))
            .collect();
        #[allow(deprecated)]
        {
            (s.bytes_live, s.bytes_allocated, s.bytes_reserved) =
                (s.live_bytes, s.allocated_bytes, s.reserved_bytes);
        }
        s
    }
}

impl std::fmt::Debug for SegmentAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentAllocator")
            .field("shard", &self.shard)
            .field("live", &self.live_count())
            .finish()
    }
}

/// Iterator over live handles; see [`SegmentAllocator::live`].
///
/// It may be held across an `.await`: a slot freed meanwhile is not
/// reported, and a segment released meanwhile (its entry perhaps reused by
/// another segment) is left for the next entry.
pub struct LiveIter<'a> {
    alloc: &'a SegmentAllocator,
    seg: u32,
    /// The generation of segment `seg` when its first word was read.
    generation: u32,
    word: u32,
    bits: u64,
}

impl LiveIter<'_> {
    fn next_entry(&mut self) {
        self.seg += 1;
        self.word = 0;
        self.bits = 0;
    }
}

impl Iterator for LiveIter<'_> {
    type Item = Handle;

    fn next(&mut self) -> Option<Handle> {
        let st = self.alloc.st.borrow();
        loop {
            let seg = match st.segments.get(self.seg as usize) {
                None => return None,
                Some(None) => {
                    self.next_entry();
                    continue;
                }
                Some(Some(s)) => s,
            };
            if self.word == 0 {
                self.generation = seg.generation();
            } else if seg.generation() != self.generation {
                // Released and reused since its words were read.
                self.next_entry();
                continue;
            }
            if self.bits != 0 {
                let bit = self.bits.trailing_zeros();
                self.bits &= self.bits - 1;
                let slot = (self.word - 1) * 64 + bit;
                if !seg.is_live(slot) {
                    // Freed since its word was read.
                    continue;
                }
                return Some(seg.slot_at(slot).0);
            }
            if self.word >= seg.slots.div_ceil(64) {
                self.next_entry();
                continue;
            }
            self.bits = seg.word(self.word).load(Ordering::Relaxed);
            self.word += 1;
        }
    }
}
