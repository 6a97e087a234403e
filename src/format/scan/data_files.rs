//! The data files the directory refers to: missing ones, and live slots
//! past the end of their file.

use std::collections::BTreeMap;

use super::{DataFileLen, Defect, Finding, FindingFile, ScanTarget, Severity, ShardScan};

/// Referenced data files that are missing; live slots past the end of their
/// file.
pub(super) fn check_data_files(t: &ScanTarget<'_>, s: &mut ShardScan) {
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
