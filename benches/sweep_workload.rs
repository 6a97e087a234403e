//! The shard-sweep workload, shared by `examples/sweep.rs` and
//! `benches/sweep.rs` (included with `#[path]`).
//!
//! On every shard one task loops: allocate a slot, write it, pin it again
//! and read it back, keep it in a window of 1024 live handles, and free the
//! oldest. One free in four goes to the next shard's task, which frees it
//! there (so segalloc forwards it back to the owner in a batch). With one
//! shard the next shard's task is its own: those frees take the same
//! channel and are freed locally, so the workload's own code is the same at
//! every shard count and the scaling efficiency measures what crossing
//! cores costs: segalloc's forwarding and the workload's channel between
//! threads instead of within one. A run ends when every shard has applied
//! every free of its allocations, forwarded ones included.
//!
//! [`run_by_hand`] is the same pattern without segalloc's forwarding: the
//! next shard's task copies each handle it receives into a batch and sends
//! it back over a second channel to the owner's task, which frees them
//! locally. The same handles cross the same cores; only who carries them
//! back differs.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segalloc::{Error, Handle, Runtime, Shard};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Live handles each task keeps before freeing the oldest.
pub const WINDOW: usize = 1024;
/// Every `SAMPLE`-th operation is timed.
pub const SAMPLE: u64 = 16;

/// What one shard's task measured.
#[derive(Clone, Debug, Default)]
pub struct ShardResult {
    pub ops: u64,
    pub cross_frees: u64,
    /// Sum and count of samples of the frees this shard's task made that
    /// were not applied yet (its live allocations beyond its window).
    pub pending_sum: u64,
    pub pending_samples: u64,
    pub latencies_ns: Vec<u32>,
}

/// What one run over all shards measured.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub shards: usize,
    pub ops: u64,
    pub cross_frees: u64,
    /// Frees made but not applied yet, per shard, mean of samples taken
    /// every 1024 operations: forwarded ones on their way (with one shard,
    /// the ones in its channel to its own task), or held ones.
    pub pending_frees: f64,
    pub elapsed: Duration,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

impl RunResult {
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

#[allow(clippy::too_many_arguments)]
async fn shard_task(
    shard: Shard,
    ops: u64,
    size: u64,
    cross_every: u64,
    hold: usize,
    to_next: Option<UnboundedSender<Vec<Handle>>>,
    mut from_prev: Option<UnboundedReceiver<Vec<Handle>>>,
    start: Arc<tokio::sync::Barrier>,
    by_hand: Option<ByHand>,
) -> Result<ShardResult, Error> {
    let (back_to_prev, mut back_from_next) = match by_hand {
        Some(b) => (Some(b.to_prev), Some(b.from_next)),
        None => (None, None),
    };
    let mut r = ShardResult {
        latencies_ns: Vec::with_capacity((ops / SAMPLE) as usize + 1),
        ..ShardResult::default()
    };
    let mut window: VecDeque<Handle> = VecDeque::with_capacity(WINDOW + 1);
    let mut batch = Vec::with_capacity(64);
    let mut buf = [0u8; 8];
    let live_before = shard.live_count();
    // Held frees with the operation at which each was held.
    let mut held: VecDeque<(u64, Handle)> = VecDeque::new();
    start.wait().await;
    for k in 0..ops {
        let t0 = (k % SAMPLE == 0).then(Instant::now);
        let a = shard.allocate(size).await?;
        a.write_at(0, &k.to_le_bytes())?;
        let h = a.into_handle();
        let p = match shard.try_pin(h)? {
            Some(p) => p,
            None => shard.pin(h).await?,
        };
        p.read_at(0, &mut buf)?;
        drop(p);
        window.push_back(h);
        if window.len() > WINDOW {
            let old = window.pop_front().expect("non-empty");
            match &to_next {
                Some(tx) if cross_every > 0 && k % cross_every == 0 => {
                    batch.push(old);
                    if batch.len() == 64 {
                        let _ = tx.send(std::mem::replace(&mut batch, Vec::with_capacity(64)));
                    }
                }
                // Held here instead: a free as late as a forwarded one,
                // without the trip to another core.
                _ if hold > 0 && cross_every > 0 && k % cross_every == 0 => {
                    held.push_back((k, old));
                }
                _ => shard.free(old)?,
            }
        }
        while held.front().is_some_and(|&(at, _)| at + hold as u64 <= k) {
            shard.free(held.pop_front().expect("non-empty").1)?;
        }
        if k % 1024 == 512 {
            let live = shard.live_count().saturating_sub(live_before);
            r.pending_sum += live.saturating_sub(window.len() as u64);
            r.pending_samples += 1;
        }
        if k % 64 == 0
            && let Some(rx) = &mut from_prev
        {
            while let Ok(b) = rx.try_recv() {
                r.cross_frees += b.len() as u64;
                take_frees(&shard, b, back_to_prev.as_ref()).await?;
            }
            if let Some(back) = &mut back_from_next {
                while let Ok(b) = back.try_recv() {
                    for h in b {
                        shard.free(h)?;
                    }
                }
            }
        }
        if let Some(t0) = t0 {
            r.latencies_ns
                .push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        if k % 256 == 255 {
            tokio::task::yield_now().await;
        }
    }
    r.ops = ops;
    // Sent, then dropped: with one shard it is this task's own channel,
    // which the loop below drains until every sender is gone.
    if let Some(tx) = to_next {
        if !batch.is_empty() {
            let _ = tx.send(batch);
        }
        drop(tx);
    }
    if let Some(mut rx) = from_prev {
        while let Some(b) = rx.recv().await {
            r.cross_frees += b.len() as u64;
            take_frees(&shard, b, back_to_prev.as_ref()).await?;
        }
    }
    // As above: the next shard sends back what this one sent it until it
    // has drained its channel from this shard.
    drop(back_to_prev);
    if let Some(mut back) = back_from_next {
        while let Some(b) = back.recv().await {
            for h in b {
                shard.free(h)?;
            }
        }
    }
    for h in window.into_iter().chain(held.into_iter().map(|(_, h)| h)) {
        shard.free(h)?;
    }
    // The run ends when every free, forwarded ones included, is applied.
    shard.flush_frees().await?;
    while shard.live_count() > live_before {
        shard.drain_frees();
        // Leave the core to a shard thread sharing it (more shards than
        // cores), then let this shard's other tasks run.
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
    Ok(r)
}

/// The second channel of [`run_by_hand`]: back to the previous shard (the
/// owner of the handles this shard receives), and from the next one.
struct ByHand {
    to_prev: UnboundedSender<Vec<Handle>>,
    from_next: UnboundedReceiver<Vec<Handle>>,
}

/// Free a batch of the previous shard's handles: through segalloc, or by
/// hand, copied into a batch sent back to their owner's task.
async fn take_frees(
    shard: &Shard,
    batch: Vec<Handle>,
    back: Option<&UnboundedSender<Vec<Handle>>>,
) -> Result<(), Error> {
    match back {
        Some(tx) => {
            let mut copy = Vec::with_capacity(batch.len());
            copy.extend(batch.iter().copied());
            let _ = tx.send(copy);
        }
        None => {
            for h in batch {
                shard.free_async(h).await?;
            }
        }
    }
    Ok(())
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as u64
}

/// A runtime of `shards` shards in `dir` as the sweep runs them (256 MiB
/// windows), warmed up with a short run.
pub fn start(dir: &std::path::Path, shards: usize) -> Result<Runtime, Error> {
    let cfg = segalloc::Config::builder(dir.join("d"))
        .shards(shards)
        .window_bytes(256 * segalloc::config::MIB)
        .build()?;
    let rt = Runtime::start(cfg)?;
    run(&rt, 10_000, 64)?;
    Ok(rt)
}

/// Run `ops` operations of `size` bytes on every shard of `rt` at once, one
/// free in four sent to the next shard's task (with one shard, its own).
pub fn run(rt: &Runtime, ops: u64, size: u64) -> Result<RunResult, Error> {
    run_with(rt, ops, size, 4)
}

/// As [`run`], with one free in `cross_every` sent to the next shard's task
/// (0: none).
pub fn run_with(rt: &Runtime, ops: u64, size: u64, cross_every: u64) -> Result<RunResult, Error> {
    run_held(rt, ops, size, cross_every, 0)
}

/// As [`run_with`]; with `hold` > 0, one free in `cross_every` is not sent
/// to the next shard but held on its own shard for `hold` operations, then
/// freed there: a delay like a forwarded free's, without its trip between
/// cores ([`RunResult::pending_frees`] compares the two).
pub fn run_held(
    rt: &Runtime,
    ops: u64,
    size: u64,
    cross_every: u64,
    hold: usize,
) -> Result<RunResult, Error> {
    run_inner(rt, ops, size, cross_every, hold, false)
}

/// As [`run_with`], with the frees sent to the next shard carried back to
/// their owner by hand (see the module's docs).
pub fn run_by_hand(
    rt: &Runtime,
    ops: u64,
    size: u64,
    cross_every: u64,
) -> Result<RunResult, Error> {
    run_inner(rt, ops, size, cross_every, 0, true)
}

fn run_inner(
    rt: &Runtime,
    ops: u64,
    size: u64,
    cross_every: u64,
    hold: usize,
    by_hand: bool,
) -> Result<RunResult, Error> {
    let n = rt.shard_count();
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let mut senders: Vec<Option<UnboundedSender<Vec<Handle>>>> = Vec::new();
    let mut receivers: Vec<Option<UnboundedReceiver<Vec<Handle>>>> = (0..n).map(|_| None).collect();
    for i in 0..n {
        if hold == 0 {
            let (tx, rx) = unbounded_channel();
            senders.push(Some(tx));
            receivers[(i + 1) % n] = Some(rx);
        } else {
            senders.push(None);
        }
    }
    let backs: Vec<Option<ByHand>> = if by_hand && hold == 0 {
        let (mut txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded_channel()).unzip();
        // Channel `i` carries shard `i`'s handles back to it from shard
        // `i + 1`: shard `j` sends on channel `j - 1`.
        txs.rotate_right(1);
        txs.into_iter()
            .zip(rxs)
            .map(|(to_prev, from_next)| Some(ByHand { to_prev, from_next }))
            .collect()
    } else {
        (0..n).map(|_| None).collect()
    };
    let t = Instant::now();
    let jobs: Vec<_> = senders
        .into_iter()
        .zip(receivers)
        .zip(backs)
        .enumerate()
        .map(|(i, ((tx, rx), back))| {
            let start = start.clone();
            rt.spawn_on(i, move |s| {
                shard_task(s, ops, size, cross_every, hold, tx, rx, start, back)
            })
        })
        .collect();
    let mut all = Vec::new();
    let (mut cross, mut pending_sum, mut pending_samples) = (0, 0, 0);
    for j in jobs {
        let r = futures::executor::block_on(j)??;
        // One shard's "next shard" is itself: nothing crossed.
        if n > 1 {
            cross += r.cross_frees;
        }
        pending_sum += r.pending_sum;
        pending_samples += r.pending_samples;
        all.extend(r.latencies_ns);
    }
    let elapsed = t.elapsed();
    all.sort_unstable();
    Ok(RunResult {
        shards: n,
        ops: ops * n as u64,
        cross_frees: cross,
        pending_frees: pending_sum as f64 / pending_samples.max(1) as f64,
        elapsed,
        p50_ns: percentile(&all, 0.50),
        p99_ns: percentile(&all, 0.99),
    })
}
