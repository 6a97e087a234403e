//! Records an overwrite replaced under `--sync always`, waiting to be
//! retired together, and the rounds that retire them (see
//! `Store::retire_round`).

use std::collections::{HashMap, HashSet};

use segalloc::Handle;

/// Waiting records a shard keeps before it retires them all.
pub const WAITING_MAX: usize = 1 << 18;
/// Distinct 4 KiB pages the waiting records of a shard may lie on before
/// it retires them all: the write-back a round adds to the next sync
/// (64 MiB) stays bounded when records do not share pages.
pub const WAITING_PAGES_MAX: usize = 16384;

/// A record and the hash of its key (the index's hasher: records of one
/// key share it; another key may too, which only retires more).
pub type Keyed = (u64, Handle);

/// The records waiting to be retired, by key hash.
#[derive(Default)]
pub struct Waiting {
    by_key: HashMap<u64, Vec<Handle>>,
    count: usize,
    /// Distinct pages (data file, page index) the waiting records lie on
    /// (an over-count once records of one key were taken).
    pages: HashSet<(u32, u64)>,
}

impl Waiting {
    /// Add `h` (of key hash `key`); whether the queue is now full.
    pub fn push(&mut self, key: u64, h: Handle) -> bool {
        self.by_key.entry(key).or_default().push(h);
        self.count += 1;
        self.pages.insert((h.file_id(), h.offset() / 4096));
        self.full()
    }

    /// Whether the queue is full (writers then retire before writing).
    pub fn full(&self) -> bool {
        self.count >= WAITING_MAX || self.pages.len() >= WAITING_PAGES_MAX
    }

    /// Whether a record of key hash `key` waits.
    pub fn has_key(&self, key: u64) -> bool {
        self.by_key.contains_key(&key)
    }

    /// Take every waiting record.
    pub fn take_all(&mut self) -> Vec<Keyed> {
        self.count = 0;
        self.pages.clear();
        self.by_key
            .drain()
            .flat_map(|(k, hs)| hs.into_iter().map(move |h| (k, h)))
            .collect()
    }

    /// Take the waiting records of key hash `key`.
    pub fn take_key(&mut self, key: u64) -> Vec<Keyed> {
        let hs = self.by_key.remove(&key).unwrap_or_default();
        self.count -= hs.len();
        hs.into_iter().map(|h| (key, h)).collect()
    }

    /// Put back records a round took and did not retire.
    pub fn give_back(&mut self, rest: &[Keyed]) {
        for &(k, h) in rest {
            self.push(k, h);
        }
    }
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
    keys: HashMap<u64, u32>,
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
