//! Durability: `sync` (fdatasync of every file of the shard) and the poison
//! that a failed sync leaves.

#![warn(clippy::cast_possible_truncation)]

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use futures::future::join_all;
use tracing::Instrument;

use super::SegmentAllocator;
use super::space::Run;
use crate::error::{Error, Result};
use crate::files::FileId;
use crate::format;
use crate::sys;
use crate::wait::WaitList;

impl SegmentAllocator {
    /// Make every `allocate` and `free` that returned before this call, and
    /// every write through a pin made before it, durable against power loss:
    /// `fdatasync` through the control ring (concurrently) of the data files
    /// that may hold changes (a writable pin was made in them, or one is
    /// held now, or they grew) and of the metadata if it changed, and of the
    /// shard folder (a plain `fsync` on the shard's thread) when files were
    /// created. When it completes, the slots freed and the segments released
    /// before it began can be reused.
    ///
    /// Overlapping calls are safe: each covers what was released before it
    /// began, and each reports success only once every sync that began
    /// before it has completed without error, and every `fdatasync` of a
    /// file it syncs begun before its own ended (another task's, such as a
    /// new segment's metadata sync, or one of a dropped call) has completed
    /// without error: the kernel reports a write-back error to one
    /// `fdatasync` only. So a sync waits for those: do not keep a
    /// started `sync` or `allocate` future unpolled while a task awaits a
    /// sync (dropping it is fine).
    ///
    /// # Errors
    ///
    /// The first io error. A failed sync poisons the allocator: every later
    /// write, and a sync that began after it, returns [`Error::Poisoned`]
    /// (or the failed file's error) until the directory is reopened.
    pub async fn sync(&self) -> Result<()> {
        let span = tracing::debug_span!("sync", shard = self.shard);
        self.sync_inner().instrument(span).await
    }

    async fn sync_inner(&self) -> Result<()> {
        self.st.borrow_mut().fresh.begin_sync();
        if self.poisoned.get() {
            return Err(Error::Poisoned { shard: self.shard });
        }
        if self.files.is_read_only() {
            return Ok(());
        }
        // Taken before anything is read: a later sync waits for this one.
        let ticket = self.syncs.begin();
        let meta_changes = self.meta_changes();
        // This sync covers what was released before it began; releases made
        // while it runs wait for a later one. Overlapping syncs each cover
        // their own part.
        let mut covered = Covered::take(self);
        let new_files = covered.released.as_ref().is_some_and(|r| r.new_files);
        let meta_reserved = self.files.reserved_bytes(self.meta_file)?;
        let with_meta = new_files
            || self.files.is_dirty(self.meta_file)
            || self.syncs.meta_synced_at.get() != Some(meta_changes)
            || !covered.released.as_ref().is_none_or(Released::is_empty);
        let mut r = self.sync_files(with_meta).await;
        if r.is_ok() && new_files {
            // The folder the shard locked, whatever its path names now.
            r = sys::reopen_dir(self.shard_lock.folder())
                .and_then(|fd| sys::fsync(fd.as_raw_fd(), false))
                .map_err(|e| Error::io("fsync", Some(&self.dir), e));
        }
        if let Err(e) = r {
            if !is_io_failure(&e) {
                // Reported without poisoning: what this sync covered waits
                // for the next one.
                return Err(e);
            }
            // Nothing it covered is reused: the shard is poisoned.
            covered.released = None;
            return Err(self.poison(e));
        }
        if let Err(e) = self.check_not_removed() {
            // What it wrote no path reaches: as a failed write-back, the
            // shard is poisoned and nothing it covered is reused.
            covered.released = None;
            return Err(self.poison(e));
        }
        // Every sync that began before this one must have completed without
        // error: the kernel reports a write-back error to one `fdatasync` of
        // a file only, so this one's success alone proves nothing.
        // (And each file's sync above counted only once every call on the
        // file that overlapped it succeeded: another task's, such as a new
        // segment's metadata sync, or one of a sync that was dropped.)
        ticket.earlier_done().await;
        if self.poisoned.get() {
            // Nothing it covered is reused.
            covered.released = None;
            return Err(Error::Poisoned { shard: self.shard });
        }
        if with_meta {
            self.syncs.meta_synced_at.set(Some(meta_changes));
        }
        self.advance_durable_generation(meta_changes.3);
        let released = covered.released.take().expect("taken once");
        self.reuse(released);
        drop(covered);
        let mut st = self.st.borrow_mut();
        st.stats.syncs += 1;
        st.stats.last_sync_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.meta_durable_bytes
            .set(self.meta_durable_bytes.get().max(meta_reserved));
        Ok(())
    }

    /// [`Error::Io`] when the shard's folder was removed while open: what a
    /// sync wrote is in files no path reaches, and goes with them.
    fn check_not_removed(&self) -> Result<()> {
        let gone = sys::is_unlinked(self.shard_lock.folder())
            .map_err(|e| Error::io("fstat", Some(&self.dir), e))?;
        if gone {
            return Err(Error::io(
                "sync",
                Some(&self.dir),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the shard's folder was removed while open: nothing written to it can be found again",
                ),
            ));
        }
        Ok(())
    }

    /// After a completed sync that began when `next` was the next segment
    /// generation: every segment below it has its data file's growth
    /// durable. Recorded in the metadata, which is not synced for it: it
    /// reaches the disk with the next sync that writes the metadata back (or
    /// the kernel's write-back). Any value it held is true, and recovery
    /// uses it only to tell a data file cut short (refused) from growth a
    /// power loss took (dropped), so a stale value on disk only makes the
    /// newest segments' truncation a warning instead of a refusal.
    fn advance_durable_generation(&self, next: u32) {
        let word = self.meta.word(format::DURABLE_GEN_OFFSET);
        let on_disk = format::decode_counter(word.load(Ordering::Relaxed)).unwrap_or(0);
        if on_disk == 0 || format::issued_later(next, on_disk) {
            word.store(format::encode_counter(next), Ordering::Release);
        }
    }

    /// A count that changes whenever the metadata may have changed: slots
    /// taken and freed, roots set, segments created. Only `allocs` ever
    /// goes down (an allocate undone by `release_slot`, which marks the
    /// metadata file dirty for that reason).
    fn meta_changes(&self) -> MetaChanges {
        let st = self.st.borrow();
        (
            st.stats.allocs,
            st.stats.frees,
            st.root_seq,
            st.next_generation,
        )
    }

    /// The data files that may hold changes no sync began after: marked
    /// dirty (a writable pin made in it, a growth, a failed or dropped
    /// sync), or with a window in use now; and those of the latter (a pin
    /// held across this sync may write at any moment after it began).
    fn dirty_data_files(&self) -> (Vec<FileId>, Vec<FileId>) {
        let (mut dirty, mut in_use) = (Vec::new(), Vec::new());
        for &id in self.data_files.borrow().iter() {
            if self.mm.in_use(id, 0, u64::MAX) {
                in_use.push(id);
                dirty.push(id);
            } else if self.files.is_dirty(id) {
                dirty.push(id);
            }
        }
        (dirty, in_use)
    }

    /// `fdatasync` the dirty data files (and the metadata if `with_meta`)
    /// through the control ring. The first error, or
    /// [`Error::FdPressure`] when a file found no descriptor.
    async fn sync_files(&self, with_meta: bool) -> Result<()> {
        let (mut ids, in_use) = self.dirty_data_files();
        // A file with a pin held across this sync stays dirty for the next
        // one, whatever this one's outcome.
        let _pinned = MarkDirtyOnDrop {
            alloc: self,
            ids: in_use,
        };
        if with_meta {
            ids.push(self.meta_file);
        }
        self.syncs
            .data_file_syncs
            .set(self.syncs.data_file_syncs.get() + ids.len() as u64 - u64::from(with_meta));
        // At most half the descriptor cap in flight at once (each sync holds
        // a lease on its fd until the kernel is done); a file that still
        // finds no descriptor is retried alone, after the others finished.
        let batch = (self.files.max_open_files() / 2).max(1);
        let mut first_err = None;
        let mut retry = Vec::new();
        for chunk in ids.chunks(batch) {
            let results = join_all(chunk.iter().map(|&id| self.files.sync(id, true))).await;
            for (&id, r) in chunk.iter().zip(results) {
                match r {
                    Ok(()) => {}
                    Err(Error::FdPressure { .. }) => retry.push(id),
                    // An I/O failure wins over one that wrote nothing back.
                    Err(e) => {
                        if first_err.as_ref().is_none_or(|f| !is_io_failure(f)) {
                            first_err = Some(e);
                        }
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        for id in retry {
            self.files.sync(id, true).await?;
        }
        Ok(())
    }

    /// Releases made durable by a completed sync: their slots, entries and
    /// runs can be handed out again.
    pub(super) fn reuse(&self, released: Released) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        for (seg_id, slot) in released.slots {
            let seg = st.segments[seg_id as usize]
                .as_mut()
                .expect("a segment with held slots is not released");
            seg.unhold(slot);
            if !seg.in_avail {
                seg.in_avail = true;
                st.avail[seg.class_id() as usize].push(seg_id);
            }
            if seg.held == 0 {
                self.release_if_spare(st, seg_id);
            }
        }
        st.free_entries.extend(released.entries);
        for run in released.runs {
            st.space.free(run);
        }
    }

    /// [`poison`](Self::poison) for an I/O failure of a sync; the error
    /// alone for one that wrote nothing back (no descriptor to sync with).
    pub(super) fn poison_if_io(&self, e: Error) -> Error {
        if is_io_failure(&e) { self.poison(e) } else { e }
    }

    /// Refuse every later write: a failed fdatasync cannot be retried safely
    /// (the kernel may have dropped the dirty pages it could not write).
    pub(super) fn poison(&self, e: Error) -> Error {
        tracing::error!(shard = self.shard, error = %e, "sync failed; shard poisoned until reopened");
        self.poisoned.set(true);
        self.writable.set(false);
        e
    }

    /// Whether an earlier sync failed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get()
    }
}

/// Whether a sync's error may mean that written bytes were lost (an I/O
/// failure), as opposed to a call that could not start for want of a
/// descriptor: nothing was written back, nothing was lost, and a later sync
/// can try again.
fn is_io_failure(e: &Error) -> bool {
    !matches!(e, Error::FdPressure { .. } | Error::TooManyOpenFiles { .. })
}

/// What was released since the last sync began: not reused before a sync
/// makes the release durable (a power loss could otherwise bring back an
/// allocation whose bytes a newer one overwrote).
#[derive(Default)]
pub(super) struct Released {
    /// Freed slots, `(segment, slot)`: still held in memory.
    pub(super) slots: Vec<(u32, u32)>,
    /// Directory entries of released segments.
    pub(super) entries: Vec<u32>,
    /// Runs of released segments.
    pub(super) runs: Vec<Run>,
    /// Whether data files were created.
    pub(super) new_files: bool,
}

impl Released {
    fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.entries.is_empty() && self.runs.is_empty() && !self.new_files
    }

    fn append(&mut self, mut other: Released) {
        self.slots.append(&mut other.slots);
        self.entries.append(&mut other.entries);
        self.runs.append(&mut other.runs);
        self.new_files |= other.new_files;
    }
}

/// The releases a running sync covers: handed back to the pending ones if
/// the sync is dropped or reports descriptor pressure. Its entries count as
/// quarantined while it runs (`State::covered_entries`).
struct Covered<'a> {
    alloc: &'a SegmentAllocator,
    released: Option<Released>,
    entries: usize,
}

impl<'a> Covered<'a> {
    /// Take what was released so far.
    fn take(alloc: &'a SegmentAllocator) -> Covered<'a> {
        let mut st = alloc.st.borrow_mut();
        let released = std::mem::take(&mut st.released);
        let entries = released.entries.len();
        st.covered_entries += entries;
        Covered {
            alloc,
            released: Some(released),
            entries,
        }
    }
}

impl Drop for Covered<'_> {
    fn drop(&mut self) {
        if self.entries == 0 && self.released.is_none() {
            return;
        }
        let mut st = self.alloc.st.borrow_mut();
        // Reused by now (taken), handed back to the pending ones, or gone
        // with a poisoned shard: no longer covered by a running sync.
        st.covered_entries -= self.entries;
        if let Some(r) = self.released.take() {
            st.released.append(r);
        }
    }
}

/// Marks files dirty when dropped (after the sync that cleared their flag).
struct MarkDirtyOnDrop<'a> {
    alloc: &'a SegmentAllocator,
    ids: Vec<FileId>,
}

impl Drop for MarkDirtyOnDrop<'_> {
    fn drop(&mut self) {
        for &id in &self.ids {
            self.alloc.files.mark_dirty(id);
        }
    }
}

/// [`SegmentAllocator::meta_changes`]: allocs, frees, root sequence, next
/// generation.
type MetaChanges = (u64, u64, u64, u32);

/// The order of overlapping syncs: each takes a sequence number when it
/// begins, and reports success only once every sync that began before it
/// has completed (a failed one poisons the shard first).
#[derive(Default)]
pub(super) struct SyncOrder {
    next_seq: Cell<u64>,
    /// Syncs begun and not completed (nor dropped).
    running: RefCell<BTreeSet<u64>>,
    /// Woken whenever a sync completes or is dropped.
    done: Rc<WaitList>,
    /// [`SegmentAllocator::meta_changes`] when the last successful sync
    /// that covered the metadata began.
    meta_synced_at: Cell<Option<MetaChanges>>,
    /// Data file `fdatasync`s started by syncs (see [`AllocStats`]).
    ///
    /// [`AllocStats`]: super::AllocStats
    pub(super) data_file_syncs: Cell<u64>,
}

impl SyncOrder {
    fn begin(&self) -> Ticket<'_> {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        self.running.borrow_mut().insert(seq);
        Ticket { order: self, seq }
    }
}

/// A running sync's place in the [`SyncOrder`]; leaves it when dropped.
struct Ticket<'a> {
    order: &'a SyncOrder,
    seq: u64,
}

impl Ticket<'_> {
    /// Wait until no sync that began before this one is still running.
    async fn earlier_done(&self) {
        loop {
            let first = self.order.running.borrow().first().copied();
            if first.is_none_or(|s| s >= self.seq) {
                return;
            }
            self.order.done.wait().await;
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.order.running.borrow_mut().remove(&self.seq);
        self.order.done.wake_all();
    }
}
