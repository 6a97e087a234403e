//! `Shard::pin_foreign` under descriptor pressure, and after the other
//! shard's folder was replaced while one of its files was pinned here.
//! (It once held a descriptor across its wait for a window, which failed a
//! sync of its shard and another shard's `pin_foreign` of its owner; and a
//! sync that reopened the other shard's file by name after an eviction
//! synced the file that replaced it.)
mod common;

use std::time::Duration;

use futures::executor::block_on;
use segalloc::{Config, Error, Runtime};

fn cfg(dir: &std::path::Path) -> Config {
    Config::builder(dir)
        .shards(2)
        .window_bytes(common::WINDOW)
        .growth_step_bytes(common::STEP)
        .max_open_files(2) // 1 per shard
        .max_windows(4) // 2 per shard
        .pin_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// A handle of a new allocation of `size` bytes on shard `shard`.
fn allocate_on(rt: &Runtime, shard: usize, size: u64) -> segalloc::Handle {
    block_on(rt.spawn_on(shard, move |s| async move {
        s.allocate(size).await.unwrap().into_handle()
    }))
    .unwrap()
}

/// Pin this shard's own allocations until every window is pinned.
async fn fill_windows(s: &segalloc::Shard) -> Vec<segalloc::Allocation> {
    let mut keep = Vec::new();
    for _ in 0..64 {
        let st = s.mappings().stats();
        if st.pinned_windows >= st.max_windows {
            break;
        }
        keep.push(s.allocate(4 << 20).await.unwrap());
    }
    let st = s.mappings().stats();
    eprintln!(
        "shard {}: pinned {} / max {} windows, open fds {} / {}",
        s.index(),
        st.pinned_windows,
        st.max_windows,
        s.files().open_count(),
        s.files().max_open_files()
    );
    assert_eq!(st.pinned_windows, st.max_windows);
    keep
}

/// While a `pin_foreign` waits for a window, a sync of the same shard (one
/// descriptor per shard) still gets the descriptor it needs.
#[test]
fn a_sync_while_pin_foreign_waits_for_a_window_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = Runtime::start(cfg(&tmp.path().join("d"))).unwrap();
    let h1 = allocate_on(&rt, 1, 64);
    let (pinf, sync) = block_on(rt.spawn_on(0, move |s| async move {
        let keep = fill_windows(&s).await;
        let keep = std::cell::RefCell::new(Some(keep));
        let a = async {
            // SAFETY: nothing else touches h1.
            unsafe { s.pin_foreign(h1) }.await.map(drop)
        };
        let b = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            eprintln!("open fds during the wait: {}", s.files().open_count());
            let r = s.sync().await;
            keep.borrow_mut().take(); // release the windows
            r
        };
        futures::join!(a, b)
    }))
    .unwrap();
    eprintln!("pin_foreign: {pinf:?}\nsync during its wait: {sync:?}");
    assert!(pinf.is_ok(), "{pinf:?}");
    assert!(
        sync.is_ok(),
        "sync failed while pin_foreign waited: {sync:?}"
    );
}

/// The owner's only descriptor is busy (its own `pin_foreign` waits for a
/// window): another shard's `pin_foreign` of the owner's live allocation
/// still succeeds (the owner says which file it writes without opening it).
#[test]
fn pin_foreign_needs_no_descriptor_of_the_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = Runtime::start(cfg(&tmp.path().join("d"))).unwrap();
    let h0 = allocate_on(&rt, 0, 64);
    let h1 = allocate_on(&rt, 1, 64);
    // Shard 1: every window pinned, then a pin_foreign of h0 that waits
    // (holding its lease on shard 0's file: shard 1's only descriptor).
    let waiting = rt.spawn_on(1, move |s| async move {
        let keep = fill_windows(&s).await;
        let a = async {
            // SAFETY: nothing else touches h0.
            unsafe { s.pin_foreign(h0) }.await.map(drop)
        };
        let b = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            drop(keep);
        };
        futures::join!(a, b).0
    });
    let waiter = std::thread::spawn(move || block_on(waiting));
    std::thread::sleep(Duration::from_millis(500));
    let r = block_on(rt.spawn_on(0, move |s| async move {
        // SAFETY: nothing else touches h1.
        unsafe { s.pin_foreign(h1) }.await.map(drop)
    }))
    .unwrap();
    let w = waiter.join().unwrap().unwrap();
    eprintln!("shard 1's own pin_foreign: {w:?}\nshard 0's pin_foreign of h1: {r:?}");
    assert!(r.is_ok(), "pin_foreign of a live allocation failed: {r:?}");
}

fn fds_naming(s: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        if let Ok(t) = std::fs::read_link(e.path()) {
            let t = t.display().to_string();
            if t.contains(s) {
                v.push(t);
            }
        }
    }
    v
}

/// After the other shard's folder was replaced by a symlink while one of
/// its files is pinned here, and that file's descriptor evicted, this
/// shard's sync does not reopen (and sync) the file now found there.
#[test]
fn a_sync_never_reopens_a_file_that_replaced_the_other_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let cfg = Config::builder(&a)
        .shards(2)
        .window_bytes(common::WINDOW)
        .growth_step_bytes(common::STEP)
        .max_open_files(2) // 1 per shard
        .pin_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let rt = Runtime::start(cfg).unwrap();
    let h1 = allocate_on(&rt, 1, 4096);
    // Shard 0 pins h1 (checked: the owner's file) and writes through it.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (tx2, rx2) = std::sync::mpsc::channel::<()>();
    let task = rt.spawn_on(0, move |s| async move {
        // SAFETY: nothing else touches h1.
        let p = unsafe { s.pin_foreign(h1) }.await.unwrap();
        p.write_at(0, b"written-through-pin_foreign").unwrap();
        tx.send(()).unwrap();
        // Wait (off-thread) for the folder swap.
        while rx2.try_recv().is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Shard 0's own work evicts the idle foreign descriptor (1 fd).
        let own = s.allocate(100).await.unwrap();
        drop(own);
        let before = fds_naming("elsewhere");
        let r = s.sync().await;
        let after = fds_naming("elsewhere");
        // SAFETY: nothing else touches h1.
        let again = unsafe { s.pin_foreign(h1) }.await.map(drop);
        drop(p);
        (before, r, after, again)
    });
    let th = std::thread::spawn(move || block_on(task));
    rx.recv().unwrap();
    let folder = a.join("shard-001");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::rename(&folder, tmp.path().join("kept")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &folder).unwrap();
    std::fs::write(
        elsewhere.join(segalloc::format::data_file_name(0)),
        vec![b'X'; 1 << 20],
    )
    .unwrap();
    tx2.send(()).unwrap();
    let (before, r, after, again) = th.join().unwrap().unwrap();
    assert!(before.is_empty(), "{before:?}");
    // The sync reached the owner's file (the descriptor kept) or failed;
    // it never opened the file found in the folder's place, and neither
    // did the second pin.
    assert!(
        after.is_empty(),
        "the impostor was opened: {after:?} (sync: {r:?})"
    );
    assert!(
        again.is_ok() || matches!(again, Err(Error::Io { .. })),
        "{again:?}"
    );
    assert!(
        std::fs::read(
            tmp.path()
                .join("elsewhere")
                .join(segalloc::format::data_file_name(0))
        )
        .unwrap()
        .iter()
        .all(|&b| b == b'X')
    );
}
