//! Two tasks on one shard, interleaved at their awaits: what one does while
//! the other waits must not break the other's promise, and a future dropped
//! mid-flight must not strand the operations of the tasks that remain.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use common::{
    Rng, assert_no_overlap, check_pattern, dirty_again, drop_a_sync_in_flight, fill_two_files,
    handle_seed, one_descriptor_cfg, open_shard, run, write_pattern,
};
use segalloc::config::MIB;
use segalloc::{Config, Error, Handle, Shard};

fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    let waker = futures::task::noop_waker();
    std::pin::Pin::new(f).poll(&mut Context::from_waker(&waker))
}

/// Poll `f` (with a waker that does nothing), letting the shard's other
/// tasks run between polls, until it is ready.
async fn poll_to_end<F: Future + Unpin>(f: &mut F) -> F::Output {
    loop {
        tokio::task::yield_now().await;
        if let Poll::Ready(r) = poll_once(f) {
            return r;
        }
    }
}

/// [`common::one_window_builder`]: a pin of an evicted window waits while
/// another window is pinned.
fn one_window(dir: &std::path::Path) -> Config {
    common::one_window_builder(dir).build().unwrap()
}

/// A pin refused because its allocation is no longer live.
fn assert_not_allocated(r: segalloc::Result<segalloc::PinGuard>) {
    assert!(
        matches!(r, Err(Error::NotAllocated { .. })),
        "{:?}",
        r.map(|p| p.len())
    );
}

/// One shard in a directory on disk (not on a tmpfs `/tmp`): an
/// `fdatasync` of dirty pages then takes a moment, long enough for other
/// tasks to run while it is in flight.
fn on_disk() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    (dir, cfg)
}

/// `quarantined_entries` counts the released segments a running sync
/// covers: their entries and space are reusable only once it completes,
/// and a sync dropped before then hands them back to the next one. It
/// counted only those waiting for the next sync to begin, so while a sync
/// ran the space it was about to give back looked reusable already (and
/// kv_server's full-disk retry, which syncs while segments are
/// quarantined, gave up on it). It checks something only with io_uring:
/// with `SEGALLOC_IO=sync` a sync completes within its first poll.
#[test]
fn a_running_sync_keeps_the_segments_it_covers_quarantined() {
    let (_dir, cfg) = on_disk();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Two full segments of 16-byte slots (4096 each), emptied: once the
        // frees are durable one is released (the other stays as the
        // class's spare).
        let mut small = Vec::new();
        for _ in 0..2 * 4096 {
            small.push(shard.allocate(16).await.unwrap().into_handle());
        }
        shard.sync().await.unwrap();
        for h in &small {
            shard.free(*h).unwrap();
        }
        shard.sync().await.unwrap();
        assert_eq!(shard.stats().alloc.quarantined_entries, 1);
        let quarantined_while = |dropped: bool| {
            let shard = &shard;
            async move {
                // Dirty pages, so that the sync's write-back takes a moment.
                let a = shard.allocate(MIB).await.unwrap();
                a.write_at(0, &vec![7u8; MIB as usize]).unwrap();
                drop(a);
                let before = shard.stats().alloc.quarantined_entries;
                let mut sync = Box::pin(shard.sync());
                let mut pending = 0;
                loop {
                    match poll_once(&mut sync) {
                        Poll::Pending => {
                            assert_eq!(shard.stats().alloc.quarantined_entries, before);
                            pending += 1;
                            if dropped {
                                break;
                            }
                            tokio::task::yield_now().await;
                        }
                        Poll::Ready(r) => {
                            r.unwrap();
                            break;
                        }
                    }
                }
                drop(sync);
                pending
            }
        };
        // Dropped while it runs: still quarantined, for the next sync.
        let pending = quarantined_while(true).await;
        if pending > 0 {
            assert_eq!(shard.stats().alloc.quarantined_entries, 1);
        }
        let pending = pending + quarantined_while(false).await;
        assert_eq!(shard.stats().alloc.quarantined_entries, 0);
        if common::expected_backend() == segalloc::IoBackend::Uring {
            assert!(pending > 0, "no sync was in flight when looked at");
        }
    });
}

/// A `pin` that waits for its window while another task frees the
/// allocation fails with `NotAllocated`. It once succeeded: the pin then
/// mapped a freed slot, and after a sync its writes landed in the next
/// allocation of that slot.
#[test]
fn a_pin_waiting_for_its_window_fails_if_the_allocation_is_freed_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_window(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let a = shard.allocate(64).await.unwrap();
        a.write_at(0, b"old").unwrap();
        let h = a.into_handle();
        // Other windows' worth of allocations: `h`'s window is evicted.
        let mut keep = Vec::new();
        for _ in 0..40 {
            keep.push(shard.allocate(MIB).await.unwrap().into_handle());
        }
        shard.sync().await.unwrap();
        let holder = shard.pin(*keep.last().unwrap()).await.unwrap();
        let mut pin = Box::pin(shard.pin(h));
        assert!(
            poll_once(&mut pin).is_pending(),
            "the pin waits for a window"
        );
        shard.free(h).unwrap();
        drop(holder);
        assert_not_allocated(poll_to_end(&mut pin).await);
        // The slot's next allocation is its own.
        shard.sync().await.unwrap();
        let b = shard.allocate(64).await.unwrap();
        assert_eq!(b.handle().offset(), h.offset(), "the same slot again");
        b.write_at(0, b"new").unwrap();
        let mut buf = [0u8; 3];
        b.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"new");
    });
}

/// As above with `trim` between the free and the pin's end: the pin once
/// succeeded over the hole `trim` punched (reading zeros, and a write into
/// it would allocate blocks on a disk that may be full).
#[test]
fn a_pin_waiting_for_its_window_fails_if_the_run_is_freed_and_punched_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = one_window(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut hs = Vec::new();
        for i in 0..40u8 {
            let a = shard.allocate(MIB).await.unwrap();
            a.pin().fill(0, 4096, i + 1).unwrap();
            hs.push(a.into_handle());
        }
        shard.sync().await.unwrap();
        let h = hs[0];
        let holder = shard.pin(*hs.last().unwrap()).await.unwrap();
        let mut pin = Box::pin(shard.pin(h));
        assert!(
            poll_once(&mut pin).is_pending(),
            "the pin waits for a window"
        );
        // hs[1] stays as the class's spare empty segment; hs[0], freed
        // last, is released and its run punched.
        for x in hs[1..5].iter().chain(std::iter::once(&hs[0])) {
            shard.free(*x).unwrap();
        }
        let punched = shard.trim().await.unwrap();
        assert!(punched >= MIB, "trim punched {punched} bytes");
        drop(holder);
        assert_not_allocated(poll_to_end(&mut pin).await);
    });
}

/// A `sync` dropped while its `fdatasync` runs (the operation is kept for
/// the file's next sync) must not strand another task's sync. With
/// io_uring it did: the dropped task had been the last to watch the ring's
/// eventfd, so the other task's completion was never reaped until some
/// other operation polled the ring (and two such tasks could deadlock).
#[test]
fn a_sync_dropped_in_flight_does_not_strand_another_tasks_sync() {
    for round in 0..5 {
        let (_dir, cfg) = on_disk();
        run(async {
            let shard = open_shard(&cfg).await.unwrap();
            // Dirty pages, so that an fdatasync takes a moment.
            for _ in 0..8 {
                let a = shard.allocate(MIB).await.unwrap();
                a.pin().fill(0, a.len(), 7).unwrap();
            }
            let other = shard.clone();
            let mut waiting = tokio::task::spawn_local(async move { other.sync().await });
            // The other task submits its fdatasyncs and waits.
            tokio::task::yield_now().await;
            {
                let mut dropped = Box::pin(shard.sync());
                let _ = futures::poll!(dropped.as_mut());
            }
            // Nothing on this task polls the ring from here on.
            let r = tokio::time::timeout(Duration::from_secs(10), &mut waiting).await;
            assert!(
                r.is_ok(),
                "round {round}: the other task's sync never woke up"
            );
            r.unwrap().unwrap().unwrap();
            // The dropped sync's operation is awaited by the next sync.
            shard.sync().await.unwrap();
        });
    }
}

/// `f` awaited to its end (`polls` is `None`), or polled at most `polls`
/// times (with the task's own waker, or with one that does nothing),
/// yielding between polls, and dropped unfinished after that.
async fn poll_then_drop<F: Future>(
    f: F,
    polls: Option<usize>,
    real_waker: bool,
) -> Option<F::Output> {
    let Some(polls) = polls else {
        return Some(f.await);
    };
    let mut f = std::pin::pin!(f);
    let noop = futures::task::noop_waker();
    for _ in 0..polls {
        let r = if real_waker {
            futures::poll!(f.as_mut())
        } else {
            f.as_mut().poll(&mut Context::from_waker(&noop))
        };
        if let Poll::Ready(v) = r {
            return Some(v);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Trims dropped at one poll more each time, until one completes (false)
/// or one leaves a run out of the free space, its punch in flight, which
/// `allocated_bytes` then counts above `allocated` (true).
async fn trims_dropped_until_a_punch_is_left(shard: &Shard, allocated: u64) -> bool {
    for polls in 1.. {
        if let Some(r) = poll_then_drop(shard.trim(), Some(polls), false).await {
            r.unwrap();
            return false;
        }
        if shard.stats().alloc.allocated_bytes > allocated {
            return true;
        }
    }
    unreachable!()
}

/// A `trim` dropped while its punch of a run was in flight kept the run
/// out of the free space until the shard was reopened (the kernel may
/// still punch it, so it cannot be handed out at once): every trim a
/// caller cancelled there lost a run, and the data file grew by one run
/// per cancelled trim. Now the run is free again once the kernel is done.
/// Each round fills 40 MiB, frees it, and cancels trims at one poll more
/// each time until one completes or one leaves a run behind. A run left
/// behind is taken back in turns by the next `trim`, which waits for its
/// punch first, or by a new segment of the next fill, once the punch is
/// done. With `SEGALLOC_IO=sync` a trim completes within its first poll,
/// so nothing is cancelled there (the checks hold all the same).
#[test]
fn a_trim_dropped_while_punching_gives_its_run_back() {
    let (_dir, cfg) = on_disk();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut filled_bytes = None;
        let (mut waited, mut collected) = (0, 0);
        for round in 0..12 {
            let mut hs = Vec::new();
            for i in 0..40u8 {
                let a = shard.allocate(MIB).await.unwrap();
                a.pin().fill(0, a.len(), i + 1).unwrap();
                hs.push(a.into_handle());
            }
            // 40 segments and nothing else; from the second round on, in
            // the space the first one made.
            let s = shard.stats().alloc;
            assert_eq!(s.allocated_bytes, 40 * MIB, "round {round}: a run lost");
            let first = *filled_bytes.get_or_insert(s.reserved_bytes);
            assert_eq!(s.reserved_bytes, first, "round {round}: the file grew");
            shard.sync().await.unwrap();
            // hs[0], freed last, is the class's spare empty segment.
            for h in hs[1..].iter().chain(std::iter::once(&hs[0])) {
                shard.free(*h).unwrap();
            }
            shard.sync().await.unwrap();
            shard.sync().await.unwrap();
            let left_behind = trims_dropped_until_a_punch_is_left(&shard, MIB).await;
            if left_behind && waited <= collected {
                waited += 1;
                shard.trim().await.unwrap();
                let s = shard.stats().alloc;
                assert_eq!(s.segments, 1, "round {round}: the spare segment only");
                assert_eq!(s.allocated_bytes, MIB, "round {round}: a run lost");
            } else if left_behind {
                collected += 1;
                // Time for the kernel to finish the punch.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if shard.stats().io_backend == segalloc::IoBackend::Uring {
            assert!(
                waited > 0 && collected > 0,
                "runs left behind by a dropped trim: {waited} taken back by a trim, \
                 {collected} by a new segment"
            );
        }
    });
}

/// The punch a dropped `trim` leaves in flight is kept (its run waits
/// beside it), but it must not keep its file's descriptor once the kernel
/// is done: with one descriptor for all the files, the kept punch held it
/// until the next `trim` or new segment, and a pin of another file's
/// allocation failed with `FdPressure`.
#[test]
fn a_punch_left_in_flight_does_not_keep_its_files_descriptor() {
    // A trim is dropped at one poll more each time, until one completes or
    // one leaves its punch in flight; the latter may not happen in a given
    // directory (a punch quicker than a poll), so up to five are tried.
    for _ in 0..5 {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let cfg = common::one_descriptor_cfg(dir.path());
        let left_behind = run(async {
            let shard = open_shard(&cfg).await.unwrap();
            let (in_file_0, in_file_1) = common::fill_two_files(&shard).await;
            for h in &in_file_0[1..] {
                shard.free(*h).unwrap();
            }
            shard.sync().await.unwrap();
            shard.sync().await.unwrap();
            let allocated = shard.stats().alloc.allocated_bytes;
            let left_behind = trims_dropped_until_a_punch_is_left(&shard, allocated).await;
            // Time for the kernel to finish the punch.
            tokio::time::sleep(Duration::from_millis(100)).await;
            shard.mappings().evict_idle();
            let p = shard.pin(in_file_1).await.unwrap();
            assert_eq!(p.len(), MIB as usize);
            left_behind || shard.stats().io_backend != segalloc::IoBackend::Uring
        });
        if left_behind {
            return;
        }
    }
    panic!("no trim left a punch in flight in five directories");
}

/// A data file is made by its first segment, and the next file can be
/// handed out while that segment is still being made: cancelled then, it
/// leaves the file's number unused while the next file holds a segment.
/// Such a directory must reopen, and `segalloc verify` must call it clean
/// (a check against forged file numbers once refused it). Here: 16 MiB
/// files, the metadata file full, so that a 16 MiB allocation waits for
/// the directory to grow; a second one takes the next file and completes,
/// the first is dropped. With `SEGALLOC_IO=sync` the directory grows
/// within the first poll, so there is nothing to cancel (the test returns).
#[test]
fn a_gap_left_by_a_cancelled_first_segment_reopens() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .max_file_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let live = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // 64 KiB segments of 16 B slots until the directory fills the
        // metadata file's reservation.
        loop {
            let s = shard.stats().alloc;
            let next = segalloc::format::entry_offset(s.segments as u32);
            if next + segalloc::format::ENTRY_BYTES > s.metadata_bytes {
                break;
            }
            shard.allocate(16).await.unwrap();
        }
        let mut first = Box::pin(shard.allocate(16 * MIB));
        if poll_once(&mut first).is_ready() {
            // `SEGALLOC_IO=sync`: the directory grows within the poll, and
            // there is nothing to cancel.
            assert_ne!(shard.stats().io_backend, segalloc::IoBackend::Uring);
            return None;
        }
        let mut second = Box::pin(shard.allocate(16 * MIB));
        assert!(poll_once(&mut second).is_pending());
        drop(first);
        let h = poll_to_end(&mut second).await.unwrap().into_handle();
        let missing = dir
            .path()
            .join(format!("shard-000/data-{:06}.seg", h.file_id() - 1));
        assert!(!missing.exists(), "no gap was left");
        shard.sync().await.unwrap();
        Some(shard.live_count())
    });
    let Some(live) = live else {
        return;
    };
    let reopened = run(async { open_shard(&cfg).await.map(|s| s.live_count()) });
    assert_eq!(reopened.unwrap(), live);
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_segalloc"))
        .arg("verify")
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
}

/// What the tasks together hold: each live handle and its contents' seed.
type Model = Rc<RefCell<BTreeMap<Handle, u64>>>;

/// One task: random allocates (of 1 B to 4 MiB), frees of its own
/// allocations, syncs, trims and pins, a good part of them dropped after a
/// few polls.
async fn worker(shard: Shard, model: Model, seed: u64, steps: usize, real_waker: bool) {
    let mut rng = Rng::new(seed);
    let mut mine: Vec<Handle> = Vec::new();
    for _ in 0..steps {
        match rng.below(10) {
            0..=3 => {
                let size = match rng.below(4) {
                    0 => 1 + rng.below(256),
                    1 => 1 + rng.below(70_000),
                    2 => MIB,
                    _ => 1 + rng.below(4 * MIB),
                };
                let polls = rng.chance(0.3).then(|| 1 + rng.below(4) as usize);
                match poll_then_drop(shard.allocate(size), polls, real_waker).await {
                    Some(Ok(a)) => {
                        let h = a.handle();
                        let s = handle_seed(&h, seed);
                        write_pattern(a.pin(), a.len(), s);
                        assert!(
                            model.borrow_mut().insert(h, s).is_none(),
                            "slot handed out twice: {h}"
                        );
                        mine.push(h);
                    }
                    Some(Err(e)) => panic!("allocate({size}): {e}"),
                    None => {}
                }
            }
            4..=6 if !mine.is_empty() => {
                let h = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                model.borrow_mut().remove(&h);
                shard.free(h).unwrap();
            }
            7 => {
                let polls = rng.chance(0.5).then(|| 1 + rng.below(3) as usize);
                if let Some(r) = poll_then_drop(shard.sync(), polls, real_waker).await {
                    r.unwrap();
                }
            }
            8 => {
                let polls = rng.chance(0.5).then(|| 1 + rng.below(6) as usize);
                if let Some(r) = poll_then_drop(shard.trim(), polls, real_waker).await {
                    r.unwrap();
                }
            }
            9 if !mine.is_empty() => {
                let h = mine[rng.below(mine.len() as u64) as usize];
                let s = model.borrow()[&h];
                let polls = rng.chance(0.3).then_some(1);
                match poll_then_drop(shard.pin(h), polls, real_waker).await {
                    Some(Ok(p)) => assert!(check_pattern(&p, p.len(), s), "contents of {h}"),
                    Some(Err(e)) => panic!("pin {h}: {e}"),
                    None => {}
                }
            }
            _ => {}
        }
        tokio::task::yield_now().await;
    }
}

/// The shard holds exactly the model's allocations, with their contents.
async fn check_against(shard: &Shard, model: &BTreeMap<Handle, u64>) {
    let mut live: Vec<Handle> = shard.live().collect();
    live.sort();
    assert_eq!(live, model.keys().copied().collect::<Vec<_>>(), "live set");
    assert_eq!(shard.live_count(), model.len() as u64, "live_count");
    assert_no_overlap(live.iter().copied());
    for (h, s) in model {
        let p = shard.pin(*h).await.unwrap();
        assert!(check_pattern(&p, p.len(), *s), "contents of {h}");
    }
}

/// Two or four tasks on one shard interleave allocate, free, sync, trim and pin,
/// about a third of the calls dropped after a few polls, with small
/// windows and a low window cap so that many calls await. No slot is
/// handed out twice, no task waits for ever (a dropped sync once left
/// another task's allocate waiting on a completion nobody reaped, and the
/// shard deadlocked), and the live set, the counts and every allocation's
/// bytes match what the tasks kept, before and after a reopen.
/// `SEGALLOC_TEST_SEEDS` sets the number of seeds (default 6).
#[test]
fn tasks_interleaving_and_dropping_calls_keep_the_shard_consistent() {
    let seeds: u64 = common::number_from_env("SEGALLOC_TEST_SEEDS", 6);
    for seed in 0..seeds {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::builder(dir.path())
            .shards(1)
            .window_bytes(16 * MIB)
            .growth_step_bytes(MIB)
            .max_file_bytes(32 * MIB)
            .max_windows(4)
            .build()
            .unwrap();
        let model: Model = Rc::new(RefCell::new(BTreeMap::new()));
        // Two or four tasks; polled with their own wakers or with ones
        // that do nothing (two tasks with their own wakers deadlocked).
        let tasks = if seed % 2 == 0 { 2 } else { 4 };
        let real_waker = (seed / 2) % 2 == 0;
        run(async {
            let shard = open_shard(&cfg).await.unwrap();
            let tasks: Vec<_> = (0..tasks)
                .map(|t| {
                    let w = worker(
                        shard.clone(),
                        model.clone(),
                        seed * 100 + t,
                        300,
                        real_waker,
                    );
                    tokio::task::spawn_local(w)
                })
                .collect();
            let all = futures::future::join_all(tasks);
            let done = tokio::time::timeout(Duration::from_secs(30), all).await;
            let done = done.unwrap_or_else(|_| panic!("seed {seed}: the tasks hung"));
            for r in done {
                r.unwrap();
            }
            let m = model.borrow().clone();
            check_against(&shard, &m).await;
            shard.sync().await.unwrap();
        });
        run(async {
            let shard = open_shard(&cfg).await.unwrap();
            let m = model.borrow().clone();
            check_against(&shard, &m).await;
            for h in m.keys() {
                shard.free(*h).unwrap();
            }
            shard.sync().await.unwrap();
            shard.trim().await.unwrap();
            assert_eq!(shard.live_count(), 0);
        });
    }
}

/// Two syncs of a file dropped in flight leave two operations kept for its
/// next sync. A next sync dropped while it awaits the first kept them both:
/// the second was dropped with it (abandoned), and a write-back error only
/// it would have reported was lost. io_uring only (with plain syscalls an
/// operation completes before its future returns).
#[test]
fn a_sync_dropped_while_it_awaits_kept_operations_keeps_the_rest() {
    if std::env::var("SEGALLOC_IO").is_ok_and(|v| v == "sync") {
        return;
    }
    let (_dir, cfg) = on_disk();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let dirty = |shard: &Shard| {
            let shard = shard.clone();
            async move {
                for _ in 0..8 {
                    let a = shard.allocate(MIB).await.unwrap();
                    a.pin().fill(0, a.len(), 7).unwrap();
                }
            }
        };
        let mut kept_two = false;
        for _ in 0..20 {
            dirty(&shard).await;
            // Two syncs in flight at once, then both dropped.
            let (mut a, mut b) = (Box::pin(shard.sync()), Box::pin(shard.sync()));
            let ready = poll_once(&mut a).is_ready() | poll_once(&mut b).is_ready();
            drop((a, b));
            if ready {
                shard.sync().await.unwrap();
                continue;
            }
            let before = shard.stats().ring.abandoned;
            let mut c = Box::pin(shard.sync());
            if poll_once(&mut c).is_ready() {
                shard.sync().await.unwrap();
                continue;
            }
            drop(c);
            assert_eq!(
                shard.stats().ring.abandoned,
                before,
                "a kept sync was dropped with the sync awaiting the one before it"
            );
            kept_two = true;
            shard.sync().await.unwrap();
            break;
        }
        assert!(kept_two, "never had two syncs in flight at once");
    });
}

/// `allocate` and `pin` return futures that do nothing until polled, take
/// the hot path on their first poll, wait (and leave nothing behind when
/// dropped) only on the slow path, and panic if polled after completion.
#[test]
fn allocate_and_pin_futures_are_lazy_and_cancel_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Made and dropped without a poll: nothing allocated.
        drop(shard.allocate(64));
        assert_eq!(shard.live_count(), 0);
        // The first allocation of a class needs a new segment: on io_uring
        // the first poll waits for it; dropped there, nothing is allocated.
        let mut f = Box::pin(shard.allocate(64));
        if poll_once(&mut f).is_pending() {
            drop(f);
            assert_eq!(shard.live_count(), 0);
        } else {
            drop(f);
            assert_eq!(shard.live_count(), 1);
            shard.free(shard.live().next().unwrap()).unwrap();
        }
        // Awaited to the end, it makes the segment (the dropped one gave its
        // entry back); freed, its slot is reusable at once.
        let first = shard.allocate(64).await.unwrap().into_handle();
        shard.free(first).unwrap();
        // Now the segment exists: the first poll is ready.
        let mut f = Box::pin(shard.allocate(64));
        let a = match poll_once(&mut f) {
            Poll::Ready(a) => a.unwrap(),
            Poll::Pending => panic!("the hot path waited"),
        };
        let h = a.into_handle();
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(&mut f)));
        assert!(again.is_err(), "a completed future polled again must panic");
        assert_eq!(shard.live_count(), 1);
        // A pin: lazy too, ready at once on a mapped window.
        let pinned = shard.mappings().stats().pinned_windows;
        drop(shard.pin(h));
        let mut p = Box::pin(shard.pin(h));
        match poll_once(&mut p) {
            Poll::Ready(p) => assert_eq!(p.unwrap().len(), 64),
            Poll::Pending => panic!("a pin of a mapped window waited"),
        }
        let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| poll_once(&mut p)));
        assert!(
            again.is_err(),
            "a completed pin future polled again must panic"
        );
        drop(p);
        assert_eq!(
            shard.mappings().stats().pinned_windows,
            pinned,
            "a pin outlived its guard"
        );
        // Of an evicted window: the fault-in's future, boxed by the first
        // poll (which here maps the window within the poll on both
        // backends: a pin dropped while the ring works is
        // `dropped_pin_future_mid_fault` in tests/core_mapping.rs); dropped,
        // nothing stays pinned, and the next pin maps the window again.
        // A prefault the allocations started may still hold the window
        // (`evict_idle` leaves such windows): let it finish first.
        shard.mappings().settle_prefaults().await;
        assert!(shard.mappings().evict_idle() >= 1, "no window evicted");
        let mut p = Box::pin(shard.pin(h));
        match poll_once(&mut p) {
            Poll::Pending => drop(p),
            Poll::Ready(r) => drop(r.unwrap()),
        }
        assert_eq!(
            shard.mappings().stats().pinned_windows,
            pinned,
            "a dropped pin future left a window pinned"
        );
        assert_eq!(shard.pin(h).await.unwrap().len(), 64);
        shard.free(h).unwrap();
        // Of a freed allocation: an error on the first poll.
        let mut p = Box::pin(shard.pin(h));
        assert!(matches!(
            poll_once(&mut p),
            Poll::Ready(Err(Error::NotAllocated { .. }))
        ));
        assert_eq!(shard.live_count(), 0);
    });
}

/// Dirty pages of the file at `path` in the page cache (`cachestat(2)`).
fn dirty_pages(path: &std::path::Path) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        cache: u64,
        dirty: u64,
        writeback: u64,
        evicted: u64,
        recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let f = std::fs::File::open(path).unwrap();
    let whole = Range { off: 0, len: 0 };
    let mut st = Stat::default();
    // SAFETY: both pointers are valid for the call; the kernel writes only
    // `st`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &whole as *const Range,
            &mut st as *mut Stat,
            0u32,
        )
    };
    assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
    st.dirty
}

/// An `allocate` that took a slot and then gave it back (dropped while its
/// window faulted in, or failed with `WindowPressure` after `pin_timeout`)
/// between a sync and a later allocation must not hide that allocation
/// from the next sync: that sync writes the metadata back (no dirty page
/// of it is left), so the allocation survives a power loss. The count of
/// allocations went back to what the first sync saw, and the next sync
/// skipped the metadata. Meanwhile the live counts leave the slot out, as
/// `live()` does.
#[test]
fn an_allocate_given_back_does_not_hide_a_later_one_from_the_next_sync() {
    for timeout in [false, true] {
        let (dir, _) = on_disk();
        let mut cfg = common::one_window_builder(dir.path());
        if timeout {
            cfg = cfg.pin_timeout(Duration::from_millis(20));
        }
        let cfg = cfg.build().unwrap();
        let meta = dir.path().join("shard-000/meta.seg");
        run(async {
            let shard = open_shard(&cfg).await.unwrap();
            // A slot of 64 B in file 0's window; a pinned slot in file 1's
            // (every window is then mapped or pinned), and a class with room
            // in that window.
            shard.allocate(64).await.unwrap();
            let big = loop {
                let h = shard.allocate(MIB).await.unwrap().into_handle();
                if h.file_id() == 1 {
                    break h;
                }
            };
            let mut size = 0;
            for s in [200u64, 300, 400, 500, 700, 900, 1100, 1500, 2000] {
                if shard.allocate(s).await.unwrap().handle().file_id() == 1 {
                    size = s;
                    break;
                }
            }
            assert_ne!(size, 0, "no class with room in file 1");
            let held = shard.pin(big).await.unwrap();
            shard.sync().await.unwrap();
            // B takes a slot in file 0 and waits for its window.
            let mut b = Box::pin(shard.allocate(64));
            assert!(poll_once(&mut b).is_pending(), "waits for its window");
            // Not handed out yet: counted nowhere.
            let live = shard.live().count() as u64;
            assert_eq!(shard.live_count(), live);
            assert_eq!(shard.stats().alloc.allocations_live, live);
            shard.sync().await.unwrap();
            if timeout {
                let r = poll_to_end(&mut b).await;
                assert!(matches!(r, Err(Error::WindowPressure { .. })), "{r:?}");
            }
            drop(b);
            assert_eq!(shard.live_count(), live);
            // A, on the hot path, then a sync that must cover it.
            let a = shard.allocate(size).await.unwrap();
            a.write_at(0, b"acknowledged").unwrap();
            drop(a);
            shard.sync().await.unwrap();
            assert_eq!(dirty_pages(&meta), 0, "timeout: {timeout}");
            drop(held);
        });
    }
}

/// A `sync` dropped while its `fdatasync` is in flight keeps that operation
/// (and the file's descriptor) for the file's next sync. Once the kernel
/// has finished it, the shard releases the descriptor by itself: a pin
/// that needs another file's descriptor under a cap of one gets it, where
/// it failed with `FdPressure` until something else polled the ring. (With
/// `SEGALLOC_IO=sync` the operation ends within the first poll.) Asked at
/// once, while the kernel still runs it, the pin waits for it.
#[test]
fn a_dropped_sync_gives_its_descriptor_back_once_the_kernel_is_done() {
    for pause in [Duration::ZERO, Duration::from_millis(500)] {
        a_dropped_sync_gives_its_descriptor_back(pause);
    }
}

fn a_dropped_sync_gives_its_descriptor_back(pause: Duration) {
    let (dir, _) = on_disk();
    let cfg = one_descriptor_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let (in_file_0, in_file_1) = fill_two_files(&shard).await;
        // File 0 dirty, its sync dropped in flight: file 1's descriptor for
        // a pin, then for its growth.
        let drop_a_sync = || async {
            dirty_again(&shard, &in_file_0).await;
            drop_a_sync_in_flight(&shard);
            // The kernel finishes the fdatasync meanwhile; the executor runs.
            tokio::time::sleep(pause).await;
        };
        drop_a_sync().await;
        let r = shard.pin(in_file_1).await.map(|p| p.len());
        assert!(r.is_ok(), "pin after {pause:?}: {r:?}");
        drop_a_sync().await;
        let r = shard.allocate(MIB).await.map(|a| a.handle());
        assert!(r.is_ok(), "allocate after {pause:?}: {r:?}");
        shard.sync().await.unwrap();
    });
}

/// The same kept `fdatasync` awaited by a later sync while a growth waits
/// for its descriptor: the sync polls it (no longer detached), and its end
/// must still wake the growth, which slept for ever. Woken, the growth
/// gets the descriptor, or `FdPressure` when the sync holds it again for
/// its own `fdatasync` (every descriptor busy, as documented): an answer
/// either way. (With `SEGALLOC_IO=sync` the operation ends within the
/// first poll.)
#[test]
fn a_growth_waiting_for_a_kept_syncs_descriptor_wakes_when_a_sync_awaits_it() {
    let (dir, _) = on_disk();
    let cfg = one_descriptor_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let (in_file_0, _) = fill_two_files(&shard).await;
        dirty_again(&shard, &in_file_0).await;
        drop_a_sync_in_flight(&shard);
        // The growth is polled first and waits; then the sync.
        let grow = tokio::time::timeout(Duration::from_secs(10), shard.allocate(MIB));
        let (grown, synced) = futures::join!(grow, shard.sync());
        synced.unwrap();
        let grown = grown.expect("the growth still waits after 10 s");
        assert!(
            matches!(grown, Ok(_) | Err(Error::FdPressure { .. })),
            "{:?}",
            grown.map(|a| a.handle())
        );
    });
}
