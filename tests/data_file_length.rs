//! A data file shorter than the live allocations the metadata places in it
//! is corruption: `Shard::open` refuses it with `Error::DataFileTruncated`
//! (the file and both sizes), and `segalloc verify` (the inspector) reports
//! the same shard in error. A completed sync makes the growth of every
//! segment published before it durable, so a power loss never cuts a file
//! under a promised allocation; it can take growth that no sync covered,
//! and recovery then drops the segments that relied on it (their
//! allocations were never promised), with a warning.

mod common;

use common::{open_shard, run, small_cfg};
use segalloc::Error;
use segalloc::config::MIB;

/// Set the length of the file at `path` (a truncation, or lost growth).
fn cut(path: &std::path::Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Allocate, write and sync `n` records of `size` bytes; returns the end of
/// the last one in data file 0.
async fn fill(cfg: &segalloc::Config, n: usize, size: u64) -> u64 {
    let shard = open_shard(cfg).await.unwrap();
    let mut end = 0;
    for i in 0..n {
        let a = shard.allocate(size).await.unwrap();
        a.write_at(0, &(i as u64).to_le_bytes()).unwrap();
        let h = a.handle();
        assert_eq!(h.file_id(), 0);
        end = end.max(h.offset() + u64::from(h.len()));
    }
    shard.sync().await.unwrap();
    end
}

#[test]
fn open_refuses_a_truncated_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let needed = run(fill(&cfg, 300, 3000));
    let data = dir.path().join("shard-000/data-000000.seg");
    cut(&data, 4096);
    let err = run(open_shard(&cfg)).expect_err("a truncated data file must not open");
    match &err {
        Error::DataFileTruncated {
            path,
            needed_bytes,
            actual_bytes,
        } => {
            assert_eq!(path, &data.canonicalize().unwrap_or(data.clone()));
            assert_eq!(*actual_bytes, 4096);
            assert_eq!(*needed_bytes, needed);
        }
        other => panic!("expected DataFileTruncated, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("data-000000.seg"), "{msg}");
    assert!(
        msg.contains("4096") && msg.contains(&needed.to_string()),
        "{msg}"
    );
    // The inspector (what `segalloc verify` prints) agrees: an error on
    // that file of shard 0.
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert!(
        report
            .errors()
            .any(|p| p.shard == Some(0) && p.file.as_deref() == Some("shard-000/data-000000.seg")),
        "{:?}",
        report.problems
    );
    // Cut exactly at the end of the last live record: it opens, and every
    // record reads back.
    cut(&data, needed);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert_eq!(shard.stats().alloc.allocations_live, 300);
    });
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert_eq!(report.errors().count(), 0, "{:?}", report.problems);
}

/// One shard in `dir`, 16 MiB windows, files grown 64 KiB at a time
/// (smaller than a segment).
fn small_steps_cfg(dir: &std::path::Path) -> segalloc::Config {
    segalloc::Config::builder(dir)
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(64 * 1024)
        .build()
        .unwrap()
}

/// Every segment's run lies inside its data file's size as soon as the
/// segment exists (also when growth steps are smaller than segments); the
/// growth is not synced then. A power loss that takes the growth made
/// after the latest sync (the file back at its synced length) loses only
/// allocations no sync promised: the shard opens, every synced record reads
/// back, the inspector warns and reports no error.
#[test]
fn growth_after_the_last_sync_may_be_lost_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_steps_cfg(dir.path());
    let data = dir.path().join("shard-000/data-000000.seg");
    let data_bytes = || std::fs::metadata(&data).map_or(0, |m| m.len());
    let (synced, synced_len, unsynced) = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut synced = Vec::new();
        for i in 0..300u64 {
            let a = shard.allocate(3000).await.unwrap();
            a.write_at(0, &i.to_le_bytes()).unwrap();
            synced.push((a.handle(), i));
        }
        shard.sync().await.unwrap();
        let synced_len = data_bytes();
        let before = shard.stats().alloc;
        let mut unsynced = 0u64;
        let mut segments = before.segments;
        for i in 0..2000u64 {
            // Small slots: a segment of about 1 MiB whose first slot needs
            // only the first growth step.
            let size = [16, 4096, 100_000][(i % 3) as usize];
            let a = shard.allocate(size).await.unwrap();
            let stats = shard.stats().alloc;
            if stats.segments > segments {
                segments = stats.segments;
                let len = data_bytes();
                assert!(len >= stats.allocated_bytes, "{len} < {stats:?}");
            }
            unsynced += 1;
            drop(a);
        }
        let after = shard.stats().alloc;
        assert!(after.segments > before.segments + 2, "{after:?}");
        assert_eq!(after.syncs, before.syncs, "no sync after the synced fill");
        assert!(data_bytes() > synced_len);
        (synced, synced_len, unsynced)
    });
    assert!(unsynced > 0);
    // The power loss: the file is back at its length at the sync.
    cut(&data, synced_len);
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert_eq!(report.errors().count(), 0, "{:?}", report.problems);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.detail.contains("a power loss took the file's growth")),
        "{:?}",
        report.problems
    );
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        for (h, i) in &synced {
            let mut b = [0u8; 8];
            shard.pin(*h).await.unwrap().read_at(0, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), *i, "{h}");
        }
        // What recovery kept lies inside the file, and it is usable.
        for _ in 0..500 {
            shard.allocate(4096).await.unwrap();
        }
        shard.sync().await.unwrap();
    });
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// A directory written before the durable generation existed (its word,
/// at byte 528 of `meta.seg`, is zero) made every segment's growth durable
/// before publishing it: a reopen records that all its segments are covered
/// (so a truncation under them is still refused), and a power loss that
/// then takes new unsynced growth is still recovered.
#[test]
fn a_directory_from_before_the_durable_generation() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let needed = run(fill(&cfg, 300, 3000));
    let meta = dir.path().join("shard-000/meta.seg");
    let word = || {
        let mut b = [0u8; 8];
        let f = std::fs::File::open(&meta).unwrap();
        f.read_exact_at(&mut b, 528).unwrap();
        u64::from_le_bytes(b)
    };
    assert_ne!(word(), 0, "a sync recorded the durable generation");
    let f = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
    f.write_all_at(&[0u8; 8], 528).unwrap();
    drop(f);
    // Reopened: the word covers every segment found, durably. New
    // segments follow, never synced, and a power loss takes their growth.
    let data = dir.path().join("shard-000/data-000000.seg");
    let len = || std::fs::metadata(&data).unwrap().len();
    let synced_len = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert_eq!(shard.stats().alloc.allocations_live, 300);
        let synced_len = len();
        while len() == synced_len {
            shard.allocate(60_000).await.unwrap();
        }
        synced_len
    });
    let w = word();
    assert!(w != 0 && (w as u32) == !((w >> 32) as u32), "{w:#x}");
    cut(&data, synced_len);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert_eq!(shard.stats().alloc.allocations_live, 300);
    });
    cut(&data, needed - 1);
    match run(open_shard(&cfg)) {
        Err(Error::DataFileTruncated { .. }) => {}
        other => panic!("expected DataFileTruncated, got {:?}", other.map(|_| ())),
    }
}

/// The durable generation on disk can be ahead of every generation the
/// directory still holds and of the persisted next generation (both words
/// share a page, but recovery does not write the next generation back): a
/// power loss that kept a new segment's entry but not the first page, the
/// segment dropped for its lost growth, then a sync. A reopen must not
/// issue generations below the durable one: a segment published then has
/// growth no sync covered, and a power loss that takes it is recovered, not
/// refused as a truncated file.
#[test]
fn generations_after_a_reopen_stay_at_or_above_the_durable_one() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(fill(&cfg, 300, 3000));
    // Entries below the directory's mark become free: segments of a
    // second class, emptied and released.
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut hs = Vec::new();
        for _ in 0..200 {
            hs.push(shard.allocate(100_000).await.unwrap().handle());
        }
        for h in hs {
            shard.free(h).unwrap();
        }
        shard.sync().await.unwrap();
        shard.sync().await.unwrap();
    });
    let meta = dir.path().join("shard-000/meta.seg");
    let data = dir.path().join("shard-000/data-000000.seg");
    let len = || std::fs::metadata(&data).unwrap().len();
    let page0 = |b: Option<[u8; 24]>| {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&meta)
            .unwrap();
        let mut old = [0u8; 24];
        f.read_exact_at(&mut old, 512).unwrap();
        if let Some(b) = b {
            f.write_all_at(&b, 512).unwrap();
        }
        old
    };
    let synced_page0 = page0(None);
    let synced_len = len();
    // Segments of a new class grow the file; no sync.
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        while len() < synced_len + 8 * MIB {
            shard.allocate(60_000).await.unwrap();
        }
    });
    // Power loss: the entry reached the disk, the first page and the
    // growth did not. Recovery drops the segment; a sync follows.
    page0(Some(synced_page0));
    cut(&data, synced_len);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert!(shard.stats().alloc.allocations_live >= 300);
        shard.sync().await.unwrap();
    });
    // Again a new segment that grows the file, and a power loss that
    // takes its growth.
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        while len() == synced_len {
            shard.allocate(60_000).await.unwrap();
        }
    });
    cut(&data, synced_len);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert!(shard.stats().alloc.allocations_live >= 300);
    });
}

/// Generations wrap: 1 follows `u32::MAX` (0 is never issued). Segments
/// published after the wrap and after the latest sync are still told from
/// the synced ones: a power loss that takes their growth drops them (the
/// shard opens, every synced record reads back, the inspector warns), and
/// the reopened shard goes on from the newest generation instead of
/// issuing one again.
#[test]
fn generations_that_wrap_past_u32_max_still_recover() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_steps_cfg(dir.path());
    run(async {
        open_shard(&cfg).await.unwrap().sync().await.unwrap();
    });
    // The next generation to issue (byte 520), two before the wrap, and
    // the durable one (528): a sync began there.
    let meta = dir.path().join("shard-000/meta.seg");
    let f = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
    let next = segalloc::format::encode_counter(u32::MAX - 1);
    f.write_all_at(&next.to_le_bytes(), 520).unwrap();
    f.write_all_at(&next.to_le_bytes(), 528).unwrap();
    drop(f);
    let data = dir.path().join("shard-000/data-000000.seg");
    let len = || std::fs::metadata(&data).map_or(0, |m| m.len());
    let (synced, synced_len, issued) = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut synced = Vec::new();
        for i in 0..50u64 {
            let a = shard.allocate(3000).await.unwrap();
            a.write_at(0, &i.to_le_bytes()).unwrap();
            synced.push((a.handle(), i));
        }
        assert_eq!(synced[0].0.generation(), u32::MAX - 1);
        shard.sync().await.unwrap();
        let synced_len = len();
        // Unsynced segments of other classes, across the wrap, each in
        // growth past the synced length.
        let mut issued = Vec::new();
        for size in [16, 200, 4096, 20_000, 100_000] {
            let h = shard.allocate(size).await.unwrap().handle();
            issued.push(h.generation());
        }
        assert_eq!(issued[..3], [u32::MAX, 1, 2], "{issued:?}");
        assert!(len() > synced_len);
        (synced, synced_len, issued)
    });
    // The power loss: the file back at its length at the sync.
    cut(&data, synced_len);
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert_eq!(report.errors().count(), 0, "{:?}", report.problems);
    let dropped = report
        .problems
        .iter()
        .filter(|p| p.detail.contains("a power loss took the file's growth"))
        .count();
    assert!(dropped >= 3, "{:?}", report.problems);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        for (h, i) in &synced {
            let mut b = [0u8; 8];
            shard.pin(*h).await.unwrap().read_at(0, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), *i, "{h}");
        }
        // The next segment's generation comes after every one issued.
        let g = shard.allocate(16).await.unwrap().handle().generation();
        let newest = *issued.last().unwrap();
        assert_eq!(g, newest + 1, "issued before the power loss: {issued:?}");
        shard.sync().await.unwrap();
        // The next generation's word and the durable one went on past the
        // wrap too (the sync began with `g + 1` next).
        let f = std::fs::File::open(&meta).unwrap();
        for at in [520, 528] {
            let mut w = [0u8; 8];
            f.read_exact_at(&mut w, at).unwrap();
            let w = u64::from_le_bytes(w);
            assert_eq!(
                segalloc::format::decode_counter(w),
                Some(g + 1),
                "word at {at}"
            );
        }
    });
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert_eq!(report.errors().count(), 0, "{:?}", report.problems);
}

/// A segment issued about 2^31 publications before the words (the
/// shard's first, still live) lies "ahead" of them in wrapping order, yet
/// is older: a reopen goes on from the words (it went back to just after
/// that segment, issued generations again, and with the words at 2^31 + 2
/// never advanced them again, so a data file cut short under synced
/// segments read as lost growth and opened without them). The cut is
/// refused.
#[test]
fn a_segment_issued_half_the_range_ago_is_older_than_the_words() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_steps_cfg(dir.path());
    let first = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let h = shard.allocate(3000).await.unwrap().handle();
        shard.sync().await.unwrap();
        h
    });
    assert_eq!(first.generation(), 1);
    let words = (1u32 << 31) + 2;
    let meta = dir.path().join("shard-000/meta.seg");
    let f = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
    let w = segalloc::format::encode_counter(words).to_le_bytes();
    f.write_all_at(&w, 520).unwrap();
    f.write_all_at(&w, 528).unwrap();
    drop(f);
    let data = dir.path().join("shard-000/data-000000.seg");
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut gens = Vec::new();
        for size in [16, 200, 20_000] {
            gens.push(shard.allocate(size).await.unwrap().handle().generation());
        }
        assert_eq!(gens, [words, words + 1, words + 2]);
        shard.sync().await.unwrap();
    });
    let f = std::fs::File::open(&meta).unwrap();
    for at in [520, 528] {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, at).unwrap();
        let w = segalloc::format::decode_counter(u64::from_le_bytes(b));
        assert_eq!(w, Some(words + 3), "word at {at}");
    }
    // Synced segments cut short: damage, refused.
    let len = std::fs::metadata(&data).unwrap().len();
    cut(&data, len / 2);
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert!(report.errors().count() > 0, "{:?}", report.problems);
    assert!(matches!(
        run(open_shard(&cfg)),
        Err(Error::DataFileTruncated { .. })
    ));
}
