//! The directory entries: each one below the high-water mark decoded and
//! checked (placement, bitmap), and those published past the mark.

use super::{Defect, Pages, ScanTarget, SegmentScan, Severity, ShardScan};
use crate::error::Result;
use crate::format::entry::{self, EntryHeader};
use crate::format::manifest::Manifest;
use crate::format::{
    BITMAP_WORDS, ENTRIES_PER_PAGE, ENTRY_BYTES, ENTRY_HEADER_BYTES, META_PAGE_BYTES,
    bitmap_offset, entry_offset,
};

/// Entries `0..scan_to`. Pages in the file's holes are skipped, not read
/// ([`MetaSource::data_region`](super::MetaSource::data_region)): a hole
/// holds no entry, and a sparse file of any size costs what it holds, also
/// under a mark that says it holds billions of entries. Below a readable
/// mark, the entries skipped are counted as free
/// ([`ShardScan::free_entries_in_holes`]); without one, `scan_to` is all
/// the file could hold, and nothing is counted for the holes.
pub(super) fn scan_entries(
    pages: &mut Pages<'_>,
    t: &ScanTarget<'_>,
    scan_to: u32,
    s: &mut ShardScan,
) -> Result<()> {
    let count_holes = s.hwm.is_some();
    // Offsets below this lie in a data region already looked up.
    let mut data_end = 0;
    let mut next = 0;
    while next < scan_to {
        let i = next;
        next += 1;
        let off = entry_offset(i);
        if off >= data_end {
            let Some((start, end)) = pages.data_region(off)? else {
                if count_holes {
                    s.free_entries_in_holes += u64::from(scan_to - i);
                    s.free_entry_holes.push((i, scan_to));
                }
                break;
            };
            data_end = end;
            if start > off {
                // Go on with the first entry of the page the data begins in
                // (entries never straddle pages).
                let page = (start - entry_offset(0)) / META_PAGE_BYTES;
                let first = u32::try_from(page * ENTRIES_PER_PAGE)
                    .unwrap_or(u32::MAX)
                    .min(scan_to);
                if first > i {
                    if count_holes {
                        s.free_entries_in_holes += u64::from(first - i);
                        s.free_entry_holes.push((i, first));
                    }
                    next = first;
                    continue;
                }
            }
        }
        let Some(raw) = pages.get(off, ENTRY_BYTES as usize)? else {
            break;
        };
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
    Ok(())
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
