//! The future of `allocate`: the hot path when first polled (no await,
//! nothing boxed), then, only if it found no slot in a mapped window, the
//! rest of the work boxed: a new segment, or the window of the slot the
//! first poll took (the slot stays taken, held by its guard). An `async fn`
//! would build a future of more than a kilobyte (every await of the slow
//! path inside) on every call.
//!
//! (`pin` stays an `async fn`: given a future of its own, the loop of
//! `try_pin` it shares its body with compiled 1.5 – 3.5 ns slower.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::{Allocation, SegmentAllocator, Start};
use crate::error::Result;

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
