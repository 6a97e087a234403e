//! Durability of a data file: dirty marks, `sync` (whose failures are kept
//! and reported by every later sync, and whose dropped operations are
//! awaited by the next), and `make_entry_durable` for the file's folder
//! entry.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::{FileHandleRegistry, FileId};
use crate::error::{Error, Result};
use crate::io::Op;
use crate::sys;
use crate::wait::WaitList;

impl FileHandleRegistry {
    /// Bytes of `id` known to survive a power loss: its size when the last
    /// successful [`sync`](Self::sync) of it began (0 before one).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownFile`] for an id this registry never handed out.
    pub fn durable_bytes(&self, id: FileId) -> Result<u64> {
        let f = self.inner.borrow();
        f.entries
            .get(id.0 as usize)
            .map(|e| e.durable_len)
            .ok_or(Error::UnknownFile(id.0))
    }

    /// Record that `id` may hold changes that are not durable yet (a write
    /// through a mapping, an allocation in it). No syscall.
    #[inline]
    pub fn mark_dirty(&self, id: FileId) {
        if let Some(e) = self.inner.borrow().entries.get(id.0 as usize) {
            e.hot.dirty.set(true);
        }
    }

    /// Whether `id` may hold changes no completed `fdatasync` covers: the
    /// flag is cleared when a [`sync`](Self::sync) of it begins and set
    /// again if that sync fails, and the file counts as dirty while a sync
    /// of it is in flight.
    pub fn is_dirty(&self, id: FileId) -> bool {
        self.inner
            .borrow()
            .entries
            .get(id.0 as usize)
            .is_some_and(|e| e.hot.dirty.get() || e.syncing.get() > 0)
    }

    /// `fdatasync` (or `fsync`) the file through the control ring. A file
    /// that was never opened has nothing to sync, and sync never creates a
    /// file: a file removed behind the registry's back is an error.
    ///
    /// The kernel reports a write-back error to one `fdatasync` only, so a
    /// failure is kept: every later sync of the file returns it. A sync
    /// dropped before its operation completed leaves the operation to the
    /// next sync of the file, which awaits it and reports its failure. And
    /// since another call on the file may take the kernel's one report, a
    /// sync succeeds only once every call on the file begun before its own
    /// ended has completed without error (a task that keeps such a call's
    /// future without polling it holds this sync up).
    /// On success, [`durable_bytes`](Self::durable_bytes) covers the size the
    /// file had when the call began.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with the kernel's error (also that of an earlier failed
    /// sync of the file); [`Error::FdPressure`] /
    /// [`Error::TooManyOpenFiles`] when the file must be reopened and cannot.
    pub async fn sync(&self, id: FileId, datasync: bool) -> Result<()> {
        let path = self.path(id)?;
        let op = if datasync { "fdatasync" } else { "fsync" };
        // Syncs of the file dropped before they completed: their outcome
        // counts (a write-back error is reported to one call only).
        self.await_orphans(id, &path, op, true).await?;
        let len = {
            let f = self.inner.borrow();
            let e = &f.entries[id.0 as usize];
            if let Some(errno) = e.sync_failed {
                return Err(Error::io(
                    op,
                    Some(&path),
                    std::io::Error::from_raw_os_error(errno),
                ));
            }
            if !e.len_known {
                return Ok(());
            }
            e.len_bytes
        };
        let lease = self.lease(id, false)?;
        // Changes made from here on wait for a later sync; if this one fails
        // (or is dropped), the file stays dirty.
        let dirty = DirtyUnlessSynced::begin(self, id);
        let fsync = self
            .sync_ops
            .start(id, self.ring.fsync(lease.shared_fd(), datasync));
        self.finish(id, fsync, &path, op).await?;
        drop(lease);
        // Another call on the file that overlapped this one may have taken
        // the kernel's one report of a write-back error: this one's success
        // counts only with theirs.
        self.settle_file(id, &path, op).await?;
        dirty.synced();
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.durable_len = e.durable_len.max(len);
        Ok(())
    }

    /// Await a sync operation of `id`. Dropped before it completes, the
    /// operation is kept for the next sync of the file; a failure is
    /// remembered and reported by every later sync.
    async fn finish(&self, id: FileId, op: SyncOp, path: &Path, what: &'static str) -> Result<()> {
        let seq = op.seq;
        let mut orphan = Orphan {
            reg: self,
            id,
            op: Some(op),
        };
        let r = std::future::poll_fn(|cx| {
            std::pin::Pin::new(&mut orphan.op.as_mut().expect("polled until done").op).poll(cx)
        })
        .await;
        orphan.op = None;
        self.record_outcome(id, seq, &r);
        r.map_err(|e| Error::io(what, Some(path), e))
    }

    /// Record the outcome of sync operation `seq` of `id`: a failure is
    /// kept for the file (every later sync reports it), and the call no
    /// longer holds up later syncs.
    fn record_outcome(&self, id: FileId, seq: u64, r: &std::io::Result<()>) {
        if let Err(e) = r
            && let Some(errno) = e.raw_os_error()
        {
            self.inner.borrow_mut().entries[id.0 as usize].sync_failed = Some(errno);
        }
        self.sync_ops.end(seq);
    }

    /// Record the outcome of every kept call whose operation the kernel
    /// has completed, and let it go with the descriptor it holds (until
    /// then it keeps the file's fd busy: under `max_open_files` that may
    /// be the one another file needs). Checked without waiting and without
    /// registering a waker. Whether any was let go.
    pub(super) fn collect_orphans(&self) -> bool {
        let done: Vec<(FileId, SyncOp, std::io::Result<()>)> = {
            let mut all = self.orphans.borrow_mut();
            let mut done = Vec::new();
            let mut i = 0;
            while i < all.len() {
                match all[i].1.op.try_complete() {
                    Some(r) => {
                        let (id, op) = all.remove(i);
                        done.push((id, op, r));
                    }
                    None => i += 1,
                }
            }
            done
        };
        for (id, op, r) in &done {
            self.record_outcome(*id, op.seq, r);
        }
        !done.is_empty()
    }

    /// Await the kept calls of `id` whose sync was dropped, in the order
    /// they were kept; each failure is recorded for the file. With
    /// `stop_at_failure`, return the first one's error (the calls after it
    /// stay kept for the next sync). Each stays kept until its outcome
    /// counted, also if this is dropped while it waits.
    async fn await_orphans(
        &self,
        id: FileId,
        path: &Path,
        what: &'static str,
        stop_at_failure: bool,
    ) -> Result<()> {
        loop {
            let orphan = {
                let mut all = self.orphans.borrow_mut();
                all.iter()
                    .position(|(f, _)| *f == id)
                    .map(|i| all.remove(i).1)
            };
            let Some(o) = orphan else {
                return Ok(());
            };
            let r = self.finish(id, o, path, what).await;
            // Its descriptor is let go now: a growth waiting for one
            // (`Ring::released`) tries again.
            self.ring.wake_released();
            if stop_at_failure {
                r?;
            }
        }
    }

    /// Wait until every `fsync`/`fdatasync` of `id` that began before this
    /// call has completed and its outcome is recorded (a dropped call is
    /// awaited here); then the kept failure of the file, if any.
    ///
    /// Waits for calls other tasks await: a task that keeps such a call's
    /// future without polling it holds this up.
    async fn settle_file(&self, id: FileId, path: &Path, what: &'static str) -> Result<()> {
        let upto = self.sync_ops.next.get();
        loop {
            // Calls dropped before (or while) this waits: nobody else
            // awaits them. (Their failures are recorded for the file.)
            self.await_orphans(id, path, what, false).await?;
            let earlier = self
                .sync_ops
                .running
                .borrow()
                .range(..upto)
                .any(|(_, f)| *f == id);
            if !earlier {
                break;
            }
            // Woken when a call's outcome is recorded or a call is dropped.
            self.sync_ops.done.wait().await;
        }
        match self.inner.borrow().entries[id.0 as usize].sync_failed {
            Some(errno) => Err(Error::io(
                what,
                Some(path),
                std::io::Error::from_raw_os_error(errno),
            )),
            None => Ok(()),
        }
    }

    /// Make the directory entry of `id` durable: open (creating) the file if
    /// it was never opened, then fsync its folder through the control ring,
    /// unless a fsync of that folder already succeeded since the file was
    /// created or found. A file left by a crash between its creation and
    /// the folder's fsync is covered the first time it is used. Returns
    /// whether a fsync was made; after a failed one the entry stays not
    /// durable and the next call tries again.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); [`Error::Io`] when the folder cannot
    /// be opened or synced.
    pub async fn make_entry_durable(&self, id: FileId) -> Result<bool> {
        let path = self.path(id)?;
        if self.inner.borrow().entries[id.0 as usize].dir_durable {
            return Ok(false);
        }
        if self.len_bytes(id)?.is_none() {
            drop(self.acquire_of(id, 0).await?);
        }
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // An allocator's files are in its owner's folder, whatever its path
        // names now. (Opened again, not duplicated: a duplicate of the
        // shard lock's descriptor, held by the ring until the fsync is
        // reaped, would keep the shard locked after it is closed.)
        let fd = match (self.owner(id)?, self.base(id)) {
            (Some(o), _) => sys::reopen_dir(o.folder()),
            (None, Some((dir, rel))) => match rel.parent() {
                Some(p) if !p.as_os_str().is_empty() => sys::open_dir_at(dir.as_fd(), p),
                _ => sys::reopen_dir(dir.as_fd()),
            },
            (None, None) => sys::open_dir(&folder),
        }
        .map_err(|e| Error::io("open", Some(&folder), e))?;
        self.ring
            .fsync(&Rc::new(fd), false)
            .await
            .map_err(|e| Error::io("fsync", Some(&folder), e))?;
        let mut f = self.inner.borrow_mut();
        f.entries[id.0 as usize].dir_durable = true;
        f.stats.dir_syncs += 1;
        Ok(true)
    }
}

/// An `fsync`/`fdatasync` operation, numbered in the order they began
/// ([`SyncOps`]).
pub(super) struct SyncOp {
    seq: u64,
    op: Op,
}

/// The sync operations of a registry that began and whose outcome is not
/// recorded yet (see `FileHandleRegistry::settle_file`).
#[derive(Default)]
pub(super) struct SyncOps {
    next: Cell<u64>,
    /// Each with its file.
    running: RefCell<BTreeMap<u64, FileId>>,
    /// Woken whenever one's outcome is recorded.
    done: Rc<WaitList>,
}

impl SyncOps {
    fn start(&self, id: FileId, op: Op) -> SyncOp {
        let seq = self.next.get();
        self.next.set(seq + 1);
        self.running.borrow_mut().insert(seq, id);
        SyncOp { seq, op }
    }

    fn end(&self, seq: u64) {
        self.running.borrow_mut().remove(&seq);
        self.done.wake_all();
    }
}

/// A sync operation being awaited: handed to the registry if dropped first.
struct Orphan<'a> {
    reg: &'a FileHandleRegistry,
    id: FileId,
    op: Option<SyncOp>,
}

impl Drop for Orphan<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.reg.keep_orphan(self.id, op);
        }
    }
}

impl FileHandleRegistry {
    /// Keep a sync of `id` that its task stopped awaiting for the file's
    /// next sync, detached from that task (see `Op::detach`).
    fn keep_orphan(&self, id: FileId, mut op: SyncOp) {
        op.op.detach();
        self.orphans.borrow_mut().push((id, op));
        // A sync of the file waiting for it awaits it now.
        self.sync_ops.done.wake_all();
    }
}

/// Clears a file's dirty flag while its sync runs; sets it again unless
/// the sync completed.
struct DirtyUnlessSynced<'a> {
    reg: &'a FileHandleRegistry,
    id: FileId,
    synced: bool,
}

impl<'a> DirtyUnlessSynced<'a> {
    fn begin(reg: &'a FileHandleRegistry, id: FileId) -> DirtyUnlessSynced<'a> {
        if let Some(e) = reg.inner.borrow().entries.get(id.0 as usize) {
            e.hot.dirty.set(false);
            e.syncing.set(e.syncing.get() + 1);
        }
        DirtyUnlessSynced {
            reg,
            id,
            synced: false,
        }
    }

    fn synced(mut self) {
        self.synced = true;
    }
}

impl Drop for DirtyUnlessSynced<'_> {
    fn drop(&mut self) {
        if let Some(e) = self.reg.inner.borrow().entries.get(self.id.0 as usize) {
            e.syncing.set(e.syncing.get().saturating_sub(1));
        }
        if !self.synced {
            self.reg.mark_dirty(self.id);
        }
    }
}
