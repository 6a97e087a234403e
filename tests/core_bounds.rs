//! Bounds of the window and file layers under hostile or unusual input:
//! huge offsets, pins that outlive io operations, madvise ranges wider than
//! 4 GiB, syncs of files never opened, handles naming files that do not
//! exist, and caps split between more shards than the caps allow.

mod common;

use std::rc::Rc;
use std::time::{Duration, Instant};

use common::{WINDOW, run};
use segalloc::{Config, Error, Ring};

/// Resident memory of this process, in KiB (`VmRSS`).
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A read-only pin far past the end of a file is refused before the window
/// table grows: neither memory (window 2^26) nor an abort (window u32::MAX).
#[test]
fn huge_window_index_is_refused_before_the_table_grows() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let f = common::register(&files, dir.path().join("a"));
        drop(mm.pin(f, 0, 4096, true).await.unwrap());
        let before = rss_kib();
        for idx in [1u64 << 26, u32::MAX as u64] {
            let r = mm.pin(f, idx * WINDOW, 4096, false).await;
            assert!(
                matches!(r, Err(Error::InvalidRange { .. })),
                "window {idx}: {r:?}"
            );
        }
        let grown = rss_kib().saturating_sub(before);
        assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
    });
}

/// A window held by a pin and by an io operation still in flight becomes
/// idle when the operation completes after the pin is gone: a task waiting
/// for a window must then get it, not wait until its timeout.
#[test]
fn waiter_is_woken_when_the_last_reference_is_an_io_operation() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let cfg = common::builder(dir.path(), 4, 2)
            .pin_timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let (files, mm) = common::manager_with_windows(&cfg, 1);
        let mm = Rc::new(mm);
        let f = common::register(&files, dir.path().join("a"));
        let held = mm.pin(f, 0, 4096, true).await.unwrap();
        let m2 = mm.clone();
        let started = Instant::now();
        let waiter = tokio::task::spawn_local(async move {
            m2.pin(f, WINDOW, 4096, true).await.map(|p| p.len())
        });
        while mm.stats().pressure_waits == 0 {
            tokio::task::yield_now().await;
        }
        // An advice op on window 0 that is still in flight after one poll
        // (on the sync backend every op completes at once: then the window
        // is released by the pin alone).
        let mut in_flight = None;
        for _ in 0..1000 {
            let mut op = Box::pin(mm.prefetch(f, &[(0, WINDOW)]));
            if futures::poll!(op.as_mut()).is_pending() {
                in_flight = Some(op);
                break;
            }
        }
        drop(held);
        if let Some(op) = in_flight {
            assert!(op.await.is_ok());
        }
        let r = waiter.await.unwrap();
        assert_eq!(r.as_ref().ok(), Some(&4096), "{r:?}");
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    });
}

/// Two pins of one window: the waiter gets a window as soon as both are gone.
#[test]
fn waiter_is_woken_after_the_last_of_two_pins() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let cfg = common::builder(dir.path(), 4, 2)
            .pin_timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        let (files, mm) = common::manager_with_windows(&cfg, 1);
        let mm = Rc::new(mm);
        let f = common::register(&files, dir.path().join("a"));
        let a = mm.pin(f, 0, 4096, true).await.unwrap();
        let b = mm.pin(f, 8192, 4096, true).await.unwrap();
        let m2 = mm.clone();
        let started = Instant::now();
        let waiter =
            tokio::task::spawn_local(async move { m2.pin(f, WINDOW, 4096, true).await.is_ok() });
        tokio::task::yield_now().await;
        drop(b);
        tokio::task::yield_now().await;
        drop(a);
        assert!(waiter.await.unwrap());
        assert!(started.elapsed() < Duration::from_secs(1));
    });
}

/// `MADV_DONTNEED` over 4 GiB + 8 KiB through the ring covers all of it: the
/// private copies of the first and the last page are both discarded.
#[test]
fn ring_madvise_covers_more_than_4_gib() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sparse");
    let len: usize = (4 << 30) + 8192;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    file.set_len(len as u64).unwrap();
    // SAFETY: a private mapping of a file only this test uses.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map_copy(&file) }.unwrap();
    let base = map.as_ptr() as *mut u8;
    // SAFETY: both offsets lie inside the private mapping.
    unsafe {
        base.write(1);
        base.add(len - 1).write(2);
    }
    run(async {
        let ring = Ring::new(segalloc::IoBackendChoice::Auto).unwrap();
        let hold: Rc<dyn std::any::Any> = Rc::new(());
        // SAFETY: the range is the mapping, alive until the end of the test;
        // discarding private copies is what the test wants.
        let r = unsafe { ring.madvise(hold, base, len, nix::libc::MADV_DONTNEED) }.await;
        r.unwrap();
    });
    // SAFETY: inside the mapping.
    let (first, last) = unsafe { (base.read(), base.add(len - 1).read()) };
    assert_eq!((first, last), (0, 0), "both private pages discarded");
    drop(map);
}

/// Syncing a registered file that was never opened creates nothing.
#[test]
fn sync_of_a_never_opened_file_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, _mm) = common::manager(dir.path(), 4, 4);
        let path = dir.path().join("never");
        let f = common::register(&files, &path);
        let _ = files.sync(f, true).await;
        assert!(!path.exists(), "sync created {}", path.display());
    });
}

/// A foreign file that does not exist is not registered, and its lookup
/// does not close a cached descriptor.
#[test]
fn missing_foreign_file_registers_nothing() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, _mm) = common::manager(dir.path(), 1, 4);
        let a = common::register(&files, dir.path().join("a"));
        drop(files.acquire(a, 4096).await.unwrap());
        let opens = files.stats().opens;
        for i in 0..1000 {
            let r = common::register_foreign(&files, dir.path().join(format!("missing-{i}")));
            assert!(r.is_err(), "registered a missing file: {r:?}");
        }
        assert_eq!(files.stats().files, 1);
        assert_eq!(files.stats().evictions, 0);
        drop(files.acquire(a, 4096).await.unwrap());
        assert_eq!(files.stats().opens, opens, "the cached fd was kept");
        // An existing one is registered once, however often it is named.
        std::fs::write(dir.path().join("b"), [0u8; 4096]).unwrap();
        for _ in 0..10 {
            common::register_foreign(&files, dir.path().join("b")).unwrap();
        }
        assert_eq!(files.stats().files, 2);
    });
}

/// The per-shard caps never add up to more than the process-wide caps: a
/// configuration with more shards than the caps allow is refused with an
/// error, not split into caps of 1 that exceed the total; a default shard
/// count is lowered to fit.
#[test]
fn per_shard_caps_never_exceed_the_process_caps() {
    let dir = tempfile::tempdir().unwrap();
    let b = || Config::builder(dir.path()).window_bytes(WINDOW);
    for (shards, fds, windows) in [(8, 4, 64), (8, 64, 4), (3, 3, 6), (5, 100, 1000), (2, 8, 3)] {
        match b()
            .shards(shards)
            .max_open_files(fds)
            .max_windows(windows)
            .build()
        {
            Ok(c) => {
                assert!(c.max_open_files_per_shard() * shards <= fds);
                assert!(c.max_windows_per_shard() * shards <= windows);
                assert!(c.max_open_files_per_shard() >= 1 && c.max_windows_per_shard() >= 2);
            }
            Err(e) => assert!(
                matches!(e, Error::InvalidConfig(_)),
                "{shards} shards, {fds} fds, {windows} windows: {e:?}"
            ),
        }
    }
    assert!(b().shards(8).max_open_files(4).build().is_err());
    assert!(b().shards(8).max_windows(4).build().is_err());
    // A shard needs two windows (its metadata's and one for data): a cap
    // that leaves fewer is refused here, not by every open after the
    // directory was created with that shard count.
    assert!(b().shards(2).max_windows(3).build().is_err());
    assert!(b().shards(4).max_windows(4).build().is_err());
    assert!(b().max_windows(1).build().is_err());
    // The default shard count (one per core) fits the caps.
    let c = Config::builder(dir.path())
        .max_open_files(1)
        .max_windows(2)
        .build()
        .unwrap();
    assert_eq!(c.shards(), 1);
    let c = Config::builder(dir.path()).max_windows(3).build().unwrap();
    assert_eq!(c.shards(), 1);
    assert!(
        b().shards(3)
            .max_open_files(3)
            .max_windows(6)
            .build()
            .is_ok()
    );
}

/// A read or write past the end of an allocation (through `Shard::read`,
/// `Shard::write` or a pin) is `InvalidRange`, and its message names the
/// allocation or the pin, not a file number no registry handed out.
#[test]
fn a_range_past_an_allocation_is_reported_without_a_bogus_file_number() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::small_cfg(dir.path());
    run(async {
        let shard = common::open_shard(&cfg).await.unwrap();
        let h = shard.allocate(64).await.unwrap().into_handle();
        let mut buf = [0u8; 8];
        let errors = [
            shard.write(h, 60, &[1u8; 8]).await.unwrap_err(),
            shard.read(h, 64, &mut buf).await.unwrap_err(),
            shard
                .pin(h)
                .await
                .unwrap()
                .write_at(usize::MAX, &[1])
                .unwrap_err(),
        ];
        for e in errors {
            assert!(matches!(e, Error::InvalidRange { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(!msg.contains(&u32::MAX.to_string()), "{msg}");
            assert!(msg.contains("outside the pinned range"), "{msg}");
        }
    });
}
