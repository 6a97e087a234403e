//! The `segalloc` command-line tool against directories built with the
//! library: `stat --json` agrees with the library's figures, `live` lists
//! exactly the live handles, `verify` is clean on a clean directory and names
//! each injected corruption precisely, the tool reads (with a note) while the
//! directory is open elsewhere, and it never changes a byte.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use segalloc::config::MIB;
use segalloc::format::{self as meta, EntryHeader};
use segalloc::{AllocStats, Config, DataDir, Handle, Shard};

const BIN: &str = env!("CARGO_BIN_EXE_segalloc");

fn cfg(dir: &Path) -> Config {
    Config::builder(dir)
        .shards(2)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .expect("config")
}

/// What the library said about the directory it built.
struct Built {
    live: Vec<HashSet<Handle>>,
    stats: Vec<AllocStats>,
    roots: Vec<Vec<(String, Handle)>>,
}

/// Allocate, free and name roots on both shards.
async fn workload(s0: &Shard, s1: &Shard) {
    let mut h0 = Vec::new();
    for i in 0..3000u64 {
        let a = s0.allocate(16 + (i * 37) % 2000).await.expect("allocate");
        a.write_at(0, &i.to_le_bytes()).expect("write");
        h0.push(a.into_handle());
    }
    for size in [200 * 1024, 3 * MIB, 9 * MIB] {
        h0.push(s0.allocate(size).await.expect("allocate").into_handle());
    }
    for h in h0.iter().step_by(3) {
        s0.free(*h).expect("free");
    }
    s0.set_root("alpha", h0[1]).expect("root");
    s0.set_root("alpha", h0[4]).expect("root"); // replaced: a higher seq
    s0.set_root("beta", h0[3001]).expect("root");
    let mut h1 = Vec::new();
    for i in 0..700u64 {
        h1.push(
            s1.allocate(100 + (i * 53) % 5000)
                .await
                .expect("allocate")
                .into_handle(),
        );
    }
    for h in h1.iter().step_by(4) {
        s1.free(*h).expect("free");
    }
    s1.set_root("gamma", h1[1]).expect("root");
}

fn observe(shards: &[&Shard]) -> Built {
    Built {
        live: shards.iter().map(|s| s.live().collect()).collect(),
        stats: shards.iter().map(|s| s.stats().alloc).collect(),
        roots: shards.iter().map(|s| s.roots()).collect(),
    }
}

/// Build a directory at `dir` and close it.
fn build(dir: &Path) -> Built {
    let cfg = cfg(dir);
    common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).expect("open"));
        let s0 = Shard::open(dd.clone(), &cfg, 0).await.expect("shard 0");
        let s1 = Shard::open(dd, &cfg, 1).await.expect("shard 1");
        workload(&s0, &s1).await;
        s0.sync().await.expect("sync");
        s1.sync().await.expect("sync");
        observe(&[&s0, &s1])
    })
}

fn tool(args: &[&str], dir: &Path) -> Output {
    let mut c = Command::new(BIN);
    c.args(&args[..1]).arg(dir).args(&args[1..]);
    c.output().expect("run segalloc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let t = e.file_type().expect("type");
            if t.is_dir() {
                stack.push(e.path());
            } else {
                m.insert(e.path(), std::fs::read(e.path()).expect("read"));
            }
        }
    }
    m
}

fn copy_of(src: &Path, parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    common::copy_tree(src, &d);
    d
}

// ---------------------------------------------------------------------------
// JSON access (serde_json), panicking with the key on a mismatch.
// ---------------------------------------------------------------------------

type J = serde_json::Value;

trait Field {
    fn at(&self, k: &str) -> &J;
    fn u(&self) -> u64;
    fn arr(&self) -> &[J];
    fn s(&self) -> &str;
}

impl Field for J {
    fn at(&self, k: &str) -> &J {
        self.get(k)
            .unwrap_or_else(|| panic!("no key {k} in {self}"))
    }
    fn u(&self) -> u64 {
        self.as_u64().unwrap_or_else(|| panic!("not a u64: {self}"))
    }
    fn arr(&self) -> &[J] {
        self.as_array()
            .unwrap_or_else(|| panic!("not an array: {self}"))
    }
    fn s(&self) -> &str {
        self.as_str()
            .unwrap_or_else(|| panic!("not a string: {self}"))
    }
}

fn parse_json(s: &str) -> J {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

// ---------------------------------------------------------------------------
// Raw metadata access (the documented layout, nothing from the tool).
// ---------------------------------------------------------------------------

fn meta_path(dir: &Path, shard: u16) -> PathBuf {
    dir.join(format!("shard-{shard:03}")).join("meta.seg")
}

fn hwm_of(meta_bytes: &[u8]) -> u32 {
    let o = meta::HWM_OFFSET as usize;
    let w = u64::from_le_bytes(meta_bytes[o..o + 8].try_into().unwrap());
    meta::decode_counter(w).expect("hwm")
}

fn headers(meta_bytes: &[u8]) -> Vec<(u32, EntryHeader)> {
    (0..hwm_of(meta_bytes))
        .filter_map(|i| {
            let o = meta::entry_offset(i) as usize;
            EntryHeader::decode(&meta_bytes[o..o + 64])
                .unwrap()
                .map(|h| (i, h))
        })
        .collect()
}

/// The 64-byte header of `h` as the documented layout stores it.
fn encode_header(h: &EntryHeader) -> [u8; 64] {
    let mut b = [0u8; 64];
    let state = 0x5E6Du64 | (h.class_id as u64) << 16 | 1u64 << 24 | (h.generation as u64) << 32;
    b[0..8].copy_from_slice(&state.to_le_bytes());
    b[8..12].copy_from_slice(&h.file.to_le_bytes());
    b[12..16].copy_from_slice(&h.block.to_le_bytes());
    b[16..20].copy_from_slice(&h.blocks.to_le_bytes());
    b[20..24].copy_from_slice(&h.slots.to_le_bytes());
    let crc = crc32c::crc32c(&b[..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

fn patch(path: &Path, off: u64, bytes: &[u8]) {
    let mut v = std::fs::read(path).expect("read");
    v[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, v).expect("write");
}

/// A copy of `clean` named `name` whose shard 0 has one more entry, at the
/// old mark `hwm0` and under a mark raised past it: `h` (a valid header)
/// in data file 4,000,000,000, of generation `generation`.
fn with_far_entry(
    clean: &Path,
    parent: &Path,
    name: &str,
    (hwm0, h): (u32, EntryHeader),
    generation: u32,
) -> PathBuf {
    let d = copy_of(clean, parent, name);
    let far = EntryHeader {
        file: 4_000_000_000,
        generation,
        ..h
    };
    let p = meta_path(&d, 0);
    patch(&p, meta::entry_offset(hwm0), &encode_header(&far));
    patch(
        &p,
        meta::HWM_OFFSET,
        &meta::encode_counter(hwm0 + 1).to_le_bytes(),
    );
    d
}

fn assert_line(out: &str, needle: &str) {
    assert!(
        out.lines().any(|l| l.contains(needle)),
        "no line contains {needle:?} in:\n{out}"
    );
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn stat_json_matches_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let built = build(&dir);

    let o = tool(&["stat", "--json"], &dir);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "a closed, clean directory needs no note");
    let j = parse_json(&stdout(&o));
    let m = j.at("manifest");
    assert_eq!(m.at("format_version").u(), meta::FORMAT_VERSION as u64);
    assert_eq!(m.at("shard_count").u(), 2);
    assert_eq!(m.at("window_bytes").u(), 16 * MIB);
    assert_eq!(m.at("max_file_bytes").u(), cfg(&dir).max_file_bytes());
    assert_eq!(m.at("class_table_id").u(), 1);
    assert!(m.at("dir_id").s().starts_with("0x"));
    assert_eq!(j.at("lock").s(), "free");
    assert_eq!(j.at("errors").u(), 0);
    assert_eq!(j.at("warnings").u(), 0);

    let shards = j.at("shards").arr();
    assert_eq!(shards.len(), 2);
    let mut total_live = 0;
    for (i, s) in shards.iter().enumerate() {
        let st = &built.stats[i];
        assert_eq!(s.at("shard").u(), i as u64);
        assert_eq!(
            s.at("allocations_live").u(),
            st.allocations_live,
            "shard {i}"
        );
        assert_eq!(s.at("allocations_live").u(), built.live[i].len() as u64);
        assert_eq!(s.at("bytes_live").u(), st.live_bytes, "shard {i}");
        assert_eq!(s.at("segments").u(), st.segments, "shard {i}");
        assert_eq!(s.at("segment_bytes").u(), st.allocated_bytes, "shard {i}");
        assert_eq!(
            s.at("data_files").arr().len() as u64,
            st.data_files,
            "shard {i}"
        );
        assert_eq!(
            s.at("meta_file").at("size_bytes").u(),
            std::fs::metadata(meta_path(&dir, i as u16)).unwrap().len()
        );
        assert_eq!(s.at("roots").u(), built.roots[i].len() as u64);
        let e = s.at("entries");
        assert_eq!(
            e.at("in_use").u() + e.at("free").u(),
            e.at("high_water_mark").u()
        );
        // Live per class, as the library counts it (non-zero classes).
        let mut per_class: Vec<(u32, u64)> = s
            .at("classes")
            .arr()
            .iter()
            .filter(|c| c.at("live").u() > 0)
            .map(|c| (c.at("slot_bytes").u() as u32, c.at("live").u()))
            .collect();
        per_class.sort();
        let mut want = st.live_per_class.clone();
        want.sort();
        assert_eq!(per_class, want, "shard {i}");
        // Fragmentation is what the segments hold free.
        let f = s.at("fragmentation");
        assert_eq!(
            f.at("free_bytes_in_segments").u(),
            st.allocated_bytes - st.live_bytes
        );
        for df in s.at("data_files").arr() {
            let p = dir.join(format!("shard-{i:03}")).join(df.at("name").s());
            let md = std::fs::metadata(&p).unwrap();
            assert_eq!(df.at("size_bytes").u(), md.len());
            assert_eq!(
                df.at("blocks_512").u(),
                std::os::unix::fs::MetadataExt::blocks(&md)
            );
            assert_eq!(df.at("windows").u(), md.len().div_ceil(16 * MIB));
        }
        total_live += st.allocations_live;
    }
    assert_eq!(j.at("totals").at("allocations_live").u(), total_live);
    assert_eq!(j.at("totals").at("shards").u(), 2);

    // The text form says the same.
    let o = tool(&["stat"], &dir);
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    assert_line(
        &text,
        &format!("live: {} allocation(s)", built.stats[0].allocations_live),
    );
    assert_line(&text, "shard 1 (shard-001)");
}

#[test]
fn live_lists_exactly_the_live_handles() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let built = build(&dir);

    let o = tool(&["live"], &dir);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let mut listed: Vec<HashSet<Handle>> = vec![HashSet::new(), HashSet::new()];
    let mut roots: Vec<Vec<(String, Handle)>> = vec![Vec::new(), Vec::new()];
    for line in out.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f[0] == "root" {
            // root shard=N "name" -> HEX
            let shard: usize = f[1].strip_prefix("shard=").unwrap().parse().unwrap();
            let name = f[2].trim_matches('"').to_string();
            assert_eq!(f[3], "->");
            roots[shard].push((name, common::handle_from_hex(f[4])));
            continue;
        }
        let h = common::handle_from_hex(f[0]);
        // The library reads the tool's form back (`Handle::from_hex`).
        assert_eq!(Handle::from_hex(f[0]), Ok(h));
        assert_eq!(h.to_hex(), f[0]);
        assert_eq!(f[1], format!("shard={}", h.shard()));
        assert_eq!(f[2], format!("file=data-{:06}.seg", h.file_id()));
        assert_eq!(f[3], format!("offset={:#x}", h.offset()));
        assert_eq!(f[4], format!("slot_bytes={}", h.len()));
        assert!(listed[h.shard() as usize].insert(h), "{h} listed twice");
    }
    assert_eq!(listed, built.live);
    assert_eq!(roots, built.roots);

    let o = tool(&["live", "--shard", "1"], &dir);
    assert_eq!(o.status.code(), Some(0));
    let only1: HashSet<Handle> = stdout(&o)
        .lines()
        .filter(|l| !l.starts_with("root "))
        .map(|l| common::handle_from_hex(l.split(' ').next().unwrap()))
        .collect();
    assert_eq!(only1, built.live[1]);
    assert!(stdout(&o).lines().all(|l| !l.starts_with("root shard=0")));

    let o = tool(&["live", "--shard", "2"], &dir);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("out of range"), "{}", stderr(&o));
}

#[test]
fn verify_is_clean_then_names_each_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let pristine = snapshot(&clean);

    let o = tool(&["verify"], &clean);
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("verify: clean"), "{}", stdout(&o));

    let meta0 = std::fs::read(meta_path(&clean, 0)).unwrap();
    let hdrs0 = headers(&meta0);
    let hwm0 = hwm_of(&meta0);

    // 1. One byte of an entry header.
    {
        let d = copy_of(&clean, tmp.path(), "header");
        let (i, _) = hdrs0[0];
        let off = meta::entry_offset(i);
        let mut b = [meta0[off as usize + 13]];
        b[0] ^= 0x40;
        patch(&meta_path(&d, 0), off + 13, &b);
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/meta.seg: entry {i}: offset {off:#x}: entry checksum mismatch"
            ),
        );
    }

    // 1b. The counter sector zeroed: the mark reads as a fresh file's, with
    // every entry published past it (recovery would open the shard empty).
    {
        let d = copy_of(&clean, tmp.path(), "mark-zeroed");
        patch(&meta_path(&d, 0), meta::HWM_OFFSET, &[0u8; 512]);
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        let (first, _) = hdrs0[0];
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/meta.seg: offset {:#x}: directory high-water mark is zeroed but entry {first} is published: the mark was lost",
                meta::HWM_OFFSET
            ),
        );
    }

    // 2. A bitmap bit past the segment's slot count.
    {
        let d = copy_of(&clean, tmp.path(), "bitmap");
        let &(i, h) = hdrs0
            .iter()
            .find(|(_, h)| h.slots < 4096)
            .expect("a segment with fewer than 4096 slots");
        let w = h.slots / 64;
        let off = meta::entry_offset(i) + 64 + w as u64 * 8;
        let mut word =
            u64::from_le_bytes(meta0[off as usize..off as usize + 8].try_into().unwrap());
        word |= 1u64 << (h.slots % 64);
        patch(&meta_path(&d, 0), off, &word.to_le_bytes());
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/meta.seg: entry {i}: offset {off:#x}: bitmap marks 1 slot(s) past the segment's {} slots (first: slot {}, bitmap word {w})",
                h.slots, h.slots
            ),
        );
    }

    // 3. meta.seg truncated below what the high-water mark needs.
    {
        let d = copy_of(&clean, tmp.path(), "truncated");
        let p = meta_path(&d, 1);
        let hwm1 = hwm_of(&std::fs::read(&p).unwrap());
        let need = meta::entry_offset(hwm1 - 1) + meta::ENTRY_BYTES;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(need - 1)
            .unwrap();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 1: shard-001/meta.seg: metadata truncated: {} bytes, the directory needs {need} (high-water mark {hwm1}); entries {}..{hwm1} cannot be read",
                need - 1,
                hwm1 - 1
            ),
        );
    }

    // 4. A data file deleted.
    {
        let d = copy_of(&clean, tmp.path(), "missing");
        std::fs::remove_file(d.join("shard-001/data-000000.seg")).unwrap();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            "error: shard 1: shard-001/data-000000.seg: data file is missing but referenced by",
        );
    }

    // 5. An overlapping entry of a higher generation, past the old mark.
    {
        let d = copy_of(&clean, tmp.path(), "overlap");
        let (victim, h) = hdrs0[0];
        let max_gen = hdrs0.iter().map(|(_, h)| h.generation).max().unwrap();
        let new = EntryHeader {
            generation: max_gen + 1,
            ..h
        };
        let off = meta::entry_offset(hwm0);
        assert!(
            off + meta::ENTRY_BYTES <= meta0.len() as u64,
            "room for an entry"
        );
        let p = meta_path(&d, 0);
        let mut entry = vec![0u8; meta::ENTRY_BYTES as usize];
        entry[..64].copy_from_slice(&encode_header(&new));
        patch(&p, off, &entry);
        patch(
            &p,
            meta::HWM_OFFSET,
            &meta::encode_counter(hwm0 + 1).to_le_bytes(),
        );
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/meta.seg: entry {hwm0}: offset {off:#x}: segment blocks {}..{} (generation {}) of data-{:06}.seg overlaps entry {victim}",
                h.block,
                h.block + h.blocks,
                max_gen + 1,
                h.file
            ),
        );
        assert_line(
            &stdout(&o),
            &format!("recovery keeps this one and drops entry {victim}"),
        );
        // The tool predicts what recovery restores: the victim's slots are gone.
        let j = parse_json(&stdout(&tool(&["stat", "--json"], &d)));
        let predicted = j.at("shards").arr()[0].at("allocations_live").u();
        let c = cfg(&d);
        let recovered = common::run(async {
            let dd = Arc::new(DataDir::open(&c).unwrap());
            Shard::open(dd, &c, 0).await.unwrap().live_count()
        });
        assert_eq!(predicted, recovered);
    }

    // 5b. A crafted entry (valid checksum) naming data file 4 000 000 000:
    // reported at once, without walking four billion files.
    {
        let generation = 1 + hdrs0.iter().map(|(_, h)| h.generation).max().unwrap();
        let d = with_far_entry(
            &clean,
            tmp.path(),
            "farfile",
            (hwm0, hdrs0[0].1),
            generation,
        );
        let t = std::time::Instant::now();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/data-4000000000.seg: data file is missing but referenced by 1 segment(s) (entries {hwm0})"
            ),
        );
        let o = tool(&["stat", "--json"], &d);
        assert_eq!(o.status.code(), Some(0));
        parse_json(&stdout(&o));
        assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    }

    // 5c. The same entry, its file there (empty) and the segment from
    // before the latest sync (not lost growth): recovery would have taken
    // every file number up to it for a file (out of memory). Refused, by
    // `verify` and by the library, as a gap no shard leaves (a narrow one
    // it may leave: `concurrent_tasks::a_gap_left_by_a_cancelled_first_segment_reopens`).
    {
        let d = with_far_entry(&clean, tmp.path(), "farfile-present", (hwm0, hdrs0[0].1), 1);
        std::fs::File::create(d.join("shard-000/data-4000000000.seg")).unwrap();
        let t = std::time::Instant::now();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/data-000001.seg: 4096 data files in a row are missing from this one on, yet 1 segment(s) (entries {hwm0}) holding 0 live slot(s) lie in data files numbered after them (4000000000)"
            ),
        );
        let c = cfg(&d);
        let r = common::run(async {
            let dd = Arc::new(DataDir::open(&c).unwrap());
            Shard::open(dd, &c, 0).await.map(|s| s.live_count())
        });
        match r {
            Err(segalloc::Error::Corrupt { detail, .. }) => {
                assert!(detail.contains("numbered after them"), "{detail}")
            }
            other => panic!("open: {other:?}"),
        }
        assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
    }

    // 5d. A sparse metadata file whose mark says it holds 100M entries:
    // `verify` reads what the file holds, not 55 GiB of holes.
    {
        let d = copy_of(&clean, tmp.path(), "sparse-mark");
        let p = meta_path(&d, 0);
        let hwm = 100_000_000u32;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            f.set_len(meta::entry_offset(hwm) + meta::ENTRY_BYTES)
                .unwrap();
            f.write_all_at(&meta::encode_counter(hwm).to_le_bytes(), meta::HWM_OFFSET)
                .unwrap();
        }
        let t = std::time::Instant::now();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        let j = parse_json(&stdout(&tool(&["stat", "--json"], &d)));
        let shard = &j.at("shards").arr()[0];
        let e = shard.at("entries");
        let (free, used) = (e.at("free").u(), e.at("in_use").u());
        assert_eq!(free + used, u64::from(hwm), "every entry below the mark");
        assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());

        // The library agrees, at the same cost: it read every hole through
        // its windows and sized its tables by the mark (53 s and 19.9 GB of
        // peak RSS on a 24 GiB machine, where verify took 9 ms). It opens
        // the shard with its allocations, grows the directory into the
        // holes, and `verify` finds it clean after.
        let j = parse_json(&stdout(&tool(&["stat", "--json"], &d)));
        let live = j.at("shards").arr()[0].at("allocations_live").u();
        let c = cfg(&d);
        let t = std::time::Instant::now();
        let rss_before = segalloc::proc::rss_bytes();
        let (reopened, windows, rss_open) = common::run(async {
            let dd = Arc::new(DataDir::open(&c).unwrap());
            let s = Shard::open(dd, &c, 0).await.unwrap();
            let opened = s.live_count();
            let windows = s.stats().mappings.mapped_windows;
            let rss_open = segalloc::proc::rss_bytes();
            let mut hs = Vec::new();
            for i in 0..200u64 {
                let a = s.allocate(64 * 1024).await.unwrap();
                a.write_at(0, &i.to_le_bytes()).unwrap();
                hs.push(a.into_handle());
            }
            s.sync().await.unwrap();
            (opened, windows, rss_open)
        });
        let grew = rss_open.saturating_sub(rss_before);
        assert!(grew < 256 * MIB, "open shard: RSS grew by {grew} bytes");
        assert!(t.elapsed().as_secs() < 20, "open took {:?}", t.elapsed());
        assert_eq!(reopened, live, "the shard's allocations");
        assert!(
            windows <= 4,
            "{windows} windows mapped for a sparse directory"
        );
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        let after = common::run(async {
            let dd = Arc::new(DataDir::open(&c).unwrap());
            Shard::open(dd, &c, 0).await.unwrap().live_count()
        });
        assert_eq!(after, live + 200, "reopened with the new allocations");
    }

    // 6. A root slot's name byte.
    {
        let d = copy_of(&clean, tmp.path(), "root");
        let (slot, off, seq) = (0..meta::ROOT_SLOTS)
            .map(|i| (i, meta::root_offset(i)))
            .find_map(|(i, o)| {
                let seq = u64::from_le_bytes(meta0[o as usize..o as usize + 8].try_into().unwrap());
                (seq != 0).then_some((i, o, seq))
            })
            .expect("a root slot in use");
        patch(&meta_path(&d, 0), off + 12, &[meta0[off as usize + 12] ^ 1]);
        // A torn root slot is what an interrupted update leaves: a warning,
        // located precisely; recovery ignores the slot.
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "warning: shard 0: shard-000/meta.seg: offset {off:#x}: root slot {slot} (seq {seq}): checksum mismatch; recovery ignores it"
            ),
        );
    }

    // 6b. A second name written into the other slot of a name's pair.
    {
        let d = copy_of(&clean, tmp.path(), "pair");
        let (slot, rec) = (0..meta::ROOT_SLOTS)
            .find_map(|i| {
                let o = meta::root_offset(i) as usize;
                meta::RootSlot::decode(&meta0[o..o + meta::ROOT_SLOT_BYTES as usize])
                    .ok()
                    .flatten()
                    .map(|r| (i, r))
            })
            .expect("a root");
        let intruder = meta::RootSlot {
            seq: 1_000_000,
            name: "intruder".into(),
            handle: rec.handle,
        };
        let other = slot ^ 1;
        patch(
            &meta_path(&d, 0),
            meta::root_offset(other),
            &intruder.encode(),
        );
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            &format!(
                "error: shard 0: shard-000/meta.seg: offset {:#x}: root {:?} (slot {slot}, seq {}) shares the slot pair of root \"intruder\" (slot {other}, seq 1000000); recovery keeps the later record and drops this one",
                meta::root_offset(slot),
                rec.name,
                rec.seq
            ),
        );
        // The library's recovery agrees on the surviving roots.
        let listed: Vec<String> = stdout(&tool(&["live", "--shard", "0"], &d))
            .lines()
            .filter(|l| l.starts_with("root "))
            .map(|l| l.split(' ').nth(2).unwrap().trim_matches('"').to_string())
            .collect();
        let c = cfg(&d);
        let recovered: Vec<String> = common::run(async {
            let dd = Arc::new(DataDir::open(&c).unwrap());
            let s = Shard::open(dd, &c, 0).await.unwrap();
            s.roots().into_iter().map(|(n, _)| n).collect()
        });
        assert_eq!(listed, recovered);
        assert!(!listed.contains(&rec.name));
    }

    // 7. A data file cut short (`truncate -s 4096`) under live allocations:
    // an error naming the file, exit 1.
    {
        let d = copy_of(&clean, tmp.path(), "short");
        std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("shard-001/data-000000.seg"))
            .unwrap()
            .set_len(4096)
            .unwrap();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            "error: shard 1: shard-001/data-000000.seg: entry ",
        );
        assert_line(&stdout(&o), "lie past the end of the file (4096 bytes");
    }

    // 8. The manifest's checksum.
    {
        let d = copy_of(&clean, tmp.path(), "manifest");
        let m = d.join("MANIFEST");
        let b = std::fs::read(&m).unwrap();
        patch(&m, 30, &[b[30] ^ 1]);
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            "error: MANIFEST: offset 0x0: checksum mismatch",
        );
        // The shards are still read, with the superblocks' geometry.
        assert_line(
            &stdout(&o),
            "warning: MANIFEST: unusable; the geometry is taken from shard-000/meta.seg's superblock",
        );
        assert!(stderr(&o).contains("could not tell whether the directory is open"));
    }

    // 9. Symlinks inside the directory are reported, not followed; the
    // path given may be one (resolved, as the library resolves it).
    {
        let d = copy_of(&clean, tmp.path(), "symlink");
        let data = d.join("shard-000/data-000000.seg");
        let moved = tmp.path().join("moved.seg");
        std::fs::rename(&data, &moved).unwrap();
        std::os::unix::fs::symlink(&moved, &data).unwrap();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            "error: shard 0: shard-000/data-000000.seg: data file is a symlink, not a regular file",
        );
        let o = tool(&["verify"], &d.join("shard-000"));
        assert_eq!(o.status.code(), Some(2), "not a data directory");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let o = tool(&["verify"], &link);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        assert_line(
            &stdout(&o),
            "error: shard 0: shard-000/data-000000.seg: data file is a symlink, not a regular file",
        );
        let to_file = tmp.path().join("link-to-file");
        std::os::unix::fs::symlink(&moved, &to_file).unwrap();
        let o = tool(&["verify"], &to_file);
        assert_eq!(o.status.code(), Some(2));
        assert!(stderr(&o).contains("not a directory"), "{}", stderr(&o));
    }

    // 10. A FIFO in place of meta.seg does not hang the tool.
    {
        let d = copy_of(&clean, tmp.path(), "fifo");
        let p = meta_path(&d, 1);
        std::fs::remove_file(&p).unwrap();
        nix::unistd::mkfifo(
            &p,
            nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
        )
        .unwrap();
        let o = tool(&["verify"], &d);
        assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
        assert_line(
            &stdout(&o),
            "error: shard 1: shard-001/meta.seg: is a special file, not a regular file",
        );
    }

    // The clean directory itself was never touched.
    assert_eq!(snapshot(&clean), pristine);
}

#[test]
fn reads_while_open_elsewhere_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let c = cfg(&dir);
    common::run(async {
        let dd = Arc::new(DataDir::open(&c).unwrap());
        let s0 = Shard::open(dd.clone(), &c, 0).await.unwrap();
        let s1 = Shard::open(dd, &c, 1).await.unwrap();
        workload(&s0, &s1).await;
        // No sync: the tool reads the page cache the mappings share.
        let built = observe(&[&s0, &s1]);
        let before = snapshot(&dir);
        for args in [&["stat"][..], &["stat", "--json"], &["verify"], &["live"]] {
            let o = tool(args, &dir);
            assert!(
                stderr(&o)
                    .contains("note: directory is open in another process; figures may be moving"),
                "{args:?}: {}",
                stderr(&o)
            );
            assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stdout(&o));
            if args == ["stat", "--json"] {
                let j = parse_json(&stdout(&o));
                assert_eq!(j.at("lock").s(), "held-elsewhere");
                for (i, s) in j.at("shards").arr().iter().enumerate() {
                    assert_eq!(s.at("allocations_live").u(), s0_or_s1(&built, i));
                }
            }
            if args == ["live"] {
                let n = stdout(&o)
                    .lines()
                    .filter(|l| !l.starts_with("root "))
                    .count();
                assert_eq!(n, built.live.iter().map(|l| l.len()).sum::<usize>());
            }
        }
        assert_eq!(
            snapshot(&dir),
            before,
            "the tool changed the open directory"
        );
        // The library still owns the lock and works.
        s0.allocate(100).await.unwrap();
    });

    // Closed: the tool takes and releases the lock, still changes nothing.
    let before = snapshot(&dir);
    for args in [&["stat"][..], &["stat", "--json"], &["verify"], &["live"]] {
        let o = tool(args, &dir);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert_eq!(stderr(&o), "", "{args:?}");
    }
    assert_eq!(snapshot(&dir), before);
    drop(DataDir::open(&c).expect("the tool released the lock"));

    // Without a LOCK file: none is created.
    let lock = dir.join("LOCK");
    std::fs::remove_file(&lock).unwrap();
    let before = snapshot(&dir);
    for args in [&["stat"][..], &["verify"], &["live"]] {
        let o = tool(args, &dir);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        assert!(stderr(&o).contains("no LOCK file"), "{}", stderr(&o));
    }
    assert!(!lock.exists(), "the tool created a LOCK file");
    assert_eq!(snapshot(&dir), before);
}

fn s0_or_s1(b: &Built, i: usize) -> u64 {
    b.live[i].len() as u64
}

#[test]
fn usage_and_io_errors_exit_2() {
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(BIN).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = Command::new(BIN)
        .args(["frobnicate", "x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = tool(&["stat"], &tmp.path().join("nope"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope"), "{}", stderr(&o));
    let o = tool(&["verify"], tmp.path());
    assert_eq!(
        o.status.code(),
        Some(2),
        "an empty folder is no data directory"
    );
    assert!(stderr(&o).contains("not a segalloc data directory"));
    let o = Command::new(BIN).args(["--help"]).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    for sub in ["stat", "verify", "live"] {
        assert!(stdout(&o).contains(sub));
    }
}

/// A torn mark on a metadata file grown sparse to 20 GiB: the report skips
/// the file's holes (it read all of it: 40 s and 146 MB, in proportion to
/// the file's size), and still finds an entry however far it lies past the
/// others (a first version stopped after 2 MiB of blank entries, and lost
/// segments that released entries separated from the rest).
#[test]
fn a_torn_mark_on_a_huge_sparse_metadata_file_is_reported_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let meta0 = std::fs::read(meta_path(&clean, 0)).unwrap();
    let published = headers(&meta0).len() as u64;
    let d = copy_of(&clean, tmp.path(), "sparse");
    patch(&meta_path(&d, 0), meta::HWM_OFFSET, &[0x5a; 8]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(meta_path(&d, 0))
        .unwrap()
        .set_len(20 << 30)
        .unwrap();
    let t = std::time::Instant::now();
    let o = tool(&["verify"], &d);
    let took = t.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_line(
        &stdout(&o),
        "error: shard 0: shard-000/meta.seg: offset 0x200: directory high-water mark is torn",
    );
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    // Every segment is still reported.
    let o = tool(&["stat", "--json"], &d);
    let j = parse_json(&stdout(&o));
    assert_eq!(j.at("shards").arr()[0].at("segments").u(), published);

    // A segment whose entry lies far past the others, with blank (or
    // released) entries between (here a hole of the file): its live
    // allocations are still listed, for salvage.
    let d = copy_of(&clean, tmp.path(), "far");
    let (last, _) = *headers(&meta0).last().unwrap();
    let from = meta::entry_offset(last) as usize;
    let entry = meta0[from..from + meta::ENTRY_BYTES as usize].to_vec();
    let live_before = tool(&["live"], &clean);
    let lines = |o: &Output| stdout(o).lines().count();
    let all = lines(&live_before);
    let far = last + 8 * meta::ENTRIES_PER_PAGE as u32 * 1024;
    let p = meta_path(&d, 0);
    patch(&p, from as u64, &vec![0u8; entry.len()]);
    patch(&p, meta::HWM_OFFSET, &[0x5a; 8]);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&entry, meta::entry_offset(far)).unwrap();
    }
    let in_last: u32 = entry[meta::ENTRY_HEADER_BYTES as usize..]
        .iter()
        .map(|b| b.count_ones())
        .sum();
    assert!(in_last > 0, "the last segment holds live allocations");
    let o = tool(&["live"], &d);
    assert_eq!(lines(&o), all, "{}", stdout(&o));
}

/// A directory page that reads as a hole below the file's last data (a
/// page a power loss kept unwritten in the file's reserved extent, or a
/// copy made sparse): its entries are free, for `verify` and for the
/// library, which hands them out again (it lost them for good when its
/// recovery first skipped holes: they were neither listed free nor past
/// the directory's end).
#[test]
fn entries_in_a_hole_below_the_last_data_are_used_again() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let d = copy_of(&clean, tmp.path(), "hole");
    let p = meta_path(&d, 0);
    let hwm = hwm_of(&std::fs::read(&p).unwrap());
    let per_page = meta::ENTRIES_PER_PAGE as u32;
    assert!(hwm > 2 * per_page, "the directory spans three pages");
    // The directory's second page, entries 7 ..= 13: punched out.
    let off = meta::entry_offset(per_page);
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        // SAFETY: fallocate takes no pointers; `f` is open for writing.
        let r = unsafe {
            nix::libc::fallocate(
                f.as_raw_fd(),
                nix::libc::FALLOC_FL_PUNCH_HOLE | nix::libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                meta::META_PAGE_BYTES as i64,
            )
        };
        assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    }
    let hole = per_page..2 * per_page;
    let c = cfg(&d);
    common::run(async {
        let dd = Arc::new(DataDir::open(&c).unwrap());
        let s = Shard::open(dd, &c, 0).await.unwrap();
        s.sync().await.unwrap();
        for _ in 0..20 {
            s.allocate(3 * MIB).await.unwrap();
        }
        s.sync().await.unwrap();
    });
    let m = std::fs::read(&p).unwrap();
    let used: Vec<u32> = headers(&m)
        .iter()
        .map(|x| x.0)
        .filter(|i| hole.contains(i))
        .collect();
    assert_eq!(
        used,
        hole.collect::<Vec<_>>(),
        "the entries of the hole, used again (mark {hwm} -> {})",
        hwm_of(&m)
    );
    let o = tool(&["verify"], &d);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

#[test]
fn hostile_metadata_never_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let clean = tmp.path().join("clean");
    build(&clean);
    let d = copy_of(&clean, tmp.path(), "fuzz");
    let seed = common::seed_from_env("CLI_FUZZ_SEED");
    eprintln!("CLI_FUZZ_SEED={seed}");
    let mut rng = common::Rng::new(seed);
    let files: Vec<(PathBuf, Vec<u8>)> = [d.join("MANIFEST"), meta_path(&d, 0), meta_path(&d, 1)]
        .into_iter()
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    let hot: Vec<u64> = {
        // Bytes worth hitting: manifest, superblock, mark, roots, headers, bitmaps.
        let mut v = vec![
            0,
            8,
            12,
            16,
            24,
            32,
            40,
            44,
            meta::HWM_OFFSET,
            meta::HWM_OFFSET + 4,
        ];
        for i in 0..4 {
            v.push(meta::root_offset(i));
            v.push(meta::root_offset(i) + 8);
            v.push(meta::root_offset(i) + 80);
        }
        for i in 0..60 {
            v.push(meta::entry_offset(i));
            v.push(meta::entry_offset(i) + 8 + (i as u64 % 20));
            v.push(meta::entry_offset(i) + 64 + (i as u64 * 8) % 512);
        }
        v
    };
    for round in 0..300 {
        for (p, b) in &files {
            std::fs::write(p, b).unwrap();
        }
        let (p, b) = &files[rng.below(files.len() as u64) as usize];
        let mut v = b.clone();
        for _ in 0..1 + rng.below(4) {
            let at = if rng.chance(0.8) {
                hot[rng.below(hot.len() as u64) as usize] + rng.below(8)
            } else {
                rng.below(v.len() as u64)
            } as usize;
            if at < v.len() {
                v[at] ^= 1 << rng.below(8);
            }
        }
        if rng.chance(0.15) {
            v.truncate(rng.below(v.len() as u64 + 1) as usize);
        }
        std::fs::write(p, &v).unwrap();
        let r = segalloc::inspect::read_dir(&d).unwrap_or_else(|e| panic!("round {round}: {e}"));
        // Everything the report offers is computable.
        let _ = r.totals();
        let _ = r.live().count();
        for s in &r.shards {
            let _ = s.classes();
        }
        if round % 30 == 0 {
            for args in [&["stat", "--json"][..], &["verify"], &["live"]] {
                let o = tool(args, &d);
                let code = o.status.code().expect("exited, not killed");
                assert!(
                    code <= 2,
                    "round {round} {args:?}: exit {code}\n{}",
                    stderr(&o)
                );
                if args[0] == "stat" && code == 0 {
                    parse_json(&stdout(&o));
                }
            }
        }
    }
}
