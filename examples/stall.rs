//! Does faulting windows in stall a shard's other tasks?
//!
//! One shard thread runs two tasks: a *ticker* that only yields and records
//! the gap between two of its turns, and a *faulter* that pins fresh windows
//! of a growing file (each fault-in grows the file with `fallocate`, maps the
//! window and advises it) and `fdatasync`s every few windows. With io_uring
//! the blocking calls run in the kernel's workers while the ticker keeps
//! turning; with plain syscalls (`SEGALLOC_IO=sync` semantics) they block the
//! thread. The longest and the 99th-percentile gap are the stall.
//!
//! Its files go in a temporary directory under `--dir` (default: the
//! current directory, so that they are on the disk a data directory would
//! use; the system's temporary directory may be a tmpfs), deleted at the
//! end (a run cut short by a signal leaves it: `.tmp…`).
//!
//! ```text
//! cargo run --release --example stall
//! cargo run --release --example stall -- --windows 64 --json
//! ```

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::Parser;
use segalloc::config::MIB;
use segalloc::{Config, FileHandleRegistry, IoBackendChoice, MappingConfig, MappingManager, Ring};

/// A window size in MiB: a positive multiple of 16, at most 64 GiB (the
/// library's largest window).
fn window_mb(s: &str) -> Result<u64, String> {
    let max = 64 * 1024;
    match s.parse::<u64>() {
        Ok(n) if n > 0 && n % 16 == 0 && n <= max => Ok(n),
        _ => Err(format!(
            "`{s}` is not a window size in MiB (a positive multiple of 16, at most {max})"
        )),
    }
}

#[derive(Parser, Debug)]
#[command(about = "event-loop stall while windows fault in: io_uring vs plain syscalls")]
struct Args {
    /// Windows to fault in per backend.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    windows: u64,
    /// Window size in MiB, a multiple of 16 (each fault-in reserves a whole
    /// window).
    #[arg(long, default_value_t = 64, value_parser = window_mb)]
    window_mb: u64,
    /// Bytes written into each window before the next (makes fdatasync
    /// work); a larger value writes the whole window.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    write_bytes: usize,
    /// Where the temporary directory of the files goes (a `.tmp…` folder,
    /// deleted at the end): on the disk to measure.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

struct Outcome {
    backend: String,
    max_gap_us: u64,
    p99_gap_us: u64,
    ticks: usize,
    elapsed: Duration,
}

fn measure(args: &Args, choice: IoBackendChoice) -> Result<Outcome, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir_in(&args.dir)
        .map_err(|e| format!("a temporary directory in {}: {e}", args.dir.display()))?;
    let window = args.window_mb * MIB;
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(window)
        .growth_step_bytes(window)
        .io_backend(choice)
        .build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let out = local.block_on(&rt, async {
        let ring = Ring::new(cfg.io_backend())?;
        let backend = ring.backend().to_string();
        let files = Rc::new(FileHandleRegistry::new(ring, 16));
        let mm = Rc::new(MappingManager::new(
            files.clone(),
            MappingConfig::from_config(&cfg),
        ));
        // SAFETY: the file is this program's own, in its temporary directory;
        // nothing else maps or writes it.
        let f = unsafe { files.register(dir.path().join("data")) };
        let done = Rc::new(Cell::new(false));
        let gaps = Rc::new(RefCell::new(Vec::<u64>::new()));
        let ticker = {
            let (done, gaps) = (done.clone(), gaps.clone());
            let spawned = Instant::now();
            tokio::task::spawn_local(async move {
                // The first gap runs from here: a faulter that never yields
                // stalls the ticker for its whole run.
                let mut last = spawned;
                loop {
                    tokio::task::yield_now().await;
                    let now = Instant::now();
                    gaps.borrow_mut()
                        .push(now.duration_since(last).as_micros() as u64);
                    last = now;
                    if done.get() {
                        break;
                    }
                }
            })
        };
        let started = Instant::now();
        let chunk = vec![0xA5u8; 64 * 1024];
        for i in 0..args.windows {
            let pin = mm.pin(f, i * window, 4096, true).await?;
            drop(pin);
            // Dirty some of the window so fdatasync has work to do.
            let len = (args.write_bytes as u64).clamp(1, window);
            let big = mm.pin(f, i * window, len, true).await?;
            let mut off = 0;
            while off < args.write_bytes.min(len as usize) {
                let n = chunk.len().min(len as usize - off);
                big.write_at(off, &chunk[..n])?;
                off += n;
                if off % (64 * 1024) == 0 {
                    tokio::task::yield_now().await;
                }
            }
            drop(big);
            if i % 4 == 3 {
                files.sync(f, true).await?;
            }
            mm.evict_idle();
        }
        let elapsed = started.elapsed();
        done.set(true);
        ticker.await.expect("ticker");
        let mut g = gaps.borrow().clone();
        g.sort_unstable();
        let p99 = g
            .get(((g.len().max(1) - 1) as f64 * 0.99) as usize)
            .copied()
            .unwrap_or(0);
        Ok::<_, segalloc::Error>(Outcome {
            backend,
            max_gap_us: g.last().copied().unwrap_or(0),
            p99_gap_us: p99,
            ticks: g.len(),
            elapsed,
        })
    })?;
    Ok(out)
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stall: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Bytes the faulter writes into each window: `--write-bytes`, at most the
/// window.
fn written_per_window(args: &Args) -> u64 {
    (args.write_bytes as u64).min(args.window_mb * MIB)
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let uring = measure(&args, IoBackendChoice::Auto)?;
    let sync = measure(&args, IoBackendChoice::Sync)?;
    if !args.json {
        println!(
            "{} windows of {} MiB faulted in, {} MiB written per window, fdatasync every 4",
            args.windows,
            args.window_mb,
            written_per_window(&args) / (1024 * 1024)
        );
        println!(
            "{:>10} {:>14} {:>14} {:>10} {:>10}",
            "backend", "max stall us", "p99 gap us", "ticks", "secs"
        );
        for o in [&uring, &sync] {
            println!(
                "{:>10} {:>14} {:>14} {:>10} {:>10.2}",
                o.backend,
                o.max_gap_us,
                o.p99_gap_us,
                o.ticks,
                o.elapsed.as_secs_f64()
            );
        }
    } else {
        let obj = |o: &Outcome| {
            format!(
                "{{\"backend\":\"{}\",\"max_stall_us\":{},\"p99_gap_us\":{},\"ticks\":{},\"secs\":{:.3}}}",
                o.backend,
                o.max_gap_us,
                o.p99_gap_us,
                o.ticks,
                o.elapsed.as_secs_f64()
            )
        };
        println!(
            "{{\"windows\":{},\"window_mb\":{},\"results\":[{},{}]}}",
            args.windows,
            args.window_mb,
            obj(&uring),
            obj(&sync)
        );
    }
    Ok(())
}
