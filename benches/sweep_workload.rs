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
//! [`run_by_hand`] is the same pattern with the frees carried back to their
//! owner by the workload instead of segalloc, the way segalloc carries them:
//! the next shard's task copies each handle it receives into a buffer for
//! the owner, sent over a second bounded channel when it holds 1,024
//! handles or 16 of the task's yields after its first handle; a task on the
//! owner waits on that channel and frees each batch locally. The same
//! handles cross the same cores under the same batching policy; only the
//! code that carries them differs.

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segalloc::{Error, Handle, Runtime, Shard};
use tokio::sync::mpsc::{
    Receiver, Sender, UnboundedReceiver, UnboundedSender, channel, unbounded_channel,
};

/// Live handles each task keeps before freeing the oldest.
pub const WINDOW: usize = 1024;
/// Every `SAMPLE`-th operation is timed.
pub const SAMPLE: u64 = 16;
/// [`run_by_hand`]: handles per batch sent back, batches a channel holds,
/// and the yields after which a partial batch is sent (segalloc's own
/// forwarding: `BATCH`, `QUEUE_BATCHES` and `FLUSH_TICKS` in `src/mesh.rs`).
pub const HAND_BATCH: usize = 1024;
pub const HAND_QUEUE: usize = 256;
pub const HAND_FLUSH_YIELDS: u32 = 16;
/// How long a run waits at its end for the frees it made to be applied
/// before it gives up (they never arrived: a bug).
pub const DRAIN_LIMIT: Duration = Duration::from_secs(60);

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
    /// [`run_by_hand`]: frees this shard applied from the batches carried
    /// back to it.
    pub carried_back: u64,
    /// [`run_by_hand`]: batches this shard carried back, and the largest.
    pub carried_batches: u64,
    pub largest_batch: usize,
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
    /// [`run_by_hand`]: frees applied from the batches carried back, over
    /// all shards (with one shard too).
    pub carried_back: u64,
    /// [`run_by_hand`]: batches carried back over all shards, and the
    /// largest.
    pub carried_batches: u64,
    pub largest_batch: usize,
    /// Batches of forwarded frees segalloc sent during the run, over all
    /// shards.
    pub forwarded_batches: u64,
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
    let (mut carrier, carried_back) = match by_hand {
        Some(b) => {
            let applied = Rc::new(Cell::new(0));
            tokio::task::spawn_local(apply_carried(shard.clone(), b.from_next, applied.clone()));
            (Some(Carrier::new(b.to_prev)), Some(applied))
        }
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
                take_frees(&shard, b, carrier.as_mut()).await?;
            }
        }
        if let Some(t0) = t0 {
            r.latencies_ns
                .push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
        if k % 256 == 255 {
            if let Some(c) = &mut carrier {
                c.tick().await;
            }
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
            take_frees(&shard, b, carrier.as_mut()).await?;
        }
    }
    // What is left goes back now; the owner's task ends once every shard
    // that carries to it has dropped its carrier.
    if let Some(mut c) = carrier {
        c.send().await;
        r.carried_batches = c.batches;
        r.largest_batch = c.largest;
    }
    for h in window.into_iter().chain(held.into_iter().map(|(_, h)| h)) {
        shard.free(h)?;
    }
    // The run ends when every free, forwarded ones included, is applied.
    shard.flush_frees().await?;
    let waiting = Instant::now();
    while shard.live_count() > live_before {
        assert!(
            waiting.elapsed() < DRAIN_LIMIT,
            "{} frees never applied",
            shard.live_count() - live_before
        );
        shard.drain_frees();
        // Leave the core to a shard thread sharing it (more shards than
        // cores), then let this shard's other tasks run.
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
    r.carried_back = carried_back.map_or(0, |c| c.get());
    Ok(r)
}

/// The second channel of [`run_by_hand`]: back to the previous shard (the
/// owner of the handles this shard receives), and from the next one.
struct ByHand {
    to_prev: Sender<Vec<Handle>>,
    from_next: Receiver<Vec<Handle>>,
}

/// [`run_by_hand`]'s way back to the owner: a buffer sent when it holds
/// [`HAND_BATCH`] handles, or [`HAND_FLUSH_YIELDS`] yields of the task
/// after its first handle.
struct Carrier {
    tx: Sender<Vec<Handle>>,
    buf: Vec<Handle>,
    /// Yields since the buffer's first handle.
    yields: u32,
    /// Batches sent, and the largest.
    batches: u64,
    largest: usize,
}

impl Carrier {
    fn new(tx: Sender<Vec<Handle>>) -> Carrier {
        Carrier {
            tx,
            buf: Vec::with_capacity(HAND_BATCH),
            yields: 0,
            batches: 0,
            largest: 0,
        }
    }

    async fn push(&mut self, h: Handle) {
        self.buf.push(h);
        if self.buf.len() >= HAND_BATCH {
            self.send().await;
        }
    }

    /// One yield of the task: send a partial batch once it has waited
    /// long enough.
    async fn tick(&mut self) {
        if !self.buf.is_empty() {
            self.yields += 1;
            if self.yields >= HAND_FLUSH_YIELDS {
                self.send().await;
            }
        }
    }

    async fn send(&mut self) {
        self.yields = 0;
        if self.buf.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.buf, Vec::with_capacity(HAND_BATCH));
        self.batches += 1;
        self.largest = self.largest.max(batch.len());
        // The owner's task runs until every carrier to it is dropped.
        let _ = self.tx.send(batch).await;
    }
}

/// The owner's task of [`run_by_hand`]: free every batch carried back, as
/// it arrives, counting them in `applied`.
async fn apply_carried(shard: Shard, mut rx: Receiver<Vec<Handle>>, applied: Rc<Cell<u64>>) {
    while let Some(batch) = rx.recv().await {
        let n = batch.len() as u64;
        for h in batch {
            shard.free(h).expect("a carried free");
        }
        applied.set(applied.get() + n);
    }
}

/// Free a batch of the previous shard's handles: through segalloc, or by
/// hand, carried back to their owner.
async fn take_frees(
    shard: &Shard,
    batch: Vec<Handle>,
    carrier: Option<&mut Carrier>,
) -> Result<(), Error> {
    match carrier {
        Some(c) => {
            for h in batch {
                c.push(h).await;
            }
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
    let batches_before = forwarded_batches(rt)?;
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
        let (mut txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| channel(HAND_QUEUE)).unzip();
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
    let (mut carried_back, mut carried_batches, mut largest_batch) = (0, 0, 0);
    for j in jobs {
        let r = futures::executor::block_on(j)??;
        carried_back += r.carried_back;
        carried_batches += r.carried_batches;
        largest_batch = largest_batch.max(r.largest_batch);
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
        carried_back,
        carried_batches,
        largest_batch,
        forwarded_batches: forwarded_batches(rt)? - batches_before,
    })
}

/// Batches of forwarded frees every shard of `rt` has sent so far.
fn forwarded_batches(rt: &Runtime) -> Result<u64, Error> {
    let stats = futures::executor::block_on(rt.stats())?;
    Ok(stats.shards.iter().map(|s| s.mesh.batches_sent).sum())
}
