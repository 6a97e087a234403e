//! The channel mesh between shards: cross-shard frees, batched.
//!
//! Every ordered pair of shards `(from, to)` has its own unbounded channel
//! carrying batches (`Vec<Handle>`), so no two senders share a queue and no
//! lock is taken. A shard buffers frees of other shards' handles per
//! destination and sends a batch when it reaches [`BATCH`] handles or after
//! [`FLUSH_TICKS`] turns of its executor (a flush scheduled once per batch:
//! an idle shard sends at once, a busy one gathers bigger batches). The owner
//! drains its incoming channels in a local task: while it is busy, senders
//! only append to the queue; a wake-up happens only when the drain task is
//! parked (tokio's `AtomicWaker`), as in Seastar's cross-cpu free lists.
//!
//! **Architecture invariant:** a shard never touches another shard's
//! allocator; it only sends it handles.

use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};

use std::task::Poll;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use crate::format::Handle;
use crate::shard::ShardInner;

/// Frees per batch before a buffer is sent without waiting for the tick.
pub const BATCH: usize = 1024;

/// A partial batch is sent after this many turns of the shard's executor:
/// an idle shard gets through them at once, a busy one gathers bigger
/// batches (fewer cross-thread wake-ups).
pub const FLUSH_TICKS: usize = 16;

/// Counters of a shard's mesh endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshStats {
    /// Frees of other shards' handles forwarded by this shard.
    pub cross_frees_sent: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Forwarded frees this shard received and applied.
    pub cross_frees_received: u64,
    /// Forwarded frees this shard received and rejected (bad handle,
    /// double free): each is also logged through `tracing` at warn level.
    pub cross_frees_rejected: u64,
}

/// The channels of one shard, before it is opened (`Send`).
pub(crate) struct Endpoint {
    pub(crate) index: u16,
    pub(crate) out: Vec<Option<UnboundedSender<Vec<Handle>>>>,
    pub(crate) inbox: Vec<UnboundedReceiver<Vec<Handle>>>,
}

/// Build the n × n mesh; endpoint `i` sends on row `i`, receives column `i`.
pub(crate) fn build(n: usize) -> Vec<Endpoint> {
    let mut out: Vec<Vec<Option<UnboundedSender<Vec<Handle>>>>> =
        (0..n).map(|_| vec![None; n]).collect();
    let mut inbox: Vec<Vec<UnboundedReceiver<Vec<Handle>>>> = (0..n).map(|_| Vec::new()).collect();
    for (from, row) in out.iter_mut().enumerate() {
        for (to, slot) in row.iter_mut().enumerate() {
            if from != to {
                let (tx, rx) = unbounded_channel();
                *slot = Some(tx);
                inbox[to].push(rx);
            }
        }
    }
    out.into_iter()
        .zip(inbox)
        .enumerate()
        .map(|(i, (out, inbox))| Endpoint {
            index: i as u16,
            out,
            inbox,
        })
        .collect()
}

/// A shard's side of the mesh, once open (`!Send`).
pub(crate) struct MeshLocal {
    out: Vec<Option<UnboundedSender<Vec<Handle>>>>,
    buffers: RefCell<Vec<Vec<Handle>>>,
    flush_scheduled: Cell<bool>,
    pub(crate) stats: Cell<MeshStats>,
    inbox: RefCell<Vec<UnboundedReceiver<Vec<Handle>>>>,
}

impl MeshLocal {
    pub(crate) fn new(ep: Endpoint) -> MeshLocal {
        let n = ep.out.len();
        MeshLocal {
            out: ep.out,
            buffers: RefCell::new(vec![Vec::new(); n]),
            flush_scheduled: Cell::new(false),
            stats: Cell::new(MeshStats::default()),
            inbox: RefCell::new(ep.inbox),
        }
    }

    fn bump(&self, f: impl FnOnce(&mut MeshStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Queue a free for its owner. Returns false when the owner is gone.
    pub(crate) fn forward(self: &Rc<Self>, h: Handle) -> bool {
        let to = h.shard() as usize;
        let full = {
            let mut b = self.buffers.borrow_mut();
            b[to].push(h);
            b[to].len() >= BATCH
        };
        self.bump(|s| s.cross_frees_sent += 1);
        if full {
            return self.flush_to(to);
        }
        if !self.flush_scheduled.replace(true) {
            // Send what accumulated once the executor has turned a few times.
            let me = Rc::downgrade(self);
            tokio::task::spawn_local(async move {
                for _ in 0..FLUSH_TICKS {
                    tokio::task::yield_now().await;
                }
                if let Some(me) = me.upgrade() {
                    me.flush_scheduled.set(false);
                    me.flush();
                }
            });
        }
        true
    }

    fn flush_to(&self, to: usize) -> bool {
        let batch = std::mem::take(&mut self.buffers.borrow_mut()[to]);
        if batch.is_empty() {
            return true;
        }
        let n = batch.len();
        let ok = self.out[to]
            .as_ref()
            .is_some_and(|tx| tx.send(batch).is_ok());
        if ok {
            self.bump(|s| s.batches_sent += 1);
        } else {
            tracing::error!(
                to,
                lost = n,
                "cross-shard frees could not be forwarded: owner shard is gone"
            );
        }
        ok
    }

    /// Send every buffered free now.
    pub(crate) fn flush(&self) {
        for to in 0..self.out.len() {
            self.flush_to(to);
        }
    }

    /// Apply every batch already received (no waiting).
    pub(crate) fn drain_now(&self, shard: &ShardInner) {
        let mut batches = Vec::new();
        for rx in self.inbox.borrow_mut().iter_mut() {
            while let Ok(b) = rx.try_recv() {
                batches.push(b);
            }
        }
        for b in batches {
            self.apply(shard, b);
        }
    }

    fn apply(&self, shard: &ShardInner, batch: Vec<Handle>) {
        let mut ok = 0;
        let mut bad = 0;
        for h in batch {
            match shard.alloc.free(h) {
                Ok(()) => ok += 1,
                Err(e) => {
                    bad += 1;
                    tracing::warn!(handle = %h, error = %e, "forwarded free rejected");
                }
            }
        }
        self.bump(|s| {
            s.cross_frees_received += ok;
            s.cross_frees_rejected += bad;
        });
    }

    /// The drain task: apply incoming batches until every sender is gone or
    /// the shard is dropped. Receivers stay in `inbox` (borrowed only inside
    /// a poll), so [`drain_now`](Self::drain_now) can run between polls.
    pub(crate) async fn run_drain(me: Weak<MeshLocal>, shard: Weak<ShardInner>) {
        let mut start = 0usize;
        loop {
            let next = std::future::poll_fn(|cx| {
                let Some(m) = me.upgrade() else {
                    return Poll::Ready(None);
                };
                let mut inbox = m.inbox.borrow_mut();
                let n = inbox.len();
                let mut open = 0;
                for k in 0..n {
                    let i = (start + k) % n.max(1);
                    match inbox[i].poll_recv(cx) {
                        Poll::Ready(Some(b)) => {
                            start = i + 1;
                            return Poll::Ready(Some(b));
                        }
                        Poll::Ready(None) => {}
                        Poll::Pending => open += 1,
                    }
                }
                if open == 0 {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                }
            })
            .await;
            let Some(batch) = next else {
                return;
            };
            let (Some(m), Some(s)) = (me.upgrade(), shard.upgrade()) else {
                return;
            };
            m.apply(&s, batch);
        }
    }
}
