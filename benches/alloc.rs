//! Allocator benchmarks: every access pattern of `examples/compare.rs`, each
//! beside its baseline measured in the same run.
//!
//! * `lifo/{segalloc,malloc}/{64,256,1MiB,16MiB}`: allocate + free of one
//!   slot, beside a pool of live slots of the same size (every other one
//!   free), so a free does not empty its segment. Goal: ≤ 1.5× malloc.
//! * `fill/{segalloc,malloc}`: allocate + write 100 B, handles kept (freed
//!   after the sample, not timed).
//! * `free_all/{segalloc,malloc}`: free every allocation of a fill.
//! * `refill/{segalloc,malloc}`: allocate 100 B again after a fill was freed.
//!   Goal for fill + free all + refill: ≤ 2× malloc.
//! * `mix/{segalloc,malloc}`: 1M live allocations of 16 B – 4 KiB; each
//!   operation frees a random live one and allocates a new one. Goal: ≤ 0.5×
//!   malloc.
//! * `producer_consumer/{cross,local}`: shard 0 allocates and writes 100 B
//!   records and hands them over in batches of 1024; shard 1 frees them
//!   (forwarded back to shard 0), or shard 0 frees them itself. Time until
//!   every free is applied. Goal: cross ≥ 0.8× local.
//!
//! `cargo bench --bench alloc` (or `-- --quick`). One shard (two for
//! `producer_consumer`), default 1 GiB windows, the io backend from
//! `SEGALLOC_IO`. `malloc` is the system allocator (glibc).

use std::alloc::Layout;
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use segalloc::config::MIB;
use segalloc::{Allocation, Config, DataDir, Error, Handle, Runtime, Shard};
use tokio::sync::mpsc::unbounded_channel;

const RECORD_BYTES: u64 = 100;
const MIX_LIVE: u64 = 1_000_000;
const MIX_BYTES_MIN: u64 = 16;
const MIX_BYTES_MAX: u64 = 4096;

struct Bench {
    rt: tokio::runtime::Runtime,
    local: tokio::task::LocalSet,
    shard: Shard,
    _dir: tempfile::TempDir,
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
            _dir: dir,
        }
    }

    /// The hot path, falling back to the async path when it must.
    #[inline]
    fn alloc(&self, size: u64) -> Allocation {
        match self.shard.try_allocate(size).expect("try_allocate") {
            Some(a) => a,
            None => self
                .local
                .block_on(&self.rt, self.shard.allocate(size))
                .expect("allocate"),
        }
    }

    fn free_all(&self, hs: Vec<Handle>) {
        for h in hs {
            self.shard.free(h).expect("free");
        }
    }

    /// Allocate `live` slots of `size` (touching each), then free every
    /// other one: segments exist, windows are mapped, and the class has
    /// free slots spread over its segments.
    fn warm(&self, size: u64, live: usize) -> Vec<Handle> {
        let hs: Vec<_> = (0..live)
            .map(|i| {
                let a = self.alloc(size);
                a.write_at(0, &(i as u64).to_le_bytes()).expect("write");
                a.into_handle()
            })
            .collect();
        let (kept, freed): (Vec<_>, Vec<_>) = hs.iter().enumerate().partition(|(i, _)| i % 2 == 1);
        self.free_all(freed.into_iter().map(|(_, h)| *h).collect());
        kept.into_iter().map(|(_, h)| *h).collect()
    }

    /// Allocate and write `n` records.
    fn fill(&self, n: u64, payload: &[u8]) -> Vec<Handle> {
        (0..n)
            .map(|_| {
                let a = self.alloc(payload.len() as u64);
                a.write_at(0, payload).expect("write");
                a.into_handle()
            })
            .collect()
    }
}

fn layout(size: u64) -> Layout {
    Layout::from_size_align(size as usize, 16).expect("layout")
}

fn malloc(size: u64) -> *mut u8 {
    // SAFETY: every layout used here has a non-zero size.
    let p = unsafe { std::alloc::alloc(layout(size)) };
    assert!(!p.is_null(), "out of memory");
    p
}

/// # Safety
///
/// `p` came from [`malloc`] with this `size` and is not used again.
unsafe fn free(p: *mut u8, size: u64) {
    // SAFETY: the caller's contract.
    unsafe { std::alloc::dealloc(p, layout(size)) };
}

/// `n` records of `payload` from malloc, written.
fn malloc_fill(n: u64, payload: &[u8]) -> Vec<*mut u8> {
    (0..n)
        .map(|_| {
            let p = malloc(payload.len() as u64);
            // SAFETY: `p` points to `payload.len()` writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), p, payload.len()) };
            p
        })
        .collect()
}

fn malloc_free_all(ps: Vec<*mut u8>, size: u64) {
    for p in ps {
        // SAFETY: each pointer came from `malloc(size)` and is freed once.
        unsafe { free(p, size) };
    }
}

fn lifo(c: &mut Criterion) {
    let b = Bench::new();
    let mut g = c.benchmark_group("lifo");
    g.measurement_time(Duration::from_secs(2));
    for (name, size, live) in [
        ("64", 64u64, 100_000usize),
        ("256", 256, 100_000),
        ("1MiB", MIB, 8),
        ("16MiB", 16 * MIB, 8),
    ] {
        let _pool = b.warm(size, live);
        let sys_pool: Vec<*mut u8> = (0..live / 2).map(|_| malloc(size)).collect();
        g.bench_with_input(BenchmarkId::new("segalloc", name), &size, |bch, &size| {
            bch.iter(|| {
                let h = b.alloc(black_box(size)).into_handle();
                b.shard.free(black_box(h)).expect("free");
            })
        });
        g.bench_with_input(BenchmarkId::new("malloc", name), &size, |bch, &size| {
            bch.iter(|| {
                let p = malloc(black_box(size));
                // SAFETY: allocated just above with `size`.
                unsafe { free(black_box(p), size) };
            })
        });
        malloc_free_all(sys_pool, size);
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
/// around it, untimed).
fn fill_free_refill(c: &mut Criterion) {
    let b = Bench::new();
    let payload = [0x5Au8; RECORD_BYTES as usize];
    let p = &payload;
    for phase in ["fill", "free_all", "refill"] {
        let mut g = c.benchmark_group(phase);
        g.measurement_time(Duration::from_secs(2));
        g.bench_function("segalloc", |bch| {
            bch.iter_custom(|n| {
                if phase == "refill" {
                    b.free_all(b.fill(n, p));
                }
                let t = Instant::now();
                let hs = b.fill(n, p);
                let mut took = t.elapsed();
                if phase == "free_all" {
                    let t = Instant::now();
                    b.free_all(hs);
                    took = t.elapsed();
                } else {
                    b.free_all(hs);
                }
                took
            })
        });
        g.bench_function("malloc", |bch| {
            bch.iter_custom(|n| {
                if phase == "refill" {
                    malloc_free_all(malloc_fill(n, p), RECORD_BYTES);
                }
                let t = Instant::now();
                let ps = malloc_fill(n, p);
                let mut took = t.elapsed();
                if phase == "free_all" {
                    let t = Instant::now();
                    malloc_free_all(ps, RECORD_BYTES);
                    took = t.elapsed();
                } else {
                    malloc_free_all(ps, RECORD_BYTES);
                }
                took
            })
        });
        g.finish();
    }
}

/// xorshift64: the same sizes and victims for segalloc and malloc.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn mix_size(rng: &mut u64) -> u64 {
    MIX_BYTES_MIN + next(rng) % (MIX_BYTES_MAX - MIX_BYTES_MIN + 1)
}

/// Random mix over 1M live allocations of 16 B – 4 KiB.
fn mix(c: &mut Criterion) {
    let mut g = c.benchmark_group("mix");
    g.measurement_time(Duration::from_secs(3));
    {
        let b = Bench::new();
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut hs: Vec<Handle> = (0..MIX_LIVE)
            .map(|_| b.alloc(mix_size(&mut rng)).into_handle())
            .collect();
        g.bench_function("segalloc", |bch| {
            bch.iter(|| {
                let i = (next(&mut rng) % MIX_LIVE) as usize;
                b.shard.free(hs[i]).expect("free");
                hs[i] = b.alloc(mix_size(&mut rng)).into_handle();
            })
        });
        b.free_all(hs);
    }
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut ps: Vec<(*mut u8, u64)> = (0..MIX_LIVE)
        .map(|_| {
            let n = mix_size(&mut rng);
            (malloc(n), n)
        })
        .collect();
    g.bench_function("malloc", |bch| {
        bch.iter(|| {
            let i = (next(&mut rng) % MIX_LIVE) as usize;
            // SAFETY: `ps[i]` came from `malloc` with its size; replaced below.
            unsafe { free(ps[i].0, ps[i].1) };
            let n = mix_size(&mut rng);
            ps[i] = (malloc(n), n);
        })
    });
    for (p, n) in ps {
        // SAFETY: each came from `malloc(n)` and is freed once.
        unsafe { free(p, n) };
    }
    g.finish();
}

/// `n` records from shard 0 to shard 1 (which frees them, `cross`) or freed
/// by shard 0 itself; time until every free is applied.
fn producer_consumer_once(rt: &Runtime, n: u64, cross: bool) -> Duration {
    let (tx, mut rx) = unbounded_channel::<Vec<Handle>>();
    let t = Instant::now();
    let producer = rt.spawn_on(0, move |s| async move {
        let payload = [0x5Au8; RECORD_BYTES as usize];
        let mut batch = Vec::with_capacity(1024);
        for k in 0..n {
            let a = match s.try_allocate(RECORD_BYTES)? {
                Some(a) => a,
                None => s.allocate(RECORD_BYTES).await?,
            };
            a.write_at(0, &payload)?;
            batch.push(a.into_handle());
            if batch.len() == 1024 || k + 1 == n {
                let b = std::mem::replace(&mut batch, Vec::with_capacity(1024));
                if cross {
                    let _ = tx.send(b);
                } else {
                    b.into_iter().try_for_each(|h| s.free(h))?;
                }
                tokio::task::yield_now().await;
            }
        }
        Ok::<_, Error>(())
    });
    let consumer = rt.spawn_on(1, move |s| async move {
        while let Some(b) = rx.recv().await {
            for h in b {
                s.free_async(h).await?;
            }
        }
        s.flush_frees().await?;
        Ok::<_, Error>(())
    });
    futures::executor::block_on(producer)
        .expect("shard 0")
        .expect("producer");
    futures::executor::block_on(consumer)
        .expect("shard 1")
        .expect("consumer");
    futures::executor::block_on(rt.spawn_on(0, |s| async move {
        while s.live_count() > 0 {
            s.drain_frees();
            tokio::task::yield_now().await;
        }
    }))
    .expect("shard 0");
    t.elapsed()
}

fn producer_consumer(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = Config::builder(dir.path().join("d"))
        .shards(2)
        .build()
        .expect("config");
    let rt = Runtime::start(cfg).expect("runtime");
    producer_consumer_once(&rt, 100_000, false);
    let mut g = c.benchmark_group("producer_consumer");
    g.measurement_time(Duration::from_secs(3));
    for (name, cross) in [("cross", true), ("local", false)] {
        g.bench_function(name, |bch| {
            bch.iter_custom(|n| producer_consumer_once(&rt, n, cross))
        });
    }
    g.finish();
    rt.shutdown().expect("shutdown");
}

criterion_group!(benches, lifo, fill_free_refill, mix, producer_consumer);
criterion_main!(benches);
