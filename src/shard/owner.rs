//! Cross-shard access through the owner: closures run on another shard
//! ([`Shard::submit_to`], [`Shard::run_on_owner`]), reads and writes of
//! another shard's allocation, [`Shard::pin_foreign`], forwarded frees and
//! the task that applies the frees other shards forward to this one.

use std::future::Future;
use std::rc::Weak;

use futures::channel::oneshot;

use super::{Shard, ShardInner, job};
use crate::error::{Error, Result};
use crate::files::FileId;
use crate::format::Handle;
use crate::mapping::{Access, PinGuard};
use crate::mesh::Parcel;

impl Shard {
    /// Send every buffered cross-shard free to its owner now and wait until
    /// each owner has applied every free this shard acknowledged before the
    /// call (without this, they are sent when a batch fills or after a few
    /// executor turns). An owner's next `sync` then makes them durable.
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] naming an owner that is gone, or
    /// [`Error::Poisoned`] naming one that a failed sync poisoned (it
    /// applies no free, forwarded or its own, until it is reopened); the
    /// other owners are still flushed. Else [`Error::FreesRejected`] when
    /// owners rejected frees this shard forwarded (a double free, a stale
    /// or forged handle) that no earlier `flush_frees` reported: how many,
    /// and the first one's error. Every free was applied or rejected then;
    /// a rejected one changed nothing. (Rejections are reported by a
    /// `flush_frees` that reaches every owner: while one is gone, each
    /// returns `ShardGone`, and they wait.)
    ///
    /// ```no_run
    /// # async fn f(shard: &segalloc::Shard, h: segalloc::Handle) -> segalloc::Result<()> {
    /// shard.free(h)?; // another shard's handle: queued for its owner
    /// shard.free(h)?; // queued too: only the owner knows it is freed
    /// match shard.flush_frees().await {
    ///     Err(segalloc::Error::FreesRejected { count, first }) => {
    ///         eprintln!("{count} frees rejected; the first: {first:?}");
    ///     }
    ///     other => other?,
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn flush_frees(&self) -> Result<()> {
        match self.inner.mesh.get() {
            Some(m) => {
                m.clone().flush().await?;
                m.take_rejected().map_or(Ok(()), Err)
            }
            None => Ok(()),
        }
    }

    /// Apply every forwarded free that has arrived (the drain task does this
    /// on its own).
    pub fn drain_frees(&self) {
        if let Some(m) = self.inner.mesh.get() {
            for (from, p) in m.take_ready() {
                self.inner.apply(from, p);
            }
        }
    }

    /// Stop exchanging cross-shard frees, losing none: refuse further frees
    /// of other shards' handles ([`Error::ShardGone`]), send the ones
    /// acknowledged so far to their owners, and apply what the other shards
    /// send until each of them has done the same (or is gone).
    ///
    /// A [`Runtime`](crate::Runtime) does this for its shards when it
    /// stops. A shard of a [`Cluster`](crate::Cluster) must call it before
    /// it is dropped, and so must every other shard of the cluster (each
    /// on its own thread, around the same time): a shard dropped without it
    /// loses the frees it acknowledged for others and had not sent yet, and
    /// those the others acknowledged for it and it had not applied. A shard
    /// whose peer never finishes (nor is dropped) waits for it; the wait is
    /// logged after a second.
    ///
    /// ```no_run
    /// # async fn demo(shard: segalloc::Shard) {
    /// // ... the shard's work, then, on every shard's thread:
    /// shard.finish_frees().await;
    /// drop(shard);
    /// # }
    /// ```
    pub async fn finish_frees(&self) {
        let Some(m) = self.inner.mesh.get() else {
            return;
        };
        m.finish().await;
        // The shard's drain task may take the parcels too: look, do not wait
        // for a wake-up that may go to it. A peer that does not stop (a task
        // that blocks its thread) keeps this shard waiting: its frees are
        // not given up, and the wait is logged.
        let start = std::time::Instant::now();
        let mut logged = false;
        loop {
            self.drain_frees();
            if m.peers_finished() {
                break;
            }
            if !logged && start.elapsed() >= std::time::Duration::from_secs(1) {
                logged = true;
                tracing::warn!(
                    shard = self.inner.index,
                    "stopping: still waiting for other shards to send their last cross-shard frees"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        self.drain_frees();
    }

    /// Run `f(shard)` on shard `shard` and return its result: Seastar's
    /// `submit_to`. On this shard it runs in place; on another it is sent
    /// through the mesh and runs there as a task, so `f` and its result
    /// are `Send` but the future need not be. The way to act on another
    /// shard's allocations.
    ///
    /// Dropping the returned future once the job is in the other shard's
    /// inbox does not take it back: `f` runs there all the same, and its
    /// result is dropped. So do [`run_on_owner`](Self::run_on_owner),
    /// [`read`](Self::read) and [`write`](Self::write), which send theirs
    /// through here: a cancelled `write` of another shard's handle may
    /// still have written.
    ///
    /// # Errors
    ///
    /// [`Error::ShardOutOfRange`]; [`Error::ShardGone`] when that shard is
    /// stopped or this shard is not in a runtime or cluster;
    /// [`Error::TaskPanicked`] when `f` or its future panics on another
    /// shard (on this shard, `f` runs inline and a panic unwinds into the
    /// caller).
    pub async fn submit_to<F, Fut, T>(&self, shard: usize, f: F) -> Result<T>
    where
        F: FnOnce(Shard) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let shard_count = self.inner.dir.manifest().shard_count as usize;
        if shard >= shard_count {
            return Err(Error::ShardOutOfRange { shard, shard_count });
        }
        let shard = shard as u16;
        if shard == self.inner.index {
            return Ok(f(self.clone()).await);
        }
        let Some(mesh) = self.inner.mesh.get() else {
            return Err(Error::ShardGone { shard });
        };
        let (tx, rx) = oneshot::channel();
        mesh.submit(shard, job(f, tx)).await?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(message)) => Err(Error::TaskPanicked { shard, message }),
            Err(_) => Err(Error::ShardGone { shard }),
        }
    }

    /// Pin `handle` on its owner (this shard or another, through
    /// [`submit_to`](Self::submit_to)) and run `f` on the pin there. The
    /// owner checks the handle against its own allocations first.
    ///
    /// Frees this shard forwarded to that owner travel in batches of their
    /// own, which `f` may overtake: after a [`free`](Self::free) of another
    /// shard's handle, a `read` of it can still find it allocated (and a
    /// `write` can fail or not) until
    /// [`flush_frees`](Self::flush_frees) has returned. Await it between
    /// the two for them to happen in program order.
    ///
    /// # Errors
    ///
    /// The errors of [`pin`](Self::pin) on the owner, and those of
    /// [`submit_to`](Self::submit_to).
    pub async fn run_on_owner<F, T>(&self, handle: Handle, f: F) -> Result<T>
    where
        F: FnOnce(&PinGuard) -> T + Send + 'static,
        T: Send + 'static,
    {
        if handle.shard() == self.inner.index {
            return Ok(f(&self.inner.alloc.pin(handle).await?));
        }
        self.check_foreign(&handle)?;
        self.submit_to(handle.shard() as usize, move |s| async move {
            let pin = s.inner.alloc.pin(handle).await?;
            Ok(f(&pin))
        })
        .await?
    }

    /// Copy `buf.len()` bytes at `offset` of the allocation `handle` (of
    /// any shard) into `buf`; another shard's bytes are copied by the owner.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when the range exceeds the allocation; the
    /// errors of [`run_on_owner`](Self::run_on_owner).
    pub async fn read(&self, handle: Handle, offset: usize, buf: &mut [u8]) -> Result<()> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle).await?.read_at(offset, buf);
        }
        check_range(&handle, offset, buf.len())?;
        let n = buf.len();
        let bytes = self
            .run_on_owner(handle, move |pin| {
                let mut v = vec![0u8; n];
                pin.read_at(offset, &mut v).map(|()| v)
            })
            .await??;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// Copy `data` to `offset` of the allocation `handle` (of any shard);
    /// another shard's bytes are written by the owner.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when the range exceeds the allocation;
    /// [`Error::ReadOnly`]; the errors of [`run_on_owner`](Self::run_on_owner).
    pub async fn write(&self, handle: Handle, offset: usize, data: &[u8]) -> Result<()> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle).await?.write_at(offset, data);
        }
        check_range(&handle, offset, data.len())?;
        let data = data.to_vec();
        self.run_on_owner(handle, move |pin| pin.write_at(offset, &data))
            .await?
    }

    /// Map another shard's allocation into this shard directly (`MAP_SHARED`,
    /// coherent with the owner's view), after the owner has checked that
    /// `handle` is live. For zero-copy readers that synchronise with the
    /// owner themselves; [`read`](Self::read), [`write`](Self::write) and
    /// [`run_on_owner`](Self::run_on_owner) are the safe ways. A handle of
    /// this shard is pinned as by [`pin`](Self::pin).
    ///
    /// The owner does not know of the pin: its checks of its own pins do
    /// not see it. It checks that the handle is live when it answers, and
    /// the mapping is made after that answer, so an allocation freed from
    /// the call on is the caller's to prevent (below): freed meanwhile, it
    /// may still be pinned (its old bytes, or once its slot is handed out
    /// again, which the next sync allows, the new allocation's, with the
    /// same handle); freed while pinned, the owner's
    /// [`trim`](Self::trim) may punch the run under the pin (its bytes
    /// then read as zeros, and a write through the pin on a full disk is a
    /// `SIGBUS`).
    ///
    /// # Safety
    ///
    /// While the returned pin lives, no other thread (the owner shard in
    /// particular) may write the bytes it covers while this thread reads or
    /// writes them, and no other thread may read them while this thread
    /// writes them; the allocation must not be freed from the call until
    /// the pin is dropped. The pin itself is `!Send`. This is
    /// `memmap2::MmapMut::map_mut`'s contract for a file another party may
    /// modify.
    ///
    /// Bytes written through the pin are made durable by this shard's
    /// [`sync`](Self::sync) (and so by `Runtime::sync`), not by the owner's:
    /// the owner does not know of them.
    ///
    /// # Errors
    ///
    /// As [`run_on_owner`](Self::run_on_owner) for the liveness check, then
    /// the errors of [`MappingManager::pin`](crate::MappingManager::pin);
    /// [`Error::Io`] when the file found in the data directory is not the
    /// one the owner writes (the directory or the owner's folder was moved
    /// or replaced since this shard's directory was opened).
    pub async unsafe fn pin_foreign(&self, handle: Handle) -> Result<PinGuard> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle).await;
        }
        self.check_foreign(&handle)?;
        // The owner validates before anything is registered or mapped here,
        // so forged handles cannot grow this shard's file table; it also
        // says which file it writes (device and inode).
        let owned = self
            .submit_to(handle.shard() as usize, move |s| async move {
                if !s.inner.alloc.is_live(&handle) {
                    return Ok(None);
                }
                s.inner
                    .alloc
                    .data_file_identity(handle.file_id())
                    .await
                    .map(Some)
            })
            .await??;
        let Some(identity) = owned else {
            return Err(Error::NotAllocated {
                handle,
                reason: "the owner has no live allocation there",
            });
        };
        let fid = self.foreign_file(&handle)?;
        // The file opened here must be the owner's: its shard folder is
        // found by name, which a folder renamed or replaced by a symlink
        // since would turn to another file. The descriptor open now is
        // checked here, and every later open of it (a fault-in's, a
        // sync's after an eviction) when it is made.
        self.inner.files.expect_identity(fid, identity)?;
        let len = u64::from(handle.len());
        let writable = !self.inner.files.is_read_only();
        if let Some(p) =
            self.inner
                .mm
                .try_pin_of(fid, handle.offset(), len, writable, Access::Foreign)?
        {
            return Ok(p);
        }
        self.inner
            .mm
            .pin_of(fid, handle.offset(), len, writable, Access::Foreign)
            .await
    }

    /// The local file id of a data file of another shard (validated by its
    /// owner), registered on first use.
    fn foreign_file(&self, h: &Handle) -> Result<FileId> {
        let key = (h.shard(), h.file_id());
        if let Some(&id) = self.inner.foreign.borrow().get(&key) {
            return Ok(id);
        }
        let dir = &self.inner.dir;
        // Looked up and opened at `rel` in the data directory itself, not
        // by `path`, which may name another directory since.
        let rel = std::path::Path::new(&crate::format::shard_folder_name(h.shard()))
            .join(crate::format::data_file_name(h.file_id()));
        let path = dir.path().join(&rel);
        // SAFETY: a file registered as foreign is pinned only through
        // `pin_foreign` (the manager's safe `pin` and `try_pin` refuse it:
        // `Error::ForeignFile`), whose caller takes on the same contract for
        // the bytes it pins.
        let id = unsafe {
            self.inner
                .files
                .register_foreign_in(&dir.folder()?, &rel, &path)?
        };
        self.inner.foreign.borrow_mut().insert(key, id);
        Ok(id)
    }

    /// What this shard can check of another shard's handle before sending
    /// anything to its owner.
    #[inline]
    pub(super) fn check_foreign(&self, h: &Handle) -> Result<()> {
        let m = self.inner.dir.manifest();
        if h.dir_tag() != m.dir_tag() {
            return Err(Error::ForeignHandle {
                handle: *h,
                handle_tag: h.dir_tag(),
                dir_tag: m.dir_tag(),
            });
        }
        if self.inner.mesh.get().is_none() || h.shard() >= m.shard_count {
            return Err(Error::WrongShard {
                handle: *h,
                owner: h.shard(),
                this: self.inner.index,
            });
        }
        if h.offset()
            .checked_add(u64::from(h.len()))
            .is_none_or(|end| end > m.max_file_bytes)
        {
            return Err(Error::NotAllocated {
                handle: *h,
                reason: "offset out of bounds",
            });
        }
        Ok(())
    }

    /// [`free`](Self::free), but when the owner of a foreign handle is far
    /// behind, wait for it ([`flush_frees`](Self::flush_frees)) and retry
    /// instead of returning [`Error::Backpressure`]: for loops that free many
    /// other shards' handles.
    ///
    /// # Errors
    ///
    /// As [`free`](Self::free), without `Backpressure`; while it waits, the
    /// errors of [`flush_frees`](Self::flush_frees) for the handle's owner.
    pub async fn free_async(&self, handle: Handle) -> Result<()> {
        loop {
            match self.free(handle) {
                // Wait for that owner only.
                Err(Error::Backpressure { owner, .. }) => match self.inner.mesh.get() {
                    Some(m) => m.flush_to(owner as usize).await?,
                    None => return Err(Error::Backpressure { owner, queued: 0 }),
                },
                other => return other,
            }
        }
    }
}

impl ShardInner {
    /// Apply one parcel from the mesh: forwarded frees, or a barrier that
    /// is answered because everything before it is applied.
    fn apply(&self, from: usize, parcel: Parcel) {
        let Some(mesh) = self.mesh.get() else { return };
        let batch = match parcel {
            Parcel::Frees(b) => b,
            Parcel::Barrier(ack) => {
                // A poisoned shard applies no free: the sender's flush says
                // so, as a free on this shard would.
                let r = match self.alloc.is_poisoned() {
                    true => Err(Error::Poisoned { shard: self.index }),
                    false => Ok(mesh.rejected_answer(from)),
                };
                let _ = ack.send(r);
                return;
            }
            // Consumed by the mesh itself.
            Parcel::Done => return,
        };
        let (mut ok, mut bad) = (0, 0);
        for h in batch {
            match self.alloc.free(h) {
                Ok(()) => ok += 1,
                Err(e) => {
                    bad += 1;
                    tracing::warn!(handle = %h, error = %e, "forwarded free rejected");
                    mesh.rejected(from, e);
                }
            }
        }
        mesh.bump(|s| {
            s.cross_frees_received += ok;
            s.cross_frees_rejected += bad;
        });
    }
}

/// The shard's task that applies what other shards forward, until every
/// peer is gone or the shard is dropped.
pub(super) async fn drain_frees_task(me: Weak<ShardInner>) {
    loop {
        let next = std::future::poll_fn(|cx| match me.upgrade() {
            Some(inner) => match inner.mesh.get() {
                Some(m) => m.poll_parcel(cx),
                None => std::task::Poll::Ready(None),
            },
            None => std::task::Poll::Ready(None),
        })
        .await;
        let (Some((from, parcel)), Some(inner)) = (next, me.upgrade()) else {
            return;
        };
        inner.apply(from, parcel);
    }
}

/// [`Error::InvalidRange`] unless `[offset, offset + n)` lies in `h`.
fn check_range(h: &Handle, offset: usize, n: usize) -> Result<()> {
    if offset
        .checked_add(n)
        .is_none_or(|end| end > h.len() as usize)
    {
        return Err(Error::InvalidRange {
            file_id: crate::error::NOT_A_FILE,
            offset: offset as u64,
            len_bytes: n as u64,
            reason: "outside the allocation",
        });
    }
    Ok(())
}
