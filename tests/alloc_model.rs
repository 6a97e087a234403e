//! Model-based test of the allocator through the public API: random
//! sequences of allocate / write / free / sync / reopen / set_root /
//! remove_root, checked after every step against a plain in-memory model.
//!
//! Checked: no two live slots overlap, `live()` equals the model exactly
//! (no crash here, so no in-flight extras), the live count and stats agree,
//! every live slot keeps its contents across reopens, roots equal the model.
//!
//! `SEGALLOC_MODEL_CASES` overrides the number of cases (default 64).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};

use common::{assert_no_overlap, check_pattern, open_shard, run, small_cfg, write_pattern};
use proptest::prelude::*;
use segalloc::config::MIB;
use segalloc::{Error, Handle, Shard};

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: u64, seed: u64 },
    Rewrite { pick: usize, seed: u64 },
    Free { pick: usize },
    Sync,
    Reopen,
    SetRoot { name: u8, pick: usize },
    RemoveRoot { name: u8 },
}

fn size_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        60 => 1u64..=256,
        30 => 1u64..=70_000,
        1 => 70_001u64..=16 * MIB,
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        40 => (size_strategy(), any::<u64>()).prop_map(|(size, seed)| Op::Alloc { size, seed }),
        8 => (any::<usize>(), any::<u64>()).prop_map(|(pick, seed)| Op::Rewrite { pick, seed }),
        30 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        3 => Just(Op::Sync),
        3 => Just(Op::Reopen),
        5 => (0u8..8, any::<usize>()).prop_map(|(name, pick)| Op::SetRoot { name, pick }),
        3 => (0u8..8).prop_map(|name| Op::RemoveRoot { name }),
    ]
}

/// The model: live handle → (requested size, pattern seed), and roots.
#[derive(Default)]
struct Model {
    live: BTreeMap<Handle, (u64, u64)>,
    roots: HashMap<String, Handle>,
}

impl Model {
    fn nth(&self, pick: usize) -> Option<Handle> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(pick % self.live.len()).copied()
    }
}

fn root_name(n: u8) -> String {
    format!("root-{n}")
}

/// Everything that must hold after each step.
fn check_state(shard: &Shard, model: &Model) {
    let live: Vec<Handle> = shard.live().collect();
    let set: HashSet<Handle> = live.iter().copied().collect();
    assert_eq!(set.len(), live.len(), "live() yields a handle twice");
    let want: HashSet<Handle> = model.live.keys().copied().collect();
    assert_eq!(set, want, "live() differs from the model");
    assert_eq!(shard.live_count(), model.live.len() as u64);
    let st = shard.stats().alloc;
    assert_eq!(st.allocations_live, model.live.len() as u64);
    assert_eq!(
        st.live_bytes,
        model.live.keys().map(|h| h.len() as u64).sum::<u64>()
    );
    #[allow(deprecated)]
    let former = (st.bytes_live, st.bytes_allocated, st.bytes_reserved);
    let current = (st.live_bytes, st.allocated_bytes, st.reserved_bytes);
    assert_eq!(
        former, current,
        "the former stat names report the same figures"
    );
    assert_no_overlap(live.iter().copied());
    let mut roots: Vec<(String, Handle)> =
        model.roots.iter().map(|(n, h)| (n.clone(), *h)).collect();
    roots.sort();
    assert_eq!(shard.roots(), roots, "roots differ from the model");
    for (n, h) in &model.roots {
        assert_eq!(shard.root(n), Some(*h));
    }
}

async fn check_contents(shard: &Shard, model: &Model) {
    for (h, &(size, seed)) in &model.live {
        let pin = shard.pin(*h).await.expect("pin a live handle");
        assert!(pin.len() as u64 >= size);
        assert!(
            check_pattern(&pin, size as usize, seed),
            "contents of {h} (size {size}) changed"
        );
    }
}

fn run_case(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&dir.path().join("d"));
    run(async {
        let mut shard = open_shard(&cfg).await.unwrap();
        let mut model = Model::default();
        for op in ops {
            match op {
                Op::Alloc { size, seed } => {
                    let a = shard.allocate(size).await.unwrap();
                    let h = a.handle();
                    assert!(h.len() as u64 >= size && a.len() == h.len() as usize);
                    assert_eq!(h.shard(), 0);
                    assert!(!model.live.contains_key(&h), "{h} handed out while live");
                    write_pattern(a.pin(), size as usize, seed);
                    model.live.insert(h, (size, seed));
                }
                Op::Rewrite { pick, seed } => {
                    let Some(h) = model.nth(pick) else { continue };
                    let size = model.live[&h].0;
                    let pin = shard.pin(h).await.unwrap();
                    write_pattern(&pin, size as usize, seed);
                    model.live.insert(h, (size, seed));
                }
                Op::Free { pick } => {
                    let Some(h) = model.nth(pick) else { continue };
                    shard.free(h).unwrap();
                    model.live.remove(&h);
                    assert!(!shard.allocator().is_live(&h));
                    // A second free is refused: DoubleFree, or NotAllocated
                    // when the first one emptied and released the segment.
                    assert!(matches!(
                        shard.free(h),
                        Err(Error::DoubleFree { .. } | Error::NotAllocated { .. })
                    ));
                }
                Op::Sync => shard.sync().await.unwrap(),
                Op::Reopen => {
                    drop(shard);
                    shard = open_shard(&cfg).await.unwrap();
                    check_state(&shard, &model);
                    check_contents(&shard, &model).await;
                }
                Op::SetRoot { name, pick } => {
                    let Some(h) = model.nth(pick) else { continue };
                    shard.set_root(&root_name(name), h).unwrap();
                    model.roots.insert(root_name(name), h);
                }
                Op::RemoveRoot { name } => {
                    let got = shard.remove_root(&root_name(name)).unwrap();
                    assert_eq!(got, model.roots.remove(&root_name(name)));
                }
            }
            check_state(&shard, &model);
        }
        check_contents(&shard, &model).await;
        // A final clean reopen must give back exactly the model.
        drop(shard);
        let shard = open_shard(&cfg).await.unwrap();
        check_state(&shard, &model);
        check_contents(&shard, &model).await;
    });
}

fn cases() -> u32 {
    common::number_from_env("SEGALLOC_MODEL_CASES", 64)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn allocator_matches_model(ops in proptest::collection::vec(op_strategy(), 1..200)) {
        run_case(ops);
    }
}

/// A fixed, longer sequence that exercises segment release and reuse (many
/// allocations of a few classes, most freed, reopened in between).
#[test]
fn churn_release_and_reuse_matches_model() {
    let mut ops = Vec::new();
    for round in 0..6u64 {
        for i in 0..1500u64 {
            ops.push(Op::Alloc {
                size: [24, 100, 700, 5000][(i % 4) as usize],
                seed: round * 10_000 + i,
            });
        }
        for i in 0..1300usize {
            ops.push(Op::Free { pick: i * 7 });
        }
        if round % 2 == 0 {
            ops.push(Op::Sync);
        }
        ops.push(Op::SetRoot {
            name: (round % 3) as u8,
            pick: round as usize,
        });
        ops.push(Op::Reopen);
    }
    run_case(ops);
}
