//! The shard's control ring: every operation that may block the shard's
//! thread (growing a file, madvise, fsync) as a future.
//!
//! Two backends share one interface, [`Ring`]:
//!
//! * **io_uring** (io-uring 0.7): operations are submitted to a ring owned by
//!   the shard; the kernel runs them on its own workers while the shard's
//!   other tasks keep running. Completions wake the shard through an eventfd
//!   registered with the ring and watched by the tokio reactor (`AsyncFd`), so
//!   the ring works under tokio-uring and under a plain tokio current-thread
//!   runtime alike. Opcodes the kernel lacks (probed at start-up, e.g.
//!   `IORING_OP_FTRUNCATE` before Linux 6.9) run as plain syscalls.
//! * **sync**: plain blocking syscalls, used when io_uring cannot be set up
//!   (old kernel, `io_uring_disabled`, seccomp) or when forced with
//!   `SEGALLOC_IO=sync`.
//!
//! An operation interrupted by a signal (`EINTR`) runs again, up to
//! [`MAX_EINTR_RETRIES`] times: every control operation is idempotent. With
//! the `fault-injection` feature, `io::faults` makes chosen operations fail
//! (tests only).
//!
//! **Architecture invariant:** an operation's resources (its fd, the window
//! it advises) are owned by the ring's in-flight table until the kernel
//! reports completion, so dropping an [`Op`] early never lets the kernel touch
//! a closed fd or an unmapped range. The ring releases them by itself once
//! the kernel is done (`reap.rs`: a task drives the ring while such
//! operations remain), so no caller has to poll the ring for them; a caller
//! that needs a descriptor or a window back waits for the release
//! (`Ring::released`, or its own wait list).

#[cfg(feature = "fault-injection")]
pub mod faults;
mod reap;
mod uring;

use std::any::Any;
use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Once;
use std::task::{Context, Poll};

use crate::error::{Error, Result};
use crate::sys;

/// Which io backend a shard's control ring uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IoBackendChoice {
    /// io_uring when it can be set up, plain syscalls otherwise. The
    /// `SEGALLOC_IO` environment variable (`uring` or `sync`) overrides it.
    #[default]
    Auto,
    /// io_uring, or an error when unavailable.
    Uring,
    /// Plain blocking syscalls.
    Sync,
}

impl IoBackendChoice {
    /// The choice after applying `SEGALLOC_IO` (only when `self` is `Auto`).
    pub fn resolve_env(self) -> Result<IoBackendChoice> {
        if self != IoBackendChoice::Auto {
            return Ok(self);
        }
        match std::env::var("SEGALLOC_IO") {
            Ok(v) => match v.as_str() {
                "uring" => Ok(IoBackendChoice::Uring),
                "sync" => Ok(IoBackendChoice::Sync),
                "" | "auto" => Ok(IoBackendChoice::Auto),
                other => Err(Error::InvalidConfig(format!(
                    "SEGALLOC_IO must be `uring`, `sync` or `auto`, not {other:?}"
                ))),
            },
            Err(_) => Ok(IoBackendChoice::Auto),
        }
    }
}

/// The backend a ring runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring.
    Uring,
    /// Plain blocking syscalls.
    Sync,
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoBackend::Uring => "io_uring",
            IoBackend::Sync => "sync",
        })
    }
}

/// Counters of one ring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RingStats {
    /// Operations submitted to io_uring.
    pub submitted: u64,
    /// Operations whose completion was reaped.
    pub completed: u64,
    /// Operations that completed with an error.
    pub failed: u64,
    /// Operations run as plain syscalls (sync backend or unsupported opcode).
    pub sync_ops: u64,
    /// Operations whose future was dropped before completion.
    pub abandoned: u64,
    /// Operations run again because they were interrupted (`EINTR`).
    pub eintr_retries: u64,
    /// Operations the kernel may still run: submitted (or left queued by a
    /// failed submission) and not reaped yet, whether a task awaits them or
    /// they were dropped. A reading, not a counter: as of the call.
    pub in_flight: u64,
}

/// How many times an operation interrupted by a signal (`EINTR`) is run
/// again before the error is returned. Every control operation is
/// idempotent (`fallocate`, `ftruncate`, `madvise`, `fsync`), so a retry is
/// safe; `EINTR` reports an interruption, not a lost write.
pub const MAX_EINTR_RETRIES: u32 = 16;
/// Former name of [`MAX_EINTR_RETRIES`].
#[deprecated(since = "0.1.0", note = "renamed to `MAX_EINTR_RETRIES`")]
pub const EINTR_RETRIES_MAX: u32 = MAX_EINTR_RETRIES;

/// The largest range one `madvise` submission covers. io_uring carries a
/// madvise length in a 32-bit field, so a wider range is advised in pieces
/// of this size, one after the other (on both backends, alike).
pub(crate) const MADVISE_CHUNK_BYTES: usize = 1 << 30;

/// What an operation does.
#[derive(Clone, Copy, Debug)]
pub(crate) enum OpKind {
    Fallocate {
        mode: i32,
        offset: u64,
        len: u64,
    },
    Ftruncate {
        len: u64,
    },
    Madvise {
        addr: *mut u8,
        len: usize,
        advice: i32,
    },
    Fsync {
        datasync: bool,
    },
}

impl OpKind {
    /// A `fallocate` that deallocates its range (`FALLOC_FL_PUNCH_HOLE`):
    /// `trim`'s punch.
    pub(crate) fn is_punch(&self) -> bool {
        matches!(self, OpKind::Fallocate { mode, .. } if mode & nix::libc::FALLOC_FL_PUNCH_HOLE != 0)
    }

    /// An operation that does harm if it lands after a later one: a punch
    /// (it zeroes a range reused since) or an `ftruncate` (it cuts back a
    /// file grown since). One left queued by a failed submission is not
    /// run again after `EINTR`: the queued one still runs, and a second
    /// one reporting success would let its caller go on before it lands.
    pub(crate) fn must_not_land_late(&self) -> bool {
        self.is_punch() || matches!(self, OpKind::Ftruncate { .. })
    }

    fn name(&self) -> &'static str {
        match self {
            OpKind::Fallocate { .. } => "fallocate",
            OpKind::Ftruncate { .. } => "ftruncate",
            OpKind::Madvise { .. } => "madvise",
            OpKind::Fsync { datasync: true } => "fdatasync",
            OpKind::Fsync { datasync: false } => "fsync",
        }
    }
}

/// What the kernel may use while an operation is in flight. Held by the ring
/// (not the future) until completion.
#[derive(Clone)]
pub(crate) struct Resources {
    pub(crate) fd: Option<Rc<OwnedFd>>,
    /// Kept alive only; never read.
    #[allow(dead_code)]
    pub(crate) hold: Option<Rc<dyn Any>>,
}

/// A shard's control ring. Cheap to clone (`Rc`); `!Send` by design.
///
/// ```no_run
/// # async fn demo() -> segalloc::Result<()> {
/// use segalloc::io::Ring;
/// use segalloc::config::IoBackendChoice;
/// let ring = Ring::new(IoBackendChoice::Auto)?;
/// println!("control ring backend: {}", ring.backend());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Ring {
    inner: Rc<RingInner>,
}

struct RingInner {
    uring: Option<uring::Driver>,
    stats: Cell<RingStats>,
    /// A reaper task runs for this ring (`reap.rs`).
    reaping: Cell<bool>,
    /// Shared with the reaper across threads: set when it was polled on
    /// another thread than the ring's (it then cannot reap).
    reaper_link: std::sync::Arc<reap::Link>,
}

static FALLBACK_LOGGED: Once = Once::new();

impl Ring {
    /// Open a ring with the given backend choice (`SEGALLOC_IO` overrides
    /// `Auto`).
    ///
    /// # Errors
    ///
    /// [`Error::UringUnavailable`] when io_uring is forced but cannot be set
    /// up; [`Error::InvalidConfig`] for a bad `SEGALLOC_IO` value. With `Auto`
    /// an unavailable io_uring is not an error: the ring falls back to plain
    /// syscalls and says so once through `tracing`.
    pub fn new(choice: IoBackendChoice) -> Result<Ring> {
        let choice = choice.resolve_env()?;
        let uring = match choice {
            IoBackendChoice::Sync => None,
            IoBackendChoice::Uring => {
                Some(uring::Driver::new().map_err(|source| Error::UringUnavailable { source })?)
            }
            IoBackendChoice::Auto => match uring::Driver::new() {
                Ok(d) => Some(d),
                Err(e) => {
                    FALLBACK_LOGGED.call_once(|| {
                        tracing::warn!(
                            error = %e,
                            cause = likely_cause(&e),
                            "io_uring unavailable; segalloc falls back to plain syscalls"
                        );
                    });
                    None
                }
            },
        };
        Ok(Ring {
            inner: Rc::new(RingInner {
                uring,
                stats: Cell::new(RingStats::default()),
                reaping: Cell::new(false),
                reaper_link: std::sync::Arc::default(),
            }),
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> IoBackend {
        if self.inner.uring.is_some() {
            IoBackend::Uring
        } else {
            IoBackend::Sync
        }
    }

    /// Counters.
    pub fn stats(&self) -> RingStats {
        let mut s = self.inner.stats.get();
        s.in_flight = self
            .inner
            .uring
            .as_ref()
            .map_or(0, |d| d.in_flight() as u64);
        s
    }

    /// Let the kernel's io workers that run this thread's blocking
    /// operations (`fallocate`, `fdatasync`, `MADV_POPULATE_WRITE`) use the
    /// CPUs `cpus` only (`IORING_REGISTER_IOWQ_AFF`; the workers are shared
    /// by every ring of the thread). They otherwise inherit the CPUs of the
    /// thread, so on a thread pinned to one CPU they take that CPU from it.
    /// Call it before the thread's first operation that reaches a worker:
    /// workers that exist already keep their CPUs (seen on Linux 6.18).
    /// [`Runtime`](crate::Runtime) gives them the CPUs no shard is pinned
    /// to, if any. Nothing to do with plain syscalls.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an empty list or a CPU number at or
    /// above `CPU_SETSIZE` (1024); the registration's error otherwise (e.g.
    /// before Linux 5.14, or a set with no CPU the process may use, where the
    /// kernel refuses it).
    pub fn set_io_worker_cpus(&self, cpus: &[usize]) -> Result<()> {
        let Some(set) = crate::sys::cpu_set(cpus) else {
            return Err(Error::InvalidConfig(format!(
                "io worker CPUs must be a non-empty list of CPU numbers below 1024, got {cpus:?}"
            )));
        };
        match &self.inner.uring {
            Some(d) => d
                .set_worker_cpus(&set)
                .map_err(|e| Error::io("register io worker CPUs", None, e)),
            None => Ok(()),
        }
    }

    /// Opcodes that run as plain syscalls because the kernel lacks them.
    pub fn unsupported_opcodes(&self) -> Vec<&'static str> {
        match &self.inner.uring {
            Some(d) => d.unsupported(),
            None => Vec::new(),
        }
    }

    /// `fallocate(fd, mode, offset, len)`.
    pub fn fallocate(&self, fd: &Rc<OwnedFd>, mode: i32, offset: u64, len: u64) -> Op {
        self.submit(
            OpKind::Fallocate { mode, offset, len },
            Resources {
                fd: Some(fd.clone()),
                hold: None,
            },
        )
    }

    /// `ftruncate(fd, len)`.
    pub fn ftruncate(&self, fd: &Rc<OwnedFd>, len: u64) -> Op {
        self.submit(
            OpKind::Ftruncate { len },
            Resources {
                fd: Some(fd.clone()),
                hold: None,
            },
        )
    }

    /// `fsync(fd)` or `fdatasync(fd)`.
    pub fn fsync(&self, fd: &Rc<OwnedFd>, datasync: bool) -> Op {
        self.submit(
            OpKind::Fsync { datasync },
            Resources {
                fd: Some(fd.clone()),
                hold: None,
            },
        )
    }

    /// `madvise(addr, len, advice)` on memory that `hold` keeps mapped.
    ///
    /// # Safety
    ///
    /// `[addr, addr + len)` must lie inside a mapping that stays mapped as
    /// long as `hold` is alive (the ring keeps `hold` until the kernel is
    /// done), and `advice` must not discard data still needed.
    pub unsafe fn madvise(&self, hold: Rc<dyn Any>, addr: *mut u8, len: usize, advice: i32) -> Op {
        let first = len.min(MADVISE_CHUNK_BYTES);
        let mut op = self.submit(
            OpKind::Madvise {
                addr,
                len: first,
                advice,
            },
            Resources {
                fd: None,
                hold: Some(hold),
            },
        );
        op.rest = (len > first).then(|| (addr.wrapping_add(first), len - first));
        op
    }

    /// A wait that ends when the ring next releases the fd or window of an
    /// operation no task polls: dropped before completion, or kept for a
    /// later task (a dropped sync's `fdatasync`, `Op::detach`); the ring
    /// reaps those by itself.
    /// `None` when the ring holds none (always on the sync backend), or when
    /// no reaper can run here (not on a tokio current-thread runtime, or one
    /// that polls its tasks on another thread than the ring's): then they
    /// are released only by the next operation polled on the ring. A wait
    /// also ends when the reaper finds it cannot run.
    pub(crate) fn released(&self) -> Option<reap::Released> {
        let d = self.inner.uring.as_ref()?;
        if d.unattended() == 0 || self.inner.reaper_link.is_lost() {
            return None;
        }
        reap::ensure(self);
        self.inner
            .reaping
            .get()
            .then(|| reap::Released::new(d.released().wait(), &self.inner.reaper_link))
    }

    /// Wake the waits of [`released`](Self::released): the fd of an
    /// operation that was kept for a later task, and which that task has
    /// now awaited, is let go (its completion woke nobody: a task polled
    /// it).
    pub(crate) fn wake_released(&self) {
        if let Some(d) = &self.inner.uring {
            d.released().wake_all();
        }
    }

    fn bump(&self, f: impl FnOnce(&mut RingStats)) {
        let mut s = self.inner.stats.get();
        f(&mut s);
        self.inner.stats.set(s);
    }

    fn submit(&self, kind: OpKind, res: Resources) -> Op {
        let retry = Some(res.clone());
        let mut op = self.start(kind, res);
        op.retry = retry;
        op
    }

    /// Start one attempt of an operation.
    fn start(&self, kind: OpKind, res: Resources) -> Op {
        let mut fail_at_completion = None;
        let mut fail_submit = None;
        if let Some(f) = injected_fault(&kind) {
            let uring = self.inner.uring.as_ref().is_some_and(|d| d.supports(&kind));
            if f.at_completion && uring {
                fail_at_completion = Some(f.errno);
            } else if f.after_push && uring {
                fail_submit = Some(io::Error::from_raw_os_error(f.errno));
            } else {
                // A planned failure (feature `fault-injection`): before the
                // submission or the syscall, on either backend.
                self.bump(|s| s.failed += 1);
                return Op::ready(self, kind, Err(io::Error::from_raw_os_error(f.errno)));
            }
        }
        if let Some(d) = &self.inner.uring
            && d.supports(&kind)
        {
            match d.submit(kind, res, fail_submit) {
                Ok(key) => {
                    self.bump(|s| s.submitted += 1);
                    return Op {
                        ring: self.clone(),
                        kind,
                        state: OpState::InFlight(key),
                        retry: None,
                        attempts: 0,
                        rest: None,
                        fail_at_completion,
                        detached: false,
                        left_queued: None,
                    };
                }
                Err((e, not_sent)) => {
                    self.bump(|s| s.failed += 1);
                    // A failed enter leaves the entry queued and abandoned:
                    // the reaper submits and reaps it.
                    reap::ensure(self);
                    let mut op = Op::ready(self, kind, Err(e));
                    if let uring::NotSent::Queued(key) = not_sent {
                        op.left_queued = Some(key);
                    }
                    return op;
                }
            }
        }
        // Plain syscall, run at once (the fallback blocks by definition).
        let result = run_sync(kind, &res);
        self.bump(|s| {
            s.sync_ops += 1;
            if result.is_err() {
                s.failed += 1;
            }
        });
        Op::ready(self, kind, result)
    }
}

/// The injected failure of an operation (feature `fault-injection`).
#[cfg(feature = "fault-injection")]
fn injected_fault(kind: &OpKind) -> Option<faults::Injected> {
    faults::take_op(kind)
}

/// What a planned failure of an operation is (none without the feature).
#[cfg(not(feature = "fault-injection"))]
struct Injected {
    errno: i32,
    at_completion: bool,
    after_push: bool,
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
fn injected_fault(_kind: &OpKind) -> Option<Injected> {
    None
}

/// Whether this thread can set up an io_uring: a ring of one entry, closed
/// at once. (The shard executor tries it before tokio-uring's runtime,
/// which leaks the descriptors of the tokio runtime it builds first when
/// its own ring then cannot be set up.)
pub(crate) fn probe_uring() -> io::Result<()> {
    uring::probe()
}

/// The injected failure of the `mmap` of a window (feature
/// `fault-injection`); always `None` without the feature.
#[inline(always)]
pub(crate) fn injected_mmap_fault() -> Option<io::Error> {
    #[cfg(feature = "fault-injection")]
    {
        faults::take_mmap()
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        None
    }
}

/// The injected failure of an `io_uring_enter` (feature `fault-injection`);
/// always `None` without the feature.
#[inline(always)]
pub(crate) fn injected_enter_fault() -> Option<io::Error> {
    #[cfg(feature = "fault-injection")]
    {
        faults::take_enter()
    }
    #[cfg(not(feature = "fault-injection"))]
    {
        None
    }
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("backend", &self.backend())
            .field("stats", &self.stats())
            .finish()
    }
}

fn likely_cause(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(nix::libc::ENOSYS) => "kernel without io_uring (< 5.1) or io_uring compiled out",
        Some(nix::libc::EPERM) => {
            "io_uring blocked by a seccomp profile or kernel.io_uring_disabled=2 (or 1 without the io_uring group)"
        }
        Some(nix::libc::ENOMEM) => "RLIMIT_MEMLOCK too low for the ring (kernels before 5.12)",
        _ => "unknown",
    }
}

fn run_sync(kind: OpKind, res: &Resources) -> io::Result<()> {
    let fd = || {
        res.fd
            .as_ref()
            .map(|f| f.as_raw_fd())
            .expect("fd-based op carries its fd")
    };
    match kind {
        OpKind::Fallocate { mode, offset, len } => sys::fallocate(fd(), mode, offset, len),
        OpKind::Ftruncate { len } => sys::ftruncate(fd(), len),
        OpKind::Fsync { datasync } => sys::fsync(fd(), datasync),
        // SAFETY: `Ring::madvise`'s contract: the range lies in a mapping kept
        // alive by `res.hold`, which we hold for the duration of the call.
        OpKind::Madvise { addr, len, advice } => unsafe { sys::madvise(addr, len, advice) },
    }
}

enum OpState {
    InFlight(usize),
    Ready(Option<io::Result<()>>),
    Done,
}

/// One control operation. Resolves to its result; may be dropped at any time.
///
/// An operation interrupted by a signal (`EINTR`) is run again, up to
/// [`MAX_EINTR_RETRIES`] times, before the error is returned.
#[must_use = "an Op does nothing useful unless awaited"]
pub struct Op {
    ring: Ring,
    kind: OpKind,
    state: OpState,
    /// The operation's resources again, for a retry after `EINTR` (the ring
    /// holds the ones of the attempt in flight). Dropped on completion.
    retry: Option<Resources>,
    attempts: u32,
    /// A madvise range still to advise after this piece: `(addr, len)`.
    rest: Option<(*mut u8, usize)>,
    /// The errno its completion is replaced by (an injected fault, feature
    /// `fault-injection`).
    fail_at_completion: Option<i32>,
    /// Kept for a later task, which has not polled it yet (`detach`): a
    /// retry's attempt is detached too.
    detached: bool,
    /// The last attempt's submission failed after its entry was queued:
    /// it is reported failed, yet reaches the kernel with a later
    /// submission (see [`left_queued`](Self::left_queued)): the key of
    /// its entry, which the ring keeps until the kernel is done with it.
    left_queued: Option<usize>,
}

impl Op {
    /// The task that polled this operation stops polling it, but the
    /// operation is kept and awaited later, maybe by another task: see
    /// `Driver::detach`. Without this, the ring's completions waited for a
    /// poll of the task that left (other tasks' operations hung).
    pub(crate) fn detach(&mut self) {
        self.detached = true;
        if let OpState::InFlight(key) = self.state
            && let Some(d) = &self.ring.inner.uring
        {
            d.detach(key);
            // Nobody polls it now: the reaper reaps its completion, which
            // releases its fd (a later `Ring::released` waits for that).
            reap::ensure(&self.ring);
        }
    }

    /// Keep no resources for a retry after `EINTR`: an interrupted attempt
    /// then ends the operation with that error. For an operation kept only
    /// to learn when the kernel is done with it (a dropped `trim`'s punch),
    /// so that it holds its descriptor no longer than the kernel does (the
    /// ring releases its own copy at the completion).
    pub(crate) fn release_retry(&mut self) {
        self.retry = None;
    }

    fn ready(ring: &Ring, kind: OpKind, result: io::Result<()>) -> Op {
        Op {
            ring: ring.clone(),
            kind,
            state: OpState::Ready(Some(result)),
            retry: None,
            attempts: 0,
            rest: None,
            fail_at_completion: None,
            detached: false,
            left_queued: None,
        }
    }

    /// Whether the operation was reported failed while its entry stayed
    /// queued in the ring (an `io_uring_enter` failed after the push): the
    /// kernel runs it later, with another submission, unordered with the
    /// operations submitted with it. A caller for whom that matters (a
    /// punch, which must not land after a later write to its range) must
    /// not take the failure for the operation's end.
    pub(crate) fn left_queued(&self) -> bool {
        self.left_queued.is_some()
    }

    /// Whether the kernel may still run the operation: in flight, or left
    /// queued by a failed submission and not reaped yet. Without waiting
    /// (the completion queue is reaped). An operation in flight stays so
    /// for this check until its result is taken
    /// ([`try_complete`](Self::try_complete) or a poll), which a detached
    /// one's completion does not need.
    pub(crate) fn kernel_may_run(&self) -> bool {
        let Some(d) = &self.ring.inner.uring else {
            return false;
        };
        match (self.state_key(), self.left_queued) {
            (Some(key), _) => d.running(key, false),
            (None, Some(key)) => d.running(key, true),
            (None, None) => false,
        }
    }

    /// Block this thread until the kernel is done with the operation (see
    /// [`kernel_may_run`](Self::kernel_may_run)), for a caller that cannot
    /// await and must not let the operation outlive it (a `Drop`). Its
    /// result is kept for [`try_complete`](Self::try_complete).
    ///
    /// # Errors
    ///
    /// When `io_uring_enter` fails in a way that cannot be waited through:
    /// the kernel may then still run the operation.
    pub(crate) fn wait_blocking(&self) -> io::Result<()> {
        let Some(d) = &self.ring.inner.uring else {
            return Ok(());
        };
        match (self.state_key(), self.left_queued) {
            (Some(key), _) => d.wait_blocking(key, false),
            (None, Some(key)) => d.wait_blocking(key, true),
            (None, None) => Ok(()),
        }
    }

    /// The ring key of the attempt in flight, if any.
    fn state_key(&self) -> Option<usize> {
        match self.state {
            OpState::InFlight(key) => Some(key),
            _ => None,
        }
    }

    /// After a result: start another attempt if it was interrupted and a
    /// retry is allowed; otherwise the result to return. A punch or an
    /// `ftruncate` left queued is not retried
    /// ([`OpKind::must_not_land_late`]): it still runs, and a second one
    /// reporting success would let its caller go on before the first lands
    /// (a second allocating `fallocate`, advice or `fdatasync` does no such
    /// harm).
    fn retry_or(&mut self, r: io::Result<()>) -> Option<io::Result<()>> {
        let interrupted = matches!(&r, Err(e) if e.raw_os_error() == Some(nix::libc::EINTR));
        if interrupted
            && !(self.left_queued.is_some() && self.kind.must_not_land_late())
            && self.attempts < MAX_EINTR_RETRIES
            && let Some(res) = self.retry.clone()
        {
            self.attempts += 1;
            self.ring.bump(|s| s.eintr_retries += 1);
            self.start_next(res);
            return None;
        }
        if r.is_ok()
            && let Some((addr, len)) = self.rest.take()
            && let OpKind::Madvise { advice, .. } = self.kind
            && let Some(res) = self.retry.clone()
        {
            // The next piece of a madvise wider than one submission.
            let piece = len.min(MADVISE_CHUNK_BYTES);
            self.kind = OpKind::Madvise {
                addr,
                len: piece,
                advice,
            };
            self.rest = (len > piece).then(|| (addr.wrapping_add(piece), len - piece));
            self.attempts = 0;
            self.start_next(res);
            return None;
        }
        self.retry = None;
        self.rest = None;
        Some(r)
    }

    /// Start the next attempt (or piece) of the operation, detached like
    /// this one if it is (see [`detach`](Self::detach)).
    fn start_next(&mut self, res: Resources) {
        let mut next = self.ring.start(self.kind, res);
        self.state = std::mem::replace(&mut next.state, OpState::Done);
        self.fail_at_completion = next.fail_at_completion.take();
        self.left_queued = next.left_queued;
        if self.detached {
            self.detach();
        }
    }

    /// The operation's name (`"fallocate"`, `"madvise"`, …).
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }
}

impl Op {
    /// The operation's result if it completed, without waiting and without
    /// registering a waker. Polling an `Op` with a waker that does nothing
    /// would take the ring's completion watch from the task that waits on
    /// it (the eventfd keeps one waker) and leave that task asleep: use
    /// this instead to check an operation nobody awaits.
    pub(crate) fn try_complete(&mut self) -> Option<io::Result<()>> {
        match self.advance(|d, key| d.try_take(key).map_or(Poll::Pending, Poll::Ready)) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }

    /// Drive the operation to its result, asking `take` for the completion
    /// of the attempt in flight; a failed attempt is retried (`retry_or`).
    fn advance(
        &mut self,
        mut take: impl FnMut(&uring::Driver, usize) -> Poll<io::Result<()>>,
    ) -> Poll<io::Result<()>> {
        loop {
            let r = match &mut self.state {
                OpState::Ready(r) => {
                    let r = r.take().expect("Op polled after completion");
                    self.state = OpState::Done;
                    r
                }
                OpState::InFlight(key) => {
                    let key = *key;
                    let d = self
                        .ring
                        .inner
                        .uring
                        .as_ref()
                        .expect("in-flight op has a ring");
                    let Poll::Ready(mut res) = take(d, key) else {
                        return Poll::Pending;
                    };
                    if let Some(errno) = self.fail_at_completion.take() {
                        res = Err(io::Error::from_raw_os_error(errno));
                    }
                    self.state = OpState::Done;
                    self.ring.bump(|s| {
                        s.completed += 1;
                        if res.is_err() {
                            s.failed += 1;
                        }
                    });
                    res
                }
                OpState::Done => panic!("Op polled after completion"),
            };
            if let Some(r) = self.retry_or(r) {
                return Poll::Ready(r);
            }
        }
    }
}

impl Future for Op {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A task polls it: no longer detached (`poll_op` says so to the
        // ring for the attempt in flight).
        this.detached = false;
        this.advance(|d, key| d.poll_op(key, cx))
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let OpState::InFlight(key) = self.state
            && let Some(d) = &self.ring.inner.uring
        {
            d.abandon(key);
            self.ring.bump(|s| s.abandoned += 1);
            // The kernel still runs it: the ring reaps it by itself.
            reap::ensure(&self.ring);
        }
    }
}

#[cfg(test)]
mod tests;
