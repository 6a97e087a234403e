//! Load generator and crash check for the `kv_server` example.
//!
//! ```text
//! cargo build --release --examples          # builds kv_server next to kv_load
//! cargo run --release --example kv_load -- [--requests N] [--connections C]
//!     [--value-bytes B] [--keys K] [--shards S] [--dir DIR] [--seed X]
//!     [--skip-sync] [--json]
//! ```
//!
//! `cargo run --example kv_load` does not build `kv_server`: build it first
//! (`cargo build --release --example kv_server`, or all examples with
//! `--examples`). The server binary is looked up next to this one
//! (`std::env::current_exe()`'s directory).
//!
//! What it does, on 127.0.0.1 only and bounded in requests and time:
//!
//! 1. starts `kv_server --port 0` on a fresh data directory (a temporary
//!    one, removed at the end, unless `--dir` is given);
//! 2. runs `--requests` (default 100000) requests over `--connections`
//!    (default 8) connections, each a closed loop on its own `--keys`
//!    (default 1000) keys: 50 % SET of `--value-bytes` (default 100) bytes,
//!    35 % GET, 15 % DEL; every reply is checked against a model;
//! 3. reports throughput and p50 / p99 / p999 latency;
//! 4. sends `SYNC` (unless `--skip-sync`: then only `kill -9` durability is
//!    relied on), kills the server with SIGKILL, restarts it on the same
//!    directory and checks that every acknowledged value survived: each key
//!    whose last acknowledged operation was a SET returns exactly its
//!    bytes, each whose last was a DEL returns `NOTFOUND`.
//!
//! Prints a summary table (and with `--json` the same figures as one JSON
//! object on the last line) and exits non-zero on any mismatch.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// No single reply may take longer than this.
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// The server must be listening within this.
const START_TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    requests: u64,
    connections: usize,
    value_bytes: usize,
    keys: usize,
    shards: usize,
    dir: Option<PathBuf>,
    seed: u64,
    skip_sync: bool,
    json: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: kv_load [--requests N] [--connections C] [--value-bytes B] [--keys K] \
         [--shards S] [--dir DIR] [--seed X] [--skip-sync] [--json]"
    );
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut a = Args {
        requests: 100_000,
        connections: 8,
        value_bytes: 100,
        keys: 1000,
        shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
        dir: None,
        seed: 0x5EED,
        skip_sync: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        fn num<T: std::str::FromStr>(s: String) -> T {
            s.parse().unwrap_or_else(|_| usage())
        }
        match flag.as_str() {
            "--requests" => a.requests = num(value()),
            "--connections" => a.connections = num(value()),
            "--value-bytes" => a.value_bytes = num(value()),
            "--keys" => a.keys = num(value()),
            "--shards" => a.shards = num(value()),
            "--dir" => a.dir = Some(PathBuf::from(value())),
            "--seed" => a.seed = num(value()),
            "--skip-sync" => a.skip_sync = true,
            "--json" => a.json = true,
            _ => usage(),
        }
    }
    if a.connections == 0 || a.keys == 0 || a.shards == 0 || a.value_bytes > (1 << 20) {
        usage();
    }
    a
}

// ------------------------------------------------------------------- server

/// The server child process and the port it listens on.
struct Server {
    child: Child,
    port: u16,
    start_ms: f64,
}

fn server_binary() -> io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let bin = dir.join("kv_server");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} not found: build it first with `cargo build --release --example kv_server` \
                 (or `cargo build --release --examples`)",
                bin.display()
            ),
        ))
    }
}

fn start_server(bin: &Path, dir: &Path, shards: usize) -> io::Result<Server> {
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["--port", "0", "--shards", &shards.to_string(), "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    // Read the first line in a thread (to bound the wait), then keep
    // draining stdout so the server never blocks on a full pipe.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next());
        for _ in lines {}
    });
    let line = match rx.recv_timeout(START_TIMEOUT) {
        Ok(Some(Ok(l))) => l,
        other => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::other(format!("server did not start: {other:?}")));
        }
    };
    let port = line
        .strip_prefix("listening on 127.0.0.1:")
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("unexpected first line {line:?}")))?;
    Ok(Server {
        child,
        port,
        start_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

// ------------------------------------------------------------------- client

/// A blocking client connection.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
    req: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ok,
    Value(Vec<u8>),
    NotFound,
    Err(String),
}

impl Client {
    fn connect(port: u16) -> io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Client {
            r: BufReader::new(s.try_clone()?),
            w: s,
            req: Vec::new(),
        })
    }

    fn call(&mut self, cmd: &str, key: &str, value: Option<&[u8]>) -> io::Result<Reply> {
        self.req.clear();
        match value {
            Some(v) => {
                writeln!(self.req, "{cmd} {key} {}", v.len())?;
                self.req.extend_from_slice(v);
            }
            None if key.is_empty() => writeln!(self.req, "{cmd}")?,
            None => writeln!(self.req, "{cmd} {key}")?,
        }
        self.w.write_all(&self.req)?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end_matches('\n');
        Ok(match line {
            "OK" => Reply::Ok,
            "NOTFOUND" => Reply::NotFound,
            _ => {
                if let Some(n) = line.strip_prefix("VALUE ") {
                    let n: usize = n
                        .parse()
                        .map_err(|_| io::Error::other(format!("bad reply {line:?}")))?;
                    let mut v = vec![0u8; n];
                    self.r.read_exact(&mut v)?;
                    Reply::Value(v)
                } else if let Some(m) = line.strip_prefix("ERR ") {
                    Reply::Err(m.to_string())
                } else {
                    return Err(io::Error::other(format!("bad reply {line:?}")));
                }
            }
        })
    }
}

// -------------------------------------------------------------------- model

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn key_name(conn: usize, k: usize) -> String {
    format!("c{conn}-k{k}")
}

/// The bytes of version `version` of a key: unique per (conn, key, version).
fn value_of(conn: usize, k: usize, version: u64, len: usize) -> Vec<u8> {
    let mut x = (conn as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ ((k as u64) << 20)
        ^ version.wrapping_mul(0xA24B_AED4_963E_E407);
    x |= 1;
    (0..len).map(|_| xorshift(&mut x) as u8).collect()
}

/// The last acknowledged state of a key: never touched, deleted, or the
/// version last set.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyState {
    Untouched,
    Deleted,
    Set(u64),
}

/// What one connection did.
struct ConnResult {
    latencies_ns: Vec<u64>,
    model: Vec<KeyState>,
    sets: u64,
    gets: u64,
    dels: u64,
    mismatches: u64,
}

fn run_connection(port: u16, conn: usize, requests: u64, a: &ArgsView) -> io::Result<ConnResult> {
    let mut c = Client::connect(port)?;
    let mut rng = (a.seed ^ (conn as u64 + 1).wrapping_mul(0x2545_F491_4F6C_DD1D)) | 1;
    let mut model = vec![KeyState::Untouched; a.keys];
    let mut res = ConnResult {
        latencies_ns: Vec::with_capacity(requests as usize),
        model: Vec::new(),
        sets: 0,
        gets: 0,
        dels: 0,
        mismatches: 0,
    };
    let mut version = 0u64;
    for _ in 0..requests {
        let r = xorshift(&mut rng);
        let k = (r >> 8) as usize % a.keys;
        let key = key_name(conn, k);
        let dice = r % 100;
        let t = Instant::now();
        if dice < 50 {
            version += 1;
            let v = value_of(conn, k, version, a.value_bytes);
            let reply = c.call("SET", &key, Some(&v))?;
            res.latencies_ns.push(t.elapsed().as_nanos() as u64);
            res.sets += 1;
            if reply == Reply::Ok {
                model[k] = KeyState::Set(version);
            } else {
                eprintln!("SET {key}: {reply:?}");
                res.mismatches += 1;
            }
        } else if dice < 85 {
            let reply = c.call("GET", &key, None)?;
            res.latencies_ns.push(t.elapsed().as_nanos() as u64);
            res.gets += 1;
            if !matches_model(&reply, model[k], conn, k, a.value_bytes) {
                eprintln!("GET {key}: unexpected {}", describe(&reply));
                res.mismatches += 1;
            }
        } else {
            let reply = c.call("DEL", &key, None)?;
            res.latencies_ns.push(t.elapsed().as_nanos() as u64);
            res.dels += 1;
            let want = if matches!(model[k], KeyState::Set(_)) {
                Reply::Ok
            } else {
                Reply::NotFound
            };
            if reply != want {
                eprintln!("DEL {key}: {} instead of {want:?}", describe(&reply));
                res.mismatches += 1;
            }
            if matches!(reply, Reply::Ok | Reply::NotFound) {
                model[k] = KeyState::Deleted;
            }
        }
    }
    res.model = model;
    Ok(res)
}

fn matches_model(reply: &Reply, state: KeyState, conn: usize, k: usize, len: usize) -> bool {
    match (state, reply) {
        (KeyState::Set(v), Reply::Value(bytes)) => *bytes == value_of(conn, k, v, len),
        (KeyState::Untouched | KeyState::Deleted, Reply::NotFound) => true,
        _ => false,
    }
}

fn describe(r: &Reply) -> String {
    match r {
        Reply::Value(v) => format!("VALUE of {} bytes", v.len()),
        other => format!("{other:?}"),
    }
}

/// The parts of `Args` a connection thread needs.
#[derive(Clone, Copy)]
struct ArgsView {
    keys: usize,
    value_bytes: usize,
    seed: u64,
}

/// After the restart: check every touched key of connection `conn`.
/// Returns `(keys checked, mismatches)`.
fn verify_connection(
    port: u16,
    conn: usize,
    model: &[KeyState],
    len: usize,
) -> io::Result<(u64, u64)> {
    let mut c = Client::connect(port)?;
    let (mut checked, mut bad) = (0, 0);
    for (k, &state) in model.iter().enumerate() {
        if state == KeyState::Untouched {
            continue;
        }
        let key = key_name(conn, k);
        let reply = c.call("GET", &key, None)?;
        checked += 1;
        if !matches_model(&reply, state, conn, k, len) {
            let want = match state {
                KeyState::Set(v) => format!("version {v}"),
                _ => "NOTFOUND".into(),
            };
            eprintln!(
                "after restart, GET {key}: {} instead of {want}",
                describe(&reply)
            );
            bad += 1;
        }
    }
    Ok((checked, bad))
}

// ------------------------------------------------------------------- report

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

struct Summary {
    requests: u64,
    connections: usize,
    value_bytes: usize,
    shards: usize,
    sets: u64,
    gets: u64,
    dels: u64,
    elapsed_s: f64,
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    load_mismatches: u64,
    sync_ms: Option<f64>,
    first_start_ms: f64,
    restart_ms: f64,
    keys_live: u64,
    keys_deleted: u64,
    verify_mismatches: u64,
}

impl Summary {
    fn ok(&self) -> bool {
        self.load_mismatches == 0 && self.verify_mismatches == 0
    }

    fn print_table(&self) {
        let row = |k: &str, v: String| println!("  {k:<28} {v}");
        println!("kv_load summary");
        row("requests", self.requests.to_string());
        row("connections", self.connections.to_string());
        row("value bytes", self.value_bytes.to_string());
        row("server shards", self.shards.to_string());
        row(
            "SET / GET / DEL",
            format!("{} / {} / {}", self.sets, self.gets, self.dels),
        );
        row("elapsed", format!("{:.3} s", self.elapsed_s));
        row("throughput", format!("{:.0} req/s", self.throughput));
        row("latency p50", format!("{:.1} us", self.p50_us));
        row("latency p99", format!("{:.1} us", self.p99_us));
        row("latency p999", format!("{:.1} us", self.p999_us));
        row("latency max", format!("{:.1} us", self.max_us));
        row("reply mismatches (load)", self.load_mismatches.to_string());
        row(
            "SYNC",
            self.sync_ms
                .map_or("skipped (kill -9 durability only)".into(), |ms| {
                    format!("{ms:.2} ms")
                }),
        );
        row(
            "server start (fresh)",
            format!("{:.1} ms", self.first_start_ms),
        );
        row(
            "restart after SIGKILL",
            format!("{:.1} ms", self.restart_ms),
        );
        row(
            "keys checked: set / deleted",
            format!("{} / {}", self.keys_live, self.keys_deleted),
        );
        row(
            "lost or wrong after restart",
            self.verify_mismatches.to_string(),
        );
        row(
            "result",
            if self.ok() {
                "OK".into()
            } else {
                "MISMATCH".into()
            },
        );
    }

    fn json(&self) -> String {
        format!(
            "{{\"requests\":{},\"connections\":{},\"value_bytes\":{},\"shards\":{},\"sets\":{},\"gets\":{},\
             \"dels\":{},\"elapsed_s\":{:.6},\"throughput_rps\":{:.1},\"p50_us\":{:.2},\"p99_us\":{:.2},\
             \"p999_us\":{:.2},\"max_us\":{:.2},\"load_mismatches\":{},\"sync_ms\":{},\"first_start_ms\":{:.2},\
             \"restart_ms\":{:.2},\"keys_live\":{},\"keys_deleted\":{},\"verify_mismatches\":{},\"ok\":{}}}",
            self.requests,
            self.connections,
            self.value_bytes,
            self.shards,
            self.sets,
            self.gets,
            self.dels,
            self.elapsed_s,
            self.throughput,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.load_mismatches,
            self.sync_ms.map_or("null".into(), |ms| format!("{ms:.3}")),
            self.first_start_ms,
            self.restart_ms,
            self.keys_live,
            self.keys_deleted,
            self.verify_mismatches,
            self.ok()
        )
    }
}

// --------------------------------------------------------------------- main

/// Kills the server child if the run ends early.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(a: &Args) -> io::Result<Summary> {
    let bin = server_binary()?;
    let (dir, temporary) = match &a.dir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("segalloc-kv-load-{}", std::process::id())),
            true,
        ),
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let result = run_in(a, &bin, &dir);
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(a: &Args, bin: &Path, dir: &Path) -> io::Result<Summary> {
    let server = start_server(bin, dir, a.shards)?;
    let (port, first_start_ms) = (server.port, server.start_ms);
    let mut guard = KillOnDrop(Some(server.child));
    eprintln!(
        "kv_load: server on 127.0.0.1:{port}, data in {}",
        dir.display()
    );

    // The load: each connection a closed loop on its own keys.
    let view = ArgsView {
        keys: a.keys,
        value_bytes: a.value_bytes,
        seed: a.seed,
    };
    let per = a.requests / a.connections as u64;
    let extra = a.requests % a.connections as u64;
    let started = Instant::now();
    let threads: Vec<_> = (0..a.connections)
        .map(|conn| {
            let n = per + u64::from((conn as u64) < extra);
            std::thread::spawn(move || run_connection(port, conn, n, &view))
        })
        .collect();
    let mut results = Vec::new();
    for t in threads {
        results.push(
            t.join()
                .map_err(|_| io::Error::other("a client thread panicked"))??,
        );
    }
    let elapsed_s = started.elapsed().as_secs_f64();

    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let us = |ns: u64| ns as f64 / 1e3;

    // SYNC, then kill -9 and restart on the same directory.
    let mut load_mismatches: u64 = results.iter().map(|r| r.mismatches).sum();
    let sync_ms = if a.skip_sync {
        None
    } else {
        let t = Instant::now();
        let reply = Client::connect(port)?.call("SYNC", "", None)?;
        if reply != Reply::Ok {
            eprintln!("SYNC: {reply:?}");
            load_mismatches += 1;
        }
        Some(t.elapsed().as_secs_f64() * 1e3)
    };
    if let Some(mut child) = guard.0.take() {
        child.kill()?;
        child.wait()?;
    }
    let server = start_server(bin, dir, a.shards)?;
    let (port, restart_ms) = (server.port, server.start_ms);
    guard.0 = Some(server.child);

    // Every acknowledged value must be there, every acknowledged DEL absent.
    let checks: Vec<_> = results
        .iter()
        .enumerate()
        .map(|(conn, r)| {
            let model = r.model.clone();
            let len = a.value_bytes;
            std::thread::spawn(move || verify_connection(port, conn, &model, len))
        })
        .collect();
    let mut verify_mismatches = 0;
    for t in checks {
        let (_, bad) = t
            .join()
            .map_err(|_| io::Error::other("a check thread panicked"))??;
        verify_mismatches += bad;
    }
    drop(guard);

    let count = |f: fn(&KeyState) -> bool| -> u64 {
        results
            .iter()
            .map(|r| r.model.iter().filter(|s| f(s)).count() as u64)
            .sum()
    };
    Ok(Summary {
        requests: a.requests,
        connections: a.connections,
        value_bytes: a.value_bytes,
        shards: a.shards,
        sets: results.iter().map(|r| r.sets).sum(),
        gets: results.iter().map(|r| r.gets).sum(),
        dels: results.iter().map(|r| r.dels).sum(),
        elapsed_s,
        throughput: lat.len() as f64 / elapsed_s,
        p50_us: us(percentile(&lat, 0.50)),
        p99_us: us(percentile(&lat, 0.99)),
        p999_us: us(percentile(&lat, 0.999)),
        max_us: us(lat.last().copied().unwrap_or(0)),
        load_mismatches,
        sync_ms,
        first_start_ms,
        restart_ms,
        keys_live: count(|s| matches!(s, KeyState::Set(_))),
        keys_deleted: count(|s| *s == KeyState::Deleted),
        verify_mismatches,
    })
}

fn main() {
    let a = parse_args();
    match run(&a) {
        Ok(s) => {
            s.print_table();
            if a.json {
                println!("{}", s.json());
            }
            if !s.ok() {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("kv_load: {e}");
            std::process::exit(1);
        }
    }
}
