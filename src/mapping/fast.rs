//! The hot path: pinning a range of a mapped window with no syscall and
//! no await ([`try_pin`](MappingManager::try_pin), the allocator's
//! `pin_mapped` of a [`SlotAt`], and the synchronous first step of
//! [`pin`](MappingManager::pin)), and the range checks it starts with.

use std::panic::Location;
use std::rc::Rc;

use super::{FileMaps, MappingManager, Maps, PinGuard, Window, WindowState};
use crate::error::{Error, Result};
use crate::files::FileId;
use crate::wait::WaitList;

/// Where a slot lies: the allocator works it out once per segment, so its
/// hot path ([`MappingManager::pin_mapped`]) needs no division and no range
/// check beyond the window's length and the file's reserved size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SlotAt {
    /// The data file.
    pub(crate) file: FileId,
    /// Its window's index in the file.
    pub(crate) window: u32,
    /// Its offset inside that window.
    pub(crate) window_offset: u64,
    /// Its length.
    pub(crate) len: u64,
}

/// Who asks for a pin, and so which files it may pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// The manager's public calls: files registered with
    /// [`FileHandleRegistry::register`](crate::FileHandleRegistry::register)
    /// only.
    Public,
    /// `Shard::pin_foreign` (whose caller took on its contract): also
    /// another shard's data files.
    Foreign,
    /// An allocator, of its own files (checked against its allocations).
    Allocator,
}

impl Access {
    /// The error for a pin of `file` (`foreign` or an allocator's, `owned`)
    /// by this caller, if it may not pin it.
    #[inline]
    fn refuses(self, file: FileId, foreign: bool, owned: bool) -> Option<Error> {
        if foreign && self != Access::Foreign {
            Some(Error::ForeignFile { file_id: file.0 })
        } else if owned && self != Access::Allocator {
            Some(Error::AllocatorFile { file_id: file.0 })
        } else {
            None
        }
    }
}

/// Outcome of the synchronous part of a pin.
pub(super) enum Fast {
    Pinned(PinGuard),
    NeedsFault,
    NeedsGrow,
    Faulting(Rc<WaitList>),
}

impl MappingManager {
    /// Window index of byte `off` (a shift for power-of-two windows).
    #[inline(always)]
    pub(super) fn window_of(&self, off: u64) -> u64 {
        match self.window_shift {
            Some(s) => off >> s,
            None => off / self.cfg.window_bytes,
        }
    }

    /// Offset of byte `off` inside its window `idx` (a mask for
    /// power-of-two windows).
    #[inline(always)]
    fn window_offset(&self, off: u64, idx: u64) -> u64 {
        match self.window_shift {
            Some(s) => off & ((1u64 << s) - 1),
            None => off - idx * self.cfg.window_bytes,
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
    pub(super) fn file_maps<'a>(&self, m: &'a mut Maps, file: FileId) -> Result<&'a mut FileMaps> {
        let i = file.0 as usize;
        if matches!(m.files.get(i), Some(Some(_))) {
            return Ok(m.files[i].as_mut().expect("checked"));
        }
        self.register_file(m, file)
    }

    #[cold]
    #[inline(never)]
    fn register_file<'a>(&self, m: &'a mut Maps, file: FileId) -> Result<&'a mut FileMaps> {
        // Checked before the table grows: a `FileId` is a number anyone can
        // make, and an unknown one must cost nothing.
        let view = self.files.view(file)?;
        let i = file.0 as usize;
        if m.files.len() <= i {
            m.files.resize_with(i + 1, || None);
        }
        if m.files[i].is_none() {
            m.files[i] = Some(FileMaps {
                windows: Vec::new(),
                file: view,
                foreign: self.files.is_foreign(file),
                owned: self.files.is_owned(file),
            });
        }
        Ok(m.files[i].as_mut().expect("just set"))
    }

    /// The allocator's hot path: a writable pin of the slot `at` when its
    /// window is mapped and the slot reserved; `None` otherwise (then
    /// [`try_pin`](Self::try_pin) or [`pin`](Self::pin) of the slot's range
    /// says why, or faults the window in). Counts as a use of the window,
    /// like `try_pin`.
    #[inline(always)]
    pub(crate) fn pin_mapped(&self, at: SlotAt) -> Option<PinGuard> {
        if self.read_only {
            return None;
        }
        let mut m = self.inner.borrow_mut();
        let m = &mut *m;
        let Some(Some(fm)) = m.files.get(at.file.0 as usize) else {
            return None;
        };
        let Some(WindowState::Mapped(w)) = fm.windows.get(at.window as usize) else {
            return None;
        };
        // `at` comes from the allocator's segment table; checked here all
        // the same, so that the pin stays inside its window and below the
        // file's reserved size whatever the table says.
        let end = at.window_offset.checked_add(at.len)?;
        if end > w.len as u64 {
            return None;
        }
        if w.file_offset + end > fm.file.reserved() {
            return None;
        }
        m.tick += 1;
        m.stats.fast_pins += 1;
        let site = Location::caller();
        let range = (at.window_offset, at.len);
        Some(self.pin_window(fm, w, m.tick, range, true, site))
    }

    /// A pin of `[window_offset, window_offset + len)` of the mapped window
    /// `w` of the file `fm`, counted as a use of the window at `tick`. A
    /// writable pin marks the file dirty: the next sync must cover it. The
    /// caller checked that `window_offset + len` is at most the window's
    /// length.
    #[inline(always)]
    fn pin_window(
        &self,
        fm: &FileMaps,
        w: &Rc<Window>,
        tick: u64,
        (window_offset, len): (u64, u64),
        writable: bool,
        site: &'static Location<'static>,
    ) -> PinGuard {
        w.last_use.set(tick);
        w.uses.set(w.uses.get() + 1);
        w.referenced.set(true);
        if writable {
            fm.file.mark_dirty();
        }
        PinGuard::new(w, window_offset as usize, len as usize, writable, site)
    }

    /// The synchronous part of a pin. `first`: this is the pin's first
    /// look (a pin is counted in `fast_pins` only when its first look
    /// pins; one that pins after a fault-in or a wait is not fast).
    // Each argument is a plain value of the pin's request; a struct for
    // them would be built and taken apart on the hot path.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) fn fast(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
        access: Access,
        site: &'static Location<'static>,
        first: bool,
    ) -> Result<Fast> {
        let idx = self.check_range(file, offset, len)?;
        if writable && self.read_only {
            return Err(Error::ReadOnly("writable pin of a read-only mapping"));
        }
        let mut m = self.inner.borrow_mut();
        m.tick += 1;
        let tick = m.tick;
        let fm = self.file_maps(&mut m, file)?;
        if let Some(e) = access.refuses(file, fm.foreign, fm.owned) {
            return Err(e);
        }
        let reserved = fm.file.reserved();
        let out = match fm.windows.get(idx as usize) {
            Some(WindowState::Mapped(w)) => {
                if offset + len > reserved {
                    Fast::NeedsGrow
                } else {
                    let range = (self.window_offset(offset, u64::from(idx)), len);
                    let pin = self.pin_window(fm, w, tick, range, writable, site);
                    m.stats.fast_pins += u64::from(first);
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
    /// [`Error::UnknownFile`], [`Error::ReadOnly`]; [`Error::ForeignFile`]
    /// for another shard's file (pin it with `Shard::pin_foreign`);
    /// [`Error::AllocatorFile`] for a file an allocator keeps its data or
    /// metadata in (pin its allocations through the shard).
    #[track_caller]
    #[inline]
    pub fn try_pin(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
    ) -> Result<Option<PinGuard>> {
        self.try_pin_of(file, offset, len, writable, Access::Public)
    }

    /// [`try_pin`](Self::try_pin), of the files `access` may pin.
    #[track_caller]
    #[inline]
    pub(crate) fn try_pin_of(
        &self,
        file: FileId,
        offset: u64,
        len: u64,
        writable: bool,
        access: Access,
    ) -> Result<Option<PinGuard>> {
        match self.fast(
            file,
            offset,
            len,
            writable,
            access,
            Location::caller(),
            true,
        )? {
            Fast::Pinned(p) => Ok(Some(p)),
            _ => Ok(None),
        }
    }
}
