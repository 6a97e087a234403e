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
}

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
                // Given up (a timeout, a dropped task): leave the queue, so
                // waiters that are never woken do not pile up in it.
                let me = &self.me;
                self.list.queue.borrow_mut().retain(|w| !Rc::ptr_eq(w, me));
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
        assert_eq!(list.queue.borrow().len(), 1);
        drop(kept);
        assert_eq!(list.queue.borrow().len(), 0);
        assert_eq!(list.waiting(), 0);
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
