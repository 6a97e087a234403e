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
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::format::classes::CLASS_TABLE_ID;
use crate::format::{FORMAT_VERSION, MANIFEST_BYTES, Manifest};
use crate::sys::{self, OpenMode};

/// Name of the manifest file.
pub const MANIFEST_FILE: &str = "MANIFEST";
/// Name of the lock file.
pub const LOCK_FILE: &str = "LOCK";
/// Name of the manifest while it is being written.
const MANIFEST_TMP_FILE: &str = "MANIFEST.tmp";

/// An open (and locked) data directory.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    manifest: Manifest,
    created: bool,
    read_only: bool,
    _lock: Option<FileLock>,
}

impl DataDir {
    /// Open the directory of `cfg`, creating it (with its parents, and its
    /// manifest) if it does not exist, and take its exclusive lock. An empty
    /// directory is initialised as a new one.
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
    /// [`Error::InvalidConfig`] when an entry inside is a symlink;
    /// [`Error::Io`] naming the path that failed.
    pub fn open(cfg: &Config) -> Result<DataDir> {
        // A `SEGALLOC_IO` value that names no backend (`bogus`) is refused
        // before anything is created. (A backend the kernel cannot give is
        // found when the shard's ring is made.)
        cfg.io_backend().resolve_env()?;
        let path = create_and_resolve(cfg.dir())?;
        let lock = take_lock(&path)?;
        let mpath = path.join(MANIFEST_FILE);
        check_not_symlink(&mpath)?;
        let (manifest, created) = if mpath.exists() {
            (read_matching_manifest(&path, cfg)?, false)
        } else {
            (create_manifest(&path, cfg)?, true)
        };
        for i in 0..manifest.shard_count {
            let d = shard_dir(&path, i);
            check_not_symlink(&d)?;
            if !d.exists() {
                DirBuilder::new()
                    .mode(0o700)
                    .create(&d)
                    .map_err(|e| Error::io("mkdir", Some(&d), e))?;
            }
        }
        if created {
            sync_dir(&path)?;
        }
        Ok(DataDir {
            path,
            manifest,
            created,
            read_only: false,
            _lock: Some(lock),
        })
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
                read_only: true,
                _lock: None,
            },
            locked_elsewhere,
        ))
    }

    /// Delete a closed data directory: every file and folder segalloc
    /// created in it, then the directory itself (a mount point is left in
    /// place, empty). A missing directory is nothing to delete (`Ok`), and
    /// so is an empty one (it is removed).
    ///
    /// Nothing is deleted unless `path` is a segalloc data directory (a valid
    /// manifest, or only the `LOCK` of a creation that never finished), every
    /// entry in it is one segalloc creates, and its lock and every shard's
    /// lock are free: the directory's lock is held until the deletion is done,
    /// so no instance can open it meanwhile.
    ///
    /// # Errors
    ///
    /// [`Error::AlreadyOpen`] or [`Error::ShardAlreadyOpen`] when it is open
    /// (in this or another process); [`Error::NotDataDir`] naming the
    /// directory, or the entry that segalloc did not create;
    /// [`Error::NotADirectory`]; [`Error::Corrupt`] for a damaged manifest;
    /// [`Error::Io`] naming the path that could not be removed.
    pub fn destroy(path: impl AsRef<Path>) -> Result<()> {
        let path = match resolve_existing(path.as_ref()) {
            Err(Error::DirNotFound { .. }) => return Ok(()),
            other => other?,
        };
        let shard_count = match destroy_shard_count(&path)? {
            Some(n) => n,
            None => return remove_top(&path), // empty
        };
        let _lock = take_lock(&path)?;
        let _shards = (0..shard_count)
            .filter(|&i| shard_dir(&path, i).exists())
            .map(|i| ShardLock::acquire(i, &shard_dir(&path, i)))
            .collect::<Result<Vec<_>>>()?;
        let doomed = destroy_plan(&path, shard_count)?;
        for p in &doomed {
            let r = if p.is_dir() {
                std::fs::remove_dir(p)
            } else {
                std::fs::remove_file(p)
            };
            r.map_err(|e| Error::io("remove", Some(p), e))?;
        }
        remove_top(&path)
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
    /// The folder of shard `i`.
    pub fn shard_dir(&self, i: u16) -> PathBuf {
        shard_dir(&self.path, i)
    }
}

fn shard_dir(path: &Path, i: u16) -> PathBuf {
    path.join(crate::format::shard_folder_name(i))
}

/// Resolve the directory the user named, following a symlink at the top,
/// and creating it (with its parents) when it does not exist.
fn create_and_resolve(given: &Path) -> Result<PathBuf> {
    match std::fs::metadata(given) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(given)
            .map_err(|e| Error::io("mkdir", Some(given), e))?,
        _ => {}
    }
    resolve_existing(given)
}

/// Resolve an existing directory the user named, following a symlink at
/// the top only.
fn resolve_existing(given: &Path) -> Result<PathBuf> {
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

/// Write the manifest of a new directory (one without shard folders).
fn create_manifest(path: &Path, cfg: &Config) -> Result<Manifest> {
    if has_shard_dirs(path) {
        return Err(Error::Corrupt {
            what: path.join(MANIFEST_FILE).display().to_string(),
            detail: "manifest missing but shard folders exist".into(),
        });
    }
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

/// For [`DataDir::destroy`]: `None` for an empty directory, else the shard
/// count of a segalloc data directory (0 for a creation that never got to
/// its manifest: only `LOCK` and `MANIFEST.tmp`).
fn destroy_shard_count(path: &Path) -> Result<Option<u16>> {
    let names = entry_names(path)?;
    if names.is_empty() {
        return Ok(None);
    }
    check_not_symlink(&path.join(MANIFEST_FILE))?;
    if path.join(MANIFEST_FILE).exists() {
        return Ok(Some(read_manifest(path)?.shard_count));
    }
    if names
        .iter()
        .all(|n| n == LOCK_FILE || n == MANIFEST_TMP_FILE)
    {
        return Ok(Some(0));
    }
    Err(Error::NotDataDir {
        path: path.to_path_buf(),
        reason: "it has no manifest; nothing was deleted",
    })
}

/// Everything [`DataDir::destroy`] removes, children before their folder
/// and `LOCK` last; an entry segalloc does not create refuses it all.
fn destroy_plan(path: &Path, shard_count: u16) -> Result<Vec<PathBuf>> {
    let foreign = |p: PathBuf| Error::NotDataDir {
        path: p,
        reason: "segalloc did not create this entry; nothing was deleted",
    };
    let mut doomed = Vec::new();
    let mut top = Vec::new();
    for name in entry_names(path)? {
        let p = path.join(&name);
        let is_dir = std::fs::symlink_metadata(&p)
            .map_err(|e| Error::io("stat", Some(&p), e))?
            .is_dir();
        let shard = (0..shard_count).find(|&i| p == shard_dir(path, i));
        match (name.to_str(), shard, is_dir) {
            (Some(MANIFEST_FILE | MANIFEST_TMP_FILE), None, false) => top.push(p),
            (Some(LOCK_FILE), None, false) => {}
            (_, Some(_), true) => {
                for f in entry_names(&p)? {
                    let fp = p.join(&f);
                    let regular = std::fs::symlink_metadata(&fp)
                        .map_err(|e| Error::io("stat", Some(&fp), e))?
                        .is_file();
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
    doomed.push(path.join(LOCK_FILE));
    Ok(doomed)
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

/// Remove the (now empty) data directory; a mount point stays, empty.
fn remove_top(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(()),
        Err(e) => Err(Error::io("remove", Some(path), e)),
    }
}

fn has_shard_dirs(path: &Path) -> bool {
    std::fs::read_dir(path)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("shard-"))
        })
        .unwrap_or(false)
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

    fn take(
        shard: u16,
        folder: &Path,
        lock: fn(OwnedFd) -> std::io::Result<Option<FileLock>>,
    ) -> Result<ShardLock> {
        let fd = sys::open_dir(folder).map_err(|e| Error::io("open", Some(folder), e))?;
        match lock(fd) {
            Ok(Some(lock)) => Ok(ShardLock { _lock: lock }),
            Ok(None) => Err(Error::ShardAlreadyOpen {
                shard,
                path: folder.to_path_buf(),
            }),
            Err(e) => Err(Error::io("flock", Some(folder), e)),
        }
    }
}

fn take_lock(dir: &Path) -> Result<FileLock> {
    let p = dir.join(LOCK_FILE);
    let fd =
        sys::open(&p, OpenMode::ReadWriteCreate).map_err(|e| Error::io("open", Some(&p), e))?;
    match FileLock::try_exclusive(fd) {
        Ok(Some(lock)) => Ok(lock),
        Ok(None) => Err(Error::AlreadyOpen {
            path: dir.to_path_buf(),
        }),
        Err(e) => Err(Error::io("flock", Some(&p), e)),
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
    let p = dir.join(MANIFEST_FILE);
    // `sys::open` refuses a symlink or anything but a regular file, and a
    // FIFO in its place does not block it.
    let mut f = std::fs::File::from(sys::open(&p, OpenMode::ReadOnly).map_err(
        |e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotDataDir {
                path: dir.to_path_buf(),
                reason: "it has no manifest",
            },
            _ => Error::io("open", Some(&p), e),
        },
    )?);
    let mut buf = Vec::with_capacity(MANIFEST_BYTES);
    Read::by_ref(&mut f)
        .take(4096)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", Some(&p), e))?;
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
