//! The control ring (`Ring`) on both backends: backend choice, operations
//! that really reach the file system, many concurrent operations from
//! several tasks with some dropped mid-flight, the hand-over of the eventfd
//! watch when the op holding it is dropped, more operations in flight than
//! the completion queue holds, and `SEGALLOC_IO` validation (in child
//! processes: the environment is never changed in this process).

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::task::Poll;
use std::time::Duration;

use common::run;
use segalloc::config::{IoBackendChoice, MIB};
use segalloc::{Error, IoBackend, Ring};

const BACKENDS: [IoBackendChoice; 2] = [IoBackendChoice::Uring, IoBackendChoice::Sync];

fn open_rw(path: &Path) -> Rc<OwnedFd> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    Rc::new(OwnedFd::from(f))
}

/// A shared mapping of `len` bytes of `fd`, as the `hold` of madvise ops.
fn map(fd: &OwnedFd, len: usize) -> Rc<memmap2::MmapRaw> {
    Rc::new(
        memmap2::MmapOptions::new()
            .len(len)
            .map_raw(std::os::fd::AsRawFd::as_raw_fd(fd))
            .unwrap(),
    )
}

#[test]
fn backend_reporting() {
    assert_eq!(
        Ring::new(IoBackendChoice::Sync).unwrap().backend(),
        IoBackend::Sync
    );
    // An explicit choice ignores SEGALLOC_IO.
    let uring = Ring::new(IoBackendChoice::Uring).unwrap();
    assert_eq!(uring.backend(), IoBackend::Uring);
    assert!(
        uring.unsupported_opcodes().is_empty(),
        "kernel 6.9+ has every opcode: {:?}",
        uring.unsupported_opcodes()
    );
    assert_eq!(
        Ring::new(IoBackendChoice::Auto).unwrap().backend(),
        common::expected_backend()
    );
    assert_eq!(IoBackend::Uring.to_string(), "io_uring");
    assert_eq!(IoBackend::Sync.to_string(), "sync");
    assert!(
        Ring::new(IoBackendChoice::Sync)
            .unwrap()
            .unsupported_opcodes()
            .is_empty()
    );
    // A registry built from a default config follows SEGALLOC_IO too.
    let dir = tempfile::tempdir().unwrap();
    let (files, _mm) = common::manager(dir.path(), 1, 2);
    assert_eq!(files.ring().backend(), common::expected_backend());
}

/// fallocate, ftruncate, fsync, fdatasync and madvise reach the kernel on
/// both backends, errors included, and are counted.
#[test]
fn ops_really_happen() {
    for choice in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let ring = Ring::new(choice).unwrap();
            let path = dir.path().join("f");
            let fd = open_rw(&path);

            let op = ring.fallocate(&fd, 0, 0, 2 * MIB);
            assert_eq!(op.name(), "fallocate");
            op.await.unwrap();
            let md = std::fs::metadata(&path).unwrap();
            assert_eq!(md.len(), 2 * MIB, "{choice:?}");
            assert!(md.blocks() * 512 >= 2 * MIB, "{choice:?}: blocks reserved");

            let op = ring.ftruncate(&fd, 3 * MIB);
            assert_eq!(op.name(), "ftruncate");
            op.await.unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);

            let op = ring.fsync(&fd, false);
            assert_eq!(op.name(), "fsync");
            op.await.unwrap();
            let op = ring.fsync(&fd, true);
            assert_eq!(op.name(), "fdatasync");
            op.await.unwrap();

            let m = map(&fd, (2 * MIB) as usize);
            // SAFETY: the range is the whole mapping, which the op holds;
            // WILLNEED discards nothing.
            let op = unsafe {
                ring.madvise(m.clone(), m.as_mut_ptr(), m.len(), nix::libc::MADV_WILLNEED)
            };
            assert_eq!(op.name(), "madvise");
            op.await.unwrap();

            // Errors come back as the kernel's errno.
            // SAFETY: as above; an unknown advice is rejected (EINVAL).
            let bad = unsafe { ring.madvise(m.clone(), m.as_mut_ptr(), m.len(), 12345) }.await;
            assert_eq!(bad.unwrap_err().raw_os_error(), Some(nix::libc::EINVAL));
            let ro = Rc::new(OwnedFd::from(std::fs::File::open(&path).unwrap()));
            let bad = ring.fallocate(&ro, 0, 0, 4 * MIB).await;
            assert_eq!(bad.unwrap_err().raw_os_error(), Some(nix::libc::EBADF));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * MIB);

            let s = ring.stats();
            assert_eq!(s.failed, 2, "{choice:?} {s:?}");
            assert_eq!(s.abandoned, 0);
            match ring.backend() {
                IoBackend::Uring => {
                    assert_eq!((s.submitted, s.completed, s.sync_ops), (7, 7, 0), "{s:?}")
                }
                IoBackend::Sync => {
                    assert_eq!((s.submitted, s.completed, s.sync_ops), (0, 0, 7), "{s:?}")
                }
            }
        });
    }
}

/// 8 tasks × 50 operations on one ring, in small concurrent batches, with
/// every 7th operation polled once and dropped. Everything completes (no
/// lost wake-up when the eventfd watch changes hands), the counts add up,
/// and the dropped operations still happened in the kernel.
#[test]
fn concurrent_ops_from_many_tasks() {
    for choice in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let ring = Ring::new(choice).unwrap();
            let tasks: Vec<_> = (0..8u64)
                .map(|t| {
                    let ring = ring.clone();
                    let path = dir.path().join(format!("t{t}"));
                    tokio::task::spawn_local(async move {
                        let fd = open_rw(&path);
                        let m = map(&fd, MIB as usize);
                        let mut dropped = 0u64;
                        for batch in 0..10u64 {
                            let mut ops = Vec::new();
                            for j in 0..5u64 {
                                let i = batch * 5 + j;
                                let op = match i % 3 {
                                    // Grow by 4 KiB: the last one fixes the size.
                                    0 => ring.fallocate(&fd, 0, i * 4096, 4096),
                                    1 => ring.fsync(&fd, i % 2 == 0),
                                    // SAFETY: the whole mapping, held by the op.
                                    _ => unsafe {
                                        ring.madvise(
                                            m.clone(),
                                            m.as_mut_ptr(),
                                            m.len(),
                                            nix::libc::MADV_WILLNEED,
                                        )
                                    },
                                };
                                if i % 7 == 3 {
                                    let mut op = op;
                                    let _ = futures::poll!(&mut op);
                                    drop(op);
                                    dropped += 1;
                                } else {
                                    ops.push(op);
                                }
                            }
                            for r in futures::future::join_all(ops).await {
                                r.unwrap();
                            }
                            tokio::task::yield_now().await;
                        }
                        dropped
                    })
                })
                .collect();
            let all = async {
                let mut dropped = 0;
                for t in tasks {
                    dropped += t.await.unwrap();
                }
                dropped
            };
            let dropped = tokio::time::timeout(Duration::from_secs(20), all)
                .await
                .unwrap_or_else(|_| {
                    panic!("{choice:?}: operations never completed (lost wake-up)")
                });
            assert_eq!(dropped, 8 * 7);
            let s = ring.stats();
            assert_eq!(s.failed, 0, "{s:?}");
            match ring.backend() {
                IoBackend::Uring => {
                    assert_eq!(s.submitted, 400, "{s:?}");
                    assert_eq!(s.completed + s.abandoned, 400, "{s:?}");
                    assert!(s.completed >= 400 - 56, "{s:?}");
                }
                IoBackend::Sync => {
                    assert_eq!((s.sync_ops, s.abandoned), (400, 0), "{s:?}");
                }
            }
            // Dropping the last handle waits for the kernel to finish the
            // abandoned operations before their fds and mappings go.
            drop(ring);
            // Op 48 (the last fallocate, i % 3 == 0) grew each file to 49 pages.
            for t in 0..8 {
                let len = std::fs::metadata(dir.path().join(format!("t{t}")))
                    .unwrap()
                    .len();
                assert_eq!(len, 49 * 4096, "{choice:?} t{t}");
            }
        });
    }
}

/// The eventfd watch keeps only the last task that polled it. When that
/// task drops its operation, the watch must pass to a task still waiting:
/// otherwise that task sleeps through its completion forever.
#[test]
fn dropping_the_watching_op_hands_the_watch_over() {
    // On disk: the slow fsync must still run when the other op is polled.
    let Some(dir) = common::disk_tempdir("dropping_the_watching_op_hands_the_watch_over") else {
        return;
    };
    run(async {
        let ring = Ring::new(IoBackendChoice::Uring).unwrap();
        let slow = open_rw(&dir.path().join("slow"));
        let other = open_rw(&dir.path().join("other"));
        let mut checked = 0;
        for _ in 0..10 {
            if checked == 3 {
                break;
            }
            // Task A waits on a slow fsync (lots of dirty pages)...
            std::fs::write(dir.path().join("slow"), vec![7u8; 16 << 20]).unwrap();
            let done = Rc::new(std::cell::Cell::new(false));
            let a = {
                let (ring, slow, done) = (ring.clone(), slow.clone(), done.clone());
                tokio::task::spawn_local(async move {
                    ring.fsync(&slow, false).await.unwrap();
                    done.set(true);
                })
            };
            tokio::task::yield_now().await; // A polls: it watches the eventfd
            // ...then this task polls another op (taking the watch) and drops it.
            let mut op = ring.fsync(&other, true);
            let first = futures::poll!(&mut op);
            drop(op);
            if first.is_pending() && !done.get() {
                checked += 1;
            }
            tokio::time::timeout(Duration::from_secs(10), a)
                .await
                .expect("task A was never woken: the watch was not handed over")
                .unwrap();
        }
        assert!(checked >= 1, "the slow fsync always finished first");
    });
}

/// More operations in flight at once than the completion queue has room
/// for: the overflow must still be delivered.
#[test]
fn more_in_flight_than_the_completion_queue() {
    for choice in BACKENDS {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let ring = Ring::new(choice).unwrap();
            let fd = open_rw(&dir.path().join("f"));
            ring.fallocate(&fd, 0, 0, MIB).await.unwrap();
            let m = map(&fd, MIB as usize);
            // Submitted at creation: all 600 are in the kernel before the
            // first one is polled.
            let ops: Vec<_> = (0..600)
                .map(|i| {
                    if i % 2 == 0 {
                        ring.fsync(&fd, true)
                    } else {
                        // SAFETY: the whole mapping, held by the op.
                        unsafe {
                            ring.madvise(
                                m.clone(),
                                m.as_mut_ptr(),
                                m.len(),
                                nix::libc::MADV_WILLNEED,
                            )
                        }
                    }
                })
                .collect();
            // Let the kernel finish them all first.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let results =
                tokio::time::timeout(Duration::from_secs(10), futures::future::join_all(ops))
                    .await
                    .unwrap_or_else(|_| panic!("{choice:?}: completions lost"));
            assert!(results.iter().all(|r| r.is_ok()));
            let s = ring.stats();
            match ring.backend() {
                IoBackend::Uring => assert_eq!((s.submitted, s.completed), (601, 601)),
                IoBackend::Sync => assert_eq!(s.sync_ops, 601),
            }
        });
    }
}

/// Dropping an operation that the kernel still runs keeps its fd open until
/// the completion is reaped, and a later operation reaps it.
#[test]
fn dropped_op_keeps_its_fd_until_done() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let ring = Ring::new(IoBackendChoice::Uring).unwrap();
        let path = dir.path().join("f");
        let fd = open_rw(&path);
        let mut op = ring.fallocate(&fd, 0, 0, 8 * MIB);
        let first = futures::poll!(&mut op);
        drop(op);
        drop(fd);
        if first.is_pending() {
            assert_eq!(ring.stats().abandoned, 1);
        }
        // The fallocate still happens; the fd is closed only after it.
        let other = open_rw(&dir.path().join("g"));
        assert!(
            common::eventually(Duration::from_secs(5), || {
                std::fs::metadata(&path).unwrap().len() == 8 * MIB
            })
            .await
        );
        // Any later operation reaps the dropped one's completion.
        let mut closed = false;
        for _ in 0..1000 {
            ring.fsync(&other, true).await.unwrap();
            if common::open_paths_under(dir.path()) == vec![dir.path().join("g")] {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(
            closed,
            "the dropped op's fd is closed once reaped: {:?}",
            common::open_paths_under(dir.path())
        );
        assert!(matches!(first, Poll::Pending | Poll::Ready(Ok(()))));
    });
}

/// An operation dropped mid-flight releases its fd once the kernel is done,
/// with no later call on the ring: the ring reaps its abandoned operations
/// itself, while the runtime keeps running the other tasks.
#[test]
fn dropped_op_releases_its_fd_without_a_caller() {
    // On disk: the fsync must still run after its first poll.
    let Some(dir) = common::disk_tempdir("dropped_op_releases_its_fd_without_a_caller") else {
        return;
    };
    run(async {
        let ring = Ring::new(IoBackendChoice::Uring).unwrap();
        let ticks = Rc::new(std::cell::Cell::new(0u64));
        let ticker = {
            let ticks = ticks.clone();
            tokio::task::spawn_local(async move {
                loop {
                    ticks.set(ticks.get() + 1);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let mut caught = 0;
        for n in 0..20 {
            if caught == 3 {
                break;
            }
            let path = dir.path().join(format!("f{n}"));
            // Dirty pages, so that the fsync is still running when dropped.
            std::fs::write(&path, vec![3u8; 16 << 20]).unwrap();
            let fd = open_rw(&path);
            let mut op = ring.fsync(&fd, false);
            let first = futures::poll!(&mut op);
            drop(op);
            drop(fd);
            if first.is_pending() {
                caught += 1;
            }
            let released = common::eventually(Duration::from_secs(10), || {
                common::open_paths_under(dir.path()).is_empty()
            })
            .await;
            assert!(
                released,
                "the dropped op's fd is still open: {:?} ({:?})",
                common::open_paths_under(dir.path()),
                ring.stats()
            );
            std::fs::remove_file(&path).unwrap();
        }
        assert!(caught >= 1, "every fsync finished before its first poll");
        assert!(ring.stats().abandoned >= 1);
        assert!(ticks.get() > 0, "the other task ran meanwhile");
        ticker.abort();
    });
}

/// The child half of the `SEGALLOC_IO` tests: run when the parent set
/// `SEGALLOC_TEST_CHILD`, in a process of its own.
fn env_child() -> bool {
    let Ok(expect) = std::env::var("SEGALLOC_TEST_CHILD") else {
        return false;
    };
    let got = Ring::new(IoBackendChoice::Auto).map(|r| r.backend());
    match (expect.as_str(), got) {
        ("invalid", Err(Error::InvalidConfig(msg))) => {
            assert!(msg.contains("bogus"), "{msg}");
            assert!(IoBackendChoice::Auto.resolve_env().is_err());
            // Explicit choices do not read the variable.
            assert_eq!(
                IoBackendChoice::Sync.resolve_env().unwrap(),
                IoBackendChoice::Sync
            );
            assert_eq!(
                Ring::new(IoBackendChoice::Uring).unwrap().backend(),
                IoBackend::Uring
            );
        }
        ("sync", Ok(IoBackend::Sync)) | ("uring", Ok(IoBackend::Uring)) => {}
        (e, g) => panic!("SEGALLOC_IO child expected {e}, got {g:?}"),
    }
    println!("segalloc-child-ok");
    true
}

fn run_child(test: &str, segalloc_io: &str, expect: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env("SEGALLOC_IO", segalloc_io)
        .env("SEGALLOC_TEST_CHILD", expect)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("segalloc-child-ok"),
        "child SEGALLOC_IO={segalloc_io}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn segalloc_io_env_is_validated() {
    if env_child() {
        return;
    }
    run_child("segalloc_io_env_is_validated", "bogus", "invalid");
    run_child("segalloc_io_env_is_validated", "sync", "sync");
    run_child("segalloc_io_env_is_validated", "uring", "uring");
}
