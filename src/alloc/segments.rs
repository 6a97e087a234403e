//! Segment lifecycle: create a segment for a class (directory entry, run of
//! blocks, data file), publish it, release it when it empties.

use std::sync::atomic::{AtomicU64, Ordering};

use super::classes::{BLOCK_BYTES, CLASSES};
use super::meta_map::Bitmap;
use super::space::{Run, Trim};
use super::{SegmentAllocator, State};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::meta::{self, EntryHeader};

/// A published segment of this shard.
pub(super) struct Seg {
    pub(super) class_id: u8,
    pub(super) generation: u32,
    pub(super) run: Run,
    pub(super) slots: u32,
    pub(super) live: u32,
    pub(super) bitmap: Bitmap,
    pub(super) hint: u32,
    pub(super) in_avail: bool,
}

impl Seg {
    /// Word `w` of the segment's slot bitmap (in the metadata mapping).
    #[inline]
    pub(super) fn word(&self, w: u32) -> &AtomicU64 {
        self.bitmap.word(w)
    }

    /// Byte offset of the segment in its data file.
    pub(super) fn start(&self) -> u64 {
        u64::from(self.run.block) * BLOCK_BYTES
    }
}

/// File name of data file `n` in a shard folder.
pub(crate) fn data_file_name(n: u32) -> String {
    format!("data-{n:06}.seg")
}

impl SegmentAllocator {
    /// Why [`locate`](Self::locate) rejected `h` (off the hot path).
    #[cold]
    #[inline(never)]
    pub(super) fn locate_error(&self, st: &State, h: &Handle) -> Error {
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

    pub(super) fn release_segment(&self, st: &mut State, seg_id: u32) {
        let seg = st.segments[seg_id as usize].take().expect("segment exists");
        debug_assert_eq!(seg.live, 0);
        let avail = &mut st.avail[seg.class_id as usize];
        if let Some(pos) = avail.iter().position(|&s| s == seg_id) {
            avail.swap_remove(pos);
        }
        self.meta
            .word(meta::entry_offset(seg_id))
            .store(0, Ordering::Release);
        st.quarantine.push(seg_id);
        st.space.free(seg.run);
    }

    /// Create a segment for `class_id`.
    pub(super) async fn new_segment(&self, class_id: u8) -> Result<()> {
        let c = CLASSES[class_id as usize];
        let blocks = (c.segment_bytes as u64 / BLOCK_BYTES) as u32;
        let (entry, run, trim, generation) = {
            let mut st = self.st.borrow_mut();
            // Reserve the entry index now: other tasks may create segments
            // while this one awaits.
            let entry = match st.free_entries.pop() {
                Some(e) => e,
                None => {
                    st.directory_len += 1;
                    st.directory_len - 1
                }
            };
            let (run, trim) = st.space.alloc(blocks);
            let generation = st.next_generation;
            st.next_generation = st.next_generation.wrapping_add(1).max(1);
            (entry, run, trim, generation)
        };
        if let Err(e) = self.prepare_segment(entry, run, trim).await {
            let mut st = self.st.borrow_mut();
            st.space.give_back(run, trim);
            // The entry is still free on disk: reusable at once.
            st.free_entries.push(entry);
            return Err(e);
        }
        let header = EntryHeader {
            class_id,
            generation,
            file: run.file,
            block: run.block,
            blocks,
            slots: c.slots,
        };
        self.publish_segment(entry, header, run);
        Ok(())
    }

    /// Room in the metadata file for `entry`, durable; the data file of
    /// `run` exists; `run` reserved.
    async fn prepare_segment(&self, entry: u32, run: Run, trim: Trim) -> Result<()> {
        let end = meta::entry_offset(entry) + meta::ENTRY_BYTES;
        self.meta.ensure(end).await?;
        // The directory's on-disk length is about to cover `end`: the
        // file's new size must be durable first, or a power loss could keep
        // the length but not the size (recovery would then find the
        // directory truncated).
        if end > self.meta_durable_bytes.get() {
            let reserved = self.files.reserved_bytes(self.meta_file)?;
            if let Err(e) = self.files.sync(self.meta_file, true).await {
                return Err(self.poison(e));
            }
            self.meta_durable_bytes
                .set(self.meta_durable_bytes.get().max(reserved));
        }
        self.ensure_data_file(run.file).await?;
        // A run that may hold a hole (trimmed) is reserved again first.
        self.reserve_trimmed(run, trim).await
    }

    /// Write the entry (counters, bitmap, header, then the state word that
    /// publishes it) and make the segment available to its class.
    fn publish_segment(&self, entry: u32, header: EntryHeader, run: Run) {
        // The on-disk directory length only grows, and before the entry is
        // published, so recovery scans every published entry.
        let len_word = self.meta.word(meta::HWM_OFFSET);
        let on_disk = meta::decode_hwm(len_word.load(Ordering::Relaxed)).unwrap_or(0);
        if entry + 1 > on_disk {
            len_word.store(meta::encode_hwm(entry + 1), Ordering::Release);
        }
        let gen_word = self.meta.word(meta::GEN_OFFSET);
        let issued = meta::decode_hwm(gen_word.load(Ordering::Relaxed)).unwrap_or(0);
        let next = header.generation.wrapping_add(1).max(1);
        if next > issued {
            gen_word.store(meta::encode_hwm(next), Ordering::Release);
        }
        let off = meta::entry_offset(entry);
        let bitmap = self.meta.bitmap(entry);
        for w in 0..meta::BITMAP_WORDS as u32 {
            bitmap.word(w).store(0, Ordering::Relaxed);
        }
        self.meta.write(off + 8, &header.body());
        self.meta
            .word(off)
            .store(header.state_word(), Ordering::Release);
        let mut st = self.st.borrow_mut();
        if st.segments.len() <= entry as usize {
            st.segments.resize_with(entry as usize + 1, || None);
        }
        st.segments[entry as usize] = Some(Seg {
            class_id: header.class_id,
            generation: header.generation,
            run,
            slots: header.slots,
            live: 0,
            bitmap,
            hint: 0,
            in_avail: true,
        });
        st.avail[header.class_id as usize].push(entry);
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
}
