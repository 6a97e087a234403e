//! Embedding segalloc in a thread-per-core server that owns its threads.
//!
//! `Cluster::open` opens the data directory and builds the channel mesh;
//! each of *your* threads takes one `ShardBuilder` and opens its shard inside
//! its own executor (here a tokio current-thread runtime with a `LocalSet`;
//! tokio-uring works the same). Handlers then allocate, pin and free on their
//! shard; a free of another shard's handle is forwarded to its owner.
//!
//! ```text
//! cargo run --release --example embed -- [--dir DIR] [--threads N]
//! ```

use std::process::ExitCode;
use std::sync::{Arc, mpsc};

use clap::Parser;
use segalloc::{Cluster, Config, Error, Handle};

#[path = "common/cli.rs"]
mod cli;
#[path = "common/owner.rs"]
mod owner;

#[derive(Parser, Debug)]
#[command(about = "segalloc inside threads you own")]
struct Args {
    /// Data directory (created if missing; emptied first with --fresh, which
    /// keeps the directory itself and refuses anything but a closed
    /// segalloc data directory).
    #[arg(long, default_value = "./segalloc-embed")]
    dir: std::path::PathBuf,
    /// Start over.
    #[arg(long)]
    fresh: bool,
    /// Threads, one shard each.
    #[arg(long, default_value_t = 2, value_parser = cli::at_least_one)]
    threads: usize,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("embed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.fresh {
        if let Some(why) = owner::foreign_root_in(&args.dir, "embed") {
            return Err(format!("--fresh: {why}").into());
        }
        // Refuses anything but a closed segalloc data directory.
        segalloc::DataDir::clear(&args.dir).map_err(|e| format!("--fresh: {e}"))?;
    }
    let n = args.threads;
    let cfg = Config::builder(&args.dir).shards(n).build()?;
    let builders = match Cluster::open(cfg) {
        Ok(c) => c.into_builders(),
        Err(
            e @ Error::Mismatch {
                what: "shards",
                on_disk,
                ..
            },
        ) => {
            return Err(format!("{e}; pass --threads {on_disk}, or --fresh to start over").into());
        }
        Err(e) => return Err(e.into()),
    };
    // Every thread has had its forwarded frees applied before any syncs.
    let applied = Arc::new(tokio::sync::Barrier::new(n));
    // Every thread has opened its shard and checked it is not another
    // program's before any writes: one refusal, or a failed open, stops
    // them all.
    let gate = Arc::new(owner::Gate::new(n));

    // Each thread hands some of its handles to the next thread, which frees
    // them (segalloc forwards those frees back to the owner).
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel::<Vec<Handle>>()).unzip();
    let mut rxs: Vec<Option<mpsc::Receiver<Vec<Handle>>>> = rxs.into_iter().map(Some).collect();
    let mut threads = Vec::new();
    for b in builders {
        let i = b.index() as usize;
        let to_next = txs[(i + 1) % n].clone();
        let from_prev = rxs[i].take().expect("one receiver per thread");
        let applied = applied.clone();
        let gate = gate.clone();
        threads.push(std::thread::spawn(move || -> Result<String, Error> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            tokio::task::LocalSet::new().block_on(&rt, async move {
                let shard = b.open().await;
                let why = match &shard {
                    Ok(s) => owner::foreign_root(s, "embed"),
                    Err(e) => Some(format!("shard {i}: {e}")),
                };
                if let Some(why) = gate.pass(why) {
                    return Err(Error::InvalidConfig(why));
                }
                let shard = shard?;
                owner::claim(&shard, "embed").await?;
                let before = shard.live_count();
                // A "request handler": store 10,000 records.
                let mut mine = Vec::new();
                for k in 0..10_000u32 {
                    let a = shard.allocate(128).await?;
                    a.write_at(0, &k.to_le_bytes())?;
                    mine.push(a.into_handle());
                }
                // Give every other one to the next thread to free.
                let gift: Vec<Handle> = mine.iter().copied().step_by(2).collect();
                let _ = to_next.send(gift);
                let received = from_prev.recv().unwrap_or_default();
                let n_received = received.len();
                for h in received {
                    shard.free(h)?; // forwarded to its owner when it is not us
                }
                // Wait until the owners applied what was forwarded here,
                // and until every other thread's frees reached us, then sync.
                shard.flush_frees().await?;
                applied.wait().await;
                shard.sync().await?;
                // Before the shard is dropped: stop exchanging frees with
                // the other shards without losing any (each thread does).
                shard.finish_frees().await;
                Ok(format!(
                    "thread {i}: shard {} had {before} live, allocated 10000, freed {n_received} for thread {}, now {} live, io backend {}",
                    shard.index(),
                    (i + n - 1) % n,
                    shard.live_count(),
                    shard.stats().io_backend
                ))
            })
        }));
    }
    drop(txs);
    for t in threads {
        match t.join() {
            Ok(report) => println!("{}", report?),
            Err(_) => return Err("a shard thread panicked".into()),
        }
    }
    Ok(())
}
