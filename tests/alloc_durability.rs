//! The allocator's durability and cancellation promises: overlapping syncs,
//! dropped futures, reuse of freed space only after the free is durable,
//! blocks of published segments reserved again at open, and geometries the
//! on-disk format cannot hold.

mod common;

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::pin;
use std::task::{Context, Poll};

use common::{Rng, check_pattern, open_shard, run, small_cfg, write_pattern};
use segalloc::config::MIB;
use segalloc::{AllocStats, Config, Handle, Shard};

fn alloc_stats(shard: &Shard) -> AllocStats {
    shard.stats().alloc
}

/// Poll `f` `polls` times (yielding to the runtime in between, so its io
/// completes), then drop it. Returns its output if it finished.
async fn poll_then_drop<F: Future>(f: F, polls: usize) -> Option<F::Output> {
    let mut f = pin!(f);
    let waker = futures::task::noop_waker();
    for _ in 0..polls {
        if let Poll::Ready(v) = f.as_mut().poll(&mut Context::from_waker(&waker)) {
            return Some(v);
        }
        tokio::task::yield_now().await;
    }
    None
}

#[test]
fn overlapping_syncs_on_one_shard() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        for round in 0..3 {
            // 4,097 slots of 16 B: the second segment of the class empties
            // and is released (its entry waits for a sync).
            let mut hs = Vec::new();
            for _ in 0..4097 {
                hs.push(shard.allocate(16).await.unwrap().into_handle());
            }
            for h in hs {
                shard.free(h).unwrap();
            }
            let (a, b) = futures::join!(shard.sync(), shard.sync());
            a.unwrap();
            b.unwrap();
            let (a, b, c) = futures::join!(shard.sync(), shard.trim(), shard.sync());
            a.unwrap();
            b.unwrap();
            c.unwrap();
            assert_eq!(alloc_stats(&shard).allocations_live, 0, "round {round}");
        }
    });
}

/// Allocate `size` until the class needs a new segment (every slot of its
/// existing segments taken); returns the handles.
async fn fill_class(shard: &Shard, size: u64) -> Vec<Handle> {
    let mut hs = Vec::new();
    loop {
        match shard.try_allocate(size).unwrap() {
            Some(a) => hs.push(a.into_handle()),
            None => {
                // Either a new segment is needed or the window is not
                // mapped: tell them apart by the segment count.
                let before = alloc_stats(shard).segments;
                let a = shard.allocate(size).await.unwrap();
                hs.push(a.into_handle());
                if alloc_stats(shard).segments > before {
                    return hs;
                }
            }
        }
    }
}

#[test]
fn dropped_allocate_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // One window per data file: new segments often create a data file.
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(16 * MIB)
        .build()
        .unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Free runs punched by `trim`: a new segment in one awaits its
        // reservation (fallocate) before it is published.
        let mut hs = Vec::new();
        for _ in 0..64 {
            hs.push(shard.allocate(MIB).await.unwrap().into_handle());
        }
        for h in hs {
            shard.free(h).unwrap();
        }
        shard.trim().await.unwrap();
        shard.trim().await.unwrap();
        let mut held = Vec::new();
        let mut dropped = 0;
        for i in 0..120 {
            let polls = 1 + i % 4;
            let before = alloc_stats(&shard);
            match poll_then_drop(shard.allocate(MIB), polls).await {
                Some(a) => held.push(a.unwrap().into_handle()),
                None => {
                    dropped += 1;
                    let after = alloc_stats(&shard);
                    assert_eq!(
                        (after.allocations_live, after.live_bytes),
                        (before.allocations_live, before.live_bytes),
                        "after dropping at poll {polls}"
                    );
                    // Every run in use belongs to a segment (the dropped
                    // call may have published one, which is kept empty).
                    assert_eq!(
                        after.allocated_bytes,
                        after.segments * MIB,
                        "a run leaked after dropping at poll {polls}"
                    );
                }
            }
        }
        // The sync backend completes io inline: few awaits are pending.
        if common::expected_backend() == segalloc::IoBackend::Uring {
            assert!(dropped >= 10, "only {dropped} futures were dropped pending");
        }
        // The entries given back are reused: a real allocation takes a
        // free entry, not one past every dropped attempt.
        let h = shard.allocate(MIB).await.unwrap().into_handle();
        assert!(
            h.segment_id() <= 64 + held.len() as u32 + 2,
            "entry {} used with {} live: entries leaked",
            h.segment_id(),
            held.len()
        );
        for h in held {
            shard.free(h).unwrap();
        }
    });
}

/// Copy of the shard's metadata file.
fn read_meta(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("shard-000/meta.seg")).unwrap()
}

/// A power-loss image: the data files as last written, the metadata as of
/// `meta` (the metadata's dirty pages never reached the disk).
fn revert_meta(dir: &Path, meta: &[u8]) {
    std::fs::write(dir.join("shard-000/meta.seg"), meta).unwrap();
}

#[test]
fn freed_slot_is_not_reused_before_the_free_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let len = |h: &Handle| h.len() as usize;
    let (victims, meta) = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut victims = Vec::new();
        for i in 0..100u64 {
            let a = shard.allocate(100).await.unwrap();
            write_pattern(a.pin(), len(&a.handle()), i);
            victims.push((a.handle(), i));
        }
        shard.sync().await.unwrap();
        let meta = read_meta(dir.path());
        for (h, _) in &victims {
            shard.free(*h).unwrap();
        }
        // New allocations of the same class, written at once.
        for i in 0..200u64 {
            let a = shard.allocate(100).await.unwrap();
            write_pattern(a.pin(), len(&a.handle()), 1_000_000 + i);
        }
        (victims, meta)
    });
    revert_meta(dir.path(), &meta);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        for (h, seed) in &victims {
            // The free reverted: the allocation is back, with its bytes.
            let pin = shard
                .pin(*h)
                .await
                .unwrap_or_else(|e| panic!("{h} lost: {e}"));
            assert!(
                check_pattern(&pin, len(h), *seed),
                "{h}: bytes overwritten by a later allocation"
            );
        }
    });
}

#[test]
fn released_run_is_not_reused_before_the_release_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let (victims, meta) = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Three segments of a mid class; the last two emptied after the
        // sync, so one of them is released; then other classes take runs.
        let size = 60_000;
        let mut hs = Vec::new();
        for _ in 0..3 {
            hs.extend(fill_class(&shard, size).await);
        }
        while let Some(a) = shard.try_allocate(size).unwrap() {
            hs.push(a.into_handle());
        }
        let mut segs: Vec<u32> = hs.iter().map(|h| h.segment_id()).collect();
        segs.sort_unstable();
        segs.dedup();
        assert!(segs.len() >= 3, "segments {segs:?}");
        let last_two = &segs[segs.len() - 2..];
        let second: Vec<Handle> = hs
            .iter()
            .copied()
            .filter(|h| last_two.contains(&h.segment_id()))
            .collect();
        let mut victims = Vec::new();
        for (i, h) in second.iter().enumerate() {
            let pin = shard.pin(*h).await.unwrap();
            write_pattern(&pin, h.len() as usize, i as u64);
            victims.push((*h, i as u64));
        }
        shard.sync().await.unwrap();
        let meta = read_meta(dir.path());
        for (h, _) in &victims {
            shard.free(*h).unwrap();
        }
        let mut rng = Rng::new(7);
        for i in 0..2000u64 {
            let size = 20_000 + rng.below(10_000);
            let a = shard.allocate(size).await.unwrap();
            write_pattern(a.pin(), a.len(), 1_000_000 + i);
        }
        (victims, meta)
    });
    revert_meta(dir.path(), &meta);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        for (h, seed) in &victims {
            let pin = shard
                .pin(*h)
                .await
                .unwrap_or_else(|e| panic!("{h} lost: {e}"));
            assert!(
                check_pattern(&pin, h.len() as usize, *seed),
                "{h}: bytes overwritten by a segment of another class"
            );
        }
    });
}

/// Bytes of disk blocks allocated to `path` (reserved ones included).
fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn open_reserves_the_blocks_of_published_segments_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let h = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let a = shard.allocate(MIB).await.unwrap();
        shard.sync().await.unwrap();
        a.into_handle()
    });
    let data = dir.path().join("shard-000/data-000000.seg");
    let (start, end) = (h.offset(), h.offset() + h.len() as u64);
    let full = allocated_bytes(&data);
    assert!(
        full >= end,
        "{full} bytes allocated, the slot ends at {end}"
    );
    // The reservation of the segment's blocks did not survive (a power loss
    // before the file system's journal held it): a hole under a live slot.
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
        let mode = nix::libc::FALLOC_FL_PUNCH_HOLE | nix::libc::FALLOC_FL_KEEP_SIZE;
        // SAFETY: a plain syscall on a descriptor this test owns.
        let r = unsafe {
            nix::libc::fallocate(f.as_raw_fd(), mode, start as i64, (end - start) as i64)
        };
        assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    }
    assert!(allocated_bytes(&data) <= full - (end - start));
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        shard.pin(h).await.unwrap();
        assert!(
            allocated_bytes(&data) >= full,
            "the live slot's blocks are not reserved after open"
        );
    });
}

#[test]
fn geometries_the_directory_cannot_hold_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let b = || Config::builder(dir.path()).shards(1).window_bytes(16 * MIB);
    // Block numbers are 32-bit on disk: 2^32 blocks of 64 KiB is 2^48 bytes.
    for bytes in [1u64 << 48, (1u64 << 48) + 16 * MIB, 1 << 60] {
        assert!(
            b().max_file_bytes(bytes).build().is_err(),
            "max_file_bytes {bytes} accepted"
        );
    }
    let largest = (1u64 << 48) - 16 * MIB;
    let cfg = b().max_file_bytes(largest).build().unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let a = shard.allocate(100).await.unwrap();
        a.write_at(0, b"x").unwrap();
        let h = a.into_handle();
        shard.sync().await.unwrap();
        drop(shard);
        let shard = open_shard(&cfg).await.unwrap();
        let pin = shard.pin(h).await.unwrap();
        let mut b = [0u8; 1];
        pin.read_at(0, &mut b).unwrap();
        assert_eq!(&b, b"x");
    });
}

#[test]
fn forged_handles_with_extreme_fields_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let real = shard.allocate(100).await.unwrap().into_handle();
        let base = real.to_bytes();
        let mut rng = Rng::new(11);
        // Fields at bytes 8..36: file, segment, generation, length, offset.
        let fields: [(usize, usize); 5] = [(8, 4), (12, 4), (16, 4), (20, 4), (24, 8)];
        let mut refused = 0;
        for i in 0..20_000u64 {
            let mut b = base;
            for _ in 0..1 + rng.below(3) {
                let (at, n) = fields[rng.below(5) as usize];
                let v: u64 = match i % 4 {
                    0 => u64::MAX,
                    1 => u64::MAX - rng.below(1 << 20),
                    2 => rng.below(1 << 40),
                    _ => rng.next_u64(),
                };
                b[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
            }
            let crc = crc32c::crc32c(&b[..36]);
            b[36..].copy_from_slice(&crc.to_le_bytes());
            let Ok(h) = Handle::from_bytes(&b) else {
                continue;
            };
            if h == real {
                continue;
            }
            refused += 1;
            assert!(shard.free(h).is_err(), "forged {h} freed");
            assert!(shard.try_pin(h).is_err(), "forged {h} pinned");
            assert!(shard.pin(h).await.is_err(), "forged {h} pinned");
            assert!(shard.set_root("x", h).is_err(), "forged {h} named");
        }
        assert!(refused > 1000, "only {refused} forged handles decoded");
        shard.free(real).unwrap();
    });
}

/// While an `allocate` waits for its slot's window, the slot is not live:
/// a handle of it (handles are bytes from outside, so one can be forged
/// before `allocate` returns it) cannot be freed, and `live()` does not
/// list it. Checked at every point where an `allocate` future is pending,
/// with small windows and growth steps so that many allocations wait.
#[test]
fn a_slot_being_handed_out_cannot_be_freed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_windows(3)
        .build()
        .unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut acked: std::collections::BTreeSet<Handle> = Default::default();
        let mut pending_polls = 0;
        let waker = futures::task::noop_waker();
        for _ in 0..400 {
            let mut f = pin!(shard.allocate(256 * 1024));
            let a = loop {
                if let Poll::Ready(r) = f.as_mut().poll(&mut Context::from_waker(&waker)) {
                    break r.unwrap();
                }
                pending_polls += 1;
                let unacked: Vec<Handle> = shard.live().filter(|h| !acked.contains(h)).collect();
                for h in unacked {
                    assert!(
                        shard.free(h).is_err(),
                        "{h} was freed while its allocate was still pending"
                    );
                }
                tokio::task::yield_now().await;
            };
            acked.insert(a.handle());
        }
        let live: std::collections::BTreeSet<Handle> = shard.live().collect();
        assert_eq!(live, acked);
        println!("{pending_polls} pending polls");
    });
}

/// `trim` never punches a run that a pin still maps: a stale pin (kept past
/// the free of its allocation) keeps its bytes, and its window's runs are
/// punched by a later `trim`, once the pin is gone.
#[test]
fn trim_skips_runs_under_a_pin() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Three windows of 1 MiB segments in one data file.
        let mut hs = Vec::new();
        for _ in 0..40 {
            let a = shard.allocate(MIB - 4096).await.unwrap();
            write_pattern(a.pin(), 4096, common::handle_seed(&a.handle(), 1));
            hs.push(a.into_handle());
        }
        // A pin of an allocation in the first window, kept past its free.
        let kept = hs[1];
        assert!(kept.offset() < 16 * MIB);
        let stale = shard.pin(kept).await.unwrap();
        // The last stays live: the freed runs lie below the file's used end.
        let last = hs.pop().unwrap();
        for h in hs.drain(..) {
            shard.free(h).unwrap();
        }
        let punched = shard.trim().await.unwrap();
        assert!(punched > 0, "runs of windows without pins are punched");
        assert!(
            check_pattern(&stale, 4096, common::handle_seed(&kept, 1)),
            "the run under a pin was punched"
        );
        drop(stale);
        let later = shard.trim().await.unwrap();
        assert!(later > 0, "the skipped runs are punched once unpinned");
        assert!(shard.allocator().is_live(&last));
    });
}

/// The live iterator held across an await: an entry released and reused
/// meanwhile by another class is not reported with the old segment's bits.
#[test]
fn live_iterator_across_entry_reuse() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Three segments of 16 B (4,096 slots each): when the second and
        // third empty, the third is released (one empty one is kept).
        let mut small = Vec::new();
        for _ in 0..2 * 4096 + 64 {
            small.push(shard.allocate(16).await.unwrap().into_handle());
        }
        let third: Vec<_> = small.split_off(2 * 4096);
        let second: Vec<_> = small.split_off(4096);
        let entry = third[0].segment_id();
        let mut it = shard.live();
        // Walk to the third segment's first slot.
        let first = it.by_ref().find(|h| h.segment_id() == entry).unwrap();
        assert_eq!(first, third[0]);
        for h in second.into_iter().chain(third) {
            shard.free(h).unwrap();
        }
        shard.sync().await.unwrap();
        shard.sync().await.unwrap();
        // Another class takes the released entry.
        let mut reused = Vec::new();
        for _ in 0..8 {
            reused.push(shard.allocate(5000).await.unwrap().into_handle());
        }
        assert!(
            reused.iter().any(|h| h.segment_id() == entry),
            "the released entry is reused"
        );
        for h in it {
            assert!(shard.allocator().is_live(&h), "reported {h}, not live");
            assert_ne!(h.segment_id(), entry, "reported {h} from the old bits");
        }
    });
}

/// Writes a previous process made (acknowledged: they survive its
/// `kill -9` in the page cache) may not be on disk yet when the directory
/// is opened again. The first `sync` after open must cover them: open
/// reserves the blocks of every published segment again, which opens each
/// data file that holds one, and a file counts as dirty from its first
/// open, so that sync `fdatasync`s it though nothing was written since.
#[test]
fn the_first_sync_after_open_covers_writes_made_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let h = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let a = shard.allocate(100).await.unwrap();
        shard.sync().await.unwrap();
        let (h, pin) = a.into_parts();
        pin.write_at(0, b"written, acknowledged, never synced")
            .unwrap();
        drop(pin);
        // Closed without a sync, as a killed process leaves it.
        h
    });
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // No pin before the sync: a pin marks its file dirty by itself.
        let before = alloc_stats(&shard).data_file_syncs;
        shard.sync().await.unwrap();
        let after = alloc_stats(&shard).data_file_syncs;
        assert_eq!(
            after - before,
            1,
            "the first sync after open fdatasyncs the data file"
        );
        let pin = shard.pin(h).await.unwrap();
        let mut got = [0u8; 35];
        pin.read_at(0, &mut got).unwrap();
        assert_eq!(&got, b"written, acknowledged, never synced");
    });
}
