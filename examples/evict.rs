//! Eviction under a working set larger than the window cap: pins/s and
//! fault-ins per pin as the working set grows past `--cap` windows, for
//! each eviction policy, with uniform and skewed access.
//!
//! ```text
//! cargo run --release --example evict                 # table
//! cargo run --release --example evict -- --json       # one JSON object
//! ```
//!
//! Each point runs twice: with the policy alone (`adaptive_eviction(false)`)
//! and with the default adaptation; "faults" is fault-ins per pin.
//!
//! One `MappingManager` with `--cap` windows of 16 MiB over one sparse data
//! file of `working set` windows; each pin reads 4 KiB of one window and is
//! dropped at once. Access: `uniform` (a random window), `skewed` (80 % of
//! the pins go to 20 % of the windows), `moving` (skewed, and the hot
//! windows change four times per point), `cyclic` (windows in turn, the
//! pattern plain LRU handles worst: every pin faults once the set exceeds
//! the cap). A fault-in maps a window (`mmap`) and
//! an eviction unmaps one, so fault-ins per pin is the thrash rate. The
//! manager counts fault-ins of recently evicted windows (`thrash_faults`)
//! and, when at least 3 in 4 recent fault-ins are such, switches eviction
//! to thrash mode (keep the longest-mapped windows, evict the newest), so a
//! cyclic or uniform scan over more windows than the cap keeps part of its
//! working set mapped instead of faulting on every pin.

use std::rc::Rc;
use std::time::Instant;

use clap::Parser;
use segalloc::config::MIB;
use segalloc::{Config, EvictionPolicy, FileHandleRegistry, MappingConfig, MappingManager, Ring};
use serde::Serialize;

/// A window cap of 2 to 4,096 (a shard needs two windows; the largest
/// working set is 4 × the cap, of 16 MiB windows in one file).
fn cap_in_range(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (2..=4096).contains(&n) => Ok(n),
        _ => Err(format!("`{s}` is not a cap from 2 to 4096")),
    }
}

#[derive(Parser, Debug)]
#[command(about = "segalloc eviction under a working set larger than the window cap")]
struct Args {
    /// Window cap of the manager.
    #[arg(long, default_value_t = 16, value_parser = cap_in_range)]
    cap: usize,
    /// Pins per point.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pins: u64,
    /// Print the table as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

const WINDOW_BYTES: u64 = 16 * MIB;

/// One point (the JSON field names are an interface: scripts read them).
#[derive(Serialize)]
struct Row {
    policy: &'static str,
    adaptive: bool,
    access: &'static str,
    working_set_windows: u64,
    cap_windows: usize,
    pins_per_sec: f64,
    fault_ins_per_pin: f64,
    thrash_faults: u64,
    thrash_mode: bool,
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[derive(Clone, Copy)]
enum Access {
    Uniform,
    Skewed,
    Moving,
    Cyclic,
}

impl Access {
    fn name(self) -> &'static str {
        match self {
            Access::Uniform => "uniform",
            Access::Skewed => "skewed",
            Access::Moving => "moving",
            Access::Cyclic => "cyclic",
        }
    }

    /// The window of pin number `i` of `pins`.
    fn pick(self, rng: &mut u64, i: u64, pins: u64, windows: u64) -> u64 {
        let r = next(rng);
        let skewed = |r: u64| {
            let hot = (windows / 5).max(1);
            if r % 100 < 80 {
                (r >> 8) % hot
            } else {
                hot + (r >> 8) % (windows - hot).max(1)
            }
        };
        match self {
            Access::Uniform => r % windows,
            Access::Skewed => skewed(r),
            // The hot fifth moves by a fifth of the windows, 4 times.
            Access::Moving => (skewed(r) + (i * 4 / pins.max(1)) * (windows / 5)) % windows,
            Access::Cyclic => i % windows,
        }
    }
}

fn point(
    args: &Args,
    policy: EvictionPolicy,
    adaptive: bool,
    access: Access,
    windows: u64,
) -> Result<Row, Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("data");
    std::fs::File::create(&path)?.set_len(windows * WINDOW_BYTES)?;
    let cfg = Config::builder(tmp.path().join("unused"))
        .shards(1)
        .window_bytes(WINDOW_BYTES)
        .max_windows(args.cap)
        .eviction_policy(policy)
        .adaptive_eviction(adaptive)
        .build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let files = Rc::new(FileHandleRegistry::new(
            Ring::new(cfg.io_backend())?,
            cfg.max_open_files_per_shard(),
        ));
        let mm = MappingManager::new(files.clone(), MappingConfig::from_config(&cfg));
        // SAFETY: the file is this program's own, in its temporary directory;
        // nothing else maps or writes it.
        let f = unsafe { files.register(&path) };
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let started = Instant::now();
        let mut sum = 0u64;
        for i in 0..args.pins {
            let w = access.pick(&mut rng, i, args.pins, windows);
            let off = w * WINDOW_BYTES + (next(&mut rng) % (WINDOW_BYTES / 4096)) * 4096;
            let pin = mm.pin(f, off, 4096, false).await?;
            let mut b = [0u8; 8];
            pin.read_at(0, &mut b)?;
            sum = sum.wrapping_add(u64::from_le_bytes(b));
        }
        let secs = started.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        let s = mm.stats();
        Ok(Row {
            policy: match policy {
                EvictionPolicy::Lru => "lru",
                EvictionPolicy::Lfu => "lfu",
                EvictionPolicy::Clock => "clock",
            },
            adaptive,
            access: access.name(),
            working_set_windows: windows,
            cap_windows: args.cap,
            pins_per_sec: args.pins as f64 / secs.max(1e-9),
            fault_ins_per_pin: s.faults as f64 / args.pins as f64,
            thrash_faults: s.thrash_faults,
            thrash_mode: s.thrash_mode,
        })
    })
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evict: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cap = args.cap as u64;
    // The metadata of a shard holds no window here: the whole cap is data.
    let sizes = [cap, cap + cap / 4, 2 * cap, 4 * cap];
    let mut rows = Vec::new();
    if !args.json {
        println!(
            "{:<6} {:<8} {:>12} {:>4} | {:>10} {:>8} | {:>10} {:>8} {:>7}",
            "policy",
            "access",
            "working set",
            "cap",
            "plain pins/s",
            "faults",
            "adaptive",
            "faults",
            "thrash"
        );
    }
    let policies = [
        EvictionPolicy::Lru,
        EvictionPolicy::Lfu,
        EvictionPolicy::Clock,
    ];
    let accesses = [
        Access::Uniform,
        Access::Skewed,
        Access::Moving,
        Access::Cyclic,
    ];
    for policy in policies {
        for access in accesses {
            for &windows in &sizes {
                let plain = point(&args, policy, false, access, windows.max(1))?;
                let adaptive = point(&args, policy, true, access, windows.max(1))?;
                if !args.json {
                    println!(
                        "{:<6} {:<8} {:>12} {:>4} | {:>10.0} {:>8.3} | {:>10.0} {:>8.3} {:>7}",
                        plain.policy,
                        plain.access,
                        plain.working_set_windows,
                        plain.cap_windows,
                        plain.pins_per_sec,
                        plain.fault_ins_per_pin,
                        adaptive.pins_per_sec,
                        adaptive.fault_ins_per_pin,
                        adaptive.thrash_mode
                    );
                }
                rows.push(plain);
                rows.push(adaptive);
            }
        }
    }
    if args.json {
        println!("{}", serde_json::json!({ "rows": rows }));
    }
    Ok(())
}
