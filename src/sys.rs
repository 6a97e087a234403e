//! The only home of raw system calls.
//!
//! **Architecture invariant:** no other module calls `libc` directly
//! (others use its constants). Crates make the rest: `mmap`, `munmap` and
//! `madvise` of windows through memmap2, the ring's `io_uring_*` calls
//! through io-uring, `epoll` through tokio. Each
//! function here is a thin, documented wrapper that turns `-1` into
//! [`io::Error::last_os_error`]. Higher layers decide *when* a call is made
//! (inline, or through the shard's io_uring ring); this module only makes it.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::libc;

/// Turn a `-1` return into `io::Error::last_os_error()`.
macro_rules! syscall {
    ($e:expr) => {{
        let res = $e;
        if res == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}

fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// How a data file is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)] // the names spell the open flags
pub enum OpenMode {
    /// `O_RDWR`, created with mode 0600 if missing.
    ReadWriteCreate,
    /// `O_RDWR`, must exist.
    ReadWrite,
    /// `O_RDONLY`, must exist.
    ReadOnly,
}

/// `open(path, O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | …, 0600)` of a regular
/// file.
///
/// `O_NOFOLLOW` makes a symlink in place of a data file an error (`ELOOP`)
/// instead of a silent redirection. `O_NONBLOCK` keeps a FIFO in its place
/// from blocking the open (a read-only open of one waits for a writer); it
/// changes nothing for a regular file. Anything but a regular file is then
/// refused (`InvalidInput`).
pub fn open(path: &Path, mode: OpenMode) -> io::Result<OwnedFd> {
    open_in(None, path, mode)
}

/// [`open`] of `name` in the folder `dir` (`openat`): a folder renamed or
/// replaced since `dir` was opened does not change which file this opens.
pub fn open_at(dir: BorrowedFd<'_>, name: &Path, mode: OpenMode) -> io::Result<OwnedFd> {
    open_in(Some(dir), name, mode)
}

fn open_in(dir: Option<BorrowedFd<'_>>, path: &Path, mode: OpenMode) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    let flags = libc::O_CLOEXEC
        | libc::O_NOFOLLOW
        | libc::O_NONBLOCK
        | match mode {
            OpenMode::ReadWriteCreate => libc::O_RDWR | libc::O_CREAT,
            OpenMode::ReadWrite => libc::O_RDWR,
            OpenMode::ReadOnly => libc::O_RDONLY,
        };
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call;
    // `at` is `AT_FDCWD` or a folder descriptor borrowed for the call.
    let fd = syscall!(unsafe { libc::openat(at, c.as_ptr(), flags, 0o600 as libc::c_uint) })?;
    // SAFETY: `openat` returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero bytes are a valid `stat` (integers only).
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` is a valid out-pointer.
    syscall!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(fd)
}

/// The bytes of the regular file at `path`, at most `max` of them, opened
/// as [`open`] opens it (no symlink followed, a FIFO refused at once).
pub fn read_regular(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::from(open(path, OpenMode::ReadOnly)?)
        .take(max)
        .read_to_end(&mut out)?;
    Ok(out)
}

/// `open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)`: a folder,
/// for `flock` or `fsync`; a symlink or a non-directory is an error.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cpath(path)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let fd = syscall!(unsafe { libc::open(c.as_ptr(), flags) })?;
    // SAFETY: `open` returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// [`open_dir`] of `name` in the folder `dir` (`openat`).
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &Path) -> io::Result<OwnedFd> {
    let c = cpath(name)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call;
    // `dir` is a folder descriptor borrowed for the call.
    let fd = syscall!(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) })?;
    // SAFETY: `openat` returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The device and inode of `name` in the folder `dir`, not followed if a
/// symlink (`fstatat(AT_SYMLINK_NOFOLLOW)`).
pub fn identity_at(dir: BorrowedFd<'_>, name: &Path) -> io::Result<(u64, u64)> {
    let c = cpath(name)?;
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid
    // out-pointer, both outliving the call; `dir` is borrowed for it.
    syscall!(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok((st.st_dev, st.st_ino))
}

/// The path the descriptor `fd` is open on now (`/proc/self/fd/N`): where
/// its file is, even once renamed.
pub fn fd_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The folder `dir` opened again (`openat(dir, ".")`): a descriptor of
/// its own, which shares no `flock` with `dir` (a duplicate of a locked
/// descriptor would hold the lock for as long as it is open).
pub fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: the path is a static NUL-terminated string; `dir` is a folder
    // descriptor borrowed for the call.
    let fd = syscall!(unsafe { libc::openat(dir.as_raw_fd(), c".".as_ptr(), flags) })?;
    // SAFETY: `openat` returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat(fd)`.
fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is a live descriptor and `st` is a valid out-pointer.
    syscall!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// `fstat(fd).st_size`.
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    Ok(fstat(fd)?.st_size as u64)
}

/// `fstat(fd)`'s size and `(st_dev, st_ino)`, in one call.
pub fn file_size_and_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, (u64, u64))> {
    let st = fstat(fd)?;
    Ok((st.st_size as u64, (st.st_dev, st.st_ino)))
}

/// `fstat(fd)`'s `(st_dev, st_ino)`: which file `fd` is.
pub fn file_identity(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    let st = fstat(fd)?;
    Ok((st.st_dev, st.st_ino))
}

/// The first data region of the file `fd` at or after `off`
/// (`lseek(SEEK_DATA)`, then `SEEK_HOLE` from there): `None` when only holes
/// follow `off`. A file system that cannot tell holes (`EINVAL`, or a FUSE
/// server's `EOPNOTSUPP` or `ENOSYS`) answers the rest of the file as data.
pub fn data_region(fd: BorrowedFd<'_>, off: u64) -> io::Result<Option<(u64, u64)>> {
    let seek = |from: u64, whence: i32| -> io::Result<u64> {
        let from =
            libc::off_t::try_from(from).map_err(|_| io::Error::from_raw_os_error(libc::ENXIO))?;
        // SAFETY: lseek takes no pointers; a stale fd yields EBADF.
        let at = syscall!(unsafe { libc::lseek(fd.as_raw_fd(), from, whence) })?;
        Ok(at as u64)
    };
    let start = match seek(off, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
            ) =>
        {
            return Ok(Some((off, u64::MAX)));
        }
        Err(e) => return Err(e),
    };
    let end = seek(start, libc::SEEK_HOLE)?;
    Ok(Some((start, end)))
}

/// Whether the file or folder `fd` has no name left (`st_nlink == 0`: it
/// was removed while open).
pub fn is_unlinked(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(fstat(fd)?.st_nlink == 0)
}

/// `fallocate(fd, mode, offset, len)`.
pub fn fallocate(fd: RawFd, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes no pointers. (A closed fd gives EBADF; one
    // whose number was reused names another file: callers hold the
    // descriptor, an `OwnedFd`, while the call runs.)
    syscall!(unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) })?;
    Ok(())
}

/// `ftruncate(fd, len)`.
pub fn ftruncate(fd: RawFd, len: u64) -> io::Result<()> {
    // SAFETY: ftruncate takes no pointers (callers hold the descriptor, as
    // for `fallocate`).
    syscall!(unsafe { libc::ftruncate(fd, len as libc::off_t) })?;
    Ok(())
}

/// `fsync(fd)` or `fdatasync(fd)`.
pub fn fsync(fd: RawFd, datasync: bool) -> io::Result<()> {
    if datasync {
        // SAFETY: takes no pointers; a stale fd yields EBADF.
        syscall!(unsafe { libc::fdatasync(fd) })?;
    } else {
        // SAFETY: takes no pointers; a stale fd yields EBADF.
        syscall!(unsafe { libc::fsync(fd) })?;
    }
    Ok(())
}

/// `madvise(addr, len, advice)`.
///
/// # Safety
///
/// `[addr, addr + len)` must lie inside a mapping that the caller keeps alive
/// for the duration of the call, and `advice` must not discard data the
/// program still relies on (`MADV_DONTNEED` on a shared file mapping only
/// drops page-table entries; the file keeps the data).
pub unsafe fn madvise(addr: *mut u8, len: usize, advice: i32) -> io::Result<()> {
    // SAFETY: the caller guarantees the range is a live mapping (see above).
    syscall!(unsafe { libc::madvise(addr.cast(), len, advice) })?;
    Ok(())
}

/// `eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)`.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: no pointers involved.
    let fd = syscall!(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Read (and so reset) an eventfd counter. `Ok(false)` when it was zero.
pub fn eventfd_drain(fd: RawFd) -> io::Result<bool> {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is 8 writable bytes, the size an eventfd read needs.
    match syscall!(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// `flock(fd, LOCK_EX | LOCK_NB)`: `Ok(false)` when another holder has it.
pub fn try_lock_exclusive(fd: RawFd) -> io::Result<bool> {
    // SAFETY: no pointers involved.
    match syscall!(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// `flock(fd, LOCK_SH | LOCK_NB)`: `Ok(false)` when an exclusive holder has it.
pub fn try_lock_shared(fd: RawFd) -> io::Result<bool> {
    // SAFETY: no pointers involved.
    match syscall!(unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// `flock(fd, LOCK_UN)`: release a lock taken through `fd`.
///
/// An `flock` belongs to the open file description, which a forked child
/// shares until it execs or exits: closing one descriptor does not release
/// the lock while such a copy exists, `LOCK_UN` does.
pub fn unlock(fd: RawFd) -> io::Result<()> {
    // SAFETY: no pointers involved.
    syscall!(unsafe { libc::flock(fd, libc::LOCK_UN) })?;
    Ok(())
}

/// The soft and hard `RLIMIT_NOFILE`.
pub fn nofile_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid out-pointer.
    syscall!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) })?;
    Ok((r.rlim_cur, r.rlim_max))
}

/// Set the soft `RLIMIT_NOFILE` (tests use it to prove the fd cap holds).
#[cfg(feature = "test-support")]
pub fn set_nofile_soft_limit(soft: u64) -> io::Result<()> {
    let (_, hard) = nofile_limit()?;
    let r = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: `r` is a valid in-pointer.
    syscall!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) })?;
    Ok(())
}

/// `vm.max_map_count`, or `None` when `/proc` does not say.
pub fn max_map_count() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf takes no pointers.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n <= 0 { 4096 } else { n as usize }
}

/// Number of CPUs this thread may run on.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// `fallocate` mode 0: allocate blocks and extend the file size.
pub const FALLOC_EXTEND: i32 = 0;
/// `fallocate` mode that deallocates a range (`FALLOC_FL_PUNCH_HOLE`) and
/// keeps the file size (`FALLOC_FL_KEEP_SIZE`, required with it).
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `MADV_WILLNEED`.
pub const MADV_WILLNEED: i32 = libc::MADV_WILLNEED;
/// `MADV_RANDOM`.
pub const MADV_RANDOM: i32 = libc::MADV_RANDOM;
/// `MADV_SEQUENTIAL`.
pub const MADV_SEQUENTIAL: i32 = libc::MADV_SEQUENTIAL;
/// `MADV_POPULATE_WRITE` (Linux 5.14): prefault writable, errors instead of SIGBUS.
pub const MADV_POPULATE_WRITE: i32 = 23;

/// True when an error means "this file system or kernel cannot do that".
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// A set of CPUs (`cpu_set_t`).
pub type CpuSet = libc::cpu_set_t;

/// The set of the CPUs `cpus`; `None` when it would be empty or a CPU is at
/// or above `CPU_SETSIZE`.
pub fn cpu_set(cpus: &[usize]) -> Option<CpuSet> {
    if cpus.is_empty() || cpus.iter().any(|&c| c >= libc::CPU_SETSIZE as usize) {
        return None;
    }
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        // SAFETY: `cpu` < CPU_SETSIZE (checked above): inside the set.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    Some(set)
}

/// The CPUs the calling thread may run on (its affinity mask), ascending;
/// empty when the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` < CPU_SETSIZE: inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect()
}

/// Pin the calling thread to one CPU (`sched_setaffinity(0, …)`).
pub fn pin_thread_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set`: the index is reduced below
    // CPU_SETSIZE here.
    unsafe { libc::CPU_SET(cpu % libc::CPU_SETSIZE as usize, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    syscall!(unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) })?;
    Ok(())
}
