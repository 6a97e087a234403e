//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::future::Future;
use std::rc::Rc;

use segalloc::config::MIB;
use segalloc::{Config, FileHandleRegistry, MappingConfig, MappingManager, Ring};

/// Run `f` on a current-thread tokio runtime inside a `LocalSet`, the way a
/// shard thread runs.
pub fn run<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, f)
}

/// A registry and manager over `dir` with small windows (16 MiB) and growth
/// steps (1 MiB), the backend chosen by `SEGALLOC_IO`.
pub fn manager(
    dir: &std::path::Path,
    max_open: usize,
    max_extents: usize,
) -> (Rc<FileHandleRegistry>, MappingManager) {
    let cfg = Config::builder(dir)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .max_open_files(max_open)
        .max_extents(max_extents)
        .shards(1)
        .build()
        .expect("config");
    manager_with(&cfg)
}

pub fn manager_with(cfg: &Config) -> (Rc<FileHandleRegistry>, MappingManager) {
    let ring = Ring::new(cfg.io_backend()).expect("ring");
    let files = Rc::new(FileHandleRegistry::new(
        ring,
        cfg.max_open_files_per_shard(),
    ));
    let mm = MappingManager::new(files.clone(), MappingConfig::from_config(cfg));
    (files, mm)
}
