//! Configuration values at the ends of their ranges, taken through to the
//! mapping layer: a `pin_timeout` too long to be added to the current time
//! (it means no timeout), and a `prefetch_ahead_bytes` too large to be added
//! to a range's end (it reads ahead to the end of the window).

mod common;

use std::time::{Duration, Instant};

use common::{WINDOW, os_counts, run};
use segalloc::io::RingStats;
use segalloc::{FileId, MappingManager};

/// A pin that needs a window while the only one is pinned, released by
/// another task after `hold`: returns the file and how long the pin waited.
async fn pin_under_pressure(
    mm: &MappingManager,
    files: &segalloc::FileHandleRegistry,
    dir: &std::path::Path,
    hold: Duration,
) -> (FileId, Duration) {
    let f = common::register(files, dir.join("a"));
    let held = mm.pin(f, 0, 4096, true).await.unwrap();
    held.write_at(0, b"window 0").unwrap();
    let releaser = tokio::task::spawn_local(async move {
        tokio::time::sleep(hold).await;
        drop(held);
    });
    let t = Instant::now();
    let p = mm
        .pin(f, WINDOW, 4096, true)
        .await
        .unwrap_or_else(|e| panic!("pin under pressure failed after {:?}: {e}", t.elapsed()));
    let waited = t.elapsed();
    releaser.await.unwrap();
    drop(p);
    (f, waited)
}

/// `pin_timeout(Duration::MAX)`: no deadline. A pin with every window
/// pinned waits until one is released, however long that takes, and does
/// not fail with `WindowPressure`.
#[test]
fn pin_timeout_max_waits_for_a_release() {
    for timeout in [
        Duration::MAX,
        Duration::from_secs(u64::MAX),
        Duration::from_secs(i64::MAX as u64),
    ] {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let cfg = common::builder(dir.path(), 4, 2)
                .pin_timeout(timeout)
                .build()
                .unwrap();
            assert_eq!(cfg.pin_timeout(), timeout);
            let (files, mm) = common::manager_with_windows(&cfg, 1);
            let (f, waited) =
                pin_under_pressure(&mm, &files, dir.path(), Duration::from_millis(300)).await;
            assert!(
                waited >= Duration::from_millis(250),
                "{timeout:?}: {waited:?}"
            );
            let s = mm.stats();
            assert_eq!(
                (s.pressure_waits, s.pressure_timeouts, s.evictions),
                (1, 0, 1),
                "{timeout:?}"
            );
            assert_eq!((mm.window_count(), os_counts(dir.path()).1), (1, 1));
            // The window pinned first kept its data.
            let p0 = mm.pin(f, 0, 8, false).await.unwrap();
            let mut buf = [0u8; 8];
            p0.read_at(0, &mut buf).unwrap();
            assert_eq!(&buf, b"window 0");
        });
    }
}

/// The largest duration that can be added to `now` (by bisection).
fn clock_end(now: Instant) -> Duration {
    let (mut lo, mut hi) = (Duration::ZERO, Duration::MAX);
    while hi - lo > Duration::from_nanos(1) {
        let mid = lo + (hi - lo) / 2;
        if now.checked_add(mid).is_some() {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Timeouts that put the pin's deadline within a millisecond or two of the
/// end of the clock's range (or just past it): the pin waits for the
/// release, and neither the deadline nor the timer that waits for it
/// overflows (tokio's timer rounds a deadline up to the next millisecond,
/// which overflows that close to the end). A first run measures how long
/// after choosing the timeout the pin starts waiting; the others aim at
/// deadlines 0.2 to 2 ms before the end.
#[test]
fn pin_timeout_at_the_end_of_the_clock_waits_for_a_release() {
    let mut delay: Option<Duration> = None;
    for k in 0..=10u32 {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let chosen = Instant::now();
            let timeout = match delay {
                None => Duration::from_secs(60),
                Some(d) => clock_end(chosen) - d - Duration::from_micros(200) * k,
            };
            let cfg = common::builder(dir.path(), 4, 2)
                .pin_timeout(timeout)
                .build()
                .unwrap();
            let (files, mm) = common::manager_with_windows(&cfg, 1);
            let f = common::register(&files, dir.path().join("a"));
            drop(files.acquire(f, 2 * WINDOW).await.unwrap());
            let held = mm.pin(f, 0, 4096, true).await.unwrap();
            let releaser = tokio::task::spawn_local(async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(held);
            });
            let t = Instant::now();
            delay.get_or_insert(t - chosen);
            let p = mm.pin(f, WINDOW, 4096, true).await;
            let waited = t.elapsed();
            assert!(p.is_ok(), "{timeout:?}: {p:?} after {waited:?}");
            assert!(waited >= Duration::from_millis(15), "{waited:?}");
            releaser.await.unwrap();
            let s = mm.stats();
            assert_eq!((s.pressure_waits, s.pressure_timeouts), (1, 0));
        });
    }
}

fn ring_ops(s: RingStats) -> u64 {
    s.submitted + s.sync_ops
}

/// Control operations (madvise included) of a read-only pin of byte 0 of a
/// file whose first window is already reserved, with the given read-ahead.
async fn ops_of_a_fault(dir: &std::path::Path, prefetch_ahead_bytes: u64) -> u64 {
    let cfg = common::builder(dir, 4, 2)
        .prefetch_ahead_bytes(prefetch_ahead_bytes)
        .build()
        .unwrap();
    assert_eq!(cfg.prefetch_ahead_bytes(), prefetch_ahead_bytes);
    let (files, mm) = common::manager_with_windows(&cfg, 1);
    let f = common::register(&files, dir.join(format!("p{prefetch_ahead_bytes}")));
    drop(files.acquire(f, WINDOW).await.unwrap());
    let before = ring_ops(files.ring().stats());
    drop(mm.pin(f, 0, 1, false).await.unwrap());
    let ops = ring_ops(files.ring().stats()) - before;
    assert_eq!(mm.stats().faults, 1);
    ops
}

/// `prefetch_ahead_bytes(u64::MAX)` is accepted and reads ahead to the end
/// of the window, as any value of a window or more does: the fault-in
/// issues its `MADV_WILLNEED` (no overflow of the range's end plus the
/// read-ahead, which panicked with overflow checks on and otherwise wrapped
/// to no read-ahead at all).
#[test]
fn prefetch_ahead_bytes_max_reads_ahead_to_the_end_of_the_window() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let none = ops_of_a_fault(dir.path(), 0).await;
        let window = ops_of_a_fault(dir.path(), WINDOW).await;
        assert_eq!(window, none + 1, "one MADV_WILLNEED");
        for ahead in [u64::MAX, u64::MAX - 1, u64::MAX - WINDOW] {
            assert_eq!(ops_of_a_fault(dir.path(), ahead).await, window, "{ahead}");
        }
    });
}
