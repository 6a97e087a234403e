//! A client connection: read what the client pipelined, turn each command
//! into key operations for their owner shards (one batch per shard), run
//! this shard's batch here and send each other batch to its owner in one
//! message, then write every reply of the read in one go.

use std::io;
use std::ops::Range;
use std::rc::Rc;

use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::ToShard;
use crate::batch::{Batch, Cond, OpKind, Ttl};
use crate::commands::{self, Cmd};
use crate::resp::{self, Parsed};
use crate::store::{KEY_BYTES_MAX, Store, now_unix_ms};

/// What every connection of a shard thread shares.
pub struct Ctx {
    pub store: Rc<Store>,
    pub peers: Vec<tokio::sync::mpsc::UnboundedSender<ToShard>>,
    pub me: usize,
    pub server: Rc<commands::ServerFacts>,
}

/// The part of a plan that names a literal reply, not a shard's.
const LIT: usize = usize::MAX;

/// Where one sub-reply is: a shard's batch (or [`LIT`]) and its index.
#[derive(Clone, Copy)]
pub struct Part {
    pub shard: usize,
    pub idx: usize,
}

/// How a command's reply is made of its parts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Combine {
    /// The one part as it is.
    One,
    /// An array of the parts (`MGET`).
    Array,
    /// The sum of integer parts (`DEL`, `EXISTS`, `DBSIZE`).
    Sum,
    /// `+OK` unless a part is an error (`MSET`, `FLUSHDB`, `SAVE`).
    AllOk,
    /// The `INFO` text from every shard's figures; the sections wanted.
    Info(u8),
}

struct Plan {
    how: Combine,
    first: usize,
    n: usize,
}

/// The commands of one read, their key operations per shard and their
/// literal replies.
pub struct Planner {
    plans: Vec<Plan>,
    parts: Vec<Part>,
    lit: crate::batch::Out,
    batches: Vec<Option<Box<Batch>>>,
    waits: Vec<Option<(usize, oneshot::Receiver<Box<Batch>>)>>,
    /// The client sent `QUIT` or a frame that is not RESP.
    pub close: bool,
    /// The client sent `SHUTDOWN` (`Some(true)`: `NOSAVE`): asked for
    /// once the commands before it ran and were answered, as Redis runs
    /// it last; nothing after it is read.
    pub shutdown: Option<bool>,
    /// Values the planned commands read (see [`READS_PER_BATCH`]).
    reads: usize,
}

/// Most values read by one batch's commands (a `GET` reads one, an `MGET`
/// one per key): their values, each up to
/// [`VALUE_BYTES_MAX`](crate::store::VALUE_BYTES_MAX), then fit the
/// [`OUT_BYTES_MAX`](crate::store::OUT_BYTES_MAX) a shard's batch may
/// reply. A command that would take a batch past it waits in the read
/// buffer for the next batch, so a pipeline of large `GET`s and `MGET`s is
/// answered whole however its bytes arrived. A batch always takes its
/// first command, so an `MGET` of more keys than that alone can still
/// meet the cap (its values past it are errors).
const READS_PER_BATCH: usize = crate::store::OUT_BYTES_MAX / crate::store::VALUE_BYTES_MAX;

/// Most commands one batch plans: a read buffer of small commands (a 64
/// KiB read holds some 10,000 `PING`s; a buffer grown by a large frame,
/// megabytes of `INFO`s) is answered in batches of at most this many, each
/// followed by a turn of the shard's other tasks (see `serve_requests`).
/// `redis-benchmark -P 16` pipelines 16.
pub const COMMANDS_PER_BATCH: usize = 1024;

/// FNV-1a: a hash that stays the same across runs (unlike `RandomState`),
/// so a key keeps its owner after a restart. One shard owns every key
/// without hashing it.
pub fn owner_of(key: &[u8], shards: usize) -> usize {
    if shards == 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % shards as u64) as usize
}

impl Planner {
    fn new(shards: usize) -> Planner {
        Planner {
            plans: Vec::new(),
            parts: Vec::new(),
            lit: Default::default(),
            batches: (0..shards).map(|_| Some(Box::default())).collect(),
            waits: (0..shards).map(|_| None).collect(),
            close: false,
            shutdown: None,
            reads: 0,
        }
    }

    fn shards(&self) -> usize {
        self.batches.len()
    }

    fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }

    /// A reply written now.
    pub fn reply(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let lit = self.lit.len();
        write(&mut self.lit.buf);
        self.lit.end();
        let idx = self.parts.len();
        self.parts.push(Part {
            shard: LIT,
            idx: lit,
        });
        self.plans.push(Plan {
            how: Combine::One,
            first: idx,
            n: 1,
        });
    }

    pub fn error(&mut self, msg: &str) {
        self.reply(|out| resp::error(out, msg));
    }

    /// Start a command whose reply combines the parts added until the next
    /// `begin`.
    pub fn begin(&mut self, how: Combine) {
        self.plans.push(Plan {
            how,
            first: self.parts.len(),
            n: 0,
        });
    }

    /// Add an operation on `key` for its owner to the current command.
    pub fn key_op(&mut self, kind: OpKind, key: &[u8], value: &[u8]) {
        if matches!(kind, OpKind::Get) {
            // As `commands::reads_of` counted them.
            self.reads += 1;
        }
        let shard = owner_of(key, self.shards());
        self.op_on(shard, kind, key, value);
    }

    /// Add an operation for every shard to the current command.
    pub fn all_shards(&mut self, kind: OpKind) {
        for s in 0..self.shards() {
            self.op_on(s, kind, b"", b"");
        }
    }

    fn op_on(&mut self, shard: usize, kind: OpKind, key: &[u8], value: &[u8]) {
        let b = self.batches[shard]
            .as_mut()
            .expect("batch home between reads");
        let idx = b.push(kind, key, value);
        self.parts.push(Part { shard, idx });
        self.plans.last_mut().expect("begin before key_op").n += 1;
    }

    /// Run every batch: this shard's here, the others on their owners.
    async fn execute(&mut self, ctx: &Ctx) {
        for s in 0..self.shards() {
            if s == ctx.me || self.batches[s].as_ref().is_none_or(|b| b.is_empty()) {
                continue;
            }
            let b = self.batches[s].take().expect("checked");
            let n = b.ops.len();
            let (tx, rx) = oneshot::channel();
            // A send to a stopped shard drops the batch with `tx`: `rx` says so.
            let _ = ctx.peers[s].send(ToShard::Batch(b, tx));
            self.waits[s] = Some((n, rx));
        }
        if let Some(local) = self.batches[ctx.me].as_mut()
            && !local.is_empty()
        {
            ctx.store.run(local).await;
        }
        for s in 0..self.shards() {
            let Some((n, rx)) = self.waits[s].take() else {
                continue;
            };
            self.batches[s] = Some(rx.await.unwrap_or_else(|_| gone(s, n)));
        }
    }

    /// Whether the replies are this shard's batch's, one per command, in
    /// order: its reply buffer is then the whole answer.
    fn local_in_order(&self, me: usize) -> bool {
        let Some(local) = self.batches[me].as_ref() else {
            return false;
        };
        local.out.len() == self.plans.len()
            && self.plans.iter().enumerate().all(|(i, plan)| {
                plan.how == Combine::One
                    && plan.n == 1
                    && self.parts[plan.first].shard == me
                    && self.parts[plan.first].idx == i
            })
    }

    /// Write every reply in command order to `wbuf`, then reset.
    fn assemble(&mut self, ctx: &Ctx, wbuf: &mut Vec<u8>) {
        if self.local_in_order(ctx.me) {
            let local = self.batches[ctx.me].as_ref().expect("checked");
            wbuf.extend_from_slice(&local.out.buf);
            self.reset();
            return;
        }
        for plan in &self.plans {
            let parts = &self.parts[plan.first..plan.first + plan.n];
            let get = |p: &Part| -> &[u8] {
                if p.shard == LIT {
                    self.lit.get(p.idx)
                } else {
                    self.batches[p.shard].as_ref().expect("home").out.get(p.idx)
                }
            };
            match (plan.how, parts) {
                (Combine::One, [part]) => wbuf.extend_from_slice(get(part)),
                _ => combine(plan.how, parts.iter().map(get), ctx, wbuf),
            }
        }
        self.reset();
    }

    /// Give back what large batches needed (the connection goes idle; its
    /// buffers are cleared).
    fn trim(&mut self) {
        crate::batch::trim(&mut self.plans);
        crate::batch::trim(&mut self.parts);
        self.lit.trim();
        for b in self.batches.iter_mut().flatten() {
            b.trim();
        }
    }

    fn reset(&mut self) {
        self.plans.clear();
        self.parts.clear();
        self.lit.clear();
        self.reads = 0;
        for b in self.batches.iter_mut().flatten() {
            b.clear();
        }
    }
}

/// The batch a stopped shard could not answer: an error per operation.
fn gone(shard: usize, ops: usize) -> Box<Batch> {
    let mut b = Box::<Batch>::default();
    for _ in 0..ops {
        resp::error(&mut b.out.buf, &format!("ERR shard {shard} is not running"));
        b.out.end();
    }
    b
}

fn combine<'a>(
    how: Combine,
    mut parts: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
    ctx: &Ctx,
    out: &mut Vec<u8>,
) {
    match how {
        Combine::One => {
            out.extend_from_slice(parts.next().unwrap_or(b"-ERR no reply\r\n"));
            return;
        }
        Combine::Array => {
            resp::array_len(out, parts.len());
            parts.for_each(|p| out.extend_from_slice(p));
            return;
        }
        _ => {}
    }
    if let Some(error) = parts.clone().find(|p| p.first() == Some(&b'-')) {
        out.extend_from_slice(error);
        return;
    }
    match how {
        Combine::One | Combine::Array => unreachable!("answered above"),
        Combine::Sum => resp::int(out, parts.filter_map(resp::int_of).sum()),
        Combine::AllOk => resp::ok(out),
        Combine::Info(sections) => commands::info(&ctx.server, sections, parts, out),
    }
}

/// How many bytes and arguments of an oversize command are still to skip.
#[derive(Default)]
struct Skip {
    /// Bytes of the current argument still to skip.
    bytes: usize,
    /// Whether the CRLF after them is still to be checked.
    crlf: bool,
    /// Arguments after the current one.
    args: usize,
    arg_bytes: usize,
}

/// A connection with its buffers, over tokio's readiness API (the crate
/// builds tokio without `io-util`).
struct Conn {
    stream: TcpStream,
    /// Read buffer: bytes `rpos..rlen` are unparsed.
    rbuf: Vec<u8>,
    rpos: usize,
    /// Bytes the next read asks for at least (see [`FIRST_READ_BYTES`]).
    chunk: usize,
    rlen: usize,
    wbuf: Vec<u8>,
    args: Vec<Range<usize>>,
    /// The arguments of an inline command with quotes, unescaped (`args`
    /// then holds ranges of this).
    unquoted: Vec<u8>,
    skip: Option<Skip>,
    /// Where the last parse of the frame at `rpos` stopped, incomplete
    /// (`args` holds what it parsed): the next goes on from there.
    resume: Option<resp::Resume>,
}

/// Room a read asks for, at most (a buffer that grew for a large frame
/// may offer more).
const READ_BYTES: usize = 64 << 10;
/// Bytes a new connection reads per call at first: a connection that
/// never sent more holds this much, not [`READ_BYTES`]; each read that
/// fills what it asked for doubles it, up to [`READ_BYTES`] (a read takes
/// whatever room the buffer has, which may be more).
const FIRST_READ_BYTES: usize = 4 << 10;

impl Conn {
    /// Read more bytes; `Ok(0)` at end of stream. The buffer holds at most
    /// one incomplete frame ([`resp::FRAME_BYTES_MAX`]) plus one read; its
    /// bytes past `rlen` stay allocated (and initialized) between reads.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
            // Give back what a large frame needed.
            if self.rbuf.len() > 4 * READ_BYTES {
                self.rbuf.truncate(READ_BYTES);
                self.rbuf.shrink_to(READ_BYTES);
            }
        } else if self.rpos > 0 {
            self.rbuf.copy_within(self.rpos..self.rlen, 0);
            self.rlen -= self.rpos;
            self.rpos = 0;
        }
        if self.rbuf.len() < self.rlen + self.chunk {
            self.rbuf.resize(self.rlen + self.chunk, 0);
        }
        loop {
            match self.stream.try_read(&mut self.rbuf[self.rlen..]) {
                Ok(n) => {
                    if n == self.rbuf.len() - self.rlen {
                        self.chunk = (self.chunk * 2).min(READ_BYTES);
                    }
                    self.rlen += n;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stream.readable().await?,
                Err(e) => return Err(e),
            }
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        let mut done = 0;
        while done < self.wbuf.len() {
            // Nothing more is acknowledged once the final sync is asked for.
            if crate::shutting_down() {
                return Err(io::Error::other("the server is shutting down"));
            }
            match self.stream.try_write(&self.wbuf[done..]) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.stream.writable().await?,
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        if self.wbuf.capacity() > 4 * READ_BYTES {
            self.wbuf.shrink_to(READ_BYTES);
        }
        Ok(())
    }

    /// Skip what is left of an oversize command; true once it is skipped
    /// (and answered).
    fn skip_oversize(&mut self, p: &mut Planner) -> bool {
        let Some(skip) = self.skip.as_mut() else {
            return true;
        };
        loop {
            let n = skip.bytes.min(self.rlen - self.rpos);
            self.rpos += n;
            skip.bytes -= n;
            if skip.bytes > 0 {
                return false;
            }
            if skip.crlf {
                let rest = &self.rbuf[self.rpos..self.rlen];
                if rest.len() < 2 {
                    return false;
                }
                if &rest[..2] != b"\r\n" {
                    let e = resp::ProtocolError::MissingCrlf;
                    p.reply(|out| out.extend_from_slice(e.reply().as_bytes()));
                    p.close = true;
                    return false;
                }
                self.rpos += 2;
                skip.crlf = false;
            }
            if skip.args == 0 {
                break;
            }
            match resp::bulk_header(&self.rbuf[self.rpos..self.rlen]) {
                Ok(None) => return false,
                Ok(Some((len, used))) => {
                    self.rpos += used;
                    skip.bytes = len;
                    skip.crlf = true;
                    skip.args -= 1;
                }
                Err(e) => {
                    p.reply(|out| out.extend_from_slice(e.reply().as_bytes()));
                    p.close = true;
                    return false;
                }
            }
        }
        let arg_bytes = skip.arg_bytes;
        self.skip = None;
        p.error(&format!(
            "ERR argument of {arg_bytes} bytes exceeds the limit of {} bytes",
            resp::ARG_BYTES_MAX
        ));
        true
    }

    /// Plan every whole command buffered, or as many as
    /// [`READS_PER_BATCH`] lets one batch run: true when it stopped there
    /// (the rest is planned after this batch, without reading first).
    fn plan_buffered(&mut self, p: &mut Planner, ctx: &Ctx, now: u64) -> bool {
        loop {
            // Skipping an oversize command may also find a protocol error.
            let skipped = !p.close && self.skip_oversize(p);
            if !skipped || p.close {
                return false;
            }
            let frame = &self.rbuf[self.rpos..self.rlen];
            let (bytes, consumed) =
                match resp::parse_resuming(frame, &mut self.args, self.resume.take()) {
                    Parsed::Incomplete { resume } => {
                        self.resume = resume;
                        return false;
                    }
                    Parsed::Command { consumed } => (frame, consumed),
                    Parsed::Quoted { consumed, line } => {
                        match resp::unquote(&frame[..line], &mut self.args, &mut self.unquoted) {
                            Ok(()) => (&self.unquoted[..], consumed),
                            Err(e) => {
                                p.reply(|out| out.extend_from_slice(e.reply().as_bytes()));
                                p.close = true;
                                continue;
                            }
                        }
                    }
                    Parsed::Oversize {
                        consumed,
                        arg_bytes,
                        skip_bytes,
                        skip_args,
                    } => {
                        self.rpos += consumed;
                        self.skip = Some(Skip {
                            bytes: skip_bytes,
                            crlf: true,
                            args: skip_args,
                            arg_bytes,
                        });
                        continue;
                    }
                    Parsed::Error(e) => {
                        p.reply(|out| out.extend_from_slice(e.reply().as_bytes()));
                        p.close = true;
                        continue;
                    }
                };
            if !self.args.is_empty() {
                let args = Cmd::new(bytes, &self.args);
                let reads = commands::reads_of(&args);
                if (p.reads > 0 && p.reads + reads > READS_PER_BATCH)
                    || p.plans.len() >= COMMANDS_PER_BATCH
                {
                    // Planned with the next batch (parsed again then).
                    return true;
                }
                commands::plan(&args, p, ctx, now);
            }
            self.rpos += consumed;
        }
    }
}

pub async fn serve(ctx: Rc<Ctx>, stream: std::net::TcpStream) {
    let peer = stream.peer_addr().ok();
    let stream = match TcpStream::from_std(stream) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shard {}: cannot adopt connection: {e}", ctx.me);
            return;
        }
    };
    let mut conn = Conn {
        stream,
        rbuf: Vec::new(),
        rpos: 0,
        rlen: 0,
        resume: None,
        chunk: FIRST_READ_BYTES,
        wbuf: Vec::new(),
        args: Vec::new(),
        unquoted: Vec::new(),
        skip: None,
    };
    let mut planner = Planner::new(ctx.peers.len());
    if let Err(e) = serve_requests(&ctx, &mut conn, &mut planner).await
        && e.kind() != io::ErrorKind::ConnectionReset
        && e.kind() != io::ErrorKind::BrokenPipe
        && !crate::shutting_down()
    {
        eprintln!("shard {}: connection {peer:?}: {e}", ctx.me);
    }
}

async fn serve_requests(ctx: &Ctx, conn: &mut Conn, p: &mut Planner) -> io::Result<()> {
    loop {
        let more = conn.plan_buffered(p, ctx, now_unix_ms());
        if !p.is_empty() {
            p.execute(ctx).await;
            p.assemble(ctx, &mut conn.wbuf);
            if p.shutdown.is_none() {
                conn.flush().await?;
            } else {
                // The replies before `SHUTDOWN`, as far as the client takes
                // them within a second: the shutdown follows whatever
                // became of them.
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), conn.flush()).await;
            }
        }
        if let Some(nosave) = p.shutdown.take() {
            crate::request_shutdown(nosave);
            // As Redis: the connection stays open until the exit closes
            // it, so a client that sees it close knows the server is gone.
            std::future::pending::<()>().await;
        }
        if p.close {
            return Ok(());
        }
        // A client that keeps the socket full (a pipeline streamed without
        // pause, or empty lines, which plan nothing) never makes `fill` or
        // `flush` wait, and a batch of local reads never waits either:
        // without this the task would run on, and the shard's other
        // connections, its batches for other shards and its syncer
        // (`everysec`) would wait until the stream stopped.
        tokio::task::yield_now().await;
        if more {
            continue;
        }
        // Everything read is answered: what a large request or reply
        // needed is given back before the wait for more.
        p.trim();
        if conn.rpos == conn.rlen {
            crate::batch::trim(&mut conn.args);
            crate::batch::trim(&mut conn.unquoted);
        }
        if conn.fill().await? == 0 {
            return Ok(());
        }
    }
}

/// Check a key's length; `false` after answering the error.
pub fn key_ok(p: &mut Planner, key: &[u8]) -> bool {
    if key.len() > KEY_BYTES_MAX {
        p.error(&format!(
            "ERR key of {} bytes exceeds the limit of {KEY_BYTES_MAX} bytes",
            key.len()
        ));
        return false;
    }
    true
}

/// `SET` options, as Redis spells them and as it combines them: an option
/// may be repeated (the last expiry given counts), but `NX` and `XX`, and
/// `KEEPTTL` and the expiries, exclude each other.
pub fn set_options(opts: &[&[u8]], now: u64) -> Result<(Cond, Ttl), String> {
    let mut cond = Cond::Always;
    let mut keep = false;
    // The expiry's option and its argument, read once every option is.
    let mut expiry: Option<(Vec<u8>, &[u8])> = None;
    // `GET` is refused once every option is read and the expiry checked: a
    // bad option or expiry beside it is that error first, as in Redis.
    let mut get = false;
    let mut i = 0;
    let syntax = || "ERR syntax error".to_string();
    while i < opts.len() {
        let o = opts[i].to_ascii_uppercase();
        match o.as_slice() {
            b"NX" if cond != Cond::Xx => cond = Cond::Nx,
            b"XX" if cond != Cond::Nx => cond = Cond::Xx,
            b"KEEPTTL" if expiry.is_none() => keep = true,
            b"EX" | b"PX" | b"EXAT" | b"PXAT"
                if !keep && expiry.as_ref().is_none_or(|(k, _)| *k == o) =>
            {
                i += 1;
                let n = opts.get(i).ok_or_else(syntax)?;
                expiry = Some((o, n));
            }
            b"GET" => get = true,
            _ => return Err(syntax()),
        }
        i += 1;
    }
    let ttl = match expiry {
        None if keep => Ttl::Keep,
        None => Ttl::Clear,
        Some((kind, n)) => {
            let n = resp::parse_i64(n).ok_or("ERR value is not an integer or out of range")?;
            let at = match kind.as_slice() {
                b"EX" => n
                    .checked_mul(1000)
                    .and_then(|ms| ms.checked_add(now as i64)),
                b"PX" => n.checked_add(now as i64),
                b"EXAT" => n.checked_mul(1000),
                _ => Some(n),
            };
            match at {
                Some(at) if n > 0 && at > 0 => Ttl::At(at as u64),
                _ => return Err("ERR invalid expire time in 'set' command".into()),
            }
        }
    };
    if get {
        return Err("ERR SET option GET is not supported by this server".into());
    }
    Ok((cond, ttl))
}
