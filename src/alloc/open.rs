//! Opening an allocator: create a fresh metadata file, or recover an
//! existing one.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::Instrument;

use super::classes::{BLOCK_BYTES, CLASS_COUNT};
use super::meta_map::MetaMap;
use super::space::Space;
use super::{AllocStats, SegmentAllocator, State, data_file_name};
use crate::error::{Error, Result};
use crate::mapping::MappingManager;
use crate::meta::{self, Manifest};

impl SegmentAllocator {
    /// Open (recover) or create the allocator of shard `shard` in folder
    /// `dir`, over `mm` (whose registry opens the files).
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] when the metadata fails validation (bad checksum,
    /// truncated, overlapping segments that cannot be resolved, a data file
    /// missing); [`Error::Mismatch`] when it belongs to another shard or
    /// directory; io errors.
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
        if mm.max_extents() < 2 {
            return Err(Error::InvalidConfig(
                "a shard needs at least 2 windows (max_extents per shard >= 2)".into(),
            ));
        }
        let files = mm.files().clone();
        let meta_path = dir.join("meta.seg");
        let a = Self::unopened(shard, dir, manifest, mm)?;
        let meta = a.meta_file;
        let lease = files.acquire(meta, 0).await?;
        drop(lease);
        let size = files.len_bytes(meta)?.unwrap_or(0);
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
        }
        a.st.borrow_mut().stats.recovery_us = started.elapsed().as_micros() as u64;
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
        let meta_file = files.register(dir.join("meta.seg"));
        let window_blocks = (manifest.window_bytes / BLOCK_BYTES) as u32;
        let file_blocks = (manifest.max_file_bytes / BLOCK_BYTES) as u32;
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
                avail: vec![Vec::new(); CLASS_COUNT],
                space: Space::new(window_blocks, file_blocks),
                free_entries: Vec::new(),
                quarantine: Vec::new(),
                directory_len: 0,
                next_generation: 1,
                roots: HashMap::new(),
                root_seq: 0,
                live_per_class: [0; CLASS_COUNT],
                stats: AllocStats::default(),
                new_files_since_sync: false,
            }),
            poisoned: Cell::new(false),
            meta_durable_bytes: Cell::new(0),
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
        if size < meta::MANIFEST_BYTES as u64 {
            return Ok(true);
        }
        self.meta.map_existing(size).await?;
        let mut b = [0u8; meta::MANIFEST_BYTES];
        self.meta.read(0, &mut b);
        Ok(b.iter().all(|&x| x == 0))
    }

    async fn create_meta(&self) -> Result<()> {
        let first = meta::entry_offset(0) + meta::META_PAGE_BYTES;
        self.meta.ensure(first).await?;
        self.meta
            .word(meta::HWM_OFFSET)
            .store(meta::encode_hwm(0), Ordering::Relaxed);
        self.meta.write(0, &self.manifest.encode(self.shard));
        let reserved = self.files.reserved_bytes(self.meta_file)?;
        self.files.sync(self.meta_file, true).await?;
        self.meta_durable_bytes.set(reserved);
        Ok(())
    }
}
