//! The root table: every slot checked, one record kept per name, one name
//! per slot pair, deterministically.

use std::collections::BTreeMap;

use super::{Defect, Pages, RootScan, ScanTarget, Severity, ShardScan};
use crate::error::Result;
use crate::format::handle::Handle;
use crate::format::roots::{self, RootSlot};
use crate::format::{ROOT_SLOT_BYTES, ROOT_SLOTS, root_offset};

/// A valid slot: index, record, decoded handle.
type Valid = (usize, RootSlot, Handle);

pub(super) fn scan_roots(
    pages: &mut Pages<'_>,
    t: &ScanTarget<'_>,
    s: &mut ShardScan,
) -> Result<()> {
    let mut valid: Vec<Valid> = Vec::new();
    for i in 0..ROOT_SLOTS {
        let off = root_offset(i);
        let Some(b) = root_bytes(pages, i)? else {
            break;
        };
        let seq = RootSlot::raw_seq(b);
        let r = match RootSlot::decode(b) {
            Ok(None) => continue,
            Ok(Some(r)) => r,
            Err(defect) => {
                let d = Defect::RootSlotInvalid {
                    slot: i,
                    seq,
                    defect,
                };
                s.push(Severity::Warning, None, Some(off), d);
                continue;
            }
        };
        match Handle::from_bytes(&r.handle) {
            Ok(h) => valid.push((i, r, h)),
            Err(e) => {
                let reason = e.reason;
                let d = Defect::RootBadHandle {
                    slot: i,
                    name: r.name,
                    seq,
                    reason,
                };
                s.push(
                    Severity::Error,
                    None,
                    Some(off + roots::OFF_HANDLE as u64),
                    d,
                );
                s.root_slots_to_clear.push(i);
            }
        }
    }
    s.max_root_seq = valid.iter().map(|v| v.1.seq).max().unwrap_or(0);
    let winners = pick_per_name(&valid, s);
    let winners = pick_per_pair(&valid, winners, s);
    keep_roots(&valid, winners, t, s);
    Ok(())
}

/// The winners as recovery restores them, each checked against the
/// segments: live, dangling (a warning) or foreign (an error).
fn keep_roots(valid: &[Valid], winners: Vec<usize>, t: &ScanTarget<'_>, s: &mut ShardScan) {
    let (shard, dir_tag) = (t.shard, t.geometry.dir_tag());
    for k in winners {
        let (slot, r, h) = &valid[k];
        let live = match root_target(s, shard, dir_tag, h) {
            Ok(None) => true,
            Ok(Some(why)) => {
                let d = Defect::RootDangling {
                    name: r.name.clone(),
                    slot: *slot,
                    handle: *h,
                    why,
                };
                s.push(Severity::Warning, None, Some(root_offset(*slot)), d);
                false
            }
            Err(why) => {
                let d = Defect::RootForeign {
                    name: r.name.clone(),
                    slot: *slot,
                    handle: *h,
                    why,
                };
                s.push(Severity::Error, None, Some(root_offset(*slot)), d);
                false
            }
        };
        s.roots.push(RootScan {
            slot: *slot,
            seq: r.seq,
            name: r.name.clone(),
            handle: *h,
            live,
        });
    }
    s.roots.sort_by(|a, b| a.name.cmp(&b.name));
}

/// For each name, the highest sequence number (a tie: the lower slot).
/// Returns the winners' indices into `valid`; the losers are to be cleared.
fn pick_per_name(valid: &[Valid], s: &mut ShardScan) -> Vec<usize> {
    let mut by_name: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (k, (_, r, _)) in valid.iter().enumerate() {
        by_name.entry(r.name.as_str()).or_default().push(k);
    }
    let mut winners = Vec::with_capacity(by_name.len());
    for (name, ks) in by_name {
        // `valid` is in slot order: the first maximum is the lowest slot.
        let w = ks.iter().copied().fold(ks[0], |b, k| {
            if valid[k].1.seq > valid[b].1.seq {
                k
            } else {
                b
            }
        });
        winners.push(w);
        if ks.len() > 1 {
            s.root_slots_to_clear
                .extend(ks.iter().filter(|&&k| k != w).map(|&k| valid[k].0));
            let d = Defect::RootNameDuplicated {
                name: name.to_string(),
                slots: ks.iter().map(|&k| (valid[k].0, valid[k].1.seq)).collect(),
                kept: valid[w].0,
            };
            s.push(Severity::Error, None, Some(root_offset(valid[ks[0]].0)), d);
        }
    }
    winners
}

/// One name per slot pair `(2k, 2k + 1)`: the higher sequence number keeps
/// it (a tie: the lower slot index).
fn pick_per_pair(valid: &[Valid], mut winners: Vec<usize>, s: &mut ShardScan) -> Vec<usize> {
    winners.sort_by_key(|&k| (std::cmp::Reverse(valid[k].1.seq), valid[k].0));
    let mut owner: BTreeMap<usize, usize> = BTreeMap::new();
    winners.retain(|&k| {
        let slot = valid[k].0;
        let Some(&o) = owner.get(&(slot / 2)) else {
            owner.insert(slot / 2, k);
            return true;
        };
        let d = Defect::RootPairShared {
            name: valid[k].1.name.clone(),
            slot,
            seq: valid[k].1.seq,
            other_name: valid[o].1.name.clone(),
            other_slot: valid[o].0,
            other_seq: valid[o].1.seq,
        };
        s.push(Severity::Error, None, Some(root_offset(slot)), d);
        s.root_slots_to_clear.push(slot);
        false
    });
    winners
}

/// Root slot `i` read through `pages`.
fn root_bytes<'p>(pages: &'p mut Pages<'_>, i: usize) -> Result<Option<&'p [u8]>> {
    pages.get(root_offset(i), ROOT_SLOT_BYTES as usize)
}

/// Why a root's handle is not a live slot of this shard: `Err` for a
/// handle this shard could never have issued (another directory or shard),
/// `Ok(Some)` for a dangling one, `Ok(None)` when live.
fn root_target(
    s: &ShardScan,
    shard: u16,
    dir_tag: u32,
    h: &Handle,
) -> Result<Option<String>, String> {
    if h.dir_tag != dir_tag {
        return Err(format!(
            "belongs to another data directory (tag {:#010x}, this one {dir_tag:#010x})",
            h.dir_tag
        ));
    }
    if h.shard != shard {
        return Err(format!("names shard {}", h.shard));
    }
    let Some(seg) = s.kept_segments().find(|x| x.entry == h.segment) else {
        return Ok(Some(format!(
            "names entry {}, which holds no segment",
            h.segment
        )));
    };
    let e = &seg.header;
    if e.generation != h.generation {
        return Ok(Some(format!(
            "has generation {}, the segment has {} (released and reused since)",
            h.generation, e.generation
        )));
    }
    if e.class_id != h.class_id {
        return Ok(Some(format!(
            "has class {}, the segment has {}",
            h.class_id, e.class_id
        )));
    }
    if e.file != h.file {
        return Ok(Some(format!(
            "names data file {}, the segment is in {}",
            h.file, e.file
        )));
    }
    let (start, slot_bytes) = (e.start_offset(), e.slot_bytes() as u64);
    let end = start + e.slots as u64 * slot_bytes;
    if h.offset < start || h.offset >= end || !(h.offset - start).is_multiple_of(slot_bytes) {
        return Ok(Some(format!(
            "offset {:#x} is not a slot of the segment (slots at {start:#x}..{end:#x} every {slot_bytes} bytes)",
            h.offset
        )));
    }
    let slot = ((h.offset - start) / slot_bytes) as u32;
    if !seg.is_live(slot) {
        return Ok(Some(format!("points at slot {slot}, which is free")));
    }
    Ok(None)
}
