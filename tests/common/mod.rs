//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod blockdev;

use std::future::Future;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use segalloc::config::MIB;
use segalloc::{
    Config, ConfigBuilder, FileHandleRegistry, IoBackend, MappingConfig, MappingManager, Ring,
};

/// Window size of the test managers: the minimum, 16 MiB.
pub const WINDOW: u64 = 16 * MIB;
/// Growth step of the test managers: 1 MiB.
pub const STEP: u64 = MIB;

/// Run `f` on a current-thread tokio runtime inside a `LocalSet`, the way a
/// shard thread runs.
pub fn run<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, f)
}

/// The configuration of [`manager`]: 16 MiB windows, 1 MiB growth steps, one
/// shard, the backend chosen by `SEGALLOC_IO`. Adjust it and pass it to
/// [`manager_with`].
pub fn builder(dir: &Path, max_open: usize, max_windows: usize) -> ConfigBuilder {
    Config::builder(dir)
        .window_bytes(WINDOW)
        .growth_step_bytes(STEP)
        .max_open_files(max_open)
        .max_windows(max_windows)
        .shards(1)
}

/// A registry and manager over `dir` with small windows (16 MiB) and growth
/// steps (1 MiB), the backend chosen by `SEGALLOC_IO`.
pub fn manager(
    dir: &std::path::Path,
    max_open: usize,
    max_windows: usize,
) -> (Rc<FileHandleRegistry>, MappingManager) {
    let cfg = builder(dir, max_open, max_windows).build().expect("config");
    manager_with(&cfg)
}

pub fn manager_with(cfg: &Config) -> (Rc<FileHandleRegistry>, MappingManager) {
    manager_with_windows(cfg, cfg.max_windows_per_shard())
}

/// As [`manager_with`], with a window cap of `windows` for the manager
/// alone (a `Config` leaves each shard at least 2: the mapping layer's
/// tests go down to 1).
pub fn manager_with_windows(
    cfg: &Config,
    windows: usize,
) -> (Rc<FileHandleRegistry>, MappingManager) {
    let ring = Ring::new(cfg.io_backend()).expect("ring");
    let files = Rc::new(FileHandleRegistry::new(
        ring,
        cfg.max_open_files_per_shard(),
    ));
    let mcfg = MappingConfig {
        max_windows: windows,
        ..MappingConfig::from_config(cfg)
    };
    let mm = MappingManager::new(files.clone(), mcfg);
    (files, mm)
}

/// The backend `Ring::new(IoBackendChoice::Auto)` must pick here: sync when
/// `SEGALLOC_IO=sync`, io_uring otherwise (it works on the test machines).
pub fn expected_backend() -> IoBackend {
    match std::env::var("SEGALLOC_IO").as_deref() {
        Ok("sync") => IoBackend::Sync,
        _ => IoBackend::Uring,
    }
}

/// Whether some mapping of `/proc/self/maps` contains `addr`, and the path
/// it maps.
pub fn mapping_of(addr: *const u8) -> Option<String> {
    let a = addr as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let range = parts.next()?;
        let (lo, hi) = range.split_once('-')?;
        let lo = usize::from_str_radix(lo, 16).ok()?;
        let hi = usize::from_str_radix(hi, 16).ok()?;
        if (lo..hi).contains(&a) {
            return Some(parts.nth(4).unwrap_or("").to_string());
        }
    }
    None
}

/// Bytes of this process's mappings (`/proc/self/maps` regions) of files
/// under `dir`. The kernel may merge two mappings of a file that are
/// adjacent both in memory and in the file into one VMA, so the VMA count
/// may fall below the window count; the bytes mapped do not.
pub fn mapped_bytes_under(dir: &Path) -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("/proc/self/maps");
    maps.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let (lo, hi) = parts.next()?.split_once('-')?;
            let path = parts.nth(4)?;
            if !Path::new(path).starts_with(dir) {
                return None;
            }
            let lo = u64::from_str_radix(lo, 16).ok()?;
            let hi = u64::from_str_radix(hi, 16).ok()?;
            Some(hi - lo)
        })
        .sum()
}

/// Descriptors and VMAs the OS shows under `dir`, as `(fds, vmas)`.
pub fn os_counts(dir: &Path) -> (usize, usize) {
    (
        segalloc::proc::open_fds_under(dir),
        segalloc::proc::vmas_under(dir),
    )
}

/// Poll `cond` (yielding to the runtime between tries) until it holds or
/// `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Whether `path` lies on a tmpfs.
pub fn on_tmpfs(path: &Path) -> bool {
    use nix::sys::statfs::{TMPFS_MAGIC, statfs};
    statfs(path).is_ok_and(|s| s.filesystem_type() == TMPFS_MAGIC)
}

/// A temporary directory on a disk-backed file system, for a test that
/// needs an `fsync` to take time or to clean dirty pages: under cargo's
/// scratch directory (`CARGO_TARGET_TMPDIR`), not the system's temporary
/// folder, which may be a tmpfs (there an `fsync` has nothing to write and
/// returns at once, and every page of a file stays dirty). `None`, with a
/// message naming `test`, when that directory is on a tmpfs as well: the
/// test is then skipped.
pub fn disk_tempdir(test: &str) -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    if on_tmpfs(dir.path()) {
        eprintln!(
            "{test}: skipped: {} is on a tmpfs, and the test needs a disk-backed directory",
            dir.path().display()
        );
        return None;
    }
    Some(dir)
}

/// A repeatable byte pattern for `(file, offset)`, to check data read back.
pub fn pattern(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The files under `dir` that this process holds descriptors on (sorted,
/// one entry per descriptor).
pub fn open_paths_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Helpers of the allocator tests (alloc_*.rs).
// ---------------------------------------------------------------------------

/// The allocator tests' configuration: one shard, 16 MiB windows, 1 MiB
/// growth steps, the backend chosen by `SEGALLOC_IO`.
pub fn small_cfg(dir: &Path) -> Config {
    small_cfg_shards(dir, 1)
}

/// [`small_cfg`] with `shards` shards.
pub fn small_cfg_shards(dir: &Path, shards: usize) -> Config {
    Config::builder(dir)
        .shards(shards)
        .window_bytes(WINDOW)
        .growth_step_bytes(STEP)
        .build()
        .expect("config")
}

/// Crash shard `shard` of `rt` and wait (up to 10 s) until it answers
/// `ShardGone`.
pub fn crash_and_wait_gone(rt: &segalloc::Runtime, shard: usize) {
    rt.crash_shard_for_test(shard);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(
        futures::executor::block_on(rt.spawn_on(shard, |s| async move { s.index() })),
        Err(segalloc::Error::ShardGone { shard: s }) if s as usize == shard
    ) {
        assert!(Instant::now() < deadline, "shard {shard} never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One shard on disk (`dir`), 16 MiB windows, data files of one window, at
/// most two windows mapped (one is the metadata's).
#[allow(dead_code)]
pub fn one_window_builder(dir: &Path) -> ConfigBuilder {
    Config::builder(dir)
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_file_bytes(16 * MIB)
        .max_windows(2)
}

/// [`one_window_builder`], and one descriptor for all the files: a sync of
/// one file holds the descriptor the others need.
#[allow(dead_code)]
pub fn one_descriptor_cfg(dir: &Path) -> Config {
    one_window_builder(dir).max_open_files(1).build().unwrap()
}

/// Under [`one_descriptor_cfg`]: 1 MiB allocations, written, until one
/// lands in data file 1, then a sync. Returns file 0's and file 1's.
#[allow(dead_code)]
pub async fn fill_two_files(shard: &segalloc::Shard) -> (Vec<segalloc::Handle>, segalloc::Handle) {
    let mut in_file_0 = Vec::new();
    loop {
        let a = shard.allocate(MIB).await.unwrap();
        a.pin().fill(0, a.len(), 7).unwrap();
        let h = a.into_handle();
        if h.file_id() == 1 {
            shard.sync().await.unwrap();
            return (in_file_0, h);
        }
        in_file_0.push(h);
    }
}

/// Write `hs` whole again (megabytes to write back: the next `fdatasync`
/// takes a while) and unmap the idle windows.
#[allow(dead_code)]
pub async fn dirty_again(shard: &segalloc::Shard, hs: &[segalloc::Handle]) {
    for h in hs {
        let p = shard.pin(*h).await.unwrap();
        p.fill(0, p.len(), 9).unwrap();
    }
    shard.mappings().evict_idle();
}

/// A `sync` polled once and dropped: its `fdatasync`, in flight, is kept
/// for the file's next sync (with the io_uring backend).
#[allow(dead_code)]
pub fn drop_a_sync_in_flight(shard: &segalloc::Shard) {
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut s = Box::pin(shard.sync());
    let _ = s.as_mut().poll(&mut cx);
}

/// Open `cfg`'s data directory and its shard 0.
///
/// `AlreadyOpen` is retried for up to 5 s: the directory lock is an `flock`
/// on an open file description, and a child that another test thread forks
/// while this test holds the lock keeps a copy of it until its `exec` (the
/// descriptor is close-on-exec), so the lock can linger for a moment after
/// this test closed the directory.
pub async fn open_shard(cfg: &Config) -> segalloc::Result<segalloc::Shard> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let dd = loop {
        match segalloc::DataDir::open(cfg) {
            Err(segalloc::Error::AlreadyOpen { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            other => break std::sync::Arc::new(other?),
        }
    };
    segalloc::Shard::open(dd, cfg, 0).await
}

/// Panic unless no two of `handles` overlap (same data file, intersecting
/// byte ranges) and each is of shard 0 with a non-empty length.
pub fn assert_no_overlap(handles: impl IntoIterator<Item = segalloc::Handle>) {
    let mut v: Vec<(u32, u64, u64, segalloc::Handle)> = handles
        .into_iter()
        .map(|h| (h.file_id(), h.offset(), h.offset() + h.len() as u64, h))
        .collect();
    v.sort_by_key(|x| (x.0, x.1));
    for w in v.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        assert!(a.2 > a.1, "empty slot {}", a.3);
        assert!(
            a.0 != b.0 || a.2 <= b.1,
            "live slots overlap: {} and {}",
            a.3,
            b.3
        );
    }
}

/// Seed of the pattern of the slot named by `h` (mixes the handle bytes and
/// `salt`).
pub fn handle_seed(h: &segalloc::Handle, salt: u64) -> u64 {
    let b = h.to_bytes();
    (crc32c::crc32c(&b) as u64) << 32 ^ crc32c::crc32c(&b[..36]) as u64 ^ salt.rotate_left(17)
}

/// The byte ranges of a slot of `len` bytes that the tests fill: all of it
/// up to 128 KiB, else its first and last 64 KiB.
pub fn pattern_ranges(len: usize) -> Vec<(usize, usize)> {
    const PART: usize = 64 * 1024;
    if len <= 2 * PART {
        vec![(0, len)]
    } else {
        vec![(0, PART), (len - PART, PART)]
    }
}

/// Fill the first `len` bytes of `pin` with the pattern of `seed`.
pub fn write_pattern(pin: &segalloc::PinGuard, len: usize, seed: u64) {
    for (i, (off, n)) in pattern_ranges(len).into_iter().enumerate() {
        pin.write_at(off, &pattern(seed ^ i as u64, n))
            .expect("write pattern");
    }
}

/// Whether the first `len` bytes of `pin` hold the pattern of `seed`.
pub fn check_pattern(pin: &segalloc::PinGuard, len: usize, seed: u64) -> bool {
    pattern_ranges(len)
        .into_iter()
        .enumerate()
        .all(|(i, (off, n))| {
            let mut buf = vec![0u8; n];
            pin.read_at(off, &mut buf).expect("read pattern");
            buf == pattern(seed ^ i as u64, n)
        })
}

/// Decode `Handle::to_hex`'s form, by hand: `tests/cli.rs` checks
/// `Handle::from_hex` against it.
pub fn handle_from_hex(s: &str) -> segalloc::Handle {
    assert_eq!(s.len(), 2 * segalloc::HANDLE_BYTES, "handle hex {s:?}");
    let b: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect();
    segalloc::Handle::from_bytes(&b).expect("handle")
}

/// Copy the directory tree `from` into `to` (created), files byte by byte.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// A small, fast, seedable generator (xorshift64*), for test workloads that
/// must be reproducible from a printed seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

/// The number in `var`, when it is set and parses; else `default`.
pub fn number_from_env<T: std::str::FromStr>(var: &str, default: T) -> T {
    parsed_env(var).unwrap_or(default)
}

fn parsed_env<T: std::str::FromStr>(var: &str) -> Option<T> {
    std::env::var(var).ok().and_then(|s| s.parse().ok())
}

/// A seed from the clock, or from `var` when set (to replay a failure).
pub fn seed_from_env(var: &str) -> u64 {
    parsed_env(var).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    })
}

/// The CPU time a process or thread has run, in clock ticks (user and
/// system): from its `stat` file (`/proc/PID/stat`,
/// `/proc/PID/task/TID/stat`).
pub fn cpu_ticks(stat: &Path) -> u64 {
    let stat = std::fs::read_to_string(stat).unwrap();
    // utime and stime, fields 14 and 15: after the command name, which
    // may hold spaces and parentheses.
    stat[stat.rfind(')').unwrap() + 2..]
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse::<u64>().unwrap())
        .sum()
}

/// Whether the tests run as root (mounts, permission checks).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// What a failed or rejected call must not change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The live handles.
    pub live: std::collections::BTreeSet<segalloc::Handle>,
    /// The live count the shard reports.
    pub count: u64,
    /// The roots.
    pub roots: Vec<(String, segalloc::Handle)>,
}

/// The shard's live set, count and roots.
pub fn snapshot(shard: &segalloc::Shard) -> Snapshot {
    Snapshot {
        live: shard.live().collect(),
        count: shard.live_count(),
        roots: shard.roots(),
    }
}

/// Check a freshly reopened shard is consistent (no overlapping live slots,
/// the count agrees, every live handle pins with its length) and return its
/// live set and roots.
pub async fn check_reopened(
    shard: &segalloc::Shard,
) -> (
    std::collections::BTreeSet<segalloc::Handle>,
    Vec<(String, segalloc::Handle)>,
) {
    let live: Vec<segalloc::Handle> = shard.live().collect();
    assert_no_overlap(live.iter().copied());
    assert_eq!(shard.live_count(), live.len() as u64);
    for h in &live {
        let pin = shard
            .pin(*h)
            .await
            .unwrap_or_else(|e| panic!("pin of live {h}: {e}"));
        assert_eq!(pin.len(), h.len() as usize);
    }
    (live.into_iter().collect(), shard.roots())
}

/// Forward a child's stdout to a channel, line by line, from a thread (so
/// the parent can wait with a timeout and keep reading after a SIGKILL).
pub fn line_reader(
    stdout: std::process::ChildStdout,
) -> (
    std::sync::mpsc::Receiver<String>,
    std::thread::JoinHandle<()>,
) {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}

/// The path of `tool` if it is on `PATH` (or in the sbin folders).
pub fn find_tool(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Run `cmd`; its stderr in the error when it fails.
#[allow(dead_code)]
pub fn run_tool(cmd: &mut std::process::Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A tmpfs of `size` (`64m`) mounted at `at` (made if missing), mode 0700,
/// unmounted when the `Mount` drops. Needs root.
#[allow(dead_code)]
pub fn mount_tmpfs(at: &std::path::Path, size: &str) -> Result<Mount, String> {
    mount_tmpfs_with(at, &format!("size={size}"))
}

/// A tmpfs at `at` with the mount options `options` (and mode 0700).
#[allow(dead_code)]
pub fn mount_tmpfs_with(at: &std::path::Path, options: &str) -> Result<Mount, String> {
    std::fs::create_dir_all(at).unwrap();
    run_tool(
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("{options},mode=0700"))
            .arg("tmpfs")
            .arg(at),
    )?;
    Ok(Mount {
        at: at.to_path_buf(),
    })
}

/// A mounted file system, unmounted when dropped (also when a test fails).
pub struct Mount {
    /// The mount point.
    pub at: std::path::PathBuf,
}

impl Drop for Mount {
    fn drop(&mut self) {
        let ok = std::process::Command::new("umount")
            .arg(&self.at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a child being reaped?): detach it lazily.
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.at)
                .status();
        }
    }
}

/// The `kv_server` example (see [`example_binary`]).
pub fn kv_server_binary() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| example_binary("kv_server"))
}

/// The example `name`, built with `cargo build --example <name> --profile
/// P` (`--message-format json` tells where cargo put it). Examples have no
/// `CARGO_BIN_EXE_*` variable.
///
/// P is `checked` when the test itself was built with it (the example then
/// runs with overflow checks and debug assertions on, as that run means
/// to, and shares the test's compiled dependencies; the server parses the
/// tests' hostile frames so), else `release`: an unoptimized example is
/// slow to build and to run, and the release one is usually built already.
/// Cargo holds its build lock only while it builds, so tests that ask at
/// once wait for one another, not for a test run.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    // The test runs as `<target dir>/<profile dir>/deps/<test>-<hash>`.
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name);
    let profile = if profile_dir.is_some_and(|d| d == "checked") {
        "checked"
    } else {
        "release"
    };
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--example",
        name,
        "--profile",
        profile,
        "--message-format",
        "json",
    ]);
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run cargo build");
    assert!(out.status.success(), "cargo build --example {name} failed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let name_field = format!("\"name\":\"{name}\"");
    let line = stdout
        .lines()
        .rfind(|l| l.contains(&name_field) && l.contains("\"executable\":\""))
        .unwrap_or_else(|| panic!("cargo reports the {name} executable"));
    let start = line.find("\"executable\":\"").expect("field") + "\"executable\":\"".len();
    let end = start + line[start..].find('"').expect("closing quote");
    std::path::PathBuf::from(&line[start..end])
}

/// Hold shard `index`'s thread (nothing on it runs, its inboxes are not
/// drained) until the returned sender sends or is dropped; the handle
/// resolves once it is let go.
pub fn hold_shard(
    rt: &segalloc::Runtime,
    index: usize,
) -> (std::sync::mpsc::Sender<()>, segalloc::JoinHandle<()>) {
    let (release, held) = std::sync::mpsc::channel::<()>();
    let busy = rt.spawn_on(index, move |_| async move {
        let _ = held.recv();
    });
    (release, busy)
}

/// Free another shard's handle `h` from `s` over and over (its owner
/// rejects all but one) until the owner's channel and `s`'s buffer for it
/// are full: the number of frees acknowledged before the first refusal.
pub fn free_until_backpressure(s: &segalloc::Shard, h: segalloc::Handle) -> u64 {
    let mut queued = 0u64;
    loop {
        match s.free(h) {
            Ok(()) => queued += 1,
            Err(segalloc::Error::Backpressure { owner, .. }) if owner == h.shard() => {
                return queued;
            }
            Err(e) => panic!("free: {e}"),
        }
        assert!(queued < 10_000_000, "the owner's channel never filled");
    }
}

/// `n` allocations of `bytes` on shard `shard` of `rt`, synced: their handles.
pub fn allocate_synced(
    rt: &segalloc::Runtime,
    shard: usize,
    n: usize,
    bytes: u64,
) -> Vec<segalloc::Handle> {
    futures::executor::block_on(rt.spawn_on(shard, move |s| async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(s.allocate(bytes).await.unwrap().into_handle());
        }
        s.sync().await.unwrap();
        v
    }))
    .unwrap()
}

/// [`FileHandleRegistry::register`](segalloc::FileHandleRegistry::register)
/// of a test's own file.
pub fn register(files: &segalloc::FileHandleRegistry, path: impl AsRef<Path>) -> segalloc::FileId {
    // SAFETY: every test maps files of its own temporary directory, from
    // its own thread only; nothing else maps or writes them.
    unsafe { files.register(path) }
}

/// [`FileHandleRegistry::register_foreign`](segalloc::FileHandleRegistry::register_foreign)
/// of a test's own file.
pub fn register_foreign(
    files: &segalloc::FileHandleRegistry,
    path: impl AsRef<Path>,
) -> segalloc::Result<segalloc::FileId> {
    // SAFETY: as `register`.
    unsafe { files.register_foreign(path) }
}
