//! What the operating system says about this process: open descriptors,
//! mappings and resident memory, read from `/proc/self`. Examples and tests
//! use these figures to check our own counters against the kernel's.

use std::path::Path;

/// Number of open file descriptors (`/proc/self/fd`).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count().saturating_sub(1)) // the read_dir's own fd
        .unwrap_or(0)
}

/// Number of descriptors open on files under `dir` (`/proc/self/fd` links).
pub fn open_fds_under(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|p| p.starts_with(dir))
        .count()
}

/// Number of mappings (VMAs) of the process (`/proc/self/maps` lines).
pub fn vma_count() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Number of mappings (VMAs) of files under `dir`.
pub fn vmas_under(dir: &Path) -> usize {
    let d = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/maps")
        .map(|s| {
            s.lines()
                .filter(|l| {
                    l.split_whitespace()
                        .nth(5)
                        .is_some_and(|p| p.starts_with(&*d))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Resident set size in bytes (`VmRSS` of `/proc/self/status`).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}
