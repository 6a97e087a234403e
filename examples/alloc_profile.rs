//! A fixed allocator workload for instruction counting:
//!
//! ```text
//! cargo build --release --example alloc_profile
//! valgrind --tool=callgrind --toggle-collect='*phase_*' \
//!     target/release/examples/alloc_profile /tmp/alloc-profile 200000
//! ```
//!
//! One shard; phase 1 fills the heap (`try_allocate(100)` in a loop, handles
//! kept), phase 2 frees every allocation, phase 3 runs allocate + free
//! pairs, phase 4 pins and unpins one mapped allocation (`Shard::try_pin`),
//! phase 5 (`phase_asyncfill`) fills again through `allocate(100).await`,
//! phase 6 (`phase_asyncpins`) pins and unpins through `pin(h).await`.
//! Phases 5 and 6 poll each future once, as an executor does (`Ready` on
//! the hot path), from a plain function. Phases 7 and 8 await the same
//! calls inside a task, as a server's handler does: `phase_taskpins`
//! (`pin(h).await` + drop) and `phase_taskpairs` (`allocate(100).await` +
//! `free`); how the compiler lays out the awaiting state machine changes
//! their cost, so both ways are counted. Profile with io_uring (the default): with
//! `SEGALLOC_IO=sync` a new segment is made within the poll, so phase 5
//! would count it. The phases run the hot path only: when the class needs a
//! new segment, `allocate(..).await` runs outside them (once per segment,
//! not counted). Instructions per call = the phase's inclusive count / n.
//!
//! Run without valgrind, it prints each phase's wall time per call (the
//! phase calls only, timed around them; medians are the caller's to take):
//!
//! ```text
//! cargo run --release --example alloc_profile -- /tmp/alloc-profile 2000000
//! ```
//!
//! Phase 1 fills fresh pages (page faults included); phase 5 refills slots
//! freed before (phase 2, then a sync), so it touches no new page.
//!
//! The directory (`/tmp/alloc-profile` above) must not exist: the run makes
//! its data directory there and deletes it when done, and it never touches
//! a path that exists.

use std::future::Future;
use std::hint::black_box;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use segalloc::{Config, DataDir, Handle, Shard};

/// Allocate on the hot path, falling back to the async call when a new
/// segment is needed (once per segment; not counted in any phase).
async fn allocate(shard: &Shard, size: u64) -> Handle {
    match shard.try_allocate(size).expect("allocate") {
        Some(a) => a.into_handle(),
        None => shard.allocate(size).await.expect("allocate").into_handle(),
    }
}

/// Up to `n - out.len()` more allocations on the hot path (`try_allocate`),
/// handles kept; stops early when the class needs a new segment.
#[inline(never)]
fn phase_fill(shard: &Shard, n: usize, out: &mut Vec<Handle>) {
    while out.len() < n {
        match shard.try_allocate(100).expect("allocate") {
            Some(a) => out.push(a.into_handle()),
            None => return,
        }
    }
}

#[inline(never)]
fn phase_free(shard: &Shard, handles: &[Handle]) {
    for h in handles {
        shard.free(*h).expect("free");
    }
}

/// Up to `n - *done` allocate + free pairs on the hot path; stops early
/// when the class needs a new segment.
#[inline(never)]
fn phase_pairs(shard: &Shard, n: usize, done: &mut usize) {
    while *done < n {
        let Some(a) = shard.try_allocate(100).expect("allocate") else {
            return;
        };
        shard.free(black_box(a.into_handle())).expect("free");
        *done += 1;
    }
}

/// Poll the future `$f`, built in place, once with a waker that does
/// nothing: `None` when it is pending.
macro_rules! poll_once {
    ($f:expr) => {{
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut f = std::pin::pin!($f);
        match std::future::Future::poll(f.as_mut(), &mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }};
}

/// Up to `n - out.len()` more allocations through `allocate(100).await`
/// (polled once each); stops early when one has to wait (a new segment).
#[inline(never)]
fn phase_asyncfill(shard: &Shard, n: usize, out: &mut Vec<Handle>) {
    while out.len() < n {
        match poll_once!(shard.allocate(100)) {
            Some(a) => out.push(a.expect("allocate").into_handle()),
            None => return,
        }
    }
}

#[inline(never)]
fn phase_asyncpins(shard: &Shard, h: Handle, n: usize) {
    for _ in 0..n {
        let p = poll_once!(shard.pin(black_box(h)))
            .expect("mapped: ready at once")
            .expect("pin");
        black_box(p.len());
    }
}

#[inline(never)]
fn phase_pins(shard: &Shard, h: Handle, n: usize) {
    for _ in 0..n {
        let p = shard.try_pin(black_box(h)).expect("pin").expect("mapped");
        black_box(p.len());
    }
}

/// `n` pins + unpins of `h` through `pin(h).await`, in the task. (Boxed,
/// so that its state machine is a function of its own that callgrind can
/// count, not inlined into `main`'s.)
fn phase_taskpins(shard: &Shard, h: Handle, n: usize) -> Pin<Box<dyn Future<Output = ()> + '_>> {
    Box::pin(async move {
        for _ in 0..n {
            let p = shard.pin(black_box(h)).await.expect("pin");
            black_box(p.len());
        }
    })
}

/// `n` allocate + free pairs through `allocate(100).await`, in the task
/// (the class has free slots: no new segment is made). Boxed as above.
fn phase_taskpairs(shard: &Shard, n: usize) -> Pin<Box<dyn Future<Output = ()> + '_>> {
    Box::pin(async move {
        for _ in 0..n {
            let a = shard.allocate(black_box(100)).await.expect("allocate");
            shard.free(black_box(a.into_handle())).expect("free");
        }
    })
}

/// Run `f` and add its wall time to `*total`.
fn timed<T>(total: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    *total += t.elapsed();
    r
}

#[path = "common/cli.rs"]
mod cli;

#[derive(clap::Parser, Debug)]
#[command(about = "a fixed allocator workload for instruction counting")]
struct Args {
    /// A path that does not exist: the run makes its data directory there
    /// and deletes it when done (a run cut short leaves it; delete it
    /// before the next).
    #[arg(default_value = "/tmp/segalloc-alloc-profile")]
    dir: String,
    /// Allocations per phase, at least 1.
    #[arg(default_value_t = 200_000, value_parser = cli::at_least_one)]
    n: usize,
}

fn main() {
    let Args { dir, n } = clap::Parser::parse();
    // Never a directory the run did not make: it deletes its own at the end.
    if std::fs::symlink_metadata(&dir).is_ok() {
        eprintln!(
            "alloc_profile: {dir} exists; pass a path that does not exist (the run deletes the directory it makes)"
        );
        std::process::exit(2);
    }
    // Deleted whether the run worked or not (the parents it made stay, as
    // `mkdir -p` made them).
    let run = profile(&dir, n);
    let deleted = DataDir::destroy(&dir);
    if let Err(e) = &run {
        eprintln!("alloc_profile: {e}");
    }
    if let Err(e) = &deleted {
        eprintln!("alloc_profile: could not delete {dir}: {e}");
    }
    if run.is_err() || deleted.is_err() {
        std::process::exit(1);
    }
}

/// Run the phases on a new data directory at `dir`, `n` calls each.
fn profile(dir: &str, n: usize) -> segalloc::Result<()> {
    let cfg = Config::builder(dir).shards(1).build()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let dd = Arc::new(DataDir::open(&cfg)?);
        let shard = Shard::open(dd, &cfg, 0).await?;
        // Wall time of each phase: fill, free, pairs, pins, asyncfill,
        // asyncpins, taskpins, taskpairs.
        let mut t = [Duration::ZERO; 8];
        let mut handles = Vec::with_capacity(n);
        loop {
            timed(&mut t[0], || phase_fill(&shard, n, &mut handles));
            if handles.len() == n {
                break;
            }
            handles.push(allocate(&shard, 100).await);
        }
        shard.sync().await?;
        timed(&mut t[1], || phase_free(&shard, &handles));
        shard.sync().await?;
        let mut done = 0;
        loop {
            timed(&mut t[2], || phase_pairs(&shard, n, &mut done));
            if done == n {
                break;
            }
            let h = allocate(&shard, 100).await;
            shard.free(h).expect("free");
            done += 1;
        }
        let h = allocate(&shard, 100).await;
        timed(&mut t[3], || phase_pins(&shard, h, n));
        let mut again = Vec::with_capacity(n);
        loop {
            timed(&mut t[4], || phase_asyncfill(&shard, n, &mut again));
            if again.len() == n {
                break;
            }
            again.push(allocate(&shard, 100).await);
        }
        timed(&mut t[5], || phase_asyncpins(&shard, h, n));
        let t0 = Instant::now();
        phase_taskpins(&shard, h, n).await;
        t[6] = t0.elapsed();
        // Free slots in the class's segments, so no pair waits.
        shard.free(again.pop().expect("filled")).expect("free");
        let t0 = Instant::now();
        phase_taskpairs(&shard, n).await;
        t[7] = t0.elapsed();
        println!("{n} allocations");
        let names = [
            "fill (try_allocate)",
            "free",
            "allocate + free pair",
            "pin + unpin (try_pin)",
            "refill (allocate().await)",
            "pin + unpin (pin().await)",
            "pin + unpin (pin().await, task)",
            "allocate().await + free (task)",
        ];
        for (name, d) in names.iter().zip(t) {
            println!("{name:<32} {:>7.1} ns/call", d.as_nanos() as f64 / n as f64);
        }
        Ok(())
    })
}
