//! The hasher of a shard's index: a folded multiply (the product's high and
//! low halves xored, as `foldhash` and `ahash` do) over 8-byte words, keyed
//! with seeds drawn once per index from the standard library's random
//! source. Keys come from clients, so the seeds are secret: a client cannot
//! choose keys that collide without knowing them. It costs a fraction of
//! SipHash on keys of a few dozen bytes.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};

/// A map keyed by client bytes, hashed with [`IndexHasher`].
pub type IndexMap<V> = HashMap<Box<[u8]>, V, IndexHashState>;

/// Per-index seeds.
#[derive(Clone)]
pub struct IndexHashState {
    seed: u64,
    /// Odd, so every multiply by it is a bijection.
    mul: u64,
}

impl Default for IndexHashState {
    fn default() -> Self {
        let random = RandomState::new();
        IndexHashState {
            seed: random.hash_one(0u64),
            mul: random.hash_one(1u64) | 1,
        }
    }
}

impl BuildHasher for IndexHashState {
    type Hasher = IndexHasher;

    fn build_hasher(&self) -> IndexHasher {
        IndexHasher {
            state: self.seed,
            mul: self.mul,
        }
    }
}

pub struct IndexHasher {
    state: u64,
    mul: u64,
}

#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let p = (a as u128) * (b as u128);
    (p as u64) ^ ((p >> 64) as u64)
}

impl Hasher for IndexHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            self.state = fold(self.state ^ w, self.mul);
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            // The tail's length is mixed in: "a" and "a\0" differ.
            let w = u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59);
            self.state = fold(self.state ^ w, self.mul);
        }
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.state = fold(self.state ^ n as u64, self.mul);
    }

    #[inline]
    fn finish(&self) -> u64 {
        fold(self.state, self.mul.rotate_left(29))
    }
}
