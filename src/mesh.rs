//! The channel mesh between shards: transport only.
//!
//! Two kinds of traffic cross it:
//!
//! * **Frees.** Every ordered pair of shards `(from, to)` has its own bounded
//!   channel of [`Parcel`]s, so no two senders share a queue and no lock is
//!   taken. A shard buffers frees of other shards' handles per destination
//!   and sends a batch when it reaches [`BATCH`] handles or
//!   [`FLUSH_TICKS`] turns of its executor after the batch's first free (an
//!   idle shard sends at once, a busy one gathers bigger batches; a full
//!   batch's send starts the next batch's clock). A channel holds at most
//!   [`QUEUE_BATCHES`] batches: when it is full and the sender's buffer for
//!   that owner is full too, a further free is refused with
//!   [`Error::Backpressure`] (nothing changes; await a flush and retry), so
//!   the memory held by frees in flight is bounded. A buffer whose channel
//!   is full waits for room in a task of its own, so an owner far behind
//!   delays only the frees sent to it. A [`Parcel::Barrier`]
//!   sent after the frees is answered by the owner once it has applied
//!   everything before it (or with `Poisoned`, when a failed sync left it
//!   unable to apply frees): that is how a flush waits for the owners. A
//!   stopping shard closes, sends what it buffered, then a
//!   [`Parcel::Done`] to each peer, and applies what its peers send until
//!   each has said `Done` or is gone ([`MeshLocal::finish`],
//!   [`MeshLocal::peers_finished`]).
//! * **Jobs.** Each shard has one bounded inbox of closures to run on it
//!   (`Shard::submit_to`); senders wait for room.
//!
//! The mesh never applies anything itself: the shard drains its inboxes.
//!
//! **Architecture invariant:** a shard never touches another shard's
//! allocator or bytes; it only sends it handles and closures.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::task::{Context, Poll};

use futures::channel::oneshot;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender, channel};

use crate::error::{Error, Result};
use crate::format::Handle;

/// Frees per batch before a buffer is sent without waiting for the tick.
pub(crate) const BATCH: usize = 1024;

/// Batches a channel between two shards holds before senders are refused:
/// 256 × 1024 handles of 32 bytes, 8 MiB per ordered pair of shards at most.
pub(crate) const QUEUE_BATCHES: usize = 256;

/// Closures waiting to run on one shard before senders wait.
pub(crate) const JOB_QUEUE: usize = 1024;

/// A partial batch is sent this many turns of the shard's executor after
/// its first free.
pub(crate) const FLUSH_TICKS: u64 = 16;

/// Counters of a shard's mesh endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MeshStats {
    /// Frees of other shards' handles forwarded by this shard.
    pub cross_frees_sent: u64,
    /// Batches sent.
    pub batches_sent: u64,
    /// Forwarded frees this shard received and applied.
    pub cross_frees_received: u64,
    /// Forwarded frees this shard received and rejected (bad handle,
    /// double free, or this shard is poisoned): each is also logged through
    /// `tracing` at warn level.
    pub cross_frees_rejected: u64,
    /// Frees refused with [`Error::Backpressure`] because the owner was
    /// too far behind.
    pub cross_frees_refused: u64,
}

/// What travels on a free channel.
pub(crate) enum Parcel {
    /// Frees of the receiver's handles.
    Frees(Vec<Handle>),
    /// Answer once every parcel before this one is applied: how many of
    /// the sender's frees the owner rejected so far, or why the frees
    /// before it may not have been applied (the owner is poisoned).
    Barrier(oneshot::Sender<Result<Rejected>>),
    /// The sender is stopping: it has closed and sent everything it
    /// acknowledged; nothing follows on this channel. Consumed by the mesh.
    Done,
}

/// The frees from one sender an owner rejected: how many in all, and the
/// first of them since the owner's last barrier answer to that sender
/// (`None` when that answer carried it, or none was), with its number (the
/// total when it was counted). Kept per inbox by the owner, and the answer
/// to a barrier.
#[derive(Debug, Default)]
pub(crate) struct Rejected {
    pub(crate) total: u64,
    pub(crate) first: Option<(u64, Error)>,
}

/// What a sender knows of its frees an owner rejected.
#[derive(Default)]
struct RejectedBy {
    /// The owner's count as of its latest barrier answer.
    seen: u64,
    /// How many of them [`take_rejected`](MeshLocal::take_rejected)
    /// reported.
    reported: u64,
    /// The first one not reported yet: its number and error.
    first: Option<(u64, Error)>,
}

/// The channels of one shard, before it is opened (`Send`). `J` is the
/// closure type the shard runs for others.
pub(crate) struct Endpoint<J> {
    pub(crate) index: u16,
    out: Vec<Option<Sender<Parcel>>>,
    inbox: Vec<Receiver<Parcel>>,
    jobs_out: Vec<Option<Sender<J>>>,
    jobs_in: Receiver<J>,
}

/// Build the n × n mesh; endpoint `i` sends on row `i`, receives column `i`.
pub(crate) fn build<J>(n: usize) -> Vec<Endpoint<J>> {
    let mut out: Vec<Vec<Option<Sender<Parcel>>>> = (0..n).map(|_| Vec::new()).collect();
    let mut inbox: Vec<Vec<Receiver<Parcel>>> = (0..n).map(|_| Vec::new()).collect();
    for (from, row) in out.iter_mut().enumerate() {
        for (to, inbox_to) in inbox.iter_mut().enumerate() {
            if from == to {
                row.push(None);
            } else {
                let (tx, rx) = channel(QUEUE_BATCHES);
                row.push(Some(tx));
                inbox_to.push(rx);
            }
        }
    }
    let (job_tx, job_rx): (Vec<_>, Vec<_>) = (0..n).map(|_| channel::<J>(JOB_QUEUE)).unzip();
    out.into_iter()
        .zip(inbox)
        .zip(job_rx)
        .enumerate()
        .map(|(i, ((out, inbox), jobs_in))| Endpoint {
            index: i as u16,
            out,
            inbox,
            jobs_out: (0..n)
                .map(|to| (to != i).then(|| job_tx[to].clone()))
                .collect(),
            jobs_in,
        })
        .collect()
}

/// Whether `tx` is a channel to a peer that still receives (`None`: the
/// shard itself, which has no channel).
#[inline(always)]
fn open(tx: Option<&Sender<Parcel>>) -> bool {
    tx.is_some_and(|tx| !tx.is_closed())
}

/// A shard's side of the mesh, once open (`!Send`).
pub(crate) struct MeshLocal<J> {
    out: Vec<Option<Sender<Parcel>>>,
    buffers: RefCell<Vec<Vec<Handle>>>,
    /// Per destination, the flush clock's turn when its buffer got its
    /// first free.
    first_at: Vec<Cell<u64>>,
    /// The flush task's turns so far: the clock of [`FLUSH_TICKS`].
    turn: Cell<u64>,
    flush_scheduled: Cell<bool>,
    /// Per destination, whether a waiter task sends its buffer as room
    /// appears in its full channel ([`wait_for_room`](Self::wait_for_room));
    /// the flush clock passes it by meanwhile.
    waiting: Vec<Cell<bool>>,
    closed: Cell<bool>,
    stats: Cell<MeshStats>,
    /// `MeshStats::cross_frees_sent`, kept apart: counted on every free.
    sent: Cell<u64>,
    inbox: RefCell<Vec<Receiver<Parcel>>>,
    /// Per inbox, the frees from its sender this shard rejected.
    rejected_from: RefCell<Vec<Rejected>>,
    /// Per destination, the frees this shard sent that the destination
    /// rejected.
    rejected_by: RefCell<Vec<RejectedBy>>,
    /// Per inbox, whether its sender said [`Parcel::Done`].
    done: RefCell<Vec<bool>>,
    next_inbox: Cell<usize>,
    jobs_out: Vec<Option<Sender<J>>>,
    jobs_in: RefCell<Option<Receiver<J>>>,
}

impl<J: 'static> MeshLocal<J> {
    pub(crate) fn new(ep: Endpoint<J>) -> MeshLocal<J> {
        let n = ep.out.len();
        MeshLocal {
            out: ep.out,
            buffers: RefCell::new(vec![Vec::new(); n]),
            first_at: (0..n).map(|_| Cell::new(0)).collect(),
            turn: Cell::new(0),
            flush_scheduled: Cell::new(false),
            waiting: (0..n).map(|_| Cell::new(false)).collect(),
            closed: Cell::new(false),
            stats: Cell::new(MeshStats::default()),
            sent: Cell::new(0),
            done: RefCell::new(vec![false; ep.inbox.len()]),
            rejected_from: RefCell::new((0..ep.inbox.len()).map(|_| Default::default()).collect()),
            rejected_by: RefCell::new((0..n).map(|_| Default::default()).collect()),
            inbox: RefCell::new(ep.inbox),
            next_inbox: Cell::new(0),
            jobs_out: ep.jobs_out,
            jobs_in: RefCell::new(Some(ep.jobs_in)),
        }
    }

    pub(crate) fn stats(&self) -> MeshStats {
        MeshStats {
            cross_frees_sent: self.sent.get(),
            ..self.stats.get()
        }
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut MeshStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Refuse every further free: what is acknowledged from now on is
    /// exactly what a following [`flush`](Self::flush) delivers.
    pub(crate) fn close(&self) {
        self.closed.set(true);
    }

    /// Queue a free for its owner `to`.
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] when the owner is gone or this endpoint is
    /// closed; [`Error::Backpressure`] when the owner's channel and this
    /// shard's buffer for it are both full. Nothing is queued then.
    #[inline]
    pub(crate) fn forward(self: &Rc<Self>, h: Handle) -> Result<()> {
        let to = h.shard() as usize;
        // The common case, kept small: an open owner whose batch has begun
        // and has room after this free. Someone sends it: while a buffer
        // for an open owner holds frees, the flush task is scheduled (it
        // checks, last thing before it ends) or that owner's waiter waits
        // for room. Everything else takes `forward_slow`.
        if self.takes_frees_for(to) {
            let mut b = self.buffers.borrow_mut();
            let buf = &mut b[to];
            if (1..BATCH - 1).contains(&buf.len()) {
                debug_assert!(self.flush_scheduled.get() || self.waiting[to].get());
                buf.push(h);
                drop(b);
                self.sent.set(self.sent.get() + 1);
                return Ok(());
            }
        }
        self.forward_slow(h)
    }

    /// Whether this endpoint accepts a free for owner `to`: it is not
    /// closed, and `to` is a peer whose channel is open.
    #[inline(always)]
    fn takes_frees_for(&self, to: usize) -> bool {
        !self.closed.get() && self.out.get(to).is_some_and(|tx| open(tx.as_ref()))
    }

    /// [`forward`](Self::forward) of a batch's first or last free, or to an
    /// owner that is gone.
    #[inline(never)]
    fn forward_slow(self: &Rc<Self>, h: Handle) -> Result<()> {
        let to = h.shard() as usize;
        // A stopped owner has closed its channel: refuse at once (a buffered
        // free would be acknowledged, then lost with its batch).
        if !self.takes_frees_for(to) {
            return Err(Error::ShardGone { shard: h.shard() });
        }
        // `schedule_flush` before each push: a `spawn_local` that panics (a
        // free outside the shard's `LocalSet`) leaves nothing queued, and
        // the next free comes here again.
        let full = {
            let mut b = self.buffers.borrow_mut();
            let buf = &mut b[to];
            if buf.len() < BATCH {
                if buf.is_empty() {
                    self.first_at[to].set(self.turn.get());
                }
                self.schedule_flush();
                buf.push(h);
                buf.len() >= BATCH
            } else {
                drop(b);
                // Full, its channel too when it was last tried.
                if let Err(e) = self.try_send(to) {
                    if matches!(e, Error::Backpressure { .. }) {
                        self.bump(|s| s.cross_frees_refused += 1);
                    }
                    return Err(e);
                }
                self.first_at[to].set(self.turn.get());
                self.schedule_flush();
                self.buffers.borrow_mut()[to].push(h);
                false
            }
        };
        self.sent.set(self.sent.get() + 1);
        if full {
            // A full channel keeps the batch here: the next free or flush
            // retries.
            let _ = self.try_send(to);
        }
        Ok(())
    }

    /// Send each buffer [`FLUSH_TICKS`] turns of the executor after its
    /// first free, unless it filled and left before.
    #[inline]
    fn schedule_flush(self: &Rc<Self>) {
        if !self.flush_scheduled.get() {
            self.spawn_flush();
        }
    }

    /// The flush task: one tick of the clock per turn of the executor, while
    /// any buffer holds frees. (A task that slept [`FLUSH_TICKS`] turns and
    /// then sent every buffer sent, right after each full batch, the few
    /// frees that followed it: in the shard sweep about a third of its
    /// batches held under 128 frees.) It never waits for room: a buffer
    /// whose channel is full goes to a waiter of its own
    /// ([`wait_for_room`](Self::wait_for_room)), so one owner far behind
    /// does not stop the clock for the others.
    #[cold]
    fn spawn_flush(self: &Rc<Self>) {
        let me = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            loop {
                tokio::task::yield_now().await;
                let Some(me) = me.upgrade() else { return };
                let now = me.turn.get() + 1;
                me.turn.set(now);
                for to in 0..me.out.len() {
                    // An owner that is gone keeps its buffer (a flush
                    // reports it); `ticking` stops the clock for it. A
                    // waiting owner's buffer is its waiter's.
                    if !me.waiting[to].get()
                        && !me.buffers.borrow()[to].is_empty()
                        && now - me.first_at[to].get() >= FLUSH_TICKS
                        && matches!(me.try_send(to), Err(Error::Backpressure { .. }))
                    {
                        me.wait_for_room(to);
                    }
                }
                // No await since the sends: the flag is cleared only if no
                // buffer is left without a sender. `forward` relies on it:
                // it queues into a begun batch without scheduling anything.
                if !me.ticking() {
                    me.flush_scheduled.set(false);
                    return;
                }
            }
        });
        // Set once the task exists (it cannot run before this returns): a
        // `spawn_local` that panics, outside a `LocalSet`, leaves the flag
        // clear (`forward_slow` has queued nothing yet).
        self.flush_scheduled.set(true);
    }

    /// Hand the buffer for `to`, whose channel is full, to a task that
    /// sends it, and whatever joins it meanwhile, as room appears; the
    /// flush clock passes `to` by until that task has emptied the buffer
    /// (or found the owner gone).
    #[cold]
    fn wait_for_room(self: &Rc<Self>, to: usize) {
        // One waiter per owner: the flush task passes a waiting owner by.
        debug_assert!(!self.waiting[to].get(), "a second waiter for {to}");
        let me = Rc::downgrade(self);
        tokio::task::spawn_local(async move {
            let Some(me) = me.upgrade() else { return };
            let _ = me.send_buffered(to).await;
            // The buffer is empty now (no await since `send_buffered`
            // looked), or the owner is gone: either way nothing is left
            // for this waiter to send.
            me.waiting[to].set(false);
        });
        self.waiting[to].set(true);
    }

    /// Whether a buffer holds frees for an owner that is not gone and that
    /// no waiter sends: the flush clock must keep running.
    fn ticking(&self) -> bool {
        let buffers = self.buffers.borrow();
        self.out
            .iter()
            .zip(buffers.iter())
            .zip(&self.waiting)
            .any(|((tx, buf), waiting)| !buf.is_empty() && open(tx.as_ref()) && !waiting.get())
    }

    /// Send the buffer for `to` if its channel has room now.
    fn try_send(&self, to: usize) -> Result<()> {
        let Some(tx) = &self.out[to] else {
            return Ok(());
        };
        let batch = std::mem::take(&mut self.buffers.borrow_mut()[to]);
        if batch.is_empty() {
            return Ok(());
        }
        let sent = batch.len();
        match tx.try_send(Parcel::Frees(batch)) {
            Ok(()) => {
                self.sent_one(to, sent);
                Ok(())
            }
            Err(TrySendError::Full(Parcel::Frees(b))) => {
                let queued = b.len();
                self.buffers.borrow_mut()[to] = b;
                Err(Error::Backpressure {
                    owner: to as u16,
                    queued,
                })
            }
            // Kept, as `send_buffered` keeps it: what a gone owner's buffer
            // holds stays there, lost with the owner.
            Err(TrySendError::Closed(Parcel::Frees(b))) => {
                self.buffers.borrow_mut()[to] = b;
                Err(Error::ShardGone { shard: to as u16 })
            }
            Err(_) => unreachable!("try_send gives back the batch it was given"),
        }
    }

    /// Send the buffer for `to`, waiting for room in its channel.
    async fn send_buffered(&self, to: usize) -> Result<()> {
        let Some(tx) = &self.out[to] else {
            return Ok(());
        };
        while !self.buffers.borrow()[to].is_empty() {
            let permit = tx
                .reserve()
                .await
                .map_err(|_| Error::ShardGone { shard: to as u16 })?;
            // No await between taking the buffer and sending it: batches
            // leave in the order they were filled.
            let batch = std::mem::take(&mut self.buffers.borrow_mut()[to]);
            if !batch.is_empty() {
                let sent = batch.len();
                permit.send(Parcel::Frees(batch));
                self.sent_one(to, sent);
            }
        }
        Ok(())
    }

    /// A batch of `len` frees left for `to`: count it, and give the
    /// emptied buffer room for as many (grown push by push, a whole batch's
    /// buffer was reallocated and copied ten times).
    fn sent_one(&self, to: usize, len: usize) {
        self.bump(|s| s.batches_sent += 1);
        self.buffers.borrow_mut()[to].reserve(len);
    }

    /// Send every buffered free and wait until each owner has applied
    /// everything this shard sent it before the call.
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] naming the first owner that is gone, or
    /// [`Error::Poisoned`] naming one that could not apply them (the other
    /// owners are still flushed).
    pub(crate) async fn flush(&self) -> Result<()> {
        self.flush_owners(0..self.out.len()).await
    }

    /// [`flush`](Self::flush) of owner `to` only.
    pub(crate) async fn flush_to(&self, to: usize) -> Result<()> {
        self.flush_owners(to..to + 1).await
    }

    async fn flush_owners(&self, owners: std::ops::Range<usize>) -> Result<()> {
        let mut first = None;
        let mut acks = Vec::new();
        for to in owners {
            let Some(Some(tx)) = self.out.get(to) else {
                continue;
            };
            let sent = async {
                self.send_buffered(to).await?;
                let (ack, done) = oneshot::channel();
                tx.send(Parcel::Barrier(ack))
                    .await
                    .map_err(|_| Error::ShardGone { shard: to as u16 })?;
                Ok::<_, Error>(done)
            };
            match sent.await {
                Ok(done) => acks.push((to, done)),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        for (to, done) in acks {
            match done.await {
                Ok(Ok(r)) => {
                    let mut by = self.rejected_by.borrow_mut();
                    let by = &mut by[to];
                    // Answers of overlapping flushes may be taken out of
                    // order: an error is kept only if its rejection was not
                    // reported yet, whichever answer carried it.
                    by.seen = by.seen.max(r.total);
                    if by.first.is_none()
                        && let Some((n, e)) = r.first
                        && n > by.reported
                    {
                        by.first = Some((n, e));
                    }
                }
                Ok(Err(e)) => {
                    first.get_or_insert(e);
                }
                Err(_) => {
                    first.get_or_insert(Error::ShardGone { shard: to as u16 });
                }
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// The frees this shard forwarded that their owners rejected, as of
    /// the owners' latest answers to its flushes, and not reported before:
    /// [`Error::FreesRejected`] with how many and the first one's error.
    pub(crate) fn take_rejected(&self) -> Option<Error> {
        let mut count = 0;
        let mut first = None;
        for by in self.rejected_by.borrow_mut().iter_mut() {
            if by.seen > by.reported {
                count += by.seen - by.reported;
                by.reported = by.seen;
                let e = by.first.take().map(|(_, e)| e);
                if first.is_none() {
                    first = e;
                }
            }
        }
        (count > 0).then(|| Error::FreesRejected {
            count,
            first: first.map(Box::new),
        })
    }

    /// Count a free from inbox `from` that this shard rejected with `e`.
    pub(crate) fn rejected(&self, from: usize, e: Error) {
        let mut r = self.rejected_from.borrow_mut();
        let r = &mut r[from];
        r.total += 1;
        if r.first.is_none() {
            r.first = Some((r.total, e));
        }
    }

    /// The answer to a barrier from inbox `from`: what this shard rejected
    /// of its frees.
    pub(crate) fn rejected_answer(&self, from: usize) -> Rejected {
        let mut r = self.rejected_from.borrow_mut();
        let r = &mut r[from];
        Rejected {
            total: r.total,
            first: r.first.take(),
        }
    }

    /// Every parcel already received (no waiting), with its inbox.
    pub(crate) fn take_ready(&self) -> Vec<(usize, Parcel)> {
        let mut ready = Vec::new();
        let mut done = self.done.borrow_mut();
        for (i, (rx, done)) in self
            .inbox
            .borrow_mut()
            .iter_mut()
            .zip(done.iter_mut())
            .enumerate()
        {
            while let Ok(p) = rx.try_recv() {
                match p {
                    Parcel::Done => *done = true,
                    p => ready.push((i, p)),
                }
            }
        }
        ready
    }

    /// Stop: refuse further frees, send every buffered one, then tell each
    /// peer that nothing more follows ([`Parcel::Done`]). A peer that is
    /// gone is skipped.
    pub(crate) async fn finish(&self) {
        self.close();
        for (to, tx) in self.out.iter().enumerate() {
            let Some(tx) = tx else { continue };
            if self.send_buffered(to).await.is_ok() {
                let _ = tx.send(Parcel::Done).await;
            }
        }
    }

    /// Whether every peer has said [`Parcel::Done`] or is gone, and
    /// everything it sent before was received.
    pub(crate) fn peers_finished(&self) -> bool {
        let done = self.done.borrow();
        self.inbox
            .borrow()
            .iter()
            .zip(done.iter())
            .all(|(rx, &done)| done || (rx.is_closed() && rx.is_empty()))
    }

    /// The next parcel from any peer, fairly; `Ready(None)` once every
    /// peer is gone. Receivers stay in the mesh (borrowed only here), so
    /// [`take_ready`](Self::take_ready) can run between polls.
    ///
    /// A peer that said [`Parcel::Done`] sends no free after it, but may
    /// still flush (`Runtime::sync`, `flush_frees`, a shard whose task ran
    /// `finish_frees`): its barriers are answered until it is gone.
    pub(crate) fn poll_parcel(&self, cx: &mut Context<'_>) -> Poll<Option<(usize, Parcel)>> {
        let mut inbox = self.inbox.borrow_mut();
        let mut done = self.done.borrow_mut();
        let n = inbox.len();
        let start = self.next_inbox.get();
        let mut open = 0;
        for k in 0..n {
            let i = (start + k) % n;
            let mut next = inbox[i].poll_recv(cx);
            if let Poll::Ready(Some(Parcel::Done)) = next {
                // No free follows it on this channel; polled again, so that
                // a barrier after it wakes this task.
                done[i] = true;
                next = inbox[i].poll_recv(cx);
            }
            match next {
                Poll::Ready(Some(Parcel::Done)) => done[i] = true,
                Poll::Ready(Some(p)) => {
                    self.next_inbox.set(i + 1);
                    return Poll::Ready(Some((i, p)));
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
    }

    /// Queue `job` to run on shard `to`, waiting for room.
    ///
    /// # Errors
    ///
    /// [`Error::ShardGone`] when shard `to` is gone or not a peer.
    pub(crate) async fn submit(&self, to: u16, job: J) -> Result<()> {
        let gone = Error::ShardGone { shard: to };
        let Some(Some(tx)) = self.jobs_out.get(to as usize) else {
            return Err(gone);
        };
        tx.send(job).await.map_err(|_| gone)
    }

    /// The inbox of jobs for this shard (taken once, by the shard's task).
    pub(crate) fn take_jobs(&self) -> Option<Receiver<J>> {
        self.jobs_in.borrow_mut().take()
    }
}
