//! A full file system never kills the process.
//!
//! On a size-limited tmpfs (`size=64m`) and on a loop-mounted ext4 image
//! (96 MiB), both mounted by the test (as root) in a temporary folder and
//! unmounted at the end, a child process (this test binary, re-run) fills
//! the file system with allocations, writing every page of every slot,
//! until `allocate` returns `Error::NoSpace`. It must exit normally (never
//! by `SIGBUS`); the parent then reopens the directory and checks every
//! acknowledged allocation and its contents. A second child frees about
//! half of them, calls `trim()` (the file system's free space grows by what
//! it punched), and fills the file system again: the punched runs are
//! reserved again before use, so this fill ends in `NoSpace` too, never in
//! `SIGBUS`. A third child (a new process, which cannot know what the last
//! one punched) frees a third and fills again. The parent checks the state
//! after each child, after a reopen.
//!
//! Skipped, with a message, when not running as root, when `mount` (or,
//! for ext4, `mkfs.ext4`) is missing, or when the mount fails (e.g. in a
//! container without the capability). Replay a run with
//! `SEGALLOC_ENOSPC_SEED=<seed>`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use common::{
    Mount, Rng, check_pattern, find_tool, handle_from_hex, handle_seed, is_root, mount_tmpfs_with,
    open_shard, pattern_ranges, run, run_tool, seed_from_env, write_pattern,
};
use segalloc::config::MIB;
use segalloc::{Config, Handle, PinGuard};

const MARK: &str = "@@";
const ENV_DIR: &str = "SEGALLOC_ENOSPC_CHILD_DIR";
const ENV_PHASE: &str = "SEGALLOC_ENOSPC_CHILD_PHASE";
const ENV_SEED: &str = "SEGALLOC_ENOSPC_CHILD_SEED";

/// The directory's configuration: small windows, files and growth steps.
fn cfg(dir: &Path) -> Config {
    Config::builder(dir)
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(32 * MIB)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Mounting.
// ---------------------------------------------------------------------------

/// Why this machine cannot run the test, if it cannot.
fn cannot_mount(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("not running as root (mounting needs it)".into());
    }
    for t in tools {
        if find_tool(t).is_none() {
            return Some(format!("`{t}` not found"));
        }
    }
    None
}

/// A tmpfs mounted for one test in a temporary folder: unmounted, then
/// the folder removed, when dropped (the fields drop in this order).
struct TestTmpfs {
    mount: Mount,
    _tmp: tempfile::TempDir,
}

/// A tmpfs with the mount `options` for the test `test`; `None`, with a
/// message that the test is skipped, when this machine cannot mount one.
fn test_tmpfs(test: &str, options: &str) -> Option<TestTmpfs> {
    if let Some(why) = cannot_mount(&["mount", "umount"]) {
        eprintln!("{test}: SKIPPED: {why}");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    match mount_tmpfs_with(&tmp.path().join("mnt"), options) {
        Ok(mount) => Some(TestTmpfs { mount, _tmp: tmp }),
        Err(e) => {
            eprintln!("{test}: SKIPPED: cannot mount a tmpfs: {e}");
            None
        }
    }
}

fn mount_ext4(image: &Path, at: &Path, bytes: u64) -> Result<Mount, String> {
    std::fs::create_dir_all(at).unwrap();
    let f = std::fs::File::create(image).map_err(|e| e.to_string())?;
    f.set_len(bytes).map_err(|e| e.to_string())?;
    drop(f);
    run_tool(
        Command::new(find_tool("mkfs.ext4").unwrap())
            .args(["-q", "-F"])
            .arg(image),
    )?;
    run_tool(
        Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(at),
    )?;
    Ok(Mount {
        at: at.to_path_buf(),
    })
}

/// Free bytes on the file system of `p`, counting the blocks reserved for
/// root (`f_bfree`). The writers here run as root when the file system is a
/// loop-mounted ext4, so they fill its root reserve (5 % of the image) too:
/// the unprivileged count (`f_bavail`) stays 0 after a trim that punches less
/// than that reserve.
fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).unwrap();
    s.blocks_free() as u64 * s.fragment_size() as u64
}

// ---------------------------------------------------------------------------
// Contents: every page of a slot is written.
// ---------------------------------------------------------------------------

fn fill_byte(h: &Handle) -> u8 {
    (handle_seed(h, 7) as u8) | 1
}

/// Write every byte of the slot: a fill byte, then the pattern over the
/// head (and tail) the common helpers check.
fn write_full(pin: &PinGuard, h: &Handle) {
    pin.fill(0, pin.len(), fill_byte(h)).unwrap();
    write_pattern(pin, pin.len(), handle_seed(h, 0));
}

fn check_full(pin: &PinGuard, h: &Handle) -> bool {
    if !check_pattern(pin, pin.len(), handle_seed(h, 0)) {
        return false;
    }
    // Between the patterned head and tail: sample a byte per page.
    let covered: Vec<(usize, usize)> = pattern_ranges(pin.len());
    let mut b = [0u8; 1];
    (0..pin.len()).step_by(4096).all(|off| {
        if covered.iter().any(|&(o, n)| (o..o + n).contains(&off)) {
            return true;
        }
        pin.read_at(off, &mut b).unwrap();
        b[0] == fill_byte(h)
    })
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=59 => 1 + rng.below(4000),
        60..=89 => 4000 + rng.below(200_000),
        _ => 200_000 + rng.below(2 * MIB),
    }
}

// ---------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------

fn say(s: String) {
    let mut o = std::io::stdout().lock();
    writeln!(o, "{MARK}{s}").unwrap();
    o.flush().unwrap();
}

/// Allocate and write until `NoSpace` has been seen 40 times (sizes vary:
/// small ones may still fit in existing segments after a big one failed).
async fn fill(shard: &segalloc::Shard, rng: &mut Rng) {
    let mut nospace = 0;
    while nospace < 40 {
        match shard.allocate(size(rng)).await {
            Ok(a) => {
                let h = a.handle();
                write_full(a.pin(), &h);
                drop(a);
                say(format!("A {}", h.to_hex()));
            }
            Err(e) if e.is_no_space() => {
                if nospace == 0 {
                    say(format!("N {e}"));
                }
                nospace += 1;
            }
            Err(e) => {
                say(format!("E {e}"));
                panic!("allocate on a full file system: {e:?}");
            }
        }
    }
}

#[test]
fn enospc_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let phase = std::env::var(ENV_PHASE).unwrap();
    let seed: u64 = std::env::var(ENV_SEED).unwrap().parse().unwrap();
    let cfg = cfg(Path::new(&dir));
    run(async {
        let mut rng = Rng::new(seed);
        let shard = open_shard(&cfg).await.unwrap();
        if phase == "again" {
            // A new process: free about a third, no trim. Runs punched by
            // the last process may be reused now: they must be reserved
            // again although this process never punched anything.
            let live: Vec<Handle> = shard.live().collect();
            for h in &live {
                if rng.chance(0.33) {
                    shard.free(*h).unwrap();
                    say(format!("F {}", h.to_hex()));
                }
            }
        }
        if phase == "refill" {
            // Free about half, the big ones first, then trim.
            let mut live: Vec<Handle> = shard.live().collect();
            live.sort_by_key(|h| std::cmp::Reverse(h.len()));
            let mut freed = 0;
            for (i, h) in live.iter().enumerate() {
                if i < live.len() / 4 || rng.chance(0.4) {
                    shard.free(*h).unwrap();
                    say(format!("F {}", h.to_hex()));
                    freed += 1;
                }
            }
            let before = free_bytes(Path::new(&dir));
            let released = shard.trim().await.unwrap();
            // ext4 counts blocks a punch freed as free only once its journal
            // commits (every few seconds): commit it before looking. Under
            // load one `sync` was seen to return before the count moved
            // (the full suite, once in several runs): look again for a
            // while before reporting.
            nix::unistd::sync();
            let mut after = free_bytes(Path::new(&dir));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while after <= before && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
                nix::unistd::sync();
                after = free_bytes(Path::new(&dir));
            }
            say(format!("T {freed} {released} {before} {after}"));
            // Nothing more to punch.
            assert_eq!(shard.trim().await.unwrap(), 0);
        }
        fill(&shard, &mut rng).await;
        match shard.sync().await {
            Ok(()) => say("S ok".into()),
            Err(e) => say(format!("S {e}")),
        }
        say("DONE".into());
    });
}

// ---------------------------------------------------------------------------
// The parent.
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Report {
    allocs: usize,
    frees: usize,
    nospace: Option<String>,
    trim: Option<(u64, u64, u64, u64)>,
    sync: Option<String>,
}

/// Run one child phase over `dir`; apply what it acknowledged to `model`.
fn child(dir: &Path, phase: &str, seed: u64, model: &mut BTreeSet<Handle>) -> Report {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "enospc_child", "--nocapture", "--test-threads=1"])
        .env(ENV_DIR, dir)
        .env(ENV_PHASE, phase)
        .env(ENV_SEED, seed.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.signal(),
        None,
        "{phase}: the child was killed by signal {:?} (SIGBUS is 7); stderr: {}",
        out.status.signal(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{phase}: the child failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut r = Report::default();
    for line in stdout.lines() {
        let Some(at) = line.find(MARK) else { continue };
        let msg = &line[at + MARK.len()..];
        let (tag, arg) = msg.split_once(' ').unwrap_or((msg, ""));
        match tag {
            "A" => {
                assert!(model.insert(handle_from_hex(arg)), "acknowledged twice");
                r.allocs += 1;
            }
            "F" => {
                assert!(model.remove(&handle_from_hex(arg)));
                r.frees += 1;
            }
            "N" => r.nospace = Some(arg.to_string()),
            "T" => {
                let v: Vec<u64> = arg.split(' ').map(|x| x.parse().unwrap()).collect();
                r.trim = Some((v[0], v[1], v[2], v[3]));
            }
            "S" => r.sync = Some(arg.to_string()),
            "DONE" => {}
            _ => panic!("unexpected line from the child: {line}"),
        }
    }
    assert!(stdout.contains(&format!("{MARK}DONE")), "{phase}: no DONE");
    r
}

/// Reopen and check: exactly the model is live, every slot intact.
///
/// The contents are read through a read-only open: a writable pin of a
/// live slot after a reopen may try to grow its file to the next growth
/// step on this full file system (see `writable_pin_after_reopen_on_a_full_disk`).
fn verify(dir: &Path, model: &BTreeSet<Handle>, what: &str) {
    run(async {
        let (dd, locked) = segalloc::DataDir::open_read_only(dir).unwrap();
        assert!(!locked);
        let ro = Config::builder(dir)
            .shards(1)
            .window_bytes(16 * MIB)
            .growth_step_bytes(MIB)
            .max_file_bytes(32 * MIB)
            .read_only(true)
            .build()
            .unwrap();
        let shard = segalloc::Shard::open(std::sync::Arc::new(dd), &ro, 0)
            .await
            .unwrap();
        let live: BTreeSet<Handle> = shard.live().collect();
        let lost: Vec<_> = model.difference(&live).collect();
        let extra: Vec<_> = live.difference(model).collect();
        assert!(
            lost.is_empty(),
            "{what}: acknowledged allocations lost: {lost:?}"
        );
        assert!(
            extra.is_empty(),
            "{what}: live but never acknowledged: {extra:?}"
        );
        common::assert_no_overlap(live.iter().copied());
        for h in &live {
            let pin = shard
                .pin(*h)
                .await
                .unwrap_or_else(|e| panic!("{what}: pin of live {h}: {e}"));
            assert!(check_full(&pin, h), "{what}: contents of {h} damaged");
        }
    });
    // A writable open recovers the same set.
    run(async {
        let shard = open_shard(&cfg(dir)).await.unwrap();
        let live: BTreeSet<Handle> = shard.live().collect();
        assert_eq!(&live, model, "{what}: writable reopen");
    });
}

fn fill_and_refill(fs: &str, dir: &Path) {
    let seed = seed_from_env("SEGALLOC_ENOSPC_SEED");
    // Every failure names the seed (SEGALLOC_ENOSPC_SEED replays it).
    let fs = &format!("{fs} (seed {seed})");
    let started = std::time::Instant::now();
    let mut rng = Rng::new(seed);
    let mut model = BTreeSet::new();
    let data = dir.join("d");
    let fill = child(&data, "fill", rng.next_u64(), &mut model);
    assert!(fill.allocs > 100, "{fs}: {fill:?}");
    assert!(fill.nospace.is_some(), "{fs}: never full: {fill:?}");
    verify(&data, &model, &format!("{fs} after the fill"));
    let full = free_bytes(dir);
    let refill = child(&data, "refill", rng.next_u64(), &mut model);
    let (freed, released, before, after) = refill.trim.expect("trim line");
    assert!(freed > 0 && released > 0, "{fs}: {refill:?}");
    assert!(
        after > before,
        "{fs}: trim released {released} bytes but the file system's free space went {before} -> {after}"
    );
    assert!(
        refill.allocs > 0,
        "{fs}: nothing fitted after the trim: {refill:?}"
    );
    assert!(
        refill.nospace.is_some(),
        "{fs}: never full again: {refill:?}"
    );
    verify(&data, &model, &format!("{fs} after the refill"));
    let again = child(&data, "again", rng.next_u64(), &mut model);
    assert!(
        again.frees > 0 && again.nospace.is_some(),
        "{fs}: {again:?}"
    );
    verify(
        &data,
        &model,
        &format!("{fs} after a fill in a new process"),
    );
    let per_file: BTreeMap<u32, usize> = model.iter().fold(BTreeMap::new(), |mut m, h| {
        *m.entry(h.file_id()).or_default() += 1;
        m
    });
    eprintln!(
        "{fs}: fill: {} allocations, first error: {}; sync: {:?}; \
         free after the fill: {full} bytes; refill: freed {freed}, trim punched {released} bytes, \
         free space {before} -> {after}, {} allocations until NoSpace again, sync: {:?}; \
         new process: freed {}, {} allocations until NoSpace again; \
         {} live over data files {per_file:?}; {:.1} s",
        fill.allocs,
        fill.nospace.as_deref().unwrap_or("-"),
        fill.sync,
        refill.allocs,
        refill.sync,
        again.frees,
        again.allocs,
        model.len(),
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn full_tmpfs() {
    let Some(fs) = test_tmpfs("full_tmpfs", "size=64m") else {
        return;
    };
    let mount = &fs.mount;
    fill_and_refill("tmpfs", &mount.at);
}

#[test]
fn full_ext4() {
    if let Some(why) = cannot_mount(&["mount", "umount", "mkfs.ext4"]) {
        eprintln!("full_ext4: SKIPPED: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let at = tmp.path().join("mnt");
    let mount = match mount_ext4(&tmp.path().join("ext4.img"), &at, 96 * MIB) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("full_ext4: SKIPPED: cannot mount an ext4 image: {e}");
            return;
        }
    };
    fill_and_refill("ext4", &mount.at);
}

/// A writable pin of a live allocation right after a reopen, on a full file
/// system, must not need space: the slot lies inside its file.
///
/// A regression test: `MappingManager`'s fault-in once compared the slot's
/// end with the registry's reserved size *before* the file was opened (0
/// after a reopen), then asked the registry to grow the file to the slot's
/// end rounded up to the growth step; when the file's size was not a
/// multiple of the step (a partial `fallocate` on a full ext4, or a growth
/// step changed between runs, as here), that growth failed with `NoSpace`
/// although the slot is inside the file. Fault-in now opens the file first
/// (`MappingManager::cover`).
#[test]
fn writable_pin_after_reopen_on_a_full_disk() {
    let Some(fs) = test_tmpfs("writable_pin_after_reopen_on_a_full_disk", "size=32m") else {
        return;
    };
    let mount = &fs.mount;
    let dir = mount.at.join("d");
    let with_step = |step: u64| {
        Config::builder(&dir)
            .shards(1)
            .window_bytes(16 * MIB)
            .growth_step_bytes(step)
            .max_file_bytes(32 * MIB)
            .build()
            .unwrap()
    };
    let hs: Vec<Handle> = run(async {
        let shard = open_shard(&with_step(MIB)).await.unwrap();
        let mut hs = Vec::new();
        for _ in 0..100 {
            let a = shard.allocate(1000).await.unwrap();
            write_full(a.pin(), &a.handle());
            hs.push(a.handle());
        }
        shard.sync().await.unwrap();
        hs
    });
    // Fill the file system with something else.
    let mut filler = std::fs::File::create(mount.at.join("filler")).unwrap();
    let chunk = vec![1u8; 1 << 20];
    while filler.write_all(&chunk).is_ok() {}
    drop(filler);
    run(async {
        let shard = open_shard(&with_step(4 * MIB)).await.unwrap();
        for h in &hs {
            let pin = shard
                .pin(*h)
                .await
                .unwrap_or_else(|e| panic!("writable pin of live {h} after a reopen: {e}"));
            assert!(check_full(&pin, h));
        }
    });
}

/// A directory entry whose page of `meta.seg` is a hole (a copy made
/// sparse, a punched page) had no blocks behind it: the new segment that
/// took the entry wrote its header through the mapping, which allocates
/// the page, and on a full file system that write faulted (SIGBUS: this
/// test binary died). Now the page gets its blocks first, and the
/// allocation fails with `NoSpace`; with room again it succeeds in the
/// same entry. On a 32 MiB tmpfs (as root: mounting needs it).
#[test]
fn an_entry_in_a_hole_of_the_directory_on_a_full_disk() {
    let Some(fs) = test_tmpfs(
        "an_entry_in_a_hole_of_the_directory_on_a_full_disk",
        "size=32m",
    ) else {
        return;
    };
    let mount = &fs.mount;
    let dir = mount.at.join("d");
    let cfg = cfg(&dir);
    let per_page = segalloc::format::ENTRIES_PER_PAGE as usize;
    // Three pages of entries, one 1 MiB segment each; the second page's
    // segments freed and released (their runs stay allocated: no trim).
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut hs = Vec::new();
        for _ in 0..3 * per_page {
            hs.push(shard.allocate(MIB).await.unwrap().into_handle());
        }
        shard.sync().await.unwrap();
        for h in &hs[per_page..2 * per_page] {
            shard.free(*h).unwrap();
        }
        shard.sync().await.unwrap();
        shard.sync().await.unwrap();
    });
    // The second page of the directory, now free entries only: a hole.
    let meta = dir.join("shard-000/meta.seg");
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new().write(true).open(&meta).unwrap();
        let off = segalloc::format::entry_offset(per_page as u32);
        // SAFETY: fallocate takes no pointers; `f` is open for writing.
        let r = unsafe {
            nix::libc::fallocate(
                f.as_raw_fd(),
                nix::libc::FALLOC_FL_PUNCH_HOLE | nix::libc::FALLOC_FL_KEEP_SIZE,
                off as i64,
                4096,
            )
        };
        assert_eq!(r, 0, "punch: {}", std::io::Error::last_os_error());
    }
    let filler_path = mount.at.join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    let chunk = vec![1u8; 64 << 10];
    while filler.write_all(&chunk).is_ok() {}
    let mut page = vec![1u8; 4096];
    while filler.write_all(&page[..]).is_ok() {}
    page.truncate(512);
    while filler.write_all(&page).is_ok() {}
    drop(filler);
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        match shard.allocate(MIB).await {
            Err(segalloc::Error::NoSpace { .. }) => {}
            other => panic!(
                "a new segment in an entry of the hole, on a full disk: {:?}",
                other.map(|a| a.handle())
            ),
        }
    });
    std::fs::remove_file(&filler_path).unwrap();
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let h = shard.allocate(MIB).await.unwrap().into_handle();
        let entry = h.segment_id() as usize;
        assert!(
            (per_page..2 * per_page).contains(&entry),
            "entry {entry} is one of the hole's"
        );
        shard.sync().await.unwrap();
    });
}

/// `trim` on the temporary folder's file system (no root needed): the data
/// files' allocated blocks shrink by what it punched, a second trim has
/// nothing left, a new segment in a punched run gets its blocks back before
/// it is used, and after a reopen the free runs (which may be holes) are
/// punched again; no allocation changes.
#[test]
fn trim_releases_blocks_and_reuse_reserves_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = cfg(&dir);
    let allocated = || -> u64 {
        std::fs::read_dir(dir.join("shard-000"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("data-"))
            .map(|e| {
                use std::os::unix::fs::MetadataExt;
                e.metadata().unwrap().blocks() * 512
            })
            .sum()
    };
    let keep: BTreeSet<Handle> = run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let seed = seed_from_env("SEGALLOC_ENOSPC_SEED");
        eprintln!("trim_releases_blocks_and_reuse_reserves_them: SEGALLOC_ENOSPC_SEED={seed}");
        let mut rng = Rng::new(seed);
        let mut all = Vec::new();
        for _ in 0..400 {
            let a = shard.allocate(size(&mut rng)).await.unwrap();
            write_full(a.pin(), &a.handle());
            all.push(a.handle());
        }
        let mut keep = BTreeSet::new();
        for (i, h) in all.iter().enumerate() {
            if i % 3 == 0 {
                keep.insert(*h);
            } else {
                shard.free(*h).unwrap();
            }
        }
        let before = allocated();
        let released = shard.trim().await.unwrap();
        let after = allocated();
        if released == 0 {
            eprintln!(
                "trim_releases_blocks_and_reuse_reserves_them: SKIPPED: this file system cannot punch holes"
            );
            return keep;
        }
        eprintln!("trim: punched {released} bytes; data files' blocks {before} -> {after} bytes");
        assert!(
            before - after >= released / 2,
            "{before} -> {after}, {released}"
        );
        assert_eq!(shard.trim().await.unwrap(), 0, "nothing left to punch");
        assert_eq!(shard.live().collect::<BTreeSet<_>>(), keep);
        // New segments land in punched runs (the only free runs now) or in
        // growth, and get their blocks before `allocate` returns, before any
        // write. 3 MiB is above every size of the first phase: each of these
        // allocations is a new segment of its own (with 300 kB, slots freed
        // in segments that kept live ones took some of them, reserved
        // already, and how many depended on the seed). A segment starts at
        // most one 1 MiB growth step into space reserved before.
        let mut before_writes = 0;
        for _ in 0..8 {
            let b = allocated();
            let a = shard.allocate(3 * MIB).await.unwrap();
            before_writes += allocated().saturating_sub(b);
            write_full(a.pin(), &a.handle());
            keep.insert(a.handle());
        }
        eprintln!("trim: 8 allocations of 3 MiB reserved {before_writes} bytes before any write");
        assert!(
            before_writes >= 8 * 2 * MIB,
            "{before_writes} (seed {seed})"
        );
        for h in &keep {
            let pin = shard.pin(*h).await.unwrap();
            assert!(check_full(&pin, h), "contents of {h}");
        }
        keep
    });
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        assert_eq!(shard.live().collect::<BTreeSet<_>>(), keep);
        // After a reopen nobody knows which free runs are holes: they are
        // punched again (and reserved again before use).
        let again = shard.trim().await.unwrap();
        eprintln!("trim after a reopen: punched {again} bytes");
        for _ in 0..10 {
            let a = shard.allocate(70_000).await.unwrap();
            write_full(a.pin(), &a.handle());
        }
        for h in &keep {
            let pin = shard.pin(*h).await.unwrap();
            assert!(check_full(&pin, h), "contents of {h}");
        }
    });
}

/// A new data directory whose shard folders cannot be made (a tmpfs out
/// of inodes right after the manifest) is not left behind with its
/// manifest: the failed open deletes what it created, so a later open is
/// not held to that manifest's shard count.
#[test]
fn an_open_that_fails_after_its_manifest_leaves_no_directory() {
    // The root, the directory, its LOCK and its MANIFEST: no inode left
    // for a shard's folder.
    let Some(fs) = test_tmpfs(
        "an_open_that_fails_after_its_manifest_leaves_no_directory",
        "size=1m,nr_inodes=4",
    ) else {
        return;
    };
    let mount = &fs.mount;
    let dir = mount.at.join("d");
    let cfg = Config::builder(&dir).shards(2).build().unwrap();
    match segalloc::DataDir::open(&cfg) {
        Err(segalloc::Error::Io { op, path, source }) => {
            assert_eq!(op, "mkdir");
            assert!(path.is_some_and(|p| p.ends_with("shard-000")));
            assert_eq!(source.raw_os_error(), Some(28), "{source}"); // ENOSPC
        }
        other => panic!("expected the shard folder's mkdir to fail: {other:?}"),
    }
    assert!(!dir.exists(), "the failed open left its directory");
}
