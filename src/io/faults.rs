//! Fault injection for tests (cargo feature `fault-injection`, off by
//! default): make the Nth control operation of a kind fail with a chosen
//! errno, on the calling thread.
//!
//! A shard is one thread, so a plan set on the thread that runs a shard
//! applies to that shard's ring (and to every other ring the thread drives).
//! Faults are injected where an operation starts: before it is submitted to
//! io_uring, before the plain syscall on the sync backend, and before the
//! `mmap` of a window in `MappingManager`'s fault-in. The operation then
//! completes with the chosen error as if the kernel had returned it; nothing
//! reaches the kernel, except with [`Fault::at_completion`] (the operation
//! runs, its result is replaced) and [`Fault::after_push`] (the entry is
//! queued, its submission fails, and it runs with a later one).
//!
//! ```
//! use segalloc::io::faults::{self, Fault, FaultOp};
//! // The second fdatasync on this thread fails with EIO, once.
//! faults::inject(Fault::new(FaultOp::Fsync, nix::libc::EIO).nth(2));
//! assert_eq!(faults::pending(), 1);
//! faults::clear();
//! ```
//!
//! **Architecture invariant:** without the feature this module does not
//! exist and the hooks compile to nothing.

use std::cell::RefCell;
use std::io;

use super::OpKind;
use crate::sys;

/// The operations a fault can be injected into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultOp {
    /// `fallocate` of any mode.
    Fallocate,
    /// `fallocate` mode 0 only (growing or reserving a file).
    FallocateReserve,
    /// `fallocate` with `FALLOC_FL_PUNCH_HOLE` only (`trim`).
    FallocatePunch,
    /// `ftruncate` (growth on file systems without `fallocate`).
    Ftruncate,
    /// `madvise` of any advice (whole-window advice, prefetch,
    /// `MADV_POPULATE_WRITE`).
    Madvise,
    /// `fsync` and `fdatasync`.
    Fsync,
    /// The `mmap` of a window when it is faulted in.
    Mmap,
    /// The `io_uring_enter` that submits queued operations, or waits for
    /// them when the ring closes (io_uring backend only).
    Enter,
}

impl FaultOp {
    const ALL: [FaultOp; 8] = [
        FaultOp::Fallocate,
        FaultOp::FallocateReserve,
        FaultOp::FallocatePunch,
        FaultOp::Ftruncate,
        FaultOp::Madvise,
        FaultOp::Fsync,
        FaultOp::Mmap,
        FaultOp::Enter,
    ];

    fn index(self) -> usize {
        FaultOp::ALL
            .iter()
            .position(|&o| o == self)
            .expect("every op is listed")
    }

    /// Whether an operation of kind `k` counts as `self`.
    fn matches(self, k: &OpKind) -> bool {
        match (self, k) {
            (FaultOp::Fallocate, OpKind::Fallocate { .. }) => true,
            (FaultOp::FallocateReserve, OpKind::Fallocate { mode, .. }) => {
                *mode == sys::FALLOC_EXTEND
            }
            (FaultOp::FallocatePunch, k) => k.is_punch(),
            (FaultOp::Ftruncate, OpKind::Ftruncate { .. }) => true,
            (FaultOp::Madvise, OpKind::Madvise { .. }) => true,
            (FaultOp::Fsync, OpKind::Fsync { .. }) => true,
            _ => false,
        }
    }
}

/// A planned failure: which operation, after how many of them, how many
/// times, and with which errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    op: FaultOp,
    skip: u64,
    times: u64,
    errno: i32,
    at_completion: bool,
    after_push: bool,
}

impl Fault {
    /// The next operation `op` on this thread fails with `errno`, once.
    pub fn new(op: FaultOp, errno: i32) -> Fault {
        Fault {
            op,
            skip: 0,
            times: 1,
            errno,
            at_completion: false,
            after_push: false,
        }
    }

    /// The failing operation is queued in the ring, and the
    /// `io_uring_enter` that would submit it fails with the error: the
    /// operation is reported failed, and its entry reaches the kernel with
    /// a later submission, as after a real failed `enter` (io_uring
    /// backend; on the sync backend it fails before the syscall, as
    /// without this).
    pub fn after_push(mut self) -> Fault {
        self.after_push = true;
        self
    }

    /// The failing operation is submitted and runs; its result is replaced
    /// by the error when it completes, as the kernel reports a write-back
    /// error (io_uring backend; the sync backend runs it at once, so the
    /// error is there as soon as it starts, as without this).
    pub fn at_completion(mut self) -> Fault {
        self.at_completion = true;
        self
    }

    /// The `n`th operation `op` from now fails (`n >= 1`; the first `n - 1`
    /// pass).
    pub fn nth(mut self, n: u64) -> Fault {
        assert!(n >= 1, "operations are counted from 1");
        self.skip = n - 1;
        self
    }

    /// Fail `n` consecutive matching operations (default 1).
    pub fn times(mut self, n: u64) -> Fault {
        self.times = n;
        self
    }

    /// Fail every matching operation until [`clear`].
    pub fn always(self) -> Fault {
        self.times(u64::MAX)
    }
}

#[derive(Default)]
struct Plan {
    rules: Vec<Fault>,
    seen: [u64; FaultOp::ALL.len()],
    injected: [u64; FaultOp::ALL.len()],
}

thread_local! {
    static PLAN: RefCell<Plan> = RefCell::new(Plan::default());
}

/// Add `fault` to this thread's plan. Every rule sees every matching
/// operation; when several would fire on one operation, the first added
/// wins and the others wait for the next.
pub fn inject(fault: Fault) {
    PLAN.with(|p| p.borrow_mut().rules.push(fault));
}

/// Remove every planned fault of this thread (the counters stay).
pub fn clear() {
    PLAN.with(|p| p.borrow_mut().rules.clear());
}

/// Planned faults of this thread that have not fired all their times yet.
pub fn pending() -> usize {
    PLAN.with(|p| p.borrow().rules.len())
}

/// Operations `op` this thread started since it began (failed or not).
/// Note that [`FaultOp::Fallocate`] counts every `fallocate`, also those
/// counted by the two narrower kinds.
pub fn seen(op: FaultOp) -> u64 {
    PLAN.with(|p| p.borrow().seen[op.index()])
}

/// Operations of kind `op` the kernel may still run on `ring`: submitted
/// (or left queued by a failed submission) and not reaped yet, whether a
/// task awaits them or they were dropped (as `RingStats::in_flight`, of one
/// kind).
pub fn in_flight(ring: &super::Ring, op: FaultOp) -> usize {
    ring.inner
        .uring
        .as_ref()
        .map_or(0, |d| d.in_flight_of(|k| op.matches(k)))
}

/// Failures injected on this thread, by the kind of the rule that fired.
pub fn injected(op: FaultOp) -> u64 {
    PLAN.with(|p| p.borrow().injected[op.index()])
}

/// Clears this thread's plan when dropped (so a failing test does not leave
/// faults behind for the next code on the thread).
#[must_use = "the plan is cleared when the guard drops"]
#[derive(Debug)]
pub struct ClearOnDrop(());

/// A guard that [`clear`]s this thread's plan when dropped.
pub fn clear_on_drop() -> ClearOnDrop {
    ClearOnDrop(())
}

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        clear();
    }
}

/// Run one operation through the plan: count it for every kind it is, and
/// return the injected error if a rule fires.
fn take(is: impl Fn(FaultOp) -> bool) -> Option<Injected> {
    PLAN.with(|p| {
        let mut p = p.borrow_mut();
        let p = &mut *p;
        for op in FaultOp::ALL {
            if is(op) {
                p.seen[op.index()] += 1;
            }
        }
        let mut fired: Option<(FaultOp, Injected)> = None;
        for rule in p.rules.iter_mut().filter(|r| is(r.op)) {
            if rule.skip > 0 {
                rule.skip -= 1;
            } else if fired.is_none() && rule.times > 0 {
                rule.times -= 1;
                let i = Injected {
                    errno: rule.errno,
                    at_completion: rule.at_completion,
                    after_push: rule.after_push,
                };
                fired = Some((rule.op, i));
            }
        }
        p.rules.retain(|r| r.times > 0);
        fired.map(|(op, i)| {
            p.injected[op.index()] += 1;
            i
        })
    })
}

/// A failure a rule injected into an operation.
pub(super) struct Injected {
    pub(super) errno: i32,
    /// The operation runs, and fails when it completes
    /// ([`Fault::at_completion`]).
    pub(super) at_completion: bool,
    /// The operation is queued, and its submission fails
    /// ([`Fault::after_push`]).
    pub(super) after_push: bool,
}

impl Injected {
    pub(super) fn error(&self) -> io::Error {
        io::Error::from_raw_os_error(self.errno)
    }
}

/// The injected failure of a control operation, if any.
pub(super) fn take_op(kind: &OpKind) -> Option<Injected> {
    take(|op| op.matches(kind))
}

/// The injected failure of an `io_uring_enter`, if any.
pub(super) fn take_enter() -> Option<io::Error> {
    take(|op| op == FaultOp::Enter).map(|i| i.error())
}

/// The injected failure of a window's `mmap`, if any.
pub(super) fn take_mmap() -> Option<io::Error> {
    take(|op| op == FaultOp::Mmap).map(|i| i.error())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUNCH: OpKind = OpKind::Fallocate {
        mode: sys::FALLOC_PUNCH_HOLE,
        offset: 0,
        len: 1,
    };
    const GROW: OpKind = OpKind::Fallocate {
        mode: sys::FALLOC_EXTEND,
        offset: 0,
        len: 1,
    };
    const FSYNC: OpKind = OpKind::Fsync { datasync: true };

    fn errno(e: Option<Injected>) -> Option<i32> {
        e.map(|e| e.errno)
    }

    #[test]
    fn nth_times_and_kinds() {
        let _g = clear_on_drop();
        inject(Fault::new(FaultOp::Fsync, 5).nth(2).times(2));
        inject(Fault::new(FaultOp::FallocatePunch, 28));
        assert_eq!(errno(take_op(&GROW)), None, "a reservation is no punch");
        assert_eq!(errno(take_op(&FSYNC)), None);
        assert_eq!(errno(take_op(&FSYNC)), Some(5));
        assert_eq!(errno(take_op(&PUNCH)), Some(28));
        assert_eq!(errno(take_op(&FSYNC)), Some(5));
        assert_eq!(errno(take_op(&FSYNC)), None);
        assert_eq!(pending(), 0);
        inject(Fault::new(FaultOp::Fsync, 5).at_completion());
        assert!(take_op(&FSYNC).is_some_and(|i| i.at_completion && i.errno == 5));
        assert!(take_op(&FSYNC).is_none());
        assert_eq!(seen(FaultOp::Fallocate), 2);
        assert_eq!(seen(FaultOp::FallocateReserve), 1);
        assert_eq!(
            (injected(FaultOp::Fsync), injected(FaultOp::FallocatePunch)),
            (3, 1)
        );
        assert!(take_mmap().is_none());
    }

    #[test]
    fn first_rule_wins_and_the_other_waits() {
        let _g = clear_on_drop();
        inject(Fault::new(FaultOp::Fallocate, 1));
        inject(Fault::new(FaultOp::FallocatePunch, 2));
        assert_eq!(errno(take_op(&PUNCH)), Some(1));
        assert_eq!(errno(take_op(&PUNCH)), Some(2));
        assert_eq!(errno(take_op(&PUNCH)), None);
        inject(Fault::new(FaultOp::Mmap, 12).always());
        assert_eq!(take_mmap().and_then(|e| e.raw_os_error()), Some(12));
        assert_eq!(take_mmap().and_then(|e| e.raw_os_error()), Some(12));
        clear();
        assert!(take_mmap().is_none());
    }
}
