//! `Shard`: one FileHandleRegistry, one MappingManager, one SegmentAllocator
//! and one control ring, on one thread.
//!
//! **Architecture invariant:** a shard is `!Send` and single-threaded. Its
//! allocate / pin / free hot path takes no lock and makes no atomic
//! read-modify-write; everything that may block goes through its ring.
//! Only the owning shard touches an allocation's bytes through safe code:
//! other shards send it closures ([`Shard::submit_to`]) and frees through
//! the mesh, and the shard drains what the mesh delivers.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::rc::{Rc, Weak};
use std::sync::Arc;

use futures::FutureExt;
use futures::channel::oneshot;

use crate::alloc::{AllocStats, Allocation, LiveIter, SegmentAllocator};
use crate::config::Config;
use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileId, FileStats};
use crate::format::Handle;
use crate::io::{IoBackend, Ring, RingStats};
use crate::mapping::{MappingConfig, MappingManager, MappingStats, Pin};
use crate::mesh::{Endpoint, MeshLocal, MeshStats, Parcel};

/// A closure sent to run on a shard (by another shard or the runtime).
pub(crate) type Job = Box<dyn FnOnce(Shard) + Send>;

/// Everything a shard can tell about itself.
#[derive(Clone, Debug)]
pub struct ShardStats {
    /// Shard index.
    pub shard: u16,
    /// io backend of the control ring.
    pub io_backend: IoBackend,
    /// Control ring counters.
    pub ring: RingStats,
    /// Descriptor registry counters.
    pub files: FileStats,
    /// Mapping counters.
    pub mappings: MappingStats,
    /// Allocator counters.
    pub alloc: AllocStats,
    /// Cross-shard free counters.
    pub mesh: MeshStats,
}

struct ShardInner {
    index: u16,
    dir: Arc<DataDir>,
    ring: Ring,
    files: Rc<FileHandleRegistry>,
    mm: Rc<MappingManager>,
    alloc: SegmentAllocator,
    mesh: OnceCell<Rc<MeshLocal<Job>>>,
    /// Local file ids of other shards' data files, for `pin_foreign`.
    foreign: RefCell<HashMap<(u16, u32), FileId>>,
}

/// The text of a panic payload.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// Wrap `f` as a [`Job`]: run it on the receiving shard as a local task and
/// send its result (or its panic's message) back through `tx`.
pub(crate) fn job<F, Fut, T>(f: F, tx: oneshot::Sender<std::result::Result<T, String>>) -> Job
where
    F: FnOnce(Shard) -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    Box::new(move |s: Shard| {
        // A panic in the closure is the task's panic too: report it as such
        // (not as a gone shard, which is what dropping `tx` says).
        let fut = match std::panic::catch_unwind(AssertUnwindSafe(move || f(s))) {
            Ok(fut) => fut,
            Err(p) => {
                let _ = tx.send(Err(panic_message(&*p)));
                return;
            }
        };
        tokio::task::spawn_local(async move {
            let r = AssertUnwindSafe(fut).catch_unwind().await;
            let _ = tx.send(r.map_err(|p| panic_message(&*p)));
        });
    })
}

/// One shard of a data directory. Cheap to clone within its thread.
///
/// Only the owning shard touches an allocation's bytes: another shard
/// reads and writes them with [`read`](Self::read) / [`write`](Self::write)
/// or runs a closure on the owner with [`run_on_owner`](Self::run_on_owner),
/// so no two threads ever access the same bytes (a safe [`pin`](Self::pin)
/// of another shard's handle is refused with [`Error::NotOwner`]).
///
/// ```no_run
/// # async fn demo() -> segalloc::Result<()> {
/// use std::sync::Arc;
/// use segalloc::{Config, DataDir, Shard};
/// let cfg = Config::builder("/tmp/segalloc-shard-doc").shards(1).build()?;
/// let dir = Arc::new(DataDir::open(&cfg)?);
/// let shard = Shard::open(dir, &cfg, 0).await?;
/// let a = shard.allocate(100).await?;
/// a.write_at(0, b"record")?;
/// let h = a.into_handle();
/// shard.set_root("first", h)?;
/// let pin = shard.pin(h).await?;
/// let mut buf = [0u8; 6];
/// pin.read_at(0, &mut buf)?;
/// drop(pin);
/// shard.free(h)?;
/// shard.sync().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Shard {
    inner: Rc<ShardInner>,
}

impl Shard {
    /// Open shard `index` of `dir`: its ring, registry, manager, and the
    /// recovered allocator. Call it on the thread that will run the shard,
    /// inside a tokio current-thread runtime (or tokio-uring).
    ///
    /// # Errors
    ///
    /// [`Error::NoExecutor`] outside a tokio runtime;
    /// [`Error::ShardAlreadyOpen`] when the shard is already open for writing
    /// (each writable open holds the shard's lock until it is dropped);
    /// [`Error::InvalidConfig`] for an index out of range; recovery errors
    /// ([`Error::Corrupt`], [`Error::Mismatch`]); io errors.
    pub async fn open(dir: Arc<DataDir>, cfg: &Config, index: u16) -> Result<Shard> {
        require_tokio("Shard::open")?;
        if index >= dir.manifest().shard_count {
            return Err(Error::InvalidConfig(format!(
                "shard {index} out of range (the directory has {} shards)",
                dir.manifest().shard_count
            )));
        }
        let ring = Ring::new(cfg.io_backend())?;
        let files = Rc::new(if dir.is_read_only() || cfg.read_only() {
            FileHandleRegistry::new_read_only(ring.clone(), cfg.max_open_files_per_shard())
        } else {
            FileHandleRegistry::new(ring.clone(), cfg.max_open_files_per_shard())
        });
        let mut mcfg = MappingConfig::from_config(cfg);
        mcfg.window_bytes = dir.manifest().window_bytes;
        let mm = Rc::new(MappingManager::new(files.clone(), mcfg));
        let alloc =
            SegmentAllocator::open(index, &dir.shard_dir(index), *dir.manifest(), mm.clone())
                .await?;
        Ok(Shard {
            inner: Rc::new(ShardInner {
                index,
                dir,
                ring,
                files,
                mm,
                alloc,
                mesh: OnceCell::new(),
                foreign: RefCell::new(HashMap::new()),
            }),
        })
    }

    /// Join the channel mesh: start the tasks that apply frees forwarded
    /// by other shards and run the closures they submit. Must run inside a
    /// `LocalSet` (or tokio-uring): check with [`require_local_set`].
    pub(crate) fn connect(&self, ep: Endpoint<Job>) {
        debug_assert_eq!(ep.index, self.inner.index);
        let mesh = Rc::new(MeshLocal::new(ep));
        let jobs = mesh.take_jobs();
        let _ = self.inner.mesh.set(mesh);
        let me = Rc::downgrade(&self.inner);
        tokio::task::spawn_local(drain_frees_task(me.clone()));
        if let Some(mut jobs) = jobs {
            tokio::task::spawn_local(async move {
                while let Some(job) = jobs.recv().await {
                    let Some(inner) = me.upgrade() else { return };
                    job(Shard { inner });
                }
            });
        }
    }

    /// Send every buffered cross-shard free to its owner now and wait until
    /// each owner has applied every free this shard acknowledged before the
    /// call (without this, they are sent when a batch fills or after a few
    /// executor turns). An owner's next `sync` then makes them durable.
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] naming an owner that is gone (the others are
    /// still flushed).
    pub async fn flush_frees(&self) -> Result<()> {
        match self.inner.mesh.get() {
            Some(m) => m.clone().flush().await,
            None => Ok(()),
        }
    }

    /// Apply every forwarded free that has arrived (the drain task does this
    /// on its own).
    pub fn drain_frees(&self) {
        if let Some(m) = self.inner.mesh.get() {
            for p in m.take_ready() {
                self.inner.apply(p);
            }
        }
    }

    /// Refuse further cross-shard frees ([`Error::ShardGone`]) so that a
    /// following [`flush_frees`](Self::flush_frees) delivers every free
    /// this shard acknowledged (the runtime's shutdown).
    pub(crate) fn close_mesh(&self) {
        if let Some(m) = self.inner.mesh.get() {
            m.close();
        }
    }

    /// Run `f(shard)` on shard `shard` and return its result: Seastar's
    /// `submit_to`. On this shard it runs in place; on another it is sent
    /// through the mesh and runs there as a task, so `f` and its result
    /// are `Send` but the future need not be. The way to act on another
    /// shard's allocations.
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
    /// # Errors
    ///
    /// The errors of [`pin`](Self::pin) on the owner, and those of
    /// [`submit_to`](Self::submit_to).
    pub async fn run_on_owner<F, T>(&self, handle: Handle, f: F) -> Result<T>
    where
        F: FnOnce(&Pin) -> T + Send + 'static,
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

    /// This shard's index.
    pub fn index(&self) -> u16 {
        self.inner.index
    }
    /// The data directory.
    pub fn data_dir(&self) -> &Arc<DataDir> {
        &self.inner.dir
    }
    /// The allocator.
    pub fn allocator(&self) -> &SegmentAllocator {
        &self.inner.alloc
    }
    /// The mapping manager.
    pub fn mappings(&self) -> &Rc<MappingManager> {
        &self.inner.mm
    }
    /// The descriptor registry.
    pub fn files(&self) -> &Rc<FileHandleRegistry> {
        &self.inner.files
    }
    /// The control ring.
    pub fn ring(&self) -> &Ring {
        &self.inner.ring
    }

    /// Allocate `size` bytes (1..=16 MiB) on this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::allocate`].
    pub async fn allocate(&self, size: u64) -> Result<Allocation> {
        self.inner.alloc.allocate(size).await
    }

    /// Allocate without awaiting (`Ok(None)`: use [`allocate`](Self::allocate)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_allocate`].
    #[inline]
    pub fn try_allocate(&self, size: u64) -> Result<Option<Allocation>> {
        self.inner.alloc.try_allocate(size)
    }

    /// Pin a live allocation of this shard (checked against its bitmap).
    /// The pin gives direct access to the bytes on this thread only, so a
    /// handle of another shard is refused: use [`read`](Self::read),
    /// [`write`](Self::write) or [`run_on_owner`](Self::run_on_owner).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::pin`]; [`Error::NotOwner`] for another
    /// shard's handle; [`Error::ForeignHandle`] for another directory's.
    pub async fn pin(&self, handle: Handle) -> Result<Pin> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle).await;
        }
        self.check_foreign(&handle)?;
        Err(Error::NotOwner {
            handle,
            owner: handle.shard(),
            this: self.inner.index,
        })
    }

    /// Map another shard's allocation into this shard directly (`MAP_SHARED`,
    /// coherent with the owner's view), after the owner has checked that
    /// `handle` is live. For zero-copy readers that synchronise with the
    /// owner themselves; [`read`](Self::read), [`write`](Self::write) and
    /// [`run_on_owner`](Self::run_on_owner) are the safe ways. A handle of
    /// this shard is pinned as by [`pin`](Self::pin).
    ///
    /// # Safety
    ///
    /// While the returned pin lives, no other thread (the owner shard in
    /// particular) may write the bytes it covers while this thread reads or
    /// writes them, and no other thread may read them while this thread
    /// writes them; the allocation must not be freed and reused meanwhile.
    /// The pin itself is `!Send`. This is `memmap2::MmapMut::map_mut`'s
    /// contract for a file another party may modify.
    ///
    /// # Errors
    ///
    /// As [`run_on_owner`](Self::run_on_owner) for the liveness check, then
    /// the errors of [`MappingManager::pin`].
    pub async unsafe fn pin_foreign(&self, handle: Handle) -> Result<Pin> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle).await;
        }
        self.check_foreign(&handle)?;
        // The owner validates before anything is registered or mapped here,
        // so forged handles cannot grow this shard's file table.
        let live = self
            .submit_to(handle.shard() as usize, move |s| async move {
                s.inner.alloc.is_live(&handle)
            })
            .await?;
        if !live {
            return Err(Error::NotAllocated {
                handle,
                reason: "the owner has no live allocation there",
            });
        }
        let fid = self.foreign_file(&handle)?;
        let len = u64::from(handle.len());
        let writable = !self.inner.files.is_read_only();
        if let Some(p) = self.inner.mm.try_pin(fid, handle.offset(), len, writable)? {
            return Ok(p);
        }
        self.inner.mm.pin(fid, handle.offset(), len, writable).await
    }

    /// The local file id of a data file of another shard (validated by its
    /// owner), registered on first use.
    fn foreign_file(&self, h: &Handle) -> Result<FileId> {
        let key = (h.shard(), h.file_id());
        if let Some(&id) = self.inner.foreign.borrow().get(&key) {
            return Ok(id);
        }
        let path = self
            .inner
            .dir
            .shard_dir(h.shard())
            .join(crate::format::data_file_name(h.file_id()));
        let id = self.inner.files.register_foreign(path)?;
        self.inner.foreign.borrow_mut().insert(key, id);
        Ok(id)
    }

    /// What this shard can check of another shard's handle before sending
    /// anything to its owner.
    #[inline]
    fn check_foreign(&self, h: &Handle) -> Result<()> {
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

    /// Pin without awaiting (`Ok(None)`: use [`pin`](Self::pin)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_pin`].
    #[inline]
    pub fn try_pin(&self, handle: Handle) -> Result<Option<Pin>> {
        self.inner.alloc.try_pin(handle)
    }

    /// Free an allocation. A handle of this shard is freed at once (durable
    /// against a process crash when this returns). Inside a runtime, a
    /// handle of another shard is forwarded to its owner in a batch: it is
    /// applied (and durable) once the owner has drained it, which
    /// `Runtime::sync` waits for; a forwarded free that the owner rejects
    /// (double free, stale handle) is counted in the owner's
    /// `mesh.cross_frees_rejected` and logged through `tracing`.
    /// [`flush_frees`](Self::flush_frees) waits until the owners applied
    /// them.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::free`]; for a foreign handle only what can be
    /// checked here ([`Error::ForeignHandle`], [`Error::WrongShard`] outside a
    /// runtime, [`Error::ShardGone`] when the owner is stopped or the
    /// runtime is shutting down), and [`Error::Backpressure`] when the owner
    /// is far behind: nothing was queued, await `flush_frees` and retry.
    #[inline]
    pub fn free(&self, handle: Handle) -> Result<()> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.free(handle);
        }
        self.check_foreign(&handle)?;
        let mesh = self.inner.mesh.get().expect("checked by check_foreign");
        mesh.forward(handle)
    }

    /// [`free`](Self::free), but when the owner of a foreign handle is far
    /// behind, wait for it ([`flush_frees`](Self::flush_frees)) and retry
    /// instead of returning [`Error::Backpressure`]: for loops that free many
    /// other shards' handles.
    ///
    /// # Errors
    ///
    /// As [`free`](Self::free), without `Backpressure`.
    pub async fn free_async(&self, handle: Handle) -> Result<()> {
        loop {
            match self.free(handle) {
                Err(Error::Backpressure { .. }) => self.flush_frees().await?,
                other => return other,
            }
        }
    }

    /// Make everything acknowledged so far durable against power loss.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::sync`].
    pub async fn sync(&self) -> Result<()> {
        self.inner.alloc.sync().await
    }

    /// Give the blocks of this shard's free space back to the file system
    /// (punch holes into free runs); returns the bytes punched.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::trim`].
    pub async fn trim(&self) -> Result<u64> {
        self.inner.alloc.trim().await
    }

    /// The live allocations of this shard.
    pub fn live(&self) -> LiveIter<'_> {
        self.inner.alloc.live()
    }

    /// Number of live allocations.
    pub fn live_count(&self) -> u64 {
        self.inner.alloc.live_count()
    }

    /// Name a handle as a root of this shard; returns the handle the name
    /// pointed at before, if any.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::set_root`].
    pub fn set_root(&self, name: &str, handle: Handle) -> Result<Option<Handle>> {
        let before = self.inner.alloc.root(name);
        self.inner.alloc.set_root(name, handle)?;
        Ok(before)
    }

    /// The handle named `name` on this shard.
    pub fn root(&self, name: &str) -> Option<Handle> {
        self.inner.alloc.root(name)
    }

    /// Forget a root of this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::remove_root`].
    pub fn remove_root(&self, name: &str) -> Result<Option<Handle>> {
        self.inner.alloc.remove_root(name)
    }

    /// All roots of this shard.
    pub fn roots(&self) -> Vec<(String, Handle)> {
        self.inner.alloc.roots()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> ShardStats {
        ShardStats {
            shard: self.inner.index,
            io_backend: self.inner.ring.backend(),
            ring: self.inner.ring.stats(),
            files: self.inner.files.stats(),
            mappings: self.inner.mm.stats(),
            alloc: self.inner.alloc.stats(),
            mesh: self.inner.mesh.get().map(|m| m.stats()).unwrap_or_default(),
        }
    }
}

impl ShardInner {
    /// Apply one parcel from the mesh: forwarded frees, or a barrier that
    /// is answered because everything before it is applied.
    fn apply(&self, parcel: Parcel) {
        let Some(mesh) = self.mesh.get() else { return };
        let batch = match parcel {
            Parcel::Frees(b) => b,
            Parcel::Barrier(ack) => {
                let _ = ack.send(());
                return;
            }
        };
        let (mut ok, mut bad) = (0, 0);
        for h in batch {
            match self.alloc.free(h) {
                Ok(()) => ok += 1,
                Err(e) => {
                    bad += 1;
                    tracing::warn!(handle = %h, error = %e, "forwarded free rejected");
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
async fn drain_frees_task(me: Weak<ShardInner>) {
    loop {
        let next = std::future::poll_fn(|cx| match me.upgrade() {
            Some(inner) => match inner.mesh.get() {
                Some(m) => m.poll_parcel(cx),
                None => std::task::Poll::Ready(None),
            },
            None => std::task::Poll::Ready(None),
        })
        .await;
        let (Some(parcel), Some(inner)) = (next, me.upgrade()) else {
            return;
        };
        inner.apply(parcel);
    }
}

/// [`Error::InvalidRange`] unless `[offset, offset + n)` lies in `h`.
fn check_range(h: &Handle, offset: usize, n: usize) -> Result<()> {
    if offset
        .checked_add(n)
        .is_none_or(|end| end > h.len() as usize)
    {
        return Err(Error::InvalidRange {
            file_id: u32::MAX,
            offset: offset as u64,
            len_bytes: n as u64,
            reason: "outside the allocation",
        });
    }
    Ok(())
}

/// [`Error::NoExecutor`] unless a tokio runtime (current-thread or
/// tokio-uring's) runs on this thread.
pub(crate) fn require_tokio(call: &'static str) -> Result<()> {
    tokio::runtime::Handle::try_current()
        .map(drop)
        .map_err(|_| Error::NoExecutor {
            call,
            needs: "a tokio current-thread runtime (or tokio-uring) on this thread",
        })
}

/// [`Error::NoExecutor`] unless local tasks can be spawned here (a tokio
/// `LocalSet`, or tokio-uring). tokio offers no query for this, so a no-op
/// task is spawned; outside a `LocalSet` that panics (the panic hook
/// prints its message) and the panic is turned into the error.
pub(crate) fn require_local_set(call: &'static str) -> Result<()> {
    require_tokio(call)?;
    std::panic::catch_unwind(|| drop(tokio::task::spawn_local(async {}))).map_err(|_| {
        Error::NoExecutor {
            call,
            needs: "a tokio LocalSet (LocalSet::block_on or run_until) or tokio-uring",
        }
    })
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("index", &self.inner.index)
            .finish()
    }
}
