//! `FileHandleRegistry`: one descriptor per data file, reused, capped, LRU.
//!
//! **Architecture invariants:**
//! * `open_count() <= max_open_files()` at every moment. A descriptor is
//!   counted from `open` until its last `Rc` drops, including the copies held
//!   by io operations in flight, so the cap is a cap on real descriptors.
//! * Only idle descriptors (no lease, no operation in flight) are evicted.
//!   Evicting a descriptor never unmaps a window: a mapping outlives its fd.
//! * A file only grows. `reserved` (bytes whose blocks are allocated) never
//!   exceeds the file's size, and nothing above `reserved` is handed out.
//! * Single-threaded: interior mutability through `RefCell`, no lock, and no
//!   borrow is held across an `.await`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use tracing::Instrument;

use crate::error::{Error, Result};
use crate::io::{Op, Ring};
use crate::sys::{self, OpenMode};
use crate::wait::WaitList;

mod lease;

use lease::FdCounter;
pub use lease::FileLease;

/// Identifies a file registered with a [`FileHandleRegistry`]; an index, so
/// lookups are O(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// Counters of a registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Descriptors open now (including those held by operations in flight).
    pub open: usize,
    /// The cap.
    pub max_open: usize,
    /// Files registered.
    pub files: usize,
    /// `open` calls made.
    pub opens: u64,
    /// Descriptors closed to stay within the cap.
    pub evictions: u64,
    /// Growth operations.
    pub grows: u64,
    /// Bytes added by growth.
    pub grown_bytes: u64,
    /// Folder fsyncs made to make files' directory entries durable.
    pub dir_syncs: u64,
}

/// How a growth request was satisfied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reservation {
    /// The blocks up to the requested size are allocated (`fallocate`):
    /// writes cannot fail for lack of space.
    Reserved,
    /// The file system cannot `fallocate`; the file was extended with
    /// `ftruncate` and `[from, to)` is a hole. The caller must prefault it
    /// with `MADV_POPULATE_WRITE` and then call
    /// [`FileHandleRegistry::mark_reserved`].
    Sparse {
        /// Start of the hole.
        from: u64,
        /// End of the hole (the new file size).
        to: u64,
    },
}

struct FileEntry {
    path: PathBuf,
    fd: Option<Rc<OwnedFd>>,
    len_bytes: u64,
    len_known: bool,
    reserved: Rc<Cell<u64>>,
    last_use: u64,
    growing: bool,
    grow_waiters: Rc<WaitList>,
    fallocate_ok: bool,
    /// Owned by another shard: opened without `O_CREAT`, never grown here.
    foreign: bool,
    /// A fsync of the file's folder succeeded after the file was created or
    /// found: its directory entry survives a power loss.
    dir_durable: bool,
    /// The size as of the start of the last successful `fdatasync`: that
    /// much of the file survives a power loss.
    durable_len: u64,
    /// The file may hold changes no `fdatasync` began after.
    dirty: Cell<bool>,
    /// The errno of a failed `fdatasync`, reported by every later sync: the
    /// kernel reports a write-back error once, and the call that saw it may
    /// have been dropped before its caller looked.
    sync_failed: Option<i32>,
}

struct Files {
    entries: Vec<FileEntry>,
    by_path: HashMap<PathBuf, FileId>,
    tick: u64,
    stats: FileStats,
}

/// One descriptor per data file with LRU eviction, single-threaded and
/// async.
///
/// ```no_run
/// # async fn demo() -> segalloc::Result<()> {
/// use segalloc::{FileHandleRegistry, io::Ring, config::IoBackendChoice};
/// let ring = Ring::new(IoBackendChoice::Auto)?;
/// let files = FileHandleRegistry::new(ring, 16);
/// let id = files.register("/tmp/segalloc-doc.dat");
/// let lease = files.acquire(id, 1 << 20).await?; // opened once, 1 MiB reserved
/// assert_eq!(files.open_count(), 1);
/// drop(lease); // the fd stays cached for the next acquire
/// # Ok(()) }
/// ```
pub struct FileHandleRegistry {
    inner: RefCell<Files>,
    ring: Ring,
    max_open: usize,
    mode: OpenMode,
    open: Rc<Cell<usize>>,
    /// One counter object per open descriptor, cloned into leases.
    counters: RefCell<HashMap<FileId, Rc<FdCounter>>>,
    /// `fsync` operations whose `sync` call was dropped before they
    /// completed: their outcome is collected by the next sync of the file.
    orphans: RefCell<Vec<(FileId, Op)>>,
}

impl FileHandleRegistry {
    /// A registry that creates files on demand (mode 0600) and keeps at most
    /// `max_open_files` descriptors open.
    pub fn new(ring: Ring, max_open_files: usize) -> FileHandleRegistry {
        Self::with_mode(ring, max_open_files, OpenMode::ReadWriteCreate)
    }

    /// A registry that opens existing files read-only and never grows them.
    pub fn new_read_only(ring: Ring, max_open_files: usize) -> FileHandleRegistry {
        Self::with_mode(ring, max_open_files, OpenMode::ReadOnly)
    }

    fn with_mode(ring: Ring, max_open_files: usize, mode: OpenMode) -> FileHandleRegistry {
        assert!(max_open_files >= 1, "max_open_files must be at least 1");
        FileHandleRegistry {
            inner: RefCell::new(Files {
                entries: Vec::new(),
                by_path: HashMap::new(),
                tick: 0,
                stats: FileStats {
                    max_open: max_open_files,
                    ..FileStats::default()
                },
            }),
            ring,
            max_open: max_open_files,
            mode,
            open: Rc::new(Cell::new(0)),
            counters: RefCell::new(HashMap::new()),
            orphans: RefCell::new(Vec::new()),
        }
    }

    /// The control ring this registry grows and syncs files through.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Whether files are opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.mode == OpenMode::ReadOnly
    }

    /// Register a path (no syscall); the same path gives the same id.
    pub fn register(&self, path: impl AsRef<Path>) -> FileId {
        let path = path.as_ref();
        let mut f = self.inner.borrow_mut();
        if let Some(&id) = f.by_path.get(path) {
            return id;
        }
        let id = FileId(u32::try_from(f.entries.len()).expect("fewer than 2^32 files"));
        f.entries.push(FileEntry {
            path: path.to_path_buf(),
            fd: None,
            len_bytes: 0,
            len_known: false,
            reserved: Rc::new(Cell::new(0)),
            last_use: 0,
            growing: false,
            grow_waiters: Rc::new(WaitList::default()),
            fallocate_ok: true,
            foreign: false,
            dir_durable: false,
            durable_len: 0,
            dirty: Cell::new(false),
            sync_failed: None,
        });
        f.by_path.insert(path.to_path_buf(), id);
        f.stats.files = f.entries.len();
        id
    }

    /// Register a file owned by another shard (cross-shard pins): it is
    /// opened without `O_CREAT` and never grown through this registry; its
    /// size is re-read from the file when a range lies beyond what was seen.
    ///
    /// A path is registered only if the file exists, so names of files that
    /// do not exist (a forged handle) cost no memory and close no cached
    /// descriptor; the entries are bounded by the files on disk.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] (`NotFound`, …) when the file cannot be looked up.
    pub fn register_foreign(&self, path: impl AsRef<Path>) -> Result<FileId> {
        let path = path.as_ref();
        if let Some(&id) = self.inner.borrow().by_path.get(path) {
            return Ok(id);
        }
        std::fs::symlink_metadata(path).map_err(|e| Error::io("stat", Some(path), e))?;
        let id = self.register(path);
        self.inner.borrow_mut().entries[id.0 as usize].foreign = true;
        Ok(id)
    }

    /// The path of a registered file.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownFile`] for an id this registry never handed out.
    pub fn path(&self, id: FileId) -> Result<PathBuf> {
        let f = self.inner.borrow();
        f.entries
            .get(id.0 as usize)
            .map(|e| e.path.clone())
            .ok_or(Error::UnknownFile(id.0))
    }

    /// Descriptors open now, including those kept by operations in flight.
    pub fn open_count(&self) -> usize {
        self.open.get()
    }

    /// The descriptor cap.
    pub fn max_open_files(&self) -> usize {
        self.max_open
    }

    /// Bytes of `id` whose blocks are reserved (safe to write through a
    /// mapping). Zero until the file was first acquired.
    pub fn reserved_bytes(&self, id: FileId) -> Result<u64> {
        let f = self.inner.borrow();
        f.entries
            .get(id.0 as usize)
            .map(|e| e.reserved.get())
            .ok_or(Error::UnknownFile(id.0))
    }

    /// The file's size as last seen (`None` before the first acquire).
    pub fn len_bytes(&self, id: FileId) -> Result<Option<u64>> {
        let f = self.inner.borrow();
        let e = f
            .entries
            .get(id.0 as usize)
            .ok_or(Error::UnknownFile(id.0))?;
        Ok(e.len_known.then_some(e.len_bytes))
    }

    /// Bytes of `id` known to survive a power loss: its size when the last
    /// successful [`sync`](Self::sync) of it began (0 before one).
    ///
    /// # Errors
    ///
    /// [`Error::UnknownFile`] for an id this registry never handed out.
    pub fn durable_bytes(&self, id: FileId) -> Result<u64> {
        let f = self.inner.borrow();
        f.entries
            .get(id.0 as usize)
            .map(|e| e.durable_len)
            .ok_or(Error::UnknownFile(id.0))
    }

    /// Record that `id` may hold changes that are not durable yet (a write
    /// through a mapping, an allocation in it). No syscall.
    #[inline]
    pub fn mark_dirty(&self, id: FileId) {
        if let Some(e) = self.inner.borrow().entries.get(id.0 as usize) {
            e.dirty.set(true);
        }
    }

    /// Whether `id` may hold changes no `fdatasync` began after; the flag
    /// is cleared when a [`sync`](Self::sync) of it begins and set again
    /// if that sync fails.
    pub fn is_dirty(&self, id: FileId) -> bool {
        self.inner
            .borrow()
            .entries
            .get(id.0 as usize)
            .is_some_and(|e| e.dirty.get())
    }

    pub(crate) fn reserved_cell(&self, id: FileId) -> Result<Rc<Cell<u64>>> {
        let f = self.inner.borrow();
        f.entries
            .get(id.0 as usize)
            .map(|e| e.reserved.clone())
            .ok_or(Error::UnknownFile(id.0))
    }

    /// Counters.
    pub fn stats(&self) -> FileStats {
        let mut s = self.inner.borrow().stats;
        s.open = self.open.get();
        s
    }

    /// Register `path` and acquire it.
    ///
    /// # Errors
    ///
    /// As [`FileHandleRegistry::acquire`].
    pub async fn acquire_path(&self, path: impl AsRef<Path>, min_size: u64) -> Result<FileLease> {
        let id = self.register(path);
        self.acquire(id, min_size).await
    }

    /// Open `id` if needed (one `open` per file, reused), grow it so that at
    /// least `min_size` bytes are reserved, and return a lease that keeps the
    /// descriptor open until dropped.
    ///
    /// Growth reserves blocks with `fallocate` through the control ring. On a
    /// file system that cannot `fallocate`, use [`FileHandleRegistry::grow`]
    /// to learn that the new range is sparse; `acquire` then only guarantees
    /// the file *size*.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownFile`], [`Error::FdPressure`] (every cached fd is busy),
    /// [`Error::TooManyOpenFiles`], [`Error::NoSpace`], [`Error::ReadOnly`]
    /// (growing a read-only registry's file), [`Error::Io`].
    pub async fn acquire(&self, id: FileId, min_size: u64) -> Result<FileLease> {
        let (lease, _) = self.grow(id, min_size).await?;
        Ok(lease)
    }

    /// Like [`acquire`](Self::acquire), and say how the growth was done.
    ///
    /// # Errors
    ///
    /// As [`FileHandleRegistry::acquire`].
    pub async fn grow(&self, id: FileId, min_size: u64) -> Result<(FileLease, Reservation)> {
        loop {
            let lease = match self.lease(id, true) {
                // Operations dropped mid-flight keep their descriptors until
                // the ring reaps them: drive it, then try again.
                Err(e @ Error::FdPressure { .. }) if self.ring.abandoned_in_flight() > 0 => {
                    if self.ring.settle().await.is_err() {
                        return Err(e);
                    }
                    continue;
                }
                r => r?,
            };
            if self.inner.borrow().entries[id.0 as usize].foreign {
                return self.refresh_foreign(lease, id, min_size);
            }
            let waiters = {
                let mut f = self.inner.borrow_mut();
                let e = &mut f.entries[id.0 as usize];
                if e.reserved.get() >= min_size {
                    return Ok((lease, Reservation::Reserved));
                }
                if !e.fallocate_ok && e.len_bytes >= min_size && !e.growing {
                    // Already extended (sparse); the caller prefaults.
                    let from = e.reserved.get();
                    return Ok((lease, Reservation::Sparse { from, to: min_size }));
                }
                if e.growing {
                    Some(e.grow_waiters.clone())
                } else {
                    e.growing = true;
                    None
                }
            };
            if let Some(w) = waiters {
                drop(lease);
                w.wait().await;
                continue;
            }
            let guard = GrowGuard { reg: self, id };
            let res = self.grow_locked(&lease, id, min_size).await;
            drop(guard);
            return res.map(|r| (lease, r));
        }
    }

    async fn grow_locked(
        &self,
        lease: &FileLease,
        id: FileId,
        min_size: u64,
    ) -> Result<Reservation> {
        let span = tracing::debug_span!("grow", file = id.0, to = min_size);
        self.grow_locked_inner(lease, id, min_size)
            .instrument(span)
            .await
    }

    async fn grow_locked_inner(
        &self,
        lease: &FileLease,
        id: FileId,
        min_size: u64,
    ) -> Result<Reservation> {
        if self.mode == OpenMode::ReadOnly {
            return Err(Error::ReadOnly("cannot grow a file opened read-only"));
        }
        let (path, reserved, len, fallocate_ok) = {
            let f = self.inner.borrow();
            let e = &f.entries[id.0 as usize];
            (
                e.path.clone(),
                e.reserved.get(),
                e.len_bytes,
                e.fallocate_ok,
            )
        };
        if fallocate_ok {
            let r = self
                .ring
                .fallocate(
                    lease.shared_fd(),
                    sys::FALLOC_EXTEND,
                    reserved,
                    min_size - reserved,
                )
                .await;
            match r {
                Ok(()) => {
                    let mut f = self.inner.borrow_mut();
                    let e = &mut f.entries[id.0 as usize];
                    e.dirty.set(true);
                    e.reserved.set(e.reserved.get().max(min_size));
                    e.len_bytes = e.len_bytes.max(min_size);
                    f.stats.grows += 1;
                    f.stats.grown_bytes += min_size - reserved;
                    return Ok(Reservation::Reserved);
                }
                Err(e) if sys::is_unsupported(&e) => {
                    tracing::info!(file = %path.display(), "fallocate unsupported; growing with ftruncate + MADV_POPULATE_WRITE");
                    self.inner.borrow_mut().entries[id.0 as usize].fallocate_ok = false;
                }
                Err(e) => return Err(self.fallocate_failed(lease, id, min_size, path, e)),
            }
        }
        // No fallocate: extend the size only; the caller prefaults the hole.
        let from = reserved;
        if len < min_size {
            self.ring
                .ftruncate(lease.shared_fd(), min_size)
                .await
                .map_err(|e| Error::io("ftruncate", Some(&path), e))?;
        }
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.dirty.set(true);
        e.len_bytes = e.len_bytes.max(min_size);
        f.stats.grows += 1;
        f.stats.grown_bytes += min_size.saturating_sub(len);
        Ok(Reservation::Sparse { from, to: min_size })
    }

    /// The error of a failed growth `fallocate`. A partial fallocate may
    /// have extended the file: what it extended is allocated, so it counts
    /// as reserved.
    fn fallocate_failed(
        &self,
        lease: &FileLease,
        id: FileId,
        min_size: u64,
        path: PathBuf,
        e: std::io::Error,
    ) -> Error {
        let mut f = self.inner.borrow_mut();
        let en = &mut f.entries[id.0 as usize];
        en.dirty.set(true);
        let reserved = en.reserved.get();
        if let Ok(sz) = sys::file_size(lease.fd()) {
            en.len_bytes = en.len_bytes.max(sz);
            en.reserved.set(reserved.max(sz.min(min_size)));
        }
        if e.raw_os_error() == Some(nix::libc::ENOSPC) {
            return Error::NoSpace {
                path,
                requested_bytes: min_size - reserved,
            };
        }
        Error::io("fallocate", Some(&path), e)
    }

    fn refresh_foreign(
        &self,
        lease: FileLease,
        id: FileId,
        min_size: u64,
    ) -> Result<(FileLease, Reservation)> {
        let path = self.path(id)?;
        let size = sys::file_size(lease.fd()).map_err(|e| Error::io("fstat", Some(&path), e))?;
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.len_bytes = e.len_bytes.max(size);
        e.reserved.set(e.reserved.get().max(size));
        if e.reserved.get() >= min_size {
            Ok((lease, Reservation::Reserved))
        } else {
            Err(Error::InvalidRange {
                file_id: id.0,
                offset: size,
                len_bytes: min_size - size,
                reason: "beyond the end of another shard's data file",
            })
        }
    }

    /// Record that `[.., to)` of a sparse file has been prefaulted and is now
    /// backed by blocks (see [`Reservation::Sparse`]).
    pub fn mark_reserved(&self, id: FileId, to: u64) {
        let f = self.inner.borrow();
        if let Some(e) = f.entries.get(id.0 as usize) {
            let to = to.min(e.len_bytes);
            e.reserved.set(e.reserved.get().max(to));
        }
    }

    /// `fdatasync` (or `fsync`) the file through the control ring. A file
    /// that was never opened has nothing to sync, and sync never creates a
    /// file: a file removed behind the registry's back is an error.
    ///
    /// The kernel reports a write-back error to one `fdatasync` only, so a
    /// failure is kept: every later sync of the file returns it. A sync
    /// dropped before its operation completed leaves the operation to the
    /// next sync of the file, which awaits it first and reports its failure.
    /// On success, [`durable_bytes`](Self::durable_bytes) covers the size the
    /// file had when the call began.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] with the kernel's error (also that of an earlier failed
    /// sync of the file); [`Error::FdPressure`] /
    /// [`Error::TooManyOpenFiles`] when the file must be reopened and cannot.
    pub async fn sync(&self, id: FileId, datasync: bool) -> Result<()> {
        let path = self.path(id)?;
        let op = if datasync { "fdatasync" } else { "fsync" };
        // Syncs of the file dropped before they completed: their outcome
        // counts (a write-back error is reported to one call only).
        let orphans: Vec<Op> = {
            let mut all = self.orphans.borrow_mut();
            let (mine, rest): (Vec<_>, Vec<_>) = all.drain(..).partition(|(f, _)| *f == id);
            *all = rest;
            mine.into_iter().map(|(_, o)| o).collect()
        };
        for o in orphans {
            self.finish(id, o, &path, op).await?;
        }
        let len = {
            let f = self.inner.borrow();
            let e = &f.entries[id.0 as usize];
            if let Some(errno) = e.sync_failed {
                return Err(Error::io(
                    op,
                    Some(&path),
                    std::io::Error::from_raw_os_error(errno),
                ));
            }
            if !e.len_known {
                return Ok(());
            }
            e.len_bytes
        };
        let lease = self.lease(id, false)?;
        // Changes made from here on wait for a later sync; if this one fails
        // (or is dropped), the file stays dirty.
        let dirty = DirtyUnlessSynced::begin(self, id);
        let fsync = self.ring.fsync(lease.shared_fd(), datasync);
        self.finish(id, fsync, &path, op).await?;
        dirty.synced();
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.durable_len = e.durable_len.max(len);
        Ok(())
    }

    /// Await a sync operation of `id`. Dropped before it completes, the
    /// operation is kept for the next sync of the file; a failure is
    /// remembered and reported by every later sync.
    async fn finish(&self, id: FileId, op: Op, path: &Path, what: &'static str) -> Result<()> {
        let mut orphan = Orphan {
            reg: self,
            id,
            op: Some(op),
        };
        let r = std::future::poll_fn(|cx| {
            std::pin::Pin::new(orphan.op.as_mut().expect("polled until done")).poll(cx)
        })
        .await;
        orphan.op = None;
        r.map_err(|e| {
            if let Some(errno) = e.raw_os_error() {
                self.inner.borrow_mut().entries[id.0 as usize].sync_failed = Some(errno);
            }
            Error::io(what, Some(path), e)
        })
    }

    /// Make the directory entry of `id` durable: open (creating) the file if
    /// it was never opened, then fsync its folder through the control ring,
    /// unless a fsync of that folder already succeeded since the file was
    /// created or found. A file left by a crash between its creation and
    /// the folder's fsync is covered the first time it is used. Returns
    /// whether a fsync was made; after a failed one the entry stays not
    /// durable and the next call tries again.
    ///
    /// # Errors
    ///
    /// As [`acquire`](Self::acquire); [`Error::Io`] when the folder cannot
    /// be opened or synced.
    pub async fn make_entry_durable(&self, id: FileId) -> Result<bool> {
        let path = self.path(id)?;
        if self.inner.borrow().entries[id.0 as usize].dir_durable {
            return Ok(false);
        }
        if self.len_bytes(id)?.is_none() {
            drop(self.acquire(id, 0).await?);
        }
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let fd = sys::open(&folder, OpenMode::ReadOnly)
            .map_err(|e| Error::io("open", Some(&folder), e))?;
        self.ring
            .fsync(&Rc::new(fd), false)
            .await
            .map_err(|e| Error::io("fsync", Some(&folder), e))?;
        let mut f = self.inner.borrow_mut();
        f.entries[id.0 as usize].dir_durable = true;
        f.stats.dir_syncs += 1;
        Ok(true)
    }

    /// Close every idle descriptor (the windows stay mapped).
    pub fn close_idle(&self) {
        let mut f = self.inner.borrow_mut();
        let mut counters = self.counters.borrow_mut();
        for (i, e) in f.entries.iter_mut().enumerate() {
            if e.fd.as_ref().is_some_and(|fd| Rc::strong_count(fd) == 1) {
                e.fd = None;
                counters.remove(&FileId(i as u32));
            }
        }
    }

    /// Get a lease on an open descriptor, opening (and evicting) if needed;
    /// `create` allows creating the file (never for a foreign file).
    fn lease(&self, id: FileId, create: bool) -> Result<FileLease> {
        {
            let mut f = self.inner.borrow_mut();
            f.tick += 1;
            let tick = f.tick;
            let e = f
                .entries
                .get_mut(id.0 as usize)
                .ok_or(Error::UnknownFile(id.0))?;
            e.last_use = tick;
            if let Some(fd) = &e.fd {
                let count = self.counters.borrow()[&id].clone();
                return Ok(FileLease {
                    id,
                    fd: fd.clone(),
                    _count: count,
                });
            }
        }
        let path = self.path(id)?;
        let create = create && !self.inner.borrow().entries[id.0 as usize].foreign;
        let mode = match self.mode {
            OpenMode::ReadWriteCreate if !create => OpenMode::ReadWrite,
            m => m,
        };
        if mode != OpenMode::ReadWriteCreate {
            // A file that must exist and does not: fail before closing a
            // cached descriptor for it.
            std::fs::symlink_metadata(&path).map_err(|e| Error::io("open", Some(&path), e))?;
        }
        if self.open.get() >= self.max_open && !self.evict_one() {
            return Err(Error::FdPressure {
                max_open_files: self.max_open,
            });
        }
        let fd = self.open_fd(&path, mode)?;
        let size = sys::file_size(fd.as_fd()).map_err(|e| Error::io("fstat", Some(&path), e))?;
        self.open.set(self.open.get() + 1);
        let count = Rc::new(FdCounter(self.open.clone()));
        let fd = Rc::new(fd);
        let mut f = self.inner.borrow_mut();
        f.stats.opens += 1;
        let e = &mut f.entries[id.0 as usize];
        if !e.len_known {
            // First sight of the file: what exists was written by us before
            // (reserved then), so all of it counts as reserved.
            e.len_known = true;
            e.len_bytes = size;
            e.reserved.set(size);
            // Pages an earlier process wrote may not be durable yet: the
            // next sync covers them.
            e.dirty.set(mode != OpenMode::ReadOnly);
        } else {
            e.len_bytes = e.len_bytes.max(size);
        }
        e.fd = Some(fd.clone());
        self.counters.borrow_mut().insert(id, count.clone());
        tracing::trace!(file = %path.display(), "opened");
        Ok(FileLease {
            id,
            fd,
            _count: count,
        })
    }

    /// `open(path)`; when the process is out of descriptors, give one of
    /// ours back and try once more.
    fn open_fd(&self, path: &Path, mode: OpenMode) -> Result<OwnedFd> {
        match sys::open(path, mode) {
            Ok(fd) => Ok(fd),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EMFILE | nix::libc::ENFILE)
                ) =>
            {
                if !self.evict_one() {
                    return Err(Error::TooManyOpenFiles {
                        path: path.to_path_buf(),
                        source: e,
                    });
                }
                sys::open(path, mode).map_err(|source| Error::TooManyOpenFiles {
                    path: path.to_path_buf(),
                    source,
                })
            }
            Err(e) => Err(Error::io("open", Some(path), e)),
        }
    }

    /// Close the least recently used idle descriptor. False when none is idle.
    fn evict_one(&self) -> bool {
        let mut f = self.inner.borrow_mut();
        let victim = f
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.fd.as_ref().is_some_and(|fd| Rc::strong_count(fd) == 1))
            .min_by_key(|(_, e)| e.last_use)
            .map(|(i, _)| i);
        let Some(i) = victim else {
            return false;
        };
        f.entries[i].fd = None;
        f.stats.evictions += 1;
        drop(f);
        // Dropping the registry's counter (the only one left) closes the count.
        self.counters.borrow_mut().remove(&FileId(i as u32));
        true
    }
}

/// A sync operation being awaited: handed to the registry if dropped first.
struct Orphan<'a> {
    reg: &'a FileHandleRegistry,
    id: FileId,
    op: Option<Op>,
}

impl Drop for Orphan<'_> {
    fn drop(&mut self) {
        if let Some(op) = self.op.take() {
            self.reg.orphans.borrow_mut().push((self.id, op));
        }
    }
}

/// Clears a file's dirty flag while its sync runs; sets it again unless
/// the sync completed.
struct DirtyUnlessSynced<'a> {
    reg: &'a FileHandleRegistry,
    id: FileId,
    synced: bool,
}

impl<'a> DirtyUnlessSynced<'a> {
    fn begin(reg: &'a FileHandleRegistry, id: FileId) -> DirtyUnlessSynced<'a> {
        if let Some(e) = reg.inner.borrow().entries.get(id.0 as usize) {
            e.dirty.set(false);
        }
        DirtyUnlessSynced {
            reg,
            id,
            synced: false,
        }
    }

    fn synced(mut self) {
        self.synced = true;
    }
}

impl Drop for DirtyUnlessSynced<'_> {
    fn drop(&mut self) {
        if !self.synced {
            self.reg.mark_dirty(self.id);
        }
    }
}

struct GrowGuard<'a> {
    reg: &'a FileHandleRegistry,
    id: FileId,
}

impl Drop for GrowGuard<'_> {
    fn drop(&mut self) {
        let w = {
            let mut f = self.reg.inner.borrow_mut();
            let e = &mut f.entries[self.id.0 as usize];
            e.growing = false;
            e.grow_waiters.clone()
        };
        w.wake_all();
    }
}

impl std::fmt::Debug for FileHandleRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHandleRegistry")
            .field("stats", &self.stats())
            .finish()
    }
}
