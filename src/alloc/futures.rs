//! The future of `allocate`: the hot path when first polled (no await,
//! nothing boxed), then, only if it found no slot in a mapped window, the
//! rest of the work boxed: a new segment, or the window of the slot the
//! first poll took (the slot stays taken, held by its guard). An `async fn`
//! would build a future of more than a kilobyte (every await of the slow
//! path inside) on every call.
//!
//! `pin` has a future of the same kind ([`PinFuture`]): the pin of a slot in
//! a mapped window on the first poll, the fault-in boxed. As an `async fn`,
//! its state machine was too large to be inlined into the caller's, and a
//! mapped pin polled from a plain loop took 29 – 31 ns instead of 13 – 15.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Allocation, SegmentAllocator};
use crate::error::{Error, Result};
use crate::format::Handle;
use crate::mapping::PinGuard;

/// The rest of a call once its hot path found nothing, boxed.
pub(super) type SlowBox<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

/// [`SlowBox`], or `None` before the first poll and after completion.
pub(super) type Slow<'a, T> = Option<SlowBox<'a, T>>;

/// Poll the rest of a call; `None` means it completed already.
#[inline]
fn poll_slow<T>(slow: &mut Slow<'_, T>, cx: &mut Context<'_>) -> Poll<Result<T>> {
    let Some(f) = slow else {
        panic!("segalloc future polled after completion");
    };
    let r = std::task::ready!(f.as_mut().poll(cx));
    *slow = None;
    Poll::Ready(r)
}

/// The future of [`SegmentAllocator::allocate`] and
/// [`Shard::allocate`](crate::Shard::allocate): the hot path on the first
/// poll, a new segment or the slot's window boxed when it must wait.
///
/// Lazy: nothing is allocated until it is polled. Dropped before it
/// completes, it leaves nothing allocated (a slot it took is given back).
/// Polled again after it completed, it panics. It borrows the shard, so it
/// is `!Send`; it is `Unpin`.
#[must_use = "futures do nothing unless polled"]
pub struct AllocateFuture<'a> {
    alloc: &'a SegmentAllocator,
    size: u64,
    /// The hot path was tried.
    polled: bool,
    slow: Slow<'a, Allocation>,
}

impl<'a> AllocateFuture<'a> {
    #[inline]
    pub(super) fn new(alloc: &'a SegmentAllocator, size: u64) -> AllocateFuture<'a> {
        AllocateFuture {
            alloc,
            size,
            polled: false,
            slow: None,
        }
    }
}

impl Future for AllocateFuture<'_> {
    type Output = Result<Allocation>;

    // Always inlined, as `try_allocate` is: the hot path's answer is then
    // written where the awaiting code keeps it.
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Allocation>> {
        // Every field is `Unpin` (the slow future is boxed).
        let this = self.get_mut();
        if !this.polled {
            this.polled = true;
            let alloc = this.alloc;
            if let Poll::Ready(r) = alloc.allocate_start(this.size, &mut this.slow) {
                return Poll::Ready(r);
            }
        }
        poll_slow(&mut this.slow, cx)
    }
}

/// The future of [`SegmentAllocator::pin`] and
/// [`Shard::pin`](crate::Shard::pin): the pin of a slot in a mapped window
/// on the first poll, the fault-in boxed when it must wait.
///
/// Lazy: nothing is pinned or mapped until it is polled, and a refused
/// handle's error comes from the first poll. Dropped before it completes,
/// it leaves nothing pinned. Polled again after it completed, it panics.
/// It borrows the shard, so it is `!Send`; it is `Unpin`.
#[must_use = "futures do nothing unless polled"]
pub struct PinFuture<'a> {
    alloc: &'a SegmentAllocator,
    handle: Handle,
    /// The hot path was tried.
    polled: bool,
    slow: Slow<'a, PinGuard>,
}

impl<'a> PinFuture<'a> {
    #[inline(always)]
    pub(super) fn new(alloc: &'a SegmentAllocator, handle: Handle) -> PinFuture<'a> {
        PinFuture {
            alloc,
            handle,
            polled: false,
            slow: None,
        }
    }

    /// A future that fails with `e` when polled (a handle refused before
    /// the allocator is asked).
    #[cold]
    #[inline(never)]
    pub(crate) fn failed(alloc: &'a SegmentAllocator, handle: Handle, e: Error) -> PinFuture<'a> {
        PinFuture {
            alloc,
            handle,
            polled: true,
            slow: Some(Box::pin(std::future::ready(Err(e)))),
        }
    }
}

impl Future for PinFuture<'_> {
    type Output = Result<PinGuard>;

    // Always inlined, as `allocate`'s is.
    #[inline(always)]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<PinGuard>> {
        // Every field is `Unpin` (the slow future is boxed).
        let this = self.get_mut();
        if !this.polled {
            this.polled = true;
            let alloc = this.alloc;
            if let Poll::Ready(r) = alloc.pin_start(this.handle, &mut this.slow) {
                return Poll::Ready(r);
            }
        }
        poll_slow(&mut this.slow, cx)
    }
}

impl std::fmt::Debug for PinFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinFuture")
            .field("handle", &self.handle)
            .field("polled", &self.polled)
            .field("waiting", &self.slow.is_some())
            .finish()
    }
}

impl std::fmt::Debug for AllocateFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AllocateFuture")
            .field("size", &self.size)
            .field("polled", &self.polled)
            .field("waiting", &self.slow.is_some())
            .finish()
    }
}
