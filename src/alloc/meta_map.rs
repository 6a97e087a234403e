//! Access to a shard's metadata file through its mapping.
//!
//! [`MetaMap`] owns the pins of the metadata file's windows (held for the
//! allocator's life) and knows how many bytes of the file are backed. Every
//! read, write and word it hands out is checked against both: an access
//! outside the backed part or across a window boundary panics instead of
//! touching memory it does not own.
//!
//! **Architecture invariants:**
//! * A pin, once taken, is never dropped before the `MetaMap`: pointers into
//!   the mapping ([`Bitmap`]) stay valid while the allocator lives.
//! * `backed_bytes` never exceeds the file's reserved size, and only grows.

#![warn(clippy::cast_possible_truncation)]

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::AtomicU64;

use crate::error::Result;
use crate::files::FileId;
use crate::format;
use crate::mapping::{Access, MappingManager, PinGuard};

/// The metadata file grows this much at a time.
const META_GROWTH_BYTES: u64 = 1024 * 1024;

/// The pinned windows of one metadata file.
pub(super) struct MetaMap {
    mm: Rc<MappingManager>,
    file: FileId,
    window_bytes: u64,
    writable: bool,
    pins: RefCell<Vec<PinGuard>>,
    /// Bytes from the start of the file that are backed (reserved or, for
    /// an existing file, present) and mapped.
    backed_bytes: Cell<u64>,
}

/// The slot bitmap of one directory entry: `BITMAP_WORDS` words inside a
/// window that its [`MetaMap`] keeps pinned. Only [`MetaMap::bitmap`] makes
/// one, after checking the bounds.
#[derive(Clone, Copy)]
pub(super) struct Bitmap(NonNull<AtomicU64>);

impl Bitmap {
    /// Word `w` of the bitmap.
    ///
    /// # Panics
    ///
    /// When `w >= BITMAP_WORDS`.
    #[inline]
    pub(super) fn word(&self, w: u32) -> &AtomicU64 {
        assert!(
            (w as usize) < format::BITMAP_WORDS,
            "bitmap word {w} out of range"
        );
        // SAFETY: `MetaMap::bitmap` checked that all BITMAP_WORDS words lie
        // in the backed part of one pinned window, which stays mapped while
        // the allocator (and so any `Seg` holding this) lives; `w` is in
        // range; the words are 8-byte aligned (checked there) and are only
        // accessed atomically or by this thread.
        unsafe { self.0.add(w as usize).as_ref() }
    }
}

impl MetaMap {
    pub(super) fn new(mm: Rc<MappingManager>, file: FileId, window_bytes: u64) -> MetaMap {
        let writable = !mm.files().is_read_only();
        MetaMap {
            mm,
            file,
            window_bytes,
            writable,
            pins: RefCell::new(Vec::new()),
            backed_bytes: Cell::new(0),
        }
    }

    /// Map an existing file of `len_bytes` (recovery): pin every window up
    /// to its end and treat all of it as backed (up to its last page, whose
    /// tail past the end reads as zeros).
    pub(super) async fn map_existing(&self, len_bytes: u64) -> Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        self.pin_windows((len_bytes - 1) / self.window_bytes)
            .await?;
        let backed = len_bytes
            .div_ceil(format::META_PAGE_BYTES)
            .saturating_mul(format::META_PAGE_BYTES)
            .min(self.pinned_bytes());
        self.backed_bytes.set(self.backed_bytes.get().max(backed));
        Ok(())
    }

    fn pinned_bytes(&self) -> u64 {
        self.pins.borrow().len() as u64 * self.window_bytes
    }

    /// Reserve the file up to `end` (growing it in small steps) and pin its
    /// windows.
    pub(super) async fn ensure(&self, end: u64) -> Result<()> {
        self.mm
            .reserve_of(self.file, end, META_GROWTH_BYTES)
            .await?;
        self.pin_windows((end.max(1) - 1) / self.window_bytes)
            .await?;
        let reserved = self.mm.files().reserved_bytes(self.file)?;
        let backed = reserved.min(self.pinned_bytes());
        self.backed_bytes.set(self.backed_bytes.get().max(backed));
        Ok(())
    }

    /// Pin windows `0..=last` for the allocator's life (idempotent).
    async fn pin_windows(&self, last: u64) -> Result<()> {
        let w = self.window_bytes;
        while (self.pins.borrow().len() as u64) <= last {
            let i = self.pins.borrow().len() as u64;
            if self.writable {
                // The window's first page must exist before it is pinned.
                self.mm
                    .reserve_of(
                        self.file,
                        i * w + format::META_PAGE_BYTES,
                        META_GROWTH_BYTES,
                    )
                    .await?;
            }
            let pin = self
                .mm
                .pin_of(self.file, i * w, 64, self.writable, Access::Allocator)
                .await?;
            // Another task may have pinned this window meanwhile: keep one.
            let mut pins = self.pins.borrow_mut();
            if pins.len() as u64 == i {
                pins.push(pin);
            }
        }
        Ok(())
    }

    /// The address of `[off, off + len)`, checked: backed, inside one
    /// pinned window.
    ///
    /// # Panics
    ///
    /// When the range is empty, not backed, or crosses a window.
    #[inline]
    fn checked_ptr(&self, off: u64, len: u64) -> NonNull<u8> {
        let w = self.window_bytes;
        let end = off.checked_add(len).expect("metadata range overflows");
        assert!(
            len > 0 && end <= self.backed_bytes.get() && off / w == (end - 1) / w,
            "metadata access [{off}, {end}) outside the backed, pinned part"
        );
        let pins = self.pins.borrow();
        let idx = usize::try_from(off / w).expect("a pinned window index fits usize");
        let base = pins[idx].window_base();
        let at = usize::try_from(off % w).expect("window offsets fit usize");
        // SAFETY: `off % w < w`: inside the pinned window's mapping (checked
        // above that the window is pinned: backed bytes are pinned ones).
        NonNull::new(unsafe { base.add(at) }).expect("mapping is not null")
    }

    /// Copy `buf.len()` bytes at `off` into `buf`.
    pub(super) fn read(&self, off: u64, buf: &mut [u8]) {
        let p = self.checked_ptr(off, buf.len() as u64);
        // SAFETY: the range is backed and mapped (checked); `buf` is a
        // separate Rust allocation. Other processes may write the file only
        // while they hold the shard lock, which this process holds.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    }

    /// Copy `data` to `off`.
    ///
    /// # Panics
    ///
    /// On a read-only map, or out of bounds.
    pub(super) fn write(&self, off: u64, data: &[u8]) {
        assert!(self.writable, "write to a read-only metadata map");
        let p = self.checked_ptr(off, data.len() as u64);
        // SAFETY: the range is backed, mapped writable (checked); `data` is
        // not part of the mapping (it is a Rust value).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p.as_ptr(), data.len()) };
    }

    /// The aligned 64-bit word at `off`.
    ///
    /// # Panics
    ///
    /// When `off` is not 8-byte aligned or out of bounds.
    pub(super) fn word(&self, off: u64) -> &AtomicU64 {
        assert!(off.is_multiple_of(8), "unaligned metadata word at {off}");
        let p = self.checked_ptr(off, 8);
        // SAFETY: aligned (windows are page aligned, `off` a multiple of 8),
        // backed and inside a window pinned for `self`'s life.
        unsafe { p.cast::<AtomicU64>().as_ref() }
    }

    /// The bitmap of directory entry `entry`.
    ///
    /// # Panics
    ///
    /// When the entry is not backed.
    pub(super) fn bitmap(&self, entry: u32) -> Bitmap {
        let off = format::entry_offset(entry) + format::ENTRY_HEADER_BYTES;
        assert!(off.is_multiple_of(8));
        let p = self.checked_ptr(off, format::BITMAP_WORDS as u64 * 8);
        Bitmap(p.cast())
    }
}
