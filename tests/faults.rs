//! Injected failures of the control operations (`fallocate`, `ftruncate`,
//! `madvise`, `fsync`) and of a window's `mmap`, on both io backends.
//!
//! Built only with the `fault-injection` feature:
//!
//! ```sh
//! cargo test --release --features fault-injection --test faults
//! SEGALLOC_IO=sync cargo test --release --features fault-injection --test faults
//! ```
//!
//! What is checked: every failure surfaces as a typed error (no panic); the
//! call that failed changed nothing (the live set, the roots and every
//! allocation's contents are what they were before); after a failed `fsync`
//! every write is refused with `Error::Poisoned` until the directory is
//! reopened, and the reopen recovers everything acknowledged.
//!
//! `EINTR` is retried: an operation interrupted by a signal runs again, up
//! to `segalloc::io::MAX_EINTR_RETRIES` (16) times, then the error is
//! returned (a `sync` that runs out of retries poisons the shard like any
//! failed sync). A window's `mmap` is not a ring operation and is not
//! retried: `EINTR` there is a `MapFailed` like any other errno.
//!
//! Replay the random test with `SEGALLOC_FAULTS_SEED=<seed>`.
#![cfg(feature = "fault-injection")]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::{
    Rng, Snapshot, assert_no_overlap, check_pattern, dirty_again, drop_a_sync_in_flight,
    fill_two_files, handle_seed, one_descriptor_cfg, open_shard, run, seed_from_env, small_cfg,
    snapshot, write_pattern,
};
use nix::libc::{EINTR, EIO, ENOMEM, ENOSPC, EOPNOTSUPP};
use segalloc::config::MIB;
use segalloc::io::MAX_EINTR_RETRIES;
use segalloc::io::faults::{self, Fault, FaultOp};
use segalloc::{Config, Error, Handle, Shard};

/// The state is `before`, and every allocation holds its pattern.
async fn assert_unchanged(shard: &Shard, before: &Snapshot, what: &str) {
    assert_eq!(
        &snapshot(shard),
        before,
        "{what}: a failed call changed the state"
    );
    assert_no_overlap(before.live.iter().copied());
    for h in &before.live {
        let pin = shard
            .pin(*h)
            .await
            .unwrap_or_else(|e| panic!("{what}: pin of live {h}: {e}"));
        assert!(
            check_pattern(&pin, pattern_len(h), handle_seed(h, 0)),
            "{what}: contents of {h}"
        );
    }
}

fn pattern_len(h: &Handle) -> usize {
    (h.len() as usize).min(4096)
}

async fn alloc(shard: &Shard, size: u64) -> segalloc::Result<Handle> {
    let a = shard.allocate(size).await?;
    let h = a.handle();
    write_pattern(a.pin(), pattern_len(&h), handle_seed(&h, 0));
    Ok(h)
}

/// A shard with allocations of several classes and a root.
async fn populated(cfg: &Config) -> Shard {
    let shard = open_shard(cfg).await.unwrap();
    for size in [16u64, 100, 1000, 5000, 70_000, MIB] {
        for _ in 0..3 {
            alloc(&shard, size).await.unwrap();
        }
    }
    let h = shard.live().next().unwrap();
    shard.set_root("main", h).unwrap();
    shard
}

fn errno_of(e: &Error) -> Option<i32> {
    match e {
        Error::Io { source, .. } | Error::MapFailed { source, .. } => source.raw_os_error(),
        Error::NoSpace { .. } => Some(ENOSPC),
        _ => None,
    }
}

/// `e` is the typed error an injected `errno` must give for a `fallocate`.
fn assert_fallocate_error(e: &Error, errno: i32, what: &str) {
    match (errno, e) {
        (ENOSPC, Error::NoSpace { .. }) => assert!(e.is_no_space()),
        (_, Error::Io { op, source, .. }) if op.starts_with("fallocate") => {
            assert_eq!(source.raw_os_error(), Some(errno), "{what}: {e}")
        }
        _ => panic!("{what}: injected errno {errno} gave {e:?}"),
    }
}

/// A sync that must fail after an injected write-back error (`EIO`): with
/// that error, or `Poisoned` when another call saw it first; and the shard
/// is poisoned.
fn assert_sync_failed(r: segalloc::Result<()>, shard: &Shard, what: &str) {
    match r {
        Err(Error::Io {
            op: "fdatasync",
            source,
            ..
        }) => assert_eq!(source.raw_os_error(), Some(EIO), "{what}"),
        Err(Error::Poisoned { shard: 0 }) => {}
        other => panic!("{what}: {other:?}"),
    }
    assert!(shard.allocator().is_poisoned(), "{what}");
}

#[test]
fn fallocate_failure_while_allocating() {
    for errno in [EIO, ENOSPC, ENOMEM] {
        let _g = faults::clear_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path());
        run(async {
            let shard = populated(&cfg).await;
            let before = snapshot(&shard);
            // A new 8 MiB segment past the reserved end: the file grows.
            let n = faults::injected(FaultOp::Fallocate);
            faults::inject(Fault::new(FaultOp::Fallocate, errno));
            let e = shard.allocate(8 * MIB).await.unwrap_err();
            assert_eq!(
                faults::injected(FaultOp::Fallocate),
                n + 1,
                "the fault fired"
            );
            assert_fallocate_error(&e, errno, "allocate");
            assert_unchanged(&shard, &before, "allocate").await;
            // Nothing is stuck: the same allocation works now.
            let h = alloc(&shard, 8 * MIB).await.unwrap();
            assert!(shard.allocator().is_live(&h));
            assert!(!shard.allocator().is_poisoned());
        });
    }
}

/// Allocate `n` segments' worth of 600 KB slots and one 3 MiB slot above
/// them (kept), then free the former: their segments are released and
/// their runs are free space below the file's used end (space freed at the
/// top of the last file lowers the used end instead, and is not trimmed).
async fn make_free_runs(shard: &Shard, n: usize) {
    let mut hs = Vec::new();
    for _ in 0..n {
        hs.push(alloc(shard, 600_000).await.unwrap());
    }
    alloc(shard, 3 * MIB).await.unwrap();
    for h in hs {
        shard.free(h).unwrap();
    }
}

/// Twenty free runs, their segments' releases synced (as a `trim`'s own
/// syncs would make them): `allocated_bytes` then, and the state.
async fn free_runs_released(shard: &Shard) -> (u64, Snapshot) {
    make_free_runs(shard, 20).await;
    shard.sync().await.unwrap();
    shard.sync().await.unwrap();
    (shard.stats().alloc.allocated_bytes, snapshot(shard))
}

/// Free runs, then trim them.
async fn freed_and_trimmed(shard: &Shard) -> u64 {
    make_free_runs(shard, 24).await;
    let released = shard.trim().await.unwrap();
    assert!(released > 0, "trim released nothing");
    released
}

#[test]
fn reserving_a_trimmed_run_fails() {
    for errno in [ENOSPC, EIO] {
        let _g = faults::clear_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path());
        run(async {
            let shard = populated(&cfg).await;
            freed_and_trimmed(&shard).await;
            let before = snapshot(&shard);
            // A new segment takes a punched run, which is reserved again
            // first (fallocate mode 0) and fails.
            let n = faults::injected(FaultOp::FallocateReserve);
            faults::inject(Fault::new(FaultOp::FallocateReserve, errno));
            let e = shard.allocate(300_000).await.unwrap_err();
            assert_eq!(faults::injected(FaultOp::FallocateReserve), n + 1);
            assert_fallocate_error(&e, errno, "re-reserve");
            assert_unchanged(&shard, &before, "re-reserve").await;
            // The run went back to the free space, still to be reserved:
            // the next try reserves it and succeeds.
            let seen = faults::seen(FaultOp::FallocateReserve);
            let h = alloc(&shard, 300_000).await.unwrap();
            assert!(
                faults::seen(FaultOp::FallocateReserve) > seen,
                "reserved again"
            );
            assert!(shard.allocator().is_live(&h));
        });
    }
}

/// A punch that fails leaves the allocations as they were; its run is
/// free again.
#[test]
fn punch_failure_during_trim() {
    for errno in [EIO, ENOMEM, ENOSPC] {
        let _g = faults::clear_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path());
        run(async {
            let shard = populated(&cfg).await;
            let (allocated, before) = free_runs_released(&shard).await;
            faults::inject(Fault::new(FaultOp::FallocatePunch, errno));
            match shard.trim().await {
                Err(e @ Error::Io { .. }) => {
                    assert_eq!(errno_of(&e), Some(errno), "{e}");
                    assert!(e.to_string().contains("PUNCH_HOLE"), "{e}");
                }
                other => panic!("trim with a failing punch: {other:?}"),
            }
            assert!(
                !shard.allocator().is_poisoned(),
                "a failed punch loses nothing"
            );
            assert_unchanged(&shard, &before, "trim").await;
            // The run goes back to the free space (as maybe punched).
            assert_eq!(shard.stats().alloc.allocated_bytes, allocated);
            // The rest is punched by the next trim, and allocation goes on.
            assert!(shard.trim().await.unwrap() > 0);
            assert_eq!(shard.trim().await.unwrap(), 0, "nothing left to punch");
            for _ in 0..20 {
                alloc(&shard, 600_000).await.unwrap();
            }
        });
    }
}

/// A punch queued in the ring whose submission failed (`io_uring_enter`
/// after the push) is reported failed, yet reaches the kernel with a later
/// submission: its run must not be handed out before the ring has reaped
/// it (a segment made there could be punched after its writes), and is
/// free again after that (it stayed out until a reopen). An interrupted
/// submission (`EINTR`) is not retried either: the punch queued still runs,
/// and a second one returning success gave the run back. With
/// `SEGALLOC_IO=sync` the fault fails the punch before its syscall (which
/// runs again after `EINTR`), and no run is kept out.
#[test]
fn a_punch_left_queued_by_a_failed_submission_keeps_its_run_out() {
    for errno in [nix::libc::EAGAIN, EINTR] {
        let _g = faults::clear_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path());
        run(async {
            let shard = populated(&cfg).await;
            let (allocated, before) = free_runs_released(&shard).await;
            let uring = shard.stats().io_backend == segalloc::IoBackend::Uring;
            faults::inject(Fault::new(FaultOp::FallocatePunch, errno).after_push());
            match shard.trim().await {
                Err(e @ Error::Io { .. }) => assert_eq!(errno_of(&e), Some(errno), "{e}"),
                // The sync backend runs the punch again (nothing is queued).
                Ok(_) if !uring && errno == EINTR => {}
                other => panic!("trim with a punch left queued: {other:?}"),
            }
            assert_unchanged(&shard, &before, "trim").await;
            let now = shard.stats().alloc.allocated_bytes;
            if uring {
                assert!(now > allocated, "errno {errno}: the run went back");
                // The ring submits the queued punch and reaps it by
                // itself; then the next trim takes the run back first.
                for _ in 0..5000 {
                    if shard.ring().stats().in_flight == 0 {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                assert_eq!(shard.ring().stats().in_flight, 0, "errno {errno}");
                shard.trim().await.unwrap();
                assert_eq!(
                    shard.stats().alloc.allocated_bytes,
                    allocated,
                    "errno {errno}: the run stayed out after its punch ran"
                );
            } else {
                assert!(now <= allocated, "errno {errno}: a run kept out");
            }
            // Allocation goes on, beside the run kept out.
            for _ in 0..20 {
                alloc(&shard, 600_000).await.unwrap();
            }
        });
    }
}

/// Right after a trim whose punch was left queued, before anything awaited
/// gave the ring a chance to reap it, the first new segment must not take
/// the kept run (`collect_punched` asks the ring whether the kernel may
/// still run the punch). Nothing to check with `SEGALLOC_IO=sync`.
#[test]
fn a_queued_punchs_run_is_not_handed_out_before_the_ring_reaps_it() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        let (allocated, _) = free_runs_released(&shard).await;
        if shard.stats().io_backend != segalloc::IoBackend::Uring {
            return;
        }
        faults::inject(Fault::new(FaultOp::FallocatePunch, nix::libc::EAGAIN).after_push());
        assert!(shard.trim().await.is_err());
        let kept = shard.stats().alloc.allocated_bytes;
        assert!(kept > allocated, "the run is kept out");
        // Allocate until a new segment is made; its space must come from
        // elsewhere than the kept run (the punch was submitted by this
        // very check, and the kernel runs it in its io workers).
        for _ in 0..50 {
            alloc(&shard, 600_000).await.unwrap();
            let now = shard.stats().alloc.allocated_bytes;
            if now != kept {
                assert!(
                    now > kept,
                    "the kept run was handed out before its punch was reaped: {now} <= {kept}"
                );
                return;
            }
        }
        panic!("no new segment in 50 allocations");
    });
}

/// A `SegmentAllocator` dropped right after a trim whose punch was left
/// queued by a failed submission waits for the kernel to run it: its
/// shard, opened again through the same manager, could otherwise hand out
/// the run while the punch is still to come. Nothing to check with
/// `SEGALLOC_IO=sync`.
#[test]
fn a_dropped_allocator_waits_for_its_queued_punch() {
    use segalloc::{DataDir, SegmentAllocator};
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let (files, mm) = common::manager_with(&cfg);
    let mm = std::rc::Rc::new(mm);
    run(async {
        let dd = std::sync::Arc::new(DataDir::open(&cfg).unwrap());
        let a = SegmentAllocator::open(0, &dd.shard_dir(0), *dd.manifest(), mm.clone())
            .await
            .unwrap();
        let mut hs = Vec::new();
        for _ in 0..20 {
            let x = a.allocate(MIB).await.unwrap();
            x.pin().fill(0, x.len(), 7).unwrap();
            hs.push(x.into_handle());
        }
        // Kept, so that the freed runs lie below a segment in use.
        let _kept = a.allocate(MIB).await.unwrap().into_handle();
        a.sync().await.unwrap();
        for h in &hs {
            a.free(*h).unwrap();
        }
        a.sync().await.unwrap();
        a.sync().await.unwrap();
        if files.ring().backend() != segalloc::IoBackend::Uring {
            return;
        }
        faults::inject(Fault::new(FaultOp::FallocatePunch, nix::libc::EAGAIN).after_push());
        assert!(a.trim().await.is_err());
        assert!(files.ring().stats().in_flight > 0, "the punch is queued");
        drop((a, dd));
        assert_eq!(
            files.ring().stats().in_flight,
            0,
            "closed while the queued punch may still run"
        );
    });
}

/// Without `fallocate`, a file grows with `ftruncate`, which, unlike an
/// allocating `fallocate`, can also shrink it: a growth `ftruncate` still
/// to land after a later, larger one cuts the file back below slots
/// already handed out (their writes lost, their pages past the end:
/// SIGBUS). So a growth's `ftruncate` never outlives it: one left queued
/// by a failed submission, or in flight when the allocation is dropped,
/// is waited for before the call returns or the drop ends. Nothing to
/// check with `SEGALLOC_IO=sync` (or a kernel without io_uring's
/// `ftruncate`): the syscall completes within the call.
#[test]
fn a_growth_ftruncate_never_outlives_its_growth() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        faults::inject(Fault::new(FaultOp::Fallocate, EOPNOTSUPP).always());
        alloc(&shard, 4 * MIB).await.unwrap();
        let uring = shard.ring().stats().submitted > 0
            && shard.stats().io_backend == segalloc::IoBackend::Uring;
        // Left queued by a failed submission: waited for before the error.
        faults::inject(Fault::new(FaultOp::Ftruncate, nix::libc::EAGAIN).after_push());
        let e = shard.allocate(4 * MIB).await.err();
        if uring && faults::seen(FaultOp::Ftruncate) > 0 {
            assert!(e.is_some(), "the submission failed");
            assert_eq!(
                faults::in_flight(shard.ring(), FaultOp::Ftruncate),
                0,
                "a growth ftruncate left queued outlived the failed allocation"
            );
        }
        // Interrupted after the push: the queued one is not run again
        // behind its back (two could land in either order); once it is
        // done, the growth tries again, and the allocation succeeds.
        let seen = faults::seen(FaultOp::Ftruncate);
        let retries = shard.ring().stats().eintr_retries;
        faults::inject(Fault::new(FaultOp::Ftruncate, EINTR).after_push());
        shard.allocate(4 * MIB).await.unwrap();
        if uring && faults::seen(FaultOp::Ftruncate) > seen {
            assert_eq!(faults::injected(FaultOp::Ftruncate), 2, "both faults fired");
            assert_eq!(
                shard.ring().stats().eintr_retries,
                retries,
                "the ring ran a queued ftruncate again while it could still land"
            );
            assert_eq!(
                faults::in_flight(shard.ring(), FaultOp::Ftruncate),
                0,
                "an interrupted growth ftruncate outlived its growth"
            );
        }
        // Dropped mid-growth, at one poll more each time, until the
        // allocation completes: no ftruncate is in flight after any drop.
        let mut dropped_in_flight = 0;
        // A drop lands mid-ftruncate only if a poll returned while it ran:
        // up to 20 allocations are tried.
        for _ in 0..20 {
            if dropped_in_flight > 0 {
                break;
            }
            for polls in 1..200 {
                let mut f = Box::pin(shard.allocate(4 * MIB));
                let waker = futures::task::noop_waker();
                let mut done = false;
                for _ in 0..polls {
                    let poll = f.as_mut().poll(&mut std::task::Context::from_waker(&waker));
                    if poll.is_ready() {
                        done = true;
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                let ftruncating = faults::in_flight(shard.ring(), FaultOp::Ftruncate);
                drop(f);
                assert_eq!(
                    faults::in_flight(shard.ring(), FaultOp::Ftruncate),
                    0,
                    "polls {polls}: the growth ftruncate of the dropped allocation outlived it"
                );
                dropped_in_flight += usize::from(!done && ftruncating > 0);
                if done {
                    break;
                }
            }
        }
        if uring {
            assert!(
                dropped_in_flight > 0,
                "no allocation was dropped mid-ftruncate"
            );
        }
    });
}

/// Without `fallocate` (EOPNOTSUPP on every call), files grow with
/// `ftruncate` and are prefaulted with `MADV_POPULATE_WRITE`: failures of
/// both are typed, and a trim does nothing (it cannot refill a hole).
#[test]
fn ftruncate_and_populate_failures_without_fallocate() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        faults::inject(Fault::new(FaultOp::Fallocate, EOPNOTSUPP).always());
        // The fallback works.
        alloc(&shard, 4 * MIB).await.unwrap();
        assert!(faults::seen(FaultOp::Ftruncate) > 0, "grown by ftruncate");
        assert!(shard.stats().mappings.populated_bytes > 0, "prefaulted");
        for (i, errno) in [EIO, ENOSPC, ENOMEM, EINTR].into_iter().enumerate() {
            let before = snapshot(&shard);
            // EINTR: once more than the retries.
            let times = if errno == EINTR {
                1 + MAX_EINTR_RETRIES as u64
            } else {
                1
            };
            faults::inject(Fault::new(FaultOp::Ftruncate, errno).times(times));
            let e = shard.allocate(4 * MIB).await.unwrap_err();
            match &e {
                Error::Io {
                    op: "ftruncate",
                    source,
                    ..
                } => {
                    assert_eq!(source.raw_os_error(), Some(errno))
                }
                other => panic!("ftruncate {errno}: {other:?}"),
            }
            assert_eq!(faults::pending(), 1, "only the fallocate rule is left");
            assert_unchanged(&shard, &before, &format!("ftruncate {i}")).await;
        }
        // Prefault failures: ENOMEM/ENOSPC (and EFAULT) mean no space, the
        // rest is an io error. Whole-window advice failing too is ignored.
        for errno in [ENOMEM, ENOSPC, EIO] {
            let before = snapshot(&shard);
            faults::inject(Fault::new(FaultOp::Madvise, errno).always());
            let e = shard.allocate(4 * MIB).await.unwrap_err();
            match (errno, &e) {
                (EIO, Error::Io { op, source, .. }) => {
                    assert!(op.contains("POPULATE_WRITE"), "{e}");
                    assert_eq!(source.raw_os_error(), Some(EIO));
                }
                (ENOMEM | ENOSPC, Error::NoSpace { .. }) => {}
                _ => panic!("populate {errno}: {e:?}"),
            }
            // Only the fallocate rule stays.
            faults::clear();
            faults::inject(Fault::new(FaultOp::Fallocate, EOPNOTSUPP).always());
            assert_unchanged(&shard, &before, "populate").await;
        }
        let h = alloc(&shard, 4 * MIB).await.unwrap();
        // Nothing to trim without fallocate: no hole is made.
        let punches = faults::seen(FaultOp::FallocatePunch);
        shard.free(h).unwrap();
        make_free_runs(&shard, 10).await;
        assert_eq!(shard.trim().await.unwrap(), 0);
        assert_eq!(
            faults::seen(FaultOp::FallocatePunch),
            punches,
            "never punched"
        );
    });
}

#[test]
fn mmap_failure_is_map_failed() {
    for errno in [ENOMEM, EIO, ENOSPC, EINTR] {
        let _g = faults::clear_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path());
        run(async {
            let shard = populated(&cfg).await;
            let before = snapshot(&shard);
            let h = *before.live.iter().next().unwrap();
            let n = faults::injected(FaultOp::Mmap);
            // Unmap every idle window: the next pin faults one in.
            shard.mappings().settle_prefaults().await;
            assert!(shard.mappings().evict_idle() > 0);
            faults::inject(Fault::new(FaultOp::Mmap, errno));
            match shard.pin(h).await {
                Err(Error::MapFailed { source, .. }) => {
                    assert_eq!(source.raw_os_error(), Some(errno))
                }
                other => panic!("pin with a failing mmap: {other:?}"),
            }
            // An allocation that must fault its window in.
            shard.mappings().settle_prefaults().await;
            shard.mappings().evict_idle();
            faults::inject(Fault::new(FaultOp::Mmap, errno));
            assert!(matches!(
                shard.allocate(100).await,
                Err(Error::MapFailed { .. })
            ));
            assert_eq!(faults::injected(FaultOp::Mmap), n + 2);
            assert_unchanged(&shard, &before, "mmap").await;
        });
    }
}

/// Whole-window advice (`MADV_RANDOM`) is advisory: its failure is ignored.
#[test]
fn window_advice_failure_is_ignored() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(common::WINDOW)
        .growth_step_bytes(common::STEP)
        .madvise_policy(segalloc::MadvisePolicy::Random)
        .build()
        .unwrap();
    run(async {
        let shard = populated(&cfg).await;
        let before = snapshot(&shard);
        shard.mappings().settle_prefaults().await;
        shard.mappings().evict_idle();
        let n = faults::injected(FaultOp::Madvise);
        faults::inject(Fault::new(FaultOp::Madvise, EIO).always());
        assert_unchanged(&shard, &before, "advice").await;
        alloc(&shard, 1000).await.unwrap();
        assert!(
            faults::injected(FaultOp::Madvise) > n,
            "advice was attempted"
        );
    });
}

/// A failed sync poisons the shard: every write is refused, saying why,
/// until the directory is reopened; the reopen recovers everything.
#[test]
fn failed_fsync_poisons_until_reopen() {
    for errno in [EIO, ENOSPC, ENOMEM] {
        let _g = faults::clear_on_drop();
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(dir.path());
        run(async {
            let shard = populated(&cfg).await;
            // Acknowledged but not synced: survive the reopen (process model).
            let extra = alloc(&shard, 300).await.unwrap();
            let gone = shard.live().nth(2).unwrap();
            shard.free(gone).unwrap();
            shard.set_root("extra", extra).unwrap();
            let before = snapshot(&shard);
            faults::inject(Fault::new(FaultOp::Fsync, errno));
            match shard.sync().await {
                Err(Error::Io {
                    op: "fdatasync",
                    source,
                    ..
                }) => {
                    assert_eq!(source.raw_os_error(), Some(errno))
                }
                other => panic!("sync with a failing fdatasync: {other:?}"),
            }
            assert!(shard.allocator().is_poisoned());
            let poisoned = |r: segalloc::Result<()>, what: &str| match r {
                Err(e @ Error::Poisoned { shard: 0 }) => {
                    assert!(e.to_string().contains("reopen"), "{what}: {e}")
                }
                other => panic!("{what} on a poisoned shard: {other:?}"),
            };
            poisoned(shard.allocate(10).await.map(drop), "allocate");
            poisoned(shard.try_allocate(10).map(drop), "try_allocate");
            poisoned(shard.free(extra), "free");
            poisoned(shard.set_root("x", extra).map(drop), "set_root");
            poisoned(shard.remove_root("main").map(drop), "remove_root");
            poisoned(shard.trim().await.map(drop), "trim");
            poisoned(shard.sync().await, "sync");
            // Reads go on, and nothing changed.
            assert_unchanged(&shard, &before, "poisoned").await;
            drop(shard);
            let shard = open_shard(&cfg).await.unwrap();
            assert!(!shard.allocator().is_poisoned());
            assert_unchanged(&shard, &before, "reopened").await;
            assert!(!shard.allocator().is_live(&gone));
            shard.sync().await.unwrap();
            alloc(&shard, 10).await.unwrap();
        });
    }
}

/// EINTR is retried (up to `MAX_EINTR_RETRIES` times) for every ring
/// operation; past that it is an error.
#[test]
fn eintr_is_retried() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        let retries = || shard.ring().stats().eintr_retries;
        let r0 = retries();
        faults::inject(Fault::new(FaultOp::Fallocate, EINTR).times(3));
        alloc(&shard, 8 * MIB).await.unwrap();
        assert_eq!(retries() - r0, 3);
        faults::inject(Fault::new(FaultOp::Fsync, EINTR).times(MAX_EINTR_RETRIES as u64));
        shard.sync().await.unwrap();
        assert!(!shard.allocator().is_poisoned());
        assert_eq!(retries() - r0, 3 + MAX_EINTR_RETRIES as u64);
        // Trim: the probe and the punches are retried too.
        make_free_runs(&shard, 8).await;
        faults::inject(Fault::new(FaultOp::FallocatePunch, EINTR).times(2));
        assert!(shard.trim().await.unwrap() > 0);
        // Without end: the allocation fails, typed, and changes nothing.
        let before = snapshot(&shard);
        faults::inject(Fault::new(FaultOp::Fallocate, EINTR).always());
        let e = shard.allocate(12 * MIB).await.unwrap_err();
        assert_fallocate_error(&e, EINTR, "endless EINTR");
        faults::clear();
        assert_unchanged(&shard, &before, "endless EINTR").await;
        // A sync that runs out of retries is a failed sync.
        faults::inject(Fault::new(FaultOp::Fsync, EINTR).always());
        assert!(matches!(shard.sync().await, Err(Error::Io { .. })));
        assert!(shard.allocator().is_poisoned());
    });
}

// ---------------------------------------------------------------------------
// A random workload under random faults.
// ---------------------------------------------------------------------------

const ERRNOS: [i32; 4] = [EIO, ENOSPC, ENOMEM, EINTR];
const OPS: [FaultOp; 6] = [
    FaultOp::Fallocate,
    FaultOp::FallocateReserve,
    FaultOp::FallocatePunch,
    FaultOp::Madvise,
    FaultOp::Fsync,
    FaultOp::Mmap,
];

#[derive(Default, Debug)]
struct StormStats {
    steps: u64,
    faults_planned: u64,
    faults_fired: u64,
    failed_calls: u64,
    poisoned: u64,
    reopens: u64,
    allocs: u64,
    frees: u64,
    trims: u64,
    bytes_trimmed: u64,
}

fn storm_size(rng: &mut Rng) -> u64 {
    match rng.below(10) {
        0..=5 => 1 + rng.below(2000),
        6..=8 => 1 + rng.below(200_000),
        _ => 1 + rng.below(3 * MIB),
    }
}

/// The failed call left the state as the model says; typed errors only.
fn check_error(e: &Error, step: u64) {
    match e {
        Error::NoSpace { .. } | Error::Io { .. } | Error::MapFailed { .. } => {}
        other => panic!("step {step}: untyped or unexpected error {other:?}"),
    }
}

async fn storm(cfg: &Config, seed: u64, steps: u64) -> StormStats {
    let mut rng = Rng::new(seed);
    let mut st = StormStats::default();
    let fired_before: u64 = OPS.iter().map(|&op| faults::injected(op)).sum();
    let mut model: BTreeMap<Handle, ()> = BTreeMap::new();
    let mut shard = open_shard(cfg).await.unwrap();
    for step in 0..steps {
        st.steps += 1;
        if rng.chance(0.08) {
            let op = OPS[rng.below(OPS.len() as u64) as usize];
            let errno = ERRNOS[rng.below(ERRNOS.len() as u64) as usize];
            let times = if errno == EINTR && rng.chance(0.5) {
                1 + rng.below(MAX_EINTR_RETRIES as u64)
            } else {
                1 + rng.below(3)
            };
            faults::inject(Fault::new(op, errno).nth(1 + rng.below(4)).times(times));
            st.faults_planned += 1;
        }
        let before: BTreeSet<Handle> = model.keys().copied().collect();
        let r: segalloc::Result<()> = match rng.below(100) {
            0..=49 => match alloc(&shard, storm_size(&mut rng)).await {
                Ok(h) => {
                    assert!(model.insert(h, ()).is_none(), "step {step}: {h} twice");
                    st.allocs += 1;
                    Ok(())
                }
                Err(e) => Err(e),
            },
            50..=84 => {
                if let Some(&h) = model
                    .keys()
                    .nth(rng.below(model.len().max(1) as u64) as usize)
                {
                    shard.free(h).unwrap();
                    model.remove(&h);
                    st.frees += 1;
                }
                Ok(())
            }
            85..=89 => {
                // Read one back, faulting its window in (mmap, advice).
                shard.mappings().evict_idle();
                match model.keys().next().copied() {
                    Some(h) => match shard.pin(h).await {
                        Ok(p) => {
                            assert!(
                                check_pattern(&p, pattern_len(&h), handle_seed(&h, 0)),
                                "step {step}: contents of {h}"
                            );
                            Ok(())
                        }
                        Err(e) => Err(e),
                    },
                    None => Ok(()),
                }
            }
            90..=95 => shard.sync().await,
            _ => match shard.trim().await {
                Ok(n) => {
                    st.trims += 1;
                    st.bytes_trimmed += n;
                    Ok(())
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = r {
            st.failed_calls += 1;
            let now: BTreeSet<Handle> = shard.live().collect();
            assert_eq!(
                now, before,
                "step {step}: the failed call ({e}) changed the live set"
            );
            assert_eq!(shard.live_count(), before.len() as u64);
            if shard.allocator().is_poisoned() {
                check_error(&e, step);
                st.poisoned += 1;
                assert!(matches!(
                    shard.allocate(1).await,
                    Err(Error::Poisoned { .. })
                ));
                faults::clear();
                drop(shard);
                shard = open_shard(cfg).await.unwrap();
                st.reopens += 1;
                let now: BTreeSet<Handle> = shard.live().collect();
                assert_eq!(now, before, "step {step}: reopen after poisoning");
            } else {
                check_error(&e, step);
            }
        }
        if step % 500 == 499 {
            // Everything acknowledged is there, intact.
            faults::clear();
            assert_no_overlap(model.keys().copied());
            for h in model.keys() {
                let p = shard.pin(*h).await.unwrap();
                assert!(check_pattern(&p, pattern_len(h), handle_seed(h, 0)));
            }
        }
    }
    faults::clear();
    drop(shard);
    let shard = open_shard(cfg).await.unwrap();
    let live: BTreeSet<Handle> = shard.live().collect();
    assert_eq!(
        live,
        model.keys().copied().collect::<BTreeSet<_>>(),
        "after the reopen"
    );
    for h in &live {
        let p = shard.pin(*h).await.unwrap();
        assert!(
            check_pattern(&p, pattern_len(h), handle_seed(h, 0)),
            "contents of {h}"
        );
    }
    st.faults_fired = OPS.iter().map(|&op| faults::injected(op)).sum::<u64>() - fired_before;
    st
}

#[test]
fn random_faults_keep_the_allocator_consistent() {
    let _g = faults::clear_on_drop();
    let seed = seed_from_env("SEGALLOC_FAULTS_SEED");
    eprintln!("random faults: seed {seed} (replay with SEGALLOC_FAULTS_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    // Small windows and files, two data windows per shard: fault-ins
    // (mmap, advice) and growth happen all the time.
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(16 * MIB)
        .max_windows(3)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let st = run(storm(&cfg, seed, 6000));
    eprintln!(
        "random faults: {st:?} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(st.faults_fired > 20, "the faults fired: {st:?}");
    assert!(st.failed_calls > 5 && st.allocs > 500, "{st:?}");
    assert!(Path::new(dir.path()).exists());
}

/// A failed `io_uring_enter` leaves the operation queued; the ring submits
/// it with the next reap, so its descriptor comes back and a registry with
/// a cap of one descriptor can open the next file (it used to wait forever
/// for a completion that was never submitted).
#[test]
fn failed_submit_is_flushed_and_its_fd_released() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let _g = faults::clear_on_drop();
        let (files, _mm) = common::manager(dir.path(), 1, 4);
        if files.ring().backend() != segalloc::IoBackend::Uring {
            return; // no io_uring_enter on the sync backend
        }
        let a = common::register(&files, dir.path().join("a"));
        let b = common::register(&files, dir.path().join("b"));
        faults::inject(Fault::new(FaultOp::Enter, nix::libc::EAGAIN));
        let r = files.acquire(a, 1 << 20).await;
        assert!(r.is_err(), "the submit failed: {r:?}");
        assert_eq!(faults::injected(FaultOp::Enter), 1);
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), files.acquire(b, 4096));
        let lease = next.await.expect("the queued operation completed").unwrap();
        drop(lease);
        assert_eq!(files.open_count(), common::os_counts(dir.path()).0);
    });
}

/// A ring closed while an abandoned operation runs waits for it even when
/// the wait is interrupted (`EINTR`): the resources the operation uses are
/// released only after it completed. The operation prefaults 256 MiB of a
/// sparse file; its hold checks, when released, that all of it was done.
#[test]
fn ring_close_waits_through_eintr() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    let len: usize = 256 << 20;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    let map = memmap2::MmapOptions::new().len(len).map_raw(&file).unwrap();
    let blocks_at_release = std::rc::Rc::new(std::cell::Cell::new(None));
    struct Hold(
        #[allow(dead_code)] memmap2::MmapRaw,
        std::fs::File,
        std::rc::Rc<std::cell::Cell<Option<u64>>>,
    );
    impl Drop for Hold {
        fn drop(&mut self) {
            use std::os::unix::fs::MetadataExt;
            self.2.set(Some(self.1.metadata().unwrap().blocks() * 512));
        }
    }
    let addr = map.as_mut_ptr();
    let hold = Hold(map, file, blocks_at_release.clone());
    let uring = run(async {
        let _g = faults::clear_on_drop();
        let ring = segalloc::Ring::new(segalloc::IoBackendChoice::Auto).unwrap();
        if ring.backend() != segalloc::IoBackend::Uring {
            return false; // no io_uring_enter on the sync backend
        }
        // SAFETY: the range is `hold`'s mapping, kept alive by the ring;
        // POPULATE_WRITE discards nothing.
        let mut op = Box::pin(unsafe {
            ring.madvise(
                std::rc::Rc::new(hold),
                addr,
                len,
                nix::libc::MADV_POPULATE_WRITE,
            )
        });
        assert!(futures::poll!(op.as_mut()).is_pending(), "in flight");
        drop(op);
        faults::inject(Fault::new(FaultOp::Enter, EINTR));
        drop(ring);
        assert_eq!(faults::injected(FaultOp::Enter), 1);
        true
    });
    if !uring {
        return;
    }
    let blocks = blocks_at_release
        .get()
        .expect("released when the ring closed");
    assert!(
        blocks >= len as u64,
        "released before the prefault ended: {blocks} of {len} bytes"
    );
}

/// A failed folder fsync leaves the file's directory entry not durable: the
/// next call syncs again (and an allocation that needs it fails meanwhile).
#[test]
fn failed_folder_sync_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("left"), [7u8; 4096]).unwrap();
    run(async {
        let _g = faults::clear_on_drop();
        let (files, _mm) = common::manager(dir.path(), 4, 4);
        let left = common::register(&files, dir.path().join("left"));
        faults::inject(Fault::new(FaultOp::Fsync, EIO));
        let r = files.make_entry_durable(left).await;
        assert!(matches!(&r, Err(e) if errno_of(e) == Some(EIO)), "{r:?}");
        assert_eq!(files.stats().dir_syncs, 0);
        assert!(files.make_entry_durable(left).await.unwrap(), "tried again");
        assert!(!files.make_entry_durable(left).await.unwrap());
        assert_eq!(files.stats().dir_syncs, 1);
    });
}

/// Two overlapping syncs: the first one's `fdatasync` fails, the second's
/// completes first. The kernel reports a write-back error to one
/// `fdatasync` only, so the second must not report success: it waits for
/// every sync that began before it, and returns `Poisoned`.
#[test]
fn overlapping_sync_succeeds_only_after_earlier_ones() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        overlap_after_failure(&shard).await;
        // Overlapping syncs that all succeed are Ok.
        drop(shard);
        let shard = open_shard(&cfg).await.unwrap();
        alloc(&shard, 300).await.unwrap();
        let (a, b, c) = futures::join!(shard.sync(), shard.sync(), shard.sync());
        a.unwrap();
        b.unwrap();
        c.unwrap();
    });
}

async fn overlap_after_failure(shard: &Shard) {
    {
        alloc(shard, 300).await.unwrap();
        let mut first = std::pin::pin!(shard.sync());
        let mut second = std::pin::pin!(shard.sync());
        // The first sync begins and submits its fdatasyncs; its first one
        // fails (on the sync backend it completes at once).
        faults::inject(Fault::new(FaultOp::Fsync, EIO));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let early = first.as_mut().poll(&mut cx);
        assert_eq!(faults::injected(FaultOp::Fsync), 1);
        // The second runs while the first is not polled: its own
        // fdatasyncs complete, yet it must wait for the first.
        let mut b_early = None;
        for _ in 0..100 {
            if let std::task::Poll::Ready(r) = second.as_mut().poll(&mut cx) {
                b_early = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let (b, a) = futures::join!(
            async {
                match b_early {
                    Some(r) => r,
                    None => second.as_mut().await,
                }
            },
            async {
                match early {
                    std::task::Poll::Ready(r) => r,
                    std::task::Poll::Pending => first.as_mut().await,
                }
            }
        );
        match a {
            Err(Error::Io {
                op: "fdatasync",
                source,
                ..
            }) => assert_eq!(source.raw_os_error(), Some(EIO)),
            other => panic!("the failing sync: {other:?}"),
        }
        match b {
            Err(Error::Poisoned { shard: 0 }) => {}
            // Or it saw the failure of the file the first one failed on.
            Err(Error::Io { source, .. }) if source.raw_os_error() == Some(EIO) => {}
            other => panic!("a sync overlapping a failed one: {other:?}"),
        }
    }
}

/// A sync after writes to one data file of many issues one data file
/// `fdatasync` (and none for the metadata, which did not change); a sync
/// with nothing changed issues none; a pin held across a sync keeps its
/// file in the next one.
#[test]
fn sync_covers_only_changed_files() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    // One window per data file: 1 MiB allocations fill a file every 16.
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(16 * MIB)
        .build()
        .unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut hs = Vec::new();
        for _ in 0..80 {
            hs.push(alloc(&shard, MIB - 4096).await.unwrap());
        }
        let files = shard.stats().alloc.data_files;
        assert!(files >= 5, "{files} data files");
        shard.sync().await.unwrap();
        let count = async |shard: &Shard| {
            let before = faults::seen(FaultOp::Fsync);
            shard.sync().await.unwrap();
            faults::seen(FaultOp::Fsync) - before
        };
        assert_eq!(count(&shard).await, 0, "nothing changed");
        // A write to one allocation of the third file.
        let h = *hs.iter().find(|h| h.file_id() == 2).unwrap();
        let pin = shard.pin(h).await.unwrap();
        pin.write_at(0, b"changed").unwrap();
        drop(pin);
        assert_eq!(count(&shard).await, 1, "one data file changed");
        // A free changes the metadata only.
        shard.free(hs.pop().unwrap()).unwrap();
        assert_eq!(count(&shard).await, 1, "the metadata changed");
        // A pin held across syncs keeps its file in each of them.
        let pin = shard.pin(h).await.unwrap();
        assert_eq!(count(&shard).await, 1, "a pin is held");
        pin.write_at(0, b"again").unwrap();
        assert_eq!(count(&shard).await, 1, "a pin is still held");
        drop(pin);
        // It may have written after the last sync began.
        assert_eq!(count(&shard).await, 1, "the pin was dropped since");
        assert_eq!(count(&shard).await, 0, "nothing changed since");
        // Removing a root changes the metadata only.
        shard.set_root("r", h).unwrap();
        assert_eq!(count(&shard).await, 1, "a root was set");
        shard.remove_root("r").unwrap();
        assert_eq!(count(&shard).await, 1, "a root was removed");
        // An allocation in a segment that already exists (no growth, the
        // window mapped), written and dropped: its data file and the
        // metadata.
        let small = alloc(&shard, 100).await.unwrap();
        shard.sync().await.unwrap();
        let a = shard.allocate(100).await.unwrap();
        assert_eq!(a.handle().file_id(), small.file_id());
        a.write_at(0, b"new").unwrap();
        drop(a);
        assert_eq!(count(&shard).await, 2, "an allocation was written");
        // The same through try_allocate.
        let a = shard.try_allocate(100).unwrap().unwrap();
        a.write_at(0, b"new").unwrap();
        drop(a);
        assert_eq!(count(&shard).await, 2, "an allocation was written");
        let stats = shard.stats().alloc;
        assert!(stats.data_file_syncs >= 3, "{stats:?}");
    });
}

/// An allocation whose window faults in while a sync begins and completes:
/// the next sync still covers its data file (written after that sync began)
/// and the metadata (its bit was set after that sync began).
#[test]
fn sync_covers_an_allocation_that_outlived_a_sync() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    // Whole-window advice through the ring: a fault-in awaits it.
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .madvise_policy(segalloc::config::MadvisePolicy::Random)
        .build()
        .unwrap();
    let mut pending_seen = false;
    for _ in 0..20 {
        let pending = run(async {
            // Reopened: the segment exists, its window is not mapped.
            let shard = open_shard(&cfg).await.unwrap();
            alloc(&shard, 5000).await.unwrap();
            shard.sync().await.unwrap();
            drop(shard);
            let shard = open_shard(&cfg).await.unwrap();
            let mut fut = std::pin::pin!(shard.allocate(5000));
            let waker = futures::task::noop_waker();
            let first = fut
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker));
            let pending = first.is_pending();
            shard.sync().await.unwrap();
            let a = match first {
                std::task::Poll::Ready(a) => a.unwrap(),
                std::task::Poll::Pending => fut.await.unwrap(),
            };
            a.write_at(0, b"after the sync began").unwrap();
            drop(a);
            let before = faults::seen(FaultOp::Fsync);
            shard.sync().await.unwrap();
            // Completed at once: the sync covered the metadata; the data
            // file is covered again (the pin was held across that sync).
            let expected = if pending { 2 } else { 1 };
            assert_eq!(
                faults::seen(FaultOp::Fsync) - before,
                expected,
                "the data file and the metadata (allocate pending: {pending})"
            );
            pending
        });
        pending_seen |= pending;
        if pending_seen || common::expected_backend() != segalloc::IoBackend::Uring {
            break;
        }
    }
    if common::expected_backend() == segalloc::IoBackend::Uring {
        assert!(pending_seen, "a fault-in never awaited its advice");
    }
}

/// A sync dropped after one of its `fdatasync`s failed (the kernel reports
/// a write-back error once): the next sync fails too, and the shard is
/// poisoned, instead of a success that proves nothing.
#[test]
fn a_dropped_failed_sync_is_not_forgotten() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        alloc(&shard, 300).await.unwrap();
        faults::inject(Fault::new(FaultOp::Fsync, EIO));
        let first = {
            let mut sync = std::pin::pin!(shard.sync());
            let waker = futures::task::noop_waker();
            sync.as_mut()
                .poll(&mut std::task::Context::from_waker(&waker))
        };
        assert_eq!(faults::injected(FaultOp::Fsync), 1);
        // Pending (io_uring): dropped with the failure unseen.
        if first.is_pending() {
            assert!(!shard.allocator().is_poisoned());
        }
        match shard.sync().await {
            Err(Error::Io {
                op: "fdatasync",
                source,
                ..
            }) => assert_eq!(source.raw_os_error(), Some(EIO)),
            Err(Error::Poisoned { shard: 0 }) => assert!(first.is_ready()),
            other => panic!("a sync after a dropped, failed one: {other:?}"),
        }
        assert!(shard.allocator().is_poisoned());
    });
}

/// A sync that began after another, which was then dropped with its failed
/// `fdatasync` unseen: the kernel reports a write-back error to one call,
/// the dropped sync's, so the later sync must look at that call's outcome
/// before it succeeds (it returned `Ok` and handed out a slot whose free may
/// never reach the disk).
#[test]
fn a_sync_overlapping_a_dropped_failed_one_fails() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        let h = alloc(&shard, 300).await.unwrap();
        shard.sync().await.unwrap();
        alloc(&shard, 300).await.unwrap();
        faults::inject(Fault::new(FaultOp::Fsync, EIO).at_completion());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut first = Box::pin(shard.sync());
        let early = first.as_mut().poll(&mut cx);
        assert_eq!(faults::injected(FaultOp::Fsync), 1);
        if early.is_ready() {
            // The sync backend runs the failing call at once: the failure
            // was seen, and the shard is poisoned.
            assert!(shard.allocator().is_poisoned());
            eprintln!("skipped the overlap: the sync backend fails the call at once");
            return;
        }
        // A free covered by the next sync only.
        shard.free(h).unwrap();
        let mut second = Box::pin(shard.sync());
        assert!(second.as_mut().poll(&mut cx).is_pending());
        drop(first);
        assert_sync_failed(
            second.await,
            &shard,
            "a sync overlapping a dropped, failed one",
        );
    });
}

/// A sync that runs beside another task's call on the same file (a new
/// segment's metadata sync) whose write-back fails: that call may take the
/// kernel's one report of the error, so the sync waits for its outcome and
/// fails with it (it returned `Ok` while the other call was not polled).
#[test]
fn a_sync_beside_a_failing_metadata_sync_of_a_new_segment_fails() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = populated(&cfg).await;
        shard.sync().await.unwrap();
        drop(shard);
        // After a reopen, the first new segment makes the metadata's size
        // durable before it is published.
        let shard = open_shard(&cfg).await.unwrap();
        faults::inject(Fault::new(FaultOp::Fsync, EIO).at_completion());
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let mut fresh_class = Box::pin(shard.allocate(3000));
        let early = fresh_class.as_mut().poll(&mut cx);
        assert_eq!(faults::injected(FaultOp::Fsync), 1);
        if early.is_ready() {
            // The sync backend runs the failing call at once.
            assert!(shard.allocator().is_poisoned());
            eprintln!("skipped the overlap: the sync backend fails the call at once");
            return;
        }
        // The sync's own calls complete; it waits for the other one, which
        // nobody polls yet.
        let mut sync = Box::pin(shard.sync());
        for _ in 0..200 {
            let r = sync.as_mut().poll(&mut cx);
            assert!(r.is_pending(), "the sync ended first: {r:?}");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert!(fresh_class.await.is_err());
        assert_sync_failed(sync.await, &shard, "a sync beside a failed one");
    });
}

/// A free forwarded to an owner that a failed sync poisoned cannot be
/// applied: the flush that waits for it says so (`Poisoned`, naming the
/// owner), as a free on the owner itself would. It was acknowledged, then
/// dropped by the owner with a log line, and the flush said `Ok`.
#[test]
fn a_free_forwarded_to_a_poisoned_owner_fails_its_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::small_cfg_shards(&dir.path().join("data"), 2);
    let rt = segalloc::Runtime::start(cfg).unwrap();
    let h = futures::executor::block_on(rt.spawn_on(0, |s| async move {
        let _g = faults::clear_on_drop();
        let h = s.allocate(16).await.unwrap().into_handle();
        s.sync().await.unwrap();
        s.allocate(16).await.unwrap();
        faults::inject(Fault::new(FaultOp::Fsync, EIO));
        assert!(s.sync().await.is_err());
        assert!(s.allocator().is_poisoned());
        h
    }))
    .unwrap();
    let (free, flush, again) = futures::executor::block_on(rt.spawn_on(1, move |s| async move {
        let free = s.free(h);
        let flush = s.flush_frees().await;
        // The owner stays poisoned: every later flush says so.
        let again = s.flush_frees().await;
        (free, flush, again)
    }))
    .unwrap();
    assert!(free.is_ok(), "{free:?}");
    assert!(
        matches!(flush, Err(Error::Poisoned { shard: 0 })),
        "{flush:?}"
    );
    assert!(
        matches!(again, Err(Error::Poisoned { shard: 0 })),
        "{again:?}"
    );
    let _ = rt.shutdown();
}

/// A sync dropped in flight whose `fdatasync` then completes with `EINTR`:
/// the retry that collecting it under descriptor pressure starts is kept
/// for the file's next sync like the first attempt, so the ring still
/// drives it and an allocation that needs another file's descriptor waits
/// for it (it failed with `FdPressure`: the retry was nobody's to reap).
/// (With `SEGALLOC_IO=sync` the operation and its retry end within the
/// first poll.)
#[test]
fn a_dropped_syncs_interrupted_fdatasync_is_retried_and_gives_its_descriptor_back() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = one_descriptor_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let (in_file_0, _) = fill_two_files(&shard).await;
        dirty_again(&shard, &in_file_0).await;
        faults::inject(Fault::new(FaultOp::Fsync, EINTR).at_completion());
        drop_a_sync_in_flight(&shard);
        // File 1 grows: its descriptor waits for the kept fdatasync's.
        let r = shard.allocate(MIB).await.map(|a| a.handle());
        assert!(r.is_ok(), "{r:?}");
        shard.sync().await.unwrap();
    });
}

/// With every `fallocate` failing (`EOPNOTSUPP`, as on a file system
/// without it): a manager of `dir` with a cap of 2 windows and
/// `pin_timeout`, and a file `a` registered with it.
fn no_fallocate_manager(
    dir: &Path,
    pin_timeout: std::time::Duration,
) -> (
    std::rc::Rc<segalloc::FileHandleRegistry>,
    segalloc::MappingManager,
    segalloc::FileId,
) {
    faults::inject(Fault::new(FaultOp::Fallocate, EOPNOTSUPP).always());
    let cfg = common::builder(dir, 8, 2)
        .pin_timeout(pin_timeout)
        .build()
        .unwrap();
    let (files, mm) = common::manager_with(&cfg);
    let f = common::register(&files, dir.join("a"));
    (files, mm, f)
}

/// Without `fallocate`, a file grown where no window is mapped is
/// prefaulted through a mapping of just that range while the kernel works:
/// a mapping like a window's, so it counts against the window cap. (It was
/// not counted: two windows pinned under a cap of 2 and eight growths at
/// once made ten mappings of the file, and a shard's own growths did the
/// same with no call of the user's.) The growths wait for the pinned
/// windows, as a pin does, and go on once they are dropped.
#[test]
fn prefaults_without_fallocate_stay_within_the_window_cap() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let window = common::WINDOW;
    run(async {
        let (files, mm, f) = no_fallocate_manager(dir.path(), std::time::Duration::from_secs(30));
        let held = [
            mm.pin(f, 0, 4096, true).await.unwrap(),
            mm.pin(f, window, 4096, true).await.unwrap(),
        ];
        let peak = std::cell::Cell::new(0);
        let sample = || peak.set(peak.get().max(common::os_counts(dir.path()).1));
        let mm = &mm;
        let growths =
            futures::future::join_all((2..10u64).map(|w| mm.reserve(f, (w + 1) * window, window)));
        let release = async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            drop(held);
        };
        let sampler = async {
            loop {
                sample();
                tokio::task::yield_now().await;
            }
        };
        let (results, ()) = tokio::select! {
            r = async { futures::join!(growths, release) } => r,
            () = sampler => unreachable!("the sampler never ends"),
        };
        sample();
        for r in results {
            r.expect("growth");
        }
        assert_eq!(files.reserved_bytes(f).unwrap(), 10 * window);
        assert!(mm.stats().populated_bytes >= 8 * window);
        assert!(
            peak.get() <= 2,
            "{} mappings of the file under a cap of 2",
            peak.get()
        );
    });
}

/// The fault-in of a window whose growth leaves a part of an earlier,
/// unmapped window to prefault: with one window pinned under a cap of 2,
/// a pin two windows on fits the cap. It waited for a place for that
/// prefault while its own window held the last one, until `pin_timeout`
/// (for ever with no timeout). The prefault now runs before the fault-in
/// takes its place.
#[test]
fn a_fault_in_that_prefaults_an_earlier_window_fits_the_cap() {
    let _g = faults::clear_on_drop();
    let dir = tempfile::tempdir().unwrap();
    let window = common::WINDOW;
    run(async {
        let (_files, mm, f) = no_fallocate_manager(dir.path(), std::time::Duration::MAX);
        let held = mm.pin(f, 2 * window, 4096, true).await.unwrap();
        let far = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            mm.pin(f, 4 * window, 4096, true),
        )
        .await;
        assert!(matches!(far, Ok(Ok(_))), "{:?}", far.map(|r| r.map(|_| ())));
        drop(far);
        drop(held);
        assert!(mm.window_count() <= 2);
    });
}

/// `Runtime::sync` whose flush reports a rejected forwarded free, and a
/// shard's fdatasync fails (EIO: poisoned) in the same call: the failed
/// sync is returned, not the report, which says every shard synced.
#[test]
fn runtime_sync_reports_a_failed_sync_before_rejected_frees() {
    let dir = tempfile::tempdir().unwrap();
    let rt = segalloc::Runtime::start(common::small_cfg_shards(dir.path(), 2)).unwrap();
    let h = futures::executor::block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(100).await.unwrap();
        a.into_handle()
    }))
    .unwrap();
    futures::executor::block_on(rt.spawn_on(1, move |s| async move {
        s.free(h).unwrap();
        s.free(h).unwrap();
    }))
    .unwrap();
    futures::executor::block_on(rt.spawn_on(0, |_s| async move {
        faults::inject(Fault::new(FaultOp::Fsync, EIO).always());
    }))
    .unwrap();
    let r = futures::executor::block_on(rt.sync());
    let poisoned =
        futures::executor::block_on(rt.spawn_on(0, |s| async move { s.allocator().is_poisoned() }))
            .unwrap();
    futures::executor::block_on(rt.spawn_on(0, |_s| async move { faults::clear() })).unwrap();
    assert!(
        !(poisoned && matches!(r, Err(Error::FreesRejected { .. }))),
        "shard 0's sync failed (poisoned: {poisoned}) but Runtime::sync said {r:?}"
    );
}
