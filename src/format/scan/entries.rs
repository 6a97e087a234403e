//! The directory entries: each one below the high-water mark decoded and
//! checked (placement, bitmap), and those published past the mark.

use super::{Defect, Pages, ScanTarget, SegmentScan, Severity, ShardScan};
use crate::error::Result;
use crate::format::entry::{self, EntryHeader};
use crate::format::manifest::Manifest;
use crate::format::{BITMAP_WORDS, ENTRY_BYTES, ENTRY_HEADER_BYTES, bitmap_offset, entry_offset};

/// Entries `0..scan_to`; returns the highest generation met. With
/// `blank_limit` (a mark that cannot be read: `scan_to` is all the file
/// holds), the walk stops once that many bytes of entries in a row are
/// never-published ones: a writer grows the file in small steps ahead of
/// its entries, so a file grown far past them (a sparse file of any size)
/// costs no more than that to report on.
pub(super) fn scan_entries(
    pages: &mut Pages<'_>,
    t: &ScanTarget<'_>,
    scan_to: u32,
    blank_limit: Option<u64>,
    s: &mut ShardScan,
) -> Result<u32> {
    let mut max_gen = 0;
    // Where the entries in use (or damaged) end so far.
    let mut used_end = entry_offset(0);
    for i in 0..scan_to {
        let off = entry_offset(i);
        if blank_limit.is_some_and(|limit| off - used_end >= limit) {
            break;
        }
        let Some(raw) = pages.get(off, ENTRY_BYTES as usize)? else {
            break;
        };
        if !matches!(
            EntryHeader::decode(&raw[..ENTRY_HEADER_BYTES as usize]),
            Ok(None)
        ) {
            used_end = off + ENTRY_BYTES;
        }
        s.entries_scanned += 1;
        let (h, bm) = raw.split_at(ENTRY_HEADER_BYTES as usize);
        let e = match EntryHeader::decode(h) {
            Err(defect) => {
                s.entries_corrupt += 1;
                let state = EntryHeader::raw_state(h);
                s.push(
                    Severity::Error,
                    Some(i),
                    Some(off),
                    Defect::EntryHeader { defect, state },
                );
                continue;
            }
            Ok(None) => {
                s.free_entries.push(i);
                continue;
            }
            Ok(Some(e)) => e,
        };
        if h[entry::OFF_RESERVED..].iter().any(|&b| b != 0) {
            let at = off + entry::OFF_RESERVED as u64;
            s.push(
                Severity::Warning,
                Some(i),
                Some(at),
                Defect::ReservedHeaderBytes,
            );
        }
        let bitmap = entry::decode_bitmap(bm);
        let placed = check_placement(t.geometry, i, &e, s);
        let bits_ok = check_bitmap(i, &e, &bitmap, s);
        if !placed || !bits_ok {
            s.entries_corrupt += 1;
            continue;
        }
        max_gen = max_gen.max(e.generation);
        let words = e.slots.div_ceil(64) as usize;
        let bitmap = bitmap[..words].to_vec();
        let live = bitmap.iter().map(|w| w.count_ones()).sum();
        s.segments.push(SegmentScan {
            entry: i,
            header: e,
            live,
            dropped: false,
            bitmap,
        });
    }
    Ok(max_gen)
}

/// The segment lies inside the maximum file size and one window.
fn check_placement(g: &Manifest, i: u32, e: &EntryHeader, s: &mut ShardScan) -> bool {
    let (first, end) = (e.block as u64, e.end_block());
    let (file_blocks, window_blocks) = (g.file_blocks(), g.window_blocks().max(1));
    let d = if e.blocks == 0 || end > file_blocks {
        Defect::SegmentOutsideFile {
            file: e.file,
            first,
            end,
            file_blocks,
        }
    } else if first / window_blocks != (end - 1) / window_blocks {
        Defect::SegmentCrossesWindow {
            file: e.file,
            first,
            end,
            boundary: (first / window_blocks + 1) * window_blocks,
        }
    } else {
        return true;
    };
    s.push(Severity::Error, Some(i), Some(entry_offset(i)), d);
    false
}

/// No bit is set past the slot count.
fn check_bitmap(i: u32, e: &EntryHeader, bitmap: &[u64], s: &mut ShardScan) -> bool {
    let mut count = 0u32;
    let mut first: Option<(u32, usize)> = None;
    for (w, &word) in bitmap.iter().enumerate().take(BITMAP_WORDS) {
        let extra = word & !entry::word_mask(e.slots, w);
        if extra != 0 {
            count += extra.count_ones();
            first.get_or_insert((w as u32 * 64 + extra.trailing_zeros(), w));
        }
    }
    let Some((first_slot, word)) = first else {
        return true;
    };
    let at = bitmap_offset(i) + word as u64 * 8;
    let d = Defect::BitmapPastSlots {
        count,
        first_slot,
        word,
        slots: e.slots,
    };
    s.push(Severity::Error, Some(i), Some(at), d);
    false
}

/// Entries published past the mark: recovery never sees them.
pub(super) fn scan_past_mark(
    pages: &mut Pages<'_>,
    h: u32,
    readable: u32,
    s: &mut ShardScan,
) -> Result<()> {
    let limit_bytes = super::past_mark_limit(h);
    let mut i = h;
    while i < readable && entry_offset(i) + ENTRY_BYTES <= limit_bytes {
        let off = entry_offset(i);
        let Some(raw) = pages.get(off, ENTRY_HEADER_BYTES as usize)? else {
            break;
        };
        if let Ok(Some(_)) = EntryHeader::decode(raw) {
            s.push(
                Severity::Warning,
                Some(i),
                Some(off),
                Defect::PublishedPastMark { hwm: h },
            );
        }
        i += 1;
    }
    Ok(())
}
