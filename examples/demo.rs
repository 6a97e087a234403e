//! The main job: open a data directory, start one shard per core, insert
//! sealed records from async tasks on every shard while freeing a third of
//! them (a part cross-shard), sync, shut down, reopen, and verify every
//! surviving record byte for byte. Prints records/s with the allocator's
//! share of a record's time, the OS's view over time (RSS, dirty and
//! writeback pages, fds, VMAs), data and metadata bytes, the io backend and
//! the recovery time.
//!
//! ```text
//! cargo run --release --example demo                       # 1,000,000 records of 16 B – 1 KiB
//! cargo run --release --example demo -- --records 10000000 --record-bytes 100
//! cargo run --release --example demo -- --fresh --json     # start over; JSON on the last line
//! # live data larger than memory (~40 GiB live of 100 B – 4 KiB records):
//! cargo run --release --example demo -- --fresh --records 30e6 --record-bytes 100-4096 --report-secs 30
//! ```
//!
//! Nothing per record is kept in memory: a record is self-describing (a
//! 16-byte header holds its length and its generator seed, sealed by a
//! CRC-32C of the two) and its payload is regenerated from the seed and
//! compared byte for byte to verify it. The payload is a window of a fixed
//! pseudo-random pool chosen by the seed, so generating it costs nothing
//! beyond the copy into the slot, and the demo's own work per record is
//! drawing its size and seed, picking its payload and the seal: a CRC-32C
//! of 12 bytes. It is
//! timed in place (between the allocation and the writes, in the sampled
//! records' laps, each of which includes a clock read) and, after the
//! insert, alone over the same kind of records, which is set beside a
//! record's wall time on its shard during the insert (`own_work_alone_ns`,
//! `own_work_alone_share`, `record_insert_ns` in `--json`). (A checksum of
//! the payload would add
//! nothing the byte-for-byte comparison does not check; records of the
//! previous format, which carry one, are still verified with it.)
//!
//! Records are written payload first and sealed last, so a run killed at
//! any moment (even `kill -9`) can be followed by another: on start the demo
//! recovers the directory, frees the unsealed slots (a crash between
//! allocate and seal) and verifies every sealed record. Any mismatch is
//! reported and the exit status is non-zero.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use segalloc::{Config, Error, Handle, Runtime, Shard, proc};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

#[path = "common/crc.rs"]
mod crc;
#[path = "common/json.rs"]
mod json;
#[path = "common/owner.rs"]
mod owner;

#[derive(Parser, Debug, Clone)]
#[command(about = "segalloc demo: insert, free, sync, reopen and verify sealed records")]
struct Args {
    /// Data directory.
    #[arg(long, default_value = "./segalloc-demo")]
    dir: PathBuf,
    /// Empty the data directory first: what segalloc made in it goes, the
    /// directory itself stays (refused unless it is a closed segalloc data
    /// directory).
    #[arg(long)]
    fresh: bool,
    /// Records to insert in this run (`1000000`, `1_000_000` or `1e6`).
    #[arg(long, default_value = "1000000", value_parser = parse_count)]
    records: u64,
    /// Record size in bytes (header included): `N` or `MIN-MAX`.
    #[arg(long, default_value = "16-1024")]
    record_bytes: String,
    /// Shards (default: one per core for a new directory; an existing one
    /// keeps its own count).
    #[arg(long)]
    shards: Option<usize>,
    /// Print the figures as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// Print a progress line (rate, RSS, dirty/writeback, fds, VMAs) every
    /// this many seconds during the insert, to stderr (0: never).
    #[arg(long, default_value_t = 10)]
    report_secs: u64,
}

const HEADER_BYTES: usize = 16;
/// The seal: the header's CRC-32C of bytes 0..12 (length, seed, zero)
/// XOR this.
const SEAL_MAGIC: u32 = 0x5EA1_0003;
/// The seal of the previous format, whose bytes 8..12 held the payload's
/// CRC-32C (still verified).
const SEAL_MAGIC_V2: u32 = 0x5EA1_0002;
/// The seal of the first record format (payload hashed byte by byte).
const SEAL_MAGIC_V1: u32 = 0x5EA1_5EA1;
/// Records between two batches of frees, progress updates and yields.
const BATCH: u64 = 4096;
/// One record in this many has its phases timed.
const SAMPLE: u64 = 64;
/// Records the demo's own work is timed alone over (at most).
const OWN_WORK_RECORDS: u64 = 4_000_000;
/// Payloads start at one of this many offsets of the pool.
const POOL_OFFSETS: usize = 1 << 16;

/// Parse a count: digits (with optional `_`), optionally `e` and a power of
/// ten (`3e9`).
fn parse_count(s: &str) -> Result<u64, String> {
    let t: String = s.trim().chars().filter(|&c| c != '_').collect();
    let (mantissa, exp) = match t.split_once(['e', 'E']) {
        Some((m, e)) => (
            m,
            e.parse::<u32>()
                .map_err(|e| format!("bad exponent in {s:?}: {e}"))?,
        ),
        None => (t.as_str(), 0),
    };
    let m = mantissa
        .parse::<u64>()
        .map_err(|e| format!("bad count {s:?}: {e}"))?;
    10u64
        .checked_pow(exp)
        .and_then(|p| m.checked_mul(p))
        .ok_or_else(|| format!("count {s:?} does not fit in 64 bits"))
}

/// A fixed pseudo-random byte stream (SplitMix64, 8 bytes per step); the
/// payload of a record with seed `s` and length `n` is `n` bytes of it
/// starting at `s % POOL_OFFSETS`. The same in every run and process.
struct Pool {
    bytes: Vec<u8>,
}

impl Pool {
    fn new(max_payload_bytes: usize) -> Pool {
        let mut p = Pool { bytes: Vec::new() };
        p.ensure(max_payload_bytes);
        p
    }

    /// Grow the stream to cover payloads of `payload_bytes` at every offset.
    fn ensure(&mut self, payload_bytes: usize) {
        let want = (POOL_OFFSETS + payload_bytes).div_ceil(8) * 8;
        let mut i = self.bytes.len() as u64 / 8;
        while self.bytes.len() < want {
            let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            self.bytes.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            i += 1;
        }
    }

    /// The payload of `len` bytes for `seed` (`ensure(len)` first).
    #[inline]
    fn payload(&self, seed: u32, len: usize) -> &[u8] {
        let at = seed as usize % POOL_OFFSETS;
        &self.bytes[at..at + len]
    }
}

/// The sealed header of a record of `len` payload bytes from `seed`.
fn header(len: u32, seed: u32) -> [u8; HEADER_BYTES] {
    // Bytes 0..8: the length then the seed; 8..12 (the payload's checksum
    // of an earlier format) zero; 12..16 the seal over the first 12.
    let low = u64::from(len) | u64::from(seed) << 32;
    let hcrc = crc::append12_words(0, low, 0) ^ SEAL_MAGIC;
    let mut h = [0u8; HEADER_BYTES];
    h[0..8].copy_from_slice(&low.to_le_bytes());
    h[12..16].copy_from_slice(&hcrc.to_le_bytes());
    h
}

enum Check {
    Sealed,
    Unsealed,
    Mismatch(String),
}

/// Read and verify the record in `h` on `shard`.
async fn check_record(shard: &Shard, h: Handle, buf: &mut Vec<u8>, pool: &mut Pool) -> Check {
    let pin = match shard.pin(h).await {
        Ok(p) => p,
        Err(e) => return Check::Mismatch(format!("{h}: pin failed: {e}")),
    };
    let mut hd = [0u8; HEADER_BYTES];
    pin.read_at(0, &mut hd).expect("slot holds a header");
    let word = |i: usize| u32::from_le_bytes(hd[i..i + 4].try_into().expect("4 bytes"));
    let (len, seed, pcrc, hcrc) = (word(0), word(4), word(8), word(12));
    let crc = crc::append12(0, hd.first_chunk::<12>().expect("16 bytes"));
    if crc ^ SEAL_MAGIC_V1 == hcrc {
        return Check::Mismatch(format!(
            "{h}: record of an earlier demo format; rerun with --fresh"
        ));
    }
    let with_payload_crc = crc ^ SEAL_MAGIC_V2 == hcrc;
    if crc ^ SEAL_MAGIC != hcrc && !with_payload_crc {
        return Check::Unsealed;
    }
    if len as usize + HEADER_BYTES > pin.len() {
        return Check::Mismatch(format!("{h}: sealed length {len} exceeds the slot"));
    }
    buf.resize(len as usize, 0);
    pin.read_at(HEADER_BYTES, buf).expect("in bounds");
    pool.ensure(len as usize);
    if buf[..] != *pool.payload(seed, len as usize)
        || (with_payload_crc && crc32c::crc32c(buf) != pcrc)
    {
        return Check::Mismatch(format!("{h}: payload differs from what was written"));
    }
    Check::Sealed
}

#[derive(Default, Clone, Copy)]
struct Verified {
    sealed: u64,
    unsealed_freed: u64,
    mismatches: u64,
    /// The shards' owner marks (`examples/common/owner.rs`): live, not
    /// records.
    marks: u64,
}

/// The demo's name: its one root is `demo.owner`.
const PROGRAM: &str = "demo";

/// Verify every live record of one shard, walking its live slots without
/// collecting them; free the unsealed ones afterwards. A shard of another
/// program (a root the demo does not make) is refused first, before
/// anything is freed; a shard without the demo's mark gets it.
async fn verify_shard(shard: Shard) -> Result<Verified, Error> {
    let mark = owner::claim(&shard, PROGRAM).await?;
    let mut v = Verified {
        marks: 1,
        ..Verified::default()
    };
    let mut unsealed = Vec::new();
    let (mut buf, mut pool) = (Vec::new(), Pool::new(0));
    for h in shard.live().filter(|&h| h != mark) {
        match check_record(&shard, h, &mut buf, &mut pool).await {
            Check::Sealed => v.sealed += 1,
            Check::Unsealed => unsealed.push(h),
            Check::Mismatch(m) => {
                eprintln!("MISMATCH {m}");
                v.mismatches += 1;
            }
        }
    }
    for h in unsealed {
        shard.free(h)?;
        v.unsealed_freed += 1;
    }
    Ok(v)
}

/// Verify every live record of every shard; free unsealed slots.
fn verify_all(rt: &Runtime) -> Result<Verified, Error> {
    let mut total = Verified::default();
    let jobs: Vec<_> = (0..rt.shard_count())
        .map(|i| rt.spawn_on(i, verify_shard))
        .collect();
    for j in jobs {
        let v = futures::executor::block_on(j)??;
        total.sealed += v.sealed;
        total.unsealed_freed += v.unsealed_freed;
        total.mismatches += v.mismatches;
        total.marks += v.marks;
    }
    Ok(total)
}

/// Where a sampled record's time went, summed over the sampled records.
#[derive(Default, Clone, Copy, Debug)]
struct Breakdown {
    sampled: u64,
    /// An empty lap per sampled record: the cost of a clock read there.
    clock_ns: u64,
    alloc_ns: u64,
    write_ns: u64,
    work_ns: u64,
    frees: u64,
    free_ns: u64,
}

impl Breakdown {
    fn add(&mut self, o: &Breakdown) {
        self.sampled += o.sampled;
        self.clock_ns += o.clock_ns;
        self.alloc_ns += o.alloc_ns;
        self.write_ns += o.write_ns;
        self.work_ns += o.work_ns;
        self.frees += o.frees;
        self.free_ns += o.free_ns;
    }
    /// A record's time: its three steps' laps. Each lap holds one clock
    /// read (`clock_ns` per record is an empty lap's), which is not taken
    /// out: at this scale, the read's cost depends on what ran before it,
    /// so each share includes one read and the demo's own work is an upper
    /// bound.
    fn record_ns(&self) -> u64 {
        self.alloc_ns + self.write_ns + self.work_ns
    }
    fn per_record(&self, ns: u64) -> f64 {
        ns as f64 / self.sampled.max(1) as f64
    }
    fn share(&self, ns: u64) -> f64 {
        ns as f64 / self.record_ns().max(1) as f64
    }
}

/// Timestamps of one sampled record (no clock read when not sampled).
/// Each lap includes one clock read: see [`Breakdown::record_ns`].
struct Laps {
    last: Option<Instant>,
}

impl Laps {
    #[inline]
    fn lap(&mut self, acc: &mut u64) {
        if let Some(last) = self.last {
            let now = Instant::now();
            *acc += (now - last).as_nanos() as u64;
            self.last = Some(now);
        }
    }
}

/// What one shard's insert task does.
struct Plan {
    records: u64,
    min: u64,
    max: u64,
    rng: u64,
    to_next: Option<UnboundedSender<Vec<Handle>>>,
    from_prev: Option<UnboundedReceiver<Vec<Handle>>>,
    pool: Arc<Pool>,
    progress: Arc<AtomicU64>,
    bar: ProgressBar,
}

#[derive(Default)]
struct Inserted {
    records: u64,
    freed: u64,
    freed_cross: u64,
    times: Breakdown,
}

/// The size (header included) and payload seed of the next record, from
/// the generator state `rng` (xorshift64): the size drawn from
/// `min..=max` by a multiply and a shift (from the state's high bits), the
/// seed its low 32 bits.
#[inline(always)]
fn next_record(rng: &mut u64, min: u64, max: u64) -> (u64, u32) {
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let span = u128::from(max - min + 1);
    let size = min + ((u128::from(*rng) * span) >> 64) as u64;
    (size, *rng as u32)
}

/// The demo's own work per record, timed alone in a loop (no allocator,
/// no clock read per record): what `insert_shard` does to make a record
/// besides allocating and writing it (draw its size and seed, pick its
/// payload, seal its header), over `n` records; nanoseconds per record,
/// the median of three runs. Left out, as in the sampled laps: the
/// workload's choice of the records it frees (a handle pushed for a third
/// of them) and the sampling itself.
fn own_work_alone_ns(min: u64, max: u64, pool: &Pool, n: u64) -> f64 {
    let mut runs: Vec<f64> = (0..3u64)
        .map(|run| {
            let mut rng = 0x2545_F491_4F6C_DD1D ^ (run << 48);
            let t = Instant::now();
            for _ in 0..n {
                let (size, seed) = next_record(&mut rng, min, max);
                let len = size as usize - HEADER_BYTES;
                std::hint::black_box(pool.payload(seed, len));
                std::hint::black_box(header(len as u32, seed));
            }
            t.elapsed().as_nanos() as f64 / n.max(1) as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[1]
}

/// Insert `plan.records` sealed records. Record `k` with `k % 6 == 0` is
/// freed here and with `k % 6 == 3` by the next shard (forwarded back to
/// this one), in batches of [`BATCH`] records.
async fn insert_shard(shard: Shard, mut plan: Plan) -> Result<Inserted, Error> {
    let mut out = Inserted::default();
    let (mut local, mut cross) = (Vec::new(), Vec::new());
    let mut times = Breakdown::default();
    let t = &mut times;
    for k in 0..plan.records {
        let (size, seed) = next_record(&mut plan.rng, plan.min, plan.max);
        let mut laps = Laps {
            last: k.is_multiple_of(SAMPLE).then(Instant::now),
        };
        let sampled = laps.last.is_some();
        laps.lap(&mut t.clock_ns);
        let a = shard.allocate(size).await?;
        laps.lap(&mut t.alloc_ns);
        let len = size as usize - HEADER_BYTES;
        let body = plan.pool.payload(seed, len);
        // The seal is made before the writes: made (and timed) between
        // them, its lap took the tail of the payload's stores with it.
        let seal = header(len as u32, seed);
        laps.lap(&mut t.work_ns);
        a.write_at(HEADER_BYTES, body)?;
        a.write_at(0, &seal)?;
        laps.lap(&mut t.write_ns);
        if sampled {
            t.sampled += 1;
        }
        match k % 6 {
            0 => local.push(a.into_handle()),
            3 if plan.to_next.is_some() => cross.push(a.into_handle()),
            3 => local.push(a.into_handle()),
            _ => {}
        }
        if k % BATCH == BATCH - 1 || k + 1 == plan.records {
            free_batch(
                &shard,
                &mut plan,
                &mut local,
                &mut cross,
                &mut out.freed_cross,
                t,
            )
            .await?;
            let done = k % BATCH + 1;
            plan.progress.fetch_add(done, Ordering::Relaxed);
            plan.bar.inc(done);
            tokio::task::yield_now().await;
        }
    }
    out.records = plan.records;
    drop(plan.to_next.take());
    if let Some(rx) = &mut plan.from_prev {
        while let Some(b) = rx.recv().await {
            free_timed(&shard, b, t).await?;
        }
    }
    // Every free done on this thread: this shard's and the previous one's.
    out.freed = t.frees;
    out.times = times;
    Ok(out)
}

/// Free the local batch, send the cross batch on, apply what the previous
/// shard sent (frees count where they are done).
async fn free_batch(
    shard: &Shard,
    plan: &mut Plan,
    local: &mut Vec<Handle>,
    cross: &mut Vec<Handle>,
    freed_cross: &mut u64,
    t: &mut Breakdown,
) -> Result<(), Error> {
    free_timed(shard, std::mem::take(local), t).await?;
    if let Some(tx) = &plan.to_next
        && !cross.is_empty()
    {
        *freed_cross += cross.len() as u64;
        // The next shard drains its receiver until every sender is gone.
        let _ = tx.send(std::mem::take(cross));
    }
    if let Some(rx) = &mut plan.from_prev {
        while let Ok(b) = rx.try_recv() {
            free_timed(shard, b, t).await?;
        }
    }
    Ok(())
}

async fn free_timed(shard: &Shard, hs: Vec<Handle>, t: &mut Breakdown) -> Result<(), Error> {
    let s = Instant::now();
    let n = hs.len() as u64;
    for h in hs {
        shard.free_async(h).await?;
    }
    t.free_ns += s.elapsed().as_nanos() as u64;
    t.frees += n;
    Ok(())
}

/// The process and the machine at one moment of the insert.
#[derive(Default, Clone, Copy, Debug, Serialize)]
struct Sample {
    #[serde(serialize_with = "json::fixed::<1, _>")]
    secs: f64,
    records: u64,
    #[serde(serialize_with = "json::fixed::<0, _>")]
    records_per_sec: f64,
    rss_bytes: u64,
    rss_anon_bytes: u64,
    dirty_bytes: u64,
    writeback_bytes: u64,
    #[serde(rename = "fds_data_dir")]
    fds_dir: usize,
    #[serde(rename = "vmas_data_dir")]
    vmas_dir: usize,
    open_files: usize,
    mapped_windows: usize,
}

impl Sample {
    fn peak(&mut self, o: &Sample) {
        self.rss_bytes = self.rss_bytes.max(o.rss_bytes);
        self.rss_anon_bytes = self.rss_anon_bytes.max(o.rss_anon_bytes);
        self.dirty_bytes = self.dirty_bytes.max(o.dirty_bytes);
        self.writeback_bytes = self.writeback_bytes.max(o.writeback_bytes);
        self.fds_dir = self.fds_dir.max(o.fds_dir);
        self.vmas_dir = self.vmas_dir.max(o.vmas_dir);
        self.open_files = self.open_files.max(o.open_files);
        self.mapped_windows = self.mapped_windows.max(o.mapped_windows);
    }

    fn line(&self, total: u64) -> String {
        format!(
            "[{:>7.1} s] {:>5.1} % {:>12} records {:>10.0} records/s | RSS {:.0} MiB (anon {:.0}) | system dirty {:.0} MiB, writeback {:.0} MiB | fds {} ({} open files) | VMAs {} ({} windows)",
            self.secs,
            100.0 * self.records as f64 / total.max(1) as f64,
            self.records,
            self.records_per_sec,
            mib(self.rss_bytes),
            mib(self.rss_anon_bytes),
            mib(self.dirty_bytes),
            mib(self.writeback_bytes),
            self.fds_dir,
            self.open_files,
            self.vmas_dir,
            self.mapped_windows
        )
    }
}

/// `key:` of a `/proc` file in `kB`, as bytes (0 when missing).
fn proc_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Take a sample; `prev` gives the interval's rate.
fn sample(rt: &Runtime, dir: &Path, started: Instant, records: u64, prev: &Sample) -> Sample {
    let secs = started.elapsed().as_secs_f64();
    let stats = futures::executor::block_on(rt.stats()).ok();
    Sample {
        secs,
        records,
        records_per_sec: (records - prev.records) as f64 / (secs - prev.secs).max(1e-9),
        rss_bytes: proc::rss_bytes(),
        rss_anon_bytes: proc_kib("/proc/self/status", "RssAnon"),
        dirty_bytes: proc_kib("/proc/meminfo", "Dirty"),
        writeback_bytes: proc_kib("/proc/meminfo", "Writeback"),
        fds_dir: proc::open_fds_under(dir),
        vmas_dir: proc::vmas_under(dir),
        open_files: stats.as_ref().map_or(0, |s| s.open_fds()),
        mapped_windows: stats.as_ref().map_or(0, |s| s.mapped_windows()),
    }
}

/// What the monitor saw: the printed samples and the peaks of all.
#[derive(Default)]
struct Watch {
    timeline: Vec<Sample>,
    peak: Sample,
}

/// Sample every second (print every `report_secs`) until `done`.
fn monitor(
    rt: &Runtime,
    dir: &Path,
    total: u64,
    report_secs: u64,
    progress: &AtomicU64,
    done: &AtomicBool,
    bar: &ProgressBar,
) -> Watch {
    let started = Instant::now();
    let mut w = Watch::default();
    let mut prev = Sample::default();
    let mut tick = 0u64;
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        tick += 1;
        if !tick.is_multiple_of(10) {
            continue;
        }
        let s = sample(rt, dir, started, progress.load(Ordering::Relaxed), &prev);
        w.peak.peak(&s);
        if report_secs > 0 && (tick / 10).is_multiple_of(report_secs) {
            if bar.is_hidden() {
                eprintln!("{}", s.line(total));
            } else {
                bar.println(s.line(total));
            }
            w.timeline.push(s);
            prev = s;
        }
    }
    w
}

/// Channels from each shard to the next (none with one shard).
type Ring = (
    Vec<Option<UnboundedSender<Vec<Handle>>>>,
    Vec<Option<UnboundedReceiver<Vec<Handle>>>>,
);

fn ring_channels(shards: usize) -> Ring {
    let mut senders = Vec::new();
    let mut receivers: Vec<_> = (0..shards).map(|_| None).collect();
    for i in 0..shards {
        if shards > 1 {
            let (tx, rx) = unbounded_channel();
            senders.push(Some(tx));
            receivers[(i + 1) % shards] = Some(rx);
        } else {
            senders.push(None);
        }
    }
    (senders, receivers)
}

/// Bytes the files under `dir`, `depth` levels deep, take on disk (0 when
/// it is missing); not following symlinks.
fn disk_bytes(dir: &Path, depth: u32) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() && depth > 1 => disk_bytes(&e.path(), depth - 1),
            Ok(m) if m.is_dir() => 0,
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// Refuse a run whose live data would not fit on the file system, with
/// what each shard reserves at its first allocation (`growth_step_bytes`)
/// and its metadata (1 MiB).
fn check_space(args: &Args, cfg: &Config, min: u64, max: u64) -> Result<(), String> {
    let mut at = std::path::absolute(&args.dir).map_err(|e| e.to_string())?;
    while !at.exists() {
        if !at.pop() {
            break;
        }
    }
    let st =
        nix::sys::statvfs::statvfs(&at).map_err(|e| format!("statvfs {}: {e}", at.display()))?;
    let mut free_bytes = st.blocks_available() as u128 * st.fragment_size() as u128;
    if args.fresh && args.dir.join(segalloc::datadir::MANIFEST_FILE).exists() {
        // What `--fresh` is about to delete frees its space.
        free_bytes += disk_bytes(&args.dir, 2) as u128;
    }
    // Two thirds stay live; slots round up by at most 1/8.
    let live_bytes = args.records as u128 * (min + max) as u128 / 2 * 2 / 3 * 9 / 8;
    let per_shard = (cfg.growth_step_bytes() + segalloc::config::MIB) as u128;
    let need_bytes = live_bytes + cfg.shards() as u128 * per_shard;
    if need_bytes > free_bytes {
        let mib = |b: u128| b as f64 / segalloc::config::MIB as f64;
        return Err(format!(
            "--records {} of {} B would keep about {:.1} MiB live, and {} shard(s) reserve \
             {:.1} MiB each at first (growth_step_bytes and metadata), but {} has {:.1} MiB free",
            args.records,
            args.record_bytes,
            mib(live_bytes),
            cfg.shards(),
            mib(per_shard),
            at.display(),
            mib(free_bytes)
        ));
    }
    Ok(())
}

/// The insert phase's figures.
struct Insert {
    inserted: u64,
    secs: f64,
    freed: u64,
    freed_cross: u64,
    times: Breakdown,
    watch: Watch,
}

/// Insert `args.records` records from one task per shard, freeing a third,
/// while a monitor thread samples the process.
fn insert_all(
    rt: &Runtime,
    args: &Args,
    min: u64,
    max: u64,
) -> Result<Insert, Box<dyn std::error::Error>> {
    let bar = progress_bar(args);
    let progress = Arc::new(AtomicU64::new(0));
    let done = AtomicBool::new(false);
    let dir = std::fs::canonicalize(&args.dir)?;
    let plans = plans(args, rt.shard_count(), (min, max), &bar, &progress);
    let started = Instant::now();
    let jobs: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(i, plan)| rt.spawn_on(i, move |shard| insert_shard(shard, plan)))
        .collect();
    let (total, every) = (args.records, args.report_secs);
    let (results, secs, watch) = std::thread::scope(|s| {
        let w = s.spawn(|| monitor(rt, &dir, total, every, &progress, &done, &bar));
        let results: Vec<_> = jobs.into_iter().map(futures::executor::block_on).collect();
        // Timed before the monitor is joined: it wakes every 100 ms.
        let secs = started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        (results, secs, w.join().expect("monitor thread"))
    });
    bar.finish_and_clear();
    let mut ins = Insert {
        inserted: 0,
        secs,
        freed: 0,
        freed_cross: 0,
        times: Breakdown::default(),
        watch,
    };
    for r in results {
        let r = r??;
        ins.inserted += r.records;
        ins.freed += r.freed;
        ins.freed_cross += r.freed_cross;
        ins.times.add(&r.times);
    }
    Ok(ins)
}

/// The progress bar: shown on a terminal when no report lines are asked for.
fn progress_bar(args: &Args) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(args.records), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} records {per_sec} eta {eta}")
            .expect("valid template"),
    );
    if !args.json && args.report_secs == 0 {
        // Hidden again by indicatif itself when stderr is not a terminal.
        bar.set_draw_target(ProgressDrawTarget::stderr());
    }
    bar
}

/// One plan per shard: its share of the records, its generator and its
/// channels to the next and from the previous shard.
fn plans(
    args: &Args,
    shards: usize,
    (min, max): (u64, u64),
    bar: &ProgressBar,
    progress: &Arc<AtomicU64>,
) -> Vec<Plan> {
    let pool = Arc::new(Pool::new(max as usize - HEADER_BYTES));
    let run_seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let (senders, receivers) = ring_channels(shards);
    let n = shards as u64;
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(i, (to_next, from_prev))| Plan {
            records: args.records / n + u64::from((i as u64) < args.records % n),
            min,
            max,
            rng: (run_seed ^ ((i as u64 + 1) << 48)) | 1,
            to_next,
            from_prev,
            pool: pool.clone(),
            progress: progress.clone(),
            bar: bar.clone(),
        })
        .collect()
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

#[derive(Default)]
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
    verify_secs: f64,
    times: Breakdown,
    /// [`own_work_alone_ns`] over up to [`OWN_WORK_RECORDS`] records.
    own_work_alone_ns: f64,
    watch: Watch,
    max_open_files: usize,
    max_windows: usize,
}

impl Figures {
    /// Wall time per record on a shard during the insert (every shard
    /// inserts its share at once).
    fn record_insert_ns(&self) -> f64 {
        self.insert_secs * 1e9 * self.shards.max(1) as f64 / self.inserted.max(1) as f64
    }

    /// The own work timed alone, as a share of a record's wall time.
    fn own_work_alone_share(&self) -> f64 {
        self.own_work_alone_ns / self.record_insert_ns().max(1e-9)
    }

    /// The library's descriptors and windows stayed within their caps.
    fn within_caps(&self) -> bool {
        self.watch.peak.open_files <= self.max_open_files
            && self.watch.peak.mapped_windows <= self.max_windows
    }
}

fn main() {
    // Output into a closed pipe (`demo | head -1`) ends the run as it ends
    // other command-line tools, instead of a panic in `println!`.
    // SAFETY: `SIG_DFL` installs no handler code; nothing in this program
    // handles SIGPIPE otherwise, and no other thread runs yet.
    unsafe { nix::libc::signal(nix::libc::SIGPIPE, nix::libc::SIG_DFL) };
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
    // Everything that can refuse the run is checked before `--fresh`
    // deletes anything.
    let (min, max) = parse_sizes(&args.record_bytes)?;
    let config = || {
        let mut b = Config::builder(&args.dir);
        if let Some(n) = args.shards {
            b = b.shards(n);
        }
        b.build()
    };
    let mut cfg = config()?;
    check_space(args, &cfg, min, max)?;
    if args.fresh {
        if let Some(why) = owner::foreign_root_in(&args.dir, PROGRAM) {
            return Err(format!("--fresh: {why}").into());
        }
        // Refuses anything but a closed segalloc data directory.
        segalloc::DataDir::clear(&args.dir).map_err(|e| format!("--fresh: {e}"))?;
        // Built again: the shard count left unset was the old directory's.
        cfg = config()?;
    }
    let existed = args.dir.join(segalloc::datadir::MANIFEST_FILE).exists();

    // 1. Open and recover: verify what an earlier run left.
    let (rt, before) = open_and_recover(args, &cfg, existed)?;
    let shards = rt.shard_count();
    let stats0 = futures::executor::block_on(rt.stats())?;
    let backend = stats0.shards[0].io_backend.to_string();

    // 2. Insert from async tasks on every shard, freeing a third (every 6th
    //    locally, every 6th + 3 from the next shard) as it goes.
    let mut ins = insert_all(&rt, args, min, max)?;

    // The OS's view while everything is mapped.
    let dir = std::fs::canonicalize(&args.dir)?;
    let last = sample(&rt, &dir, Instant::now(), 0, &Sample::default());
    ins.watch.peak.peak(&last);
    let (fds_total, vmas_total) = (proc::open_fds(), proc::vma_count());

    // 3. Sync (covers the forwarded frees) and shut down.
    futures::executor::block_on(rt.sync())?;
    let stats = futures::executor::block_on(rt.stats())?;
    let live_expected = stats.allocations_live();
    rt.shutdown()?;

    // The demo's own work per record, timed alone on this (otherwise
    // idle) thread: the laps above each include a clock read.
    let pool = Pool::new((max - HEADER_BYTES as u64) as usize);
    let own_work_alone_ns = own_work_alone_ns(min, max, &pool, args.records.min(OWN_WORK_RECORDS));
    drop(pool);

    // 4. Reopen and verify every record byte for byte.
    let re = reopen_and_verify(&cfg)?;

    let f = Figures {
        backend,
        shards,
        inserted: ins.inserted,
        insert_secs: ins.secs,
        freed: ins.freed,
        freed_cross: ins.freed_cross,
        found_before: before.sealed,
        unsealed_before: before.unsealed_freed,
        verified_after: re.after.sealed,
        fds_dir: last.fds_dir,
        fds_total,
        vmas_dir: last.vmas_dir,
        vmas_total,
        rss_bytes: last.rss_bytes,
        data_reserved: stats.shards.iter().map(|s| s.alloc.reserved_bytes).sum(),
        data_live: stats.shards.iter().map(|s| s.alloc.live_bytes).sum(),
        metadata_bytes: stats.shards.iter().map(|s| s.alloc.metadata_bytes).sum(),
        recovery_ms: re.recovery_ms,
        recovery_shard_us_max: re.recovery_shard_us_max,
        verify_secs: re.verify_secs,
        times: ins.times,
        own_work_alone_ns,
        watch: ins.watch,
        max_open_files: cfg.max_open_files(),
        max_windows: cfg.max_windows(),
    };
    report(args, &f, &before, &re.after, live_expected)
}

/// What reopening found.
struct Reopened {
    recovery_ms: f64,
    recovery_shard_us_max: u64,
    after: Verified,
    verify_secs: f64,
}

/// Start the runtime again (recovery) and verify every record.
fn reopen_and_verify(cfg: &Config) -> Result<Reopened, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let rt = Runtime::start(cfg.clone())?;
    let recovery_ms = t.elapsed().as_secs_f64() * 1e3;
    let rstats = futures::executor::block_on(rt.stats())?;
    let t = Instant::now();
    let after = verify_all(&rt)?;
    let verify_secs = t.elapsed().as_secs_f64();
    rt.shutdown()?;
    Ok(Reopened {
        recovery_ms,
        recovery_shard_us_max: rstats
            .shards
            .iter()
            .map(|s| s.alloc.recovery_us)
            .max()
            .unwrap_or(0),
        after,
        verify_secs,
    })
}

/// Start the runtime on the directory and verify what an earlier run left.
fn open_and_recover(
    args: &Args,
    cfg: &Config,
    existed: bool,
) -> Result<(Runtime, Verified), Box<dyn std::error::Error>> {
    let rt = match Runtime::start(cfg.clone()) {
        Ok(rt) => rt,
        Err(
            e @ Error::Mismatch {
                what: "shards",
                on_disk,
                ..
            },
        ) => {
            return Err(format!(
                "{e}; pass --shards {on_disk} to open it, or --fresh to delete it and start over"
            )
            .into());
        }
        Err(e @ Error::Mismatch { .. }) => {
            return Err(format!("{e}; rerun with --fresh to delete it and start over").into());
        }
        Err(e) => return Err(e.into()),
    };
    // Every shard is checked before any frees what it finds unsealed.
    for i in 0..rt.shard_count() {
        let why = futures::executor::block_on(
            rt.spawn_on(i, |s| async move { owner::foreign_root(&s, PROGRAM) }),
        )?;
        if let Some(why) = why {
            rt.shutdown()?;
            return Err(why.into());
        }
    }
    let before = verify_all(&rt)?;
    if args.json {
        // Figures only, on the last line.
    } else if existed {
        println!(
            "found {} sealed records from an earlier run in {} (verified byte for byte); freed {} unsealed slots",
            before.sealed,
            args.dir.display(),
            before.unsealed_freed
        );
    } else {
        println!(
            "created {} with {} shards",
            args.dir.display(),
            rt.shard_count()
        );
    }
    Ok((rt, before))
}

/// Print the figures; true when every record verified and the caps held.
fn report(
    args: &Args,
    f: &Figures,
    before: &Verified,
    after: &Verified,
    live_expected: u64,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mismatches = before.mismatches + after.mismatches;
    let count_ok = after.sealed + after.marks == live_expected && after.unsealed_freed == 0;
    if !args.json {
        print_table(f);
    }
    if !count_ok {
        eprintln!(
            "MISMATCH: {} sealed records verified after reopen, {} expected ({} unsealed)",
            after.sealed,
            live_expected.saturating_sub(after.marks),
            after.unsealed_freed
        );
    }
    if !f.within_caps() {
        eprintln!(
            "OVER CAP: peak {} open files (cap {}), {} mapped windows (cap {})",
            f.watch.peak.open_files, f.max_open_files, f.watch.peak.mapped_windows, f.max_windows
        );
    }
    let ok = mismatches == 0 && count_ok && f.within_caps();
    if args.json {
        println!("{}", to_json(f, mismatches, ok));
    } else if ok {
        println!("OK: every surviving record verified");
    }
    Ok(ok)
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn print_table(f: &Figures) {
    let rate = f.inserted as f64 / f.insert_secs.max(1e-9);
    let row = |k: &str, v: String| println!("  {k:<34} {v}");
    println!();
    row("io backend", f.backend.clone());
    row("shards", f.shards.to_string());
    row(
        "records inserted",
        format!("{} in {:.2} s", f.inserted, f.insert_secs),
    );
    row("records/s", format!("{rate:.0}"));
    print_breakdown(&f.times);
    row(
        "demo's own work, timed alone",
        format!(
            "{:.1} ns per record: {:.1} % of a record's time in the insert ({:.0} ns per record on each shard)",
            f.own_work_alone_ns,
            100.0 * f.own_work_alone_share(),
            f.record_insert_ns()
        ),
    );
    print_os(f);
}

/// Where a record's time goes.
fn print_breakdown(t: &Breakdown) {
    let row = |k: &str, v: String| println!("  {k:<34} {v}");
    row(
        "one record (sampled 1 in 64)",
        format!(
            "{:.0} ns: allocate {:.0} ns ({:.0} %), write {:.0} ns ({:.0} %), demo's own work {:.0} ns ({:.0} %); each includes a clock read ({:.0} ns)",
            t.per_record(t.record_ns()),
            t.per_record(t.alloc_ns),
            100.0 * t.share(t.alloc_ns),
            t.per_record(t.write_ns),
            100.0 * t.share(t.write_ns),
            t.per_record(t.work_ns),
            100.0 * t.share(t.work_ns),
            t.per_record(t.clock_ns)
        ),
    );
    row(
        "one free",
        format!("{:.0} ns", t.free_ns as f64 / t.frees.max(1) as f64),
    );
}

/// The peaks the monitor saw during the insert.
fn print_peaks(f: &Figures) {
    let row = |k: &str, v: String| println!("  {k:<34} {v}");
    let p = &f.watch.peak;
    row(
        "peak during the insert",
        format!(
            "RSS {:.0} MiB (anon {:.0}), system dirty {:.0} MiB, writeback {:.0} MiB",
            mib(p.rss_bytes),
            mib(p.rss_anon_bytes),
            mib(p.dirty_bytes),
            mib(p.writeback_bytes)
        ),
    );
    row(
        "peak open files / mapped windows",
        format!(
            "{} (cap {}) / {} (cap {})",
            p.open_files, f.max_open_files, p.mapped_windows, f.max_windows
        ),
    );
}

/// Frees, verification and the OS's view.
fn print_os(f: &Figures) {
    let meta_pct = 100.0 * f.metadata_bytes as f64 / f.data_live.max(1) as f64;
    let row = |k: &str, v: String| println!("  {k:<34} {v}");
    row(
        "records freed",
        format!("{} ({} cross-shard)", f.freed, f.freed_cross),
    );
    row(
        "records found at start",
        format!("{} ({} unsealed freed)", f.found_before, f.unsealed_before),
    );
    row(
        "records verified after reopen",
        format!(
            "{} in {:.2} s (every record read back through a pin)",
            f.verified_after, f.verify_secs
        ),
    );
    row(
        "open fds (/proc/self/fd)",
        format!(
            "{} in the data dir, {} in the process",
            f.fds_dir, f.fds_total
        ),
    );
    row(
        "VMAs (/proc/self/maps)",
        format!(
            "{} in the data dir, {} in the process",
            f.vmas_dir, f.vmas_total
        ),
    );
    row(
        "RSS (/proc/self/status)",
        format!("{:.1} MiB", mib(f.rss_bytes)),
    );
    print_peaks(f);
    row(
        "data",
        format!(
            "{:.1} MiB reserved, {:.1} MiB live",
            mib(f.data_reserved),
            mib(f.data_live)
        ),
    );
    row(
        "metadata",
        format!(
            "{:.2} MiB ({meta_pct:.3} % of live data)",
            mib(f.metadata_bytes)
        ),
    );
    row(
        "recovery",
        format!(
            "{:.1} ms (runtime start), {} us (slowest shard's scan)",
            f.recovery_ms, f.recovery_shard_us_max
        ),
    );
    println!();
}

/// The figures as one JSON object (the field names are an interface:
/// scripts read them).
#[derive(Serialize)]
struct Report<'a> {
    io_backend: &'a str,
    shards: usize,
    records_inserted: u64,
    #[serde(serialize_with = "json::fixed::<4, _>")]
    insert_secs: f64,
    #[serde(serialize_with = "json::fixed::<0, _>")]
    records_per_sec: f64,
    records_freed: u64,
    records_freed_cross_shard: u64,
    records_found_at_start: u64,
    unsealed_freed_at_start: u64,
    records_verified: u64,
    fds_data_dir: usize,
    fds_process: usize,
    vmas_data_dir: usize,
    vmas_process: usize,
    rss_bytes: u64,
    data_reserved_bytes: u64,
    data_live_bytes: u64,
    metadata_bytes: u64,
    #[serde(serialize_with = "json::fixed::<3, _>")]
    recovery_ms: f64,
    recovery_shard_us_max: u64,
    #[serde(serialize_with = "json::fixed::<3, _>")]
    verify_secs: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    record_ns: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    allocate_ns: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    write_ns: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    own_work_ns: f64,
    #[serde(serialize_with = "json::fixed::<4, _>")]
    allocate_share: f64,
    #[serde(serialize_with = "json::fixed::<4, _>")]
    write_share: f64,
    #[serde(serialize_with = "json::fixed::<4, _>")]
    own_work_share: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    free_ns: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    clock_read_ns: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    record_insert_ns: f64,
    #[serde(serialize_with = "json::fixed::<1, _>")]
    own_work_alone_ns: f64,
    #[serde(serialize_with = "json::fixed::<4, _>")]
    own_work_alone_share: f64,
    peak_rss_bytes: u64,
    peak_rss_anon_bytes: u64,
    peak_dirty_bytes: u64,
    peak_writeback_bytes: u64,
    peak_fds_data_dir: usize,
    peak_vmas_data_dir: usize,
    peak_open_files: usize,
    peak_mapped_windows: usize,
    max_open_files: usize,
    #[serde(rename = "max_extents")]
    max_windows: usize,
    within_caps: bool,
    timeline: &'a [Sample],
    mismatches: u64,
    ok: bool,
}

fn to_json(f: &Figures, mismatches: u64, ok: bool) -> String {
    let t = &f.times;
    let p = &f.watch.peak;
    let report = Report {
        io_backend: &f.backend,
        shards: f.shards,
        records_inserted: f.inserted,
        insert_secs: f.insert_secs,
        records_per_sec: f.inserted as f64 / f.insert_secs.max(1e-9),
        records_freed: f.freed,
        records_freed_cross_shard: f.freed_cross,
        records_found_at_start: f.found_before,
        unsealed_freed_at_start: f.unsealed_before,
        records_verified: f.verified_after,
        fds_data_dir: f.fds_dir,
        fds_process: f.fds_total,
        vmas_data_dir: f.vmas_dir,
        vmas_process: f.vmas_total,
        rss_bytes: f.rss_bytes,
        data_reserved_bytes: f.data_reserved,
        data_live_bytes: f.data_live,
        metadata_bytes: f.metadata_bytes,
        recovery_ms: f.recovery_ms,
        recovery_shard_us_max: f.recovery_shard_us_max,
        verify_secs: f.verify_secs,
        record_ns: t.per_record(t.record_ns()),
        allocate_ns: t.per_record(t.alloc_ns),
        write_ns: t.per_record(t.write_ns),
        own_work_ns: t.per_record(t.work_ns),
        allocate_share: t.share(t.alloc_ns),
        write_share: t.share(t.write_ns),
        own_work_share: t.share(t.work_ns),
        free_ns: t.free_ns as f64 / t.frees.max(1) as f64,
        clock_read_ns: t.per_record(t.clock_ns),
        record_insert_ns: f.record_insert_ns(),
        own_work_alone_ns: f.own_work_alone_ns,
        own_work_alone_share: f.own_work_alone_share(),
        peak_rss_bytes: p.rss_bytes,
        peak_rss_anon_bytes: p.rss_anon_bytes,
        peak_dirty_bytes: p.dirty_bytes,
        peak_writeback_bytes: p.writeback_bytes,
        peak_fds_data_dir: p.fds_dir,
        peak_vmas_data_dir: p.vmas_dir,
        peak_open_files: p.open_files,
        peak_mapped_windows: p.mapped_windows,
        max_open_files: f.max_open_files,
        max_windows: f.max_windows,
        within_caps: f.within_caps(),
        timeline: &f.watch.timeline,
        mismatches,
        ok,
    };
    serde_json::to_string(&report).expect("a report serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Live allocations per shard of the closed 2-shard directory `dir`.
    fn live_per_shard(dir: &std::path::Path) -> Vec<u64> {
        let rt = Runtime::start(Config::builder(dir).shards(2).build().unwrap()).unwrap();
        let live = (0..2)
            .map(|i| {
                futures::executor::block_on(rt.spawn_on(i, |s| async move { s.live_count() }))
                    .unwrap()
            })
            .collect();
        rt.shutdown().unwrap();
        live
    }

    /// A directory of another program (a root of its own on shard 1 only)
    /// is refused before any shard frees what it finds unsealed; a
    /// directory of the demo's own is opened again.
    #[test]
    fn a_directory_of_another_program_is_refused_and_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("other");
        let cfg = Config::builder(&dir).shards(2).build().unwrap();
        let rt = Runtime::start(cfg.clone()).unwrap();
        for i in 0..2 {
            futures::executor::block_on(rt.spawn_on(i, move |s| async move {
                let mut last = None;
                for _ in 0..50 {
                    last = Some(s.allocate(64).await.unwrap().into_handle());
                }
                if i == 1 {
                    s.set_root("other.index", last.unwrap()).unwrap();
                }
                s.sync().await.unwrap();
            }))
            .unwrap();
        }
        rt.shutdown().unwrap();
        let args = Args::parse_from(["demo", "--dir", dir.to_str().unwrap()]);
        let e = open_and_recover(&args, &cfg, true).err().expect("refused");
        assert!(e.to_string().contains("`other.index`"), "{e}");
        assert_eq!(live_per_shard(&dir), vec![50, 50], "allocations were freed");

        // The demo's own directory: marked once per shard, not a record.
        let mine = tmp.path().join("mine");
        let cfg = Config::builder(&mine).shards(2).build().unwrap();
        let args = Args::parse_from(["demo", "--dir", mine.to_str().unwrap()]);
        for _ in 0..2 {
            let (rt, v) = open_and_recover(&args, &cfg, true).expect("opens");
            assert_eq!((v.sealed, v.unsealed_freed, v.marks), (0, 0, 2));
            futures::executor::block_on(rt.sync()).unwrap();
            rt.shutdown().unwrap();
        }
        assert_eq!(live_per_shard(&mine), vec![1, 1]);
    }

    /// Sizes stay in `min..=max`, every size of a small range is drawn, and
    /// the draws spread over a wide one.
    #[test]
    fn record_sizes_cover_their_range() {
        for (min, max) in [
            (16u64, 16u64),
            (16, 23),
            (100, 100),
            (16, 1024),
            (16, 16 << 20),
        ] {
            let mut rng = 0x2545_F491_4F6C_DD1D;
            let mut seen = std::collections::HashSet::new();
            let (mut lo, mut hi) = (u64::MAX, 0);
            for _ in 0..100_000 {
                let (size, _) = next_record(&mut rng, min, max);
                assert!((min..=max).contains(&size), "{size} outside {min}..={max}");
                if max - min < 64 {
                    seen.insert(size);
                }
                (lo, hi) = (lo.min(size), hi.max(size));
            }
            if max - min < 64 {
                assert_eq!(seen.len() as u64, max - min + 1, "{min}..={max}");
            } else {
                let span = max - min;
                assert!(lo < min + span / 100 && hi > max - span / 100, "{lo}..{hi}");
            }
        }
        let pool = Pool::new(1024 - HEADER_BYTES);
        let ns = own_work_alone_ns(16, 1024, &pool, 10_000);
        assert!(ns.is_finite() && ns > 0.0, "{ns}");
    }

    #[test]
    fn counts_accept_powers_of_ten_and_reject_overflow() {
        assert_eq!(parse_count("3e9"), Ok(3_000_000_000));
        assert_eq!(parse_count("1_000_000"), Ok(1_000_000));
        assert_eq!(parse_count("42"), Ok(42));
        assert!(parse_count("1e20").is_err());
        assert!(parse_count("18446744073709551616").is_err());
        assert!(parse_count("ten").is_err());
    }

    #[test]
    fn a_grown_pool_regenerates_the_same_payloads() {
        // Verification after reopen grows its pool to the longest record
        // found; payloads written with a smaller pool must read the same.
        let small = Pool::new(100);
        let mut big = Pool::new(0);
        big.ensure(5000);
        for seed in [0u32, 1, 65_535, 65_536, u32::MAX] {
            assert_eq!(small.payload(seed, 100), big.payload(seed, 100));
        }
        assert_ne!(small.payload(1, 100), small.payload(2, 100));
    }

    #[test]
    fn the_space_check_refuses_what_cannot_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = Args::parse_from(["demo", "--records", "1000"]);
        args.dir = dir.path().join("d");
        let cfg = Config::builder(&args.dir)
            .shards(2)
            .build()
            .expect("config");
        assert!(check_space(&args, &cfg, 16, 1024).is_ok());
        args.records = u64::MAX;
        let e = check_space(&args, &cfg, 16, 1024).expect_err("does not fit");
        assert!(
            e.contains("MiB free") && e.contains("2 shard(s) reserve 65.0 MiB"),
            "{e}"
        );
    }

    /// `--fresh` deletes nothing when the run is refused for its other
    /// arguments (it deleted the directory, then refused them).
    #[test]
    fn fresh_refuses_another_programs_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path().join("d");
        let cfg = Config::builder(&d).shards(1).build().expect("config");
        let dd = std::sync::Arc::new(segalloc::DataDir::open(&cfg).expect("create"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let shard = Shard::open(dd, &cfg, 0).await.expect("open");
            let h = shard.allocate(16).await.expect("allocate").into_handle();
            shard.set_root("kv_server.owner", h).expect("root");
            shard.sync().await.expect("sync");
        });
        let d_str = d.to_str().expect("utf-8");
        let args = Args::parse_from(["demo", "--fresh", "--dir", d_str, "--records", "60"]);
        let e = run(&args).expect_err("refused").to_string();
        assert!(e.contains("kv_server.owner"), "{e}");
        assert!(d.join(segalloc::datadir::MANIFEST_FILE).exists());
    }

    #[test]
    fn a_refused_fresh_run_deletes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = tmp.path().join("d");
        let cfg = Config::builder(&d).shards(1).build().expect("config");
        drop(segalloc::DataDir::open(&cfg).expect("create"));
        let manifest = d.join(segalloc::datadir::MANIFEST_FILE);
        for extra in [
            &["--shards", "0"][..],
            &["--records", "1e15"],
            &["--record-bytes", "0"],
        ] {
            let mut argv = vec!["demo", "--fresh", "--dir", d.to_str().expect("utf-8")];
            argv.extend_from_slice(extra);
            let args = Args::parse_from(argv);
            assert!(run(&args).is_err(), "{extra:?} was not refused");
            assert!(
                manifest.exists(),
                "{extra:?}: --fresh deleted the directory"
            );
        }
        // Accepted, it starts over with the default shard count, not the
        // old directory's.
        let default = Config::builder(tmp.path().join("new"))
            .build()
            .expect("config");
        if default.shards() != 1 {
            let d_str = d.to_str().expect("utf-8");
            let args = Args::parse_from(["demo", "--fresh", "--dir", d_str, "--records", "60"]);
            assert!(run(&args).expect("run"));
            let reopened = Config::builder(&d).build().expect("config");
            assert_eq!(reopened.shards(), default.shards());
        }
    }

    #[test]
    fn the_json_report_keeps_its_field_names_and_shape() {
        let mut f = Figures {
            backend: "io_uring".into(),
            insert_secs: 2.0,
            inserted: 1000,
            shards: 2,
            own_work_alone_ns: 1e5,
            ..Figures::default()
        };
        let s = Sample {
            secs: 1.25,
            records_per_sec: 999.6,
            ..Sample::default()
        };
        f.watch.timeline = vec![s, s];
        let j: serde_json::Value = serde_json::from_str(&to_json(&f, 3, true)).expect("JSON");
        let keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        let mut want = vec![
            "io_backend",
            "shards",
            "records_inserted",
            "insert_secs",
            "records_per_sec",
            "records_freed",
            "records_freed_cross_shard",
            "records_found_at_start",
            "unsealed_freed_at_start",
            "records_verified",
            "fds_data_dir",
            "fds_process",
            "vmas_data_dir",
            "vmas_process",
            "rss_bytes",
            "data_reserved_bytes",
            "data_live_bytes",
            "metadata_bytes",
            "recovery_ms",
            "recovery_shard_us_max",
            "verify_secs",
            "record_ns",
            "allocate_ns",
            "write_ns",
            "own_work_ns",
            "allocate_share",
            "write_share",
            "own_work_share",
            "free_ns",
            "clock_read_ns",
            "record_insert_ns",
            "own_work_alone_ns",
            "own_work_alone_share",
            "peak_rss_bytes",
            "peak_rss_anon_bytes",
            "peak_dirty_bytes",
            "peak_writeback_bytes",
            "peak_fds_data_dir",
            "peak_vmas_data_dir",
            "peak_open_files",
            "peak_mapped_windows",
            "max_open_files",
            "max_extents",
            "within_caps",
            "timeline",
            "mismatches",
            "ok",
        ];
        let mut got = keys.clone();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(j["io_backend"], "io_uring");
        assert_eq!(j["records_per_sec"].as_u64(), Some(500));
        // 2 s for 1000 records on 2 shards: 4 ms per record on its shard.
        assert_eq!(j["record_insert_ns"].as_f64(), Some(4e6));
        assert_eq!(j["own_work_alone_share"].as_f64(), Some(0.025));
        assert_eq!(j["mismatches"].as_u64(), Some(3));
        assert_eq!(j["ok"], true);
        let tl = j["timeline"].as_array().expect("timeline");
        assert_eq!(tl.len(), 2);
        let mut got: Vec<&str> = tl[0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        got.sort_unstable();
        let mut want = vec![
            "secs",
            "records",
            "records_per_sec",
            "rss_bytes",
            "rss_anon_bytes",
            "dirty_bytes",
            "writeback_bytes",
            "fds_data_dir",
            "vmas_data_dir",
            "open_files",
            "mapped_windows",
        ];
        want.sort_unstable();
        assert_eq!(got, want);
        assert_eq!(tl[0]["records_per_sec"].as_u64(), Some(1000));
        assert_eq!(tl[0]["secs"].as_f64(), Some(1.2));
    }
}
