//! Opening an allocator: create a fresh metadata file, or recover an
//! existing one.

#![warn(clippy::cast_possible_truncation)]

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::Instrument;

use super::durability::Released;
use super::meta_map::MetaMap;
use super::space::{Run, Space, Trim};
use super::{AllocStats, SegmentAllocator, State, data_file_name};
use crate::datadir::ShardLock;
use crate::error::{Error, Result};
use crate::files::FileOwner;
use crate::format::classes::{BLOCK_BYTES, CLASS_COUNT};
use crate::format::{self, Manifest};
use crate::mapping::MappingManager;

impl SegmentAllocator {
    /// Open (recover) or create the allocator of shard `shard` in folder
    /// `dir`, over `mm` (whose registry opens the files). The shard's lock is
    /// held until the allocator is dropped and no window of its files is
    /// mapped any more (a pin, or the manager's idle windows, may outlive
    /// it): exclusive, or shared when the registry is read-only (readers
    /// never map bytes a writer changes). Once it is released, the manager
    /// neither grows nor maps those files again ([`Error::OwnerClosed`]).
    ///
    /// # Errors
    ///
    /// [`Error::ShardAlreadyOpen`] when another open of the shard (in this
    /// or another process) holds its lock: a writable open excludes every
    /// other open, a read-only one only writable opens;
    /// [`Error::Corrupt`] when the metadata fails validation (bad checksum,
    /// truncated, overlapping segments that cannot be resolved, a data file
    /// missing); [`Error::Mismatch`] when it belongs to another shard or
    /// directory; [`Error::InvalidConfig`] when `mm`'s window size is not the
    /// directory's (`manifest.window_bytes`) or it allows fewer than 2
    /// windows; io errors.
    pub async fn open(
        shard: u16,
        dir: &Path,
        manifest: Manifest,
        mm: Rc<MappingManager>,
    ) -> Result<SegmentAllocator> {
        let span = tracing::info_span!("recovery", shard);
        Self::open_inner(shard, dir, manifest, mm)
            .instrument(span)
            .await
    }

    async fn open_inner(
        shard: u16,
        dir: &Path,
        manifest: Manifest,
        mm: Rc<MappingManager>,
    ) -> Result<SegmentAllocator> {
        let started = Instant::now();
        // The metadata and the segments are laid out in the directory's
        // windows: a manager with other windows would map them elsewhere.
        if mm.window_bytes() != manifest.window_bytes {
            return Err(Error::InvalidConfig(format!(
                "the mapping manager's windows are {} bytes, the data directory's {} \
                 (set MappingConfig::window_bytes to the manifest's window_bytes)",
                mm.window_bytes(),
                manifest.window_bytes
            )));
        }
        if mm.max_windows() < 2 {
            return Err(Error::InvalidConfig(
                "a shard needs at least 2 windows (max_windows per shard >= 2)".into(),
            ));
        }
        let files = mm.files().clone();
        let meta_path = dir.join("meta.seg");
        let a = Self::unopened(shard, dir, manifest, mm)?;
        // Under the shard lock, before anything is created: the directory
        // must still be the manifest's. One deleted and made again since has
        // new shard folders, and this open would give them the old
        // directory's metadata (which that directory's own open refuses).
        if let Some(parent) = dir.parent()
            && crate::datadir::made_again(parent, &manifest)
        {
            return Err(Error::NotDataDir {
                path: parent.to_path_buf(),
                reason: "it was deleted and made again since its manifest was read; open it again",
            });
        }
        let meta = a.meta_file;
        let lease = files.acquire_of(meta, 0).await?;
        drop(lease);
        let size = files.len_bytes(meta)?.unwrap_or(0);
        if files.is_read_only() && size > 0 && size < format::HWM_OFFSET + 8 {
            // Too short to be pinned read-only, or to hold the mark: said
            // as the scan says it, not as a pin past the end of a file.
            let d = format::scan::Defect::MarkUnreadable { size_bytes: size };
            return Err(Error::Corrupt {
                what: meta_path.display().to_string(),
                detail: d.to_string(),
            });
        }
        let fresh = size == 0 || a.superblock_is_blank(size).await?;
        if fresh && dir.join(data_file_name(0)).exists() {
            // Data files are created only after the metadata was written and
            // synced, and their creation is synced: this is damage, not a
            // directory that was never used.
            return Err(Error::Corrupt {
                what: meta_path.display().to_string(),
                detail: "metadata file is empty or blank but data files exist".into(),
            });
        }
        if fresh {
            if files.is_read_only() {
                return Err(Error::Corrupt {
                    what: meta_path.display().to_string(),
                    detail: "metadata file is empty".into(),
                });
            }
            a.create_meta().await?;
        } else {
            a.recover(size).await?;
            if !files.is_read_only() {
                a.reserve_published_runs().await?;
                // Frees and releases made before a crash may be in the file
                // but not durable: make them durable before any of their
                // space is reused.
                a.files.sync(a.meta_file, true).await?;
                let released = std::mem::take(&mut a.st.borrow_mut().released);
                a.reuse(released);
            }
        }
        a.st.borrow_mut().stats.recovery_us =
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(a)
    }

    /// The allocator's state before its metadata is read or created.
    fn unopened(
        shard: u16,
        dir: &Path,
        manifest: Manifest,
        mm: Rc<MappingManager>,
    ) -> Result<SegmentAllocator> {
        let files = mm.files().clone();
        let shard_lock: Rc<dyn FileOwner> = match files.is_read_only() {
            true => Rc::new(ShardLock::acquire_shared(shard, dir)?),
            false => Rc::new(ShardLock::acquire(shard, dir)?),
        };
        let meta_file = files.register_owned(dir.join("meta.seg"), &shard_lock);
        let blocks = |bytes: u64| {
            u32::try_from(bytes / BLOCK_BYTES).map_err(|_| {
                Error::InvalidConfig(format!(
                    "geometry out of range: {bytes} bytes is more than 2^32 blocks"
                ))
            })
        };
        let window_blocks = blocks(manifest.window_bytes)?;
        let file_blocks = blocks(manifest.max_file_bytes)?;
        let writable = !files.is_read_only();
        Ok(SegmentAllocator {
            shard,
            manifest,
            dir: dir.to_path_buf(),
            meta: MetaMap::new(mm.clone(), meta_file, manifest.window_bytes),
            mm,
            files,
            meta_file,
            data_files: RefCell::new(Vec::new()),
            st: RefCell::new(State {
                segments: Vec::new(),
                segments_live: 0,
                avail: std::array::from_fn(|_| Vec::new()),
                space: Space::new(window_blocks, file_blocks),
                free_entries: Vec::new(),
                released: Released::default(),
                covered_entries: 0,
                directory_len: 0,
                next_generation: 1,
                roots: HashMap::new(),
                root_seq: 0,
                live_per_class: [0; CLASS_COUNT],
                stats: AllocStats::default(),
                fresh: Default::default(),
                prefaulted: Default::default(),
                punching: Vec::new(),
                queued_punches: Vec::new(),
            }),
            poisoned: Cell::new(false),
            writable: Cell::new(writable),
            meta_durable_bytes: Cell::new(0),
            syncs: super::durability::SyncOrder::default(),
            shard_lock,
        })
    }

    /// The shard index.
    pub fn shard(&self) -> u16 {
        self.shard
    }

    /// The manager this allocator maps through.
    pub fn mappings(&self) -> &Rc<MappingManager> {
        &self.mm
    }

    /// The manifest of the data directory.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub(super) fn meta_path(&self) -> PathBuf {
        self.dir.join("meta.seg")
    }

    pub(super) fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            what: self.meta_path().display().to_string(),
            detail: detail.into(),
        }
    }

    async fn superblock_is_blank(&self, size: u64) -> Result<bool> {
        if size < format::MANIFEST_BYTES as u64 {
            return Ok(true);
        }
        // Its first page only: recovery maps what the scan needs.
        self.meta
            .map_existing(size.min(format::META_PAGE_BYTES))
            .await?;
        let mut b = [0u8; format::MANIFEST_BYTES];
        self.meta.read(0, &mut b);
        Ok(b.iter().all(|&x| x == 0))
    }

    /// Reserve again (`fallocate` mode 0) the blocks of every published
    /// segment below its file's reserved size: a reservation that did not
    /// survive a power loss (the header that relies on it did) would leave a
    /// hole under live slots, and a write there `SIGBUS` on a full disk.
    /// Over blocks still allocated this allocates nothing. A run that
    /// cannot be reserved (file cannot be opened, disk full) is logged.
    async fn reserve_published_runs(&self) -> Result<()> {
        let mut runs: Vec<Run> = {
            let st = self.st.borrow();
            st.segments.iter().flatten().map(|s| s.run).collect()
        };
        runs.sort_unstable();
        let mut merged: Vec<Run> = Vec::with_capacity(runs.len());
        for r in runs {
            match merged.last_mut() {
                Some(m) if m.file == r.file && m.block + m.blocks == r.block => {
                    m.blocks += r.blocks
                }
                _ => merged.push(r),
            }
        }
        for run in merged {
            // Best effort: a file that cannot be opened fails every access
            // to it anyway, and a full disk fails only writes into holes.
            if let Err(error) = self.reserve_trimmed(run, Trim::Unknown).await {
                tracing::warn!(
                    shard = self.shard,
                    file = %self.dir.join(data_file_name(run.file)).display(),
                    first_block = run.block,
                    blocks = run.blocks,
                    %error,
                    "cannot reserve the blocks of published segments again"
                );
            }
        }
        Ok(())
    }

    async fn create_meta(&self) -> Result<()> {
        let first = format::entry_offset(0) + format::META_PAGE_BYTES;
        self.meta.ensure(first).await?;
        self.meta
            .word(format::HWM_OFFSET)
            .store(format::encode_counter(0), Ordering::Relaxed);
        // No sync has completed: no segment's growth is known durable.
        self.meta
            .word(format::DURABLE_GEN_OFFSET)
            .store(format::encode_counter(1), Ordering::Relaxed);
        self.meta.write(0, &self.manifest.encode(self.shard));
        let reserved = self.files.reserved_bytes(self.meta_file)?;
        self.files.sync(self.meta_file, true).await?;
        self.meta_durable_bytes.set(reserved);
        Ok(())
    }
}
