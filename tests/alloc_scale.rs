//! Scale to 10M: N records of 100 bytes on one shard with default
//! (1 GiB) windows; the OS's descriptor and mapping counts stay small, the
//! metadata stays under 1 % of the data, and reopening (recovery) is fast.
//!
//! The default run has N = 1,000,000; the full one is ignored:
//! `cargo test --release --test alloc_scale -- --ignored --nocapture`
//! (`SEGALLOC_SCALE_COLD=1` drops the page cache before the reopen).

mod common;

use std::time::Instant;

use common::{open_shard, run};
use segalloc::{Config, Handle, Shard};

const RECORD_BYTES: u64 = 100;

async fn alloc_record(shard: &Shard, i: u64) -> Handle {
    let a = match shard.try_allocate(RECORD_BYTES).unwrap() {
        Some(a) => a,
        None => shard.allocate(RECORD_BYTES).await.unwrap(),
    };
    a.write_at(0, &i.to_le_bytes()).unwrap();
    a.into_handle()
}

fn scale(n: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = Config::builder(&dir).shards(1).build().unwrap();
    let every = (n / 1000).max(1);
    let sample = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let started = Instant::now();
        let mut sample = Vec::new();
        for i in 0..n {
            let h = alloc_record(&shard, i).await;
            if i % every == 0 {
                sample.push((i, h));
            }
        }
        let elapsed = started.elapsed();
        shard.sync().await.unwrap();

        let st = shard.stats();
        let a = &st.alloc;
        let (fds, vmas) = common::os_counts(&dir);
        let meta_vs_live = a.metadata_bytes as f64 / a.live_bytes as f64;
        let meta_vs_allocated = a.metadata_bytes as f64 / a.allocated_bytes as f64;
        let meta_vs_requested = a.metadata_bytes as f64 / (n * RECORD_BYTES) as f64;
        eprintln!(
            "scale {n}: allocate+write {:.2} s ({:.0} ns/record), {} segments, {} data files, \
             fds under the dir {fds}, VMAs under the dir {vmas}, metadata {} B, live {} B, \
             segments {} B, reserved {} B; metadata/live {:.3} %, metadata/segments {:.3} %, \
             metadata/requested {:.3} %",
            elapsed.as_secs_f64(),
            elapsed.as_nanos() as f64 / n as f64,
            a.segments,
            a.data_files,
            a.metadata_bytes,
            a.live_bytes,
            a.allocated_bytes,
            a.reserved_bytes,
            100.0 * meta_vs_live,
            100.0 * meta_vs_allocated,
            100.0 * meta_vs_requested,
        );
        assert_eq!(a.allocations_live, n);
        assert!(fds < 100, "{fds} descriptors under the data directory");
        assert!(
            vmas < 1000,
            "{vmas} mappings of files under the data directory"
        );
        assert!(
            meta_vs_live < 0.01,
            "metadata is {:.3} % of the live bytes",
            100.0 * meta_vs_live
        );
        sample
    });

    // Reopen: recovery time, then everything is there. With
    // `SEGALLOC_SCALE_COLD=1` (needs root) the page cache is dropped first,
    // so recovery reads the metadata from the disk.
    if std::env::var("SEGALLOC_SCALE_COLD").as_deref() == Ok("1") {
        std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root only)");
    }
    run(async {
        let started = Instant::now();
        let shard = open_shard(&cfg).await.unwrap();
        let reopen = started.elapsed();
        let st = shard.stats();
        eprintln!(
            "scale {n}: reopen {:.1} ms (recovery {:.1} ms), fds {}, VMAs {}",
            reopen.as_secs_f64() * 1000.0,
            st.alloc.recovery_us as f64 / 1000.0,
            segalloc::proc::open_fds_under(&dir),
            segalloc::proc::vmas_under(&dir),
        );
        assert_eq!(shard.live_count(), n);
        for (i, h) in &sample {
            let pin = shard.pin(*h).await.unwrap();
            let mut b = [0u8; 8];
            pin.read_at(0, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), *i);
        }
        let (fds, vmas) = common::os_counts(&dir);
        assert!(
            fds < 100 && vmas < 1000,
            "after reopen: {fds} fds, {vmas} VMAs"
        );
    });
}

#[test]
fn scale_1m_records() {
    scale(1_000_000);
}

#[test]
#[ignore = "long: 10,000,000 records (about 1.1 GB of data files)"]
fn scale_10m_records() {
    scale(10_000_000);
}
