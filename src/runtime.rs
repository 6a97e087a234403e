//! `Runtime`: one thread per shard, each pinned to its core and running its
//! own single-threaded executor, and the channel mesh between them.
//! [`Cluster`] is the same without the threads, for servers that own their
//! threads.
//!
//! **Architecture invariant:** nothing is shared between shard threads but
//! the read-only [`DataDir`] and the mesh's channels. A shard thread runs a
//! tokio-uring runtime (built with `tokio_uring::Runtime::new`, never
//! `tokio_uring::start`, which panics without io_uring) or, when io_uring is
//! unavailable or `SEGALLOC_IO=sync`, a tokio current-thread runtime with a
//! `LocalSet`. Shard code uses only `spawn_local`, `AsyncFd` and wakers, so
//! either hosts it.

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle as ThreadHandle;

use futures::FutureExt;
use futures::channel::oneshot;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::config::{Config, IoBackendChoice};
use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::format::Handle;
use crate::mesh::{self, Endpoint};
use crate::shard::{self, Job, Shard, ShardStats, panic_message};
use crate::sys;

/// A data directory opened for a set of shards, with the mesh built but no
/// thread started. Hand one [`ShardBuilder`] to each of your threads, and
/// call [`Shard::finish_frees`] on each shard before dropping it (a shard
/// dropped without it loses the cross-shard frees in flight to and from it).
///
/// ```no_run
/// use segalloc::{Cluster, Config};
/// let cluster = Cluster::open(Config::builder("/tmp/segalloc-cluster").shards(2).build()?)?;
/// let threads: Vec<_> = cluster
///     .into_builders()
///     .into_iter()
///     .map(|b| {
///         std::thread::spawn(move || {
///             let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
///             tokio::task::LocalSet::new().block_on(&rt, async move {
///                 let shard = b.open().await?;
///                 let a = shard.allocate(64).await?;
///                 shard.free(a.into_handle())?;
///                 shard.flush_frees().await?;
///                 shard.sync().await?;
///                 // Before the shard is dropped, on every shard's thread.
///                 shard.finish_frees().await;
///                 Ok::<(), segalloc::Error>(())
///             })
///         })
///     })
///     .collect();
/// for t in threads {
///     t.join().unwrap()?;
/// }
/// # Ok::<(), segalloc::Error>(())
/// ```
pub struct Cluster {
    dir: Arc<DataDir>,
    cfg: Config,
    endpoints: Vec<Endpoint<Job>>,
}

impl Cluster {
    /// Open (or create) the data directory of `cfg` and build the mesh.
    ///
    /// # Errors
    ///
    /// See [`DataDir::open`].
    pub fn open(cfg: Config) -> Result<Cluster> {
        let dir = Arc::new(DataDir::open(&cfg)?);
        let endpoints = mesh::build(cfg.shards());
        Ok(Cluster {
            dir,
            cfg,
            endpoints,
        })
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Arc<DataDir> {
        &self.dir
    }

    /// One builder per shard, in shard order.
    pub fn into_builders(self) -> Vec<ShardBuilder> {
        let dir = self.dir;
        let cfg = self.cfg;
        self.endpoints
            .into_iter()
            .map(|ep| ShardBuilder {
                dir: dir.clone(),
                cfg: cfg.clone(),
                ep,
                io_cpus: Vec::new(),
            })
            .collect()
    }
}

/// Opens one shard on the thread that will run it. `Send`; the shard it
/// opens is not.
pub struct ShardBuilder {
    dir: Arc<DataDir>,
    cfg: Config,
    ep: Endpoint<Job>,
    io_cpus: Vec<usize>,
}

impl ShardBuilder {
    /// The shard index this builder opens.
    pub fn index(&self) -> u16 {
        self.ep.index
    }

    /// Open the shard (recovering it) and join the mesh. Call it inside a
    /// `LocalSet` on a tokio current-thread runtime with IO and timers
    /// (`enable_all`), or inside tokio-uring.
    ///
    /// # Errors
    ///
    /// [`Error::NoExecutor`] outside a `LocalSet` or without IO or timers
    /// (checked before anything is opened); see [`Shard::open`].
    pub async fn open(self) -> Result<Shard> {
        shard::require_local_set("ShardBuilder::open")?;
        let shard = Shard::open_with(self.dir, &self.cfg, self.ep.index, &self.io_cpus).await?;
        shard.connect(self.ep);
        Ok(shard)
    }

    /// Run the shard's kernel io workers (its `fallocate`s, `fdatasync`s
    /// and prefaults) on the CPUs `cpus` only, from its first operation
    /// ([`Ring::set_io_worker_cpus`](crate::Ring::set_io_worker_cpus)): for a shard thread pinned to one CPU,
    /// whose workers would otherwise share it. Best effort: a registration
    /// the kernel refuses is logged (`debug`) and the workers stay where
    /// they are. An empty list (the default) leaves them alone.
    pub fn io_worker_cpus(mut self, cpus: Vec<usize>) -> Self {
        self.io_cpus = cpus;
        self
    }
}

enum Msg {
    Run(Job),
    Stop,
    #[cfg_attr(not(feature = "test-support"), allow(dead_code))]
    Crash,
}

struct ShardThread {
    tx: UnboundedSender<Msg>,
    thread: Option<ThreadHandle<()>>,
}

/// One thread per shard, the mesh between them, and a way to run tasks on
/// each shard.
///
/// ```no_run
/// use segalloc::{Config, Runtime};
/// let rt = Runtime::start(Config::new("/tmp/segalloc-rt"))?;
/// let h = futures::executor::block_on(rt.spawn_on(0, |shard| async move {
///     let a = shard.allocate(100).await?;
///     a.write_at(0, b"hello")?;
///     Ok::<_, segalloc::Error>(a.into_handle())
/// }))??;
/// // Free it from another shard: forwarded to shard 0 in a batch.
/// futures::executor::block_on(rt.spawn_on(1 % rt.shard_count(), move |shard| async move { shard.free(h) }))??;
/// rt.shutdown()?;
/// # Ok::<(), segalloc::Error>(())
/// ```
pub struct Runtime {
    /// Tells this runtime's shard threads apart from every other thread.
    id: u64,
    dir: Arc<DataDir>,
    shards: Vec<ShardThread>,
    /// Shard threads that panicked: the shard and the message.
    failures: Arc<Mutex<Vec<(u16, String)>>>,
}

/// Source of [`Runtime::id`]s.
static NEXT_RUNTIME_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// The id of the runtime whose shard runs on this thread (0: none).
    static SHARD_OF_RUNTIME: Cell<u64> = const { Cell::new(0) };
}

/// The result of a task started with [`Runtime::spawn_on`].
pub struct JoinHandle<T> {
    rx: oneshot::Receiver<std::result::Result<T, String>>,
    shard: u16,
    /// An error known when the task was asked for (a shard out of range).
    refused: Option<Error>,
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        if let Some(e) = self.refused.take() {
            return Poll::Ready(Err(e));
        }
        let shard = self.shard;
        match self.rx.poll_unpin(cx) {
            Poll::Ready(Ok(Ok(v))) => Poll::Ready(Ok(v)),
            Poll::Ready(Ok(Err(message))) => {
                Poll::Ready(Err(Error::TaskPanicked { shard, message }))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::ShardGone { shard })),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Run `fut` to completion on this thread with the shard executor: tokio-uring
/// when it can start, else tokio current-thread + `LocalSet`. `shard_dir`
/// (the shard's folder) names the shard in the error.
///
/// # Errors
///
/// When no executor can be built (`fut` is then dropped unpolled):
/// [`Error::TooManyOpenFiles`] when the process is out of descriptors
/// (`EMFILE`/`ENFILE`, from either runtime: tokio-uring is then not
/// replaced by the fallback, which would need descriptors too), else
/// [`Error::Io`] naming the runtime that could not be built.
fn run_executor<F: Future<Output = ()>>(use_uring: bool, fut: F, shard_dir: &Path) -> Result<()> {
    if use_uring {
        // A ring first: where io_uring is refused (a container's seccomp
        // profile), tokio-uring 0.5 would build its tokio runtime, fail on
        // its ring, and leak that runtime's descriptors, at every start.
        let built = crate::io::probe_uring()
            .and_then(|()| tokio_uring::Runtime::new(&tokio_uring::builder()));
        match built {
            Ok(rt) => {
                rt.block_on(fut);
                return Ok(());
            }
            Err(e) if crate::error::out_of_descriptors(&e) => {
                return Err(executor_error(
                    "build the shard's tokio-uring runtime",
                    shard_dir,
                    e,
                ));
            }
            Err(e) => {
                tracing::info!(error = %e, "tokio-uring unavailable; shard runs on tokio current-thread");
            }
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            executor_error(
                "build the shard's tokio current-thread runtime",
                shard_dir,
                e,
            )
        })?;
    tokio::task::LocalSet::new().block_on(&rt, fut);
    Ok(())
}

/// The error of an executor that could not be built: `op` on the shard
/// whose folder is `shard_dir`.
fn executor_error(op: &'static str, shard_dir: &Path, e: std::io::Error) -> Error {
    tracing::error!(shard_dir = %shard_dir.display(), error = %e, "{op} failed");
    Error::opening(op, shard_dir, e)
}

/// After a start that failed: delete the directory it created (nothing in
/// it was handed out), so that a start with other settings is not refused
/// for its manifest ([`DataDir::undo_creation`], which logs a failure).
fn undo_creation(dir: Arc<DataDir>) {
    match Arc::try_unwrap(dir) {
        Ok(dir) => DataDir::undo_creation(dir),
        Err(dir) => {
            tracing::warn!(dir = %dir.path().display(), "could not delete the directory a failed start created: it is still open");
        }
    }
}

/// Where a runtime's threads go, given the CPUs it may use (`cpus`, not
/// empty): shard `i` is pinned to `cpus[i % n]`; the shards' io workers get
/// the CPUs of `cpus` without a shard (none when every CPU has one).
///
/// The io workers would inherit their shard thread's one CPU and take it
/// from the shard, so they go where no shard runs. When every CPU has a
/// shard they are left alone: moved to another shard's CPU, a two-shard
/// fill was slower (most likely because the pages they prefault are then
/// in the other core's cache).
fn placement(cpus: &[usize], shards: usize) -> (Vec<usize>, Vec<usize>) {
    let pins: Vec<usize> = (0..shards).map(|i| cpus[i % cpus.len()]).collect();
    let io = cpus.iter().copied().filter(|c| !pins.contains(c)).collect();
    (pins, io)
}

/// A shard thread's one report to [`Runtime::start`]: `Ok` once its shard
/// is open, else why it is not. Shared by the thread and its body; dropped
/// without having been sent (a panic that nothing caught), it reports
/// [`Error::ShardGone`], so that `start` never waits for a thread that has
/// nothing more to say.
struct ReadyReport {
    index: u16,
    tx: std::sync::mpsc::Sender<(u16, Result<()>)>,
    sent: Cell<bool>,
}

impl ReadyReport {
    /// Report `r`, unless a report was sent already.
    fn send(&self, r: Result<()>) {
        if !self.sent.replace(true) {
            // `start` may have stopped listening (it returned a spawn error).
            let _ = self.tx.send((self.index, r));
        }
    }
}

impl Drop for ReadyReport {
    fn drop(&mut self) {
        self.send(Err(Error::ShardGone { shard: self.index }));
    }
}

/// A shard thread's body: open the shard, report it through `ready`, then
/// run the jobs sent to it until told to stop.
async fn serve(b: ShardBuilder, mut rx: UnboundedReceiver<Msg>, ready: Rc<ReadyReport>) {
    let index = b.index();
    #[cfg(feature = "test-support")]
    if test_hooks::take_panic_before_ready(b.dir.path(), index) {
        panic!("shard {index} panicked before it opened (Runtime::panic_before_ready_for_test)");
    }
    let shard = match b.open().await {
        Ok(s) => {
            ready.send(Ok(()));
            s
        }
        Err(e) => {
            ready.send(Err(e));
            return;
        }
    };
    while let Some(msg) = rx.recv().await {
        match msg {
            Msg::Run(job) => {
                let s = shard.clone();
                if let Err(p) = std::panic::catch_unwind(AssertUnwindSafe(move || job(s))) {
                    tracing::error!(shard = index, panic = %panic_message(&*p), "task closure panicked");
                }
            }
            Msg::Stop => break,
            Msg::Crash => panic!("shard {index} crashed on request"),
        }
    }
    shard.finish_frees().await;
}

impl Runtime {
    /// Open (or create) the data directory and start one thread per shard.
    /// Shard `i` is pinned to the `i`-th CPU (wrapping around) of those the
    /// calling thread may use (its affinity mask, read here). With fewer
    /// shards than such CPUs, the kernel's io workers of every shard (which
    /// run its `fallocate`s, `fdatasync`s and prefaults) use the CPUs
    /// without a shard ([`ShardBuilder::io_worker_cpus`], best effort);
    /// otherwise they are left alone (on Linux 6.18 they then stay on their
    /// shard's CPU). Returns once every shard has recovered.
    ///
    /// # Errors
    ///
    /// See [`DataDir::open`] and [`Shard::open`]. Besides:
    /// [`Error::TooManyOpenFiles`] (naming the shard's folder) when a shard
    /// thread cannot build its executor for want of descriptors, or
    /// [`Error::Io`] for another reason; [`Error::TaskPanicked`] when a
    /// shard thread panics before its shard is open; [`Error::Io`] when a
    /// thread cannot be spawned. The first error reported is returned, once
    /// every shard thread started has been stopped and joined, and the data
    /// directory deleted if this start created it (nothing in it was handed
    /// out; a directory that existed, empty, is left empty; the parents a
    /// start made stay). A deletion that fails is logged through `tracing`
    /// and the directory stays: it needs a descriptor for the directory's
    /// lock and one per shard's. (A deletion cut short after it began
    /// leaves a directory every open refuses until [`DataDir::destroy`]
    /// finishes it.)
    pub fn start(cfg: Config) -> Result<Runtime> {
        let cluster = Cluster::open(cfg.clone())?;
        let dir = cluster.dir.clone();
        let use_uring = cfg.io_backend().resolve_env()? != IoBackendChoice::Sync;
        let mut cpus = sys::allowed_cpus();
        if cpus.is_empty() {
            cpus = (0..sys::available_cpus()).collect();
        }
        let (pins, io_cpus) = placement(&cpus, usize::from(cluster.dir.manifest().shard_count));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let id = NEXT_RUNTIME_ID.fetch_add(1, Ordering::Relaxed);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<(u16, Result<()>)>();
        let mut shards = Vec::new();
        let mut spawn_error = None;
        for b in cluster.into_builders() {
            let (tx, rx) = unbounded_channel::<Msg>();
            let ready = ready_tx.clone();
            let index = b.index();
            let shard_dir = dir.shard_dir(index);
            let failures = failures.clone();
            let cpu = pins[usize::from(index)];
            let io_cpus = io_cpus.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("segalloc-shard-{index}"))
                .spawn(move || {
                    // First: a panic anywhere on this thread before the
                    // shard is open still reports (see `ReadyReport`).
                    let ready = Rc::new(ReadyReport {
                        index,
                        tx: ready,
                        sent: Cell::new(false),
                    });
                    SHARD_OF_RUNTIME.with(|c| c.set(id));
                    // The io workers go elsewhere only if the shard is pinned.
                    let b = match sys::pin_thread_to_cpu(cpu) {
                        Ok(()) => b.io_worker_cpus(io_cpus),
                        Err(e) => {
                            tracing::debug!(error = %e, "could not pin shard thread");
                            b
                        }
                    };
                    let body = serve(b, rx, ready.clone());
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        run_executor(use_uring, body, &shard_dir)
                    }));
                    match result {
                        Ok(Ok(())) => {}
                        // No executor: the shard never opened.
                        Ok(Err(e)) => ready.send(Err(e)),
                        Err(p) => {
                            let m =
                                format!("shard {index} thread panicked: {}", panic_message(&*p));
                            tracing::error!("{m}");
                            failures
                                .lock()
                                .expect("failures lock")
                                .push((index, m.clone()));
                            // Ignored if the shard had reported ready.
                            ready.send(Err(Error::TaskPanicked {
                                shard: index,
                                message: m,
                            }));
                        }
                    }
                });
            match spawned {
                Ok(thread) => shards.push(ShardThread {
                    tx,
                    thread: Some(thread),
                }),
                Err(e) => {
                    // The shards after this one are not started; those
                    // before it are stopped below, like after an open error.
                    spawn_error = Some(Error::io("spawn shard thread", None, e));
                    break;
                }
            }
        }
        drop(ready_tx);
        let mut rt = Runtime {
            id,
            dir: dir.clone(),
            shards,
            failures,
        };
        // Every started thread reports exactly once, whatever happens to it.
        let open_error = rt.first_open_error(&ready_rx);
        if let Some(e) = spawn_error.or(open_error) {
            rt.stop_all();
            drop(rt);
            if dir.was_created() {
                undo_creation(dir);
            }
            return Err(e);
        }
        Ok(rt)
    }

    /// Wait until every shard reported its open; the first error, if any.
    fn first_open_error(
        &self,
        ready: &std::sync::mpsc::Receiver<(u16, Result<()>)>,
    ) -> Option<Error> {
        let mut first_err = None;
        for _ in 0..self.shards.len() {
            match ready.recv() {
                Ok((_, Ok(()))) => {}
                Ok((_, Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Err(_) => {
                    first_err.get_or_insert(Error::ShardGone { shard: 0 });
                    break;
                }
            }
        }
        first_err
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Arc<DataDir> {
        &self.dir
    }

    /// Run `f(shard)` as a task on shard `shard`. The closure is `Send`; the
    /// future it returns runs on the shard's thread and need not be.
    ///
    /// The handle resolves to [`Error::TaskPanicked`] if the task panics
    /// (the shard keeps serving), to [`Error::ShardGone`] if the shard is
    /// stopped, and to [`Error::ShardOutOfRange`] for an index at or above
    /// [`shard_count`](Self::shard_count).
    ///
    /// Like `tokio::spawn`, this never waits: each call queues its closure
    /// (about 200 bytes with its handle) until the shard's thread takes it,
    /// with no bound. A caller outside the shards that submits faster than
    /// a shard runs (a loop of [`free`](Self::free) to a busy owner) keeps
    /// what it queued in memory; await the handles, or keep a bounded
    /// number in flight. (Frees one shard forwards to another go through
    /// bounded channels instead: see [`Shard::free`].)
    ///
    /// Inside a shard's task, await the handle: blocking on it there (with
    /// `futures::executor::block_on`) stops that shard's thread, and a task
    /// it waits for on that shard, or on one that waits for it, never runs.
    pub fn spawn_on<F, Fut, T>(&self, shard: usize, f: F) -> JoinHandle<T>
    where
        F: FnOnce(Shard) -> Fut + Send + 'static,
        Fut: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let mut refused = None;
        match self.shards.get(shard) {
            Some(t) => {
                let _ = t.tx.send(Msg::Run(shard::job(f, tx)));
            }
            None => {
                refused = Some(Error::ShardOutOfRange {
                    shard,
                    shard_count: self.shards.len(),
                });
            }
        }
        JoinHandle {
            rx,
            shard: u16::try_from(shard).unwrap_or(u16::MAX),
            refused,
        }
    }

    /// The handle named `name` on whichever shard holds that root (roots
    /// are kept per shard; the lowest shard index wins if several do).
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] when a shard is stopped.
    pub async fn root(&self, name: &str) -> Result<Option<Handle>> {
        let asks: Vec<_> = (0..self.shard_count())
            .map(|i| {
                let name = name.to_string();
                self.spawn_on(i, move |s| async move { s.root(&name) })
            })
            .collect();
        for ask in asks {
            if let Some(h) = ask.await? {
                return Ok(Some(h));
            }
        }
        Ok(None)
    }

    /// Wait until every cross-shard free acknowledged so far (on any shard)
    /// is applied by its owner.
    ///
    /// # Errors
    ///
    /// The first error of a shard's [`Shard::flush_frees`] (a shard that is
    /// gone or poisoned), once every shard's flush is done; else
    /// [`Error::FreesRejected`] with every shard's rejected frees in one
    /// count. The shards' reports are taken when their flushes end: a
    /// call dropped before it returns, or one that returns another error,
    /// loses them.
    pub async fn flush(&self) -> Result<()> {
        let mut first = None;
        let mut rejected: Option<Error> = None;
        for f in self.flush_all() {
            match f.await.and_then(|r| r) {
                Ok(()) => {}
                // Every shard's report, in one.
                Err(Error::FreesRejected { count, first }) => match &mut rejected {
                    Some(Error::FreesRejected { count: n, first: f }) => {
                        *n += count;
                        if f.is_none() {
                            *f = first;
                        }
                    }
                    _ => rejected = Some(Error::FreesRejected { count, first }),
                },
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        first.or(rejected).map_or(Ok(()), Err)
    }

    /// Free `handle` on its owner shard (from outside any shard): a task of
    /// [`spawn_on`](Self::spawn_on), queued without bound like every one.
    pub fn free(&self, handle: Handle) -> JoinHandle<Result<()>> {
        self.spawn_on(
            handle.shard() as usize,
            move |s| async move { s.free(handle) },
        )
    }

    /// Make everything acknowledged so far durable against power loss on
    /// every shard, including every cross-shard free forwarded before this
    /// call: first every owner has applied them ([`flush`](Self::flush)),
    /// then every shard syncs.
    ///
    /// A shard that is gone does not keep the others from syncing.
    ///
    /// # Errors
    ///
    /// The first shard's error: [`flush`](Self::flush)'s (a shard gone or
    /// poisoned), else a shard's failed sync, else
    /// [`Error::FreesRejected`] when owners rejected forwarded frees and
    /// every shard synced.
    pub async fn sync(&self) -> Result<()> {
        let flushed = self.flush().await;
        let mut first = None;
        let syncs: Vec<_> = (0..self.shard_count())
            .map(|i| self.spawn_on(i, |s| async move { s.sync().await }))
            .collect();
        for s in syncs {
            if let Err(e) = s.await.and_then(|r| r) {
                first.get_or_insert(e);
            }
        }
        // A flush that failed comes first, then a failed sync; a report of
        // rejected frees only when every shard synced.
        match flushed {
            Err(e) if !matches!(e, Error::FreesRejected { .. }) => Err(e),
            flushed => first.map_or(flushed, Err),
        }
    }

    /// Counters of every shard, in shard order.
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] when a shard is stopped.
    pub async fn stats(&self) -> Result<RuntimeStats> {
        let mut shards = Vec::new();
        for i in 0..self.shard_count() {
            shards.push(self.spawn_on(i, |s| async move { s.stats() }).await?);
        }
        Ok(RuntimeStats { shards })
    }

    /// Make shard `shard` of the data directory `dir` panic on its thread
    /// before it opens, at the next start of a runtime there (tests of a
    /// failed start).
    #[cfg(feature = "test-support")]
    pub fn panic_before_ready_for_test(dir: impl Into<std::path::PathBuf>, shard: u16) {
        test_hooks::panic_before_ready(dir.into(), shard);
    }

    /// Make a shard thread panic outside any task (tests of fault isolation).
    #[cfg(feature = "test-support")]
    pub fn crash_shard_for_test(&self, shard: usize) {
        if let Some(t) = self.shards.get(shard) {
            let _ = t.tx.send(Msg::Crash);
        }
    }

    /// Every shard sends its buffered cross-shard frees and waits until the
    /// owners applied them.
    fn flush_all(&self) -> Vec<JoinHandle<Result<()>>> {
        (0..self.shard_count())
            .map(|i| self.spawn_on(i, |s| async move { s.flush_frees().await }))
            .collect()
    }

    /// Whether the calling thread is one of this runtime's shard threads,
    /// which cannot wait for the shards (itself included).
    fn on_own_shard(&self) -> bool {
        SHARD_OF_RUNTIME.with(Cell::get) == self.id
    }

    fn stop_all(&mut self) {
        if self.on_own_shard() {
            // Waiting here would wait for this very thread: ask every shard
            // to stop and let the threads finish on their own. Each sends
            // what it acknowledged for the others and applies what they
            // send it before it closes (`Shard::finish_frees`).
            for t in &mut self.shards {
                let _ = t.tx.send(Msg::Stop);
                drop(t.thread.take());
            }
            return;
        }
        self.close_mesh();
        self.stop_threads();
    }

    /// Every shard stops accepting cross-shard frees and waits until the
    /// owners applied what it acknowledged, while every shard still drains:
    /// no acknowledged free is lost.
    fn close_mesh(&self) {
        let closing: Vec<_> = (0..self.shard_count())
            .map(|i| {
                self.spawn_on(i, |s| async move {
                    s.close_mesh();
                    s.flush_frees().await
                })
            })
            .collect();
        for c in closing {
            match futures::executor::block_on(c) {
                Ok(Err(e @ Error::FreesRejected { .. })) => {
                    tracing::warn!(error = %e, "forwarded frees rejected by their owners");
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "cross-shard frees not delivered at shutdown");
                }
                _ => {}
            }
        }
    }

    /// Stop every shard thread and wait for it.
    fn stop_threads(&mut self) {
        for t in &self.shards {
            let _ = t.tx.send(Msg::Stop);
        }
        for t in &mut self.shards {
            if let Some(th) = t.thread.take() {
                let _ = th.join();
            }
        }
    }

    /// Stop accepting cross-shard frees and drain them, sync every shard,
    /// stop the threads (unmapping and closing everything), and report what
    /// went wrong, if anything. Tasks still running on the shards meanwhile
    /// are dropped when their shard stops; what they did after the sync is
    /// applied (durable against a process crash) but not synced.
    ///
    /// Call it (and [`sync`](Self::sync) through `block_on`) from a thread
    /// of your own, not from a task on a shard: it waits for every shard,
    /// that one included, which cannot run while it waits. Called on a
    /// shard's thread it returns [`Error::NoExecutor`] at once; the runtime
    /// is then dropped there, which asks the shards to stop without waiting
    /// for them (nothing acknowledged is lost, as with any drop).
    ///
    /// # Errors
    ///
    /// [`Error::NoExecutor`] on one of the runtime's own shard threads;
    /// [`Error::TaskPanicked`] naming a shard thread that panicked during
    /// the runtime's life (the surviving shards are still synced), else the
    /// sync error.
    pub fn shutdown(mut self) -> Result<()> {
        if self.on_own_shard() {
            return Err(Error::NoExecutor {
                call: "Runtime::shutdown",
                needs: "a thread that is not one of the runtime's shard threads",
            });
        }
        let _span = tracing::info_span!("shutdown").entered();
        // No cross-shard free is acknowledged after this, so the sync
        // covers every one that was.
        self.close_mesh();
        let sync = futures::executor::block_on(self.sync());
        self.stop_threads();
        let failures = std::mem::take(&mut *self.failures.lock().expect("failures lock"));
        // A crashed shard thread is the cause, the sync's `ShardGone` only
        // its consequence: report the crash.
        if let Some((shard, message)) = failures.into_iter().next() {
            if let Err(e) = sync {
                tracing::error!(error = %e, "sync at shutdown failed");
            }
            return Err(Error::TaskPanicked { shard, message });
        }
        sync
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Without shutdown: stop the threads; each sends and applies what is
        // buffered before its shard closes. Everything acknowledged is
        // already in MAP_SHARED pages, as after a process crash.
        self.stop_all();
    }
}

/// What the test-support calls ask of the shard threads.
#[cfg(feature = "test-support")]
mod test_hooks {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Shards to panic before they open, by data directory, once each.
    static PANIC_BEFORE_READY: Mutex<Vec<(PathBuf, u16)>> = Mutex::new(Vec::new());

    pub(super) fn panic_before_ready(dir: PathBuf, shard: u16) {
        PANIC_BEFORE_READY
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((dir, shard));
    }

    /// Whether shard `shard` of `dir` is to panic (forgotten once asked).
    pub(super) fn take_panic_before_ready(dir: &Path, shard: u16) -> bool {
        let same = |a: &Path| {
            a == dir
                || matches!(
                    (std::fs::canonicalize(a), std::fs::canonicalize(dir)),
                    (Ok(x), Ok(y)) if x == y
                )
        };
        let mut asked = PANIC_BEFORE_READY.lock().unwrap_or_else(|e| e.into_inner());
        match asked.iter().position(|(d, s)| *s == shard && same(d)) {
            Some(i) => {
                asked.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

/// Counters of a runtime.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RuntimeStats {
    /// Each shard's.
    pub shards: Vec<ShardStats>,
}

impl RuntimeStats {
    /// Live allocations over all shards.
    pub fn allocations_live(&self) -> u64 {
        self.shards.iter().map(|s| s.alloc.allocations_live).sum()
    }
    /// Open descriptors over all shards.
    pub fn open_fds(&self) -> usize {
        self.shards.iter().map(|s| s.files.open).sum()
    }
    /// Mapped windows over all shards.
    pub fn mapped_windows(&self) -> usize {
        self.shards.iter().map(|s| s.mappings.mapped_windows).sum()
    }
    /// Cross-shard frees sent over all shards.
    pub fn cross_frees_sent(&self) -> u64 {
        self.shards.iter().map(|s| s.mesh.cross_frees_sent).sum()
    }
    /// Cross-shard frees received and applied over all shards.
    pub fn cross_frees_received(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.mesh.cross_frees_received)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::placement;

    #[test]
    fn shards_take_cpus_in_order_and_io_workers_the_rest() {
        // One shard on two CPUs: the io workers get the other one.
        assert_eq!(placement(&[0, 1], 1), (vec![0], vec![1]));
        // A shard on every CPU: the io workers are left alone.
        assert_eq!(placement(&[0, 1], 2), (vec![0, 1], vec![]));
        // More shards than CPUs: they wrap around.
        assert_eq!(placement(&[0, 1], 3), (vec![0, 1, 0], vec![]));
        // A cpuset with holes (`CPUAffinity=0 2 4 6`): its CPUs, not 0..n.
        assert_eq!(placement(&[0, 2, 4, 6], 2), (vec![0, 2], vec![4, 6]));
        assert_eq!(placement(&[3], 2), (vec![3, 3], vec![]));
    }
}
