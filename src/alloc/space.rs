//! Free space of a shard's data files, in 64 KiB blocks.
//!
//! Segments are runs of blocks. New runs come from the best-fitting free run
//! (segments released by any class), else from the high-water mark of the
//! newest file. **Invariant:** no run, used or free, crosses a window
//! boundary; so a segment never crosses a window.

use std::collections::{BTreeMap, BTreeSet};

/// Where a run of blocks lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Run {
    pub file: u32,
    pub block: u32,
    pub blocks: u32,
}

pub(crate) struct Space {
    window_blocks: u32,
    file_blocks: u32,
    /// High-water mark (in blocks) of each file; files are numbered densely.
    hwm: Vec<u32>,
    by_size: BTreeSet<(u32, u32, u32)>,
    by_pos: BTreeMap<(u32, u32), u32>,
    free_blocks: u64,
}

impl Space {
    pub(crate) fn new(window_blocks: u32, file_blocks: u32) -> Space {
        assert!(window_blocks >= 1 && file_blocks.is_multiple_of(window_blocks));
        Space {
            window_blocks,
            file_blocks,
            hwm: Vec::new(),
            by_size: BTreeSet::new(),
            by_pos: BTreeMap::new(),
            free_blocks: 0,
        }
    }

    /// Files in use (`0..file_count()`).
    #[cfg(test)]
    pub(crate) fn file_count(&self) -> u32 {
        self.hwm.len() as u32
    }

    /// High-water mark of `file` in blocks.
    #[cfg(test)]
    pub(crate) fn hwm(&self, file: u32) -> u32 {
        self.hwm.get(file as usize).copied().unwrap_or(0)
    }

    /// Blocks below the high-water marks that are free.
    pub(crate) fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    /// Blocks below the high-water marks.
    pub(crate) fn extent_blocks(&self) -> u64 {
        self.hwm.iter().map(|&h| h as u64).sum()
    }

    /// Take a run of `blocks` blocks (`1..=window_blocks`).
    pub(crate) fn alloc(&mut self, blocks: u32) -> Run {
        assert!(blocks >= 1 && blocks <= self.window_blocks);
        if let Some(&(size, file, block)) = self.by_size.range((blocks, 0, 0)..).next() {
            self.remove_free(file, block, size);
            if size > blocks {
                self.insert_free_raw(file, block + blocks, size - blocks);
            }
            return Run {
                file,
                block,
                blocks,
            };
        }
        if self.hwm.is_empty() {
            self.hwm.push(0);
        }
        let mut file = self.hwm.len() as u32 - 1;
        let mut start = self.hwm[file as usize];
        let w = self.window_blocks;
        if start / w != (start + blocks - 1) / w {
            // Would cross a window: the rest of this window becomes free.
            let next = (start / w + 1) * w;
            if next > start {
                self.insert_free_raw(file, start, next - start);
            }
            start = next;
        }
        if start as u64 + blocks as u64 > self.file_blocks as u64 {
            // This file is full: its tail is free space, the run goes to a
            // new file.
            if start < self.file_blocks {
                self.insert_gap(file, start, self.file_blocks);
            }
            self.hwm[file as usize] = self.file_blocks;
            self.hwm.push(0);
            file += 1;
            start = 0;
        }
        self.hwm[file as usize] = start + blocks;
        Run {
            file,
            block: start,
            blocks,
        }
    }

    /// Give a run back; merges with free neighbours in the same window.
    pub(crate) fn free(&mut self, run: Run) {
        let Run {
            file,
            mut block,
            mut blocks,
        } = run;
        let w = self.window_blocks;
        // Merge with the previous free run.
        if !block.is_multiple_of(w)
            && let Some((&(pf, pb), &ps)) = self.by_pos.range(..(file, block)).next_back()
            && pf == file
            && pb + ps == block
            && pb / w == block / w
        {
            self.remove_free(pf, pb, ps);
            block = pb;
            blocks += ps;
        }
        // Merge with the next one.
        let end = block + blocks;
        if !end.is_multiple_of(w)
            && let Some(&ns) = self.by_pos.get(&(file, end))
        {
            self.remove_free(file, end, ns);
            blocks += ns;
        }
        // A run ending at the high-water mark lowers it instead.
        let last = file as usize + 1 == self.hwm.len();
        if last && self.hwm[file as usize] == block + blocks {
            self.hwm[file as usize] = block;
            // A free run now ending at the mark (from a skipped window tail)
            // is absorbed too.
            while let Some((&(pf, pb), &ps)) = self.by_pos.range(..(file, u32::MAX)).next_back() {
                if pf == file && pb + ps == self.hwm[file as usize] {
                    self.remove_free(pf, pb, ps);
                    self.hwm[file as usize] = pb;
                } else {
                    break;
                }
            }
            return;
        }
        self.insert_free_raw(file, block, blocks);
    }

    /// Rebuild from the runs in use (recovery). Runs must not overlap.
    pub(crate) fn rebuild(&mut self, mut used: Vec<Run>, file_count: u32) {
        self.hwm = vec![0; file_count as usize];
        self.by_size.clear();
        self.by_pos.clear();
        self.free_blocks = 0;
        used.sort();
        for r in &used {
            let h = &mut self.hwm[r.file as usize];
            *h = (*h).max(r.block + r.blocks);
        }
        let mut cursor: Vec<u32> = vec![0; file_count as usize];
        for r in &used {
            let c = cursor[r.file as usize];
            if r.block > c {
                self.insert_gap(r.file, c, r.block);
            }
            cursor[r.file as usize] = r.block + r.blocks;
        }
        // Trailing empty files keep their number; their space is all free
        // (hwm 0). Files before the last with free tails: the gap up to the
        // file end is free too.
        let last = file_count.saturating_sub(1);
        for f in 0..file_count {
            if f < last {
                let h = self.hwm[f as usize];
                if h < self.file_blocks {
                    self.insert_gap(f, h, self.file_blocks);
                    self.hwm[f as usize] = self.file_blocks;
                }
            }
        }
    }

    fn insert_gap(&mut self, file: u32, from: u32, to: u32) {
        let w = self.window_blocks;
        let mut at = from;
        while at < to {
            let end = ((at / w + 1) * w).min(to);
            self.insert_free_raw(file, at, end - at);
            at = end;
        }
    }

    fn insert_free_raw(&mut self, file: u32, block: u32, blocks: u32) {
        debug_assert!(blocks > 0);
        self.by_size.insert((blocks, file, block));
        self.by_pos.insert((file, block), blocks);
        self.free_blocks += blocks as u64;
    }

    fn remove_free(&mut self, file: u32, block: u32, blocks: u32) {
        self.by_size.remove(&(blocks, file, block));
        self.by_pos.remove(&(file, block));
        self.free_blocks -= blocks as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_skips_window_tails_and_reuses_them() {
        let mut s = Space::new(16, 64);
        let a = s.alloc(10);
        assert_eq!((a.file, a.block), (0, 0));
        let b = s.alloc(10); // would cross block 16
        assert_eq!(b.block, 16);
        assert_eq!(s.free_blocks(), 6);
        let c = s.alloc(6); // the skipped tail fits
        assert_eq!(c.block, 10);
        s.free(a);
        s.free(c);
        assert_eq!(s.free_blocks(), 16);
        let d = s.alloc(16);
        assert_eq!((d.file, d.block), (0, 0));
    }

    #[test]
    fn new_file_when_full_and_hwm_lowers() {
        let mut s = Space::new(16, 32);
        let a = s.alloc(16);
        let b = s.alloc(16);
        let c = s.alloc(4);
        assert_eq!((a.file, b.file, c.file), (0, 0, 1));
        s.free(c);
        assert_eq!(s.hwm(1), 0);
        s.free(b);
        assert_eq!(s.free_blocks(), 16);
    }

    #[test]
    fn rebuild_matches_live_state() {
        let mut s = Space::new(16, 64);
        let runs: Vec<Run> = (0..20).map(|i| s.alloc(1 + i % 5)).collect();
        let kept: Vec<Run> = runs.iter().copied().step_by(2).collect();
        for r in runs.iter().skip(1).step_by(2) {
            s.free(*r);
        }
        let mut t = Space::new(16, 64);
        t.rebuild(kept.clone(), s.file_count());
        // Both agree on what is in use.
        let used_s = s.extent_blocks() - s.free_blocks();
        let used_t = t.extent_blocks() - t.free_blocks();
        assert_eq!(used_s, used_t);
        assert_eq!(used_t, kept.iter().map(|r| r.blocks as u64).sum::<u64>());
    }
}
