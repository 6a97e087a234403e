mod common;
use segalloc::config::MIB;
use segalloc::{Config, DataDir, Shard};
use std::sync::Arc;

#[test]
fn allocate_reopen_verify() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path().join("d"))
        .shards(1)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let mut handles = Vec::new();
    common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        let shard = Shard::open(dd, &cfg, 0).await.unwrap();
        for i in 0..20000u64 {
            let size = 16 + (i * 37) % 2000;
            let a = shard.allocate(size).await.unwrap();
            a.write_at(0, &i.to_le_bytes()).unwrap();
            handles.push(a.into_handle());
        }
        for h in handles.iter().step_by(3) {
            shard.free(*h).unwrap();
        }
        shard.set_root("r", handles[1]).unwrap();
        shard.sync().await.unwrap();
        eprintln!("{:#?}", shard.stats());
    });
    common::run(async {
        let t = std::time::Instant::now();
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        let shard = Shard::open(dd, &cfg, 0).await.unwrap();
        eprintln!("reopen {:?}", t.elapsed());
        let live: std::collections::HashSet<_> = shard.live().collect();
        let expect: std::collections::HashSet<_> = handles
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, h)| *h)
            .collect();
        assert_eq!(live, expect);
        for (i, h) in handles.iter().enumerate() {
            if i % 3 == 0 {
                assert!(shard.pin(*h).await.is_err());
                continue;
            }
            let p = shard.pin(*h).await.unwrap();
            let mut b = [0u8; 8];
            p.read_at(0, &mut b).unwrap();
            assert_eq!(u64::from_le_bytes(b), i as u64);
        }
        assert_eq!(shard.root("r"), Some(handles[1]));
    });
}
