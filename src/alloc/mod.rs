//! `SegmentAllocator`: size classes, segments carved from windows, slot
//! bitmaps kept in a `MAP_SHARED` metadata file. This file holds the hot
//! path (allocate, free, pin of a live slot); the rest lives in
//! `open.rs` (create, open), `segments.rs` (segment lifecycle),
//! `durability.rs` (sync, poison), `fresh.rs` (slots reusable at once),
//! `roots.rs`, `stats.rs`, `meta_map.rs`
//! (bounds-checked metadata access), `space.rs` and `trim.rs`.
//!
//! **Architecture invariants:**
//! * A slot's bit is set in the metadata mapping before `allocate` returns
//!   and cleared before `free` returns. A `MAP_SHARED` page survives a
//!   process crash, so both are durable against `kill -9` at once; `sync`
//!   makes them durable against power loss.
//! * A segment is published by one aligned store of its state word, after
//!   its other header fields; it is unpublished by one store of zero.
//! * Deferred reuse: a freed slot, and the directory entry and run of a
//!   released segment, are handed out again only after a `sync` that began
//!   after the free (release) completed. So after a power loss, an
//!   allocation live at the last completed `sync` keeps its bytes even when
//!   a later free of it reverts, and a new header never meets an old bitmap.
//!   A segment is released only once all its frees are durable. An open
//!   after a crash makes the metadata durable before anything is reused.
//!   Recovery still resolves overlapping segments (damage) in favour of the
//!   higher generation.
//! * A segment never crosses a window (`space.rs`). The hot path (a slot in a
//!   segment whose window is mapped) makes no syscall and takes no lock.
//! * The allocator never touches another shard's segments.

mod durability;
mod fresh;
mod futures;
mod meta_map;
mod open;
mod recover;
mod roots;
mod segments;
pub(crate) mod space;
mod stats;
mod trim;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::task::Poll;

use crate::error::{Error, Result};
use crate::files::{FileHandleRegistry, FileId};
use crate::format::classes::{self, CLASS_COUNT, CLASSES};
use crate::format::data_file_name;
use crate::format::{Handle, Manifest};
use crate::mapping::{Access, MappingManager, PinGuard, SlotAt};
use durability::Released;
use fresh::Fresh;
pub use futures::{AllocateFuture, PinFuture};
use futures::{Slow, SlowBox};
use meta_map::MetaMap;
use segments::Seg;
use space::Space;
pub use stats::{AllocStats, LiveIter};

/// An allocation: its durable [`Handle`] and a writable [`PinGuard`] on exactly
/// its slot.
#[derive(Debug)]
pub struct Allocation {
    handle: Handle,
    pin: PinGuard,
}

impl Allocation {
    /// The durable handle.
    #[inline]
    pub fn handle(&self) -> Handle {
        self.handle
    }
    /// The pin on the slot.
    #[inline]
    pub fn pin(&self) -> &PinGuard {
        &self.pin
    }
    /// Drop the pin, keep the handle (pin it again with `pin(handle)`).
    #[inline]
    pub fn into_handle(self) -> Handle {
        self.handle
    }
    /// Split into handle and pin.
    #[inline]
    pub fn into_parts(self) -> (Handle, PinGuard) {
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
    /// The slot's memory.
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

struct State {
    segments: Vec<Option<Seg>>,
    /// How many of `segments` are `Some` (`AllocStats::segments`, without
    /// a walk of the table on every `stats`).
    segments_live: u64,
    /// Per class, the segments that may have a slot to hand out (the last
    /// one is tried first).
    avail: [Vec<u32>; CLASS_COUNT],
    space: Space,
    free_entries: Vec<u32>,
    /// Released since the last sync began (see [`Released`]).
    released: Released,
    /// Directory entries released before a sync that is running began: it
    /// took them (`Covered`). They are reusable when it completes without
    /// error; a sync dropped or short of descriptors hands them back to the
    /// pending ones, and a poisoned shard reuses nothing.
    covered_entries: usize,
    /// Directory entries in use or ever used: entries `0..directory_len`
    /// are scanned by recovery (the on-disk directory high-water mark).
    directory_len: u32,
    next_generation: u32,
    roots: HashMap<String, (usize, u64, Handle)>,
    root_seq: u64,
    live_per_class: [u64; CLASS_COUNT],
    stats: AllocStats,
    /// Slots taken since the latest sync began (reusable at once when freed).
    fresh: Fresh,
    /// Per class, the last chunk prefaulted ahead (`(file, chunk index)`).
    prefaulted: Prefaulted,
    /// Runs whose punch a dropped `trim` left in flight, with the punch:
    /// out of the free space until the kernel is done with it (`trim.rs`).
    punching: Vec<(space::Run, crate::io::Op)>,
    /// Runs whose punch was reported failed while its entry stayed queued
    /// in the ring (`Op::left_queued`), with the punch: out of the free
    /// space until the ring has reaped the entry (`trim.rs`).
    queued_punches: Vec<(space::Run, crate::io::Op)>,
}

/// Bytes the allocator faults in ahead of a class's bump position, one
/// chunk at a time: when a slot opens chunk `c`, chunk `c + 1` is faulted in
/// through the ring (`MappingManager::prefault`), so a fill writes to pages
/// that are already mapped.
const PREFAULT_CHUNK_BYTES: u64 = 256 * 1024;

/// A slot [`SegmentAllocator::take_slot`] took.
pub(super) struct Taken {
    handle: Handle,
    at: SlotAt,
    /// The chunk of the data file to fault in ahead, if any.
    prefault: Option<u64>,
}

/// Per class, the last chunk prefaulted.
struct Prefaulted([(FileId, u64); CLASS_COUNT]);

impl Prefaulted {
    /// No chunk.
    const NONE: (FileId, u64) = (FileId(u32::MAX), u64::MAX);
}

impl Default for Prefaulted {
    fn default() -> Self {
        Prefaulted([Prefaulted::NONE; CLASS_COUNT])
    }
}

/// The segment allocator of one shard.
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
    meta_file: FileId,
    meta: MetaMap,
    data_files: RefCell<Vec<FileId>>,
    st: RefCell<State>,
    poisoned: Cell<bool>,
    /// Neither read-only nor poisoned (one test on the hot path).
    writable: Cell<bool>,
    /// Bytes of the metadata file known to be durable (its size as of the
    /// last `fdatasync`). The high-water mark never covers an entry past it.
    meta_durable_bytes: Cell<u64>,
    syncs: durability::SyncOrder,
    /// The shard's lock (shared when read-only): held for as long as the
    /// allocator is open or a window of one of its files is mapped (each
    /// holds a clone: a pin may outlive the allocator).
    shard_lock: Rc<dyn crate::files::FileOwner>,
}

#[cold]
#[inline(never)]
fn not_live(handle: Handle) -> Error {
    Error::NotAllocated {
        handle,
        reason: "slot is free",
    }
}

#[cold]
#[inline(never)]
fn invalid_size(size: u64) -> Error {
    Error::InvalidSize { size }
}

/// Undoes a slot allocation if the `allocate` future is dropped or fails
/// before handing the slot out.
pub(super) struct SlotGuard<'a> {
    alloc: &'a SegmentAllocator,
    handle: Handle,
    armed: bool,
    /// The slot's durable bit is cleared (while its window faults in).
    hidden: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.alloc.release_slot(self.handle, !self.hidden);
        }
    }
}

#[warn(clippy::cast_possible_truncation)]
impl SegmentAllocator {
    /// Validate a handle against this shard's state; returns the segment id
    /// and slot index. `None` when it names no slot of this shard: the
    /// caller builds the error with [`locate_error`](Self::locate_error),
    /// off the hot path (a small value returned in registers).
    #[inline(always)]
    fn find(&self, st: &State, h: &Handle) -> Option<(u32, u32)> {
        self.find_seg(st, h).map(|(_, slot, _)| (h.segment, slot))
    }

    /// [`find`](Self::find), with the segment and where the slot lies. The
    /// segment keeps a handle of its own (its template), which holds this
    /// shard's index and the directory's tag, so one pass over the fields
    /// checks them with the segment's own.
    #[inline(always)]
    fn find_seg<'s>(&self, st: &'s State, h: &Handle) -> Option<(&'s Seg, u32, SlotAt)> {
        let seg = st.segments.get(h.segment as usize)?.as_ref()?;
        let (slot, at) = seg.slot_of(h)?;
        Some((seg, slot, at))
    }

    /// The rest of a segment's handles' fields, and the window size.
    fn seg_names(&self, entry: u32) -> segments::SegNames {
        segments::SegNames {
            entry,
            shard: self.shard,
            dir_tag: self.manifest.dir_tag(),
            window_bytes: self.mm.window_bytes(),
        }
    }

    #[inline]
    fn check_writable(&self) -> Result<()> {
        if self.writable.get() {
            Ok(())
        } else {
            Err(self.not_writable())
        }
    }

    #[cold]
    #[inline(never)]
    fn not_writable(&self) -> Error {
        if self.poisoned.get() {
            Error::Poisoned { shard: self.shard }
        } else {
            Error::ReadOnly("allocator opened read-only")
        }
    }

    /// Take a free slot of `class_id` from an existing segment (sync, no
    /// syscall). `None` when the class needs a new segment.
    #[inline(always)]
    fn take_slot(&self, class_id: u8) -> Option<Taken> {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let avail = &mut st.avail[class_id as usize];
        loop {
            let &seg_id = avail.last()?;
            let seg = st.segments[seg_id as usize]
                .as_mut()
                .expect("avail segment exists");
            let Some(slot) = seg.take() else {
                seg.in_avail = false;
                avail.pop();
                continue;
            };
            let (handle, at) = seg.slot_at(slot);
            seg.mark_fresh(slot, st.fresh.epoch());
            st.live_per_class[class_id as usize] += 1;
            st.stats.allocs += 1;
            // The first slot of its class in a chunk (small slots only),
            // taken for the first time (a reused slot's bytes were touched
            // already): the next chunk is to be faulted in, once.
            let first_use = slot >= seg.untouched_from;
            if first_use {
                seg.untouched_from = slot + 1;
            }
            let len = u64::from(handle.length);
            let mut prefault = None;
            if first_use && len < PREFAULT_CHUNK_BYTES && handle.offset % PREFAULT_CHUNK_BYTES < len
            {
                let next = (seg.file_id, handle.offset / PREFAULT_CHUNK_BYTES + 1);
                let last = &mut st.prefaulted.0[class_id as usize];
                if *last != next {
                    *last = next;
                    prefault = Some(next.1);
                }
            }
            return Some(Taken {
                handle,
                at,
                prefault,
            });
        }
    }

    /// Fault chunk `chunk` of `fid` in ahead of use.
    #[cold]
    #[inline(never)]
    fn prefault_chunk(&self, fid: FileId, chunk: u64) {
        self.mm
            .prefault(fid, chunk * PREFAULT_CHUNK_BYTES, PREFAULT_CHUNK_BYTES);
    }

    /// Set or clear the durable bit of a held slot that `allocate` has not
    /// handed out yet; the live counts follow it, so they agree with
    /// [`live`](Self::live) while the slot is hidden.
    #[cold]
    fn set_slot_live(&self, h: &Handle, live: bool) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let seg = st.segments[h.segment as usize]
            .as_mut()
            .expect("a held slot's segment exists");
        let slot = held_slot(seg, h);
        let count = &mut st.live_per_class[h.class_id as usize];
        if live {
            seg.set_live(slot);
            *count += 1;
            self.files.mark_dirty(self.meta_file);
        } else {
            seg.clear_live(slot);
            *count -= 1;
        }
    }

    /// Undo [`take_slot`](Self::take_slot) of a slot never handed out: it
    /// is free again at once (nothing was written through it). `live`: its
    /// durable bit is still set (not hidden by `set_slot_live`).
    ///
    /// The metadata file is marked dirty: `allocs` goes down here, so a
    /// later allocation can bring the counters a sync compares
    /// (`meta_changes`) back to what an earlier sync saw, and without the
    /// mark the next sync would skip the metadata holding that allocation's
    /// bit.
    #[cold]
    fn release_slot(&self, h: Handle, live: bool) {
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let seg = st.segments[h.segment as usize]
            .as_mut()
            .expect("segment exists");
        let slot = held_slot(seg, &h);
        if live {
            seg.clear_live(slot);
            st.live_per_class[h.class_id as usize] -= 1;
        }
        self.files.mark_dirty(self.meta_file);
        seg.take_fresh(slot, st.fresh.epoch());
        // Never handed out, so its bytes are still untouched: taken again, it
        // is a first use, and the prefault its chunk may have asked for (a
        // no-op in an unmapped window) is asked for again.
        if seg.untouched_from == slot + 1 {
            seg.untouched_from = slot;
            st.prefaulted.0[h.class_id as usize] = Prefaulted::NONE;
        }
        seg.unhold(slot);
        if !seg.in_avail {
            seg.in_avail = true;
            st.avail[h.class_id as usize].push(h.segment);
        }
        st.stats.allocs -= 1;
        if seg.held == 0 {
            self.release_if_spare(st, h.segment);
        }
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
    ///
    /// The future ([`AllocateFuture`]) takes the hot path when first polled,
    /// as [`try_allocate`](Self::try_allocate) does, so an allocation from
    /// an existing segment in a mapped window costs what `try_allocate`
    /// costs; only a new segment or a window to fault in makes it wait (a
    /// slot whose window is to be faulted in stays taken meanwhile). Like an
    /// `async fn`, it does nothing until polled, and dropped before it
    /// completes it leaves nothing allocated.
    #[inline]
    pub fn allocate(&self, size: u64) -> AllocateFuture<'_> {
        AllocateFuture::new(self, size)
    }

    /// The first poll of [`allocate`](Self::allocate): the hot path's
    /// answer, or `Pending` with the rest of the work (boxed, out of line)
    /// in `slow`. The answer is built where the caller returns it (an enum
    /// of what was found, matched by the caller, cost 27 more instructions
    /// per call, in copies).
    #[inline(always)]
    pub(super) fn allocate_start<'a>(
        &'a self,
        size: u64,
        slow: &mut Slow<'a, Allocation>,
    ) -> Poll<Result<Allocation>> {
        if let Err(e) = self.check_writable() {
            return Poll::Ready(Err(e));
        }
        let Some(class_id) = classes::class_of(size) else {
            return Poll::Ready(Err(invalid_size(size)));
        };
        let Some(taken) = self.take_slot(class_id) else {
            *slow = Some(self.new_segment_later(class_id));
            return Poll::Pending;
        };
        // Before the pin, so that nothing built lives across the call (an
        // unmapped window makes it a no-op: `fault_slot` issues it again).
        if let Some(chunk) = taken.prefault {
            self.prefault_chunk(taken.at.file, chunk);
        }
        match self.mm.pin_mapped(taken.at) {
            Some(pin) => Poll::Ready(Ok(Allocation {
                handle: taken.handle,
                pin,
            })),
            None => {
                *slow = Some(self.fault_later(taken));
                Poll::Pending
            }
        }
    }

    /// The rest of an allocation that found no slot, boxed.
    #[cold]
    #[inline(never)]
    fn new_segment_later(&self, class_id: u8) -> SlowBox<'_, Allocation> {
        Box::pin(self.allocate_new_segment(class_id))
    }

    /// The rest of an allocation whose slot's window is not mapped, boxed.
    /// The slot stays taken: the guard gives it back if the future is
    /// dropped.
    #[cold]
    #[inline(never)]
    fn fault_later(&self, taken: Taken) -> SlowBox<'_, Allocation> {
        let guard = SlotGuard {
            alloc: self,
            handle: taken.handle,
            armed: true,
            hidden: false,
        };
        Box::pin(self.fault_slot(guard, taken))
    }

    /// [`allocate`](Self::allocate) once the hot path found no slot: a new
    /// segment for `class_id`, then a slot of it.
    #[inline(never)]
    pub(super) async fn allocate_new_segment(&self, class_id: u8) -> Result<Allocation> {
        loop {
            if let Some(taken) = self.take_slot(class_id) {
                let guard = SlotGuard {
                    alloc: self,
                    handle: taken.handle,
                    armed: true,
                    hidden: false,
                };
                return self.fault_slot(guard, taken).await;
            }
            self.new_segment(class_id).await?;
        }
    }

    /// The slot `taken` (held by `guard`, which gives it back if this is
    /// dropped or fails): pinned once its window is faulted in.
    #[inline(never)]
    pub(super) async fn fault_slot(
        &self,
        mut guard: SlotGuard<'_>,
        taken: Taken,
    ) -> Result<Allocation> {
        let Taken {
            handle,
            at,
            prefault,
        } = taken;
        let fid = at.file;
        let pin = match self.mm.pin_mapped(at) {
            Some(p) => p,
            None => {
                // Not live while its window faults in: a handle of this slot
                // (forged: handles are bytes from outside) must not pass
                // `locate` and be freed meanwhile. It stays held, so nothing
                // else takes it.
                self.set_slot_live(&handle, false);
                guard.hidden = true;
                let p = self
                    .mm
                    .pin_of(
                        fid,
                        handle.offset,
                        handle.length as u64,
                        true,
                        Access::Allocator,
                    )
                    .await?;
                self.set_slot_live(&handle, true);
                guard.hidden = false;
                p
            }
        };
        guard.armed = false;
        if let Some(chunk) = prefault {
            self.prefault_chunk(fid, chunk);
        }
        Ok(Allocation { handle, pin })
    }

    /// Allocate on the hot path only: `Ok(None)` when the class needs a new
    /// segment or the slot's window must be faulted in (then use
    /// [`allocate`](Self::allocate)). No syscall, no await.
    ///
    /// # Errors
    ///
    /// As [`allocate`](Self::allocate) for what can be checked at once.
    #[inline(always)]
    pub fn try_allocate(&self, size: u64) -> Result<Option<Allocation>> {
        self.check_writable()?;
        let Some(class_id) = classes::class_of(size) else {
            return Err(invalid_size(size));
        };
        let Some(Taken {
            handle,
            at,
            prefault,
        }) = self.take_slot(class_id)
        else {
            return Ok(None);
        };
        // Before the pin, so that nothing built lives across the call (an
        // unmapped window makes it a no-op).
        if let Some(chunk) = prefault {
            self.prefault_chunk(at.file, chunk);
        }
        match self.mm.pin_mapped(at) {
            Some(pin) => Ok(Some(Allocation { handle, pin })),
            None => self.try_allocate_unmapped(handle, at.file),
        }
    }

    /// [`try_allocate`](Self::try_allocate) of a slot whose window is not
    /// mapped (or not reserved yet): give the slot back, with the error
    /// [`MappingManager::try_pin`] reports, if any.
    #[cold]
    #[inline(never)]
    fn try_allocate_unmapped(&self, handle: Handle, fid: FileId) -> Result<Option<Allocation>> {
        let r = self.mm.try_pin_of(
            fid,
            handle.offset,
            handle.length as u64,
            true,
            Access::Allocator,
        );
        if let Ok(Some(pin)) = r {
            return Ok(Some(Allocation { handle, pin }));
        }
        self.release_slot(handle, true);
        r.map(|_| None)
    }

    /// Free an allocation of this shard. Durable against a process crash
    /// when it returns. A slot allocated before the latest
    /// [`sync`](Self::sync) began is handed out again only after a later
    /// sync completes (until then a power loss may revert the free, and the
    /// allocation must come back with its bytes); one allocated since is
    /// reusable at once (no sync promised it: see `Fresh`).
    ///
    /// Drop every [`PinGuard`] of the allocation before freeing it: a pin kept
    /// past the free still maps the bytes, which a later allocation (or
    /// [`trim`](Self::trim), which may punch them out of the file) reuses.
    /// Freeing the target of a root is allowed: the root stays, dangling
    /// (`root` returns it; a pin of it fails with `NotAllocated`;
    /// `segalloc verify` warns).
    ///
    /// # Errors
    ///
    /// [`Error::DoubleFree`], [`Error::NotAllocated`], [`Error::ForeignHandle`],
    /// [`Error::WrongShard`], [`Error::Poisoned`]. On error nothing changed.
    #[inline(always)]
    pub fn free(&self, handle: Handle) -> Result<()> {
        self.check_writable()?;
        let mut st = self.st.borrow_mut();
        let st = &mut *st;
        let Some((seg_id, slot)) = self.find(st, &handle) else {
            return Err(self.locate_error(st, &handle));
        };
        let Some(Some(seg)) = st.segments.get_mut(seg_id as usize) else {
            unreachable!("found");
        };
        if !seg.is_live(slot) {
            return Err(self.double_free(handle));
        }
        seg.clear_live(slot);
        st.live_per_class[seg.class_id() as usize] -= 1;
        st.stats.frees += 1;
        if !seg.take_fresh(slot, st.fresh.epoch()) {
            // Covered by a sync: held until a sync makes this free durable.
            st.released.slots.push((seg_id, slot));
            return Ok(());
        }
        seg.unhold(slot);
        let avail = &mut st.avail[seg.class_id() as usize];
        if !seg.in_avail {
            seg.in_avail = true;
            avail.push(seg_id);
        }
        // One segment with room is never released: skip the scan.
        if seg.held == 0 && avail.len() > 1 {
            self.release_if_spare(st, seg_id);
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn double_free(&self, handle: Handle) -> Error {
        Error::DoubleFree { handle }
    }

    /// The device and inode of data file `file` (for another shard's
    /// `pin_foreign`, which checks that it opened this very file): as the
    /// registry saw it when it opened the file (a live slot's file was),
    /// so it takes no descriptor; else opened for it.
    pub(crate) async fn data_file_identity(&self, file: u32) -> Result<(u64, u64)> {
        let id = self
            .data_files
            .borrow()
            .get(file as usize)
            .copied()
            .ok_or(Error::UnknownFile(file))?;
        if self.files.identity(id).is_none() {
            // Its open records it.
            drop(self.files.acquire_of(id, 0).await?);
        }
        self.files.identity(id).ok_or(Error::UnknownFile(file))
    }

    /// Whether `handle` names a live allocation of this shard.
    pub fn is_live(&self, handle: &Handle) -> bool {
        let st = self.st.borrow();
        match self.find(&st, handle) {
            Some((seg_id, slot)) => st.segments[seg_id as usize]
                .as_ref()
                .is_some_and(|seg| seg.is_live(slot)),
            None => false,
        }
    }

    #[inline(always)]
    fn check_live(&self, handle: &Handle) -> Result<SlotAt> {
        let st = self.st.borrow();
        if let Some((seg, slot, at)) = self.find_seg(&st, handle)
            && seg.is_live(slot)
        {
            return Ok(at);
        }
        Err(self.not_live_or_bad(&st, handle))
    }

    /// Why [`check_live`](Self::check_live) refused `handle` (off the hot
    /// path).
    #[cold]
    #[inline(never)]
    fn not_live_or_bad(&self, st: &State, handle: &Handle) -> Error {
        match self.find(st, handle) {
            Some(_) => not_live(*handle),
            None => self.locate_error(st, handle),
        }
    }

    /// Pin a live allocation of this shard (async: faults its window in if
    /// needed). The pin is writable unless the allocator is read-only. An
    /// allocation another task frees while the pin waits for its window is
    /// not pinned ([`Error::NotAllocated`]), unless its slot was allocated
    /// again meanwhile: a handle names a slot, so the new allocation has the
    /// same handle, and it is the one pinned (as by any later `pin` of that
    /// handle).
    ///
    /// # Errors
    ///
    /// As [`free`](Self::free) for a bad handle ([`Error::NotAllocated`] for
    /// a freed one), plus the errors of [`MappingManager::pin`].
    ///
    /// The future ([`PinFuture`]) pins a slot in a mapped window when first
    /// polled, as [`try_pin`](Self::try_pin) does; only a window to fault in
    /// makes it wait. Like an `async fn`, it does nothing until polled, and
    /// dropped before it completes it leaves nothing pinned.
    #[inline(always)]
    pub fn pin(&self, handle: Handle) -> PinFuture<'_> {
        PinFuture::new(self, handle)
    }

    /// The first poll of [`pin`](Self::pin): the pin of a slot in a mapped
    /// window, or `Pending` with the fault-in (boxed, out of line) in
    /// `slow`.
    #[inline(always)]
    pub(super) fn pin_start<'a>(
        &'a self,
        handle: Handle,
        slow: &mut Slow<'a, PinGuard>,
    ) -> Poll<Result<PinGuard>> {
        let at = match self.check_live(&handle) {
            Ok(at) => at,
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Some(p) = self.mm.pin_mapped(at) {
            return Poll::Ready(Ok(p));
        }
        *slow = Some(self.fault_pin_later(handle, at));
        Poll::Pending
    }

    /// The rest of a pin whose window is not mapped, boxed.
    #[cold]
    #[inline(never)]
    fn fault_pin_later(&self, handle: Handle, at: SlotAt) -> SlowBox<'_, PinGuard> {
        Box::pin(self.fault_pin(handle, at))
    }

    /// [`pin`](Self::pin) of a live slot `at` whose window is not mapped.
    async fn fault_pin(&self, handle: Handle, at: SlotAt) -> Result<PinGuard> {
        let fid = at.file;
        let writable = !self.files.is_read_only();
        if let Some(p) = self.mm.try_pin_of(
            fid,
            handle.offset,
            handle.length as u64,
            writable,
            Access::Allocator,
        )? {
            return Ok(p);
        }
        let pin = self
            .mm
            .pin_of(
                fid,
                handle.offset,
                handle.length as u64,
                writable,
                Access::Allocator,
            )
            .await?;
        // Another task may have freed the allocation while its window
        // faulted in (and a sync and `trim` may have reused or punched its
        // slot since): a pin of a freed slot would alias whatever comes
        // next, so look again.
        self.check_live(&handle)?;
        Ok(pin)
    }

    /// Pin on the hot path only (`Ok(None)`: use [`pin`](Self::pin)).
    ///
    /// # Errors
    ///
    /// As [`pin`](Self::pin).
    #[inline]
    pub fn try_pin(&self, handle: Handle) -> Result<Option<PinGuard>> {
        let at = self.check_live(&handle)?;
        if let Some(p) = self.mm.pin_mapped(at) {
            return Ok(Some(p));
        }
        self.mm.try_pin_of(
            at.file,
            handle.offset,
            handle.length as u64,
            !self.files.is_read_only(),
            Access::Allocator,
        )
    }
}

/// The slot index of `h`, a handle of segment `seg` that `take_slot` gave.
fn held_slot(seg: &Seg, h: &Handle) -> u32 {
    let (slot, _) = CLASSES[h.class_id as usize].div_rem(h.offset - seg.start());
    u32::try_from(slot).expect("slot index fits the bitmap")
}
