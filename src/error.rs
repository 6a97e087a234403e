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

use crate::format::handle::{BadHandle, Handle};

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
    #[error(
        "no space left to reserve {requested_bytes} bytes in {} (data files grow by growth_step_bytes at a time, 64 MiB by default: free disk space or lower that setting)",
        path.display()
    )]
    NoSpace {
        /// The file that could not grow.
        path: PathBuf,
        /// How many bytes were being reserved.
        requested_bytes: u64,
    },

    /// The process ran out of file descriptors (`EMFILE`/`ENFILE`) although
    /// the registry stayed within its own cap: other code in the process holds
    /// the rest, or the shards' own descriptors (locks, executors, rings: see
    /// the README) do not fit beside it. Lower `max_open_files` or the shard
    /// count, or raise `RLIMIT_NOFILE`. `path` is the file or folder being
    /// opened, or the folder of a shard whose executor could not be built.
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
    #[error(
        "all {max_windows} mapping windows are pinned (waited {waited:?}): drop pins sooner, or \
         raise max_windows (each shard keeps one window of its metadata pinned)"
    )]
    WindowPressure {
        /// The manager's window cap.
        max_windows: usize,
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

    /// A range is empty, or lies beyond what the file, the pin or the
    /// allocation may hold.
    #[error("invalid range [{offset}, {offset}+{len_bytes}){}: {reason}", in_file(*.file_id))]
    InvalidRange {
        /// The file's number in its registry (a `FileId`'s value), or
        /// `u32::MAX` for a range checked against a pin or an allocation
        /// (its message then names no file).
        file_id: u32,
        /// Start of the range.
        offset: u64,
        /// Length of the range.
        len_bytes: u64,
        /// Why it is invalid.
        reason: &'static str,
    },

    /// A file number (a `FileId`'s value) that the registry never handed out.
    #[error("unknown file id {0}")]
    UnknownFile(u32),

    /// A window of a file of a closed allocator was asked for. Pins of it
    /// taken while it was open stay valid (and keep its shard locked); no
    /// new one is made, since the shard may be opened again meanwhile.
    #[error("file {file_id} belongs to an allocator that is closed")]
    OwnerClosed {
        /// The registry's number of the file.
        file_id: u32,
    },

    /// A safe pin of another shard's data file, registered for
    /// `Shard::pin_foreign`: only that (unsafe) call may pin it.
    #[error("file {file_id} is another shard's: only Shard::pin_foreign pins it")]
    ForeignFile {
        /// The registry's number of the file.
        file_id: u32,
    },

    /// A pin or reservation through the [`MappingManager`](crate::MappingManager)'s
    /// own calls, or a lease or growth through the
    /// [`FileHandleRegistry`](crate::FileHandleRegistry)'s, of a file an
    /// allocator keeps its data or metadata in: its bytes are reached
    /// through the allocator ([`Shard::pin`](crate::Shard::pin), `read`,
    /// `write`), which checks them against its allocations.
    #[error(
        "file {file_id} holds an allocator's data or metadata: pin its allocations through the shard"
    )]
    AllocatorFile {
        /// The registry's number of the file.
        file_id: u32,
    },

    /// A write was asked of something opened read-only.
    #[error("read-only: {0}")]
    ReadOnly(&'static str),

    /// An allocation size of zero or above 16 MiB.
    #[error("invalid allocation size {size} (must be 1..=16 MiB)")]
    InvalidSize {
        /// The size asked for.
        size: u64,
    },

    /// Bytes that do not decode to a handle.
    #[error("not a valid handle: {reason}")]
    BadHandle {
        /// What is wrong with the bytes.
        reason: &'static str,
    },

    /// A handle that belongs to another data directory.
    #[error(
        "handle {handle} belongs to another data directory (tag {handle_tag:#010x}, this directory {dir_tag:#010x})"
    )]
    ForeignHandle {
        /// The handle.
        handle: Handle,
        /// The handle's directory tag.
        handle_tag: u32,
        /// This directory's tag.
        dir_tag: u32,
    },

    /// A handle that names no live allocation: never allocated, out of
    /// bounds, of another class, or freed already.
    #[error("handle {handle} is not a live allocation: {reason}")]
    NotAllocated {
        /// The handle.
        handle: Handle,
        /// Why.
        reason: &'static str,
    },

    /// A handle freed a second time.
    #[error("double free of {handle}")]
    DoubleFree {
        /// The handle.
        handle: Handle,
    },

    /// A handle owned by another shard used where only the owner can act.
    #[error("handle {handle} belongs to shard {owner}, not shard {this}")]
    WrongShard {
        /// The handle.
        handle: Handle,
        /// The owning shard.
        owner: u16,
        /// The shard asked.
        this: u16,
    },

    /// On-disk data failed validation.
    #[error("corrupt {what}: {detail}")]
    Corrupt {
        /// Which structure (file and part).
        what: String,
        /// What is wrong.
        detail: String,
    },

    /// A data file is shorter than the live allocations the metadata places
    /// in it: it was cut short (`truncate`, a copy, a damaged file system)
    /// and their bytes are lost. Recovery refuses the shard.
    #[error(
        "data file {} is truncated: {actual_bytes} bytes, its live allocations need {needed_bytes}",
        path.display()
    )]
    DataFileTruncated {
        /// The data file.
        path: PathBuf,
        /// Bytes the live allocations in it need (the end of the last one).
        needed_bytes: u64,
        /// The file's size.
        actual_bytes: u64,
    },

    /// The data directory is already open (in this or another process).
    #[error("data directory {} is already open by another instance", path.display())]
    AlreadyOpen {
        /// The directory.
        path: PathBuf,
    },

    /// A shard is already open for writing (in this or another process):
    /// every writable open of a shard holds an exclusive lock on its folder.
    #[error("shard {shard} ({}) is already open by another instance", path.display())]
    ShardAlreadyOpen {
        /// The shard.
        shard: u16,
        /// The shard's folder inside the data directory.
        path: PathBuf,
    },

    /// A data directory that does not exist, where none is created (read-only
    /// opens; [`DataDir::open`](crate::DataDir::open) creates it).
    #[error("data directory {} does not exist", path.display())]
    DirNotFound {
        /// The path given.
        path: PathBuf,
    },

    /// A path given as a data directory that is not a directory.
    #[error("{} is {kind}, not a directory", path.display())]
    NotADirectory {
        /// The path given.
        path: PathBuf,
        /// What it is instead, e.g. `"a regular file"`.
        kind: &'static str,
    },

    /// A directory that is not a segalloc data directory (no valid manifest,
    /// or an entry segalloc did not create), where one is required.
    #[error("{} is not a segalloc data directory: {reason}", path.display())]
    NotDataDir {
        /// The directory, or the entry in it that is not segalloc's.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },

    /// The data directory was created with other settings.
    #[error("data directory was created with {what} = {on_disk}, but {requested} was requested")]
    Mismatch {
        /// The setting.
        what: &'static str,
        /// Its value on disk.
        on_disk: u64,
        /// The value asked for.
        requested: u64,
    },

    /// A root name that is empty, longer than 64 bytes, or the root table
    /// is full.
    #[error("root error: {0}")]
    Root(String),

    /// A previous `sync` failed: the shard refuses further writes until it
    /// is reopened (a failed fsync cannot be retried safely).
    #[error("shard {shard} is poisoned by an earlier failed sync: reopen the data directory")]
    Poisoned {
        /// The shard.
        shard: u16,
    },

    /// The shard (or runtime) is shut down or its thread is gone.
    #[error("shard {shard} is not running")]
    ShardGone {
        /// The shard.
        shard: u16,
    },

    /// A task spawned on a shard panicked (the shard keeps serving), or,
    /// from `Runtime::shutdown`, a whole shard thread did (its message says
    /// so).
    #[error("task on shard {shard} panicked: {message}")]
    TaskPanicked {
        /// The shard.
        shard: u16,
        /// The panic message.
        message: String,
    },

    /// A safe pin was asked of another shard's allocation: only its owner
    /// may touch its bytes. Copy through the owner with `Shard::read` /
    /// `Shard::write`, or run a closure there with `Shard::run_on_owner`.
    #[error(
        "handle {handle} belongs to shard {owner}: shard {this} cannot pin it; use Shard::read, Shard::write or Shard::run_on_owner"
    )]
    NotOwner {
        /// The handle.
        handle: Handle,
        /// The owning shard.
        owner: u16,
        /// The shard asked.
        this: u16,
    },

    /// A call that needs an executor context was made without it.
    #[error("{call} needs {needs}")]
    NoExecutor {
        /// The call.
        call: &'static str,
        /// What must surround it.
        needs: &'static str,
    },

    /// Frees of other shards' handles that this shard forwarded and their
    /// owners rejected (a double free, a stale or forged handle, a handle
    /// of a slot freed since), reported by
    /// [`Shard::flush_frees`](crate::Shard::flush_frees) once the owners
    /// have answered: `count` since the last report, and the first one's
    /// error, naming its handle (with overlapping flushes whose answers
    /// were taken out of order, a later one's; `None` when the error was
    /// lost with a flush dropped after the owner answered, or taken by an
    /// overlapping flush after the count was reported). Nothing else changed:
    /// each rejected free changed nothing on its owner.
    #[error(
        "{count} forwarded free(s) rejected by their owners{}",
        first_rejected(first)
    )]
    FreesRejected {
        /// Rejected frees since the last report.
        count: u64,
        /// The first one's error.
        first: Option<Box<Error>>,
    },

    /// A shard index at or above the number of shards.
    #[error("shard {shard} out of range: the runtime has {shard_count} shards")]
    ShardOutOfRange {
        /// The index asked for.
        shard: usize,
        /// How many shards there are.
        shard_count: usize,
    },

    /// Too many frees forwarded to `owner` are waiting to be applied: this
    /// free was not queued. Await `Shard::flush_frees` and retry.
    #[error(
        "shard {owner} is behind on forwarded frees ({queued} buffered here): await Shard::flush_frees and retry"
    )]
    Backpressure {
        /// The owning shard.
        owner: u16,
        /// Frees buffered for it on this shard.
        queued: usize,
    },

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

    /// `op` on `path` failed with `e`: [`Error::TooManyOpenFiles`] when the
    /// process (`EMFILE`) or the system (`ENFILE`) is out of descriptors,
    /// else [`Error::Io`].
    pub(crate) fn opening(op: &'static str, path: &std::path::Path, e: io::Error) -> Self {
        if out_of_descriptors(&e) {
            Error::TooManyOpenFiles {
                path: path.to_path_buf(),
                source: e,
            }
        } else {
            Error::io(op, Some(path), e)
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

impl From<BadHandle> for Error {
    fn from(e: BadHandle) -> Error {
        Error::BadHandle { reason: e.reason }
    }
}

/// [`Error::InvalidRange`]'s `file_id` for a range checked against a pin or
/// an allocation rather than a file.
pub(crate) const NOT_A_FILE: u32 = u32::MAX;

/// `FreesRejected`'s first error, for its message.
fn first_rejected(first: &Option<Box<Error>>) -> String {
    match first {
        Some(e) => format!("; the first: {e}"),
        None => String::new(),
    }
}

/// The file part of [`Error::InvalidRange`]'s message.
fn in_file(file_id: u32) -> String {
    if file_id == NOT_A_FILE {
        String::new()
    } else {
        format!(" in file {file_id}")
    }
}

/// Whether `e` says the process (`EMFILE`) or the system (`ENFILE`) is out
/// of descriptors.
pub(crate) fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EMFILE | nix::libc::ENFILE)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_names_the_setting_to_change() {
        let e = Error::NoSpace {
            path: PathBuf::from("/data/shard-000/data-000000.seg"),
            requested_bytes: 64 << 20,
        };
        let text = e.to_string();
        assert!(text.contains("growth_step_bytes"), "{text}");
        assert!(text.contains("/data/shard-000/data-000000.seg"), "{text}");
    }
}
