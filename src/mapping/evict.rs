//! Eviction policies: which idle window is unmapped first.

use std::rc::Rc;

use super::{
    EVICTION_HISTORY, MappingManager, Maps, THRASH_BASE_EVERY, THRASH_SAMPLE, Window, WindowState,
    is_idle,
};
use crate::config::EvictionPolicy;
use crate::files::FileId;

impl MappingManager {
    /// Unmap one idle window chosen by the eviction policy, to stay within
    /// the cap. False when every window is in use.
    pub(super) fn evict_one(&self) -> bool {
        self.evict(true)
    }

    /// [`evict_one`](Self::evict_one); `for_cap` false for
    /// [`evict_idle`](Self::evict_idle), whose windows fit the cap: counted
    /// in `idle_evictions`, not in `evictions`, and not remembered as
    /// evicted (their next fault-ins are not thrashing).
    fn evict(&self, for_cap: bool) -> bool {
        let victim = {
            let mut m = self.inner.borrow_mut();
            // Thrash mode keeps the windows mapped longest and evicts the
            // newest; one eviction in THRASH_BASE_EVERY still follows the
            // policy, so a working set that moves is picked up. Which ones
            // is drawn at random: counted, the policy's turns fell in step
            // with a periodic pattern (a hot window between the pins of a
            // scan: every turn fell on the hot window's own fault-in, which
            // then faulted on every pin).
            let thrash =
                m.stats.thrash_mode && !next_turn(&mut m.turns).is_multiple_of(THRASH_BASE_EVERY);
            let pos = match self.cfg.eviction_policy {
                _ if thrash => Self::pick(&m, |w| (u64::MAX - w.mapped_at.get(), 0)),
                EvictionPolicy::Lru => Self::pick(&m, |w| (w.last_use.get(), 0)),
                EvictionPolicy::Lfu => Self::pick(&m, |w| (w.uses.get(), w.last_use.get())),
                EvictionPolicy::Clock => Self::clock(&mut m),
            };
            let Some(pos) = pos else {
                return false;
            };
            let (file, idx) = m.resident.swap_remove(pos);
            if m.clock_hand >= m.resident.len() {
                m.clock_hand = 0;
            }
            if for_cap {
                m.stats.evictions += 1;
                // Saturating: the cap may be any `usize` (`MappingConfig` is public).
                let cap = EVICTION_HISTORY.saturating_mul(self.cfg.max_windows);
                Self::remember_eviction(&mut m, (file, idx), cap);
            } else {
                m.stats.idle_evictions += 1;
            }
            let state = &mut m.files[file.0 as usize].as_mut().unwrap().windows[idx as usize];
            match std::mem::replace(state, WindowState::Unmapped) {
                WindowState::Mapped(w) => w,
                _ => unreachable!("resident windows are mapped"),
            }
        };
        // munmap happens here, outside any borrow.
        let _span = tracing::debug_span!("evict").entered();
        drop(victim);
        true
    }

    /// Count a fault-in of `key`: a thrash fault-in when it was evicted
    /// recently. Every [`THRASH_SAMPLE`] fault-ins, eviction switches to
    /// thrash mode when at least 3 in 4 of them were thrash fault-ins, and
    /// back when at most 1 in 4 were (never when `adapt` is off).
    pub(super) fn count_fault(m: &mut Maps, key: (FileId, u32), adapt: bool) {
        m.stats.faults += 1;
        m.sample_faults += 1;
        if m.evicted_count.contains_key(&key) {
            m.stats.thrash_faults += 1;
            m.sample_thrash += 1;
        }
        if m.sample_faults >= THRASH_SAMPLE {
            let (t, n) = (m.sample_thrash, m.sample_faults);
            if adapt && 4 * t >= 3 * n {
                m.stats.thrash_mode = true;
            } else if 4 * t <= n {
                m.stats.thrash_mode = false;
            }
            m.sample_faults = 0;
            m.sample_thrash = 0;
        }
    }

    /// Add `key` to the eviction history (bounded by `cap` entries).
    fn remember_eviction(m: &mut Maps, key: (FileId, u32), cap: usize) {
        if m.evicted.len() >= cap.max(1)
            && let Some(old) = m.evicted.pop_front()
            && let std::collections::hash_map::Entry::Occupied(mut e) = m.evicted_count.entry(old)
        {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        m.evicted.push_back(key);
        *m.evicted_count.entry(key).or_insert(0) += 1;
    }

    pub(super) fn window_at(m: &Maps, (f, i): (FileId, u32)) -> &Rc<Window> {
        match &m.files[f.0 as usize].as_ref().unwrap().windows[i as usize] {
            WindowState::Mapped(w) => w,
            _ => unreachable!("resident windows are mapped"),
        }
    }

    fn pick(m: &Maps, key: impl Fn(&Window) -> (u64, u64)) -> Option<usize> {
        m.resident
            .iter()
            .enumerate()
            .filter(|(_, r)| is_idle(Self::window_at(m, **r)))
            .min_by_key(|(_, r)| key(Self::window_at(m, **r)))
            .map(|(i, _)| i)
    }

    fn clock(m: &mut Maps) -> Option<usize> {
        let n = m.resident.len();
        // Two sweeps: the first clears reference bits.
        for _ in 0..2 * n {
            if m.clock_hand >= n {
                m.clock_hand = 0;
            }
            let pos = m.clock_hand;
            m.clock_hand += 1;
            let w = Self::window_at(m, m.resident[pos]);
            if !is_idle(w) {
                continue;
            }
            if w.referenced.replace(false) {
                continue;
            }
            return Some(pos);
        }
        None
    }

    /// Unmap every idle window (e.g. before a long pause). Pinned windows
    /// stay, and so do windows a prefault still works in: await
    /// [`settle_prefaults`](Self::settle_prefaults) first to include them.
    pub fn evict_idle(&self) -> usize {
        self.reap_prefaults();
        let mut n = 0;
        loop {
            let any_idle = {
                let m = self.inner.borrow();
                m.resident.iter().any(|r| is_idle(Self::window_at(&m, *r)))
            };
            if !any_idle || !self.evict(false) {
                return n;
            }
            n += 1;
        }
    }
}

/// xorshift64: the next draw of `state`.
fn next_turn(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
