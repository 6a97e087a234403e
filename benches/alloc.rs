//! Allocator benchmarks: allocate + free on one shard, beside the system
//! allocator measured in the same run.
//!
//! * `small/segalloc/{64,256}`: `Shard::try_allocate` + `Shard::free` of a
//!   64 B / 256 B slot on the hot path (segments exist, their window is
//!   mapped; `allocate` is the fallback when `try_allocate` says `None`).
//!   A pool of live allocations of the same size is kept, as in a real
//!   heap, so a free does not empty its segment. Target: ≤ 2× the baseline.
//! * `small/malloc/{64,256}`: `std::alloc::alloc` + `dealloc` of the same
//!   sizes (align 16), the baseline.
//! * `large/segalloc/{1MiB,16MiB}` and `large/malloc/…`: the same for slots
//!   of 1 MiB and 16 MiB.
//!
//! Run with `cargo bench --bench alloc`. One shard, default 1 GiB windows,
//! the io backend from `SEGALLOC_IO`.

use std::alloc::Layout;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use segalloc::config::MIB;
use segalloc::{Allocation, Config, DataDir, Shard};

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

    /// Allocate `live` slots of `size` (touching each), then free every
    /// other one: segments exist, windows are mapped, and the class has
    /// free slots spread over its segments.
    fn warm(&self, size: u64, live: usize) -> Vec<segalloc::Handle> {
        let mut hs: Vec<_> = (0..live)
            .map(|i| {
                let a = self.alloc(size);
                a.write_at(0, &(i as u64).to_le_bytes()).expect("write");
                a.into_handle()
            })
            .collect();
        let mut kept = Vec::with_capacity(live / 2);
        for (i, h) in hs.drain(..).enumerate() {
            if i % 2 == 0 {
                self.shard.free(h).expect("free");
            } else {
                kept.push(h);
            }
        }
        kept
    }
}

fn segalloc_pair(b: &Bench, size: u64) {
    let a = b.alloc(black_box(size));
    let h = a.into_handle();
    b.shard.free(black_box(h)).expect("free");
}

/// # Safety
///
/// `layout` has a non-zero size.
unsafe fn malloc_pair(layout: Layout) {
    // SAFETY: the layout is non-zero (caller); the pointer is freed with the
    // layout it was allocated with.
    unsafe {
        let p = std::alloc::alloc(black_box(layout));
        assert!(!p.is_null());
        std::alloc::dealloc(black_box(p), layout);
    }
}

fn small(c: &mut Criterion) {
    let b = Bench::new();
    let mut g = c.benchmark_group("small");
    g.measurement_time(Duration::from_secs(3));
    for size in [64u64, 256] {
        let _pool = b.warm(size, 100_000);
        let layout = Layout::from_size_align(size as usize, 16).expect("layout");
        // Warm the system allocator the same way.
        let sys_pool: Vec<*mut u8> = (0..50_000)
            // SAFETY: non-zero layout.
            .map(|_| unsafe { std::alloc::alloc(layout) })
            .collect();
        g.bench_with_input(BenchmarkId::new("segalloc", size), &size, |bch, &size| {
            bch.iter(|| segalloc_pair(&b, size))
        });
        g.bench_with_input(BenchmarkId::new("malloc", size), &layout, |bch, &layout| {
            // SAFETY: non-zero layout.
            bch.iter(|| unsafe { malloc_pair(layout) })
        });
        for p in sys_pool {
            // SAFETY: allocated above with `layout`.
            unsafe { std::alloc::dealloc(p, layout) };
        }
    }
    g.finish();
    let st = b.shard.stats();
    eprintln!(
        "small: io backend {:?}, {} segments, {} allocs, {} frees, {} windows mapped",
        st.io_backend,
        st.alloc.segments,
        st.alloc.allocs,
        st.alloc.frees,
        st.mappings.mapped_windows
    );
}

fn large(c: &mut Criterion) {
    let b = Bench::new();
    let mut g = c.benchmark_group("large");
    g.measurement_time(Duration::from_secs(3));
    for (name, size) in [("1MiB", MIB), ("16MiB", 16 * MIB)] {
        let _pool = b.warm(size, 8);
        let layout = Layout::from_size_align(size as usize, 16).expect("layout");
        g.bench_with_input(BenchmarkId::new("segalloc", name), &size, |bch, &size| {
            bch.iter(|| segalloc_pair(&b, size))
        });
        g.bench_with_input(BenchmarkId::new("malloc", name), &layout, |bch, &layout| {
            // SAFETY: non-zero layout.
            bch.iter(|| unsafe { malloc_pair(layout) })
        });
    }
    g.finish();
}

criterion_group!(benches, small, large);
criterion_main!(benches);
