//! Trimming: give the blocks of free runs back to the file system, and the
//! reservation that must come before such a run is used again.
//!
//! **Architecture invariants:**
//! * Only free runs are punched, and only while they are taken out of the
//!   free space ([`Space::take_exact`](super::space::Space::take_exact)), so
//!   no segment can be created in a run while its hole is being punched. A
//!   run whose punch a dropped `trim` left in flight stays out of it, its
//!   punch kept beside it (`State::punching`), until the kernel is done:
//!   the next `trim` waits for that, and a new segment first takes back the
//!   runs whose punch is done ([`collect_punched`]). A run given back
//!   before its punch was submitted goes back in its own state. A run
//!   whose punch was reported failed while it stayed queued in the ring
//!   (`Op::left_queued`) stays out, its punch kept beside it
//!   (`State::queued_punches`), until the ring has reaped that entry: the
//!   kernel gets it later. The allocator's `Drop` waits for every kept
//!   punch, so a shard reopened through the same registry (the same ring)
//!   never hands out a run the old one still punches.
//! * Every release the punched runs come from is durable before the first
//!   hole is punched (a run enters the free space only after a sync made its
//!   release durable), so a power loss can never bring a released segment
//!   back over a hole. `trim` syncs twice first, so that frees made before
//!   it release their segments and those runs become free.
//! * A run whose window has users (a pin kept past its allocation's free)
//!   is not punched: checked right before the punch is submitted, and no
//!   pin of a freed slot can be made after that.
//! * A run that may hold a hole is reserved again (`fallocate` mode 0 through
//!   the ring) before a segment is published in it; nothing is handed out in
//!   a hole, so no write through a mapping can fault on a full disk.

#![warn(clippy::cast_possible_truncation)]

use std::collections::HashMap;

use tracing::Instrument;

use super::space::{Run, Trim};
use super::{SegmentAllocator, State, data_file_name};
use crate::error::{Error, Result};
use crate::format::classes::BLOCK_BYTES;
use crate::io::Op;
use crate::sys;

/// Runs taken out of the free space by `trim`. If the future is dropped,
/// the ones not punched yet go back in their state, and the one whose
/// punch is in flight waits beside its punch in `State::punching`.
struct Leased<'a> {
    alloc: &'a SegmentAllocator,
    pending: Vec<(Run, Trim)>,
    /// Taken, its punch not submitted yet (a descriptor or the probe is
    /// awaited).
    preparing: Option<(Run, Trim)>,
    /// Its punch submitted: the kernel may punch it until the op completes.
    punching: Option<(Run, Op)>,
}

impl Drop for Leased<'_> {
    fn drop(&mut self) {
        let mut st = self.alloc.st.borrow_mut();
        for (run, trim) in self.pending.drain(..) {
            st.space.give_back(run, trim);
        }
        // A probe still in flight reserves blocks (mode 0), which a segment
        // made in the run meanwhile would do anyway.
        if let Some((run, trim)) = self.preparing.take() {
            st.space.give_back(run, trim);
        }
        if let Some((run, mut op)) = self.punching.take() {
            // Nobody polls it now: the ring reaps its completion, and
            // releases the file's descriptor then (the op keeps none: an
            // interrupted punch counts as done, and the run as maybe
            // punched, which it is given back as anyway).
            op.release_retry();
            op.detach();
            st.punching.push((run, op));
        }
    }
}

/// Give back to the free space every run whose punch, left in flight by a
/// dropped `trim` or queued by a failed submission, the kernel has
/// completed (it may hold a hole, whatever the punch's result). Without
/// waiting: called before a new segment takes space, and by `trim`.
pub(super) fn collect_punched(st: &mut State) {
    if st.punching.is_empty() && st.queued_punches.is_empty() {
        return;
    }
    let State {
        punching,
        queued_punches,
        space,
        ..
    } = st;
    punching.retain_mut(|(run, op)| match op.try_complete() {
        Some(_) => {
            space.give_back(*run, Trim::Punched);
            false
        }
        None => true,
    });
    queued_punches.retain(|(run, op)| {
        if op.kernel_may_run() {
            return true;
        }
        space.give_back(*run, Trim::Punched);
        false
    });
}

/// The allocator closes only once the kernel is done with every punch it
/// kept (left in flight by a dropped `trim`, or queued by a failed
/// submission): its shard may be opened again at once through the same
/// registry, whose ring would otherwise still punch a run the new
/// allocator hands out. The thread blocks for as long as those punches
/// take: only punches already submitted are kept, and none without a
/// cancelled or failed `trim`.
impl Drop for SegmentAllocator {
    fn drop(&mut self) {
        let st = self.st.get_mut();
        for (run, op) in st.punching.iter().chain(&st.queued_punches) {
            if let Err(e) = op.wait_blocking() {
                tracing::error!(
                    shard = self.shard,
                    ?run,
                    error = %e,
                    "closed while a punch may still run: its run must not be used before the kernel is done"
                );
            }
        }
    }
}

impl SegmentAllocator {
    /// Give the blocks of the shard's free space back to the file system:
    /// punch a hole (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`,
    /// through the control ring) into every free run of the data files — the
    /// space released segments left below the used ends — that is not
    /// punched already. Returns the bytes punched.
    ///
    /// The allocator first syncs twice (as [`sync`](Self::sync)): frees made
    /// before the call become durable and release the segments they emptied,
    /// and those releases become durable, so their runs are free and no
    /// released segment can come back over a hole after a power loss. A
    /// punched run is reserved again (`fallocate` mode 0) before a new
    /// segment uses it; if the disk is full by then, that `allocate` returns
    /// [`Error::NoSpace`] and the run stays free. Free runs found at a
    /// reopen may have been punched before it: they are reserved again the
    /// same way, and punched again (and counted again) by the next `trim`.
    ///
    /// Space above a file's used end is not punched, nor space beyond
    /// the file's reserved size, nor anything on a file system that cannot
    /// both punch holes and reserve blocks (then this returns `Ok(0)`).
    /// While `trim` runs, the runs it works on cannot be allocated from.
    /// Dropped before it completes, it gives them back, except a run whose
    /// punch the kernel is running: that one is free again once the punch
    /// is done (the next `trim` waits for it first), and the allocator, if
    /// dropped meanwhile, blocks its thread until the punch is done.
    ///
    /// A run whose window a [`PinGuard`](crate::PinGuard) of this shard still
    /// maps (a pin kept past the free of its allocation) is not punched; a
    /// later `trim` punches it once the window has no pin. A pin made after
    /// the run was punched cannot exist: a freed allocation cannot be
    /// pinned. (Another shard's `Shard::pin_foreign` is not seen here: its
    /// contract keeps the allocation from being freed while it is pinned.)
    ///
    /// # Errors
    ///
    /// [`Error::Poisoned`] or [`Error::ReadOnly`] (nothing done); the errors
    /// of [`sync`](Self::sync) (which poisons the shard; nothing punched);
    /// [`Error::Io`] from `fallocate` (the runs punched before it stay
    /// punched, the run it failed on counts as punched, the rest is
    /// untouched; a punch whose submission to the ring failed after it was
    /// queued may still run, so its run stays unused until the ring has
    /// reaped it), [`Error::FdPressure`] and [`Error::TooManyOpenFiles`] when
    /// a data file cannot be opened. The allocator stays consistent in every
    /// case: no allocation changes.
    pub async fn trim(&self) -> Result<u64> {
        let span = tracing::debug_span!("trim", shard = self.shard);
        self.trim_inner().instrument(span).await
    }

    async fn trim_inner(&self) -> Result<u64> {
        self.check_writable()?;
        let mut leased = Leased {
            alloc: self,
            pending: Vec::new(),
            preparing: None,
            punching: None,
        };
        // 0. The punches an earlier, dropped `trim` left in flight: once
        //    each is done, its run is free again (maybe holding a hole).
        //    Those left queued by a failed submission are free again if the
        //    ring reaped them (not waited for: no task can await them).
        collect_punched(&mut self.st.borrow_mut());
        loop {
            let Some(kept) = self.st.borrow_mut().punching.pop() else {
                break;
            };
            let (_, op) = leased.punching.insert(kept);
            let _ = op.await;
            let (run, _) = leased.punching.take().expect("just set");
            self.st.borrow_mut().space.give_back(run, Trim::Punched);
        }
        // 1. Make every free durable (which releases the segments they
        //    emptied), then every release (which frees their runs).
        self.sync().await?;
        self.sync().await?;
        // A prefault in flight holds its window like a pin: let it finish,
        // so that only real pins keep a run from being punched.
        self.mm.settle_prefaults().await;
        // 2. Take the candidates out of the free space: every free run in
        //    it was released durably before it got there.
        {
            let mut st = self.st.borrow_mut();
            let candidates = st.space.punchable();
            leased.pending = candidates
                .into_iter()
                .filter_map(|(run, _)| st.space.take_exact(run).map(|t| (run, t)))
                .collect::<Vec<_>>();
        }
        // 3. Punch, file by file, in file order.
        leased.pending.reverse();
        let mut can_punch: HashMap<u32, bool> = HashMap::new();
        let mut released = 0u64;
        let mut runs = 0u64;
        while let Some((run, trim)) = leased.pending.pop() {
            leased.preparing = Some((run, trim));
            let prepared = self.prepare_punch(run, &mut can_punch).await;
            leased.preparing = None;
            let mut still_queued = None;
            let r = match prepared {
                Ok(Some((op, bytes, path))) => {
                    let (_, op) = leased.punching.insert((run, op));
                    let done = (&mut *op).await;
                    let (_, op) = leased.punching.take().expect("just set");
                    match done {
                        Ok(()) => Ok(Some(bytes)),
                        Err(e) if op.left_queued() => {
                            still_queued = Some(op);
                            Err(Error::io("fallocate(PUNCH_HOLE)", Some(&path), e))
                        }
                        Err(e) if sys::is_unsupported(&e) => {
                            can_punch.insert(run.file, false);
                            Ok(None)
                        }
                        Err(e) => Err(Error::io("fallocate(PUNCH_HOLE)", Some(&path), e)),
                    }
                }
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            let mut st = self.st.borrow_mut();
            match r {
                Ok(Some(bytes)) => {
                    released += bytes;
                    runs += 1;
                    st.space.give_back(run, Trim::Punched);
                }
                Ok(None) => st.space.give_back(run, trim),
                Err(e) if still_queued.is_some() => {
                    // The submission failed after the punch was queued: it
                    // reaches the kernel with a later one, unordered with a
                    // reservation of a segment made in the run meanwhile.
                    // So the run stays out of the free space, beside its
                    // punch, until the ring has reaped the entry.
                    tracing::warn!(
                        shard = self.shard,
                        ?run,
                        error = %e,
                        "punch submission failed: the run stays unused until the kernel has run it"
                    );
                    let op = still_queued.take().expect("checked");
                    st.queued_punches.push((run, op));
                    drop(st);
                    return Err(e);
                }
                Err(e) => {
                    // The kernel may have punched part of it (or nothing: a
                    // descriptor or the probe failed).
                    st.space.give_back(run, Trim::Punched);
                    drop(st);
                    return Err(e);
                }
            }
        }
        tracing::debug!(released_bytes = released, runs, "trimmed");
        Ok(released)
    }

    /// Submit the punch of the part of `run` below its file's reserved
    /// size: the op, the bytes it punches and the file's path. `Ok(None)`
    /// when there is nothing to punch (nothing reserved there, or the file
    /// system cannot punch, or cannot reserve again: then a hole could not
    /// be refilled, so none is made).
    async fn prepare_punch(
        &self,
        run: Run,
        can_punch: &mut HashMap<u32, bool>,
    ) -> Result<Option<(Op, u64, std::path::PathBuf)>> {
        if can_punch.get(&run.file) == Some(&false) {
            return Ok(None);
        }
        let Some(id) = self.data_files.borrow().get(run.file as usize).copied() else {
            // The file was never created (its first segment failed).
            return Ok(None);
        };
        let path = self.dir.join(data_file_name(run.file));
        if self.files.len_bytes(id)?.is_none() && std::fs::symlink_metadata(&path).is_err() {
            return Ok(None);
        }
        let lease = self.files.acquire_of(id, 0).await?;
        let reserved = self.files.reserved_bytes(id)?;
        let start = run.block as u64 * BLOCK_BYTES;
        let end =
            (start + run.blocks as u64 * BLOCK_BYTES).min(reserved / BLOCK_BYTES * BLOCK_BYTES);
        if end <= start {
            return Ok(None);
        }
        let ring = self.files.ring();
        if can_punch.get(&run.file).is_none() {
            // Probe once per file that blocks can be reserved again (mode 0
            // over a free block: at most allocates it).
            let ok = match ring
                .fallocate(lease.shared_fd(), sys::FALLOC_EXTEND, start, BLOCK_BYTES)
                .await
            {
                Ok(()) => true,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => true,
                Err(e) if sys::is_unsupported(&e) => false,
                Err(e) => return Err(Error::io("fallocate", Some(&path), e)),
            };
            can_punch.insert(run.file, ok);
            if !ok {
                return Ok(None);
            }
        }
        // Checked here, after the probe's await: nothing awaits between it
        // and the punch's submission.
        if self.mm.in_use(id, start, end) {
            // A pin still maps the run (a stale pin of a freed allocation):
            // a write through it into a hole would allocate blocks again
            // (SIGBUS on a full disk). A later `trim` punches it.
            tracing::debug!(
                file = run.file,
                first_block = run.block,
                "run under a pin: not punched"
            );
            return Ok(None);
        }
        // The ring holds the descriptor until the kernel is done, so the
        // lease can go.
        let op = ring.fallocate(
            lease.shared_fd(),
            sys::FALLOC_PUNCH_HOLE,
            start,
            end - start,
        );
        Ok(Some((op, end - start, path)))
    }

    /// Reserve `run` again when its state says it may hold a hole
    /// (`fallocate` mode 0 over the part below its file's reserved size;
    /// above it, the file grows when the run is pinned). Called by
    /// `new_segment` before a segment is published in the run; a no-op for
    /// [`Trim::Reserved`].
    ///
    /// # Errors
    ///
    /// [`Error::NoSpace`] when the file system is full; [`Error::Io`];
    /// the errors of opening the file. The caller gives the run back in
    /// state `trim`.
    pub(super) async fn reserve_trimmed(&self, run: Run, trim: Trim) -> Result<()> {
        if !trim.needs_reserve() {
            return Ok(());
        }
        let id = self.data_files.borrow()[run.file as usize];
        let path = self.dir.join(data_file_name(run.file));
        let lease = self.files.acquire_of(id, 0).await?;
        let reserved = self.files.reserved_bytes(id)?;
        let start = run.block as u64 * BLOCK_BYTES;
        let end = (start + run.blocks as u64 * BLOCK_BYTES).min(reserved);
        if end <= start {
            return Ok(());
        }
        // `trim` punches only where mode 0 works (it probes first): a file
        // system without it holds no hole of ours.
        self.reserve_blocks(&lease, path, start, end - start).await
    }

    /// Give `[start, start + len)` of the file of `lease` its blocks
    /// (`fallocate` mode 0 through the ring). A file system that cannot
    /// reserve counts as done: nothing can be reserved there, and its
    /// writes allocate as they go.
    ///
    /// # Errors
    ///
    /// [`Error::NoSpace`] (naming `path`) when the file system is full;
    /// [`Error::Io`].
    pub(super) async fn reserve_blocks(
        &self,
        lease: &crate::files::FileLease,
        path: std::path::PathBuf,
        start: u64,
        len: u64,
    ) -> Result<()> {
        let r = self
            .files
            .ring()
            .fallocate(lease.shared_fd(), sys::FALLOC_EXTEND, start, len)
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => Err(Error::NoSpace {
                path,
                requested_bytes: len,
            }),
            Err(e) if sys::is_unsupported(&e) => Ok(()),
            Err(e) => Err(Error::io("fallocate", Some(&path), e)),
        }
    }
}
