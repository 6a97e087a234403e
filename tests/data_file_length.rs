//! A data file shorter than the live allocations the metadata places in it
//! is corruption: `Shard::open` refuses it with `Error::DataFileTruncated`
//! (the file and both sizes), and `segalloc verify` (the inspector) reports
//! the same shard in error. Segment growth is made durable before the
//! segment is published, so a power loss never produces such a file.

mod common;

use common::{open_shard, run, small_cfg};
use segalloc::Error;
use segalloc::config::MIB;

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
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(4096)
        .unwrap();
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
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(needed)
        .unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert_eq!(shard.stats().alloc.allocations_live, 300);
    });
    let report = segalloc::inspect::read_dir(dir.path()).unwrap();
    assert_eq!(report.errors().count(), 0, "{:?}", report.problems);
}

/// Every segment's run lies inside its data file's size as soon as the
/// segment exists (also when growth steps are smaller than segments), and
/// that growth was made durable (an `fdatasync` per growth, counted) before
/// the segment was published.
#[test]
fn segment_growth_is_durable_before_publication() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = segalloc::Config::builder(dir.path())
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(64 * 1024)
        .build()
        .unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let data_bytes = || -> u64 {
            std::fs::read_dir(dir.path().join("shard-000"))
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.file_name().to_string_lossy().starts_with("data-"))
                .map(|e| e.metadata().unwrap().len())
                .sum()
        };
        let mut segments = 0;
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
            drop(a);
        }
        let stats = shard.stats().alloc;
        assert!(stats.growth_syncs >= 1, "{stats:?}");
        assert!(stats.growth_syncs <= stats.segments, "{stats:?}");
    });
}
