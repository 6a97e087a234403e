//! The allocator workloads of `benches/alloc.rs` and `examples/compare.rs`
//! (included with `#[path]`), each beside its baseline: the raw-mmap
//! ceiling or glibc (`malloc` is the system allocator). Each loop returns
//! the time of its timed part only.

#![allow(dead_code)]

use std::alloc::Layout;
use std::fs::OpenOptions;
use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use segalloc::{Error, Handle, Runtime, Shard};
use tokio::sync::mpsc::unbounded_channel;

/// Bytes of a fill record and of a producer/consumer record.
pub const RECORD_BYTES: u64 = 100;
/// Bytes of a LIFO pair.
pub const PAIR_BYTES: u64 = 64;
/// Sizes of the random mix.
pub const MIX_BYTES_MIN: u64 = 16;
pub const MIX_BYTES_MAX: u64 = 4096;
/// First state of the random mix's generator.
pub const MIX_SEED: u64 = 0x9E37_79B9_7F4A_7C15;
/// Handles per batch from the producer to the consumer.
pub const BATCH: usize = 1024;

/// xorshift64: the same sizes and victims for segalloc and glibc.
pub fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

pub fn mix_size(rng: &mut u64) -> u64 {
    MIX_BYTES_MIN + next(rng) % (MIX_BYTES_MAX - MIX_BYTES_MIN + 1)
}

/// Allocate and write `n` records of `payload`, handles kept.
pub async fn fill(s: &Shard, n: u64, payload: &[u8]) -> Result<Vec<Handle>, Error> {
    fill_into(s, n, payload, Vec::with_capacity(n as usize)).await
}

/// A vector with room for `n` items whose pages are touched (zeroed)
/// already: a timed loop that pushes into it takes no page fault of its
/// own bookkeeping (about 12 ns a record for 32 B handles, measured).
pub fn touched_vec<T>(n: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    for x in v.spare_capacity_mut() {
        *x = std::mem::MaybeUninit::zeroed();
    }
    v
}

/// [`fill`], pushing the handles to `hs` (give it the room, see
/// [`touched_vec`]).
pub async fn fill_into(
    s: &Shard,
    n: u64,
    payload: &[u8],
    mut hs: Vec<Handle>,
) -> Result<Vec<Handle>, Error> {
    for k in 0..n {
        let a = s.allocate(payload.len() as u64).await?;
        a.write_at(0, payload)?;
        hs.push(a.into_handle());
        if k % 4096 == 4095 {
            // Let the shard's other tasks run.
            tokio::task::yield_now().await;
        }
    }
    Ok(hs)
}

pub fn free_all(s: &Shard, hs: Vec<Handle>) -> Result<(), Error> {
    hs.into_iter().try_for_each(|h| s.free(h))
}

/// Allocate `live` slots of `size`, then free every other one: segments
/// exist, windows are mapped, and the class has free slots spread over its
/// segments. Returns the kept handles.
pub async fn warm(s: &Shard, size: u64, live: usize) -> Result<Vec<Handle>, Error> {
    let mut kept = Vec::with_capacity(live / 2);
    for i in 0..live {
        let a = s.allocate(size).await?;
        a.write_at(0, &(i as u64).to_le_bytes())?;
        if i % 2 == 0 {
            s.free(a.into_handle())?;
        } else {
            kept.push(a.into_handle());
        }
    }
    Ok(kept)
}

/// `n` LIFO pairs: allocate + free of one slot of `size`.
pub async fn pairs(s: &Shard, size: u64, n: u64) -> Result<Duration, Error> {
    let t = Instant::now();
    for _ in 0..n {
        let h = s.allocate(black_box(size)).await?.into_handle();
        s.free(black_box(h))?;
    }
    Ok(t.elapsed())
}

/// `live` allocations of the random mix.
pub async fn mix_fill(s: &Shard, live: u64, rng: &mut u64) -> Result<Vec<Handle>, Error> {
    let mut hs = Vec::with_capacity(live as usize);
    for _ in 0..live {
        hs.push(s.allocate(mix_size(rng)).await?.into_handle());
    }
    Ok(hs)
}

/// `ops` operations of the random mix: free a random live one, allocate.
pub async fn mix(s: &Shard, hs: &mut [Handle], rng: &mut u64, ops: u64) -> Result<Duration, Error> {
    let t = Instant::now();
    for _ in 0..ops {
        let i = (next(rng) % hs.len() as u64) as usize;
        s.free(hs[i])?;
        hs[i] = s.allocate(mix_size(rng)).await?.into_handle();
    }
    Ok(t.elapsed())
}

/// `n` pins + unpins of the mapped slot `h`.
pub fn pins(s: &Shard, h: Handle, n: u64) -> Result<Duration, Error> {
    let t = Instant::now();
    for _ in 0..n {
        let p = s
            .try_pin(black_box(h))?
            .expect("the slot's window is mapped");
        black_box(&p);
    }
    Ok(t.elapsed())
}

/// The producer of [`producer_consumer`] on shard `s`: allocate and write
/// `n` records of `size` bytes, handing each batch of [`BATCH`] handles
/// (and the last, shorter one) to `batch_done`, then letting the shard's
/// other tasks run.
async fn produce(
    s: &Shard,
    n: u64,
    size: u64,
    mut batch_done: impl FnMut(Vec<Handle>) -> Result<(), Error>,
) -> Result<(), Error> {
    let payload = vec![0x5Au8; size as usize];
    let mut batch = Vec::with_capacity(BATCH);
    for k in 0..n {
        let a = s.allocate(size).await?;
        a.write_at(0, &payload)?;
        batch.push(a.into_handle());
        if batch.len() == BATCH || k + 1 == n {
            batch_done(std::mem::replace(&mut batch, Vec::with_capacity(BATCH)))?;
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// `n` records from shard 0 to shard 1, in batches of [`BATCH`] handles
/// over a channel; shard 1 lets go of each batch as it receives it.
/// `cross`: shard 1 frees them (each free forwarded back to shard 0, the
/// owner, by segalloc); else shard 1 sends each batch back over a second
/// channel and shard 0 frees it (looking for returned batches each time it
/// sends one, and for the rest at the end). The records travel the same way
/// in both; only who carries the frees back differs. The time until every
/// free is applied.
pub fn producer_consumer(rt: &Runtime, n: u64, size: u64, cross: bool) -> Result<Duration, Error> {
    let (tx, mut rx) = unbounded_channel::<Vec<Handle>>();
    let (back_tx, mut back_rx) = unbounded_channel::<Vec<Handle>>();
    let t = Instant::now();
    let producer = rt.spawn_on(0, move |s| async move {
        produce(&s, n, size, |b| {
            let _ = tx.send(b);
            while let Ok(b) = back_rx.try_recv() {
                free_all(&s, b)?;
            }
            Ok(())
        })
        .await?;
        // The consumer stops once `tx` is gone, then so does the channel
        // back.
        drop(tx);
        while let Some(b) = back_rx.recv().await {
            free_all(&s, b)?;
        }
        Ok::<_, Error>(())
    });
    let consumer = rt.spawn_on(1, move |s| async move {
        while let Some(b) = rx.recv().await {
            if cross {
                for h in b {
                    s.free_async(h).await?;
                }
            } else {
                let _ = back_tx.send(b);
            }
        }
        drop(back_tx);
        s.flush_frees().await
    });
    futures::executor::block_on(producer)??;
    futures::executor::block_on(consumer)??;
    // Until the owner has applied every forwarded free.
    futures::executor::block_on(rt.spawn_on(0, |s| async move {
        while s.live_count() > 0 {
            s.drain_frees();
            tokio::task::yield_now().await;
        }
    }))?;
    Ok(t.elapsed())
}

/// The producer of [`producer_consumer`] alone: shard 0 allocates and
/// writes `n` records and frees each batch itself, handing nothing over
/// (no channel, no consumer). The time of the loop.
pub fn producer_alone(rt: &Runtime, n: u64, size: u64) -> Result<Duration, Error> {
    let t = Instant::now();
    futures::executor::block_on(rt.spawn_on(0, move |s| async move {
        produce(&s, n, size, |b| free_all(&s, b)).await
    }))??;
    Ok(t.elapsed())
}

/// Before a timed file fill: fill a scratch file of `bytes` in `dir`
/// (reserved, mapped, every page written) and delete it, untimed, so that
/// the timed fill's first touches of fresh page cache are quick.
///
/// On the virtual machines the README's figures come from, a fill of
/// fresh page cache of a file on the root ext4 after a pause of a couple
/// of seconds took 1.5 – 2.1 s for 256 MiB, and 46 – 63 ms right after
/// another fill of that size had freed its pages (`fallocate`d file, one
/// byte written per page); which of the two a timed fill met depended on
/// what ran before it, for the raw ceiling as for segalloc. It happened
/// with no file deleted too; anonymous memory and tmpfs files did not
/// show it, and an anonymous warm-up did not help. The cause was not
/// established. A scratch fill of the same size takes the slow touches
/// itself.
pub fn warm_up_file_pages(dir: &Path, bytes: u64) -> std::io::Result<()> {
    let page = 4096u64;
    let bytes = bytes.div_ceil(page).max(1) * page;
    let path = dir.join("warm-up");
    let (f, mut map) = reserved_map(&path, bytes, false)?;
    for at in (0..map.len()).step_by(page as usize) {
        map[at] = 1;
    }
    drop(map);
    drop(f);
    // Deleted with its pages still dirty: they are dropped, not written.
    std::fs::remove_file(&path)
}

/// Give `f` a size of `bytes`: its blocks allocated up front with
/// `fallocate`, as segalloc grows its files, or a sparse `ftruncate`.
pub fn reserve(f: &std::fs::File, bytes: u64, sparse: bool) -> std::io::Result<()> {
    if sparse {
        f.set_len(bytes)
    } else {
        use nix::fcntl::{FallocateFlags, fallocate};
        fallocate(f.as_raw_fd(), FallocateFlags::empty(), 0, bytes as i64)?;
        Ok(())
    }
}

/// A new file at `path` of `bytes`, reserved as [`reserve`] says, and its
/// shared writable mapping. The file is the caller's alone: nothing else
/// may map or truncate it while the mapping lives.
fn reserved_map(
    path: &Path,
    bytes: u64,
    sparse: bool,
) -> std::io::Result<(std::fs::File, memmap2::MmapMut)> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    reserve(&f, bytes, sparse)?;
    // SAFETY: the file was just created (truncated) for the caller alone;
    // nothing else maps or truncates it while the mapping lives.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .len(bytes as usize)
            .map_mut(&f)?
    };
    Ok((f, map))
}

/// What the raw ceiling keeps per record, as segalloc's fill keeps each
/// record's handle: nothing (a record's place is its index × the stride),
/// its byte offset (8 B, what a bump allocator hands back), or as many
/// bytes as a segalloc [`Handle`] (32 B).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    Nothing,
    Offset,
    HandleSized,
}

/// The raw-mmap ceiling: a file at `path` reserved up front (`fallocate`,
/// or a sparse `ftruncate`), mapped shared, a bump pointer at `stride`,
/// `memcpy` of `n` records of `record_bytes`, keeping `kept` per record in
/// a vector reserved and touched up front (as `compare`'s segalloc fill
/// keeps its handles).
/// Dirty pages are written back after the timed part.
pub fn raw_fill(
    path: &Path,
    stride: u64,
    n: u64,
    record_bytes: u64,
    sparse: bool,
    kept: Kept,
) -> std::io::Result<Duration> {
    let total = (stride * n).max(stride);
    warm_up_file_pages(path.parent().expect("a file in a directory"), total)?;
    let (f, mut map) = reserved_map(path, total, sparse)?;
    let payload = vec![0x5Au8; record_bytes as usize];
    let took = match kept {
        Kept::Nothing => bump_fill(&mut map, stride, n, &payload, None::<&mut Vec<()>>, |_| ()),
        Kept::Offset => {
            let mut v = touched_vec(n as usize);
            bump_fill(&mut map, stride, n, &payload, Some(&mut v), |at| at)
        }
        Kept::HandleSized => {
            let mut v = touched_vec(n as usize);
            bump_fill(&mut map, stride, n, &payload, Some(&mut v), |at| {
                let mut h = [0u8; std::mem::size_of::<Handle>()];
                h[..8].copy_from_slice(&at.to_le_bytes());
                h
            })
        }
    };
    map.flush()?;
    f.sync_data()?;
    drop(map);
    std::fs::remove_file(path)?;
    Ok(took)
}

/// The timed loop of [`raw_fill`]: `n` records of `payload` at `stride`,
/// `place(offset)` pushed to `kept` for each when given. The vector is
/// dropped after the timing, as the segalloc fill's handles are.
#[inline(always)]
fn bump_fill<T>(
    map: &mut [u8],
    stride: u64,
    n: u64,
    payload: &[u8],
    mut kept: Option<&mut Vec<T>>,
    place: impl Fn(u64) -> T,
) -> Duration {
    let t = Instant::now();
    let mut at = 0usize;
    for _ in 0..n {
        map[at..at + payload.len()].copy_from_slice(black_box(payload));
        if let Some(v) = kept.as_deref_mut() {
            v.push(place(at as u64));
        }
        at += stride as usize;
    }
    t.elapsed()
}

fn layout(size: u64) -> Layout {
    Layout::from_size_align(size as usize, 16).expect("layout")
}

pub fn malloc(size: u64) -> *mut u8 {
    // SAFETY: every layout used here has a non-zero size.
    let p = unsafe { std::alloc::alloc(layout(size)) };
    assert!(!p.is_null(), "out of memory");
    p
}

/// # Safety
///
/// `p` came from [`malloc`] with this `size` and is not used again.
pub unsafe fn free(p: *mut u8, size: u64) {
    // SAFETY: the caller's contract.
    unsafe { std::alloc::dealloc(p, layout(size)) };
}

/// `n` records of `payload` from malloc, written.
pub fn malloc_fill(n: u64, payload: &[u8]) -> Vec<*mut u8> {
    (0..n)
        .map(|_| {
            let p = malloc(payload.len() as u64);
            // SAFETY: `p` points to `payload.len()` writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), p, payload.len()) };
            p
        })
        .collect()
}

pub fn malloc_free_all(ps: Vec<*mut u8>, size: u64) {
    for p in ps {
        // SAFETY: each pointer came from `malloc(size)` and is freed once.
        unsafe { free(p, size) };
    }
}

/// `n` LIFO pairs of malloc + free.
pub fn malloc_pairs(size: u64, n: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        let p = malloc(black_box(size));
        // SAFETY: allocated just above with `size`.
        unsafe { free(black_box(p), size) };
    }
    t.elapsed()
}

/// `live` allocations of the random mix from malloc.
pub fn malloc_mix_fill(live: u64, rng: &mut u64) -> Vec<(*mut u8, u64)> {
    (0..live)
        .map(|_| {
            let n = mix_size(rng);
            (malloc(n), n)
        })
        .collect()
}

/// `ops` operations of the random mix on malloc.
pub fn malloc_mix(ps: &mut [(*mut u8, u64)], rng: &mut u64, ops: u64) -> Duration {
    let t = Instant::now();
    for _ in 0..ops {
        let i = (next(rng) % ps.len() as u64) as usize;
        // SAFETY: `ps[i]` came from `malloc` with its size; replaced below.
        unsafe { free(ps[i].0, ps[i].1) };
        let n = mix_size(rng);
        ps[i] = (malloc(n), n);
    }
    t.elapsed()
}

pub fn malloc_mix_free(ps: Vec<(*mut u8, u64)>) {
    for (p, n) in ps {
        // SAFETY: each came from `malloc(n)` and is freed once.
        unsafe { free(p, n) };
    }
}
