//! Durability: `sync` (fdatasync of every file of the shard) and the poison
//! that a failed sync leaves.

#![warn(clippy::cast_possible_truncation)]

use futures::future::join_all;
use tracing::Instrument;

use super::SegmentAllocator;
use super::space::Run;
use crate::error::{Error, Result};
use crate::files::FileId;

impl SegmentAllocator {
    /// Make every `allocate` and `free` that returned before this call, and
    /// every write through a pin made before it, durable against power loss:
    /// `fdatasync` of the data files and the metadata through the control
    /// ring (concurrently), and of the shard folder (a plain `fsync` on the
    /// shard's thread) when files were created. When it completes, the slots
    /// freed and the segments released before it began can be reused.
    /// Overlapping calls are safe: each covers what was released before it
    /// began, and one that completes after an overlapping one failed fails
    /// too.
    ///
    /// # Errors
    ///
    /// The first io error. A failed sync poisons the allocator: every later
    /// write, and a sync overlapping it, returns [`Error::Poisoned`] until
    /// the directory is reopened.
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
        // This sync covers what was released before it began; releases made
        // while it runs wait for a later one. Overlapping syncs each cover
        // their own part.
        let mut covered = Covered {
            alloc: self,
            released: Some(std::mem::take(&mut self.st.borrow_mut().released)),
        };
        let new_files = covered.released.as_ref().is_some_and(|r| r.new_files);
        let meta_reserved = self.files.reserved_bytes(self.meta_file)?;
        let mut r = self.sync_files().await;
        if r.is_ok() && new_files {
            r = crate::datadir::sync_dir(&self.dir);
        }
        match r {
            Ok(()) => {}
            // Not an I/O failure: report it without poisoning (what this
            // sync covered waits for the next one).
            Err(e @ Error::FdPressure { .. }) => return Err(e),
            Err(e) => {
                // Nothing it covered is reused: the shard is poisoned.
                covered.released = None;
                return Err(self.poison(e));
            }
        }
        if self.poisoned.get() {
            // A sync that overlapped this one failed: the kernel reports a
            // write-back error to one `fdatasync` of a file only, so this
            // one's success proves nothing. Nothing it covered is reused.
            covered.released = None;
            return Err(Error::Poisoned { shard: self.shard });
        }
        let released = covered.released.take().expect("taken once");
        self.reuse(released);
        let mut st = self.st.borrow_mut();
        st.stats.syncs += 1;
        st.stats.last_sync_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.meta_durable_bytes
            .set(self.meta_durable_bytes.get().max(meta_reserved));
        Ok(())
    }

    /// `fdatasync` every file of the shard through the control ring. The
    /// first error, or [`Error::FdPressure`] when a file found no descriptor.
    async fn sync_files(&self) -> Result<()> {
        let mut ids: Vec<FileId> = self.data_files.borrow().clone();
        ids.push(self.meta_file);
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
                    Err(e) => {
                        first_err.get_or_insert(e);
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
                st.avail[seg.class_id as usize].push(seg_id);
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
    fn append(&mut self, mut other: Released) {
        self.slots.append(&mut other.slots);
        self.entries.append(&mut other.entries);
        self.runs.append(&mut other.runs);
        self.new_files |= other.new_files;
    }
}

/// The releases a running sync covers: handed back to the pending ones if
/// the sync is dropped or reports descriptor pressure.
struct Covered<'a> {
    alloc: &'a SegmentAllocator,
    released: Option<Released>,
}

impl Drop for Covered<'_> {
    fn drop(&mut self) {
        if let Some(r) = self.released.take() {
            self.alloc.st.borrow_mut().released.append(r);
        }
    }
}
