//! The mark an example program leaves on each shard of a data directory it
//! writes: a root `<program>.owner` naming a 16-byte allocation (magic
//! `SGOW`, 4 zero bytes, then the first 8 bytes of the program's name).
//!
//! Programs that read every live allocation as their own records (the
//! demo frees what it finds unsealed, the kv_server what is not one of its
//! records) would otherwise take another program's allocations for torn
//! records of their own and free them. So a program refuses a shard that
//! holds a root outside its own namespace (`<program>.…`): that shard
//! belongs to another program. A directory of a program that sets no root
//! at all cannot be told apart, and is taken.
//!
//! The mark needs no sync of its own: it is durable with the program's
//! first sync. A crash before that leaves no root (the mark is made again
//! at the next open), or a root whose allocation was lost (dropped and made
//! again), or an allocation without its root (a torn record to the program,
//! freed as such). A root that names a live allocation without the mark's
//! bytes (its slot was lost and taken again) is dropped and the mark made
//! again; that allocation is left as it is. A program that keeps roots of
//! its own drops those that dangle before it claims: the new mark may take
//! the slot such a root names.

#![allow(dead_code)]

use segalloc::{Handle, Shard};

const MAGIC: u32 = u32::from_le_bytes(*b"SGOW");
const BYTES: u64 = 16;

/// The root that marks a shard as `program`'s.
pub fn root_name(program: &str) -> String {
    format!("{program}.owner")
}

/// Why `program` refuses `shard`, if a root of another program is on it.
pub fn foreign_root(shard: &Shard, program: &str) -> Option<String> {
    let ns = format!("{program}.");
    let (name, _) = shard
        .roots()
        .into_iter()
        .find(|(name, _)| !name.starts_with(&ns))?;
    Some(format!(
        "shard {} holds the root `{name}`, which {program} does not make: this data \
         directory belongs to another program, whose allocations {program} would \
         take for its own; use another directory",
        shard.index()
    ))
}

/// Why `program` refuses the closed data directory `dir`, if a shard of
/// it holds a root of another program: read offline, before `--fresh`
/// deletes it (the data of another program is not the demo's to delete).
/// `None` when it holds none, or cannot be read (the deletion then says
/// why, if it refuses).
pub fn foreign_root_in(dir: &std::path::Path, program: &str) -> Option<String> {
    let ns = format!("{program}.");
    let report = segalloc::inspect::read_dir(dir).ok()?;
    report.shards.iter().find_map(|s| {
        let r = s.roots.iter().find(|r| !r.name.starts_with(&ns))?;
        Some(format!(
            "shard {} holds the root `{}`, which {program} does not make: this data \
             directory belongs to another program; use another directory, or delete it \
             yourself",
            s.index, r.name
        ))
    })
}

/// Mark `shard` as `program`'s (once; a mark whose allocation is gone is
/// made again) and return the mark's handle, which is not a record. Refuses
/// a shard of another program ([`foreign_root`]) with
/// `Error::InvalidConfig` (the directory given is the wrong one); nothing
/// is changed then. The library's errors (a full disk, say) come back as
/// they are.
pub async fn claim(shard: &Shard, program: &str) -> segalloc::Result<Handle> {
    if let Some(why) = foreign_root(shard, program) {
        return Err(segalloc::Error::InvalidConfig(why));
    }
    let name = root_name(program);
    let mut b = [0u8; BYTES as usize];
    b[..4].copy_from_slice(&MAGIC.to_le_bytes());
    let tag = program.as_bytes();
    let n = tag.len().min(8);
    b[8..8 + n].copy_from_slice(&tag[..n]);
    if let Some(h) = shard.root(&name) {
        if shard.allocator().is_live(&h) && h.len() as u64 >= BYTES {
            let pin = shard.pin(h).await?;
            let mut found = [0u8; BYTES as usize];
            pin.read_at(0, &mut found)?;
            if found == b {
                return Ok(h);
            }
        }
        // Lost with an unsynced allocation, or its slot since taken for
        // something else: made again below.
        shard.remove_root(&name)?;
    }
    let a = shard.allocate(BYTES).await?;
    a.write_at(0, &b)?;
    let (h, pin) = a.into_parts();
    drop(pin);
    shard.set_root(&name, h)?;
    Ok(h)
}

/// Where a program's shards agree, once open and before any of them frees
/// or writes anything, that the directory is the program's: a refusal on
/// any shard ([`foreign_root`], or a failed open) stops them all. Each
/// shard's thread passes once, blocking until every shard has.
pub struct Gate {
    shards: usize,
    /// Shards that said, and the first refusal.
    state: std::sync::Mutex<(usize, Option<String>)>,
    all_said: std::sync::Condvar,
}

impl Gate {
    pub fn new(shards: usize) -> Gate {
        Gate {
            shards,
            state: std::sync::Mutex::new((0, None)),
            all_said: std::sync::Condvar::new(),
        }
    }

    /// Say why this shard refuses the directory (`None`: it does not), wait
    /// for every shard to say, and return the first refusal, if any. Each
    /// shard's thread must say once, also when it panics first (the
    /// kv_server's `StartReport`), or the others wait forever.
    pub fn pass(&self, why: Option<String>) -> Option<String> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.0 += 1;
        if let Some(why) = why {
            st.1.get_or_insert(why);
        }
        self.all_said.notify_all();
        let st = self
            .all_said
            .wait_while(st, |st| st.0 < self.shards)
            .unwrap_or_else(|p| p.into_inner());
        st.1.clone()
    }
}
