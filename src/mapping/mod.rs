//! `MappingManager`: windowed mmaps per file, pins, eviction; and [`PinGuard`].
//!
//! A window is a `window_bytes` (default 1 GiB) `MAP_SHARED` mapping of one
//! aligned slice of a file. Window `i` of a file covers
//! `[i * window_bytes, (i + 1) * window_bytes)`, so finding it is an index.
//! A window may extend past the end of its file; nothing above the file's
//! reserved size is ever handed out.
//!
//! **Architecture invariants:**
//! * Windows are never `mremap`ed or moved: a [`PinGuard`]'s pointer is valid for
//!   the pin's whole life.
//! * A window is unmapped only when nothing references it: no pin, no io
//!   operation in flight (both hold an `Rc` to it). The manager's table holds
//!   one reference; "idle" means that is the only one.
//! * `window_count() <= max_windows()` at every moment, counting windows
//!   being faulted in.
//! * The hot path (`try_pin` of a mapped window, dropping a `PinGuard`) makes no
//!   syscall, takes no lock, and touches no atomic: `Rc` counts and `Cell`s.
//! * Single-threaded; no `RefCell` borrow is held across an `.await`.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::panic::Location;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::{Duration, Instant};

use memmap2::MmapRaw;

use crate::config::{Config, EvictionPolicy, MadvisePolicy};
use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileId, FileView};
use crate::io::Ring;
use crate::wait::WaitList;

mod advise;
mod evict;
mod fast;
mod fault;
mod pin;

use fast::Fast;

pub(crate) use fast::Access;

pub(crate) use fast::SlotAt;
pub use pin::PinGuard;

/// Settings of a [`MappingManager`].
#[derive(Clone, Debug)]
pub struct MappingConfig {
    /// Window size; a multiple of 16 MiB.
    pub window_bytes: u64,
    /// Files grow by this much at a time inside a window.
    pub growth_step_bytes: u64,
    /// Window (VMA) cap.
    pub max_windows: usize,
    /// Which idle window goes first.
    pub eviction_policy: EvictionPolicy,
    /// Adapt eviction when it thrashes ([`Config::adaptive_eviction`]).
    pub adaptive_eviction: bool,
    /// Whole-window advice.
    pub madvise_policy: MadvisePolicy,
    /// `MADV_WILLNEED` this many bytes past a range faulted in (at most to
    /// the end of its window; any value).
    pub prefetch_ahead_bytes: u64,
    /// How long `pin` waits for a window under pressure (no deadline when
    /// too long to be added to the current time).
    pub pin_timeout: Duration,
}

impl MappingConfig {
    /// The per-shard settings of a [`Config`].
    pub fn from_config(cfg: &Config) -> MappingConfig {
        MappingConfig {
            window_bytes: cfg.window_bytes(),
            growth_step_bytes: cfg.growth_step_bytes(),
            max_windows: cfg.max_windows_per_shard(),
            eviction_policy: cfg.eviction_policy(),
            adaptive_eviction: cfg.adaptive_eviction(),
            madvise_policy: cfg.madvise_policy(),
            prefetch_ahead_bytes: cfg.prefetch_ahead_bytes(),
            pin_timeout: cfg.pin_timeout(),
        }
    }
}

/// Counters of a manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MappingStats {
    /// Windows mapped now (including ones being faulted in).
    pub mapped_windows: usize,
    /// Windows with at least one pin or io operation.
    pub pinned_windows: usize,
    /// The cap.
    pub max_windows: usize,
    /// Windows faulted in (mapped) since creation.
    pub faults: u64,
    /// Idle windows unmapped to stay within the cap.
    pub evictions: u64,
    /// Idle windows unmapped by [`MappingManager::evict_idle`] (not
    /// counted in `evictions`, and their next fault-ins not in
    /// `thrash_faults`).
    pub idle_evictions: u64,
    /// Pins served without a syscall or a wait (window already mapped when
    /// asked). A pin that faulted its window in, or waited, is not one.
    pub fast_pins: u64,
    /// Times a `pin` had to wait because every window was pinned.
    pub pressure_waits: u64,
    /// Pressure waits that ended in [`Error::WindowPressure`].
    pub pressure_timeouts: u64,
    /// Bytes prefaulted with `MADV_POPULATE_WRITE` (file systems without
    /// `fallocate`).
    pub populated_bytes: u64,
    /// Ranges faulted in ahead of the allocator's bump position
    /// (`MADV_POPULATE_WRITE` through the ring).
    pub prefaults: u64,
    /// Fault-ins of a window evicted recently (among the last
    /// `EVICTION_HISTORY × max_windows` evictions, 8 ×): the working set is
    /// larger than the cap.
    pub thrash_faults: u64,
    /// Whether eviction has adapted to thrashing: while most recent
    /// fault-ins are of recently evicted windows, the most recently mapped
    /// idle window goes first (one eviction in 8, drawn at random, still
    /// follows the policy, so a working set that moves is picked up). A
    /// cyclic or uniform scan larger than the cap then keeps most of its
    /// windows mapped instead of missing on every one, and skewed access
    /// keeps its hot windows.
    pub thrash_mode: bool,
    /// Former name of `max_windows` (the same figure).
    #[deprecated(since = "0.1.0", note = "renamed to `max_windows`")]
    pub max_extents: usize,
}

/// One mapped window. Referenced by the manager's table, by pins and by io
/// operations in flight; unmapped (by `MmapRaw`'s drop) with the last one.
pub(crate) struct Window {
    map: MmapRaw,
    base: NonNull<u8>,
    len: usize,
    /// Offset in its file of its first byte.
    file_offset: u64,
    last_use: Cell<u64>,
    /// The tick at which it was mapped (thrash mode evicts the newest).
    mapped_at: Cell<u64>,
    uses: Cell<u64>,
    referenced: Cell<bool>,
    shared: Rc<Shared>,
    /// What its file's registration asked its windows to keep alive (the
    /// shard lock of an allocator's file).
    _owner: Option<Rc<dyn std::any::Any>>,
    #[cfg(debug_assertions)]
    pin_sites: RefCell<slab::Slab<&'static Location<'static>>>,
}

impl Drop for Window {
    fn drop(&mut self) {
        self.shared.live.set(self.shared.live.get() - 1);
        let _ = &self.map;
    }
}

/// A use of a window that keeps it from being evicted: held by pins, by io
/// operations in flight and by fault-in steps. The last one to go wakes a
/// task waiting for an idle window, whoever it is.
///
/// The window's reference count is its use count: besides `WindowRef`s,
/// only the manager's table holds an `Rc<Window>` (see [`is_idle`]), and
/// the fault-in step that maps a window, until it puts it in the table.
#[derive(Clone)]
pub(crate) struct WindowRef(Rc<Window>);

impl WindowRef {
    #[inline]
    fn new(window: &Rc<Window>) -> WindowRef {
        WindowRef(window.clone())
    }
}

/// Whether the table's window `w` is idle: no [`WindowRef`] uses it (the
/// table's own reference is the only one).
#[inline]
fn is_idle(w: &Rc<Window>) -> bool {
    Rc::strong_count(w) == 1
}

impl std::ops::Deref for WindowRef {
    type Target = Window;
    #[inline]
    fn deref(&self) -> &Window {
        &self.0
    }
}

impl Drop for WindowRef {
    #[inline]
    fn drop(&mut self) {
        // This reference and the table's: the window becomes idle when this
        // one goes. (Out of the table, a count of 2 means one more use is
        // left: the wake-up is early, and the waiter looks again.)
        if Rc::strong_count(&self.0) <= 2 && self.0.shared.pressure.waiting() > 0 {
            self.0.shared.pressure.wake_one();
        }
    }
}

/// State shared by the manager and its windows and pins.
#[derive(Default)]
struct Shared {
    /// Window objects alive (mapped VMAs), including ones no longer in the table.
    live: Cell<usize>,
    /// Tasks waiting for a window to become idle.
    pressure: Rc<WaitList>,
}

/// What a file's table holds for one window.
enum WindowState {
    Unmapped,
    Faulting(Rc<WaitList>),
    Mapped(Rc<Window>),
}

struct FileMaps {
    windows: Vec<WindowState>,
    /// The file's reserved size and dirty mark.
    file: FileView,
    /// Another shard's file: pinned only through `Shard::pin_foreign`.
    foreign: bool,
    /// An allocator's own file: pinned only through its allocator.
    owned: bool,
}

struct Maps {
    files: Vec<Option<FileMaps>>,
    /// Mapped windows in insertion order, for eviction scans and the clock.
    resident: Vec<(FileId, u32)>,
    clock_hand: usize,
    /// Windows being faulted in (counted against the cap).
    faulting: usize,
    tick: u64,
    stats: MappingStats,
    /// Windows evicted most recently (at most `EVICTION_HISTORY ×
    /// max_windows`), and how often each is in that list (O(1) lookups).
    evicted: std::collections::VecDeque<(FileId, u32)>,
    evicted_count: std::collections::HashMap<(FileId, u32), u32>,
    /// Thrash fault-ins among the last [`THRASH_SAMPLE`] fault-ins.
    sample_faults: u32,
    sample_thrash: u32,
    /// Draws which evictions in thrash mode follow the policy (xorshift).
    turns: u64,
}

/// Fault-ins per thrash measurement.
const THRASH_SAMPLE: u32 = 8;

/// In thrash mode, one eviction in this many (drawn at random) follows the
/// configured policy instead of evicting the newest window.
const THRASH_BASE_EVERY: u64 = 8;

/// The longest single timer a pressure wait sets; a longer `pin_timeout`
/// is waited out in steps of this.
const MAX_TIMER_STEP: Duration = Duration::from_secs(3600);

/// Evictions remembered to recognize thrashing, per window of the cap: a
/// cyclic scan over up to this many times the cap is recognized.
const EVICTION_HISTORY: usize = 8;

/// Windowed mmaps of the files of one [`FileHandleRegistry`],
/// single-threaded and async.
///
/// ```no_run
/// # async fn demo() -> segalloc::Result<()> {
/// use std::rc::Rc;
/// use segalloc::{Config, FileHandleRegistry, MappingManager, MappingConfig, io::Ring};
/// let cfg = Config::new("/tmp/segalloc-doc");
/// let ring = Ring::new(cfg.io_backend())?;
/// let files = Rc::new(FileHandleRegistry::new(ring, cfg.max_open_files()));
/// let maps = MappingManager::new(files.clone(), MappingConfig::from_config(&cfg));
/// // SAFETY: the file is this program's own; nothing else maps or writes it.
/// let f = unsafe { files.register("/tmp/segalloc-doc.dat") };
/// let pin = maps.pin(f, 4096, 64, true).await?; // faults the window in
/// pin.write_at(0, b"hello")?;
/// drop(pin);
/// let again = maps.try_pin(f, 4096, 64, false)?.expect("mapped: no syscall");
/// let mut buf = [0u8; 5];
/// again.read_at(0, &mut buf)?;
/// assert_eq!(&buf, b"hello");
/// # Ok(()) }
/// ```
pub struct MappingManager {
    inner: RefCell<Maps>,
    files: Rc<FileHandleRegistry>,
    ring: Ring,
    cfg: MappingConfig,
    /// `log2(window_bytes)` when it is a power of two.
    window_shift: Option<u32>,
    shared: Rc<Shared>,
    /// The registry is read-only (fixed at its creation).
    read_only: bool,
    /// Prefaults in flight ([`prefault`](Self::prefault)); empty unless the
    /// ring is io_uring.
    prefaults: RefCell<Vec<crate::io::Op>>,
}

impl MappingManager {
    /// A manager over `files` with the given settings.
    ///
    /// # Panics
    ///
    /// When `cfg.window_bytes` is not a multiple of 16 MiB or a cap is zero
    /// (a [`Config`] never produces such values).
    pub fn new(files: Rc<FileHandleRegistry>, cfg: MappingConfig) -> MappingManager {
        assert!(
            cfg.window_bytes > 0
                && cfg
                    .window_bytes
                    .is_multiple_of(crate::config::MAX_SEGMENT_BYTES)
        );
        assert!(
            cfg.growth_step_bytes > 0 && cfg.window_bytes.is_multiple_of(cfg.growth_step_bytes)
        );
        assert!(cfg.max_windows >= 1);
        let ring = files.ring().clone();
        MappingManager {
            inner: RefCell::new(Maps {
                files: Vec::new(),
                resident: Vec::new(),
                clock_hand: 0,
                evicted: std::collections::VecDeque::new(),
                evicted_count: std::collections::HashMap::new(),
                sample_faults: 0,
                sample_thrash: 0,
                turns: 0x9E37_79B9_7F4A_7C15,
                faulting: 0,
                tick: 0,
                stats: MappingStats {
                    max_windows: cfg.max_windows,
                    #[allow(deprecated)]
                    max_extents: cfg.max_windows,
                    ..MappingStats::default()
                },
            }),
            ring,
            window_shift: cfg
                .window_bytes
                .is_power_of_two()
                .then(|| cfg.window_bytes.trailing_zeros()),
            cfg,
            shared: Rc::new(Shared::default()),
            read_only: files.is_read_only(),
            prefaults: RefCell::new(Vec::new()),
            files,
        }
    }

    /// The registry whose files this manager maps.
    pub fn files(&self) -> &Rc<FileHandleRegistry> {
        &self.files
    }

    /// The settings.
    pub fn config(&self) -> &MappingConfig {
        &self.cfg
    }

    /// Window size in bytes.
    pub fn window_bytes(&self) -> u64 {
        self.cfg.window_bytes
    }

    /// Windows mapped now (VMAs this manager holds), including windows being
    /// faulted in and evicted windows still referenced by a pin.
    pub fn window_count(&self) -> usize {
        self.shared.live.get() + self.inner.borrow().faulting
    }

    /// The window cap.
    pub fn max_windows(&self) -> usize {
        self.cfg.max_windows
    }

    /// Former name of [`window_count`](Self::window_count).
    #[deprecated(since = "0.1.0", note = "renamed to `window_count`")]
    pub fn extent_count(&self) -> usize {
        self.window_count()
    }

    /// Former name of [`max_windows`](Self::max_windows).
    #[deprecated(since = "0.1.0", note = "renamed to `max_windows`")]
    pub fn max_extents(&self) -> usize {
        self.max_windows()
    }

    /// Counters.
    pub fn stats(&self) -> MappingStats {
        // Completed prefaults do not count as pins.
        self.reap_prefaults();
        let m = self.inner.borrow();
        let mut s = m.stats;
        s.mapped_windows = self.shared.live.get() + m.faulting;
        s.pinned_windows = m
            .resident
            .iter()
            .filter(
                |(f, i)| match &m.files[f.0 as usize].as_ref().unwrap().windows[*i as usize] {
                    WindowState::Mapped(w) => !is_idle(w),
                    _ => false,
                },
            )
            .count();
        s
    }

    /// Pin `[offset, offset + len)` of `file`, faulting its window in if
    /// needed.
    ///
    /// A mapped window completes on the first poll without a syscall. An
    /// unmapped one is faulted in: the file grows through the control ring
    /// (in growth steps, never past the window), the window is mapped
    /// (`mmap`, inline), and the configured advice is applied through the
    /// ring, while the shard's other tasks keep running. When the window cap
    /// is reached, an idle window is evicted; when every window is pinned the
    /// call waits (fairly) for one to be released, up to the configured
    /// timeout (a timeout too long to be added to the current time, such as
    /// `Duration::MAX`, means no timeout: the call waits until a release).
    ///
    /// With `writable`, the file is grown to cover the range. Without it, a
    /// range beyond the file's reserved size is an error.
    ///
    /// # Errors
    ///
    /// As [`try_pin`](Self::try_pin), plus [`Error::WindowPressure`],
    /// [`Error::NoSpace`], [`Error::MapFailed`], [`Error::FdPressure`],
    /// [`Error::TooManyOpenFiles`], [`Error::Io`]; for a read-only pin past
    /// the end of the file, [`Error::InvalidRange`].
    #[track_caller]
    pub fn pin(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> impl Future<Output = Result<PinGuard>> + '_ {
        self.pin_of(file, offset, len, writable, Access::Public)
    }

    /// [`pin`](Self::pin), of the files `access` may pin.
    #[track_caller]
    pub(crate) fn pin_of(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
        access: Access,
    ) -> impl Future<Output = Result<PinGuard>> + '_ {
        let site = Location::caller();
        async move {
            // When the first wait for a window began.
            let mut started: Option<Instant> = None;
            let mut first = true;
            loop {
                let look = self.fast(file, offset, len, writable, access, site, first)?;
                first = false;
                match look {
                    Fast::Pinned(p) => return Ok(p),
                    Fast::Faulting(list) => list.wait().await,
                    Fast::NeedsGrow => self.grow_mapped(file, offset + len, writable).await?,
                    Fast::NeedsFault => {
                        match self.fault_in(file, offset, len, writable).await? {
                            true => {}
                            false => {
                                // Every window pinned: wait for a release.
                                let started = *started.get_or_insert_with(Instant::now);
                                self.wait_pressure(started).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Wait for a window to be released, for a pin whose first wait began
    /// at `started`: `Ok` when one was (or may have been), and
    /// [`Error::WindowPressure`] once `pin_timeout` has passed since
    /// `started`. A timeout too long to be added to `started` (such as
    /// `Duration::MAX`) sets no deadline: the wait lasts until a release.
    async fn wait_pressure(&self, started: Instant) -> Result<()> {
        // Prefaults hold their windows: drop them (one the kernel still runs
        // is abandoned: the ring releases its window when it completes), and
        // look again for an idle window. Not a wait.
        let prefaults = std::mem::take(&mut *self.prefaults.borrow_mut());
        if !prefaults.is_empty() {
            drop(prefaults);
            return Ok(());
        }
        self.inner.borrow_mut().stats.pressure_waits += 1;
        // A window is released by the last of its users: a pin, or an
        // operation the ring holds until the kernel completes it (a pin
        // future dropped mid-fault leaves its advice in flight).
        let released = self.shared.pressure.wait();
        let Some(deadline) = started.checked_add(self.cfg.pin_timeout) else {
            released.await;
            return Ok(());
        };
        let mut released = std::pin::pin!(released);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                self.inner.borrow_mut().stats.pressure_timeouts += 1;
                return Err(Error::WindowPressure {
                    max_windows: self.cfg.max_windows,
                    waited: self.cfg.pin_timeout,
                });
            }
            // The timer is never given a deadline near the end of the
            // clock's range (it rounds a deadline up, which overflows there):
            // a longer wait is taken in steps.
            let step = remaining.min(MAX_TIMER_STEP);
            if tokio::time::timeout(step, released.as_mut()).await.is_ok() {
                return Ok(());
            }
        }
    }

    /// Windows of `file`'s table (none past it is mapped).
    fn window_table_len(&self, file: FileId) -> usize {
        let m = self.inner.borrow();
        m.files
            .get(file.0 as usize)
            .and_then(Option::as_ref)
            .map_or(0, |fm| fm.windows.len())
    }

    /// Window `idx` of `file`, if it is mapped.
    fn mapped_window(&self, file: FileId, idx: usize) -> Option<WindowRef> {
        let m = self.inner.borrow();
        match m.files.get(file.0 as usize)?.as_ref()?.windows.get(idx)? {
            WindowState::Mapped(win) => Some(WindowRef::new(win)),
            _ => None,
        }
    }

    /// Pins still alive, with the places they were taken (debug builds; an
    /// empty list in release builds).
    pub fn pin_sites(&self) -> Vec<String> {
        #[cfg(debug_assertions)]
        {
            let m = self.inner.borrow();
            let mut out = Vec::new();
            for r in &m.resident {
                let w = Self::window_at(&m, *r);
                for (_, loc) in w.pin_sites.borrow().iter() {
                    out.push(format!("{}:{}:{}", loc.file(), loc.line(), loc.column()));
                }
            }
            out
        }
        #[cfg(not(debug_assertions))]
        {
            Vec::new()
        }
    }

    /// The path of a file (for messages).
    pub fn path(&self, file: FileId) -> Result<PathBuf> {
        self.files.path(file)
    }

    /// Whether a window of `file` overlapping `[from, to)` has users (pins,
    /// io operations, fault-in steps) or is being faulted in.
    pub(crate) fn in_use(&self, file: FileId, from: u64, to: u64) -> bool {
        // A prefault the kernel has completed holds its window until reaped.
        self.reap_prefaults();
        let m = self.inner.borrow();
        let Some(Some(fm)) = m.files.get(file.0 as usize) else {
            return false;
        };
        let first = usize::try_from(self.window_of(from)).unwrap_or(usize::MAX);
        let last = usize::try_from(self.window_of(to.saturating_sub(1))).unwrap_or(usize::MAX);
        fm.windows
            .iter()
            .enumerate()
            .skip(first)
            .take_while(|(i, _)| *i <= last)
            .any(|(_, s)| match s {
                WindowState::Mapped(w) => !is_idle(w),
                WindowState::Faulting(_) => true,
                WindowState::Unmapped => false,
            })
    }
}

impl Drop for MappingManager {
    fn drop(&mut self) {
        let leaks = self.pin_sites();
        if !leaks.is_empty() {
            tracing::error!(count = leaks.len(), sites = ?leaks, "MappingManager dropped with windows still pinned; they stay mapped until their pins drop");
        }
    }
}

impl std::fmt::Debug for MappingManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingManager")
            .field("stats", &self.stats())
            .finish()
    }
}
