//! `MappingManager`: windowed mmaps per file, pins, eviction; and [`Pin`].
//!
//! A window is a `window_bytes` (default 1 GiB) `MAP_SHARED` mapping of one
//! aligned slice of a file. Window `i` of a file covers
//! `[i * window_bytes, (i + 1) * window_bytes)`, so finding it is an index.
//! A window may extend past the end of its file; nothing above the file's
//! reserved size is ever handed out.
//!
//! **Architecture invariants:**
//! * Windows are never `mremap`ed or moved: a [`Pin`]'s pointer is valid for
//!   the pin's whole life.
//! * A window is unmapped only when nothing references it: no pin, no io
//!   operation in flight (both hold an `Rc` to it). The manager's table holds
//!   one reference; "idle" means that is the only one.
//! * `window_count() <= max_windows()` at every moment, counting windows
//!   being faulted in.
//! * The hot path (`try_pin` of a mapped window, dropping a `Pin`) makes no
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
use crate::files::{FileHandleRegistry, FileId};
use crate::io::Ring;
use crate::sys;
use crate::wait::WaitList;

mod evict;
mod fault;
mod pin;

pub use pin::Pin;

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
    /// Whole-window advice.
    pub madvise_policy: MadvisePolicy,
    /// `MADV_WILLNEED` this many bytes past a range faulted in.
    pub prefetch_ahead_bytes: u64,
    /// How long `pin` waits for a window under pressure.
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
            madvise_policy: cfg.madvise_policy(),
            prefetch_ahead_bytes: cfg.prefetch_ahead_bytes(),
            pin_timeout: cfg.pin_timeout(),
        }
    }
}

/// Counters of a manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
    /// Pins served without a syscall (window already mapped).
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
    /// `2 × max_windows` evictions): the working set is larger than the cap.
    pub thrash_faults: u64,
    /// Whether eviction has adapted to thrashing: while most recent
    /// fault-ins are of recently evicted windows, the most recently used
    /// idle window goes first (a cyclic scan larger than the cap then keeps
    /// most of its windows mapped instead of missing on every one).
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
    last_use: Cell<u64>,
    uses: Cell<u64>,
    referenced: Cell<bool>,
    /// Live [`WindowRef`]s: pins, io operations and fault-in steps using
    /// the window. Zero means idle (only the table refers to it).
    users: Cell<usize>,
    shared: Rc<Shared>,
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
pub(crate) struct WindowRef(Rc<Window>);

impl WindowRef {
    #[inline]
    fn new(window: &Rc<Window>) -> WindowRef {
        window.users.set(window.users.get() + 1);
        WindowRef(window.clone())
    }
}

impl Clone for WindowRef {
    fn clone(&self) -> WindowRef {
        WindowRef::new(&self.0)
    }
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
        let n = self.0.users.get() - 1;
        self.0.users.set(n);
        if n == 0 && self.0.shared.pressure.waiting() > 0 {
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
    reserved: Rc<Cell<u64>>,
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
    /// Windows evicted most recently (at most `2 × max_windows`).
    evicted: std::collections::VecDeque<(FileId, u32)>,
    /// Thrash fault-ins among the last [`THRASH_SAMPLE`] fault-ins.
    sample_faults: u32,
    sample_thrash: u32,
}

/// Fault-ins per thrash measurement.
const THRASH_SAMPLE: u32 = 8;

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
/// let f = files.register("/tmp/segalloc-doc.dat");
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

/// Prefaults in flight at most: more are skipped.
const PREFAULTS_MAX: usize = 4;

/// Outcome of the synchronous part of a pin.
enum Fast {
    Pinned(Pin),
    NeedsFault,
    NeedsGrow,
    Faulting(Rc<WaitList>),
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
                sample_faults: 0,
                sample_thrash: 0,
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
        let m = self.inner.borrow();
        let mut s = m.stats;
        s.mapped_windows = self.shared.live.get() + m.faulting;
        s.pinned_windows = m
            .resident
            .iter()
            .filter(
                |(f, i)| match &m.files[f.0 as usize].as_ref().unwrap().windows[*i as usize] {
                    WindowState::Mapped(w) => w.users.get() > 0,
                    _ => false,
                },
            )
            .count();
        s
    }

    /// Window index of byte `off` (a shift for power-of-two windows).
    #[inline(always)]
    fn window_of(&self, off: u64) -> u64 {
        match self.window_shift {
            Some(s) => off >> s,
            None => off / self.cfg.window_bytes,
        }
    }

    /// The window of `[offset, offset + len)`, or the error that says why the
    /// range is not inside one window.
    #[inline(always)]
    fn check_range(&self, file: FileId, offset: u64, len: u64) -> Result<u32> {
        if len != 0
            && let Some(end) = offset.checked_add(len)
        {
            let idx = self.window_of(offset);
            if idx == self.window_of(end - 1) && idx <= u32::MAX as u64 {
                return Ok(idx as u32);
            }
        }
        Err(self.range_error(file, offset, len))
    }

    #[cold]
    #[inline(never)]
    fn range_error(&self, file: FileId, offset: u64, len: u64) -> Error {
        let invalid = |reason| Error::InvalidRange {
            file_id: file.0,
            offset,
            len_bytes: len,
            reason,
        };
        if len == 0 {
            return invalid("empty range");
        }
        let Some(end) = offset.checked_add(len) else {
            return invalid("range overflows u64");
        };
        if self.window_of(offset) != self.window_of(end - 1) {
            return Error::CrossesWindow {
                offset,
                len_bytes: len,
                window_bytes: self.cfg.window_bytes,
            };
        }
        invalid("offset beyond the largest file")
    }

    /// Register `file` with this manager (idempotent).
    #[inline(always)]
    fn file_maps<'a>(&self, m: &'a mut Maps, file: FileId) -> Result<&'a mut FileMaps> {
        let i = file.0 as usize;
        if matches!(m.files.get(i), Some(Some(_))) {
            return Ok(m.files[i].as_mut().expect("checked"));
        }
        self.register_file(m, file)
    }

    #[cold]
    #[inline(never)]
    fn register_file<'a>(&self, m: &'a mut Maps, file: FileId) -> Result<&'a mut FileMaps> {
        let i = file.0 as usize;
        if m.files.len() <= i {
            m.files.resize_with(i + 1, || None);
        }
        if m.files[i].is_none() {
            let reserved = self.files.reserved_cell(file)?;
            m.files[i] = Some(FileMaps {
                windows: Vec::new(),
                reserved,
            });
        }
        Ok(m.files[i].as_mut().expect("just set"))
    }

    /// The allocator's hot path: a writable pin of `[offset, offset + len)`
    /// of `file` when its window is mapped and the range reserved; `None`
    /// otherwise, also for a range [`try_pin`](Self::try_pin) would refuse
    /// (it then says why). Counts as a use of the window, like `try_pin`.
    #[inline(always)]
    pub(crate) fn pin_mapped(&self, file: FileId, offset: u64, len: u64) -> Option<Pin> {
        let end = offset.checked_add(len)?;
        let idx = self.window_of(offset);
        if self.read_only || len == 0 || idx != self.window_of(end - 1) {
            return None;
        }
        let mut m = self.inner.borrow_mut();
        let m = &mut *m;
        let Some(Some(fm)) = m.files.get(file.0 as usize) else {
            return None;
        };
        let Some(WindowState::Mapped(w)) = fm.windows.get(usize::try_from(idx).ok()?) else {
            return None;
        };
        if end > fm.reserved.get() {
            return None;
        }
        m.tick += 1;
        w.last_use.set(m.tick);
        w.uses.set(w.uses.get() + 1);
        w.referenced.set(true);
        m.stats.fast_pins += 1;
        let win_off = offset - idx * self.cfg.window_bytes;
        Some(Pin::new(
            w,
            win_off as usize,
            len as usize,
            true,
            Location::caller(),
        ))
    }

    #[inline]
    fn fast(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
        site: &'static Location<'static>,
    ) -> Result<Fast> {
        let idx = self.check_range(file, offset, len)?;
        if writable && self.read_only {
            return Err(Error::ReadOnly("writable pin of a read-only mapping"));
        }
        let mut m = self.inner.borrow_mut();
        m.tick += 1;
        let tick = m.tick;
        let fm = self.file_maps(&mut m, file)?;
        let reserved = fm.reserved.get();
        let out = match fm.windows.get(idx as usize) {
            Some(WindowState::Mapped(w)) => {
                if offset + len > reserved {
                    Fast::NeedsGrow
                } else {
                    w.last_use.set(tick);
                    w.uses.set(w.uses.get() + 1);
                    w.referenced.set(true);
                    let win_off = offset - ((idx as u64) * self.cfg.window_bytes);
                    let pin = Pin::new(w, win_off as usize, len as usize, writable, site);
                    if writable {
                        self.files.mark_dirty(file);
                    }
                    m.stats.fast_pins += 1;
                    Fast::Pinned(pin)
                }
            }
            Some(WindowState::Faulting(list)) => Fast::Faulting(list.clone()),
            _ => Fast::NeedsFault,
        };
        Ok(out)
    }

    /// Pin `[offset, offset + len)` of `file` if its window is mapped and the
    /// range is reserved: no syscall, no await. `Ok(None)` means the window
    /// must be faulted in or the file grown: use [`pin`](Self::pin).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] (empty range), [`Error::CrossesWindow`],
    /// [`Error::UnknownFile`], [`Error::ReadOnly`].
    #[track_caller]
    #[inline]
    pub fn try_pin(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Option<Pin>> {
        match self.fast(file, offset, len, writable, Location::caller())? {
            Fast::Pinned(p) => Ok(Some(p)),
            _ => Ok(None),
        }
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
    /// timeout.
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
    ) -> impl Future<Output = Result<Pin>> + '_ {
        let site = Location::caller();
        async move {
            let mut deadline: Option<Instant> = None;
            loop {
                match self.fast(file, offset, len, writable, site)? {
                    Fast::Pinned(p) => return Ok(p),
                    Fast::Faulting(list) => list.wait().await,
                    Fast::NeedsGrow => self.grow_mapped(file, offset + len, writable).await?,
                    Fast::NeedsFault => {
                        match self.fault_in(file, offset, len, writable).await? {
                            true => {}
                            false => {
                                // Every window pinned: wait for a release.
                                let started = *deadline
                                    .get_or_insert_with(|| Instant::now() + self.cfg.pin_timeout);
                                self.wait_pressure(started).await?;
                            }
                        }
                    }
                }
            }
        }
    }

    async fn wait_pressure(&self, deadline: Instant) -> Result<()> {
        self.inner.borrow_mut().stats.pressure_waits += 1;
        // Prefaults hold their windows: drop them (one the ring has not
        // reaped yet is abandoned, and settled below next time), and look
        // again for an idle window.
        let prefaults = std::mem::take(&mut *self.prefaults.borrow_mut());
        if !prefaults.is_empty() {
            drop(prefaults);
            return Ok(());
        }
        let wait = self.shared.pressure.wait();
        // A pin future dropped mid-fault leaves its window to the ring (held
        // by the advice still in flight) until the ring reaps that operation,
        // and only a future polling the ring does: drive the ring meanwhile,
        // and look again once those windows are released.
        let released = async {
            let mut wait = std::pin::pin!(wait);
            if self.ring.abandoned_in_flight() > 0 {
                let settle = std::pin::pin!(self.ring.settle());
                let first = futures::future::select(wait.as_mut(), settle).await;
                if let futures::future::Either::Right((Err(_), _)) = first {
                    // The ring failed to watch its eventfd: just wait.
                    wait.await;
                }
            } else {
                wait.await;
            }
        };
        let now = Instant::now();
        let remaining = deadline.saturating_duration_since(now);
        let timed_out =
            remaining.is_zero() || tokio::time::timeout(remaining, released).await.is_err();
        if timed_out {
            self.inner.borrow_mut().stats.pressure_timeouts += 1;
            return Err(Error::WindowPressure {
                max_windows: self.cfg.max_windows,
                waited: self.cfg.pin_timeout,
            });
        }
        Ok(())
    }

    /// Window `idx` of `file`, if it is mapped.
    fn mapped_window(&self, file: FileId, idx: usize) -> Option<WindowRef> {
        let m = self.inner.borrow();
        match m.files.get(file.0 as usize)?.as_ref()?.windows.get(idx)? {
            WindowState::Mapped(win) => Some(WindowRef::new(win)),
            _ => None,
        }
    }

    /// `madvise` through the ring on `[off, off + len)` of `win`, which the
    /// op keeps mapped until the kernel is done. Only advice that discards
    /// nothing (access patterns, WILLNEED, POPULATE_WRITE) is passed here.
    fn advise(&self, win: &WindowRef, off: usize, len: usize, advice: i32) -> crate::io::Op {
        assert!(off.checked_add(len).is_some_and(|end| end <= win.len));
        // SAFETY: `off + len <= win.len` (asserted) so the pointer stays in
        // the window's mapping.
        let addr = unsafe { win.base.as_ptr().add(off) };
        let hold: Rc<dyn std::any::Any> = Rc::new(win.clone());
        // SAFETY: the range lies inside `win`'s mapping, which `hold` keeps
        // alive until the op completes; the callers' advice discards nothing.
        unsafe { self.ring.madvise(hold, addr, len, advice) }
    }

    /// Fault `[offset, offset + len)` of `file` in writable ahead of use,
    /// clipped to its window and the file's reserved bytes, with
    /// `MADV_POPULATE_WRITE` through the io_uring ring: the kernel's io
    /// workers take the page faults, not this thread. Nothing is done when
    /// the window is not mapped, the files are read-only, the ring is the
    /// sync backend (the syscall would block this thread), or
    /// [`PREFAULTS_MAX`] are in flight. Nothing waits for it; a failure
    /// (`EINVAL` before Linux 5.14) only means the pages fault on first touch.
    pub(crate) fn prefault(&self, file: FileId, offset: u64, len: u64) {
        if self.read_only || self.ring.backend() != crate::io::IoBackend::Uring {
            return;
        }
        let mut ops = self.prefaults.borrow_mut();
        // Completed ones are dropped (polling reaps them).
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        ops.retain_mut(|op| std::pin::Pin::new(op).poll(&mut cx).is_pending());
        if ops.len() >= PREFAULTS_MAX {
            return;
        }
        let idx = self.window_of(offset);
        let w = self.cfg.window_bytes;
        let win = {
            let m = self.inner.borrow();
            let Some(Some(fm)) = m.files.get(file.0 as usize) else {
                return;
            };
            let end = offset
                .saturating_add(len)
                .min((idx + 1) * w)
                .min(fm.reserved.get());
            match usize::try_from(idx).ok().and_then(|i| fm.windows.get(i)) {
                Some(WindowState::Mapped(win)) if end > offset => (WindowRef::new(win), end),
                _ => return,
            }
        };
        let (win, end) = win;
        let page = crate::sys::page_size() as u64;
        let from = (offset - idx * w) / page * page;
        let to = (end - idx * w).div_ceil(page) * page;
        let to = to.min(win.len as u64);
        ops.push(self.advise(
            &win,
            from as usize,
            (to - from) as usize,
            crate::sys::MADV_POPULATE_WRITE,
        ));
        self.inner.borrow_mut().stats.prefaults += 1;
    }

    /// Issue `MADV_WILLNEED` through the ring for each `(offset, len)` range
    /// of `file` whose window is mapped (ranges of unmapped windows are
    /// skipped: prefetching never maps). Returns the bytes advised.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownFile`]; a failed advice is not an error.
    pub async fn prefetch(&self, file: FileId, ranges: &[(u64, u64)]) -> Result<u64> {
        self.files.path(file)?;
        let w = self.cfg.window_bytes;
        let mut advised = 0;
        for &(offset, len) in ranges {
            if len == 0 {
                continue;
            }
            let mut at = offset;
            let end = offset.saturating_add(len);
            while at < end {
                let idx = (at / w) as usize;
                let stop = ((idx as u64 + 1) * w).min(end);
                if let Some(win) = self.mapped_window(file, idx) {
                    let off = (at - idx as u64 * w) as usize;
                    let r = self.advise(&win, off, (stop - at) as usize, sys::MADV_WILLNEED);
                    if r.await.is_ok() {
                        advised += stop - at;
                    }
                }
                at = stop;
            }
        }
        Ok(advised)
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
                WindowState::Mapped(w) => w.users.get() > 0,
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
