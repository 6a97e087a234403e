//! The data directory: manifest, exclusive lock, one folder per shard.
//!
//! ```text
//! DIR/
//!   MANIFEST          format version, shard count, window size, … (checksummed)
//!   LOCK              flock(LOCK_EX) held while the directory is open
//!   shard-000/
//!     meta.seg        superblock, roots, segment directory + bitmaps
//!     data-000000.seg data files, windows of `window_bytes`
//!     data-000001.seg
//!   shard-001/ …
//! ```
//!
//! **Invariant:** files are created with mode 0600 and folders with 0700;
//! nothing inside the directory is followed through a symlink (the directory
//! itself may be reached through one: the path given is resolved first).

use std::fs::{DirBuilder, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::classes::CLASS_TABLE_ID;
use crate::format::{FORMAT_VERSION, MANIFEST_BYTES, Manifest};
use crate::sys::{self, OpenMode};

pub use crate::format::MANIFEST_FILE;
/// Name of the lock file.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the manifest while it is being written.
const MANIFEST_TMP_FILE: &str = "MANIFEST.tmp";
/// Name of the manifest while [`DataDir::destroy`] deletes the directory:
/// the manifest is renamed to it first, so a deletion cut short leaves a
/// directory that no open takes for a whole one.
pub const DESTROYING_FILE: &str = "MANIFEST.destroying";
/// The folder `mkfs.ext4` leaves at the root of a file system: a data
/// directory may be a mount point that holds it (it is left alone).
const LOST_FOUND: &str = "lost+found";

/// An open (and locked) data directory.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    manifest: Manifest,
    created: bool,
    /// This open made the directory itself (not only what is in it).
    made_top: bool,
    read_only: bool,
    _lock: Option<FileLock>,
    /// The directory itself, opened when first needed (`Shard::pin_foreign`
    /// opens other shards' files in it, never by a path that may name
    /// another directory since: one renamed while open, and another made in
    /// its place).
    folder: std::sync::OnceLock<Arc<OwnedFd>>,
}

impl DataDir {
    /// Open the directory of `cfg`, creating it (with its parents, and its
    /// manifest) if it does not exist, and take its exclusive lock. An empty
    /// directory (or one holding only a `lost+found` folder: a mount point)
    /// is initialised as a new one; any other directory without a manifest
    /// is refused, and nothing is created in it. An open that fails after it
    /// wrote a new manifest deletes what it created (see
    /// `Runtime::start`).
    ///
    /// The path given is resolved first: the directory may be reached through
    /// a symlink (`/var/lib/app -> /data/app`), and [`path`](Self::path) is
    /// then the resolved one. Inside the directory nothing is followed
    /// through a symlink.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyOpen`] when another instance holds the lock;
    /// [`Error::Mismatch`] when the directory was created with another shard
    /// count, window size or maximum file size; [`Error::Corrupt`] for a
    /// damaged manifest; [`Error::NotADirectory`] when the path is a file;
    /// [`Error::InvalidConfig`] when an entry inside is a symlink, or when a
    /// missing directory is named back (`..`) out of a folder that does not
    /// exist, or when a new data directory would be inside another (a
    /// folder of it or deeper: that one's `destroy` would then refuse the
    /// folder; nothing is made);
    /// [`Error::NotDataDir`] for a directory that has no manifest and is
    /// not empty, or one a [`destroy`](Self::destroy) did not finish
    /// (destroy it again);
    /// [`Error::Io`] naming the path that failed.
    pub fn open(cfg: &Config) -> Result<DataDir> {
        // A `SEGALLOC_IO` value that names no backend (`bogus`) is refused
        // before anything is created. (A backend the kernel cannot give is
        // found when the shard's ring is made.)
        cfg.io_backend().resolve_env()?;
        if cfg.read_only() {
            return DataDir::open_existing_shared(cfg);
        }
        let (path, made_top) = create_and_resolve(cfg.dir())?;
        let mpath = path.join(MANIFEST_FILE);
        check_not_symlink(&mpath)?;
        // Before the lock, so that a refused directory gets no `LOCK` (unless
        // another instance just gave it a manifest); again under it.
        if !mpath.exists()
            && let Err(e) = unless_locked(check_new_dir(&path), &path)
            && !mpath.exists()
        {
            return Err(e);
        }
        if !mpath.exists() {
            refuse_inside_data_dir(&path)?;
        }
        let lock = take_lock(&path, false)?;
        let (manifest, created) = if mpath.exists() {
            (read_matching_manifest(&path, cfg)?, false)
        } else {
            check_new_dir(&path)?;
            (create_manifest(&path, cfg)?, true)
        };
        let dir = DataDir {
            path,
            manifest,
            created,
            made_top,
            read_only: false,
            _lock: Some(lock),
            folder: std::sync::OnceLock::new(),
        };
        if let Err(e) = dir.make_shard_dirs() {
            // A manifest this open wrote would outlive the failure and fix
            // the shard count for every later open.
            if dir.created {
                DataDir::undo_creation(dir);
            }
            return Err(e);
        }
        Ok(dir)
    }

    /// [`open`](Self::open) with [`read_only`](crate::ConfigBuilder::read_only):
    /// an existing directory, nothing created or written (a missing shard
    /// folder is reported when that shard opens), under a shared lock that
    /// other read-only opens share and a writable one is refused
    /// ([`Error::AlreadyOpen`] either way round).
    fn open_existing_shared(cfg: &Config) -> Result<DataDir> {
        let path = resolve_existing(cfg.dir())?;
        check_not_symlink(&path.join(MANIFEST_FILE))?;
        read_manifest(&path)?;
        let lock = take_lock(&path, true)?;
        let manifest = read_matching_manifest(&path, cfg)?;
        Ok(DataDir {
            path,
            manifest,
            created: false,
            made_top: false,
            read_only: true,
            _lock: Some(lock),
            folder: std::sync::OnceLock::new(),
        })
    }

    /// The shards' folders that are missing, made durable in a directory
    /// this open created.
    fn make_shard_dirs(&self) -> Result<()> {
        for i in 0..self.manifest.shard_count {
            let d = shard_dir(&self.path, i);
            check_not_symlink(&d)?;
            if !d.exists() {
                DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .map_err(|e| Error::io("mkdir", Some(&d), e))?;
            }
        }
        if self.created {
            sync_dir(&self.path)?;
        }
        Ok(())
    }

    /// Open an existing directory read-only for inspection. Nothing is
    /// created or written: the lock is only probed (a shared, non-blocking
    /// `flock` on `LOCK` opened read-only, released at once so a writer is
    /// never kept out). `locked_elsewhere` tells whether another instance had
    /// the directory open at that moment (its state may then be moving).
    /// The path is resolved as in [`open`](Self::open).
    ///
    /// # Errors
    ///
    /// [`Error::DirNotFound`] when the directory does not exist;
    /// [`Error::NotADirectory`]; [`Error::NotDataDir`] when it has no
    /// manifest; [`Error::Corrupt`] for a damaged manifest; [`Error::Io`].
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<(DataDir, bool)> {
        let path = resolve_existing(path.as_ref())?;
        let manifest = read_manifest(&path)?;
        let locked_elsewhere = probe_lock(&path)?;
        Ok((
            DataDir {
                path,
                manifest,
                created: false,
                made_top: false,
                read_only: true,
                _lock: None,
                folder: std::sync::OnceLock::new(),
            },
            locked_elsewhere,
        ))
    }

    /// Delete a closed data directory: every file and folder segalloc
    /// created in it, then the directory itself. A mount point is left in
    /// place, empty (but for its `lost+found`), and so is the directory a
    /// symlink `path` points to (the link stays valid). A missing directory
    /// is nothing to delete (`Ok`), and so is an empty one (it is removed).
    ///
    /// Nothing is deleted unless `path` is a segalloc data directory (a valid
    /// manifest, or only the empty `LOCK` of a creation that never finished,
    /// perhaps beside its `MANIFEST.tmp`), every entry in it is one segalloc
    /// creates, and its lock and every shard's lock are free: the directory's
    /// lock is held until every file in it is deleted, so no instance opens
    /// it meanwhile (an open racing the deletion fails, or creates a new data
    /// directory once the old one is gone, which then stays). Nothing is
    /// created in a directory that is refused.
    ///
    /// The manifest is renamed to `MANIFEST.destroying` (and the rename made
    /// durable) before anything else is deleted: a deletion cut short (an
    /// error, a crash) leaves a directory that every open refuses and that
    /// `destroy` finishes, never one that opens with some shards empty.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyOpen`] or [`Error::ShardAlreadyOpen`] when it is open
    /// (in this or another process); [`Error::NotDataDir`] naming the
    /// directory, or the entry that segalloc did not create;
    /// [`Error::NotADirectory`]; [`Error::Corrupt`] for a damaged manifest;
    /// [`Error::Io`] naming the path that could not be removed.
    pub fn destroy(path: impl AsRef<Path>) -> Result<()> {
        Self::destroy_within(path.as_ref(), false)
    }

    /// [`destroy`](Self::destroy), but the directory itself stays, emptied:
    /// its owner, mode and extended attributes, and a process whose working
    /// directory it is, keep it. For a program's "start over" (`--fresh`)
    /// on a directory its user may have made: an open afterwards creates a
    /// new data directory in it. The same checks, with the same errors; a
    /// missing directory is nothing to clear (`Ok`).
    ///
    /// ```
    /// # let tmp = tempfile::tempdir()?;
    /// # let path = tmp.path().join("data");
    /// # std::fs::create_dir(&path)?;
    /// # let cfg = segalloc::Config::builder(&path).shards(1).build()?;
    /// # drop(segalloc::DataDir::open(&cfg)?);
    /// segalloc::DataDir::clear(&path)?;
    /// assert!(path.is_dir() && std::fs::read_dir(&path)?.next().is_none());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    ///
    /// As [`destroy`](Self::destroy).
    pub fn clear(path: impl AsRef<Path>) -> Result<()> {
        Self::destroy_within(path.as_ref(), true)
    }

    /// Undo the creation of the directory `created` (this open created its
    /// manifest; nothing in it was handed out), once closed: what
    /// [`destroy`](Self::destroy) deletes, and the directory itself if this
    /// open made it. For an open or a start that failed. Its lock is held
    /// throughout: no other instance opens the directory between the
    /// failure and the deletion. Logged, not reported, when the deletion
    /// fails: the failure's own error is the one to return.
    pub(crate) fn undo_creation(mut created: DataDir) {
        debug_assert!(created.created);
        let lock = created
            ._lock
            .take()
            .expect("a writable open holds the lock");
        if let Err(e) = Self::destroy_locked(&created.path, &lock, !created.made_top) {
            tracing::warn!(dir = %created.path.display(), error = %e, "could not delete the directory a failed open or start created");
        }
    }

    /// [`destroy`](Self::destroy), leaving the directory itself (emptied)
    /// when `keep_top`.
    fn destroy_within(given: &Path, keep_top: bool) -> Result<()> {
        let path = match resolve_existing(given) {
            Err(Error::DirNotFound { .. }) => return Ok(()),
            other => other?,
        };
        // Through a symlink: its target stays (emptied), so the link still
        // names a directory a later open can use.
        let keep_top = keep_top || names_a_symlink(given);
        loop {
            let shard_count = match unless_locked(destroy_shard_count(&path), &path)? {
                Some(n) => n,
                None if keep_top || is_real_dir(&path.join(LOST_FOUND)) => return Ok(()),
                None => return remove_top(&path), // empty
            };
            // Checked before the lock too, so that a refused directory gets
            // no `LOCK`.
            match unless_locked(destroy_plan(&path, shard_count), &path) {
                Ok(_) => break,
                // An open may have given the directory its manifest and
                // shard folders since the count was read (and let go of its
                // lock since): they are foreign to the count read before
                // them. Look again; refuse only what the count still says.
                Err(e @ Error::NotDataDir { .. }) => {
                    if unless_locked(destroy_shard_count(&path), &path)? == Some(shard_count) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let lock = take_lock(&path, false)?;
        Self::destroy_locked(&path, &lock, keep_top)
    }

    /// The deletion of [`destroy`](Self::destroy), with the directory's
    /// lock (`_lock`) held.
    fn destroy_locked(path: &Path, _lock: &FileLock, keep_top: bool) -> Result<()> {
        let path = path.to_path_buf();
        // Again under the lock: an open may have made the directory anew
        // since it was looked at (`LOCK` is there now, so it is not empty).
        let shard_count = destroy_shard_count(&path)?.unwrap_or(0);
        let _shards = (0..shard_count)
            .filter(|&i| shard_dir(&path, i).exists())
            .map(|i| ShardLock::acquire(i, &shard_dir(&path, i)))
            .collect::<Result<Vec<_>>>()?;
        let plan = destroy_plan(&path, shard_count)?;
        let manifest = path.join(MANIFEST_FILE);
        let tombstone = path.join(DESTROYING_FILE);
        if manifest.exists() {
            std::fs::rename(&manifest, &tombstone)
                .map_err(|e| Error::io("rename", Some(&manifest), e))?;
            sync_dir(&path)?;
        }
        for p in &plan.doomed {
            let r = if p.is_dir() {
                std::fs::remove_dir(p)
            } else {
                std::fs::remove_file(p)
            };
            r.map_err(|e| Error::io("remove", Some(p), e))?;
        }
        // The removals are durable before the tombstone goes: a crash never
        // leaves shard folders without it.
        sync_dir(&path)?;
        for p in [&tombstone, &path.join(LOCK_FILE)] {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                // The tombstone of a directory without a manifest (one that
                // never got one).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && p == &tombstone => {}
                Err(e) => return Err(Error::io("remove", Some(p), e)),
            }
        }
        if keep_top || plan.kept_lost_found {
            return Ok(());
        }
        remove_top(&path)
    }

    /// Make the next call that locks `path` (a data directory: its `LOCK`,
    /// by `open` or `destroy`; a shard's folder: by a shard's open or by
    /// `destroy`) stop between opening the file and locking it, until the
    /// returned pause is resumed or dropped (tests of races with `destroy`
    /// or another open). `path` is resolved when it exists; one that does
    /// not is compared as given.
    #[cfg(feature = "test-support")]
    pub fn pause_before_lock_for_test(path: impl Into<PathBuf>) -> test_hooks::LockPause {
        test_hooks::pause_before_lock(path.into())
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// True when this open created the directory.
    pub fn was_created(&self) -> bool {
        self.created
    }
    /// True for [`DataDir::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// The directory itself, opened at the first call (see
    /// `Shard::pin_foreign`). A writable open finds it where its locked
    /// `LOCK` is now (`/proc/self/fd`), so a directory renamed since is
    /// followed, and checks that the `LOCK` there is the one it locked; a
    /// read-only open (which locks nothing) opens its path.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the directory cannot be opened, or (writable)
    /// was removed or replaced.
    pub(crate) fn folder(&self) -> Result<Arc<OwnedFd>> {
        if let Some(f) = self.folder.get() {
            return Ok(f.clone());
        }
        let f = match &self._lock {
            Some(lock) => {
                let now = sys::fd_path(lock.fd.as_fd())
                    .map_err(|e| Error::io("readlink", Some(&self.path), e))?;
                let dir = now.parent().unwrap_or(&self.path);
                locked_folder(dir, lock)?
            }
            None => Arc::new(
                sys::open_dir(&self.path).map_err(|e| Error::opening("open", &self.path, e))?,
            ),
        };
        Ok(self.folder.get_or_init(|| f).clone())
    }

    /// The folder of shard `i`.
    pub fn shard_dir(&self, i: u16) -> PathBuf {
        shard_dir(&self.path, i)
    }
}

fn shard_dir(path: &Path, i: u16) -> PathBuf {
    path.join(crate::format::shard_folder_name(i))
}

/// Resolve the directory the user named, following a symlink at the top,
/// and creating it (with its parents) when it does not exist: the path, and
/// whether this call made the directory itself (its parents are not
/// counted). A symlink whose target is missing is refused (it
/// is not created through the link).
fn create_and_resolve(given: &Path) -> Result<(PathBuf, bool)> {
    check_not_empty(given)?;
    let mut made = false;
    match std::fs::metadata(given) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if names_a_symlink(given) {
                return Err(Error::NotADirectory {
                    path: given.to_path_buf(),
                    kind: "a symlink to a missing directory",
                });
            }
            // The parents as `mkdir -p` makes them, then the directory alone:
            // made only if this `mkdir` made it, not when it found it there
            // (reached through `..`, or made by another process meanwhile).
            let bare: PathBuf = given.components().collect();
            refuse_back_out_of_missing(given, &bare)?;
            refuse_inside_data_dir(given)?;
            if let Some(parent) = bare.parent().filter(|p| !p.as_os_str().is_empty()) {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(parent)
                    .map_err(|e| Error::io("mkdir", Some(parent), e))?;
            }
            match DirBuilder::new().mode(0o700).create(&bare) {
                Ok(()) => made = true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::io("mkdir", Some(given), e)),
            }
        }
        _ => {}
    }
    Ok((resolve_existing(given)?, made))
}

/// Refuse a path (`bare`: `given`'s components) that goes back (`..`) out
/// of a folder that does not exist: `mkdir -p` would make that folder for
/// nothing, in or beside the directory the path names.
fn refuse_back_out_of_missing(given: &Path, bare: &Path) -> Result<()> {
    let mut walked = PathBuf::new();
    let mut missing = false;
    for c in bare.components() {
        if missing && c == std::path::Component::ParentDir {
            return Err(Error::InvalidConfig(format!(
                "{} goes back (`..`) out of a folder that does not exist",
                given.display()
            )));
        }
        walked.push(c);
        missing = missing || std::fs::symlink_metadata(&walked).is_err();
    }
    Ok(())
}

/// Refuse a new data directory at `given` inside another one (a folder of
/// it, or deeper): its folder would be an entry segalloc did not make in
/// that directory, which `destroy` would then refuse to delete. Checked
/// before anything is made. The ancestors are those of the real location of
/// the nearest one that exists.
fn refuse_inside_data_dir(given: &Path) -> Result<()> {
    let bare: PathBuf = given.components().collect();
    let mut up = bare.parent();
    let nearest = loop {
        match up {
            Some(p) if p.as_os_str().is_empty() => break PathBuf::from("."),
            Some(p) if std::fs::symlink_metadata(p).is_ok() => break p.to_path_buf(),
            Some(p) => up = p.parent(),
            // The root: nothing above it.
            None => return Ok(()),
        }
    };
    let Ok(real) = std::fs::canonicalize(&nearest) else {
        return Ok(());
    };
    // A segalloc manifest (damaged or not), or one a `destroy` renamed; not
    // any file of that name (a regular file only: opening a FIFO waits).
    let segalloc_manifest = |p: PathBuf| {
        let mut b = [0u8; 8];
        p.is_file()
            && std::fs::File::open(p)
                .and_then(|mut f| f.read_exact(&mut b))
                .is_ok_and(|()| crate::format::manifest::has_magic(&b))
    };
    for a in real.ancestors() {
        if segalloc_manifest(a.join(MANIFEST_FILE)) || segalloc_manifest(a.join(DESTROYING_FILE)) {
            return Err(Error::InvalidConfig(format!(
                "{} would be inside the segalloc data directory {}: a data directory \
                 cannot be made in another",
                given.display(),
                a.display()
            )));
        }
    }
    Ok(())
}

/// Whether `given` itself is a symlink (dangling or not), also when named
/// with a trailing `/` or `/.`, which `lstat` would follow.
fn names_a_symlink(given: &Path) -> bool {
    let bare: PathBuf = given.components().collect();
    std::fs::symlink_metadata(&bare).is_ok_and(|m| m.file_type().is_symlink())
}

/// An empty path names no directory (it was reported as "data directory
/// does not exist", with an empty name).
fn check_not_empty(given: &Path) -> Result<()> {
    if given.as_os_str().is_empty() {
        return Err(Error::InvalidConfig(
            "the data directory's path is empty".into(),
        ));
    }
    Ok(())
}

/// Whether entry `name` of `path` is one a creation that stopped before
/// its manifest leaves: an empty `LOCK`, or a `MANIFEST.tmp` of at most a
/// manifest's size (regular files; a user's file of either name is not).
fn is_creation_leftover(path: &Path, name: &std::ffi::OsStr) -> bool {
    let meta = match lstat(&path.join(name)) {
        // Gone since the folder was listed (an open or a deletion at work):
        // nothing is left of it.
        Ok(None) => return true,
        m => m.ok().flatten(),
    };
    let size = || meta.as_ref().filter(|m| m.is_file()).map(|m| m.len());
    match name.to_str() {
        Some(LOCK_FILE) => size() == Some(0),
        Some(MANIFEST_TMP_FILE) => size().is_some_and(|l| l <= MANIFEST_BYTES as u64),
        _ => false,
    }
}

/// A folder named as a shard's ([`shard_folder_name`](crate::format::shard_folder_name) of some
/// index).
fn is_shard_folder(path: &Path, name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| {
        n.strip_prefix("shard-")
            .and_then(|d| d.parse::<u16>().ok())
            .is_some_and(|i| crate::format::shard_folder_name(i) == n)
    }) && is_real_dir(&path.join(name))
}

/// A directory without a manifest is initialised only when it holds
/// nothing but what an unfinished creation leaves (see
/// [`is_creation_leftover`]) and a mount point's `lost+found` folder.
fn check_new_dir(path: &Path) -> Result<()> {
    if path.join(DESTROYING_FILE).exists() {
        return Err(unfinished_destroy(path));
    }
    for name in entry_names(path)? {
        let p = path.join(&name);
        match name.to_str() {
            _ if is_creation_leftover(path, &name) => {}
            Some(LOST_FOUND) if is_real_dir(&p) => {}
            _ if is_shard_folder(path, &name) => {
                return Err(Error::Corrupt {
                    what: path.join(MANIFEST_FILE).display().to_string(),
                    detail: "manifest missing but shard folders exist".into(),
                });
            }
            _ => {
                return Err(Error::NotDataDir {
                    path: path.to_path_buf(),
                    reason: "it has no manifest and is not empty: segalloc initialises \
                             only a missing or empty directory (nothing was created in it)",
                });
            }
        }
    }
    Ok(())
}

/// The error of a directory a [`DataDir::destroy`] did not finish.
pub(crate) fn unfinished_destroy(path: &Path) -> Error {
    Error::NotDataDir {
        path: path.to_path_buf(),
        reason: "a deletion of this data directory did not finish (MANIFEST.destroying): \
                 run DataDir::destroy on it again",
    }
}

/// `lstat(p)`: `None` when nothing is there (any more).
fn lstat(p: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(p) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("stat", Some(p), e)),
    }
}

/// A directory, not a symlink to one.
fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Resolve an existing directory the user named, following a symlink at
/// the top only.
fn resolve_existing(given: &Path) -> Result<PathBuf> {
    check_not_empty(given)?;
    let m = std::fs::metadata(given).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::DirNotFound {
            path: given.to_path_buf(),
        },
        _ => Error::io("stat", Some(given), e),
    })?;
    if !m.is_dir() {
        let kind = if m.is_file() {
            "a regular file"
        } else {
            "a special file"
        };
        return Err(Error::NotADirectory {
            path: given.to_path_buf(),
            kind,
        });
    }
    std::fs::canonicalize(given).map_err(|e| Error::io("canonicalize", Some(given), e))
}

/// The manifest of an existing directory, checked against `cfg`.
fn read_matching_manifest(path: &Path, cfg: &Config) -> Result<Manifest> {
    let m = read_manifest(path)?;
    let want = [
        ("shards", m.shard_count as u64, cfg.shards() as u64),
        ("window_bytes", m.window_bytes, cfg.window_bytes()),
        ("max_file_bytes", m.max_file_bytes, cfg.max_file_bytes()),
    ];
    for (what, on_disk, requested) in want {
        if on_disk != requested {
            return Err(Error::Mismatch {
                what,
                on_disk,
                requested,
            });
        }
    }
    Ok(m)
}

/// Write the manifest of a new directory (checked by [`check_new_dir`]).
fn create_manifest(path: &Path, cfg: &Config) -> Result<Manifest> {
    let m = Manifest {
        version: FORMAT_VERSION,
        shard_count: u16::try_from(cfg.shards())
            .map_err(|_| Error::InvalidConfig("too many shards".into()))?,
        dir_id: random_u64(),
        window_bytes: cfg.window_bytes(),
        max_file_bytes: cfg.max_file_bytes(),
        class_table_id: CLASS_TABLE_ID,
    };
    write_manifest(path, &m)?;
    Ok(m)
}

/// Names of the entries of a folder (`Io` naming it on failure).
fn entry_names(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("read_dir", Some(dir), e))?;
    rd.map(|e| {
        e.map(|e| e.file_name())
            .map_err(|e| Error::io("read_dir", Some(dir), e))
    })
    .collect()
}

/// For [`DataDir::destroy`]: `None` for an empty directory (or one with
/// only a mount point's `lost+found`), else the shard count of a segalloc
/// data directory: from its manifest, or from the manifest a deletion cut
/// short renamed; 0 for a creation that never got to its manifest (an
/// empty `LOCK`, perhaps a `MANIFEST.tmp` of at most a manifest's size).
fn destroy_shard_count(path: &Path) -> Result<Option<u16>> {
    let names: Vec<_> = entry_names(path)?
        .into_iter()
        .filter(|n| !(n == LOST_FOUND && is_real_dir(&path.join(n))))
        .collect();
    if names.is_empty() {
        return Ok(None);
    }
    for name in [MANIFEST_FILE, DESTROYING_FILE] {
        let p = path.join(name);
        check_not_symlink(&p)?;
        if p.exists() {
            return Ok(Some(read_manifest_file(path, &p)?.shard_count));
        }
    }
    let unfinished =
        names.iter().any(|n| n == LOCK_FILE) && names.iter().all(|n| is_creation_leftover(path, n));
    if unfinished {
        return Ok(Some(0));
    }
    Err(Error::NotDataDir {
        path: path.to_path_buf(),
        reason: "it has no manifest; nothing was deleted",
    })
}

/// What [`DataDir::destroy`] removes besides the manifest (renamed to the
/// tombstone, removed after these) and `LOCK` (last).
struct DestroyPlan {
    /// Shard files before their folder, then `MANIFEST.tmp`.
    doomed: Vec<PathBuf>,
    /// A `lost+found` folder is left in place (so is the directory then).
    kept_lost_found: bool,
}

/// [`DestroyPlan`] of a directory; an entry segalloc does not create
/// refuses it all.
fn destroy_plan(path: &Path, shard_count: u16) -> Result<DestroyPlan> {
    let foreign = |p: PathBuf| Error::NotDataDir {
        path: p,
        reason: "segalloc did not create this entry; nothing was deleted",
    };
    let mut doomed = Vec::new();
    let mut top = Vec::new();
    let mut kept_lost_found = false;
    // An entry gone between listing and looking (before the lock, an open
    // or another deletion may be at work) is nothing to delete.
    for name in entry_names(path)? {
        let p = path.join(&name);
        let Some(is_dir) = lstat(&p)?.map(|m| m.is_dir()) else {
            continue;
        };
        let shard = (0..shard_count).find(|&i| p == shard_dir(path, i));
        match (name.to_str(), shard, is_dir) {
            (Some(MANIFEST_TMP_FILE), None, false) => top.push(p),
            (Some(MANIFEST_FILE | DESTROYING_FILE | LOCK_FILE), None, false) => {}
            (Some(LOST_FOUND), None, true) => kept_lost_found = true,
            (_, Some(_), true) => {
                let names = match entry_names(&p) {
                    Err(Error::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        continue;
                    }
                    other => other?,
                };
                for f in names {
                    let fp = p.join(&f);
                    let Some(regular) = lstat(&fp)?.map(|m| m.is_file()) else {
                        continue;
                    };
                    if !regular || !is_shard_file_name(&f) {
                        return Err(foreign(fp));
                    }
                    doomed.push(fp);
                }
                doomed.push(p);
            }
            _ => return Err(foreign(p)),
        }
    }
    doomed.extend(top);
    Ok(DestroyPlan {
        doomed,
        kept_lost_found,
    })
}

/// Whether `name`, an entry at the top of a data directory (`is_dir`: a
/// folder, not a symlink), is one segalloc makes there other than a shard
/// folder: the manifest, its temporary and tombstone, the lock, a mount
/// point's `lost+found`. (What [`destroy_plan`] lets through.)
#[cfg(feature = "cli")]
pub(crate) fn is_own_top_file(name: &str, is_dir: bool) -> bool {
    matches!(
        (name, is_dir),
        (
            MANIFEST_TMP_FILE | MANIFEST_FILE | DESTROYING_FILE | LOCK_FILE,
            false
        ) | (LOST_FOUND, true)
    )
}

/// `meta.seg` or `data-NNNNNN.seg`.
fn is_shard_file_name(name: &std::ffi::OsStr) -> bool {
    let Some(n) = name.to_str() else {
        return false;
    };
    n == "meta.seg"
        || n.strip_prefix("data-")
            .and_then(|r| r.strip_suffix(".seg"))
            .is_some_and(|d| d.len() >= 6 && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove the emptied directory `path`: a mount point (`EBUSY`) stays,
/// empty, and so does a directory an open made a data directory again once
/// `LOCK` was gone (`ENOTEMPTY`): it is that open's; one already gone
/// (another deletion) is nothing to remove.
fn remove_top(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(nix::libc::EBUSY | nix::libc::ENOTEMPTY | nix::libc::ENOENT)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::io("remove", Some(path), e)),
    }
}

fn check_not_symlink(p: &Path) -> Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => Err(Error::InvalidConfig(format!(
            "{} is a symlink; segalloc does not follow symlinks in a data directory",
            p.display()
        ))),
        _ => Ok(()),
    }
}

/// An `flock` held through a descriptor of its own, released with
/// `LOCK_UN` when dropped.
///
/// Closing the descriptor alone is not enough: a child that another thread
/// forks keeps a copy of the open file description (and so of the lock)
/// until it execs, although the descriptor is close-on-exec.
#[derive(Debug)]
struct FileLock {
    fd: OwnedFd,
}

impl FileLock {
    /// `flock(LOCK_EX | LOCK_NB)` on `fd`: `Ok(None)` when another holder has it.
    fn try_exclusive(fd: OwnedFd) -> std::io::Result<Option<FileLock>> {
        Ok(sys::try_lock_exclusive(fd.as_raw_fd())?.then_some(FileLock { fd }))
    }

    fn try_shared(fd: OwnedFd) -> std::io::Result<Option<FileLock>> {
        Ok(sys::try_lock_shared(fd.as_raw_fd())?.then_some(FileLock { fd }))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        // Nothing to do on failure: closing the descriptor still releases
        // the lock once no forked copy of it is left.
        let _ = sys::unlock(self.fd.as_raw_fd());
    }
}

/// The lock of one shard: an `flock` on the shard's folder, exclusive for
/// every writable open of the shard and shared for every read-only one (in
/// this process or another), held for as long as it is open. So two
/// instances never hand out the same slot, and no reader maps the bytes a
/// writer is changing (that would be a data race through safe reads).
#[derive(Debug)]
pub(crate) struct ShardLock {
    _lock: FileLock,
}

impl ShardLock {
    /// Lock shard `shard`, whose folder is `folder`.
    ///
    /// # Errors
    ///
    /// [`Error::ShardAlreadyOpen`] when another open of the shard holds it;
    /// [`Error::Io`] naming the folder when it cannot be opened (missing, a
    /// symlink, not a directory).
    pub(crate) fn acquire(shard: u16, folder: &Path) -> Result<ShardLock> {
        Self::take(shard, folder, FileLock::try_exclusive)
    }

    /// The shared lock of a read-only open: many readers, no writer.
    ///
    /// # Errors
    ///
    /// [`Error::ShardAlreadyOpen`] while a writable open holds the shard;
    /// io errors naming the folder.
    pub(crate) fn acquire_shared(shard: u16, folder: &Path) -> Result<ShardLock> {
        Self::take(shard, folder, FileLock::try_shared)
    }

    /// The lock counts only if `folder` is still the folder locked:
    /// `destroy` removes shard folders under their locks, and an open that
    /// opened the old folder just before, then locked it, would go on with
    /// the files of a deleted directory, or of the one created after it.
    /// (Not taken again on the new folder: the open's manifest is the old
    /// directory's.)
    fn take(shard: u16, folder: &Path, lock: TryLock) -> Result<ShardLock> {
        let fd = sys::open_dir(folder).map_err(|e| Error::opening("open", folder, e))?;
        #[cfg(feature = "test-support")]
        test_hooks::before_lock(folder);
        let lock = match lock(fd) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                return Err(Error::ShardAlreadyOpen {
                    shard,
                    path: folder.to_path_buf(),
                });
            }
            Err(e) => return Err(Error::io("flock", Some(folder), e)),
        };
        if !names_file(folder, &lock.fd)? {
            return Err(Error::io(
                "open",
                Some(folder),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the shard's folder was removed while it was being opened",
                ),
            ));
        }
        Ok(ShardLock { _lock: lock })
    }
}

impl crate::files::FileOwner for ShardLock {
    /// The shard's folder as locked (the lock is on the folder itself).
    fn folder(&self) -> std::os::fd::BorrowedFd<'_> {
        self._lock.fd.as_fd()
    }
}

/// A non-blocking `flock` of a descriptor: `Ok(None)` when another holds it.
type TryLock = fn(OwnedFd) -> std::io::Result<Option<FileLock>>;

/// Times [`take_lock`] locks a `LOCK` that turns out to be replaced before
/// it gives up.
const LOCK_ATTEMPTS: usize = 64;

/// The directory's lock: `flock(LOCK_EX)` on `LOCK`, created if missing;
/// with `shared`, `flock(LOCK_SH)` on an existing `LOCK` opened read-only
/// (a read-only open's).
///
/// The lock counts only while `LOCK` still names the file locked: `destroy`
/// removes `LOCK` while it holds it, so an open that opened the old file
/// just before would otherwise lock a file nobody else can reach, while the
/// next open creates and locks a new one, and both would hold "the" lock.
/// Such a lock is released and taken again on the file `LOCK` names now.
fn take_lock(dir: &Path, shared: bool) -> Result<FileLock> {
    let p = dir.join(LOCK_FILE);
    let (mode, lock): (_, TryLock) = if shared {
        (OpenMode::ReadOnly, FileLock::try_shared)
    } else {
        (OpenMode::ReadWriteCreate, FileLock::try_exclusive)
    };
    for _ in 0..LOCK_ATTEMPTS {
        let fd = sys::open(&p, mode).map_err(|e| match e.kind() {
            // A read-only open creates nothing, its lock file included.
            std::io::ErrorKind::NotFound if shared => Error::io(
                "open",
                Some(&p),
                std::io::Error::new(
                    e.kind(),
                    "a read-only open shares the lock file a writable open makes, and this \
                     directory has none (a copy made without it?): open it writable once",
                ),
            ),
            _ => Error::opening("open", &p, e),
        })?;
        #[cfg(feature = "test-support")]
        test_hooks::before_lock(dir);
        let lock = match lock(fd) {
            Ok(Some(lock)) => lock,
            Ok(None) => {
                return Err(Error::AlreadyOpen {
                    path: dir.to_path_buf(),
                });
            }
            Err(e) => return Err(Error::io("flock", Some(&p), e)),
        };
        if names_file(&p, &lock.fd)? {
            return Ok(lock);
        }
    }
    Err(Error::io(
        "flock",
        Some(&p),
        std::io::Error::other("the file kept being replaced while it was locked"),
    ))
}

/// The directory `dir`, opened: the one whose `LOCK` is `lock` (another
/// directory at that path is refused rather than taken for it).
fn locked_folder(dir: &Path, lock: &FileLock) -> Result<Arc<OwnedFd>> {
    let fd = sys::open_dir(dir).map_err(|e| Error::opening("open", dir, e))?;
    let locked =
        sys::file_identity(lock.fd.as_fd()).map_err(|e| Error::io("fstat", Some(dir), e))?;
    if sys::identity_at(fd.as_fd(), Path::new(LOCK_FILE)).ok() != Some(locked) {
        return Err(Error::io(
            "open",
            Some(dir),
            std::io::Error::other("the directory was moved or replaced since it was opened"),
        ));
    }
    Ok(Arc::new(fd))
}

/// Whether `p` (not followed if a symlink) is the file open as `fd`.
fn names_file(p: &Path, fd: &OwnedFd) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let (dev, ino) = sys::file_identity(fd.as_fd()).map_err(|e| Error::io("fstat", Some(p), e))?;
    Ok(lstat(p)?.is_some_and(|m| m.dev() == dev && m.ino() == ino))
}

/// Hooks for tests of races with another open or a `destroy`.
#[cfg(feature = "test-support")]
pub mod test_hooks {
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc::{Receiver, Sender, channel};
    use std::time::Duration;

    /// A pause asked for: its number, the path, then the two ends the
    /// paused call signals and waits on.
    type Pause = (u64, PathBuf, Sender<()>, Receiver<()>);

    static PAUSES: Mutex<Vec<Pause>> = Mutex::new(Vec::new());
    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// A call held between opening a lock's file (a data directory's
    /// `LOCK`, a shard's folder) and locking it
    /// ([`DataDir::pause_before_lock_for_test`](super::DataDir::pause_before_lock_for_test)).
    /// Dropped before a call reached it, it pauses nothing.
    #[derive(Debug)]
    pub struct LockPause {
        id: u64,
        reached: Receiver<()>,
        go: Sender<()>,
    }

    impl LockPause {
        /// Wait until a call has opened the file and stopped before
        /// locking it.
        ///
        /// # Panics
        ///
        /// After a minute without one.
        pub fn wait_reached(&self) {
            if self.reached.recv_timeout(Duration::from_secs(60)).is_err() {
                panic!("no call reached the paused lock within a minute");
            }
        }

        /// Let that call lock the file and go on.
        pub fn resume(&self) {
            let _ = self.go.send(());
        }
    }

    impl Drop for LockPause {
        fn drop(&mut self) {
            let mut v = PAUSES.lock().unwrap_or_else(|e| e.into_inner());
            v.retain(|(id, ..)| *id != self.id);
        }
    }

    pub(crate) fn pause_before_lock(path: PathBuf) -> LockPause {
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (reached_tx, reached) = channel();
        let (go, go_rx) = channel();
        PAUSES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, path, reached_tx, go_rx));
        LockPause { id, reached, go }
    }

    /// The first call to reach here for `path` after a pause was asked for
    /// stops, once.
    pub(super) fn before_lock(path: &Path) {
        let pause = {
            let mut v = PAUSES.lock().unwrap_or_else(|e| e.into_inner());
            v.iter()
                .position(|(_, p, ..)| p == path)
                .map(|i| v.swap_remove(i))
        };
        if let Some((_, _, reached, go)) = pause {
            let _ = reached.send(());
            let _ = go.recv();
        }
    }
}

/// `r`, unless it refuses directory `path` as no data directory while
/// another instance holds its lock: then an open is creating it, or a
/// deletion is emptying it, and [`Error::AlreadyOpen`] says so (the check
/// before the lock sees their work half done).
fn unless_locked<T>(r: Result<T>, path: &Path) -> Result<T> {
    // segalloc's `LOCK` is empty (what a creation leaves): another
    // program's lock file of that name (with a pid in it, say) leaves the
    // refusal as it is.
    let ours = || is_creation_leftover(path, LOCK_FILE.as_ref());
    match r {
        Err(Error::NotDataDir { .. }) if ours() && probe_lock(path).unwrap_or(false) => {
            Err(Error::AlreadyOpen {
                path: path.to_path_buf(),
            })
        }
        other => other,
    }
}

/// Whether another instance holds the directory's lock (no file created).
fn probe_lock(dir: &Path) -> Result<bool> {
    let p = dir.join(LOCK_FILE);
    check_not_symlink(&p)?;
    let fd = match sys::open(&p, OpenMode::ReadOnly) {
        Ok(fd) => fd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(Error::io("open", Some(&p), e)),
    };
    let free = sys::try_lock_shared(fd.as_raw_fd()).map_err(|e| Error::io("flock", Some(&p), e))?;
    if free {
        // Release it explicitly, not only by closing: a child forked
        // meanwhile would otherwise keep a writer out until its exec.
        sys::unlock(fd.as_raw_fd()).map_err(|e| Error::io("flock", Some(&p), e))?;
    }
    Ok(!free)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    read_manifest_file(dir, &dir.join(MANIFEST_FILE))
}

/// Whether the data directory `dir` (a shard folder's parent) has a
/// manifest of another directory than `manifest`'s: it was deleted and
/// made again since `manifest` was read. (No manifest there, or one that
/// cannot be read, is not that: those are reported where they matter.)
pub(crate) fn made_again(dir: &Path, manifest: &Manifest) -> bool {
    read_manifest(dir).is_ok_and(|m| m.dir_id != manifest.dir_id)
}

/// The manifest in file `p` of directory `dir` (`MANIFEST`, or the
/// tombstone of a deletion cut short).
fn read_manifest_file(dir: &Path, p: &Path) -> Result<Manifest> {
    // `read_regular` refuses a symlink or anything but a regular file, and
    // a FIFO in its place does not block it.
    let buf = sys::read_regular(p, 4096).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound if dir.join(DESTROYING_FILE).exists() => {
            unfinished_destroy(dir)
        }
        std::io::ErrorKind::NotFound => Error::NotDataDir {
            path: dir.to_path_buf(),
            reason: "it has no manifest",
        },
        _ => Error::io("read", Some(p), e),
    })?;
    if buf.len() != MANIFEST_BYTES {
        return Err(Error::Corrupt {
            what: p.display().to_string(),
            detail: format!("manifest is {} bytes, expected {MANIFEST_BYTES}", buf.len()),
        });
    }
    Ok(Manifest::decode(&buf, &p.display().to_string())?.0)
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let tmp = dir.join(MANIFEST_TMP_FILE);
    let p = dir.join(MANIFEST_FILE);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io("open", Some(&tmp), e))?;
    f.write_all(&m.encode(0))
        .map_err(|e| Error::io("write", Some(&tmp), e))?;
    f.sync_all()
        .map_err(|e| Error::io("fsync", Some(&tmp), e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io("rename", Some(&p), e))?;
    Ok(())
}

/// `fsync` a directory so that entries created in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("fsync", Some(dir), e))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    // No /dev/urandom: time and pid are unique enough for a directory tag.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}
