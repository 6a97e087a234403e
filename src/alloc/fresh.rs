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
/// A sync bumps the epoch when it begins (also one that is dropped or
/// fails: that only defers more). Each segment keeps its fresh bits
/// (`Seg::mark_fresh`, `Seg::take_fresh`) with the epoch they were set in,
/// and they count as empty under another: starting a sync clears every
/// segment's bits at once, in O(1). A fresh bit is set only on a held slot.
#[derive(Default)]
pub(super) struct Fresh {
    epoch: u64,
}

impl Fresh {
    /// A sync begins: nothing taken before now is fresh any more.
    pub(super) fn begin_sync(&mut self) {
        self.epoch += 1;
    }

    /// The current epoch.
    #[inline(always)]
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }
}
