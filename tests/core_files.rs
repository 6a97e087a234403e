//! `FileHandleRegistry` through the public API: one descriptor per file,
//! the descriptor cap, growth on disk, persistence, read-only registries.
//! Every bound is checked against `/proc/self` as well as our counters.

mod common;

use std::os::unix::fs::MetadataExt;
use std::rc::Rc;

use common::{STEP, WINDOW, os_counts, pattern, run};
use segalloc::config::{IoBackendChoice, MIB};
use segalloc::{
    DataDir, Error, FileHandleRegistry, FileId, Handle, MappingConfig, MappingManager, Ring,
    SegmentAllocator,
};
use std::sync::Arc;

/// Bytes allocated on disk for `path` (`st_blocks` is in 512-byte units).
fn allocated_bytes(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn len_on_disk(path: &std::path::Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Seed test FDReuse: many pins on one file share one descriptor.
#[test]
fn fd_reuse_one_descriptor_per_file() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let path = dir.path().join("data-0");
        let f = common::register(&files, &path);
        assert_eq!(common::register(&files, &path), f, "same path, same id");

        let mut held = Vec::new();
        for i in 0..200u64 {
            let p = mm.pin(f, i * 4096 % (8 * MIB), 4096, true).await.unwrap();
            p.write_at(0, &i.to_le_bytes()).unwrap();
            if i % 3 == 0 {
                held.push(p);
            }
            assert_eq!(files.open_count(), 1);
        }
        // Leases taken directly share the same descriptor too.
        // SAFETY: the test's own file, mapped by nothing else.
        let leases: Vec<_> = futures::future::try_join_all(
            (0..10).map(|_| unsafe { files.acquire_path(&path, 4096) }),
        )
        .await
        .unwrap();
        assert!(leases.iter().all(|l| l.id() == f));
        assert_eq!(files.open_count(), 1);
        assert_eq!(os_counts(dir.path()).0, 1, "/proc/self/fd agrees");
        assert_eq!(files.stats().opens, 1, "exactly one open(2)");
        assert_eq!(files.stats().files, 1);
        drop(leases);
        drop(held);
        // The descriptor stays cached after the last lease.
        assert_eq!(files.open_count(), 1);
        assert_eq!(os_counts(dir.path()).0, 1);
        assert_eq!(mm.window_count(), 1);
    });
}

/// Seed test ManySegments: 1000 segment-sized pins over a few files stay
/// within a handful of descriptors and windows.
#[test]
fn many_segments_few_fds_few_windows() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 8);
        let ids: Vec<FileId> = (0..3)
            .map(|i| common::register(&files, dir.path().join(format!("data-{i}"))))
            .collect();
        // Segment i: file i % 3, spread over the first two windows of it.
        let at = |i: u64| (ids[(i % 3) as usize], (i / 3) * 97 * 4096 % (2 * WINDOW));
        let mut pins = Vec::with_capacity(1000);
        for i in 0..1000u64 {
            let (f, off) = at(i);
            let p = mm.pin(f, off, 4096, true).await.unwrap();
            p.write_at(0, &pattern(i, 64)).unwrap();
            pins.push(p);
            let (fds, vmas) = os_counts(dir.path());
            assert!(files.open_count() <= 4 && fds <= 4, "fds {fds}");
            assert!(mm.window_count() <= 8 && vmas <= 8, "vmas {vmas}");
        }
        let (fds, vmas) = os_counts(dir.path());
        assert_eq!((files.open_count(), fds), (3, 3));
        // Two adjacent windows of a file may share one VMA (at least one
        // per file): the bytes mapped are what must match.
        assert_eq!(mm.window_count(), 6);
        assert!((3..=6).contains(&vmas), "vmas {vmas}");
        assert_eq!(common::mapped_bytes_under(dir.path()), 6 * WINDOW);
        assert_eq!(files.stats().opens, 3);
        assert_eq!(mm.stats().faults, 6);
        assert_eq!(mm.stats().pinned_windows, 6);
        drop(pins);
        assert_eq!(mm.stats().pinned_windows, 0);
        for i in 0..1000u64 {
            let (f, off) = at(i);
            let p = mm
                .try_pin(f, off, 4096, false)
                .unwrap()
                .expect("still mapped");
            let mut buf = [0u8; 64];
            p.read_at(0, &mut buf).unwrap();
            // Several segments share a range; the last writer wins.
            let last = (0..1000u64).rev().find(|&j| at(j) == (f, off)).unwrap();
            assert_eq!(buf.to_vec(), pattern(last, 64));
        }
    });
}

/// The descriptor cap holds with LRU eviction; an fd in use is never closed.
#[test]
fn fd_cap_lru_and_pressure() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let ring = Ring::new(IoBackendChoice::Auto).unwrap();
        let files = FileHandleRegistry::new(ring, 2);
        let [a, b, c] = ["a", "b", "c"].map(|n| common::register(&files, dir.path().join(n)));
        drop(files.acquire(a, 0).await.unwrap());
        drop(files.acquire(b, 0).await.unwrap());
        drop(files.acquire(a, 0).await.unwrap()); // a is now the most recent
        drop(files.acquire(c, 0).await.unwrap()); // evicts b
        assert_eq!(files.stats().evictions, 1);
        assert_eq!(
            common::open_paths_under(dir.path()),
            vec![dir.path().join("a"), dir.path().join("c")]
        );

        // Both descriptors in use: a third file cannot be opened.
        let la = files.acquire(a, 0).await.unwrap();
        let lc = files.acquire(c, 0).await.unwrap();
        match files.acquire(b, 0).await {
            Err(Error::FdPressure { max_open_files: 2 }) => {}
            other => panic!("expected FdPressure, got {other:?}"),
        }
        assert_eq!(os_counts(dir.path()).0, 2);
        drop(lc);
        let lb = files.acquire(b, 0).await.unwrap();
        assert_eq!(files.open_count(), 2);
        assert_eq!(
            common::open_paths_under(dir.path()),
            vec![dir.path().join("a"), dir.path().join("b")]
        );
        drop((la, lb));
        files.close_idle();
        assert_eq!((files.open_count(), os_counts(dir.path()).0), (0, 0));
    });
}

/// Closing descriptors never unmaps: windows stay readable without a reopen.
#[test]
fn close_idle_keeps_windows_mapped() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let f = common::register(&files, dir.path().join("a"));
        let held = mm.pin(f, 0, 4096, true).await.unwrap();
        held.write_at(0, b"still here").unwrap();
        files.close_idle();
        assert_eq!(os_counts(dir.path()), (0, 1));
        let mut buf = [0u8; 10];
        held.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"still here");
        let again = mm.try_pin(f, 0, 10, false).unwrap().expect("mapped");
        again.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"still here");
        assert_eq!(files.stats().opens, 1, "no reopen for a mapped window");
    });
}

/// Growth: a fresh file grows by exactly one step, blocks included, and
/// never past the end of the window being pinned.
#[test]
fn growth_by_steps_within_the_window() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let pa = dir.path().join("a");
        let a = common::register(&files, &pa);
        let p = mm.pin(a, 0, 4096, true).await.unwrap();
        assert_eq!(len_on_disk(&pa), STEP);
        let blocks = allocated_bytes(&pa);
        assert!(
            (STEP..STEP + 64 * 1024).contains(&blocks),
            "1 MiB reserved on disk, got {blocks} bytes"
        );
        assert_eq!(files.reserved_bytes(a).unwrap(), STEP);
        assert_eq!(files.len_bytes(a).unwrap(), Some(STEP));
        let grows = files.stats().grows;
        assert_eq!(grows, 1);
        drop(p);

        // Inside the reserved step: no growth.
        drop(mm.pin(a, STEP - 4096, 4096, true).await.unwrap());
        assert_eq!((len_on_disk(&pa), files.stats().grows), (STEP, 1));
        // One byte past it: one more step.
        drop(mm.pin(a, STEP, 1, true).await.unwrap());
        assert_eq!((len_on_disk(&pa), files.stats().grows), (2 * STEP, 2));
        assert!(allocated_bytes(&pa) >= 2 * STEP);
        // A read-only pin past the reserved end of a mapped window fails
        // and grows nothing.
        match mm.pin(a, 5 * STEP, 4096, false).await {
            Err(Error::InvalidRange { .. }) => {}
            other => panic!("expected InvalidRange, got {other:?}"),
        }
        assert_eq!(len_on_disk(&pa), 2 * STEP);

        // Near the end of a window: grow to the window end, not beyond.
        let pb = dir.path().join("b");
        let b = common::register(&files, &pb);
        drop(mm.pin(b, WINDOW - 4096, 4096, true).await.unwrap());
        assert_eq!(len_on_disk(&pb), WINDOW);
        assert!(allocated_bytes(&pb) >= WINDOW);
        assert!(allocated_bytes(&pb) < WINDOW + STEP);
        drop(mm.pin(b, WINDOW - 2 * STEP, STEP, true).await.unwrap());
        assert_eq!(len_on_disk(&pb), WINDOW);
        // The first byte of the next window: one step into it.
        drop(mm.pin(b, WINDOW, 1, true).await.unwrap());
        assert_eq!(len_on_disk(&pb), WINDOW + STEP);
        assert_eq!(files.reserved_bytes(b).unwrap(), WINDOW + STEP);

        // A read-only pin of an unmapped window past the end of the file.
        let pc = dir.path().join("c");
        let c = common::register(&files, &pc);
        match mm.pin(c, 0, 4096, false).await {
            Err(Error::InvalidRange { .. }) => {}
            other => panic!("expected InvalidRange, got {other:?}"),
        }
        assert_eq!(len_on_disk(&pc), 0, "a read-only pin never grows");
        assert_eq!(mm.window_count(), os_counts(dir.path()).1);
    });
}

/// `acquire` reserves exactly what was asked, through the control ring.
#[test]
fn acquire_reserves_blocks() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let ring = Ring::new(IoBackendChoice::Auto).unwrap();
        let files = FileHandleRegistry::new(ring, 4);
        let path = dir.path().join("a");
        // SAFETY: the test's own file, mapped by nothing else.
        let lease = unsafe { files.acquire_path(&path, 3 * MIB + 4096) }
            .await
            .unwrap();
        assert_eq!(len_on_disk(&path), 3 * MIB + 4096);
        assert!(allocated_bytes(&path) >= 3 * MIB + 4096);
        // Smaller requests never shrink the file.
        drop(files.acquire(lease.id(), 4096).await.unwrap());
        assert_eq!(len_on_disk(&path), 3 * MIB + 4096);
        files.sync(lease.id(), true).await.unwrap();
        files.sync(lease.id(), false).await.unwrap();
        let s = files.ring().stats();
        match files.ring().backend() {
            segalloc::IoBackend::Uring => assert!(s.submitted >= 3 && s.completed >= 3, "{s:?}"),
            segalloc::IoBackend::Sync => assert!(s.sync_ops >= 3, "{s:?}"),
        }
    });
}

/// Seed test Persistence: bytes written through pins survive dropping
/// everything; a new registry (read-write or read-only) reads them back.
#[test]
fn persistence_across_registries() {
    let dir = tempfile::tempdir().unwrap();
    let spots: Vec<(String, u64)> = vec![
        ("a".into(), 0),
        ("a".into(), 5 * 4096),
        ("a".into(), WINDOW + 123),
        ("b".into(), 2 * WINDOW - 4096),
    ];
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        for (i, (name, off)) in spots.iter().enumerate() {
            let f = common::register(&files, dir.path().join(name));
            let p = mm.pin(f, *off, 4096, true).await.unwrap();
            p.write_at(0, &pattern(i as u64, 4096)).unwrap();
        }
    });
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        for (i, (name, off)) in spots.iter().enumerate() {
            let f = common::register(&files, dir.path().join(name));
            let p = mm.pin(f, *off, 4096, false).await.unwrap();
            let mut buf = vec![0u8; 4096];
            p.read_at(0, &mut buf).unwrap();
            assert_eq!(buf, pattern(i as u64, 4096), "spot {i}");
        }
        assert_eq!(files.stats().grows, 0, "reading back grows nothing");
    });
    run(async {
        let ring = Ring::new(IoBackendChoice::Auto).unwrap();
        let files = Rc::new(FileHandleRegistry::new_read_only(ring, 2));
        let mm = MappingManager::new(files.clone(), small_mapping_config(4));
        for (i, (name, off)) in spots.iter().enumerate() {
            let f = common::register(&files, dir.path().join(name));
            let p = mm.pin(f, *off, 4096, false).await.unwrap();
            let mut buf = vec![0u8; 4096];
            p.read_at(0, &mut buf).unwrap();
            assert_eq!(buf, pattern(i as u64, 4096), "spot {i}");
        }
    });
}

fn small_mapping_config(max_windows: usize) -> MappingConfig {
    let cfg = common::builder(std::path::Path::new("/unused"), 4, max_windows)
        .build()
        .unwrap();
    MappingConfig::from_config(&cfg)
}

/// A read-only registry: reads what exists, refuses to grow, write or
/// create.
#[test]
fn read_only_registry_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a");
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let f = common::register(&files, &path);
        mm.pin(f, 0, 4096, true)
            .await
            .unwrap()
            .write_at(0, b"ro")
            .unwrap();
    });
    run(async {
        let ring = Ring::new(IoBackendChoice::Auto).unwrap();
        let files = Rc::new(FileHandleRegistry::new_read_only(ring, 2));
        assert!(files.is_read_only());
        let mm = MappingManager::new(files.clone(), small_mapping_config(4));
        let f = common::register(&files, &path);

        // Writable pins are refused before anything is mapped.
        match mm.pin(f, 0, 4096, true).await {
            Err(Error::ReadOnly(_)) => {}
            other => panic!("expected ReadOnly, got {other:?}"),
        }
        assert!(matches!(
            mm.try_pin(f, 0, 4096, true),
            Err(Error::ReadOnly(_))
        ));
        assert_eq!(mm.window_count(), 0);

        // Past the end of the file (1 MiB): an error, unmapped or mapped.
        assert!(mm.pin(f, STEP, 4096, false).await.is_err());
        let p = mm.pin(f, 0, 4096, false).await.unwrap();
        assert!(!p.is_writable());
        assert!(p.as_mut_ptr().is_null());
        let mut buf = [0u8; 2];
        p.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"ro");
        assert!(matches!(p.write_at(0, b"x"), Err(Error::ReadOnly(_))));
        match mm.pin(f, STEP, 4096, false).await {
            Err(Error::InvalidRange { .. }) => {}
            other => panic!("expected InvalidRange, got {other:?}"),
        }
        // The registry refuses to grow.
        match files.acquire(f, 2 * STEP).await {
            Err(Error::ReadOnly(_)) => {}
            other => panic!("expected ReadOnly, got {other:?}"),
        }
        assert_eq!(len_on_disk(&path), STEP);

        // A missing file is an error, and is not created.
        let missing = common::register(&files, dir.path().join("missing"));
        match mm.pin(missing, 0, 4096, false).await {
            Err(Error::Io { op: "open", .. }) => {}
            other => panic!("expected an open error, got {other:?}"),
        }
        assert!(!dir.path().join("missing").exists());
        assert_eq!(os_counts(dir.path()), (files.open_count(), 1));
    });
}

/// An id the registry never handed out is `UnknownFile` everywhere.
#[test]
fn unknown_file_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let _known = common::register(&files, dir.path().join("a"));
        let bogus = FileId(7);
        let is_unknown = |r: &Result<_, Error>| matches!(r, Err(Error::UnknownFile(7)));
        assert!(is_unknown(&mm.pin(bogus, 0, 4096, true).await.map(drop)));
        assert!(is_unknown(&mm.try_pin(bogus, 0, 4096, false).map(drop)));
        assert!(is_unknown(&files.acquire(bogus, 0).await.map(drop)));
        assert!(is_unknown(&files.path(bogus).map(drop)));
        assert!(is_unknown(&files.reserved_bytes(bogus).map(drop)));
        assert!(is_unknown(&files.sync(bogus, true).await));
        assert!(is_unknown(
            &mm.prefetch(bogus, &[(0, 4096)]).await.map(drop)
        ));
        assert_eq!(os_counts(dir.path()), (0, 0));
        assert_eq!((files.open_count(), mm.window_count()), (0, 0));
    });
}

/// Directory durability is tracked per file: a file left by a crash (it
/// exists before the registry first sees it) gets a folder fsync the first
/// time it is made durable, once; a file created here too.
#[test]
fn crash_left_file_is_directory_synced_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("left"), [7u8; 4096]).unwrap();
    run(async {
        let (files, _mm) = common::manager(dir.path(), 4, 4);
        let left = common::register(&files, dir.path().join("left"));
        drop(files.acquire(left, 0).await.unwrap());
        assert!(files.make_entry_durable(left).await.unwrap(), "synced");
        assert!(!files.make_entry_durable(left).await.unwrap(), "once");
        let new = common::register(&files, dir.path().join("new"));
        assert!(files.make_entry_durable(new).await.unwrap());
        assert!(dir.path().join("new").exists(), "created first");
        assert_eq!(files.stats().dir_syncs, 2);
    });
}

/// While a sync of a file is in flight, the file counts as dirty: a second
/// sync must not skip it and report success before the first one's
/// write-back completed.
#[test]
fn a_file_being_synced_counts_as_dirty() {
    use std::future::Future;
    let dir = tempfile::tempdir().unwrap();
    run(async {
        let ring = Ring::new(IoBackendChoice::Auto).unwrap();
        let files = FileHandleRegistry::new(ring, 4);
        // SAFETY: the test's own file, mapped by nothing else.
        let lease = unsafe { files.acquire_path(dir.path().join("a"), MIB) }
            .await
            .unwrap();
        let id = lease.id();
        files.mark_dirty(id);
        let mut first = std::pin::pin!(files.sync(id, true));
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match first.as_mut().poll(&mut cx) {
            std::task::Poll::Pending => {
                // io_uring: the fdatasync is in flight.
                assert!(files.is_dirty(id), "skipped while its sync runs");
                first.await.unwrap();
            }
            // The sync backend completes it at once.
            std::task::Poll::Ready(r) => r.unwrap(),
        }
        assert!(!files.is_dirty(id), "synced and unchanged since");
        files.mark_dirty(id);
        assert!(files.is_dirty(id));
        files.sync(id, true).await.unwrap();
        assert!(!files.is_dirty(id));
    });
}

/// Shard 0 of `cfg`'s directory (made if need be), through `mm`.
async fn open_shard0(
    cfg: &segalloc::Config,
    mm: &Rc<MappingManager>,
) -> segalloc::Result<(Arc<DataDir>, SegmentAllocator)> {
    let dd = Arc::new(DataDir::open(cfg)?);
    let a = SegmentAllocator::open(0, &dd.shard_dir(0), *dd.manifest(), mm.clone()).await?;
    Ok((dd, a))
}

/// Shard 0 of the directory at `path`, read-only, through `mm`.
async fn open_shard0_read_only(
    path: &std::path::Path,
    mm: &Rc<MappingManager>,
) -> (DataDir, SegmentAllocator) {
    let (dd, _) = DataDir::open_read_only(path).unwrap();
    let a = SegmentAllocator::open(0, &dd.shard_dir(0), *dd.manifest(), mm.clone())
        .await
        .unwrap();
    (dd, a)
}

/// A manager of its own (registry writable) with `cfg`'s small windows.
fn manager_of(cfg: &segalloc::Config) -> (Rc<FileHandleRegistry>, Rc<MappingManager>) {
    let (files, mm) = common::manager_with(cfg);
    (files, Rc::new(mm))
}

/// A read-only registry and its manager.
fn read_only_manager(cfg: &segalloc::Config) -> (Rc<FileHandleRegistry>, Rc<MappingManager>) {
    let ring = Ring::new(IoBackendChoice::Auto).unwrap();
    let files = Rc::new(FileHandleRegistry::new_read_only(ring, 8));
    let mm = MappingManager::new(files.clone(), MappingConfig::from_config(cfg));
    (files, Rc::new(mm))
}

/// Close `a` (and its directory) and unmap its windows, which hold the
/// shard's lock.
async fn close_and_unmap<D>(a: SegmentAllocator, dd: D, mm: &MappingManager) {
    drop((a, dd));
    mm.settle_prefaults().await;
    mm.evict_idle();
}

/// Allocate `size` bytes in `a`, write `text` at its start, sync: the
/// handle.
async fn write_synced(a: &SegmentAllocator, size: u64, text: &[u8]) -> Handle {
    let x = a.allocate(size).await.unwrap();
    x.write_at(0, text).unwrap();
    let h = x.into_handle();
    a.sync().await.unwrap();
    h
}

/// The first `n` bytes of `h`, read through `a`.
async fn read_back(a: &SegmentAllocator, h: Handle, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    a.pin(h).await.unwrap().read_at(0, &mut b).unwrap();
    b
}

/// An allocator of a new data directory, made where another was destroyed,
/// opened through the registry and manager the first one used. The
/// registry kept the old files' entries under the same paths: the new
/// `meta.seg` was taken for the old one's size, and the allocator's first
/// read of its superblock faulted past the end of the empty file (SIGBUS,
/// which ends this test binary); with the old descriptor still cached
/// (no `close_idle`), the new directory was opened through the old,
/// deleted file ("superblock belongs to another data directory").
#[test]
fn an_allocator_over_a_recreated_directory_uses_the_new_files() {
    for close_idle in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d");
        let cfg = common::builder(&path, 64, 16).build().unwrap();
        run(async {
            let (files, mm) = manager_of(&cfg);
            let (dd, a) = open_shard0(&cfg, &mm).await.unwrap();
            write_synced(&a, MIB, b"old").await;
            close_and_unmap(a, dd, &mm).await;
            if close_idle {
                files.close_idle();
            }
            DataDir::destroy(&path).unwrap();
            let (dd, a) = open_shard0(&cfg, &mm)
                .await
                .unwrap_or_else(|e| panic!("close_idle {close_idle}: {e}"));
            assert_eq!(a.live_count(), 0, "close_idle {close_idle}");
            let h = write_synced(&a, 100, b"new").await;
            close_and_unmap(a, dd, &mm).await;
            // The allocation is in the new directory's files.
            let (_dd, a) = open_shard0(&cfg, &manager_of(&cfg).1).await.unwrap();
            assert_eq!(a.live_count(), 1, "close_idle {close_idle}");
            assert_eq!(read_back(&a, h, 3).await, b"new", "close_idle {close_idle}");
        });
    }
}

/// `f` registered in a new registry of `dir`, its first page pinned and
/// written, the pin dropped, its descriptor closed (`close_idle`), and its
/// window unmapped too with `unmap`.
async fn written_then_closed(
    dir: &std::path::Path,
    f: &std::path::Path,
    unmap: bool,
) -> (Rc<FileHandleRegistry>, MappingManager, FileId) {
    let (files, mm) = common::manager(dir, 4, 4);
    let id = common::register(&files, f);
    let p = mm.pin(id, 0, 4096, true).await.unwrap();
    p.write_at(0, b"hi").unwrap();
    drop(p);
    mm.settle_prefaults().await;
    if unmap {
        mm.evict_idle();
    }
    files.close_idle();
    (files, mm, id)
}

/// A file of your own, registered, pinned and written, then cut short by
/// another program while nothing of it is pinned nor open: a later pin
/// reaches only what the file still has. (The registry kept the size it
/// had seen, and a read-only pin of the first page mapped it past the end
/// of the file: SIGBUS on the first read.)
#[test]
fn a_registered_file_cut_short_between_pins_is_not_pinned_past_its_end() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("mine.dat");
    run(async {
        let (files, mm, id) = written_then_closed(tmp.path(), &f, true).await;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&f)
            .unwrap()
            .set_len(0)
            .unwrap();
        match mm.pin(id, 0, 4096, false).await {
            Err(Error::InvalidRange { .. }) => {}
            Err(e) => panic!("expected InvalidRange, got {e}"),
            Ok(p) => {
                let mut b = [0u8; 2];
                p.read_at(0, &mut b).unwrap();
                panic!("pinned past the end of the file, read {b:?}");
            }
        }
        assert_eq!(files.reserved_bytes(id).unwrap(), 0);
    });
}

/// Two allocators through one registry and manager, of two directories
/// that had the same path: the first one's folder was renamed while it was
/// open, and a new directory made in its place. Each keeps to its own
/// files. (The second took over the first one's entries, paths being the
/// same, and with them its mapped windows.)
#[test]
fn allocators_of_a_renamed_and_a_new_directory_keep_their_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("d");
    let moved = tmp.path().join("moved");
    let cfg = common::builder(&path, 64, 16).build().unwrap();
    let handles = run(async {
        let (_files, mm) = manager_of(&cfg);
        let (dd_a, a) = open_shard0(&cfg, &mm).await.unwrap();
        std::fs::rename(&path, &moved).unwrap();
        let (dd_b, b) = open_shard0(&cfg, &mm).await.unwrap();
        let handles = [
            write_synced(&a, 100, b"first").await,
            write_synced(&b, 100, b"secnd").await,
        ];
        assert_eq!((a.live_count(), b.live_count()), (1, 1));
        close_and_unmap(a, dd_a, &mm).await;
        close_and_unmap(b, dd_b, &mm).await;
        handles
    });
    for (dir, h, text) in [
        (&moved, handles[0], b"first"),
        (&path, handles[1], b"secnd"),
    ] {
        let cfg = common::builder(dir, 64, 16).build().unwrap();
        run(async {
            let (_dd, a) = open_shard0(&cfg, &manager_of(&cfg).1).await.unwrap();
            assert_eq!(a.live_count(), 1, "{}", dir.display());
            assert_eq!(read_back(&a, h, 5).await, text, "{}", dir.display());
        });
    }
}

/// A registered file replaced by a larger one (rename over it) while an
/// idle window still maps the old one: a descriptor opened again (a lease
/// of 0 bytes, as a sync takes) must not raise `reserved` to the new
/// file's size, which would let a pin read the old mapping past its end
/// (SIGBUS).
#[test]
fn a_replaced_file_reopened_is_not_pinned_past_the_old_mapping() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("mine.dat");
    run(async {
        let (files, mm, id) = written_then_closed(tmp.path(), &f, false).await;
        let old_len = len_on_disk(&f);
        let other = tmp.path().join("other.dat");
        std::fs::File::create(&other)
            .unwrap()
            .set_len(8 * MIB)
            .unwrap();
        std::fs::rename(&other, &f).unwrap();
        drop(files.acquire(id, 0).await.unwrap());
        let at = 4 * MIB;
        assert!(at > old_len);
        match mm.try_pin(id, at, 4096, false) {
            Ok(Some(p)) => {
                let mut b = [0u8; 4];
                p.read_at(0, &mut b).unwrap();
                panic!(
                    "pinned {at} of a file whose mapped inode has {old_len} bytes, read {:?}",
                    std::hint::black_box(b)
                );
            }
            other => drop(other),
        }
    });
}

/// A directory at `cfg` with one synced allocation, closed and unmapped:
/// its handle.
fn one_allocation_closed(cfg: &segalloc::Config) -> Handle {
    run(async {
        let (_files, mm) = manager_of(cfg);
        let (dd, a) = open_shard0(cfg, &mm).await.unwrap();
        let h = write_synced(&a, 100, b"x").await;
        close_and_unmap(a, dd, &mm).await;
        h
    })
}

/// Read-only allocators of one shard opened one after another through one
/// read-only registry and manager: the manager's idle windows keep each
/// closed one's lock, its files' owner, alive, and every open added an
/// entry per file (20 opens: 2 entries, then 4, ... 40). An owner of the
/// same folder reuses them.
#[test]
fn reopening_a_shard_through_one_manager_reuses_its_registry_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("d");
    let cfg = common::builder(&path, 64, 16).build().unwrap();
    one_allocation_closed(&cfg);
    run(async {
        let (files, mm) = read_only_manager(&cfg);
        let mut counts = Vec::new();
        for _ in 0..20 {
            let (dd, a) = open_shard0_read_only(&path, &mm).await;
            assert_eq!(a.live_count(), 1);
            drop((a, dd));
            counts.push(files.stats().files);
        }
        assert!(
            counts.last() == counts.first(),
            "registry entries after each read-only open: {counts:?}"
        );
    });
}

/// Two read-only allocators of one shard open at once through one manager,
/// the second closed first: the first still maps its files. (The second
/// took the entries over from the first, which then found their owner gone:
/// `OwnerClosed` for its own file.)
#[test]
fn a_reader_stays_open_when_a_second_reader_of_its_shard_closes() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("d");
    let cfg = common::builder(&path, 64, 16).build().unwrap();
    let h = one_allocation_closed(&cfg);
    run(async {
        let (_files, mm) = read_only_manager(&cfg);
        let (_dda, a) = open_shard0_read_only(&path, &mm).await;
        assert_eq!(read_back(&a, h, 1).await, b"x");
        let (ddb, b) = open_shard0_read_only(&path, &mm).await;
        close_and_unmap(b, ddb, &mm).await;
        let p = a.pin(h).await;
        assert!(p.is_ok(), "A is still open: {:?}", p.err());
    });
}

/// Poll `f` (a waker that does nothing) `polls` times, letting other tasks
/// run between polls; dropped if not ready by then.
async fn poll_then_drop<F: std::future::Future>(f: F, polls: usize) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let waker = futures::task::noop_waker();
    for _ in 0..polls {
        if let std::task::Poll::Ready(v) =
            f.as_mut().poll(&mut std::task::Context::from_waker(&waker))
        {
            return Some(v);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Wait until the kernel runs no operation of `files`'s ring (the ring
/// reaps the abandoned ones by itself).
async fn ring_settled(files: &FileHandleRegistry) {
    for _ in 0..5000 {
        if files.ring().stats().in_flight == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    panic!("operations still in flight after 5 s");
}

/// An allocator closed while a `trim` it cancelled still punched a run let
/// that punch run on: its shard, opened again at once through the same
/// manager (so the same ring), could put a segment in the run and have its
/// records punched to zeros after they were written. Now the close waits
/// for the punch. Each round fills 40 MiB and frees it, then cancels
/// trims at one poll more each time until one completes or one leaves its
/// punch in flight, with nothing else in flight; the allocator is then
/// closed, and the punch must be over. The shard is opened again and
/// filled, and every byte read back after a pause. With `SEGALLOC_IO=sync`
/// a trim completes within its first poll: no punch is ever left.
#[test]
fn closing_an_allocator_waits_for_the_punch_of_a_cancelled_trim() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = segalloc::Config::builder(tmp.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let (files, mm) = manager_of(&cfg);
    run(async {
        let mut closed_while_punching = 0;
        for round in 0..40u8 {
            let (dd, a) = open_shard0(&cfg, &mm).await.unwrap();
            let mut hs = Vec::new();
            for i in 0..40u8 {
                let x = a.allocate(MIB).await.unwrap();
                x.pin().fill(0, x.len(), round ^ i).unwrap();
                hs.push(x.into_handle());
            }
            // Every record reads back as written: no punch landed on them.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            for (i, h) in hs.iter().enumerate() {
                let got = read_back(&a, *h, MIB as usize).await;
                let want = round ^ i as u8;
                assert!(
                    got.iter().all(|&b| b == want),
                    "round {round}: allocation {i} lost its bytes"
                );
            }
            a.sync().await.unwrap();
            for h in hs.iter().skip(1).chain(hs.first()) {
                a.free(*h).unwrap();
            }
            a.sync().await.unwrap();
            a.sync().await.unwrap();
            let allocated = a.stats().allocated_bytes;
            let mut left_punching = false;
            for polls in 1.. {
                ring_settled(&files).await;
                if let Some(r) = poll_then_drop(a.trim(), polls).await {
                    r.unwrap();
                    break;
                }
                if a.stats().allocated_bytes > allocated {
                    // Only the kept punch can be in flight now.
                    left_punching = files.ring().stats().in_flight > 0;
                    break;
                }
            }
            drop((a, dd));
            if left_punching {
                closed_while_punching += 1;
                assert_eq!(
                    files.ring().stats().in_flight,
                    0,
                    "round {round}: the allocator closed while its punch ran"
                );
            }
            mm.settle_prefaults().await;
            mm.evict_idle();
            if closed_while_punching >= 3 {
                break;
            }
        }
        if files.ring().backend() == segalloc::IoBackend::Uring {
            assert!(
                closed_while_punching > 0,
                "no allocator was closed while a cancelled trim's punch ran"
            );
        }
    });
}
