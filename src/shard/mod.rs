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
use std::rc::Rc;
use std::sync::Arc;

use futures::FutureExt;
use futures::channel::oneshot;

use crate::alloc::{AllocStats, AllocateFuture, Allocation, LiveIter, PinFuture, SegmentAllocator};
use crate::config::Config;
use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileId, FileStats};
use crate::format::Handle;
use crate::io::{IoBackend, Ring, RingStats};
use crate::mapping::{MappingConfig, MappingManager, MappingStats, PinGuard};
use crate::mesh::{Endpoint, MeshLocal, MeshStats};

mod owner;

use owner::drain_frees_task;

/// A closure sent to run on a shard (by another shard or the runtime).
pub(crate) type Job = Box<dyn FnOnce(Shard) + Send>;

/// Everything a shard can tell about itself.
#[derive(Clone, Debug)]
#[non_exhaustive]
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
    /// inside a tokio current-thread runtime with IO and timers
    /// (`enable_all`: the ring's completions wake tasks through tokio's
    /// reactor, and a pin waits for a window with a timeout), or inside
    /// tokio-uring.
    ///
    /// # Errors
    ///
    /// [`Error::NoExecutor`] outside a tokio runtime, or in one without
    /// timers or IO (tokio tells that only by a panic, which is caught: the
    /// panic hook prints its message; in a build with `panic = "abort"`
    /// they cannot be checked, and their absence aborts at the first use);
    /// [`Error::ShardAlreadyOpen`] when the shard is already open for writing
    /// (each writable open holds the shard's lock until it is dropped);
    /// [`Error::InvalidConfig`] for an index out of range; recovery errors
    /// ([`Error::Corrupt`], [`Error::Mismatch`]); io errors.
    pub async fn open(dir: Arc<DataDir>, cfg: &Config, index: u16) -> Result<Shard> {
        Shard::open_with(dir, cfg, index, &[]).await
    }

    /// [`open`](Self::open), with the ring's io workers on `io_cpus` from
    /// the start (empty: left as they are). Workers that exist already keep
    /// their CPUs, so this comes before the shard's first operation.
    pub(crate) async fn open_with(
        dir: Arc<DataDir>,
        cfg: &Config,
        index: u16,
        io_cpus: &[usize],
    ) -> Result<Shard> {
        require_tokio("Shard::open")?;
        if index >= dir.manifest().shard_count {
            return Err(Error::InvalidConfig(format!(
                "shard {index} out of range (the directory has {} shards)",
                dir.manifest().shard_count
            )));
        }
        let ring = Ring::new(cfg.io_backend())?;
        if !io_cpus.is_empty()
            && let Err(e) = ring.set_io_worker_cpus(io_cpus)
        {
            tracing::debug!(error = %e, "io workers stay on the shard's CPU");
        }
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

    /// Refuse further cross-shard frees ([`Error::ShardGone`]) so that a
    /// following [`flush_frees`](Self::flush_frees) delivers every free
    /// this shard acknowledged (the runtime's shutdown).
    pub(crate) fn close_mesh(&self) {
        if let Some(m) = self.inner.mesh.get() {
            m.close();
        }
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

    /// Allocate `size` bytes (1..=16 MiB) on this shard. The future
    /// ([`AllocateFuture`]) takes the hot path when first polled, as
    /// [`try_allocate`](Self::try_allocate) does, and waits only for a new
    /// segment or a window to fault in.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::allocate`].
    #[inline(always)]
    pub fn allocate(&self, size: u64) -> AllocateFuture<'_> {
        self.inner.alloc.allocate(size)
    }

    /// Allocate without awaiting (`Ok(None)`: use [`allocate`](Self::allocate)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_allocate`].
    #[inline(always)]
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
    /// shard's handle; [`Error::ForeignHandle`] for another directory's;
    /// [`Error::WrongShard`] for a shard index the directory does not have,
    /// or for another shard's handle outside a runtime;
    /// [`Error::NotAllocated`] for another shard's handle whose range lies
    /// past any data file.
    #[inline(always)]
    pub fn pin(&self, handle: Handle) -> PinFuture<'_> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle);
        }
        PinFuture::failed(&self.inner.alloc, handle, self.refuse_pin(handle))
    }

    /// Why [`pin`](Self::pin) refuses another shard's handle.
    #[cold]
    #[inline(never)]
    fn refuse_pin(&self, handle: Handle) -> Error {
        if let Err(e) = self.check_foreign(&handle) {
            return e;
        }
        Error::NotOwner {
            handle,
            owner: handle.shard(),
            this: self.inner.index,
        }
    }

    /// Pin without awaiting (`Ok(None)`: use [`pin`](Self::pin)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_pin`]. Another shard's handle is refused
    /// by the allocator's own check, with [`Error::WrongShard`] naming its
    /// owner ([`pin`](Self::pin) says [`Error::NotOwner`], with what to use
    /// instead; this hot path spends no instruction on telling them apart).
    #[inline]
    pub fn try_pin(&self, handle: Handle) -> Result<Option<PinGuard>> {
        self.inner.alloc.try_pin(handle)
    }

    /// Free an allocation. A handle of this shard is freed at once (durable
    /// against a process crash when this returns). Inside a runtime, a
    /// handle of another shard is forwarded to its owner in a batch: it is
    /// applied (and durable) once the owner has drained it, which
    /// `Runtime::sync` waits for; a forwarded free that the owner rejects
    /// (double free, stale handle, or the owner is poisoned) is counted in
    /// the owner's `mesh.cross_frees_rejected`, logged through `tracing`,
    /// and reported by this shard's next
    /// [`flush_frees`](Self::flush_frees) ([`Error::FreesRejected`]), which
    /// waits until the owners applied them, and fails with
    /// [`Error::Poisoned`] for a poisoned owner.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::free`]; for a foreign handle only what can be
    /// checked here ([`Error::ForeignHandle`], [`Error::ReadOnly`] on a
    /// read-only shard, [`Error::WrongShard`] outside a
    /// runtime, [`Error::ShardGone`] when the owner is stopped or the
    /// runtime is shutting down), and [`Error::Backpressure`] when the owner
    /// is far behind: nothing was queued, await `flush_frees` and retry.
    #[inline(always)]
    pub fn free(&self, handle: Handle) -> Result<()> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.free(handle);
        }
        self.forward_free(handle)
    }

    /// [`free`](Self::free) of another shard's handle: kept out of line, so
    /// that the local free stays small.
    #[inline(never)]
    fn forward_free(&self, handle: Handle) -> Result<()> {
        let inner = &*self.inner;
        let m = inner.dir.manifest();
        // `check_foreign`'s checks in one condition (its errors are built
        // off this path, by `refuse_free`), then the read-only one: every
        // shard of a directory is opened the same way, so a read-only owner
        // would reject the free after it was acknowledged here.
        if let Some(mesh) = inner.mesh.get()
            && handle.dir_tag() == m.dir_tag()
            && handle.shard() < m.shard_count
            && handle
                .offset()
                .checked_add(u64::from(handle.len()))
                .is_some_and(|end| end <= m.max_file_bytes)
            && !inner.files.is_read_only()
        {
            return mesh.forward(handle);
        }
        Err(self.refuse_free(handle))
    }

    /// Why [`forward_free`](Self::forward_free) refuses `handle`.
    #[cold]
    #[inline(never)]
    fn refuse_free(&self, handle: Handle) -> Error {
        match self.check_foreign(&handle) {
            Err(e) => e,
            Ok(()) => Error::ReadOnly("shard opened read-only"),
        }
    }

    /// Make everything acknowledged so far durable against power loss: this
    /// shard's allocator, and the bytes this shard wrote into other shards'
    /// allocations through [`pin_foreign`](Self::pin_foreign) (their owners
    /// do not know of those writes; `Runtime::sync` syncs every shard).
    ///
    /// As [`SegmentAllocator::sync`] says, it waits for earlier syncs and
    /// for other calls' `fdatasync`s of the same files: do not keep a
    /// started `sync` or `allocate` future of this shard unpolled while a
    /// task awaits a sync (dropping it is fine).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::sync`]; an io error of another shard's data
    /// file written through `pin_foreign` (a write-back error is kept: every
    /// later sync of that file reports it, as for this shard's own files).
    /// The first error is returned.
    pub async fn sync(&self) -> Result<()> {
        let own = self.inner.alloc.sync().await;
        let foreign = self.sync_foreign().await;
        own.and(foreign)
    }

    /// `fdatasync` the other shards' data files this shard may have written
    /// through `pin_foreign`: dirty ones, and ones with a pin held across
    /// this call (which stay dirty for the next sync).
    async fn sync_foreign(&self) -> Result<()> {
        let files = &self.inner.files;
        if files.is_read_only() {
            return Ok(());
        }
        let ids: Vec<FileId> = self.inner.foreign.borrow().values().copied().collect();
        let mut first = None;
        for id in ids {
            let in_use = self.inner.mm.in_use(id, 0, u64::MAX);
            if !in_use && !files.is_dirty(id) {
                continue;
            }
            let r = files.sync(id, true).await;
            if in_use {
                files.mark_dirty(id);
            }
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
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
        // First: it drops the prefaults the kernel completed, which the
        // ring's and the files' figures then no longer count.
        let mappings = self.inner.mm.stats();
        ShardStats {
            shard: self.inner.index,
            io_backend: self.inner.ring.backend(),
            ring: self.inner.ring.stats(),
            files: self.inner.files.stats(),
            mappings,
            alloc: self.inner.alloc.stats(),
            mesh: self.inner.mesh.get().map(|m| m.stats()).unwrap_or_default(),
        }
    }
}

/// [`Error::NoExecutor`] unless a tokio runtime (current-thread or
/// tokio-uring's) runs on this thread.
pub(crate) fn require_tokio(call: &'static str) -> Result<()> {
    tokio::runtime::Handle::try_current()
        .map(drop)
        .map_err(|_| Error::NoExecutor {
            call,
            needs: "a tokio current-thread runtime (or tokio-uring) on this thread",
        })?;
    // A pin waiting for a window times out, and `finish_frees` waits for
    // its peers: both need tokio's timers, whose absence is a panic when
    // they are first used (a `finish_frees` that panics loses the frees it
    // holds). tokio offers no query either: a timer is made and dropped,
    // and its panic (the hook prints its message) turned into the error.
    // Built with `panic = "abort"` that panic would end the process: then
    // nothing is checked, and a runtime without timers aborts at its first
    // wait, as tokio makes it.
    #[cfg(not(panic = "abort"))]
    std::panic::catch_unwind(|| drop(tokio::time::sleep(std::time::Duration::ZERO))).map_err(
        |_| Error::NoExecutor {
            call,
            needs: "a tokio runtime with timers (Builder::enable_time, or enable_all)",
        },
    )?;
    // The ring waits for its completions through tokio's reactor (an
    // eventfd registered with it), whose absence is a panic too: the same
    // check, with an eventfd of its own.
    #[cfg(not(panic = "abort"))]
    {
        let fd = crate::sys::eventfd().map_err(|e| Error::io("eventfd", None, e))?;
        let io = std::panic::AssertUnwindSafe(move || {
            // SAFETY: `fd` is owned by the `AsyncFd` (dropped with it), so
            // it stays open, and names the same file, for its lifetime.
            unsafe { tokio::io::unix::AsyncFd::register(fd) }.map(drop)
        });
        match std::panic::catch_unwind(io) {
            Ok(r) => r.map_err(|e| Error::io("register an eventfd with tokio", None, e.into()))?,
            Err(_) => {
                return Err(Error::NoExecutor {
                    call,
                    needs: "a tokio runtime with IO (Builder::enable_io, or enable_all)",
                });
            }
        }
    }
    Ok(())
}

/// [`Error::NoExecutor`] unless local tasks can be spawned here (a tokio
/// `LocalSet`, or tokio-uring). tokio offers no query for this, so a no-op
/// task is spawned; outside a `LocalSet` that panics (the panic hook
/// prints its message) and the panic is turned into the error. (Not with
/// `panic = "abort"`: see [`require_tokio`].)
pub(crate) fn require_local_set(call: &'static str) -> Result<()> {
    require_tokio(call)?;
    #[cfg(not(panic = "abort"))]
    std::panic::catch_unwind(|| drop(tokio::task::spawn_local(async {}))).map_err(|_| {
        Error::NoExecutor {
            call,
            needs: "a tokio LocalSet (LocalSet::block_on or run_until) or tokio-uring",
        }
    })?;
    Ok(())
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("index", &self.inner.index)
            .finish()
    }
}
