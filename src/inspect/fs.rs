//! What the inspector reads of the file system itself: what a path is,
//! listings, regular files opened without following symlinks, the manifest,
//! the lock probe, and the geometry the superblocks agree on.

use super::*;
// ---------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------

/// What a path is, without following a symlink.
#[derive(Debug)]
pub(super) enum Kind {
    Missing,
    Symlink,
    Dir,
    File(Metadata),
    Other,
}

impl Kind {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Kind::Missing => "missing",
            Kind::Symlink => "a symlink",
            Kind::Dir => "a directory",
            Kind::File(_) => "a regular file",
            Kind::Other => "a special file",
        }
    }
}

pub(super) fn classify(p: &Path) -> Result<Kind> {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Kind::Missing),
        Err(e) => Err(Error::io("stat", Some(p), e)),
        Ok(m) => {
            let t = m.file_type();
            Ok(if t.is_symlink() {
                Kind::Symlink
            } else if t.is_dir() {
                Kind::Dir
            } else if t.is_file() {
                Kind::File(m)
            } else {
                Kind::Other
            })
        }
    }
}

/// The entries of a folder, sorted by name (non-UTF-8 names lossily).
pub(super) fn list_dir(dir: &Path) -> Result<Vec<(String, Kind)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io("read_dir", Some(dir), e))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(|e| Error::io("read_dir", Some(dir), e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        v.push((name, classify(&e.path())?));
    }
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Open a regular file for reading without following a symlink or blocking
/// on a special file.
pub(super) fn open_regular(p: &Path) -> Result<(File, Metadata)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| Error::io("open", Some(p), e))?;
    let m = f.metadata().map_err(|e| Error::io("fstat", Some(p), e))?;
    if !m.is_file() {
        return Err(Error::io(
            "open",
            Some(p),
            io::Error::new(
                io::ErrorKind::InvalidData,
                "not a regular file (replaced while being read?)",
            ),
        ));
    }
    Ok((f, m))
}

/// Read as much of `buf` as the file holds at `off`; the bytes read.
pub(super) fn read_at_most(f: &File, off: u64, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Manifest and lock
// ---------------------------------------------------------------------------

pub(super) fn read_manifest(
    dir: &Path,
    listing: &[(String, Kind)],
    problems: &mut Vec<Problem>,
) -> Result<Option<Manifest>> {
    let p = dir.join(MANIFEST_FILE);
    let mut r = Reporter {
        out: problems,
        shard: None,
        file: Some(MANIFEST_FILE.to_string()),
    };
    match classify(&p)? {
        Kind::File(_) => {}
        Kind::Missing => {
            if listing
                .iter()
                .any(|(n, _)| n == crate::datadir::DESTROYING_FILE)
            {
                return Err(crate::datadir::unfinished_destroy(dir));
            }
            if !listing.iter().any(|(n, _)| n.starts_with("shard-")) {
                return Err(Error::NotDataDir {
                    path: dir.to_path_buf(),
                    reason: "it has neither a manifest nor shard folders",
                });
            }
            r.error(None, None, "missing, but shard folders exist");
            return Ok(None);
        }
        k => {
            r.wrong_kind(&k, "a regular file");
            return Ok(None);
        }
    }
    let (f, m) = open_regular(&p)?;
    let mut buf = [0u8; format::MANIFEST_BYTES];
    let n = read_at_most(&f, 0, &mut buf).map_err(|e| Error::io("read", Some(&p), e))?;
    if m.len() != format::MANIFEST_BYTES as u64 {
        r.error(
            None,
            None,
            format!("is {} bytes, expected {}", m.len(), format::MANIFEST_BYTES),
        );
    }
    if n < format::MANIFEST_BYTES {
        return Ok(None);
    }
    match Manifest::decode(&buf, MANIFEST_FILE) {
        Ok((man, reserved)) => {
            if reserved != 0 {
                r.warn(
                    None,
                    Some(OFF_SHARD as u64),
                    format!("reserved bytes {OFF_SHARD}..{OFF_DIR_ID} are {reserved:#06x}, not 0"),
                );
            }
            // The library refuses a manifest of the wrong length; so do we.
            Ok((m.len() == format::MANIFEST_BYTES as u64).then_some(man))
        }
        Err(Error::Corrupt { detail, .. }) => {
            r.error(None, Some(0), detail);
            Ok(None)
        }
        Err(e) => {
            r.error(None, Some(0), e.to_string());
            Ok(None)
        }
    }
}

/// Find out whether the directory is open elsewhere, without creating
/// anything. Returns the lock guard to hold while reading.
pub(super) fn probe_lock(
    dir: &Path,
    manifest_ok: bool,
    problems: &mut Vec<Problem>,
) -> Result<(Option<DataDir>, LockStatus)> {
    let p = dir.join(LOCK_FILE);
    match classify(&p)? {
        // `open_read_only` would create it (O_CREAT): don't.
        Kind::Missing => return Ok((None, LockStatus::NoLockFile)),
        Kind::File(_) => {}
        k => {
            Reporter {
                out: problems,
                shard: None,
                file: Some(LOCK_FILE.to_string()),
            }
            .error(
                None,
                None,
                format!(
                    "is {}, not a regular file: the library cannot lock the directory",
                    k.describe()
                ),
            );
            return Ok((
                None,
                LockStatus::Unknown(format!("{LOCK_FILE} is {}", k.describe())),
            ));
        }
    }
    if !manifest_ok {
        // `open_read_only` reads the manifest before the lock.
        return Ok((
            None,
            LockStatus::Unknown("the manifest is unusable, so the lock was not tried".into()),
        ));
    }
    match DataDir::open_read_only(dir) {
        Ok((dd, false)) => Ok((Some(dd), LockStatus::Taken)),
        Ok((_, true)) => Ok((None, LockStatus::HeldElsewhere)),
        // Opening LOCK read-write fails on a read-only file system or without
        // write permission: read on, but say so.
        Err(Error::Io { op, source, .. }) => Ok((
            None,
            LockStatus::Unknown(format!("{op} of {LOCK_FILE} failed: {source}")),
        )),
        Err(e @ Error::Corrupt { .. }) => Ok((None, LockStatus::Unknown(e.to_string()))),
        Err(e) => Err(e),
    }
}

/// When the manifest is unusable: the geometry of the first valid superblock.
pub(super) fn geometry_from_superblocks(
    dir: &Path,
    listing: &[(String, Kind)],
    problems: &mut Vec<Problem>,
) -> Result<Option<Manifest>> {
    for (name, kind) in listing {
        let Some(i) = shard_index_of(name) else {
            continue;
        };
        if !matches!(kind, Kind::Dir) || *name != shard_folder_name(i) {
            continue;
        }
        let p = dir.join(name).join(META_FILE);
        if !matches!(classify(&p)?, Kind::File(_)) {
            continue;
        }
        let (f, _) = open_regular(&p)?;
        let mut sb = [0u8; format::MANIFEST_BYTES];
        let n = read_at_most(&f, 0, &mut sb).map_err(|e| Error::io("read", Some(&p), e))?;
        if n < sb.len() {
            continue;
        }
        if let Ok((m, _)) = Manifest::decode(&sb, "superblock") {
            Reporter {
                out: problems,
                shard: None,
                file: Some(MANIFEST_FILE.to_string()),
            }
            .warn(
                None,
                None,
                format!("unusable; the geometry is taken from {name}/{META_FILE}'s superblock"),
            );
            return Ok(Some(m));
        }
    }
    Reporter {
        out: problems,
        shard: None,
        file: Some(MANIFEST_FILE.to_string()),
    }
    .error(
        None,
        None,
        "unusable, and no shard has a valid superblock: the shards cannot be read",
    );
    Ok(None)
}
