//! Soak: the runtime (2 shards) under mixed load in a child process,
//! SIGKILLed at random moments and reopened, round after round, for a set
//! time. Ignored by default (long):
//!
//! ```sh
//! SEGALLOC_SOAK_SECS=60 cargo test --release --test soak -- --ignored --nocapture
//! SEGALLOC_IO=sync SEGALLOC_SOAK_SECS=60 cargo test --release --test soak -- --ignored --nocapture
//! ```
//!
//! The child runs one worker task per shard: allocate (and write a
//! checkable pattern), free one of its own shard's allocations, free one of
//! the other shard's (forwarded over the mesh), or pin any allocation
//! (cross-shard pins included) and check its pattern. Its main thread calls
//! `Runtime::sync` now and then, and `trim` on every shard every few syncs.
//! Every operation is announced before it starts and acknowledged when it
//! returned, one flushed line each (as in `alloc_crash.rs`).
//!
//! After each kill the parent reopens the directory and checks the
//! durability promise against what was acknowledged:
//! * every acknowledged allocation not acknowledged freed is live, intact;
//! * an acknowledged local free is gone;
//! * an acknowledged cross-shard free is gone once a `Runtime::sync` that
//!   started after it returned; before that it may still be live;
//! * nothing else is live but the allocation in flight on each shard;
//! * no two live slots overlap.
//!
//! Then it frees what may legitimately remain (in-flight allocations,
//! unapplied cross-shard frees), so the next round starts from an exact
//! model. Violations are printed and fail the test at the end. Replay with
//! `SEGALLOC_SOAK_SEED=<seed>`.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Rng, assert_no_overlap, check_pattern, handle_from_hex, handle_seed, line_reader, run,
    seed_from_env, write_pattern,
};
use segalloc::config::MIB;
use segalloc::{Config, DataDir, Error, Handle, Runtime, Shard};

const MARK: &str = "@@";
const ENV_DIR: &str = "SEGALLOC_SOAK_CHILD_DIR";
const ENV_SEED: &str = "SEGALLOC_SOAK_CHILD_SEED";
const SHARDS: usize = 2;
/// Bytes of each slot that carry the pattern.
const PATTERN_CAP: usize = 1024;

fn cfg(dir: &Path) -> Config {
    Config::builder(dir)
        .shards(SHARDS)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(64 * MIB)
        .build()
        .unwrap()
}

fn pattern_len(h: &Handle) -> usize {
    (h.len() as usize).min(PATTERN_CAP)
}

fn say(s: String) {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{MARK}{s}").unwrap();
    o.flush().unwrap();
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(1000) {
        0..=699 => 1 + rng.below(512),
        700..=979 => 1 + rng.below(20_000),
        980..=997 => 20_001 + rng.below(MIB),
        _ => 1 + rng.below(6 * MIB),
    }
}

// ---------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------

type Pool = Arc<Mutex<Vec<Handle>>>;

fn take(pool: &Pool, rng: &mut Rng) -> Option<Handle> {
    let mut p = pool.lock().unwrap();
    if p.is_empty() {
        return None;
    }
    let i = rng.below(p.len() as u64) as usize;
    Some(p.swap_remove(i))
}

async fn worker(shard: Shard, pool: Pool, seed: u64) {
    let s = shard.index();
    let mut rng = Rng::new(seed);
    let mut ops = 0u64;
    loop {
        ops += 1;
        if ops.is_multiple_of(16) {
            // Let the mesh's drain task and the other tasks run.
            tokio::task::yield_now().await;
        }
        let n = pool.lock().unwrap().len();
        let p_alloc = match n {
            0..=999 => 0.8,
            1000..=7999 => 0.5,
            _ => 0.3,
        };
        let roll = rng.below(100);
        if n == 0 || rng.chance(p_alloc) {
            say(format!("a {s}"));
            let a = shard.allocate(size(&mut rng)).await.unwrap();
            let h = a.handle();
            write_pattern(a.pin(), pattern_len(&h), handle_seed(&h, 0));
            drop(a);
            say(format!("A {s} {}", h.to_hex()));
            pool.lock().unwrap().push(h);
        } else if roll < 15 {
            // Read one back (any shard's), then return it to the pool.
            let Some(h) = take(&pool, &mut rng) else {
                continue;
            };
            let pin = shard.pin(h).await.unwrap();
            if !check_pattern(&pin, pattern_len(&h), handle_seed(&h, 0)) {
                say(format!("V {s} {}", h.to_hex()));
                panic!("contents of {h} damaged");
            }
            drop(pin);
            pool.lock().unwrap().push(h);
        } else {
            let Some(h) = take(&pool, &mut rng) else {
                continue;
            };
            let local = h.shard() == s;
            let (intent, ack) = if local { ("f", "F") } else { ("x", "X") };
            say(format!("{intent} {s} {}", h.to_hex()));
            shard.free(h).unwrap();
            say(format!("{ack} {s} {}", h.to_hex()));
        }
    }
}

#[test]
fn soak_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let seed: u64 = std::env::var(ENV_SEED).unwrap().parse().unwrap();
    let mut rng = Rng::new(seed);
    let rt = Runtime::start(cfg(Path::new(&dir))).unwrap();
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    for s in 0..SHARDS {
        let live: Vec<Handle> = futures::executor::block_on(
            rt.spawn_on(s, |shard| async move { shard.live().collect::<Vec<_>>() }),
        )
        .unwrap();
        pool.lock().unwrap().extend(live);
    }
    say(format!("R {}", pool.lock().unwrap().len()));
    for s in 0..SHARDS {
        let pool = pool.clone();
        let seed = rng.next_u64();
        drop(rt.spawn_on(s, move |shard| worker(shard, pool, seed)));
    }
    let mut syncs = 0u64;
    loop {
        std::thread::sleep(Duration::from_millis(20 + rng.below(200)));
        say("s".into());
        futures::executor::block_on(rt.sync()).unwrap();
        say("S".into());
        syncs += 1;
        if syncs.is_multiple_of(5) {
            say("t".into());
            let mut bytes = 0;
            for s in 0..SHARDS {
                bytes += futures::executor::block_on(
                    rt.spawn_on(s, |shard| async move { shard.trim().await }),
                )
                .unwrap()
                .unwrap();
            }
            say(format!("T {bytes}"));
        }
    }
}

// ---------------------------------------------------------------------------
// The parent.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InFlight {
    None,
    Alloc,
    Free(Handle),
    Cross(Handle),
}

#[derive(Default)]
struct Model {
    /// Acknowledged allocations not acknowledged freed.
    live: HashSet<Handle>,
    /// Acknowledged cross-shard frees not known applied: the line at which
    /// each was acknowledged.
    pending: HashMap<Handle, usize>,
    /// Cross-shard frees a completed sync covered: must not be live.
    gone: HashSet<Handle>,
}

#[derive(Debug, Default)]
struct Totals {
    rounds: u64,
    allocs: u64,
    frees: u64,
    cross_frees: u64,
    syncs: u64,
    trims: u64,
    trimmed_bytes: u64,
    in_flight_allocs_live: u64,
    cross_frees_unapplied_at_kill: u64,
    killed_before_ready: u64,
    max_live: usize,
    violations: Vec<String>,
}

/// Apply the child's lines; returns each shard's operation in flight.
fn apply(lines: &[String], m: &mut Model, t: &mut Totals) -> [InFlight; SHARDS] {
    let mut in_flight = [InFlight::None; SHARDS];
    let mut sync_started: Option<usize> = None;
    for (i, line) in lines.iter().enumerate() {
        let Some(at) = line.find(MARK) else { continue };
        let msg = &line[at + MARK.len()..];
        let parts: Vec<&str> = msg.split(' ').collect();
        let shard = || parts[1].parse::<usize>().unwrap();
        let h = || handle_from_hex(parts[2]);
        match parts[0] {
            "R" => {}
            "a" => in_flight[shard()] = InFlight::Alloc,
            "A" => {
                let h = h();
                if !m.live.insert(h) {
                    t.violations
                        .push(format!("{h} acknowledged twice without a free"));
                }
                m.gone.remove(&h);
                m.pending.remove(&h);
                in_flight[shard()] = InFlight::None;
                t.allocs += 1;
            }
            "f" => in_flight[shard()] = InFlight::Free(h()),
            "x" => in_flight[shard()] = InFlight::Cross(h()),
            "F" | "X" => {
                let h = h();
                if !m.live.remove(&h) {
                    t.violations
                        .push(format!("{h} freed but not live in the model"));
                }
                if parts[0] == "X" {
                    m.pending.insert(h, i);
                    t.cross_frees += 1;
                } else {
                    t.frees += 1;
                }
                in_flight[shard()] = InFlight::None;
            }
            "s" => sync_started = Some(i),
            "S" => {
                let started = sync_started.take().expect("S after s");
                let applied: Vec<Handle> = m
                    .pending
                    .iter()
                    .filter(|(_, at)| **at < started)
                    .map(|(h, _)| *h)
                    .collect();
                for h in applied {
                    m.pending.remove(&h);
                    m.gone.insert(h);
                }
                t.syncs += 1;
            }
            "t" => {}
            "T" => {
                t.trims += 1;
                t.trimmed_bytes += parts[1].parse::<u64>().unwrap();
            }
            "V" => t.violations.push(format!("child: contents damaged: {msg}")),
            _ => t
                .violations
                .push(format!("unexpected line from the child: {line}")),
        }
    }
    in_flight
}

async fn open_all(cfg: &Config) -> Vec<Shard> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let dd = loop {
        match DataDir::open(cfg) {
            Err(Error::AlreadyOpen { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => break Arc::new(other.expect("reopen after SIGKILL")),
        }
    };
    let mut shards = Vec::new();
    for i in 0..SHARDS {
        shards.push(
            Shard::open(dd.clone(), cfg, i as u16)
                .await
                .expect("recovery"),
        );
    }
    shards
}

/// Reopen after a kill, check the promise, and make the directory match
/// the model exactly again.
async fn check(cfg: &Config, m: &mut Model, in_flight: [InFlight; SHARDS], t: &mut Totals) {
    let shards = open_all(cfg).await;
    let mut live: HashSet<Handle> = HashSet::new();
    for s in &shards {
        live.extend(s.live());
    }
    for s in 0..SHARDS {
        assert_no_overlap(live.iter().copied().filter(|h| h.shard() as usize == s));
    }
    let round = t.rounds;
    let may_be_gone = |h: &Handle| {
        in_flight
            .iter()
            .any(|f| matches!(f, InFlight::Free(x) | InFlight::Cross(x) if x == h))
    };
    for h in &m.live {
        if !live.contains(h) {
            if may_be_gone(h) {
                continue;
            }
            t.violations
                .push(format!("round {round}: acknowledged {h} lost"));
            continue;
        }
        let pin = shards[h.shard() as usize].pin(*h).await.unwrap();
        if !check_pattern(&pin, pattern_len(h), handle_seed(h, 0)) {
            t.violations
                .push(format!("round {round}: contents of {h} damaged"));
        }
    }
    let mut extra_allocs = [0usize; SHARDS];
    for h in live.difference(&m.live) {
        let s = h.shard() as usize;
        if m.pending.contains_key(h) || may_be_gone(h) {
            // A cross-shard free not yet applied (or one in flight).
            t.cross_frees_unapplied_at_kill += 1;
        } else if in_flight[s] == InFlight::Alloc && extra_allocs[s] == 0 {
            // The allocation in flight (its bit is set first); it may have
            // taken a slot freed just before, even one a sync covered.
            extra_allocs[s] += 1;
            t.in_flight_allocs_live += 1;
        } else if m.gone.contains(h) {
            t.violations.push(format!(
                "round {round}: {h} is live after a sync covered its cross-shard free"
            ));
        } else {
            t.violations
                .push(format!("round {round}: {h} live but never acknowledged"));
        }
        shards[s].free(*h).unwrap();
    }
    m.live.retain(|h| live.contains(h));
    m.pending.clear();
    m.gone.clear();
    t.max_live = t.max_live.max(m.live.len());
    for s in &shards {
        s.sync().await.unwrap();
    }
}

#[test]
#[ignore = "long: SEGALLOC_SOAK_SECS (default 60) of SIGKILL rounds"]
fn soak_sigkill_rounds() {
    let secs: u64 = common::number_from_env("SEGALLOC_SOAK_SECS", 60);
    let seed = seed_from_env("SEGALLOC_SOAK_SEED");
    eprintln!("soak: {secs} s, seed {seed} (replay with SEGALLOC_SOAK_SEED={seed})");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = cfg(&dir);
    let mut m = Model::default();
    let mut t = Totals::default();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    while Instant::now() < deadline {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "soak_child", "--nocapture", "--test-threads=1"])
            .env(ENV_DIR, &dir)
            .env(ENV_SEED, rng.next_u64().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (rx, reader) = line_reader(stdout);
        let mut lines = Vec::new();
        if rng.chance(0.05) {
            std::thread::sleep(Duration::from_micros(rng.below(50_000)));
            t.killed_before_ready += 1;
        } else {
            loop {
                let line = rx
                    .recv_timeout(Duration::from_secs(30))
                    .unwrap_or_else(|e| panic!("round {}: no ready line ({e})", t.rounds));
                let ready = line.contains(&format!("{MARK}R "));
                lines.push(line);
                if ready {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100 + rng.below(2500)));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        reader.join().unwrap();
        lines.extend(rx.try_iter());
        if out.status.signal() != Some(9) {
            t.violations.push(format!(
                "round {}: the child ended on its own ({}): {}",
                t.rounds,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let in_flight = apply(&lines, &mut m, &mut t);
        run(check(&cfg, &mut m, in_flight, &mut t));
        t.rounds += 1;
        if t.rounds.is_multiple_of(10) {
            eprintln!(
                "soak: {:.0} s, {} rounds, {} allocs, {} frees, {} cross-shard frees, {} syncs, {} live, {} violations",
                started.elapsed().as_secs_f64(),
                t.rounds,
                t.allocs,
                t.frees,
                t.cross_frees,
                t.syncs,
                m.live.len(),
                t.violations.len()
            );
        }
    }
    for v in &t.violations {
        eprintln!("soak: VIOLATION: {v}");
    }
    let violations = std::mem::take(&mut t.violations);
    eprintln!(
        "soak: done in {:.1} s: {t:?}; {} violations",
        started.elapsed().as_secs_f64(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} violations (seed {seed})",
        violations.len()
    );
    assert!(t.rounds > 0 && t.allocs > 0 && t.cross_frees > 0);
}
