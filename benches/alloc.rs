//! Allocator benchmarks: every access pattern of `examples/compare.rs`, each
//! beside its baseline measured in the same run.
//!
//! * `lifo/{segalloc,malloc}/{64,256,1MiB,16MiB}`: allocate + free of one
//!   slot, beside a pool of live slots of the same size (every other one
//!   free), so a free does not empty its segment. Goal: ≤ 1.5× malloc.
//! * `fill/{segalloc,malloc}`: allocate + write 100 B, handles kept (freed
//!   after the sample, not timed). Those slots were taken since the latest
//!   sync, so the next sample reuses them, in pages already faulted in:
//!   unlike `fill/raw_ceiling`, which writes a new file each sample, this
//!   is not a first-touch fill (`examples/compare.rs` measures that one).
//! * `free_all/{segalloc,malloc}`: free every allocation of a fill.
//! * `refill/{segalloc,malloc}`: allocate 100 B again after a fill was freed.
//!   Goal for fill + free all + refill: ≤ 2× malloc.
//! * `mix/{segalloc,malloc}`: 1M live allocations of 16 B – 4 KiB; each
//!   operation frees a random live one and allocates a new one. Goal: ≤ 0.5×
//!   malloc.
//! * `producer_consumer/{cross,local}`: shard 0 allocates and writes 100 B
//!   records and hands them over to shard 1 in batches of 1024; shard 1
//!   frees them (forwarded back to shard 0 by segalloc), or sends each
//!   batch back over a second channel for shard 0 to free. Time until
//!   every free is applied. Goal: cross ≥ 0.8× local.
//!
//! * `fill/raw_ceiling`: the same fill into a file reserved with
//!   `fallocate`, mapped shared, bump pointer at segalloc's slot stride
//!   (dirty pages written back after each sample). Goal: segalloc ≥ 0.8×.
//! * `fill_shards/shards=N`: the fill on every shard at once, for
//!   N = 1 and every core. Goal: ≥ 0.9 efficiency.
//! * `pin/segalloc`: pin + unpin of a mapped slot. Goal: ≤ 10 ns.
//! * `sweep/shards=N`: the shard sweep with 1 free in 4 sent to the next
//!   shard's task (its own with one shard)
//!   (`benches/sweep_workload.rs`). Goal: ≥ 0.9 efficiency.
//!
//! `cargo bench --bench alloc` (or `-- --quick`). One shard (two for
//! `producer_consumer`), default 1 GiB windows, the io backend from
//! `SEGALLOC_IO`. `malloc` is the system allocator (glibc). The loops are
//! shared with `examples/compare.rs` (`benches/alloc_workload.rs`).

#[path = "alloc_workload.rs"]
mod work;
#[path = "sweep_workload.rs"]
mod workload;

use std::future::Future;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use segalloc::config::MIB;
use segalloc::{Config, DataDir, Runtime, Shard};
use work::{MIX_SEED, PAIR_BYTES, RECORD_BYTES};

const MIX_LIVE: u64 = 1_000_000;

/// One shard on this thread, driven by `block_on`.
struct Bench {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    shard: Shard,
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let local = tokio::task::LocalSet::new();
        let cfg = Config::builder(dir.path().join("d"))
            .shards(1)
            .build()
            .expect("config");
        let shard = local.block_on(&rt, async {
            let dd = std::sync::Arc::new(DataDir::open(&cfg).expect("open"));
            Shard::open(dd, &cfg, 0).await.expect("shard")
        });
        Bench {
            rt,
            local,
            shard,
            dir,
        }
    }

    fn run<T>(&self, f: impl Future<Output = Result<T, segalloc::Error>>) -> T {
        self.local.block_on(&self.rt, f).expect("workload")
    }
}

fn lifo(c: &mut Criterion) {
    let b = Bench::new();
    let s = &b.shard;
    let mut g = c.benchmark_group("lifo");
    g.measurement_time(Duration::from_secs(2));
    for (name, size, live) in [
        ("64", PAIR_BYTES, 100_000usize),
        ("256", 256, 100_000),
        ("1MiB", MIB, 8),
        ("16MiB", 16 * MIB, 8),
    ] {
        let _pool = b.run(work::warm(s, size, live));
        let sys_pool: Vec<*mut u8> = (0..live / 2).map(|_| work::malloc(size)).collect();
        g.bench_with_input(BenchmarkId::new("segalloc", name), &size, |bch, &size| {
            bch.iter_custom(|n| b.run(work::pairs(s, size, n)))
        });
        g.bench_with_input(BenchmarkId::new("malloc", name), &size, |bch, &size| {
            bch.iter_custom(|n| work::malloc_pairs(size, n))
        });
        work::malloc_free_all(sys_pool, size);
    }
    g.finish();
    let st = b.shard.stats();
    eprintln!(
        "lifo: io backend {:?}, {} segments, {} allocs, {} frees, {} windows mapped",
        st.io_backend,
        st.alloc.segments,
        st.alloc.allocs,
        st.alloc.frees,
        st.mappings.mapped_windows
    );
}

/// Fill, free all and refill, each timed alone (the other phases run
/// around it, untimed); the fill also beside the raw-mmap ceiling.
fn fill_free_refill(c: &mut Criterion) {
    let b = Bench::new();
    let s = &b.shard;
    let payload = [0x5Au8; RECORD_BYTES as usize];
    let p = &payload;
    let stride = b.run(s.allocate(RECORD_BYTES)).len() as u64;
    for phase in ["fill", "free_all", "refill"] {
        let mut g = c.benchmark_group(phase);
        g.measurement_time(Duration::from_secs(2));
        g.bench_function("segalloc", |bch| {
            bch.iter_custom(|n| {
                if phase == "refill" {
                    work::free_all(s, b.run(work::fill(s, n, p))).expect("free");
                }
                let t = Instant::now();
                let hs = b.run(work::fill(s, n, p));
                let mut took = t.elapsed();
                let t = Instant::now();
                work::free_all(s, hs).expect("free");
                if phase == "free_all" {
                    took = t.elapsed();
                }
                took
            })
        });
        g.bench_function("malloc", |bch| {
            bch.iter_custom(|n| {
                if phase == "refill" {
                    work::malloc_free_all(work::malloc_fill(n, p), RECORD_BYTES);
                }
                let t = Instant::now();
                let ps = work::malloc_fill(n, p);
                let mut took = t.elapsed();
                let t = Instant::now();
                work::malloc_free_all(ps, RECORD_BYTES);
                if phase == "free_all" {
                    took = t.elapsed();
                }
                took
            })
        });
        if phase == "fill" {
            let path = b.dir.path().join("raw");
            g.bench_function("raw_ceiling", |bch| {
                bch.iter_custom(|n| {
                    work::raw_fill(&path, stride, n, RECORD_BYTES, false, work::Kept::Nothing)
                        .expect("raw fill")
                })
            });
        }
        g.finish();
    }
}

/// The fill on every shard of a runtime at once.
fn fill_shards(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("fill_shards");
    g.measurement_time(Duration::from_secs(3));
    for shards in [1, cores] {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Config::builder(dir.path().join("d"))
            .shards(shards)
            .build()
            .expect("config");
        let rt = Runtime::start(cfg).expect("runtime");
        g.throughput(Throughput::Elements(shards as u64));
        g.bench_function(format!("shards={shards}"), |bch| {
            bch.iter_custom(|n| {
                let t = Instant::now();
                let jobs: Vec<_> = (0..shards)
                    .map(|i| {
                        rt.spawn_on(i, move |s| async move {
                            let hs = work::fill(&s, n, &[0x5A; RECORD_BYTES as usize]).await?;
                            let took = Instant::now();
                            work::free_all(&s, hs)?;
                            Ok::<_, segalloc::Error>(took)
                        })
                    })
                    .collect();
                let mut done = t;
                for j in jobs {
                    done = done.max(
                        futures::executor::block_on(j)
                            .expect("shard")
                            .expect("fill"),
                    );
                }
                done - t
            })
        });
        rt.shutdown().expect("shutdown");
    }
    g.finish();
}

/// Random mix over 1M live allocations of 16 B – 4 KiB.
fn mix(c: &mut Criterion) {
    let mut g = c.benchmark_group("mix");
    g.measurement_time(Duration::from_secs(3));
    {
        let b = Bench::new();
        let s = &b.shard;
        let mut rng = MIX_SEED;
        let mut hs = b.run(work::mix_fill(s, MIX_LIVE, &mut rng));
        g.bench_function("segalloc", |bch| {
            bch.iter_custom(|n| b.run(work::mix(s, &mut hs, &mut rng, n)))
        });
        work::free_all(s, hs).expect("free");
    }
    let mut rng = MIX_SEED;
    let mut ps = work::malloc_mix_fill(MIX_LIVE, &mut rng);
    g.bench_function("malloc", |bch| {
        bch.iter_custom(|n| work::malloc_mix(&mut ps, &mut rng, n))
    });
    work::malloc_mix_free(ps);
    g.finish();
}

/// Pin + unpin of a mapped slot.
fn pin(c: &mut Criterion) {
    let b = Bench::new();
    let s = &b.shard;
    let h = b.run(s.allocate(PAIR_BYTES)).into_handle();
    let mut g = c.benchmark_group("pin");
    g.bench_function("segalloc", |bch| {
        bch.iter_custom(|n| work::pins(s, h, n).expect("pin"))
    });
    g.finish();
}

fn producer_consumer(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::builder(dir.path().join("d"))
        .shards(2)
        .build()
        .expect("config");
    let rt = Runtime::start(cfg).expect("runtime");
    work::producer_consumer(&rt, 100_000, RECORD_BYTES, false).expect("warm-up");
    let mut g = c.benchmark_group("producer_consumer");
    g.measurement_time(Duration::from_secs(3));
    for (name, cross) in [("cross", true), ("local", false)] {
        g.bench_function(name, |bch| {
            bch.iter_custom(|n| {
                work::producer_consumer(&rt, n, RECORD_BYTES, cross).expect("producer/consumer")
            })
        });
    }
    g.finish();
    rt.shutdown().expect("shutdown");
}

/// The shard sweep (1 free in 4 sent to the next shard's task), 1 shard
/// and every core.
fn sweep(c: &mut Criterion) {
    const OPS: u64 = 100_000;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut g = c.benchmark_group("sweep");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for shards in [1, cores] {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = workload::start(dir.path(), shards).expect("runtime");
        g.throughput(Throughput::Elements(OPS * shards as u64));
        g.bench_function(format!("shards={shards}"), |bch| {
            bch.iter_custom(|iters| {
                (0..iters)
                    .map(|_| workload::run_with(&rt, OPS, 64, 4).expect("run").elapsed)
                    .sum()
            })
        });
        rt.shutdown().expect("shutdown");
    }
    g.finish();
}

criterion_group!(
    benches,
    lifo,
    fill_free_refill,
    fill_shards,
    mix,
    pin,
    producer_consumer,
    sweep
);
criterion_main!(benches);
