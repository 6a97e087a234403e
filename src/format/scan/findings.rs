//! Typed findings of a scan: what is wrong, where, how serious, and whether
//! recovery refuses the shard for it.

use std::fmt;

use super::{HeaderDefect, RootDefect};
use crate::format::{DIR_OFFSET, Handle, data_file_name};

/// How serious a finding (a problem found in a data directory) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "cli", derive(serde::Serialize))]
#[cfg_attr(feature = "cli", serde(rename_all = "lowercase"))]
pub enum Severity {
    /// Something recovery copes with, or a state the API allows (a dangling
    /// root, a torn root slot).
    Warning,
    /// Damage, or a state that recovery refuses or silently repairs.
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        })
    }
}

/// The file of a shard that a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FindingFile {
    /// `meta.seg`.
    Meta,
    /// Data file number `n`.
    Data(u32),
}

/// One problem found by a scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The file concerned.
    pub file: FindingFile,
    /// The directory entry concerned, if any.
    pub entry: Option<u32>,
    /// The byte offset in `file` of the structure concerned, if any.
    pub offset: Option<u64>,
    /// What is wrong.
    pub defect: Defect,
}

/// What is wrong, with the values found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Defect {
    /// The superblock fails validation.
    SuperblockInvalid { detail: String },
    /// The superblock belongs to another data directory.
    SuperblockOtherDirectory { on_disk: u64, manifest: u64 },
    /// The superblock names another shard.
    SuperblockOtherShard { on_disk: u16, folder: u16 },
    /// A geometry field differs from the manifest's.
    SuperblockDisagrees {
        field: &'static str,
        on_disk: u64,
        manifest: u64,
    },
    /// The file is too short to hold the high-water mark.
    MarkUnreadable { size_bytes: u64 },
    /// The high-water mark word is torn.
    MarkTorn { word: u64 },
    /// The high-water mark word is all zero (a file whose creation never
    /// finished) yet entry `entry` is published, or (`None`) the shard's
    /// first data file exists: a non-zero mark is made durable before any
    /// data file is made (by the creation, or, when a power loss cut the
    /// creation short after its superblock, by the first writable open
    /// after it), so the mark was lost, and with it what recovery would
    /// find.
    MarkZeroed { entry: Option<u32> },
    /// The file is shorter than the entries below the mark need.
    MetaTruncated {
        size_bytes: u64,
        need_bytes: u64,
        hwm: u32,
        readable: u32,
    },
    /// The file ends inside the root table.
    RootTableTruncated { size_bytes: u64 },
    /// An entry header below the mark fails validation.
    EntryHeader { defect: HeaderDefect, state: u64 },
    /// Reserved header bytes are not zero.
    ReservedHeaderBytes,
    /// A segment lies outside the maximum data file size.
    SegmentOutsideFile {
        file: u32,
        first: u64,
        end: u64,
        file_blocks: u64,
    },
    /// A segment crosses a window boundary.
    SegmentCrossesWindow {
        file: u32,
        first: u64,
        end: u64,
        boundary: u64,
    },
    /// The bitmap marks slots past the segment's slot count.
    BitmapPastSlots {
        count: u32,
        first_slot: u32,
        word: usize,
        slots: u32,
    },
    /// An entry past the mark is published (recovery ignores it).
    PublishedPastMark { hwm: u32 },
    /// Two segments claim blocks of one data file.
    Overlap {
        file: u32,
        first: u64,
        end: u64,
        generation: u32,
        dropped: bool,
        other_entry: u32,
        other_first: u64,
        other_end: u64,
        other_generation: u32,
        other_dropped: bool,
    },
    /// A data file the directory refers to is missing.
    DataFileMissing {
        entries: Vec<u32>,
        live: u64,
        kept: bool,
    },
    /// `missing` data files in a row are missing from this one on
    /// ([`DATA_FILE_GAP_MAX`](crate::format::DATA_FILE_GAP_MAX)), yet
    /// segments that recovery would keep lie in files numbered after them
    /// (`files`, `entries`). A shard leaves a number unused for each
    /// first segment of a file cancelled while the next file's is
    /// published, so a gap this wide takes thousands of such cancellations
    /// at once: the entries name files the shard never made, or the folder
    /// was damaged. It refuses the shard.
    DataFileGap {
        missing: u32,
        files: Vec<u32>,
        entries: Vec<u32>,
        live: u64,
    },
    /// A segment ends past its data file and may have been published after
    /// the latest completed sync (its generation is at or above the durable
    /// generation): a power loss took the file's growth. No sync promised
    /// its allocations; recovery drops it.
    GrowthNotDurable {
        generation: u32,
        durable_generation: u32,
        size_bytes: u64,
        /// The end of the segment's blocks.
        end_bytes: u64,
        live: u64,
    },
    /// Live slots lie past the end of their data file (it was cut short).
    /// A completed sync makes the growth of every segment published before
    /// it durable, so no crash or power loss leaves this: it refuses the
    /// shard.
    DataFileShort {
        size_bytes: u64,
        /// The end of the segment's last live slot.
        needed_bytes: u64,
        live_past: u64,
        slot_bytes: u32,
        first_slot: u32,
    },
    /// A root slot in use fails validation (a torn update, or damage).
    RootSlotInvalid {
        slot: usize,
        seq: u64,
        defect: RootDefect,
    },
    /// A valid root slot holds an invalid handle.
    RootBadHandle {
        slot: usize,
        name: String,
        seq: u64,
        reason: &'static str,
    },
    /// A root name is in several slots.
    RootNameDuplicated {
        name: String,
        slots: Vec<(usize, u64)>,
        kept: usize,
    },
    /// Two names share a slot pair; this one loses.
    RootPairShared {
        name: String,
        slot: usize,
        seq: u64,
        other_name: String,
        other_slot: usize,
        other_seq: u64,
    },
    /// A root names a handle this shard cannot have issued.
    RootForeign {
        name: String,
        slot: usize,
        handle: Handle,
        why: String,
    },
    /// A root names an allocation that is not live (freed since).
    RootDangling {
        name: String,
        slot: usize,
        handle: Handle,
        why: String,
    },
}

impl Defect {
    /// Whether recovery refuses to open the shard for it (the others it
    /// repairs, ignores or keeps as they are).
    pub fn refuses_open(&self) -> bool {
        match self {
            Defect::DataFileMissing { kept, .. } => *kept,
            Defect::ReservedHeaderBytes
            | Defect::PublishedPastMark { .. }
            | Defect::Overlap { .. }
            | Defect::GrowthNotDurable { .. }
            | Defect::RootSlotInvalid { .. }
            | Defect::RootBadHandle { .. }
            | Defect::RootNameDuplicated { .. }
            | Defect::RootPairShared { .. }
            | Defect::RootForeign { .. }
            | Defect::RootDangling { .. } => false,
            _ => true,
        }
    }
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Defect::SuperblockInvalid { detail } => write!(f, "superblock: {detail}"),
            Defect::SuperblockOtherDirectory { on_disk, manifest } => write!(
                f,
                "superblock belongs to another data directory (id {on_disk:#018x}, the manifest's is {manifest:#018x})"
            ),
            Defect::SuperblockOtherShard { on_disk, folder } => {
                write!(
                    f,
                    "superblock says shard {on_disk}, the folder is shard {folder}"
                )
            }
            Defect::SuperblockDisagrees {
                field,
                on_disk,
                manifest,
            } => write!(
                f,
                "superblock disagrees with the manifest: {field} {on_disk}, manifest {manifest}"
            ),
            Defect::MarkUnreadable { size_bytes } => write!(
                f,
                "metadata truncated: {size_bytes} bytes, too short for the directory high-water mark"
            ),
            Defect::MarkTorn { word } => {
                write!(f, "directory high-water mark is torn (word {word:#018x})")
            }
            Defect::MarkZeroed { entry: Some(entry) } => write!(
                f,
                "directory high-water mark is zeroed but entry {entry} is published: the mark was lost"
            ),
            Defect::MarkZeroed { entry: None } => write!(
                f,
                "directory high-water mark is zeroed but the shard has data files: the mark was lost"
            ),
            Defect::MetaTruncated {
                size_bytes,
                need_bytes,
                hwm,
                readable,
            } => write!(
                f,
                "metadata truncated: {size_bytes} bytes, the directory needs {need_bytes} (high-water mark {hwm}); entries {readable}..{hwm} cannot be read"
            ),
            Defect::RootTableTruncated { size_bytes } => write!(
                f,
                "metadata truncated: {size_bytes} bytes, the root table ends at {DIR_OFFSET}"
            ),
            _ => fmt_entry(self, f),
        }
    }
}

fn fmt_entry(d: &Defect, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match d {
        Defect::EntryHeader { defect, state } => {
            write!(f, "{} (state word {state:#018x})", defect.describe())
        }
        Defect::ReservedHeaderBytes => f.write_str("reserved header bytes 28..64 are not zero"),
        Defect::SegmentOutsideFile {
            file,
            first,
            end,
            file_blocks,
        } => write!(
            f,
            "segment blocks {first}..{end} of data file {file} lie outside the maximum file size ({file_blocks} blocks)"
        ),
        Defect::SegmentCrossesWindow {
            file,
            first,
            end,
            boundary,
        } => write!(
            f,
            "segment blocks {first}..{end} of data file {file} cross the window boundary at block {boundary}"
        ),
        Defect::BitmapPastSlots {
            count,
            first_slot,
            word,
            slots,
        } => write!(
            f,
            "bitmap marks {count} slot(s) past the segment's {slots} slots (first: slot {first_slot}, bitmap word {word})"
        ),
        Defect::PublishedPastMark { hwm } => write!(
            f,
            "entry past the high-water mark {hwm} is published; recovery ignores it (its allocations are lost)"
        ),
        Defect::Overlap { .. } => fmt_overlap(d, f),
        Defect::DataFileGap {
            missing,
            files,
            entries,
            live,
        } => write!(
            f,
            "{missing} data files in a row are missing from this one on, yet {} segment(s) (entries {}) holding {live} live slot(s) lie in data files numbered after them ({}): the folder was damaged, or these entries name files the shard never made",
            entries.len(),
            list(entries),
            list(files)
        ),
        Defect::DataFileMissing {
            entries,
            live,
            kept,
        } => write!(
            f,
            "data file is missing but referenced by {} segment(s) (entries {}) holding {live} live slot(s){}",
            entries.len(),
            list(entries),
            if *kept {
                ""
            } else {
                "; recovery drops them all as overlaps"
            }
        ),
        Defect::GrowthNotDurable {
            generation,
            durable_generation,
            size_bytes,
            end_bytes,
            live,
        } => write!(
            f,
            "segment (generation {generation}, not below the durable generation {durable_generation}) ends at byte {end_bytes}, past the end of the file ({size_bytes} bytes): a power loss took the file's growth before a sync promised it; recovery drops it and its {live} unsynced allocation(s)"
        ),
        Defect::DataFileShort {
            size_bytes,
            needed_bytes,
            live_past,
            slot_bytes,
            first_slot,
        } => write!(
            f,
            "{live_past} live slot(s) of {slot_bytes} bytes lie past the end of the file ({size_bytes} bytes; first: slot {first_slot}; they need {needed_bytes}): the file was cut short and their bytes are lost"
        ),
        _ => fmt_root(d, f),
    }
}

fn fmt_overlap(d: &Defect, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let Defect::Overlap {
        file,
        first,
        end,
        generation,
        dropped,
        other_entry,
        other_first,
        other_end,
        other_generation,
        other_dropped,
    } = d
    else {
        return Ok(());
    };
    let verdict = match (dropped, other_dropped) {
        (true, false) => format!("recovery keeps entry {other_entry} and drops this one"),
        (false, true) => format!("recovery keeps this one and drops entry {other_entry}"),
        (true, true) => "recovery drops both".to_string(),
        (false, false) => "recovery keeps both (a bug)".to_string(),
    };
    write!(
        f,
        "segment blocks {first}..{end} (generation {generation}) of {} overlaps entry {other_entry} (blocks {other_first}..{other_end}, generation {other_generation}); {verdict}",
        data_file_name(*file)
    )
}

fn fmt_root(d: &Defect, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    match d {
        Defect::RootSlotInvalid { slot, seq, defect } => {
            write!(
                f,
                "root slot {slot} (seq {seq}): {defect}; recovery ignores it"
            )
        }
        Defect::RootBadHandle {
            slot,
            name,
            seq,
            reason,
        } => write!(
            f,
            "root slot {slot} ({name:?}, seq {seq}): invalid handle: {reason}; recovery drops it"
        ),
        Defect::RootNameDuplicated { name, slots, kept } => {
            let listed: Vec<String> = slots
                .iter()
                .map(|(s, q)| format!("{s} (seq {q})"))
                .collect();
            write!(
                f,
                "root name {name:?} is in {} slots: {}; recovery keeps slot {kept} and clears the others",
                slots.len(),
                listed.join(", ")
            )
        }
        Defect::RootPairShared {
            name,
            slot,
            seq,
            other_name,
            other_slot,
            other_seq,
        } => write!(
            f,
            "root {name:?} (slot {slot}, seq {seq}) shares the slot pair of root {other_name:?} (slot {other_slot}, seq {other_seq}); recovery keeps the later record and drops this one"
        ),
        Defect::RootForeign {
            name,
            slot,
            handle,
            why,
        } => {
            write!(f, "root {name:?} (slot {slot}): handle {handle} {why}")
        }
        Defect::RootDangling {
            name,
            slot,
            handle,
            why,
        } => write!(
            f,
            "root {name:?} (slot {slot}): handle {handle} {why}: the root is dangling (kept as it is)"
        ),
        _ => Ok(()),
    }
}

/// `a, b, c` (the first few, then the count).
fn list(v: &[u32]) -> String {
    const MAX_LISTED: usize = 8;
    let mut s: Vec<String> = v.iter().take(MAX_LISTED).map(|x| x.to_string()).collect();
    if v.len() > MAX_LISTED {
        s.push(format!("… {} more", v.len() - MAX_LISTED));
    }
    s.join(", ")
}
