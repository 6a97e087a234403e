//! `Runtime` through its public API: start / shutdown / restart, `spawn_on`,
//! cross-shard frees (counters, a storm while the owner is busy, a forwarded
//! double free), reads and writes through the owner, `Runtime::sync` covering forwarded frees,
//! panics and crashed shards, and dropping a runtime without shutdown.
//!
//! The io backend follows `SEGALLOC_IO` (`uring` or `sync`); CI runs the file
//! once with each.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use segalloc::config::MIB;
use segalloc::{Config, Error, Handle, Runtime, RuntimeStats, Shard};

/// Two shards, 16 MiB windows, 1 MiB growth steps.
fn config(dir: &Path, shards: usize) -> Config {
    Config::builder(dir.join("data"))
        .shards(shards)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .expect("config")
}

/// The bytes record `i` of a test holds: a pattern seeded by `i`.
fn contents(i: u64, len: usize) -> Vec<u8> {
    common::pattern(i + 1, len)
}

/// Allocate `n` records of `len` bytes on the shard, each filled with
/// `contents(first + k, len)`; returns `(handle, seed)` pairs.
async fn fill(shard: &Shard, first: u64, n: u64, len: usize) -> Vec<(Handle, u64)> {
    let mut out = Vec::with_capacity(n as usize);
    for k in 0..n {
        let a = shard.allocate(len as u64).await.expect("allocate");
        a.write_at(0, &contents(first + k, len)).expect("write");
        out.push((a.into_handle(), first + k));
    }
    out
}

/// Check, on the owner, that every record is live and holds its bytes.
async fn check_records(shard: &Shard, records: &[(Handle, u64)], len: usize) {
    let mut buf = vec![0u8; len];
    for &(h, seed) in records {
        assert!(shard.allocator().is_live(&h), "{h} should be live");
        let pin = shard.pin(h).await.expect("pin");
        pin.read_at(0, &mut buf).expect("read");
        assert!(buf == contents(seed, len), "{h}: contents differ");
    }
}

/// Assert that the shard's live allocations are exactly `want`; on failure
/// report how many are missing and extra, with a few of each.
fn assert_live_exactly(shard: &Shard, want: &[(Handle, u64)], context: &str) {
    let live: HashSet<Handle> = shard.live().collect();
    let want: HashSet<Handle> = want.iter().map(|r| r.0).collect();
    let missing: Vec<_> = want.difference(&live).take(3).collect();
    let extra: Vec<_> = live.difference(&want).take(3).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: {} live, {} expected; {} missing (e.g. {missing:?}), {} extra (e.g. {extra:?})",
        live.len(),
        want.len(),
        want.difference(&live).count(),
        live.difference(&want).count(),
    );
    assert_eq!(
        shard.live_count(),
        want.len() as u64,
        "{context}: live_count"
    );
}

/// Panic with `msg` (a function returning `()`, so task types stay `()`).
fn explode(msg: &str) {
    panic!("{msg}");
}

/// Let the calling shard's executor turn `n` times.
async fn turns(n: usize) {
    for _ in 0..n {
        tokio::task::yield_now().await;
    }
}

fn stats(rt: &Runtime) -> RuntimeStats {
    block_on(rt.stats()).expect("stats")
}

/// Shard `index`'s thread takes (almost) no CPU time over half a second:
/// nothing on it spins.
fn assert_idle(rt: &Runtime, index: usize) {
    let thread = block_on(rt.spawn_on(index, |_| async move {
        std::fs::read_link("/proc/thread-self").expect("/proc/thread-self")
    }))
    .unwrap();
    let ticks = || common::cpu_ticks(&Path::new("/proc").join(&thread).join("stat"));
    let at = ticks();
    std::thread::sleep(Duration::from_millis(500));
    let spent = ticks() - at;
    assert!(
        spent < 20,
        "shard {index} ran {spent} ticks of 500 ms while idle"
    );
}

#[test]
fn start_shutdown_restart_keeps_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    assert_eq!(rt.shard_count(), 2);
    let mut per_shard = Vec::new();
    for i in 0..2 {
        let recs = block_on(rt.spawn_on(i, move |s| async move {
            let recs = fill(&s, 1000 * i as u64, 300, 200).await;
            s.set_root("first", recs[0].0).unwrap();
            recs
        }))
        .unwrap();
        per_shard.push(recs);
    }
    let st = stats(&rt);
    for s in &st.shards {
        assert_eq!(s.io_backend, common::expected_backend());
        assert_eq!(s.alloc.allocations_live, 300);
    }
    rt.shutdown().unwrap();

    let rt = Runtime::start(cfg).unwrap();
    for (i, recs) in per_shard.into_iter().enumerate() {
        block_on(rt.spawn_on(i, move |s| async move {
            assert_eq!(s.live_count(), 300);
            assert_live_exactly(&s, &recs, "after restart");
            assert_eq!(s.root("first"), Some(recs[0].0));
            check_records(&s, &recs, 200).await;
        }))
        .unwrap();
    }
    rt.shutdown().unwrap();
}

#[test]
fn spawn_on_returns_values_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    for i in 0..2 {
        let index = block_on(rt.spawn_on(i, |s| async move { s.index() })).unwrap();
        assert_eq!(index as usize, i);
    }
    // The task's own error comes back inside `Ok`.
    let r = block_on(rt.spawn_on(
        0,
        |s| async move { s.allocate(0).await.map(|a| a.handle()) },
    ))
    .unwrap();
    assert!(matches!(r, Err(Error::InvalidSize { size: 0 })), "{r:?}");
    let r = block_on(rt.spawn_on(1, |s| async move {
        s.allocate(17 * MIB).await.map(|a| a.handle())
    }))
    .unwrap();
    assert!(matches!(r, Err(Error::InvalidSize { .. })), "{r:?}");
    // An out-of-range shard says so.
    let r = block_on(rt.spawn_on(7, |s| async move { s.index() }));
    let Err(e) = r else { panic!("{r:?}") };
    assert!(
        matches!(
            e,
            Error::ShardOutOfRange {
                shard: 7,
                shard_count: 2
            }
        ),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "shard 7 out of range: the runtime has 2 shards"
    );
    // Many tasks in flight on one shard, awaited out of order.
    let hs: Vec<_> = (0..50u64)
        .map(|k| rt.spawn_on((k % 2) as usize, move |_| async move { k * k }))
        .collect();
    for (k, h) in hs.into_iter().enumerate().rev() {
        assert_eq!(block_on(h).unwrap(), (k * k) as u64);
    }
    rt.shutdown().unwrap();
}

/// A partial batch of forwarded frees leaves 16 turns of the executor after
/// its first free, not when a timer started by an earlier batch's first free
/// runs out: the frees that follow a full batch wait to gather a batch of
/// their own.
#[test]
fn a_full_batch_starts_the_next_batchs_clock() {
    const BATCH: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    let recs =
        block_on(rt.spawn_on(0, |s| async move { fill(&s, 0, BATCH + 20, 16).await })).unwrap();
    let hs: Vec<Handle> = recs.iter().map(|r| r.0).collect();
    let sent = block_on(rt.spawn_on(1, move |s| async move {
        let batches = |s: &Shard| s.stats().mesh.batches_sent;
        // 10 frees start a batch and its clock; 10 turns later the next
        // 1,014 fill it (it leaves at once) and 10 start the next batch.
        for h in &hs[..10] {
            s.free(*h).unwrap();
        }
        turns(10).await;
        // The 1,024th free fills the batch: it leaves with it.
        for h in &hs[10..BATCH as usize] {
            s.free(*h).unwrap();
        }
        let at_full = batches(&s);
        for h in &hs[BATCH as usize..] {
            s.free(*h).unwrap();
        }
        let full = batches(&s);
        // 20 turns after the first batch's first free, 10 after the second
        // batch's: the first batch's clock has run out, the second's not.
        turns(10).await;
        let early = batches(&s);
        turns(40).await;
        (at_full, full, early, batches(&s))
    }))
    .unwrap();
    assert_eq!(
        sent,
        (1, 1, 1, 2),
        "(the 1,024th free, all frees, 20 turns on, 60 turns on)"
    );
    block_on(rt.sync()).unwrap();
    assert_eq!(stats(&rt).shards[0].alloc.allocations_live, 0);
    rt.shutdown().unwrap();
}

/// While one owner's batch waits for room in its full channel, nothing
/// for it leaves; once the owner catches up, that batch leaves, and so do
/// its next partial batches, on the clock: the flush task passes an owner
/// by only while its waiter waits. (A waiter that left its owner marked
/// waiting would leave every later partial batch for it to a full batch or
/// a flush.)
#[test]
fn an_owner_that_caught_up_gets_its_partial_batches_on_the_clock_again() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 3)).unwrap();
    let h2 = common::allocate_synced(&rt, 2, 2, 16);
    // Shard 2 stops draining: its channel from shard 0 fills.
    let (release, busy) = common::hold_shard(&rt, 2);
    block_on(rt.spawn_on(0, move |s| async move {
        common::free_until_backpressure(&s, h2[0]);
        // Shard 2's batch now waits for room: nothing leaves meanwhile.
        turns(40).await;
        let before = s.stats().mesh.batches_sent;
        turns(40).await;
        assert_eq!(
            s.stats().mesh.batches_sent,
            before,
            "a batch left shard 2's full channel"
        );
        release.send(()).unwrap();
        let until_sent = |what: &'static str, more: u64, secs: u64| {
            let s = s.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(secs);
                while s.stats().mesh.batches_sent < more {
                    assert!(Instant::now() < deadline, "{what}");
                    tokio::task::yield_now().await;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        };
        until_sent("the waiting batch never left", before + 1, 10).await;
        // A partial batch for shard 2 again: its first free (the slow path)
        // and a second (the inline one).
        s.free(h2[1]).unwrap();
        s.free(h2[1]).unwrap();
        until_sent("shard 2's next partial batch never left", before + 2, 5).await;
    }))
    .unwrap();
    block_on(busy).unwrap();
    rt.shutdown().unwrap();
}

/// One owner far behind does not hold up a shard's batches for the others:
/// while shard 2 drains nothing (its channel from shard 0 full, a full
/// batch for it waiting), a partial batch for shard 1 leaves on the clock
/// and shard 1 applies it, shard 2 still blocked. Meanwhile shard 0 idles:
/// nothing spins on the waiting batch.
#[test]
fn an_owner_far_behind_does_not_delay_the_batches_for_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 3)).unwrap();
    let h2 = common::allocate_synced(&rt, 2, 1, 16)[0];
    let h1 = common::allocate_synced(&rt, 1, 1, 16)[0];
    let (release, busy) = common::hold_shard(&rt, 2);
    let left = block_on(rt.spawn_on(0, move |s| async move {
        common::free_until_backpressure(&s, h2);
        // The batch for shard 2 stays here (its channel is full) ...
        turns(40).await;
        let before = s.stats().mesh.batches_sent;
        // ... and one for shard 1 begins.
        s.free(h1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.stats().mesh.batches_sent == before && Instant::now() < deadline {
            tokio::task::yield_now().await;
            std::thread::sleep(Duration::from_micros(100));
        }
        s.stats().mesh.batches_sent - before
    }))
    .unwrap();
    assert_eq!(left, 1, "the batch for shard 1 waited for shard 2");
    let received = block_on(rt.spawn_on(1, |s| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.stats().mesh.cross_frees_received == 0 {
            assert!(Instant::now() < deadline, "shard 1 never got its free");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        s.stats().mesh.cross_frees_received
    }))
    .unwrap();
    assert_eq!(received, 1);
    assert_idle(&rt, 0);
    release.send(()).unwrap();
    block_on(busy).unwrap();
    rt.shutdown().unwrap();
}

/// A free of a gone owner's handle is refused while this shard's buffer
/// for it holds frees (the batch had begun before the owner stopped), not
/// queued after them to be lost with them; the frees left in that buffer
/// do not keep the shard busy.
#[test]
fn a_begun_batch_for_a_gone_owner_takes_no_more_frees() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    let hs = common::allocate_synced(&rt, 1, 2, 64);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (begun_tx, begun) = std::sync::mpsc::channel::<()>();
    let frees = rt.spawn_on(0, move |s| async move {
        // Begun, and the shard's thread held (no turn passes: the batch
        // stays here) until its owner is gone.
        s.free(hs[0]).unwrap();
        begun_tx.send(()).unwrap();
        wait.recv().unwrap();
        let mut accepted = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match s.free(hs[1]) {
                Ok(()) => accepted += 1,
                Err(Error::ShardGone { shard: 1 }) => break,
                Err(e) => panic!("{e:?}"),
            }
            assert!(Instant::now() < deadline, "never refused");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (accepted, s.flush_frees().await)
    });
    begun.recv().unwrap();
    common::crash_and_wait_gone(&rt, 1);
    // Its channels close as its thread unwinds, a moment after.
    std::thread::sleep(Duration::from_millis(200));
    go.send(()).unwrap();
    let (accepted, flushed) = block_on(frees).unwrap();
    assert!(
        accepted <= 20,
        "{accepted} frees queued for a gone owner before one was refused"
    );
    assert!(
        matches!(flushed, Err(Error::ShardGone { shard: 1 })),
        "{flushed:?}"
    );
    // The frees still buffered for the gone owner keep no clock running.
    assert_idle(&rt, 0);
}

#[test]
fn cross_shard_frees_are_counted_and_applied() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    let recs = block_on(rt.spawn_on(0, |s| async move { fill(&s, 0, 1000, 100).await })).unwrap();
    let (freed, kept) = recs.split_at(600);
    let to_free: Vec<Handle> = freed.iter().map(|r| r.0).collect();
    let n = block_on(rt.spawn_on(1, move |s| async move {
        for h in &to_free {
            s.free(*h).unwrap();
        }
        to_free.len()
    }))
    .unwrap();
    assert_eq!(n, 600);
    // One more from outside any shard, through `Runtime::free`.
    block_on(rt.free(kept[0].0)).unwrap().unwrap();
    block_on(rt.sync()).unwrap();

    let st = stats(&rt);
    let (s0, s1) = (&st.shards[0], &st.shards[1]);
    assert_eq!(s1.mesh.cross_frees_sent, 600);
    assert!((1..=600).contains(&s1.mesh.batches_sent), "{:?}", s1.mesh);
    assert_eq!(s0.mesh.cross_frees_received, 600);
    assert_eq!(s0.mesh.cross_frees_rejected, 0);
    assert_eq!(s0.mesh.cross_frees_sent, 0);
    assert_eq!(s1.mesh.cross_frees_received, 0);
    assert_eq!(st.cross_frees_sent(), st.cross_frees_received());
    assert_eq!(s0.alloc.allocations_live, 399);
    assert_eq!(s0.alloc.frees, 601);
    assert_eq!(st.allocations_live(), 399);

    let kept = kept[1..].to_vec();
    let freed = freed.to_vec();
    let check = kept.clone();
    block_on(rt.spawn_on(0, move |s| async move {
        for (h, _) in &freed {
            assert!(!s.allocator().is_live(h));
        }
        check_records(&s, &check, 100).await;
    }))
    .unwrap();
    rt.shutdown().unwrap();

    let rt = Runtime::start(cfg).unwrap();
    block_on(rt.spawn_on(0, move |s| async move {
        assert_live_exactly(&s, &kept, "after restart");
        check_records(&s, &kept, 100).await;
    }))
    .unwrap();
    rt.shutdown().unwrap();
}

#[test]
fn cross_free_storm_while_owner_is_busy() {
    const PRE: u64 = 30_000;
    const BUSY_MIN: u64 = 20_000;
    const LEN: usize = 48;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 3)).unwrap();
    let pre = block_on(rt.spawn_on(0, |s| async move { fill(&s, 0, PRE, LEN).await })).unwrap();
    let senders_done = Arc::new(AtomicUsize::new(0));

    // The owner: allocate, write, checksum in a loop, yielding now and then,
    // until both senders are done and it saw forwarded frees arrive.
    let done = senders_done.clone();
    let busy = rt.spawn_on(0, move |s| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut recs = Vec::new();
        let mut sum = 0u64;
        let mut k = 0u64;
        loop {
            let seed = 1_000_000 + k;
            let a = match s.try_allocate(LEN as u64).unwrap() {
                Some(a) => a,
                None => s.allocate(LEN as u64).await.unwrap(),
            };
            let bytes = contents(seed, LEN);
            sum = bytes
                .iter()
                .fold(sum, |acc, &b| acc.rotate_left(5) ^ b as u64);
            a.write_at(0, &bytes).unwrap();
            recs.push((a.into_handle(), seed));
            k += 1;
            if k.is_multiple_of(64) {
                tokio::task::yield_now().await;
                let received = s.stats().mesh.cross_frees_received;
                if k >= BUSY_MIN && done.load(Ordering::Acquire) == 2 && received > 0 {
                    return (recs, received, sum);
                }
                assert!(Instant::now() < deadline, "storm did not finish");
            }
        }
    });
    // Two senders forward half of the pre-allocated handles each, without
    // yielding: full batches go out while the owner is busy.
    let senders: Vec<_> = (1..3usize)
        .map(|i| {
            let mine: Vec<Handle> = pre.iter().skip(i - 1).step_by(2).map(|r| r.0).collect();
            let done = senders_done.clone();
            rt.spawn_on(i, move |s| async move {
                for h in &mine {
                    s.free(*h).unwrap();
                }
                done.fetch_add(1, Ordering::Release);
                mine.len() as u64
            })
        })
        .collect();
    let sent: u64 = senders.into_iter().map(|h| block_on(h).unwrap()).sum();
    assert_eq!(sent, PRE);
    let (busy_recs, received_while_busy, _) = block_on(busy).unwrap();
    assert!(received_while_busy > 0);
    block_on(rt.sync()).unwrap();

    let st = stats(&rt);
    assert_eq!(
        st.shards[1].mesh.cross_frees_sent + st.shards[2].mesh.cross_frees_sent,
        PRE
    );
    assert_eq!(
        st.shards[0].mesh.cross_frees_received, PRE,
        "every free applied once"
    );
    assert_eq!(
        st.shards[0].mesh.cross_frees_rejected, 0,
        "no free applied twice"
    );
    assert_eq!(st.shards[0].alloc.allocations_live, busy_recs.len() as u64);
    eprintln!(
        "storm: {PRE} forwarded frees, {} owner allocations, {received_while_busy} applied while busy, {} batches",
        busy_recs.len(),
        st.shards[1].mesh.batches_sent + st.shards[2].mesh.batches_sent
    );
    // Exactly the owner's own allocations remain, each with its bytes: no
    // forwarded free was lost or hit a slot reused by the busy loop.
    block_on(rt.spawn_on(0, move |s| async move {
        assert_live_exactly(&s, &busy_recs, "after the storm");
        check_records(&s, &busy_recs, LEN).await;
    }))
    .unwrap();
    rt.shutdown().unwrap();
}

#[test]
fn forwarded_double_free_is_rejected_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    let recs = block_on(rt.spawn_on(0, |s| async move { fill(&s, 0, 3, 64).await })).unwrap();
    let victim = recs[1].0;
    // Both calls are accepted by the sender (only the owner knows liveness).
    block_on(rt.spawn_on(1, move |s| async move {
        s.free(victim).unwrap();
        s.free(victim).unwrap();
    }))
    .unwrap();
    // The sync reports the rejection (the sender's flush), once, and syncs.
    let r = block_on(rt.sync());
    assert!(
        matches!(&r, Err(Error::FreesRejected { count: 1, first: Some(e) })
            if matches!(**e, Error::DoubleFree { .. })),
        "{r:?}"
    );
    block_on(rt.sync()).unwrap();
    let st = stats(&rt);
    assert_eq!(st.shards[1].mesh.cross_frees_sent, 2);
    assert_eq!(st.shards[0].mesh.cross_frees_received, 1);
    assert_eq!(st.shards[0].mesh.cross_frees_rejected, 1);
    assert_eq!(st.shards[0].alloc.allocations_live, 2);
    assert_eq!(st.shards[0].alloc.frees, 1);
    // A local double free is an error at once.
    let r = block_on(rt.spawn_on(0, move |s| async move { s.free(victim) })).unwrap();
    assert!(matches!(r, Err(Error::DoubleFree { .. })), "{r:?}");

    let kept = vec![recs[0], recs[2]];
    let check = kept.clone();
    block_on(rt.spawn_on(
        0,
        move |s| async move { check_records(&s, &check, 64).await },
    ))
    .unwrap();
    // The shard keeps serving: allocate and free after the rejection.
    block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(64).await.unwrap();
        s.free(a.into_handle()).unwrap();
    }))
    .unwrap();
    rt.shutdown().unwrap();

    let rt = Runtime::start(cfg).unwrap();
    block_on(rt.spawn_on(0, move |s| async move {
        assert_live_exactly(&s, &kept, "after restart");
        check_records(&s, &kept, 64).await;
    }))
    .unwrap();
    rt.shutdown().unwrap();
}

#[test]
fn cross_shard_reads_and_writes_go_through_the_owner() {
    const LEN: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    // Written on the owner, read through a pin taken on shard 1.
    let h = block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(LEN as u64).await.unwrap();
        a.write_at(0, &contents(1, LEN)).unwrap();
        a.into_handle()
    }))
    .unwrap();
    block_on(rt.spawn_on(1, move |s| async move {
        let mut buf = vec![0u8; LEN];
        s.read(h, 0, &mut buf).await.unwrap();
        assert!(buf == contents(1, LEN), "shard 1 reads the owner's bytes");
        // Written from shard 1 (by the owner)…
        s.write(h, 0, &contents(2, LEN)).await.unwrap();
        // …and a closure run on the owner's pin.
        let len = s.run_on_owner(h, |pin| pin.len()).await.unwrap();
        assert!(len >= LEN);
    }))
    .unwrap();
    // …and read on the owner.
    block_on(rt.spawn_on(0, move |s| async move {
        let pin = s.pin(h).await.unwrap();
        let mut buf = vec![0u8; LEN];
        pin.read_at(0, &mut buf).unwrap();
        assert!(
            buf == contents(2, LEN),
            "owner reads what the foreign pin wrote"
        );
    }))
    .unwrap();
    // A foreign pin from another data directory is refused.
    let other = tempfile::tempdir().unwrap();
    let rt2 = Runtime::start(config(other.path(), 2)).unwrap();
    let r = block_on(rt2.spawn_on(1, move |s| async move {
        let mut buf = [0u8; 8];
        s.read(h, 0, &mut buf).await
    }))
    .unwrap();
    assert!(matches!(r, Err(Error::ForeignHandle { .. })), "{r:?}");
    rt2.shutdown().unwrap();
    rt.shutdown().unwrap();

    // Survives a restart.
    let rt = Runtime::start(cfg).unwrap();
    block_on(rt.spawn_on(0, move |s| async move {
        check_records(&s, &[(h, 2)], LEN).await
    }))
    .unwrap();
    rt.shutdown().unwrap();
}

#[test]
fn sync_covers_frees_forwarded_just_before() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    let mut expected_received = 0;
    let mut expected_live = [0u64; 2];
    for round in 0..40u64 {
        // Allocate on both shards, then each frees some of the other's,
        // fewer than a batch: the frees sit in the senders' buffers or
        // channels when `sync` is called, with no sleep in between.
        let n = 1 + round * 7 % 150;
        let recs: Vec<Vec<(Handle, u64)>> = (0..2)
            .map(|i| {
                block_on(rt.spawn_on(i, move |s| async move { fill(&s, 0, n, 32).await })).unwrap()
            })
            .collect();
        expected_live[0] += n;
        expected_live[1] += n;
        let frees: Vec<_> = (0..2usize)
            .map(|i| {
                let theirs: Vec<Handle> = recs[1 - i]
                    .iter()
                    .take(n as usize / 2 + 1)
                    .map(|r| r.0)
                    .collect();
                rt.spawn_on(i, move |s| async move {
                    for h in &theirs {
                        s.free(*h).unwrap();
                    }
                    theirs.len() as u64
                })
            })
            .collect();
        for (i, f) in frees.into_iter().enumerate() {
            let k = block_on(f).unwrap();
            expected_live[1 - i] -= k;
            expected_received += k;
        }
        block_on(rt.sync()).unwrap();
        let st = stats(&rt);
        assert_eq!(
            st.cross_frees_received(),
            expected_received,
            "round {round}"
        );
        assert_eq!(
            st.shards[0].alloc.allocations_live, expected_live[0],
            "round {round}"
        );
        assert_eq!(
            st.shards[1].alloc.allocations_live, expected_live[1],
            "round {round}"
        );
    }
    rt.shutdown().unwrap();
}

#[test]
fn panicking_task_is_reported_and_the_shard_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    let before = block_on(rt.spawn_on(0, |s| async move { fill(&s, 0, 10, 64).await })).unwrap();

    // A panic inside the task's future.
    let r = block_on(rt.spawn_on(0, |s| async move {
        let _a = s.allocate(64).await.unwrap();
        explode("boom in a task");
    }));
    match r {
        Err(Error::TaskPanicked { shard: 0, message }) => {
            assert!(message.contains("boom in a task"))
        }
        other => panic!("expected TaskPanicked, got {other:?}"),
    }
    // A panic in the closure, before any future exists.
    let r = block_on(rt.spawn_on(1, |_s| {
        explode("boom in a closure");
        std::future::ready(())
    }));
    match r {
        Err(Error::TaskPanicked { shard: 1, message }) => {
            assert!(message.contains("boom in a closure"))
        }
        other => panic!("expected TaskPanicked, got {other:?}"),
    }
    // Both shards keep serving, their data intact.
    for i in 0..2 {
        let r = block_on(rt.spawn_on(
            i,
            |s| async move { s.allocate(64).await.map(|a| a.handle()) },
        ))
        .unwrap();
        assert!(r.is_ok());
    }
    block_on(rt.spawn_on(
        0,
        move |s| async move { check_records(&s, &before, 64).await },
    ))
    .unwrap();
    block_on(rt.sync()).unwrap();
    rt.shutdown().unwrap();
}

#[test]
fn crashed_shard_is_gone_others_serve_nothing_acknowledged_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    let recs: Vec<Vec<(Handle, u64)>> = (0..2)
        .map(|i| {
            block_on(rt.spawn_on(i, move |s| async move {
                fill(&s, 100 * i as u64, 50, 128).await
            }))
            .unwrap()
        })
        .collect();
    // Acknowledged before the crash: a local free on the doomed shard, and
    // a free of shard 0's handle forwarded by it and applied by shard 0.
    let (local_freed, forwarded) = (recs[1][0].0, recs[0][0].0);
    block_on(rt.spawn_on(1, move |s| async move {
        s.free(local_freed).unwrap();
        s.free(forwarded).unwrap();
    }))
    .unwrap();
    block_on(rt.sync()).unwrap();

    rt.crash_shard_for_test(1);
    let r = block_on(rt.spawn_on(1, |s| async move { s.index() }));
    assert!(matches!(r, Err(Error::ShardGone { shard: 1 })), "{r:?}");
    let r = block_on(rt.spawn_on(1, |s| async move { s.index() }));
    assert!(matches!(r, Err(Error::ShardGone { shard: 1 })), "{r:?}");
    // Shard 0 keeps serving, and its acknowledged work after the crash
    // counts as well.
    let more = block_on(rt.spawn_on(0, |s| async move { fill(&s, 500, 20, 128).await })).unwrap();
    let r = block_on(rt.sync());
    assert!(matches!(r, Err(Error::ShardGone { shard: 1 })), "{r:?}");
    match rt.shutdown() {
        Err(Error::TaskPanicked { shard, message }) => {
            assert_eq!(shard, 1, "{message}");
            assert!(message.contains("shard 1"), "{message}")
        }
        other => panic!("shutdown must report the crashed shard, got {other:?}"),
    }

    let rt = Runtime::start(cfg).unwrap();
    let mut want0: Vec<(Handle, u64)> = recs[0][1..].to_vec();
    want0.extend(more);
    let want1: Vec<(Handle, u64)> = recs[1][1..].to_vec();
    for (i, want) in [want0, want1].into_iter().enumerate() {
        block_on(rt.spawn_on(i, move |s| async move {
            assert_live_exactly(&s, &want, &format!("shard {i}"));
            check_records(&s, &want, 128).await;
        }))
        .unwrap();
    }
    rt.shutdown().unwrap();
}

#[test]
fn dropping_without_shutdown_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let mut want: Vec<Vec<(Handle, u64)>> = vec![Vec::new(), Vec::new()];
    for round in 0..20u64 {
        let rt = Runtime::start(cfg.clone()).unwrap();
        // Check what the previous round left, then add to it.
        for (i, w) in want.iter().enumerate() {
            let w = w.clone();
            block_on(rt.spawn_on(i, move |s| async move {
                assert_live_exactly(&s, &w, &format!("round {round}, shard {i}"));
                check_records(&s, &w, 96).await;
            }))
            .unwrap();
        }
        let recs: Vec<Vec<(Handle, u64)>> = (0..2)
            .map(|i| {
                let first = 10_000 * round + 1000 * i as u64;
                block_on(rt.spawn_on(i, move |s| async move { fill(&s, first, 30, 96).await }))
                    .unwrap()
            })
            .collect();
        // Shard i frees 5 of its own and 5 of the other's (forwarded), all
        // acknowledged; no sync, no shutdown.
        for i in 0..2usize {
            let own: Vec<Handle> = recs[i][..5].iter().map(|r| r.0).collect();
            let other: Vec<Handle> = recs[1 - i][5..10].iter().map(|r| r.0).collect();
            block_on(rt.spawn_on(i, move |s| async move {
                for h in own.iter().chain(&other) {
                    s.free(*h).unwrap();
                }
            }))
            .unwrap();
        }
        for (i, r) in recs.into_iter().enumerate() {
            want[i].extend_from_slice(&r[10..]);
        }
        drop(rt);
    }
    let rt = Runtime::start(cfg).unwrap();
    for (i, w) in want.into_iter().enumerate() {
        block_on(rt.spawn_on(i, move |s| async move {
            assert_live_exactly(&s, &w, &format!("shard {i}"));
            check_records(&s, &w, 96).await;
        }))
        .unwrap();
    }
    rt.shutdown().unwrap();
}

#[test]
fn a_second_runtime_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    let r = Runtime::start(cfg.clone());
    assert!(matches!(r, Err(Error::AlreadyOpen { .. })), "{:?}", r.err());
    rt.shutdown().unwrap();
    // After shutdown the lock is released.
    Runtime::start(cfg).unwrap().shutdown().unwrap();
}

/// Misuse is an error that says what is missing, not a panic.
#[test]
fn opening_without_an_executor_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    // Shard::open under a plain executor: no tokio reactor.
    let dd = Arc::new(segalloc::DataDir::open(&cfg).unwrap());
    let r = block_on(Shard::open(dd, &cfg, 0));
    assert!(
        matches!(
            r,
            Err(Error::NoExecutor {
                call: "Shard::open",
                ..
            })
        ),
        "{r:?}"
    );
    // ShardBuilder::open where it cannot run: the error it gives.
    let refused = |open: &dyn Fn(segalloc::ShardBuilder) -> segalloc::Result<Shard>| {
        let b = segalloc::Cluster::open(cfg.clone())
            .unwrap()
            .into_builders()
            .remove(0);
        let Err(e) = open(b) else { panic!("opened") };
        assert!(
            matches!(
                e,
                Error::NoExecutor {
                    call: "ShardBuilder::open",
                    ..
                }
            ),
            "{e:?}"
        );
        e.to_string()
    };
    // On a tokio runtime but outside a LocalSet.
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = refused(&|b| tokio_rt.block_on(b.open()));
    assert!(e.contains("LocalSet"), "{e}");
    // On a runtime without timers, in a LocalSet: `finish_frees` (and a pin
    // that waits for a window) would panic when it first waits, and a
    // `finish_frees` that panics loses the frees it holds.
    let no_timers = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let e = refused(&|b| tokio::task::LocalSet::new().block_on(&no_timers, b.open()));
    assert!(e.contains("enable_time"), "{e}");
    // With timers but without IO: the ring's wait for its completions
    // panicked inside the open.
    let no_io = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let e = refused(&|b| tokio::task::LocalSet::new().block_on(&no_io, b.open()));
    assert!(e.contains("enable_io"), "{e}");
    let dd = Arc::new(segalloc::DataDir::open(&cfg).unwrap());
    let r = no_timers.block_on(Shard::open(dd, &cfg, 1));
    assert!(
        matches!(
            r,
            Err(Error::NoExecutor {
                call: "Shard::open",
                ..
            })
        ),
        "{r:?}"
    );
}

/// Roots are kept per shard; the runtime finds one wherever it lives, and
/// `set_root` says what it replaced.
#[test]
fn runtime_root_finds_a_root_on_any_shard() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    let (a, b) = block_on(rt.spawn_on(1, |s| async move {
        let a = s.allocate(64).await.unwrap().into_handle();
        let b = s.allocate(64).await.unwrap().into_handle();
        assert_eq!(s.set_root("greeting", a).unwrap(), None);
        assert_eq!(s.set_root("greeting", b).unwrap(), Some(a));
        (a, b)
    }))
    .unwrap();
    assert_ne!(a, b);
    rt.shutdown().unwrap();
    let rt = Runtime::start(cfg).unwrap();
    assert_eq!(block_on(rt.root("greeting")).unwrap(), Some(b));
    assert_eq!(block_on(rt.root("nobody")).unwrap(), None);
    rt.shutdown().unwrap();
}

/// `shutdown` called (or the runtime dropped) on one of its own shard
/// threads cannot wait for that thread: it is an error, not a deadlock, and
/// the shards still stop and release the directory.
#[test]
fn shutdown_from_a_shard_task_is_an_error_not_a_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    let rt = Runtime::start(cfg.clone()).unwrap();
    let (rt_tx, rt_rx) = futures::channel::oneshot::channel::<Runtime>();
    let task = rt.spawn_on(0, move |_s| async move {
        let rt = rt_rx.await.expect("runtime sent");
        rt.shutdown()
    });
    rt_tx.send(rt).ok().expect("task waits for the runtime");
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(block_on(task));
    });
    let r = done_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("shutdown from a shard task deadlocked");
    let inner = r.expect("the task ran");
    assert!(
        matches!(
            inner,
            Err(Error::NoExecutor {
                call: "Runtime::shutdown",
                ..
            })
        ),
        "{inner:?}"
    );
    // The shard threads stop by themselves and release the directory.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Runtime::start(cfg.clone()) {
            Ok(rt) => break rt.shutdown().unwrap(),
            Err(Error::AlreadyOpen { .. } | Error::ShardAlreadyOpen { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("directory not released: {e}"),
        }
    }
}

/// The CPUs `/proc/self/task/<tid>/status` allows the thread `tid`.
fn cpus_allowed(tid: i32) -> Vec<usize> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).expect("status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list")
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        cpus.extend(a.parse::<usize>().expect("cpu")..=b.parse::<usize>().expect("cpu"));
    }
    cpus
}

/// Whether this kernel lets a ring confine its io workers (Linux 5.14),
/// tried on a thread of its own.
fn can_confine_io_workers(cpu: usize) -> bool {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                segalloc::Ring::new(segalloc::IoBackendChoice::Uring)
                    .is_ok_and(|r| r.set_io_worker_cpus(&[cpu]).is_ok())
            })
    })
    .join()
    .expect("probe thread")
}

/// A runtime pins each shard thread to one CPU; the io_uring workers that
/// run its blocking operations (`fallocate`, `fdatasync`, prefaults) would
/// share it. With a CPU left without a shard, they run on the CPUs without
/// one.
#[test]
fn io_workers_run_on_the_cpus_without_a_shard() {
    let allowed = cpus_allowed(nix::unistd::gettid().as_raw());
    if allowed.len() < 2
        || common::expected_backend() != segalloc::IoBackend::Uring
        || !can_confine_io_workers(allowed[1])
    {
        eprintln!("skipped: needs io_uring with IORING_REGISTER_IOWQ_AFF and 2 CPUs");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 1)).expect("start");
    let (shard_cpus, workers) = block_on(rt.spawn_on(0, |s| async move {
        // Growth steps and a sync: operations that io_uring hands to its
        // workers, which then stay idle for a while.
        let _kept = fill(&s, 0, 20_000, 256).await;
        s.sync().await.expect("sync");
        let tid = nix::unistd::gettid().as_raw();
        let name = format!("iou-wrk-{tid}");
        let mut workers = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
            let task = task.expect("task").file_name();
            let Ok(t) = task.to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(format!("/proc/self/task/{t}/comm"));
            if comm.is_ok_and(|c| c.trim() == name) {
                workers.push(cpus_allowed(t));
            }
        }
        (cpus_allowed(tid), workers)
    }))
    .expect("job");
    rt.shutdown().expect("shutdown");
    assert_eq!(
        shard_cpus,
        vec![allowed[0]],
        "the shard is pinned to the first CPU"
    );
    assert!(
        !workers.is_empty(),
        "no io worker of the shard's ring found"
    );
    let others: Vec<usize> = allowed[1..].to_vec();
    for w in &workers {
        assert!(
            w.iter().all(|c| others.contains(c)),
            "an io worker may run on {w:?}, not only on the CPUs without a shard {others:?}"
        );
    }
}

/// Start a runtime on `cfg` once the previous one (dropped on one of its
/// own threads, which does not wait for them) has released the directory.
fn start_when_released(cfg: &Config) -> Runtime {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Runtime::start(cfg.clone()) {
            Ok(rt) => return rt,
            Err(Error::AlreadyOpen { .. } | Error::ShardAlreadyOpen { .. })
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("directory not released: {e}"),
        }
    }
}

/// A runtime dropped on one of its own shard threads (a task owns it) does
/// not wait for the shards; frees of another shard's handles that the task
/// made just before are acknowledged, so they must reach their owner.
#[test]
fn a_runtime_dropped_on_its_own_shard_keeps_acknowledged_forwarded_frees() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    for round in 0..5 {
        let rt = start_when_released(&cfg);
        let hs = common::allocate_synced(&rt, 1, 10, 64);
        let (rt_tx, rt_rx) = futures::channel::oneshot::channel::<Runtime>();
        let to_free = hs.clone();
        let task = rt.spawn_on(0, move |s| async move {
            let rt = rt_rx.await.expect("runtime sent");
            for h in &to_free {
                s.free(*h).expect("acknowledged");
            }
            drop(rt);
        });
        rt_tx.send(rt).ok().unwrap();
        // The task's result may not come back: its shard stops.
        let _ = block_on(task);
        let rt = start_when_released(&cfg);
        let live = block_on(rt.spawn_on(1, move |s| async move {
            hs.iter().filter(|h| s.allocator().is_live(h)).count()
        }))
        .unwrap();
        assert_eq!(
            live, 0,
            "round {round}: acknowledged forwarded frees were lost"
        );
        rt.shutdown().unwrap();
    }
}

/// Bytes another shard wrote through `pin_foreign` are made durable by
/// `Runtime::sync` (the writing shard syncs the owner's file: the owner does
/// not know of the write).
#[test]
fn runtime_sync_writes_back_bytes_written_through_pin_foreign() {
    // On disk: a tmpfs keeps every page dirty, synced or not.
    let Some(dir) =
        common::disk_tempdir("runtime_sync_writes_back_bytes_written_through_pin_foreign")
    else {
        return;
    };
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    let h = block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(64 * 1024).await.unwrap();
        a.write_at(0, &[1u8; 64 * 1024]).unwrap();
        // No prefault left in flight (it would make the file look in use).
        s.mappings().settle_prefaults().await;
        a.into_handle()
    }))
    .unwrap();
    block_on(rt.sync()).unwrap();
    let syncs = |rt: &Runtime| -> u64 {
        stats(rt)
            .shards
            .iter()
            .map(|s| s.alloc.data_file_syncs)
            .sum()
    };
    let before = syncs(&rt);
    let data = dir.path().join("data");
    assert_eq!(dirty_kb_under(&data), 0, "the sync left dirty pages");
    block_on(rt.spawn_on(1, move |s| async move {
        // SAFETY: no other thread touches the allocation meanwhile.
        let p = unsafe { s.pin_foreign(h).await.unwrap() };
        p.write_at(0, &[3u8; 64 * 1024]).unwrap();
    }))
    .unwrap();
    assert!(dirty_kb_under(&data) > 0, "the write dirtied no page");
    block_on(rt.sync()).unwrap();
    assert_eq!(
        dirty_kb_under(&data),
        0,
        "Runtime::sync left the bytes written through pin_foreign dirty"
    );
    // Not counted as the owner's: shard 0 made no change.
    assert_eq!(syncs(&rt), before);
    rt.shutdown().unwrap();
}

/// kB of dirty pages (`Shared_Dirty` + `Private_Dirty` in `/proc/self/smaps`)
/// of this process's mappings of data files under `dir`.
fn dirty_kb_under(dir: &Path) -> u64 {
    let d = std::fs::canonicalize(dir).unwrap();
    let d = d.to_string_lossy().to_string();
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    let mut kb = 0;
    for l in smaps.lines() {
        let first = l.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = l
                .split_whitespace()
                .nth(5)
                .is_some_and(|p| p.starts_with(&d) && !p.ends_with("meta.seg"));
        } else if inside && (l.starts_with("Shared_Dirty:") || l.starts_with("Private_Dirty:")) {
            kb += l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
        }
    }
    kb
}

/// A sync with nothing changed since the last one writes no data file back,
/// and a completed prefault does not count as a pin (with io_uring a
/// prefault op used to hold its window until the next prefault).
#[test]
fn idle_syncs_write_nothing_back_and_prefaults_do_not_pin() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path(), 2)).unwrap();
    block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(100).await.unwrap();
        a.write_at(0, b"x").unwrap();
        drop(a);
        // The prefault the allocation issued (io_uring) is done before the
        // first sync, which would otherwise count its window as in use.
        s.mappings().settle_prefaults().await;
    }))
    .unwrap();
    block_on(rt.sync()).unwrap();
    // Long enough for the kernel to complete anything else in flight.
    std::thread::sleep(Duration::from_millis(300));
    let syncs = |rt: &Runtime| -> u64 {
        stats(rt)
            .shards
            .iter()
            .map(|s| s.alloc.data_file_syncs)
            .sum()
    };
    let before = syncs(&rt);
    for _ in 0..5 {
        block_on(rt.sync()).unwrap();
    }
    assert_eq!(syncs(&rt), before, "idle syncs wrote data files back");
    let st = stats(&rt);
    // The metadata window is held by the allocator; no data window is.
    assert_eq!(
        st.shards[0].mappings.pinned_windows, 1,
        "{:?}",
        st.shards[0].mappings
    );
    rt.shutdown().unwrap();
}

/// A shard thread that panics before its shard is open makes `start` return
/// the panic (it waited forever for that thread's report while the other
/// shards ran), having stopped and joined the other shards' threads: the
/// directory starts again at once.
#[test]
fn a_shard_thread_panicking_before_it_is_open_fails_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 3);
    Runtime::panic_before_ready_for_test(cfg.dir(), 1);
    let (tx, rx) = std::sync::mpsc::channel();
    let starter = std::thread::spawn({
        let cfg = cfg.clone();
        move || {
            let _ = tx.send(Runtime::start(cfg));
        }
    });
    let started = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("Runtime::start has not returned after 60 s");
    starter.join().unwrap();
    match started {
        Err(Error::TaskPanicked { shard: 1, message }) => {
            assert!(message.contains("before it opened"), "{message}");
        }
        Err(e) => panic!("expected shard 1's panic, got {e:?}"),
        Ok(rt) => {
            drop(rt);
            panic!("started although shard 1 panicked");
        }
    }
    // The directory this start created is gone again: a start with another
    // shard count is not refused for a manifest nothing was kept in.
    assert!(!cfg.dir().exists(), "the failed start left its directory");
    let rt = Runtime::start(config(dir.path(), 2)).expect("start again");
    assert_eq!(rt.shard_count(), 2);
    block_on(rt.spawn_on(1, |s| async move { s.allocate(100).await.map(drop) }))
        .unwrap()
        .unwrap();
    rt.shutdown().unwrap();
}

/// A start that fails deletes the directory it created under the lock its
/// open took: it never lets go of it in between (another instance could
/// open the directory meanwhile, and lose what it wrote there).
#[test]
fn a_failed_start_holds_its_lock_until_it_has_deleted_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    Runtime::panic_before_ready_for_test(cfg.dir(), 1);
    let opening = segalloc::DataDir::pause_before_lock_for_test(cfg.dir());
    let (tx, rx) = std::sync::mpsc::channel();
    let starter = std::thread::spawn({
        let cfg = cfg.clone();
        move || {
            let _ = tx.send(Runtime::start(cfg).map(drop));
        }
    });
    // The start's open is about to take the lock; any later taking of it
    // stops at this second pause.
    opening.wait_reached();
    let again = segalloc::DataDir::pause_before_lock_for_test(cfg.dir());
    opening.resume();
    let started = rx.recv_timeout(Duration::from_secs(20));
    again.resume();
    starter.join().unwrap();
    match started {
        Ok(Err(Error::TaskPanicked { shard: 1, .. })) => {}
        Ok(other) => panic!("expected shard 1's panic: {other:?}"),
        Err(_) => panic!("the failed start took the directory's lock a second time"),
    }
    assert!(!cfg.dir().exists(), "the failed start left its directory");
}

/// A start that fails undoes only what it created: an empty directory the
/// user made stays (empty), and a directory that held data keeps every
/// byte.
#[test]
fn a_failed_start_keeps_what_it_did_not_create() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 2);
    std::fs::create_dir(cfg.dir()).unwrap();
    Runtime::panic_before_ready_for_test(cfg.dir(), 1);
    assert!(matches!(
        Runtime::start(cfg.clone()),
        Err(Error::TaskPanicked { shard: 1, .. })
    ));
    let left: Vec<_> = std::fs::read_dir(cfg.dir()).unwrap().collect();
    assert!(left.is_empty(), "left in the directory: {left:?}");
    // Named back out of a folder that does not exist: refused before
    // anything is made (it would be the user's directory, reached through
    // a folder the start made).
    let roundabout = config(&dir.path().join("new").join(".."), 2);
    assert!(matches!(
        Runtime::start(roundabout),
        Err(Error::InvalidConfig(_))
    ));
    assert!(cfg.dir().is_dir(), "the user's directory was deleted");
    assert!(!dir.path().join("new").exists());

    let rt = Runtime::start(cfg.clone()).unwrap();
    let h = block_on(rt.spawn_on(1, |s| async move {
        let a = s.allocate(100).await?;
        a.pin().write_at(0, b"kept")?;
        s.sync().await?;
        Ok::<_, Error>(a.into_handle())
    }))
    .unwrap()
    .unwrap();
    rt.shutdown().unwrap();
    Runtime::panic_before_ready_for_test(cfg.dir(), 0);
    assert!(matches!(
        Runtime::start(cfg.clone()),
        Err(Error::TaskPanicked { shard: 0, .. })
    ));
    let rt = Runtime::start(cfg).unwrap();
    let kept = block_on(rt.spawn_on(1, move |s| async move {
        let mut b = [0u8; 4];
        s.pin(h).await?.read_at(0, &mut b)?;
        Ok::<_, Error>(b)
    }))
    .unwrap()
    .unwrap();
    assert_eq!(&kept, b"kept");
    rt.shutdown().unwrap();
}

/// `Shard::finish_frees` run by a task of a runtime's shard (public, meant
/// for shards a caller runs itself): the runtime's `sync` and `shutdown`
/// still return. Its peers stopped listening to it once it said it was
/// done, and the barrier a flush sends it then was never answered: both
/// waited forever.
#[test]
fn finish_frees_run_in_a_task_does_not_hang_sync_or_shutdown() {
    let within = |secs: u64, f: Box<dyn FnOnce() -> segalloc::Result<()> + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(secs))
            .expect("returned in time")
    };
    for shards in [2, 3] {
        let tmp = tempfile::tempdir().unwrap();
        let rt = Arc::new(Runtime::start(config(tmp.path(), shards)).unwrap());
        // A free forwarded from the shard before it finishes is applied.
        let h = block_on(rt.spawn_on(0, |s| async move {
            Ok::<_, Error>(s.allocate(64).await?.into_handle())
        }))
        .unwrap()
        .unwrap();
        let last = shards - 1;
        let finishing = rt.spawn_on(last, move |s| async move {
            s.free(h)?;
            s.finish_frees().await;
            Ok::<_, Error>(())
        });
        std::thread::sleep(Duration::from_millis(200));
        let r = rt.clone();
        within(20, Box::new(move || block_on(r.sync()))).unwrap();
        let live = block_on(rt.spawn_on(0, move |s| async move { s.allocator().is_live(&h) }));
        assert!(
            !live.unwrap(),
            "{shards} shards: the forwarded free was applied"
        );
        let rt = Arc::into_inner(rt).expect("one runtime");
        within(20, Box::new(move || rt.shutdown())).unwrap();
        // The task itself waits for the other shards to finish: it ends
        // with the shutdown, or is dropped with its shard's thread.
        match block_on(finishing) {
            Ok(r) => r.unwrap(),
            Err(e) => assert!(matches!(e, Error::ShardGone { .. }), "{e:?}"),
        }
    }
}
