//! `Shard`: one FileHandleRegistry, one MappingManager, one SegmentAllocator
//! and one control ring, on one thread.
//!
//! **Architecture invariant:** a shard is `!Send` and single-threaded. Its
//! allocate / pin / free hot path takes no lock and makes no atomic
//! read-modify-write; everything that may block goes through its ring.

use std::cell::{OnceCell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use crate::alloc::{AllocStats, Allocation, LiveIter, SegmentAllocator};
use crate::config::Config;
use crate::datadir::DataDir;
use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileId, FileStats};
use crate::format::Handle;
use crate::io::{IoBackend, Ring, RingStats};
use crate::mapping::{MappingConfig, MappingManager, MappingStats, Pin};
use crate::mesh::{Endpoint, MeshLocal, MeshStats};

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
    /// Cross-shard free counters.
    pub mesh: MeshStats,
}

pub(crate) struct ShardInner {
    index: u16,
    dir: Arc<DataDir>,
    ring: Ring,
    files: Rc<FileHandleRegistry>,
    mm: Rc<MappingManager>,
    pub(crate) alloc: SegmentAllocator,
    mesh: OnceCell<Rc<MeshLocal>>,
    /// Local file ids of other shards' data files, for cross-shard pins.
    foreign: RefCell<HashMap<(u16, u32), FileId>>,
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
    /// [`Error::ShardAlreadyOpen`] when the shard is already open for writing
    /// (each writable open holds the shard's lock until it is dropped);
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
        let alloc =
            SegmentAllocator::open(index, &dir.shard_dir(index), *dir.manifest(), mm.clone())
                .await?;
        Ok(Shard {
            inner: Rc::new(ShardInner {
                index,
                dir,
                ring,
                files,
                mm,
                alloc,
                mesh: OnceCell::new(),
                foreign: RefCell::new(HashMap::new()),
            }),
        })
    }

    /// Join the channel mesh: start the task that applies frees forwarded by
    /// other shards. Must run inside a `LocalSet` (or tokio-uring).
    pub(crate) fn connect(&self, ep: Endpoint) {
        debug_assert_eq!(ep.index, self.inner.index);
        let mesh = Rc::new(MeshLocal::new(ep));
        let _ = self.inner.mesh.set(mesh.clone());
        tokio::task::spawn_local(MeshLocal::run_drain(
            Rc::downgrade(&mesh),
            Rc::downgrade(&self.inner),
        ));
    }

    /// Send every buffered cross-shard free to its owner now (they are
    /// otherwise sent when a batch fills or after a few executor turns).
    pub fn flush_frees(&self) {
        if let Some(m) = self.inner.mesh.get() {
            m.flush();
        }
    }

    /// Apply every forwarded free that has arrived (the drain task does this
    /// on its own; `Runtime::sync` calls it before syncing).
    pub fn drain_frees(&self) {
        if let Some(m) = self.inner.mesh.get() {
            m.drain_now(&self.inner);
        }
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
    #[inline]
    pub fn try_allocate(&self, size: u64) -> Result<Option<Allocation>> {
        self.inner.alloc.try_allocate(size)
    }

    /// Pin a live allocation: of this shard (checked against its bitmap), or,
    /// inside a runtime, of another shard: then the owner's data file is
    /// mapped through this shard's MappingManager (`MAP_SHARED`, coherent
    /// with the owner's view). A foreign handle is checked for integrity and
    /// bounds but not for liveness, which only its owner knows: pin it on the
    /// owner (`Runtime::spawn_on`) when that matters.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::pin`]; [`Error::WrongShard`] for a foreign
    /// handle outside a runtime or naming a shard that does not exist.
    pub async fn pin(&self, handle: Handle) -> Result<Pin> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.pin(handle).await;
        }
        let fid = self.foreign_file(&handle)?;
        let len = handle.len() as u64;
        if let Some(p) = self.inner.mm.try_pin(fid, handle.offset(), len, true)? {
            return Ok(p);
        }
        self.inner.mm.pin(fid, handle.offset(), len, true).await
    }

    fn foreign_file(&self, h: &Handle) -> Result<FileId> {
        self.check_foreign(h)?;
        let key = (h.shard(), h.file_id());
        if let Some(&id) = self.inner.foreign.borrow().get(&key) {
            return Ok(id);
        }
        let path = self
            .inner
            .dir
            .shard_dir(h.shard())
            .join(crate::format::data_file_name(h.file_id()));
        let id = self.inner.files.register_foreign(path)?;
        self.inner.foreign.borrow_mut().insert(key, id);
        Ok(id)
    }

    /// What this shard can check of another shard's handle.
    #[inline]
    fn check_foreign(&self, h: &Handle) -> Result<()> {
        let m = self.inner.dir.manifest();
        if h.dir_tag() != m.dir_tag() {
            return Err(Error::ForeignHandle {
                handle: h.to_string(),
                handle_tag: h.dir_tag(),
                dir_tag: m.dir_tag(),
            });
        }
        if self.inner.mesh.get().is_none() || h.shard() >= m.shard_count {
            return Err(Error::WrongShard {
                handle: h.to_string(),
                owner: h.shard(),
                this: self.inner.index,
            });
        }
        if h.offset() + h.len() as u64 > m.max_file_bytes {
            return Err(Error::NotAllocated {
                handle: h.to_string(),
                reason: "offset out of bounds",
            });
        }
        Ok(())
    }

    /// Pin without awaiting (`Ok(None)`: use [`pin`](Self::pin)).
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::try_pin`].
    #[inline]
    pub fn try_pin(&self, handle: Handle) -> Result<Option<Pin>> {
        self.inner.alloc.try_pin(handle)
    }

    /// Free an allocation. A handle of this shard is freed at once (durable
    /// against a process crash when this returns). Inside a runtime, a
    /// handle of another shard is forwarded to its owner in a batch: it is
    /// applied (and durable) once the owner has drained it, which
    /// `Runtime::sync` waits for; a forwarded free that the owner rejects
    /// (double free, stale handle) is counted in the owner's
    /// `mesh.cross_frees_rejected` and logged through `tracing`.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::free`]; for a foreign handle only what can be
    /// checked here ([`Error::ForeignHandle`], [`Error::WrongShard`] outside a
    /// runtime, [`Error::ShardGone`]).
    #[inline]
    pub fn free(&self, handle: Handle) -> Result<()> {
        if handle.shard() == self.inner.index {
            return self.inner.alloc.free(handle);
        }
        self.check_foreign(&handle)?;
        let mesh = self.inner.mesh.get().expect("checked by foreign_file");
        if mesh.forward(handle) {
            Ok(())
        } else {
            Err(Error::ShardGone {
                shard: handle.shard(),
            })
        }
    }

    /// Make everything acknowledged so far durable against power loss.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::sync`].
    pub async fn sync(&self) -> Result<()> {
        self.inner.alloc.sync().await
    }

    /// Give the blocks of this shard's free space back to the file system
    /// (punch holes into free runs); returns the bytes punched.
    ///
    /// # Errors
    ///
    /// See [`SegmentAllocator::trim`].
    pub async fn trim(&self) -> Result<u64> {
        self.inner.alloc.trim().await
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
            mesh: self
                .inner
                .mesh
                .get()
                .map(|m| m.stats.get())
                .unwrap_or_default(),
        }
    }
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("index", &self.inner.index)
            .finish()
    }
}
