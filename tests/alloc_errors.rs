//! Misuse of the allocator gets the exact typed error and changes nothing:
//! after each bad call the live set, the live count, every allocation's
//! contents and the roots are what they were before.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::{
    Snapshot, check_pattern, handle_seed, open_shard, run, small_cfg, snapshot, write_pattern,
};
use segalloc::config::MIB;
use segalloc::{Config, DataDir, Error, Handle, Shard};

async fn assert_unchanged(shard: &Shard, before: &Snapshot) {
    assert_eq!(&snapshot(shard), before, "a failed call changed the state");
    for h in &before.live {
        let pin = shard.pin(*h).await.expect("pin");
        assert!(
            check_pattern(&pin, pin.len(), handle_seed(h, 0)),
            "contents of {h}"
        );
    }
}

/// A shard with allocations of a few classes, each filled with its pattern,
/// and one root.
async fn populated(cfg: &Config) -> (Shard, Vec<Handle>) {
    let shard = open_shard(cfg).await.unwrap();
    let mut hs = Vec::new();
    for size in [16u64, 64, 64, 64, 1000, 70_000, MIB] {
        let a = shard.allocate(size).await.unwrap();
        let h = a.handle();
        write_pattern(a.pin(), a.len(), handle_seed(&h, 0));
        hs.push(h);
    }
    shard.set_root("main", hs[0]).unwrap();
    (shard, hs)
}

/// Patch the encoding of `h` with `f` and re-sign it (CRC-32C of bytes
/// 0..36 at 36..40), so it decodes.
fn patched(h: Handle, f: impl FnOnce(&mut [u8; 40])) -> Handle {
    let mut b = h.to_bytes();
    f(&mut b);
    let crc = crc32c::crc32c(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    Handle::from_bytes(&b).expect("patched handle decodes")
}

fn set_u32(b: &mut [u8; 40], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn set_u64(b: &mut [u8; 40], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn invalid_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (shard, _) = populated(&cfg).await;
        let before = snapshot(&shard);
        for size in [0u64, 16 * MIB + 1, u64::MAX] {
            match shard.allocate(size).await {
                Err(Error::InvalidSize { size: s }) => assert_eq!(s, size),
                other => panic!("allocate({size}): {other:?}"),
            }
            match shard.try_allocate(size) {
                Err(Error::InvalidSize { size: s }) => assert_eq!(s, size),
                other => panic!("try_allocate({size}): {other:?}"),
            }
            assert_unchanged(&shard, &before).await;
        }
        // The limits themselves are fine.
        let a = shard.allocate(16 * MIB).await.unwrap();
        assert_eq!(a.len() as u64, 16 * MIB);
        let b = shard.allocate(1).await.unwrap();
        assert_eq!(b.len(), 16);
    });
}

#[test]
fn double_free() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (shard, hs) = populated(&cfg).await;
        let extra = shard.allocate(64).await.unwrap().into_handle();
        shard.free(extra).unwrap();
        let before = snapshot(&shard);
        assert!(matches!(shard.free(extra), Err(Error::DoubleFree { .. })));
        assert!(matches!(shard.free(extra), Err(Error::DoubleFree { .. })));
        // A freed handle cannot be pinned or named a root either.
        assert!(matches!(
            shard.pin(extra).await,
            Err(Error::NotAllocated { .. })
        ));
        assert!(matches!(
            shard.try_pin(extra),
            Err(Error::NotAllocated { .. })
        ));
        assert!(matches!(
            shard.set_root("x", extra),
            Err(Error::NotAllocated { .. })
        ));
        assert_unchanged(&shard, &before).await;
        // A double free after the first free emptied (and released) its
        // segment cannot be told from a handle that was never allocated:
        // NotAllocated, and still nothing changes.
        let spare = shard.allocate(3000).await.unwrap().into_handle();
        let mut batch = Vec::new();
        for _ in 0..2 * 4096 {
            batch.push(shard.allocate(3000).await.unwrap().into_handle());
        }
        for h in batch.iter().chain([&spare]) {
            shard.free(*h).unwrap();
        }
        // Segments are released once their frees are durable.
        shard.sync().await.unwrap();
        assert!(
            batch
                .iter()
                .any(|h| matches!(shard.free(*h), Err(Error::NotAllocated { .. })))
        );
        assert!(batch.iter().all(|h| matches!(
            shard.free(*h),
            Err(Error::NotAllocated { .. } | Error::DoubleFree { .. })
        )));
        assert_unchanged(&shard, &before).await;
        // And it survives a reopen as freed.
        drop(shard);
        let shard = open_shard(&cfg).await.unwrap();
        assert!(matches!(shard.free(extra), Err(Error::DoubleFree { .. })));
        assert_unchanged(&shard, &before).await;
        assert_eq!(before.live.len(), hs.len());
    });
}

#[test]
fn handles_that_name_no_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (shard, hs) = populated(&cfg).await;
        let before = snapshot(&shard);
        // hs[1..4] are the first three slots of a fresh 64-byte segment.
        let h = hs[3];
        assert_eq!(h.len(), 64);
        let next_slot = patched(h, |b| set_u64(b, 24, h.offset() + 64));
        let cases: Vec<(&str, Handle)> = vec![
            (
                "segment id that does not exist",
                patched(h, |b| set_u32(b, 12, 999_999)),
            ),
            (
                "segment id of another class",
                patched(h, |b| set_u32(b, 12, hs[0].segment_id())),
            ),
            (
                "wrong generation",
                patched(h, |b| set_u32(b, 16, h.generation() + 1)),
            ),
            (
                "wrong data file",
                patched(h, |b| set_u32(b, 8, h.file_id() + 1)),
            ),
            (
                "offset past the segment",
                patched(h, |b| set_u64(b, 24, h.offset() + 64 * 4096)),
            ),
            (
                "offset before the segment",
                patched(hs[4], |b| set_u64(b, 24, 0)),
            ),
            (
                "offset far out of bounds",
                patched(h, |b| set_u64(b, 24, (1u64 << 62) & !63)),
            ),
            (
                "offset inside a slot",
                patched(h, |b| set_u64(b, 24, h.offset() + 16)),
            ),
            (
                // Class 4 has 80-byte slots; the segment is of class 3.
                "wrong class (length patched to match)",
                patched(h, |b| {
                    b[2] = 4;
                    set_u32(b, 20, 80);
                    set_u64(b, 24, h.offset() - h.offset() % 80);
                }),
            ),
        ];
        for (what, bad) in cases {
            match shard.pin(bad).await {
                Err(Error::NotAllocated { .. }) => {}
                other => panic!("pin of {what} ({bad}): {other:?}"),
            }
            assert!(
                matches!(shard.try_pin(bad), Err(Error::NotAllocated { .. })),
                "{what}"
            );
            match shard.free(bad) {
                Err(Error::NotAllocated { .. }) => {}
                other => panic!("free of {what} ({bad}): {other:?}"),
            }
            assert!(!shard.allocator().is_live(&bad));
            assert!(matches!(
                shard.set_root("bad", bad),
                Err(Error::NotAllocated { .. })
            ));
            assert_unchanged(&shard, &before).await;
        }
        // A slot of a live segment that was never handed out: pin says
        // NotAllocated; free cannot tell it from a slot freed already (the
        // handle bytes are the same), so it says DoubleFree. Either way it
        // is refused and nothing changes.
        assert!(matches!(
            shard.pin(next_slot).await,
            Err(Error::NotAllocated { .. })
        ));
        assert!(matches!(
            shard.free(next_slot),
            Err(Error::DoubleFree { .. } | Error::NotAllocated { .. })
        ));
        assert_unchanged(&shard, &before).await;
        // The slot is still the next one handed out: nothing was marked.
        let a = shard.allocate(64).await.unwrap();
        assert_eq!(a.handle(), next_slot);
    });
}

#[test]
fn foreign_and_wrong_shard_handles() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&dir.path().join("a"));
    let other_cfg = small_cfg(&dir.path().join("b"));
    run(async {
        let (shard, hs) = populated(&cfg).await;
        let (other, other_hs) = populated(&other_cfg).await;
        let before = snapshot(&shard);
        let other_before = snapshot(&other);
        // Same geometry in both directories: only the tag differs.
        for (mine, foreign) in hs.iter().zip(&other_hs) {
            assert_eq!(mine.offset(), foreign.offset());
            assert_ne!(mine.dir_tag(), foreign.dir_tag());
            assert!(matches!(
                shard.pin(*foreign).await,
                Err(Error::ForeignHandle { .. })
            ));
            assert!(matches!(
                shard.try_pin(*foreign),
                Err(Error::ForeignHandle { .. })
            ));
            assert!(matches!(
                shard.free(*foreign),
                Err(Error::ForeignHandle { .. })
            ));
            assert!(matches!(
                shard.set_root("f", *foreign),
                Err(Error::ForeignHandle { .. })
            ));
            assert!(matches!(
                other.free(*mine),
                Err(Error::ForeignHandle { .. })
            ));
        }
        // A handle of shard 1 in a one-shard directory.
        let wrong = patched(hs[0], |b| b[4] = 1);
        assert!(matches!(
            shard.free(wrong),
            Err(Error::WrongShard {
                owner: 1,
                this: 0,
                ..
            })
        ));
        assert!(matches!(
            shard.pin(wrong).await,
            Err(Error::WrongShard { .. })
        ));
        assert_unchanged(&shard, &before).await;
        assert_unchanged(&other, &other_before).await;
    });
}

#[test]
fn garbage_bytes_are_bad_handles() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (_shard, hs) = populated(&cfg).await;
        let good = hs[2].to_bytes();
        let mut cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![0; 40],
            vec![0xff; 40],
            good[..39].to_vec(),
            [&good[..], &[0]].concat(),
            b"this is not a handle, it is forty bytes!".to_vec(),
        ];
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..1000 {
            cases.push(
                (0..40)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect(),
            );
        }
        // Every single-bit flip of a valid encoding.
        for i in 0..40 {
            for bit in 0..8 {
                let mut b = good;
                b[i] ^= 1 << bit;
                cases.push(b.to_vec());
            }
        }
        // Valid checksum, bad fields.
        let resign = |mut b: [u8; 40]| {
            let crc = crc32c::crc32c(&b[..36]);
            b[36..40].copy_from_slice(&crc.to_le_bytes());
            b.to_vec()
        };
        let mut unknown_class = good;
        unknown_class[2] = 200;
        let mut wrong_len = good;
        wrong_len[20] ^= 1;
        let mut misaligned = good;
        misaligned[24] |= 8;
        let mut reserved = good;
        reserved[3] = 1;
        let mut version = good;
        version[1] = 2;
        for b in [unknown_class, wrong_len, misaligned, reserved, version] {
            cases.push(resign(b));
        }
        for c in cases {
            match Handle::from_bytes(&c) {
                Err(segalloc::BadHandle { .. }) => {}
                other => panic!("{c:02x?} decoded to {other:?}"),
            }
        }
        assert_eq!(Handle::from_bytes(&good).unwrap(), hs[2]);
    });
}

#[test]
fn root_names_and_table_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (shard, hs) = populated(&cfg).await;
        let before = snapshot(&shard);
        for name in [String::new(), "x".repeat(65), "é".repeat(33)] {
            match shard.set_root(&name, hs[1]) {
                Err(Error::Root(_)) => {}
                other => panic!("set_root({} bytes): {other:?}", name.len()),
            }
            assert_eq!(shard.root(&name), None);
            assert_unchanged(&shard, &before).await;
        }
        // 64 bytes is fine; removing an unknown root is a no-op.
        shard.set_root(&"y".repeat(64), hs[1]).unwrap();
        assert_eq!(shard.remove_root("nope").unwrap(), None);
        assert_eq!(shard.remove_root(&"y".repeat(64)).unwrap(), Some(hs[1]));
        assert_unchanged(&shard, &before).await;

        // Fill the table: names beyond its capacity get a Root error, and
        // every name in it can still be replaced.
        let mut named = vec!["main".to_string()];
        let mut refused = 0;
        for i in 0..segalloc::format::ROOT_SLOTS + 10 {
            let n = format!("n{i}");
            match shard.set_root(&n, hs[i % hs.len()]) {
                Ok(_) => named.push(n),
                Err(Error::Root(_)) => refused += 1,
                Err(e) => panic!("set_root {n}: {e}"),
            }
        }
        assert!(refused > 0, "the table has a limit");
        assert_eq!(
            named.len(),
            segalloc::format::ROOT_SLOTS / 2,
            "names that fit"
        );
        let full = shard.roots();
        for (i, n) in named.iter().enumerate() {
            shard
                .set_root(n, hs[(i + 1) % hs.len()])
                .unwrap_or_else(|e| panic!("replacing root {n} in a full table: {e}"));
        }
        assert_eq!(shard.roots().len(), full.len());
        // All of them survive a reopen with their latest values.
        let expect = shard.roots();
        drop(shard);
        let shard = open_shard(&cfg).await.unwrap();
        assert_eq!(shard.roots(), expect);
    });
}

#[test]
fn second_open_in_the_same_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (shard, _) = populated(&cfg).await;
        let before = snapshot(&shard);
        match DataDir::open(&cfg) {
            Err(Error::AlreadyOpen { path }) => assert_eq!(path, dir.path()),
            other => panic!("second open: {other:?}"),
        }
        // The read-only inspector may look, and says the lock is taken.
        let (ro, locked_elsewhere) = DataDir::open_read_only(dir.path()).unwrap();
        assert!(locked_elsewhere && ro.is_read_only());
        drop(ro);
        assert_unchanged(&shard, &before).await;
        // Closing releases the lock.
        drop(shard);
        let shard = open_shard(&cfg).await.unwrap();
        assert_unchanged(&shard, &before).await;
    });
}

const CHILD_ENV: &str = "SEGALLOC_ERRORS_CHILD_DIR";

/// Child half of [`second_open_from_another_process_is_refused`].
#[test]
fn child_open_other_process() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let cfg = small_cfg(std::path::Path::new(&path));
    // A lock copy inherited by a child that another test thread is forking
    // lingers until that child's exec: retry for a moment before answering.
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(300);
    let mut got = DataDir::open(&cfg);
    while matches!(got, Err(Error::AlreadyOpen { .. })) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        got = DataDir::open(&cfg);
    }
    match got {
        Err(Error::AlreadyOpen { .. }) => println!("child: AlreadyOpen"),
        Ok(_) => println!("child: opened"),
        Err(e) => println!("child: error {e}"),
    }
}

fn open_in_child(path: &std::path::Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_open_other_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("child: ").map(|(_, answer)| answer))
        .unwrap_or_else(|| panic!("no answer from the child: {stdout}"))
        .to_string()
}

#[test]
fn second_open_from_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let (shard, _) = populated(&cfg).await;
        let before = snapshot(&shard);
        assert_eq!(open_in_child(dir.path()), "AlreadyOpen");
        assert_unchanged(&shard, &before).await;
        drop(shard);
        // Once closed, another process may open it.
        assert_eq!(open_in_child(dir.path()), "opened");
        let shard = open_shard(&cfg).await.unwrap();
        assert_unchanged(&shard, &before).await;
    });
}

#[test]
fn read_only_shard_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let hs = run(async {
        let (shard, hs) = populated(&cfg).await;
        shard.sync().await.unwrap();
        hs
    });
    run(async {
        let (dd, locked_elsewhere) = DataDir::open_read_only(dir.path()).unwrap();
        assert!(!locked_elsewhere);
        let ro_cfg = segalloc::Config::builder(dir.path())
            .shards(1)
            .window_bytes(16 * MIB)
            .growth_step_bytes(MIB)
            .read_only(true)
            .build()
            .unwrap();
        let shard = Shard::open(Arc::new(dd), &ro_cfg, 0).await.unwrap();
        let before = snapshot(&shard);
        assert_eq!(before.live.len(), hs.len());
        assert!(matches!(shard.allocate(10).await, Err(Error::ReadOnly(_))));
        assert!(matches!(shard.free(hs[0]), Err(Error::ReadOnly(_))));
        assert!(matches!(
            shard.set_root("r", hs[0]),
            Err(Error::ReadOnly(_))
        ));
        assert!(matches!(shard.remove_root("main"), Err(Error::ReadOnly(_))));
        for h in &hs {
            let pin = shard.pin(*h).await.unwrap();
            assert!(!pin.is_writable());
            assert!(check_pattern(&pin, pin.len(), handle_seed(h, 0)));
        }
        assert_eq!(snapshot(&shard), before);
    });
}

/// A handle of a segment released before a restart stays stale after it:
/// the segment generation is persisted, so the entry and run reused by a new
/// segment carry a generation the old handle does not have.
#[test]
fn released_segment_generation_is_not_reissued_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    let size = 4096u64;
    let (stale, count) = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Three segments' worth of one class, then free everything: the
        // first segment to empty is kept, the others are released.
        let mut hs = Vec::new();
        while hs
            .iter()
            .map(|h: &Handle| h.segment_id())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            < 3
        {
            hs.push(shard.allocate(size).await.unwrap().into_handle());
        }
        let count = hs.len();
        let second = hs
            .iter()
            .copied()
            .find(|h| h.segment_id() != hs[0].segment_id())
            .unwrap();
        for h in &hs {
            shard.free(*h).unwrap();
        }
        shard.sync().await.unwrap();
        (second, count)
    });
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Free entries are reusable after the first sync of this session.
        shard.sync().await.unwrap();
        let mut fresh = Vec::new();
        for _ in 0..count {
            fresh.push(shard.allocate(size).await.unwrap().into_handle());
        }
        // The released segment's entry was reused…
        assert!(fresh.iter().any(|h| h.segment_id() == stale.segment_id()));
        // …under a new generation: the stale handle names nothing.
        assert!(
            fresh
                .iter()
                .all(|h| h.generation() != stale.generation()
                    || h.segment_id() != stale.segment_id())
        );
        let before = snapshot(&shard);
        assert!(matches!(shard.free(stale), Err(Error::NotAllocated { .. })));
        assert_eq!(snapshot(&shard), before);
    });
}

/// `SegmentAllocator::open` with a manager whose windows are not the
/// directory's: the metadata is laid out in the directory's windows, so the
/// open is refused (otherwise the metadata would be mapped in the manager's
/// windows and indexed by the directory's).
#[test]
fn allocator_refuses_a_manager_with_other_windows() {
    use segalloc::{FileHandleRegistry, MappingConfig, MappingManager, Ring, SegmentAllocator};
    use std::rc::Rc;
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path().join("d"))
        .shards(1)
        .window_bytes(32 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let dd = DataDir::open(&cfg).unwrap();
    run(async {
        for window in [16 * MIB, 64 * MIB] {
            let other = Config::builder(dir.path().join("d"))
                .shards(1)
                .window_bytes(window)
                .growth_step_bytes(MIB)
                .build()
                .unwrap();
            let files = Rc::new(FileHandleRegistry::new(
                Ring::new(other.io_backend()).unwrap(),
                64,
            ));
            let mm = Rc::new(MappingManager::new(
                files,
                MappingConfig::from_config(&other),
            ));
            match SegmentAllocator::open(0, &dd.shard_dir(0), *dd.manifest(), mm).await {
                Err(Error::InvalidConfig(m)) => assert!(m.contains("window"), "{m}"),
                Ok(a) => {
                    let r = a.allocate(100).await.map(|x| x.handle());
                    panic!("a {window}-byte manager was accepted: allocate gave {r:?}");
                }
                Err(e) => panic!("a {window}-byte manager: {e}"),
            }
        }
    });
}
