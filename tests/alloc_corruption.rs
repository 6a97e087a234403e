//! Torn tails and corruption of the on-disk state.
//!
//! Reopening a damaged data directory must never panic (nor die of SIGBUS):
//! it either succeeds with a consistent state (no overlapping live slots,
//! every live handle pins) or returns a typed error: `Error::Corrupt` for
//! damage, `Error::Mismatch` for a directory opened with other settings.
//!
//! `SEGALLOC_CORRUPTION_CASES` overrides the number of random byte flips.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{
    check_pattern, check_reopened, handle_seed, open_shard, run, small_cfg, write_pattern,
};
use proptest::prelude::*;
use segalloc::config::MIB;
use segalloc::format::{self as meta, EntryHeader};
use segalloc::{Config, DataDir, Error, Handle, Shard};

/// What the fixture directory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    live: BTreeSet<Handle>,
    roots: Vec<(String, Handle)>,
}

/// A directory with allocations of many classes (some freed), roots, synced
/// and closed.
fn build_fixture(cfg: &Config) -> State {
    run(async {
        let shard = open_shard(cfg).await.unwrap();
        let mut hs = Vec::new();
        for i in 0..600u64 {
            let size = match i % 6 {
                0 => 16,
                1 => 100 + i,
                2 => 1000 + 3 * i,
                3 => 5000 + 17 * i,
                4 => 40_000,
                _ => 1 + i * 7,
            };
            let a = shard.allocate(size).await.unwrap();
            let h = a.handle();
            write_pattern(a.pin(), a.len().min(512), handle_seed(&h, 0));
            hs.push(h);
        }
        for h in hs.iter().step_by(3) {
            shard.free(*h).unwrap();
        }
        for (i, h) in hs.iter().skip(1).step_by(96).enumerate() {
            shard.set_root(&format!("root-{i}"), *h).unwrap();
        }
        // A replaced root: two generations of the same name.
        shard.set_root("root-0", hs[4]).unwrap();
        shard.sync().await.unwrap();
        State {
            live: shard.live().collect(),
            roots: shard.roots(),
        }
    })
}

/// How a reopen went.
#[derive(Debug)]
enum Outcome {
    Ok(State),
    Corrupt(#[allow(dead_code)] String),
    Mismatch(#[allow(dead_code)] String),
}

/// Reopen shard `index` of `cfg` and check consistency on success.
fn reopen(cfg: &Config, index: u16) -> Outcome {
    run(async {
        let opened = async {
            let dd = Arc::new(DataDir::open(cfg)?);
            Shard::open(dd, cfg, index).await
        };
        match opened.await {
            Ok(shard) => {
                let (live, roots) = check_reopened(&shard).await;
                Outcome::Ok(State { live, roots })
            }
            Err(e @ Error::Corrupt { .. }) => Outcome::Corrupt(e.to_string()),
            Err(e @ Error::Mismatch { .. }) => Outcome::Mismatch(e.to_string()),
            Err(e) => panic!("reopen failed with an untyped or unexpected error: {e:?}"),
        }
    })
}

fn meta_path(dir: &Path) -> PathBuf {
    dir.join("shard-000").join("meta.seg")
}

/// End of the part of `meta.seg` recovery reads (past the last directory
/// entry below the high-water mark).
fn meta_used_end(meta_bytes: &[u8]) -> usize {
    let w = u64::from_le_bytes(meta_bytes[512..520].try_into().unwrap());
    let hwm = meta::decode_counter(w).unwrap();
    assert!(hwm > 0);
    (meta::entry_offset(hwm - 1) + meta::ENTRY_BYTES) as usize
}

/// Contents of the fixture's data intact (for outcomes that keep a handle).
fn assert_contents(cfg: &Config, handles: &BTreeSet<Handle>) {
    run(async {
        let shard = open_shard(cfg).await.unwrap();
        for h in handles {
            let pin = shard.pin(*h).await.unwrap();
            assert!(
                check_pattern(&pin, pin.len().min(512), handle_seed(h, 0)),
                "contents of {h}"
            );
        }
    });
}

#[test]
fn fixture_reopens_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    match reopen(&cfg, 0) {
        Outcome::Ok(got) => assert_eq!(got, want),
        other => panic!("{other:?}"),
    }
    assert_contents(&cfg, &want.live);
}

/// `meta.seg` cut short at every 512 bytes of the part recovery reads, and
/// at every byte around the superblock, the high-water mark and the first
/// and last directory entries. A cut that removes nothing recovery needs
/// keeps the whole state; any other is `Corrupt` (never a silent loss).
#[test]
fn truncated_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    let path = meta_path(tmp.path());
    let original = std::fs::read(&path).unwrap();
    let end = meta_used_end(&original);
    let dir_off = meta::DIR_OFFSET as usize;
    let mut cuts: BTreeSet<usize> = (0..=end + 512).step_by(512).collect();
    cuts.extend(0..64);
    cuts.extend(504..528);
    cuts.extend(dir_off - 8..dir_off + 640);
    cuts.extend(end - 600..end + 8);
    let (mut ok, mut corrupt) = (0, 0);
    let read_only = Config::builder(cfg.dir())
        .shards(1)
        .window_bytes(cfg.window_bytes())
        .growth_step_bytes(cfg.growth_step_bytes())
        .read_only(true)
        .build()
        .unwrap();
    for &cut in &cuts {
        std::fs::write(&path, &original[..cut.min(original.len())]).unwrap();
        // Read-only first (it changes nothing): the same answer, said the
        // same way (a file too short to pin was a pin error).
        match reopen(&read_only, 0) {
            Outcome::Ok(got) => assert_eq!(got.live, want.live, "read-only, cut at {cut}"),
            Outcome::Corrupt(_) => assert!(cut < end, "read-only, cut at {cut}"),
            other => panic!("read-only, cut at {cut}: {other:?}"),
        }
        match reopen(&cfg, 0) {
            Outcome::Ok(got) => {
                assert!(cut >= end, "cut at {cut} (< {end}) recovered a state");
                assert_eq!(got, want, "cut at {cut}");
                ok += 1;
            }
            Outcome::Corrupt(_) => {
                assert!(cut < end, "cut at {cut} (>= {end}) removed nothing needed");
                corrupt += 1;
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
    eprintln!(
        "truncated_metadata: {} cuts, {ok} recovered, {corrupt} corrupt",
        cuts.len()
    );
    std::fs::write(&path, &original).unwrap();
    match reopen(&cfg, 0) {
        Outcome::Ok(got) => assert_eq!(got, want),
        other => panic!("{other:?}"),
    }
    assert_contents(&cfg, &want.live);
}

/// Random byte damage anywhere in the part of `meta.seg` recovery reads
/// (biased to the superblock, the high-water mark, the root slots in use
/// and the directory).
#[test]
fn flipped_metadata_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    let path = meta_path(tmp.path());
    let original = std::fs::read(&path).unwrap();
    let end = meta_used_end(&original);
    let dir_off = meta::DIR_OFFSET as usize;
    let roots_end = (meta::ROOTS_OFFSET + 16 * meta::ROOT_SLOT_BYTES) as usize;
    let cases = std::env::var("SEGALLOC_CORRUPTION_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let counts = [
        std::cell::Cell::new(0u64),
        std::cell::Cell::new(0),
        std::cell::Cell::new(0),
    ];
    let bump = |i: usize| counts[i].set(counts[i].get() + 1);
    let offset = prop_oneof![
        1 => 0usize..64,
        1 => 512usize..520,
        2 => meta::ROOTS_OFFSET as usize..roots_end,
        8 => dir_off..end,
        1 => 0usize..end,
    ];
    // Up to three damaged bytes per case.
    let damage = proptest::collection::vec((offset, 1u8..=255), 1..=3);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&damage, |damage| {
            let mut bytes = original.clone();
            for &(at, x) in &damage {
                bytes[at] ^= x;
            }
            std::fs::write(&path, &bytes).unwrap();
            let outcome = reopen(&cfg, 0);
            match &outcome {
                Outcome::Ok(got) => {
                    bump(0);
                    // Damage can only be accepted where nothing checks it:
                    // a bitmap (a slot's liveness) or the root table (a root
                    // whose slot no longer decodes is dropped).
                    let in_bitmap = damage.iter().any(|&(at, _)| {
                        at >= dir_off && {
                            let in_page = (at - dir_off) % meta::META_PAGE_BYTES as usize;
                            in_page < (meta::ENTRIES_PER_PAGE * meta::ENTRY_BYTES) as usize
                                && in_page % meta::ENTRY_BYTES as usize
                                    >= meta::ENTRY_HEADER_BYTES as usize
                        }
                    });
                    let in_roots = damage
                        .iter()
                        .any(|&(at, _)| (meta::ROOTS_OFFSET as usize..dir_off).contains(&at));
                    prop_assert!(
                        in_bitmap || got.live == want.live,
                        "damage {damage:?} changed the live set"
                    );
                    prop_assert!(
                        in_roots || got.roots == want.roots,
                        "damage {damage:?} changed the roots"
                    );
                    // A root is never changed into another one, only dropped.
                    prop_assert!(
                        got.roots.iter().all(|r| want.roots.contains(r)),
                        "damage {damage:?}"
                    );
                }
                Outcome::Corrupt(_) => bump(1),
                Outcome::Mismatch(_) => bump(2),
            }
            Ok(())
        })
        .unwrap();
    eprintln!(
        "flipped_metadata_bytes: {cases} cases: {} recovered, {} corrupt, {} mismatch",
        counts[0].get(),
        counts[1].get(),
        counts[2].get()
    );
    std::fs::write(&path, &original).unwrap();
    assert_contents(&cfg, &want.live);
}

/// Write `h` (64 bytes) as the header of directory entry `i`, its checksum
/// recomputed, so only the checks behind the checksum can reject it.
fn put_header(bytes: &mut [u8], i: u32, h: &EntryHeader) {
    let off = meta::entry_offset(i) as usize;
    bytes[off..off + 8].copy_from_slice(&h.state_word().to_le_bytes());
    bytes[off + 8..off + 28].copy_from_slice(&h.body());
}

fn get_header(bytes: &[u8], i: u32) -> Option<EntryHeader> {
    let off = meta::entry_offset(i) as usize;
    EntryHeader::decode(&bytes[off..off + 64]).unwrap()
}

/// Headers with valid checksums but impossible contents.
#[test]
fn forged_directory_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    let path = meta_path(tmp.path());
    let original = std::fs::read(&path).unwrap();
    let end = meta_used_end(&original);
    let hwm = ((end as u64 - meta::DIR_OFFSET) / meta::META_PAGE_BYTES * meta::ENTRIES_PER_PAGE
        + ((end as u64 - meta::DIR_OFFSET) % meta::META_PAGE_BYTES) / meta::ENTRY_BYTES)
        as u32;
    let (i, e) = (0..hwm)
        .find_map(|i| get_header(&original, i).map(|e| (i, e)))
        .expect("a published entry");
    let (mi, me) = (0..hwm)
        .find_map(|i| {
            get_header(&original, i)
                .filter(|e| e.blocks > 1)
                .map(|e| (i, e))
        })
        .expect("a multi-block segment");
    let (si, se) = (0..hwm)
        .find_map(|i| {
            get_header(&original, i)
                .filter(|e| e.slots < 4096)
                .map(|e| (i, e))
        })
        .expect("a segment with fewer than 4096 slots");
    let window_blocks = (16 * MIB / segalloc::format::classes::BLOCK_BYTES) as u32;
    let file_blocks = (cfg.max_file_bytes() / segalloc::format::classes::BLOCK_BYTES) as u32;

    type Forge = Box<dyn Fn(&mut Vec<u8>)>;
    let forged: Vec<(&str, Forge)> = vec![
        (
            "data file number u32::MAX",
            Box::new(move |b| {
                put_header(
                    b,
                    i,
                    &EntryHeader {
                        file: u32::MAX,
                        ..e
                    },
                )
            }),
        ),
        (
            "data file that does not exist",
            Box::new(move |b| put_header(b, i, &EntryHeader { file: 1000, ..e })),
        ),
        (
            "block past the largest file",
            Box::new(move |b| {
                put_header(
                    b,
                    i,
                    &EntryHeader {
                        block: file_blocks,
                        ..e
                    },
                )
            }),
        ),
        (
            "block u32::MAX",
            Box::new(move |b| {
                put_header(
                    b,
                    i,
                    &EntryHeader {
                        block: u32::MAX,
                        ..e
                    },
                )
            }),
        ),
        (
            "segment crossing a window",
            Box::new(move |b| {
                put_header(
                    b,
                    mi,
                    &EntryHeader {
                        block: window_blocks - 1,
                        ..me
                    },
                )
            }),
        ),
        (
            "unknown class",
            Box::new(move |b| put_header(b, i, &EntryHeader { class_id: 250, ..e })),
        ),
        (
            "slots disagree with the class",
            Box::new(move |b| {
                put_header(
                    b,
                    i,
                    &EntryHeader {
                        slots: e.slots + 1,
                        ..e
                    },
                )
            }),
        ),
        (
            "bitmap bit past the last slot",
            Box::new(move |b| {
                let off = meta::entry_offset(si) as usize + 64 + se.slots as usize / 8;
                b[off] |= 1 << (se.slots % 8);
            }),
        ),
        (
            "high-water mark far past the file",
            Box::new(|b| b[512..520].copy_from_slice(&meta::encode_counter(1 << 30).to_le_bytes())),
        ),
        ("high-water mark torn", Box::new(|b| b[516] ^= 1)),
        // All zero reads as a fresh file's mark: with entries published
        // past it, the mark was lost (recovery would open the shard empty
        // and hand every slot out again).
        ("high-water mark zeroed", Box::new(|b| b[512..520].fill(0))),
        ("counter sector zeroed", Box::new(|b| b[512..1024].fill(0))),
        // And every entry's state word too (as released entries read): the
        // shard's data files still say it was used.
        (
            "high-water mark and state words zeroed",
            Box::new(move |b| {
                for e in 0..hwm {
                    let off = meta::entry_offset(e) as usize;
                    b[off..off + 8].fill(0);
                }
                b[512..520].fill(0);
            }),
        ),
    ];
    for (what, forge) in &forged {
        let mut bytes = original.clone();
        forge(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        match reopen(&cfg, 0) {
            Outcome::Corrupt(msg) => eprintln!("{what}: {msg}"),
            other => panic!("{what}: {other:?}"),
        }
    }

    // A copy of a live segment's header in a new entry past the old
    // high-water mark (its bitmap empty), with the same generation and with
    // a higher one: two segments claim one run. Recovery keeps one of them
    // (the higher generation when they differ); nothing overlaps, nothing
    // comes from nowhere.
    for generation in [e.generation, e.generation + 1000] {
        let mut bytes = original.clone();
        put_header(&mut bytes, hwm, &EntryHeader { generation, ..e });
        bytes[512..520].copy_from_slice(&meta::encode_counter(hwm + 1).to_le_bytes());
        std::fs::write(&path, &bytes).unwrap();
        match reopen(&cfg, 0) {
            Outcome::Ok(got) => {
                assert!(got.live.is_subset(&want.live), "generation {generation}");
                if generation > e.generation {
                    assert!(
                        got.live.iter().all(|h| h.segment_id() != i),
                        "the older segment lost"
                    );
                }
            }
            other => panic!("duplicate segment, generation {generation}: {other:?}"),
        }
    }
    std::fs::write(&path, &original).unwrap();
    match reopen(&cfg, 0) {
        Outcome::Ok(got) => assert_eq!(got, want),
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_or_blank_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    let shard_dir = tmp.path().join("shard-000");
    let meta = std::fs::read(shard_dir.join("meta.seg")).unwrap();
    // A missing data file that segments live in.
    let data0 = shard_dir.join("data-000000.seg");
    let saved = std::fs::read(&data0).unwrap();
    std::fs::remove_file(&data0).unwrap();
    assert!(matches!(reopen(&cfg, 0), Outcome::Corrupt(_)));
    std::fs::write(&data0, &saved).unwrap();
    // meta.seg missing, empty, or with a blank superblock, while data files
    // exist: damage, not a fresh shard (that would lose every allocation).
    std::fs::remove_file(shard_dir.join("meta.seg")).unwrap();
    assert!(matches!(reopen(&cfg, 0), Outcome::Corrupt(_)));
    std::fs::write(shard_dir.join("meta.seg"), b"").unwrap();
    assert!(matches!(reopen(&cfg, 0), Outcome::Corrupt(_)));
    let mut blank = meta.clone();
    blank[..meta::MANIFEST_BYTES].fill(0);
    std::fs::write(shard_dir.join("meta.seg"), &blank).unwrap();
    assert!(matches!(reopen(&cfg, 0), Outcome::Corrupt(_)));
    std::fs::write(shard_dir.join("meta.seg"), &meta).unwrap();
    match reopen(&cfg, 0) {
        Outcome::Ok(got) => assert_eq!(got, want),
        other => panic!("{other:?}"),
    }
}

#[test]
fn damaged_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    let path = tmp.path().join("MANIFEST");
    let original = std::fs::read(&path).unwrap();
    assert_eq!(original.len(), meta::MANIFEST_BYTES);
    let expect_corrupt = |what: String| match reopen(&cfg, 0) {
        Outcome::Corrupt(_) => {}
        other => panic!("{what}: {other:?}"),
    };
    for i in 0..original.len() {
        for x in [0x01u8, 0x80, 0xff] {
            let mut b = original.clone();
            b[i] ^= x;
            std::fs::write(&path, &b).unwrap();
            expect_corrupt(format!("byte {i} ^ {x:#x}"));
        }
    }
    for len in 0..original.len() {
        std::fs::write(&path, &original[..len]).unwrap();
        expect_corrupt(format!("truncated to {len}"));
    }
    std::fs::write(&path, [&original[..], b"x"].concat()).unwrap();
    expect_corrupt("one byte too long".into());
    std::fs::remove_file(&path).unwrap();
    expect_corrupt("missing".into());
    std::fs::write(&path, &original).unwrap();
    match reopen(&cfg, 0) {
        Outcome::Ok(got) => assert_eq!(got, want),
        other => panic!("{other:?}"),
    }
}

#[test]
fn reopen_with_other_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let want = build_fixture(&cfg);
    let with = |f: fn(segalloc::ConfigBuilder) -> segalloc::ConfigBuilder| {
        f(Config::builder(tmp.path())
            .shards(1)
            .window_bytes(16 * MIB)
            .growth_step_bytes(MIB))
        .build()
        .unwrap()
    };
    let cases: Vec<(&str, Config, u64, u64)> = vec![
        ("shards", with(|b| b.shards(2)), 1, 2),
        (
            "window_bytes",
            with(|b| b.window_bytes(32 * MIB)),
            16 * MIB,
            32 * MIB,
        ),
        (
            "max_file_bytes",
            with(|b| b.max_file_bytes(32 * MIB)),
            cfg.max_file_bytes(),
            32 * MIB,
        ),
    ];
    for (what, other, on_disk, requested) in cases {
        match DataDir::open(&other) {
            Err(Error::Mismatch {
                what: w,
                on_disk: d,
                requested: r,
            }) => assert_eq!((w, d, r), (what, on_disk, requested)),
            other => panic!("{what}: {other:?}"),
        }
    }
    match reopen(&cfg, 0) {
        Outcome::Ok(got) => assert_eq!(got, want),
        other => panic!("{other:?}"),
    }
}

/// A shard's metadata in the wrong place: another shard's folder of the same
/// directory (Mismatch), or another directory (Corrupt).
#[test]
fn metadata_of_another_shard_or_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let two = |d: &Path| {
        Config::builder(d)
            .shards(2)
            .window_bytes(16 * MIB)
            .growth_step_bytes(MIB)
            .build()
            .unwrap()
    };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for d in [&a, &b] {
        let cfg = two(d);
        run(async {
            let dd = Arc::new(DataDir::open(&cfg).unwrap());
            for i in 0..2 {
                let shard = Shard::open(dd.clone(), &cfg, i).await.unwrap();
                shard.allocate(100).await.unwrap();
                shard.sync().await.unwrap();
            }
        });
    }
    let meta = |d: &Path, i: u16| d.join(format!("shard-{i:03}")).join("meta.seg");
    let m0 = std::fs::read(meta(&a, 0)).unwrap();
    let m1 = std::fs::read(meta(&a, 1)).unwrap();
    std::fs::write(meta(&a, 0), &m1).unwrap();
    std::fs::write(meta(&a, 1), &m0).unwrap();
    assert!(matches!(reopen(&two(&a), 0), Outcome::Mismatch(_)));
    assert!(matches!(reopen(&two(&a), 1), Outcome::Mismatch(_)));
    std::fs::write(meta(&a, 0), &m0).unwrap();
    std::fs::write(meta(&a, 1), &m1).unwrap();
    std::fs::copy(meta(&b, 0), meta(&a, 0)).unwrap();
    assert!(matches!(reopen(&two(&a), 0), Outcome::Corrupt(_)));
    std::fs::write(meta(&a, 0), &m0).unwrap();
    assert!(matches!(reopen(&two(&a), 0), Outcome::Ok(_)));
    assert!(matches!(reopen(&two(&a), 1), Outcome::Ok(_)));
}

/// A power loss during a shard's creation may keep the superblock's sector
/// and lose the mark's (only sector writes are atomic): an all-zero mark,
/// which opens as a new shard. The first writable open after it writes the
/// mark and makes it durable before any data file exists, so a later power
/// loss (here: right after the first allocation, before any sync) leaves a
/// shard that opens, not one refused for a lost mark.
#[test]
fn a_creation_cut_after_its_superblock_opens_after_a_later_power_loss() {
    for keep_entry_page in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg(tmp.path());
        let path = meta_path(tmp.path());
        run(async { drop(common::open_shard(&cfg).await.unwrap()) });
        let mut b = std::fs::read(&path).unwrap();
        b[512..1024].fill(0);
        std::fs::write(&path, &b).unwrap();
        let durable = run(async {
            let s = common::open_shard(&cfg)
                .await
                .expect("reopen after a torn creation");
            // What this open made durable (it synced the metadata).
            let durable = std::fs::read(&path).unwrap();
            drop(s.allocate(100).await.unwrap());
            durable
        });
        assert!(tmp.path().join("shard-000/data-000000.seg").exists());
        // The power loss: the metadata as synced, and perhaps the page of
        // the first entry, written back before it (not the mark's page).
        let mut cut = durable.clone();
        if keep_entry_page {
            let now = std::fs::read(&path).unwrap();
            let p = meta::entry_offset(0) as usize;
            cut[p..p + 4096].copy_from_slice(&now[p..p + 4096]);
        }
        std::fs::write(&path, &cut).unwrap();
        match reopen(&cfg, 0) {
            Outcome::Ok(got) => assert!(got.live.is_empty(), "{keep_entry_page}"),
            other => panic!("keep_entry_page {keep_entry_page}: {other:?}"),
        }
    }
}
