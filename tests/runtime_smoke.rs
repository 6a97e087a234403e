use futures::executor::block_on;
use segalloc::config::MIB;
use segalloc::{Config, Runtime};

#[test]
fn runtime_cross_free() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::builder(dir.path().join("d"))
        .shards(2)
        .window_bytes(16 * MIB)
        .growth_step_bytes(MIB)
        .build()
        .unwrap();
    let rt = Runtime::start(cfg.clone()).unwrap();
    let hs = block_on(rt.spawn_on(0, |s| async move {
        let mut v = Vec::new();
        for i in 0..1000u32 {
            let a = s.allocate(100).await.unwrap();
            a.write_at(0, &i.to_le_bytes()).unwrap();
            v.push(a.into_handle());
        }
        v
    }))
    .unwrap();
    let hs2 = hs.clone();
    block_on(rt.spawn_on(1, move |s| async move {
        for h in &hs2[..500] {
            s.free(*h).unwrap();
        }
        let mut b = [0u8; 4];
        s.read(hs2[700], 0, &mut b).await.unwrap();
        assert_eq!(u32::from_le_bytes(b), 700);
    }))
    .unwrap();
    block_on(rt.sync()).unwrap();
    let st = block_on(rt.stats()).unwrap();
    eprintln!(
        "sent {} recv {} live {}",
        st.cross_frees_sent(),
        st.cross_frees_received(),
        st.allocations_live()
    );
    assert_eq!(st.allocations_live(), 500);
    rt.shutdown().unwrap();
    let rt = Runtime::start(cfg).unwrap();
    let n = block_on(rt.spawn_on(0, |s| async move { s.live_count() })).unwrap();
    assert_eq!(n, 500);
}
