//! Durability: `sync` (fdatasync of every file of the shard) and the poison
//! that a failed sync leaves.

use futures::future::join_all;
use tracing::Instrument;

use super::SegmentAllocator;
use crate::error::{Error, Result};
use crate::files::FileId;

impl SegmentAllocator {
    /// Make every `allocate` and `free` that returned before this call, and
    /// every write through a pin made before it, durable against power loss:
    /// `fdatasync` of the data files and the metadata through the control
    /// ring (concurrently), and of the shard folder when files were created.
    ///
    /// # Errors
    ///
    /// The first io error. A failed sync poisons the allocator: every later
    /// write returns [`Error::Poisoned`] until the directory is reopened.
    pub async fn sync(&self) -> Result<()> {
        let span = tracing::debug_span!("sync", shard = self.shard);
        self.sync_inner().instrument(span).await
    }

    async fn sync_inner(&self) -> Result<()> {
        if self.poisoned.get() {
            return Err(Error::Poisoned { shard: self.shard });
        }
        if self.files.is_read_only() {
            return Ok(());
        }
        let (quarantined, new_files) = {
            let mut st = self.st.borrow_mut();
            let q = st.quarantine.len();
            (q, std::mem::take(&mut st.new_files_since_sync))
        };
        let meta_reserved = self.files.reserved_bytes(self.meta_file)?;
        let mut ids: Vec<FileId> = self.data_files.borrow().clone();
        ids.push(self.meta_file);
        // At most half the descriptor cap in flight at once (each sync holds
        // a lease on its fd until the kernel is done); a file that still
        // finds no descriptor is retried alone, after the others finished.
        let batch = (self.files.max_open_files() / 2).max(1);
        let mut first_err = None;
        let mut retry = Vec::new();
        for chunk in ids.chunks(batch) {
            let results = join_all(chunk.iter().map(|&id| self.files.sync(id, true))).await;
            for (&id, r) in chunk.iter().zip(results) {
                match r {
                    Ok(()) => {}
                    Err(Error::FdPressure { .. }) => retry.push(id),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        for id in retry {
            if first_err.is_some() {
                break;
            }
            match self.files.sync(id, true).await {
                Ok(()) => {}
                Err(e @ Error::FdPressure { .. }) => {
                    // Not an I/O failure: report it without poisoning.
                    return Err(e);
                }
                Err(e) => first_err = Some(e),
            }
        }
        if first_err.is_none() && new_files {
            first_err = crate::datadir::sync_dir(&self.dir).err();
        }
        if let Some(e) = first_err {
            return Err(self.poison(e));
        }
        let mut st = self.st.borrow_mut();
        let released: Vec<u32> = st.quarantine.drain(..quarantined).collect();
        st.free_entries.extend(released);
        st.stats.syncs += 1;
        st.stats.last_sync_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        self.meta_durable_bytes
            .set(self.meta_durable_bytes.get().max(meta_reserved));
        Ok(())
    }

    /// Refuse every later write: a failed fdatasync cannot be retried safely
    /// (the kernel may have dropped the dirty pages it could not write).
    pub(super) fn poison(&self, e: Error) -> Error {
        tracing::error!(shard = self.shard, error = %e, "sync failed; shard poisoned until reopened");
        self.poisoned.set(true);
        e
    }

    /// Whether an earlier sync failed.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get()
    }
}
