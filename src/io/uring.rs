//! The io_uring driver behind [`Ring`](super::Ring).
//!
//! In-flight operations live in a slab keyed by `user_data`. An entry owns the
//! operation's resources until its completion is reaped, whether or not the
//! future that submitted it is still alive (tokio's `io/uring` lifecycle).
//!
//! Wake-ups: the ring signals an eventfd on every completion; tokio's reactor
//! watches it through `AsyncFd`. Whichever pending op is polled drains the
//! completion queue and wakes the others; while abandoned operations remain,
//! the reaper task (`reap.rs`) is one more such waiter. Because an
//! `AsyncFd` keeps only the last waker, an op that leaves (completes or is
//! dropped) wakes the remaining ones so one of them takes over the watch.

use std::cell::{OnceCell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, Probe, opcode, squeue, types};
use slab::Slab;
use tokio::io::unix::AsyncFd;

use super::{OpKind, Resources};
use crate::sys;
use crate::wait::WaitList;

const RING_ENTRIES: u32 = 64;

/// An operation in the slab (keyed by `user_data`), or a settle waiter.
enum OpState {
    Waiting {
        waker: Option<Waker>,
        /// Kept to be awaited later, maybe by another task (`detach`):
        /// until a task polls it again nobody does, so the reaper drives
        /// the ring for it as for an abandoned one, and its resources are
        /// released when it completes (its result stays for that task).
        detached: bool,
        _res: Resources,
        kind: OpKind,
    },
    Done(i32),
    Abandoned {
        _res: Resources,
        kind: OpKind,
    },
    /// The reaper (`reap.rs`) waiting for the abandoned operations to
    /// finish. No operation has this key, so no completion
    /// ever targets it; it exists so that `hand_over` wakes the future.
    Settle {
        waker: Option<Waker>,
    },
}

/// Why [`Driver::submit`] failed with the operation's resources or not.
pub(super) enum NotSent {
    /// Nothing was queued (the resources were dropped).
    Returned,
    /// The entry was queued, under this key, before the submission failed:
    /// the kernel gets it with a later one, and the ring keeps its
    /// resources (an abandoned entry) until its completion is reaped.
    Queued(usize),
}

pub(super) struct Driver {
    ring: RefCell<IoUring>,
    ops: RefCell<Slab<OpState>>,
    /// Woken each time the resources of abandoned operations are released.
    released: Rc<WaitList>,
    /// Declared before `eventfd`: fields drop in order, so the reactor
    /// registration goes before the descriptor closes.
    watch: OnceCell<AsyncFd<i32>>,
    eventfd: OwnedFd,
    has_fallocate: bool,
    has_ftruncate: bool,
    has_madvise: bool,
    has_fsync: bool,
}

/// Set up a ring of one entry and close it: whether io_uring is there.
pub(super) fn probe() -> io::Result<()> {
    IoUring::new(1).map(drop)
}

impl Driver {
    pub(super) fn new() -> io::Result<Driver> {
        let ring = IoUring::builder().build(RING_ENTRIES)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let eventfd = sys::eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Driver {
            has_fallocate: probe.is_supported(opcode::Fallocate::CODE),
            has_ftruncate: probe.is_supported(opcode::Ftruncate::CODE),
            has_madvise: probe.is_supported(opcode::Madvise::CODE),
            has_fsync: probe.is_supported(opcode::Fsync::CODE),
            ring: RefCell::new(ring),
            ops: RefCell::new(Slab::with_capacity(RING_ENTRIES as usize)),
            released: Rc::new(WaitList::default()),
            eventfd,
            watch: OnceCell::new(),
        })
    }

    /// Let this thread's io workers run on the CPUs of `cpus` only.
    pub(super) fn set_worker_cpus(&self, cpus: &sys::CpuSet) -> io::Result<()> {
        self.ring.borrow().submitter().register_iowq_aff(cpus)
    }

    pub(super) fn supports(&self, kind: &OpKind) -> bool {
        match kind {
            OpKind::Fallocate { .. } => self.has_fallocate,
            OpKind::Ftruncate { .. } => self.has_ftruncate,
            OpKind::Madvise { .. } => self.has_madvise,
            OpKind::Fsync { .. } => self.has_fsync,
        }
    }

    pub(super) fn unsupported(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (ok, name) in [
            (self.has_fallocate, "fallocate"),
            (self.has_ftruncate, "ftruncate"),
            (self.has_madvise, "madvise"),
            (self.has_fsync, "fsync"),
        ] {
            if !ok {
                v.push(name);
            }
        }
        v
    }

    /// Submit one operation. On failure the resources are dropped
    /// ([`NotSent::Returned`]), unless the entry was queued before the
    /// failure ([`NotSent::Queued`], with its key): the ring keeps them
    /// until the kernel, which gets the entry with a later submission, is
    /// done with it. `fail_enter`: the submission's error, planned (feature
    /// `fault-injection`), in place of the `io_uring_enter`.
    pub(super) fn submit(
        &self,
        kind: OpKind,
        res: Resources,
        fail_enter: Option<io::Error>,
    ) -> Result<usize, (io::Error, NotSent)> {
        let fd = res.fd.as_ref().map(|f| types::Fd(f.as_raw_fd()));
        let mut ops = self.ops.borrow_mut();
        let entry = ops.vacant_entry();
        let key = entry.key();
        let sqe = build(kind, fd).user_data(key as u64);

        let mut ring = self.ring.borrow_mut();
        // SAFETY: the entry references only the fd and the address range held
        // by `res`, which the entry owns until the completion is reaped.
        let pushed = unsafe { ring.submission().push(&sqe) }.is_ok();
        if !pushed {
            // Queue full: flush it and try once more.
            if let Err(e) = ring.submit() {
                drop(res);
                return Err((e, NotSent::Returned));
            }
            // SAFETY: as above.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                drop(res);
                return Err((
                    io::Error::from_raw_os_error(nix::libc::EBUSY),
                    NotSent::Returned,
                ));
            }
        }
        entry.insert(OpState::Waiting {
            waker: None,
            detached: false,
            _res: res,
            kind,
        });
        let submitted = match fail_enter {
            Some(e) => Err(e),
            None => enter(|| ring.submit()),
        };
        if let Err(e) = submitted {
            // The entry is queued and reaches the kernel with the next
            // submit: keep its resources under its key until it completes.
            if let Some(state) = ops.get_mut(key)
                && let OpState::Waiting { _res, kind, .. } =
                    std::mem::replace(state, OpState::Done(0))
            {
                *state = OpState::Abandoned { _res, kind };
            }
            return Err((e, NotSent::Queued(key)));
        }
        Ok(key)
    }

    /// Move completions from the completion queue into their entries; returns
    /// the wakers to call.
    fn reap(&self) -> Vec<Waker> {
        let mut wake = Vec::new();
        let mut ring = self.ring.borrow_mut();
        if !ring.submission().is_empty() {
            // Entries left queued by a failed submit reach the kernel now:
            // their completions would never come otherwise.
            let _ = enter(|| ring.submit());
        }
        let mut ops = self.ops.borrow_mut();
        let mut released = false;
        loop {
            for cqe in ring.completion() {
                let key = cqe.user_data() as usize;
                let Some(state) = ops.get_mut(key) else {
                    continue;
                };
                match state {
                    OpState::Waiting {
                        waker, detached, ..
                    } => {
                        if let Some(w) = waker.take() {
                            wake.push(w);
                        }
                        released |= *detached;
                        *state = OpState::Done(cqe.result());
                    }
                    OpState::Abandoned { .. } => {
                        ops.remove(key);
                        released = true;
                    }
                    OpState::Done(_) | OpState::Settle { .. } => {}
                }
            }
            // More completions than the CQ ring holds: the kernel keeps the
            // rest on its overflow list (IORING_FEAT_NODROP) and has already
            // signalled the eventfd for them. Only an enter with GETEVENTS
            // (which `submit` adds when it sees the overflow flag) moves them
            // into the ring: without it they would never be reaped.
            if !ring.submission().cq_overflow() || ring.submit().is_err() {
                break;
            }
        }
        drop((ops, ring));
        if released {
            self.released.wake_all();
        }
        wake
    }

    /// The list woken when the resources of operations no task polls
    /// (abandoned or detached) are released.
    pub(super) fn released(&self) -> &Rc<WaitList> {
        &self.released
    }

    /// Operations the kernel still runs that no task polls: dropped before
    /// completion (abandoned), or kept for a later task (detached).
    pub(super) fn unattended(&self) -> usize {
        self.ops
            .borrow()
            .iter()
            .filter(|(_, s)| {
                matches!(
                    s,
                    OpState::Abandoned { .. } | OpState::Waiting { detached: true, .. }
                )
            })
            .count()
    }

    /// Whether the kernel may still run op `key`: in flight (`queued`
    /// false), or, for an entry left queued by a failed submission
    /// (`queued` true), still abandoned. The completion queue is reaped
    /// first. A key taken by another operation since means the entry was
    /// reaped (the slab reuses only freed keys): an abandoned one there
    /// only makes the answer err on the side of "running".
    pub(super) fn running(&self, key: usize, queued: bool) -> bool {
        for w in self.reap() {
            w.wake();
        }
        match self.ops.borrow().get(key) {
            Some(OpState::Waiting { .. }) => !queued,
            Some(OpState::Abandoned { .. }) => queued,
            _ => false,
        }
    }

    /// Block this thread until [`running`](Self::running) says no, with
    /// `io_uring_enter` waits (for a caller that cannot await: a `Drop`).
    /// Completions of other operations found meanwhile are reaped and their
    /// tasks woken, as a poll would.
    ///
    /// # Errors
    ///
    /// The error of an `io_uring_enter` that cannot be waited through (not
    /// `EINTR`, `EAGAIN` or `EBUSY`, or 1,000 of those): the kernel may
    /// still run the operation.
    pub(super) fn wait_blocking(&self, key: usize, queued: bool) -> io::Result<()> {
        let mut failures = 0u32;
        while self.running(key, queued) {
            match enter(|| self.ring.borrow().submitter().submit_and_wait(1)) {
                Err(e) if !is_transient(&e) || failures >= 1000 => return Err(e),
                Err(_) => failures += 1,
                Ok(_) => {}
            }
        }
        // A task may hold the eventfd watch for an op reaped here.
        self.hand_over();
        Ok(())
    }

    /// Operations the kernel may still run (in flight or abandoned), as
    /// of the last reap.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight_of(|_| true)
    }

    /// [`in_flight`](Self::in_flight), of the kinds `which` accepts.
    pub(super) fn in_flight_of(&self, which: impl Fn(&OpKind) -> bool) -> usize {
        self.ops
            .borrow()
            .iter()
            .filter(|(_, s)| match s {
                OpState::Waiting { kind, .. } | OpState::Abandoned { kind, .. } => which(kind),
                _ => false,
            })
            .count()
    }

    fn take_done(&self, key: usize) -> Option<io::Result<()>> {
        let mut ops = self.ops.borrow_mut();
        if let Some(OpState::Done(res)) = ops.get(key) {
            let res = *res;
            ops.remove(key);
            Some(if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(())
            })
        } else {
            None
        }
    }

    /// Wake every op still waiting, so one of them watches the eventfd.
    fn hand_over(&self) {
        let wakers: Vec<Waker> = self
            .ops
            .borrow_mut()
            .iter_mut()
            .filter_map(|(_, s)| match s {
                OpState::Waiting { waker, .. } | OpState::Settle { waker } => waker.clone(),
                _ => None,
            })
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    /// Wake the reaper, if it waits.
    pub(super) fn wake_settle(&self) {
        let wakers: Vec<Waker> = self
            .ops
            .borrow()
            .iter()
            .filter_map(|(_, s)| match s {
                OpState::Settle { waker } => waker.clone(),
                _ => None,
            })
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    fn watch(&self) -> io::Result<&AsyncFd<i32>> {
        if let Some(w) = self.watch.get() {
            return Ok(w);
        }
        // SAFETY: the eventfd is owned by `self` and outlives the
        // registration (`watch` is dropped before `eventfd`), and it is never
        // closed or replaced while registered.
        let w = unsafe {
            AsyncFd::register_with_interest(self.eventfd.as_raw_fd(), tokio::io::Interest::READABLE)
        }?;
        Ok(self.watch.get_or_init(|| w))
    }

    pub(super) fn poll_op(&self, key: usize, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            for w in self.reap() {
                w.wake();
            }
            if let Some(res) = self.take_done(key) {
                self.hand_over();
                return Poll::Ready(res);
            }
            if let Some(OpState::Waiting {
                waker, detached, ..
            }) = self.ops.borrow_mut().get_mut(key)
            {
                *detached = false;
                match waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
            }
            match self.poll_watch(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// The result of op `key` if it completed, reaping the completion queue
    /// without watching the eventfd: no waker is registered, so a check
    /// made outside a task never takes the watch from a task that waits.
    pub(super) fn try_take(&self, key: usize) -> Option<io::Result<()>> {
        for w in self.reap() {
            w.wake();
        }
        let res = self.take_done(key)?;
        self.hand_over();
        Some(res)
    }

    /// Watch the eventfd for the task of `cx`. `Ready(Ok)` when it fired
    /// (it is drained and re-armed): reap again.
    fn poll_watch(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let watch = self.watch()?;
        match watch.poll_read_ready(cx) {
            Poll::Ready(Ok(mut guard)) => {
                // Reset the counter, then forget the readiness: the next
                // completion writes the eventfd again and re-arms it.
                while sys::eventfd_drain(self.eventfd.as_raw_fd())? {}
                guard.clear_ready();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Drive the ring until no unattended operation is left (the reaper's
    /// poll). `key` is the reaper's `Settle` entry, taken while it waits and released (with a
    /// hand-over of the eventfd watch) when it is done.
    pub(super) fn poll_settle(
        &self,
        key: &mut Option<usize>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            for w in self.reap() {
                w.wake();
            }
            if self.unattended() == 0 {
                self.cancel_settle(key);
                return Poll::Ready(Ok(()));
            }
            {
                let mut ops = self.ops.borrow_mut();
                match *key {
                    Some(k) => {
                        if let Some(OpState::Settle { waker }) = ops.get_mut(k) {
                            *waker = Some(cx.waker().clone());
                        }
                    }
                    None => {
                        *key = Some(ops.insert(OpState::Settle {
                            waker: Some(cx.waker().clone()),
                        }))
                    }
                }
            }
            match self.poll_watch(cx) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => {
                    self.cancel_settle(key);
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Release a `Settle` entry; the eventfd watch it may hold goes to the
    /// operations still waiting.
    pub(super) fn cancel_settle(&self, key: &mut Option<usize>) {
        if let Some(k) = key.take() {
            self.ops.borrow_mut().remove(k);
            self.hand_over();
        }
    }

    /// Op `key` stays in flight but its task no longer polls it (it is
    /// kept to be awaited later, by another task): forget its waker and hand
    /// the eventfd watch over, which that task may hold, so that the
    /// operations other tasks wait for are still reaped.
    pub(super) fn detach(&self, key: usize) {
        if let Some(OpState::Waiting {
            waker, detached, ..
        }) = self.ops.borrow_mut().get_mut(key)
        {
            *waker = None;
            *detached = true;
        }
        self.hand_over();
    }

    pub(super) fn abandon(&self, key: usize) {
        let released = {
            let mut ops = self.ops.borrow_mut();
            let Some(state) = ops.get_mut(key) else {
                return;
            };
            match std::mem::replace(state, OpState::Done(0)) {
                OpState::Waiting { _res, kind, .. } => {
                    *state = OpState::Abandoned { _res, kind };
                    false
                }
                OpState::Done(_) | OpState::Abandoned { .. } | OpState::Settle { .. } => {
                    ops.remove(key);
                    true
                }
            }
        };
        if released {
            self.released.wake_all();
        }
        self.hand_over();
    }
}

/// The submission entry of an operation (without its key).
fn build(kind: OpKind, fd: Option<types::Fd>) -> squeue::Entry {
    match kind {
        OpKind::Fallocate { mode, offset, len } => {
            opcode::Fallocate::new(fd.expect("fallocate has an fd"), len)
                .offset(offset)
                .mode(mode)
                .build()
        }
        OpKind::Ftruncate { len } => {
            opcode::Ftruncate::new(fd.expect("ftruncate has an fd"), len).build()
        }
        OpKind::Fsync { datasync } => {
            let flags = if datasync {
                types::FsyncFlags::DATASYNC
            } else {
                types::FsyncFlags::empty()
            };
            opcode::Fsync::new(fd.expect("fsync has an fd"))
                .flags(flags)
                .build()
        }
        OpKind::Madvise { addr, len, advice } => {
            // The kernel reads the length from a 32-bit field: `Ring::madvise`
            // never submits more than `MADVISE_CHUNK_BYTES` at once.
            debug_assert!(len <= super::MADVISE_CHUNK_BYTES);
            opcode::Madvise::new(addr.cast_const().cast(), len as _, advice).build()
        }
    }
}

/// Run an `io_uring_enter` (or the failure planned for it).
fn enter(f: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
    match super::injected_enter_fault() {
        Some(e) => Err(e),
        None => f(),
    }
}

/// Errors of `io_uring_enter` after which waiting again can succeed.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EINTR | nix::libc::EAGAIN | nix::libc::EBUSY)
    )
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The kernel may still use the resources of abandoned ops: wait for
        // every completion before the entries (and the windows and fds they
        // hold) are released. A reaper waiting on this ring is woken first,
        // so that it finds the ring closed and ends.
        self.hand_over();
        let mut failures = 0u32;
        loop {
            let pending = self
                .ops
                .borrow()
                .iter()
                .filter(|(_, s)| matches!(s, OpState::Waiting { .. } | OpState::Abandoned { .. }))
                .count();
            if pending == 0 {
                break;
            }
            let r = enter(|| self.ring.borrow().submitter().submit_and_wait(1));
            match r {
                Err(e) if !is_transient(&e) || failures >= 1000 => {
                    // Waiting is impossible: leak the resources the kernel
                    // may still use rather than free them under it.
                    tracing::error!(error = %e, pending, "io_uring closed with operations in flight; their fds and windows are leaked");
                    std::mem::forget(std::mem::take(&mut *self.ops.borrow_mut()));
                    break;
                }
                Err(_) => failures += 1,
                Ok(_) => {}
            }
            drop(self.reap());
        }
    }
}
