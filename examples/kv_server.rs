//! A thread-per-core TCP key-value server whose values live in segalloc
//! allocations.
//!
//! ```text
//! cargo run --release --example kv_server -- [--port P] [--dir DIR] [--shards N]
//! ```
//!
//! * `--port P`: TCP port on 127.0.0.1 (default 0: pick a free one). Once
//!   every shard has recovered, the server prints `listening on
//!   127.0.0.1:PORT` on stdout (flushed), then serves until it is killed.
//! * `--dir DIR`: data directory (default `./segalloc-kv`).
//! * `--shards N`: shards, one thread each (default: one per core). A
//!   directory keeps the shard count it was created with.
//!
//! **Threads.** The main thread accepts connections and hands them out
//! round-robin to the shard threads. Each shard thread runs a tokio
//! current-thread runtime with a `LocalSet` and owns one [`Shard`] and the
//! in-memory index of the keys it owns (`key → Handle`). A request is routed
//! by the key's hash (FNV-1a, stable across restarts) to the owning shard,
//! like glommio's sharding: a request for a key of another shard is forwarded
//! over a channel and its reply awaited, so every allocation, pin and free
//! happens on its owner and no lock is taken.
//!
//! **Protocol** (one request after another on a connection; pipelining
//! allowed; the data blocks have no trailing newline):
//!
//! ```text
//! SET key len\n<len bytes>   → OK\n
//! GET key\n                  → VALUE len\n<len bytes>   or  NOTFOUND\n
//! DEL key\n                  → OK\n                     or  NOTFOUND\n
//! SYNC\n                     → OK\n  (after every shard synced)
//! anything wrong             → ERR message\n
//! ```
//!
//! Keys are 1..=250 bytes without whitespace; values 0..=1 MiB.
//!
//! **Records.** A value is one allocation holding a record:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVR1` (little-endian `u32`); zero once retired |
//! | 4 | 4 | key length |
//! | 8 | 4 | value length |
//! | 12 | 4 | CRC-32C of bytes 0..12, 16..24, the key and the value |
//! | 16 | 8 | sequence number (per shard, increasing) |
//! | 24 | … | key, then value |
//!
//! **Durability.** An `OK` is sent only after the record is written through
//! the allocation's pin (a `MAP_SHARED` page) and the allocator acknowledged
//! the allocation or free, so it survives `kill -9`; after `SYNC` it also
//! survives power loss. A record is written (body, then header) before it
//! enters the index; an overwritten or deleted record is retired (its magic
//! zeroed) before it is freed, so a slot handed out again never shows an
//! old record. On start, each shard rebuilds its index from
//! [`Shard::live`]: a record whose header or checksum fails (a write that a
//! crash interrupted) is freed, and of two records of one key (a crash
//! between publishing an overwrite and freeing the old record) the higher
//! sequence number wins.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use segalloc::{Cluster, Config, Handle, Pin, Shard, ShardBuilder};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// Longest key.
const KEY_BYTES_MAX: usize = 250;
/// Largest value.
const VALUE_BYTES_MAX: usize = 1 << 20;
/// Longest request line: `SET <key> <len>`.
const LINE_BYTES_MAX: usize = KEY_BYTES_MAX + 32;

/// Record header size and field offsets.
const HEADER_BYTES: usize = 24;
const MAGIC: u32 = u32::from_le_bytes(*b"KVR1");
const OFF_KEY_LEN: usize = 4;
const OFF_VALUE_LEN: usize = 8;
const OFF_CRC: usize = 12;
const OFF_SEQ: usize = 16;
const _: () = assert!(OFF_SEQ + 8 == HEADER_BYTES);
const _: () = assert!(HEADER_BYTES + KEY_BYTES_MAX + VALUE_BYTES_MAX <= 16 << 20);

// ---------------------------------------------------------------- arguments

struct Args {
    port: u16,
    dir: PathBuf,
    shards: usize,
}

fn usage() -> ! {
    eprintln!("usage: kv_server [--port P] [--dir DIR] [--shards N]");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut args = Args {
        port: 0,
        dir: PathBuf::from("./segalloc-kv"),
        shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--port" => args.port = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => args.dir = PathBuf::from(value()),
            "--shards" => args.shards = value().parse().unwrap_or_else(|_| usage()),
            "--help" | "-h" => usage(),
            other => {
                eprintln!("unknown argument {other:?}");
                usage();
            }
        }
    }
    if args.shards == 0 {
        usage();
    }
    args
}

// ----------------------------------------------------------------- requests

/// A request, as routed to the key's owner.
enum Op {
    Set { key: Vec<u8>, value: Vec<u8> },
    Get { key: Vec<u8> },
    Del { key: Vec<u8> },
    Sync,
}

enum Reply {
    Ok,
    Value(Vec<u8>),
    NotFound,
    Err(String),
}

/// What a shard thread receives: a connection to serve, or a request for a
/// key it owns.
enum ToShard {
    Conn(std::net::TcpStream),
    Op(Op, oneshot::Sender<Reply>),
}

/// FNV-1a: a hash that stays the same across runs (unlike `RandomState`),
/// so a key keeps its owner after a restart.
fn owner_of(key: &[u8], shards: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

// ------------------------------------------------------------------ records

fn record_crc(header: &[u8; HEADER_BYTES], key: &[u8], value: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[..OFF_CRC]);
    let crc = crc32c::crc32c_append(crc, &header[OFF_SEQ..]);
    let crc = crc32c::crc32c_append(crc, key);
    crc32c::crc32c_append(crc, value)
}

fn encode_header(seq: u64, key: &[u8], value: &[u8]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[OFF_KEY_LEN..OFF_KEY_LEN + 4].copy_from_slice(&(key.len() as u32).to_le_bytes());
    h[OFF_VALUE_LEN..OFF_VALUE_LEN + 4].copy_from_slice(&(value.len() as u32).to_le_bytes());
    h[OFF_SEQ..].copy_from_slice(&seq.to_le_bytes());
    let crc = record_crc(&h, key, value);
    h[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    h
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// A record read back and checked: `(seq, key, value)`, or why it is not one.
fn read_record(pin: &Pin) -> Result<(u64, Vec<u8>, Vec<u8>), &'static str> {
    if pin.len() < HEADER_BYTES {
        return Err("slot shorter than a header");
    }
    let mut h = [0u8; HEADER_BYTES];
    pin.read_at(0, &mut h).map_err(|_| "header unreadable")?;
    if u32_at(&h, 0) != MAGIC {
        return Err("no magic (retired or never sealed)");
    }
    let key_len = u32_at(&h, OFF_KEY_LEN) as usize;
    let value_len = u32_at(&h, OFF_VALUE_LEN) as usize;
    if key_len == 0 || key_len > KEY_BYTES_MAX || value_len > VALUE_BYTES_MAX {
        return Err("lengths out of range");
    }
    if HEADER_BYTES + key_len + value_len > pin.len() {
        return Err("lengths exceed the slot");
    }
    let mut key = vec![0u8; key_len];
    let mut value = vec![0u8; value_len];
    pin.read_at(HEADER_BYTES, &mut key)
        .map_err(|_| "key unreadable")?;
    pin.read_at(HEADER_BYTES + key_len, &mut value)
        .map_err(|_| "value unreadable")?;
    if record_crc(&h, &key, &value) != u32_at(&h, OFF_CRC) {
        return Err("checksum mismatch");
    }
    let seq = u64::from_le_bytes(h[OFF_SEQ..].try_into().expect("8 bytes"));
    Ok((seq, key, value))
}

// -------------------------------------------------------------------- store

/// One shard's part of the store. Lives on its shard thread only.
struct Store {
    shard: Shard,
    index: RefCell<HashMap<Vec<u8>, Handle>>,
    next_seq: Cell<u64>,
    peers: Vec<mpsc::UnboundedSender<ToShard>>,
}

/// What recovery found on one shard.
struct Recovered {
    records: usize,
    unsealed: usize,
    superseded: usize,
    elapsed_ms: f64,
}

async fn pin_of(shard: &Shard, h: Handle) -> segalloc::Result<Pin> {
    match shard.try_pin(h)? {
        Some(p) => Ok(p),
        None => shard.pin(h).await,
    }
}

/// Retire a record (zero its magic) and free it. `pin` is its pin.
fn retire(shard: &Shard, h: Handle, pin: Pin) -> segalloc::Result<()> {
    pin.write_at(0, &[0u8; 4])?;
    drop(pin);
    shard.free(h)
}

impl Store {
    /// Rebuild the index from the shard's live allocations.
    async fn open(
        shard: Shard,
        peers: Vec<mpsc::UnboundedSender<ToShard>>,
    ) -> segalloc::Result<(Store, Recovered)> {
        let started = Instant::now();
        let handles: Vec<Handle> = shard.live().collect();
        let mut best: HashMap<Vec<u8>, (u64, Handle)> = HashMap::with_capacity(handles.len());
        let (mut unsealed, mut superseded, mut max_seq) = (0, 0, 0u64);
        for h in handles {
            let pin = pin_of(&shard, h).await?;
            let (seq, key, _value) = match read_record(&pin) {
                Ok(r) => r,
                Err(why) => {
                    eprintln!("shard {}: freeing {h}: {why}", shard.index());
                    unsealed += 1;
                    retire(&shard, h, pin)?;
                    continue;
                }
            };
            drop(pin);
            max_seq = max_seq.max(seq);
            let loser = match best.get(&key) {
                Some(&(old_seq, _)) if old_seq > seq => Some(h),
                Some(&(_, old)) => {
                    best.insert(key, (seq, h));
                    Some(old)
                }
                None => {
                    best.insert(key, (seq, h));
                    None
                }
            };
            if let Some(l) = loser {
                superseded += 1;
                let pin = pin_of(&shard, l).await?;
                retire(&shard, l, pin)?;
            }
        }
        let index: HashMap<Vec<u8>, Handle> = best.into_iter().map(|(k, (_, h))| (k, h)).collect();
        let rec = Recovered {
            records: index.len(),
            unsealed,
            superseded,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        // Make the clean-up durable before serving.
        shard.sync().await?;
        Ok((
            Store {
                shard,
                index: RefCell::new(index),
                next_seq: Cell::new(max_seq + 1),
                peers,
            },
            rec,
        ))
    }

    fn me(&self) -> usize {
        self.shard.index() as usize
    }

    /// Route a request: run it here when this shard owns the key, else on
    /// its owner. `SYNC` runs on every shard.
    async fn route(&self, op: Op) -> Reply {
        let n = self.peers.len();
        let owner = match &op {
            Op::Set { key, .. } | Op::Get { key } | Op::Del { key } => owner_of(key, n),
            Op::Sync => return self.sync_all().await,
        };
        if owner == self.me() {
            return self.execute(op).await;
        }
        forward(&self.peers[owner], op).await
    }

    async fn sync_all(&self) -> Reply {
        let others: Vec<_> = (0..self.peers.len())
            .filter(|&i| i != self.me())
            .map(|i| forward(&self.peers[i], Op::Sync))
            .collect();
        let mut reply = self.execute(Op::Sync).await;
        for r in futures::future::join_all(others).await {
            if let Reply::Err(_) = r {
                reply = r;
            }
        }
        reply
    }

    /// Run a request for a key this shard owns (or a local sync).
    async fn execute(&self, op: Op) -> Reply {
        let r = match op {
            Op::Set { key, value } => self.set(key, value).await,
            Op::Get { key } => self.get(&key).await,
            Op::Del { key } => self.del(&key).await,
            Op::Sync => self.shard.sync().await.map(|()| Reply::Ok),
        };
        r.unwrap_or_else(|e| Reply::Err(e.to_string()))
    }

    /// Pin the record currently indexed under `key`: `None` when absent.
    /// The returned handle is still the indexed one when this returns (the
    /// caller must not await before acting on it).
    async fn pin_current(&self, key: &[u8]) -> segalloc::Result<Option<(Handle, Pin)>> {
        loop {
            let Some(h) = self.index.borrow().get(key).copied() else {
                return Ok(None);
            };
            let pinned = pin_of(&self.shard, h).await;
            if self.index.borrow().get(key) != Some(&h) {
                // Overwritten or deleted while the window faulted in.
                continue;
            }
            return pinned.map(|p| Some((h, p)));
        }
    }

    async fn set(&self, key: Vec<u8>, value: Vec<u8>) -> segalloc::Result<Reply> {
        let total = (HEADER_BYTES + key.len() + value.len()) as u64;
        let (h, pin) = self.shard.allocate(total).await?.into_parts();
        // The body first; the header (magic, checksum) seals it below.
        pin.write_at(HEADER_BYTES, &key)?;
        pin.write_at(HEADER_BYTES + key.len(), &value)?;
        let old = match self.pin_current(&key).await {
            Ok(old) => old,
            Err(e) => {
                drop(pin);
                self.shard.free(h)?;
                return Err(e);
            }
        };
        // From here to the end no await: the sequence number order is the
        // index order.
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        pin.write_at(0, &encode_header(seq, &key, &value))?;
        drop(pin);
        self.index.borrow_mut().insert(key, h);
        if let Some((old, old_pin)) = old {
            retire(&self.shard, old, old_pin)?;
        }
        Ok(Reply::Ok)
    }

    async fn get(&self, key: &[u8]) -> segalloc::Result<Reply> {
        let Some((h, pin)) = self.pin_current(key).await? else {
            return Ok(Reply::NotFound);
        };
        match read_record(&pin) {
            Ok((_, k, value)) if k == key => Ok(Reply::Value(value)),
            Ok(_) => Ok(Reply::Err(format!("record {h} holds another key"))),
            Err(why) => Ok(Reply::Err(format!("record {h} is damaged: {why}"))),
        }
    }

    async fn del(&self, key: &[u8]) -> segalloc::Result<Reply> {
        let Some((h, pin)) = self.pin_current(key).await? else {
            return Ok(Reply::NotFound);
        };
        self.index.borrow_mut().remove(key);
        retire(&self.shard, h, pin)?;
        Ok(Reply::Ok)
    }
}

async fn forward(peer: &mpsc::UnboundedSender<ToShard>, op: Op) -> Reply {
    let (tx, rx) = oneshot::channel();
    if peer.send(ToShard::Op(op, tx)).is_err() {
        return Reply::Err("owner shard is gone".into());
    }
    rx.await
        .unwrap_or_else(|_| Reply::Err("owner shard dropped the request".into()))
}

// --------------------------------------------------------------- connection

/// A connection with a read buffer and a write buffer, over tokio's
/// readiness API (the crate builds tokio without `io-util`).
struct Conn {
    stream: TcpStream,
    rbuf: Vec<u8>,
    rpos: usize,
    wbuf: Vec<u8>,
}

impl Conn {
    fn new(stream: TcpStream) -> Conn {
        Conn {
            stream,
            rbuf: Vec::with_capacity(64 * 1024),
            rpos: 0,
            wbuf: Vec::with_capacity(64 * 1024),
        }
    }

    fn buffered(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    /// Read more bytes; `Ok(0)` at end of stream.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.rpos > 0 && self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
        } else if self.rpos > 32 * 1024 {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        let len = self.rbuf.len();
        self.rbuf.resize(len + 64 * 1024, 0);
        loop {
            match self.stream.try_read(&mut self.rbuf[len..]) {
                Ok(n) => {
                    self.rbuf.truncate(len + n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Err(e) = self.stream.readable().await {
                        self.rbuf.truncate(len);
                        return Err(e);
                    }
                }
                Err(e) => {
                    self.rbuf.truncate(len);
                    return Err(e);
                }
            }
        }
    }

    /// The next line without its `\n`; `None` at a clean end of stream.
    async fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(i) = self.buffered().iter().position(|&b| b == b'\n') {
                let line = self.buffered()[..i].to_vec();
                self.rpos += i + 1;
                return Ok(Some(line));
            }
            if self.buffered().len() > LINE_BYTES_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request line too long",
                ));
            }
            if self.fill().await? == 0 {
                return if self.buffered().is_empty() {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }

    async fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        while self.buffered().len() < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let v = self.buffered()[..n].to_vec();
        self.rpos += n;
        Ok(v)
    }

    async fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.wbuf.len() {
            match self.stream.try_write(&self.wbuf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stream.writable().await?,
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        Ok(())
    }

    fn push_reply(&mut self, r: Reply) {
        match r {
            Reply::Ok => self.wbuf.extend_from_slice(b"OK\n"),
            Reply::NotFound => self.wbuf.extend_from_slice(b"NOTFOUND\n"),
            Reply::Value(v) => {
                self.wbuf
                    .extend_from_slice(format!("VALUE {}\n", v.len()).as_bytes());
                self.wbuf.extend_from_slice(&v);
            }
            Reply::Err(m) => {
                let m = m.replace('\n', " ");
                self.wbuf.extend_from_slice(format!("ERR {m}\n").as_bytes());
            }
        }
    }
}

fn valid_key(k: &[u8]) -> bool {
    !k.is_empty() && k.len() <= KEY_BYTES_MAX && !k.iter().any(|b| b.is_ascii_whitespace())
}

/// Parse one request (reading a SET's value block). `Err` is a protocol
/// error: it is answered, then the connection closes.
async fn read_request(conn: &mut Conn, line: &[u8]) -> io::Result<Result<Op, String>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let cmd = parts.next().unwrap_or(b"");
    let key = parts.next();
    let arg = parts.next();
    let extra = parts.next().is_some();
    let bad = |m: &str| Ok(Err(m.to_string()));
    Ok(Ok(match (cmd, key, arg, extra) {
        (b"SET", Some(k), Some(len), false) => {
            let Some(len) = std::str::from_utf8(len)
                .ok()
                .and_then(|l| l.parse::<usize>().ok())
            else {
                return bad("SET length is not a number");
            };
            if len > VALUE_BYTES_MAX {
                return bad("value larger than 1 MiB");
            }
            if !valid_key(k) {
                return bad("keys are 1..=250 bytes without whitespace");
            }
            let value = conn.read_exact(len).await?;
            Op::Set {
                key: k.to_vec(),
                value,
            }
        }
        (b"GET", Some(k), None, false) if valid_key(k) => Op::Get { key: k.to_vec() },
        (b"DEL", Some(k), None, false) if valid_key(k) => Op::Del { key: k.to_vec() },
        (b"SYNC", None, None, false) => Op::Sync,
        _ => return bad("expected SET key len | GET key | DEL key | SYNC"),
    }))
}

async fn serve(store: Rc<Store>, stream: std::net::TcpStream) {
    let peer = stream.peer_addr().ok();
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shard {}: cannot adopt connection: {e}", store.me());
            return;
        }
    };
    let mut conn = Conn::new(stream);
    if let Err(e) = serve_requests(&store, &mut conn).await
        && e.kind() != io::ErrorKind::ConnectionReset
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        eprintln!("shard {}: connection {peer:?}: {e}", store.me());
    }
}

async fn serve_requests(store: &Store, conn: &mut Conn) -> io::Result<()> {
    while let Some(line) = conn.read_line().await? {
        match read_request(conn, &line).await? {
            Ok(op) => {
                let reply = store.route(op).await;
                conn.push_reply(reply);
            }
            Err(m) => {
                conn.push_reply(Reply::Err(m));
                return conn.flush().await;
            }
        }
        // Answer a pipelined batch in one write.
        if conn.buffered().is_empty() || conn.wbuf.len() > 64 * 1024 {
            conn.flush().await?;
        }
    }
    conn.flush().await
}

// ------------------------------------------------------------------ threads

/// A shard thread: open the shard, rebuild its index, report, then serve
/// connections and forwarded requests until the process ends.
fn shard_thread(
    builder: ShardBuilder,
    mut inbox: mpsc::UnboundedReceiver<ToShard>,
    peers: Vec<mpsc::UnboundedSender<ToShard>>,
    ready: std::sync::mpsc::Sender<Result<String, String>>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio current-thread runtime");
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let index = builder.index();
        let opened = match builder.open().await {
            Ok(shard) => Store::open(shard, peers).await,
            Err(e) => Err(e),
        };
        let store = match opened {
            Ok((store, rec)) => {
                let _ = ready.send(Ok(format!(
                    "shard {index}: {} records recovered ({} unsealed and {} superseded freed) in {:.1} ms, io {:?}",
                    rec.records,
                    rec.unsealed,
                    rec.superseded,
                    rec.elapsed_ms,
                    store.shard.stats().io_backend
                )));
                Rc::new(store)
            }
            Err(e) => {
                let _ = ready.send(Err(format!("shard {index}: {e}")));
                return;
            }
        };
        while let Some(msg) = inbox.recv().await {
            let store = store.clone();
            match msg {
                ToShard::Conn(s) => {
                    tokio::task::spawn_local(serve(store, s));
                }
                ToShard::Op(op, reply) => {
                    tokio::task::spawn_local(async move {
                        let _ = reply.send(store.execute(op).await);
                    });
                }
            }
        }
    });
}

fn main() {
    let args = parse_args();
    let cfg = match Config::builder(&args.dir).shards(args.shards).build() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kv_server: {e}");
            std::process::exit(1);
        }
    };
    let cluster = match Cluster::open(cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kv_server: {}: {e}", args.dir.display());
            std::process::exit(1);
        }
    };
    let listener = match std::net::TcpListener::bind(("127.0.0.1", args.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("kv_server: bind 127.0.0.1:{}: {e}", args.port);
            std::process::exit(1);
        }
    };
    let builders = cluster.into_builders();
    let (senders, inboxes): (Vec<_>, Vec<_>) =
        builders.iter().map(|_| mpsc::unbounded_channel()).unzip();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (b, inbox) in builders.into_iter().zip(inboxes) {
        let peers = senders.clone();
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("kv-shard-{}", b.index()))
            .spawn(move || shard_thread(b, inbox, peers, ready))
            .expect("spawn shard thread");
    }
    drop(ready_tx);
    for _ in 0..senders.len() {
        match ready_rx.recv() {
            Ok(Ok(line)) => eprintln!("{line}"),
            Ok(Err(e)) => {
                eprintln!("kv_server: {e}");
                std::process::exit(1);
            }
            Err(_) => {
                eprintln!("kv_server: a shard thread died while opening");
                std::process::exit(1);
            }
        }
    }
    let addr = listener.local_addr().expect("local address");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
    drop(out);

    let mut next = 0usize;
    for stream in listener.incoming() {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                eprintln!("kv_server: accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Err(e) = stream.set_nonblocking(true) {
            eprintln!("kv_server: set_nonblocking: {e}");
            continue;
        }
        if senders[next].send(ToShard::Conn(stream)).is_err() {
            eprintln!("kv_server: shard {next} is gone");
            std::process::exit(1);
        }
        next = (next + 1) % senders.len();
    }
}
