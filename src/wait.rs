//! A single-threaded, fair (FIFO) wait list: the shard's replacement for a
//! condition variable. No lock, no atomic: waiters and wakers live on one
//! thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Waiter {
    waker: RefCell<Option<Waker>>,
    notified: Cell<bool>,
    done: Cell<bool>,
}

/// FIFO of tasks waiting for "something was released".
#[derive(Default)]
pub(crate) struct WaitList {
    queue: RefCell<VecDeque<Rc<Waiter>>>,
    waiting: Cell<usize>,
    /// Entries of `queue` whose wait was given up (marked done, not yet
    /// removed): they are skipped when met and swept out together once
    /// they are half the queue, so that giving up costs O(1) amortized.
    abandoned: Cell<usize>,
}

/// Abandoned entries below this many are never swept (a sweep of a short
/// queue is not worth it).
const SWEEP_MIN: usize = 32;

impl WaitList {
    /// Number of tasks currently waiting.
    #[inline]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.get()
    }

    /// Wake the longest-waiting task, if any.
    pub(crate) fn wake_one(&self) {
        loop {
            let Some(w) = self.queue.borrow_mut().pop_front() else {
                return;
            };
            if w.done.get() {
                self.abandoned.set(self.abandoned.get() - 1);
                continue;
            }
            w.notified.set(true);
            let waker = w.waker.borrow_mut().take();
            if let Some(waker) = waker {
                waker.wake();
            }
            return;
        }
    }

    /// Wake every waiting task.
    pub(crate) fn wake_all(&self) {
        let all: Vec<_> = self.queue.borrow_mut().drain(..).collect();
        self.abandoned.set(0);
        for w in all {
            if w.done.get() {
                continue;
            }
            w.notified.set(true);
            let waker = w.waker.borrow_mut().take();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// A future that resolves when this task is woken. Registering happens at
    /// once, so a wake between this call and the first poll is not lost.
    pub(crate) fn wait(self: &Rc<Self>) -> Wait {
        let w = Rc::new(Waiter::default());
        self.queue.borrow_mut().push_back(w.clone());
        self.waiting.set(self.waiting.get() + 1);
        Wait {
            list: self.clone(),
            me: w,
        }
    }
}

/// Future returned by [`WaitList::wait`].
pub(crate) struct Wait {
    list: Rc<WaitList>,
    me: Rc<Waiter>,
}

impl Future for Wait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.me.notified.get() {
            if !self.me.done.replace(true) {
                self.list.waiting.set(self.list.waiting.get() - 1);
            }
            return Poll::Ready(());
        }
        *self.me.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for Wait {
    fn drop(&mut self) {
        if !self.me.done.replace(true) {
            self.list.waiting.set(self.list.waiting.get() - 1);
            if self.me.notified.get() {
                // Woken but never observed it: pass the wake-up on.
                self.list.wake_one();
            } else {
                // Given up (a timeout, a dropped task): still in the queue,
                // marked done. Removing it at once cost a scan of the queue
                // each: n waits given up together (their deadlines in one
                // tick, or their tasks cancelled) held the thread O(n²),
                // 16 s for 160,000. Swept out once the abandoned entries
                // are half the queue, so that they do not pile up.
                let list = &self.list;
                let abandoned = list.abandoned.get() + 1;
                let mut queue = list.queue.borrow_mut();
                if abandoned >= SWEEP_MIN && 2 * abandoned >= queue.len() {
                    queue.retain(|w| !w.done.get());
                    list.abandoned.set(0);
                } else {
                    list.abandoned.set(abandoned);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abandoned_waits_leave_the_queue() {
        let list = Rc::new(WaitList::default());
        for _ in 0..1000 {
            drop(list.wait());
        }
        let kept = list.wait();
        assert!(
            list.queue.borrow().len() <= SWEEP_MIN,
            "{}",
            list.queue.borrow().len()
        );
        drop(kept);
        assert!(list.queue.borrow().len() <= SWEEP_MIN);
        assert_eq!(list.waiting(), 0);
        // Abandoned entries never outnumber the live ones by much.
        let live: Vec<_> = (0..100).map(|_| list.wait()).collect();
        let gone: Vec<_> = (0..1000).map(|_| list.wait()).collect();
        drop(gone);
        assert!(list.queue.borrow().len() <= 2 * live.len() + SWEEP_MIN);
        // And are skipped: the first live waiter is the one woken.
        list.wake_one();
        assert!(live[0].me.notified.get());
        assert!(live[1..].iter().all(|w| !w.me.notified.get()));
    }

    /// Many waits given up at once cost each O(1) amortized: one scan of
    /// the queue each held the thread for O(n²) (16 s for 160,000 waiters
    /// timing out together).
    #[test]
    fn many_waits_given_up_at_once_take_linear_time() {
        let list = Rc::new(WaitList::default());
        let n = 200_000;
        let waits: Vec<_> = (0..n).map(|_| list.wait()).collect();
        let started = std::time::Instant::now();
        // The newest first: the worst order for a scan from the front.
        for w in waits.into_iter().rev() {
            drop(w);
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{n} waits given up in {:?}",
            started.elapsed()
        );
        assert_eq!(list.waiting(), 0);
        assert!(list.queue.borrow().len() <= SWEEP_MIN);
    }

    #[test]
    fn fifo_and_pass_on() {
        let list = Rc::new(WaitList::default());
        let a = list.wait();
        let mut b = list.wait();
        assert_eq!(list.waiting(), 2);
        list.wake_one();
        // `a` was woken but is dropped without observing: `b` gets it.
        drop(a);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut b).poll(&mut cx).is_ready());
        assert_eq!(list.waiting(), 0);
    }
}
