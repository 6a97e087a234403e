//! Reuse of a slot that no sync ever covered: freed before any sync began
//! after its allocation, it is handed out again at once; freed after a sync
//! began (running, completed or dropped), it waits for a later sync.

mod common;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll};

use common::{open_shard, run, small_cfg};
use segalloc::{Handle, Shard};

async fn alloc(shard: &Shard) -> Handle {
    shard.allocate(100).await.unwrap().into_handle()
}

/// Run `body` on a fresh one-shard directory.
fn on_shard(body: impl AsyncFnOnce(&Shard)) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        body(&shard).await;
    });
}

/// Begin a sync (polled once: its io submitted, perhaps not complete), run
/// `during`, then let the sync finish (`finish`) or drop it.
async fn during_sync<T>(shard: &Shard, finish: bool, during: impl AsyncFnOnce() -> T) -> T {
    let mut s = pin!(shard.sync());
    let waker = futures::task::noop_waker();
    let done = match s.as_mut().poll(&mut Context::from_waker(&waker)) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    };
    let out = during().await;
    if finish {
        match done {
            Some(r) => r.unwrap(),
            None => s.await.unwrap(),
        }
    }
    out
}

#[test]
fn a_slot_freed_before_any_sync_is_reused_at_once() {
    on_shard(async |shard| {
        let a = alloc(shard).await;
        shard.free(a).unwrap();
        let b = alloc(shard).await;
        assert_eq!(a, b, "a never-synced slot is reused at once");
        // A LIFO loop without sync stays in one slot: no growth.
        shard.free(b).unwrap();
        for _ in 0..100_000 {
            let h = shard.try_allocate(100).unwrap().unwrap().into_handle();
            assert_eq!(h, a);
            shard.free(h).unwrap();
        }
        let st = shard.stats().alloc;
        assert_eq!((st.segments, st.allocations_live), (1, 0));
        // Still live and freeable exactly once.
        let c = alloc(shard).await;
        assert!(shard.pin(c).await.is_ok());
        shard.free(c).unwrap();
        assert!(shard.free(c).is_err(), "double free refused");
    });
}

#[test]
fn a_slot_freed_after_a_completed_sync_waits_for_the_next() {
    on_shard(async |shard| {
        let a = alloc(shard).await;
        shard.sync().await.unwrap();
        shard.free(a).unwrap();
        let b = alloc(shard).await;
        assert_ne!(
            a, b,
            "a synced allocation's slot waits for its free to be durable"
        );
        // `b` was never synced: its slot comes back at once.
        shard.free(b).unwrap();
        assert_eq!(alloc(shard).await, b);
        shard.sync().await.unwrap();
        assert_eq!(alloc(shard).await, a, "reused once the free is durable");
    });
}

#[test]
fn a_free_made_while_a_sync_runs_waits_for_a_later_sync() {
    on_shard(async |shard| {
        let a = alloc(shard).await;
        // The sync began (and may have finished under the sync backend):
        // it may cover `a`'s allocation, so `a`'s free is deferred.
        during_sync(shard, true, async || {
            shard.free(a).unwrap();
            assert_ne!(alloc(shard).await, a);
        })
        .await;
        let c = alloc(shard).await;
        assert_ne!(a, c, "the free came after the sync began: not durable yet");
        shard.sync().await.unwrap();
        assert_eq!(alloc(shard).await, a);
    });
}

#[test]
fn a_dropped_sync_still_defers_frees_of_older_allocations() {
    on_shard(async |shard| {
        let a = alloc(shard).await;
        during_sync(shard, false, async || {}).await;
        shard.free(a).unwrap();
        let b = alloc(shard).await;
        assert_ne!(a, b, "a dropped sync may have flushed `a`'s bit");
    });
}

#[test]
fn an_allocation_made_while_a_sync_runs_is_reused_at_once() {
    on_shard(async |shard| {
        // Made after the sync began: no sync promises it.
        let a = during_sync(shard, true, async || alloc(shard).await).await;
        shard.free(a).unwrap();
        assert_eq!(alloc(shard).await, a);
    });
}

#[test]
fn fresh_and_synced_frees_mix_without_overlap() {
    on_shard(async |shard| {
        let mut old = Vec::new();
        for _ in 0..300 {
            old.push(alloc(shard).await);
        }
        shard.sync().await.unwrap();
        let mut fresh = Vec::new();
        for _ in 0..300 {
            fresh.push(alloc(shard).await);
        }
        // Free every other one of both groups.
        for h in old.iter().chain(&fresh).step_by(2) {
            shard.free(*h).unwrap();
        }
        let mut again = Vec::new();
        for _ in 0..150 {
            again.push(alloc(shard).await);
        }
        let freed_fresh: Vec<Handle> = fresh.iter().step_by(2).copied().collect();
        let mut sorted = again.clone();
        sorted.sort();
        let mut expect = freed_fresh.clone();
        expect.sort();
        assert!(sorted == expect, "exactly the fresh frees come back");
        let live: Vec<Handle> = old
            .iter()
            .chain(&fresh)
            .skip(1)
            .step_by(2)
            .chain(&again)
            .copied()
            .collect();
        common::assert_no_overlap(live.iter().copied());
        for h in &live {
            assert!(shard.pin(*h).await.is_ok());
        }
    });
}
