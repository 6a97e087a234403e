mod common;
use segalloc::proc;
#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    common::run(async {
        let (files, mm) = common::manager(dir.path(), 4, 4);
        let f = files.register(dir.path().join("a"));
        let p = mm.pin(f, 0, 4096, true).await.unwrap();
        p.write_at(0, b"hi").unwrap();
        eprintln!(
            "backend {:?} ring {:?} fds {} vmas {} files {:?} mm {:?}",
            files.ring().backend(),
            files.ring().stats(),
            proc::open_fds_under(dir.path()),
            proc::vmas_under(dir.path()),
            files.stats(),
            mm.stats()
        );
    });
}
