//! Fresh slots: taken since the latest sync began, so a free may hand
//! them out again at once.

/// The slots taken since the latest sync began: "fresh" ones.
///
/// Deferred reuse keeps a freed slot held until a sync that began after the
/// free completes, because a power loss may revert the free, and the
/// allocation must then come back with its bytes, which a newer allocation
/// of the slot would have overwritten. That promise covers the allocations
/// live at the last completed sync, and a sync covers only what returned
/// before it began. A slot taken after the latest sync began is covered by
/// no sync, completed or running: no power loss can promise it back. So its
/// free may hand it out again at once. After a power loss the slot is then
/// either free or live with some bytes, like any unsynced allocation, and
/// every allocation a completed sync covered is untouched (it was taken
/// before that sync began, so its slot was never fresh since).
///
/// A sync bumps `epoch` when it begins (also one that is dropped or fails:
/// that only defers more). Each segment's bits carry the epoch they were
/// set in and count as empty under another: starting a sync clears every
/// segment's bits at once, in O(1). A fresh bit is set only on a held slot.
#[derive(Default)]
pub(super) struct Fresh {
    epoch: u64,
    /// Indexed by segment id; grown on demand.
    segments: Vec<FreshBits>,
}

struct FreshBits {
    epoch: u64,
    words: [u64; crate::format::BITMAP_WORDS],
}

impl Fresh {
    /// A sync begins: nothing taken before now is fresh any more.
    pub(super) fn begin_sync(&mut self) {
        self.epoch += 1;
    }

    /// Slot `slot` of segment `seg` was just taken.
    #[inline]
    pub(super) fn mark(&mut self, seg: u32, slot: u32) {
        let epoch = self.epoch;
        let Some(bits) = self.segments.get_mut(seg as usize) else {
            return self.mark_new(seg, slot);
        };
        if bits.epoch != epoch {
            bits.epoch = epoch;
            bits.words = [0; crate::format::BITMAP_WORDS];
        }
        bits.words[(slot / 64) as usize] |= 1u64 << (slot % 64);
    }

    #[cold]
    #[inline(never)]
    fn mark_new(&mut self, seg: u32, slot: u32) {
        let epoch = self.epoch;
        self.segments.resize_with(seg as usize + 1, || FreshBits {
            epoch,
            words: [0; crate::format::BITMAP_WORDS],
        });
        self.mark(seg, slot);
    }

    /// Forget slot `slot` of segment `seg`; whether it was fresh.
    #[inline]
    pub(super) fn take(&mut self, seg: u32, slot: u32) -> bool {
        match self.segments.get_mut(seg as usize) {
            Some(bits) if bits.epoch == self.epoch => {
                let word = &mut bits.words[(slot / 64) as usize];
                let mask = 1u64 << (slot % 64);
                let was = *word & mask != 0;
                *word &= !mask;
                was
            }
            _ => false,
        }
    }
}
