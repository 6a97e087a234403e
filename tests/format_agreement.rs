//! Recovery and the inspector read a shard's metadata with one scan, so they
//! agree: over a corpus of damaged and crafted directories, what the library
//! keeps on reopen (live allocations, roots) is what `segalloc live` and
//! `inspect::read_dir` report, and a shard the library refuses is one the
//! inspector reports errors for. Also the rules decided in that scan: the
//! root tie-breaks, dangling roots, saturating totals, and the clearing of a
//! segment that loses an overlap.
//!
//! The metadata is patched through the documented layout (constants below),
//! not through the crate's format module.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use segalloc::config::MIB;
use segalloc::{Config, DataDir, Error, Handle, Shard};

const BIN: &str = env!("CARGO_BIN_EXE_segalloc");

// The documented layout of `meta.seg`.
const HWM_OFFSET: usize = 512;
const ROOTS_OFFSET: usize = 4096;
const ROOT_SLOT_BYTES: usize = 128;
const ROOT_SLOTS: usize = 2048;
const DIR_OFFSET: usize = 266_240;
const ENTRY_BYTES: usize = 576;

fn entry_offset(i: u32) -> usize {
    DIR_OFFSET + (i as usize / 7) * 4096 + (i as usize % 7) * ENTRY_BYTES
}

fn root_offset(i: usize) -> usize {
    ROOTS_OFFSET + i * ROOT_SLOT_BYTES
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn hwm_of(meta: &[u8]) -> u32 {
    let w = u64_at(meta, HWM_OFFSET);
    assert_eq!((w >> 32) as u32, !(w as u32), "mark word");
    w as u32
}

fn set_hwm(meta: &mut [u8], hwm: u32) {
    let w = hwm as u64 | ((!hwm as u64) << 32);
    meta[HWM_OFFSET..HWM_OFFSET + 8].copy_from_slice(&w.to_le_bytes());
}

/// A published entry: (index, raw 64-byte header).
fn published(meta: &[u8]) -> Vec<(u32, [u8; 64])> {
    (0..hwm_of(meta))
        .filter_map(|i| {
            let o = entry_offset(i);
            let h: [u8; 64] = meta[o..o + 64].try_into().unwrap();
            (u64_at(&h, 0) != 0).then_some((i, h))
        })
        .collect()
}

/// `h` with another generation (checksum redone).
fn with_generation(h: &[u8; 64], generation: u32) -> [u8; 64] {
    let mut b = *h;
    b[4..8].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

/// `h` naming another data file (checksum redone).
fn with_file(h: &[u8; 64], file: u32) -> [u8; 64] {
    let mut b = *h;
    b[8..12].copy_from_slice(&file.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

fn generation_of(h: &[u8; 64]) -> u32 {
    u32_at(h, 4)
}

/// A root slot record.
fn root_record(seq: u64, name: &str, h: &Handle) -> [u8; ROOT_SLOT_BYTES] {
    let mut b = [0u8; ROOT_SLOT_BYTES];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8] = name.len() as u8;
    b[12..12 + name.len()].copy_from_slice(name.as_bytes());
    b[76..116].copy_from_slice(&h.to_bytes());
    let crc = crc32c::crc32c(&b[..120]);
    b[120..124].copy_from_slice(&crc.to_le_bytes());
    b
}

/// The valid root slots in use: (slot, seq, name, handle bytes).
fn root_slots(meta: &[u8]) -> Vec<(usize, u64, String, Handle)> {
    (0..ROOT_SLOTS)
        .filter_map(|i| {
            let b = &meta[root_offset(i)..root_offset(i) + ROOT_SLOT_BYTES];
            let seq = u64_at(b, 0);
            if seq == 0 || u32_at(b, 120) != crc32c::crc32c(&b[..120]) {
                return None;
            }
            let name = std::str::from_utf8(&b[12..12 + b[8] as usize]).ok()?;
            let h = Handle::from_bytes(&b[76..116]).ok()?;
            Some((i, seq, name.to_string(), h))
        })
        .collect()
}

fn cfg(dir: &Path) -> Config {
    Config::builder(dir)
        .shards(2)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .expect("config")
}

fn meta_path(dir: &Path, shard: u16) -> PathBuf {
    dir.join(format!("shard-{shard:03}")).join("meta.seg")
}

/// Allocations of several classes on both shards, some freed, roots (one
/// replaced), synced and closed.
fn build(dir: &Path) {
    let c = cfg(dir);
    common::run(async {
        let dd = Arc::new(DataDir::open(&c).expect("open"));
        for index in 0..2u16 {
            let s = Shard::open(dd.clone(), &c, index).await.expect("shard");
            let mut hs = Vec::new();
            for i in 0..900u64 {
                let size = [16, 100 + i, 1000 + 3 * i, 40_000][i as usize % 4];
                hs.push(s.allocate(size).await.expect("allocate").into_handle());
            }
            for h in hs.iter().step_by(3) {
                s.free(*h).expect("free");
            }
            for (k, h) in hs.iter().skip(1).step_by(150).enumerate() {
                s.set_root(&format!("root-{k}"), *h).expect("root");
            }
            s.set_root("root-0", hs[4]).expect("root");
            s.sync().await.expect("sync");
        }
    });
}

fn copy_of(src: &Path, parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    common::copy_tree(src, &d);
    d
}

fn tool(args: &[&str], dir: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(&args[..1]).arg(dir).args(&args[1..]);
    c.output().expect("run segalloc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8")
}

/// What a shard holds: live handles and roots (name → handle).
#[derive(Debug, PartialEq, Eq)]
struct Kept {
    live: BTreeSet<Handle>,
    roots: BTreeMap<String, Handle>,
}

/// What `segalloc live --shard N` lists, and which roots it marks dangling.
fn tool_live(dir: &Path, shard: u16) -> (Kept, BTreeSet<String>) {
    let o = tool(&["live", "--shard", &shard.to_string()], dir);
    assert_eq!(
        o.status.code(),
        Some(0),
        "live: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut kept = Kept {
        live: BTreeSet::new(),
        roots: BTreeMap::new(),
    };
    let mut dangling = BTreeSet::new();
    for line in stdout(&o).lines() {
        if let Some(rest) = line.strip_prefix(&format!("root shard={shard} ")) {
            let (name, tail) = rest.rsplit_once(" -> ").expect("root line");
            let name: String = serde_json::from_str(name).expect("quoted name");
            let hex = tail.split(' ').next().unwrap();
            if tail.ends_with("(dangling)") {
                dangling.insert(name.clone());
            }
            kept.roots.insert(name, common::handle_from_hex(hex));
        } else {
            let hex = line.split(' ').next().unwrap();
            kept.live.insert(common::handle_from_hex(hex));
        }
    }
    (kept, dangling)
}

/// The library's view after reopening shard `index` (writable: it repairs
/// what it resolves, so read the inspector's view first).
fn library(dir: &Path, index: u16) -> Result<Kept, Error> {
    let c = cfg(dir);
    common::run(async {
        let dd = Arc::new(DataDir::open(&c)?);
        let s = Shard::open(dd, &c, index).await?;
        Ok(Kept {
            live: s.live().collect(),
            roots: s.roots().into_iter().collect(),
        })
    })
}

/// Check one directory: the inspector, the tool and the library agree on
/// every shard. Returns how many shards the library refused.
fn agree(dir: &Path, what: &str) -> usize {
    let report = segalloc::inspect::read_dir(dir).expect("read_dir");
    let mut refused = 0;
    for s in &report.shards {
        let inspected = Kept {
            live: s.live().collect(),
            roots: s.roots.iter().map(|r| (r.name.clone(), r.handle)).collect(),
        };
        let (listed, _) = tool_live(dir, s.index);
        assert_eq!(
            listed, inspected,
            "{what}: shard {}: tool vs inspector",
            s.index
        );
        match library(dir, s.index) {
            Ok(kept) => assert_eq!(kept, inspected, "{what}: shard {}", s.index),
            Err(e) => {
                refused += 1;
                assert!(
                    report.errors().any(|p| p.shard == Some(s.index)),
                    "{what}: the library refuses shard {} ({e}) but the inspector finds no error",
                    s.index
                );
            }
        }
    }
    refused
}

type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

/// Cut shard 1's first data file to 4 KiB.
fn cut_data_file(d: &Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("shard-001/data-000000.seg"))
        .unwrap()
        .set_len(4096)
        .unwrap();
}

/// Crafted and damaged variants of shard 0's `meta.seg`.
fn corpus(meta: &[u8]) -> Vec<(&'static str, Mutation)> {
    let hwm = hwm_of(meta);
    let entries = published(meta);
    let (i0, h0) = entries[0];
    let max_gen = entries.iter().map(|(_, h)| generation_of(h)).max().unwrap();
    let roots = root_slots(meta);
    let (slot, seq, _, handle) = roots[0].clone();
    let other_live = roots[1].3;
    let past_mark = move |b: &mut Vec<u8>, h: [u8; 64]| {
        let o = entry_offset(hwm);
        b[o..o + ENTRY_BYTES].fill(0);
        b[o..o + 64].copy_from_slice(&h);
        set_hwm(b, hwm + 1);
    };
    vec![
        ("clean", Box::new(|_: &mut Vec<u8>| {})),
        (
            "overlap, higher generation",
            Box::new(move |b| past_mark(b, with_generation(&h0, max_gen + 1))),
        ),
        (
            "overlap, equal generation",
            Box::new(move |b| past_mark(b, h0)),
        ),
        (
            "two names share a slot pair, equal seq",
            Box::new(move |b| {
                let o = root_offset(slot ^ 1);
                b[o..o + ROOT_SLOT_BYTES].copy_from_slice(&root_record(
                    seq,
                    "intruder",
                    &other_live,
                ));
            }),
        ),
        (
            "two names share a slot pair, higher seq",
            Box::new(move |b| {
                let o = root_offset(slot ^ 1);
                b[o..o + ROOT_SLOT_BYTES].copy_from_slice(&root_record(
                    seq + 1000,
                    "intruder",
                    &other_live,
                ));
            }),
        ),
        (
            "one name in two slots, equal seq",
            Box::new(move |b| {
                let name = root_slots(b)[0].2.clone();
                let o = root_offset(ROOT_SLOTS - 2);
                b[o..o + ROOT_SLOT_BYTES].copy_from_slice(&root_record(seq, &name, &other_live));
            }),
        ),
        (
            "torn root slot",
            Box::new(move |b| b[root_offset(slot) + 13] ^= 1),
        ),
        (
            "root naming another data directory",
            Box::new(move |b| {
                let mut hb = handle.to_bytes();
                hb[32] ^= 1;
                let crc = crc32c::crc32c(&hb[..36]);
                hb[36..40].copy_from_slice(&crc.to_le_bytes());
                let o = root_offset(slot);
                b[o + 76..o + 116].copy_from_slice(&hb);
                let crc = crc32c::crc32c(&b[o..o + 120]);
                b[o + 120..o + 124].copy_from_slice(&crc.to_le_bytes());
            }),
        ),
        (
            "bad entry header",
            Box::new(move |b| b[entry_offset(i0) + 13] ^= 0x40),
        ),
        (
            "entry naming a missing data file",
            Box::new(move |b| {
                let o = entry_offset(i0);
                b[o..o + 64].copy_from_slice(&with_file(&h0, 7));
            }),
        ),
        (
            "bitmap bits flipped inside the slots",
            Box::new(move |b| {
                for (i, _) in published(b).into_iter().take(5) {
                    b[entry_offset(i) + 64] ^= 0b101;
                }
            }),
        ),
        ("torn high-water mark", Box::new(|b| b[HWM_OFFSET + 5] ^= 1)),
    ]
}

#[test]
fn recovery_and_the_tool_agree_over_a_corruption_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let meta0 = std::fs::read(meta_path(&clean, 0)).unwrap();
    let mut refused = 0;
    for (k, (what, mutate)) in corpus(&meta0).into_iter().enumerate() {
        let d = copy_of(&clean, tmp.path(), &format!("case-{k}"));
        let mut b = meta0.clone();
        mutate(&mut b);
        std::fs::write(meta_path(&d, 0), &b).unwrap();
        refused += agree(&d, what);
    }
    // Data files cut short or removed.
    let d = copy_of(&clean, tmp.path(), "short");
    cut_data_file(&d);
    refused += agree(&d, "data file cut short");
    // The same cut under segments no completed sync covered (the durable
    // generation word, byte 528, says none did): growth a power loss took.
    // Both drop those segments, and open.
    let d = copy_of(&clean, tmp.path(), "lost-growth");
    let p = meta_path(&d, 1);
    let mut b = std::fs::read(&p).unwrap();
    b[528..536].copy_from_slice(&(1u64 | (u64::from(!1u32) << 32)).to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    cut_data_file(&d);
    assert_eq!(agree(&d, "growth lost under unsynced segments"), 0);
    let d = copy_of(&clean, tmp.path(), "missing");
    std::fs::remove_file(d.join("shard-001/data-000000.seg")).unwrap();
    refused += agree(&d, "data file removed");
    // Random flips in the metadata of both shards.
    let seed = common::seed_from_env("AGREE_SEED");
    eprintln!("AGREE_SEED={seed}");
    let mut rng = common::Rng::new(seed);
    for round in 0..12 {
        let d = copy_of(&clean, tmp.path(), &format!("flip-{round}"));
        for shard in 0..2 {
            let p = meta_path(&d, shard);
            let mut b = std::fs::read(&p).unwrap();
            let end = entry_offset(hwm_of(&b)) + ENTRY_BYTES;
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(end as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
            std::fs::write(&p, &b).unwrap();
        }
        refused += agree(&d, &format!("flips round {round} (seed {seed})"));
    }
    assert!(
        refused >= 3,
        "the corpus exercises refusals too ({refused})"
    );
}

/// Two names in one slot pair with equal sequence numbers: the lower slot
/// wins, every time, in the library and the tool alike.
#[test]
fn root_pair_tie_breaks_by_slot_index() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let meta0 = std::fs::read(meta_path(&clean, 0)).unwrap();
    let roots = root_slots(&meta0);
    let (slot, seq, name, _) = roots[0].clone();
    let other = roots[1].3;
    let mut b = meta0.clone();
    let o = root_offset(slot ^ 1);
    b[o..o + ROOT_SLOT_BYTES].copy_from_slice(&root_record(seq, "intruder", &other));
    let winner = if slot < slot ^ 1 {
        name.clone()
    } else {
        "intruder".to_string()
    };
    let loser = if winner == name {
        "intruder".to_string()
    } else {
        name.clone()
    };
    for round in 0..8 {
        let d = copy_of(&clean, tmp.path(), &format!("r{round}"));
        std::fs::write(meta_path(&d, 0), &b).unwrap();
        let (listed, _) = tool_live(&d, 0);
        let kept = library(&d, 0).expect("opens");
        assert!(
            kept.roots.contains_key(&winner),
            "round {round}: {:?}",
            kept.roots
        );
        assert!(
            !kept.roots.contains_key(&loser),
            "round {round}: {:?}",
            kept.roots
        );
        assert_eq!(listed.roots, kept.roots, "round {round}");
    }
}

/// The rule for a root whose allocation was freed: the library allows it
/// and keeps the root; `verify` reports it as a warning (exit 0) and `live`
/// marks it dangling.
#[test]
fn a_root_of_a_freed_allocation_is_dangling_not_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let c = cfg(&dir);
    let h = common::run(async {
        let dd = Arc::new(DataDir::open(&c).unwrap());
        let s = Shard::open(dd, &c, 0).await.unwrap();
        let keep = s.allocate(64).await.unwrap().into_handle();
        let h = s.allocate(64).await.unwrap().into_handle();
        s.set_root("gone", h).unwrap();
        s.set_root("kept", keep).unwrap();
        s.free(h).unwrap();
        s.sync().await.unwrap();
        h
    });
    let o = tool(&["verify"], &dir);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o)
            .lines()
            .any(|l| l.starts_with("warning: shard 0: shard-000/meta.seg: ")
                && l.contains("\"gone\"")
                && l.contains("dangling")),
        "{}",
        stdout(&o)
    );
    let (listed, dangling) = tool_live(&dir, 0);
    assert_eq!(dangling, BTreeSet::from(["gone".to_string()]));
    assert_eq!(listed.roots.get("gone"), Some(&h));
    common::run(async {
        let dd = Arc::new(DataDir::open(&c).unwrap());
        let s = Shard::open(dd, &c, 0).await.unwrap();
        assert_eq!(s.root("gone"), Some(h));
        assert!(matches!(s.pin(h).await, Err(Error::NotAllocated { .. })));
    });
}

/// Power loss: a root change reverts (its sector is the old one) while the
/// free of the old target persists. The root comes back dangling: the
/// library opens and keeps it; the tool agrees and exits 0.
#[test]
fn power_loss_reverting_a_root_change_leaves_it_dangling() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let c = cfg(&dir);
    let before = meta_path(&dir, 0);
    let (a, old_meta) = common::run(async {
        let dd = Arc::new(DataDir::open(&c).unwrap());
        let s = Shard::open(dd, &c, 0).await.unwrap();
        let _pad = s.allocate(64).await.unwrap().into_handle();
        let a = s.allocate(64).await.unwrap().into_handle();
        s.set_root("r", a).unwrap();
        s.sync().await.unwrap();
        let old_meta = std::fs::read(&before).unwrap();
        let b = s.allocate(64).await.unwrap().into_handle();
        s.set_root("r", b).unwrap();
        s.free(a).unwrap();
        s.sync().await.unwrap();
        (a, old_meta)
    });
    // The image: everything new, but the root table's sectors as they were.
    let mut img = std::fs::read(&before).unwrap();
    img[ROOTS_OFFSET..DIR_OFFSET].copy_from_slice(&old_meta[ROOTS_OFFSET..DIR_OFFSET]);
    std::fs::write(&before, &img).unwrap();
    let o = tool(&["verify"], &dir);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let (listed, dangling) = tool_live(&dir, 0);
    assert_eq!(dangling, BTreeSet::from(["r".to_string()]));
    let kept = library(&dir, 0).expect("opens");
    assert_eq!(kept.roots.get("r"), Some(&a));
    assert_eq!(listed, kept);
    assert!(!kept.live.contains(&a));
}

/// Crafted entries naming data file 4 000 000 000 on both shards make each
/// shard's free-run figures saturate; the totals saturate too instead of
/// wrapping (or panicking under overflow checks).
#[test]
fn stat_totals_saturate_on_hostile_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let d = copy_of(&clean, tmp.path(), "far");
    for shard in 0..2 {
        let p = meta_path(&d, shard);
        let mut b = std::fs::read(&p).unwrap();
        let hwm = hwm_of(&b);
        let entries = published(&b);
        let max_gen = entries.iter().map(|(_, h)| generation_of(h)).max().unwrap();
        let far = with_generation(&with_file(&entries[0].1, 4_000_000_000), max_gen + 1);
        let o = entry_offset(hwm);
        b[o..o + ENTRY_BYTES].fill(0);
        b[o..o + 64].copy_from_slice(&far);
        set_hwm(&mut b, hwm + 1);
        std::fs::write(&p, &b).unwrap();
    }
    let r = segalloc::inspect::read_dir(&d).expect("read_dir");
    for s in &r.shards {
        assert_eq!(s.free_runs.bytes, u64::MAX, "shard {}", s.index);
    }
    let t = r.totals();
    assert_eq!(t.free_runs.bytes, u64::MAX);
    let o = tool(&["stat", "--json"], &d);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["totals"]["free_runs"]["bytes"].as_u64(), Some(u64::MAX));
}

/// A segment that loses an overlap at recovery is cleared whole: its state
/// word and its bitmap, so a later header in that entry never meets its
/// old bits.
#[test]
fn a_segment_that_loses_an_overlap_is_cleared_with_its_bitmap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    build(&dir);
    let p = meta_path(&dir, 0);
    let mut b = std::fs::read(&p).unwrap();
    let hwm = hwm_of(&b);
    let entries = published(&b);
    let max_gen = entries.iter().map(|(_, h)| generation_of(h)).max().unwrap();
    let (victim, h) = *entries
        .iter()
        .find(|(i, _)| {
            let o = entry_offset(*i) + 64;
            b[o..o + 512].iter().any(|&x| x != 0)
        })
        .expect("a segment with live slots");
    let o = entry_offset(hwm);
    b[o..o + ENTRY_BYTES].fill(0);
    b[o..o + 64].copy_from_slice(&with_generation(&h, max_gen + 1));
    set_hwm(&mut b, hwm + 1);
    std::fs::write(&p, &b).unwrap();
    let kept = library(&dir, 0).expect("opens");
    assert!(kept.live.iter().all(|h| h.segment_id() != victim));
    let after = std::fs::read(&p).unwrap();
    let vo = entry_offset(victim);
    assert_eq!(u64_at(&after, vo), 0, "state word cleared");
    assert!(
        after[vo + 64..vo + ENTRY_BYTES].iter().all(|&x| x == 0),
        "bitmap of the dropped segment cleared"
    );
}

/// The same after the generations wrapped (1 follows `u32::MAX`): the
/// segment of generation 1 is the newer one and wins the overlap.
#[test]
fn an_overlap_across_the_generations_wrap_keeps_the_newer_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    build(&dir);
    let p = meta_path(&dir, 0);
    let mut b = std::fs::read(&p).unwrap();
    let hwm = hwm_of(&b);
    let (victim, h) = *published(&b)
        .iter()
        .find(|(i, _)| {
            let o = entry_offset(*i) + 64;
            b[o..o + 512].iter().any(|&x| x != 0)
        })
        .expect("a segment with live slots");
    let vo = entry_offset(victim);
    b[vo..vo + 64].copy_from_slice(&with_generation(&h, u32::MAX));
    let o = entry_offset(hwm);
    b[o..o + ENTRY_BYTES].fill(0);
    b[o..o + 64].copy_from_slice(&with_generation(&h, 1));
    set_hwm(&mut b, hwm + 1);
    // The next generation to issue and the durable one: 2.
    let next = segalloc::format::encode_counter(2).to_le_bytes();
    b[520..528].copy_from_slice(&next);
    b[528..536].copy_from_slice(&next);
    std::fs::write(&p, &b).unwrap();
    let kept = library(&dir, 0).expect("opens");
    assert!(kept.live.iter().all(|h| h.segment_id() != victim));
    let after = std::fs::read(&p).unwrap();
    assert_eq!(
        u64_at(&after, vo),
        0,
        "the older segment's state word cleared"
    );
    assert_ne!(u64_at(&after, o), 0, "the newer segment kept");
}

/// A metadata file as a reader beside a writer sees it: the first `stale`
/// reads of the high-water mark get `before`, every other read `now`.
struct Racing {
    before: Vec<u8>,
    now: Vec<u8>,
    mark_reads: u32,
    stale: u32,
}

impl segalloc::format::scan::MetaSource for Racing {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> segalloc::Result<usize> {
        let covers_mark = off <= HWM_OFFSET as u64 && (HWM_OFFSET as u64) < off + buf.len() as u64;
        if covers_mark {
            self.mark_reads += 1;
        }
        let img = if covers_mark && self.mark_reads <= self.stale {
            &self.before
        } else {
            &self.now
        };
        let off = (off as usize).min(img.len());
        let n = buf.len().min(img.len() - off);
        buf[..n].copy_from_slice(&img[off..off + n]);
        Ok(n)
    }
}

/// A reader beside a writer: after the scan read the high-water mark, the
/// writer raised it and published the entry below the new mark (the order
/// the library writes them in). The scan reads the mark again after the
/// directory, so it does not report that entry as published past the mark
/// (`segalloc verify` beside a running server said "its allocations are
/// lost" of a healthy directory).
#[test]
fn a_scan_beside_a_writer_that_raised_the_mark_reports_nothing_past_it() {
    use segalloc::format::scan::{self, DataFileLen, Defect, ScanTarget};
    let tmp = tempfile::tempdir().unwrap();
    build(tmp.path());
    let manifest = *DataDir::open(&cfg(tmp.path())).unwrap().manifest();
    let now = std::fs::read(meta_path(tmp.path(), 0)).unwrap();
    let h = hwm_of(&now);
    assert!(published(&now).iter().any(|&(i, _)| i == h - 1));
    let mut before = now.clone();
    set_hwm(&mut before, h - 1);
    let shard_dir = tmp.path().join("shard-000");
    let data_file =
        |n: u32| match std::fs::metadata(shard_dir.join(segalloc::format::data_file_name(n))) {
            Ok(m) => DataFileLen::Bytes(m.len()),
            Err(_) => DataFileLen::Missing,
        };
    let target = ScanTarget {
        geometry: &manifest,
        shard: 0,
        meta_bytes: now.len() as u64,
        data_file: &data_file,
    };
    // The writer acts after the scan's first read of the mark, or after its
    // second (while the entries past the mark are read).
    let mut found = Vec::new();
    for stale in [1, 2] {
        let mut src = Racing {
            before: before.clone(),
            now: now.clone(),
            mark_reads: 0,
            stale,
        };
        let f = scan::scan(&mut src, &target).unwrap();
        assert!(
            src.mark_reads > stale,
            "the mark was read {} times",
            src.mark_reads
        );
        let past: Vec<_> = f
            .findings
            .iter()
            .filter(|f| matches!(f.defect, Defect::PublishedPastMark { .. }))
            .collect();
        assert!(past.is_empty(), "writer after read {stale}: {past:?}");
        found.push(f);
    }
    let found = &found[0];
    // The same file read at one instant: the same segments, but for the one
    // published after the first read of the mark.
    let mut still = Racing {
        before: now.clone(),
        now,
        mark_reads: 0,
        stale: 0,
    };
    let whole = scan::scan(&mut still, &target).unwrap();
    assert!(whole.findings.is_empty(), "{:?}", whole.findings);
    assert_eq!(found.segments.len() + 1, whole.segments.len());
}
