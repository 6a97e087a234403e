//! `FileHandleRegistry`: one descriptor per data file, reused, capped, LRU.
//!
//! **Architecture invariants:**
//! * `open_count() <= max_open_files()` at every moment. A descriptor is
//!   counted from `open` until its last `Rc` drops, including the copies held
//!   by io operations in flight, so the cap is a cap on real descriptors.
//! * Only idle descriptors (no lease, no operation in flight) are evicted.
//!   Evicting a descriptor never unmaps a window: a mapping outlives its fd.
//! * The registry only grows a file. `reserved` (bytes whose blocks are
//!   allocated) never exceeds the file's size as last seen, and nothing
//!   above `reserved` is handed out; a descriptor opened again lowers it
//!   to the file's size when another program cut the file short.
//! * Single-threaded: interior mutability through `RefCell`, no lock, and no
//!   borrow is held across an `.await`.
//!
//! This file holds the registry, its descriptor cache and eviction;
//! `grow.rs` the growth and block reservation of a file, `durable.rs` its
//! dirty marks, syncs and folder entry, `lease.rs` the [`FileLease`].

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::io::Ring;
use crate::sys::{self, OpenMode};
use crate::wait::WaitList;

mod durable;
mod grow;
mod lease;

pub use grow::Reservation;
use lease::FdCounter;
pub use lease::FileLease;

/// Identifies a file registered with a [`FileHandleRegistry`]; an index, so
/// lookups are O(1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId(pub u32);

/// What the hot path reads and marks of one file, shared by the registry
/// and its [`FileView`]s.
struct Hot {
    /// Bytes whose blocks are allocated.
    reserved: Cell<u64>,
    /// The file may hold changes no `fdatasync` began after.
    dirty: Cell<bool>,
}

/// One file's reserved size (bytes whose blocks are allocated), read-only,
/// and its dirty mark, set-only, handed to the mapping layer's hot path.
/// Only the registry writes the size and clears the mark; each is one
/// load or store, with no borrow of the registry.
#[derive(Clone)]
pub(crate) struct FileView(Rc<Hot>);

impl FileView {
    /// The file's reserved size now.
    #[inline(always)]
    pub(crate) fn reserved(&self) -> u64 {
        self.0.reserved.get()
    }

    /// Mark the file dirty: the next sync covers it (as
    /// [`FileHandleRegistry::mark_dirty`]).
    #[inline(always)]
    pub(crate) fn mark_dirty(&self) {
        self.0.dirty.set(true);
    }
}

/// Counters of a registry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
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

struct FileEntry {
    path: PathBuf,
    fd: Option<Rc<OwnedFd>>,
    len_bytes: u64,
    len_known: bool,
    /// The reserved size and the dirty mark.
    hot: Rc<Hot>,
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
    /// Syncs of the file in flight. While one runs, the file counts as
    /// dirty: a later sync must not skip it and return before that one's
    /// write-back completed.
    syncing: Cell<u32>,
    /// The errno of a failed `fdatasync`, reported by every later sync: the
    /// kernel reports a write-back error once, and the call that saw it may
    /// have been dropped before its caller looked.
    sync_failed: Option<i32>,
    /// The allocators whose file this is (empty: not an allocator's), of
    /// one folder: one, or more read-only ones, or closed ones whose idle
    /// windows keep them alive. Each window keeps one alive; a file whose
    /// owners are all gone is not mapped again (see
    /// [`register_owned`](FileHandleRegistry::register_owned)).
    owners: Vec<Weak<dyn FileOwner>>,
    /// A folder this file is opened in, and its path there: another
    /// shard's data file, opened in the data directory as it was opened
    /// ([`register_foreign_in`](FileHandleRegistry::register_foreign_in)).
    base: Option<(Arc<OwnedFd>, PathBuf)>,
    /// The device and inode of the file as last opened.
    identity: Option<(u64, u64)>,
    /// The device and inode it must have (another shard's data file: the
    /// one its owner writes, [`expect_identity`](FileHandleRegistry::expect_identity)):
    /// an open that finds another file there fails.
    expect: Option<(u64, u64)>,
}

impl FileEntry {
    /// Forget what was learnt of the file at `path` (its size, what is
    /// durable, a failed sync, its identity): another file is there now.
    /// The caller closed its descriptor, or is about to replace it.
    fn forget_file(&mut self) {
        self.len_known = false;
        self.len_bytes = 0;
        self.hot.reserved.set(0);
        self.hot.dirty.set(false);
        self.fallocate_ok = true;
        self.dir_durable = false;
        self.durable_len = 0;
        self.sync_failed = None;
        self.identity = None;
    }
}

/// What an allocator's files are registered with
/// ([`FileHandleRegistry::register_owned`]): kept alive by their windows,
/// and the folder they are opened in.
pub(crate) trait FileOwner: Any {
    /// The folder the files are in, as it was when the owner took it: they
    /// are opened relative to it, so a folder renamed (and another made in
    /// its place) keeps its own files.
    fn folder(&self) -> BorrowedFd<'_>;
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
/// // SAFETY: the file is this program's own; nothing else maps or writes it.
/// let id = unsafe { files.register("/tmp/segalloc-doc.dat") };
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
    orphans: RefCell<Vec<(FileId, durable::SyncOp)>>,
    /// Every sync operation begun whose outcome is not recorded yet.
    sync_ops: durable::SyncOps,
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
            sync_ops: durable::SyncOps::default(),
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
    ///
    /// A registered file is mapped shared by the [`MappingManager`]s of this
    /// registry (writable unless it is read-only), and their pins read and
    /// write it through that mapping.
    ///
    /// # Safety
    ///
    /// As for any shared file mapping (memmap2's `MmapMut::map_mut`): while
    /// a pin of the file taken through this registry lives, nothing in
    /// another thread or process (another registry, another mapping, file
    /// writes) may write the bytes the pin covers, nor read the bytes a
    /// writable pin may write, unless those accesses are ordered with the
    /// pin's by other means. Nothing may cut the file short, or put
    /// another file at its path, while it is registered: a pin maps the
    /// bytes the registry has seen reserved, and a byte of a shared mapping
    /// past the end of its file faults (SIGBUS) when touched. (A registry
    /// that has closed the file's descriptor, idle or evicted, lowers what
    /// it counts as reserved to the file's size when it opens it again.)
    /// A segalloc shard's own files are registered by its allocator, under
    /// the shard's lock: register files of your own.
    ///
    /// [`MappingManager`]: crate::MappingManager
    pub unsafe fn register(&self, path: impl AsRef<Path>) -> FileId {
        self.register_path(path.as_ref())
    }

    fn register_path(&self, path: &Path) -> FileId {
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
            hot: Rc::new(Hot {
                reserved: Cell::new(0),
                dirty: Cell::new(false),
            }),
            last_use: 0,
            growing: false,
            grow_waiters: Rc::new(WaitList::default()),
            fallocate_ok: true,
            foreign: false,
            dir_durable: false,
            durable_len: 0,
            syncing: Cell::new(0),
            sync_failed: None,
            owners: Vec::new(),
            base: None,
            identity: None,
            expect: None,
        });
        f.by_path.insert(path.to_path_buf(), id);
        f.stats.files = f.entries.len();
        id
    }

    /// [`register`](Self::register), and keep `owner` alive for as long as
    /// any window of the file is mapped (each window holds a clone); once
    /// `owner` is gone, the file is not mapped again. The allocator passes
    /// its shard lock: a pin kept after its allocator is dropped still maps
    /// the shard's bytes, so the shard stays locked, and nothing maps them
    /// once it is unlocked.
    /// The file is opened in the owner's [`folder`](FileOwner::folder), by
    /// the last component of `path`.
    ///
    /// An entry of the path that another owner has or had is taken over
    /// as it is when that owner's folder is the same directory (a closed
    /// allocator of this shard, whose idle windows keep its lock alive, or
    /// a second read-only one): the same files, and what is known of them
    /// holds; the file is then opened in the folder of whichever of its
    /// owners is still open. Else (an allocator closed since, whose
    /// directory may have been deleted and made again; one still open
    /// whose folder was renamed; a file registered by hand) what the entry
    /// knew is of another file: once its owners are gone and nothing uses
    /// its descriptor, the entry starts over (the descriptor closed, the
    /// file learnt again when opened); else the path gets an entry of its
    /// own.
    pub(crate) fn register_owned(
        &self,
        path: impl AsRef<Path>,
        owner: &Rc<dyn FileOwner>,
    ) -> FileId {
        let path = path.as_ref();
        let mine = |w: &Weak<dyn FileOwner>| std::ptr::addr_eq(w.as_ptr(), Rc::as_ptr(owner));
        let known = self.inner.borrow().by_path.get(path).copied();
        if let Some(id) = known {
            let mut f = self.inner.borrow_mut();
            let e = &mut f.entries[id.0 as usize];
            if e.owners.iter().any(mine) {
                return id;
            }
            let same_folder = e.owners.iter().find_map(Weak::upgrade).is_some_and(|old| {
                let id_of = |fd| sys::file_size_and_identity(fd).map(|(_, i)| i).ok();
                id_of(old.folder()).is_some_and(|a| Some(a) == id_of(owner.folder()))
            });
            if same_folder {
                e.owners.retain(|w| w.strong_count() > 0);
                e.owners.push(Rc::downgrade(owner));
                return id;
            }
            let idle = e.fd.as_ref().is_none_or(|fd| Rc::strong_count(fd) == 1)
                && !e.growing
                && e.syncing.get() == 0;
            let owners_gone =
                !e.owners.is_empty() && e.owners.iter().all(|w| w.strong_count() == 0);
            if owners_gone && idle && !e.foreign && e.base.is_none() {
                e.fd = None;
                e.expect = None;
                e.forget_file();
                e.owners = vec![Rc::downgrade(owner)];
                drop(f);
                // The registry's counter, the last one, closes the count.
                self.counters.borrow_mut().remove(&id);
                return id;
            }
            f.by_path.remove(path);
        }
        let id = self.register_path(path);
        self.inner.borrow_mut().entries[id.0 as usize].owners = vec![Rc::downgrade(owner)];
        id
    }

    /// Whether `id` was registered as another shard's file
    /// ([`register_foreign`](Self::register_foreign)).
    pub(crate) fn is_foreign(&self, id: FileId) -> bool {
        self.inner
            .borrow()
            .entries
            .get(id.0 as usize)
            .is_some_and(|e| e.foreign)
    }

    /// Whether `id` is an allocator's file
    /// ([`register_owned`](Self::register_owned)).
    pub(crate) fn is_owned(&self, id: FileId) -> bool {
        self.inner
            .borrow()
            .entries
            .get(id.0 as usize)
            .is_some_and(|e| !e.owners.is_empty())
    }

    /// What a new window of file `id` keeps alive
    /// ([`register_owned`](Self::register_owned)).
    ///
    /// # Errors
    ///
    /// [`Error::OwnerClosed`] when the file's owner is gone;
    /// [`Error::UnknownFile`].
    pub(crate) fn owner(&self, id: FileId) -> Result<Option<Rc<dyn FileOwner>>> {
        let f = self.inner.borrow();
        let e = f
            .entries
            .get(id.0 as usize)
            .ok_or(Error::UnknownFile(id.0))?;
        if e.owners.is_empty() {
            return Ok(None);
        }
        e.owners
            .iter()
            .find_map(Weak::upgrade)
            .map(Some)
            .ok_or(Error::OwnerClosed { file_id: id.0 })
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
    ///
    /// # Safety
    ///
    /// As [`register`](Self::register): the owning shard writes the file, so
    /// its pins are for bytes nobody writes meanwhile (as
    /// [`Shard::pin_foreign`](crate::Shard::pin_foreign) states).
    pub unsafe fn register_foreign(&self, path: impl AsRef<Path>) -> Result<FileId> {
        let path = path.as_ref();
        if let Some(&id) = self.inner.borrow().by_path.get(path) {
            return Ok(id);
        }
        std::fs::symlink_metadata(path).map_err(|e| Error::io("stat", Some(path), e))?;
        let id = self.register_path(path);
        self.inner.borrow_mut().entries[id.0 as usize].foreign = true;
        Ok(id)
    }

    /// [`register_foreign`](Self::register_foreign) of `rel` in the folder
    /// `base` (the data directory, as its open found it; `path` names the
    /// same file, for messages): the file is looked up and opened there,
    /// never by a path that may name another directory since.
    ///
    /// # Errors
    ///
    /// As [`register_foreign`](Self::register_foreign).
    ///
    /// # Safety
    ///
    /// As [`register_foreign`](Self::register_foreign).
    pub(crate) unsafe fn register_foreign_in(
        &self,
        base: &Arc<OwnedFd>,
        rel: &Path,
        path: &Path,
    ) -> Result<FileId> {
        if let Some(&id) = self.inner.borrow().by_path.get(path) {
            return Ok(id);
        }
        sys::identity_at(base.as_fd(), rel).map_err(|e| Error::io("stat", Some(path), e))?;
        let id = self.register_path(path);
        let mut f = self.inner.borrow_mut();
        let e = &mut f.entries[id.0 as usize];
        e.foreign = true;
        e.base = Some((base.clone(), rel.to_path_buf()));
        Ok(id)
    }

    /// The device and inode of `id` as last opened (`None` before).
    pub(crate) fn identity(&self, id: FileId) -> Option<(u64, u64)> {
        self.inner.borrow().entries.get(id.0 as usize)?.identity
    }

    /// From now on `id` must be the file of this device and inode: an open
    /// that finds another file in its place fails, and so does this call
    /// when the descriptor open now is another file's.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the file open now is not that one.
    pub(crate) fn expect_identity(&self, id: FileId, identity: (u64, u64)) -> Result<()> {
        let mut f = self.inner.borrow_mut();
        let Some(e) = f.entries.get_mut(id.0 as usize) else {
            return Err(Error::UnknownFile(id.0));
        };
        e.expect = Some(identity);
        if e.fd.is_some() && e.identity.is_some_and(|now| now != identity) {
            return Err(not_the_expected_file(&e.path));
        }
        Ok(())
    }

    /// The folder `id` is opened in and its path there, if not its path.
    pub(crate) fn base(&self, id: FileId) -> Option<(Arc<OwnedFd>, PathBuf)> {
        self.inner.borrow().entries.get(id.0 as usize)?.base.clone()
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
            .map(|e| e.hot.reserved.get())
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

    /// A view of `id`'s reserved size and dirty mark, kept current by this
    /// registry: for a hot path that must not borrow the registry.
    pub(crate) fn view(&self, id: FileId) -> Result<FileView> {
        let f = self.inner.borrow();
        f.entries
            .get(id.0 as usize)
            .map(|e| FileView(e.hot.clone()))
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
    ///
    /// # Safety
    ///
    /// As [`register`](Self::register) (the lease's [`FileId`] can be
    /// mapped).
    pub async unsafe fn acquire_path(
        &self,
        path: impl AsRef<Path>,
        min_size: u64,
    ) -> Result<FileLease> {
        let id = self.register_path(path.as_ref());
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
    /// (growing a read-only registry's file), [`Error::Io`];
    /// [`Error::AllocatorFile`] for a file an allocator keeps its data or
    /// metadata in (registered by the allocator itself): it opens and grows
    /// its own files, and its allocations are reached through the shard.
    pub async fn acquire(&self, id: FileId, min_size: u64) -> Result<FileLease> {
        self.refuse_owned(id)?;
        self.acquire_of(id, min_size).await
    }

    /// [`acquire`](Self::acquire), of any file (an allocator's own: then
    /// [`Error::OwnerClosed`] once the allocator is closed).
    pub(crate) async fn acquire_of(&self, id: FileId, min_size: u64) -> Result<FileLease> {
        let (lease, _) = self.grow_of(id, min_size).await?;
        Ok(lease)
    }

    /// [`Error::AllocatorFile`] for an allocator's own file, or another
    /// shard's data file registered for `Shard::pin_foreign`.
    pub(crate) fn refuse_owned(&self, id: FileId) -> Result<()> {
        let internal = self
            .inner
            .borrow()
            .entries
            .get(id.0 as usize)
            .is_some_and(|e| !e.owners.is_empty() || e.base.is_some());
        if internal {
            return Err(Error::AllocatorFile { file_id: id.0 });
        }
        Ok(())
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
        // An allocator's file is opened in its owner's folder; one whose
        // owner is gone is not opened again.
        let owner = self.owner(id)?;
        let create = create && !self.inner.borrow().entries[id.0 as usize].foreign;
        let mode = match self.mode {
            OpenMode::ReadWriteCreate if !create => OpenMode::ReadWrite,
            m => m,
        };
        let base = self.base(id);
        if mode != OpenMode::ReadWriteCreate && owner.is_none() {
            // A file that must exist and does not: fail before closing a
            // cached descriptor for it.
            match &base {
                Some((dir, rel)) => sys::identity_at(dir.as_fd(), rel).map(drop),
                None => std::fs::symlink_metadata(&path).map(drop),
            }
            .map_err(|e| Error::io("open", Some(&path), e))?;
        }
        // A dropped sync's operation that the kernel has completed keeps
        // its descriptor busy until its outcome is collected.
        if self.open.get() >= self.max_open
            && !self.evict_one()
            && !(self.collect_orphans() && self.evict_one())
        {
            return Err(Error::FdPressure {
                max_open_files: self.max_open,
            });
        }
        let at = match (&owner, &base) {
            (Some(o), _) => path.file_name().map(|name| (o.folder(), Path::new(name))),
            (None, Some((dir, rel))) => Some((dir.as_fd(), rel.as_path())),
            (None, None) => None,
        };
        let fd = self.open_fd(at, &path, mode)?;
        let (size, identity) = sys::file_size_and_identity(fd.as_fd())
            .map_err(|e| Error::io("fstat", Some(&path), e))?;
        let expect = self.inner.borrow().entries[id.0 as usize].expect;
        if expect.is_some_and(|x| x != identity) {
            return Err(not_the_expected_file(&path));
        }
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
            e.hot.reserved.set(size);
            // Pages an earlier process wrote may not be durable yet: the
            // next sync covers them.
            e.hot.dirty.set(mode != OpenMode::ReadOnly);
        } else {
            // Open again (its descriptor was idle: no growth ran). Cut short
            // meanwhile by another program, the file must not be mapped past
            // its end: a pin there would fault (SIGBUS). Never raised here:
            // idle windows may still map the file that was at the path
            // before (another inode), up to what was reserved of it.
            e.len_bytes = size;
            if e.hot.reserved.get() > size {
                e.hot.reserved.set(size);
            }
            e.durable_len = e.durable_len.min(size);
        }
        e.fd = Some(fd.clone());
        e.identity = Some(identity);
        self.counters.borrow_mut().insert(id, count.clone());
        tracing::trace!(file = %path.display(), "opened");
        Ok(FileLease {
            id,
            fd,
            _count: count,
        })
    }

    /// `open(path)`, or `openat` of a name in a folder (`at`: an
    /// allocator's file in its owner's folder, another shard's in the data
    /// directory); when the process is out of descriptors, give one of ours
    /// back and try once more.
    fn open_fd(
        &self,
        at: Option<(BorrowedFd<'_>, &Path)>,
        path: &Path,
        mode: OpenMode,
    ) -> Result<OwnedFd> {
        let open = || match at {
            Some((dir, name)) => sys::open_at(dir, name, mode),
            None => sys::open(path, mode),
        };
        match open() {
            Ok(fd) => Ok(fd),
            Err(e) if crate::error::out_of_descriptors(&e) && self.evict_one() => {
                open().map_err(|e| Error::opening("open", path, e))
            }
            Err(e) => Err(Error::opening("open", path, e)),
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

impl std::fmt::Debug for FileHandleRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileHandleRegistry")
            .field("stats", &self.stats())
            .finish()
    }
}

/// The error for a file found where another shard's data file was (its
/// folder moved or replaced since).
fn not_the_expected_file(path: &Path) -> Error {
    Error::io(
        "open",
        Some(path),
        std::io::Error::other(
            "not the file the owner shard writes: its folder was moved or replaced",
        ),
    )
}
