//! # segalloc
//!
//! A persistent, memory-mapped segment allocator for thread-per-core servers
//! that scales to hundreds of millions of records without running out of
//! file descriptors or memory mappings.
//!
//! One descriptor per data file ([`FileHandleRegistry`]), large shared
//! mapping windows ([`MappingManager`], 1 GiB by default) that many segments
//! live in, [`Pin`] reference counts so a window in use is never unmapped,
//! and eviction of idle windows to stay under the descriptor and VMA caps.
//! Each shard owns its own registry, manager and io_uring control ring: no
//! lock on the hot path. Everything that may block (growing a file, madvise,
//! fsync) goes through the ring, so faulting a window in does not stall the
//! shard's other tasks; where io_uring is unavailable, plain syscalls take
//! over.
//!
//! ```no_run
//! use std::rc::Rc;
//! use segalloc::{Config, FileHandleRegistry, MappingManager, MappingConfig, io::Ring};
//!
//! # fn main() -> segalloc::Result<()> {
//! let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
//! rt.block_on(async {
//!     let cfg = Config::new("/tmp/segalloc-example");
//!     std::fs::create_dir_all(cfg.dir()).unwrap();
//!     let ring = Ring::new(cfg.io_backend())?;
//!     let files = Rc::new(FileHandleRegistry::new(ring, cfg.max_open_files_per_shard()));
//!     let maps = MappingManager::new(files.clone(), MappingConfig::from_config(&cfg));
//!     let data = files.register(cfg.dir().join("data-0"));
//!     // Fault the first window in (grow + mmap + madvise through the ring)…
//!     let pin = maps.pin(data, 0, 4096, true).await?;
//!     pin.write_at(0, b"record")?;
//!     drop(pin);
//!     // …then pin it again on the hot path: no syscall, no lock.
//!     let pin = maps.try_pin(data, 0, 4096, false)?.expect("window is mapped");
//!     let mut buf = [0u8; 6];
//!     pin.read_at(0, &mut buf)?;
//!     assert_eq!(&buf, b"record");
//!     Ok(())
//! })
//! # }
//! ```
//!
//! See `ARCHITECTURE.md` for the map of the crate and its invariants.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod alloc;
pub mod config;
pub mod datadir;
pub mod error;
pub mod files;
// The on-disk format: crate-internal; tests reach it through the
// `test-support` feature.
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod format;
#[cfg(not(feature = "test-support"))]
pub(crate) mod format;
#[cfg(feature = "cli")]
pub mod inspect;
pub mod io;
pub mod mapping;
pub mod mesh;
pub mod proc;
pub mod runtime;
pub mod shard;
mod sys;
mod wait;

pub use alloc::{AllocStats, Allocation, LiveIter, SegmentAllocator};
pub use config::{Config, ConfigBuilder, EvictionPolicy, IoBackendChoice, Limits, MadvisePolicy};
pub use datadir::DataDir;
pub use error::{Error, Result};
pub use files::{FileHandleRegistry, FileId, FileLease, FileStats, Reservation};
pub use format::{HANDLE_BYTES, Handle, Manifest};
pub use io::{IoBackend, Ring, RingStats};
pub use mapping::{MappingConfig, MappingManager, MappingStats, Pin};
pub use mesh::MeshStats;
pub use runtime::{Cluster, JoinHandle, Runtime, RuntimeStats, ShardBuilder};
pub use shard::{Shard, ShardStats};

/// Test support: lower this process's soft `RLIMIT_NOFILE` (to prove the
/// descriptor cap holds under a low limit).
///
/// # Errors
///
/// The `setrlimit` error.
pub fn set_nofile_soft_limit(soft: u64) -> std::io::Result<()> {
    sys::set_nofile_soft_limit(soft)
}

// The README's Rust examples are compiled (not run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
