//! Shard-count sweep: the same workload (allocate, write, pin, free; one
//! free in four cross-shard) at 1, 2, …, cores and 2 × cores shards.
//!
//! ```text
//! cargo run --release --example sweep                     # table
//! cargo run --release --example sweep -- --ops 2000000 --json
//! ```
//!
//! Prints ops/s in total and per shard, scaling efficiency
//! (throughput(n) / (n × throughput(1))), cross-shard frees/s and p50/p99
//! latency of one operation (allocate + write + pin + read + free). Each
//! point is the median of `--repeat` runs (default 3), each on a fresh
//! data directory.

#[path = "../benches/sweep_workload.rs"]
mod workload;

use clap::Parser;
use segalloc::config::MIB;
use segalloc::{Config, Runtime};

#[derive(Parser, Debug)]
#[command(about = "segalloc shard-count sweep")]
struct Args {
    /// Operations per shard per run.
    #[arg(long, default_value_t = 1_000_000)]
    ops: u64,
    /// Allocation size in bytes.
    #[arg(long, default_value_t = 64)]
    size: u64,
    /// Runs per point (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Shard counts (default: 1, 2, …, cores, 2 × cores).
    #[arg(long, value_delimiter = ',')]
    shards: Option<Vec<usize>>,
    /// Print the table as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let counts = args.shards.clone().unwrap_or_else(|| {
        let mut v: Vec<usize> = (1..=cores).collect();
        v.push(2 * cores);
        v
    });
    let mut points = Vec::new();
    let mut backend = String::new();
    for &n in &counts {
        let mut runs = Vec::new();
        for _ in 0..args.repeat.max(1) {
            let dir = tempfile::tempdir()?;
            let cfg = Config::builder(dir.path().join("d"))
                .shards(n)
                .window_bytes(256 * MIB)
                .build()?;
            let rt = Runtime::start(cfg)?;
            if backend.is_empty() {
                backend = futures::executor::block_on(rt.stats())?.shards[0]
                    .io_backend
                    .to_string();
            }
            // Warm up: map the first windows and create the segments.
            workload::run(&rt, 10_000, args.size)?;
            runs.push(workload::run(&rt, args.ops, args.size)?);
            rt.shutdown()?;
        }
        runs.sort_by(|a, b| a.ops_per_sec().total_cmp(&b.ops_per_sec()));
        points.push(runs[runs.len() / 2].clone());
    }
    let base = points
        .iter()
        .find(|p| p.shards == 1)
        .map(|p| p.ops_per_sec())
        .unwrap_or(points[0].ops_per_sec() / points[0].shards as f64);
    if !args.json {
        println!(
            "shard sweep: {} ops/shard of {} B, median of {}, io backend {backend}, {cores} cores",
            args.ops, args.size, args.repeat
        );
        println!(
            "{:>6} {:>14} {:>14} {:>10} {:>16} {:>9} {:>9}",
            "shards", "ops/s", "ops/s/shard", "efficiency", "cross frees/s", "p50 ns", "p99 ns"
        );
        for p in &points {
            println!(
                "{:>6} {:>14.0} {:>14.0} {:>10.2} {:>16.0} {:>9} {:>9}",
                p.shards,
                p.ops_per_sec(),
                p.ops_per_sec() / p.shards as f64,
                p.ops_per_sec() / (p.shards as f64 * base),
                p.cross_frees as f64 / p.elapsed.as_secs_f64(),
                p.p50_ns,
                p.p99_ns
            );
        }
    }
    let rows: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{{\"shards\":{},\"ops_per_sec\":{:.0},\"ops_per_sec_per_shard\":{:.0},\"efficiency\":{:.4},\"cross_frees_per_sec\":{:.0},\"p50_ns\":{},\"p99_ns\":{}}}",
                p.shards,
                p.ops_per_sec(),
                p.ops_per_sec() / p.shards as f64,
                p.ops_per_sec() / (p.shards as f64 * base),
                p.cross_frees as f64 / p.elapsed.as_secs_f64(),
                p.p50_ns,
                p.p99_ns
            )
        })
        .collect();
    if args.json {
        println!(
            "{{\"ops_per_shard\":{},\"size\":{},\"repeat\":{},\"cores\":{cores},\"io_backend\":\"{backend}\",\"points\":[{}]}}",
            args.ops,
            args.size,
            args.repeat,
            rows.join(",")
        );
    }
    Ok(())
}
