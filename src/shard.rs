//! `Shard`: one FileHandleRegistry, one MappingManager, one SegmentAllocator
//! and one control ring, on one thread.
//!
//! **Architecture invariant:** a shard is `!Send` and single-threaded. Its
//! allocate / pin / free hot path takes no lock and makes no atomic
//! read-modify-write; everything that may block goes through its ring.

use std::rc::Rc;
use std::sync::Arc;

use crate::alloc::{AllocStats, Allocation, LiveIter, SegmentAllocator};
use crate::config::Config;
use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileStats};
use crate::handle::Handle;
use crate::io::{IoBackend, Ring, RingStats};
use crate::mapping::{MappingConfig, MappingManager, MappingStats, Pin};

/// Everything a shard can tell about itself.
#[derive(Clone, Debug)]
pub struct ShardStats {
    /// Shard index.
    pub shard: u16,
    /// io backend of the control ring.
    pub io_backend: IoBackend,
    /// Control ring counters.
    pub ring: RingStats,
    /// Descriptor registry counters.
    pub files: FileStats,
    /// Mapping counters.
    pub mappings: MappingStats,
    /// Allocator counters.
    pub alloc: AllocStats,
}

struct ShardInner {
    index: u16,
    dir: Arc<DataDir>,
    ring: Ring,
    files: Rc<FileHandleRegistry>,
    mm: Rc<MappingManager>,
    alloc: SegmentAllocator,
}

/// One shard of a data directory. Cheap to clone within its thread.
///
/// ```no_run
/// # async fn demo() -> segalloc::Result<()> {
/// use std::sync::Arc;
/// use segalloc::{Config, DataDir, Shard};
/// let cfg = Config::builder("/tmp/segalloc-shard-doc").shards(1).build()?;
/// let dir = Arc::new(DataDir::open(&cfg)?);
/// let shard = Shard::open(dir, &cfg, 0).await?;
/// let a = shard.allocate(100).await?;
/// a.write_at(0, b"record")?;
/// let h = a.into_handle();
/// shard.set_root("first", h)?;
/// let pin = shard.pin(h).await?;
/// let mut buf = [0u8; 6];
/// pin.read_at(0, &mut buf)?;
/// drop(pin);
/// shard.free(h)?;
/// shard.sync().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Shard {
    inner: Rc<ShardInner>,
}

impl Shard {
    /// Open shard `index` of `dir`: its ring, registry, manager, and the
    /// recovered allocator. Call it on the thread that will run the shard,
    /// inside a tokio current-thread runtime (or tokio-uring).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an index out of range; recovery errors
    /// ([`Error::Corrupt`], [`Error::Mismatch`]); io errors.
    pub async fn open(dir: Arc<DataDir>, cfg: &Config, index: u16) -> Result<Shard> {
        if index >= dir.manifest().shard_count {
            return Err(Error::InvalidConfig(format!(
                "shard {index} out of range (the directory has {} shards)",
                dir.manifest().shard_count
            )));
        }
        let ring = Ring::new(cfg.io_backend())?;
        let files = Rc::new(if dir.is_read_only() || cfg.read_only() {
            FileHandleRegistry::new_read_only(ring.clone(), cfg.max_open_files_per_shard())
        } else {
            FileHandleRegistry::new(ring.clone(), cfg.max_open_files_per_shard())
        });
        let mut mcfg = MappingConfig::from_config(cfg);
        mcfg.window_bytes = dir.manifest().window_bytes;
        let mm = Rc::new(MappingManager::new(files.clone(), mcfg));
        let alloc = SegmentAllocator::open(index, &dir.shard_dir(index), *dir.manifest(), mm.clone()).await?;
        Ok(Shard {
            inner: Rc::new(ShardInner {
                index,
                dir,
                ring,
                files,
                mm,
                alloc,
            }),
        })
    }

    /// This shard's index.
    pub fn index(&self) -> u16 {
        self.inner.index
    }
    /// The data directory.
    pub fn data_dir(&self) -> &Arc<DataDir> {
        &self.inner.dir
    }
    /// The allocator.
    pub fn allocator(&self) -> &SegmentAllocator {
        &self.inner.alloc
    }
    /// The mapping manager.
    pub fn mappings(&self) -> &Rc<MappingManager> {
        &self.inner.mm
    }
    /// The descriptor registry.
    pub fn files(&self) -> &Rc<FileHandleRegistry> {
        &self.inner.files
    }
    /// The control ring.
    pub fn ring(&self) -> &Ring {
        &self.inner.ring
    }

    /// Allocate `size` bytes (1..=16 MiB) on this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::allocate`].
    pub async fn allocate(&self, size: u64) -> Result<Allocation> {
        self.inner.alloc.allocate(size).await
    }

    /// Allocate without awaiting (`Ok(None)`: use [`allocate`](Self::allocate)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_allocate`].
    pub fn try_allocate(&self, size: u64) -> Result<Option<Allocation>> {
        self.inner.alloc.try_allocate(size)
    }

    /// Pin a live allocation of this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::pin`].
    pub async fn pin(&self, handle: Handle) -> Result<Pin> {
        self.inner.alloc.pin(handle).await
    }

    /// Pin without awaiting (`Ok(None)`: use [`pin`](Self::pin)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_pin`].
    pub fn try_pin(&self, handle: Handle) -> Result<Option<Pin>> {
        self.inner.alloc.try_pin(handle)
    }

    /// Free an allocation of this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::free`].
    pub fn free(&self, handle: Handle) -> Result<()> {
        self.inner.alloc.free(handle)
    }

    /// Make everything acknowledged so far durable against power loss.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::sync`].
    pub async fn sync(&self) -> Result<()> {
        self.inner.alloc.sync().await
    }

    /// The live allocations of this shard.
    pub fn live(&self) -> LiveIter<'_> {
        self.inner.alloc.live()
    }

    /// Number of live allocations.
    pub fn live_count(&self) -> u64 {
        self.inner.alloc.live_count()
    }

    /// Name a handle as a root of this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::set_root`].
    pub fn set_root(&self, name: &str, handle: Handle) -> Result<()> {
        self.inner.alloc.set_root(name, handle)
    }

    /// The handle named `name` on this shard.
    pub fn root(&self, name: &str) -> Option<Handle> {
        self.inner.alloc.root(name)
    }

    /// Forget a root of this shard.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::remove_root`].
    pub fn remove_root(&self, name: &str) -> Result<Option<Handle>> {
        self.inner.alloc.remove_root(name)
    }

    /// All roots of this shard.
    pub fn roots(&self) -> Vec<(String, Handle)> {
        self.inner.alloc.roots()
    }

    /// Counters and gauges.
    pub fn stats(&self) -> ShardStats {
        ShardStats {
            shard: self.inner.index,
            io_backend: self.inner.ring.backend(),
            ring: self.inner.ring.stats(),
            files: self.inner.files.stats(),
            mappings: self.inner.mm.stats(),
            alloc: self.inner.alloc.stats(),
        }
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("index", &self.inner.index).finish()
    }
}
