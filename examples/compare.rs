//! segalloc beside its baselines, on the access patterns users have, each
//! measured side by side in one run (medians of `--repeat` runs):
//!
//! | pattern | baseline in the same run | goal |
//! |---|---|---|
//! | fill: allocate + write, 1 shard | raw-mmap ceiling: a file reserved with `fallocate`, mapped shared, bump pointer at segalloc's slot stride, `memcpy` | ≥ 0.8× its rate |
//! | fill, every shard | 1 shard × shard count | ≥ 0.9 efficiency |
//! | alloc + free, LIFO pair | glibc `malloc` + `free` | ≤ 1.5× its time |
//! | fill, free all, refill | glibc | ≤ 2× its time |
//! | random mix: free a random live one, allocate 16 B – 4 KiB | glibc | ≤ 0.5× its time |
//! | producer/consumer: shard A allocates and sends batches of handles to shard B, which frees them | the same, B sending each batch back for A to free | ≥ 0.8× its rate |
//! | pin + unpin of a mapped slot | – | ≤ 10 ns |
//! | shard sweep, 1 free in 4 sent to the next shard's task | 1 shard (the next shard's task is its own) × shard count | ≥ 0.9 efficiency |
//!
//! The figures of one comparison are measured in turns (one run of each,
//! `--repeat` times, the order reversed every other turn), so a slower
//! period weighs on both alike; the fills excepted, whose designs run
//! `--repeat` times each in a row (the time of a file fill depends on what
//! ran just before it on a virtual machine, see the README). The raw
//! ceilings are the best of their runs, the other figures medians: a
//! ceiling measured slow would make the fill's goal look met.
//!
//! Also shown: the raw ceiling keeping, per record, its 8 B offset or 32 B
//! (a handle's size) in a vector, as the segalloc fill keeps its handles
//! (the vectors of both made ready before the timing: a harness's page
//! faults are no design's), the raw ceiling on a sparse file (`ftruncate` only), glibc
//! fill, the producer/consumer's shard A alone (freeing its own batches,
//! handing nothing over: no channel, no consumer), the shard sweep with its
//! cross-shard frees carried back to their owner by the workload itself,
//! batched as segalloc batches them (the same handles crossing the same
//! cores without segalloc's forwarding code), and the old design (one
//! `open` + `ftruncate` + `mmap` per segment under the default soft fd
//! limit of 1024: where it dies), and, before the producer/consumer and
//! the sweep, the round trip of one cache line between the CPUs of shards
//! 0 and 1 (two threads pinned there): the cross-shard rows move with it.
//! Each segalloc fill also prints what the whole process spent on it per
//! record, medians of its runs (`getrusage(RUSAGE_SELF)`, so every thread:
//! the shards and the ring's io workers): `CPU` (user + system ns per
//! record, and the CPUs that kept busy) and `page faults` (minor faults per
//! 1M records, the prefault's included). With
//! io_uring a one-shard fill keeps more than one CPU busy (its prefault
//! runs on the io workers of another CPU), which a fill of every shard
//! cannot: its efficiency is against that. With `SEGALLOC_IO=sync` nothing
//! prefaults, and only the shard's thread works. The data files
//! of every timed phase are written back (`fdatasync`) and deleted before
//! the next phase, so no phase pays for another's dirty pages, and every
//! file fill first fills and deletes a scratch file of what it will touch
//! (untimed), so that none pays the slow first touches of page cache that
//! follow a pause on the machines measured (`work::warm_up_file_pages`).
//!
//! ```text
//! cargo run --release --example compare                        # about 20 seconds
//! cargo run --release --example compare -- --records 10000000  # the 10M fill
//! cargo run --release --example compare -- --json              # one JSON object on the last line
//! cargo run --release --example compare -- --fill-only --madvise random  # fills under another advice
//! ```

#[path = "../benches/alloc_workload.rs"]
mod work;
#[path = "../benches/sweep_workload.rs"]
mod workload;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use segalloc::{Config, Error, MadvisePolicy, Runtime, Shard};
use work::{Kept, MIX_SEED, PAIR_BYTES};

#[path = "common/cli.rs"]
mod cli;

#[derive(Parser, Debug)]
#[command(about = "segalloc beside the raw-mmap ceiling and glibc, pattern by pattern")]
struct Args {
    /// Records of the fill patterns (per shard).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    records: u64,
    /// Bytes per record of the fill patterns.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    record_bytes: u64,
    /// Alloc + free pairs of the LIFO pattern.
    #[arg(long, default_value_t = 5_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pairs: u64,
    /// Live allocations of the random mix and of the refill pattern.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    live: u64,
    /// Operations of the random mix.
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    mix_ops: u64,
    /// Operations per shard of the shard sweep.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
    sweep_ops: u64,
    /// Runs per figure (the median is reported).
    #[arg(long, default_value_t = 3, value_parser = cli::at_least_one)]
    repeat: usize,
    /// Records per segment of the old design.
    #[arg(long, default_value_t = 4000, value_parser = clap::value_parser!(u64).range(1..))]
    old_segment_records: u64,
    /// Where the data files go (default: the temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Whole-window advice of segalloc's windows: normal, random or
    /// sequential.
    #[arg(long, default_value = "normal", value_parser = parse_advice)]
    madvise: MadvisePolicy,
    /// Run the fill patterns only.
    #[arg(long)]
    fill_only: bool,
}

fn parse_advice(s: &str) -> Result<MadvisePolicy, String> {
    match s {
        "normal" => Ok(MadvisePolicy::Normal),
        "random" => Ok(MadvisePolicy::Random),
        "sequential" => Ok(MadvisePolicy::Sequential),
        _ => Err(format!("{s}: expected normal, random or sequential")),
    }
}

type BoxError = Box<dyn std::error::Error>;

fn tempdir(args: &Args) -> std::io::Result<tempfile::TempDir> {
    match &args.dir {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
}

/// The figures of `repeat` (at least one) runs of `f`.
fn runs<F: FnMut() -> Result<f64, BoxError>>(
    repeat: usize,
    mut f: F,
) -> Result<Vec<f64>, BoxError> {
    (0..repeat.max(1)).map(|_| f()).collect()
}

/// The median of `v` (the upper one of an even count); `v` is not empty.
fn middle(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The median of `repeat` runs of `f`.
fn median<F: FnMut() -> Result<f64, BoxError>>(repeat: usize, f: F) -> Result<f64, BoxError> {
    Ok(middle(runs(repeat, f)?))
}

/// The highest of `repeat` runs of `f`: a ceiling, which a slow run (on a
/// virtual machine, a first touch of memory after the machine idled costs
/// several times more) can only understate.
fn best<F: FnMut() -> Result<f64, BoxError>>(repeat: usize, f: F) -> Result<f64, BoxError> {
    Ok(runs(repeat, f)?.into_iter().fold(f64::MIN, f64::max))
}

/// The medians of `repeat` runs of each of `fs`, run in turns (one of
/// each, then again, in the reverse order every other turn), so that a
/// slower period of the machine, or what one run leaves to the next,
/// weighs on every figure of a comparison alike.
fn in_turns<const N: usize>(
    repeat: usize,
    fs: [&mut dyn FnMut() -> Result<f64, BoxError>; N],
) -> Result<[f64; N], BoxError> {
    let mut figures: [Vec<f64>; N] = std::array::from_fn(|_| Vec::new());
    for turn in 0..repeat.max(1) {
        for i in 0..N {
            let i = if turn % 2 == 0 { i } else { N - 1 - i };
            figures[i].push(fs[i]()?);
        }
    }
    Ok(figures.map(middle))
}

fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

fn ns_per(d: Duration, n: u64) -> f64 {
    d.as_nanos() as f64 / n.max(1) as f64
}

/// Start a runtime of `shards` shards in a fresh directory.
fn runtime(args: &Args, shards: usize) -> Result<(tempfile::TempDir, Runtime), BoxError> {
    let dir = tempdir(args)?;
    let cfg = Config::builder(dir.path().join("d"))
        .shards(shards)
        .madvise_policy(args.madvise)
        .build()?;
    Ok((dir, Runtime::start(cfg)?))
}

/// Write everything back and stop (not timed).
fn finish(rt: Runtime) -> Result<(), BoxError> {
    futures::executor::block_on(rt.sync())?;
    rt.shutdown()?;
    Ok(())
}

/// segalloc's slot for `size`: the raw ceiling's stride.
fn slot_bytes(args: &Args) -> Result<u64, BoxError> {
    let (_dir, rt) = runtime(args, 1)?;
    let size = args.record_bytes;
    let len = futures::executor::block_on(rt.spawn_on(0, move |s| async move {
        Ok::<_, Error>(s.allocate(size).await?.len() as u64)
    }))??;
    rt.shutdown()?;
    Ok(len)
}

/// One segalloc fill: its rate, and what the whole process spent over it
/// (every thread: the shards and, with io_uring, the ring's io workers,
/// which take the page faults of the prefault ahead of the fill).
#[derive(Clone, Copy)]
struct FillRun {
    rate: f64,
    /// CPU ns per record.
    cpu_ns: f64,
    /// CPU time over wall time: the CPUs kept busy.
    busy: f64,
    /// Minor page faults per record.
    faults: f64,
}

/// The process's CPU time (user + system) and minor page faults so far,
/// every thread counted (`getrusage(RUSAGE_SELF)`).
fn process_usage() -> Result<(Duration, u64), BoxError> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let d = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    Ok((
        d(u.user_time()) + d(u.system_time()),
        u.minor_page_faults() as u64,
    ))
}

/// The medians, each taken apart, of `repeat` runs of `f`.
fn median_fill<F: FnMut() -> Result<FillRun, BoxError>>(
    repeat: usize,
    mut f: F,
) -> Result<FillRun, BoxError> {
    let all = (0..repeat.max(1))
        .map(|_| f())
        .collect::<Result<Vec<_>, _>>()?;
    let of = |g: fn(&FillRun) -> f64| middle(all.iter().map(g).collect());
    Ok(FillRun {
        rate: of(|r| r.rate),
        cpu_ns: of(|r| r.cpu_ns),
        busy: of(|r| r.busy),
        faults: of(|r| r.faults),
    })
}

/// Fill: every shard allocates and writes `records` records, handles kept.
/// The process's CPU time and page faults are read just before the timing
/// and again 20 ms after it (untimed): a thread still running when it
/// ends, such as an io worker finishing a prefault, is counted only up to
/// its last scheduler tick or switch. The prefaults in flight at the end
/// (at most 1 MiB a shard, faulted in ahead of records never written) are
/// counted with the fill, against the fill's wall time.
fn segalloc_fill(args: &Args, shards: usize, stride: u64) -> Result<FillRun, BoxError> {
    let (dir, rt) = runtime(args, shards)?;
    let (n, size) = (args.records, args.record_bytes);
    // What the fill touches: its records, the handles it keeps, and a
    // growth step of each shard.
    let handle = std::mem::size_of::<segalloc::Handle>() as u64;
    let footprint = shards as u64 * (n * (stride + handle) + (64 << 20));
    work::warm_up_file_pages(dir.path(), footprint)?;
    // The handles go to vectors made ready before the timing, as the raw
    // ceilings' kept bytes do: neither pays the page faults of a harness's
    // vector (about 12 ns a record).
    let mut kept: Vec<Vec<segalloc::Handle>> =
        (0..shards).map(|_| work::touched_vec(n as usize)).collect();
    let (cpu0, faults0) = process_usage()?;
    let t = Instant::now();
    let jobs: Vec<_> = (0..shards)
        .map(|i| {
            let hs = kept.pop().expect("one per shard");
            rt.spawn_on(i, move |s| async move {
                let payload = vec![0x5Au8; size as usize];
                Ok::<_, Error>(work::fill_into(&s, n, &payload, hs).await?.len())
            })
        })
        .collect();
    for j in jobs {
        futures::executor::block_on(j)??;
    }
    let took = t.elapsed();
    std::thread::sleep(Duration::from_millis(20));
    let (cpu1, faults1) = process_usage()?;
    let records = n * shards as u64;
    let cpu = cpu1.saturating_sub(cpu0);
    let run = FillRun {
        rate: per_sec(records, took),
        cpu_ns: ns_per(cpu, records),
        busy: cpu.as_secs_f64() / took.as_secs_f64().max(1e-9),
        faults: (faults1 - faults0) as f64 / records.max(1) as f64,
    };
    finish(rt)?;
    Ok(run)
}

/// The raw-mmap ceiling: one file reserved up front (`fallocate`, or a
/// sparse `ftruncate`), mapped shared, a bump pointer at `stride`, `memcpy`.
fn raw_fill(args: &Args, stride: u64, sparse: bool, kept: Kept) -> Result<f64, BoxError> {
    let dir = tempdir(args)?;
    let took = work::raw_fill(
        &dir.path().join("raw"),
        stride,
        args.records,
        args.record_bytes,
        sparse,
        kept,
    )?;
    Ok(per_sec(args.records, took))
}

/// glibc fill (not persistent): allocate and write, pointers kept.
fn malloc_fill(args: &Args) -> Result<f64, BoxError> {
    let payload = vec![0x5Au8; args.record_bytes as usize];
    let t = Instant::now();
    let ps = work::malloc_fill(args.records, &payload);
    let rate = per_sec(args.records, t.elapsed());
    work::malloc_free_all(ps, args.record_bytes);
    Ok(rate)
}

/// Before a timed part: the set-up faulted pages in ahead (prefault through
/// the ring, on a core free of shards beside the timed loop): let that
/// finish and write the pages back, so the timed part does not share the
/// machine with it. (A segalloc `sync` here would change what is measured:
/// slots freed after it wait for the next.)
async fn settle(s: &Shard) {
    s.mappings().settle_prefaults().await;
    nix::unistd::sync();
}

/// Run `f` on shard 0 of a fresh one-shard runtime; its figure.
fn on_one_shard<F, Fut>(args: &Args, f: F) -> Result<f64, BoxError>
where
    F: FnOnce(Shard) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<f64, Error>> + 'static,
{
    let (_dir, rt) = runtime(args, 1)?;
    let v = futures::executor::block_on(rt.spawn_on(0, f))??;
    finish(rt)?;
    Ok(v)
}

/// LIFO pair: ns per allocate + free of one 64 B slot, beside 50,000 live
/// ones of the same class (every other slot free).
fn segalloc_pair(args: &Args) -> Result<f64, BoxError> {
    let pairs = args.pairs;
    on_one_shard(args, move |s| async move {
        let _pool = work::warm(&s, PAIR_BYTES, 100_000).await?;
        settle(&s).await;
        Ok(ns_per(work::pairs(&s, PAIR_BYTES, pairs).await?, pairs))
    })
}

fn malloc_pair(args: &Args) -> Result<f64, BoxError> {
    let pool: Vec<*mut u8> = (0..50_000).map(|_| work::malloc(PAIR_BYTES)).collect();
    let ns = ns_per(work::malloc_pairs(PAIR_BYTES, args.pairs), args.pairs);
    work::malloc_free_all(pool, PAIR_BYTES);
    Ok(ns)
}

/// Fill `live` slots of `record_bytes`, free them all, fill again: ns per
/// operation over the three phases.
fn segalloc_refill(args: &Args) -> Result<f64, BoxError> {
    let (live, size) = (args.live, args.record_bytes);
    on_one_shard(args, move |s| async move {
        let payload = vec![0x5Au8; size as usize];
        let t = Instant::now();
        work::free_all(&s, work::fill(&s, live, &payload).await?)?;
        let _hs = work::fill(&s, live, &payload).await?;
        Ok(ns_per(t.elapsed(), 3 * live))
    })
}

fn malloc_refill(args: &Args) -> Result<f64, BoxError> {
    let payload = vec![0x5Au8; args.record_bytes as usize];
    let t = Instant::now();
    work::malloc_free_all(work::malloc_fill(args.live, &payload), args.record_bytes);
    let ps = work::malloc_fill(args.live, &payload);
    let ns = ns_per(t.elapsed(), 3 * args.live);
    work::malloc_free_all(ps, args.record_bytes);
    Ok(ns)
}

/// Random mix: `live` allocations of 16 B – 4 KiB, then each operation
/// frees a random live one and allocates a new one: ns per operation.
fn segalloc_mix(args: &Args) -> Result<f64, BoxError> {
    let (live, ops) = (args.live, args.mix_ops);
    on_one_shard(args, move |s| async move {
        let mut rng = MIX_SEED;
        let mut hs = work::mix_fill(&s, live, &mut rng).await?;
        settle(&s).await;
        Ok(ns_per(work::mix(&s, &mut hs, &mut rng, ops).await?, ops))
    })
}

fn malloc_mix(args: &Args) -> Result<f64, BoxError> {
    let mut rng = MIX_SEED;
    let mut ps = work::malloc_mix_fill(args.live, &mut rng);
    let ns = ns_per(
        work::malloc_mix(&mut ps, &mut rng, args.mix_ops),
        args.mix_ops,
    );
    work::malloc_mix_free(ps);
    Ok(ns)
}

/// Pin + unpin of a mapped slot on its own shard: ns per pair.
fn segalloc_pin(args: &Args) -> Result<f64, BoxError> {
    let n = args.pairs;
    on_one_shard(args, move |s| async move {
        let h = s.allocate(PAIR_BYTES).await?.into_handle();
        Ok(ns_per(work::pins(&s, h, n)?, n))
    })
}

/// Producer/consumer on two shards: shard 0 allocates and writes records
/// and hands them over in batches; shard 1 frees them (`cross`: segalloc
/// forwards the frees back to shard 0) or sends each batch back for shard
/// 0 to free. Records per second until every free is applied.
fn producer_consumer(args: &Args, cross: bool) -> Result<f64, BoxError> {
    let (_dir, rt) = runtime(args, 2)?;
    let took = work::producer_consumer(&rt, args.records, args.record_bytes, cross)?;
    finish(rt)?;
    Ok(per_sec(args.records, took))
}

/// The producer of the producer/consumer pattern alone (frees its own
/// batches, hands nothing over): records per second.
fn producer_alone(args: &Args) -> Result<f64, BoxError> {
    let (_dir, rt) = runtime(args, 2)?;
    let took = work::producer_alone(&rt, args.records, args.record_bytes)?;
    finish(rt)?;
    Ok(per_sec(args.records, took))
}

/// The shard sweep's workload (one free in four sent to the next shard's
/// task: with one shard, its own) on `shards` shards: operations per second
/// over all shards. `by_hand`: those frees carried back to their owner by
/// the workload instead of segalloc.
fn sweep_rate(args: &Args, shards: usize, by_hand: bool) -> Result<f64, BoxError> {
    let dir = tempdir(args)?;
    let rt = workload::start(dir.path(), shards)?;
    let r = match by_hand {
        true => workload::run_by_hand(&rt, args.sweep_ops, 64, 4)?,
        false => workload::run_with(&rt, args.sweep_ops, 64, 4)?,
    };
    finish(rt)?;
    Ok(r.ops_per_sec())
}

/// The old design under the default soft fd limit (1024): one file, one fd
/// and one mapping per segment, kept. Returns (records written, segments,
/// records/s, why it stopped).
fn old_design_run(args: &Args) -> Result<(u64, u64, f64, String), BoxError> {
    let dir = tempdir(args)?;
    let (soft, _) = nofile()?;
    segalloc::set_nofile_soft_limit(1024)?;
    let stride = args.record_bytes.div_ceil(16) * 16;
    let per_seg = args.old_segment_records.max(1);
    let seg_bytes = (per_seg * stride).div_ceil(4096) * 4096;
    let payload = vec![0x5Au8; args.record_bytes as usize];
    let mut segs: Vec<(std::fs::File, memmap2::MmapMut)> = Vec::new();
    let mut written = 0u64;
    let t = Instant::now();
    let mut why = String::new();
    while written < args.records {
        let (_, map) = match new_segment(dir.path(), &mut segs, seg_bytes) {
            Ok(seg) => seg,
            Err(e) => {
                why = format!("{e} after {} segments", segs.len());
                break;
            }
        };
        let mut at = 0usize;
        for _ in 0..per_seg.min(args.records - written) {
            map[at..at + payload.len()].copy_from_slice(&payload);
            at += stride as usize;
            written += 1;
        }
    }
    let rate = per_sec(written, t.elapsed());
    let n = segs.len() as u64;
    // Keep going (empty segments) until the design dies, as it would with
    // more records.
    while why.is_empty() {
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
    Ok((written, n, rate, why))
}

/// The old design's segment: its own file, descriptor and mapping, kept.
fn new_segment<'a>(
    dir: &Path,
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

/// One design's figure.
struct Design {
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
}

/// One row of the goal table: segalloc's figure, the baseline measured in
/// the same run, their ratio (or segalloc's figure alone) and the goal.
struct Goal {
    pattern: &'static str,
    ratio_of: &'static str,
    unit: &'static str,
    segalloc: f64,
    baseline: Option<f64>,
    ratio: f64,
    at_least: bool,
    goal: f64,
}

impl Goal {
    fn met(&self) -> bool {
        if self.at_least {
            self.ratio >= self.goal
        } else {
            self.ratio <= self.goal
        }
    }
    fn goal_text(&self) -> String {
        format!("{} {}", if self.at_least { ">=" } else { "<=" }, self.goal)
    }
}

fn design(
    name: impl Into<String>,
    value: f64,
    unit: &'static str,
    note: impl Into<String>,
) -> Design {
    Design {
        name: name.into(),
        value,
        unit,
        note: note.into(),
    }
}

/// The fill patterns: designs and the first two goals.
fn fills(
    args: &Args,
    cores: usize,
    d: &mut Vec<Design>,
    g: &mut Vec<Goal>,
) -> Result<(), BoxError> {
    let r = args.repeat;
    let stride = slot_bytes(args)?;
    let fill1 = median_fill(r, || segalloc_fill(args, 1, stride))?;
    let seg1 = fill1.rate;
    let raw = best(r, || raw_fill(args, stride, false, Kept::Nothing))?;
    let raw_offsets = best(r, || raw_fill(args, stride, false, Kept::Offset))?;
    let raw_handles = best(r, || raw_fill(args, stride, false, Kept::HandleSized))?;
    let sparse = best(r, || raw_fill(args, stride, true, Kept::Nothing))?;
    let sys = median(r, || malloc_fill(args))?;
    let filln = median_fill(r, || segalloc_fill(args, cores, stride))?;
    let segn = filln.rate;
    let rs = "records/s";
    d.push(design(
        "segalloc fill, 1 shard",
        seg1,
        rs,
        "persistent, crash-safe",
    ));
    d.push(design(
        format!("segalloc fill, {cores} shards"),
        segn,
        rs,
        format!("{} records per shard", args.records),
    ));
    for (shards, f) in [(1, fill1), (cores, filln)] {
        let of = if shards == 1 {
            "1 shard".to_string()
        } else {
            format!("{shards} shards")
        };
        d.push(design(
            format!("segalloc fill, {of}: CPU"),
            f.cpu_ns,
            "CPU ns/record",
            format!(
                "user + system time of every thread (shards, io workers): {:.2} CPUs busy",
                f.busy
            ),
        ));
        d.push(design(
            format!("segalloc fill, {of}: page faults"),
            f.faults * 1e6,
            "per 1M records",
            "minor faults of every thread, the prefault's included",
        ));
    }
    d.push(design(
        "raw mmap ceiling (fallocate)",
        raw,
        rs,
        format!(
            "bump pointer, {stride} B stride, memcpy; best of {}",
            args.repeat
        ),
    ));
    d.push(design(
        "raw mmap ceiling, offsets kept",
        raw_offsets,
        rs,
        format!(
            "the same, each record's 8 B offset kept; segalloc 1 shard = {:.2} of it",
            seg1 / raw_offsets
        ),
    ));
    d.push(design(
        "raw mmap ceiling, 32 B kept",
        raw_handles,
        rs,
        format!(
            "the same, a handle's 32 B kept per record; segalloc 1 shard = {:.2} of it",
            seg1 / raw_handles
        ),
    ));
    d.push(design(
        "raw mmap ceiling (sparse ftruncate)",
        sparse,
        rs,
        format!("blocks allocated on first write; best of {}", args.repeat),
    ));
    d.push(design("glibc malloc fill", sys, rs, "not persistent"));
    g.push(Goal {
        pattern: "fill, 1 shard",
        ratio_of: "segalloc / raw ceiling",
        unit: rs,
        segalloc: seg1,
        baseline: Some(raw),
        ratio: seg1 / raw,
        at_least: true,
        goal: 0.8,
    });
    g.push(Goal {
        pattern: "fill, every shard",
        ratio_of: "efficiency vs 1 shard x shards",
        unit: rs,
        segalloc: segn,
        baseline: Some(seg1 * cores as f64),
        ratio: segn / (seg1 * cores as f64),
        at_least: true,
        goal: 0.9,
    });
    Ok(())
}

/// The allocator-only patterns against glibc, and pin + unpin.
fn allocator(args: &Args, d: &mut Vec<Design>, g: &mut Vec<Goal>) -> Result<(), BoxError> {
    let r = args.repeat;
    let ns = "ns/op";
    let time_goal = |pattern, s: f64, b: f64, goal| Goal {
        pattern,
        ratio_of: "segalloc time / glibc time",
        unit: ns,
        segalloc: s,
        baseline: Some(b),
        ratio: s / b,
        at_least: false,
        goal,
    };
    let [s, b] = in_turns(r, [&mut || segalloc_pair(args), &mut || malloc_pair(args)])?;
    g.push(time_goal("alloc + free, LIFO pair", s, b, 1.5));
    let [s, b] = in_turns(
        r,
        [&mut || segalloc_refill(args), &mut || malloc_refill(args)],
    )?;
    g.push(time_goal("fill, free all, refill", s, b, 2.0));
    let [s, b] = in_turns(r, [&mut || segalloc_mix(args), &mut || malloc_mix(args)])?;
    g.push(time_goal("random mix 16 B - 4 KiB", s, b, 0.5));
    d.extend(round_trip_row("producer/consumer")?);
    let [c, l, alone] = in_turns(
        r,
        [
            &mut || producer_consumer(args, true),
            &mut || producer_consumer(args, false),
            &mut || producer_alone(args),
        ],
    )?;
    d.push(design(
        "producer/consumer's A alone",
        alone,
        "records/s",
        "frees its own batches, hands nothing over",
    ));
    g.push(Goal {
        pattern: "producer/consumer",
        ratio_of: "cross-shard frees / local frees",
        unit: "records/s",
        segalloc: c,
        baseline: Some(l),
        ratio: c / l,
        at_least: true,
        goal: 0.8,
    });
    let p = median(r, || segalloc_pin(args))?;
    g.push(Goal {
        pattern: "pin + unpin, mapped",
        ratio_of: "ns",
        unit: ns,
        segalloc: p,
        baseline: None,
        ratio: p,
        at_least: false,
        goal: 10.0,
    });
    Ok(())
}

/// Round trips of one cache line between the CPUs shards 0 and 1 run on
/// (the first two the process may use: `Runtime::start` pins shard `i` to
/// the `i`-th), the line passed back and forth by two threads pinned
/// there: ns per round trip, the median of 5 bursts of 20,000. What a
/// hand-off between two shards costs on this machine at this moment: on
/// the virtual machines the README's figures come from, it moved between
/// 63 and 319 ns from one minute to the next. `None` with one CPU.
fn core_round_trip_ns() -> Result<Option<f64>, BoxError> {
    use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
    use nix::unistd::Pid;
    use std::sync::atomic::{AtomicU64, Ordering};
    const BURST: u64 = 20_000;
    let allowed = sched_getaffinity(Pid::from_raw(0))?;
    let cpus: Vec<usize> = (0..CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .take(2)
        .collect();
    let &[ping_cpu, echo_cpu] = cpus.as_slice() else {
        return Ok(None);
    };
    // Best effort: unpinned (a CPU set the process may not use after all),
    // the threads still pass the line, wherever they run.
    let pin = |cpu: usize| {
        let mut set = CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = sched_setaffinity(Pid::from_raw(0), &set);
        }
    };
    // The pinger writes odd values, the echo the even value after each.
    let line = AtomicU64::new(0);
    let bursts = std::thread::scope(|s| {
        s.spawn(|| {
            pin(echo_cpu);
            loop {
                let v = line.load(Ordering::Acquire);
                if v == u64::MAX {
                    return;
                }
                if v % 2 == 1 {
                    line.store(v + 1, Ordering::Release);
                }
                std::hint::spin_loop();
            }
        });
        s.spawn(|| {
            pin(ping_cpu);
            let mut v = 0;
            let bursts: Vec<f64> = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    for _ in 0..BURST {
                        line.store(v + 1, Ordering::Release);
                        v += 2;
                        while line.load(Ordering::Acquire) != v {
                            std::hint::spin_loop();
                        }
                    }
                    t.elapsed().as_nanos() as f64 / BURST as f64
                })
                .collect();
            line.store(u64::MAX, Ordering::Release);
            bursts
        })
        .join()
        .expect("pinger")
    });
    Ok(Some(middle(bursts)))
}

/// A design row for [`core_round_trip_ns`], measured now, before `what`.
fn round_trip_row(what: &str) -> Result<Option<Design>, BoxError> {
    Ok(core_round_trip_ns()?.map(|ns| {
        design(
            "cross-core round trip",
            ns,
            "ns",
            format!(
                "before {what}: one cache line between the CPUs of shards 0 and 1, median of 5 bursts"
            ),
        )
    }))
}

/// The shard sweep: the lowest efficiency over 2 ..= cores shards; beside
/// it, at the same shard count, the efficiency of the same pattern with the
/// frees carried back by hand.
fn sweep(
    args: &Args,
    cores: usize,
    d: &mut Vec<Design>,
    g: &mut Vec<Goal>,
) -> Result<(), BoxError> {
    let r = args.repeat;
    d.extend(round_trip_row("the sweep")?);
    // (efficiency, rate, one shard's rate, shards, by hand's efficiency)
    let mut worst = (f64::INFINITY, 0.0, 0.0, 1, 0.0);
    for n in 2..=cores.max(2) {
        let [one, rate, hand_one, hand] = in_turns(
            r,
            [
                &mut || sweep_rate(args, 1, false),
                &mut || sweep_rate(args, n, false),
                &mut || sweep_rate(args, 1, true),
                &mut || sweep_rate(args, n, true),
            ],
        )?;
        let eff = rate / (n as f64 * one);
        if eff < worst.0 {
            worst = (eff, rate, one, n, hand / (n as f64 * hand_one));
        }
    }
    d.push(design(
        "shard sweep, frees carried by hand",
        worst.4,
        "efficiency",
        format!(
            "{} shards; batches of 1,024 sent back by the next shard's task, freed by the owner's",
            worst.3
        ),
    ));
    g.push(Goal {
        pattern: "shard sweep, 1 in 4 cross",
        ratio_of: "lowest efficiency, 2..=cores shards",
        unit: "ops/s",
        segalloc: worst.1,
        baseline: Some(worst.2 * worst.3 as f64),
        ratio: worst.0,
        at_least: true,
        goal: 0.9,
    });
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), BoxError> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let (mut d, mut g) = (Vec::new(), Vec::new());
    fills(&args, cores, &mut d, &mut g)?;
    if !args.fill_only {
        allocator(&args, &mut d, &mut g)?;
        sweep(&args, cores, &mut d, &mut g)?;
        let (w, n, rate, why) = old_design_run(&args)?;
        d.push(design(
            "old design: open+mmap per segment",
            rate,
            "records/s",
            format!("{w} records in {n} segments; {why}"),
        ));
    }
    if args.json {
        println!("{}", to_json(&args, cores, &d, &g));
    } else {
        print_tables(&args, cores, &d, &g);
    }
    Ok(())
}

fn print_tables(args: &Args, cores: usize, d: &[Design], g: &[Goal]) {
    println!(
        "{} records of {} B per fill, median of {}, {cores} cores",
        args.records, args.record_bytes, args.repeat
    );
    println!("{:<38} {:>14} {:<10} note", "design", "figure", "unit");
    for x in d {
        // Rates in whole units; an efficiency (a ratio) with two decimals.
        let places = if x.unit == "efficiency" { 2 } else { 0 };
        println!(
            "{:<38} {:>14.places$} {:<10} {}",
            x.name, x.value, x.unit, x.note
        );
    }
    println!();
    println!(
        "{:<28} {:>12} {:>12} {:<10} {:>8} {:>7} {:<6} ratio of",
        "pattern", "segalloc", "baseline", "unit", "ratio", "goal", "met"
    );
    for x in g {
        println!(
            "{:<28} {:>12.1} {:>12} {:<10} {:>8.3} {:>7} {:<6} {}",
            x.pattern,
            x.segalloc,
            x.baseline.map_or("-".into(), |b| format!("{b:.1}")),
            x.unit,
            x.ratio,
            x.goal_text(),
            if x.met() { "met" } else { "MISSED" },
            x.ratio_of
        );
    }
}

fn to_json(args: &Args, cores: usize, d: &[Design], g: &[Goal]) -> String {
    let designs: Vec<serde_json::Value> = d
        .iter()
        .map(|x| {
            serde_json::json!({
                "design": x.name,
                "value": x.value,
                "unit": x.unit,
                "note": x.note,
            })
        })
        .collect();
    let goals: Vec<serde_json::Value> = g
        .iter()
        .map(|x| {
            serde_json::json!({
                "pattern": x.pattern,
                "ratio_of": x.ratio_of,
                "unit": x.unit,
                "segalloc": x.segalloc,
                "baseline": x.baseline,
                "ratio": x.ratio,
                "goal": x.goal_text(),
                "met": x.met(),
            })
        })
        .collect();
    serde_json::json!({
        "records": args.records,
        "record_bytes": args.record_bytes,
        "repeat": args.repeat,
        "cores": cores,
        "designs": designs,
        "goals": goals,
        "all_met": g.iter().all(Goal::met),
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn the_ceiling_reserves_every_block_and_the_sparse_variant_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = 64 * segalloc::config::MIB;
        for (name, sparse) in [("reserved", false), ("sparse", true)] {
            let f = std::fs::File::create(dir.path().join(name)).expect("create");
            work::reserve(&f, bytes, sparse).expect("reserve");
            let m = f.metadata().expect("metadata");
            assert_eq!(m.len(), bytes);
            let allocated = m.blocks() * 512;
            if sparse {
                assert!(allocated < bytes / 2, "{name}: {allocated} bytes allocated");
            } else {
                assert!(
                    allocated >= bytes,
                    "{name}: only {allocated} of {bytes} bytes allocated"
                );
            }
        }
    }
}
