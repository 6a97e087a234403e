//! Free space of a shard's data files, in 64 KiB blocks.
//!
//! Segments are runs of blocks. New runs come from the best-fitting free run
//! (segments released by any class), else from the used end of the
//! newest file. **Invariant:** no run, used or free, crosses a window
//! boundary; so a segment never crosses a window.
//!
//! **Trimmed space.** A free run may have been punched out of its file
//! ([`SegmentAllocator::trim`](super::SegmentAllocator::trim)), or — after a
//! reopen — may have been: its blocks are then not reserved, and a write
//! through a mapping into them on a full disk would raise `SIGBUS`. Every free
//! run carries a [`Trim`] state, merging takes the worse of the two states,
//! and [`Space::alloc`] reports the state of the run it hands out, so the
//! caller re-reserves it before anything is published in it. Space above a
//! file's used end that may hold holes (a trimmed run the mark was
//! lowered over, or anything after a reopen) is tracked per file too.
//! **Invariant:** a run handed out as [`Trim::Reserved`] holds no hole below
//! its file's reserved size.

#![warn(clippy::cast_possible_truncation)]

use std::collections::{BTreeMap, BTreeSet};

/// Where a run of blocks lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Run {
    pub file: u32,
    pub block: u32,
    pub blocks: u32,
}

/// Whether the blocks of a free run are reserved in their file. Ordered from
/// best to worst: merging two runs keeps the worse state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Trim {
    /// Reserved (allocated) wherever the file's reserved size covers it.
    Reserved,
    /// Not known (recovered after a reopen: an earlier run may have punched
    /// it). Must be re-reserved before use; may be punched.
    Unknown,
    /// Punched by `trim` (in part or in full). Must be re-reserved before use.
    Punched,
}

impl Trim {
    /// Whether a run in this state must be re-reserved before it is used.
    pub(crate) fn needs_reserve(self) -> bool {
        self != Trim::Reserved
    }
}

pub(crate) struct Space {
    window_blocks: u32,
    file_blocks: u32,
    /// Per file, the end (in blocks) of the part ever handed out: new runs
    /// are bumped from it; files are numbered densely.
    used_end: Vec<u32>,
    /// Per file: blocks in `[used_end, holes_to)` may be holes (a non-reserved
    /// run the mark was lowered over, or anything after a reopen).
    holes_to: Vec<u32>,
    by_size: BTreeSet<(u32, u32, u32)>,
    by_pos: BTreeMap<(u32, u32), (u32, Trim)>,
    free_blocks: u64,
}

impl Space {
    pub(crate) fn new(window_blocks: u32, file_blocks: u32) -> Space {
        assert!(window_blocks >= 1 && file_blocks.is_multiple_of(window_blocks));
        Space {
            window_blocks,
            file_blocks,
            used_end: Vec::new(),
            holes_to: Vec::new(),
            by_size: BTreeSet::new(),
            by_pos: BTreeMap::new(),
            free_blocks: 0,
        }
    }

    /// Files in use (`0..file_count()`).
    #[cfg(test)]
    pub(crate) fn file_count(&self) -> u32 {
        u32::try_from(self.used_end.len()).expect("file numbers are u32")
    }

    /// The used end of `file`, in blocks.
    #[cfg(test)]
    pub(crate) fn used_end(&self, file: u32) -> u32 {
        self.used_end.get(file as usize).copied().unwrap_or(0)
    }

    /// Blocks below the used ends that are free.
    pub(crate) fn free_blocks(&self) -> u64 {
        self.free_blocks
    }

    /// Blocks below the used ends.
    pub(crate) fn used_blocks(&self) -> u64 {
        self.used_end.iter().map(|&h| h as u64).sum()
    }

    /// Take a run of `blocks` blocks (`1..=window_blocks`), with the state of
    /// its blocks: unless [`Trim::Reserved`], the caller must reserve the run
    /// again before handing any of it out, or give it back with
    /// [`give_back`](Self::give_back) and the same state.
    pub(crate) fn alloc(&mut self, blocks: u32) -> (Run, Trim) {
        assert!(blocks >= 1 && blocks <= self.window_blocks);
        if let Some(&(size, file, block)) = self.by_size.range((blocks, 0, 0)..).next() {
            let trim = self.remove_free(file, block, size);
            if size > blocks {
                self.insert_free_raw(file, block + blocks, size - blocks, trim);
            }
            let run = Run {
                file,
                block,
                blocks,
            };
            return (run, trim);
        }
        if self.used_end.is_empty() {
            self.push_file();
        }
        let mut file = u32::try_from(self.used_end.len() - 1).expect("file numbers are u32");
        let mut start = self.used_end[file as usize];
        let w = self.window_blocks;
        if start / w != (start + blocks - 1) / w {
            // Would cross a window: the rest of this window becomes free.
            let next = (start / w + 1) * w;
            if next > start {
                let trim = self.above_used_end_state(file, start);
                self.insert_free_raw(file, start, next - start, trim);
            }
            start = next;
        }
        if start as u64 + blocks as u64 > self.file_blocks as u64 {
            // This file is full: its tail is free space, the run goes to a
            // new file.
            if start < self.file_blocks {
                self.insert_gap(file, start, self.file_blocks, None);
            }
            self.used_end[file as usize] = self.file_blocks;
            self.push_file();
            file += 1;
            start = 0;
        }
        let trim = self.above_used_end_state(file, start);
        self.used_end[file as usize] = start + blocks;
        let run = Run {
            file,
            block: start,
            blocks,
        };
        (run, trim)
    }

    fn push_file(&mut self) {
        self.used_end.push(0);
        self.holes_to.push(0);
    }

    /// State of blocks from `block` up, at or above `file`'s used end.
    fn above_used_end_state(&self, file: u32, block: u32) -> Trim {
        if block < self.holes_to[file as usize] {
            Trim::Unknown
        } else {
            Trim::Reserved
        }
    }

    /// Give back a run of a released segment (its blocks reserved); merges
    /// with free neighbours in the same window.
    pub(crate) fn free(&mut self, run: Run) {
        self.give_back(run, Trim::Reserved);
    }

    /// Give back a run in state `trim` (a run taken by [`alloc`](Self::alloc)
    /// and not used, or one that was punched).
    pub(crate) fn give_back(&mut self, run: Run, mut trim: Trim) {
        let Run {
            file,
            mut block,
            mut blocks,
        } = run;
        let w = self.window_blocks;
        // Merge with the previous free run.
        if !block.is_multiple_of(w)
            && let Some((&(pf, pb), &(ps, _))) = self.by_pos.range(..(file, block)).next_back()
            && pf == file
            && pb + ps == block
            && pb / w == block / w
        {
            trim = trim.max(self.remove_free(pf, pb, ps));
            block = pb;
            blocks += ps;
        }
        // Merge with the next one.
        let end = block + blocks;
        if !end.is_multiple_of(w)
            && let Some(&(ns, _)) = self.by_pos.get(&(file, end))
        {
            trim = trim.max(self.remove_free(file, end, ns));
            blocks += ns;
        }
        // A run ending at the used end lowers it instead.
        let last = file as usize + 1 == self.used_end.len();
        if last && self.used_end[file as usize] == block + blocks {
            self.lower_used_end(file, block, block + blocks, trim);
            // A free run now ending at the mark (from a skipped window tail)
            // is absorbed too.
            while let Some((&(pf, pb), &(ps, _))) =
                self.by_pos.range(..(file, u32::MAX)).next_back()
            {
                if pf == file && pb + ps == self.used_end[file as usize] {
                    let t = self.remove_free(pf, pb, ps);
                    self.lower_used_end(file, pb, pb + ps, t);
                } else {
                    break;
                }
            }
            return;
        }
        self.insert_free_raw(file, block, blocks, trim);
    }

    /// Lower `file`'s mark from `to` to `from` over blocks in state `trim`.
    fn lower_used_end(&mut self, file: u32, from: u32, to: u32, trim: Trim) {
        debug_assert_eq!(self.used_end[file as usize], to);
        self.used_end[file as usize] = from;
        if trim.needs_reserve() {
            let h = &mut self.holes_to[file as usize];
            *h = (*h).max(to);
        }
    }

    /// Free runs that may be punched (not punched yet), in file order.
    pub(crate) fn punchable(&self) -> Vec<(Run, Trim)> {
        self.by_pos
            .iter()
            .filter(|(_, (_, t))| *t != Trim::Punched)
            .map(|(&(file, block), &(blocks, t))| {
                (
                    Run {
                        file,
                        block,
                        blocks,
                    },
                    t,
                )
            })
            .collect()
    }

    /// Take exactly the free run `run` if it is still free, whole, and not
    /// punched; returns its state. Give it back with
    /// [`give_back`](Self::give_back).
    pub(crate) fn take_exact(&mut self, run: Run) -> Option<Trim> {
        match self.by_pos.get(&(run.file, run.block)) {
            Some(&(blocks, t)) if blocks == run.blocks && t != Trim::Punched => {
                Some(self.remove_free(run.file, run.block, run.blocks))
            }
            _ => None,
        }
    }

    /// Blocks of free runs that must be re-reserved before use.
    #[cfg(test)]
    pub(crate) fn unreserved_free_blocks(&self) -> u64 {
        self.by_pos
            .values()
            .filter(|(_, t)| t.needs_reserve())
            .map(|(b, _)| *b as u64)
            .sum()
    }

    /// Rebuild from the runs in use (recovery). Runs must not overlap.
    ///
    /// Whether a free block was punched before the restart is not recorded
    /// on disk: every free run, and everything above each file's used end,
    /// is [`Trim::Unknown`].
    pub(crate) fn rebuild(&mut self, mut used: Vec<Run>, file_count: u32) {
        self.used_end = vec![0; file_count as usize];
        self.holes_to = vec![self.file_blocks; file_count as usize];
        self.by_size.clear();
        self.by_pos.clear();
        self.free_blocks = 0;
        used.sort();
        for r in &used {
            let h = &mut self.used_end[r.file as usize];
            *h = (*h).max(r.block + r.blocks);
        }
        let mut cursor: Vec<u32> = vec![0; file_count as usize];
        for r in &used {
            let c = cursor[r.file as usize];
            if r.block > c {
                self.insert_gap(r.file, c, r.block, Some(Trim::Unknown));
            }
            cursor[r.file as usize] = r.block + r.blocks;
        }
        // Trailing empty files keep their number; their space is all free
        // (used end 0). Files before the last with free tails: the gap up to the
        // file end is free too.
        let last = file_count.saturating_sub(1);
        for f in 0..file_count {
            if f < last {
                let h = self.used_end[f as usize];
                if h < self.file_blocks {
                    self.insert_gap(f, h, self.file_blocks, Some(Trim::Unknown));
                    self.used_end[f as usize] = self.file_blocks;
                }
            }
        }
    }

    /// Insert `[from, to)` of `file` as free runs, split at windows. Each run
    /// takes `trim`, or (`None`) the state of blocks above the mark.
    fn insert_gap(&mut self, file: u32, from: u32, to: u32, trim: Option<Trim>) {
        let w = self.window_blocks;
        let mut at = from;
        while at < to {
            let end = ((at / w + 1) * w).min(to);
            let t = trim.unwrap_or_else(|| self.above_used_end_state(file, at));
            self.insert_free_raw(file, at, end - at, t);
            at = end;
        }
    }

    fn insert_free_raw(&mut self, file: u32, block: u32, blocks: u32, trim: Trim) {
        debug_assert!(blocks > 0);
        self.by_size.insert((blocks, file, block));
        self.by_pos.insert((file, block), (blocks, trim));
        self.free_blocks += blocks as u64;
    }

    /// Remove a free run; returns its state.
    fn remove_free(&mut self, file: u32, block: u32, blocks: u32) -> Trim {
        self.by_size.remove(&(blocks, file, block));
        let (_, trim) = self
            .by_pos
            .remove(&(file, block))
            .expect("free run is indexed");
        self.free_blocks -= blocks as u64;
        trim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(s: &mut Space, blocks: u32) -> Run {
        let (r, t) = s.alloc(blocks);
        assert_eq!(t, Trim::Reserved, "{r:?}");
        r
    }

    #[test]
    fn bump_skips_window_tails_and_reuses_them() {
        let mut s = Space::new(16, 64);
        let a = alloc(&mut s, 10);
        assert_eq!((a.file, a.block), (0, 0));
        let b = alloc(&mut s, 10); // would cross block 16
        assert_eq!(b.block, 16);
        assert_eq!(s.free_blocks(), 6);
        let c = alloc(&mut s, 6); // the skipped tail fits
        assert_eq!(c.block, 10);
        s.free(a);
        s.free(c);
        assert_eq!(s.free_blocks(), 16);
        let d = alloc(&mut s, 16);
        assert_eq!((d.file, d.block), (0, 0));
    }

    #[test]
    fn new_file_when_full_and_used_end_lowers() {
        let mut s = Space::new(16, 32);
        let a = alloc(&mut s, 16);
        let b = alloc(&mut s, 16);
        let c = alloc(&mut s, 4);
        assert_eq!((a.file, b.file, c.file), (0, 0, 1));
        s.free(c);
        assert_eq!(s.used_end(1), 0);
        s.free(b);
        assert_eq!(s.free_blocks(), 16);
    }

    #[test]
    fn rebuild_matches_live_state() {
        let mut s = Space::new(16, 64);
        let runs: Vec<Run> = (0..20).map(|i| alloc(&mut s, 1 + i % 5)).collect();
        let kept: Vec<Run> = runs.iter().copied().step_by(2).collect();
        for r in runs.iter().skip(1).step_by(2) {
            s.free(*r);
        }
        let mut t = Space::new(16, 64);
        t.rebuild(kept.clone(), s.file_count());
        // Both agree on what is in use.
        let used_s = s.used_blocks() - s.free_blocks();
        let used_t = t.used_blocks() - t.free_blocks();
        assert_eq!(used_s, used_t);
        assert_eq!(used_t, kept.iter().map(|r| r.blocks as u64).sum::<u64>());
    }

    /// Punch every free run, as `trim` does.
    fn punch_all(s: &mut Space) -> u64 {
        let mut n = 0;
        for (run, _) in s.punchable() {
            assert!(s.take_exact(run).is_some());
            s.give_back(run, Trim::Punched);
            n += run.blocks as u64;
        }
        n
    }

    #[test]
    fn a_punched_run_is_reported_until_reserved() {
        let mut s = Space::new(16, 64);
        let a = alloc(&mut s, 4);
        let _b = alloc(&mut s, 4);
        s.free(a);
        assert_eq!(punch_all(&mut s), 4);
        assert!(
            s.punchable().is_empty(),
            "a punched run is not punched twice"
        );
        // Split: both halves stay punched.
        let (r, t) = s.alloc(2);
        assert_eq!((r.block, t), (0, Trim::Punched));
        let (r2, t2) = s.alloc(2);
        assert_eq!((r2.block, t2), (2, Trim::Punched));
        // Not reserved after all (ENOSPC): it goes back punched.
        s.give_back(r2, t2);
        assert_eq!(s.unreserved_free_blocks(), 2);
        // Reserved and used, then released: reserved again.
        s.free(r);
        let (m, tm) = s.alloc(4);
        assert_eq!(
            (m.block, tm),
            (0, Trim::Punched),
            "merged with a punched run"
        );
    }

    #[test]
    fn merging_keeps_the_worse_state() {
        let mut s = Space::new(16, 64);
        let a = alloc(&mut s, 2);
        let b = alloc(&mut s, 2);
        let c = alloc(&mut s, 2);
        let _keep = alloc(&mut s, 2);
        s.free(b);
        assert_eq!(punch_all(&mut s), 2);
        s.free(a);
        s.free(c);
        // One run of 6 blocks, punched in the middle: all of it is punched.
        assert_eq!(s.free_blocks(), 6);
        assert_eq!(s.unreserved_free_blocks(), 6);
        let (r, t) = s.alloc(6);
        assert_eq!((r.block, r.blocks, t), (0, 6, Trim::Punched));
    }

    #[test]
    fn lowering_the_mark_over_a_punched_run_remembers_the_holes() {
        let mut s = Space::new(16, 64);
        let a = alloc(&mut s, 4);
        let b = alloc(&mut s, 4);
        s.free(a);
        assert_eq!(punch_all(&mut s), 4);
        // Freeing b lowers the mark over b and the punched run a.
        s.free(b);
        assert_eq!((s.used_end(0), s.free_blocks()), (0, 0));
        // A bump allocation over the old holes must be re-reserved; past
        // them it need not.
        let (r, t) = s.alloc(4);
        assert_eq!((r.block, t), (0, Trim::Unknown));
        let (r, t) = s.alloc(4);
        assert_eq!((r.block, t), (4, Trim::Unknown));
        let (r, t) = s.alloc(4);
        assert_eq!((r.block, t), (8, Trim::Reserved));
    }

    #[test]
    fn after_a_rebuild_nothing_free_is_known_reserved() {
        let mut s = Space::new(16, 64);
        let runs: Vec<Run> = (0..12).map(|_| alloc(&mut s, 3)).collect();
        let kept: Vec<Run> = runs.iter().copied().step_by(3).collect();
        let mut t = Space::new(16, 64);
        t.rebuild(kept, s.file_count());
        assert_eq!(t.unreserved_free_blocks(), t.free_blocks());
        assert!(t.free_blocks() > 0);
        // Gaps, and the bump space above the mark, all need a reservation.
        for _ in 0..16 {
            let (r, trim) = t.alloc(3);
            assert_eq!((r.file, trim), (0, Trim::Unknown), "{r:?}");
        }
        // A new file holds no hole.
        let (r, trim) = t.alloc(3);
        assert_eq!((r.file, trim), (1, Trim::Reserved), "{r:?}");
        // An unknown run may be punched; a used run never is listed.
        let mut u = Space::new(16, 64);
        u.rebuild(
            vec![Run {
                file: 0,
                block: 2,
                blocks: 2,
            }],
            1,
        );
        assert_eq!(
            u.punchable(),
            vec![(
                Run {
                    file: 0,
                    block: 0,
                    blocks: 2
                },
                Trim::Unknown
            )]
        );
    }

    #[test]
    fn take_exact_only_takes_a_whole_unpunched_free_run() {
        let mut s = Space::new(16, 64);
        let a = alloc(&mut s, 4);
        let _b = alloc(&mut s, 4);
        s.free(a);
        let part = Run { blocks: 2, ..a };
        assert_eq!(s.take_exact(part), None);
        assert_eq!(s.take_exact(a), Some(Trim::Reserved));
        assert_eq!(s.take_exact(a), None, "taken already");
        s.give_back(a, Trim::Punched);
        assert_eq!(s.take_exact(a), None, "punched already");
        assert_eq!(s.free_blocks(), 4);
    }
}
