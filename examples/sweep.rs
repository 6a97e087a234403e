//! Shard-count sweep: the same workload (allocate, write, pin, free; one
//! free in four sent to the next shard's task, which frees it: with one
//! shard that task is its own) at 1, 2, …, cores and 2 × cores shards.
//!
//! ```text
//! cargo run --release --example sweep                     # table
//! cargo run --release --example sweep -- --ops 2000000 --json
//! cargo run --release --example sweep -- --cross-every 0  # no cross-shard free
//! cargo run --release --example sweep -- --hold-local 2048  # frees as late, kept local
//! cargo run --release --example sweep -- --by-hand        # the same trips, without segalloc's forwarding
//! ```
//!
//! Prints ops/s in total and per shard, scaling efficiency
//! (throughput(n) / (n × throughput(1))), cross-shard frees/s (none with
//! one shard), the frees made but not applied yet per shard (mean of
//! samples every 1024 operations: forwarded ones on their way, with one
//! shard those in its channel to its own task, or held ones), p50/p99
//! latency of one operation (allocate + write + pin + read + free), and the
//! batches the cross-shard frees went back to their owners in (segalloc's,
//! or the workload's with `--by-hand`; JSON `batches_back`). Each
//! point is the median of `--repeat` runs (default 3), each on a fresh
//! data directory.

#[path = "common/json.rs"]
mod json;
#[path = "../benches/sweep_workload.rs"]
mod workload;

use clap::Parser;
use segalloc::config::MIB;
use segalloc::{Config, Runtime};
use serde::Serialize;

#[path = "common/cli.rs"]
mod cli;

#[derive(Parser, Debug)]
#[command(about = "segalloc shard-count sweep")]
struct Args {
    /// Operations per shard per run.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    ops: u64,
    /// Allocation size in bytes.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=segalloc::config::MAX_SEGMENT_BYTES))]
    size: u64,
    /// One free in this many goes to the next shard's task, which frees it
    /// (with one shard, its own task; 0: none).
    #[arg(long, default_value_t = 4)]
    cross_every: u64,
    /// Instead of sending one free in `--cross-every` to the next shard,
    /// hold it on its own shard for this many operations, then free it
    /// there: what a delay like a forwarded free's costs without its trip
    /// between cores (0: forward them). Compare the pending frees.
    #[arg(long, default_value_t = 0)]
    hold_local: usize,
    /// Carry the frees sent to the next shard back to their owner by hand,
    /// batched as segalloc batches them: the next shard's task copies each
    /// handle into a buffer sent over a second channel at 1,024 handles or
    /// 16 yields after its first, and a task on the owner frees each batch.
    /// The same handles cross the same cores without segalloc's forwarding
    /// code.
    #[arg(long, conflicts_with = "hold_local")]
    by_hand: bool,
    /// Runs per point (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = cli::at_least_one)]
    repeat: usize,
    /// Shard counts, each at least 1 (default: 1, 2, …, cores, 2 × cores).
    #[arg(long, value_delimiter = ',', value_parser = cli::at_least_one)]
    shards: Option<Vec<usize>>,
    /// Print the table as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Also write an SVG chart (ops/s against shards, with linear scaling).
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

/// One point of the sweep, with its derived figures (the JSON field names
/// are an interface: scripts read them).
#[derive(Serialize)]
struct Row {
    shards: usize,
    #[serde(rename = "ops_per_sec", serialize_with = "json::fixed::<0, _>")]
    ops: f64,
    #[serde(
        rename = "ops_per_sec_per_shard",
        serialize_with = "json::fixed::<0, _>"
    )]
    ops_per_shard: f64,
    #[serde(serialize_with = "json::fixed::<4, _>")]
    efficiency: f64,
    #[serde(rename = "cross_frees_per_sec", serialize_with = "json::fixed::<0, _>")]
    cross_per_sec: f64,
    /// Frees made but not applied yet, per shard (mean of samples).
    #[serde(serialize_with = "json::fixed::<0, _>")]
    pending_frees: f64,
    p50_ns: u64,
    p99_ns: u64,
    /// Batches the cross-shard frees went back to their owners in:
    /// segalloc's, or the workload's with `--by-hand`.
    batches_back: u64,
}

/// The sweep as one JSON object.
#[derive(Serialize)]
struct Report<'a> {
    ops_per_shard: u64,
    size: u64,
    /// One free in this many sent to the next shard's task (0: none).
    cross_every: u64,
    /// Those frees held locally for this many operations instead (0: no).
    hold_local: usize,
    /// Those frees carried back to their owner by the workload itself.
    by_hand: bool,
    repeat: usize,
    cores: usize,
    io_backend: &'a str,
    points: &'a [Row],
}

/// A small SVG line chart: measured ops/s and the linear ideal.
fn svg_chart(points: &[workload::RunResult], base: f64, title: &str) -> String {
    let (w, h, pad) = (640.0, 400.0, 60.0);
    let max_x = points.iter().map(|p| p.shards).max().unwrap_or(1) as f64;
    let max_y = points
        .iter()
        .map(|p| p.ops_per_sec().max(base * p.shards as f64))
        .fold(1.0, f64::max)
        * 1.1;
    let x = |s: f64| pad + (s - 1.0) / (max_x - 1.0).max(1.0) * (w - 2.0 * pad);
    let y = |v: f64| h - pad - v / max_y * (h - 2.0 * pad);
    let line = |vals: Vec<(f64, f64)>| {
        vals.iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let measured = line(
        points
            .iter()
            .map(|p| (p.shards as f64, p.ops_per_sec()))
            .collect(),
    );
    let ideal = line(
        points
            .iter()
            .map(|p| (p.shards as f64, base * p.shards as f64))
            .collect(),
    );
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{}\" stroke=\"black\"/>\n\
         <polyline points=\"{ideal}\" fill=\"none\" stroke=\"#999\" stroke-dasharray=\"6 4\"/>\n\
         <polyline points=\"{measured}\" fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\"/>\n",
        w / 2.0,
        h - pad,
        w - pad,
        h - pad,
        h - pad
    );
    for p in points {
        let (px, py) = (x(p.shards as f64), y(p.ops_per_sec()));
        out += &format!(
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"4\" fill=\"#1f77b4\"/>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.1} M</text>\n\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            py - 10.0,
            p.ops_per_sec() / 1e6,
            h - pad + 18.0,
            p.shards
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">shards</text>\n\
         <text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">ops/s (all shards)</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#1f77b4\">measured</text>\n\
         <text x=\"{}\" y=\"{}\" fill=\"#999\">linear (n x 1 shard)</text>\n</svg>\n",
        w / 2.0,
        h - 12.0,
        h / 2.0,
        h / 2.0,
        pad + 10.0,
        pad + 10.0,
        pad + 10.0,
        pad + 26.0
    );
    out
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sweep: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // The chart's file is made first: a path that cannot be written fails
    // before the runs, not after them.
    // Not truncated until the chart is written: a run that fails keeps an
    // older chart.
    let svg_file = match &args.svg {
        Some(path) => Some((
            path,
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| format!("--svg {}: {e}", path.display()))?,
        )),
        None => None,
    };
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
            runs.push(if args.by_hand {
                workload::run_by_hand(&rt, args.ops, args.size, args.cross_every)?
            } else {
                workload::run_held(&rt, args.ops, args.size, args.cross_every, args.hold_local)?
            });
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
    let rows: Vec<Row> = points
        .iter()
        .map(|p| Row {
            shards: p.shards,
            ops: p.ops_per_sec(),
            ops_per_shard: p.ops_per_sec() / p.shards as f64,
            efficiency: p.ops_per_sec() / (p.shards as f64 * base),
            cross_per_sec: p.cross_frees as f64 / p.elapsed.as_secs_f64(),
            pending_frees: p.pending_frees,
            p50_ns: p.p50_ns,
            p99_ns: p.p99_ns,
            batches_back: p.forwarded_batches + p.carried_batches,
        })
        .collect();
    let frees = match (args.cross_every, args.hold_local) {
        (0, _) => "every free local".to_string(),
        (n, 0) if args.by_hand => {
            format!("1 free in {n} to the next shard, carried back by hand")
        }
        (n, 0) => format!("1 free in {n} to the next shard"),
        (n, h) => format!("1 free in {n} held locally for {h} ops"),
    };
    if !args.json {
        println!(
            "shard sweep: {} ops/shard of {} B, {frees}, median of {}, io backend {backend}, {cores} cores",
            args.ops, args.size, args.repeat
        );
        println!(
            "{:>6} {:>14} {:>14} {:>10} {:>16} {:>13} {:>9} {:>9} {:>12}",
            "shards",
            "ops/s",
            "ops/s/shard",
            "efficiency",
            "cross frees/s",
            "pending frees",
            "p50 ns",
            "p99 ns",
            "batches back"
        );
        for r in &rows {
            println!(
                "{:>6} {:>14.0} {:>14.0} {:>10.2} {:>16.0} {:>13.0} {:>9} {:>9} {:>12}",
                r.shards,
                r.ops,
                r.ops_per_shard,
                r.efficiency,
                r.cross_per_sec,
                r.pending_frees,
                r.p50_ns,
                r.p99_ns,
                r.batches_back
            );
        }
    }
    if let Some((path, mut file)) = svg_file {
        let title = format!(
            "segalloc shard sweep: {} ops/shard of {} B, {frees}, {cores} cores, {backend}",
            args.ops, args.size
        );
        use std::io::Write;
        file.set_len(0)
            .and_then(|()| file.write_all(svg_chart(&points, base, &title).as_bytes()))
            .map_err(|e| format!("--svg {}: {e}", path.display()))?;
    }
    if args.json {
        let report = Report {
            ops_per_shard: args.ops,
            size: args.size,
            cross_every: args.cross_every,
            hold_local: args.hold_local,
            by_hand: args.by_hand,
            repeat: args.repeat,
            cores,
            io_backend: &backend,
            points: &rows,
        };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime of two shards as the sweep runs them.
    fn two_shards(dir: &std::path::Path) -> Runtime {
        let cfg = Config::builder(dir.join("d"))
            .shards(2)
            .window_bytes(256 * MIB)
            .build()
            .expect("config");
        Runtime::start(cfg).expect("runtime")
    }

    #[test]
    fn a_run_ends_with_every_forwarded_free_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = two_shards(dir.path());
        for _ in 0..3 {
            let r = workload::run_with(&rt, 20_000, 64, 4).expect("run");
            assert!(r.cross_frees > 0);
            assert!(r.pending_frees > 0.0);
            let live = futures::executor::block_on(rt.stats())
                .expect("stats")
                .allocations_live();
            assert_eq!(live, 0, "frees still in flight when the clock stopped");
        }
        rt.shutdown().expect("shutdown");
    }

    /// `--hold-local`: nothing crosses shards, and a run still ends with
    /// every allocation freed (the held ones too).
    #[test]
    fn held_frees_stay_local_and_are_all_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = two_shards(dir.path());
        let r = workload::run_held(&rt, 20_000, 64, 4, 2048).expect("run");
        assert_eq!(r.cross_frees, 0);
        assert_eq!(r.ops, 40_000);
        // Held for 2048 operations, one free in 4: 512 held at a time once
        // the window and the hold have filled (the first three of the 20
        // samples see fewer: 461 on average).
        assert!(
            (440.0..=515.0).contains(&r.pending_frees),
            "{} pending",
            r.pending_frees
        );
        let stats = futures::executor::block_on(rt.stats()).expect("stats");
        assert_eq!(stats.allocations_live(), 0);
        assert!(stats.shards.iter().all(|s| s.mesh.cross_frees_sent == 0));
        rt.shutdown().expect("shutdown");
    }

    /// `--by-hand`: every free sent to the next shard comes back to its
    /// owner through the workload's channels, none through segalloc, and a
    /// run ends with every allocation freed, at one shard (its own task the
    /// next), two (each the other's next) and three (the ring has a
    /// direction).
    #[test]
    fn frees_carried_by_hand_come_back_to_their_owner() {
        const OPS: u64 = 20_000;
        // Each task sends one free in 4 once its window is full.
        let sent_per_shard = (workload::WINDOW as u64..OPS)
            .filter(|k| k % 4 == 0)
            .count() as u64;
        for shards in [1, 2, 3] {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = Config::builder(dir.path().join("d"))
                .shards(shards)
                .window_bytes(256 * MIB)
                .build()
                .expect("config");
            let rt = Runtime::start(cfg).expect("runtime");
            let r = workload::run_by_hand(&rt, OPS, 64, 4).expect("run");
            assert_eq!(r.ops, OPS * shards as u64);
            assert_eq!(
                r.carried_back,
                sent_per_shard * shards as u64,
                "{shards} shards"
            );
            // Carried in batches of at most 1,024, most of them full: not
            // all at the end, nor each batch of 64 as it came.
            let full = r.carried_back / workload::HAND_BATCH as u64;
            assert!(r.largest_batch <= workload::HAND_BATCH, "{r:?}");
            assert!(
                (full..=2 * full + 2 * shards as u64).contains(&r.carried_batches),
                "{r:?}"
            );
            // With one shard its own task is the next: nothing crossed.
            let crossed = if shards > 1 { r.carried_back } else { 0 };
            assert_eq!(r.cross_frees, crossed);
            let stats = futures::executor::block_on(rt.stats()).expect("stats");
            assert_eq!(stats.allocations_live(), 0, "{shards} shards");
            assert!(stats.shards.iter().all(|s| s.mesh.cross_frees_sent == 0));
            rt.shutdown().expect("shutdown");
        }
    }

    #[test]
    fn the_json_report_keeps_its_field_names_and_precision() {
        let row = Row {
            shards: 2,
            ops: 10_159_195.4,
            ops_per_shard: 5_079_597.7,
            efficiency: 0.835_44,
            cross_per_sec: 1_239_422.0,
            pending_frees: 1234.4,
            p50_ns: 109,
            p99_ns: 4435,
            batches_back: 1618,
        };
        let report = Report {
            ops_per_shard: 2000,
            size: 64,
            cross_every: 4,
            hold_local: 0,
            by_hand: false,
            repeat: 1,
            cores: 2,
            io_backend: "io_uring",
            points: &[row],
        };
        assert_eq!(
            serde_json::to_string(&report).expect("JSON"),
            concat!(
                r#"{"ops_per_shard":2000,"size":64,"cross_every":4,"hold_local":0,"by_hand":false,"#,
                r#""repeat":1,"#,
                r#""cores":2,"io_backend":"io_uring","#,
                r#""points":[{"shards":2,"ops_per_sec":10159195,"ops_per_sec_per_shard":5079598,"#,
                r#""efficiency":0.8354,"cross_frees_per_sec":1239422,"pending_frees":1234,"#,
                r#""p50_ns":109,"p99_ns":4435,"batches_back":1618}]}"#
            )
        );
    }
}
