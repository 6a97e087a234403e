//! Configuration: the tunables, validated once, with safe defaults
//! computed from the machine ([`Limits::compute`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys;

/// One KiB.
pub const KIB: u64 = 1024;
/// One MiB.
pub const MIB: u64 = 1024 * KIB;
/// One GiB.
pub const GIB: u64 = 1024 * MIB;

/// The largest segment, and so the largest allocation: 16 MiB. Windows are a
/// multiple of it, so a segment never crosses a window.
pub const MAX_SEGMENT_BYTES: u64 = crate::format::classes::MAX_SEGMENT_BYTES;
/// Former name of [`MAX_SEGMENT_BYTES`].
#[deprecated(since = "0.1.0", note = "renamed to `MAX_SEGMENT_BYTES`")]
pub const SEGMENT_BYTES_MAX: u64 = MAX_SEGMENT_BYTES;
/// Default window size: 1 GiB.
pub const WINDOW_BYTES_DEFAULT: u64 = GIB;
/// The largest window: 64 GiB.
const MAX_WINDOW_BYTES: u64 = 64 * GIB;
/// Default growth step: files grow 64 MiB at a time inside a window.
pub const GROWTH_STEP_BYTES_DEFAULT: u64 = 64 * MIB;
/// The default fd cap.
pub const MAX_OPEN_FILES_DEFAULT: usize = 256;
/// The default window (VMA) cap.
pub const MAX_WINDOWS_DEFAULT: usize = 8192;
/// Former name of [`MAX_WINDOWS_DEFAULT`].
#[deprecated(since = "0.1.0", note = "renamed to `MAX_WINDOWS_DEFAULT`")]
pub const MAX_EXTENTS_DEFAULT: usize = MAX_WINDOWS_DEFAULT;
/// Descriptors left to the rest of the process (headroom).
pub const FD_HEADROOM: u64 = 64;
/// VMAs left to the rest of the process (heap, stacks, libraries, …).
pub const MAP_HEADROOM: u64 = 1024;
/// Default prefetch: 0 (the fault-in path issues no WILLNEED).
pub const PREFETCH_AHEAD_BYTES_DEFAULT: u64 = 0;
/// Default time a `pin` waits for a window when every window is pinned.
pub const PIN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

const _: () = assert!(WINDOW_BYTES_DEFAULT.is_multiple_of(MAX_SEGMENT_BYTES));
const _: () = assert!(WINDOW_BYTES_DEFAULT.is_multiple_of(GROWTH_STEP_BYTES_DEFAULT));

/// Which idle window is unmapped first when the window cap is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Least recently pinned.
    #[default]
    Lru,
    /// Least frequently pinned (ties: least recently).
    Lfu,
    /// Second chance: a sweeping hand skips windows pinned since its last pass.
    Clock,
}

/// The access-pattern advice applied to whole windows (never to part of one,
/// which would split the VMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MadvisePolicy {
    /// `MADV_RANDOM`: no read-ahead; every first touch of a page faults it
    /// in alone.
    Random,
    /// `MADV_SEQUENTIAL`: aggressive read-ahead, pages behind dropped early.
    Sequential,
    /// `MADV_NORMAL`: the kernel's default; no madvise is issued. The
    /// default: filling a heap (allocate + write 100 B, one shard) measured
    /// about 300 ns per record against about 360 with `Random`.
    #[default]
    Normal,
}

pub use crate::io::IoBackendChoice;

/// The most shards a data directory has.
pub const MAX_SHARDS: usize = 1024;
/// Former name of [`MAX_SHARDS`].
#[deprecated(since = "0.1.0", note = "renamed to `MAX_SHARDS`")]
pub const SHARDS_MAX: usize = MAX_SHARDS;

/// Windows a shard needs at the least: its metadata's and one for data
/// (the allocator refuses fewer when a shard opens).
pub(crate) const MIN_WINDOWS_PER_SHARD: usize = 2;

/// Check that the process-wide caps split between the shards without
/// exceeding them: every shard needs at least one descriptor and
/// [`MIN_WINDOWS_PER_SHARD`] windows. A shard count left at its default (one
/// per core) is lowered to fit.
fn split_caps(c: &mut Config, shards_set: bool) -> Result<()> {
    let fit = MAX_SHARDS
        .min(c.max_open_files)
        .min(c.max_windows / MIN_WINDOWS_PER_SHARD);
    if !shards_set {
        c.shards = c.shards.clamp(1, fit.max(1));
    }
    if c.shards == 0 || c.shards > MAX_SHARDS {
        return Err(Error::InvalidConfig(format!(
            "shards must be in 1..={MAX_SHARDS}, got {}",
            c.shards
        )));
    }
    if c.max_open_files == 0 || c.max_windows == 0 {
        return Ok(()); // refused below with its own message
    }
    if !fits_caps(c, c.shards) {
        return Err(Error::InvalidConfig(format!(
            "{} shards need at least one descriptor and {MIN_WINDOWS_PER_SHARD} windows \
             each, but the process-wide caps are {} descriptors (max_open_files) and {} \
             windows (max_windows): lower the shard count or raise the caps",
            c.shards, c.max_open_files, c.max_windows
        )));
    }
    Ok(())
}

/// The manifest of the data directory at `dir`, whose shard count, window
/// size and file size are the defaults of an existing directory. `None`
/// without a readable, valid manifest (the open then reports why).
fn existing_manifest(dir: &Path) -> Option<crate::format::Manifest> {
    let bytes = sys::read_regular(&dir.join(crate::format::MANIFEST_FILE), 4096).ok()?;
    let (m, _) = crate::format::Manifest::decode(&bytes, "").ok()?;
    Some(m)
}

/// Whether `shards` shards fit the caps of `c`: at most [`MAX_SHARDS`],
/// each with a descriptor and [`MIN_WINDOWS_PER_SHARD`] windows.
fn fits_caps(c: &Config, shards: usize) -> bool {
    (1..=MAX_SHARDS).contains(&shards)
        && shards <= c.max_open_files
        && shards.saturating_mul(MIN_WINDOWS_PER_SHARD) <= c.max_windows
}

/// Safe process-wide caps derived from the machine ([`Limits::compute`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Descriptor cap: `min(RLIMIT_NOFILE soft - 64, 256)`, at least 1.
    pub max_open_files: usize,
    /// Window cap: `min(8192, vm.max_map_count - 1024)`, at least 2.
    pub max_windows: usize,
}

impl Limits {
    /// Compute the caps from `RLIMIT_NOFILE` and `vm.max_map_count`.
    ///
    /// On a stock machine (soft fd limit 1024, `max_map_count` 65530) this
    /// gives 256 descriptors and 8192 windows. The caps always leave enough
    /// for one shard, so [`Config::new`] never fails for want of them: at
    /// least 1 descriptor (on a machine with almost no descriptors left)
    /// and at least 2 windows, a shard's metadata's and one for data (when
    /// `max_map_count` is 1026 or less; they then come out of the 1024
    /// mappings left to the rest of the process).
    pub fn compute() -> Limits {
        let soft = sys::nofile_limit().map(|(s, _)| s).unwrap_or(1024);
        let map_count = sys::max_map_count().unwrap_or(65530);
        Limits::from_os(soft, map_count)
    }

    /// The caps for a soft `RLIMIT_NOFILE` of `soft_nofile` and a
    /// `vm.max_map_count` of `max_map_count`.
    fn from_os(soft_nofile: u64, max_map_count: u64) -> Limits {
        let max_open_files = soft_nofile
            .saturating_sub(FD_HEADROOM)
            .clamp(1, MAX_OPEN_FILES_DEFAULT as u64) as usize;
        let max_windows = max_map_count
            .saturating_sub(MAP_HEADROOM)
            .clamp(MIN_WINDOWS_PER_SHARD as u64, MAX_WINDOWS_DEFAULT as u64)
            as usize;
        Limits {
            max_open_files,
            max_windows,
        }
    }
}

/// A validated configuration. Build one with [`Config::new`] (zero
/// configuration) or [`Config::builder`].
///
/// ```
/// use segalloc::{Config, config::MIB};
/// let cfg = Config::builder("/tmp/segalloc-doc")
///     .window_bytes(64 * MIB)
///     .max_open_files(32)
///     .build()
///     .unwrap();
/// assert_eq!(cfg.window_bytes(), 64 * MIB);
/// assert!(Config::builder("/tmp/x").window_bytes(3 * MIB).build().is_err());
/// ```
#[derive(Clone, Debug)]
pub struct Config {
    dir: PathBuf,
    shards: usize,
    window_bytes: u64,
    growth_step_bytes: u64,
    max_file_bytes: u64,
    max_open_files: usize,
    max_windows: usize,
    eviction_policy: EvictionPolicy,
    adaptive_eviction: bool,
    prefetch_ahead_bytes: u64,
    madvise_policy: MadvisePolicy,
    io_backend: IoBackendChoice,
    pin_timeout: Duration,
    read_only: bool,
}

impl Config {
    /// Zero configuration: one shard per core (an existing directory keeps
    /// its own count), 1 GiB windows, 64 MiB growth steps, caps from
    /// [`Limits::compute`].
    pub fn new(dir: impl AsRef<Path>) -> Config {
        Config::builder(dir)
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder starting from the defaults of [`Config::new`].
    pub fn builder(dir: impl AsRef<Path>) -> ConfigBuilder {
        Config::builder_with_limits(dir, Limits::compute())
    }

    /// [`Config::builder`] with the caps `limits` instead of the machine's.
    fn builder_with_limits(dir: impl AsRef<Path>, limits: Limits) -> ConfigBuilder {
        ConfigBuilder {
            cfg: Config {
                dir: dir.as_ref().to_path_buf(),
                shards: sys::available_cpus(),
                window_bytes: WINDOW_BYTES_DEFAULT,
                growth_step_bytes: GROWTH_STEP_BYTES_DEFAULT,
                max_file_bytes: 64 * GIB,
                max_open_files: limits.max_open_files,
                max_windows: limits.max_windows,
                eviction_policy: EvictionPolicy::default(),
                adaptive_eviction: true,
                prefetch_ahead_bytes: PREFETCH_AHEAD_BYTES_DEFAULT,
                madvise_policy: MadvisePolicy::default(),
                io_backend: IoBackendChoice::default(),
                pin_timeout: PIN_TIMEOUT_DEFAULT,
                read_only: false,
            },
            growth_step_set: false,
            shards_set: false,
            window_set: false,
            max_file_set: false,
            window_mb_overflow: None,
            prefetch_mb_overflow: None,
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }
    /// Window size in bytes.
    pub fn window_bytes(&self) -> u64 {
        self.window_bytes
    }
    /// Growth step in bytes.
    pub fn growth_step_bytes(&self) -> u64 {
        self.growth_step_bytes
    }
    /// Maximum size of one data file.
    pub fn max_file_bytes(&self) -> u64 {
        self.max_file_bytes
    }
    /// Process-wide descriptor cap (each shard gets its share).
    pub fn max_open_files(&self) -> usize {
        self.max_open_files
    }
    /// Process-wide window cap (each shard gets its share).
    pub fn max_windows(&self) -> usize {
        self.max_windows
    }
    /// Descriptor cap of one shard: `max_open_files / shards` (at least 1:
    /// a configuration with more shards than descriptors is refused).
    pub fn max_open_files_per_shard(&self) -> usize {
        (self.max_open_files / self.shards).max(1)
    }
    /// Window cap of one shard: `max_windows / shards`, at least 2 (a
    /// configuration that leaves a shard fewer is refused).
    pub fn max_windows_per_shard(&self) -> usize {
        (self.max_windows / self.shards).max(MIN_WINDOWS_PER_SHARD)
    }
    /// Former name of [`max_windows`](Self::max_windows).
    #[deprecated(since = "0.1.0", note = "renamed to `max_windows`")]
    pub fn max_extents(&self) -> usize {
        self.max_windows
    }
    /// Former name of [`max_windows_per_shard`](Self::max_windows_per_shard).
    #[deprecated(since = "0.1.0", note = "renamed to `max_windows_per_shard`")]
    pub fn max_extents_per_shard(&self) -> usize {
        self.max_windows_per_shard()
    }
    /// Eviction order of idle windows.
    pub fn eviction_policy(&self) -> EvictionPolicy {
        self.eviction_policy
    }
    /// Whether eviction adapts when it thrashes (see
    /// [`ConfigBuilder::adaptive_eviction`]).
    pub fn adaptive_eviction(&self) -> bool {
        self.adaptive_eviction
    }
    /// Bytes of `MADV_WILLNEED` issued after a pinned range on fault-in
    /// (at most to the end of its window).
    pub fn prefetch_ahead_bytes(&self) -> u64 {
        self.prefetch_ahead_bytes
    }
    /// Advice applied to whole windows.
    pub fn madvise_policy(&self) -> MadvisePolicy {
        self.madvise_policy
    }
    /// The io backend choice (before `SEGALLOC_IO`).
    pub fn io_backend(&self) -> IoBackendChoice {
        self.io_backend
    }
    /// How long `pin` waits for a window under pressure.
    pub fn pin_timeout(&self) -> Duration {
        self.pin_timeout
    }
    /// Whether files are opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Builder for [`Config`]; [`ConfigBuilder::build`] validates every value.
#[derive(Clone, Debug)]
pub struct ConfigBuilder {
    cfg: Config,
    growth_step_set: bool,
    shards_set: bool,
    window_set: bool,
    max_file_set: bool,
    /// A `window_size_mb` whose bytes do not fit in a `u64` (refused by
    /// `build`, unless a later window setter replaced it).
    window_mb_overflow: Option<u64>,
    /// The same for `prefetch_ahead_mb`.
    prefetch_mb_overflow: Option<u64>,
}

impl ConfigBuilder {
    /// Number of shards. Default: an existing data directory's own count
    /// (read from its manifest when [`build`](Self::build) runs), else one
    /// per available core, lowered to fit the caps.
    pub fn shards(mut self, n: usize) -> Self {
        self.cfg.shards = n;
        self.shards_set = true;
        self
    }
    /// Window size: a multiple of 16 MiB, at most 64 GiB. Default: an
    /// existing data directory's own (read from its manifest when
    /// [`build`](Self::build) runs), else 1 GiB.
    pub fn window_bytes(mut self, bytes: u64) -> Self {
        self.cfg.window_bytes = bytes;
        self.window_mb_overflow = None;
        self.window_set = true;
        self
    }
    /// The window size in MiB: a multiple of 16, at most 65536 (64 GiB).
    /// `build` refuses a value whose bytes do not fit in a `u64` (2^44 MiB
    /// or more) as it refuses any other above 64 GiB.
    pub fn window_size_mb(self, mb: u64) -> Self {
        match mb.checked_mul(MIB) {
            Some(bytes) => self.window_bytes(bytes),
            None => ConfigBuilder {
                window_mb_overflow: Some(mb),
                window_set: true,
                ..self
            },
        }
    }
    /// Growth step: a multiple of the page size that divides the window
    /// (default `min(64 MiB, window)`).
    pub fn growth_step_bytes(mut self, bytes: u64) -> Self {
        self.cfg.growth_step_bytes = bytes;
        self.growth_step_set = true;
        self
    }
    /// Maximum size of one data file: a multiple of the window. Default: an
    /// existing data directory's own (read from its manifest when
    /// [`build`](Self::build) runs), else 64 GiB.
    pub fn max_file_bytes(mut self, bytes: u64) -> Self {
        self.cfg.max_file_bytes = bytes;
        self.max_file_set = true;
        self
    }
    /// Process-wide descriptor cap (default from [`Limits::compute`]).
    pub fn max_open_files(mut self, n: usize) -> Self {
        self.cfg.max_open_files = n;
        self
    }
    /// Process-wide window cap: at least 2 per shard (the metadata's window
    /// and one for data); `build` refuses fewer.
    pub fn max_windows(mut self, n: usize) -> Self {
        self.cfg.max_windows = n;
        self
    }
    /// Former name of [`max_windows`](Self::max_windows).
    #[deprecated(since = "0.1.0", note = "renamed to `max_windows`")]
    pub fn max_extents(self, n: usize) -> Self {
        self.max_windows(n)
    }
    /// Former name of [`max_windows`](Self::max_windows).
    #[deprecated(since = "0.1.0", note = "renamed to `max_windows`")]
    pub fn max_mmap_extents(self, n: usize) -> Self {
        self.max_windows(n)
    }
    /// Eviction order (default LRU).
    pub fn eviction_policy(mut self, p: EvictionPolicy) -> Self {
        self.cfg.eviction_policy = p;
        self
    }
    /// Adapt eviction when it thrashes (default on): while at least 3 in 4
    /// recent fault-ins are of windows evicted recently (the working set is
    /// larger than the window cap), the most recently mapped idle window is
    /// evicted first, and one eviction in 8 (drawn at random, so that no
    /// periodic pattern falls in step with it) follows the policy. A scan or
    /// a skewed working set larger than the cap then keeps most of its
    /// windows mapped (`cargo run --release --example evict` measures it);
    /// off, the policy alone decides.
    pub fn adaptive_eviction(mut self, on: bool) -> Self {
        self.cfg.adaptive_eviction = on;
        self
    }
    /// Read-ahead hint in bytes (`prefetch_ahead_mb` in MiB, default 0):
    /// after a fault-in, `MADV_WILLNEED` on this many bytes past the range,
    /// inside its window and the file's reserved bytes. Any value is
    /// accepted; one of a window or more (up to `u64::MAX`) reads ahead to
    /// the end of the window.
    pub fn prefetch_ahead_bytes(mut self, bytes: u64) -> Self {
        self.cfg.prefetch_ahead_bytes = bytes;
        self.prefetch_mb_overflow = None;
        self
    }
    /// The read-ahead hint in MiB. `build` refuses a value whose bytes do
    /// not fit in a `u64` (2^44 MiB or more).
    pub fn prefetch_ahead_mb(self, mb: u64) -> Self {
        match mb.checked_mul(MIB) {
            Some(bytes) => self.prefetch_ahead_bytes(bytes),
            None => ConfigBuilder {
                prefetch_mb_overflow: Some(mb),
                ..self
            },
        }
    }
    /// Whole-window advice (default `Normal`: no advice).
    pub fn madvise_policy(mut self, p: MadvisePolicy) -> Self {
        self.cfg.madvise_policy = p;
        self
    }
    /// io backend (default auto; `SEGALLOC_IO` overrides auto).
    pub fn io_backend(mut self, b: IoBackendChoice) -> Self {
        self.cfg.io_backend = b;
        self
    }
    /// How long `pin` waits when every window is pinned (default 5 s): any
    /// positive duration. One too long to be added to the current time
    /// (`Duration::MAX`, for one) means no timeout: `pin` waits until a
    /// window is released.
    pub fn pin_timeout(mut self, t: Duration) -> Self {
        self.cfg.pin_timeout = t;
        self
    }
    /// Open an existing directory read-only (default off): nothing is
    /// created or written (a missing directory is
    /// [`Error::DirNotFound`], a missing shard
    /// folder an error naming it), allocations can be pinned and read, and
    /// every call that would change the directory fails with
    /// [`Error::ReadOnly`]. Its locks are shared:
    /// read-only opens of one directory share it, while a writable open
    /// and a read-only one refuse each other
    /// ([`Error::AlreadyOpen`]), since a reader's
    /// safe reads of a mapped file would race a writer's writes. To look at
    /// a directory another process has open, use
    /// [`inspect`](crate::inspect) or the `segalloc` tool.
    pub fn read_only(mut self, ro: bool) -> Self {
        self.cfg.read_only = ro;
        self
    }

    /// Validate and return the configuration.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] when a value is out of range: zero shards or
    /// caps, a window that is not a positive multiple of 16 MiB or is above
    /// 64 GiB, a growth step that is not a page multiple dividing the
    /// window, a maximum file size that is not a multiple of the window or
    /// that the directory's 32-bit block numbers cannot address (2^48 bytes
    /// or more), a size in MiB whose bytes do not fit in a `u64`, a zero
    /// `pin_timeout`.
    pub fn build(mut self) -> Result<Config> {
        let c = &mut self.cfg;
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if let Some(mb) = self.window_mb_overflow {
            return bad(format!(
                "window_size_mb must be at most {} (64 GiB), got {mb}",
                MAX_WINDOW_BYTES / MIB
            ));
        }
        if let Some(mb) = self.prefetch_mb_overflow {
            return bad(format!(
                "prefetch_ahead_mb must be at most {} (its bytes fit in 64 bits), got {mb}",
                u64::MAX / MIB
            ));
        }
        // An existing directory's shard count is fixed: left unset, it is
        // that count (the cores or the caps may have changed since), when
        // it fits the caps (else the default stays, lowered to fit, and the
        // open reports the `Mismatch`: `Config::new` never fails). So are
        // its window and file sizes: left unset, they are its own when they
        // are valid (else the open reports the directory).
        let existing = existing_manifest(&c.dir);
        if let Some(m) = &existing {
            let n = usize::from(m.shard_count);
            if !self.shards_set && fits_caps(c, n) {
                c.shards = n;
                self.shards_set = true;
            }
            let window = if self.window_set {
                c.window_bytes
            } else {
                m.window_bytes
            };
            let window_ok = window != 0
                && window.is_multiple_of(MAX_SEGMENT_BYTES)
                && window <= MAX_WINDOW_BYTES;
            if !self.window_set && window_ok {
                c.window_bytes = window;
            }
            if !self.max_file_set
                && window_ok
                && m.max_file_bytes.is_multiple_of(window)
                && m.max_file_bytes != 0
                && m.max_file_bytes < FILE_BYTES_LIMIT
            {
                c.max_file_bytes = m.max_file_bytes;
            }
        }
        split_caps(c, self.shards_set)?;
        if c.window_bytes == 0 || !c.window_bytes.is_multiple_of(MAX_SEGMENT_BYTES) {
            return bad(format!(
                "window_bytes must be a positive multiple of {MAX_SEGMENT_BYTES} (16 MiB), got {}",
                c.window_bytes
            ));
        }
        if c.window_bytes > MAX_WINDOW_BYTES {
            return bad(format!(
                "window_bytes must be at most 64 GiB, got {}",
                c.window_bytes
            ));
        }
        if !self.growth_step_set {
            c.growth_step_bytes = GROWTH_STEP_BYTES_DEFAULT.min(c.window_bytes);
        }
        let page = sys::page_size() as u64;
        if c.growth_step_bytes == 0
            || !c.growth_step_bytes.is_multiple_of(page)
            || !c.window_bytes.is_multiple_of(c.growth_step_bytes)
        {
            return bad(format!(
                "growth_step_bytes must be a multiple of the page size ({page}) that divides \
                 window_bytes ({}), got {}",
                c.window_bytes, c.growth_step_bytes
            ));
        }
        if c.max_file_bytes == 0 || !c.max_file_bytes.is_multiple_of(c.window_bytes) {
            return bad(format!(
                "max_file_bytes must be a positive multiple of window_bytes ({}), got {}",
                c.window_bytes, c.max_file_bytes
            ));
        }
        // Block numbers in the directory are 32-bit, in 64 KiB blocks: a
        // data file holds at most 2^32 blocks (the allocator checks the same
        // bound when it opens).
        const FILE_BYTES_LIMIT: u64 = (1 << 32) * 64 * 1024;
        if c.max_file_bytes >= FILE_BYTES_LIMIT {
            return bad(format!(
                "max_file_bytes must be below {FILE_BYTES_LIMIT} (2^32 blocks of 64 KiB), got {}",
                c.max_file_bytes
            ));
        }
        if c.max_open_files == 0 {
            return bad("max_open_files must be at least 1".into());
        }
        if c.max_windows == 0 {
            return bad(format!(
                "max_windows must be at least {MIN_WINDOWS_PER_SHARD} per shard, got 0"
            ));
        }
        if c.pin_timeout.is_zero() {
            return bad("pin_timeout must be positive".into());
        }
        Ok(self.cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)]
    fn the_former_names_still_set_and_read_the_same_values() {
        let b = Config::builder("/tmp/none").shards(2);
        let c = b.clone().max_extents(6).build().unwrap();
        assert_eq!((c.max_windows(), c.max_extents()), (6, 6));
        assert_eq!(
            (c.max_windows_per_shard(), c.max_extents_per_shard()),
            (3, 3)
        );
        let c = b.max_mmap_extents(8).build().unwrap();
        assert_eq!(c.max_windows(), 8);
        assert_eq!(MAX_EXTENTS_DEFAULT, MAX_WINDOWS_DEFAULT);
        assert_eq!(
            (SEGMENT_BYTES_MAX, SHARDS_MAX),
            (MAX_SEGMENT_BYTES, MAX_SHARDS)
        );
    }

    #[test]
    fn defaults_are_valid_and_bounded() {
        let c = Config::new("/tmp/none");
        assert_eq!(c.window_bytes(), GIB);
        assert!(c.max_open_files() >= 1 && c.max_open_files() <= MAX_OPEN_FILES_DEFAULT);
        assert!(c.max_windows() >= 2 && c.max_windows() <= MAX_WINDOWS_DEFAULT);
        assert!(c.max_windows_per_shard() >= 2);
        assert_eq!(c.growth_step_bytes(), 64 * MIB);
    }

    fn invalid_config_message(b: ConfigBuilder) -> String {
        match b.build() {
            Err(Error::InvalidConfig(m)) => m,
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn mib_setters_that_overflow_are_refused_naming_the_value_given() {
        let b = || Config::builder("/tmp/none");
        // 2^44 MiB is 2^64 bytes; 2^44 + 16 MiB wrapped to a 16 MiB window.
        for mb in [(1u64 << 44) + 16, 1 << 44, u64::MAX / 2, u64::MAX] {
            let m = invalid_config_message(b().window_size_mb(mb));
            assert!(
                m.contains("window_size_mb") && m.contains(&format!("got {mb}")),
                "{m}"
            );
            let m = invalid_config_message(b().prefetch_ahead_mb(mb));
            assert!(
                m.contains("prefetch_ahead_mb") && m.contains(&format!("got {mb}")),
                "{m}"
            );
        }
        // The largest values that fit.
        let c = b().window_size_mb(64 * 1024).build().unwrap();
        assert_eq!(c.window_bytes(), 64 * GIB);
        let mb = u64::MAX / MIB;
        let c = b().prefetch_ahead_mb(mb).build().unwrap();
        assert_eq!(c.prefetch_ahead_bytes(), mb * MIB);
        // Past 64 GiB but without overflow: refused by the window's bound.
        assert!(b().window_size_mb(64 * 1024 + 16).build().is_err());
        // A later setter of the same value replaces the one that overflowed.
        let c = b().window_size_mb(u64::MAX).window_bytes(32 * MIB);
        assert_eq!(c.build().unwrap().window_bytes(), 32 * MIB);
        let c = b().window_size_mb(u64::MAX).window_size_mb(64);
        assert_eq!(c.build().unwrap().window_bytes(), 64 * MIB);
        let c = b().prefetch_ahead_mb(u64::MAX).prefetch_ahead_bytes(4096);
        assert_eq!(c.build().unwrap().prefetch_ahead_bytes(), 4096);
        let c = b().prefetch_ahead_mb(u64::MAX).prefetch_ahead_mb(2);
        assert_eq!(c.build().unwrap().prefetch_ahead_bytes(), 2 * MIB);
    }

    #[test]
    fn any_prefetch_and_pin_timeout_are_accepted() {
        let b = || Config::builder("/tmp/none");
        let c = b().prefetch_ahead_bytes(u64::MAX).build().unwrap();
        assert_eq!(c.prefetch_ahead_bytes(), u64::MAX);
        let c = b().pin_timeout(Duration::MAX).build().unwrap();
        assert_eq!(c.pin_timeout(), Duration::MAX);
        assert!(b().pin_timeout(Duration::ZERO).build().is_err());
    }

    #[test]
    fn stock_machine_limits() {
        // Soft limit 1024 and max_map_count 65530 give the default caps.
        let l = Limits::from_os(1024, 65530);
        assert_eq!((l.max_open_files, l.max_windows), (256, 8192));
        assert_eq!(
            (l.max_open_files, l.max_windows),
            (MAX_OPEN_FILES_DEFAULT, MAX_WINDOWS_DEFAULT)
        );
        let l = Limits::from_os(u64::MAX, u64::MAX);
        assert_eq!((l.max_open_files, l.max_windows), (256, 8192));
    }

    /// A machine with few descriptors or a small `vm.max_map_count` still
    /// gets caps one shard can run with: 1 descriptor, 2 windows.
    #[test]
    fn scarce_machine_limits_leave_enough_for_one_shard() {
        for (soft, fds) in [(0, 1), (64, 1), (65, 1), (66, 2), (100, 36), (320, 256)] {
            assert_eq!(Limits::from_os(soft, 65530).max_open_files, fds, "{soft}");
        }
        for (map_count, windows) in [
            (0, 2),
            (1, 2),
            (1024, 2),
            (1025, 2),
            (1026, 2),
            (1027, 3),
            (2048, 1024),
            (9216, 8192),
        ] {
            let l = Limits::from_os(1024, map_count);
            assert_eq!(l.max_windows, windows, "max_map_count {map_count}");
            assert!(l.max_windows >= MIN_WINDOWS_PER_SHARD);
        }
    }

    /// What `Config::new` builds (it panics when that fails) on machines
    /// with scarce descriptors or maps: a valid configuration whose shards
    /// get at least a descriptor and two windows each, within the caps.
    #[test]
    fn the_default_configuration_builds_under_scarce_limits() {
        for map_count in [0, 1024, 1025, 1026, 1027, 1028, 1040, 65530] {
            for soft in [0, 65, 66, 1024] {
                let limits = Limits::from_os(soft, map_count);
                let c = Config::builder_with_limits("/tmp/none", limits)
                    .build()
                    .unwrap_or_else(|e| panic!("{soft} fds, {map_count} maps: {e}"));
                assert!(c.shards() >= 1);
                assert!(c.max_open_files_per_shard() * c.shards() <= c.max_open_files());
                assert!(c.max_windows_per_shard() * c.shards() <= c.max_windows());
                assert!(c.max_windows_per_shard() >= MIN_WINDOWS_PER_SHARD);
                assert_eq!(
                    c.max_windows_per_shard(),
                    c.max_windows() / c.shards(),
                    "the per-shard cap is the share of the process cap"
                );
            }
        }
    }

    #[test]
    fn invalid_values_are_rejected() {
        let b = || Config::builder("/tmp/none");
        assert!(b().window_bytes(0).build().is_err());
        assert!(b().window_bytes(24 * MIB).build().is_err());
        assert!(b().max_open_files(0).build().is_err());
        assert!(b().max_windows(0).build().is_err());
        assert!(b().shards(0).build().is_err());
        assert!(b().growth_step_bytes(3000).build().is_err());
        assert!(
            b().window_bytes(32 * MIB)
                .growth_step_bytes(24 * MIB)
                .build()
                .is_err()
        );
        assert!(
            b().window_bytes(32 * MIB)
                .max_file_bytes(48 * MIB)
                .build()
                .is_err()
        );
        let small = b().window_bytes(16 * MIB).build().unwrap();
        assert_eq!(small.growth_step_bytes(), 16 * MIB);
    }
}
