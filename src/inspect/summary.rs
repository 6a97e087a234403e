//! The figures `segalloc stat --json` prints: one serializable object built
//! from a [`DirReport`]. Field names are stable (scripts read them).

use serde::Serialize;

use super::report::{ClassUsage, DataFileInfo, DirReport, FileInfo, FreeRuns, ShardReport, Totals};

/// The whole directory.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatSummary<'a> {
    /// The directory.
    pub path: String,
    /// The lock: `free`, `held-elsewhere`, `no-lock-file` or `unknown`.
    pub lock: &'static str,
    /// The geometry the shards were read with.
    pub manifest: ManifestSummary,
    /// The shards, by index.
    pub shards: Vec<ShardSummary<'a>>,
    /// Figures summed over the shards.
    pub totals: Totals,
    /// Problems of severity error.
    pub errors: u64,
    /// Problems of severity warning.
    pub warnings: u64,
}

/// The geometry and where it was read from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ManifestSummary {
    /// `manifest`, or `superblock` when the manifest is unusable.
    pub source: &'static str,
    /// On-disk format version.
    pub format_version: u32,
    /// Shards.
    pub shard_count: u16,
    /// Window size.
    pub window_bytes: u64,
    /// Maximum data file size.
    pub max_file_bytes: u64,
    /// Class table id.
    pub class_table_id: u32,
    /// Directory id, `0x` and 16 hex digits.
    pub dir_id: String,
}

/// One shard.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ShardSummary<'a> {
    /// Shard index.
    pub shard: u16,
    /// Folder name.
    pub folder: &'a str,
    /// `meta.seg`, when present.
    pub meta_file: Option<&'a FileInfo>,
    /// Data files present.
    pub data_files: &'a [DataFileInfo],
    /// Windows the data files span.
    pub windows_spanned: u64,
    /// Windows holding a segment in use.
    pub windows_in_use: u64,
    /// Directory entries.
    pub entries: EntriesSummary,
    /// Segments in use.
    pub segments: u64,
    /// Bytes of segments in use.
    pub segment_bytes: u64,
    /// Live allocations.
    pub allocations_live: u64,
    /// Bytes of live slots.
    pub bytes_live: u64,
    /// Use per size class.
    pub classes: Vec<ClassUsage>,
    /// Free space.
    pub fragmentation: FragmentationSummary,
    /// Roots.
    pub roots: u64,
}

/// Directory entries of a shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EntriesSummary {
    /// The high-water mark (`null` when unreadable).
    pub high_water_mark: Option<u32>,
    /// Entries in use.
    pub in_use: u64,
    /// Free entries below the mark.
    pub free: u64,
    /// Entries below the mark that failed validation.
    pub corrupt: u64,
    /// Entries that fit in `meta.seg`.
    pub capacity: u64,
}

/// Free space of a shard.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FragmentationSummary {
    /// Free bytes inside segments in use.
    pub free_bytes_in_segments: u64,
    /// `free_bytes_in_segments / segment_bytes`.
    pub ratio: f64,
    /// Free runs below the mark.
    pub free_runs: FreeRuns,
}

impl DirReport {
    /// The `stat --json` figures; `None` when the shards could not be read
    /// (no geometry).
    pub fn stat_summary(&self) -> Option<StatSummary<'_>> {
        let g = self.geometry.as_ref()?;
        Some(StatSummary {
            path: self.path.display().to_string(),
            lock: self.lock.word(),
            manifest: ManifestSummary {
                source: if self.manifest.is_some() {
                    "manifest"
                } else {
                    "superblock"
                },
                format_version: g.version,
                shard_count: g.shard_count,
                window_bytes: g.window_bytes,
                max_file_bytes: g.max_file_bytes,
                class_table_id: g.class_table_id,
                dir_id: format!("{:#018x}", g.dir_id),
            },
            shards: self
                .shards
                .iter()
                .map(|s| shard_summary(s, g.window_bytes))
                .collect(),
            totals: self.totals(),
            errors: self.errors().count() as u64,
            warnings: self.warnings().count() as u64,
        })
    }
}

fn shard_summary(s: &ShardReport, window_bytes: u64) -> ShardSummary<'_> {
    ShardSummary {
        shard: s.index,
        folder: &s.folder,
        meta_file: s.meta.as_ref(),
        data_files: &s.data_files,
        windows_spanned: s.windows_spanned(),
        windows_in_use: s.windows_in_use(window_bytes),
        entries: EntriesSummary {
            high_water_mark: s.hwm,
            in_use: s.entries_in_use(),
            free: s.entries_free as u64,
            corrupt: s.entries_corrupt as u64,
            capacity: s.entry_capacity,
        },
        segments: s.entries_in_use(),
        segment_bytes: s.segment_bytes(),
        allocations_live: s.allocations_live(),
        bytes_live: s.bytes_live(),
        classes: s.classes(),
        fragmentation: FragmentationSummary {
            free_bytes_in_segments: s.free_bytes_in_segments(),
            ratio: s.fragmentation(),
            free_runs: s.free_runs,
        },
        roots: s.roots.len() as u64,
    }
}
