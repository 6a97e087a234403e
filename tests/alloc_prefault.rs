//! Prefault ahead of the bump position: under io_uring, the chunk after the
//! one a fill is writing is faulted in by the kernel's io workers before
//! the fill reaches it; the sync backend issues nothing. A slot reused
//! prefaults nothing; a slot whose window was evicted prefaults once its
//! window is back, whether `allocate` or `try_allocate` met it first.

mod common;

use std::time::Duration;

use common::{eventually, expected_backend, open_shard, run, small_cfg};
use segalloc::IoBackend;

/// Chunk size of the allocator's prefault.
const CHUNK: u64 = 256 * 1024;

/// Pages of `[addr, addr + len)` mapped in this process's page tables
/// (`/proc/self/pagemap` bit 63): faulted in, whether by a touch or by a
/// prefault (read-ahead fills the page cache but maps nothing on a write
/// fault).
fn resident_pages(addr: *mut u8, len: usize) -> usize {
    use std::io::{Read, Seek, SeekFrom};
    let page = 4096;
    let first = addr as usize / page;
    let n = len.div_ceil(page);
    let mut f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    f.seek(SeekFrom::Start((first * 8) as u64)).expect("seek");
    let mut buf = vec![0u8; n * 8];
    f.read_exact(&mut buf).expect("read pagemap");
    buf.chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
        .count()
}

#[test]
fn a_fill_prefaults_the_next_chunk_through_the_ring() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Fill until a slot opens the second chunk of the data file.
        let mut hs = Vec::new();
        let a = loop {
            let a = shard.allocate(100).await.unwrap();
            if a.handle().offset() >= CHUNK {
                break a;
            }
            hs.push(a.into_handle());
        };
        assert_eq!(a.handle().file_id(), 0);
        // The third chunk, seen through the slot's window (16 MiB).
        let ahead = 2 * CHUNK - a.handle().offset();
        // SAFETY: the window is mapped while `a` pins it; the range is
        // inside the window and the reserved part of the file.
        let next = unsafe { a.ptr().add(ahead as usize) };
        let pages = (CHUNK / 4096) as usize;
        let prefaults = shard.stats().mappings.prefaults;
        if expected_backend() == IoBackend::Sync {
            assert_eq!(prefaults, 0, "the sync backend would block the shard");
            assert_eq!(resident_pages(next, CHUNK as usize), 0);
            return;
        }
        assert!(prefaults >= 1, "no prefault issued");
        let all = eventually(Duration::from_secs(5), || {
            resident_pages(next, CHUNK as usize) == pages
        })
        .await;
        assert!(
            all,
            "{} of {pages} pages of the next chunk resident",
            resident_pages(next, CHUNK as usize)
        );
        // Nothing beyond it.
        // SAFETY: as above, one chunk further (the file has 1 MiB reserved).
        let beyond = unsafe { next.add(CHUNK as usize) };
        assert_eq!(resident_pages(beyond, CHUNK as usize), 0);
    });
}

/// A slot taken again (its bytes were used already) prefaults nothing:
/// refilling the holes of a heap (as a random mix of frees and allocations
/// does) issues no prefault; only new territory does.
#[test]
fn reused_slots_prefault_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        // Eight chunks of 112-byte slots. The prefaults in flight are
        // awaited at each new chunk: past a few in flight, more would be
        // skipped (and not counted).
        let n = (8 * CHUNK / 112) as usize;
        let mut hs = Vec::with_capacity(n);
        let mut chunk = None;
        for _ in 0..n {
            let h = shard.allocate(100).await.unwrap().into_handle();
            if chunk != Some((h.file_id(), h.offset() / CHUNK)) {
                chunk = Some((h.file_id(), h.offset() / CHUNK));
                shard.mappings().settle_prefaults().await;
            }
            hs.push(h);
        }
        shard.mappings().settle_prefaults().await;
        let filled = shard.stats().mappings.prefaults;
        if expected_backend() != IoBackend::Sync {
            assert!(filled >= 7, "the fill prefaulted {filled} chunks");
        }
        // Taken after the latest sync began: free and reusable at once.
        // Every other one, so that no segment empties (and is released).
        let mut freed = 0;
        for h in hs.iter().step_by(2) {
            shard.free(*h).unwrap();
            freed += 1;
        }
        for _ in 0..freed {
            shard.allocate(100).await.unwrap();
        }
        assert_eq!(
            shard.stats().mappings.prefaults,
            filled,
            "the refill reused freed slots and prefaulted again"
        );
    });
}

/// Fill the first chunk with 4 KiB slots (64 to a chunk), let the
/// prefaults finish and evict the window: the handles, and the prefaults
/// counted so far.
async fn fill_a_chunk_then_evict(shard: &segalloc::Shard) -> (Vec<segalloc::Handle>, u64) {
    let mut hs = Vec::new();
    while hs.len() < (CHUNK / 4096) as usize {
        hs.push(shard.allocate(4096).await.unwrap().into_handle());
    }
    shard.mappings().settle_prefaults().await;
    let before = shard.stats().mappings.prefaults;
    assert!(shard.mappings().evict_idle() >= 1, "no window evicted");
    (hs, before)
}

/// `allocate` of a slot whose window was evicted faults the window in and
/// then prefaults the next chunk, as on the hot path: the slot taken on the
/// first poll stays taken while the window faults in (it used to be given
/// back and taken again, by then no longer a first use, so the prefault was
/// lost).
#[test]
fn an_allocation_in_an_evicted_window_still_prefaults_the_next_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let (hs, before) = fill_a_chunk_then_evict(&shard).await;
        // The next slot opens the second chunk, in the evicted window.
        let a = shard.allocate(4096).await.unwrap();
        assert_eq!(a.handle().offset() % CHUNK, 0, "{}", a.handle());
        let after = shard.stats().mappings.prefaults;
        if expected_backend() == IoBackend::Sync {
            assert_eq!(after, 0, "the sync backend would block the shard");
        } else {
            assert_eq!(after, before + 1, "the next chunk was not prefaulted");
        }
        assert_eq!(shard.live_count(), hs.len() as u64 + 1);
    });
}

/// The same through `try_allocate`, which gives the slot back when its
/// window is not mapped (`Ok(None)`): the `allocate` that follows takes it
/// again as a first use, and prefaults.
#[test]
fn a_slot_given_back_by_try_allocate_still_prefaults_when_taken_again() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(dir.path());
    run(async {
        let shard = open_shard(&cfg).await.unwrap();
        let (hs, before) = fill_a_chunk_then_evict(&shard).await;
        assert!(
            shard.try_allocate(4096).unwrap().is_none(),
            "the window is not mapped"
        );
        assert_eq!(shard.live_count(), hs.len() as u64);
        let a = shard.allocate(4096).await.unwrap();
        assert_eq!(a.handle().offset() % CHUNK, 0, "{}", a.handle());
        let after = shard.stats().mappings.prefaults;
        if expected_backend() != IoBackend::Sync {
            assert_eq!(after, before + 1, "the next chunk was not prefaulted");
        }
    });
}
