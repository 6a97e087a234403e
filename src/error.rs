//! One error type for the whole crate.
//!
//! Every fallible public function returns [`Result<T>`]. Operating errors
//! (a full disk, a descriptor limit, a mapping that the kernel refused) and
//! bad input (a range that crosses a window, an unknown file) are variants of
//! [`Error`] with the context needed to act on them. Programmer errors inside
//! the crate are assertions.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::files::FileId;

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in segalloc.
///
/// The enum is `#[non_exhaustive]`: match the variants you act on and keep a
/// catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range or inconsistent with another.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// An operating-system call failed.
    #[error("{op} failed{}: {source}", path_suffix(.path))]
    Io {
        /// The operation, e.g. `"open"`, `"fallocate"`, `"mmap"`.
        op: &'static str,
        /// The file concerned, when there is one.
        path: Option<PathBuf>,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The file system is full: space for the range could not be reserved.
    /// Nothing was handed out; earlier allocations are untouched.
    #[error("no space left to reserve {requested_bytes} bytes in {}", path.display())]
    NoSpace {
        /// The file that could not grow.
        path: PathBuf,
        /// How many bytes were being reserved.
        requested_bytes: u64,
    },

    /// The process ran out of file descriptors (`EMFILE`/`ENFILE`) although
    /// the registry stayed within its own cap: other code in the process holds
    /// the rest. Lower `max_open_files` or raise `RLIMIT_NOFILE`.
    #[error("too many open files while opening {}: {source}", path.display())]
    TooManyOpenFiles {
        /// The file being opened.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Every open descriptor of the registry is in use by an operation in
    /// flight, and the cap forbids opening another.
    #[error("all {max_open_files} file descriptors of the registry are in use")]
    FdPressure {
        /// The registry's cap.
        max_open_files: usize,
    },

    /// The kernel refused to create a mapping (`ENOMEM` from `mmap`: address
    /// space or `vm.max_map_count` exhausted).
    #[error("mmap of {len_bytes} bytes at offset {offset} of {} failed: {source}", path.display())]
    MapFailed {
        /// The file being mapped.
        path: PathBuf,
        /// Offset of the window in the file.
        offset: u64,
        /// Length of the window.
        len_bytes: u64,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Every window is pinned, the window cap is reached, and none was
    /// released within the configured pin timeout (or `try_pin` was used).
    #[error("all {max_extents} mapping windows are pinned (waited {waited:?})")]
    WindowPressure {
        /// The manager's window cap.
        max_extents: usize,
        /// How long the caller waited before giving up.
        waited: Duration,
    },

    /// A range crosses a window boundary. Segments never do; a caller that
    /// builds its own ranges must keep them inside one window.
    #[error(
        "range [{offset}, {offset}+{len_bytes}) crosses a window boundary (window {window_bytes} bytes)"
    )]
    CrossesWindow {
        /// Start of the range in the file.
        offset: u64,
        /// Length of the range.
        len_bytes: u64,
        /// The window size.
        window_bytes: u64,
    },

    /// A range is empty, or lies beyond what the file may hold.
    #[error("invalid range [{offset}, {offset}+{len_bytes}) in {file:?}: {reason}")]
    InvalidRange {
        /// The file.
        file: FileId,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len_bytes: u64,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// A [`FileId`] that this registry never handed out.
    #[error("unknown file id {0:?}")]
    UnknownFile(FileId),

    /// A write was asked of something opened read-only.
    #[error("read-only: {0}")]
    ReadOnly(&'static str),

    /// io_uring was forced (`SEGALLOC_IO=uring` or the config) but cannot be
    /// set up here.
    #[error("io_uring was requested but is unavailable: {source}")]
    UringUnavailable {
        /// Why setting up the ring failed.
        #[source]
        source: io::Error,
    },
}

fn path_suffix(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" on {}", p.display()),
        None => String::new(),
    }
}

impl Error {
    /// An [`Error::Io`] for `op`, with an optional path.
    pub(crate) fn io(op: &'static str, path: Option<&std::path::Path>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.map(|p| p.to_path_buf()),
            source,
        }
    }

    /// True for errors that mean "the disk is full".
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::NoSpace { .. } => true,
            Error::Io { source, .. } => source.raw_os_error() == Some(nix::libc::ENOSPC),
            _ => false,
        }
    }
}
