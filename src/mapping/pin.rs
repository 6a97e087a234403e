//! [`PinGuard`]: a pinned range of a window.

use std::panic::Location;
use std::ptr::NonNull;
use std::rc::Rc;

use super::{Window, WindowRef};
use crate::error::{Error, Result};

/// A pinned range of a window: RAII, move-only, `!Send`.
///
/// The pointer stays valid while the pin lives (windows never move and are
/// never unmapped while pinned). Data is reached through copy-in/copy-out
/// methods ([`read_at`](PinGuard::read_at), [`write_at`](PinGuard::write_at)), raw
/// pointers, or the `unsafe` slice views whose contract is stated on them:
/// the memory is a shared file mapping that other pins (and other processes)
/// may reach, so no safe `&mut [u8]` is handed out.
pub struct PinGuard {
    window: WindowRef,
    ptr: NonNull<u8>,
    /// The length shifted left by one, and whether the pin allows writes in
    /// the low bit: one word. (A `bool` beside the length gave
    /// `Result<Allocation>` its tag in that padding, and each move of one
    /// copied the fields of `Error`'s variants around that byte: `compare`'s
    /// allocate + free pair took 45 – 47 ns instead of 36 – 39,
    /// `docs/measurements/HISTORY.md`.)
    len_w: usize,
    #[cfg(debug_assertions)]
    site_key: usize,
}

// One word less than a length and a flag apart (see `len_w`).
#[cfg(not(debug_assertions))]
const _: () = assert!(std::mem::size_of::<PinGuard>() == 3 * std::mem::size_of::<usize>());

impl PinGuard {
    #[inline]
    pub(super) fn new(
        window: &Rc<Window>,
        offset: usize,
        len: usize,
        writable: bool,
        _site: &'static Location<'static>,
    ) -> PinGuard {
        debug_assert!(offset + len <= window.len && len <= usize::MAX >> 1);
        // SAFETY: `offset + len <= window.len`, checked by the caller
        // (`fast` through `check_range`, which keeps the range inside one
        // window; `pin_mapped` against the window's length itself).
        let ptr = unsafe { NonNull::new_unchecked(window.base.as_ptr().add(offset)) };
        #[cfg(debug_assertions)]
        let site_key = window.pin_sites.borrow_mut().insert(_site);
        PinGuard {
            window: WindowRef::new(window),
            ptr,
            len_w: len << 1 | usize::from(writable),
            #[cfg(debug_assertions)]
            site_key,
        }
    }

    /// Base of the whole window this pin holds mapped. The crate uses it for
    /// metadata it keeps inside the reserved part of a permanently pinned
    /// window; every byte of the window is mapped while the pin lives, but
    /// only bytes below the file's reserved size may be touched.
    #[inline]
    pub(crate) fn window_base(&self) -> *mut u8 {
        self.window.base.as_ptr()
    }

    /// Length of the pinned range.
    #[inline]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len_w >> 1
    }

    /// Whether the pin allows writes.
    #[inline]
    pub fn is_writable(&self) -> bool {
        self.len_w & 1 != 0
    }

    /// Start of the range. Reading through it is valid for `len()` bytes
    /// while the pin lives.
    #[inline]
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Start of the range, for writing (null when the pin is read-only).
    #[inline]
    pub fn as_mut_ptr(&self) -> *mut u8 {
        if self.is_writable() {
            self.ptr.as_ptr()
        } else {
            std::ptr::null_mut()
        }
    }

    fn bounds(&self, offset: usize, n: usize) -> Result<()> {
        if offset.checked_add(n).is_none_or(|end| end > self.len()) {
            return Err(Error::InvalidRange {
                file_id: crate::error::NOT_A_FILE,
                offset: offset as u64,
                len_bytes: n as u64,
                reason: "outside the pinned range",
            });
        }
        Ok(())
    }

    /// Copy `buf.len()` bytes from `offset` in the range into `buf`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when `offset + buf.len()` exceeds the pin.
    #[inline]
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.bounds(offset, buf.len())?;
        // SAFETY: bounds checked above; the window is mapped while `self`
        // lives; `buf` is a distinct Rust allocation, so no overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copy `data` into the range at `offset`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when out of bounds, [`Error::ReadOnly`] for a
    /// read-only pin.
    #[inline]
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::ReadOnly("write through a read-only pin"));
        }
        self.bounds(offset, data.len())?;
        // SAFETY: bounds checked above; the window is mapped writable while
        // `self` lives; `data` is a Rust borrow, not part of the mapping
        // unless the caller built it with an unsafe view, whose contract
        // forbids overlap with a concurrent writer.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Fill the range from `offset` with `byte`.
    ///
    /// # Errors
    ///
    /// As [`write_at`](PinGuard::write_at).
    pub fn fill(&self, offset: usize, n: usize, byte: u8) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::ReadOnly("write through a read-only pin"));
        }
        self.bounds(offset, n)?;
        // SAFETY: bounds checked; the range is mapped writable while `self` lives.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(offset), byte, n) };
        Ok(())
    }

    /// View the range as a slice.
    ///
    /// # Safety
    ///
    /// While the slice lives, nobody may write to the range: no other pin of
    /// an overlapping range of the same file (in this or another process)
    /// writes through a pointer or `write_at`, and no `as_mut_slice` view of
    /// it exists.
    #[inline]
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: mapped for `len` bytes while `self` lives; the caller
        // promises no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    /// View the range as a mutable slice.
    ///
    /// # Safety
    ///
    /// While the slice lives, nothing else may read or write the range: no
    /// other pin of an overlapping range of the same file (in this or another
    /// process) is used, and no other view of it exists.
    ///
    /// # Panics
    ///
    /// When the pin is read-only.
    #[inline]
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.is_writable(), "as_mut_slice on a read-only pin");
        // SAFETY: mapped writable for `len` bytes while `self` lives; the
        // caller promises exclusive access; `&mut self` excludes other views
        // through this pin.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for PinGuard {
    #[inline]
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        self.window.pin_sites.borrow_mut().remove(self.site_key);
        // `window` (a `WindowRef`) wakes a waiter if it was the last use.
    }
}

impl std::fmt::Debug for PinGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinGuard")
            .field("ptr", &self.ptr)
            .field("len", &self.len())
            .field("writable", &self.is_writable())
            .finish()
    }
}
