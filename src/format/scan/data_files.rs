//! The data files the directory refers to: missing ones, segments whose
//! growth a power loss took, and live slots past the end of their file.

use std::collections::BTreeMap;

use super::{DataFileLen, Defect, Finding, FindingFile, ScanTarget, Severity, ShardScan};
use crate::format::DATA_FILE_GAP_MAX;
use crate::format::classes::BLOCK_BYTES;

/// Segments that end past their data file and may have been published after
/// the latest completed sync (generation from the durable generation on,
/// before the next to issue; they wrap, so in wrapping order): a power
/// loss took the file's growth, and no sync promised any of their
/// allocations. They are dropped, with a warning.
pub(super) fn drop_lost_growth(t: &ScanTarget<'_>, s: &mut ShardScan) {
    let Some(durable) = s.durable_generation.filter(|&g| g != 0) else {
        return;
    };
    let since = s.next_generation.wrapping_sub(durable);
    let mut lost = Vec::new();
    for x in s.segments.iter_mut().filter(|x| !x.dropped) {
        let DataFileLen::Bytes(size) = (t.data_file)(x.header.file) else {
            continue;
        };
        let end = (u64::from(x.header.block) + u64::from(x.header.blocks)) * BLOCK_BYTES;
        if x.header.generation.wrapping_sub(durable) < since && end > size {
            x.dropped = true;
            let d = Defect::GrowthNotDurable {
                generation: x.header.generation,
                durable_generation: durable,
                size_bytes: size,
                end_bytes: end,
                live: u64::from(x.live),
            };
            lost.push((x.header.file, x.entry, x.header.start_offset(), d));
        }
    }
    for (file, entry, offset, defect) in lost {
        s.free_entries.push(entry);
        s.findings.push(Finding {
            severity: Severity::Warning,
            file: FindingFile::Data(file),
            entry: Some(entry),
            offset: Some(offset),
            defect,
        });
    }
}

/// Referenced data files that are missing; kept segments in files past a
/// gap no shard leaves; live slots past the end of their file.
pub(super) fn check_data_files(t: &ScanTarget<'_>, s: &mut ShardScan) {
    check_gap(t, s);
    let mut missing: BTreeMap<u32, (Vec<u32>, u64, bool)> = BTreeMap::new();
    let mut short = Vec::new();
    for x in &s.segments {
        match (t.data_file)(x.header.file) {
            DataFileLen::Missing => {
                let m = missing.entry(x.header.file).or_default();
                m.0.push(x.entry);
                if !x.dropped {
                    m.1 += x.live as u64;
                    m.2 = true;
                }
            }
            DataFileLen::Bytes(size) if !x.dropped => {
                let slot_bytes = x.header.slot_bytes() as u64;
                let past: Vec<u32> = x
                    .live_slots()
                    .filter(|&k| x.slot_offset(k) + slot_bytes > size)
                    .collect();
                if let (Some(&first_slot), Some(&last_slot)) = (past.first(), past.last()) {
                    let d = Defect::DataFileShort {
                        size_bytes: size,
                        needed_bytes: x.slot_offset(last_slot) + slot_bytes,
                        live_past: past.len() as u64,
                        slot_bytes: slot_bytes as u32,
                        first_slot,
                    };
                    short.push((x.header.file, x.entry, x.slot_offset(first_slot), d));
                }
            }
            _ => {}
        }
    }
    for (file, (entries, live, kept)) in missing {
        s.findings.push(Finding {
            severity: Severity::Error,
            file: FindingFile::Data(file),
            entry: None,
            offset: None,
            defect: Defect::DataFileMissing {
                entries,
                live,
                kept,
            },
        });
    }
    for (file, entry, offset, defect) in short {
        s.findings.push(Finding {
            severity: Severity::Error,
            file: FindingFile::Data(file),
            entry: Some(entry),
            offset: Some(offset),
            defect,
        });
    }
}

/// Kept segments in data files numbered after [`DATA_FILE_GAP_MAX`]
/// missing ones in a row. Recovery takes every number up to the highest a
/// kept segment names for a file (`0..=n`), so without a bound a forged
/// entry naming file `u32::MAX - 1` would cost billions. A shard's own
/// gaps are narrow: it hands out file `n + 1` once file `n`'s space is
/// handed out, and a file is made by its first segment, which may be
/// cancelled or fail while a segment of the next file is published, so
/// numbers can be missing: as many in a row as first segments of files
/// were cancelled at once. The files are looked up in order up to the
/// highest one named, stopping at the first run that wide: fewer than
/// `DATA_FILE_GAP_MAX` lookups of missing files per file present.
fn check_gap(t: &ScanTarget<'_>, s: &mut ShardScan) {
    let kept = || s.segments.iter().filter(|x| !x.dropped);
    let Some(highest) = kept().map(|x| x.header.file).max() else {
        return;
    };
    let mut run_start = 0;
    let mut gap = None;
    for n in 0..highest {
        if (t.data_file)(n) != DataFileLen::Missing {
            run_start = n + 1;
        } else if n - run_start + 1 >= DATA_FILE_GAP_MAX {
            gap = Some(run_start);
            break;
        }
    }
    let Some(first_missing) = gap else {
        return;
    };
    let mut files = Vec::new();
    let (mut entries, mut live) = (Vec::new(), 0u64);
    for x in kept().filter(|x| x.header.file > first_missing) {
        // A missing file of its own is reported as missing.
        if (t.data_file)(x.header.file) == DataFileLen::Missing {
            continue;
        }
        if !files.contains(&x.header.file) {
            files.push(x.header.file);
        }
        entries.push(x.entry);
        live += u64::from(x.live);
    }
    if entries.is_empty() {
        return;
    }
    files.sort_unstable();
    s.findings.push(Finding {
        severity: Severity::Error,
        file: FindingFile::Data(first_missing),
        entry: None,
        offset: None,
        defect: Defect::DataFileGap {
            missing: DATA_FILE_GAP_MAX,
            files,
            entries,
            live,
        },
    });
}
