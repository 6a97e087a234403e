//! One shard's part of the key space: records in segalloc allocations, the
//! in-memory index rebuilt from them, and the sync policy.
//!
//! A record is one allocation:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `KVR3` (little-endian `u32`); zero once retired |
//! | 4 | 4 | key length |
//! | 8 | 4 | value length |
//! | 12 | 4 | CRC-32C of bytes 0..12 and 24.. (up to the value's end) |
//! | 16 | 8 | *superseded by*: the sequence number of the record that replaced it (0: none); not checksummed, written when it is replaced |
//! | 24 | 8 | sequence number (per shard, increasing) |
//! | 32 | 8 | expiry, Unix milliseconds (0: none) |
//! | 40 | … | key, then value |
//!
//! A record of the previous layout (magic `KVR2`) has no *superseded by*
//! field: sequence number at 16, expiry at 24, key at 32, checksum over
//! 0..12 and 16... It is read as before, and when replaced it
//! waits to be retired in a round, as under `--sync always`.
//!
//! Each shard also keeps one 16-byte allocation (created when first
//! written), its root [`WATERMARK_ROOT`]: magic `KVW1`, 4 zero bytes, then
//! the *durable sequence number* W: every record with a sequence number up
//! to W was durable when W was written. A record superseded by a sequence number
//! up to W is dead whatever else recovery finds (see
//! `Store::retire_round`). And one more 16-byte allocation, the root
//! `kv_server.owner`, marks the shard as the server's
//! (`examples/common/owner.rs`); neither is a record.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use segalloc::{Handle, PinGuard, Shard};
use tokio::sync::Notify;

use crate::batch::{Batch, Cond, OpDesc, OpKind, Ttl};
use crate::hash::{IndexHashState, IndexMap};
use crate::resp;
use crate::retire::{self, Keyed, Rounds, Waiting};

/// Longest key.
pub const KEY_BYTES_MAX: usize = 512;
/// Largest value.
pub const VALUE_BYTES_MAX: usize = resp::ARG_BYTES_MAX;
/// Reply bytes one batch may produce on a shard; a `GET` past it is
/// answered with an error instead of its value.
pub const OUT_BYTES_MAX: usize = 64 << 20;

pub const HEADER_BYTES: usize = 40;
/// The header of a record of the previous layout.
const HEADER_BYTES_V2: usize = 32;
const MAGIC: u32 = u32::from_le_bytes(*b"KVR3");
const MAGIC_V2: u32 = u32::from_le_bytes(*b"KVR2");
const OFF_KEY_LEN: usize = 4;
const OFF_VALUE_LEN: usize = 8;
const OFF_CRC: usize = 12;
const OFF_SUPERSEDED: usize = 16;
/// Sequence number and expiry: the 16 bytes before the key, in both
/// layouts.
const OFF_SEQ: usize = HEADER_BYTES - 16;
const OFF_EXPIRE: usize = HEADER_BYTES - 8;
const _: () = assert!(OFF_CRC + 4 == OFF_SUPERSEDED && OFF_SUPERSEDED + 8 == OFF_SEQ);
const _: () = assert!(HEADER_BYTES_V2 - 16 == OFF_SUPERSEDED);

/// The program's name: its roots are `kv_server.…` (see
/// `examples/common/owner.rs`).
pub const PROGRAM: &str = "kv_server";
/// The root naming a shard's durable sequence number.
pub const WATERMARK_ROOT: &str = "kv_server.durable_seq";
const WATERMARK_MAGIC: u32 = u32::from_le_bytes(*b"KVW1");
const WATERMARK_BYTES: usize = 16;
const _: () = assert!(HEADER_BYTES + KEY_BYTES_MAX + VALUE_BYTES_MAX <= 16 << 20);

/// When writes become durable against power loss (as Redis's `appendfsync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncPolicy {
    /// A batch of writes is acknowledged after one sync that covers it.
    Always,
    /// A sync every second.
    Everysec,
    /// No sync per write: `SAVE`, and one every 30 s (about when the kernel
    /// writes dirty pages back anyway). Freed space is reused only after a
    /// sync, so a server that never synced would only grow.
    No,
}

/// An indexed key: its record and expiry.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Entry {
    handle: Handle,
    expire_at_ms: u64,
    /// A deletion of this record waits until the durable sequence number
    /// reaches this one (0: it need not): an older record of the key may
    /// be marked superseded by it and still be allocated (see
    /// [`Store::retire_round`]).
    delete_after: u64,
}

impl Entry {
    fn expired(&self, now_ms: u64) -> bool {
        self.expire_at_ms != 0 && self.expire_at_ms <= now_ms
    }
}

/// What a `SET` (or the write of `INCR`) asks for.
struct Put<'a> {
    key: &'a [u8],
    value: &'a [u8],
    cond: Cond,
    ttl: Ttl,
    now: u64,
}

pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The record of `key` and `value` into `buf` (replacing what it held):
/// header, key, value, checksum (see [`record_crc`]).
fn encode_record(buf: &mut Vec<u8>, seq: u64, expire_at_ms: u64, key: &[u8], value: &[u8]) {
    let mut h = [0u8; HEADER_BYTES];
    h[..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[OFF_KEY_LEN..OFF_KEY_LEN + 4].copy_from_slice(&(key.len() as u32).to_le_bytes());
    h[OFF_VALUE_LEN..OFF_VALUE_LEN + 4].copy_from_slice(&(value.len() as u32).to_le_bytes());
    h[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_le_bytes());
    h[OFF_EXPIRE..OFF_EXPIRE + 8].copy_from_slice(&expire_at_ms.to_le_bytes());
    buf.clear();
    buf.extend_from_slice(&h);
    buf.extend_from_slice(key);
    buf.extend_from_slice(value);
    let crc = record_crc(buf, HEADER_BYTES);
    buf[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The checksum of a record whose header is `header` bytes: over bytes
/// 0..12 and from the sequence number on (16 bytes before the header's
/// end) to the value's end. The *superseded by* field is left out: it is
/// written after the record.
fn record_crc(record: &[u8], header: usize) -> u32 {
    let crc = crate::crc::append(0, &record[..OFF_CRC]);
    crate::crc::append(crc, &record[header - 16..])
}

/// Write into the record `pin` holds that the record of sequence number
/// `by` replaced it: false for a record of the previous layout (it has no
/// room for it).
fn mark_superseded(pin: &PinGuard, by: u64) -> segalloc::Result<bool> {
    let mut magic = [0u8; 4];
    pin.read_at(0, &mut magic)?;
    if u32::from_le_bytes(magic) != MAGIC {
        return Ok(false);
    }
    pin.write_at(OFF_SUPERSEDED, &by.to_le_bytes())?;
    Ok(true)
}

/// The durable sequence number a watermark allocation holds (`None` when
/// it holds none).
fn read_watermark(pin: &PinGuard) -> Option<u64> {
    let mut b = [0u8; WATERMARK_BYTES];
    pin.read_at(0, &mut b).ok()?;
    (u32_at(&b, 0) == WATERMARK_MAGIC).then(|| u64_at(&b, 8))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Bytes of a slot read in the first copy: a record this short (the
/// common case) is read in one copy, a longer one in two.
const FIRST_READ_BYTES: usize = 1024;

/// Where a record's parts are: header, key and value lengths.
#[derive(Clone, Copy)]
struct Layout {
    header: usize,
    key_len: usize,
    value_len: usize,
}

/// A record's header checked: its layout, or why the slot (of
/// `slot_bytes`) holds no record.
fn check_header(h: &[u8], slot_bytes: usize) -> Result<Layout, &'static str> {
    if h.len() < HEADER_BYTES_V2 {
        return Err("slot shorter than a header");
    }
    let header = match u32_at(h, 0) {
        MAGIC => HEADER_BYTES,
        MAGIC_V2 => HEADER_BYTES_V2,
        _ => return Err("no magic (retired or never sealed)"),
    };
    if h.len() < header {
        return Err("slot shorter than a header");
    }
    let key_len = u32_at(h, OFF_KEY_LEN) as usize;
    let value_len = u32_at(h, OFF_VALUE_LEN) as usize;
    if key_len > KEY_BYTES_MAX || value_len > VALUE_BYTES_MAX {
        return Err("lengths out of range");
    }
    if header + key_len + value_len > slot_bytes {
        return Err("lengths exceed the slot");
    }
    Ok(Layout {
        header,
        key_len,
        value_len,
    })
}

/// A record read whole into `buf` (grown as needed, never shrunk below
/// the largest record read) and checked: header, lengths and checksum.
/// Returns the record's bytes and its layout.
fn load_record<'a>(
    pin: &PinGuard,
    buf: &'a mut Vec<u8>,
) -> Result<(&'a [u8], Layout), &'static str> {
    let first = pin.len().min(FIRST_READ_BYTES);
    if buf.len() < first {
        buf.resize(first, 0);
    }
    pin.read_at(0, &mut buf[..first])
        .map_err(|_| "record unreadable")?;
    let layout = check_header(&buf[..first], pin.len())?;
    let total = layout.header + layout.key_len + layout.value_len;
    if total > first {
        if buf.len() < total {
            buf.resize(total, 0);
        }
        pin.read_at(first, &mut buf[first..total])
            .map_err(|_| "record unreadable")?;
    }
    let record = &buf[..total];
    if record_crc(record, layout.header) != u32_at(record, OFF_CRC) {
        return Err("checksum mismatch");
    }
    Ok((record, layout))
}

/// The value of `key`'s record, read into `buf` and checked.
fn load_value<'a>(
    pin: &PinGuard,
    key: &[u8],
    buf: &'a mut Vec<u8>,
) -> Result<&'a [u8], &'static str> {
    let (record, layout) = load_record(pin, buf)?;
    let (body, key_len) = (&record[layout.header..], layout.key_len);
    if key_len != key.len() || &body[..key_len] != key {
        return Err("record holds another key");
    }
    Ok(&body[key_len..])
}

/// The shortest and longest turn of the expiry sweep (see
/// [`Store::run_expiry`]).
const EXPIRE_TURN_MIN: Duration = Duration::from_millis(1);
const EXPIRE_TURN_MAX: Duration = Duration::from_millis(10);
/// Retirements between two yields of a round (and deferred frees after a
/// sync).
const RETIRE_PER_YIELD: usize = 1024;
/// Pages a round under `always` zeroes records on between two syncs (see
/// [`Store::retire_round`]): 1 MiB more to write back per sync. 1,024
/// measured a p99 twice as high, 64 no better than 256.
const PAGES_PER_SYNC: usize = 256;
/// Replaced records a shard keeps allocated under `everysec` and `no`
/// until a sync covers their replacements; past it, writers wait for a
/// sync. A second of overwrites at the fastest one shard takes them.
const DEFERRED_MAX: usize = 1 << 20;

/// The same limit in bytes: the replaced records' slots. Under `no` it is
/// what bounds the disk an overwrite workload takes beyond its live data
/// (the records are freed after the sync it asks for, and their space is
/// reusable after the next: about three times this per shard), where the
/// count alone allowed a terabyte of 1 MiB records.
const DEFERRED_BYTES_MAX: u64 = 128 << 20;

/// Keys by expiry (Unix milliseconds), soonest first.
type ExpiryQueue = BinaryHeap<Reverse<(u64, Box<[u8]>)>>;

/// Give back most of `index`'s table once it is less than an eighth full,
/// as Redis shrinks a table a tenth full: a table keeps the size of its
/// largest load otherwise (68 MiB for no key after 500,000 were written
/// and deleted). The table is rebuilt at twice its keys, so it shrinks
/// again only after as many deletions more, and each shrink moves fewer
/// keys than the deletions since the table was last resized: O(1) per
/// deletion amortized, and a pause of one rebuild of what is left.
///
/// The table itself goes back to the kernel because `main` keeps large
/// blocks out of glibc's arenas (`keep_large_blocks_out_of_arenas`). The
/// deleted keys' own blocks were freed into the arena, where glibc keeps
/// them resident, so a shrink of a large table (64 Ki entries or more)
/// also trims the arenas: 500,000 keys written and all but 1,000 deleted
/// kept 11 – 15 MiB resident (`RssAnon`) without it.
fn shrink_if_sparse<V>(index: &mut IndexMap<V>) {
    const SMALLEST: usize = 1024;
    let was = index.capacity();
    if was > SMALLEST && index.len() < was / 8 {
        index.shrink_to((index.len() * 2).max(SMALLEST));
        #[cfg(target_env = "gnu")]
        if was >= 1 << 16 {
            // SAFETY: `malloc_trim` only gives free pages of the
            // allocator's arenas back to the kernel; no block moves.
            unsafe { nix::libc::malloc_trim(0) };
        }
    }
}

/// The expiry queue of an index.
fn expiry_heap(index: &IndexMap<Entry>) -> ExpiryQueue {
    index
        .iter()
        .filter(|(_, e)| e.expire_at_ms != 0)
        .map(|(k, e)| Reverse((e.expire_at_ms, k.clone())))
        .collect()
}

/// A record read back whole and checked.
struct Found {
    seq: u64,
    expire_at_ms: u64,
    /// The sequence number of the record that replaced it (0: none known).
    superseded_by: u64,
    key: Box<[u8]>,
}

fn recover_record(pin: &PinGuard, buf: &mut Vec<u8>) -> Result<Found, &'static str> {
    let (record, layout) = load_record(pin, buf)?;
    let key = record[layout.header..layout.header + layout.key_len].into();
    let superseded_by = match layout.header {
        HEADER_BYTES => u64_at(record, OFF_SUPERSEDED),
        _ => 0,
    };
    Ok(Found {
        seq: u64_at(record, layout.header - 16),
        expire_at_ms: u64_at(record, layout.header - 8),
        superseded_by,
        key,
    })
}

async fn pin_of(shard: &Shard, h: Handle) -> segalloc::Result<PinGuard> {
    // The first poll of `pin` is `try_pin`'s hot path.
    shard.pin(h).await
}

/// Retire a record (zero its magic) and free it. `pin` is its pin.
fn retire(shard: &Shard, h: Handle, pin: PinGuard) -> segalloc::Result<()> {
    pin.write_at(0, &[0u8; 4])?;
    drop(pin);
    shard.free(h)
}

/// The best record of each key, and what was done: `(index, torn,
/// superseded, expired, marks cleared, highest sequence number)`.
type Rebuilt = (IndexMap<(u64, Entry)>, usize, usize, usize, usize, u64);

/// Read every live allocation of `shard` but `watermark` (whose durable
/// sequence number is `durable_seq`): free torn, expired and superseded
/// records, index the rest. A record superseded by a sequence number up
/// to `durable_seq` is dead even when no record of its key is left (the
/// one that replaced it was durable, then deleted).
async fn recover_index(
    shard: &Shard,
    not_records: [Option<Handle>; 2],
    durable_seq: u64,
) -> segalloc::Result<Rebuilt> {
    let now = now_unix_ms();
    let handles: Vec<Handle> = shard
        .live()
        .filter(|&h| !not_records.contains(&Some(h)))
        .collect();
    let mut best: IndexMap<(u64, Entry)> =
        IndexMap::with_capacity_and_hasher(handles.len(), Default::default());
    let (mut torn, mut superseded, mut expired, mut max_seq) = (0, 0, 0, 0u64);
    let mut buf = Vec::new();
    let mut losers = Vec::new();
    let mut marked = std::collections::HashSet::new();
    for h in handles {
        let pin = pin_of(shard, h).await?;
        let Found {
            seq,
            expire_at_ms,
            superseded_by,
            key,
        } = match recover_record(&pin, &mut buf) {
            Ok(r) => r,
            Err(why) => {
                eprintln!("shard {}: freeing {h}: {why}", shard.index());
                retire(shard, h, pin)?;
                torn += 1;
                continue;
            }
        };
        max_seq = max_seq.max(seq);
        drop(pin);
        if superseded_by != 0 && superseded_by <= durable_seq {
            losers.push(h);
            continue;
        }
        if superseded_by != 0 {
            // Its replacement was not durable: if it is not found, this
            // record is its key's value again (see below).
            marked.insert(h);
        }
        let entry = Entry {
            handle: h,
            expire_at_ms,
            // Set by the caller.
            delete_after: 0,
        };
        let loser = match best.get(&key) {
            Some(&(s, _)) if s > seq => Some(entry.handle),
            Some(&(_, e)) => {
                best.insert(key, (seq, entry));
                Some(e.handle)
            }
            None => {
                best.insert(key, (seq, entry));
                None
            }
        };
        losers.extend(loser);
    }
    if !losers.is_empty() {
        // The records that replaced them may be only in the page cache (a
        // `kill -9` leaves them there): durable first, else a power loss
        // could keep a retirement and lose its replacement.
        shard.sync().await?;
    }
    for l in losers {
        let pin = pin_of(shard, l).await?;
        retire(shard, l, pin)?;
        superseded += 1;
    }
    // Expiry is applied after the sequence numbers decided: an expired
    // overwrite must not bring back the record it replaced.
    let dead: Vec<Box<[u8]>> = best
        .iter()
        .filter(|(_, (_, e))| e.expired(now))
        .map(|(k, _)| k.clone())
        .collect();
    if superseded > 0 && !dead.is_empty() {
        // The records they replaced must be durably retired first: a power
        // loss may keep an expired record's retirement and revert an older
        // one's, which would then be its key's only record.
        shard.sync().await?;
    }
    for key in dead {
        let (_, e) = best.remove(&key).expect("listed");
        let pin = pin_of(shard, e.handle).await?;
        retire(shard, e.handle, pin)?;
        expired += 1;
    }
    // A record kept though marked superseded: the record that replaced it
    // was lost (a deletion of it would have made its number durable
    // first). Clear the mark, else once the durable sequence number
    // passes it a later recovery would drop the key's value. The caller
    // syncs before serving, so the clear is durable before any durable
    // sequence number is written.
    let mut cleared = 0;
    for (_, e) in best.values() {
        if marked.contains(&e.handle) {
            let pin = pin_of(shard, e.handle).await?;
            pin.write_at(OFF_SUPERSEDED, &0u64.to_le_bytes())?;
            cleared += 1;
        }
    }
    Ok((best, torn, superseded, expired, cleared, max_seq))
}

/// What recovery found on one shard.
pub struct Recovered {
    pub records: usize,
    pub torn: usize,
    pub superseded: usize,
    pub expired: usize,
    pub elapsed_ms: f64,
}

/// Sync bookkeeping: writes are counted; a sync covers the writes counted
/// when it started.
struct SyncState {
    policy: SyncPolicy,
    writes: Cell<u64>,
    synced: Cell<u64>,
    wanted: Cell<u64>,
    failures: Cell<u64>,
    last_sync_unix_ms: Cell<u64>,
    syncs: Cell<u64>,
    /// Batches that started waiting for a sync, ever.
    waiters: Cell<u64>,
    /// The shard's count of frees when its latest completed sync began,
    /// and when the completed one before it began: space freed since the
    /// one before may still wait
    /// for a sync (a segment it emptied is released by the next sync after
    /// the free, and its space is reusable after the sync after that).
    frees_at_syncs: Cell<(u64, u64)>,
    kick: Notify,
    done: Notify,
}

/// Longest wait of a sync for the writers the previous one answered.
const GATHER_MAX: Duration = Duration::from_millis(1);

/// What the last demanded sync did, for gathering the next one.
#[derive(Default)]
struct LastSync {
    /// Batches it answered: those that started waiting before it began
    /// and after the sync before it began.
    answered: u64,
    /// [`SyncState::waiters`] when it began.
    waiters_at_start: u64,
    /// [`SyncState::waiters`] when it completed.
    waiters_at_end: u64,
    /// How long it took.
    elapsed: Duration,
}

/// One shard's part of the store. Lives on its shard thread only.
pub struct Store {
    pub shard: Shard,
    index: RefCell<IndexMap<Entry>>,
    /// Keys given an expiry, soonest first (entries may be stale: the key
    /// was overwritten or deleted since; the sweep checks the index).
    expiring: RefCell<ExpiryQueue>,
    next_seq: Cell<u64>,
    sync: SyncState,
    /// Where records are read back to be checked (borrowed only between
    /// awaits). As large as the largest record read.
    record_buf: RefCell<Vec<u8>>,
    /// Records an overwrite replaced (under `--sync always`), still
    /// allocated and intact, to be retired together once a sync covered
    /// their replacements (see [`Store::retire_round`]).
    waiting: RefCell<Waiting>,
    /// The rounds of retirement under way.
    rounds: RefCell<Rounds>,
    /// Records an overwrite replaced (under `everysec` and `no`), marked
    /// superseded, with the count of writes a sync must cover before they
    /// are freed (in that order).
    deferred: RefCell<VecDeque<(Handle, u64)>>,
    /// The bytes of their slots.
    deferred_bytes: Cell<u64>,
    /// The allocation holding the durable sequence number, once created.
    watermark: Cell<Option<Handle>>,
    /// The durable sequence number last written to `watermark`.
    w_pending: Cell<u64>,
    /// The durable sequence number a completed sync made durable.
    w_durable: Cell<u64>,
    /// A deletion waits for the durable sequence number to reach this
    /// (under `always` it is written only then).
    w_wanted: Cell<u64>,
    /// Notified when the syncer is done freeing after a sync.
    freed: Notify,
    /// How often [`Store::run_retirer`] retires the waiting records.
    retire_every: Duration,
    /// Wakes [`Store::run_retirer`] when `waiting` is full.
    retire_kick: Notify,
    /// Records taken by rounds under way and not yet retired.
    retiring: Cell<usize>,
    /// Notified when a round ends.
    retired: Notify,
    /// Key hashes with a deletion under way, and how many (see
    /// [`Deleting`]).
    deleting: RefCell<HashMap<u64, u32, IndexHashState>>,
    /// Notified when a deletion ends.
    deletion_done: Notify,
    /// A FLUSHDB is under way: commands wait (see [`Store::flush`]).
    flushing: Cell<bool>,
    /// Notified when a FLUSHDB ends.
    flushed: Notify,
}

/// Holds commands back while a FLUSHDB runs (see [`Store::flush`]).
struct FlushGate<'a>(&'a Store);

impl<'a> FlushGate<'a> {
    fn close(store: &'a Store) -> FlushGate<'a> {
        store.flushing.set(true);
        FlushGate(store)
    }
}

impl Drop for FlushGate<'_> {
    fn drop(&mut self) {
        self.0.flushing.set(false);
        self.0.flushed.notify_waiters();
    }
}

/// A round of [`Store::retire_round`]: the records it took, of which the
/// first `done` are retired. Dropped (the round is done, failed or was
/// cancelled), it gives the rest back; the round ends with the next sync
/// (see [`Rounds`]).
struct Retiring<'a> {
    store: &'a Store,
    id: u64,
    list: Vec<Keyed>,
    done: usize,
}

impl Drop for Retiring<'_> {
    fn drop(&mut self) {
        let s = self.store;
        s.retiring
            .set(s.retiring.get() - (self.list.len() - self.done));
        s.waiting
            .borrow_mut()
            .give_back(&self.list[self.done..], s.sync.writes.get());
        if self.done > 0 {
            // Their frees are to be synced.
            s.wrote();
        }
        let mut rounds = s.rounds.borrow_mut();
        rounds.finish(self.id, s.sync.writes.get());
        rounds.synced(s.sync.synced.get());
        // Done, ended or not: a deletion waiting for it asks for the sync.
        s.retired.notify_waiters();
    }
}

/// A deletion under way of the keys of one hash: writers of those keys
/// wait until it ends (see [`Store::pin_for_delete`]).
struct Deleting<'a> {
    store: &'a Store,
    key: u64,
}

impl<'a> Deleting<'a> {
    fn begin(store: &'a Store, key: u64) -> Deleting<'a> {
        *store.deleting.borrow_mut().entry(key).or_default() += 1;
        Deleting { store, key }
    }
}

impl Drop for Deleting<'_> {
    fn drop(&mut self) {
        let mut deleting = self.store.deleting.borrow_mut();
        if let Some(n) = deleting.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                deleting.remove(&self.key);
            }
        }
        drop(deleting);
        self.store.deletion_done.notify_waiters();
    }
}

/// Answer an operation that failed with the allocator's error.
fn err_reply(out: &mut Vec<u8>, e: &segalloc::Error) {
    resp::error(out, &format!("ERR {e}"));
}

impl Store {
    /// Rebuild the index from the shard's live allocations.
    pub async fn open(
        shard: Shard,
        policy: SyncPolicy,
        retire_every: Duration,
    ) -> segalloc::Result<(Store, Recovered)> {
        let started = Instant::now();
        // Created when first written (see `Store::after_sync`): a server
        // under `always` that never waits for it has none. (Allocated at
        // open, it measured 10 – 15 % slower SET under `always`.) A
        // damaged one counts as none, and is replaced when next written; so
        // does one whose allocation was lost (a crash before the sync that
        // would have made both durable kept the root only): its root goes.
        // The dangling root goes before the owner mark is made: that mark's
        // allocation may take the very slot the root names.
        if let Some(h) = shard.root(WATERMARK_ROOT)
            && !shard.allocator().is_live(&h)
        {
            shard.remove_root(WATERMARK_ROOT)?;
        }
        let owner = crate::owner::claim(&shard, PROGRAM).await?;
        let found = shard.root(WATERMARK_ROOT);
        let (watermark, durable_seq) = match found {
            Some(h) => match read_watermark(&pin_of(&shard, h).await?) {
                Some(w) => (Some(h), w),
                None => (None, 0),
            },
            None => (None, 0),
        };
        let (best, torn, superseded, expired, cleared, max_seq) =
            recover_index(&shard, [found, Some(owner)], durable_seq).await?;
        if torn + superseded + expired + cleared > 0 {
            // What recovery retired must be durable before a deletion's own
            // write can be: else a power loss could keep the deletion and
            // revert the retirement of a key's older record, which would
            // then be the key's only record. Cleared marks must be durable
            // before any durable sequence number past them is written.
            shard.sync().await?;
        }
        let records = best.len();
        // A record newer than the durable sequence number may have marked
        // an older one that is still allocated.
        let index: IndexMap<Entry> = best
            .into_iter()
            .map(|(k, (seq, e))| {
                let delete_after = if seq > durable_seq { seq } else { 0 };
                (k, Entry { delete_after, ..e })
            })
            .collect();
        let expiring = expiry_heap(&index);
        let store = Store {
            shard,
            index: RefCell::new(index),
            expiring: RefCell::new(expiring),
            // Above the durable sequence number too: the newest records may
            // have been deleted, and a new record numbered at or below it
            // would pass for durable (see `recover_index`).
            next_seq: Cell::new(max_seq.max(durable_seq) + 1),
            record_buf: RefCell::new(Vec::new()),
            waiting: RefCell::new(Waiting::default()),
            rounds: RefCell::new(Rounds::default()),
            deferred: RefCell::new(VecDeque::new()),
            deferred_bytes: Cell::new(0),
            watermark: Cell::new(watermark),
            w_pending: Cell::new(durable_seq),
            w_durable: Cell::new(durable_seq),
            w_wanted: Cell::new(0),
            freed: Notify::new(),
            retire_every,
            retire_kick: Notify::new(),
            retiring: Cell::new(0),
            retired: Notify::new(),
            deleting: RefCell::new(HashMap::default()),
            deletion_done: Notify::new(),
            flushing: Cell::new(false),
            flushed: Notify::new(),
            sync: SyncState {
                policy,
                // Recovery's frees count as writes, so the first sync covers
                // them.
                writes: Cell::new((torn + superseded + expired) as u64),
                synced: Cell::new(0),
                wanted: Cell::new(0),
                failures: Cell::new(0),
                last_sync_unix_ms: Cell::new(0),
                syncs: Cell::new(0),
                waiters: Cell::new(0),
                frees_at_syncs: Cell::new((0, 0)),
                kick: Notify::new(),
                done: Notify::new(),
            },
        };
        let rec = Recovered {
            records,
            torn,
            superseded,
            expired,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        Ok((store, rec))
    }

    /// The task that syncs: on demand (`always`, `SAVE`) and every second
    /// (`everysec`; every 30 s for `no`). Runs for the life of the shard
    /// thread.
    pub async fn run_syncer(&self, bell: Arc<Notify>) {
        let s = &self.sync;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        let mut last = LastSync::default();
        loop {
            let periodic = tokio::select! {
                () = s.kick.notified() => false,
                _ = tick.tick() => {
                    ticks += 1;
                    match s.policy {
                        SyncPolicy::Everysec => true,
                        SyncPolicy::No => ticks.is_multiple_of(30),
                        SyncPolicy::Always => false,
                    }
                }
            };
            let demanded = s.wanted.get() > s.synced.get();
            let due = periodic && s.writes.get() > s.synced.get();
            if !(demanded || due) {
                continue;
            }
            if demanded {
                self.gather(&last, &bell).await;
                // The other shards' syncers that gather start theirs now:
                // the replies of all shards then go out together, and the
                // clients' next writes find every shard gathering again,
                // as on one shard.
                bell.notify_waiters();
            }
            // Let the requests that already arrived run first (the runtime
            // polls the sockets before it comes back here), so this sync
            // covers their writes too instead of each needing one of its
            // own.
            tokio::task::yield_now().await;
            let target = s.writes.get();
            let seq_before = self.next_seq.get() - 1;
            let w_at_start = self.w_pending.get();
            let waiters = s.waiters.get();
            let started = Instant::now();
            let frees_at_start = self.shard.stats().alloc.frees;
            let ok = match self.shard.sync().await {
                Ok(()) => {
                    // Counted once the sync is done: one still running has
                    // made nothing reusable yet (counted at its start, a
                    // write that found no space while it ran saw nothing
                    // freed since the sync before it, and was refused).
                    let (latest, _) = s.frees_at_syncs.get();
                    s.frees_at_syncs.set((frees_at_start, latest));
                    s.synced.set(target);
                    self.w_durable.set(self.w_durable.get().max(w_at_start));
                    if self.rounds.borrow_mut().synced(target) {
                        self.retired.notify_waiters();
                    }
                    s.last_sync_unix_ms.set(now_unix_ms());
                    s.syncs.set(s.syncs.get() + 1);
                    true
                }
                Err(e) => {
                    eprintln!("shard {}: sync failed: {e}", self.shard.index());
                    s.failures.set(s.failures.get() + 1);
                    false
                }
            };
            last = LastSync {
                answered: waiters - last.waiters_at_start,
                waiters_at_start: waiters,
                waiters_at_end: s.waiters.get(),
                elapsed: started.elapsed(),
            };
            s.done.notify_waiters();
            if ok {
                self.after_sync(target, seq_before).await;
            }
        }
    }

    /// After a sync that covered `synced` writes and every record up to
    /// sequence number `seq_before`: write that durable sequence number
    /// (durable with the next sync; under `always` only when a deletion
    /// waits for it), then free the replaced records the sync made
    /// ready (see [`Store::retire_round`]).
    async fn after_sync(&self, synced: u64, seq_before: u64) {
        self.write_watermark_and_free(synced, seq_before).await;
        self.freed.notify_waiters();
    }

    async fn write_watermark_and_free(&self, synced: u64, seq_before: u64) {
        let wanted =
            self.sync.policy != SyncPolicy::Always || self.w_wanted.get() > self.w_pending.get();
        if wanted && seq_before > self.w_pending.get() {
            let written = match self.watermark.get() {
                Some(h) => match pin_of(&self.shard, h).await {
                    Ok(pin) => pin.write_at(8, &seq_before.to_le_bytes()),
                    Err(e) => Err(e),
                },
                None => self.create_watermark(seq_before).await,
            };
            match written {
                Ok(()) => self.w_pending.set(seq_before),
                Err(e) => {
                    // No free before the number covers the records that
                    // marked them: freed, they could come back.
                    eprintln!(
                        "shard {}: writing the durable sequence number: {e}",
                        self.shard.index()
                    );
                    return;
                }
            }
        }
        let mut freed = 0usize;
        loop {
            let next = {
                let mut deferred = self.deferred.borrow_mut();
                match deferred.front() {
                    Some(&(h, at)) if at <= synced => {
                        deferred.pop_front();
                        self.deferred_bytes
                            .set(self.deferred_bytes.get() - u64::from(h.len()));
                        h
                    }
                    _ => break,
                }
            };
            if let Err(e) = self.shard.free(next) {
                eprintln!(
                    "shard {}: freeing a replaced record: {e}",
                    self.shard.index()
                );
                // Tried again after the next sync.
                self.deferred.borrow_mut().push_front((next, synced));
                self.deferred_bytes
                    .set(self.deferred_bytes.get() + u64::from(next.len()));
                break;
            }
            freed += 1;
            if freed.is_multiple_of(RETIRE_PER_YIELD) {
                tokio::task::yield_now().await;
            }
        }
        // Not counted as writes: nothing waits for these frees to be
        // durable (a marked record that comes back after a crash is dead or
        // loses to its replacement), and the next write's sync covers them.
        let _ = freed;
    }

    /// Allocate the durable sequence number's allocation holding `seq`,
    /// and name it (its root is durable with the next sync, as the number).
    async fn create_watermark(&self, seq: u64) -> segalloc::Result<()> {
        let a = self.shard.allocate(WATERMARK_BYTES as u64).await?;
        let (h, pin) = a.into_parts();
        let mut b = [0u8; WATERMARK_BYTES];
        b[..4].copy_from_slice(&WATERMARK_MAGIC.to_le_bytes());
        b[8..].copy_from_slice(&seq.to_le_bytes());
        if let Err(e) = pin.write_at(0, &b) {
            drop(pin);
            self.shard.free(h)?;
            return Err(e);
        }
        drop(pin);
        // A damaged one it replaces is freed.
        if let Some(old) = self.shard.set_root(WATERMARK_ROOT, h)? {
            self.shard.free(old)?;
        }
        self.watermark.set(Some(h));
        Ok(())
    }

    /// Wait until the durable sequence number reaches `seq` (two syncs at
    /// most: one makes the records up to it durable, the next the number).
    async fn durable_seq_reaches(&self, seq: u64) -> segalloc::Result<()> {
        for _ in 0..4 {
            if self.w_durable.get() >= seq {
                return Ok(());
            }
            self.w_wanted.set(self.w_wanted.get().max(seq));
            // A sync even when nothing else was written since the last.
            self.wrote();
            self.sync_now().await?;
        }
        if self.w_durable.get() >= seq {
            return Ok(());
        }
        Err(segalloc::Error::Io {
            op: "write the durable sequence number",
            path: None,
            source: std::io::Error::other("it does not advance (see the server log)"),
        })
    }

    /// Before a demanded sync: wait until as many batches have started
    /// waiting since the last sync completed as it answered, for at most
    /// half its duration and [`GATHER_MAX`] (the timer rounds up to a
    /// millisecond). The
    /// clients it answered send their next writes within a round trip;
    /// without this wait they would miss this sync and wait for the next,
    /// and the clients would split in two groups that each wait for two
    /// syncs per write instead of one.
    async fn gather(&self, last: &LastSync, bell: &Notify) {
        let s = &self.sync;
        let deadline = tokio::time::Instant::now() + (last.elapsed / 2).min(GATHER_MAX);
        let rung = bell.notified();
        tokio::pin!(rung);
        loop {
            let kicked = s.kick.notified();
            if s.waiters.get() - last.waiters_at_end >= last.answered {
                return;
            }
            tokio::select! {
                () = kicked => {}
                () = &mut rung => return,
                () = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The task that retires the waiting records: every `--retire-ms`, and
    /// when their queue is full. Runs for the life of the shard thread.
    pub async fn run_retirer(&self) {
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + self.retire_every,
            self.retire_every,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.retire_kick.notified() => {}
                _ = tick.tick() => {}
            }
            if let Err(e) = self.retire_ready().await {
                eprintln!(
                    "shard {}: retiring replaced records: {e}",
                    self.shard.index()
                );
            }
        }
    }

    /// Retire the waiting records that are ready (a sync covered their
    /// replacements). When none is and the queue is full, first wait for a
    /// sync that makes them ready.
    async fn retire_ready(&self) -> segalloc::Result<()> {
        // No await between taking the records and beginning their round:
        // a deletion looks for its key's records in one or the other.
        let mut list = self.waiting.borrow_mut().take_ready(self.sync.synced.get());
        if list.is_empty() && self.waiting.borrow().full() {
            // Full of records whose replacements no sync covered yet.
            self.sync_now().await?;
            list = self.waiting.borrow_mut().take_ready(self.sync.synced.get());
        }
        self.retire_round(list).await
    }

    /// Retire the records of `list` (zero each one's magic, free it). The
    /// round ends once a sync covers its retirements (the syncer ends it);
    /// until then it holds its keys (see [`Store::pin_for_delete`]).
    ///
    /// Under `--sync always` an overwrite leaves the record it replaced
    /// allocated and intact until a sync covered the new record (its
    /// batch's own sync): retired earlier, a power loss could keep the old
    /// record's zeroed magic and lose the new record, and the key would
    /// vanish. Then it waits for a round, so that the retirements of many
    /// overwrites are written back together instead of one random page per
    /// overwrite in each batch's own sync. Until then a crash leaves both
    /// records live, and recovery keeps the one with the higher sequence
    /// number, as for any overwrite a crash interrupted. A key that leaves
    /// the index must not leave an older record of it behind: see
    /// [`Store::pin_for_delete`].
    ///
    /// A round zeroes its records in file order (see
    /// [`retire::page_order`]) and, under `always`, asks for a sync after
    /// every [`PAGES_PER_SYNC`] pages: under random overwrites its records
    /// lie on nearly every page of the data files, and zeroed all at once
    /// they made the next sync write back the whole file while every
    /// writer waited for it (measured: p99 of `SET -P 16` 32 – 63 ms in
    /// the runs with a round; paced, 6 – 12 ms, at the same rate). The
    /// pages are written back once either way.
    ///
    /// Under `everysec` and `no` an overwrite instead writes into the old
    /// record, at once, the sequence number S of the new one (*superseded
    /// by*, outside the checksum), and frees it (no write to its page)
    /// once a sync covered the new record. The mark alone changes nothing
    /// if the new record is lost: recovery keeps the highest sequence
    /// number of a key it finds. Retiring these records in rounds, as
    /// under `always`, measured half as fast: by then a sync has cleaned
    /// their pages, and each zeroing takes a write fault. What the mark is
    /// for: a freed record stays intact in its slot, and if its key is
    /// later deleted, a power loss that loses the free (or a crash between
    /// a reuse of the slot and the new record's write) would bring it back.
    /// After each sync the shard writes the highest sequence number that
    /// sync covered, W, into its [`WATERMARK_ROOT`] allocation; recovery
    /// drops a record superseded by a sequence number up to W (its
    /// replacement was durable). A deletion of a record that may have
    /// marked another (`Entry::delete_after`) first waits until W, made
    /// durable by a later sync, reaches it; a slot is reused only after a
    /// sync that made its free durable, which also made W durable.
    async fn retire_round(&self, mut list: Vec<Keyed>) -> segalloc::Result<()> {
        if list.is_empty() {
            return Ok(());
        }

        retire::page_order(&mut list);
        let id = self.rounds.borrow_mut().begin(&list);
        self.retiring.set(self.retiring.get() + list.len());
        let mut round = Retiring {
            store: self,
            id,
            list,
            done: 0,
        };
        let paced = self.sync.policy == SyncPolicy::Always;
        let (mut page, mut pages) = (None, 0usize);
        while let Some(&(_, h)) = round.list.get(round.done) {
            let this_page = Some(retire::page_of(h));
            if paced && page != this_page {
                page = this_page;
                pages += 1;
                if pages.is_multiple_of(PAGES_PER_SYNC) {
                    // Each sync writes back a slice of the round's pages
                    // beside the writes it was asked for. Counted as a
                    // write, the slice gets a sync of its own when no
                    // writer asks for one.
                    self.wrote();
                    self.sync_now().await?;
                }
            }
            // On failure nothing changed (or only the magic was zeroed):
            // this record and the rest go back for the next round.
            let pin = pin_of(&self.shard, h).await?;
            retire(&self.shard, h, pin)?;
            round.done += 1;
            self.retiring.set(self.retiring.get() - 1);
            if round.done.is_multiple_of(RETIRE_PER_YIELD) {
                // A round is long: let the shard's other tasks run.
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }

    /// Wait for a sync that covers every write so far (ending the rounds
    /// done by then).
    pub async fn sync_now(&self) -> segalloc::Result<()> {
        let target = self.sync.writes.get();
        if self.sync.synced.get() >= target || self.durable(target).await.is_ok() {
            return Ok(());
        }
        // Report why the sync failed (the shard is poisoned).
        self.shard.sync().await
    }

    /// The hash the waiting records of `key` are filed under.
    fn key_hash(&self, key: &[u8]) -> u64 {
        self.index.borrow().hasher().hash_one(key)
    }

    /// Pin the record indexed under `key` to delete it (as
    /// [`Store::pin_current`]) once no older record of the key waits or is
    /// in a round under way, and their retirement is durable: an older
    /// record that outlived the deletion, intact, would be the key's only
    /// record after a crash, and a power loss may keep the deletion's own
    /// write and revert any unsynced one. The caller must not await before
    /// removing the key from the index.
    async fn pin_for_delete(&self, key: &[u8]) -> segalloc::Result<Option<(Entry, PinGuard)>> {
        let k = self.key_hash(key);
        // Writers of the key wait meanwhile: each overwrite would give the
        // deletion more to wait for.
        let _deleting = Deleting::begin(self, k);
        loop {
            self.retire_older(&[k]).await?;
            let current = self.pin_current(key).await?;
            if let Some((e, _)) = &current
                && e.delete_after > self.w_durable.get()
            {
                let seq = e.delete_after;
                drop(current);
                self.durable_seq_reaches(seq).await?;
                continue;
            }
            if !self.waiting.borrow().has_key(k) && !self.rounds.borrow().holds(k) {
                return Ok(current);
            }
        }
    }

    /// The task that deletes expired keys nobody reads: every 100 ms, the
    /// keys due, in turns of the shard's tasks. A turn takes 1 ms, or as
    /// long as the other tasks ran since the turn before when that is
    /// longer (up to [`EXPIRE_TURN_MAX`]): while keys are due the sweep
    /// gets about half the thread, so it keeps up with writes that give
    /// keys an expiry, and no turn holds the thread long. (A fixed 1,024
    /// keys per 100 ms fell behind at 10,000 such writes a second: 14
    /// million expired keys piled up in 40 s of `SET … PX 100`; a turn of
    /// every key written in the last 100 ms held the thread for tens of
    /// milliseconds.) Runs for the life of the shard thread.
    pub async fn run_expiry(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let mut turn = EXPIRE_TURN_MIN;
            loop {
                let deadline = Instant::now() + turn;
                match self.expire_due(now_unix_ms(), deadline).await {
                    // More may be due: go on after a turn of the others.
                    Ok(true) => {
                        let others = Instant::now();
                        tokio::task::yield_now().await;
                        turn = others.elapsed().clamp(EXPIRE_TURN_MIN, EXPIRE_TURN_MAX);
                    }
                    Ok(false) => break,
                    Err(e) => {
                        eprintln!("shard {}: expiring keys: {e}", self.shard.index());
                        break;
                    }
                }
            }
        }
    }

    /// Delete keys due at `now` until none is or `deadline` passes; true
    /// when the deadline stopped it (more may be due).
    async fn expire_due(&self, now: u64, deadline: Instant) -> segalloc::Result<bool> {
        let mut n = 0u32;
        loop {
            n = n.wrapping_add(1);
            if n.is_multiple_of(64) && Instant::now() >= deadline {
                return Ok(true);
            }
            let key = {
                let mut heap = self.expiring.borrow_mut();
                match heap.peek() {
                    Some(Reverse((t, _))) if *t <= now => {
                        let key = heap.pop().expect("peeked").0.1;
                        // As the index (`shrink_if_sparse`).
                        if heap.capacity() > 1024 && heap.len() < heap.capacity() / 8 {
                            let keep = (heap.len() * 2).max(1024);
                            heap.shrink_to(keep);
                        }
                        key
                    }
                    _ => return Ok(false),
                }
            };
            // The key may have been overwritten (without expiry, or later)
            // or deleted since it was queued.
            let due = self
                .index
                .borrow()
                .get(&key)
                .is_some_and(|e| e.expired(now));
            if due
                && let Some((e, pin)) = self.pin_for_delete(&key).await?
                && e.expired(now)
            {
                self.remove(&key, e, pin)?;
            }
        }
    }

    /// Wait until a sync covers the first `target` writes.
    async fn durable(&self, target: u64) -> Result<(), ()> {
        let s = &self.sync;
        let failures = s.failures.get();
        if s.synced.get() < target {
            s.waiters.set(s.waiters.get() + 1);
        }
        while s.synced.get() < target {
            let done = s.done.notified();
            s.wanted.set(s.wanted.get().max(target));
            s.kick.notify_one();
            done.await;
            if s.failures.get() != failures && s.synced.get() < target {
                return Err(());
            }
        }
        Ok(())
    }

    fn wrote(&self) {
        self.sync.writes.set(self.sync.writes.get() + 1);
    }

    /// Run a batch of operations for keys this shard owns; the replies go
    /// to `batch.out`. Under `--sync always` a batch with writes is
    /// answered once one sync covers them.
    pub async fn run(&self, batch: &mut Batch) {
        let now = now_unix_ms();
        let done = self.run_ready(batch, now);
        self.run_rest(batch, done, now).await;
    }

    /// Run the operations of `batch` from the first for as long as none
    /// has to await (see [`Store::exec_now`]); returns how many ran. The
    /// batch is finished when they all ran and [`Store::must_sync`] is
    /// false; else [`Store::run_rest`] finishes it.
    pub fn run_ready(&self, batch: &mut Batch, now: u64) -> usize {
        let Batch { arena, ops, out } = batch;
        out.clear();
        for (i, op) in ops.iter().enumerate() {
            if self.flushing.get() || !self.exec_now(op, arena, now, &mut out.buf) {
                return i;
            }
            out.end();
        }
        ops.len()
    }

    /// Wait while a FLUSHDB runs.
    async fn wait_flush(&self) {
        while self.flushing.get() {
            let flushed = self.flushed.notified();
            if self.flushing.get() {
                flushed.await;
            }
        }
    }

    /// Whether the replies of `batch` wait for a sync (`--sync always`
    /// and a write among its operations).
    pub fn must_sync(&self, batch: &Batch) -> bool {
        self.sync.policy == SyncPolicy::Always && batch.ops.iter().any(|op| op.kind.is_write())
    }

    /// Run the operations of `batch` after the first `done` (which
    /// [`Store::run_ready`] ran), then wait for the sync that covers its
    /// writes when [`Store::must_sync`].
    pub async fn run_rest(&self, batch: &mut Batch, done: usize, now: u64) {
        let Batch { arena, ops, out } = batch;
        for op in &ops[done..] {
            self.wait_flush().await;
            if !self.exec_now(op, arena, now, &mut out.buf) {
                self.exec(op, arena, now, &mut out.buf).await;
            }
            out.end();
        }
        if self.must_sync(batch) {
            let target = self.sync.writes.get();
            if self.durable(target).await.is_err() {
                let Batch { ops, out, .. } = batch;
                out.replace_where(ops, |op| op.kind.is_write(), b"-ERR sync failed\r\n");
            }
        }
    }

    /// Run `op` without awaiting when it can be (a `GET` or `SET` whose
    /// records' windows are mapped and whose allocation is at hand); false
    /// when it must go through [`Store::exec`].
    fn exec_now(&self, op: &OpDesc, arena: &[u8], now: u64, out: &mut Vec<u8>) -> bool {
        let key = &arena[op.key.clone()];
        match op.kind {
            OpKind::Get => self.get_now(key, now, out),
            OpKind::Set { cond, ttl } => {
                let w = Put {
                    key,
                    value: &arena[op.value.clone()],
                    cond,
                    ttl,
                    now,
                };
                match self.put_now(&w) {
                    None => return false,
                    Some(Ok(true)) => resp::ok(out),
                    Some(Ok(false)) => resp::nil(out),
                    Some(Err(e)) => err_reply(out, &e),
                }
                true
            }
            OpKind::IncrBy(delta) => self.incr_now(key, delta, now, out),
            _ => false,
        }
    }

    /// An `INCR` family command without awaiting, as the first turn of
    /// [`Store::incr`]; false (nothing done) when it must go there: the
    /// record's window is not mapped, or the write cannot be made at once
    /// (see [`Store::put_now`]).
    fn incr_now(&self, key: &[u8], delta: i64, now: u64, out: &mut Vec<u8>) -> bool {
        if !self.may_put_now(key) {
            return false;
        }
        let Some(Ok(old)) = self.pin_current_now(key) else {
            return false;
        };
        let Some((current, next, digits)) = self.incremented(key, old.as_ref(), delta, now, out)
        else {
            return true;
        };
        let w = Put {
            key,
            value: &digits,
            cond: Cond::Is(current),
            ttl: Ttl::Keep,
            now,
        };
        match self.put_now_over(&w, old) {
            // No await since the value was read: the condition holds.
            Some(Ok(true)) => resp::int(out, next),
            Some(Ok(false)) | None => return false,
            Some(Err(e)) => err_reply(out, &e),
        }
        true
    }

    /// A `GET` without awaiting; false when the record's window is not
    /// mapped (or the key expired: deleting it may await).
    fn get_now(&self, key: &[u8], now: u64, out: &mut Vec<u8>) -> bool {
        let Some(e) = self.index.borrow().get(key).copied() else {
            resp::nil(out);
            return true;
        };
        if e.expired(now) {
            return false;
        }
        match self.shard.try_pin(e.handle) {
            Ok(Some(pin)) => self.reply_value(e.handle, &pin, key, out),
            Ok(None) => return false,
            Err(err) => err_reply(out, &err),
        }
        true
    }

    async fn exec(&self, op: &OpDesc, arena: &[u8], now: u64, out: &mut Vec<u8>) {
        let key = &arena[op.key.clone()];
        let value = &arena[op.value.clone()];
        let r = match op.kind {
            OpKind::Get => self.get(key, now, out).await,
            OpKind::Set { cond, ttl } => {
                let w = Put {
                    key,
                    value,
                    cond,
                    ttl,
                    now,
                };
                self.set(&w, out).await
            }
            OpKind::Del => self.del(key, now).await.map(|n| resp::int(out, n)),
            OpKind::Exists => {
                let n = self.lookup(key, now).is_some();
                resp::int(out, n as i64);
                Ok(())
            }
            OpKind::IncrBy(delta) => self.incr(key, delta, now, out).await,
            OpKind::DbSize => {
                resp::int(out, self.index.borrow().len() as i64);
                Ok(())
            }
            OpKind::Flush => self.flush().await.map(|()| resp::ok(out)),
            OpKind::Save => {
                self.wrote();
                match self.durable(self.sync.writes.get()).await {
                    Ok(()) => resp::ok(out),
                    Err(()) => resp::error(out, "ERR sync failed"),
                }
                Ok(())
            }
            OpKind::Info => {
                self.info(now, out);
                Ok(())
            }
        };
        if let Err(e) = r {
            err_reply(out, &e);
        }
    }

    /// The live entry of `key` (an expired one counts as absent).
    fn lookup(&self, key: &[u8], now: u64) -> Option<Entry> {
        self.index
            .borrow()
            .get(key)
            .copied()
            .filter(|e| !e.expired(now))
    }

    /// Pin the record currently indexed under `key`: `None` when absent.
    /// The returned entry is still the indexed one when this returns (the
    /// caller must not await before acting on it).
    async fn pin_current(&self, key: &[u8]) -> segalloc::Result<Option<(Entry, PinGuard)>> {
        loop {
            let Some(e) = self.index.borrow().get(key).copied() else {
                return Ok(None);
            };
            let pinned = match self.shard.try_pin(e.handle)? {
                Some(p) => p,
                None => {
                    let p = self.shard.pin(e.handle).await;
                    if self.index.borrow().get(key) != Some(&e) {
                        // Overwritten or deleted while the window faulted in.
                        continue;
                    }
                    p?
                }
            };
            return Ok(Some((e, pinned)));
        }
    }

    async fn get(&self, key: &[u8], now: u64, out: &mut Vec<u8>) -> segalloc::Result<()> {
        let Some((mut e, mut pin)) = self.pin_current(key).await? else {
            resp::nil(out);
            return Ok(());
        };
        if e.expired(now) {
            drop(pin);
            match self.pin_for_delete(key).await? {
                Some((current, p)) if current.expired(now) => {
                    self.remove(key, current, p)?;
                    resp::nil(out);
                    return Ok(());
                }
                // Overwritten while superseded records were retired.
                Some((current, p)) => (e, pin) = (current, p),
                None => {
                    resp::nil(out);
                    return Ok(());
                }
            }
        }
        self.reply_value(e.handle, &pin, key, out);
        Ok(())
    }

    fn reply_value(&self, h: Handle, pin: &PinGuard, key: &[u8], out: &mut Vec<u8>) {
        if out.len() > OUT_BYTES_MAX {
            resp::error(out, "ERR reply too large: send fewer commands per batch");
            return;
        }
        let mut buf = self.record_buf.borrow_mut();
        match load_value(pin, key, &mut buf) {
            Ok(value) => resp::bulk(out, value),
            Err(why) => resp::error(out, &format!("ERR record {h} is damaged: {why}")),
        }
    }

    /// Whether a deletion of `key` (or of a key of the same hash) is under
    /// way.
    fn being_deleted(&self, key: &[u8]) -> bool {
        let deleting = self.deleting.borrow();
        !deleting.is_empty() && deleting.contains_key(&self.key_hash(key))
    }

    /// Whether writers wait for a sync to free the replaced records
    /// ([`DEFERRED_MAX`], [`DEFERRED_BYTES_MAX`]).
    fn deferred_full(&self) -> bool {
        self.deferred.borrow().len() >= DEFERRED_MAX
            || self.deferred_bytes.get() >= DEFERRED_BYTES_MAX
    }

    /// Allocate a record of `total` bytes. On a full disk, space freed
    /// since the sync before the latest began (deleted keys, replaced
    /// records), or released segments waiting for a sync, may wait for a
    /// sync or two (its slots are reusable after the next sync after the
    /// free; a segment it emptied is released then, and its space reusable
    /// after one more), and replaced records waiting for a sync (or in a
    /// retirement round) are freed only after it (under `always`, records
    /// waiting for a round are retired first): then sync and try again,
    /// three times at most (a replaced record needs all three: one frees
    /// it, one makes its slot reusable and releases its segment, one makes
    /// the segment's space reusable). Without that, a full disk under
    /// `everysec` or `no` stayed full: those sync only after a write, and
    /// no write got through.
    ///
    /// A sync that completed while the allocation ran may have made space
    /// reusable that the allocation did not see (segments released by the
    /// sync before it): then it tries again at once, twice at most, besides
    /// the syncs. The frees it counts were all before that sync's
    /// predecessor began, so they alone said a sync would not help, and a
    /// write after a mass delete and a `SAVE` was refused while the space
    /// waited for it.
    async fn allocate_record(&self, total: u64) -> segalloc::Result<segalloc::Allocation> {
        let (mut syncs, mut again) = (0, 0);
        loop {
            let completed = self.sync.syncs.get();
            let full = match self.shard.allocate(total).await {
                Err(e @ segalloc::Error::NoSpace { .. }) => e,
                r => return r,
            };
            if self.sync.syncs.get() != completed && again < 2 {
                again += 1;
                continue;
            }
            let (_, before_latest) = self.sync.frees_at_syncs.get();
            let stats = self.shard.stats().alloc;
            let freed = stats.frees > before_latest;
            // Segments released and waiting for a sync to be reusable (the
            // next one, or the one running).
            let released = stats.quarantined_entries > 0;
            let waiting = self.waiting.borrow().len() > 0;
            let replaced = waiting || self.retiring.get() > 0 || !self.deferred.borrow().is_empty();
            if syncs == 3 || !(freed || released || replaced) {
                return Err(full);
            }
            syncs += 1;
            if waiting {
                // Those a sync covered are freed now, not at the next round.
                self.retire_ready().await?;
            }
            // The syncer frees the replaced records after the sync, then
            // notifies.
            let done = self.freed.notified();
            self.wrote();
            self.sync_now().await?;
            done.await;
        }
    }

    /// Write a new record for `key` if `cond` holds at the moment it is
    /// published; returns whether it was written.
    async fn put(&self, w: &Put<'_>) -> segalloc::Result<bool> {
        while self.being_deleted(w.key) {
            let done = self.deletion_done.notified();
            if self.being_deleted(w.key) {
                done.await;
            }
        }
        if self.waiting.borrow().full() {
            // Writers retire the records they replaced when the background
            // rounds fall behind: the queue stays bounded.
            self.retire_ready().await?;
        }
        let mut syncs = 0;
        while self.deferred_full() {
            if syncs == 3 {
                return Err(segalloc::Error::Io {
                    op: "free replaced records",
                    path: None,
                    source: std::io::Error::other(
                        "they are not freed after a sync (see the server log)",
                    ),
                });
            }
            syncs += 1;
            // The syncer frees them after the sync, then notifies.
            let freed = self.freed.notified();
            self.wrote();
            self.sync_now().await?;
            freed.await;
        }
        let total = (HEADER_BYTES + w.key.len() + w.value.len()) as u64;
        let (h, pin) = self.allocate_record(total).await?.into_parts();
        let old = match self.pin_current(w.key).await {
            Ok(old) => old,
            Err(e) => {
                drop(pin);
                self.shard.free(h)?;
                return Err(e);
            }
        };
        self.publish(w, (h, pin), old)
    }

    /// [`Store::put`] without awaiting: `None` when the old record's window
    /// is not mapped or the allocation would have to wait.
    fn put_now(&self, w: &Put<'_>) -> Option<segalloc::Result<bool>> {
        if !self.may_put_now(w.key) {
            return None;
        }
        let old = match self.pin_current_now(w.key)? {
            Ok(old) => old,
            Err(err) => return Some(Err(err)),
        };
        self.put_now_over(w, old)
    }

    /// Whether a write of `key` may be made without awaiting: the queues
    /// of replaced records have room and no deletion of the key is under
    /// way.
    fn may_put_now(&self, key: &[u8]) -> bool {
        !(self.waiting.borrow().full() || self.deferred_full() || self.being_deleted(key))
    }

    /// The record indexed under `key`, pinned without awaiting: `None`
    /// when its window is not mapped.
    fn pin_current_now(&self, key: &[u8]) -> Option<segalloc::Result<Option<(Entry, PinGuard)>>> {
        let Some(e) = self.index.borrow().get(key).copied() else {
            return Some(Ok(None));
        };
        match self.shard.try_pin(e.handle) {
            Ok(Some(pin)) => Some(Ok(Some((e, pin)))),
            Ok(None) => None,
            Err(err) => Some(Err(err)),
        }
    }

    /// [`Store::put_now`] over `old`, the record indexed under the key now
    /// (pinned with no await since).
    fn put_now_over(
        &self,
        w: &Put<'_>,
        old: Option<(Entry, PinGuard)>,
    ) -> Option<segalloc::Result<bool>> {
        // Nothing awaits from here on: a condition that fails now fails in
        // `publish` too, so no allocation is made for it.
        let live_old = old.as_ref().map(|(e, _)| *e).filter(|e| !e.expired(w.now));
        if !w.cond.holds(live_old.map(|e| e.handle)) {
            return Some(Ok(false));
        }
        let total = (HEADER_BYTES + w.key.len() + w.value.len()) as u64;
        match self.shard.try_allocate(total) {
            Ok(Some(a)) => Some(self.publish(w, a.into_parts(), old)),
            // The awaiting path syncs to reuse freed space, and tries again.
            Ok(None) | Err(segalloc::Error::NoSpace { .. }) => None,
            Err(err) => Some(Err(err)),
        }
    }

    /// Seal the new record `(h, pin)` and index it if `w.cond` holds against
    /// `old` (the record indexed now), queueing `old` for retirement (see
    /// [`Store::retire_round`]); else free the new one. No
    /// await: the sequence number order is the index order.
    fn publish(
        &self,
        w: &Put<'_>,
        (h, pin): (Handle, PinGuard),
        old: Option<(Entry, PinGuard)>,
    ) -> segalloc::Result<bool> {
        let live_old = old.as_ref().map(|(e, _)| *e).filter(|e| !e.expired(w.now));
        if !w.cond.holds(live_old.map(|e| e.handle)) {
            drop(pin);
            self.shard.free(h)?;
            return Ok(false);
        }
        let expire_at_ms = match w.ttl {
            Ttl::Clear => 0,
            Ttl::At(t) => t,
            Ttl::Keep => live_old.map_or(0, |e| e.expire_at_ms),
        };
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        {
            let mut buf = self.record_buf.borrow_mut();
            encode_record(&mut buf, seq, expire_at_ms, w.key, w.value);
            // One copy; a crash in the middle leaves a record whose
            // checksum fails, freed on recovery (and never acknowledged).
            pin.write_at(0, &buf)?;
        }
        drop(pin);
        let always = self.sync.policy == SyncPolicy::Always;
        let entry = Entry {
            handle: h,
            expire_at_ms,
            delete_after: if !always && old.is_some() { seq } else { 0 },
        };
        let mut index = self.index.borrow_mut();
        match index.get_mut(w.key) {
            Some(slot) => *slot = entry,
            None => {
                index.insert(w.key.into(), entry);
            }
        }
        if let Ttl::At(t) = w.ttl {
            let mut heap = self.expiring.borrow_mut();
            heap.push(Reverse((t, w.key.into())));
            // Stale entries stay bounded by the number of keys.
            if heap.len() > 2 * index.len() + 1024 {
                *heap = expiry_heap(&index);
            }
        }
        drop(index);
        self.wrote();
        if let Some((old, old_pin)) = old {
            // Retired (under `always`) or freed (else) once a sync covered
            // this write: see [`Store::retire_round`].
            let ready_at = self.sync.writes.get();
            if always {
                drop(old_pin);
                let k = self.key_hash(w.key);
                if self.waiting.borrow_mut().push(k, old.handle, ready_at) {
                    self.retire_kick.notify_one();
                }
            } else if mark_superseded(&old_pin, seq)? {
                drop(old_pin);
                self.deferred.borrow_mut().push_back((old.handle, ready_at));
                self.deferred_bytes
                    .set(self.deferred_bytes.get() + u64::from(old.handle.len()));
            } else {
                // A record of the previous layout has no room for the mark:
                // it waits for a round, as under `always`.
                drop(old_pin);
                let k = self.key_hash(w.key);
                if self.waiting.borrow_mut().push(k, old.handle, ready_at) {
                    self.retire_kick.notify_one();
                }
            }
        }
        Ok(true)
    }

    async fn set(&self, w: &Put<'_>, out: &mut Vec<u8>) -> segalloc::Result<()> {
        if self.put(w).await? {
            resp::ok(out);
        } else {
            resp::nil(out);
        }
        Ok(())
    }

    async fn del(&self, key: &[u8], now: u64) -> segalloc::Result<i64> {
        let Some((e, pin)) = self.pin_for_delete(key).await? else {
            return Ok(0);
        };
        self.remove(key, e, pin)?;
        Ok(!e.expired(now) as i64)
    }

    /// Delete `key`, whose indexed record `e` is pinned by `pin` (from
    /// [`Store::pin_for_delete`], with no await since).
    fn remove(&self, key: &[u8], e: Entry, pin: PinGuard) -> segalloc::Result<()> {
        {
            let mut index = self.index.borrow_mut();
            index.remove(key);
            shrink_if_sparse(&mut index);
        }
        retire(&self.shard, e.handle, pin)?;
        self.wrote();
        Ok(())
    }

    /// What an `INCR` family command writes over `old`, the record indexed
    /// under `key` (pinned): the live record it replaces, if any, the new
    /// value and its digits. `None` once an error reply is written (a
    /// damaged record, a value that is not an integer, an overflow).
    fn incremented(
        &self,
        key: &[u8],
        old: Option<&(Entry, PinGuard)>,
        delta: i64,
        now: u64,
        out: &mut Vec<u8>,
    ) -> Option<(Option<Handle>, i64, Vec<u8>)> {
        let (current, n) = match old {
            Some((e, pin)) if !e.expired(now) => {
                let mut buf = self.record_buf.borrow_mut();
                let v = match load_value(pin, key, &mut buf) {
                    Ok(v) => v,
                    Err(why) => {
                        resp::error(out, &format!("ERR record {} is damaged: {why}", e.handle));
                        return None;
                    }
                };
                let Some(n) = resp::parse_i64(v) else {
                    resp::error(out, "ERR value is not an integer or out of range");
                    return None;
                };
                (Some(e.handle), n)
            }
            _ => (None, 0),
        };
        let Some(next) = n.checked_add(delta) else {
            resp::error(out, "ERR increment or decrement would overflow");
            return None;
        };
        let mut digits = Vec::with_capacity(20);
        resp::decimal(&mut digits, next);
        Some((current, next, digits))
    }

    async fn incr(
        &self,
        key: &[u8],
        delta: i64,
        now: u64,
        out: &mut Vec<u8>,
    ) -> segalloc::Result<()> {
        loop {
            let old = self.pin_current(key).await?;
            let Some((current, next, digits)) =
                self.incremented(key, old.as_ref(), delta, now, out)
            else {
                return Ok(());
            };
            drop(old);
            if self
                .put(&Put {
                    key,
                    value: &digits,
                    cond: Cond::Is(current),
                    ttl: Ttl::Keep,
                    now,
                })
                .await?
            {
                resp::int(out, next);
                return Ok(());
            }
        }
    }

    /// FLUSHDB. Other commands on this shard wait until it ends (as
    /// Redis's FLUSHDB blocks the server): a key written and deleted while
    /// it awaits would otherwise not know of the flushed record under it,
    /// which a crash would bring back. The flushed keys' older records are
    /// retired durably first (see [`Store::pin_for_delete`]), then their
    /// current ones.
    async fn flush(&self) -> segalloc::Result<()> {
        let _gate = FlushGate::close(self);
        let (all, keys) = {
            let mut index = self.index.borrow_mut();
            // The same hasher: waiting records stay filed under their keys.
            let hasher = index.hasher().clone();
            let all: Vec<(Box<[u8]>, Entry)> =
                std::mem::replace(&mut *index, IndexMap::with_hasher(hasher.clone()))
                    .into_iter()
                    .collect();
            let keys: Vec<u64> = all.iter().map(|(k, _)| hasher.hash_one(&k[..])).collect();
            (all, keys)
        };
        self.expiring.borrow_mut().clear();
        if let Err(e) = self.retire_older(&keys).await {
            self.restore(all);
            return Err(e);
        }
        let after = all.iter().map(|(_, e)| e.delete_after).max().unwrap_or(0);
        if let Err(e) = self.durable_seq_reaches(after).await {
            self.restore(all);
            return Err(e);
        }
        let mut all = all.into_iter();
        while let Some((key, e)) = all.next() {
            let r = match pin_of(&self.shard, e.handle).await {
                Ok(pin) => retire(&self.shard, e.handle, pin),
                Err(err) => Err(err),
            };
            if let Err(err) = r {
                self.restore(std::iter::once((key, e)).chain(all).collect());
                self.wrote();
                return Err(err);
            }
        }
        self.wrote();
        Ok(())
    }

    /// Retire every waiting record of the key hashes `keys`, and return
    /// once no round holding one is under way (asking for the sync that
    /// ends them).
    async fn retire_older(&self, keys: &[u64]) -> segalloc::Result<()> {
        loop {
            // A record is retired only once its replacement is durable, even
            // for a deletion: the key may be overwritten while the deletion
            // waits, and then it does not delete.
            let ready_at = {
                let waiting = self.waiting.borrow();
                keys.iter().filter_map(|&k| waiting.ready_at(k)).max()
            };
            if ready_at.is_some_and(|t| t > self.sync.synced.get()) {
                self.sync_now().await?;
                continue;
            }
            let list: Vec<Keyed> = {
                let mut waiting = self.waiting.borrow_mut();
                keys.iter().flat_map(|&k| waiting.take_key(k)).collect()
            };
            if !list.is_empty() {
                self.retire_round(list).await?;
                continue;
            }
            let ended = self.retired.notified();
            let held = {
                let rounds = self.rounds.borrow();
                keys.iter().any(|&k| rounds.holds(k))
            };
            if !held {
                return Ok(());
            }
            if self.sync.synced.get() < self.sync.writes.get() {
                self.sync_now().await?;
            } else {
                ended.await;
            }
        }
    }

    /// Put back keys a failed FLUSHDB took out of the index and did not
    /// retire (their records are intact). A key written since keeps its
    /// new record; the old one waits for retirement.
    fn restore(&self, keys: Vec<(Box<[u8]>, Entry)>) {
        let mut index = self.index.borrow_mut();
        let mut expiring = self.expiring.borrow_mut();
        let mut waiting = self.waiting.borrow_mut();
        for (key, e) in keys {
            if index.contains_key(&key) {
                let k = index.hasher().hash_one(&key[..]);
                waiting.push(k, e.handle, self.sync.writes.get());
                continue;
            }
            if e.expire_at_ms != 0 {
                expiring.push(Reverse((e.expire_at_ms, key.clone())));
            }
            index.insert(key, e);
        }
    }

    /// This shard's figures, as an array of integers in [`InfoField`] order.
    fn info(&self, now: u64, out: &mut Vec<u8>) {
        let st = self.shard.stats();
        let index = self.index.borrow();
        let expires = index.values().filter(|e| e.expire_at_ms != 0).count();
        let s = &self.sync;
        let fields = [
            index.len() as i64,
            expires as i64,
            st.alloc.live_bytes as i64,
            st.alloc.reserved_bytes as i64,
            st.alloc.metadata_bytes as i64,
            st.files.open as i64,
            st.mappings.mapped_windows as i64,
            st.alloc.data_files as i64,
            s.last_sync_unix_ms.get() as i64,
            s.syncs.get() as i64,
            s.failures.get() as i64,
            s.writes.get().saturating_sub(s.synced.get()) as i64,
            (st.io_backend == segalloc::IoBackend::Uring) as i64,
            now as i64,
            (self.waiting.borrow().len() + self.deferred.borrow().len() + self.retiring.get())
                as i64,
            self.retiring.get() as i64,
        ];
        resp::array_len(out, fields.len());
        for f in fields {
            resp::int(out, f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of the current layout and one of the previous layout
    /// (written by an earlier version of this server) both check, and the
    /// *superseded by* field stays out of the checksum.
    #[test]
    fn both_record_layouts_check() {
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, 0, b"key", b"value");
        let layout = check_header(&buf, 64).unwrap();
        assert_eq!(
            (layout.header, layout.key_len, layout.value_len),
            (40, 3, 5)
        );
        assert_eq!(record_crc(&buf, layout.header), u32_at(&buf, OFF_CRC));
        assert_eq!(u64_at(&buf, layout.header - 16), 7, "the sequence number");
        buf[OFF_SUPERSEDED..OFF_SUPERSEDED + 8].copy_from_slice(&9u64.to_le_bytes());
        assert_eq!(record_crc(&buf, layout.header), u32_at(&buf, OFF_CRC));
        buf[HEADER_BYTES] ^= 1;
        assert_ne!(record_crc(&buf, layout.header), u32_at(&buf, OFF_CRC));

        // The previous layout: a 32-byte header, the checksum over 0..12
        // and 16.., written here as that version wrote it.
        let mut old = Vec::new();
        old.extend_from_slice(b"KVR2");
        old.extend_from_slice(&3u32.to_le_bytes());
        old.extend_from_slice(&5u32.to_le_bytes());
        old.extend_from_slice(&[0; 4]);
        old.extend_from_slice(&7u64.to_le_bytes());
        old.extend_from_slice(&0u64.to_le_bytes());
        old.extend_from_slice(b"keyvalue");
        let crc = crc32c::crc32c(&old[..OFF_CRC]);
        let crc = crc32c::crc32c_append(crc, &old[16..]);
        old[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let layout = check_header(&old, 64).unwrap();
        assert_eq!(
            (layout.header, layout.key_len, layout.value_len),
            (32, 3, 5)
        );
        assert_eq!(record_crc(&old, layout.header), crc);
        assert_eq!(u64_at(&old, layout.header - 16), 7, "the sequence number");
        assert_eq!(&old[layout.header..layout.header + 3], b"key");
    }
}
