//! The same record workload through four designs, side by side in one run:
//!
//! 1. segalloc, one shard and one shard per core;
//! 2. the seed's old design: one `open` + `ftruncate` + `mmap` per segment,
//!    under the default soft fd limit (1024): where it dies and what a
//!    segment costs;
//! 3. the raw-mmap ceiling: one pre-reserved file, one mapping, a bump
//!    pointer, `memcpy` (the physical limit of this workload);
//! 4. the system allocator (not persistent): `alloc` + `memcpy`.
//!
//! ```text
//! cargo run --release --example compare
//! cargo run --release --example compare -- --records 2000000 --record-bytes 100 --json
//! ```
//!
//! Each figure is the median of `--repeat` runs (default 3).

use std::alloc::{Layout, alloc, dealloc};
use std::fs::OpenOptions;
use std::time::{Duration, Instant};

use clap::Parser;
use segalloc::{Config, Error, Runtime};

#[derive(Parser, Debug)]
#[command(about = "segalloc vs the old per-segment mmap, the raw-mmap ceiling and malloc")]
struct Args {
    /// Records per run.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Bytes per record.
    #[arg(long, default_value_t = 100)]
    record_bytes: u64,
    /// Runs per figure (median reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Records per segment of the old design (the seed: 1M records in ~250
    /// segments, so ~4000 each).
    #[arg(long, default_value_t = 4000)]
    old_segment_records: u64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

struct Row {
    name: String,
    records: u64,
    elapsed: Duration,
    note: String,
}

impl Row {
    fn rate(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// segalloc with `shards` shards: every shard inserts its share.
fn segalloc_run(args: &Args, shards: usize) -> Result<Duration, Error> {
    let dir = tempfile::tempdir_in(".").map_err(|e| Error::InvalidConfig(e.to_string()))?;
    let cfg = Config::builder(dir.path().join("d"))
        .shards(shards)
        .build()?;
    let rt = Runtime::start(cfg)?;
    let per = args.records / shards as u64;
    let size = args.record_bytes;
    let t = Instant::now();
    let jobs: Vec<_> = (0..shards)
        .map(|i| {
            rt.spawn_on(i, move |s| async move {
                let payload = vec![0x5Au8; size as usize];
                for k in 0..per {
                    let a = match s.try_allocate(size)? {
                        Some(a) => a,
                        None => s.allocate(size).await?,
                    };
                    a.write_at(0, &payload)?;
                    if k % 4096 == 4095 {
                        tokio::task::yield_now().await;
                    }
                }
                Ok::<_, Error>(())
            })
        })
        .collect();
    for j in jobs {
        futures::executor::block_on(j)??;
    }
    let elapsed = t.elapsed();
    rt.shutdown()?;
    Ok(elapsed)
}

/// The raw-mmap ceiling: one file reserved up front, one mapping, bump.
fn raw_mmap_run(args: &Args) -> std::io::Result<Duration> {
    let dir = tempfile::tempdir_in(".")?;
    let path = dir.path().join("raw");
    let stride = args.record_bytes.div_ceil(16) * 16;
    let total = stride * args.records;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    // Reserve blocks like segalloc does (and unlike a sparse ftruncate).
    f.set_len(0)?;
    std::os::unix::fs::FileExt::write_at(&f, &[0], total - 1)?;
    // SAFETY: the file is private to this run and nobody else maps it.
    let mut map = unsafe {
        memmap2::MmapOptions::new()
            .len(total as usize)
            .map_mut(&f)?
    };
    let payload = vec![0x5Au8; args.record_bytes as usize];
    let t = Instant::now();
    let mut at = 0usize;
    for _ in 0..args.records {
        map[at..at + payload.len()].copy_from_slice(&payload);
        at += stride as usize;
    }
    Ok(t.elapsed())
}

/// The system allocator (reference, not persistent): allocate and fill;
/// then free everything (not timed).
fn malloc_run(args: &Args) -> Duration {
    let layout = Layout::from_size_align(args.record_bytes as usize, 16).expect("layout");
    let payload = vec![0x5Au8; args.record_bytes as usize];
    let mut ptrs = Vec::with_capacity(args.records as usize);
    let t = Instant::now();
    for _ in 0..args.records {
        // SAFETY: layout has non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: `p` points to `record_bytes` writable bytes.
        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), p, payload.len()) };
        ptrs.push(p);
    }
    let e = t.elapsed();
    for p in ptrs {
        // SAFETY: allocated above with this layout.
        unsafe { dealloc(p, layout) };
    }
    e
}

/// The seed's old design under the default soft fd limit (1024): one file,
/// one fd and one mapping per segment, kept open. Returns (records written,
/// segments, time, per-segment setup cost, why it stopped).
fn old_design_run(args: &Args) -> std::io::Result<(u64, u64, Duration, Duration, String)> {
    let dir = tempfile::tempdir_in(".")?;
    let (soft, _) = nofile()?;
    segalloc::set_nofile_soft_limit(1024)?;
    let stride = args.record_bytes.div_ceil(16) * 16;
    let per_seg = args.old_segment_records.max(1);
    let seg_bytes = (per_seg * stride).div_ceil(4096) * 4096;
    let payload = vec![0x5Au8; args.record_bytes as usize];
    let mut segs: Vec<(std::fs::File, memmap2::MmapMut)> = Vec::new();
    let mut setup = Duration::ZERO;
    let mut written = 0u64;
    let t = Instant::now();
    let mut why = String::from("completed");
    while written < args.records {
        let s0 = Instant::now();
        let (_, map) = match new_segment(dir.path(), &mut segs, seg_bytes) {
            Ok(seg) => seg,
            Err(e) => {
                why = format!("{e} after {} segments", segs.len());
                break;
            }
        };
        setup += s0.elapsed();
        let mut at = 0usize;
        for _ in 0..per_seg.min(args.records - written) {
            map[at..at + payload.len()].copy_from_slice(&payload);
            at += stride as usize;
            written += 1;
        }
    }
    let elapsed = t.elapsed();
    let n = segs.len() as u64;
    // Then keep going (empty segments) until the design dies, as it would
    // with more records.
    while why == "completed" {
        if let Err(e) = new_segment(dir.path(), &mut segs, seg_bytes) {
            why = format!(
                "dies at segment {} (~{} records): {e}",
                segs.len() + 1,
                segs.len() as u64 * per_seg
            );
        } else if segs.len() > 1_000_000 {
            why = "did not die within 1,000,000 segments".into();
        }
    }
    drop(segs);
    segalloc::set_nofile_soft_limit(soft)?;
    Ok((written, n, elapsed, setup / n.max(1) as u32, why))
}

/// The old design's segment: its own file, descriptor and mapping, kept.
fn new_segment<'a>(
    dir: &std::path::Path,
    segs: &'a mut Vec<(std::fs::File, memmap2::MmapMut)>,
    seg_bytes: u64,
) -> Result<&'a mut (std::fs::File, memmap2::MmapMut), String> {
    let path = dir.join(format!("seg-{}", segs.len()));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("open failed: {e}"))?;
    f.set_len(seg_bytes)
        .map_err(|e| format!("ftruncate failed: {e}"))?;
    // SAFETY: the file is private to this run and nobody else maps it.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(seg_bytes as usize)
            .map_mut(&f)
    }
    .map_err(|e| format!("mmap failed: {e}"))?;
    segs.push((f, map));
    Ok(segs.last_mut().expect("just pushed"))
}

fn nofile() -> std::io::Result<(u64, u64)> {
    // Read the soft limit back from /proc (no raw syscall outside the library).
    let s = std::fs::read_to_string("/proc/self/limits")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| std::io::Error::other("no fd limit in /proc/self/limits"))?;
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    Ok((nums[0], nums[1]))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let r = args.repeat.max(1);
    let mut rows = Vec::new();

    let seg1 = median(
        (0..r)
            .map(|_| segalloc_run(&args, 1))
            .collect::<Result<_, _>>()?,
    );
    rows.push(Row {
        name: "segalloc, 1 shard".into(),
        records: args.records,
        elapsed: seg1,
        note: "persistent, crash-safe".into(),
    });
    if cores > 1 {
        let segn = median(
            (0..r)
                .map(|_| segalloc_run(&args, cores))
                .collect::<Result<_, _>>()?,
        );
        rows.push(Row {
            name: format!("segalloc, {cores} shards"),
            records: args.records,
            elapsed: segn,
            note: "persistent, crash-safe".into(),
        });
    }
    let (w, n, old_t, per_seg, why) = old_design_run(&args)?;
    rows.push(Row {
        name: "old design: open+mmap per segment".into(),
        records: w,
        elapsed: old_t,
        note: format!(
            "{n} segments, {:.1} us setup each; {why}",
            per_seg.as_secs_f64() * 1e6
        ),
    });
    let raw = median(
        (0..r)
            .map(|_| raw_mmap_run(&args))
            .collect::<Result<_, _>>()?,
    );
    rows.push(Row {
        name: "raw mmap ceiling (bump pointer)".into(),
        records: args.records,
        elapsed: raw,
        note: "one pre-reserved file, no allocator".into(),
    });
    let sys = median((0..r).map(|_| malloc_run(&args)).collect());
    rows.push(Row {
        name: "system allocator (malloc)".into(),
        records: args.records,
        elapsed: sys,
        note: "not persistent".into(),
    });

    let base = rows[0].rate();
    if !args.json {
        println!(
            "{} records of {} B, median of {r}, {cores} cores",
            args.records, args.record_bytes
        );
        println!(
            "{:<36} {:>10} {:>14} {:>12}  note",
            "design", "records", "records/s", "vs segalloc"
        );
        for row in &rows {
            println!(
                "{:<36} {:>10} {:>14.0} {:>11.2}x  {}",
                row.name,
                row.records,
                row.rate(),
                row.rate() / base,
                row.note
            );
        }
        let ceiling = rows
            .iter()
            .find(|r| r.name.starts_with("raw"))
            .map(|r| r.rate())
            .unwrap_or(1.0);
        println!(
            "segalloc 1 shard / raw-mmap ceiling = {:.2}",
            base / ceiling
        );
    }
    let items: Vec<String> = rows
        .iter()
        .map(|row| {
            format!(
                "{{\"design\":\"{}\",\"records\":{},\"records_per_sec\":{:.0},\"ratio_to_segalloc_1_shard\":{:.4},\"note\":\"{}\"}}",
                row.name,
                row.records,
                row.rate(),
                row.rate() / base,
                row.note.replace('"', "'")
            )
        })
        .collect();
    if args.json {
        println!(
            "{{\"records\":{},\"record_bytes\":{},\"repeat\":{r},\"cores\":{cores},\"rows\":[{}]}}",
            args.records,
            args.record_bytes,
            items.join(",")
        );
    }
    Ok(())
}
