//! `SegmentAllocator`: size classes, segments carved from windows, slot
//! bitmaps kept in a `MAP_SHARED` metadata file, recovery.
//!
//! **Architecture invariants:**
//! * A slot's bit is set in the metadata mapping before `allocate` returns
//!   and cleared before `free` returns. A `MAP_SHARED` page survives a
//!   process crash, so both are durable against `kill -9` at once; `sync`
//!   makes them durable against power loss.
//! * A segment is published by one aligned store of its state word, after
//!   its other header fields; it is unpublished by one store of zero.
//! * A directory entry released since the last `sync` is not reused before
//!   the next one (so a power loss can never pair a new header with an old
//!   bitmap); after a restart, every free entry waits for the first sync.
//!   Runs of blocks are reused at once: recovery resolves an overlap in
//!   favour of the higher generation, which is always the later segment.
//! * A segment never crosses a window (`space.rs`). The hot path (a slot in a
//!   segment whose window is mapped) makes no syscall and takes no lock.
//! * The allocator never touches another shard's segments.

pub mod classes;
pub(crate) mod space;
mod trim;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use futures::future::join_all;
use tracing::Instrument;

use crate::datadir::ShardLock;
use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileId};
use crate::handle::Handle;
use crate::mapping::{MappingManager, Pin};
use crate::meta::{self, EntryHeader, Manifest, RootSlot};
use classes::{BLOCK_BYTES, CLASS_COUNT, CLASSES};
use space::{Run, Space};

/// The metadata file grows this much at a time.
const META_GROWTH_BYTES: u64 = 1024 * 1024;

/// An allocation: its durable [`Handle`] and a writable [`Pin`] on exactly
/// its slot (the seed's `Allocation`).
#[derive(Debug)]
pub struct Allocation {
    handle: Handle,
    pin: Pin,
}

impl Allocation {
    /// The durable handle.
    pub fn handle(&self) -> Handle {
        self.handle
    }
    /// The pin on the slot.
    pub fn pin(&self) -> &Pin {
        &self.pin
    }
    /// Drop the pin, keep the handle (pin it again with `pin(handle)`).
    pub fn into_handle(self) -> Handle {
        self.handle
    }
    /// Split into handle and pin.
    pub fn into_parts(self) -> (Handle, Pin) {
        (self.handle, self.pin)
    }
    /// Usable length (the slot size).
    pub fn len(&self) -> usize {
        self.pin.len()
    }
    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }
    /// The slot's memory (the seed's `ptr()`).
    pub fn ptr(&self) -> *mut u8 {
        self.pin.as_mut_ptr()
    }
    /// Copy `data` into the slot at `offset`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when out of bounds.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.pin.write_at(offset, data)
    }
    /// Copy from the slot at `offset` into `buf`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidRange`] when out of bounds.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.pin.read_at(offset, buf)
    }
}

/// Counters and gauges of an allocator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Live allocations.
    pub allocations_live: u64,
    /// Bytes of live slots.
    pub bytes_live: u64,
    /// Bytes of segments in use (allocated to a class).
    pub bytes_allocated: u64,
    /// Bytes reserved on disk for data (blocks allocated in data files).
    pub bytes_reserved: u64,
    /// Bytes of the metadata file.
    pub metadata_bytes: u64,
    /// Segments in use.
    pub segments: u64,
    /// Data files.
    pub data_files: u64,
    /// Directory entries waiting for the next sync before reuse.
    pub quarantined_entries: u64,
    /// `allocate` calls that succeeded.
    pub allocs: u64,
    /// `free` calls that succeeded.
    pub frees: u64,
    /// Successful syncs.
    pub syncs: u64,
    /// Live allocations per class, `(slot_bytes, count)`, non-zero only.
    pub live_per_class: Vec<(u32, u64)>,
    /// Microseconds the last recovery took.
    pub recovery_us: u64,
    /// When the last successful sync finished, in milliseconds since the
    /// Unix epoch (0: never since open).
    pub last_sync_unix_ms: u64,
}

struct Seg {
    class_id: u8,
    generation: u32,
    run: Run,
    slots: u32,
    live: u32,
    bitmap: *mut u64,
    hint: u32,
    in_avail: bool,
}

impl Seg {
    #[inline]
    fn word(&self, w: u32) -> &AtomicU64 {
        debug_assert!((w as usize) < meta::BITMAP_WORDS);
        // SAFETY: the bitmap lies in a metadata window that the allocator
        // keeps pinned (mapped) for its whole life, inside the reserved part
        // of the file; `w < 64` words; AtomicU64 has u64's layout and the
        // entry is 8-byte aligned (entry offsets are multiples of 64 within
        // the page, and +64 for the bitmap).
        unsafe { AtomicU64::from_ptr(self.bitmap.add(w as usize)) }
    }

    fn start(&self) -> u64 {
        self.run.block as u64 * BLOCK_BYTES
    }
}

struct State {
    segments: Vec<Option<Seg>>,
    avail: Vec<Vec<u32>>,
    space: Space,
    free_entries: Vec<u32>,
    quarantine: Vec<u32>,
    entry_hwm: u32,
    next_generation: u32,
    roots: HashMap<String, (usize, u64, Handle)>,
    root_seq: u64,
    live_per_class: [u64; CLASS_COUNT],
    stats: AllocStats,
    new_files_since_sync: bool,
}

/// The seed's `SegmentAllocator` for one shard.
///
/// Built by [`Shard`](crate::Shard); usable directly with a registry and a
/// manager of your own through [`SegmentAllocator::open`].
///
/// ```no_run
/// # async fn demo() -> segalloc::Result<()> {
/// use std::rc::Rc;
/// use segalloc::{Config, DataDir, FileHandleRegistry, MappingConfig, MappingManager, Ring, SegmentAllocator};
/// let cfg = Config::builder("/tmp/segalloc-alloc-doc").shards(1).build()?;
/// let dir = DataDir::open(&cfg)?;
/// let files = Rc::new(FileHandleRegistry::new(Ring::new(cfg.io_backend())?, 64));
/// let mm = Rc::new(MappingManager::new(files, MappingConfig::from_config(&cfg)));
/// let alloc = SegmentAllocator::open(0, &dir.shard_dir(0), *dir.manifest(), mm).await?;
/// let a = alloc.allocate(300).await?; // a 320-byte slot
/// a.write_at(0, b"payload")?;
/// let h = a.into_handle();
/// alloc.free(h)?;
/// alloc.sync().await?;
/// # Ok(()) }
/// ```
pub struct SegmentAllocator {
    shard: u16,
    manifest: Manifest,
    dir: PathBuf,
    mm: Rc<MappingManager>,
    files: Rc<FileHandleRegistry>,
    meta: FileId,
    meta_pins: RefCell<Vec<Pin>>,
    data_files: RefCell<Vec<FileId>>,
    st: RefCell<State>,
    poisoned: Cell<bool>,
    /// Bytes of the metadata file known to be durable (its size as of the
    /// last `fdatasync`). The high-water mark never covers an entry past it.
    meta_durable_bytes: Cell<u64>,
    /// Held for as long as a writable allocator is open (`None` read-only).
    _shard_lock: Option<ShardLock>,
}

/// Undoes a slot allocation if the `allocate` future is dropped or fails
/// before handing the slot out.
struct SlotGuard<'a> {
    alloc: &'a SegmentAllocator,
    handle: Handle,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.alloc.release_slot(self.handle);
        }
    }
}

/// File name of data file `n` in a shard folder.
pub(crate) fn data_file_name(n: u32) -> String {
    format!("data-{n:06}.seg")
}

impl SegmentAllocator {
    /// Open (recover) or create the allocator of shard `shard` in folder
    /// `dir`, over `mm` (whose registry opens the files). Unless the registry
    /// is read-only, the shard's [`ShardLock`] is held until the allocator is
    /// dropped.
    ///
    /// # Errors
    ///
    /// [`Error::ShardAlreadyOpen`] when another writable open of the shard
    /// (in this or another process) holds its lock;
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
        let shard_lock = match files.is_read_only() {
            true => None,
            false => Some(ShardLock::acquire(shard, dir)?),
        };
        let meta_path = dir.join("meta.seg");
        let meta = files.register(&meta_path);
        let window_blocks = (manifest.window_bytes / BLOCK_BYTES) as u32;
        let file_blocks = (manifest.max_file_bytes / BLOCK_BYTES) as u32;
        let a = SegmentAllocator {
            shard,
            manifest,
            dir: dir.to_path_buf(),
            mm: mm.clone(),
            files: files.clone(),
            meta,
            meta_pins: RefCell::new(Vec::new()),
            data_files: RefCell::new(Vec::new()),
            st: RefCell::new(State {
                segments: Vec::new(),
                avail: vec![Vec::new(); CLASS_COUNT],
                space: Space::new(window_blocks, file_blocks),
                free_entries: Vec::new(),
                quarantine: Vec::new(),
                entry_hwm: 0,
                next_generation: 1,
                roots: HashMap::new(),
                root_seq: 0,
                live_per_class: [0; CLASS_COUNT],
                stats: AllocStats::default(),
                new_files_since_sync: false,
            }),
            poisoned: Cell::new(false),
            meta_durable_bytes: Cell::new(0),
            _shard_lock: shard_lock,
        };
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

    fn meta_path(&self) -> PathBuf {
        self.dir.join("meta.seg")
    }

    fn corrupt(&self, detail: impl Into<String>) -> Error {
        Error::Corrupt {
            what: self.meta_path().display().to_string(),
            detail: detail.into(),
        }
    }

    async fn superblock_is_blank(&self, size: u64) -> Result<bool> {
        if size < meta::MANIFEST_BYTES as u64 {
            return Ok(true);
        }
        self.pin_meta_window(0).await?;
        let mut b = [0u8; meta::MANIFEST_BYTES];
        self.meta_read(0, &mut b);
        Ok(b.iter().all(|&x| x == 0))
    }

    /// Pin meta window `idx` for the allocator's life (idempotent).
    async fn pin_meta_window(&self, idx: usize) -> Result<()> {
        while self.meta_pins.borrow().len() <= idx {
            let i = self.meta_pins.borrow().len();
            let w = self.manifest.window_bytes;
            let writable = !self.files.is_read_only();
            if writable {
                // Grow in small steps, not the data files' growth step.
                self.mm
                    .reserve(
                        self.meta,
                        i as u64 * w + meta::META_PAGE_BYTES,
                        META_GROWTH_BYTES,
                    )
                    .await?;
            }
            let pin = self.mm.pin(self.meta, i as u64 * w, 64, writable).await?;
            self.meta_pins.borrow_mut().push(pin);
        }
        Ok(())
    }

    #[inline]
    fn meta_ptr(&self, off: u64) -> *mut u8 {
        let w = self.manifest.window_bytes;
        let pins = self.meta_pins.borrow();
        let base = pins[(off / w) as usize].window_base();
        // SAFETY: `off % w < w`: inside the pinned window's mapping.
        unsafe { base.add((off % w) as usize) }
    }

    fn meta_read(&self, off: u64, buf: &mut [u8]) {
        let p = self.meta_ptr(off);
        // SAFETY: callers read only below the metadata file's reserved size,
        // inside one pinned window; `buf` is a separate Rust allocation.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
    }

    fn meta_write(&self, off: u64, data: &[u8]) {
        debug_assert!(!self.files.is_read_only());
        let p = self.meta_ptr(off);
        // SAFETY: callers write only below the metadata file's reserved
        // size, inside one pinned, writable window; `data` is not part of it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    fn meta_word(&self, off: u64) -> &AtomicU64 {
        debug_assert_eq!(off % 8, 0);
        let p = self.meta_ptr(off);
        // SAFETY: 8-byte aligned (offsets are multiples of 8 and windows are
        // page aligned), inside a window pinned for the allocator's life,
        // below the reserved size.
        unsafe { AtomicU64::from_ptr(p.cast()) }
    }

    /// Reserve the metadata file up to `end` and pin its windows.
    async fn ensure_meta(&self, end: u64) -> Result<()> {
        self.mm.reserve(self.meta, end, META_GROWTH_BYTES).await?;
        let w = self.manifest.window_bytes;
        self.pin_meta_window(((end - 1) / w) as usize).await
    }

    async fn create_meta(&self) -> Result<()> {
        let first = meta::entry_offset(0) + meta::META_PAGE_BYTES;
        self.ensure_meta(first).await?;
        self.meta_word(meta::HWM_OFFSET)
            .store(meta::encode_hwm(0), Ordering::Relaxed);
        self.meta_write(0, &self.manifest.encode(self.shard));
        let reserved = self.files.reserved_bytes(self.meta)?;
        self.files.sync(self.meta, true).await?;
        self.meta_durable_bytes.set(reserved);
        Ok(())
    }

    async fn recover(&self, size: u64) -> Result<()> {
        self.pin_meta_window(0).await?;
        let mut sb = [0u8; meta::MANIFEST_BYTES];
        self.meta_read(0, &mut sb);
        let (m, shard) =
            Manifest::decode(&sb, &format!("{} superblock", self.meta_path().display()))?;
        if m.dir_id != self.manifest.dir_id {
            return Err(self.corrupt("superblock belongs to another data directory"));
        }
        if shard != self.shard {
            return Err(Error::Mismatch {
                what: "shard index in meta.seg",
                on_disk: shard as u64,
                requested: self.shard as u64,
            });
        }
        if m != self.manifest {
            return Err(self.corrupt("superblock disagrees with the manifest"));
        }
        let hwm_word = self.meta_word(meta::HWM_OFFSET).load(Ordering::Relaxed);
        let hwm = meta::decode_hwm(hwm_word)
            .ok_or_else(|| self.corrupt("directory high-water mark is torn"))?;
        let need = if hwm == 0 {
            meta::DIR_OFFSET
        } else {
            meta::entry_offset(hwm - 1) + meta::ENTRY_BYTES
        };
        if size < need {
            return Err(self.corrupt(format!(
                "metadata truncated: {size} bytes, the directory needs {need}"
            )));
        }
        let w = self.manifest.window_bytes;
        self.pin_meta_window(((size.max(1) - 1) / w) as usize)
            .await?;

        // 1. Headers.
        let window_blocks = (w / BLOCK_BYTES) as u32;
        let file_blocks = (self.manifest.max_file_bytes / BLOCK_BYTES) as u32;
        let mut found: Vec<(u32, EntryHeader)> = Vec::new();
        let mut free_entries = Vec::new();
        let mut max_gen = 0u32;
        for i in 0..hwm {
            let mut h = [0u8; meta::ENTRY_HEADER_BYTES as usize];
            self.meta_read(meta::entry_offset(i), &mut h);
            match EntryHeader::decode(&h) {
                Err(why) => return Err(self.corrupt(format!("directory entry {i}: {why}"))),
                Ok(None) => free_entries.push(i),
                Ok(Some(e)) => {
                    if e.blocks == 0
                        || e.block as u64 + e.blocks as u64 > file_blocks as u64
                        || e.block / window_blocks != (e.block + e.blocks - 1) / window_blocks
                    {
                        return Err(
                            self.corrupt(format!("directory entry {i}: segment out of bounds"))
                        );
                    }
                    max_gen = max_gen.max(e.generation);
                    found.push((i, e));
                }
            }
        }

        // 2. Overlaps: the higher generation is the later segment.
        found.sort_by_key(|(_, e)| (e.file, e.block));
        let mut keep: Vec<(u32, EntryHeader)> = Vec::with_capacity(found.len());
        for (i, e) in found {
            if let Some((pi, pe)) = keep.last().copied()
                && pe.file == e.file
                && pe.block + pe.blocks > e.block
            {
                let (loser, winner) = if pe.generation < e.generation {
                    (pi, i)
                } else {
                    (i, pi)
                };
                tracing::warn!(
                    shard = self.shard,
                    loser,
                    winner,
                    "overlapping segments after a crash; keeping the later one"
                );
                if !self.files.is_read_only() {
                    self.meta_word(meta::entry_offset(loser))
                        .store(0, Ordering::Release);
                }
                free_entries.push(loser);
                if loser == pi {
                    keep.pop();
                    keep.push((i, e));
                }
                continue;
            }
            keep.push((i, e));
        }

        // 3. Data files: every referenced one must exist (checked before
        // counting, so a damaged file number is an error, not an overflow or
        // a walk over billions of names).
        let mut referenced: Vec<u32> = keep.iter().map(|(_, e)| e.file).collect();
        referenced.sort_unstable();
        referenced.dedup();
        for &n in &referenced {
            let p = self.dir.join(data_file_name(n));
            if !p.exists() {
                return Err(Error::Corrupt {
                    what: p.display().to_string(),
                    detail: "data file referenced by the directory is missing".into(),
                });
            }
        }
        let mut file_count = match referenced.last() {
            Some(&n) => n
                .checked_add(1)
                .ok_or_else(|| self.corrupt("data file number out of range"))?,
            None => 0,
        };
        while self.dir.join(data_file_name(file_count)).exists() {
            file_count += 1;
        }
        for n in 0..file_count {
            let id = self.files.register(self.dir.join(data_file_name(n)));
            self.data_files.borrow_mut().push(id);
        }

        // 4. Bitmaps.
        let mut st = self.st.borrow_mut();
        st.segments.resize_with(hwm as usize, || None);
        let mut runs = Vec::with_capacity(keep.len());
        for (i, e) in keep {
            let bitmap = self
                .meta_ptr(meta::entry_offset(i) + meta::ENTRY_HEADER_BYTES)
                .cast::<u64>();
            let mut seg = Seg {
                class_id: e.class_id,
                generation: e.generation,
                run: Run {
                    file: e.file,
                    block: e.block,
                    blocks: e.blocks,
                },
                slots: e.slots,
                live: 0,
                bitmap,
                hint: 0,
                in_avail: false,
            };
            let mut live = 0u32;
            for wi in 0..meta::BITMAP_WORDS as u32 {
                let word = seg.word(wi).load(Ordering::Relaxed);
                let valid_bits = seg.slots.saturating_sub(wi * 64).min(64);
                let mask = if valid_bits == 64 {
                    u64::MAX
                } else {
                    (1u64 << valid_bits) - 1
                };
                if word & !mask != 0 {
                    return Err(self.corrupt(format!(
                        "directory entry {i}: bitmap marks slots past the segment"
                    )));
                }
                live += word.count_ones();
            }
            seg.live = live;
            st.live_per_class[e.class_id as usize] += live as u64;
            st.stats.allocations_live += live as u64;
            st.stats.bytes_live += live as u64 * CLASSES[e.class_id as usize].slot_bytes as u64;
            if live < seg.slots {
                seg.in_avail = true;
                st.avail[e.class_id as usize].push(i);
            }
            runs.push(seg.run);
            st.segments[i as usize] = Some(seg);
        }
        st.space.rebuild(runs, file_count);
        st.entry_hwm = hwm;
        free_entries.sort_unstable_by(|a, b| b.cmp(a));
        // Which free entries were released since the last sync (their zeroed
        // state word and bitmap may not be durable) cannot be told after a
        // restart: quarantine them all until the first sync, so a torn write
        // can never pair a new header with an old bitmap.
        st.quarantine = free_entries;
        // Never below the persisted counter: a generation released before
        // the restart must not be issued again (a torn or absent word only
        // falls back to the highest kept generation + 1).
        let persisted =
            meta::decode_hwm(self.meta_word(meta::GEN_OFFSET).load(Ordering::Relaxed)).unwrap_or(0);
        st.next_generation = max_gen.wrapping_add(1).max(persisted).max(1);
        drop(st);

        // 5. Roots.
        let mut best: HashMap<String, (usize, u64, Handle)> = HashMap::new();
        let mut losers = Vec::new();
        let mut max_seq = 0;
        for i in 0..meta::ROOT_SLOTS {
            let mut b = [0u8; meta::ROOT_SLOT_BYTES as usize];
            self.meta_read(meta::root_offset(i), &mut b);
            let Some(slot) = RootSlot::decode(&b) else {
                continue;
            };
            let Ok(h) = Handle::from_bytes(&slot.handle) else {
                losers.push(i);
                continue;
            };
            max_seq = max_seq.max(slot.seq);
            match best.get(&slot.name) {
                Some(&(_, seq, _)) if seq >= slot.seq => losers.push(i),
                Some(&(j, _, _)) => {
                    losers.push(j);
                    best.insert(slot.name, (i, slot.seq, h));
                }
                None => {
                    best.insert(slot.name, (i, slot.seq, h));
                }
            }
        }
        // A pair of slots belongs to one name (see `set_root`): two names in
        // one pair only come from damage; the later record keeps the pair.
        let mut by_seq: Vec<(String, (usize, u64, Handle))> = best.into_iter().collect();
        by_seq.sort_by_key(|(_, r)| std::cmp::Reverse(r.1));
        let mut taken = vec![false; meta::ROOT_SLOTS / 2];
        let mut best = HashMap::with_capacity(by_seq.len());
        for (name, r) in by_seq {
            if std::mem::replace(&mut taken[r.0 / 2], true) {
                tracing::warn!(shard = self.shard, slot = r.0, %name, "root slot pair shared by two names; keeping the later one");
                losers.push(r.0);
            } else {
                best.insert(name, r);
            }
        }
        if !self.files.is_read_only() {
            for i in losers {
                self.meta_word(meta::root_offset(i))
                    .store(0, Ordering::Release);
            }
        }
        let mut st = self.st.borrow_mut();
        st.roots = best;
        st.root_seq = max_seq;
        Ok(())
    }

    /// Validate a handle against this shard's state; returns the segment id
    /// and slot index.
    #[inline]
    fn locate(&self, st: &State, h: &Handle) -> Result<(u32, u32)> {
        if h.dir_tag == self.manifest.dir_tag()
            && h.shard == self.shard
            && let Some(Some(seg)) = st.segments.get(h.segment as usize)
        {
            let class = &CLASSES[seg.class_id as usize];
            let start = seg.start();
            if seg.generation == h.generation
                && seg.class_id == h.class_id
                && seg.run.file == h.file
                && h.length == class.slot_bytes
                && h.offset >= start
                && h.offset - start < seg.slots as u64 * class.slot_bytes as u64
            {
                let (slot, rem) = class.div_rem(h.offset - start);
                if rem == 0 {
                    return Ok((h.segment, slot as u32));
                }
            }
        }
        Err(self.locate_error(st, h))
    }

    /// Why [`locate`](Self::locate) rejected `h` (off the hot path).
    #[cold]
    #[inline(never)]
    fn locate_error(&self, st: &State, h: &Handle) -> Error {
        let shown = || h.to_string();
        if h.dir_tag != self.manifest.dir_tag() {
            return Error::ForeignHandle {
                handle: shown(),
                handle_tag: h.dir_tag,
                dir_tag: self.manifest.dir_tag(),
            };
        }
        if h.shard != self.shard {
            return Error::WrongShard {
                handle: shown(),
                owner: h.shard,
                this: self.shard,
            };
        }
        let not = |reason| Error::NotAllocated {
            handle: shown(),
            reason,
        };
        let Some(Some(seg)) = st.segments.get(h.segment as usize) else {
            return not("no such segment");
        };
        if seg.generation != h.generation {
            return not("segment was released and reused since");
        }
        if seg.class_id != h.class_id {
            return not("wrong size class");
        }
        if seg.run.file != h.file {
            return not("wrong data file");
        }
        let slot_bytes = CLASSES[seg.class_id as usize].slot_bytes as u64;
        if h.length as u64 != slot_bytes {
            return not("wrong length");
        }
        let start = seg.start();
        if h.offset < start || h.offset >= start + seg.slots as u64 * slot_bytes {
            return not("offset out of the segment's bounds");
        }
        not("offset is not a slot boundary")
    }

    #[inline]
    fn check_writable(&self) -> Result<()> {
        if self.poisoned.get() {
            return Err(Error::Poisoned { shard: self.shard });
        }
        if self.files.is_read_only() {
            return Err(Error::ReadOnly("allocator opened read-only"));
        }
        Ok(())
    }

    /// Take a free slot of `class_id` from an existing segment (sync, no
    /// syscall). `None` when the class needs a new segment.
    #[inline]
    fn take_slot(&self, class_id: u8) -> Option<(Handle, FileId)> {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let avail = &mut st.avail[class_id as usize];
        loop {
            let &seg_id = avail.last()?;
            let seg = st.segments[seg_id as usize]
                .as_mut()
                .expect("avail segment exists");
            if seg.live >= seg.slots {
                seg.in_avail = false;
                avail.pop();
                continue;
            }
            let words = seg.slots.div_ceil(64);
            let mut w = seg.hint;
            while w < words {
                let cell = seg.word(w);
                let word = cell.load(Ordering::Relaxed);
                if word != u64::MAX {
                    let bit = (!word).trailing_zeros();
                    let slot = w * 64 + bit;
                    if slot < seg.slots {
                        cell.store(word | (1u64 << bit), Ordering::Relaxed);
                        seg.live += 1;
                        seg.hint = w;
                        let slot_bytes = CLASSES[class_id as usize].slot_bytes;
                        let handle = Handle {
                            shard: self.shard,
                            class_id,
                            file: seg.run.file,
                            segment: seg_id,
                            generation: seg.generation,
                            length: slot_bytes,
                            offset: seg.start() + slot as u64 * slot_bytes as u64,
                            dir_tag: self.manifest.dir_tag(),
                        };
                        let file = seg.run.file;
                        st.live_per_class[class_id as usize] += 1;
                        st.stats.allocations_live += 1;
                        st.stats.bytes_live += slot_bytes as u64;
                        st.stats.allocs += 1;
                        let fid = self.data_files.borrow()[file as usize];
                        return Some((handle, fid));
                    }
                }
                w += 1;
            }
            // Counted as not full but no bit found: the count is wrong.
            debug_assert!(
                false,
                "segment {seg_id} live count disagrees with its bitmap"
            );
            seg.live = seg.slots;
        }
    }

    /// Clear a slot's bit (no validation: the slot is known to be ours and
    /// set).
    fn release_slot(&self, h: Handle) {
        let mut st = self.st.borrow_mut();
        let slot = {
            let seg = st.segments[h.segment as usize]
                .as_ref()
                .expect("segment exists");
            CLASSES[h.class_id as usize]
                .div_rem(h.offset - seg.start())
                .0 as u32
        };
        self.clear_slot(&mut st, h.segment, slot);
    }

    /// Clear bit `slot` of segment `seg_id` and do the bookkeeping; releases
    /// the segment when it became empty and its class has another empty one.
    #[inline]
    fn clear_slot(&self, st: &mut State, seg_id: u32, slot: u32) {
        let seg = st.segments[seg_id as usize]
            .as_mut()
            .expect("segment exists");
        let class_id = seg.class_id;
        let slot_bytes = CLASSES[class_id as usize].slot_bytes as u64;
        let (w, bit) = (slot / 64, slot % 64);
        let cell = seg.word(w);
        let word = cell.load(Ordering::Relaxed);
        debug_assert!(word & (1 << bit) != 0);
        cell.store(word & !(1u64 << bit), Ordering::Relaxed);
        seg.live -= 1;
        seg.hint = seg.hint.min(w);
        let newly_avail = !seg.in_avail;
        seg.in_avail = true;
        let empty = seg.live == 0;
        st.live_per_class[class_id as usize] -= 1;
        st.stats.allocations_live -= 1;
        st.stats.bytes_live -= slot_bytes;
        if newly_avail {
            st.avail[class_id as usize].push(seg_id);
        }
        if empty {
            // Keep one empty segment per class to avoid churn; release others.
            let empties = st.avail[class_id as usize]
                .iter()
                .filter(|&&s| {
                    st.segments[s as usize]
                        .as_ref()
                        .is_some_and(|s| s.live == 0)
                })
                .count();
            if empties > 1 {
                self.release_segment(st, seg_id);
            }
        }
    }

    fn release_segment(&self, st: &mut State, seg_id: u32) {
        let seg = st.segments[seg_id as usize].take().expect("segment exists");
        debug_assert_eq!(seg.live, 0);
        let avail = &mut st.avail[seg.class_id as usize];
        if let Some(pos) = avail.iter().position(|&s| s == seg_id) {
            avail.swap_remove(pos);
        }
        self.meta_word(meta::entry_offset(seg_id))
            .store(0, Ordering::Release);
        st.quarantine.push(seg_id);
        st.space.free(seg.run);
    }

    /// Create a segment for `class_id`.
    async fn new_segment(&self, class_id: u8) -> Result<()> {
        let c = CLASSES[class_id as usize];
        let blocks = (c.segment_bytes as u64 / BLOCK_BYTES) as u32;
        let (entry, run, trim, generation) = {
            let mut st = self.st.borrow_mut();
            // Reserve the entry index now: other tasks may create segments
            // while this one awaits.
            let entry = match st.free_entries.pop() {
                Some(e) => e,
                None => {
                    st.entry_hwm += 1;
                    st.entry_hwm - 1
                }
            };
            let (run, trim) = st.space.alloc(blocks);
            let generation = st.next_generation;
            st.next_generation = st.next_generation.wrapping_add(1).max(1);
            (entry, run, trim, generation)
        };
        let undo = |this: &Self| {
            let mut st = this.st.borrow_mut();
            st.space.give_back(run, trim);
            // The entry is still free on disk: reusable at once.
            st.free_entries.push(entry);
        };
        // Room in the metadata file, and the data file exists.
        let prep = async {
            let end = meta::entry_offset(entry) + meta::ENTRY_BYTES;
            self.ensure_meta(end).await?;
            // The high-water mark is about to cover `end`: the file's new
            // size must be durable first, or a power loss could keep the
            // mark but not the size (recovery would then find the
            // directory truncated).
            if end > self.meta_durable_bytes.get() {
                let reserved = self.files.reserved_bytes(self.meta)?;
                if let Err(e) = self.files.sync(self.meta, true).await {
                    return Err(self.poison(e));
                }
                self.meta_durable_bytes
                    .set(self.meta_durable_bytes.get().max(reserved));
            }
            self.ensure_data_file(run.file).await?;
            // A run that may hold a hole (trimmed) is reserved again first.
            self.reserve_trimmed(run, trim).await
        };
        if let Err(e) = prep.await {
            undo(self);
            return Err(e);
        }
        {
            let mut st = self.st.borrow_mut();
            if st.segments.len() <= entry as usize {
                st.segments.resize_with(entry as usize + 1, || None);
            }
            // The on-disk mark only moves up, and before the entry is
            // published, so recovery scans every published entry.
            let hwm_cell = self.meta_word(meta::HWM_OFFSET);
            let disk = meta::decode_hwm(hwm_cell.load(Ordering::Relaxed)).unwrap_or(0);
            if entry + 1 > disk {
                hwm_cell.store(meta::encode_hwm(entry + 1), Ordering::Release);
            }
            let gen_cell = self.meta_word(meta::GEN_OFFSET);
            let issued = meta::decode_hwm(gen_cell.load(Ordering::Relaxed)).unwrap_or(0);
            let next = generation.wrapping_add(1).max(1);
            if next > issued {
                gen_cell.store(meta::encode_hwm(next), Ordering::Release);
            }
        }
        let header = EntryHeader {
            class_id,
            generation,
            file: run.file,
            block: run.block,
            blocks,
            slots: c.slots,
        };
        let off = meta::entry_offset(entry);
        let bitmap = self.meta_ptr(off + meta::ENTRY_HEADER_BYTES).cast::<u64>();
        for w in 0..meta::BITMAP_WORDS {
            // SAFETY: inside the entry's bitmap, reserved and pinned (ensure_meta).
            unsafe { AtomicU64::from_ptr(bitmap.add(w)) }.store(0, Ordering::Relaxed);
        }
        self.meta_write(off + 8, &header.body());
        self.meta_word(off)
            .store(header.state_word(), Ordering::Release);
        let mut st = self.st.borrow_mut();
        st.segments[entry as usize] = Some(Seg {
            class_id,
            generation,
            run,
            slots: c.slots,
            live: 0,
            bitmap,
            hint: 0,
            in_avail: true,
        });
        st.avail[class_id as usize].push(entry);
        Ok(())
    }

    async fn ensure_data_file(&self, file: u32) -> Result<()> {
        while self.data_files.borrow().len() <= file as usize {
            let n = self.data_files.borrow().len() as u32;
            let id = self.files.register(self.dir.join(data_file_name(n)));
            self.data_files.borrow_mut().push(id);
        }
        let id = self.data_files.borrow()[file as usize];
        if self.files.len_bytes(id)?.is_none() {
            // First touch: open (creating it) so a crash leaves no entry
            // pointing at a missing file.
            let existed = self.dir.join(data_file_name(file)).exists();
            drop(self.files.acquire(id, 0).await?);
            if !existed {
                // Make the new name durable before any segment refers to
                // it: otherwise a power loss could keep the directory entry
                // of the segment but not the file (recovery: "missing").
                crate::datadir::sync_dir(&self.dir)?;
                self.st.borrow_mut().new_files_since_sync = true;
            }
        }
        Ok(())
    }

    /// Allocate `size` bytes (1..=16 MiB); returns the handle and a writable
    /// pin on the slot. The slot's bytes are whatever was there before
    /// (zeros in a fresh file): initialise what you read.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSize`], [`Error::NoSpace`] (the disk is full: nothing
    /// changed), [`Error::Poisoned`], window and descriptor pressure, io
    /// errors.
    pub async fn allocate(&self, size: u64) -> Result<Allocation> {
        self.check_writable()?;
        let class_id = classes::class_of(size).ok_or(Error::InvalidSize { size })?;
        loop {
            if let Some((handle, fid)) = self.take_slot(class_id) {
                let mut guard = SlotGuard {
                    alloc: self,
                    handle,
                    armed: true,
                };
                let pin = match self
                    .mm
                    .try_pin(fid, handle.offset, handle.length as u64, true)?
                {
                    Some(p) => p,
                    None => {
                        self.mm
                            .pin(fid, handle.offset, handle.length as u64, true)
                            .await?
                    }
                };
                guard.armed = false;
                return Ok(Allocation { handle, pin });
            }
            self.new_segment(class_id).await?;
        }
    }

    /// Allocate on the hot path only: `Ok(None)` when the class needs a new
    /// segment or the slot's window must be faulted in (then use
    /// [`allocate`](Self::allocate)). No syscall, no await.
    ///
    /// # Errors
    ///
    /// As [`allocate`](Self::allocate) for what can be checked at once.
    #[inline]
    pub fn try_allocate(&self, size: u64) -> Result<Option<Allocation>> {
        self.check_writable()?;
        let class_id = classes::class_of(size).ok_or(Error::InvalidSize { size })?;
        let Some((handle, fid)) = self.take_slot(class_id) else {
            return Ok(None);
        };
        match self
            .mm
            .try_pin(fid, handle.offset, handle.length as u64, true)
        {
            Ok(Some(pin)) => Ok(Some(Allocation { handle, pin })),
            Ok(None) => {
                self.release_slot(handle);
                Ok(None)
            }
            Err(e) => {
                self.release_slot(handle);
                Err(e)
            }
        }
    }

    /// Free an allocation of this shard. Durable against a process crash
    /// when it returns.
    ///
    /// # Errors
    ///
    /// [`Error::DoubleFree`], [`Error::NotAllocated`], [`Error::ForeignHandle`],
    /// [`Error::WrongShard`], [`Error::Poisoned`]. On error nothing changed.
    #[inline]
    pub fn free(&self, handle: Handle) -> Result<()> {
        self.check_writable()?;
        let mut st = self.st.borrow_mut();
        let (seg_id, slot) = self.locate(&st, &handle)?;
        let seg = st.segments[seg_id as usize].as_ref().expect("located");
        if seg.word(slot / 64).load(Ordering::Relaxed) & (1u64 << (slot % 64)) == 0 {
            return Err(Error::DoubleFree {
                handle: handle.to_string(),
            });
        }
        self.clear_slot(&mut st, seg_id, slot);
        st.stats.frees += 1;
        Ok(())
    }

    /// Whether `handle` names a live allocation of this shard.
    pub fn is_live(&self, handle: &Handle) -> bool {
        let st = self.st.borrow();
        match self.locate(&st, handle) {
            Ok((seg_id, slot)) => {
                let seg = st.segments[seg_id as usize].as_ref().expect("located");
                seg.word(slot / 64).load(Ordering::Relaxed) & (1u64 << (slot % 64)) != 0
            }
            Err(_) => false,
        }
    }

    fn check_live(&self, handle: &Handle) -> Result<FileId> {
        let st = self.st.borrow();
        let (seg_id, slot) = self.locate(&st, handle)?;
        let seg = st.segments[seg_id as usize].as_ref().expect("located");
        if seg.word(slot / 64).load(Ordering::Relaxed) & (1u64 << (slot % 64)) == 0 {
            return Err(Error::NotAllocated {
                handle: handle.to_string(),
                reason: "slot is free",
            });
        }
        Ok(self.data_files.borrow()[seg.run.file as usize])
    }

    /// Pin a live allocation of this shard (async: faults its window in if
    /// needed). The pin is writable unless the allocator is read-only.
    ///
    /// # Errors
    ///
    /// As [`free`](Self::free) for a bad handle ([`Error::NotAllocated`] for
    /// a freed one), plus the errors of [`MappingManager::pin`].
    pub async fn pin(&self, handle: Handle) -> Result<Pin> {
        let fid = self.check_live(&handle)?;
        let writable = !self.files.is_read_only();
        if let Some(p) = self
            .mm
            .try_pin(fid, handle.offset, handle.length as u64, writable)?
        {
            return Ok(p);
        }
        self.mm
            .pin(fid, handle.offset, handle.length as u64, writable)
            .await
    }

    /// Pin on the hot path only (`Ok(None)`: use [`pin`](Self::pin)).
    ///
    /// # Errors
    ///
    /// As [`pin`](Self::pin).
    pub fn try_pin(&self, handle: Handle) -> Result<Option<Pin>> {
        let fid = self.check_live(&handle)?;
        self.mm.try_pin(
            fid,
            handle.offset,
            handle.length as u64,
            !self.files.is_read_only(),
        )
    }

    /// The live allocations, segment by segment.
    pub fn live(&self) -> LiveIter<'_> {
        LiveIter {
            alloc: self,
            seg: 0,
            word: 0,
            bits: 0,
        }
    }

    /// Number of live allocations.
    pub fn live_count(&self) -> u64 {
        self.st.borrow().stats.allocations_live
    }

    /// Make every `allocate` and `free` that returned before this call, and
    /// every write through a pin made before it, durable against power loss:
    /// `fdatasync` of the data files and the metadata through the control
    /// ring (concurrently), and of the shard folder when files were created.
    ///
    /// # Errors
    ///
    /// The first io error. A failed sync poisons the allocator: every later
    /// write returns [`Error::Poisoned`] until the directory is reopened.
    pub async fn sync(&self) -> Result<()> {
        let span = tracing::debug_span!("sync", shard = self.shard);
        self.sync_inner().instrument(span).await
    }

    async fn sync_inner(&self) -> Result<()> {
        if self.poisoned.get() {
            return Err(Error::Poisoned { shard: self.shard });
        }
        if self.files.is_read_only() {
            return Ok(());
        }
        let (quarantined, new_files) = {
            let mut st = self.st.borrow_mut();
            let q = st.quarantine.len();
            (q, std::mem::take(&mut st.new_files_since_sync))
        };
        let meta_reserved = self.files.reserved_bytes(self.meta)?;
        let mut ids: Vec<FileId> = self.data_files.borrow().clone();
        ids.push(self.meta);
        // At most half the descriptor cap in flight at once (each sync holds
        // a lease on its fd until the kernel is done); a file that still
        // finds no descriptor is retried alone, after the others finished.
        let batch = (self.files.max_open_files() / 2).max(1);
        let mut first_err = None;
        let mut retry = Vec::new();
        for chunk in ids.chunks(batch) {
            let results = join_all(chunk.iter().map(|&id| self.files.sync(id, true))).await;
            for (&id, r) in chunk.iter().zip(results) {
                match r {
                    Ok(()) => {}
                    Err(Error::FdPressure { .. }) => retry.push(id),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        for id in retry {
            if first_err.is_some() {
                break;
            }
            match self.files.sync(id, true).await {
                Ok(()) => {}
                Err(e @ Error::FdPressure { .. }) => {
                    // Not an I/O failure: report it without poisoning.
                    return Err(e);
                }
                Err(e) => first_err = Some(e),
            }
        }
        if first_err.is_none() && new_files {
            first_err = crate::datadir::sync_dir(&self.dir).err();
        }
        if let Some(e) = first_err {
            return Err(self.poison(e));
        }
        let mut st = self.st.borrow_mut();
        let released: Vec<u32> = st.quarantine.drain(..quarantined).collect();
        st.free_entries.extend(released);
        st.stats.syncs += 1;
        st.stats.last_sync_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.meta_durable_bytes
            .set(self.meta_durable_bytes.get().max(meta_reserved));
        Ok(())
    }

    /// Refuse every later write: a failed fdatasync cannot be retried safely
    /// (the kernel may have dropped the dirty pages it could not write).
    fn poison(&self, e: Error) -> Error {
        tracing::error!(shard = self.shard, error = %e, "sync failed; shard poisoned until reopened");
        self.poisoned.set(true);
        e
    }

    /// Whether an earlier sync failed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get()
    }

    /// Name `handle` as a root (replacing an earlier one of that name).
    /// Durable against a process crash when it returns.
    ///
    /// # Errors
    ///
    /// [`Error::Root`] for an empty or over-long name or a full table; the
    /// errors of a bad handle as for [`pin`](Self::pin).
    pub fn set_root(&self, name: &str, handle: Handle) -> Result<()> {
        self.check_writable()?;
        if name.is_empty() || name.len() > meta::ROOT_NAME_MAX {
            return Err(Error::Root(format!(
                "root names are 1..=64 bytes, got {}",
                name.len()
            )));
        }
        self.check_live(&handle)?;
        let mut st = self.st.borrow_mut();
        // A name keeps its record in one pair of slots that share a sector:
        // a replacement is written to the other slot of the pair, then the
        // old one is cleared, so no torn write can lose the name.
        let slot = match st.roots.get(name) {
            Some(&(cur, _, _)) => cur ^ 1,
            None => {
                let mut used = vec![false; meta::ROOT_SLOTS / 2];
                for r in st.roots.values() {
                    used[r.0 / 2] = true;
                }
                let Some(pair) = used.iter().position(|u| !u) else {
                    return Err(Error::Root(format!(
                        "root table full ({} names per shard)",
                        meta::ROOT_SLOTS / 2
                    )));
                };
                2 * pair
            }
        };
        st.root_seq += 1;
        let seq = st.root_seq;
        let rec = RootSlot {
            seq,
            name: name.to_string(),
            handle: handle.to_bytes(),
        };
        let off = meta::root_offset(slot);
        // Invalidate the slot, write the body, then the sequence number.
        let bytes = rec.encode();
        self.meta_word(off).store(0, Ordering::Release);
        self.meta_write(off + 8, &bytes[8..]);
        self.meta_word(off).store(seq, Ordering::Release);
        if let Some((old, _, _)) = st.roots.insert(name.to_string(), (slot, seq, handle)) {
            debug_assert_eq!(old, slot ^ 1);
            self.meta_word(meta::root_offset(old))
                .store(0, Ordering::Release);
        }
        Ok(())
    }

    /// The handle named `name`, if any.
    pub fn root(&self, name: &str) -> Option<Handle> {
        self.st.borrow().roots.get(name).map(|r| r.2)
    }

    /// Forget the root `name`; returns its handle.
    ///
    /// # Errors
    ///
    /// [`Error::Poisoned`], [`Error::ReadOnly`].
    pub fn remove_root(&self, name: &str) -> Result<Option<Handle>> {
        self.check_writable()?;
        let mut st = self.st.borrow_mut();
        Ok(st.roots.remove(name).map(|(slot, _, h)| {
            self.meta_word(meta::root_offset(slot))
                .store(0, Ordering::Release);
            h
        }))
    }

    /// All roots, sorted by name.
    pub fn roots(&self) -> Vec<(String, Handle)> {
        let st = self.st.borrow();
        let mut v: Vec<(String, Handle)> = st.roots.iter().map(|(n, r)| (n.clone(), r.2)).collect();
        v.sort();
        v
    }

    /// Counters and gauges.
    pub fn stats(&self) -> AllocStats {
        let st = self.st.borrow();
        let mut s = st.stats.clone();
        s.segments = st.segments.iter().filter(|s| s.is_some()).count() as u64;
        s.bytes_allocated = (st.space.extent_blocks() - st.space.free_blocks()) * BLOCK_BYTES;
        s.quarantined_entries = st.quarantine.len() as u64;
        s.data_files = self.data_files.borrow().len() as u64;
        s.bytes_reserved = self
            .data_files
            .borrow()
            .iter()
            .map(|&id| self.files.reserved_bytes(id).unwrap_or(0))
            .sum();
        s.metadata_bytes = self.files.reserved_bytes(self.meta).unwrap_or(0);
        s.live_per_class = st
            .live_per_class
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (CLASSES[i].slot_bytes, *n))
            .collect();
        s
    }
}

impl std::fmt::Debug for SegmentAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentAllocator")
            .field("shard", &self.shard)
            .field("live", &self.live_count())
            .finish()
    }
}

/// Iterator over live handles; see [`SegmentAllocator::live`].
pub struct LiveIter<'a> {
    alloc: &'a SegmentAllocator,
    seg: u32,
    word: u32,
    bits: u64,
}

impl Iterator for LiveIter<'_> {
    type Item = Handle;

    fn next(&mut self) -> Option<Handle> {
        let st = self.alloc.st.borrow();
        loop {
            let seg = match st.segments.get(self.seg as usize) {
                None => return None,
                Some(None) => {
                    self.seg += 1;
                    self.word = 0;
                    self.bits = 0;
                    continue;
                }
                Some(Some(s)) => s,
            };
            if self.bits != 0 {
                let bit = self.bits.trailing_zeros();
                self.bits &= self.bits - 1;
                let slot = (self.word - 1) * 64 + bit;
                let slot_bytes = CLASSES[seg.class_id as usize].slot_bytes;
                return Some(Handle {
                    shard: self.alloc.shard,
                    class_id: seg.class_id,
                    file: seg.run.file,
                    segment: self.seg,
                    generation: seg.generation,
                    length: slot_bytes,
                    offset: seg.start() + slot as u64 * slot_bytes as u64,
                    dir_tag: self.alloc.manifest.dir_tag(),
                });
            }
            if self.word >= seg.slots.div_ceil(64) {
                self.seg += 1;
                self.word = 0;
                continue;
            }
            self.bits = seg.word(self.word).load(Ordering::Relaxed);
            self.word += 1;
        }
    }
}
