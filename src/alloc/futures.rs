//! The futures of `allocate` and `pin`: the hot path when first polled
//! (no await, nothing boxed), then, only if it found nothing, the rest of
//! the work boxed: for `allocate`, a new segment, or the window of the slot
//! the first poll took (the slot stays taken, held by its guard); for
//! `pin`, the window. An `async fn` would build a future of more than a
//! kilobyte (every await of the slow path inside) on every call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Allocation, SegmentAllocator, Start};
use crate::error::{Error, Result};
use crate::format::Handle;
use crate::mapping::PinGuard;

/// The rest of a call once its hot path found nothing.
type Slow<'a, T> = Option<Pin<Box<dyn Future<Output = Result<T>> + 'a>>>;

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
/// [`Shard::allocate`](crate::Shard::allocate).
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Allocation>> {
        // Every field is `Unpin` (the slow future is boxed).
        let this = self.get_mut();
        if !this.polled {
            this.polled = true;
            let alloc = this.alloc;
            this.slow = Some(match alloc.allocate_start(this.size) {
                Start::Done(r) => return Poll::Ready(r),
                Start::NewSegment(class_id) => Box::pin(alloc.allocate_new_segment(class_id)),
                // The slot stays taken: the guard gives it back if the
                // future is dropped.
                Start::Fault(guard, taken) => Box::pin(alloc.fault_slot(guard, taken)),
            });
        }
        poll_slow(&mut this.slow, cx)
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

/// The future of [`SegmentAllocator::pin`] and
/// [`Shard::pin`](crate::Shard::pin).
#[must_use = "futures do nothing unless polled"]
pub struct PinFuture<'a> {
    alloc: &'a SegmentAllocator,
    handle: Handle,
    /// The hot path was tried (or the answer is known: see `failed`).
    polled: bool,
    slow: Slow<'a, PinGuard>,
}

impl<'a> PinFuture<'a> {
    #[inline]
    pub(super) fn new(alloc: &'a SegmentAllocator, handle: Handle) -> PinFuture<'a> {
        PinFuture {
            alloc,
            handle,
            polled: false,
            slow: None,
        }
    }

    /// A future that fails with `e` when polled (a handle refused before
    /// the allocator looks at it).
    #[cold]
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

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<PinGuard>> {
        let this = self.get_mut();
        if !this.polled {
            this.polled = true;
            match this.alloc.try_pin(this.handle) {
                Ok(Some(p)) => return Poll::Ready(Ok(p)),
                Err(e) => return Poll::Ready(Err(e)),
                Ok(None) => this.slow = Some(Box::pin(this.alloc.pin_slow(this.handle))),
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
