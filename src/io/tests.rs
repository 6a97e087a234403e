//! Unit tests of the control ring.

use super::*;
use std::time::Duration;

/// Checking whether an operation nobody awaits completed must not take
/// the ring's completion watch from a task that awaits another one:
/// that task would never be woken.
#[test]
fn checking_an_op_leaves_the_watch_to_the_waiting_task() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let Ok(ring) = Ring::new(IoBackendChoice::Uring) else {
            eprintln!("io_uring unavailable: skipped");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        // Dirty pages, so that the fdatasyncs take a while.
        std::fs::write(&path, vec![1u8; 64 << 20]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let fd = Rc::new(OwnedFd::from(file));
        let waiter = tokio::task::spawn_local(ring.fsync(&fd, true));
        // The waiter polls its operation and watches the ring.
        tokio::task::yield_now().await;
        let mut other = ring.fsync(&fd, true);
        let _ = other.try_complete();
        let woken = tokio::time::timeout(Duration::from_secs(10), waiter).await;
        assert!(woken.is_ok(), "the waiting task was never woken");
        tokio::time::timeout(Duration::from_secs(10), other)
            .await
            .expect("the checked operation completes too")
            .unwrap();
    });
}

/// A temporary directory where an fsync of dirty pages takes time: the
/// system's temporary folder unless it is a tmpfs (where an fsync has
/// nothing to write and returns at once), else one under the crate's
/// `target/`. `None` when that is a tmpfs too.
fn disk_tempdir() -> Option<tempfile::TempDir> {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    let on_tmpfs =
        |p: &std::path::Path| statfs(p).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC);
    let mut dir = std::env::temp_dir();
    if on_tmpfs(&dir) {
        dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp");
        std::fs::create_dir_all(&dir).unwrap();
        if on_tmpfs(&dir) {
            return None;
        }
    }
    Some(tempfile::tempdir_in(dir).unwrap())
}

/// An fsync of a file with many dirty pages, dropped after its first
/// poll; whether it was still in flight then.
async fn abandon_slow_fsync(ring: &Ring, path: &std::path::Path) -> bool {
    std::fs::write(path, vec![5u8; 16 << 20]).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let fd = Rc::new(OwnedFd::from(file));
    let mut op = ring.fsync(&fd, false);
    futures::poll!(&mut op).is_pending()
}

/// The reaper lives only while abandoned operations remain: it ends once
/// they are reaped, and when its ring closes first. No task is left
/// behind, however many operations are abandoned one after the other.
#[test]
fn the_reaper_ends_with_its_work_or_its_ring() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let alive = || rt.metrics().num_alive_tasks();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let Ok(ring) = Ring::new(IoBackendChoice::Uring) else {
            eprintln!("io_uring unavailable: skipped");
            return;
        };
        let Some(dir) = disk_tempdir() else {
            eprintln!("skipped: no disk-backed directory (on a tmpfs an fsync is never in flight)");
            return;
        };
        let mut caught = 0;
        for n in 0..20 {
            if abandon_slow_fsync(&ring, &dir.path().join(format!("f{n}"))).await {
                caught += 1;
                assert!(ring.inner.reaping.get(), "a reaper runs");
                assert_eq!(alive(), 1, "one reaper");
            }
            for _ in 0..10_000 {
                if alive() == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            assert_eq!(alive(), 0, "the reaper ended");
            assert!(!ring.inner.reaping.get());
        }
        assert!(caught >= 1, "every fsync finished before its first poll");
        // Closed while its reaper waits: the reaper ends too.
        for n in 0..20 {
            let ring = Ring::new(IoBackendChoice::Uring).unwrap();
            if !abandon_slow_fsync(&ring, &dir.path().join(format!("g{n}"))).await {
                continue;
            }
            tokio::task::yield_now().await; // the reaper watches the ring
            if alive() == 0 {
                continue; // it was done already: try again
            }
            drop(ring);
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
            assert_eq!(alive(), 0, "the reaper outlived its ring");
            return;
        }
        panic!("every fsync finished before its first poll");
    });
}
