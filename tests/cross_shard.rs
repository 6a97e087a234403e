//! Access to another shard's allocations goes through its owner: no torn
//! reads, forged handles register nothing, hostile offsets are errors (run
//! this file once without `--release` too: overflow checks on), frees to a
//! busy owner are bounded, and shutdown loses no acknowledged free.
//!
//! The io backend follows `SEGALLOC_IO`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::executor::block_on;
use segalloc::config::MIB;
use segalloc::{Config, Error, HANDLE_BYTES, Handle, Runtime, Shard};

const SLOT: usize = 64 * 1024;

fn config(dir: &Path) -> Config {
    common::small_cfg_shards(&dir.join("data"), 2)
}

/// A new 64-byte allocation of shard `shard`.
fn allocate_on(rt: &Runtime, shard: usize) -> Handle {
    block_on(rt.spawn_on(shard, |s| async move {
        s.allocate(64).await.unwrap().into_handle()
    }))
    .unwrap()
}

/// `h` with its file number or offset replaced, re-signed.
fn forge(h: Handle, file: Option<u32>, offset: Option<u64>) -> Handle {
    let h = match file {
        Some(f) => forge_bytes(h, 8, &f.to_le_bytes()),
        None => h,
    };
    match offset {
        Some(o) => forge_bytes(h, 24, &o.to_le_bytes()),
        None => h,
    }
}

/// `h` with bytes `at..` replaced by `with`, re-signed.
fn forge_bytes(h: Handle, at: usize, with: &[u8]) -> Handle {
    let mut b: [u8; HANDLE_BYTES] = h.to_bytes();
    b[at..at + with.len()].copy_from_slice(with);
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    Handle::from_bytes(&b).expect("forged handle decodes")
}

/// The owner rewrites a 64 KiB slot in a loop (every byte the same value per
/// pass) while shard 1 reads it: every read sees one pass, never a mix.
#[test]
fn owner_writes_while_another_shard_reads_no_torn_read() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(SLOT as u64).await.unwrap();
        a.write_at(0, &[0u8; SLOT]).unwrap();
        a.into_handle()
    }))
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_w = stop.clone();
    let writer = rt.spawn_on(0, move |s| async move {
        let pin = s.pin(h).await.unwrap();
        let mut pass = 0u8;
        let mut page = [0u8; SLOT];
        while !stop_w.load(Ordering::Relaxed) {
            pass = pass.wrapping_add(1);
            page.fill(pass);
            pin.write_at(0, &page).unwrap();
            tokio::task::yield_now().await;
        }
    });
    let torn = block_on(rt.spawn_on(1, move |s| async move {
        let mut buf = vec![0u8; SLOT];
        let mut torn = 0usize;
        for _ in 0..2000 {
            s.read(h, 0, &mut buf).await.unwrap();
            if buf.iter().any(|&b| b != buf[0]) {
                torn += 1;
            }
            tokio::task::yield_now().await;
        }
        torn
    }))
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    block_on(writer).unwrap();
    assert_eq!(torn, 0, "{torn} of 2000 cross-shard reads were torn");
    rt.shutdown().unwrap();
}

/// Forged handles naming files the owner never created register nothing.
#[test]
fn forged_foreign_handles_register_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = allocate_on(&rt, 0);
    let (before, after) = block_on(rt.spawn_on(1, move |s| async move {
        let before = s.stats().files.files;
        let mut buf = [0u8; 16];
        for f in 1..2000u32 {
            let forged = forge(h, Some(f), None);
            let r = s.read(forged, 0, &mut buf).await;
            assert!(matches!(r, Err(Error::NotAllocated { .. })), "{r:?}");
            let r = s.pin(forged).await;
            assert!(
                matches!(r, Err(Error::NotOwner { .. })),
                "{:?}",
                r.map(|_| ())
            );
            // SAFETY: nothing writes the (nonexistent) bytes.
            let r = unsafe { s.pin_foreign(forged) }.await;
            assert!(r.is_err(), "forged handle in file {f}");
        }
        (before, s.stats().files.files)
    }))
    .unwrap();
    assert_eq!(after, before, "forged handles registered files");
    rt.shutdown().unwrap();
}

/// A free of another shard's forged handle is refused where it is made,
/// with the error of its first bad field (directory, shard, bounds), and
/// nothing is forwarded; the real handle is then forwarded and applied.
#[test]
fn forged_foreign_frees_are_refused_before_forwarding() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = allocate_on(&rt, 0);
    let other_dir = forge_bytes(h, 32, &(h.dir_tag() ^ 1).to_le_bytes());
    let no_shard = forge_bytes(h, 4, &2u16.to_le_bytes());
    let both = forge_bytes(no_shard, 32, &(h.dir_tag() ^ 1).to_le_bytes());
    let far = forge_bytes(h, 24, &(1u64 << 60).to_le_bytes());
    let (refused, sent_after_refused, good, flushed) =
        block_on(rt.spawn_on(1, move |s| async move {
            let refused = [
                s.free(other_dir),
                s.free(no_shard),
                s.free(both),
                s.free(far),
            ];
            let sent = s.stats().mesh.cross_frees_sent;
            (refused, sent, s.free(h), s.flush_frees().await)
        }))
        .unwrap();
    let [other_dir, no_shard, both, far] = refused;
    assert!(
        matches!(other_dir, Err(Error::ForeignHandle { .. })),
        "{other_dir:?}"
    );
    assert!(
        matches!(no_shard, Err(Error::WrongShard { owner: 2, .. })),
        "{no_shard:?}"
    );
    assert!(matches!(both, Err(Error::ForeignHandle { .. })), "{both:?}");
    assert!(matches!(far, Err(Error::NotAllocated { .. })), "{far:?}");
    assert_eq!(sent_after_refused, 0, "a refused free was forwarded");
    good.unwrap();
    flushed.unwrap();
    let st = block_on(rt.stats()).unwrap();
    assert_eq!(st.shards[1].mesh.cross_frees_sent, 1);
    assert_eq!(st.shards[0].mesh.cross_frees_received, 1);
    assert_eq!(st.shards[0].mesh.cross_frees_rejected, 0);
    let pinned =
        block_on(rt.spawn_on(0, move |s| async move { s.pin(h).await.map(|_| ()) })).unwrap();
    assert!(
        matches!(pinned, Err(Error::NotAllocated { .. })),
        "{pinned:?}"
    );
    rt.shutdown().unwrap();
}

/// A free of another shard's handle made outside the shard's `LocalSet`
/// panics (tokio's `spawn_local` cannot start the flush task) and queues
/// nothing, so the next free, outside or in, takes the same path; one made
/// inside is delivered on the clock.
#[test]
fn a_foreign_free_outside_the_local_set_panics_and_queues_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut builders = segalloc::Cluster::open(config(dir.path()))
        .unwrap()
        .into_builders();
    let (b1, b0) = (builders.pop().unwrap(), builders.pop().unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    let (s0, s1, h) = local.block_on(&rt, async move {
        let (s0, s1) = (b0.open().await.unwrap(), b1.open().await.unwrap());
        let h = s1.allocate(16).await.unwrap().into_handle();
        (s0, s1, h)
    });
    for _ in 0..2 {
        let outside = rt.block_on(async {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s0.free(h)))
        });
        assert!(outside.is_err(), "a free outside the LocalSet: {outside:?}");
        assert_eq!(
            s0.stats().mesh.cross_frees_sent,
            0,
            "queued although refused"
        );
    }
    let received = local.block_on(&rt, async {
        s0.free(h).unwrap();
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        s1.drain_frees();
        s1.stats().mesh.cross_frees_received
    });
    assert_eq!(received, 1);
}

/// An offset at the end of the address space is refused, not wrapped.
#[test]
fn foreign_offset_overflow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = allocate_on(&rt, 0);
    let r = block_on(rt.spawn_on(1, move |s| async move {
        let bad = forge(h, None, Some(u64::MAX - 15));
        let mut buf = [0u8; 16];
        let read = s.read(bad, 0, &mut buf).await;
        let write = s.write(bad, 0, &buf).await;
        let free = s.free(bad);
        // SAFETY: nothing is mapped for this handle.
        let pin = unsafe { s.pin_foreign(bad) }.await.map(|_| ());
        [read, write, free, pin]
    }))
    .unwrap();
    for r in r {
        assert!(
            matches!(r, Err(Error::NotAllocated { .. })),
            "overflowing offset: {r:?}"
        );
    }
    rt.shutdown().unwrap();
}

/// A safe pin of another shard's handle is refused and says what to use;
/// reads, writes and closures go through the owner; the unsafe direct
/// mapping works for a live handle.
#[test]
fn foreign_access_goes_through_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(100).await.unwrap();
        a.write_at(0, b"owner").unwrap();
        a.into_handle()
    }))
    .unwrap();
    block_on(rt.spawn_on(1, move |s| async move {
        let Err(e) = s.pin(h).await else {
            panic!("a safe foreign pin")
        };
        assert!(
            matches!(
                e,
                Error::NotOwner {
                    owner: 0,
                    this: 1,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("Shard::read"), "{e}");
        assert!(s.try_pin(h).is_err());
        s.write(h, 5, b"-written").await.unwrap();
        let mut buf = [0u8; 13];
        s.read(h, 0, &mut buf).await.unwrap();
        assert_eq!(&buf, b"owner-written");
        // Out of the allocation's range: refused before anything is sent.
        let r = s.read(h, h.len() as usize - 4, &mut [0u8; 11]).await;
        assert!(matches!(r, Err(Error::InvalidRange { .. })), "{r:?}");
        let r = s.write(h, usize::MAX, b"x").await;
        assert!(matches!(r, Err(Error::InvalidRange { .. })), "{r:?}");
        let owner = s.run_on_owner(h, |pin| pin.len()).await.unwrap();
        assert_eq!(owner, h.len() as usize);
        // SAFETY: the owner runs no task that writes `h` meanwhile.
        let pin = unsafe { s.pin_foreign(h) }.await.unwrap();
        let mut buf = [0u8; 5];
        pin.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"owner");
        drop(pin);
        // The owner's file is now in this shard's registry; the manager's
        // safe pins refuse it (only `pin_foreign` may pin it): file ids are
        // plain numbers anyone can make.
        let mut refused = 0;
        for i in 0..s.files().stats().files as u32 {
            let f = segalloc::FileId(i);
            if let Err(Error::ForeignFile { file_id }) =
                s.mappings().try_pin(f, h.offset(), 8, true)
            {
                assert_eq!(file_id, i);
                refused += 1;
                let r = s.mappings().pin(f, h.offset(), 8, false).await;
                assert!(matches!(r, Err(Error::ForeignFile { .. })), "{r:?}");
            }
        }
        assert_eq!(refused, 1, "the owner's data file is refused");
    }))
    .unwrap();
    // A freed handle is refused by the owner.
    block_on(rt.spawn_on(0, move |s| async move { s.free(h) }))
        .unwrap()
        .unwrap();
    let r = block_on(rt.spawn_on(1, move |s| async move { s.read(h, 0, &mut [0u8; 4]).await }))
        .unwrap();
    assert!(matches!(r, Err(Error::NotAllocated { .. })), "{r:?}");
    rt.shutdown().unwrap();
}

/// A read-only runtime reads every shard's data from any shard.
#[test]
fn read_only_runtime_reads_other_shards() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let rt = Runtime::start(cfg.clone()).unwrap();
    let h = block_on(rt.spawn_on(0, |s| async move {
        let a = s.allocate(64).await.unwrap();
        a.write_at(0, b"durable").unwrap();
        a.into_handle()
    }))
    .unwrap();
    rt.shutdown().unwrap();
    let ro = Config::builder(cfg.dir())
        .shards(2)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .read_only(true)
        .build()
        .unwrap();
    let rt = Runtime::start(ro).unwrap();
    let (read, write) = block_on(rt.spawn_on(1, move |s| async move {
        let mut buf = [0u8; 7];
        s.read(h, 0, &mut buf).await.unwrap();
        (buf, s.write(h, 0, b"x").await)
    }))
    .unwrap();
    assert_eq!(&read, b"durable");
    assert!(matches!(write, Err(Error::ReadOnly(_))), "{write:?}");
    rt.shutdown().unwrap();
}

/// Frees forwarded to an owner that is not draining are bounded: once its
/// channel and the sender's buffer are full, a free is refused (nothing
/// queued); after the owner catches up, `flush_frees` delivers the rest
/// and every free is applied exactly once.
#[test]
fn frees_to_a_blocked_owner_are_bounded() {
    const N: usize = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let hs: Vec<Handle> = block_on(rt.spawn_on(0, |s| async move {
        let mut v = Vec::new();
        for _ in 0..N {
            v.push(s.allocate(16).await.unwrap().into_handle());
        }
        v
    }))
    .unwrap();
    // The owner's thread is blocked: its drain task cannot run.
    let (release, busy) = common::hold_shard(&rt, 0);
    let refused = block_on(rt.spawn_on(1, move |s| async move {
        let mut refused = Vec::new();
        for h in hs {
            match s.free(h) {
                Ok(()) => {}
                Err(Error::Backpressure { owner: 0, .. }) => refused.push(h),
                Err(e) => panic!("{e:?}"),
            }
            tokio::task::yield_now().await;
        }
        refused
    }))
    .unwrap();
    assert!(!refused.is_empty(), "{N} frees queued to a blocked owner");
    assert!(refused.len() < N, "nothing was queued");
    release.send(()).unwrap();
    block_on(busy).unwrap();
    let n_refused = refused.len();
    block_on(rt.spawn_on(1, move |s| async move {
        s.flush_frees().await.unwrap();
        // Most frees were refused (the first ones went in batches of a few
        // each, one per executor tick): more than a full channel's worth,
        // freed faster than the owner applies them, so wait when it falls
        // behind.
        for h in refused {
            s.free_async(h).await.unwrap();
        }
        s.flush_frees().await.unwrap();
    }))
    .unwrap();
    let st = block_on(rt.stats()).unwrap();
    assert_eq!(st.shards[0].alloc.allocations_live, 0);
    assert_eq!(st.shards[0].mesh.cross_frees_received, N as u64);
    assert_eq!(st.shards[0].mesh.cross_frees_rejected, 0);
    // (Each refusal counts, also those `free_async` waited out.)
    assert!(st.shards[1].mesh.cross_frees_refused >= n_refused as u64);
    // A refused free was not sent; its retry was.
    assert_eq!(st.shards[1].mesh.cross_frees_sent, N as u64);
    rt.shutdown().unwrap();
}

/// `flush_frees` returns once the owner applied the frees: no sync, sleep
/// or drain needed to see them.
#[test]
fn flush_frees_waits_for_the_owner() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    for round in 0..20 {
        let hs: Vec<Handle> = block_on(rt.spawn_on(0, |s| async move {
            let mut v = Vec::new();
            for _ in 0..100 {
                v.push(s.allocate(32).await.unwrap().into_handle());
            }
            v
        }))
        .unwrap();
        let check = hs.clone();
        block_on(rt.spawn_on(1, move |s| async move {
            for h in hs {
                s.free(h).unwrap();
            }
            s.flush_frees().await.unwrap();
        }))
        .unwrap();
        let live = block_on(rt.spawn_on(0, move |s| async move {
            check.iter().filter(|h| s.allocator().is_live(h)).count()
        }))
        .unwrap();
        assert_eq!(live, 0, "round {round}: frees not applied after flush");
    }
    rt.shutdown().unwrap();
}

struct FreeOnDrop {
    shard: Shard,
    h: Handle,
    acked: std::sync::mpsc::Sender<Handle>,
}

impl Drop for FreeOnDrop {
    fn drop(&mut self) {
        if self.shard.free(self.h).is_ok() {
            let _ = self.acked.send(self.h);
        }
    }
}

/// A task still running at shutdown frees another shard's handle as it is
/// dropped: the free is either refused or applied, never acknowledged and
/// lost.
#[test]
fn shutdown_loses_no_acknowledged_free() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let rt = Runtime::start(cfg.clone()).unwrap();
    let h = block_on(rt.spawn_on(
        0,
        |s| async move { s.allocate(16).await.unwrap().into_handle() },
    ))
    .unwrap();
    let (acked, acks) = std::sync::mpsc::channel::<Handle>();
    let (started_tx, started) = std::sync::mpsc::channel::<()>();
    let _task = rt.spawn_on(1, move |s| async move {
        let _guard = FreeOnDrop { shard: s, h, acked };
        let _ = started_tx.send(());
        std::future::pending::<()>().await;
    });
    started.recv().unwrap();
    rt.shutdown().unwrap();
    let acked: Vec<Handle> = acks.try_iter().collect();
    let rt = Runtime::start(cfg).unwrap();
    let live = block_on(rt.spawn_on(0, move |s| async move {
        acked.iter().filter(|h| s.allocator().is_live(h)).count()
    }))
    .unwrap();
    assert_eq!(live, 0, "an acknowledged free was lost at shutdown");
    rt.shutdown().unwrap();
}

/// A free of a stopped shard's handle is refused with `ShardGone`, as
/// `Shard::free` documents: it was acknowledged, buffered and then lost
/// with its batch (only the next `flush_frees` said so).
#[test]
fn a_free_for_a_stopped_owner_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(tmp.path())).unwrap();
    let hs = common::allocate_synced(&rt, 1, 10, 64);
    common::crash_and_wait_gone(&rt, 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let frees = block_on(rt.spawn_on(0, move |s| async move {
        // Its mesh endpoint may close a moment after its job queue.
        while s.free(hs[0]).is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "a free was never refused"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        hs.iter().map(|h| s.free(*h)).collect::<Vec<_>>()
    }))
    .unwrap();
    assert!(
        frees
            .iter()
            .all(|r| matches!(r, Err(Error::ShardGone { shard: 1 }))),
        "{frees:?}"
    );
    let _ = rt.shutdown();
}

/// Another shard's handle is refused by `pin` (`NotOwner`, which names
/// what to use instead) and by `try_pin` (`WrongShard`, as documented),
/// both naming its owner.
#[test]
fn pin_and_try_pin_of_another_shards_handle_name_its_owner() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(tmp.path())).unwrap();
    let h = allocate_on(&rt, 1);
    block_on(rt.spawn_on(0, move |s| async move {
        let pinned = s.pin(h).await.map(|_| ());
        let tried = s.try_pin(h).map(|_| ());
        assert!(
            matches!(
                pinned,
                Err(Error::NotOwner {
                    owner: 1,
                    this: 0,
                    ..
                })
            ),
            "{pinned:?}"
        );
        assert!(
            matches!(
                tried,
                Err(Error::WrongShard {
                    owner: 1,
                    this: 0,
                    ..
                })
            ),
            "{tried:?}"
        );
    }))
    .unwrap();
    rt.shutdown().unwrap();
}

/// A read-only runtime refuses a free of another shard's handle at once
/// (its owner, read-only too, would reject it after it was acknowledged).
#[test]
fn a_read_only_runtime_refuses_frees_of_other_shards_handles() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = allocate_on(&rt, 0);
    rt.shutdown().unwrap();
    let cfg = Config::builder(dir.path().join("data"))
        .shards(2)
        .window_bytes(16 * MIB)
        .read_only(true)
        .build()
        .unwrap();
    let rt = Runtime::start(cfg).unwrap();
    let (free, flush) =
        block_on(rt.spawn_on(
            1,
            move |s| async move { (s.free(h), s.flush_frees().await) },
        ))
        .unwrap();
    assert!(matches!(free, Err(Error::ReadOnly(_))), "{free:?}");
    flush.unwrap();
    let live = block_on(rt.spawn_on(0, move |s| async move { s.allocator().is_live(&h) })).unwrap();
    assert!(live);
    let st = block_on(rt.stats()).unwrap();
    assert_eq!(st.shards[0].mesh.cross_frees_rejected, 0);
    rt.shutdown().unwrap();
}

/// `free_async` of a handle whose owner is far behind waits for that owner
/// only: another shard that is gone (or slow) is none of its business. It
/// flushed every owner and returned `ShardGone` naming the gone one, though
/// the handle's owner was healthy and the free never queued.
#[test]
fn free_async_waits_for_the_handles_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = common::small_cfg_shards(&tmp.path().join("data"), 3);
    let rt = Runtime::start(cfg).unwrap();
    let h1 = common::allocate_synced(&rt, 1, 1, 64)[0];
    common::crash_and_wait_gone(&rt, 2);
    // Shard 1's thread is busy for a while: shard 0's frees of its handle
    // pile up until they are refused.
    let busy = rt.spawn_on(1, |_| async move {
        std::thread::sleep(std::time::Duration::from_millis(300));
    });
    let r = block_on(rt.spawn_on(0, move |s| async move {
        let queued = common::free_until_backpressure(&s, h1);
        assert!(queued > 0);
        s.free_async(h1).await
    }))
    .unwrap();
    block_on(busy).unwrap();
    assert!(r.is_ok(), "free_async beside a gone shard: {r:?}");
    let _ = rt.shutdown();
}

/// `pin_foreign` after the data directory was renamed while open and
/// another made at its old path: it maps the allocation of its own
/// directory. (It opened the other shard's data file by path, and so
/// mapped, and wrote, the new directory's file.)
#[test]
fn pin_foreign_keeps_to_its_directory_when_another_takes_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let first = Runtime::start(common::small_cfg_shards(&a, 2)).unwrap();
    let write = |rt: &Runtime, what: &'static [u8]| {
        block_on(rt.spawn_on(1, move |s| async move {
            let x = s.allocate(4096).await?;
            x.write_at(0, what)?;
            Ok::<_, Error>(x.into_handle())
        }))
        .unwrap()
        .unwrap()
    };
    let h = write(&first, b"first-dir!");
    block_on(first.sync()).unwrap();
    std::fs::rename(&a, &b).unwrap();
    let second = Runtime::start(common::small_cfg_shards(&a, 2)).unwrap();
    let h2 = write(&second, b"second-dir");
    block_on(second.sync()).unwrap();
    assert_eq!((h.file_id(), h.offset()), (h2.file_id(), h2.offset()));
    let seen = block_on(first.spawn_on(0, move |s| async move {
        // SAFETY: no task of shard 1 touches `h` meanwhile.
        let p = unsafe { s.pin_foreign(h) }.await?;
        let mut buf = [0u8; 10];
        p.read_at(0, &mut buf)?;
        p.write_at(0, b"rewritten!")?;
        Ok::<_, Error>(buf)
    }))
    .unwrap()
    .unwrap();
    assert_eq!(&seen, b"first-dir!");
    let read = |rt: &Runtime, h| {
        block_on(rt.spawn_on(1, move |s| async move {
            let mut buf = [0u8; 10];
            s.read(h, 0, &mut buf).await?;
            Ok::<_, Error>(buf)
        }))
        .unwrap()
        .unwrap()
    };
    assert_eq!(&read(&first, h), b"rewritten!");
    assert_eq!(&read(&second, h2), b"second-dir");
    second.shutdown().unwrap();
    first.shutdown().unwrap();
}

/// `pin_foreign` after the data directory was removed while open and
/// another made at its path: an error, never the other directory's file.
#[test]
fn pin_foreign_refuses_a_directory_made_in_place_of_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let first = Runtime::start(common::small_cfg_shards(&a, 2)).unwrap();
    let h = block_on(first.spawn_on(1, |s| async move {
        Ok::<_, Error>(s.allocate(4096).await?.into_handle())
    }))
    .unwrap()
    .unwrap();
    std::fs::remove_dir_all(&a).unwrap();
    let second = Runtime::start(common::small_cfg_shards(&a, 2)).unwrap();
    block_on(second.spawn_on(1, |s| async move {
        let x = s.allocate(4096).await?;
        x.write_at(0, b"second-dir")?;
        Ok::<_, Error>(())
    }))
    .unwrap()
    .unwrap();
    let r = block_on(first.spawn_on(0, move |s| async move {
        // SAFETY: no task of shard 1 touches `h` meanwhile.
        unsafe { s.pin_foreign(h) }.await.map(drop)
    }))
    .unwrap();
    assert!(
        matches!(&r, Err(Error::Io { .. })),
        "pin_foreign into a directory made in place of its own: {r:?}"
    );
    second.shutdown().unwrap();
    drop(first);
}

/// `pin_foreign` after the other shard's folder was renamed (and another
/// made in its place), or replaced by a symlink to another folder: an
/// error, never a map of the file now found there. (The folder is found
/// by name: it mapped, and wrote, the impostor's file.) Nor does the
/// registry lease the other shard's file to safe code.
#[test]
fn pin_foreign_refuses_a_file_its_owner_does_not_write() {
    for symlink in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("a");
        let rt = Runtime::start(common::small_cfg_shards(&a, 2)).unwrap();
        let h = block_on(rt.spawn_on(1, |s| async move {
            let x = s.allocate(4096).await?;
            x.write_at(0, b"owner-data")?;
            Ok::<_, Error>(x.into_handle())
        }))
        .unwrap()
        .unwrap();
        let folder = a.join("shard-001");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let impostor_dir = if symlink {
            std::fs::rename(&folder, tmp.path().join("kept")).unwrap();
            std::os::unix::fs::symlink(&elsewhere, &folder).unwrap();
            elsewhere.clone()
        } else {
            std::fs::rename(&folder, tmp.path().join("kept")).unwrap();
            std::fs::create_dir(&folder).unwrap();
            folder.clone()
        };
        let impostor = impostor_dir.join(segalloc::format::data_file_name(0));
        std::fs::write(&impostor, vec![b'X'; 1 << 20]).unwrap();
        let r = block_on(rt.spawn_on(0, move |s| async move {
            // SAFETY: no task of shard 1 touches `h` meanwhile.
            let r = unsafe { s.pin_foreign(h) }.await.map(drop);
            // Whatever it registered, safe code gets no lease of it.
            for i in 0..s.files().stats().files as u32 {
                let l = s.files().acquire(segalloc::FileId(i), 0).await;
                assert!(
                    matches!(l, Err(Error::AllocatorFile { .. })),
                    "lease of file {i}: {:?}",
                    l.map(drop)
                );
            }
            r
        }))
        .unwrap();
        assert!(
            matches!(&r, Err(Error::Io { .. })),
            "symlink {symlink}: {r:?}"
        );
        assert!(std::fs::read(&impostor).unwrap().iter().all(|&b| b == b'X'));
        let mut buf = [0u8; 10];
        let own = block_on(rt.spawn_on(1, move |s| async move {
            s.read(h, 0, &mut buf).await.map(|()| buf)
        }))
        .unwrap()
        .unwrap();
        assert_eq!(&own, b"owner-data");
        drop(rt);
    }
}

/// Frees of another shard's handles that their owner rejects (a double
/// free, a forged handle that passes the sender's checks) were returned
/// `Ok` by `free` and by `flush_frees`, seen only in the owner's counters
/// and log. The sender's next `flush_frees` reports them, once: how many
/// since the last report, and the first one's error.
#[test]
fn rejected_forwarded_frees_are_reported_by_flush_frees() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = allocate_on(&rt, 0);
    let h2 = allocate_on(&rt, 0);
    // The slot after h2's: in bounds, never allocated (its free is refused
    // as a double free: a slot never allocated looks like a freed one).
    let forged = forge(h2, None, Some(h2.offset() + u64::from(h2.len())));
    block_on(rt.spawn_on(1, move |s| async move {
        s.flush_frees().await.expect("nothing forwarded yet");
        s.free(h).unwrap();
        s.free(h).unwrap();
        match s.flush_frees().await {
            Err(Error::FreesRejected {
                count: 1,
                first: Some(e),
            }) => assert!(matches!(*e, Error::DoubleFree { .. }), "{e:?}"),
            r => panic!("{r:?}"),
        }
        // Reported once.
        s.flush_frees().await.expect("reported already");
        // Three more, one owner: one report of all three, the first's error.
        s.free(forged).unwrap();
        s.free(h).unwrap();
        s.free(h).unwrap();
        let e = s.flush_frees().await.unwrap_err();
        assert!(
            e.to_string().starts_with("3 forwarded free(s) rejected"),
            "{e}"
        );
        match e {
            Error::FreesRejected {
                count: 3,
                first: Some(e),
            } => assert!(
                matches!(*e, Error::DoubleFree { handle } if handle == forged),
                "{e:?}"
            ),
            r => panic!("{r:?}"),
        }
        // A good free after them is applied and reports nothing.
        s.free(h2).unwrap();
        s.flush_frees().await.expect("nothing rejected since");
    }))
    .unwrap();
    let st = block_on(rt.stats()).unwrap();
    assert_eq!(st.shards[0].mesh.cross_frees_received, 2);
    assert_eq!(st.shards[0].mesh.cross_frees_rejected, 4);
    assert_eq!(st.shards[0].alloc.allocations_live, 0);
    rt.shutdown().unwrap();
}

/// Two flushes of one sender overlap, the later one's answer taken first:
/// a later rejection is reported with its own error, not with the one the
/// earlier answer carried (which named another handle).
#[test]
fn overlapping_flushes_do_not_misattribute_a_rejection() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(config(dir.path())).unwrap();
    let h = allocate_on(&rt, 0);
    let h2 = allocate_on(&rt, 0);
    block_on(rt.spawn_on(1, move |s| async move {
        s.free(h).unwrap();
        s.free(h).unwrap();
        let mut t1 = Box::pin(s.flush_frees());
        // Sends the frees and its barrier, then waits for the answer.
        assert!(futures::poll!(t1.as_mut()).is_pending());
        let r2 = s.flush_frees().await;
        let r1 = t1.await;
        eprintln!("later flush: {r2:?}; earlier flush: {r1:?}");
        s.free(h2).unwrap();
        s.free(h2).unwrap();
        match s.flush_frees().await {
            Err(Error::FreesRejected {
                count: 1,
                first: Some(e),
            }) => assert!(
                matches!(*e, Error::DoubleFree { handle } if handle == h2),
                "h2's rejection reported with another free's error: {e:?}"
            ),
            r => panic!("{r:?}"),
        }
    }))
    .unwrap();
    rt.shutdown().unwrap();
}

/// Two senders' rejected frees, one `Runtime::flush`: both counted in its
/// report (each shard's flush takes its own report).
#[test]
fn runtime_flush_reports_every_shards_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::start(common::small_cfg_shards(&dir.path().join("data"), 3)).unwrap();
    let h = allocate_on(&rt, 0);
    let h2 = allocate_on(&rt, 0);
    for (sender, victim) in [(1usize, h), (2, h2)] {
        block_on(rt.spawn_on(sender, move |s| async move {
            s.free(victim).unwrap();
            s.free(victim).unwrap();
        }))
        .unwrap();
    }
    let mut reported = 0;
    for _ in 0..3 {
        match block_on(rt.flush()) {
            Err(Error::FreesRejected { count, .. }) => reported += count,
            Ok(()) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let st = block_on(rt.stats()).unwrap();
    assert_eq!(st.shards[0].mesh.cross_frees_rejected, 2);
    assert_eq!(reported, 2, "rejected 2, reported {reported}");
    rt.shutdown().unwrap();
}
