//! A real file system on a loop device, for the power-cut tests: make an
//! ext4 image, attach it with direct I/O, mount it, and stop a process
//! between two system calls so a copy of the image is what a disk would
//! hold after a power cut at that instant (see `tests/powercut.rs`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Mount, find_tool, is_root};

pub fn run_tool(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why this machine cannot run the test, if it cannot.
pub fn cannot_run() -> Option<String> {
    if !is_root() {
        return Some("not running as root (loop devices and mounts need it)".into());
    }
    for t in ["mkfs.ext4", "losetup", "mount", "umount"] {
        if find_tool(t).is_none() {
            return Some(format!("`{t}` not found"));
        }
    }
    None
}

/// A loop device over an image file, detached when dropped.
pub struct Loop {
    pub dev: String,
}

impl Loop {
    pub fn attach(image: &Path) -> Result<Loop, String> {
        let dev = run_tool(
            Command::new(find_tool("losetup").unwrap())
                .args(["--direct-io=on", "--find", "--show"])
                .arg(image),
        )?;
        Ok(Loop { dev })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(find_tool("losetup").unwrap())
            .args(["-d", &self.dev])
            .status();
    }
}

// `Mount` (common) is unmounted when dropped: declare it after its `Loop`.
impl Mount {
    pub fn new(dev: &str, at: &Path) -> Result<Mount, String> {
        std::fs::create_dir_all(at).unwrap();
        run_tool(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "commit=600"])
                .arg(dev)
                .arg(at),
        )?;
        Ok(Mount {
            at: at.to_path_buf(),
        })
    }
}

pub fn make_image(image: &Path, bytes: u64) -> Result<(), String> {
    let f = std::fs::File::create(image).map_err(|e| e.to_string())?;
    f.set_len(bytes).map_err(|e| e.to_string())?;
    drop(f);
    run_tool(
        Command::new(find_tool("mkfs.ext4").unwrap())
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(image),
    )
    .map(|_| ())
}

/// Stop `pid` and wait until every one of its threads is stopped (so none
/// is inside a system call).
pub fn stop(pid: u32) {
    let stopped = Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success(), "kill -STOP {pid}: {stopped}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        let all_stopped = tasks.filter_map(|t| t.ok()).all(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(')').map(|(_, r)| r.trim_start());
            matches!(state.and_then(|s| s.chars().next()), Some('T' | 't'))
        });
        if all_stopped {
            return;
        }
        assert!(Instant::now() < deadline, "the child does not stop");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Rounds run past the `n` asked for while no cut has lost anything yet.
const EXTRA_ROUNDS_MAX: u64 = 5;

/// Run `n` power-cut rounds, each in the same scratch directory with the
/// next seed from `seed_var` (or a random base): `round(work, i, seed)`
/// returns how much unsynced work its cuts lost. Skipped with a message
/// when this machine cannot run them; else the total lost must not be
/// zero, or the rounds would check nothing. A round may lose nothing (its
/// cut landed while a sync ran, say), so while the total is zero after
/// `n` rounds, up to [`EXTRA_ROUNDS_MAX`] more run (with the next seeds).
/// Returns the total (`None` when skipped).
pub fn power_cut_rounds(
    n: u64,
    seed_var: &str,
    mut round: impl FnMut(&Path, u64, u64) -> u64,
) -> Option<u64> {
    if let Some(why) = cannot_run() {
        eprintln!("skipped: {why}");
        return None;
    }
    let base = super::seed_from_env(seed_var);
    let work = tempfile::tempdir().unwrap();
    let mut lost = 0;
    let mut i = 0;
    while i < n || (lost == 0 && i < n + EXTRA_ROUNDS_MAX) {
        if i == n {
            eprintln!("{n} rounds lost no unsynced work: more rounds, up to {EXTRA_ROUNDS_MAX}");
        }
        lost += round(work.path(), i, base.wrapping_add(i));
        i += 1;
    }
    assert!(
        lost > 0,
        "no cut in {i} rounds ever lost unsynced work: the test would check nothing"
    );
    Some(lost)
}
