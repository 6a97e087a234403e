//! Records an overwrite replaced under `--sync always` (and records of the
//! previous layout under any policy), waiting to be retired together once
//! a sync covered their replacements, and the rounds that retire them (see
//! `Store::retire_round`).

use std::collections::{HashMap, HashSet};

use segalloc::Handle;

use crate::hash::IndexHashState;

/// Maps keyed by key hashes (already seeded and secret) and by pages the
/// allocator chose: the index's cheap hasher is enough.
type FastMap<K, V> = HashMap<K, V, IndexHashState>;
type FastSet<K> = HashSet<K, IndexHashState>;

/// Waiting records a shard keeps before it retires them all.
pub const WAITING_MAX: usize = 1 << 18;
/// Distinct 4 KiB pages the waiting records of a shard may lie on before
/// it retires them all: the write-back a round adds to the next sync
/// (64 MiB) stays bounded when records do not share pages.
pub const WAITING_PAGES_MAX: usize = 16384;

/// A record and the hash of its key (the index's hasher: records of one
/// key share it; another key may too, which only retires more).
pub type Keyed = (u64, Handle);

/// The records waiting to be retired, by key hash. Each is *ready* once a
/// sync covered the write that replaced it: retiring it earlier would let
/// a power loss keep the retirement and lose the replacement, and with it
/// the key.
#[derive(Default)]
pub struct Waiting {
    /// Per key hash: each record, and the count of writes a sync must
    /// cover for it to be ready.
    by_key: FastMap<u64, Vec<(Handle, u64)>>,
    count: usize,
    /// Distinct pages (data file, page index) the waiting records lie on
    /// (an over-count once records of one key were taken).
    pages: FastSet<(u32, u64)>,
}

impl Waiting {
    /// Add `h` (of key hash `key`), ready once a sync covers `ready_at`
    /// writes; whether the queue is now full.
    pub fn push(&mut self, key: u64, h: Handle, ready_at: u64) -> bool {
        self.by_key.entry(key).or_default().push((h, ready_at));
        self.count += 1;
        self.pages.insert(page_of(h));
        self.full()
    }

    /// Whether the queue is full (writers then retire before writing).
    pub fn full(&self) -> bool {
        self.count >= WAITING_MAX || self.pages.len() >= WAITING_PAGES_MAX
    }

    /// How many records wait.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether a record of key hash `key` waits.
    pub fn has_key(&self, key: u64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// Take every record that is ready now that a sync covered `synced`
    /// writes.
    pub fn take_ready(&mut self, synced: u64) -> Vec<Keyed> {
        let mut ready = Vec::new();
        self.by_key.retain(|&k, hs| {
            hs.retain(|&(h, at)| {
                let take = at <= synced;
                if take {
                    ready.push((k, h));
                }
                !take
            });
            !hs.is_empty()
        });
        self.count -= ready.len();
        self.pages = self
            .by_key
            .values()
            .flatten()
            .map(|&(h, _)| page_of(h))
            .collect();
        ready
    }

    /// When the waiting records of key hash `key` are all ready: the count
    /// of writes a sync must cover (`None` when none waits).
    pub fn ready_at(&self, key: u64) -> Option<u64> {
        self.by_key.get(&key)?.iter().map(|&(_, at)| at).max()
    }

    /// Take the waiting records of key hash `key`, ready or not (a deletion
    /// first waits until they are: see `Store::retire_older`).
    pub fn take_key(&mut self, key: u64) -> Vec<Keyed> {
        let hs = self.by_key.remove(&key).unwrap_or_default();
        self.count -= hs.len();
        hs.into_iter().map(|(h, _)| (key, h)).collect()
    }

    /// Put back records a round took and did not retire, ready once a sync
    /// covers `ready_at` writes (a deletion's round may have taken records
    /// that were not ready).
    pub fn give_back(&mut self, rest: &[Keyed], ready_at: u64) {
        for &(k, h) in rest {
            self.push(k, h, ready_at);
        }
    }
}

/// Put the records of a round in file order, so that the round zeroes
/// each page's records one after the other. Syncs run while a round
/// yields (under `always`, one per batch of writes): in another order a
/// page that a sync had just cleaned would be dirtied again by the round's
/// next record on it, and written back once more. Under random overwrites
/// a round's records lie on nearly every page of the data files; in the
/// order they were replaced, `SET` under `always` was about a third slower
/// in the runs that held a round (`INCR` more).
pub fn page_order(list: &mut [Keyed]) {
    list.sort_unstable_by_key(|&(_, h)| (h.file_id(), h.offset()));
}

/// The data file and 4 KiB page of a record's first bytes (its magic).
pub fn page_of(h: Handle) -> (u32, u64) {
    (h.file_id(), h.offset() / 4096)
}

/// The rounds under way: their ids and the key hashes they hold. A round
/// is under way from its start until a sync covers its retirements (it
/// has then *ended*): until then its records may come back after a power
/// loss.
#[derive(Default)]
pub struct Rounds {
    next: u64,
    under_way: HashMap<u64, Round>,
    /// Key hash → the rounds under way that hold a record of it.
    keys: FastMap<u64, u32>,
}

/// A round under way.
struct Round {
    /// The sync target that makes it durable, once its retirements are
    /// done.
    target: Option<u64>,
    /// The key hashes of its records.
    keys: Vec<u64>,
}

impl Rounds {
    /// A round begins with `list`: its id.
    pub fn begin(&mut self, list: &[Keyed]) -> u64 {
        let id = self.next;
        self.next += 1;
        let keys: Vec<u64> = list.iter().map(|&(k, _)| k).collect();
        for &k in &keys {
            *self.keys.entry(k).or_default() += 1;
        }
        self.under_way.insert(id, Round { target: None, keys });
        id
    }

    /// Round `id` did its retirements: a sync covering `target` writes
    /// ends it.
    pub fn finish(&mut self, id: u64, target: u64) {
        if let Some(r) = self.under_way.get_mut(&id) {
            r.target = Some(target);
        }
    }

    /// A sync covered `synced` writes: end the rounds it made durable;
    /// whether any ended.
    pub fn synced(&mut self, synced: u64) -> bool {
        let mut any = false;
        for (_, round) in self
            .under_way
            .extract_if(|_, r| r.target.is_some_and(|t| t <= synced))
        {
            any = true;
            for k in round.keys {
                if let Some(n) = self.keys.get_mut(&k) {
                    *n -= 1;
                    if *n == 0 {
                        self.keys.remove(&k);
                    }
                }
            }
        }
        any
    }

    /// Whether a round under way holds a record of key hash `key`.
    pub fn holds(&self, key: u64) -> bool {
        self.keys.contains_key(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record is taken by a round only once a sync covered the write
    /// that replaced it; a deletion takes its key's records either way.
    #[test]
    fn records_are_ready_once_a_sync_covers_their_replacement() {
        let h = Handle::example();
        let mut w = Waiting::default();
        assert!(!w.push(1, h, 5));
        w.push(2, h, 7);
        w.push(1, h, 9);
        w.push(3, h, 9);
        assert!(w.take_ready(4).is_empty());
        let mut ready = w.take_ready(7);
        ready.sort_unstable_by_key(|&(k, _)| k);
        assert_eq!(ready.iter().map(|&(k, _)| k).collect::<Vec<_>>(), [1, 2]);
        assert!(w.has_key(1) && !w.has_key(2) && w.has_key(3));
        // Given back (a failed round): ready at the writes counted then.
        w.give_back(&ready, 12);
        assert_eq!(w.ready_at(3), Some(9));
        assert_eq!(w.ready_at(2), Some(12));
        assert_eq!(w.ready_at(4), None);
        assert_eq!(w.take_key(3).len(), 1, "a deletion takes what is not ready");
        assert_eq!(w.take_ready(9).len(), 1);
        assert_eq!(w.take_ready(12).len(), 2);
        assert!(!w.has_key(1) && !w.has_key(2));
        assert!(!w.full());
    }
}
