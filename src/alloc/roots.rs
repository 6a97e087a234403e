//! Named roots: a small table of handles in the metadata file.

#![warn(clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;

use super::SegmentAllocator;
use crate::error::{Error, Result};
use crate::format::Handle;
use crate::format::{self, RootSlot};

impl SegmentAllocator {
    /// Name `handle` as a root (replacing an earlier one of that name).
    /// Durable against a process crash when it returns.
    ///
    /// # Errors
    ///
    /// [`Error::Root`] for an empty or over-long name or a full table (a
    /// shard holds at most 1,024 names); the errors of a bad handle as for
    /// [`pin`](Self::pin).
    pub fn set_root(&self, name: &str, handle: Handle) -> Result<()> {
        self.check_writable()?;
        if name.is_empty() || name.len() > format::MAX_ROOT_NAME_BYTES {
            return Err(Error::Root(format!(
                "root names are 1..=64 bytes, got {}",
                name.len()
            )));
        }
        self.check_live(&handle)?;
        let mut st = self.st.borrow_mut();
        // A name keeps its record in one pair of slots that share a sector:
        // a replacement is written to the other slot of the pair, then the
        // old one is cleared, so no torn write can lose the name.
        let slot = match st.roots.get(name) {
            Some(&(cur, _, _)) => cur ^ 1,
            None => {
                let mut used = vec![false; format::ROOT_SLOTS / 2];
                for r in st.roots.values() {
                    used[r.0 / 2] = true;
                }
                let Some(pair) = used.iter().position(|u| !u) else {
                    return Err(Error::Root(format!(
                        "root table full ({} names per shard)",
                        format::ROOT_SLOTS / 2
                    )));
                };
                2 * pair
            }
        };
        st.root_seq += 1;
        let seq = st.root_seq;
        let rec = RootSlot {
            seq,
            name: name.to_string(),
            handle: handle.to_bytes(),
        };
        let off = format::root_offset(slot);
        // Invalidate the slot, write the body, then the sequence number.
        let bytes = rec.encode();
        self.meta.word(off).store(0, Ordering::Release);
        self.meta.write(off + 8, &bytes[8..]);
        self.meta.word(off).store(seq, Ordering::Release);
        self.files.mark_dirty(self.meta_file);
        if let Some((old, _, _)) = st.roots.insert(name.to_string(), (slot, seq, handle)) {
            debug_assert_eq!(old, slot ^ 1);
            self.meta
                .word(format::root_offset(old))
                .store(0, Ordering::Release);
        }
        Ok(())
    }

    /// The handle named `name`, if any.
    pub fn root(&self, name: &str) -> Option<Handle> {
        self.st.borrow().roots.get(name).map(|r| r.2)
    }

    /// Forget the root `name`; returns its handle.
    ///
    /// # Errors
    ///
    /// [`Error::Poisoned`], [`Error::ReadOnly`].
    pub fn remove_root(&self, name: &str) -> Result<Option<Handle>> {
        self.check_writable()?;
        let mut st = self.st.borrow_mut();
        Ok(st.roots.remove(name).map(|(slot, _, h)| {
            self.meta
                .word(format::root_offset(slot))
                .store(0, Ordering::Release);
            self.files.mark_dirty(self.meta_file);
            h
        }))
    }

    /// All roots, sorted by name.
    pub fn roots(&self) -> Vec<(String, Handle)> {
        let st = self.st.borrow();
        let mut v: Vec<(String, Handle)> = st.roots.iter().map(|(n, r)| (n.clone(), r.2)).collect();
        v.sort();
        v
    }
}
