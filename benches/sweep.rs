//! criterion shard sweep: the workload of `examples/sweep.rs` (allocate,
//! write, pin, free; one free in four sent to the next shard's task, with
//! one shard its own) at 1 … cores and
//! 2 × cores shards. Throughput is in operations over all shards.
//!
//! `cargo bench --bench sweep`

#[path = "sweep_workload.rs"]
mod workload;

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const OPS: u64 = 100_000;

fn sweep(c: &mut Criterion) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut counts: Vec<usize> = (1..=cores).collect();
    counts.push(2 * cores);
    let mut g = c.benchmark_group("sweep");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for n in counts {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = workload::start(dir.path(), n).expect("runtime");
        g.throughput(Throughput::Elements(OPS * n as u64));
        g.bench_function(format!("shards={n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    total += workload::run(&rt, OPS, 64).expect("run").elapsed;
                }
                total
            })
        });
        rt.shutdown().expect("shutdown");
    }
    g.finish();
}

criterion_group!(benches, sweep);
criterion_main!(benches);
