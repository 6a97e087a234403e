//! The descriptor cap under a low `RLIMIT_NOFILE`, in a process of its own
//! (this test binary): the limit is process-wide, so the tests here take a
//! lock and never run side by side.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Mutex;

use common::{os_counts, pattern, run};
use segalloc::{Error, Limits};

static PROCESS_LIMITS: Mutex<()> = Mutex::new(());

const SOFT_LIMIT: u64 = 64;

/// `Limits::compute` leaves 64 descriptors of headroom and never returns 0.
#[test]
fn computed_cap_leaves_headroom() {
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    segalloc::set_nofile_soft_limit(100).unwrap();
    assert_eq!(Limits::compute().max_open_files, 36);
    segalloc::set_nofile_soft_limit(SOFT_LIMIT).unwrap();
    // 64 - 64 = 0, clamped to 1.
    assert_eq!(Limits::compute().max_open_files, 1);
    assert_eq!(segalloc::Config::new("/unused").max_open_files(), 1);
}

/// A registry capped at 8 descriptors touches 100 files under a soft limit
/// of 64: the kernel never sees more than 8 of our descriptors, idle ones
/// are evicted, and every window stays mapped and readable (evicting a
/// descriptor never unmaps).
#[test]
fn cap_of_8_over_100_files() {
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    segalloc::set_nofile_soft_limit(SOFT_LIMIT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let cfg = common::builder(dir.path(), 8, 128)
            .growth_step_bytes(64 * 1024)
            .build()
            .unwrap();
        let (files, mm) = common::manager_with(&cfg);
        let ids: Vec<_> = (0..100)
            .map(|i| common::register(&files, dir.path().join(format!("data-{i}"))))
            .collect();
        let mut held = Vec::new();
        for (i, &f) in ids.iter().enumerate() {
            let p = mm.pin(f, 4096, 4096, true).await.unwrap();
            p.write_at(0, &pattern(i as u64, 256)).unwrap();
            if i % 2 == 0 {
                held.push(p);
            }
            let (fds, vmas) = os_counts(dir.path());
            assert!(files.open_count() <= 8 && fds <= 8, "file {i}: {fds} fds");
            assert_eq!(vmas, i + 1, "every window stays mapped");
            assert!(segalloc::proc::open_fds() < SOFT_LIMIT as usize);
        }
        let s = files.stats();
        assert_eq!((s.opens, s.max_open), (100, 8));
        assert!(s.evictions >= 92, "{s:?}");
        assert_eq!((mm.window_count(), os_counts(dir.path()).1), (100, 100));

        // All 100 readable through their (still mapped) windows, no reopen.
        for (i, &f) in ids.iter().enumerate() {
            let p = mm.try_pin(f, 4096, 256, false).unwrap().expect("mapped");
            let mut buf = [0u8; 256];
            p.read_at(0, &mut buf).unwrap();
            assert_eq!(buf.to_vec(), pattern(i as u64, 256), "file {i}");
        }
        for (k, p) in held.iter().enumerate() {
            let mut buf = [0u8; 256];
            p.read_at(0, &mut buf).unwrap();
            assert_eq!(buf.to_vec(), pattern(2 * k as u64, 256));
        }
        assert_eq!(files.stats().opens, 100);
        assert!(os_counts(dir.path()).0 <= 8);
    });
}

/// When the process itself runs out of descriptors (`EMFILE`) the registry
/// gives one of its idle descriptors back and retries; with none to give,
/// the error is typed.
#[test]
fn emfile_evicts_or_is_typed() {
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    segalloc::set_nofile_soft_limit(SOFT_LIMIT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, _mm) = common::manager(dir.path(), 8, 8);
        let a = common::register(&files, dir.path().join("a"));
        let b = common::register(&files, dir.path().join("b"));
        let c = common::register(&files, dir.path().join("c"));
        drop(files.acquire(a, 0).await.unwrap());
        // Take every descriptor left.
        let mut hog = Vec::new();
        let exhaust = |hog: &mut Vec<std::fs::File>| {
            while let Ok(f) = std::fs::File::open("/dev/null") {
                hog.push(f);
            }
        };
        exhaust(&mut hog);
        assert!(files.open_count() < 8, "below our own cap");
        // a is idle: it is closed to open b.
        let lb = files.acquire(b, 0).await.unwrap();
        assert_eq!(files.stats().evictions, 1);
        hog.pop(); // room to read /proc/self/fd
        assert_eq!(
            common::open_paths_under(dir.path()),
            vec![dir.path().join("b")]
        );
        exhaust(&mut hog);
        // b is in use and nothing else is ours: a typed error.
        match files.acquire(c, 0).await {
            Err(Error::TooManyOpenFiles { path, .. }) => assert!(path.ends_with("c")),
            other => panic!("expected TooManyOpenFiles, got {other:?}"),
        }
        drop(hog);
        drop(lb);
        drop(files.acquire(c, 0).await.unwrap());
        assert_eq!(files.open_count(), os_counts(dir.path()).0);
    });
}

/// A registry with one descriptor, held by a lease on one file, while the
/// ring still runs an fsync of another (dirty pages: slow) whose future was
/// dropped: the outcome of acquiring two more files at once (both wait for
/// a release) within 10 s, and the lease.
async fn acquire_past_a_held_descriptor(
    dir: &std::path::Path,
    before_waits: impl FnOnce(),
) -> (
    Rc<segalloc::FileHandleRegistry>,
    Result<segalloc::Result<segalloc::FileLease>, tokio::time::error::Elapsed>,
    segalloc::FileLease,
) {
    let (files, _mm) = common::manager(dir, 1, 4);
    let a = common::register(&files, dir.join("a"));
    let b = common::register(&files, dir.join("b"));
    let held = files.acquire(a, 4096).await.unwrap();
    let other = dir.join("other");
    std::fs::write(&other, vec![9u8; 16 << 20]).unwrap();
    let fd = Rc::new(std::os::fd::OwnedFd::from(
        std::fs::File::options().write(true).open(&other).unwrap(),
    ));
    let mut op = files.ring().fsync(&fd, false);
    let _ = futures::poll!(&mut op);
    before_waits();
    drop((op, fd));
    // The second acquire in a task of its own: each waiting task is woken.
    let c = common::register(&files, dir.join("c"));
    let other_task = tokio::task::spawn_local({
        let files = files.clone();
        async move { files.acquire(c, 4096).await.map(drop) }
    });
    tokio::task::yield_now().await;
    let r = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let rb = files.acquire(b, 4096).await;
        let rc = other_task.await.expect("the task ran");
        assert!(
            matches!(rc, Err(Error::FdPressure { max_open_files: 1 })),
            "{rc:?}"
        );
        rb
    })
    .await;
    (files, r, held)
}

/// With its only descriptor held by a lease, a registry refuses another
/// file (`FdPressure`) rather than wait forever, also while the ring still
/// runs an operation dropped mid-flight: it waits for that one to be
/// released, sees the lease still holds the descriptor, and gives up.
#[test]
fn fd_pressure_from_a_lease_is_not_waited_out() {
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, r, held) = acquire_past_a_held_descriptor(dir.path(), || {}).await;
        let r = r.expect("the acquire gave up rather than wait forever");
        assert!(
            matches!(r, Err(Error::FdPressure { max_open_files: 1 })),
            "{r:?}"
        );
        drop(held);
        let b = common::register(&files, dir.path().join("b"));
        drop(files.acquire(b, 4096).await.unwrap());
        assert_eq!(files.open_count(), os_counts(dir.path()).0);
    });
}

/// The same under a current-thread runtime whose tasks another thread
/// polls (`Runtime::block_on` there, the registry under `Handle::block_on`
/// here): the ring's reaper then runs on that thread, where it cannot reach
/// the ring. The acquire must still give up (`FdPressure`) rather than wait
/// for a release nobody makes.
#[test]
fn fd_pressure_is_not_waited_out_when_another_thread_drives_the_runtime() {
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let driver = std::thread::spawn(move || {
        rt.block_on(async {
            let _ = stopped.await;
        })
    });
    let local = tokio::task::LocalSet::new();
    let busy = handle.clone();
    let r = handle.block_on(local.run_until(async {
        // Keep the driving thread busy from before the op is dropped (which
        // starts the reaper there) until both acquires wait.
        let hold_the_driver = move || {
            drop(busy.spawn(async {
                std::thread::sleep(std::time::Duration::from_millis(300));
            }))
        };
        let (_files, r, _held) = acquire_past_a_held_descriptor(dir.path(), hold_the_driver).await;
        r
    }));
    let _ = stop.send(());
    driver.join().unwrap();
    let r = r.expect("the acquire gave up rather than wait forever");
    assert!(
        matches!(r, Err(Error::FdPressure { max_open_files: 1 })),
        "{r:?}"
    );
}

/// Descriptor pressure while a new segment makes the metadata's size
/// durable (the first new segment after a reopen does) is reported, as a
/// sync reports it, without poisoning the shard: no `fdatasync` ran, so
/// nothing can have been lost. It poisoned the shard until a reopen.
#[test]
fn fd_pressure_in_a_new_segment_does_not_poison_the_shard() {
    // Other tests here lower the process's descriptor limit meanwhile.
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let cfg = segalloc::Config::builder(dir.path())
        .shards(1)
        .max_open_files(1)
        .build()
        .unwrap();
    run(async {
        let shard = common::open_shard(&cfg).await.unwrap();
        shard.allocate(100).await.unwrap();
        shard.sync().await.unwrap();
        drop(shard);
        let shard = common::open_shard(&cfg).await.unwrap();
        let own = tempfile::tempdir().unwrap();
        let fid = common::register(shard.files(), own.path().join("own.dat"));
        // The one descriptor, held on a file of the user's own (an
        // allocator's files are not leased out).
        let lease = shard.files().acquire(fid, 0).await.unwrap();
        match shard.allocate(3000).await {
            Err(Error::FdPressure { .. }) => {}
            other => panic!("a new segment with every descriptor in use: {other:?}"),
        }
        assert!(!shard.allocator().is_poisoned());
        drop(lease);
        let a = shard.allocate(3000).await.unwrap();
        a.write_at(0, b"after").unwrap();
        shard.sync().await.unwrap();
    });
}

/// The soft `RLIMIT_NOFILE` (`/proc/self/limits`).
fn soft_nofile_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files in /proc/self/limits");
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

/// Sets the soft `RLIMIT_NOFILE` back to what it was when dropped.
struct RestoreSoftLimit(u64);

impl Drop for RestoreSoftLimit {
    fn drop(&mut self) {
        let _ = segalloc::set_nofile_soft_limit(self.0);
    }
}

/// How many of this process's threads are shard threads of a runtime
/// (named `segalloc-shard-{i}`, which the kernel cuts to 15 bytes).
fn shard_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("segalloc-shard"))
        .count()
}

/// This process's descriptors and what they are open on (`/proc/self/fd`,
/// without the one reading it).
fn open_descriptors() -> BTreeSet<(String, String)> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let target = std::fs::read_link(e.path()).ok()?;
            let target = target.to_string_lossy().into_owned();
            let fd = e.file_name().to_string_lossy().into_owned();
            (!target.starts_with("/proc/")).then_some((fd, target))
        })
        .collect()
}

/// Whether `e` says the process ran out of descriptors.
fn out_of_descriptors(e: &Error) -> bool {
    let errno = |s: &std::io::Error| matches!(s.raw_os_error(), Some(24 | 23)); // EMFILE, ENFILE
    match e {
        Error::TooManyOpenFiles { .. } => true,
        Error::Io { source, .. } | Error::UringUnavailable { source } => errno(source),
        _ => false,
    }
}

/// More shards than the descriptor limit leaves room for: some shard
/// threads open their shard, others cannot even build their executor
/// (`EMFILE`). `Runtime::start` returns the error (a thread that failed
/// there panicked and never reported, and `start` waited for it forever),
/// no shard thread panics, every shard thread is stopped and joined, no
/// descriptor is left open (but those tokio-uring may leak, see below), and the
/// directory starts again once the limit is back.
#[test]
fn start_fails_cleanly_when_shard_threads_run_out_of_descriptors() {
    const SHARDS: usize = 32;
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    // Other tests here leave the limit low: start from the hard limit.
    let _restore = RestoreSoftLimit(soft_nofile_limit());
    segalloc::set_nofile_soft_limit(u64::MAX).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = segalloc::Config::builder(dir.path().join("data"))
        .shards(SHARDS)
        .max_open_files(SHARDS)
        .window_bytes(common::WINDOW)
        .growth_step_bytes(common::STEP)
        .build()
        .unwrap();
    // Shard threads that panic, counted by a hook that also prints them.
    let panics = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let previous_hook = std::sync::Arc::new(std::panic::take_hook());
    std::panic::set_hook(Box::new({
        let panics = panics.clone();
        let previous_hook = previous_hook.clone();
        move |info| {
            let name = std::thread::current().name().map(str::to_owned);
            if name.is_some_and(|n| n.starts_with("segalloc-shard-")) {
                panics.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            previous_hook(info)
        }
    }));
    let fds_before = open_descriptors();
    // Room for the data directory and a few shards, not for 32.
    segalloc::set_nofile_soft_limit((fds_before.len() + ROOM_FOR_A_FEW_SHARDS) as u64).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let starter = std::thread::spawn({
        let cfg = cfg.clone();
        move || {
            let _ = tx.send(segalloc::Runtime::start(cfg));
        }
    });
    let started = rx.recv_timeout(std::time::Duration::from_secs(60));
    segalloc::set_nofile_soft_limit(u64::MAX).unwrap();
    let Ok(started) = started else {
        panic!(
            "Runtime::start has not returned after 60 s ({} shard threads panicked, {} still run)",
            panics.load(std::sync::atomic::Ordering::SeqCst),
            shard_threads()
        );
    };
    starter.join().unwrap();
    drop(std::panic::take_hook()); // the counting hook
    std::panic::set_hook(Box::new(move |info| previous_hook(info)));
    let panicked = panics.load(std::sync::atomic::Ordering::SeqCst);
    match started {
        Err(e) => {
            eprintln!("start failed: {e}");
            assert!(out_of_descriptors(&e), "{e:?}");
        }
        Ok(rt) => {
            rt.shutdown().unwrap();
            panic!(
                "{SHARDS} shards started under a limit of {ROOM_FOR_A_FEW_SHARDS} spare descriptors"
            );
        }
    }
    assert_eq!(panicked, 0, "shard threads panicked");
    assert_eq!(shard_threads(), 0, "shard threads still run");
    // No descriptor of the directory (metadata, data, locks) is left open.
    assert_eq!(common::open_paths_under(dir.path()), Vec::<PathBuf>::new());
    // Nor any other, but with io_uring maybe tokio-uring 0.5's own: a
    // `tokio_uring::Runtime::new` whose ring cannot be set up does not drop
    // the tokio runtime it built first (held in a `ManuallyDrop`), and with
    // it an epoll and an eventfd. A shard tries a ring of its own first and
    // does not build tokio-uring's when that fails, but the descriptors
    // can run out between the two (other shard threads take them).
    let left: Vec<String> = open_descriptors()
        .difference(&fds_before)
        .map(|(_, t)| t.clone())
        .collect();
    if std::env::var("SEGALLOC_IO").as_deref() == Ok("sync") {
        assert_eq!(left, Vec::<String>::new(), "descriptors left open");
    } else {
        assert!(
            left.iter().all(|t| t.starts_with("anon_inode:")),
            "descriptors left open: {left:?}"
        );
    }

    // Locks released: the directory starts. (The failed start may not have
    // deleted the directory it created: that takes a descriptor per shard's
    // lock, and the limit was still low. tests/runtime.rs checks the
    // deletion: `a_shard_thread_panicking_before_it_is_open_fails_start`.)
    let rt = segalloc::Runtime::start(cfg).expect("start again with the limit restored");
    assert_eq!(rt.shard_count(), SHARDS);
    rt.shutdown().unwrap();
    assert_eq!(shard_threads(), 0);
}

/// Spare descriptors in [`start_fails_cleanly_when_shard_threads_run_out_of_descriptors`]:
/// the data directory's lock and a few shards (each holds 8 with io_uring
/// and 5 with the sync backend, its metadata file included). With 48,
/// every shard thread sometimes built its executor (sync backend), and the
/// test then proved nothing.
const ROOM_FOR_A_FEW_SHARDS: usize = 24;

/// The README's count: besides the descriptors of its files (the
/// registries', within `max_open_files`), a `Runtime` holds 1 + 7 per shard
/// with io_uring and 1 + 4 per shard with the sync backend.
#[test]
fn a_runtime_holds_the_descriptors_the_readme_counts() {
    let _g = PROCESS_LIMITS.lock().unwrap_or_else(|e| e.into_inner());
    let _restore = RestoreSoftLimit(soft_nofile_limit());
    segalloc::set_nofile_soft_limit(u64::MAX).unwrap();
    let per_shard = match common::expected_backend() {
        segalloc::IoBackend::Uring => 7,
        segalloc::IoBackend::Sync => 4,
    };
    for shards in [1, 4] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = segalloc::Config::builder(dir.path().join("data"))
            .shards(shards)
            .window_bytes(common::WINDOW)
            .growth_step_bytes(common::STEP)
            .build()
            .unwrap();
        let before = open_descriptors();
        let rt = segalloc::Runtime::start(cfg).unwrap();
        let held = open_descriptors().difference(&before).count();
        let files = futures::executor::block_on(rt.stats()).unwrap().open_fds();
        assert_eq!(
            held - files,
            1 + per_shard * shards,
            "{shards} shards hold {held} descriptors, {files} of them the registries'"
        );
        rt.shutdown().unwrap();
    }
}
