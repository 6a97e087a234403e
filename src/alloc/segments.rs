//! Segment lifecycle: create a segment for a class (directory entry, run of
//! blocks, data file), publish it, release it when it empties.

#![warn(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicU64, Ordering};

use super::meta_map::Bitmap;
use super::space::{Run, Trim};
use super::{SegmentAllocator, State};
use crate::error::{Error, Result};
use crate::files::FileId;
use crate::format::classes::{BLOCK_BYTES, CLASSES, Class};
use crate::format::{self, EntryHeader};
use crate::format::{Handle, data_file_name};
use crate::mapping::SlotAt;

/// A published segment of this shard.
///
/// Two bitmaps: the durable one in the metadata file (a bit per live
/// allocation) and `held` in memory (a bit per slot that cannot be handed
/// out: live, or freed since the last sync began, so its free may not be
/// durable yet). Live slots are a subset of held ones.
pub(super) struct Seg {
    pub(super) run: Run,
    pub(super) slots: u32,
    /// The data file's id in the registry.
    pub(super) file_id: FileId,
    /// Slots whose durable bit is set.
    pub(super) live: u32,
    /// Slots held (live, or freed and not yet durably so).
    pub(super) held: u32,
    /// In memory, a bit per slot: held (set past `slots`) and fresh. (Boxed
    /// with the fresh bits' epoch: a `Seg` stays 128 bytes, and its handle
    /// template does not straddle cache lines.)
    bits: Box<SlotBits>,
    /// Bit `w` is set when word `w` of `bits.held` has a clear bit.
    open_words: u64,
    bitmap: Bitmap,
    /// Whether the segment is on its class's list of segments with room.
    pub(super) in_avail: bool,
    /// One past the highest slot taken since the segment was loaded: a slot
    /// at or above it extends into bytes this process has not used yet.
    pub(super) untouched_from: u32,
    /// Its class (kept here: a handle is checked against it on every use).
    pub(super) class: &'static Class,
    /// Byte offset of the segment in its data file.
    start: u64,
    /// Bytes of its slots (`slots × slot size`).
    bytes: u64,
    /// A handle of its slots, at offset 0: every field but the offset is
    /// what a handle of one of its slots must hold.
    template: Handle,
    /// The window it lies in (a segment never crosses one) and its start's
    /// offset inside that window.
    window: u32,
    window_start: u64,
}

/// A segment's in-memory bits, one allocation.
struct SlotBits {
    /// Set when the slot is held.
    held: [u64; format::BITMAP_WORDS],
    /// Set when the slot was taken in the epoch `fresh_epoch`.
    fresh: [u64; format::BITMAP_WORDS],
    /// The sync epoch `fresh` was set in (see [`Fresh`](super::fresh::Fresh)):
    /// under another, no slot is fresh.
    fresh_epoch: u64,
}

// `open_words` has a bit per bitmap word.
const _: () = assert!(std::mem::size_of::<Option<Seg>>() == 128);
const _: () = assert!(format::BITMAP_WORDS <= 64);

impl Seg {
    /// A segment whose durable bitmap is `bitmap` (all of its slots held
    /// that the bitmap marks live). The caller checked that the bitmap
    /// marks no slot past `slots`. `names`: the entry's index, the shard
    /// and the directory's tag (the rest of its handles' fields), and the
    /// window size.
    pub(super) fn new(
        header: &EntryHeader,
        run: Run,
        bitmap: Bitmap,
        file_id: FileId,
        names: SegNames,
    ) -> Seg {
        let mut bits = Box::new(SlotBits {
            held: [u64::MAX; format::BITMAP_WORDS],
            fresh: [0; format::BITMAP_WORDS],
            fresh_epoch: u64::MAX,
        });
        let mut open_words = 0u64;
        let mut live = 0u32;
        for (w, held) in (0u32..).zip(bits.held.iter_mut()) {
            let valid = header.slots.saturating_sub(w * 64).min(64);
            if valid == 0 {
                break;
            }
            let invalid = if valid == 64 { 0 } else { u64::MAX << valid };
            let word = bitmap.word(w).load(Ordering::Relaxed) & !invalid;
            live += word.count_ones();
            *held = word | invalid;
            if *held != u64::MAX {
                open_words |= 1 << w;
            }
        }
        let class = &CLASSES[header.class_id as usize];
        let start = u64::from(run.block) * BLOCK_BYTES;
        let window = start / names.window_bytes;
        let template = Handle {
            offset: 0,
            file: run.file,
            segment: names.entry,
            generation: header.generation,
            length: class.slot_bytes,
            dir_tag: names.dir_tag,
            shard: names.shard,
            class_id: header.class_id,
        };
        Seg {
            run,
            slots: header.slots,
            file_id,
            live,
            held: live,
            bits,
            open_words,
            bitmap,
            in_avail: false,
            untouched_from: 0,
            class,
            start,
            bytes: u64::from(header.slots) * u64::from(class.slot_bytes),
            template,
            window: u32::try_from(window).expect("a file has at most 2^32 windows"),
            window_start: start - window * names.window_bytes,
        }
    }

    /// Its size class (its handles' class).
    #[inline(always)]
    pub(super) fn class_id(&self) -> u8 {
        self.template.class_id
    }

    /// Its generation (its handles' generation).
    #[inline(always)]
    pub(super) fn generation(&self) -> u32 {
        self.template.generation
    }

    /// Slot `slot`: its handle and where it lies.
    #[inline(always)]
    pub(super) fn slot_at(&self, slot: u32) -> (Handle, SlotAt) {
        let rel = u64::from(slot) * u64::from(self.class.slot_bytes);
        let at = self.at(rel);
        (self.template.at(self.start + rel), at)
    }

    /// Where the slot `rel` bytes into the segment lies.
    #[inline(always)]
    fn at(&self, rel: u64) -> SlotAt {
        let len = u64::from(self.class.slot_bytes);
        SlotAt {
            file: self.file_id,
            window: self.window,
            window_offset: self.window_start + rel,
            len,
        }
    }

    /// The slot `h` names, if `h` is a handle of one of this segment's
    /// slots (it may be free): its index and where it lies.
    #[inline(always)]
    pub(super) fn slot_of(&self, h: &Handle) -> Option<(u32, SlotAt)> {
        // Field by field, without branches. (Reading the handle as three
        // words would take fewer instructions, but a handle its caller has
        // just stored field by field cannot be forwarded to wider loads from
        // the store buffer: a pin took 18 ns instead of 14.)
        let t = &self.template;
        let diff = (t.file ^ h.file)
            | (t.segment ^ h.segment)
            | (t.generation ^ h.generation)
            | (t.length ^ h.length)
            | (t.dir_tag ^ h.dir_tag)
            | u32::from(t.shard ^ h.shard)
            | u32::from(t.class_id ^ h.class_id);
        if diff != 0 {
            return None;
        }
        let rel = h.offset.wrapping_sub(self.start);
        if rel >= self.bytes {
            return None;
        }
        let (slot, rem) = self.class.div_rem(rel);
        if rem != 0 {
            return None;
        }
        // `slot < self.slots`, a u32: `rel < bytes = slots × slot size`.
        #[allow(clippy::cast_possible_truncation)]
        Some((slot as u32, self.at(rel)))
    }

    /// Word `w` of the segment's durable bitmap (in the metadata mapping).
    #[inline]
    pub(super) fn word(&self, w: u32) -> &AtomicU64 {
        self.bitmap.word(w)
    }

    /// Whether slot `slot` is live (its durable bit set).
    #[inline]
    pub(super) fn is_live(&self, slot: u32) -> bool {
        self.word(slot / 64).load(Ordering::Relaxed) & (1u64 << (slot % 64)) != 0
    }

    /// Take a slot that is not held: hold it and set its durable bit.
    /// `None` when every slot is held. O(1).
    #[inline]
    pub(super) fn take(&mut self) -> Option<u32> {
        if self.open_words == 0 {
            return None;
        }
        let w = self.open_words.trailing_zeros();
        let held = &mut self.bits.held[w as usize];
        let bit = (!*held).trailing_zeros();
        *held |= 1u64 << bit;
        if *held == u64::MAX {
            self.open_words &= !(1u64 << w);
        }
        self.held += 1;
        self.live += 1;
        let cell = self.bitmap.word(w);
        cell.store(
            cell.load(Ordering::Relaxed) | (1u64 << bit),
            Ordering::Relaxed,
        );
        Some(w * 64 + bit)
    }

    /// Clear slot `slot`'s durable bit (it stays held).
    #[inline]
    pub(super) fn clear_live(&mut self, slot: u32) {
        let cell = self.bitmap.word(slot / 64);
        let word = cell.load(Ordering::Relaxed);
        debug_assert!(word & (1u64 << (slot % 64)) != 0);
        cell.store(word & !(1u64 << (slot % 64)), Ordering::Relaxed);
        self.live -= 1;
    }

    /// Set slot `slot`'s durable bit again (held, hidden by `clear_live`).
    #[inline]
    pub(super) fn set_live(&mut self, slot: u32) {
        let cell = self.bitmap.word(slot / 64);
        let word = cell.load(Ordering::Relaxed);
        debug_assert!(word & (1u64 << (slot % 64)) == 0);
        cell.store(word | (1u64 << (slot % 64)), Ordering::Relaxed);
        self.live += 1;
    }

    /// Stop holding slot `slot` (not live): it can be handed out again.
    pub(super) fn unhold(&mut self, slot: u32) {
        let (w, bit) = (slot / 64, slot % 64);
        debug_assert!(!self.is_live(slot));
        let held = &mut self.bits.held[w as usize];
        debug_assert!(*held & (1u64 << bit) != 0);
        *held &= !(1u64 << bit);
        self.open_words |= 1u64 << w;
        self.held -= 1;
    }

    /// Mark slot `slot`, just taken, fresh in sync epoch `epoch`.
    #[inline(always)]
    pub(super) fn mark_fresh(&mut self, slot: u32, epoch: u64) {
        let bits = &mut *self.bits;
        if bits.fresh_epoch != epoch {
            bits.fresh_epoch = epoch;
            bits.fresh = [0; format::BITMAP_WORDS];
        }
        bits.fresh[(slot / 64) as usize] |= 1u64 << (slot % 64);
    }

    /// Forget slot `slot`'s fresh mark; whether it was fresh in `epoch`.
    #[inline(always)]
    pub(super) fn take_fresh(&mut self, slot: u32, epoch: u64) -> bool {
        let bits = &mut *self.bits;
        if bits.fresh_epoch != epoch {
            return false;
        }
        let word = &mut bits.fresh[(slot / 64) as usize];
        let mask = 1u64 << (slot % 64);
        let was = *word & mask != 0;
        *word &= !mask;
        was
    }

    /// Byte offset of the segment in its data file.
    #[inline]
    pub(super) fn start(&self) -> u64 {
        self.start
    }
}

/// What a segment's handles name besides its own header: its entry (the
/// segment id), the shard, the directory's tag; and the window size.
#[derive(Clone, Copy)]
pub(super) struct SegNames {
    pub(super) entry: u32,
    pub(super) shard: u16,
    pub(super) dir_tag: u32,
    pub(super) window_bytes: u64,
}

/// A directory entry and a run claimed by `new_segment`: given back if the
/// segment is not published (the call failed or was dropped).
struct Claim<'a> {
    alloc: &'a SegmentAllocator,
    entry: u32,
    run: Run,
    trim: Trim,
    armed: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.alloc.st.borrow_mut();
            st.space.give_back(self.run, self.trim);
            // The entry is still free on disk: reusable at once.
            st.free_entries.push(self.entry);
        }
    }
}

impl SegmentAllocator {
    /// Why [`locate`](Self::locate) rejected `h` (off the hot path).
    #[cold]
    #[inline(never)]
    pub(super) fn locate_error(&self, st: &State, h: &Handle) -> Error {
        let shown = || *h;
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
        if seg.generation() != h.generation {
            return not("segment was released and reused since");
        }
        if seg.class_id() != h.class_id {
            return not("wrong size class");
        }
        if seg.run.file != h.file {
            return not("wrong data file");
        }
        let slot_bytes = CLASSES[seg.class_id() as usize].slot_bytes as u64;
        if h.length as u64 != slot_bytes {
            return not("wrong length");
        }
        let start = seg.start();
        if h.offset < start || h.offset >= start + seg.slots as u64 * slot_bytes {
            return not("offset out of the segment's bounds");
        }
        not("offset is not a slot boundary")
    }

    /// Release segment `seg_id` if it holds no slot and its class has
    /// another such segment (one is kept per class to avoid churn).
    pub(super) fn release_if_spare(&self, st: &mut State, seg_id: u32) {
        let seg = st.segments[seg_id as usize]
            .as_ref()
            .expect("segment exists");
        if seg.held != 0 {
            return;
        }
        let empties = st.avail[seg.class_id() as usize]
            .iter()
            .filter(|&&s| {
                st.segments[s as usize]
                    .as_ref()
                    .is_some_and(|s| s.held == 0)
            })
            .count();
        if empties > 1 {
            self.release_segment(st, seg_id);
        }
    }

    /// Unpublish an empty segment. Its entry and run are reused only after a
    /// sync that began after this made the release durable.
    fn release_segment(&self, st: &mut State, seg_id: u32) {
        let seg = st.segments[seg_id as usize].take().expect("segment exists");
        st.segments_live -= 1;
        debug_assert_eq!((seg.live, seg.held), (0, 0));
        let avail = &mut st.avail[seg.class_id() as usize];
        if let Some(pos) = avail.iter().position(|&s| s == seg_id) {
            avail.swap_remove(pos);
        }
        self.meta
            .word(format::entry_offset(seg_id))
            .store(0, Ordering::Release);
        self.files.mark_dirty(self.meta_file);
        st.released.entries.push(seg_id);
        st.released.runs.push(seg.run);
    }

    /// Create a segment for `class_id`. Cancellation-safe: dropped before
    /// it publishes the segment, it gives the entry and the run back.
    pub(super) async fn new_segment(&self, class_id: u8) -> Result<()> {
        let c = CLASSES[class_id as usize];
        let blocks = u32::try_from(u64::from(c.segment_bytes) / BLOCK_BYTES)
            .expect("a segment fits a window");
        let mut claim = {
            let mut st = self.st.borrow_mut();
            // Claim the entry index now: other tasks may create segments
            // while this one awaits.
            let entry = match st.free_entries.pop() {
                Some(e) => e,
                None => {
                    st.directory_len += 1;
                    st.directory_len - 1
                }
            };
            super::trim::collect_punched(&mut st);
            let (run, trim) = st.space.alloc(blocks);
            Claim {
                alloc: self,
                entry,
                run,
                trim,
                armed: true,
            }
        };
        self.prepare_segment(claim.entry, claim.run, claim.trim)
            .await?;
        claim.armed = false;
        // The generation is issued at publication, with no await between:
        // a sync that began before it saw the data file's growth (see
        // `advance_durable_generation`).
        let generation = {
            let mut st = self.st.borrow_mut();
            let g = st.next_generation;
            st.next_generation = format::generation_after(g);
            g
        };
        let header = EntryHeader {
            class_id,
            generation,
            file: claim.run.file,
            block: claim.run.block,
            blocks,
            slots: c.slots,
        };
        self.publish_segment(claim.entry, header, claim.run);
        Ok(())
    }

    /// Room in the metadata file for `entry`, durable; the data file of
    /// `run` exists; `run` reserved.
    async fn prepare_segment(&self, entry: u32, run: Run, trim: Trim) -> Result<()> {
        let end = format::entry_offset(entry) + format::ENTRY_BYTES;
        self.meta.ensure(end).await?;
        self.reserve_entry_page(entry).await?;
        // The directory's on-disk length is about to cover `end`: the
        // file's new size must be durable first, or a power loss could keep
        // the length but not the size (recovery would then find the
        // directory truncated).
        if end > self.meta_durable_bytes.get() {
            let reserved = self.files.reserved_bytes(self.meta_file)?;
            if let Err(e) = self.files.sync(self.meta_file, true).await {
                return Err(self.poison_if_io(e));
            }
            self.meta_durable_bytes
                .set(self.meta_durable_bytes.get().max(reserved));
        }
        self.ensure_data_file(run.file).await?;
        // A run that may hold a hole (trimmed) is reserved again first.
        self.reserve_trimmed(run, trim).await?;
        self.grow_run(run).await
    }

    /// Give the page of directory entry `entry` its blocks if it is a hole
    /// of `meta.seg` (a copy made sparse, a punched page, a file grown
    /// sparse past its data): the entry's first write through the mapping
    /// would otherwise allocate them, and fault (SIGBUS) on a full file
    /// system. One `lseek(SEEK_DATA)`; a page that reads as a hole gets a
    /// `fallocate` (mode 0) through the ring, a no-op over blocks
    /// `ensure` reserved (an unwritten extent reads as a hole too).
    ///
    /// # Errors
    ///
    /// [`Error::NoSpace`] when the file system is full; [`Error::Io`].
    async fn reserve_entry_page(&self, entry: u32) -> Result<()> {
        use std::os::fd::AsFd;
        let page = format::entry_offset(entry) / format::META_PAGE_BYTES * format::META_PAGE_BYTES;
        let lease = self.files.acquire_of(self.meta_file, 0).await?;
        let path = self.meta_path();
        let hole = match crate::sys::data_region(lease.shared_fd().as_fd(), page) {
            Ok(Some((start, _))) => start > page,
            Ok(None) => true,
            Err(e) => return Err(Error::io("lseek", Some(&path), e)),
        };
        if !hole {
            return Ok(());
        }
        self.reserve_blocks(&lease, path, page, format::META_PAGE_BYTES)
            .await
    }

    /// Grow the data file of `run` past the run's end (in growth steps,
    /// never past its window). The growth is not synced here: a completed
    /// sync makes it durable along with the data (the file is marked dirty),
    /// and recovery drops a segment whose growth a power loss took before a
    /// sync promised it (see [`format::DURABLE_GEN_OFFSET`]).
    async fn grow_run(&self, run: Run) -> Result<()> {
        let id = self.data_files.borrow()[run.file as usize];
        let end = (u64::from(run.block) + u64::from(run.blocks)) * BLOCK_BYTES;
        let step = self.mm.config().growth_step_bytes;
        self.mm.reserve_of(id, end, step).await?;
        Ok(())
    }

    /// Write the entry (counters, bitmap, header, then the state word that
    /// publishes it) and make the segment available to its class.
    fn publish_segment(&self, entry: u32, header: EntryHeader, run: Run) {
        // The on-disk directory length only grows, and before the entry is
        // published, so recovery scans every published entry.
        let len_word = self.meta.word(format::HWM_OFFSET);
        let on_disk = format::decode_counter(len_word.load(Ordering::Relaxed)).unwrap_or(0);
        if entry + 1 > on_disk {
            len_word.store(format::encode_counter(entry + 1), Ordering::Release);
        }
        let gen_word = self.meta.word(format::GEN_OFFSET);
        let issued = format::decode_counter(gen_word.load(Ordering::Relaxed)).unwrap_or(0);
        let next = format::generation_after(header.generation);
        if issued == 0 || format::issued_later(next, issued) {
            gen_word.store(format::encode_counter(next), Ordering::Release);
        }
        let off = format::entry_offset(entry);
        let bitmap = self.meta.bitmap(entry);
        for w in (0u32..).take(format::BITMAP_WORDS) {
            bitmap.word(w).store(0, Ordering::Relaxed);
        }
        self.meta.write(off + 8, &header.body());
        self.meta
            .word(off)
            .store(header.state_word(), Ordering::Release);
        self.files.mark_dirty(self.meta_file);
        let file_id = self.data_files.borrow()[run.file as usize];
        let mut seg = Seg::new(&header, run, bitmap, file_id, self.seg_names(entry));
        seg.in_avail = true;
        let mut st = self.st.borrow_mut();
        if st.segments.len() <= entry as usize {
            st.segments.resize_with(entry as usize + 1, || None);
        }
        debug_assert!(st.segments[entry as usize].is_none());
        st.segments[entry as usize] = Some(seg);
        st.segments_live += 1;
        st.avail[header.class_id as usize].push(entry);
    }

    async fn ensure_data_file(&self, file: u32) -> Result<()> {
        while self.data_files.borrow().len() <= file as usize {
            let n = u32::try_from(self.data_files.borrow().len()).expect("file numbers are u32");
            let id = self
                .files
                .register_owned(self.dir.join(data_file_name(n)), &self.shard_lock);
            self.data_files.borrow_mut().push(id);
        }
        let id = self.data_files.borrow()[file as usize];
        // Open (creating) the file, and make its name durable before any
        // segment refers to it, also when a crash left it before its folder
        // was synced: otherwise a power loss could keep the directory entry
        // of the segment but not the file (recovery: "missing").
        if self.files.make_entry_durable(id).await? {
            self.st.borrow_mut().released.new_files = true;
        }
        Ok(())
    }
}
