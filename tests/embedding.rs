//! The embedding path: a server that owns its threads opens a [`Cluster`],
//! hands one [`ShardBuilder`] to each of its threads, and runs each shard in
//! an executor of its own: a tokio current-thread runtime with a `LocalSet`,
//! or (when io_uring works and `SEGALLOC_IO` is not `sync`) tokio-uring.
//! The shards free each other's allocations across threads, read each
//! other's through their owners (`Shard::read`), sync, and everything is checked again
//! after the directory is reopened.

mod common;

use std::sync::Arc;

use futures::executor::block_on;
use segalloc::config::MIB;
use segalloc::{Cluster, Config, Handle, Runtime, Shard, ShardBuilder};
use tokio::sync::{Barrier, mpsc};

const SHARDS: usize = 2;
const PER_SHARD: u64 = 2000;
const LEN: usize = 80;

/// Which executor hosted a shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Executor {
    TokioLocalSet,
    TokioUring,
}

/// What a shard thread reports back: the executor, its allocations that
/// must survive as `(handle, seed)`, and its mesh counters after the sync.
struct Report {
    executor: Executor,
    kept: Vec<(Handle, u64)>,
    sent: u64,
    received: u64,
    rejected: u64,
    live: u64,
}

fn contents(seed: u64) -> Vec<u8> {
    common::pattern(seed + 1, LEN)
}

/// Whether this test should host a shard on tokio-uring.
fn want_uring() -> bool {
    std::env::var("SEGALLOC_IO").as_deref() != Ok("sync")
}

/// The body every shard thread runs, whatever its executor.
async fn shard_main(
    builder: ShardBuilder,
    executor: Executor,
    to_peer: mpsc::UnboundedSender<Vec<(Handle, u64)>>,
    mut from_peer: mpsc::UnboundedReceiver<Vec<(Handle, u64)>>,
    barrier: Arc<Barrier>,
) -> Report {
    let index = builder.index();
    let shard: Shard = builder.open().await.expect("open shard");
    assert_eq!(shard.index(), index);
    assert_eq!(shard.stats().io_backend, common::expected_backend());

    // Allocate and fill records, then hand them all to the peer.
    let mut mine = Vec::new();
    for k in 0..PER_SHARD {
        let seed = index as u64 * 1_000_000 + k;
        let a = shard.allocate(LEN as u64).await.expect("allocate");
        a.write_at(0, &contents(seed)).expect("write");
        mine.push((a.into_handle(), seed));
    }
    to_peer.send(mine.clone()).expect("peer is listening");
    let theirs = from_peer.recv().await.expect("peer sends its records");
    assert_eq!(theirs.len() as u64, PER_SHARD);

    // Read every peer record through its owner, then free the even ones
    // (forwarded to the peer in batches), yielding now and then.
    let mut buf = vec![0u8; LEN];
    for (k, &(h, seed)) in theirs.iter().enumerate() {
        assert_eq!(h.shard() as usize, 1 - index as usize);
        shard
            .read(h, 0, &mut buf)
            .await
            .expect("read through the owner");
        assert!(
            buf == contents(seed),
            "shard {index} reads {h} through its owner"
        );
        if k % 2 == 0 {
            shard.free(h).expect("forward a free");
        }
        if k % 300 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Each owner has applied every forwarded free before either syncs.
    shard.flush_frees().await.expect("owner applied the frees");
    barrier.wait().await;
    shard.sync().await.expect("sync");
    // Keep the mesh alive until the peer has drained too.
    barrier.wait().await;

    let st = shard.stats();
    Report {
        executor,
        kept: mine.into_iter().skip(1).step_by(2).collect(),
        sent: st.mesh.cross_frees_sent,
        received: st.mesh.cross_frees_received,
        rejected: st.mesh.cross_frees_rejected,
        live: st.alloc.allocations_live,
    }
}

fn run_on_tokio<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

#[test]
fn shards_embedded_in_threads_we_own() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path().join("data"))
        .shards(SHARDS)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let cluster = Cluster::open(cfg.clone()).unwrap();
    assert!(cluster.data_dir().was_created());
    let builders = cluster.into_builders();
    assert_eq!(builders.len(), SHARDS);

    let (tx0, rx0) = mpsc::unbounded_channel();
    let (tx1, rx1) = mpsc::unbounded_channel();
    let mut links = [Some((tx1, rx0)), Some((tx0, rx1))];
    let barrier = Arc::new(Barrier::new(SHARDS));
    let threads: Vec<_> = builders
        .into_iter()
        .map(|b| {
            let (to_peer, from_peer) = links[b.index() as usize].take().unwrap();
            let barrier = barrier.clone();
            std::thread::Builder::new()
                .name(format!("embedded-shard-{}", b.index()))
                .spawn(move || {
                    // Shard 1 runs on tokio-uring when it can start here.
                    if b.index() == 1 && want_uring() {
                        match tokio_uring::Runtime::new(&tokio_uring::builder()) {
                            Ok(rt) => {
                                let ex = Executor::TokioUring;
                                return rt.block_on(shard_main(b, ex, to_peer, from_peer, barrier));
                            }
                            Err(e) => eprintln!("tokio-uring unavailable here ({e}); using tokio"),
                        }
                    }
                    let ex = Executor::TokioLocalSet;
                    run_on_tokio(shard_main(b, ex, to_peer, from_peer, barrier))
                })
                .unwrap()
        })
        .collect();
    let reports: Vec<Report> = threads
        .into_iter()
        .map(|t| t.join().expect("shard thread"))
        .collect();

    assert_eq!(reports[0].executor, Executor::TokioLocalSet);
    if want_uring() && common::expected_backend() == segalloc::IoBackend::Uring {
        assert_eq!(
            reports[1].executor,
            Executor::TokioUring,
            "both executors host a shard"
        );
    }
    let freed_per_shard = PER_SHARD.div_ceil(2);
    for r in &reports {
        assert_eq!(r.sent, freed_per_shard);
        assert_eq!(r.received, freed_per_shard);
        assert_eq!(r.rejected, 0);
        assert_eq!(r.live, PER_SHARD - freed_per_shard);
        assert_eq!(r.kept.len() as u64, r.live);
    }
    eprintln!(
        "executors: {:?}; {} frees forwarded each way",
        reports.iter().map(|r| r.executor).collect::<Vec<_>>(),
        freed_per_shard
    );

    // Every builder and shard is gone: the directory reopens, and holds
    // exactly the records that were not freed, byte for byte.
    let rt = Runtime::start(cfg).unwrap();
    for (i, r) in reports.into_iter().enumerate() {
        let kept = r.kept;
        block_on(rt.spawn_on(i, move |s| async move {
            let live: std::collections::HashSet<Handle> = s.live().collect();
            assert_eq!(live.len(), kept.len(), "shard {i} after reopen");
            let mut buf = vec![0u8; LEN];
            for (h, seed) in kept {
                assert!(live.contains(&h), "{h} survives");
                s.pin(h).await.unwrap().read_at(0, &mut buf).unwrap();
                assert!(buf == contents(seed), "{h} keeps its bytes");
            }
        }))
        .unwrap();
    }
    rt.shutdown().unwrap();
}

#[test]
fn a_shard_builder_travels_to_its_thread() {
    // `ShardBuilder` is `Send` (the shard it opens is not): a compile-time
    // promise of the embedding API.
    fn assert_send<T: Send>() {}
    assert_send::<ShardBuilder>();
    assert_send::<Cluster>();

    // A builder opened alone (its peer never opened) still serves locally.
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path().join("data"))
        .shards(SHARDS)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let mut builders = Cluster::open(cfg).unwrap().into_builders();
    let b0 = builders.remove(0);
    drop(builders);
    let live = std::thread::spawn(move || {
        run_on_tokio(async move {
            let s = b0.open().await.unwrap();
            let a = s.allocate(100).await.unwrap();
            a.write_at(0, b"alone").unwrap();
            s.sync().await.unwrap();
            s.live_count()
        })
    })
    .join()
    .unwrap();
    assert_eq!(live, 1);
}

/// A shard of a `Cluster` that stops with `finish_frees` loses no free
/// another shard acknowledged for it: it applies what its peers send until
/// each has finished too. Dropped without it, the free that shard 1
/// acknowledged and sent was lost with shard 0's inbox (the handle was live
/// after a reopen).
#[test]
fn cluster_shards_that_finish_keep_acknowledged_frees() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::small_cfg_shards(&dir.path().join("data"), 2);
    let builders = Cluster::open(cfg.clone()).unwrap().into_builders();
    let (to_1, from_0) = std::sync::mpsc::channel::<Handle>();
    let (to_0, from_1) = std::sync::mpsc::channel::<()>();
    let mut channels = [Some((None, Some(to_1), Some(from_1))), None];
    channels[1] = Some((Some(from_0), None, None));
    let threads: Vec<_> = builders
        .into_iter()
        .map(|b| {
            let (from_0, to_1, from_1) = channels[b.index() as usize].take().unwrap();
            let to_0 = to_0.clone();
            std::thread::spawn(move || {
                run_on_tokio(async move {
                    let shard = b.open().await.unwrap();
                    if shard.index() == 0 {
                        let h = shard.allocate(16).await.unwrap().into_handle();
                        shard.sync().await.unwrap();
                        to_1.unwrap().send(h).unwrap();
                        // Shard 1 has freed it (acknowledged, maybe sent).
                        from_1.unwrap().recv().unwrap();
                    } else {
                        let h = from_0.unwrap().recv().unwrap();
                        shard.free(h).unwrap();
                        for _ in 0..64 {
                            tokio::task::yield_now().await;
                        }
                        to_0.send(()).unwrap();
                    }
                    shard.finish_frees().await;
                    shard.index()
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let rt = Runtime::start(cfg).unwrap();
    let live = block_on(rt.spawn_on(0, |s| async move { s.live_count() })).unwrap();
    assert_eq!(live, 0, "the free shard 1 acknowledged was lost");
    rt.shutdown().unwrap();
}
