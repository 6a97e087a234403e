//! Power cut at the block layer, for real.
//!
//! Each round makes an ext4 file system (with its journal) in an image file,
//! attaches it to a loop device with direct I/O (so what the loop device has
//! written is in the image file, with no cache in between) and mounts it. A
//! child process (this test binary, re-run) opens a data directory there and
//! does random `allocate` + write, `free`, `set_root` and `sync`, printing
//! one line for each call that completed. At a random moment after a few
//! syncs the parent stops the child (`SIGSTOP`), waits until none of its
//! threads is inside a system call, and copies the image file: the copy is
//! what the disk held at that instant. Everything the child wrote that was
//! still only in the page cache is missing from it, exactly as after a power
//! cut. The child is then killed, the copy mounted (the journal replays as
//! after a reboot) and checked against the promise:
//!
//! - every allocation live when the last completed `sync` began, and not
//!   freed since, is live with exactly the bytes it had;
//! - every allocation freed before that `sync` began is gone;
//! - every root set before it, and not changed since, names the same handle;
//! - no two live allocations overlap, and `segalloc verify` finds no error.
//!
//! And one promise is checked on the child's own log, in every round: a
//! freed range is never handed out again before a `sync` that began after
//! the free has completed (otherwise a reverted free could meet the bytes of
//! a newer allocation).
//!
//! The child uses the plain-syscall backend (`SEGALLOC_IO=sync`): a stopped
//! process then has no I/O of its own in flight, whereas io_uring's kernel
//! workers would go on writing while the image is copied. The file system is
//! mounted with `commit=600` and made without lazy initialisation, so
//! nothing else writes to the image during the copy either.
//!
//! The test also counts what the copy lost: allocations and frees
//! acknowledged after the last completed sync that the copy does not show.
//! Over all rounds that count must not be zero, or the test would check
//! nothing.
//!
//! Root only (loop devices, mounts); skipped with a message otherwise.
//! `cargo test --release --test powercut` runs 3 rounds;
//! `cargo test --release --test powercut -- --ignored --nocapture` runs 50
//! (`SEGALLOC_POWERCUT_ROUNDS=N` to change it). Replay a round with
//! `SEGALLOC_POWERCUT_SEED=<seed>`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::blockdev::{Loop, make_image, power_cut_rounds, stop};
use common::{
    Mount, Rng, assert_no_overlap, check_pattern, handle_from_hex, handle_seed, line_reader,
    open_shard, run, write_pattern,
};
use segalloc::config::MIB;
use segalloc::{Config, Handle};

const MARK: &str = "@@";
const ENV_DIR: &str = "SEGALLOC_POWERCUT_CHILD_DIR";
const ENV_SEED: &str = "SEGALLOC_POWERCUT_CHILD_SEED";
/// Size of the file system image.
const IMAGE_BYTES: u64 = 256 * MIB;
/// The child keeps at most this much live (it frees more past it).
const LIVE_BYTES_MAX: u64 = 48 * MIB;
/// Names of the roots the child sets.
const ROOTS: u64 = 4;

fn cfg(dir: &Path) -> Config {
    Config::builder(dir)
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(64 * MIB)
        .build()
        .unwrap()
}

fn root_name(k: u64) -> String {
    format!("root-{k}")
}

// ---------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------

/// One acknowledgement line, written with one `write` so that a line in the
/// pipe is a completed call.
fn say(s: String) {
    let mut o = std::io::stdout().lock();
    o.write_all(format!("{MARK}{s}\n").as_bytes()).unwrap();
    o.flush().unwrap();
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=69 => 1 + rng.below(512),
        70..=94 => 512 + rng.below(8 * 1024),
        _ => 8 * 1024 + rng.below(256 * 1024),
    }
}

#[test]
fn powercut_child() {
    let Ok(dir) = std::env::var(ENV_DIR) else {
        return;
    };
    let seed: u64 = std::env::var(ENV_SEED).unwrap().parse().unwrap();
    let cfg = cfg(Path::new(&dir));
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let mut rng = Rng::new(seed);
        let mut live: Vec<Handle> = Vec::new();
        let mut live_bytes = 0u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut op = 0u64;
        while Instant::now() < deadline {
            op += 1;
            let r = rng.below(1000);
            let must_free = live_bytes > LIVE_BYTES_MAX;
            if (r < 550 && !must_free) || live.is_empty() {
                let a = shard.allocate(size(&mut rng)).await.unwrap();
                let h = a.handle();
                write_pattern(a.pin(), h.len() as usize, handle_seed(&h, op));
                drop(a);
                live.push(h);
                live_bytes += h.len() as u64;
                say(format!("A {} {op}", h.to_hex()));
            } else if r < 900 || must_free {
                let h = live.swap_remove(rng.below(live.len() as u64) as usize);
                shard.free(h).unwrap();
                live_bytes -= h.len() as u64;
                say(format!("F {}", h.to_hex()));
            } else if r < 995 {
                let k = rng.below(ROOTS);
                let h = live[rng.below(live.len() as u64) as usize];
                shard.set_root(&root_name(k), h).unwrap();
                say(format!("R {k} {}", h.to_hex()));
            } else {
                say("S+".into());
                shard.sync().await.unwrap();
                say("S=".into());
            }
        }
    });
}

// ---------------------------------------------------------------------------
// The block device.
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// What the child acknowledged.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Event {
    Alloc(Handle, u64),
    Free(Handle),
    Root(u64, Handle),
    SyncBegin,
    SyncEnd,
}

fn parse(line: &str) -> Option<Event> {
    let at = line.find(MARK)?;
    let msg = &line[at + MARK.len()..];
    let mut w = msg.split(' ');
    Some(match w.next()? {
        "A" => Event::Alloc(
            handle_from_hex(w.next()?),
            w.next()?.parse().expect("op number"),
        ),
        "F" => Event::Free(handle_from_hex(w.next()?)),
        "R" => Event::Root(
            w.next()?.parse().expect("root number"),
            handle_from_hex(w.next()?),
        ),
        "S+" => Event::SyncBegin,
        "S=" => Event::SyncEnd,
        other => panic!("unexpected line from the child: {other}"),
    })
}

/// The byte range a handle covers in its data file.
fn range(h: &Handle) -> (u32, u64, u64) {
    (h.file_id(), h.offset(), h.offset() + h.len() as u64)
}

fn overlaps(a: (u32, u64, u64), b: (u32, u64, u64)) -> bool {
    a.0 == b.0 && a.1 < b.2 && b.1 < a.2
}

/// Check the log itself: no allocation overlaps a range whose free is not
/// yet durable (no sync that began after the free has completed), unless
/// that range was allocated after the latest sync began: no sync covered it,
/// so its free may be reused at once.
fn check_no_reuse_before_durable(events: &[Event]) {
    // Freed ranges, each with whether a sync has begun since.
    let mut pending: Vec<((u32, u64, u64), bool)> = Vec::new();
    // Allocated since the latest sync began.
    let mut fresh: std::collections::HashSet<Handle> = Default::default();
    for (i, e) in events.iter().enumerate() {
        match e {
            Event::Free(h) => {
                if !fresh.remove(h) {
                    pending.push((range(h), false));
                }
            }
            Event::SyncBegin => {
                fresh.clear();
                for p in &mut pending {
                    p.1 = true;
                }
            }
            Event::SyncEnd => {
                pending.retain(|p| !p.1);
            }
            Event::Alloc(h, _) => {
                if let Some(p) = pending.iter().find(|p| overlaps(p.0, range(h))) {
                    panic!(
                        "event {i}: {h} was handed out over {:?}, freed but not yet durably",
                        p.0
                    );
                }
                fresh.insert(*h);
            }
            Event::Root(..) => {}
        }
    }
}

/// The state the promise covers: what was acknowledged before the last
/// completed sync began, and what happened to each handle and root after.
#[derive(Default)]
struct Expect {
    /// Live at the sync's beginning and untouched since: handle → op.
    kept: BTreeMap<Handle, u64>,
    /// Live at the sync's beginning, freed since: handle → op.
    freed_after: BTreeMap<Handle, u64>,
    /// Freed before the sync began and not allocated again since.
    gone: BTreeSet<Handle>,
    /// Allocated after the sync began (may or may not be there).
    unsynced_allocs: BTreeSet<Handle>,
    /// Roots set before it and not changed since.
    roots_kept: BTreeMap<u64, Handle>,
    /// Roots changed since: every value that may be found.
    roots_open: BTreeMap<u64, BTreeSet<Handle>>,
}

fn expect(events: &[Event]) -> Option<Expect> {
    let end = events.iter().rposition(|e| matches!(e, Event::SyncEnd))?;
    let begin = events[..end]
        .iter()
        .rposition(|e| matches!(e, Event::SyncBegin))
        .expect("S= without S+");
    let mut live: BTreeMap<Handle, u64> = BTreeMap::new();
    let mut freed: BTreeSet<Handle> = BTreeSet::new();
    let mut roots: BTreeMap<u64, Handle> = BTreeMap::new();
    for e in &events[..begin] {
        match e {
            Event::Alloc(h, op) => {
                live.insert(*h, *op);
                freed.remove(h);
            }
            Event::Free(h) => {
                live.remove(h);
                freed.insert(*h);
            }
            Event::Root(k, h) => {
                roots.insert(*k, *h);
            }
            _ => {}
        }
    }
    let mut x = Expect {
        kept: live,
        gone: freed,
        roots_kept: roots,
        ..Expect::default()
    };
    for e in &events[begin..] {
        match e {
            Event::Alloc(h, _) => {
                x.gone.remove(h);
                x.unsynced_allocs.insert(*h);
            }
            Event::Free(h) => {
                if let Some(op) = x.kept.remove(h) {
                    x.freed_after.insert(*h, op);
                }
            }
            Event::Root(k, h) => {
                let open = x.roots_open.entry(*k).or_default();
                if let Some(old) = x.roots_kept.remove(k) {
                    open.insert(old);
                }
                open.insert(*h);
            }
            _ => {}
        }
    }
    Some(x)
}

/// What the copy lost of what was acknowledged after the last completed
/// sync began: allocations not there, frees reverted.
#[derive(Debug, Default)]
struct Lost {
    allocs: usize,
    frees: usize,
}

/// Check the recovered directory at `dir` against `x`.
fn check_recovered(dir: &Path, x: &Expect, what: &str) -> Lost {
    let verify = Command::new(env!("CARGO_BIN_EXE_segalloc"))
        .arg("verify")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{what}: `segalloc verify` failed ({}): {}{}",
        verify.status,
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    run(async {
        let shard = open_shard(&cfg(dir)).await.unwrap();
        let live: BTreeSet<Handle> = shard.live().collect();
        assert_no_overlap(live.iter().copied());
        for (h, op) in &x.kept {
            assert!(
                live.contains(h),
                "{what}: {h}, live at the last sync, is lost"
            );
            let pin = shard.pin(*h).await.unwrap();
            assert!(
                check_pattern(&pin, h.len() as usize, handle_seed(h, *op)),
                "{what}: the bytes of {h}, live at the last sync, changed"
            );
        }
        for (h, op) in &x.freed_after {
            if live.contains(h) {
                let pin = shard.pin(*h).await.unwrap();
                assert!(
                    check_pattern(&pin, h.len() as usize, handle_seed(h, *op)),
                    "{what}: {h} came back after a reverted free with other bytes"
                );
            }
        }
        for h in &x.gone {
            assert!(
                !live.contains(h),
                "{what}: {h}, freed before the last sync, is back"
            );
        }
        for (k, h) in &x.roots_kept {
            assert_eq!(shard.root(&root_name(*k)), Some(*h), "{what}: root {k}");
        }
        for (k, hs) in &x.roots_open {
            let got = shard.root(&root_name(*k));
            assert!(
                got.is_none_or(|g| hs.contains(&g)),
                "{what}: root {k} names {got:?}, never set"
            );
        }
        Lost {
            allocs: x
                .unsynced_allocs
                .iter()
                .filter(|h| !live.contains(h))
                .count(),
            frees: x.freed_after.keys().filter(|h| live.contains(h)).count(),
        }
    })
}

// ---------------------------------------------------------------------------
// One round.
// ---------------------------------------------------------------------------

/// Run the child on a fresh file system, cut the power, check the copy.
fn round(work: &Path, seed: u64) -> Lost {
    let mut rng = Rng::new(seed);
    let image = work.join("disk.img");
    let cut = work.join("cut.img");
    make_image(&image, IMAGE_BYTES).unwrap();
    let dev = Loop::attach(&image).unwrap();
    let mnt = Mount::new(&dev.dev, &work.join("mnt")).unwrap();
    let data = mnt.at.join("data");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "powercut_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ENV_DIR, &data)
        .env(ENV_SEED, rng.next_u64().to_string())
        .env("SEGALLOC_IO", "sync")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (rx, reader) = line_reader(child.stdout.take().unwrap());
    // Cut after 2 to 8 completed syncs, 0 to 40 ms after the last one.
    let syncs = 2 + rng.below(7);
    let mut seen = 0;
    let mut events = Vec::new();
    while seen < syncs {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("seed {seed}: the child went silent"));
        if let Some(e) = parse(&line) {
            seen += matches!(e, Event::SyncEnd) as u64;
            events.push(e);
        }
    }
    std::thread::sleep(Duration::from_millis(rng.below(40)));
    stop(child.id());
    std::fs::copy(&image, &cut).unwrap();
    child.kill().unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    events.extend(rx.try_iter().filter_map(|l| parse(&l)));
    drop(mnt);
    drop(dev);
    assert!(
        status.code().is_none(),
        "seed {seed}: the child ended by itself ({status}): {}",
        std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default()
    );
    check_no_reuse_before_durable(&events);
    let x = expect(&events).expect("at least one sync completed");
    let dev = Loop::attach(&cut).unwrap();
    let mnt = Mount::new(&dev.dev, &work.join("mnt-cut")).unwrap();
    let what = format!("seed {seed}");
    let lost = check_recovered(&mnt.at.join("data"), &x, &what);
    println!(
        "{what}: {} events, {} kept, {} freed after the sync, {} unsynced allocations; lost {lost:?}",
        events.len(),
        x.kept.len(),
        x.freed_after.len(),
        x.unsynced_allocs.len()
    );
    drop(mnt);
    drop(dev);
    std::fs::remove_file(&image).unwrap();
    std::fs::remove_file(&cut).unwrap();
    lost
}

fn rounds(n: u64) {
    let mut total = Lost::default();
    let lost = power_cut_rounds(n, "SEGALLOC_POWERCUT_SEED", |work, i, seed| {
        println!("round {i}: seed {seed}");
        let lost = round(work, seed);
        total.allocs += lost.allocs;
        total.frees += lost.frees;
        (lost.allocs + lost.frees) as u64
    });
    if lost.is_some() {
        println!("{n} rounds, 0 violations; unsynced work the cuts lost: {total:?}");
    }
}

#[test]
fn power_cut_keeps_what_was_synced() {
    rounds(3);
}

#[test]
#[ignore = "50 rounds, about a minute: cargo test --release --test powercut -- --ignored"]
fn power_cut_keeps_what_was_synced_50_rounds() {
    rounds(common::number_from_env("SEGALLOC_POWERCUT_ROUNDS", 50));
}
