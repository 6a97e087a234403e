//! Advice through the ring on mapped windows: prefaulting ahead of the
//! allocator (`MADV_POPULATE_WRITE`) and prefetching (`MADV_WILLNEED`).

use std::rc::Rc;

use super::{MappingManager, WindowRef, WindowState};
use crate::error::Result;
use crate::files::FileId;
use crate::sys;

/// Prefaults in flight at most: more are skipped.
const PREFAULTS_MAX: usize = 4;

impl MappingManager {
    /// `madvise` through the ring on `[off, off + len)` of `win`, which the
    /// op keeps mapped until the kernel is done. Only advice that discards
    /// nothing (access patterns, WILLNEED, POPULATE_WRITE) is passed here.
    pub(super) fn advise(
        &self,
        win: &WindowRef,
        off: usize,
        len: usize,
        advice: i32,
    ) -> crate::io::Op {
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
        // Completed ones are dropped (polling reaps them).
        self.reap_prefaults();
        let mut ops = self.prefaults.borrow_mut();
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
                .min((idx + 1).saturating_mul(w))
                .min(fm.file.reserved());
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

    /// Wait for the prefaults in flight, so that the windows they hold are
    /// idle again (for [`evict_idle`](Self::evict_idle) or a trim).
    pub async fn settle_prefaults(&self) {
        let ops = std::mem::take(&mut *self.prefaults.borrow_mut());
        for op in ops {
            // A failed prefault only means the pages fault on first touch.
            let _ = op.await;
        }
    }

    /// Drop the prefaults the ring has completed (no waiting, and no waker
    /// registered: see [`Op::try_complete`](crate::io::Op::try_complete)).
    pub(super) fn reap_prefaults(&self) {
        self.prefaults
            .borrow_mut()
            .retain_mut(|op| op.try_complete().is_none());
    }

    /// Issue `MADV_WILLNEED` through the ring for each `(offset, len)` range
    /// of `file` whose window is mapped (ranges of unmapped windows are
    /// skipped: prefetching never maps). Returns the bytes advised.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownFile`](crate::Error::UnknownFile); a failed advice is not an error.
    pub async fn prefetch(&self, file: FileId, ranges: &[(u64, u64)]) -> Result<u64> {
        self.files.path(file)?;
        let w = self.cfg.window_bytes;
        let mut advised = 0;
        for &(offset, len) in ranges {
            if len == 0 {
                continue;
            }
            let mut at = offset;
            // Only mapped windows are advised, and none lies past the
            // file's window table: a range beyond it (any `u64` may be
            // asked for) walks no window.
            let table_end = (self.window_table_len(file) as u64).saturating_mul(w);
            let end = offset.saturating_add(len).min(table_end);
            while at < end {
                let idx = (at / w) as usize;
                let stop = (idx as u64 + 1).saturating_mul(w).min(end);
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
}
