//! [`FileLease`]: a descriptor held open by the registry.

use std::cell::Cell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;

use super::FileId;

/// Shared count of live descriptors; decremented when the last `Rc` of an
/// fd drops.
pub(super) struct FdCounter(pub(super) Rc<Cell<usize>>);

/// A descriptor held open by the registry. Dropping the lease releases it;
/// the fd stays cached until evicted.
pub struct FileLease {
    pub(super) id: FileId,
    pub(super) fd: Rc<OwnedFd>,
    pub(super) _count: Rc<FdCounter>,
}

impl FileLease {
    /// The file.
    pub fn id(&self) -> FileId {
        self.id
    }
    /// The descriptor; valid while the lease lives.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    pub(crate) fn shared_fd(&self) -> &Rc<OwnedFd> {
        &self.fd
    }
}

impl AsRawFd for FileLease {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl std::fmt::Debug for FileLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileLease")
            .field("id", &self.id)
            .field("fd", &self.fd.as_raw_fd())
            .finish()
    }
}

impl Drop for FdCounter {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}
