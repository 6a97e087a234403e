//! Fault-in of a window, file growth inside a window, and prefaulting.

use std::cell::Cell;
#[cfg(debug_assertions)]
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Instant;

use memmap2::MmapOptions;
use tracing::Instrument;

use super::{MappingManager, Window, WindowRef, WindowState};
use crate::config::MadvisePolicy;
use crate::error::{Error, Result};
use crate::files::{FileId, Reservation};
use crate::sys;
use crate::wait::WaitList;

impl MappingManager {
    /// Grow a file whose window is already mapped so it covers `end`.
    pub(super) async fn grow_mapped(&self, file: FileId, end: u64, writable: bool) -> Result<()> {
        if !writable || self.files.is_read_only() {
            return Err(Error::InvalidRange {
                file_id: file.0,
                offset: end,
                len_bytes: 0,
                reason: "read-only pin past the reserved end of the file",
            });
        }
        let target = self.growth_target(end);
        let (lease, how) = self.files.grow_of(file, target).await?;
        drop(lease);
        if let Reservation::Sparse { from, to } = how {
            self.populate(file, from, to).await?;
        }
        Ok(())
    }

    /// Make sure `file` has at least `end` bytes reserved, growing in steps
    /// of `step` bytes (never past `end`'s window) and prefaulting where the
    /// file system cannot `fallocate`. The window need not be mapped.
    ///
    /// # Errors
    ///
    /// As [`FileHandleRegistry::grow`](crate::files::FileHandleRegistry::grow), and [`Error::NoSpace`];
    /// an `end` past the largest file the file system allows is refused
    /// with the io error of its `fallocate` (`EFBIG` or `EINVAL`), nothing
    /// reserved; [`Error::AllocatorFile`] for a file an allocator keeps its
    /// data or metadata in (it reserves what it uses itself).
    pub async fn reserve(&self, file: FileId, end: u64, step: u64) -> Result<()> {
        if self.files.is_owned(file) {
            return Err(Error::AllocatorFile { file_id: file.0 });
        }
        self.reserve_of(file, end, step).await
    }

    /// [`reserve`](Self::reserve), of any file (an allocator's own).
    pub(crate) async fn reserve_of(&self, file: FileId, end: u64, step: u64) -> Result<()> {
        if end == 0 || self.files.reserved_bytes(file)? >= end {
            return Ok(());
        }
        let w = self.cfg.window_bytes;
        let window_end = ((end - 1) / w * w).saturating_add(w);
        let target = end
            .div_ceil(step.max(1))
            .saturating_mul(step.max(1))
            .min(window_end);
        let (lease, how) = self.files.grow_of(file, target).await?;
        drop(lease);
        if let Reservation::Sparse { from, to } = how {
            self.populate(file, from, to).await?;
        }
        Ok(())
    }

    /// The size to grow to so that `end` is covered: rounded up to a growth
    /// step, never past the end of `end`'s window.
    fn growth_target(&self, end: u64) -> u64 {
        let step = self.cfg.growth_step_bytes;
        let w = self.cfg.window_bytes;
        let window_end = ((end - 1) / w * w).saturating_add(w);
        end.div_ceil(step).saturating_mul(step).min(window_end)
    }

    /// Prefault `[from, to)` writable (file systems without fallocate), window
    /// by window, then mark it reserved.
    pub(super) async fn populate(&self, file: FileId, from: u64, to: u64) -> Result<()> {
        let w = self.cfg.window_bytes;
        let path = self.files.path(file)?;
        let page = sys::page_size() as u64;
        let mut at = from / page * page;
        while at < to {
            let idx = (at / w) as usize;
            let end = (idx as u64 + 1).saturating_mul(w).min(to);
            let len = (end - at) as usize;
            let r = match self.mapped_window(file, idx) {
                Some(win) => {
                    let off = (at - idx as u64 * w) as usize;
                    self.advise(&win, off, len, sys::MADV_POPULATE_WRITE).await
                }
                None => {
                    // The window is not mapped: map just this range for as
                    // long as the prefault takes (unmapped when the op
                    // completes). Not a window, but a mapping all the same:
                    // it takes a place under the window cap while it lives.
                    let place = self.take_place().await?;
                    let lease = self.files.acquire_of(file, 0).await?;
                    let map = MmapOptions::new()
                        .offset(at)
                        .len(len)
                        .map_raw(lease.as_raw_fd())
                        .map_err(|source| Error::MapFailed {
                            path: path.clone(),
                            offset: at,
                            len_bytes: len as u64,
                            source,
                        })?;
                    let addr = map.as_mut_ptr();
                    let hold = Rc::new(RangeMap {
                        _map: map,
                        _place: place,
                    });
                    // SAFETY: `[addr, addr + len)` is exactly the temporary
                    // mapping, which the op holds until it completes;
                    // POPULATE_WRITE discards nothing.
                    unsafe { self.ring.madvise(hold, addr, len, sys::MADV_POPULATE_WRITE) }.await
                }
            };
            if let Err(e) = r {
                return Err(match e.raw_os_error() {
                    Some(nix::libc::ENOSPC) | Some(nix::libc::EFAULT) | Some(nix::libc::ENOMEM) => {
                        Error::NoSpace {
                            path,
                            requested_bytes: to - from,
                        }
                    }
                    _ => Error::io("madvise(MADV_POPULATE_WRITE)", Some(&path), e),
                });
            }
            self.inner.borrow_mut().stats.populated_bytes += len as u64;
            at = end;
        }
        self.files.note_reserved(file, to);
        Ok(())
    }

    /// Fault the window of `[offset, offset + len)` in. `Ok(false)` when the
    /// cap is reached and every window is pinned.
    ///
    /// The file is checked (read-only) or grown (writable) before the window
    /// table grows, so an invalid range costs no memory.
    pub(super) async fn fault_in(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<bool> {
        let how = self.cover(file, offset, len, writable).await?;
        if let Reservation::Sparse { from, to } = how {
            // Before this fault-in takes its place under the cap: a part
            // of the growth outside the mapped windows is prefaulted
            // through a mapping that needs a place of its own, and a wait
            // for one while holding a place (the last one) never ended.
            self.populate(file, from, to).await?;
        }
        let idx = (offset / self.cfg.window_bytes) as usize;
        let list = Rc::new(WaitList::default());
        {
            let mut m = self.inner.borrow_mut();
            // Re-check: another task may have started meanwhile.
            let fm = self.file_maps(&mut m, file)?;
            if fm.windows.len() <= idx {
                fm.windows.resize_with(idx + 1, || WindowState::Unmapped);
            }
            if !matches!(fm.windows[idx], WindowState::Unmapped) {
                return Ok(true);
            }
            drop(m);
            if self.window_count() >= self.cfg.max_windows && !self.evict_one() {
                return Ok(false);
            }
            let mut m = self.inner.borrow_mut();
            m.faulting += 1;
            m.files[file.0 as usize].as_mut().unwrap().windows[idx] =
                WindowState::Faulting(list.clone());
        }
        let mut guard = FaultGuard {
            mm: self,
            file,
            idx,
            list,
            done: false,
            faulting: true,
        };
        let path = self.files.path(file)?;
        let span = tracing::debug_span!("fault_in", file = %path.display(), window = idx);
        let started = Instant::now();
        let win = self
            .map_window(&mut guard, path)
            .instrument(span.clone())
            .await?;
        tracing::debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            "window mapped"
        );
        self.after_fault(&win, file, (offset, offset + len))
            .instrument(span)
            .await?;
        Ok(true)
    }

    /// Make the file hold `[offset, offset + len)`: grown when `writable`,
    /// an error otherwise.
    async fn cover(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Reservation> {
        let end = offset + len;
        // Open first: a file seen for the first time learns its size (and so
        // its reserved bytes) at open, and must not be grown past what it
        // already holds (on a full disk that growth would fail needlessly).
        drop(self.files.acquire_of(file, 0).await?);
        if self.files.reserved_bytes(file)? >= end {
            return Ok(Reservation::Reserved);
        }
        if !writable {
            return Err(Error::InvalidRange {
                file_id: file.0,
                offset,
                len_bytes: len,
                reason: "read-only pin past the end of the file",
            });
        }
        let (_lease, how) = self.files.grow_of(file, self.growth_target(end)).await?;
        Ok(how)
    }

    /// Map the whole window of `guard` (inline: there is no io_uring opcode
    /// for mmap), advise it, and publish it in the table.
    async fn map_window(&self, guard: &mut FaultGuard<'_>, path: PathBuf) -> Result<WindowRef> {
        let (file, idx) = (guard.file, guard.idx);
        let w = self.cfg.window_bytes;
        let window_off = idx as u64 * w;
        let map_failed = |source| Error::MapFailed {
            path: path.clone(),
            offset: window_off,
            len_bytes: w,
            source,
        };
        if let Some(source) = crate::io::injected_mmap_fault() {
            // A planned failure (feature `fault-injection` only).
            return Err(map_failed(source));
        }
        // Held by the window: an allocator's file keeps its shard locked.
        // (Every way to a window grows or opens the file first, through
        // `FileHandleRegistry::grow`, which refuses a closed allocator's
        // file; this is the last look, at the mmap itself.)
        let owner = self.files.owner(file)?;
        let lease = self.files.acquire_of(file, 0).await?;
        let mut opts = MmapOptions::new();
        opts.offset(window_off).len(w as usize);
        let map = if self.files.is_read_only() {
            opts.map_raw_read_only(lease.as_raw_fd())
        } else {
            opts.map_raw(lease.as_raw_fd())
        }
        .map_err(map_failed)?;
        drop(lease);
        let base = NonNull::new(map.as_mut_ptr()).expect("mmap never returns null");
        // The window now counts as a live VMA instead of a window faulting in
        // (counting both would overstate `window_count` past the cap).
        self.shared.live.set(self.shared.live.get() + 1);
        self.inner.borrow_mut().faulting -= 1;
        guard.faulting = false;
        let rc = Rc::new(Window {
            map,
            base,
            len: w as usize,
            file_offset: window_off,
            last_use: Cell::new(0),
            mapped_at: Cell::new(0),
            uses: Cell::new(0),
            referenced: Cell::new(true),
            shared: self.shared.clone(),
            _owner: owner.map(|o| o as Rc<dyn std::any::Any>),
            #[cfg(debug_assertions)]
            pin_sites: RefCell::new(slab::Slab::new()),
        });
        let win = WindowRef::new(&rc);
        {
            let mut m = self.inner.borrow_mut();
            m.tick += 1;
            rc.mapped_at.set(m.tick);
            m.files[file.0 as usize].as_mut().unwrap().windows[idx] = WindowState::Mapped(rc);
            m.resident.push((file, idx as u32));
            Self::count_fault(&mut m, (file, idx as u32), self.cfg.adaptive_eviction);
        }
        // Published before the advice is awaited: a fault-in future polled
        // once and then kept unpolled would otherwise hold every other pin
        // of the window (they wait for it to be published) past
        // `pin_timeout`.
        guard.finish();
        // Whole-window advice through the ring (never part of a window: that
        // would split the VMA). Pins taken before it lands only miss the
        // advice on their first faults.
        let advice = match self.cfg.madvise_policy {
            MadvisePolicy::Random => Some(sys::MADV_RANDOM),
            MadvisePolicy::Sequential => Some(sys::MADV_SEQUENTIAL),
            MadvisePolicy::Normal => None,
        };
        if let Some(advice) = advice
            && let Err(e) = self.advise(&win, 0, w as usize, advice).await
        {
            tracing::debug!(error = %e, "window advice failed (ignored: advisory)");
        }
        Ok(win)
    }

    /// After a fault-in: read ahead past the range `[offset, end)` inside
    /// the window.
    async fn after_fault(
        &self,
        win: &WindowRef,
        file: FileId,
        (offset, end): (u64, u64),
    ) -> Result<()> {
        if self.cfg.prefetch_ahead_bytes == 0 {
            return Ok(());
        }
        let w = self.cfg.window_bytes;
        let window_off = offset / w * w;
        let reserved = self.files.reserved_bytes(file)?;
        // Any read-ahead is accepted: one past the window stops at its end.
        let stop = end
            .saturating_add(self.cfg.prefetch_ahead_bytes)
            .min(window_off.saturating_add(w))
            .min(reserved);
        if stop > offset {
            let off = (offset - window_off) as usize;
            let r = self.advise(win, off, (stop - offset) as usize, sys::MADV_WILLNEED);
            if let Err(e) = r.await {
                tracing::debug!(error = %e, "prefetch advice failed (ignored: advisory)");
            }
        }
        Ok(())
    }
}

impl MappingManager {
    /// A place under the window cap for a mapping that is not a window
    /// (see [`populate`](Self::populate)): at once when the cap leaves
    /// room or an idle window can go, else after a wait for one, as a pin
    /// waits (up to `pin_timeout`, then [`Error::WindowPressure`]).
    async fn take_place(&self) -> Result<Place> {
        let mut started: Option<Instant> = None;
        loop {
            if self.window_count() < self.cfg.max_windows || self.evict_one() {
                self.shared.live.set(self.shared.live.get() + 1);
                return Ok(Place {
                    shared: self.shared.clone(),
                });
            }
            let started = *started.get_or_insert_with(Instant::now);
            self.wait_pressure(started).await?;
        }
    }
}

/// A mapping's place under the window cap, counted in `window_count` like
/// a window's until it is dropped.
struct Place {
    shared: Rc<super::Shared>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shared.live.set(self.shared.live.get() - 1);
        if self.shared.pressure.waiting() > 0 {
            self.shared.pressure.wake_one();
        }
    }
}

/// A mapping of a range that is not a window, with its place under the cap
/// (held by the ring until its op completes). The fields are dropped in
/// order: the mapping goes before its place is given back.
struct RangeMap {
    _map: memmap2::MmapRaw,
    _place: Place,
}

struct FaultGuard<'a> {
    mm: &'a MappingManager,
    file: FileId,
    idx: usize,
    list: Rc<WaitList>,
    done: bool,
    /// Still counted in `faulting` (until the window is mapped and counts
    /// as live instead).
    faulting: bool,
}

impl FaultGuard<'_> {
    /// The window is published: keep it, and let tasks waiting for it go.
    fn finish(&mut self) {
        self.done = true;
        self.list.wake_all();
    }
}

impl Drop for FaultGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled or failed: give the window and the reservation back.
            let mut m = self.mm.inner.borrow_mut();
            if self.faulting {
                m.faulting -= 1;
            }
            m.files[self.file.0 as usize].as_mut().unwrap().windows[self.idx] =
                WindowState::Unmapped;
            drop(m);
            self.mm.shared.pressure.wake_one();
        }
        self.list.wake_all();
    }
}
