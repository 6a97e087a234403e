//! The main job: open a data directory, start one shard per core, insert
//! sealed records from async tasks on every shard, free a third of them (a
//! part cross-shard), sync, shut down, reopen, and verify every surviving
//! record byte for byte. Prints records/s, the OS's view (fds, VMAs, RSS),
//! data and metadata bytes, the io backend and the recovery time.
//!
//! ```text
//! cargo run --release --example demo                       # 1,000,000 records of 16 B – 1 KiB
//! cargo run --release --example demo -- --records 10000000 --record-bytes 100
//! cargo run --release --example demo -- --fresh --json     # start over; JSON on the last line
//! ```
//!
//! Records are written payload first and sealed last with a 16-byte
//! checksummed header, so a run killed at any moment (even `kill -9`) can be
//! followed by another: on start the demo recovers the directory, frees the
//! unsealed slots (a crash between allocate and seal) and verifies every
//! sealed record. Any mismatch is reported and the exit status is non-zero.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use segalloc::{Config, Error, Handle, Runtime, Shard, proc};

#[derive(Parser, Debug, Clone)]
#[command(about = "segalloc demo: insert, free, sync, reopen and verify sealed records")]
struct Args {
    /// Data directory.
    #[arg(long, default_value = "./segalloc-demo")]
    dir: PathBuf,
    /// Delete the data directory first (refused unless it is a closed
    /// segalloc data directory).
    #[arg(long)]
    fresh: bool,
    /// Records to insert in this run.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Record size in bytes (header included): `N` or `MIN-MAX`.
    #[arg(long, default_value = "16-1024")]
    record_bytes: String,
    /// Shards (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
    /// Print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

const HEADER_BYTES: usize = 16;
const SEAL_MAGIC: u32 = 0x5EA1_5EA1;

/// Deterministic payload byte `i` of record `seed`.
#[inline]
fn payload_byte(seed: u64, i: usize) -> u8 {
    let mut x = seed ^ (i as u64 / 8).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> ((i % 8) * 8)) as u8
}

fn payload(seed: u64, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend((0..len).map(|i| payload_byte(seed, i)));
}

fn header(len: u32, seed: u32, payload: &[u8]) -> [u8; HEADER_BYTES] {
    let pcrc = crc32c::crc32c(payload);
    let mut h = [0u8; HEADER_BYTES];
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&seed.to_le_bytes());
    h[8..12].copy_from_slice(&pcrc.to_le_bytes());
    let hcrc = crc32c::crc32c(&h[0..12]) ^ SEAL_MAGIC;
    h[12..16].copy_from_slice(&hcrc.to_le_bytes());
    h
}

enum Check {
    Sealed,
    Unsealed,
    Mismatch(String),
}

/// Read and verify the record in `h` on `shard`.
async fn check_record(shard: &Shard, h: Handle, buf: &mut Vec<u8>, want: &mut Vec<u8>) -> Check {
    let pin = match shard.pin(h).await {
        Ok(p) => p,
        Err(e) => return Check::Mismatch(format!("{h}: pin failed: {e}")),
    };
    let mut hd = [0u8; HEADER_BYTES];
    pin.read_at(0, &mut hd).expect("slot holds a header");
    let len = u32::from_le_bytes(hd[0..4].try_into().unwrap());
    let seed = u32::from_le_bytes(hd[4..8].try_into().unwrap());
    let pcrc = u32::from_le_bytes(hd[8..12].try_into().unwrap());
    let hcrc = u32::from_le_bytes(hd[12..16].try_into().unwrap());
    if crc32c::crc32c(&hd[0..12]) ^ SEAL_MAGIC != hcrc {
        return Check::Unsealed;
    }
    if len as usize + HEADER_BYTES > pin.len() {
        return Check::Mismatch(format!("{h}: sealed length {len} exceeds the slot"));
    }
    buf.resize(len as usize, 0);
    pin.read_at(HEADER_BYTES, buf).expect("in bounds");
    payload(seed as u64, len as usize, want);
    if buf != want || crc32c::crc32c(buf) != pcrc {
        return Check::Mismatch(format!("{h}: payload differs from what was written"));
    }
    Check::Sealed
}

#[derive(Default, Clone, Copy)]
struct Verified {
    sealed: u64,
    unsealed_freed: u64,
    mismatches: u64,
}

/// Verify every live record of every shard; free unsealed slots.
fn verify_all(rt: &Runtime) -> Result<Verified, Error> {
    let mut total = Verified::default();
    let jobs: Vec<_> = (0..rt.shard_count())
        .map(|i| {
            rt.spawn_on(i, |shard| async move {
                let mut v = Verified::default();
                let live: Vec<Handle> = shard.live().collect();
                let (mut buf, mut want) = (Vec::new(), Vec::new());
                for h in live {
                    match check_record(&shard, h, &mut buf, &mut want).await {
                        Check::Sealed => v.sealed += 1,
                        Check::Unsealed => {
                            shard.free(h)?;
                            v.unsealed_freed += 1;
                        }
                        Check::Mismatch(m) => {
                            eprintln!("MISMATCH {m}");
                            v.mismatches += 1;
                        }
                    }
                }
                Ok::<_, Error>(v)
            })
        })
        .collect();
    for j in jobs {
        let v = futures::executor::block_on(j)??;
        total.sealed += v.sealed;
        total.unsealed_freed += v.unsealed_freed;
        total.mismatches += v.mismatches;
    }
    Ok(total)
}

fn parse_sizes(s: &str) -> Result<(u64, u64), String> {
    let parse = |x: &str| {
        x.trim()
            .parse::<u64>()
            .map_err(|e| format!("bad size {x:?}: {e}"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let n = parse(s)?;
            (n, n)
        }
    };
    if lo < HEADER_BYTES as u64 || hi < lo || hi > 16 * 1024 * 1024 {
        return Err(format!(
            "record sizes must satisfy {HEADER_BYTES} <= MIN <= MAX <= 16 MiB"
        ));
    }
    Ok((lo, hi))
}

struct Figures {
    backend: String,
    shards: usize,
    inserted: u64,
    insert_secs: f64,
    freed: u64,
    freed_cross: u64,
    found_before: u64,
    unsealed_before: u64,
    verified_after: u64,
    fds_dir: usize,
    fds_total: usize,
    vmas_dir: usize,
    vmas_total: usize,
    rss_bytes: u64,
    data_reserved: u64,
    data_live: u64,
    metadata_bytes: u64,
    recovery_ms: f64,
    recovery_shard_us_max: u64,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

fn run(args: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let (min, max) = parse_sizes(&args.record_bytes)?;
    if args.fresh {
        // Refuses anything but a closed segalloc data directory.
        segalloc::DataDir::destroy(&args.dir).map_err(|e| format!("--fresh: {e}"))?;
    }
    let existed = args.dir.join(segalloc::datadir::MANIFEST_FILE).exists();
    let mut b = Config::builder(&args.dir);
    if let Some(n) = args.shards {
        b = b.shards(n);
    }
    let cfg = b.build()?;
    let quiet = args.json;
    let say = |s: String| {
        if !quiet {
            println!("{s}");
        }
    };

    // 1. Open and recover: verify what an earlier run left.
    let rt = match Runtime::start(cfg.clone()) {
        Ok(rt) => rt,
        Err(e @ Error::Mismatch { .. }) => {
            return Err(format!("{e}; rerun with --fresh (or --shards) to start over").into());
        }
        Err(e) => return Err(e.into()),
    };
    let shards = rt.shard_count();
    let before = verify_all(&rt)?;
    if existed {
        say(format!(
            "found {} sealed records from an earlier run in {} (verified byte for byte); freed {} unsealed slots",
            before.sealed,
            args.dir.display(),
            before.unsealed_freed
        ));
    } else {
        say(format!(
            "created {} with {shards} shards",
            args.dir.display()
        ));
    }
    let stats0 = futures::executor::block_on(rt.stats())?;
    let backend = stats0.shards[0].io_backend.to_string();

    // 2. Insert from async tasks on every shard.
    let bar = ProgressBar::with_draw_target(Some(args.records), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let show_bar = {
        let bar = bar.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            if !quiet && !bar.is_finished() {
                // Hidden again by indicatif itself when stderr is not a terminal.
                bar.set_draw_target(ProgressDrawTarget::stderr());
            }
        })
    };
    let progress = Arc::new(AtomicU64::new(0));
    let run_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let started = Instant::now();
    let per_shard = args.records / shards as u64;
    let jobs: Vec<_> = (0..shards)
        .map(|i| {
            let n = per_shard + u64::from((i as u64) < args.records % shards as u64);
            let bar = bar.clone();
            let progress = progress.clone();
            rt.spawn_on(i, move |shard| async move {
                let mut handles = Vec::with_capacity(n as usize);
                let mut buf = Vec::with_capacity(max as usize);
                let mut rng = run_seed ^ ((i as u64 + 1) << 48);
                for k in 0..n {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let size = if max == min {
                        min
                    } else {
                        min + rng % (max - min + 1)
                    };
                    let seed = (rng >> 32) as u32;
                    let a = match shard.try_allocate(size)? {
                        Some(a) => a,
                        None => shard.allocate(size).await?,
                    };
                    let len = size as usize - HEADER_BYTES;
                    payload(seed as u64, len, &mut buf);
                    a.write_at(HEADER_BYTES, &buf)?;
                    a.write_at(0, &header(len as u32, seed, &buf))?;
                    handles.push(a.into_handle());
                    if k % 4096 == 4095 {
                        bar.inc(4096);
                        progress.fetch_add(4096, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                }
                Ok::<_, Error>(handles)
            })
        })
        .collect();
    let mut handles: Vec<Vec<Handle>> = Vec::new();
    for j in jobs {
        handles.push(futures::executor::block_on(j)??);
    }
    let insert_secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let _ = show_bar.join();
    let inserted: u64 = handles.iter().map(|v| v.len() as u64).sum();

    // The OS's view while everything is mapped.
    let fds_dir = proc::open_fds_under(&std::fs::canonicalize(&args.dir)?);
    let vmas_dir = proc::vmas_under(&std::fs::canonicalize(&args.dir)?);
    let (fds_total, vmas_total, rss_bytes) =
        (proc::open_fds(), proc::vma_count(), proc::rss_bytes());

    // 3. Free a third: every 6th locally, every 6th + 3 from the next shard.
    let mut freed = 0;
    let mut freed_cross = 0;
    let jobs: Vec<_> = handles
        .iter()
        .enumerate()
        .flat_map(|(i, hs)| {
            let local: Vec<Handle> = hs.iter().copied().step_by(6).collect();
            let cross: Vec<Handle> = hs.iter().copied().skip(3).step_by(6).collect();
            freed += local.len() as u64 + cross.len() as u64;
            let next = (i + 1) % shards;
            if next != i {
                freed_cross += cross.len() as u64;
            }
            [
                rt.spawn_on(i, move |s| async move {
                    local.into_iter().try_for_each(|h| s.free(h))
                }),
                rt.spawn_on(next, move |s| async move {
                    cross.into_iter().try_for_each(|h| s.free(h))
                }),
            ]
        })
        .collect();
    for j in jobs {
        futures::executor::block_on(j)??;
    }
    drop(handles);

    // 4. Sync (covers the forwarded frees) and shut down.
    futures::executor::block_on(rt.sync())?;
    let stats = futures::executor::block_on(rt.stats())?;
    let data_reserved: u64 = stats.shards.iter().map(|s| s.alloc.bytes_reserved).sum();
    let data_live: u64 = stats.shards.iter().map(|s| s.alloc.bytes_live).sum();
    let metadata_bytes: u64 = stats.shards.iter().map(|s| s.alloc.metadata_bytes).sum();
    let live_expected = stats.allocations_live();
    rt.shutdown()?;

    // 5. Reopen and verify every record byte for byte.
    let t = Instant::now();
    let rt = Runtime::start(cfg)?;
    let recovery_ms = t.elapsed().as_secs_f64() * 1e3;
    let rstats = futures::executor::block_on(rt.stats())?;
    let recovery_shard_us_max = rstats
        .shards
        .iter()
        .map(|s| s.alloc.recovery_us)
        .max()
        .unwrap_or(0);
    let after = verify_all(&rt)?;
    rt.shutdown()?;

    let f = Figures {
        backend,
        shards,
        inserted,
        insert_secs,
        freed,
        freed_cross,
        found_before: before.sealed,
        unsealed_before: before.unsealed_freed,
        verified_after: after.sealed,
        fds_dir,
        fds_total,
        vmas_dir,
        vmas_total,
        rss_bytes,
        data_reserved,
        data_live,
        metadata_bytes,
        recovery_ms,
        recovery_shard_us_max,
    };
    let mismatches = before.mismatches + after.mismatches;
    let count_ok = after.sealed == live_expected && after.unsealed_freed == 0;
    if !quiet {
        print_table(&f);
    }
    if !count_ok {
        eprintln!(
            "MISMATCH: {} sealed records verified after reopen, {} expected ({} unsealed)",
            after.sealed, live_expected, after.unsealed_freed
        );
    }
    if args.json {
        println!("{}", to_json(&f, mismatches, count_ok));
    } else if mismatches == 0 && count_ok {
        println!("OK: every surviving record verified");
    }
    Ok(mismatches == 0 && count_ok)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn print_table(f: &Figures) {
    let rate = f.inserted as f64 / f.insert_secs.max(1e-9);
    let meta_pct = 100.0 * f.metadata_bytes as f64 / f.data_live.max(1) as f64;
    println!();
    println!("  {:<34} {}", "io backend", f.backend);
    println!("  {:<34} {}", "shards", f.shards);
    println!(
        "  {:<34} {} in {:.2} s",
        "records inserted", f.inserted, f.insert_secs
    );
    println!("  {:<34} {:.0}", "records/s", rate);
    println!(
        "  {:<34} {} ({} cross-shard)",
        "records freed", f.freed, f.freed_cross
    );
    println!(
        "  {:<34} {} ({} unsealed freed)",
        "records found at start", f.found_before, f.unsealed_before
    );
    println!(
        "  {:<34} {}",
        "records verified after reopen", f.verified_after
    );
    println!(
        "  {:<34} {} in the data dir, {} in the process",
        "open fds (/proc/self/fd)", f.fds_dir, f.fds_total
    );
    println!(
        "  {:<34} {} in the data dir, {} in the process",
        "VMAs (/proc/self/maps)", f.vmas_dir, f.vmas_total
    );
    println!(
        "  {:<34} {:.1} MiB",
        "RSS (/proc/self/status)",
        mib(f.rss_bytes)
    );
    println!(
        "  {:<34} {:.1} MiB reserved, {:.1} MiB live",
        "data",
        mib(f.data_reserved),
        mib(f.data_live)
    );
    println!(
        "  {:<34} {:.2} MiB ({:.3} % of live data)",
        "metadata",
        mib(f.metadata_bytes),
        meta_pct
    );
    println!(
        "  {:<34} {:.1} ms (runtime start), {} us (slowest shard's scan)",
        "recovery", f.recovery_ms, f.recovery_shard_us_max
    );
    println!();
}

fn to_json(f: &Figures, mismatches: u64, count_ok: bool) -> String {
    format!(
        concat!(
            "{{\"io_backend\":\"{}\",\"shards\":{},\"records_inserted\":{},\"insert_secs\":{:.4},",
            "\"records_per_sec\":{:.0},\"records_freed\":{},\"records_freed_cross_shard\":{},",
            "\"records_found_at_start\":{},\"unsealed_freed_at_start\":{},\"records_verified\":{},",
            "\"fds_data_dir\":{},\"fds_process\":{},\"vmas_data_dir\":{},\"vmas_process\":{},",
            "\"rss_bytes\":{},\"data_reserved_bytes\":{},\"data_live_bytes\":{},\"metadata_bytes\":{},",
            "\"recovery_ms\":{:.3},\"recovery_shard_us_max\":{},\"mismatches\":{},\"ok\":{}}}"
        ),
        f.backend,
        f.shards,
        f.inserted,
        f.insert_secs,
        f.inserted as f64 / f.insert_secs.max(1e-9),
        f.freed,
        f.freed_cross,
        f.found_before,
        f.unsealed_before,
        f.verified_after,
        f.fds_dir,
        f.fds_total,
        f.vmas_dir,
        f.vmas_total,
        f.rss_bytes,
        f.data_reserved,
        f.data_live,
        f.metadata_bytes,
        f.recovery_ms,
        f.recovery_shard_us_max,
        mismatches,
        mismatches == 0 && count_ok
    )
}
