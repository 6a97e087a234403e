//! Overlapping segments: which one recovery keeps, and every overlapping
//! pair reported.

use super::{Defect, Severity, ShardScan};
use crate::format::{entry_offset, issued_later};

/// Mark the segments recovery drops, and report every overlapping pair
/// found by a sweep.
pub(super) fn resolve_overlaps(s: &mut ShardScan) {
    let segs = &mut s.segments;
    let mut order: Vec<usize> = (0..segs.len()).collect();
    // Stable: entries met in index order stay in that order on a tie.
    order.sort_by_key(|&k| (segs[k].header.file, segs[k].header.block));
    let mut keep: Vec<usize> = Vec::new();
    for &k in &order {
        if let Some(&p) = keep.last() {
            let (pe, e) = (&segs[p].header, &segs[k].header);
            if pe.file == e.file && pe.end_block() > e.block as u64 {
                let loser = if issued_later(e.generation, pe.generation) {
                    p
                } else {
                    k
                };
                segs[loser].dropped = true;
                if loser == p {
                    keep.pop();
                    keep.push(k);
                }
                continue;
            }
        }
        keep.push(k);
    }
    let mut dropped: Vec<u32> = segs.iter().filter(|x| x.dropped).map(|x| x.entry).collect();
    s.free_entries.append(&mut dropped);
    report_overlaps(s, &order);
}

/// Each segment that starts inside the furthest-reaching earlier segment of
/// its file.
fn report_overlaps(s: &mut ShardScan, order: &[usize]) {
    let mut reach: Option<(u32, u64, usize)> = None; // (file, end, index)
    let mut found = Vec::new();
    for &k in order {
        let x = &s.segments[k];
        if let Some((file, rend, o)) = reach
            && file == x.header.file
            && (x.header.block as u64) < rend
        {
            let other = &s.segments[o];
            found.push((
                x.entry,
                Defect::Overlap {
                    file: x.header.file,
                    first: x.header.block as u64,
                    end: x.header.end_block(),
                    generation: x.header.generation,
                    dropped: x.dropped,
                    other_entry: other.entry,
                    other_first: other.header.block as u64,
                    other_end: other.header.end_block(),
                    other_generation: other.header.generation,
                    other_dropped: other.dropped,
                },
            ));
        }
        let e = x.header.end_block();
        reach = match reach {
            Some((file, rend, o)) if file == x.header.file && rend >= e => Some((file, rend, o)),
            _ => Some((x.header.file, e, k)),
        };
    }
    for (entry, d) in found {
        s.push(Severity::Error, Some(entry), Some(entry_offset(entry)), d);
    }
}
