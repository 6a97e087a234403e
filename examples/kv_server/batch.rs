//! A batch of key operations for one shard, and the replies it produced.
//! A connection builds one per shard from each pipelined read, sends the
//! others' batches to their owners in one message each, and gets them back
//! with the replies filled in; the buffers are reused for the next read.

use std::ops::Range;

use segalloc::Handle;

/// When a `SET` may publish its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cond {
    /// Always.
    Always,
    /// Only if the key is absent (`NX`).
    Nx,
    /// Only if the key is present (`XX`).
    Xx,
    /// Only if the key still maps to this record (read-modify-write).
    Is(Option<Handle>),
}

impl Cond {
    pub fn holds(self, current: Option<Handle>) -> bool {
        match self {
            Cond::Always => true,
            Cond::Nx => current.is_none(),
            Cond::Xx => current.is_some(),
            Cond::Is(h) => h == current,
        }
    }
}

/// The expiry a `SET` gives its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ttl {
    /// No expiry.
    Clear,
    /// Expires at this Unix time in milliseconds.
    At(u64),
    /// Keeps the replaced record's expiry.
    Keep,
}

#[derive(Clone, Copy, Debug)]
pub enum OpKind {
    Get,
    Set { cond: Cond, ttl: Ttl },
    Del,
    Exists,
    IncrBy(i64),
    DbSize,
    Flush,
    Save,
    Info,
}

impl OpKind {
    pub fn is_write(self) -> bool {
        matches!(
            self,
            OpKind::Set { .. } | OpKind::Del | OpKind::IncrBy(_) | OpKind::Flush
        )
    }
}

/// One operation; `key` and `value` index the batch's arena.
#[derive(Clone, Debug)]
pub struct OpDesc {
    pub kind: OpKind,
    pub key: Range<usize>,
    pub value: Range<usize>,
}

/// Replies, one after another, with where each ends.
#[derive(Default)]
pub struct Out {
    pub buf: Vec<u8>,
    ends: Vec<usize>,
}

/// Bytes a buffer of a connection keeps while the connection is idle (see
/// [`Batch::trim`]).
pub const IDLE_KEEP_BYTES: usize = 256 << 10;

/// Give back what `v` holds beyond [`IDLE_KEEP_BYTES`] (its elements are
/// cleared: only its capacity goes).
pub fn trim<T>(v: &mut Vec<T>) {
    let keep = IDLE_KEEP_BYTES / std::mem::size_of::<T>().max(1);
    if v.capacity() > keep {
        v.shrink_to(keep);
    }
}

impl Out {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.ends.clear();
    }

    /// See [`Batch::trim`].
    pub fn trim(&mut self) {
        trim(&mut self.buf);
        trim(&mut self.ends);
    }

    /// Replies so far.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Close the reply written since the last `end`.
    pub fn end(&mut self) {
        self.ends.push(self.buf.len());
    }

    pub fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }

    /// Replace the replies of the ops matching `pick` by `reply`.
    pub fn replace_where(&mut self, ops: &[OpDesc], pick: impl Fn(&OpDesc) -> bool, reply: &[u8]) {
        let mut next = Out::default();
        for (i, op) in ops.iter().enumerate() {
            let r = if pick(op) { reply } else { self.get(i) };
            next.buf.extend_from_slice(r);
            next.end();
        }
        *self = next;
    }
}

/// The operations for one shard and their replies.
#[derive(Default)]
pub struct Batch {
    pub arena: Vec<u8>,
    pub ops: Vec<OpDesc>,
    pub out: Out,
}

impl Batch {
    pub fn clear(&mut self) {
        self.arena.clear();
        self.ops.clear();
        self.out.clear();
    }

    /// Give back what a large batch needed, when its connection goes idle
    /// (cleared buffers keep their capacity: a connection that once ran an
    /// `MGET` of 64 MiB of values kept 64 MiB for as long as it stayed
    /// open, 140 MiB after an `MGET` of 65,534 keys).
    pub fn trim(&mut self) {
        trim(&mut self.arena);
        trim(&mut self.ops);
        self.out.trim();
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Add an operation; returns its index.
    pub fn push(&mut self, kind: OpKind, key: &[u8], value: &[u8]) -> usize {
        let k = self.arena.len();
        self.arena.extend_from_slice(key);
        let v = self.arena.len();
        self.arena.extend_from_slice(value);
        self.ops.push(OpDesc {
            kind,
            key: k..v,
            value: v..self.arena.len(),
        });
        self.ops.len() - 1
    }
}
