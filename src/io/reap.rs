//! The reaper: while operations whose futures were dropped (or that are
//! kept for a later task: `Op::detach`) are still in flight, a task drives
//! the ring, so that their fds and windows are released as soon as the
//! kernel completes them, with no caller polling the ring.
//!
//! The task is started when the first such operation appears and ends when
//! none is left. It reaches its ring through a table of this thread, so the
//! task holds no `Rc` and is `Send`: it is spawned with `tokio::spawn`, and
//! needs no `LocalSet`. It touches the ring only on the ring's own thread,
//! which is why it is started only on a current-thread runtime (its tasks run
//! on the thread that drives it, the shard's thread). Elsewhere (a
//! multi-thread runtime, or outside any runtime) an abandoned operation is
//! reaped by the next operation polled on the ring, or when the ring closes.
//!
//! The reaper watches the eventfd with its own task's waker, like any waiting
//! operation, and takes part in the hand-over of that watch (`Driver`'s
//! settle entry): it never polls with a waker that belongs to no task.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::{self, ThreadId};

use slab::Slab;
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{Ring, RingInner};
use crate::wait::Wait;

/// What a ring and its reaper share across threads. A current-thread
/// runtime driven by another thread (`Runtime::block_on` there, the shard
/// under `Handle::block_on` here) polls the reaper on that thread, where it
/// cannot reach its ring: it then says so here and wakes every task waiting
/// for a release, which gives up instead of waiting forever.
#[derive(Default)]
pub(super) struct Link {
    lost: AtomicBool,
    /// The tasks waiting in [`Released`], one entry per wait.
    waiters: Mutex<Slab<Waker>>,
}

impl Link {
    /// Whether a reaper of this ring was polled on another thread.
    pub(super) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    fn lose(&self) {
        self.lost.store(true, Ordering::Release);
        // Each entry stays until its wait is dropped (keys stay valid).
        for (_, w) in self.lock().iter() {
            w.wake_by_ref();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slab<Waker>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The wait [`Ring::released`] returns: until the ring releases a dropped
/// operation's resources, or its reaper finds it cannot run.
pub(crate) struct Released {
    wait: Wait,
    link: Arc<Link>,
    /// This wait's entry in the link's waiters.
    key: Option<usize>,
}

impl Released {
    pub(super) fn new(wait: Wait, link: &Arc<Link>) -> Released {
        Released {
            wait,
            link: link.clone(),
            key: None,
        }
    }
}

impl Future for Released {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        {
            let mut waiters = this.link.lock();
            match this.key.and_then(|k| waiters.get_mut(k)) {
                Some(w) => w.clone_from(cx.waker()),
                None => this.key = Some(waiters.insert(cx.waker().clone())),
            }
        }
        // Checked after registering: a `lose` in between wakes this task.
        if this.link.is_lost() {
            return Poll::Ready(());
        }
        Pin::new(&mut this.wait).poll(cx)
    }
}

impl Drop for Released {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.link.lock().try_remove(k);
        }
    }
}

thread_local! {
    /// The rings of this thread that have a reaper, by the reaper's key.
    static RINGS: RefCell<Slab<Weak<RingInner>>> = const { RefCell::new(Slab::new()) };
}

/// Start a reaper for `ring` if it has abandoned operations and none runs.
pub(super) fn ensure(ring: &Ring) {
    let inner = &ring.inner;
    let Some(d) = &inner.uring else { return };
    if inner.reaping.get() {
        // It may be asleep while another task watches the ring: have it
        // look again (an entry left queued by a failed enter waits for it).
        d.wake_settle();
        return;
    }
    if d.unattended() == 0 {
        return;
    }
    let Ok(rt) = Handle::try_current() else {
        return;
    };
    if rt.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return;
    }
    let Ok(key) = RINGS.try_with(|r| r.borrow_mut().insert(Rc::downgrade(inner))) else {
        return;
    };
    inner.reaping.set(true);
    drop(rt.spawn(Reaper {
        owner: thread::current().id(),
        key: Some(key),
        settle: None,
        link: inner.reaper_link.clone(),
    }));
}

/// The reaper task of one ring.
struct Reaper {
    /// The ring's thread: the only one where `key` means anything.
    owner: ThreadId,
    /// The ring's entry in [`RINGS`]; `None` once the reaper has left.
    key: Option<usize>,
    /// The reaper's settle entry in the ring's table while it waits.
    settle: Option<usize>,
    /// Where it says that it was polled on another thread.
    link: Arc<Link>,
}

impl Reaper {
    /// The ring, when it is still open and this is its thread.
    fn ring(&self) -> Option<Rc<RingInner>> {
        let key = self.key?;
        if thread::current().id() != self.owner {
            return None;
        }
        RINGS
            .try_with(|r| r.borrow().get(key).and_then(Weak::upgrade))
            .ok()
            .flatten()
    }

    /// Leave: give up the ring's watch and entry, so that a later abandoned
    /// operation starts another reaper.
    fn finish(&mut self, inner: Option<&RingInner>) {
        if let Some(inner) = inner {
            if let Some(d) = &inner.uring {
                d.cancel_settle(&mut self.settle);
            }
            inner.reaping.set(false);
        }
        if thread::current().id() == self.owner
            && let Some(key) = self.key.take()
        {
            let _ = RINGS.try_with(|r| r.borrow_mut().try_remove(key));
        }
    }
}

impl Future for Reaper {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let Some(inner) = this.ring() else {
            if thread::current().id() != this.owner {
                // The ring's `reaping` stays set (it lives on the ring's
                // thread): `released` sees the link and stops waiting.
                this.link.lose();
            }
            this.finish(None);
            return Poll::Ready(());
        };
        let d = inner
            .uring
            .as_ref()
            .expect("a reaper runs only on io_uring");
        match d.poll_settle(&mut this.settle, cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "the control ring cannot watch its completions; operations dropped in flight are reaped by the next one");
                }
                this.finish(Some(&inner));
                Poll::Ready(())
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if self.key.is_some() && thread::current().id() != self.owner {
            self.link.lose();
        }
        if self.key.is_some() {
            let inner = self.ring();
            self.finish(inner.as_deref());
        }
    }
}
