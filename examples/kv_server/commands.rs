//! The commands: their table (for `COMMAND` and arity checks), how each is
//! split into key operations, and the replies that need no shard.

use std::ops::Range;
use std::path::PathBuf;
use std::time::Instant;

use crate::batch::OpKind;
use crate::conn::{Combine, Ctx, Planner, key_ok, set_options};
use crate::resp;
use crate::store::SyncPolicy;

/// A command's arguments, as ranges into its frame.
pub struct Cmd<'a> {
    frame: &'a [u8],
    args: &'a [Range<usize>],
}

impl<'a> Cmd<'a> {
    pub fn new(frame: &'a [u8], args: &'a [Range<usize>]) -> Cmd<'a> {
        Cmd { frame, args }
    }

    fn len(&self) -> usize {
        self.args.len()
    }

    fn arg(&self, i: usize) -> &'a [u8] {
        &self.frame[self.args[i].clone()]
    }

    fn args_from(&self, i: usize) -> impl Iterator<Item = &'a [u8]> + '_ {
        (i..self.len()).map(|j| self.arg(j))
    }
}

/// What `INFO`, `CONFIG GET` and the command table say about the server.
pub struct ServerFacts {
    pub port: u16,
    /// Most connections served at once (see `connection_cap`).
    pub max_clients: usize,
    pub shards: usize,
    pub policy: SyncPolicy,
    /// How often a shard retires superseded records.
    pub retire_every: std::time::Duration,
    pub dir: PathBuf,
    pub started: Instant,
}

/// Which command a [`Spec`] is, so planning matches on it, not on text.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Name {
    Get,
    Set,
    Del,
    Exists,
    MGet,
    MSet,
    Incr,
    Decr,
    IncrBy,
    DecrBy,
    DbSize,
    FlushDb,
    FlushAll,
    Save,
    Info,
    Config,
    Command,
    Ping,
    Echo,
    Select,
    Client,
    Quit,
    Shutdown,
}

/// One command: name, arity (negative: at least), flags, first key, last
/// key, key step, as `COMMAND` reports them.
struct Spec {
    name: &'static str,
    /// `name` as [`name_word`] folds it.
    word: u64,
    id: Name,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
}

const fn spec(
    name: &'static str,
    id: Name,
    arity: i64,
    flags: &'static [&'static str],
    keys: (i64, i64, i64),
) -> Spec {
    Spec {
        name,
        word: name_word(name.as_bytes()),
        id,
        arity,
        flags,
        keys,
    }
}

const R: &[&str] = &["readonly", "fast"];
const W: &[&str] = &["write", "denyoom"];
const A: &[&str] = &["admin"];
const F: &[&str] = &["fast"];

static COMMANDS: &[Spec] = &[
    spec("get", Name::Get, 2, R, (1, 1, 1)),
    spec("set", Name::Set, -3, W, (1, 1, 1)),
    spec("del", Name::Del, -2, W, (1, -1, 1)),
    spec("exists", Name::Exists, -2, R, (1, -1, 1)),
    spec("mget", Name::MGet, -2, R, (1, -1, 1)),
    spec("mset", Name::MSet, -3, W, (1, -1, 2)),
    spec("incr", Name::Incr, 2, W, (1, 1, 1)),
    spec("decr", Name::Decr, 2, W, (1, 1, 1)),
    spec("incrby", Name::IncrBy, 3, W, (1, 1, 1)),
    spec("decrby", Name::DecrBy, 3, W, (1, 1, 1)),
    spec("dbsize", Name::DbSize, 1, R, (0, 0, 0)),
    spec("flushdb", Name::FlushDb, -1, W, (0, 0, 0)),
    spec("flushall", Name::FlushAll, -1, W, (0, 0, 0)),
    spec("save", Name::Save, 1, A, (0, 0, 0)),
    spec("info", Name::Info, -1, F, (0, 0, 0)),
    spec("config", Name::Config, -2, A, (0, 0, 0)),
    spec("command", Name::Command, -1, F, (0, 0, 0)),
    spec("ping", Name::Ping, -1, F, (0, 0, 0)),
    spec("echo", Name::Echo, 2, F, (0, 0, 0)),
    spec("select", Name::Select, 2, F, (0, 0, 0)),
    spec("client", Name::Client, -2, F, (0, 0, 0)),
    spec("quit", Name::Quit, -1, F, (0, 0, 0)),
    spec("shutdown", Name::Shutdown, -1, A, (0, 0, 0)),
];

impl Spec {
    fn arity_ok(&self, n: usize) -> bool {
        let n = n as i64;
        if self.arity >= 0 {
            n == self.arity
        } else {
            n >= -self.arity
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        resp::array_len(out, 6);
        resp::bulk(out, self.name.as_bytes());
        resp::int(out, self.arity);
        resp::array_len(out, self.flags.len());
        for f in self.flags {
            out.extend_from_slice(b"+");
            out.extend_from_slice(f.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        resp::int(out, self.keys.0);
        resp::int(out, self.keys.1);
        resp::int(out, self.keys.2);
    }
}

/// A name of up to 8 bytes as one word, each byte with bit 5 set: for the
/// table's names (letters only) that folds upper to lower case, and a byte
/// that is not a letter never folds into one. Longer names: `u64::MAX`,
/// which no table name folds to.
const fn name_word(name: &[u8]) -> u64 {
    if name.len() > 8 {
        return u64::MAX;
    }
    let mut w = 0u64;
    let mut i = 0;
    while i < name.len() {
        w |= ((name[i] | 0x20) as u64) << (8 * i);
        i += 1;
    }
    w
}

const _: () = {
    let mut i = 0;
    while i < COMMANDS.len() {
        let name = COMMANDS[i].name.as_bytes();
        assert!(name.len() <= 8 && name_word(name) != u64::MAX);
        let mut j = 0;
        while j < name.len() {
            assert!(name[j].is_ascii_lowercase());
            j += 1;
        }
        i += 1;
    }
};

fn find(name: &[u8]) -> Option<&'static Spec> {
    let word = name_word(name);
    COMMANDS
        .iter()
        .find(|c| c.word == word && c.name.len() == name.len())
}

/// How many values `cmd` reads (a `GET` one, an `MGET` one per key): see
/// `conn::READS_PER_BATCH`.
pub fn reads_of(cmd: &Cmd<'_>) -> usize {
    match find(cmd.arg(0)).map(|s| s.id) {
        Some(Name::Get) => 1,
        Some(Name::MGet) => cmd.len().saturating_sub(1),
        _ => 0,
    }
}

/// Redis's reply to an unknown command: its name and the start of its
/// arguments, each cut to what fits in 128 bytes.
fn unknown_command(cmd: &Cmd<'_>) -> String {
    let name = cmd.arg(0);
    let mut msg = format!(
        "ERR unknown command '{}', with args beginning with: ",
        String::from_utf8_lossy(&name[..name.len().min(128)])
    );
    let mut args = 0;
    for a in cmd.args_from(1) {
        if args >= 128 {
            break;
        }
        let a = String::from_utf8_lossy(&a[..a.len().min(128 - args)]);
        args += a.len() + 3;
        msg.push_str(&format!("'{a}' "));
    }
    msg
}

/// Plan one command: a literal reply now, or key operations for shards.
pub fn plan(cmd: &Cmd<'_>, p: &mut Planner, ctx: &Ctx, now: u64) {
    let Some(spec) = find(cmd.arg(0)) else {
        p.error(&unknown_command(cmd));
        return;
    };
    if !spec.arity_ok(cmd.len()) {
        p.error(&format!(
            "ERR wrong number of arguments for '{}' command",
            spec.name
        ));
        return;
    }
    match spec.id {
        Name::Get | Name::Set | Name::Incr | Name::Decr | Name::IncrBy | Name::DecrBy => {
            plan_one_key(spec.id, cmd, p, now)
        }
        Name::Del | Name::Exists | Name::MGet => {
            if !cmd.args_from(1).all(key_ok_quiet) {
                key_ok(p, cmd.args_from(1).find(|k| !key_ok_quiet(k)).expect("one"));
                return;
            }
            let (how, kind) = match spec.id {
                Name::Del => (Combine::Sum, OpKind::Del),
                Name::Exists => (Combine::Sum, OpKind::Exists),
                _ => (Combine::Array, OpKind::Get),
            };
            p.begin(how);
            cmd.args_from(1).for_each(|k| p.key_op(kind, k, b""));
        }
        Name::MSet => plan_mset(cmd, p),
        Name::DbSize | Name::FlushDb | Name::FlushAll | Name::Save => {
            let (how, kind) = match spec.id {
                Name::DbSize => (Combine::Sum, OpKind::DbSize),
                Name::Save => (Combine::AllOk, OpKind::Save),
                _ => (Combine::AllOk, OpKind::Flush),
            };
            let mode = cmd.args_from(1).next().map(|m| m.to_ascii_uppercase());
            if cmd.len() > 2 || mode.is_some_and(|m| m != b"ASYNC" && m != b"SYNC") {
                p.error("ERR syntax error");
                return;
            }
            p.begin(how);
            p.all_shards(kind);
        }
        Name::Info => {
            let sections = info_sections(cmd);
            p.begin(Combine::Info(sections));
            p.all_shards(OpKind::Info);
        }
        _ => plan_connection(spec.id, cmd, p, ctx),
    }
}

fn key_ok_quiet(k: &[u8]) -> bool {
    k.len() <= crate::store::KEY_BYTES_MAX
}

fn plan_one_key(name: Name, cmd: &Cmd<'_>, p: &mut Planner, now: u64) {
    let key = cmd.arg(1);
    if !key_ok(p, key) {
        return;
    }
    let kind = match name {
        Name::Get => OpKind::Get,
        Name::Set if cmd.len() == 3 => OpKind::Set {
            cond: crate::batch::Cond::Always,
            ttl: crate::batch::Ttl::Clear,
        },
        Name::Set => {
            let opts: Vec<&[u8]> = cmd.args_from(3).collect();
            match set_options(&opts, now) {
                Ok((cond, ttl)) => OpKind::Set { cond, ttl },
                Err(msg) => return p.error(&msg),
            }
        }
        Name::Incr => OpKind::IncrBy(1),
        Name::Decr => OpKind::IncrBy(-1),
        _ => {
            let Some(n) = resp::parse_i64(cmd.arg(2)) else {
                return p.error("ERR value is not an integer or out of range");
            };
            match (name, n.checked_neg()) {
                (Name::IncrBy, _) => OpKind::IncrBy(n),
                (_, Some(neg)) => OpKind::IncrBy(neg),
                (_, None) => return p.error("ERR decrement would overflow"),
            }
        }
    };
    let value = if name == Name::Set { cmd.arg(2) } else { b"" };
    p.begin(Combine::One);
    p.key_op(kind, key, value);
}

fn plan_mset(cmd: &Cmd<'_>, p: &mut Planner) {
    if cmd.len().is_multiple_of(2) {
        return p.error("ERR wrong number of arguments for 'mset' command");
    }
    let pairs = (1..cmd.len())
        .step_by(2)
        .map(|i| (cmd.arg(i), cmd.arg(i + 1)));
    if let Some((k, _)) = pairs.clone().find(|(k, _)| !key_ok_quiet(k)) {
        key_ok(p, k);
        return;
    }
    p.begin(Combine::AllOk);
    let set = OpKind::Set {
        cond: crate::batch::Cond::Always,
        ttl: crate::batch::Ttl::Clear,
    };
    pairs.for_each(|(k, v)| p.key_op(set, k, v));
}

/// Commands answered by the connection itself.
fn plan_connection(name: Name, cmd: &Cmd<'_>, p: &mut Planner, ctx: &Ctx) {
    match name {
        Name::Ping if cmd.len() > 2 => p.error("ERR wrong number of arguments for 'ping' command"),
        Name::Ping if cmd.len() == 2 => p.reply(|out| resp::bulk(out, cmd.arg(1))),
        Name::Ping => p.reply(|out| out.extend_from_slice(b"+PONG\r\n")),
        Name::Echo => p.reply(|out| resp::bulk(out, cmd.arg(1))),
        Name::Quit => {
            p.reply(resp::ok);
            p.close = true;
        }
        // One database; an index is read as Redis reads integers.
        Name::Select => match resp::parse_i64(cmd.arg(1)) {
            Some(0) => p.reply(resp::ok),
            Some(_) => p.error("ERR DB index is out of range"),
            None => p.error("ERR value is not an integer or out of range"),
        },
        Name::Client => {
            let sub = cmd.arg(1).to_ascii_uppercase();
            match sub.as_slice() {
                // As Redis: `SETNAME name`, `SETINFO attr value`.
                b"SETNAME" if cmd.len() == 3 => p.reply(resp::ok),
                b"SETINFO" if cmd.len() == 4 => p.reply(resp::ok),
                b"SETNAME" | b"SETINFO" => p.error(&format!(
                    "ERR wrong number of arguments for 'client|{}' command",
                    String::from_utf8_lossy(&sub).to_ascii_lowercase()
                )),
                b"GETNAME" => p.reply(resp::nil),
                _ => p.error("ERR CLIENT subcommand not supported by this server"),
            }
        }
        // As Redis: run after the commands before it, no reply when it
        // works (the exit closes the connection), nothing after it;
        // `SAVE` is what it does anyway, `NOSAVE` skips the final sync.
        Name::Shutdown => {
            let mode = cmd.args_from(1).next().map(|m| m.to_ascii_uppercase());
            let nosave = match mode.as_deref() {
                _ if cmd.len() > 2 => None,
                None | Some(b"SAVE") => Some(false),
                Some(b"NOSAVE") => Some(true),
                Some(_) => None,
            };
            match nosave {
                Some(nosave) => {
                    p.shutdown = Some(nosave);
                    p.close = true;
                }
                None => p.error("ERR syntax error"),
            }
        }
        Name::Config => config(cmd, p, &ctx.server),
        Name::Command => command(cmd, p),
        _ => unreachable!("every table entry is planned"),
    }
}

/// The settings `CONFIG GET` reports.
fn settings(facts: &ServerFacts) -> Vec<(&'static str, String)> {
    let policy = match facts.policy {
        SyncPolicy::Always => "always",
        SyncPolicy::Everysec => "everysec",
        SyncPolicy::No => "no",
    };
    vec![
        ("save", String::new()),
        ("appendonly", "yes".into()),
        ("appendfsync", policy.into()),
        ("databases", "1".into()),
        ("maxmemory", "0".into()),
        ("maxclients", facts.max_clients.to_string()),
        ("port", facts.port.to_string()),
        ("dir", facts.dir.display().to_string()),
        ("proto-max-bulk-len", resp::ARG_BYTES_MAX.to_string()),
    ]
}

fn config(cmd: &Cmd<'_>, p: &mut Planner, facts: &ServerFacts) {
    let sub = cmd.arg(1).to_ascii_uppercase();
    match sub.as_slice() {
        b"GET" if cmd.len() >= 3 => {
            let all = settings(facts);
            let hits: Vec<_> = all
                .iter()
                .filter(|(name, _)| cmd.args_from(2).any(|pat| glob(pat, name.as_bytes())))
                .collect();
            p.reply(|out| {
                resp::array_len(out, hits.len() * 2);
                for (name, value) in hits {
                    resp::bulk(out, name.as_bytes());
                    resp::bulk(out, value.as_bytes());
                }
            });
        }
        b"RESETSTAT" => p.reply(resp::ok),
        b"GET" => p.error("ERR wrong number of arguments for 'config|get' command"),
        _ => p.error("ERR only CONFIG GET and CONFIG RESETSTAT are supported by this server"),
    }
}

/// Glob match with `*` and `?`, case-insensitive, as `CONFIG GET` does.
/// Iterative, with one backtrack point (the latest `*`): time at most
/// `pat.len() × s.len()` steps and constant stack, whatever the pattern
/// (a pattern of many stars once overflowed the shard's stack, and one of
/// a dozen took seconds).
fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    // After the latest star: where the pattern goes on, and the next byte
    // of `s` that star would take.
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        match pat.get(p) {
            Some(b'*') => {
                p += 1;
                star = Some((p, i));
            }
            Some(b'?') => (p, i) = (p + 1, i + 1),
            Some(c) if c.eq_ignore_ascii_case(&s[i]) => (p, i) = (p + 1, i + 1),
            _ => match star {
                // Let the latest star take one byte more.
                Some((after, taken)) => {
                    (p, i) = (after, taken + 1);
                    star = Some((after, taken + 1));
                }
                None => return false,
            },
        }
    }
    pat[p.min(pat.len())..].iter().all(|&c| c == b'*')
}

fn command(cmd: &Cmd<'_>, p: &mut Planner) {
    let sub = (cmd.len() > 1).then(|| cmd.arg(1).to_ascii_uppercase());
    match sub.as_deref() {
        None => p.reply(|out| {
            resp::array_len(out, COMMANDS.len());
            COMMANDS.iter().for_each(|c| c.write(out));
        }),
        Some(b"COUNT") => p.reply(|out| resp::int(out, COMMANDS.len() as i64)),
        Some(b"DOCS") => p.reply(|out| resp::array_len(out, 0)),
        // With no names, every command, as Redis 7 answers.
        Some(b"INFO") if cmd.len() == 2 => p.reply(|out| {
            resp::array_len(out, COMMANDS.len());
            COMMANDS.iter().for_each(|c| c.write(out));
        }),
        Some(b"INFO") => p.reply(|out| {
            resp::array_len(out, cmd.len() - 2);
            for name in cmd.args_from(2) {
                match find(name) {
                    Some(c) => c.write(out),
                    None => resp::nil(out),
                }
            }
        }),
        Some(_) => p.error("ERR COMMAND subcommand not supported by this server"),
    }
}

const SERVER: u8 = 1;
const MEMORY: u8 = 2;
const PERSISTENCE: u8 = 4;
const KEYSPACE: u8 = 8;

fn info_sections(cmd: &Cmd<'_>) -> u8 {
    if cmd.len() == 1 {
        return SERVER | MEMORY | PERSISTENCE | KEYSPACE;
    }
    cmd.args_from(1).fold(0, |acc, s| {
        acc | match s.to_ascii_lowercase().as_slice() {
            b"server" => SERVER,
            b"memory" => MEMORY,
            b"persistence" => PERSISTENCE,
            b"keyspace" => KEYSPACE,
            b"all" | b"default" | b"everything" => SERVER | MEMORY | PERSISTENCE | KEYSPACE,
            _ => 0,
        }
    })
}

/// The per-shard figures of `OpKind::Info`, in the order the store writes
/// them; summed over shards unless said otherwise.
mod field {
    pub const KEYS: usize = 0;
    pub const EXPIRES: usize = 1;
    pub const LIVE_BYTES: usize = 2;
    pub const RESERVED_BYTES: usize = 3;
    pub const METADATA_BYTES: usize = 4;
    pub const OPEN_FDS: usize = 5;
    pub const MAPPED_WINDOWS: usize = 6;
    pub const DATA_FILES: usize = 7;
    /// Oldest over shards.
    pub const LAST_SYNC_UNIX_MS: usize = 8;
    pub const SYNCS: usize = 9;
    pub const SYNC_FAILURES: usize = 10;
    pub const UNSYNCED_WRITES: usize = 11;
    /// 1 when every shard runs io_uring.
    pub const URING: usize = 12;
    /// Records overwrites replaced that are still allocated: waiting for
    /// a sync that covers their replacements, or for a round, or in a
    /// round under way.
    pub const REPLACED: usize = 14;
    /// Of those, the ones in a round under way.
    pub const RETIRING: usize = 15;
    pub const COUNT: usize = 16;
}

/// Integers of an array reply of integers.
fn ints_of(reply: &[u8]) -> Vec<i64> {
    reply
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r")?.strip_prefix(b":")?;
            std::str::from_utf8(line).ok()?.parse().ok()
        })
        .collect()
}

fn process_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The `INFO` reply from every shard's figures.
pub fn info<'a>(
    facts: &ServerFacts,
    sections_wanted: u8,
    parts: impl Iterator<Item = &'a [u8]>,
    out: &mut Vec<u8>,
) {
    let mut total = [0i64; field::COUNT];
    total[field::LAST_SYNC_UNIX_MS] = i64::MAX;
    total[field::URING] = 1;
    for part in parts {
        let f = ints_of(part);
        if f.len() != field::COUNT {
            continue;
        }
        for (i, v) in f.iter().enumerate() {
            total[i] = match i {
                field::LAST_SYNC_UNIX_MS | field::URING => total[i].min(*v),
                _ => total[i] + v,
            };
        }
    }
    let mut s = String::new();
    let sections = [
        (SERVER, "# Server", server_lines(facts, &total)),
        (MEMORY, "# Memory", memory_lines(&total)),
        (
            PERSISTENCE,
            "# Persistence",
            persistence_lines(facts, &total),
        ),
        (KEYSPACE, "# Keyspace", keyspace_lines(&total)),
    ];
    for (bit, heading, lines) in sections {
        if sections_wanted & bit == 0 {
            continue;
        }
        s.push_str(heading);
        s.push_str("\r\n");
        for (k, v) in lines {
            s.push_str(&format!("{k}:{v}\r\n"));
        }
    }
    resp::bulk(out, s.as_bytes());
}

type Lines = Vec<(&'static str, String)>;

fn server_lines(facts: &ServerFacts, t: &[i64; field::COUNT]) -> Lines {
    let backend = if t[field::URING] == 1 {
        "io_uring"
    } else {
        "sync"
    };
    vec![
        ("redis_version", "7.0.0".into()),
        ("segalloc_version", env!("CARGO_PKG_VERSION").into()),
        ("redis_mode", "standalone".into()),
        ("os", std::env::consts::OS.into()),
        ("process_id", std::process::id().to_string()),
        ("tcp_port", facts.port.to_string()),
        (
            "uptime_in_seconds",
            facts.started.elapsed().as_secs().to_string(),
        ),
        ("shards", facts.shards.to_string()),
        ("io_backend", backend.into()),
    ]
}

fn memory_lines(t: &[i64; field::COUNT]) -> Lines {
    vec![
        (
            "used_memory",
            (t[field::LIVE_BYTES] + t[field::METADATA_BYTES]).to_string(),
        ),
        ("used_memory_rss", process_rss_bytes().to_string()),
        ("segalloc_live_bytes", t[field::LIVE_BYTES].to_string()),
        (
            "segalloc_reserved_bytes",
            t[field::RESERVED_BYTES].to_string(),
        ),
        (
            "segalloc_metadata_bytes",
            t[field::METADATA_BYTES].to_string(),
        ),
        ("segalloc_open_fds", t[field::OPEN_FDS].to_string()),
        (
            "segalloc_mapped_windows",
            t[field::MAPPED_WINDOWS].to_string(),
        ),
        ("segalloc_data_files", t[field::DATA_FILES].to_string()),
        ("segalloc_replaced_records", t[field::REPLACED].to_string()),
        ("segalloc_retiring_records", t[field::RETIRING].to_string()),
    ]
}

fn persistence_lines(facts: &ServerFacts, t: &[i64; field::COUNT]) -> Lines {
    // Never synced yet: 0, as Redis reports a save that never happened.
    let last = match t[field::LAST_SYNC_UNIX_MS] {
        i64::MAX => 0,
        ms => ms,
    };
    vec![
        ("loading", "0".into()),
        ("aof_enabled", "1".into()),
        ("segalloc_sync_policy", settings(facts)[2].1.clone()),
        ("segalloc_last_sync_unix_ms", last.to_string()),
        ("rdb_last_save_time", (last / 1000).to_string()),
        ("segalloc_syncs", t[field::SYNCS].to_string()),
        (
            "segalloc_sync_failures",
            t[field::SYNC_FAILURES].to_string(),
        ),
        (
            "rdb_changes_since_last_save",
            t[field::UNSYNCED_WRITES].to_string(),
        ),
    ]
}

fn keyspace_lines(t: &[i64; field::COUNT]) -> Lines {
    if t[field::KEYS] == 0 {
        return Vec::new();
    }
    let db0 = format!(
        "keys={},expires={},avg_ttl=0",
        t[field::KEYS],
        t[field::EXPIRES]
    );
    vec![("db0", db0)]
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn glob_matches_as_config_get_does() {
        for (pat, s, want) in [
            ("*", "maxclients", true),
            ("max*", "maxclients", true),
            ("MAX*", "maxclients", true),
            ("*clients", "maxclients", true),
            ("m?xclients", "maxclients", true),
            ("m*c*s", "maxclients", true),
            ("m*c*x", "maxclients", false),
            ("maxclients", "maxclients", true),
            ("maxclient", "maxclients", false),
            ("maxclientss", "maxclients", false),
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("?", "", false),
            ("**a**", "xay", true),
            ("a*b*c", "abbbc", true),
            ("a*b*c", "acb", false),
        ] {
            assert_eq!(glob(pat.as_bytes(), s.as_bytes()), want, "{pat:?} {s:?}");
        }
    }

    /// Patterns of many stars once overflowed the shard thread's stack
    /// (100,000 stars) or took seconds (16 stars, exponential backtracking).
    #[test]
    fn hostile_patterns_are_matched_in_bounded_time_and_stack() {
        let name = b"appendfsync-and-a-longer-setting-name";
        for stars in [16, 100_000, 500_000] {
            let mut pat = vec![b'*'; stars];
            pat.push(b'#');
            let t = std::time::Instant::now();
            assert!(!glob(&pat, name));
            assert!(
                t.elapsed() < std::time::Duration::from_secs(1),
                "{stars} stars"
            );
        }
        let pat = "*a".repeat(1000);
        let s = "a".repeat(999);
        let t = std::time::Instant::now();
        assert!(!glob(pat.as_bytes(), s.as_bytes()));
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }
}
