//! Recovery: one [`scan`](crate::format::scan) of the shard's metadata,
//! then apply what it found. Fails on the first finding that refuses the
//! shard; repairs (when writable) what it resolves: a segment that lost an
//! overlap has its state word and its bitmap cleared (so a later reuse of
//! the entry can never meet its old bits), root slots that lost are cleared.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::SegmentAllocator;
use super::segments::Seg;
use super::space::Run;
use crate::error::{Error, Result};
use crate::format::scan::{
    self, DataFileLen, Defect, Finding, FindingFile, MetaSource, ScanTarget, ShardScan, Superblock,
};
use crate::format::{self, data_file_name};

/// The metadata file read through the allocator's pinned windows: its
/// first `size_bytes` (its [`scan_extent`](scan::scan_extent); reads past
/// them are short, as at the end of a file). Only its data, up to
/// `data_end`, is mapped: the holes past it read as zeros, and the scan
/// skips the holes (`data_region`, as `segalloc verify` does), so a sparse
/// file costs what it holds, whatever its mark says.
struct Mapped<'a> {
    alloc: &'a SegmentAllocator,
    size_bytes: u64,
    data_end: u64,
    fd: &'a std::os::fd::OwnedFd,
}

impl MetaSource for Mapped<'_> {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= self.size_bytes {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size_bytes - off) as usize;
        let buf = &mut buf[..n];
        if off >= self.data_end {
            // Holes only from `data_end` on (`data_end` of `recover`).
            buf.fill(0);
            return Ok(n);
        }
        // The scan reads at most one page at a time, page aligned, and a
        // window and `data_end` are multiples of a page: `off..off + n` is
        // inside one window, pinned up to `data_end` by `recover`.
        self.alloc.meta.read(off, buf);
        Ok(n)
    }

    fn data_region(&mut self, off: u64) -> Result<Option<(u64, u64)>> {
        if off >= self.data_end {
            return Ok(None);
        }
        use std::os::fd::AsFd;
        let r = crate::sys::data_region(self.fd.as_fd(), off)
            .map_err(|e| Error::io("lseek", Some(&self.alloc.meta_path()), e))?;
        Ok(r.and_then(|(start, end)| {
            (start < self.data_end).then_some((start, end.min(self.data_end)))
        }))
    }
}

/// Where the data of the file `fd` ends below `limit`: past the end of its
/// last data region there (page aligned up), holes only. Each region is
/// looked up once (`lseek(SEEK_DATA)`, `SEEK_HOLE`): as many lookups as the
/// file has data regions below `limit`.
fn data_end_below(fd: &std::os::fd::OwnedFd, limit: u64) -> std::io::Result<u64> {
    use std::os::fd::AsFd;
    let mut end = 0;
    while end < limit {
        match crate::sys::data_region(fd.as_fd(), end)? {
            Some((start, stop)) if start < limit => end = stop.max(start + 1),
            _ => break,
        }
    }
    Ok(end
        .min(limit)
        .div_ceil(format::META_PAGE_BYTES)
        .saturating_mul(format::META_PAGE_BYTES))
}

/// Directory entries whose bytes lie (at least in part) below `bytes`.
fn entries_below(bytes: u64) -> u64 {
    let pages = bytes
        .saturating_sub(format::DIR_OFFSET)
        .div_ceil(format::META_PAGE_BYTES);
    pages.saturating_mul(format::ENTRIES_PER_PAGE)
}

impl SegmentAllocator {
    /// Restore the state recorded in the metadata file of `size` bytes.
    pub(super) async fn recover(&self, size: u64) -> Result<()> {
        // Only what the scan can read is mapped (the directory up to its
        // high-water mark, and a little past it): a file grown past that,
        // a sparse one of any size included, must not cost a window per
        // `window_bytes` of it, nor wait for windows the cap cannot give.
        let head = size.min(format::META_PAGE_BYTES);
        self.meta.map_existing(head).await?;
        let mark = (size >= format::HWM_OFFSET + 8).then(|| {
            let mut b = [0u8; 8];
            self.meta.read(format::HWM_OFFSET, &mut b);
            u64::from_le_bytes(b)
        });
        let extent = scan::scan_extent(size, mark);
        // Map the file's data only, not the holes that follow: a sparse
        // file of any size (a mark that claims billions of entries) costs
        // neither a window per `window_bytes` of holes nor a read of them.
        let lease = self.files.acquire_of(self.meta_file, 0).await?;
        let fd = lease.shared_fd();
        let data_end = data_end_below(fd, extent)
            .map_err(|e| Error::io("lseek", Some(&self.meta_path()), e))?
            .max(head)
            .min(extent.max(head));
        self.meta.map_existing(data_end).await?;
        let dir = self.dir.clone();
        let data_file = move |n: u32| data_file_len(dir.join(data_file_name(n)));
        let target = ScanTarget {
            geometry: &self.manifest,
            shard: self.shard,
            meta_bytes: size,
            data_file: &data_file,
        };
        let mut src = Mapped {
            alloc: self,
            size_bytes: extent,
            data_end,
            fd,
        };
        let found = scan::scan(&mut src, &target)?;
        if let Some(f) = found.refusal() {
            return Err(self.refusal(f, &found));
        }
        if mark == Some(0) && !self.files.is_read_only() {
            // A creation cut short by a power loss may have kept the
            // superblock's sector and lost the mark's: an all-zero mark,
            // which reads as 0. Written now, it is durable (the open syncs
            // the metadata) before this open makes any data file, so an
            // all-zero mark stays a sign of damage (`Defect::MarkZeroed`).
            self.meta
                .word(format::HWM_OFFSET)
                .store(format::encode_counter(0), Ordering::Release);
            self.files.mark_dirty(self.meta_file);
        }
        // Something else where a kept segment's data file should be (a
        // directory, a FIFO, a symlink: never followed): refused now, not at
        // its first use. Each file is looked at once (a shard may have
        // tens of thousands of segments in a few files).
        let files: std::collections::BTreeSet<u32> =
            found.kept_segments().map(|x| x.header.file).collect();
        for n in files {
            if data_file(n) == DataFileLen::Unknown {
                return Err(Error::Corrupt {
                    what: self.dir.join(data_file_name(n)).display().to_string(),
                    detail: "data file referenced by the directory is not a regular file".into(),
                });
            }
        }
        for f in &found.findings {
            let file = match f.file {
                FindingFile::Meta => self.meta_path(),
                FindingFile::Data(n) => self.dir.join(data_file_name(n)),
            };
            tracing::warn!(
                shard = self.shard,
                file = %file.display(),
                entry = ?f.entry,
                offset = ?f.offset,
                "{}",
                f.defect
            );
        }
        if !matches!(found.superblock, Superblock::Valid(..)) {
            return Err(self.corrupt("superblock is blank"));
        }
        self.drop_losers(&found);
        drop(lease);
        self.apply_segments(&found, data_end)?;
        self.apply_roots(&found);
        self.set_durable_generation(&found).await
    }

    /// A directory written before the durable generation existed (word 0,
    /// or torn) made every segment's growth durable before publishing it:
    /// record that every segment found so far is covered, durably, before a
    /// segment that relies on the word can be published.
    async fn set_durable_generation(&self, found: &ShardScan) -> Result<()> {
        if self.files.is_read_only() || found.durable_generation.is_some_and(|g| g != 0) {
            return Ok(());
        }
        self.meta.word(format::DURABLE_GEN_OFFSET).store(
            format::encode_counter(found.next_generation),
            Ordering::Release,
        );
        self.files.sync(self.meta_file, true).await
    }

    /// The error for a finding that refuses the shard.
    fn refusal(&self, f: &Finding, found: &ShardScan) -> Error {
        let data_path = |n: u32| self.dir.join(data_file_name(n));
        match (&f.defect, f.file) {
            (Defect::DataFileShort { size_bytes, .. }, FindingFile::Data(n)) => {
                // The end of the last live slot of any segment in the file.
                let needed_bytes = found
                    .findings
                    .iter()
                    .filter(|g| g.file == FindingFile::Data(n))
                    .filter_map(|g| match g.defect {
                        Defect::DataFileShort { needed_bytes, .. } => Some(needed_bytes),
                        _ => None,
                    })
                    .max()
                    .unwrap_or(0);
                Error::DataFileTruncated {
                    path: data_path(n),
                    needed_bytes,
                    actual_bytes: *size_bytes,
                }
            }
            (Defect::SuperblockOtherShard { on_disk, folder }, _) => Error::Mismatch {
                what: "shard index in meta.seg",
                on_disk: *on_disk as u64,
                requested: *folder as u64,
            },
            (Defect::DataFileMissing { .. }, FindingFile::Data(n)) => Error::Corrupt {
                what: data_path(n).display().to_string(),
                detail: "data file referenced by the directory is missing".into(),
            },
            (d, _) => match f.entry {
                Some(i) => self.corrupt(format!("directory entry {i}: {d}")),
                None => self.corrupt(d.to_string()),
            },
        }
    }

    /// Clear the entries of dropped segments (that lost an overlap, or
    /// whose growth a power loss took): the state word first (the entry is
    /// free from then on), then the bitmap, so no later header of the entry
    /// can meet the old bits. Both become durable at the first sync, before
    /// the entry is reused (it waits in quarantine).
    fn drop_losers(&self, found: &ShardScan) {
        let lost_growth: Vec<u32> = found
            .findings
            .iter()
            .filter(|f| matches!(f.defect, Defect::GrowthNotDurable { .. }))
            .filter_map(|f| f.entry)
            .collect();
        for seg in found.segments.iter().filter(|s| s.dropped) {
            let why = if lost_growth.contains(&seg.entry) {
                "a power loss took the data file's growth under an unsynced segment; dropping it"
            } else {
                "overlapping segments after a crash; keeping the later one"
            };
            tracing::warn!(
                shard = self.shard,
                entry = seg.entry,
                generation = seg.header.generation,
                "{why}"
            );
            if self.files.is_read_only() {
                continue;
            }
            self.meta
                .word(format::entry_offset(seg.entry))
                .store(0, Ordering::Release);
            let bitmap = format::bitmap_offset(seg.entry);
            for wi in 0..format::BITMAP_WORDS as u64 {
                self.meta.word(bitmap + wi * 8).store(0, Ordering::Relaxed);
            }
        }
    }

    /// Data files, segments, free space, free entries, generations.
    /// The directory's length is the mark, or less when the file's data
    /// ends below it (`data_end`): the entries past there lie in holes,
    /// zeros on disk, so they are free (and durably so: no quarantine), and
    /// they are taken as new ones as the directory grows. A mark that
    /// claims billions of entries over a sparse file so costs no table of
    /// that length (the table is as long as the last entry the file holds
    /// is far). Entries in holes below that end are listed free.
    fn apply_segments(&self, found: &ShardScan, data_end: u64) -> Result<()> {
        let file_count = self.register_data_files(found)?;
        let hwm = found.hwm.unwrap_or(0);
        let hwm = u32::try_from(entries_below(data_end)).map_or(hwm, |n| n.min(hwm));
        let mut st = self.st.borrow_mut();
        st.segments.resize_with(hwm as usize, || None);
        let mut runs = Vec::with_capacity(found.segments.len());
        for s in found.kept_segments() {
            let e = &s.header;
            let run = Run {
                file: e.file,
                block: e.block,
                blocks: e.blocks,
            };
            let file_id = self.data_files.borrow()[e.file as usize];
            let names = self.seg_names(s.entry);
            let mut seg = Seg::new(e, run, self.meta.bitmap(s.entry), file_id, names);
            debug_assert_eq!(seg.live, s.live);
            st.live_per_class[e.class_id as usize] += u64::from(seg.live);
            if seg.live < seg.slots {
                seg.in_avail = true;
                st.avail[e.class_id as usize].push(s.entry);
            }
            runs.push(seg.run);
            debug_assert!(st.segments[s.entry as usize].is_none());
            st.segments[s.entry as usize] = Some(seg);
            st.segments_live += 1;
        }
        st.space.rebuild(runs, file_count);
        st.directory_len = hwm;
        // The free entries read, and those in holes below the directory's
        // end (a page a power loss kept as a hole, or a copy made sparse):
        // free as any other (`verify` counts them so).
        let mut free = found.free_entries.clone();
        for &(first, end) in &found.free_entry_holes {
            free.extend(first..end.min(hwm));
        }
        free.sort_unstable_by(|a, b| b.cmp(a));
        // Which free entries were released since the last sync (their zeroed
        // state word and bitmap may not be durable) cannot be told after a
        // restart: quarantine them all until the first sync, so a torn write
        // can never pair a new header with an old bitmap.
        st.released.entries = free;
        // Never below the persisted counter (the scan takes the larger of it
        // and the highest generation found + 1).
        st.next_generation = found.next_generation;
        Ok(())
    }

    /// Register data files `0..n`: every one a kept segment refers to (the
    /// scan checked they exist), then any that follow; returns `n`.
    fn register_data_files(&self, found: &ShardScan) -> Result<u32> {
        let last = found.kept_segments().map(|s| s.header.file).max();
        let mut file_count = match last {
            Some(n) => n
                .checked_add(1)
                .ok_or_else(|| self.corrupt("data file number out of range"))?,
            None => 0,
        };
        while self.dir.join(data_file_name(file_count)).exists() {
            file_count += 1;
        }
        for n in 0..file_count {
            let id = self
                .files
                .register_owned(self.dir.join(data_file_name(n)), &self.shard_lock);
            self.data_files.borrow_mut().push(id);
        }
        Ok(file_count)
    }

    /// The roots the scan kept; clear the slots that lost.
    fn apply_roots(&self, found: &ShardScan) {
        if !self.files.is_read_only() {
            for &i in &found.root_slots_to_clear {
                self.meta
                    .word(format::root_offset(i))
                    .store(0, Ordering::Release);
            }
        }
        let mut st = self.st.borrow_mut();
        st.roots = found
            .roots
            .iter()
            .map(|r| (r.name.clone(), (r.slot, r.seq, r.handle)))
            .collect();
        st.root_seq = found.max_root_seq;
    }
}

/// What the file system holds at a data file's path: its size when it is a
/// regular file; missing when nothing is there to open (a dangling symlink
/// included).
fn data_file_len(p: PathBuf) -> DataFileLen {
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_file() => DataFileLen::Bytes(m.len()),
        _ if !p.exists() => DataFileLen::Missing,
        _ => DataFileLen::Unknown,
    }
}
