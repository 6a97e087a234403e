//! The README's main job (`examples/demo.rs`) and the comparison every
//! figure of its *Measured results* comes from (`examples/compare.rs`),
//! run as a user runs them, with small sizes: each must finish, and its
//! JSON report must hold what the README reads from it. Built on first use
//! (`common::example_binary`).

mod common;

use std::process::Command;

use common::example_binary;
use serde_json::Value;

/// The last line of `out`'s stdout, parsed: the examples print one JSON
/// object there with `--json`.
fn last_json(out: &std::process::Output, what: &str) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{what}: last line is not JSON ({e}): {line}"))
}

/// The CPUs this process may run on (its affinity mask).
fn allowed_cpus() -> f64 {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).expect("affinity");
    (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .count() as f64
}

fn num(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} is not a number in {v}"))
}

/// The demo fills a fresh directory, frees a third (half of those from
/// the other shard), reopens it and verifies every surviving record; run
/// again on the same directory, it finds them. Each shard inserts 3,000
/// records and frees those with `k % 6 == 0` itself and forwards those
/// with `k % 6 == 3` to the other shard (`examples/demo.rs`), so the
/// counts are exact: a forwarded batch lost on the way would show.
#[test]
fn the_demo_inserts_reopens_and_verifies() {
    let demo = example_binary("demo");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let run = |fresh: bool| {
        let mut cmd = Command::new(&demo);
        cmd.arg("--dir")
            .arg(&dir)
            .args(["--records", "6000", "--shards", "2", "--json"]);
        if fresh {
            cmd.arg("--fresh");
        }
        last_json(&cmd.output().expect("run the demo"), "the demo")
    };
    let first = run(true);
    assert_eq!(num(&first, "records_inserted"), 6000.0, "{first}");
    let freed = num(&first, "records_freed");
    assert_eq!(freed, 2000.0, "{first}");
    assert_eq!(num(&first, "records_freed_cross_shard"), 1000.0, "{first}");
    assert_eq!(num(&first, "records_verified"), 6000.0 - freed, "{first}");
    assert_eq!(num(&first, "records_found_at_start"), 0.0, "{first}");
    assert!(num(&first, "fds_data_dir") < 100.0, "{first}");
    assert!(num(&first, "vmas_data_dir") < 1000.0, "{first}");
    // Reopened: what survived the first run is found, and the second
    // run's own records are verified along with it.
    let second = run(false);
    assert_eq!(
        num(&second, "records_found_at_start"),
        6000.0 - freed,
        "{second}"
    );
    let freed2 = num(&second, "records_freed");
    assert_eq!(freed2, 2000.0, "{second}");
    assert_eq!(
        num(&second, "records_verified"),
        2.0 * 6000.0 - freed - freed2,
        "{second}"
    );
}

/// `compare --json` reports every goal of the README's table, each with
/// its ratio and verdict, and for each segalloc fill its CPU time and page
/// faults (the rows *What a fill costs the process* reads).
#[test]
fn compare_reports_every_goal_and_what_the_fills_cost() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(example_binary("compare"))
        .args([
            "--json",
            "--records",
            "3000",
            "--pairs",
            "3000",
            "--live",
            "3000",
            "--mix-ops",
            "3000",
            "--sweep-ops",
            "3000",
            "--repeat",
            "1",
            "--old-segment-records",
            "1",
            "--dir",
        ])
        .arg(tmp.path())
        .output()
        .expect("run compare");
    let report = last_json(&out, "compare");
    let cores = num(&report, "cores");
    let goals = report["goals"].as_array().expect("goals");
    let patterns: Vec<&str> = goals
        .iter()
        .map(|g| g["pattern"].as_str().expect("pattern"))
        .collect();
    assert_eq!(
        patterns,
        [
            "fill, 1 shard",
            "fill, every shard",
            "alloc + free, LIFO pair",
            "fill, free all, refill",
            "random mix 16 B - 4 KiB",
            "producer/consumer",
            "pin + unpin, mapped",
            "shard sweep, 1 in 4 cross",
        ]
    );
    for g in goals {
        let ratio = num(g, "ratio");
        assert!(ratio.is_finite() && ratio > 0.0, "{g}");
        assert!(g["met"].is_boolean(), "{g}");
    }
    let designs = report["designs"].as_array().expect("designs");
    let design = |name: &str| {
        designs
            .iter()
            .find(|d| d["design"] == name)
            .unwrap_or_else(|| panic!("no design {name:?} in {designs:?}"))
    };
    let every = if cores == 1.0 {
        "1 shard".to_string()
    } else {
        format!("{cores} shards")
    };
    for shards in ["1 shard".to_string(), every] {
        let cpu = design(&format!("segalloc fill, {shards}: CPU"));
        assert_eq!(cpu["unit"], "CPU ns/record", "{cpu}");
        assert!(num(cpu, "value") > 0.0, "{cpu}");
        // "... (shards, io workers): 1.44 CPUs busy"
        let note = cpu["note"].as_str().expect("note");
        let busy: f64 = note
            .rsplit(": ")
            .next()
            .and_then(|t| t.strip_suffix(" CPUs busy"))
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("no CPUs busy in {note:?}"));
        // Shards and io workers spread over every CPU the process may use
        // (more than `cores` under a CPU quota); the CPU time is counted
        // up to 20 ms past the fill's wall time.
        assert!(busy > 0.0 && busy <= allowed_cpus() + 0.5, "{note}");
        let faults = design(&format!("segalloc fill, {shards}: page faults"));
        assert_eq!(faults["unit"], "per 1M records", "{faults}");
        assert!(num(faults, "value") >= 0.0, "{faults}");
    }
}
