//! # segalloc
//!
//! A persistent, memory-mapped segment allocator for thread-per-core servers
//! that scales to hundreds of millions of records without running out of
//! file descriptors or memory mappings.
//!
//! One descriptor per data file ([`FileHandleRegistry`]), large shared
//! mapping windows ([`MappingManager`], 1 GiB by default) that many segments
//! live in, [`PinGuard`] reference counts so a window in use is never unmapped,
//! and eviction of idle windows to stay under the descriptor and VMA caps.
//! Each shard owns its own registry, manager and io_uring control ring: no
//! lock on the hot path. Everything that may block (growing a file, madvise,
//! fsync) goes through the ring, so faulting a window in does not stall the
//! shard's other tasks; where io_uring is unavailable, plain syscalls take
//! over.
//!
//! A [`Runtime`] runs one thread per shard; work runs on a shard as a task.
//! Each shard touches only its own allocations' bytes: another shard's are
//! read and written through their owner ([`Shard::read`], [`Shard::write`],
//! [`Shard::run_on_owner`]), and a free of another shard's handle is
//! forwarded to it.
//!
//! ```no_run
//! use futures::executor::block_on;
//! use segalloc::{Config, Runtime};
//!
//! # fn main() -> segalloc::Result<()> {
//! let rt = Runtime::start(Config::new("/tmp/segalloc-example"))?;
//! let handle = block_on(rt.spawn_on(0, |shard| async move {
//!     let a = shard.allocate(100).await?;      // a slot and a writable pin on it
//!     a.write_at(0, b"hello")?;
//!     shard.set_root("greeting", a.handle())?; // find it again after a restart
//!     Ok::<_, segalloc::Error>(a.into_handle())
//! }))??;
//! let other = 1 % rt.shard_count();
//! block_on(rt.spawn_on(other, move |shard| async move {
//!     let mut buf = [0u8; 5];
//!     shard.read(handle, 0, &mut buf).await?;  // copied by shard 0, its owner
//!     assert_eq!(&buf, b"hello");
//!     shard.free(handle)?;                     // forwarded to shard 0
//!     shard.flush_frees().await                // shard 0 has applied it
//! }))??;
//! assert_eq!(block_on(rt.root("greeting"))?, Some(handle));
//! block_on(rt.sync())?;                        // durable against power loss
//! rt.shutdown()
//! # }
//! ```
//!
//! The layers below ([`FileHandleRegistry`], [`MappingManager`],
//! [`SegmentAllocator`], [`Shard`], [`Cluster`] for servers that own their
//! threads) are public for embedding and testing.
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
mod mesh;
#[cfg(feature = "test-support")]
pub mod proc;
pub mod runtime;
pub mod shard;
mod sys;
mod wait;

pub use alloc::{AllocStats, AllocateFuture, Allocation, LiveIter, PinFuture, SegmentAllocator};
pub use config::{Config, ConfigBuilder, EvictionPolicy, IoBackendChoice, Limits, MadvisePolicy};
pub use datadir::DataDir;
pub use error::{Error, Result};
pub use files::{FileHandleRegistry, FileId, FileLease, FileStats, Reservation};
pub use format::{BadHandle, HANDLE_BYTES, Handle, Manifest};
pub use io::{IoBackend, Ring, RingStats};
pub use mapping::{MappingConfig, MappingManager, MappingStats, PinGuard};
pub use mesh::MeshStats;
pub use runtime::{Cluster, JoinHandle, Runtime, RuntimeStats, ShardBuilder};
pub use shard::{Shard, ShardStats};

/// Test support: lower this process's soft `RLIMIT_NOFILE` (to prove the
/// descriptor cap holds under a low limit).
///
/// # Errors
///
/// The `setrlimit` error.
#[cfg(feature = "test-support")]
pub fn set_nofile_soft_limit(soft: u64) -> std::io::Result<()> {
    sys::set_nofile_soft_limit(soft)
}

// The README's Rust examples are compiled (not run) as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
