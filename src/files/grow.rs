//! Growth of a data file and reservation of its blocks: `grow` (through
//! `fallocate`, or `ftruncate` where the file system cannot allocate),
//! the refresh of another shard's file, and `mark_reserved` after a sparse
//! range was prefaulted.
//!
//! One growth per file at a time: later callers wait on the file's wait
//! list and re-check. `reserved` never exceeds the file's size.

use std::path::PathBuf;

use tracing::Instrument;

use super::{FileHandleRegistry, FileId, FileLease};
use crate::error::{Error, Result};
use crate::sys::{self, OpenMode};

/// How a growth request was satisfied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The blocks up to the requested size are allocated (`fallocate`):
    /// writes cannot fail for lack of space.
    Reserved,
    /// The file system cannot `fallocate`; the file was extended with
    /// `ftruncate` and `[from, to)` is a hole. The caller must prefault it
    /// with `MADV_POPULATE_WRITE` and then call
    /// [`FileHandleRegistry::mark_reserved`].
    Sparse {
        /// Start of the hole.
        from: u64,
        /// End of the hole (the new file size).
        to: u64,
    },
}

impl FileHandleRegistry {
    /// Like [`acquire`](Self::acquire), and say how the growth was done.
    ///
    /// # Errors
    ///
    /// As [`FileHandleRegistry::acquire`].
    pub async fn grow(&self, id: FileId, min_size: u64) -> Result<(FileLease, Reservation)> {
        self.refuse_owned(id)?;
        self.grow_of(id, min_size).await
    }

    /// [`grow`](Self::grow), of any file (an allocator's own included).
    pub(crate) async fn grow_of(
        &self,
        id: FileId,
        min_size: u64,
    ) -> Result<(FileLease, Reservation)> {
        // A closed allocator's file is not opened or grown again: its shard
        // may be open elsewhere.
        self.owner(id)?;
        loop {
            let lease = match self.lease(id, true) {
                // Operations dropped mid-flight keep their descriptors until
                // the kernel completes them, and the ring then releases them
                // by itself: wait for a release, then try again.
                Err(e @ Error::FdPressure { .. }) => match self.ring.released() {
                    Some(released) => {
                        released.await;
                        continue;
                    }
                    None => return Err(e),
                },
                r => r?,
            };
            if self.inner.borrow().entries[id.0 as usize].foreign {
                return self.refresh_foreign(lease, id, min_size);
            }
            let waiters = {
                let mut f = self.inner.borrow_mut();
                let e = &mut f.entries[id.0 as usize];
                if e.hot.reserved.get() >= min_size {
                    return Ok((lease, Reservation::Reserved));
                }
                if !e.fallocate_ok && e.len_bytes >= min_size && !e.growing {
                    // Already extended (sparse); the caller prefaults.
                    let from = e.hot.reserved.get();
                    return Ok((lease, Reservation::Sparse { from, to: min_size }));
                }
                if e.growing {
                    Some(e.grow_waiters.clone())
                } else {
                    e.growing = true;
                    None
                }
            };
            if let Some(w) = waiters {
                drop(lease);
                w.wait().await;
                continue;
            }
            let guard = GrowGuard { reg: self, id };
            let res = self.grow_locked(&lease, id, min_size).await;
            drop(guard);
            return res.map(|r| (lease, r));
        }
    }

    async fn grow_locked(
        &self,
        lease: &FileLease,
        id: FileId,
        min_size: u64,
    ) -> Result<Reservation> {
        let span = tracing::debug_span!("grow", file = id.0, to = min_size);
        self.grow_locked_inner(lease, id, min_size)
            .instrument(span)
            .await
    }

    async fn grow_locked_inner(
        &self,
        lease: &FileLease,
        id: FileId,
        min_size: u64,
    ) -> Result<Reservation> {
        if self.mode == OpenMode::ReadOnly {
            return Err(Error::ReadOnly("cannot grow a file opened read-only"));
        }
        let (path, reserved, len, fallocate_ok) = {
            let f = self.inner.borrow();
            let e = &f.entries[id.0 as usize];
            (
                e.path.clone(),
                e.hot.reserved.get(),
                e.len_bytes,
                e.fallocate_ok,
            )
        };
        if fallocate_ok {
            let r = self
                .ring
                .fallocate(
                    lease.shared_fd(),
                    sys::FALLOC_EXTEND,
                    reserved,
                    min_size - reserved,
                )
                .await;
            match r {
                Ok(()) => {
                    let mut f = self.inner.borrow_mut();
                    let e = &mut f.entries[id.0 as usize];
                    e.hot.dirty.set(true);
                    e.hot.reserved.set(e.hot.reserved.get().max(min_size));
                    e.len_bytes = e.len_bytes.max(min_size);
                    f.stats.grows += 1;
                    f.stats.grown_bytes += min_size - reserved;
                    return Ok(Reservation::Reserved);
                }
                Err(e) if sys::is_unsupported(&e) => {
                    tracing::info!(file = %path.display(), "fallocate unsupported; growing with ftruncate + MADV_POPULATE_WRITE");
                    self.inner.borrow_mut().entries[id.0 as usize].fallocate_ok = false;
                }
                Err(e) => return Err(self.fallocate_failed(lease, id, min_size, path, e)),
            }
        }
        // No fallocate: extend the size only; the caller prefaults the hole.
        let from = reserved;
        if len < min_size {
            let mut interrupted = 0;
            loop {
                let mut op = OutlivedByNone(Some(self.ring.ftruncate(lease.shared_fd(), min_size)));
                let r = op.0.as_mut().expect("just set").await;
                let queued = op.0.as_ref().is_some_and(|o| o.left_queued());
                if !queued {
                    op.0 = None;
                }
                // Waits for one left queued by a failed submission.
                drop(op);
                match r {
                    // The ring does not run a queued `ftruncate` again
                    // after `EINTR`; it is done now, so another can go.
                    Err(e)
                        if queued
                            && e.raw_os_error() == Some(nix::libc::EINTR)
                            && interrupted < crate::io::MAX_EINTR_RETRIES =>
                    {
                        interrupted += 1;
                    }
                    r => {
                        r.map_err(|e| Error::io("ftruncate", Some(&path), e))?;
                        break;
                    }
                }
            }
        }
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.hot.dirty.set(true);
        e.len_bytes = e.len_bytes.max(min_size);
        f.stats.grows += 1;
        f.stats.grown_bytes += min_size.saturating_sub(len);
        Ok(Reservation::Sparse { from, to: min_size })
    }

    /// The error of a failed growth `fallocate`. A partial fallocate may
    /// have extended the file: what it extended is allocated, so it counts
    /// as reserved.
    fn fallocate_failed(
        &self,
        lease: &FileLease,
        id: FileId,
        min_size: u64,
        path: PathBuf,
        e: std::io::Error,
    ) -> Error {
        let mut f = self.inner.borrow_mut();
        let en = &mut f.entries[id.0 as usize];
        en.hot.dirty.set(true);
        let reserved = en.hot.reserved.get();
        if let Ok(sz) = sys::file_size(lease.fd()) {
            en.len_bytes = en.len_bytes.max(sz);
            en.hot.reserved.set(reserved.max(sz.min(min_size)));
        }
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            return Error::NoSpace {
                path,
                requested_bytes: min_size - reserved,
            };
        }
        Error::io("fallocate", Some(&path), e)
    }

    fn refresh_foreign(
        &self,
        lease: FileLease,
        id: FileId,
        min_size: u64,
    ) -> Result<(FileLease, Reservation)> {
        let path = self.path(id)?;
        let size = sys::file_size(lease.fd()).map_err(|e| Error::io("fstat", Some(&path), e))?;
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.len_bytes = e.len_bytes.max(size);
        e.hot.reserved.set(e.hot.reserved.get().max(size));
        if e.hot.reserved.get() >= min_size {
            Ok((lease, Reservation::Reserved))
        } else {
            Err(Error::InvalidRange {
                file_id: id.0,
                offset: size,
                len_bytes: min_size - size,
                reason: "beyond the end of another shard's data file",
            })
        }
    }

    /// Record that `[.., to)` of a sparse file has been prefaulted and is now
    /// backed by blocks (see [`Reservation::Sparse`]). An allocator's file is
    /// left alone: its allocator reserves what it uses itself.
    pub fn mark_reserved(&self, id: FileId, to: u64) {
        if !self.is_owned(id) {
            self.note_reserved(id, to);
        }
    }

    /// [`mark_reserved`](Self::mark_reserved), of any file.
    pub(crate) fn note_reserved(&self, id: FileId, to: u64) {
        let f = self.inner.borrow();
        if let Some(e) = f.entries.get(id.0 as usize) {
            let to = to.min(e.len_bytes);
            e.hot.reserved.set(e.hot.reserved.get().max(to));
        }
    }
}

/// A growth `ftruncate` that must not outlive its growth: unlike an
/// allocating `fallocate`, it can also shrink the file, so one that landed
/// after a later, larger growth would cut the file back below slots handed
/// out since. Dropped while the kernel may still run it (the growth was
/// dropped mid-flight, or the submission failed after the entry was
/// queued), it blocks the thread until the kernel is done: an extending
/// `ftruncate` changes the size only, and takes microseconds.
struct OutlivedByNone(Option<crate::io::Op>);

impl Drop for OutlivedByNone {
    fn drop(&mut self) {
        if let Some(op) = &self.0
            && let Err(e) = op.wait_blocking()
        {
            tracing::error!(error = %e, "a growth ftruncate may still run: the file may shrink behind a later growth");
        }
    }
}

struct GrowGuard<'a> {
    reg: &'a FileHandleRegistry,
    id: FileId,
}

impl Drop for GrowGuard<'_> {
    fn drop(&mut self) {
        let w = {
            let mut f = self.reg.inner.borrow_mut();
            let e = &mut f.entries[self.id.0 as usize];
            e.growing = false;
            e.grow_waiters.clone()
        };
        w.wake_all();
    }
}
