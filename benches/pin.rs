//! Pin benchmarks of the core layer.
//!
//! * `try_pin/mapped`: `try_pin` + drop of a mapped window, the hot path
//!   (target ≤ 10 ns), beside a baseline of one `Rc` clone + drop measured
//!   in the same run (a pin is one `Rc` clone plus bookkeeping).
//! * `fault_in/*`: `pin` of an unmapped window followed by `evict_idle()`,
//!   on the io_uring backend and on the forced sync backend, in the same run:
//!   - `remap`: the file already holds the window (mmap + whole-window
//!     advice through the ring + munmap);
//!   - `fresh_file`: a new, empty file each time (open + growth by one 1 MiB
//!     step through the ring + mmap + advice + munmap).
//!
//! Run with `cargo bench --bench pin`. Windows are 16 MiB (the minimum).

use std::hint::black_box;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use segalloc::config::{IoBackendChoice, MIB};
use segalloc::{Config, FileHandleRegistry, MappingConfig, MappingManager, Ring};

const WINDOW: u64 = 16 * MIB;

fn runtime() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (rt, tokio::task::LocalSet::new())
}

fn manager(dir: &Path, backend: IoBackendChoice) -> (Rc<FileHandleRegistry>, MappingManager) {
    let cfg = Config::builder(dir)
        .window_bytes(WINDOW)
        .growth_step_bytes(MIB)
        .max_open_files(64)
        .max_windows(64)
        .shards(1)
        .io_backend(backend)
        .build()
        .expect("config");
    let ring = Ring::new(cfg.io_backend()).expect("ring");
    let files = Rc::new(FileHandleRegistry::new(ring, cfg.max_open_files()));
    let mm = MappingManager::new(files.clone(), MappingConfig::from_config(&cfg));
    (files, mm)
}

fn name(backend: IoBackendChoice) -> &'static str {
    match backend {
        IoBackendChoice::Uring => "io_uring",
        _ => "sync",
    }
}

fn hot_path(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rt, local) = runtime();
    let (files, mm) = manager(dir.path(), IoBackendChoice::Auto);
    // SAFETY: the file is this program's own, in its temporary directory;
    // nothing else maps or writes it.
    let f = unsafe { files.register(dir.path().join("hot")) };
    local.block_on(&rt, async {
        mm.pin(f, 0, 4096, true).await.expect("fault the window in");
    });

    let mut g = c.benchmark_group("try_pin");
    g.bench_function("mapped", |b| {
        b.iter(|| {
            let p = mm
                .try_pin(black_box(f), black_box(4096), black_box(64), false)
                .expect("valid range")
                .expect("mapped");
            black_box(p.as_ptr());
        })
    });
    let rc = Rc::new(0u64);
    g.bench_function("baseline_rc_clone_drop", |b| {
        b.iter(|| black_box(Rc::clone(black_box(&rc))))
    });
    g.finish();
    assert!(mm.stats().fast_pins > 0);
}

fn fault_in(c: &mut Criterion) {
    let mut g = c.benchmark_group("fault_in");
    // Bounded so that one timed batch of `fresh_file` (one 1 MiB file per
    // iteration, removed afterwards) stays in the low gigabytes.
    g.sample_size(20);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for backend in [IoBackendChoice::Uring, IoBackendChoice::Sync] {
        // The same window mapped, advised and unmapped again and again.
        g.bench_function(BenchmarkId::new("remap", name(backend)), |b| {
            let dir = tempfile::tempdir().expect("tempdir");
            let (rt, local) = runtime();
            let (files, mm) = manager(dir.path(), backend);
            assert_eq!(files.ring().backend().to_string(), name(backend));
            // SAFETY: the file is this program's own, in its temporary directory;
            // nothing else maps or writes it.
            let f = unsafe { files.register(dir.path().join("remap")) };
            local.block_on(&rt, async {
                drop(files.acquire(f, WINDOW).await.expect("grow"));
            });
            b.iter_custom(|iters| {
                local.block_on(&rt, async {
                    let t = Instant::now();
                    for _ in 0..iters {
                        let p = mm.pin(f, 0, 4096, true).await.expect("pin");
                        drop(black_box(p));
                        assert_eq!(mm.evict_idle(), 1);
                    }
                    t.elapsed()
                })
            });
        });
        // A new file each time: its first window is faulted in, growing the
        // file by one step. The files are made (empty) and removed outside
        // the timed loop.
        g.bench_function(BenchmarkId::new("fresh_file", name(backend)), |b| {
            let (rt, local) = runtime();
            b.iter_custom(|iters| {
                let dir = tempfile::tempdir().expect("tempdir");
                let (files, mm) = manager(dir.path(), backend);
                let ids: Vec<_> = (0..iters)
                    .map(|i| {
                        let path = dir.path().join(format!("f{i}"));
                        std::fs::File::create(&path).expect("create");
                        // SAFETY: the file is this program's own, in its temporary directory;
                        // nothing else maps or writes it.
                        unsafe { files.register(path) }
                    })
                    .collect();
                local.block_on(&rt, async {
                    let t = Instant::now();
                    for &f in &ids {
                        let p = mm.pin(f, 0, 4096, true).await.expect("pin");
                        drop(black_box(p));
                        assert_eq!(mm.evict_idle(), 1);
                    }
                    t.elapsed()
                })
            });
        });
    }
    g.finish();
}

criterion_group!(benches, hot_path, fault_in);
criterion_main!(benches);
