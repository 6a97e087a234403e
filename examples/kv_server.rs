//! A Redis-protocol (RESP2) key-value server whose values live in segalloc
//! allocations, one thread per shard. `redis-cli`, `redis-benchmark` and
//! Redis client libraries talk to it unchanged.
//!
//! ```text
//! cargo run --release --example kv_server -- [--port P] [--dir DIR] [--shards N] [--sync always|everysec|no]
//! ```
//!
//! Once every shard has recovered, the server prints `listening on
//! 127.0.0.1:PORT` on stdout (flushed), then serves until it is killed.
//!
//! **Commands.** `PING`, `ECHO`, `GET`, `SET` (`EX`, `PX`, `EXAT`, `PXAT`,
//! `KEEPTTL`, `NX`, `XX`; `GET` is refused with an error), `DEL`, `EXISTS`,
//! `MGET`, `MSET`, `INCR`, `DECR`, `INCRBY`, `DECRBY`, `DBSIZE`, `FLUSHDB`,
//! `FLUSHALL`, `INFO` (server, memory, persistence, keyspace), `CONFIG GET`,
//! `SAVE`, `COMMAND` (`COUNT`, `INFO`, `DOCS`), `SELECT 0`, `CLIENT
//! SETNAME|SETINFO`, `QUIT`, `SHUTDOWN [SAVE|NOSAVE]`; inline commands too.
//! SIGTERM, SIGINT and `SHUTDOWN` sync every shard, then exit 0
//! (`SHUTDOWN NOSAVE`: exit at once). An expired key is deleted
//! when read, or by a sweep every 100 ms (every key due, in turns of 1 to
//! 10 ms that take about half the shard's thread while keys are due, so it
//! keeps up with writes that give keys an expiry). A multi-key command whose keys live on several shards is not
//! atomic across them.
//!
//! **Limits.** Keys up to 512 bytes (the empty key too), arguments up to
//! 1 MiB (a larger one, up to 512 MiB, is skipped without being buffered
//! and answered with an error), 65 536 arguments and 8 MiB per command,
//! 10 000 connections or fewer when the open-file limit leaves fewer (see
//! `connection_cap`), 64 values read per batch (see
//! `conn::READS_PER_BATCH`). Bytes that are not RESP, and a larger length,
//! get `-ERR Protocol error: ...`, then the connection closes.
//!
//! **Threads.** The main thread accepts connections and hands them out
//! round-robin to the shard threads. Each shard thread runs a tokio
//! current-thread runtime and owns one [`segalloc::Shard`] and the index of
//! the keys that hash to it (FNV-1a, stable across restarts; the index
//! itself hashes with per-process random seeds, see `kv_server/hash.rs`). A
//! `GET` or `SET` whose windows are mapped runs without awaiting. A
//! connection turns what one read brought into one batch of key operations
//! per shard (or several batches in turn, when its commands read more
//! values than one batch may): it runs its own shard's batch, and sends
//! every other batch to its owner in one message over the server's
//! channels, so every allocation, pin and free happens on its owner. The
//! replies of a batch go out in one write.
//!
//! **Durability.** Every value is a record in an allocation (see
//! `kv_server/store.rs` for the layout: header with key and value lengths,
//! sequence number, expiry and CRC-32C, then key and value). A reply to a
//! write is sent only after the record is in its `MAP_SHARED` mapping and
//! the allocator acknowledged the allocation, so an acknowledged write
//! survives `kill -9`. Under `--sync always` the record an overwrite
//! replaced stays allocated until a sync covered the new one and a round
//! retires it (every `--retire-ms`, default a second, or when 262,144 wait
//! on a shard or lie on 16,384 pages; a round zeroes them page by page in
//! file order, a sync after every 256 pages; a deletion first retires the
//! key's waiting ones, durably). Under `everysec` and `no` an overwrite marks
//! it superseded at once and frees it once a sync covered the new one, so
//! a power loss that takes the new record leaves the key its previous
//! value (see `Store::retire_round`). Against power
//! loss, `--sync` chooses, like Redis's `appendfsync`: `always` answers a
//! batch of writes only after a sync of its shard that started once they
//! were in place (group commit: each shard has one sync in flight at a
//! time, shared by all its connections and by the batches other shards
//! forwarded; the writes that arrive while it runs are covered by the next
//! one, which first waits, up to a millisecond, for as many batches as the
//! last one answered, so connections that write in turn share one sync
//! instead of splitting into two groups; a shard that starts such a sync
//! rings the other shards, whose syncers stop that wait and start theirs,
//! so the shards answer together), `everysec` syncs every second, `no` on
//! `SAVE` and every 30 s (freed space is reused only after a
//! sync). `INFO persistence` shows
//! `segalloc_sync_policy`, `segalloc_syncs` (completed syncs, summed over
//! shards), `segalloc_sync_failures`, `segalloc_last_sync_unix_ms` (the
//! oldest over shards) and `rdb_changes_since_last_save` (writes no sync
//! covers yet). `SAVE` returns once every shard synced. On start each shard
//! rebuilds its index from its live allocations: a torn record (bad header
//! or checksum) is freed, of two records of one key the higher sequence
//! number wins, an expired record is freed.

#[path = "kv_server/batch.rs"]
mod batch;
#[path = "kv_server/commands.rs"]
mod commands;
#[path = "kv_server/conn.rs"]
mod conn;
#[path = "common/crc.rs"]
mod crc;
#[path = "kv_server/hash.rs"]
mod hash;
#[path = "common/owner.rs"]
mod owner;
#[path = "kv_server/resp.rs"]
mod resp;
#[path = "kv_server/retire.rs"]
mod retire;
#[path = "kv_server/store.rs"]
mod store;

use std::io::{self, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use segalloc::{Cluster, Config, ShardBuilder};
use tokio::sync::{mpsc, oneshot};

use crate::batch::Batch;
use crate::commands::ServerFacts;
use crate::conn::Ctx;
use crate::store::{Store, SyncPolicy};

/// Most connections served at once; more are answered with an error. Lowered
/// at start to what the open-file limit leaves (see [`connection_cap`]).
pub const CONNECTIONS_MAX: usize = 10_000;

/// Descriptors kept for the process besides the connections and segalloc's
/// `max_open_files`: per shard its ring, its runtime's epoll and wakers and
/// its lock (8 is ample), plus stdio, the listener and the data directory's
/// lock.
fn reserved_fds(shards: usize) -> usize {
    32 + 8 * shards
}

/// The soft open-file limit, from `/proc/self/limits`.
fn nofile_soft_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(usize::MAX);
    }
    soft.parse().ok()
}

/// Most connections served at once: [`CONNECTIONS_MAX`], or fewer when the
/// open-file limit would run out first (as Redis lowers `maxclients`), so
/// that the data files always find a descriptor. `None` when the limit
/// leaves none.
fn connection_cap(soft_limit: usize, max_open_files: usize, shards: usize) -> Option<usize> {
    let cap = soft_limit
        .saturating_sub(max_open_files)
        .saturating_sub(reserved_fds(shards))
        .min(CONNECTIONS_MAX);
    (cap > 0).then_some(cap)
}

/// A Redis-protocol key-value server on segalloc.
#[derive(Parser, Debug)]
struct Args {
    /// TCP port on 127.0.0.1 (0: pick a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Data directory.
    #[arg(long, default_value = "./segalloc-kv")]
    dir: PathBuf,
    /// Shards, one thread each (default: the directory's count, or one per
    /// core for a new directory).
    #[arg(long)]
    shards: Option<usize>,
    /// When writes become durable against power loss.
    #[arg(long, value_enum, default_value_t = SyncPolicy::Everysec)]
    sync: SyncPolicy,
    /// Under `--sync always`: how often each shard retires the records
    /// overwrites replaced (those whose replacement a sync covered), in
    /// milliseconds. They are also retired when 262,144 wait on a shard or
    /// lie on 16,384 pages (after a sync if need be), and before any
    /// deletion of their key.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    retire_ms: u64,
}

/// What a shard thread receives: a connection to serve, or a batch of
/// operations on keys it owns, to run and send back.
pub enum ToShard {
    Conn(std::net::TcpStream, ConnSlot),
    Batch(Box<Batch>, oneshot::Sender<Box<Batch>>),
    /// Sync everything acknowledged so far, before the process exits.
    Shutdown(std::sync::mpsc::Sender<Result<(), String>>),
}

/// A connection's place under [`CONNECTIONS_MAX`], given back on drop.
pub struct ConnSlot(Arc<AtomicUsize>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A shard thread's one report to `start_shards`, and its one pass of the
/// [`owner::Gate`]. Dropped before either (a panic while the shard opens),
/// it passes the gate with a refusal and reports the shard stopped: no
/// other shard, and not `start_shards`, waits for it forever.
struct StartReport {
    index: u16,
    tx: std::sync::mpsc::Sender<Result<String, String>>,
    gate: Arc<owner::Gate>,
    passed: std::cell::Cell<bool>,
    sent: std::cell::Cell<bool>,
}

impl StartReport {
    fn pass(&self, why: Option<String>) -> Option<String> {
        self.passed.set(true);
        self.gate.pass(why)
    }

    fn send(&self, r: Result<String, String>) {
        if !self.sent.replace(true) {
            let _ = self.tx.send(r);
        }
    }
}

impl Drop for StartReport {
    fn drop(&mut self) {
        let stopped = format!("shard {}: stopped while opening", self.index);
        if !self.passed.get() {
            self.pass(Some(stopped.clone()));
        }
        self.send(Err(stopped));
    }
}

/// A shard thread: open the shard, rebuild its index, report, then serve
/// connections and forwarded batches until the process ends.
fn shard_thread(
    builder: ShardBuilder,
    mut inbox: mpsc::UnboundedReceiver<ToShard>,
    peers: Vec<mpsc::UnboundedSender<ToShard>>,
    facts: ServerFacts,
    ready: std::sync::mpsc::Sender<Result<String, String>>,
    bell: Arc<tokio::sync::Notify>,
    gate: Arc<owner::Gate>,
) {
    // First: whatever panics below, the gate and the starter hear of it.
    let report = StartReport {
        index: builder.index(),
        tx: ready,
        gate,
        passed: std::cell::Cell::new(false),
        sent: std::cell::Cell::new(false),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio current-thread runtime");
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let ready = &report;
        let index = builder.index();
        let opened = builder.open().await;
        let why = match &opened {
            Ok(shard) => owner::foreign_root(shard, store::PROGRAM),
            Err(e) => Some(format!("shard {index}: {e}")),
        };
        // Every shard passes, whatever it found, so that none waits forever.
        if let Some(refused) = ready.pass(why) {
            ready.send(Err(refused));
            return;
        }
        let opened = match opened {
            Ok(shard) => Store::open(shard, facts.policy, facts.retire_every).await,
            Err(e) => Err(e),
        };
        let store = match opened {
            Ok((store, rec)) => {
                ready.send(Ok(format!(
                    "shard {index}: {} records recovered ({} torn, {} superseded, {} expired freed) in {:.1} ms, io {}",
                    rec.records,
                    rec.torn,
                    rec.superseded,
                    rec.expired,
                    rec.elapsed_ms,
                    store.shard.stats().io_backend
                )));
                Rc::new(store)
            }
            Err(e) => {
                ready.send(Err(format!("shard {index}: {e}")));
                return;
            }
        };
        let syncer = store.clone();
        tokio::task::spawn_local(async move { syncer.run_syncer(bell).await });
        let expiry = store.clone();
        tokio::task::spawn_local(async move { expiry.run_expiry().await });
        let retirer = store.clone();
        tokio::task::spawn_local(async move { retirer.run_retirer().await });
        let ctx = Rc::new(Ctx {
            store,
            peers,
            me: index as usize,
            server: Rc::new(facts),
        });
        while let Some(msg) = inbox.recv().await {
            match msg {
                ToShard::Conn(s, slot) => {
                    let ctx = ctx.clone();
                    tokio::task::spawn_local(async move {
                        conn::serve(ctx, s).await;
                        drop(slot);
                    });
                }
                ToShard::Batch(mut batch, reply) => {
                    // Most batches run at once; only one that awaits (a
                    // window to map, an allocation, a sync) gets a task.
                    let now = store::now_unix_ms();
                    let done = ctx.store.run_ready(&mut batch, now);
                    if done == batch.ops.len() && !ctx.store.must_sync(&batch) {
                        let _ = reply.send(batch);
                        continue;
                    }
                    let store = ctx.store.clone();
                    tokio::task::spawn_local(async move {
                        store.run_rest(&mut batch, done, now).await;
                        let _ = reply.send(batch);
                    });
                }
                ToShard::Shutdown(reply) => {
                    let store = ctx.store.clone();
                    tokio::task::spawn_local(async move {
                        let r = store.sync_now().await;
                        let _ = reply.send(r.map_err(|e| format!("shard {index}: {e}")));
                    });
                }
            }
        }
    });
}

fn fail(msg: impl std::fmt::Display) -> ! {
    eprintln!("kv_server: {msg}");
    std::process::exit(1);
}

/// Start the shard threads; returns their inboxes once every shard has
/// recovered.
fn start_shards(
    cluster: Cluster,
    args: &Args,
    port: u16,
    max_clients: usize,
) -> Vec<mpsc::UnboundedSender<ToShard>> {
    let builders = cluster.into_builders();
    let (senders, inboxes): (Vec<_>, Vec<_>) =
        builders.iter().map(|_| mpsc::unbounded_channel()).unzip();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // Rung by a shard's syncer as it starts a sync that writes wait for.
    let sync_bell = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    let gate = Arc::new(owner::Gate::new(senders.len()));
    for (b, inbox) in builders.into_iter().zip(inboxes) {
        let gate = gate.clone();
        let peers = senders.clone();
        let ready = ready_tx.clone();
        let bell = sync_bell.clone();
        let facts = ServerFacts {
            port,
            max_clients,
            shards: senders.len(),
            policy: args.sync,
            retire_every: Duration::from_millis(args.retire_ms),
            dir: args.dir.clone(),
            started,
        };
        std::thread::Builder::new()
            .name(format!("kv-shard-{}", b.index()))
            .spawn(move || shard_thread(b, inbox, peers, facts, ready, bell, gate))
            .unwrap_or_else(|e| fail(format_args!("spawn a shard thread: {e}")));
    }
    drop(ready_tx);
    // Every shard's report before failing on the first error: no shard is
    // still at work on the directory when the process exits.
    let mut first_error = None;
    for _ in 0..senders.len() {
        match ready_rx.recv() {
            Ok(Ok(line)) => eprintln!("{line}"),
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => fail("a shard thread died while opening"),
        }
    }
    if let Some(e) = first_error {
        fail(e);
    }
    senders
}

/// Failed `accept`s: reported at most once a second, with how many were
/// not since the last report (also said at the next accept that succeeds).
#[derive(Default)]
struct AcceptErrors {
    last_report: Option<Instant>,
    unreported: u64,
}

impl AcceptErrors {
    /// The line to log for `e` at `now`, if one is due.
    fn report(&mut self, e: &io::Error, now: Instant) -> Option<String> {
        if self
            .last_report
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.unreported += 1;
            return None;
        }
        let line = match std::mem::take(&mut self.unreported) {
            0 => format!("kv_server: accept: {e}"),
            n => format!("kv_server: accept: {e} (and {n} more failures since the last report)"),
        };
        self.last_report = Some(now);
        Some(line)
    }

    /// After an accept that succeeded: the failures not reported yet.
    fn settle(&mut self) -> Option<String> {
        match std::mem::take(&mut self.unreported) {
            0 => None,
            n => Some(format!(
                "kv_server: accept: {n} more failures since the last report"
            )),
        }
    }

    /// Whether the loop should wait before the next `accept`: the process
    /// or the system is out of descriptors or memory (EMFILE, ENFILE,
    /// ENOBUFS, ENOMEM), which only a closing connection changes.
    fn waits(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(
                libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOBUFS | libc_errno::ENOMEM
            )
        )
    }
}

/// The errno values [`AcceptErrors`] waits on (Linux).
mod libc_errno {
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENOBUFS: i32 = 105;
}

/// The shard count an existing data directory was created with.
fn existing_shard_count(dir: &std::path::Path) -> Option<usize> {
    let (existing, _) = segalloc::DataDir::open_read_only(dir).ok()?;
    Some(existing.manifest().shard_count as usize)
}

/// Allocate blocks of 4 MiB or more (the index's larger tables, large
/// batches' replies) with `mmap` of their own, so that freeing one gives
/// its memory back. glibc raises this threshold as large blocks are freed,
/// up to 32 MiB, after which a table shrunk after mass deletes (`Store`'s
/// index) went back into a thread's arena, where freed memory below live
/// blocks stays resident: 500,000 keys written and all but 1,000 deleted
/// kept 11 – 22 MiB (`RssAnon`) against 6 MiB with the threshold fixed.
/// Arguments are at most 1 MiB, so one command's buffers stay in the
/// arenas (no `mmap` per large value).
fn keep_large_blocks_out_of_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only sets an allocator parameter; it is called
    // before any other thread exists.
    unsafe {
        nix::libc::mallopt(nix::libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// SIGTERM and SIGINT, which [`shut_down_on_signal`] waits for: blocked
/// in every thread (they inherit the mask of the thread that starts them).
fn shutdown_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Whether a client's `SHUTDOWN NOSAVE` asked to exit without the final
/// sync.
static NOSAVE: AtomicBool = AtomicBool::new(false);

/// Set before the shards are asked for their final sync: from then on no
/// connection writes a reply (`conn`), so nothing is acknowledged that the
/// sync may not cover. A reply written before saw it unset, so its writes
/// were applied before their shard took the request to sync (which the
/// signal thread sends after setting it).
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);

/// Whether the final sync has been asked for: write no more replies.
pub fn shutting_down() -> bool {
    SHUTTING_DOWN.load(Ordering::SeqCst)
}

/// Whether a client's `SHUTDOWN` has asked for the shutdown already.
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Ask for the shutdown a signal makes (`SHUTDOWN`): the signal thread
/// syncs every shard (unless `nosave`) and exits. Once (a second
/// `SHUTDOWN` waits for the first's exit: a second signal would be taken
/// for an impatient operator's, and cut the sync short).
pub fn request_shutdown(nosave: bool) {
    if REQUESTED.swap(true, Ordering::SeqCst) || SHUTTING_DOWN.load(Ordering::SeqCst) {
        return;
    }
    if nosave {
        NOSAVE.store(true, Ordering::SeqCst);
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), Signal::SIGTERM);
}

/// The shards' inboxes, once every shard has recovered.
static SHARDS: std::sync::OnceLock<Vec<mpsc::UnboundedSender<ToShard>>> =
    std::sync::OnceLock::new();

/// Wait for SIGTERM or SIGINT, then sync every shard (everything
/// acknowledged becomes durable, whatever `--sync` says) and exit: 0 once
/// every shard synced, 1 if one failed or did not answer within a minute.
/// Connections are closed by the exit, as Redis closes them. A signal
/// while the shards recover exits at once (nothing was served: like a
/// crash, which recovery is made for), and a second signal during the
/// final sync exits without waiting for it.
fn shut_down_on_signal() {
    let Ok(sig) = shutdown_signals().wait() else {
        return;
    };
    let Some(senders) = SHARDS.get() else {
        eprintln!("kv_server: {sig:?} while the shards recover: exiting (nothing was served)");
        std::process::exit(0);
    };
    std::thread::spawn(move || {
        if let Ok(again) = shutdown_signals().wait() {
            eprintln!("kv_server: {again:?} again: exiting without waiting for the final sync");
            std::process::exit(1);
        }
    });
    if NOSAVE.load(Ordering::SeqCst) {
        eprintln!("kv_server: {sig:?}: exiting without a final sync (SHUTDOWN NOSAVE)");
        std::process::exit(0);
    }
    eprintln!("kv_server: {sig:?}: syncing every shard before exit");
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    for s in senders {
        if s.send(ToShard::Shutdown(tx.clone())).is_err() {
            fail("a shard is gone: not every shard synced");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for _ in senders {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => fail(format_args!("final sync failed: {e}")),
            Err(_) => fail("a shard did not sync within a minute"),
        }
    }
    eprintln!("kv_server: every shard synced; exiting");
    std::process::exit(0);
}

fn main() {
    keep_large_blocks_out_of_arenas();
    // Before any other thread starts: all of them inherit the mask, and
    // only the signal thread takes these signals.
    if let Err(e) = shutdown_signals().thread_block() {
        fail(format_args!("block SIGTERM and SIGINT: {e}"));
    }
    let args = Args::parse();
    let mut cfg = Config::builder(&args.dir);
    if let Some(n) = args.shards.or_else(|| existing_shard_count(&args.dir)) {
        cfg = cfg.shards(n);
    }
    let cfg = cfg.build().unwrap_or_else(|e| fail(e));
    let soft = nofile_soft_limit().unwrap_or(1024);
    let max_clients =
        connection_cap(soft, cfg.max_open_files(), cfg.shards()).unwrap_or_else(|| {
            fail(format_args!(
                "the open-file limit ({soft}) leaves no descriptor for connections: raise it \
                 (ulimit -n)"
            ))
        });
    if max_clients < CONNECTIONS_MAX {
        eprintln!(
            "kv_server: at most {max_clients} connections: the open-file limit is {soft} \
             (raise it with ulimit -n for up to {CONNECTIONS_MAX})"
        );
    }
    // Bound before the directory is opened: a port in use must not leave
    // a new data directory behind (its shard count then fixed).
    let listener = std::net::TcpListener::bind(("127.0.0.1", args.port))
        .unwrap_or_else(|e| fail(format_args!("bind 127.0.0.1:{}: {e}", args.port)));
    let cluster = Cluster::open(cfg).unwrap_or_else(|e| match e {
        segalloc::Error::Mismatch {
            what: "shards",
            on_disk,
            ..
        } => fail(format_args!(
            "{}: {e}; pass --shards {on_disk}, or leave --shards out",
            args.dir.display()
        )),
        e => fail(format_args!("{}: {e}", args.dir.display())),
    });
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(format_args!("local address: {e}")));
    std::thread::Builder::new()
        .name("kv-signals".into())
        .spawn(shut_down_on_signal)
        .unwrap_or_else(|e| fail(format_args!("spawn the signal thread: {e}")));
    let senders = start_shards(cluster, &args, addr.port(), max_clients);
    let _ = SHARDS.set(senders.clone());
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
    drop(out);

    let open = Arc::new(AtomicUsize::new(0));
    let mut next = 0usize;
    let mut accept_errors = AcceptErrors::default();
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                if let Some(line) = accept_errors.report(&e, Instant::now()) {
                    eprintln!("{line}");
                }
                if AcceptErrors::waits(&e) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        if let Some(line) = accept_errors.settle() {
            eprintln!("{line}");
        }
        if open.fetch_add(1, Ordering::Relaxed) >= max_clients {
            open.fetch_sub(1, Ordering::Relaxed);
            let _ = stream.write_all(b"-ERR max number of clients reached\r\n");
            continue;
        }
        let slot = ConnSlot(open.clone());
        let _ = stream.set_nodelay(true);
        if let Err(e) = stream.set_nonblocking(true) {
            eprintln!("kv_server: set_nonblocking: {e}");
            continue;
        }
        if senders[next].send(ToShard::Conn(stream, slot)).is_err() {
            fail(format_args!("shard {next} is gone"));
        }
        next = (next + 1) % senders.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard thread that panics before the owner gate still passes it
    /// (with a refusal) and reports: the other shard and the starter do not
    /// wait forever, and nobody goes on to recover.
    #[test]
    fn a_shard_thread_that_panics_before_the_gate_stops_the_start() {
        let gate = Arc::new(owner::Gate::new(2));
        let (tx, rx) = std::sync::mpsc::channel();
        let report = |index: u16| StartReport {
            index,
            tx: tx.clone(),
            gate: gate.clone(),
            passed: std::cell::Cell::new(false),
            sent: std::cell::Cell::new(false),
        };
        let r0 = report(0);
        let dies = std::thread::spawn(move || {
            let _r = r0;
            panic!("shard 0 panics while opening");
        });
        let r1 = report(1);
        let (passed_tx, passed_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let refused = r1.pass(None);
            r1.send(Err(format!("refused: {refused:?}")));
            let _ = passed_tx.send(refused);
        });
        assert!(dies.join().is_err());
        // Within a bound, so that a gate that waits forever fails the test.
        let refused = passed_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the other shard passes the gate");
        assert!(
            refused.is_some_and(|r| r.contains("shard 0: stopped while opening")),
            "the other shard would go on"
        );
        drop(tx);
        let reports: Vec<_> = rx.iter().collect();
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert!(reports.iter().all(|r| r.is_err()), "{reports:?}");
    }

    /// The connection cap leaves segalloc its descriptors: at the common
    /// soft limit of 1024 with 256 for segalloc, two shards serve 720
    /// connections, not 10,000 (with 200 connections open under a limit of
    /// 128 the data files found no descriptor and `SET` failed).
    #[test]
    fn the_connection_cap_leaves_the_data_files_their_descriptors() {
        assert_eq!(connection_cap(1024, 256, 2), Some(1024 - 256 - 48));
        assert_eq!(connection_cap(128, 64, 2), Some(128 - 64 - 48));
        assert_eq!(connection_cap(1 << 20, 256, 2), Some(CONNECTIONS_MAX));
        assert_eq!(connection_cap(usize::MAX, 256, 64), Some(CONNECTIONS_MAX));
        assert_eq!(connection_cap(64, 32, 2), None);
        assert!(nofile_soft_limit().is_some_and(|n| n > 0));
    }

    /// Out of descriptors, `accept` fails at once, again and again: the loop
    /// waits before the next (it once spun at 100 % CPU) and logs a line a
    /// second, with the count of the others (it once wrote millions).
    #[test]
    fn failed_accepts_wait_and_are_logged_once_a_second() {
        let emfile = io::Error::from_raw_os_error(libc_errno::EMFILE);
        let aborted = io::Error::from_raw_os_error(103); // ECONNABORTED
        assert!(AcceptErrors::waits(&emfile));
        assert!(AcceptErrors::waits(&io::Error::from_raw_os_error(
            libc_errno::ENFILE
        )));
        assert!(!AcceptErrors::waits(&aborted));
        let mut errs = AcceptErrors::default();
        let t0 = Instant::now();
        assert!(
            errs.report(&emfile, t0)
                .is_some_and(|l| l.ends_with("(os error 24)"))
        );
        for ms in 1..1000 {
            assert_eq!(errs.report(&emfile, t0 + Duration::from_millis(ms)), None);
        }
        let line = errs.report(&emfile, t0 + Duration::from_secs(1)).unwrap();
        assert!(
            line.ends_with("(and 999 more failures since the last report)"),
            "{line}"
        );
        assert_eq!(
            errs.report(&aborted, t0 + Duration::from_millis(1500)),
            None
        );
        assert_eq!(
            errs.settle().as_deref(),
            Some("kv_server: accept: 1 more failures since the last report")
        );
        assert_eq!(errs.settle(), None);
    }
}
