//! The data directory: its locks (directory and shards, in this process and
//! across processes), `DataDir::destroy`, path resolution and the errors a
//! first-day user meets.

mod common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use common::small_cfg;
use segalloc::config::MIB;
use segalloc::{Config, DataDir, Error, SegmentAllocator, Shard};

/// Fork a child that keeps a copy of every descriptor of this process (even
/// close-on-exec ones) for `hold` before it execs `true`. Returns once the
/// child has forked; join the handle to reap it.
fn fork_child_holding_fds(hold: Duration) -> std::thread::JoinHandle<()> {
    let (mut forked_rx, forked_tx) = std::io::pipe().expect("pipe");
    let tx = forked_tx.as_raw_fd();
    let t = std::thread::spawn(move || {
        let mut cmd = Command::new("true");
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (write, nanosleep).
        unsafe {
            cmd.pre_exec(move || {
                nix::libc::write(tx, b"x".as_ptr().cast(), 1);
                let ts = nix::libc::timespec {
                    tv_sec: hold.as_secs() as nix::libc::time_t,
                    tv_nsec: hold.subsec_nanos() as nix::libc::c_long,
                };
                nix::libc::nanosleep(&ts, std::ptr::null_mut());
                Ok(())
            });
        }
        let status = cmd.status().expect("spawn true");
        drop(forked_tx);
        assert!(status.success());
    });
    let mut b = [0u8; 1];
    forked_rx.read_exact(&mut b).expect("child forked");
    t
}

#[test]
fn a_closed_directory_is_free_while_a_forked_child_has_not_exec_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&tmp.path().join("d"));
    let dd = DataDir::open(&cfg).expect("open");
    let child = fork_child_holding_fds(Duration::from_secs(2));
    drop(dd);
    // The child still has a copy of the lock's descriptor: closing ours must
    // release the lock anyway, at once.
    let (_, locked_elsewhere) = DataDir::open_read_only(cfg.dir()).expect("probe");
    assert!(!locked_elsewhere, "a closed directory looks open elsewhere");
    let again = DataDir::open(&cfg);
    assert!(again.is_ok(), "reopen after close: {again:?}");
    drop(again);
    child.join().unwrap();
}

/// Descriptors of this process that are not in `before` or that name a
/// file under `dir`, with their flags and targets. (By number alone, one
/// that another test's thread closed and this one reused would be missed.)
fn new_fds(before: &[(u32, u64)], dir: &Path) -> Vec<(u32, u64, String)> {
    fds_with_flags()
        .into_iter()
        .map(|(fd, flags)| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap_or_default();
            (fd, flags, target)
        })
        .filter(|(fd, _, target)| !before.iter().any(|(b, _)| b == fd) || target.starts_with(dir))
        .map(|(fd, flags, target)| (fd, flags, target.display().to_string()))
        .collect()
}

fn fds_with_flags() -> Vec<(u32, u64)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let Ok(fd) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(info) = std::fs::read_to_string(e.path()) else {
            continue; // the read_dir's own descriptor, closed meanwhile
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u64::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        v.push((fd, flags));
    }
    v
}

#[test]
fn every_descriptor_segalloc_opens_is_close_on_exec() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&tmp.path().join("d"));
    let before = fds_with_flags();
    common::run(async {
        let dd = std::sync::Arc::new(DataDir::open(&cfg).unwrap());
        let shard = segalloc::Shard::open(dd, &cfg, 0).await.unwrap();
        let a = shard.allocate(100).await.unwrap();
        a.write_at(0, b"x").unwrap();
        shard.sync().await.unwrap();
        let (_ro, _) = DataDir::open_read_only(cfg.dir()).unwrap();
        let opened = new_fds(&before, &std::fs::canonicalize(cfg.dir()).unwrap());
        assert!(
            opened.iter().any(|(_, _, t)| t.ends_with("LOCK")),
            "{opened:?}"
        );
        for (fd, flags, target) in &opened {
            assert_ne!(
                flags & nix::libc::O_CLOEXEC as u64,
                0,
                "fd {fd} ({target}) is inherited across exec"
            );
        }
    });
}

// ---------------------------------------------------------------------------
// One writable open per shard.
// ---------------------------------------------------------------------------

/// Open shard 0 through a read-only view of the directory and a writable
/// registry of our own: the path that bypasses the directory's lock.
async fn open_allocator_behind_the_lock(cfg: &Config) -> segalloc::Result<SegmentAllocator> {
    let (ro, _) = DataDir::open_read_only(cfg.dir())?;
    let (_, mm) = common::manager_with(cfg);
    SegmentAllocator::open(0, &ro.shard_dir(0), *ro.manifest(), Rc::new(mm)).await
}

fn expect_shard_open(r: segalloc::Result<impl Sized>, cfg: &Config, what: &str) {
    match r {
        Err(e @ Error::ShardAlreadyOpen { .. }) => {
            let Error::ShardAlreadyOpen { shard, ref path } = e else {
                unreachable!()
            };
            assert_eq!(shard, 0, "{what}");
            assert_eq!(path, &cfg.dir().join("shard-000"), "{what}");
            let msg = e.to_string();
            assert!(
                msg.contains("shard 0") && msg.contains("shard-000"),
                "{msg}"
            );
        }
        Err(e) => panic!("{what}: {e:?}"),
        Ok(_) => panic!("{what}: the shard was opened a second time"),
    }
}

#[test]
fn a_shard_is_opened_for_writing_once_in_a_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&tmp.path().join("d"));
    common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        let first = Shard::open(dd.clone(), &cfg, 0).await.unwrap();
        let h = first.allocate(16).await.unwrap().into_handle();
        expect_shard_open(Shard::open(dd.clone(), &cfg, 0).await, &cfg, "Shard::open");
        expect_shard_open(
            open_allocator_behind_the_lock(&cfg).await,
            &cfg,
            "SegmentAllocator::open with a read-only manifest",
        );
        // A read-only open of a shard a writer holds is refused too: its
        // safe reads would race the writer's writes.
        let (ro, _) = DataDir::open_read_only(cfg.dir()).unwrap();
        let ro = Arc::new(ro);
        let ro_cfg = common::builder(cfg.dir(), 8, 8)
            .read_only(true)
            .build()
            .unwrap();
        expect_shard_open(
            Shard::open(ro.clone(), &ro_cfg, 0).await,
            &cfg,
            "a read-only Shard::open beside a writer",
        );
        first.free(h).unwrap();
        first.sync().await.unwrap();
        // Closing the shard releases its lock: readers may share it, and
        // a writer waits until they are gone.
        drop(first);
        let viewer = Shard::open(ro.clone(), &ro_cfg, 0).await.unwrap();
        let viewer2 = Shard::open(ro, &ro_cfg, 0).await.unwrap();
        assert_eq!(viewer.live().count(), 0);
        expect_shard_open(
            Shard::open(dd.clone(), &cfg, 0).await,
            &cfg,
            "a writable Shard::open beside readers",
        );
        drop((viewer, viewer2));
        let again = Shard::open(dd, &cfg, 0).await.unwrap();
        assert_eq!(again.live().count(), 0);
    });
}

/// A read-only configuration opens an existing directory and creates or
/// writes nothing: a missing directory is `DirNotFound` (it made the
/// directory, then failed on a file inside), a missing shard folder is an
/// error naming it (it was made). Read-only runtimes share a directory; a
/// writer and a reader never do (`AlreadyOpen` either way round).
#[test]
fn a_read_only_configuration_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ro = |d: &Path| {
        common::builder(d, 8, 8)
            .shards(2)
            .read_only(true)
            .build()
            .unwrap()
    };
    let missing = tmp.path().join("missing");
    match segalloc::Runtime::start(ro(&missing)) {
        Err(Error::DirNotFound { path }) => assert_eq!(path, missing),
        other => panic!("a missing directory: {:?}", other.map(drop)),
    }
    assert!(!missing.exists());
    let d = tmp.path().join("d");
    let rw = common::builder(&d, 8, 8).shards(2).build().unwrap();
    let rt = segalloc::Runtime::start(rw.clone()).unwrap();
    let h = futures::executor::block_on(rt.spawn_on(1, |s| async move {
        let a = s.allocate(100).await?;
        a.write_at(0, b"kept")?;
        s.sync().await?;
        Ok::<_, Error>(a.handle())
    }))
    .unwrap()
    .unwrap();
    // A reader beside the writer, a writer beside a reader.
    assert!(matches!(
        segalloc::Runtime::start(ro(&d)),
        Err(Error::AlreadyOpen { .. })
    ));
    rt.shutdown().unwrap();
    let r1 = segalloc::Runtime::start(ro(&d)).unwrap();
    let r2 = segalloc::Runtime::start(ro(&d)).unwrap();
    assert!(matches!(
        segalloc::Runtime::start(rw.clone()),
        Err(Error::AlreadyOpen { .. })
    ));
    let read = futures::executor::block_on(r2.spawn_on(1, move |s| async move {
        let mut b = [0u8; 4];
        s.pin(h).await?.read_at(0, &mut b)?;
        Ok::<_, Error>(b)
    }))
    .unwrap()
    .unwrap();
    assert_eq!(&read, b"kept");
    r1.shutdown().unwrap();
    r2.shutdown().unwrap();
    // A shard folder gone: named, not made.
    std::fs::remove_dir_all(d.join("shard-000")).unwrap();
    let before = std::fs::read_dir(&d).unwrap().count();
    match segalloc::Runtime::start(ro(&d)) {
        Err(e) => assert!(e.to_string().contains("shard-000"), "{e}"),
        Ok(_) => panic!("a read-only start without shard 0's folder"),
    }
    assert!(!d.join("shard-000").exists());
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), before);
    // Without its lock file (a copy that left it out): said so, not made.
    std::fs::remove_file(d.join("LOCK")).unwrap();
    match segalloc::Runtime::start(ro(&d)) {
        Err(e) => assert!(
            e.to_string().contains("read-only open shares the lock"),
            "{e}"
        ),
        Ok(_) => panic!("a read-only start without LOCK"),
    }
    assert!(!d.join("LOCK").exists());
}

const CHILD_ENV: &str = "SEGALLOC_DATADIR_CHILD";

/// Child half of the cross-process tests: `SEGALLOC_DATADIR_CHILD=ROLE:DIR`.
#[test]
fn child_role() {
    let Ok(v) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (role, dir) = v.split_once(':').unwrap();
    let cfg = small_cfg(Path::new(dir));
    let answer = match role {
        "allocator" => common::run(async {
            match open_allocator_behind_the_lock(&cfg).await {
                Ok(_) => "opened".to_string(),
                Err(Error::ShardAlreadyOpen { shard, .. }) => format!("shard {shard} already open"),
                Err(e) => format!("error {e}"),
            }
        }),
        "destroy" => match DataDir::destroy(cfg.dir()) {
            Ok(()) => "destroyed".to_string(),
            Err(Error::AlreadyOpen { .. }) => "directory already open".to_string(),
            Err(e) => format!("error {e}"),
        },
        other => panic!("unknown role {other}"),
    };
    println!("child: {answer}");
}

fn in_child(role: &str, dir: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{role}:{}", dir.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split_once("child: ").map(|(_, a)| a))
        .unwrap_or_else(|| panic!("no answer from the child: {stdout}"))
        .to_string()
}

#[test]
fn a_shard_is_opened_for_writing_once_across_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&tmp.path().join("d"));
    common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        let shard = Shard::open(dd, &cfg, 0).await.unwrap();
        assert_eq!(in_child("allocator", cfg.dir()), "shard 0 already open");
        drop(shard);
    });
    assert_eq!(in_child("allocator", cfg.dir()), "opened");
}

// ---------------------------------------------------------------------------
// DataDir::destroy.
// ---------------------------------------------------------------------------

/// A closed data directory with a record in each of its 2 shards.
fn populated(dir: &Path) -> Config {
    let cfg = common::builder(dir, 16, 16).shards(2).build().unwrap();
    common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        for i in 0..2 {
            let s = Shard::open(dd.clone(), &cfg, i).await.unwrap();
            s.allocate(100).await.unwrap().write_at(0, b"kept").unwrap();
            s.sync().await.unwrap();
        }
    });
    cfg
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}

#[test]
fn destroy_removes_a_closed_data_directory_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = populated(&tmp.path().join("d"));
    std::fs::write(tmp.path().join("neighbour"), b"x").unwrap();
    DataDir::destroy(cfg.dir()).unwrap();
    assert!(!exists(cfg.dir()));
    assert!(exists(&tmp.path().join("neighbour")));
    // Missing: nothing to do. Empty: removed.
    DataDir::destroy(cfg.dir()).unwrap();
    std::fs::create_dir(cfg.dir()).unwrap();
    DataDir::destroy(cfg.dir()).unwrap();
    assert!(!exists(cfg.dir()));
}

/// A data directory is not made inside another (a folder of it, or deeper,
/// missing or made by hand): nothing is created, and the outer one can
/// still be deleted.
#[test]
fn a_data_directory_is_not_made_inside_another() {
    let tmp = tempfile::tempdir().unwrap();
    let outer = tmp.path().join("outer");
    let cfg = populated(&outer);
    for inner in [
        outer.join("sub"),
        outer.join("a/b"),
        outer.join("shard-000/x"),
    ] {
        let Err(e) = DataDir::open(&small_cfg(&inner)) else {
            panic!("{inner:?}: opened");
        };
        assert!(
            matches!(&e, segalloc::Error::InvalidConfig(m) if m.contains("inside the segalloc data directory")),
            "{inner:?}: {e}"
        );
        assert!(
            !exists(&inner) && !exists(&outer.join("a")),
            "{inner:?} made"
        );
    }
    // Made by hand, empty: refused too, and left as it was.
    std::fs::create_dir(outer.join("byhand")).unwrap();
    assert!(DataDir::open(&small_cfg(&outer.join("byhand"))).is_err());
    assert!(listing(&outer.join("byhand")).is_empty());
    std::fs::remove_dir(outer.join("byhand")).unwrap();
    // A file named MANIFEST that segalloc did not write is not a data
    // directory's: a data directory is made below it.
    let plain = tmp.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("MANIFEST"), b"a list of files\n").unwrap();
    drop(DataDir::open(&small_cfg(&plain.join("d"))).unwrap());
    // Beside it, fine; and the outer one is deleted whole.
    drop(DataDir::open(&small_cfg(&tmp.path().join("beside"))).unwrap());
    DataDir::destroy(cfg.dir()).unwrap();
    assert!(!exists(cfg.dir()));
}

/// `clear` deletes what `destroy` deletes and keeps the directory itself,
/// with its mode; a new data directory opens in it.
#[test]
fn clear_keeps_the_directory_and_its_mode() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2750)).unwrap();
    let cfg = populated(&dir);
    DataDir::clear(&dir).unwrap();
    assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o2750);
    let dd = DataDir::open(&cfg).unwrap();
    assert!(dd.was_created());
    drop(dd);
    // Missing: nothing to do. Not segalloc's: refused, untouched.
    DataDir::clear(tmp.path().join("missing")).unwrap();
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("f"), b"x").unwrap();
    assert!(matches!(
        DataDir::clear(&other),
        Err(segalloc::Error::NotDataDir { .. })
    ));
    assert!(exists(&other.join("f")));
}

#[test]
fn destroy_refuses_what_is_not_a_segalloc_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let photos = tmp.path().join("photos");
    std::fs::create_dir_all(photos.join("2024")).unwrap();
    std::fs::write(photos.join("cat.jpg"), b"meow").unwrap();
    match DataDir::destroy(&photos) {
        Err(Error::NotDataDir { path, .. }) => assert_eq!(path, photos),
        other => panic!("photos/: {other:?}"),
    }
    assert!(exists(&photos.join("cat.jpg")) && exists(&photos.join("2024")));
    assert!(
        !exists(&photos.join("LOCK")),
        "a refused destroy created LOCK"
    );
    match DataDir::destroy(photos.join("cat.jpg")) {
        Err(Error::NotADirectory { path, kind }) => {
            assert_eq!((path, kind), (photos.join("cat.jpg"), "a regular file"))
        }
        other => panic!("a file: {other:?}"),
    }
    // A data directory holding a file of the user's: nothing is deleted.
    let cfg = populated(&tmp.path().join("d"));
    for stray in [
        cfg.dir().join("notes.txt"),
        cfg.dir().join("shard-001").join("notes.txt"),
    ] {
        std::fs::write(&stray, b"mine").unwrap();
        match DataDir::destroy(cfg.dir()) {
            Err(Error::NotDataDir { path, .. }) => assert_eq!(path, stray),
            other => panic!("{stray:?}: {other:?}"),
        }
        assert!(exists(&cfg.dir().join("MANIFEST")));
        assert!(exists(&cfg.dir().join("shard-000").join("meta.seg")));
        std::fs::remove_file(&stray).unwrap();
    }
    DataDir::destroy(cfg.dir()).unwrap();
}

#[test]
fn destroy_refuses_a_directory_open_here_or_in_another_process() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = populated(&tmp.path().join("d"));
    let cfg = common::builder(cfg.dir(), 16, 16)
        .shards(2)
        .build()
        .unwrap();
    let dd = DataDir::open(&cfg).unwrap();
    match DataDir::destroy(cfg.dir()) {
        Err(Error::AlreadyOpen { path }) => assert_eq!(path, cfg.dir()),
        other => panic!("open here: {other:?}"),
    }
    assert_eq!(in_child("destroy", cfg.dir()), "directory already open");
    drop(dd);
    // A shard opened behind the directory's lock is refused as well.
    common::run(async {
        let a = open_allocator_behind_the_lock(&cfg).await.unwrap();
        match DataDir::destroy(cfg.dir()) {
            Err(Error::ShardAlreadyOpen { shard: 0, .. }) => {}
            other => panic!("shard open: {other:?}"),
        }
        drop(a);
    });
    assert!(exists(&cfg.dir().join("shard-000").join("meta.seg")));
    assert_eq!(in_child("destroy", cfg.dir()), "destroyed");
    assert!(!exists(cfg.dir()));
}

// ---------------------------------------------------------------------------
// Paths and first-day errors.
// ---------------------------------------------------------------------------

#[test]
fn a_data_directory_reached_through_a_symlink_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("data").join("app");
    let link = tmp.path().join("app");
    std::fs::create_dir_all(&real).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let cfg = small_cfg(&link);
    let h = common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        assert_eq!(dd.path(), std::fs::canonicalize(&real).unwrap());
        let s = Shard::open(dd, &cfg, 0).await.unwrap();
        let a = s.allocate(5).await.unwrap();
        a.write_at(0, b"hello").unwrap();
        s.sync().await.unwrap();
        a.into_handle()
    });
    assert!(exists(&real.join("MANIFEST")) && exists(&real.join("shard-000/meta.seg")));
    let (ro, _) = DataDir::open_read_only(&link).unwrap();
    assert_eq!(ro.path(), std::fs::canonicalize(&real).unwrap());
    // Reopened by its real path, the record is there.
    common::run(async {
        let s = common::open_shard(&small_cfg(&real)).await.unwrap();
        let mut buf = [0u8; 5];
        s.pin(h).await.unwrap().read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    });
}

#[test]
fn a_symlink_inside_the_data_directory_is_still_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = populated(&tmp.path().join("d"));
    let shard = cfg.dir().join("shard-001");
    let aside = tmp.path().join("aside");
    std::fs::rename(&shard, &aside).unwrap();
    std::os::unix::fs::symlink(&aside, &shard).unwrap();
    match DataDir::open(&cfg) {
        Err(Error::InvalidConfig(msg)) => {
            assert!(
                msg.contains("symlink") && msg.contains("shard-001"),
                "{msg}"
            )
        }
        other => panic!("symlinked shard folder: {other:?}"),
    }
    match DataDir::destroy(cfg.dir()) {
        Err(Error::NotDataDir { path, .. }) => assert_eq!(path, shard),
        other => panic!("destroy through a symlinked shard folder: {other:?}"),
    }
    assert!(exists(&aside.join("meta.seg")));
}

/// A directory created with 3 shards (more than this machine's cores,
/// perhaps) opens with the default configuration: the count left unset is
/// the directory's, not the cores' (a new cpuset or fd limit made the
/// default count differ, and the open fail with `Mismatch`).
#[test]
fn the_default_shard_count_of_an_existing_directory_is_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let builder = || Config::builder(&d).window_bytes(common::WINDOW);
    let three = builder().shards(3).build().unwrap();
    drop(DataDir::open(&three).unwrap());
    let default = builder().build().unwrap();
    assert_eq!(default.shards(), 3);
    DataDir::open(&default).unwrap();
    // Set explicitly, another count is still refused.
    let one = builder().shards(1).build().unwrap();
    match DataDir::open(&one) {
        Err(Error::Mismatch {
            what: "shards",
            on_disk: 3,
            requested: 1,
        }) => {}
        other => panic!("an explicit other count: {other:?}"),
    }
    // A count above the caps is not taken (the default stays, lowered to
    // fit, and the open says `Mismatch`): building never fails for it.
    let capped = builder().max_open_files(2).build().unwrap();
    assert!(capped.shards() <= 2);
    assert!(matches!(
        DataDir::open(&capped),
        Err(Error::Mismatch {
            what: "shards",
            on_disk: 3,
            ..
        })
    ));
    // An empty path builds, and the open names it.
    match DataDir::open(&Config::new("")) {
        Err(Error::InvalidConfig(m)) => assert!(m.contains("path is empty"), "{m}"),
        other => panic!("an empty path: {other:?}"),
    }
}

/// The same for the window and file sizes: a directory created with
/// 64 MiB windows and 128 MiB files opens with `Config::new` (it said
/// `Mismatch` for sizes nobody asked for); set explicitly, another size is
/// still refused.
#[test]
fn the_default_sizes_of_an_existing_directory_are_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("d");
    let made = Config::builder(&d)
        .shards(2)
        .window_bytes(64 * MIB)
        .max_file_bytes(128 * MIB)
        .build()
        .unwrap();
    drop(DataDir::open(&made).unwrap());
    let default = Config::new(&d);
    assert_eq!(
        (
            default.shards(),
            default.window_bytes(),
            default.max_file_bytes()
        ),
        (2, 64 * MIB, 128 * MIB)
    );
    assert_eq!(default.growth_step_bytes(), 64 * MIB);
    DataDir::open(&default).unwrap();
    let rt = segalloc::Runtime::start(Config::new(&d)).unwrap();
    rt.shutdown().unwrap();
    let other = Config::builder(&d).window_bytes(32 * MIB).build().unwrap();
    assert_eq!(other.max_file_bytes(), 128 * MIB);
    match DataDir::open(&other) {
        Err(Error::Mismatch {
            what: "window_bytes",
            on_disk,
            requested,
        }) => assert_eq!((on_disk, requested), (64 * MIB, 32 * MIB)),
        other => panic!("an explicit other window: {other:?}"),
    }
    let other = Config::builder(&d)
        .max_file_bytes(256 * MIB)
        .build()
        .unwrap();
    assert!(matches!(
        DataDir::open(&other),
        Err(Error::Mismatch {
            what: "max_file_bytes",
            ..
        })
    ));
}

#[test]
fn a_missing_directory_is_named_or_created() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nonexist");
    match DataDir::open_read_only(&missing) {
        Err(e @ Error::DirNotFound { .. }) => {
            assert_eq!(
                e.to_string(),
                format!("data directory {} does not exist", missing.display())
            )
        }
        other => panic!("read-only open of a missing directory: {other:?}"),
    }
    assert!(!exists(&missing), "a read-only open created the directory");
    // A writable open creates it, parents included.
    let cfg = small_cfg(&missing.join("a").join("b"));
    let dd = DataDir::open(&cfg).unwrap();
    assert!(dd.was_created() && exists(&cfg.dir().join("MANIFEST")));
}

#[test]
fn an_empty_directory_is_initialised_and_not_called_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    match DataDir::open_read_only(&empty) {
        Err(e @ Error::NotDataDir { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("not a segalloc data directory"), "{msg}");
            assert!(!msg.contains("corrupt"), "{msg}");
        }
        other => panic!("read-only open of an empty directory: {other:?}"),
    }
    let cfg = small_cfg(&empty);
    common::run(async {
        let dd = Arc::new(DataDir::open(&cfg).unwrap());
        assert!(dd.was_created());
        let s = Shard::open(dd, &cfg, 0).await.unwrap();
        s.allocate(1).await.unwrap();
    });
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_directory_of_other_files_is_never_made_a_data_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("projects")).unwrap();
    std::fs::write(home.join("notes.txt"), b"precious").unwrap();
    let before = listing(&home);
    match DataDir::open(&small_cfg(&home)) {
        Err(e @ Error::NotDataDir { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("has no manifest and is not empty"), "{msg}");
        }
        other => panic!("a directory of the user's files: {other:?}"),
    }
    assert_eq!(listing(&home), before, "something was created in it");
    // Files of the user's named as segalloc's: a LOCK that holds something,
    // a MANIFEST.tmp bigger than a manifest; a file named like a shard.
    for (name, body) in [
        ("LOCK", &b"important"[..]),
        ("MANIFEST.tmp", &[7u8; 4096][..]),
    ] {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(name), body).unwrap();
        assert!(
            matches!(
                DataDir::open(&small_cfg(&dir)),
                Err(Error::NotDataDir { .. })
            ),
            "{name} of the user's"
        );
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), body);
        assert_eq!(listing(&dir), [name]);
    }
    let notes = tmp.path().join("notes");
    std::fs::create_dir(&notes).unwrap();
    std::fs::write(notes.join("shard-notes.txt"), b"x").unwrap();
    assert!(matches!(
        DataDir::open(&small_cfg(&notes)),
        Err(Error::NotDataDir { .. })
    ));
    // A mount point's lost+found folder alone: initialised, and destroy
    // leaves that folder (and so the directory) in place.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(mnt.join("lost+found")).unwrap();
    let cfg = small_cfg(&mnt);
    common::run(async {
        let s = common::open_shard(&cfg).await.unwrap();
        s.allocate(10).await.unwrap();
    });
    DataDir::destroy(&mnt).unwrap();
    assert_eq!(listing(&mnt), ["lost+found"]);
    DataDir::destroy(&mnt).unwrap();
    assert_eq!(listing(&mnt), ["lost+found"]);
}

#[test]
fn destroy_through_a_symlink_keeps_the_link_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    let link = tmp.path().join("link");
    std::fs::create_dir(&real).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    // Named with a trailing `/` or `/.` too (there `lstat` follows the link).
    for named in [
        link.clone(),
        tmp.path().join("link/"),
        tmp.path().join("link/."),
    ] {
        populated(&link);
        DataDir::destroy(&named).unwrap();
        assert!(real.is_dir(), "{named:?}: the link's target was removed");
        assert!(listing(&real).is_empty(), "{:?}", listing(&real));
    }
    // The link still names a directory that opens.
    let dd = DataDir::open(&small_cfg(&link)).unwrap();
    assert!(dd.was_created());
    drop(dd);
    // A link whose target is gone is named as such (it was "File exists").
    std::fs::remove_dir_all(&real).unwrap();
    match DataDir::open(&small_cfg(&link)) {
        Err(Error::NotADirectory { path, kind }) => {
            assert_eq!(
                (path, kind),
                (link.clone(), "a symlink to a missing directory")
            )
        }
        other => panic!("a dangling link: {other:?}"),
    }
    // Also named with a trailing `/` or `/.` (it was "mkdir failed: File
    // exists").
    for named in [tmp.path().join("link/"), tmp.path().join("link/.")] {
        match DataDir::open(&small_cfg(&named)) {
            Err(Error::NotADirectory { kind, .. }) => {
                assert_eq!(kind, "a symlink to a missing directory", "{named:?}")
            }
            other => panic!("a dangling link named {named:?}: {other:?}"),
        }
    }
    assert!(matches!(
        segalloc::inspect::read_dir(&link),
        Err(Error::NotADirectory {
            kind: "a symlink to a missing directory",
            ..
        })
    ));
}

/// A directory a deletion left part way: every open refuses it, naming
/// the unfinished deletion, and `destroy` finishes it.
fn assert_unfinished_destroy(cfg: &Config) {
    for r in [
        DataDir::open(cfg).map(drop),
        DataDir::open_read_only(cfg.dir()).map(drop),
        segalloc::inspect::read_dir(cfg.dir()).map(drop),
    ] {
        match r {
            Err(e @ Error::NotDataDir { .. }) => {
                assert!(e.to_string().contains("did not finish"), "{e}")
            }
            other => panic!("open of a directory a deletion left: {other:?}"),
        }
    }
    DataDir::destroy(cfg.dir()).unwrap();
    assert!(!exists(cfg.dir()));
}

#[test]
fn a_destroy_cut_short_leaves_a_directory_no_open_takes() {
    let tmp = tempfile::tempdir().unwrap();
    // Cut short by a file it cannot remove (an immutable one: root on a
    // file system with attributes), the shards before it already gone.
    let cfg = populated(&tmp.path().join("d"));
    let stuck = cfg.dir().join("shard-001").join("meta.seg");
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .arg(&stuck)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if chattr("+i") {
        let r = DataDir::destroy(cfg.dir());
        assert!(chattr("-i"));
        match r {
            Err(Error::Io { path: Some(p), .. }) => assert_eq!(p, stuck),
            other => panic!("destroy with an immutable file: {other:?}"),
        }
        assert!(!exists(&cfg.dir().join("MANIFEST")));
        assert_unfinished_destroy(&cfg);
    } else {
        eprintln!("chattr +i refused (not root, or no attributes here): that part skipped");
    }
    // Cut short by a crash after the rename, one shard folder gone (this
    // is what the deletion writes before anything else).
    let cfg = populated(&tmp.path().join("e"));
    std::fs::rename(
        cfg.dir().join("MANIFEST"),
        cfg.dir().join("MANIFEST.destroying"),
    )
    .unwrap();
    std::fs::remove_dir_all(cfg.dir().join("shard-000")).unwrap();
    assert_unfinished_destroy(&cfg);
}

/// The inspector (`segalloc stat`/`verify`/`live`) names what a path that
/// is not a data directory is, with the library's errors.
#[test]
fn the_inspector_names_what_a_path_is() {
    let tmp = tempfile::tempdir().unwrap();
    let read = |p: &Path| segalloc::inspect::read_dir(p).map(drop);
    let missing = tmp.path().join("missing");
    assert!(matches!(read(&missing), Err(Error::DirNotFound { path }) if path == missing));
    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        read(&file),
        Err(Error::NotADirectory {
            kind: "a regular file",
            ..
        })
    ));
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    assert!(matches!(
        read(&link),
        Err(Error::NotADirectory {
            kind: "a symlink to a file",
            ..
        })
    ));
    let photos = tmp.path().join("photos");
    std::fs::create_dir(&photos).unwrap();
    std::fs::write(photos.join("cat.jpg"), b"meow").unwrap();
    for dir in [&photos, tmp.path()] {
        match read(dir) {
            Err(e @ Error::NotDataDir { .. }) => {
                assert!(!e.to_string().contains("corrupt"), "{e}")
            }
            other => panic!("{}: {other:?}", dir.display()),
        }
    }
}

#[test]
fn destroy_takes_only_what_an_unfinished_creation_leaves() {
    let tmp = tempfile::tempdir().unwrap();
    let app = tmp.path().join("app");
    std::fs::create_dir(&app).unwrap();
    // A file of the user's that happens to be named LOCK or MANIFEST.tmp.
    for (name, body) in [
        ("LOCK", &b"pid=1234 important"[..]),
        ("MANIFEST.tmp", &[7u8; 4096][..]),
    ] {
        std::fs::write(app.join(name), body).unwrap();
        match DataDir::destroy(&app) {
            Err(Error::NotDataDir { .. }) => {}
            other => panic!("{name} of the user's: {other:?}"),
        }
        assert_eq!(std::fs::read(app.join(name)).unwrap(), body);
        std::fs::remove_file(app.join(name)).unwrap();
    }
    // What a creation that stopped before its manifest leaves: removed.
    std::fs::write(app.join("LOCK"), b"").unwrap();
    std::fs::write(app.join("MANIFEST.tmp"), [0u8; 16]).unwrap();
    DataDir::destroy(&app).unwrap();
    assert!(!exists(&app));
    // A refused data directory without its LOCK gets none.
    let cfg = populated(&tmp.path().join("d"));
    std::fs::remove_file(cfg.dir().join("LOCK")).unwrap();
    std::fs::write(cfg.dir().join("notes.txt"), b"mine").unwrap();
    assert!(matches!(
        DataDir::destroy(cfg.dir()),
        Err(Error::NotDataDir { .. })
    ));
    assert!(
        !exists(&cfg.dir().join("LOCK")),
        "a refused destroy created LOCK"
    );
}

#[test]
fn a_file_given_as_the_directory_is_named_as_a_file() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("notes.txt");
    std::fs::write(&file, b"x").unwrap();
    let cfg = small_cfg(&file);
    for r in [
        DataDir::open(&cfg).map(drop),
        DataDir::open_read_only(&file).map(drop),
    ] {
        match r {
            Err(e @ Error::NotADirectory { .. }) => assert_eq!(
                e.to_string(),
                format!("{} is a regular file, not a directory", file.display())
            ),
            other => panic!("a file as the directory: {other:?}"),
        }
    }
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Option<Mount> {
        std::fs::create_dir_all(at).unwrap();
        let ok = common::is_root()
            && Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "none"])
                .arg(at)
                .status()
                .is_ok_and(|s| s.success());
        ok.then(|| Mount(at.to_path_buf()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn destroy_empties_a_mount_point_and_keeps_it() {
    let tmp = tempfile::tempdir().unwrap();
    let at = tmp.path().join("mnt");
    let Some(_mount) = Mount::tmpfs(&at, "64m") else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let cfg = populated(&at);
    DataDir::destroy(cfg.dir()).unwrap();
    assert!(at.is_dir(), "the mount point itself is kept");
    assert_eq!(std::fs::read_dir(&at).unwrap().count(), 0);
    // A stray file of the user's on it: refused, named, nothing deleted.
    let cfg = populated(&at);
    std::fs::write(at.join("lost+found"), b"").unwrap();
    match DataDir::destroy(cfg.dir()) {
        Err(e @ Error::NotDataDir { .. }) => {
            assert!(
                e.to_string()
                    .contains(&at.join("lost+found").display().to_string())
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(exists(&at.join("MANIFEST")));
}

/// `f` on another thread, with a bound: a call that hangs fails the test
/// instead of the run.
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Replace `path` with a FIFO.
fn make_fifo(path: &Path) {
    std::fs::remove_file(path).unwrap();
    let ok = Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

/// A FIFO in place of one of the directory's files is an error naming it,
/// never a wait: a read-only open of a FIFO blocks until a writer comes, so
/// opening the directory (or destroying it) once hung for ever.
#[test]
fn a_fifo_in_place_of_a_file_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = populated(&tmp.path().join("d"));
    let dir = cfg.dir().to_path_buf();

    make_fifo(&dir.join("shard-000").join("meta.seg"));
    let c = cfg.clone();
    let r = within("a read-only shard open", move || {
        common::run(async move {
            let (ro, _) = DataDir::open_read_only(c.dir())?;
            Shard::open(Arc::new(ro), &c, 0).await.map(|_| ())
        })
    });
    let e = r.expect_err("a FIFO is not a metadata file");
    assert!(format!("{e}").contains("meta.seg"), "{e}");
    let c = cfg.clone();
    let r = within("a shard open", move || {
        common::run(async move {
            let dd = Arc::new(DataDir::open(&c)?);
            Shard::open(dd, &c, 0).await.map(|_| ())
        })
    });
    let e = r.expect_err("a FIFO is not a metadata file");
    assert!(format!("{e}").contains("meta.seg"), "{e}");

    make_fifo(&dir.join("LOCK"));
    let d = dir.clone();
    let e = within("a read-only open", move || {
        DataDir::open_read_only(d).map(|_| ())
    })
    .expect_err("a FIFO is not a lock file");
    assert!(format!("{e}").contains("LOCK"), "{e}");

    std::fs::remove_file(dir.join("LOCK")).unwrap();
    std::fs::write(dir.join("LOCK"), b"").unwrap();
    make_fifo(&dir.join("MANIFEST"));
    let c = cfg.clone();
    let e = within("an open", move || DataDir::open(&c).map(|_| ()))
        .expect_err("a FIFO is not a manifest");
    assert!(format!("{e}").contains("MANIFEST"), "{e}");
    let d = dir.clone();
    let e = within("a read-only open", move || {
        DataDir::open_read_only(d).map(|_| ())
    })
    .expect_err("a FIFO is not a manifest");
    assert!(format!("{e}").contains("MANIFEST"), "{e}");
    let d = dir.clone();
    within("destroy", move || DataDir::destroy(d)).expect_err("not a closed data directory");
    assert!(exists(&dir.join("shard-000")), "destroy deleted nothing");
}

/// A directory, a FIFO or a symlink in place of a data file the metadata
/// refers to makes the shard's open fail, naming the file (it opened, and
/// failed at the data's first use, or its first sync).
#[test]
fn a_data_file_that_is_not_a_regular_file_is_refused_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = populated(&tmp.path().join("d"));
    let data = cfg.dir().join("shard-000").join("data-000000.seg");
    let kept = tmp.path().join("kept.seg");
    std::fs::rename(&data, &kept).unwrap();
    let open = |cfg: &Config| {
        let c = cfg.clone();
        within("a shard open", move || {
            common::run(async move {
                let dd = Arc::new(DataDir::open(&c)?);
                Shard::open(dd, &c, 0).await.map(|s| s.live_count())
            })
        })
    };
    type Make = fn(&Path, &Path);
    let kinds: [(&str, Make); 3] = [
        ("a directory", |p, _| std::fs::create_dir(p).unwrap()),
        ("a FIFO", |p, _| {
            assert!(Command::new("mkfifo").arg(p).status().unwrap().success())
        }),
        ("a symlink", |p, to| {
            std::os::unix::fs::symlink(to, p).unwrap()
        }),
    ];
    for (what, make) in kinds {
        make(&data, &kept);
        match open(&cfg) {
            Err(Error::Corrupt { what: path, detail }) => {
                assert!(path.ends_with("data-000000.seg"), "{what}: {path}");
                assert!(detail.contains("not a regular file"), "{what}: {detail}");
            }
            other => panic!("{what}: {other:?}"),
        }
        if std::fs::symlink_metadata(&data).unwrap().is_dir() {
            std::fs::remove_dir(&data).unwrap();
        } else {
            std::fs::remove_file(&data).unwrap();
        }
    }
    std::fs::rename(&kept, &data).unwrap();
    assert_eq!(open(&cfg).unwrap(), 1);
}

/// [`open_elsewhere`] until it succeeds: a child that another test thread
/// forks keeps a copy of the lock until its `exec` (see
/// `common::open_shard`).
fn open_elsewhere_eventually(cfg: &Config) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match open_elsewhere(cfg) {
            Ok(()) => return,
            Err(Error::AlreadyOpen { .. } | Error::ShardAlreadyOpen { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("open elsewhere: {e}"),
        }
    }
}

/// Open shard 0 of `cfg` from another thread; what it gave.
fn open_elsewhere(cfg: &Config) -> segalloc::Result<()> {
    let cfg = cfg.clone();
    std::thread::spawn(move || {
        common::run(async {
            let dd = Arc::new(DataDir::open(&cfg)?);
            segalloc::Shard::open(dd, &cfg, 0).await.map(drop)
        })
    })
    .join()
    .unwrap()
}

/// A pin kept after its shard is dropped still maps the shard's bytes
/// (writable), and so does the shard's `MappingManager` kept after it: the
/// shard stays locked until neither maps them, so another open of it (in
/// another thread or process) cannot hand out or write the same bytes
/// meanwhile. Once the shard is unlocked, the kept manager maps none of its
/// files again.
#[test]
fn a_pin_kept_past_its_shard_keeps_the_shard_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(tmp.path());
    let refused = |what: &str| {
        match open_elsewhere(&cfg) {
            Err(Error::ShardAlreadyOpen { shard: 0, .. }) => {}
            other => panic!("open beside {what}: {other:?}"),
        }
        assert_eq!(in_child("allocator", cfg.dir()), "shard 0 already open");
    };
    common::run(async {
        // A pin alone.
        let shard = common::open_shard(&cfg).await.unwrap();
        let a = shard.allocate(64).await.unwrap();
        drop(shard);
        refused("a kept allocation");
        a.write_at(0, b"still mapped").unwrap();
        drop(a);
        open_elsewhere_eventually(&cfg);
        // The manager.
        let shard = common::open_shard(&cfg).await.unwrap();
        let pin = shard.pin(shard.live().next().unwrap()).await.unwrap();
        let mm = shard.mappings().clone();
        let data = cfg
            .dir()
            .join("shard-000")
            .join(segalloc::format::data_file_name(0));
        let fid = common::register(mm.files(), &data);
        drop(shard);
        drop(pin);
        refused("a kept manager");
        assert!(mm.evict_idle() > 0);
        // The manager's own calls never pin an allocator's file.
        match mm.pin(fid, 0, 64, true).await {
            Err(Error::AllocatorFile { .. }) => {}
            other => panic!("pin of a closed shard's file: {other:?}"),
        }
        // Nor is the file grown for a pin past its end.
        let len = std::fs::metadata(&data).unwrap().len();
        match mm.pin(fid, len + (1 << 20), 64, true).await {
            Err(Error::AllocatorFile { .. }) => {}
            other => panic!("pin past the end of a closed shard's file: {other:?}"),
        }
        match mm.files().acquire(fid, len + (1 << 20)).await {
            Err(Error::AllocatorFile { .. }) => {}
            other => panic!("growth of a closed shard's file: {other:?}"),
        }
        assert_eq!(std::fs::metadata(&data).unwrap().len(), len);
        open_elsewhere_eventually(&cfg);
        let shard = common::open_shard(&cfg).await.unwrap();
        let mut buf = [0u8; 12];
        let h = shard.live().next().unwrap();
        shard.pin(h).await.unwrap().read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"still mapped");
    });
}

/// An open that opened `LOCK` just before a `destroy` removed it, and locked
/// the removed file just after, held a lock nobody else could see: with a
/// second open holding the new `LOCK`, both had the directory open.
#[test]
fn an_open_racing_a_destroy_never_shares_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    drop(DataDir::open(&small_cfg(&dir)).unwrap());
    let resolved = std::fs::canonicalize(&dir).unwrap();
    let pause = DataDir::pause_before_lock_for_test(&resolved);
    let cfg = small_cfg(&dir);
    let racer = std::thread::spawn(move || DataDir::open(&cfg).map(|d| d.path().to_path_buf()));
    // The racer has opened `LOCK` and waits before locking it.
    pause.wait_reached();
    DataDir::destroy(&dir).unwrap();
    assert!(!dir.exists(), "destroy left {dir:?}");
    let held = DataDir::open(&small_cfg(&dir)).unwrap();
    assert!(held.was_created());
    pause.resume();
    match racer.join().unwrap() {
        Err(Error::AlreadyOpen { .. }) => {}
        other => panic!("an open of a directory held by another open gave {other:?}"),
    }
    // Released, the directory opens again, once.
    drop(held);
    let again = DataDir::open(&small_cfg(&dir)).unwrap();
    assert!(!again.was_created());
    assert!(matches!(
        DataDir::open(&small_cfg(&dir)),
        Err(Error::AlreadyOpen { .. })
    ));
}

/// A shard's open that opened the shard's folder just before a `destroy`
/// removed it, and locked the removed folder just after, went on: with the
/// manifest of the deleted directory it wrote a `meta.seg` into the
/// directory created next, which that directory's own open then called
/// corrupt. It fails instead, and the new directory is untouched.
#[test]
fn a_shard_open_racing_a_destroy_never_writes_into_the_next_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = small_cfg(&dir);
    drop(DataDir::open(&cfg).unwrap());
    let pause = DataDir::pause_before_lock_for_test(dir.join("shard-000"));
    let racer_cfg = cfg.clone();
    let racer = std::thread::spawn(move || {
        common::run(async move { open_allocator_behind_the_lock(&racer_cfg).await.map(drop) })
    });
    pause.wait_reached();
    DataDir::destroy(&dir).unwrap();
    let dd = Arc::new(DataDir::open(&cfg).unwrap());
    assert!(dd.was_created());
    pause.resume();
    match racer.join().unwrap() {
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
        other => panic!("a shard open that locked a removed folder gave {other:?}"),
    }
    assert!(
        listing(&dir.join("shard-000")).is_empty(),
        "{:?}",
        listing(&dir.join("shard-000"))
    );
    common::run(async {
        let s = Shard::open(dd.clone(), &cfg, 0).await.unwrap();
        s.allocate(16).await.unwrap();
    });
}

/// Opens and deletions of one directory from two threads at once: no two
/// opens ever hold it, every `destroy` succeeds or names a holder, and an
/// open either gets the directory or an error (never a directory another
/// open holds). Runs until both have happened a few times (at most 20 s: a
/// loaded or single-core machine may starve one thread for a while).
#[test]
fn opens_and_destroys_racing_never_share_a_directory() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let held = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let try_open = {
        let (dir, held, opened) = (dir.clone(), held.clone(), opened.clone());
        move || {
            if let Ok(dd) = DataDir::open(&small_cfg(&dir)) {
                assert_eq!(held.fetch_add(1, SeqCst), 0, "two opens hold the directory");
                opened.fetch_add(1, SeqCst);
                std::thread::yield_now();
                held.fetch_sub(1, SeqCst);
                drop(dd);
            }
        }
    };
    let opener = {
        let (stop, try_open) = (stop.clone(), try_open.clone());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                try_open();
                // Leave the directory free for a while (on one core the
                // other thread would hardly ever find it so).
                std::thread::sleep(Duration::from_micros(50));
            }
        })
    };
    let start = std::time::Instant::now();
    let (mut destroyed, mut rounds) = (0, 0);
    while rounds < 2000 || destroyed < 5 || opened.load(SeqCst) < 5 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "after {rounds} rounds: destroyed {destroyed}, opened {}",
            opened.load(SeqCst)
        );
        match DataDir::destroy(&dir) {
            Ok(()) => destroyed += 1,
            Err(Error::AlreadyOpen { .. } | Error::ShardAlreadyOpen { .. }) => {}
            Err(e) => panic!("destroy racing opens: {e:?}"),
        }
        try_open();
        rounds += 1;
    }
    stop.store(true, SeqCst);
    opener.join().unwrap();
}

/// A shard opened through a view of the directory taken before it was
/// deleted and made again: its manifest is the deleted directory's, so it
/// must not give the new directory's shard folder the old one's metadata
/// (that directory's own open then called it corrupt).
#[test]
fn a_shard_opened_with_a_deleted_directorys_manifest_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = small_cfg(&dir);
    drop(DataDir::open(&cfg).unwrap());
    let (ro, _) = DataDir::open_read_only(&dir).unwrap();
    DataDir::destroy(&dir).unwrap();
    let dd = Arc::new(DataDir::open(&cfg).unwrap());
    assert!(dd.was_created());
    common::run(async {
        let (_, mm) = common::manager_with(&cfg);
        match SegmentAllocator::open(0, &ro.shard_dir(0), *ro.manifest(), Rc::new(mm)).await {
            Err(Error::NotDataDir { .. }) => {}
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("a shard of a deleted directory was opened in the next one"),
        }
    });
    assert!(listing(&dir.join("shard-000")).is_empty());
    common::run(async {
        let s = Shard::open(dd.clone(), &cfg, 0).await.unwrap();
        s.allocate(16).await.unwrap();
    });
}

/// A path that goes back (`..`) out of a folder that does not exist is
/// refused before anything is made: `mkdir -p` would make that folder for
/// nothing (and in the directory the path names, which then held a
/// foreign entry and was refused as no data directory for ever).
#[test]
fn a_path_back_out_of_a_missing_folder_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("e");
    std::fs::create_dir(&empty).unwrap();
    for given in [
        empty.join("x").join(".."),
        empty.join("x").join("..").join("y"),
    ] {
        match DataDir::open(&small_cfg(&given)) {
            Err(Error::InvalidConfig(m)) => assert!(m.contains(".."), "{m}"),
            other => panic!("{}: {other:?}", given.display()),
        }
        let left: Vec<_> = std::fs::read_dir(&empty).unwrap().collect();
        assert!(left.is_empty(), "{}: made {left:?}", given.display());
    }
    // Back out of a folder that exists: as named.
    let dd = DataDir::open(&small_cfg(&empty.join("..").join("d"))).unwrap();
    assert_eq!(dd.path(), tmp.path().canonicalize().unwrap().join("d"));
}

/// A data directory renamed while a shard of it is open, and a new one made
/// at the old path and opened: each open keeps to its own files. The open
/// one's files are opened in the folder it locked, not by a path that now
/// names the other directory's: it once created its new data files in the
/// new directory's locked folder (and reopened evicted descriptors there),
/// where the other open then wrote over its allocations, and the renamed
/// directory no longer opened (a data file it names was elsewhere).
#[test]
fn a_directory_renamed_while_open_keeps_its_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let moved = tmp.path().join("moved");
    // Small files (a new data file every 16 MiB) and few descriptors (each
    // file is closed and opened again as the fill goes on).
    let cfg = |dir: &Path| {
        Config::builder(dir)
            .shards(1)
            .window_bytes(16 << 20)
            .max_file_bytes(16 << 20)
            .growth_step_bytes(1 << 20)
            .max_open_files(4)
            .build()
            .unwrap()
    };
    let first = cfg(&a);
    let other = cfg(&a);
    let kept = common::run(async {
        let shard = common::open_shard(&first).await.unwrap();
        let mut hs = Vec::new();
        for _ in 0..4 {
            let x = shard.allocate(300_000).await.unwrap();
            x.write_at(0, b"first").unwrap();
            hs.push(x.into_handle());
        }
        shard.sync().await.unwrap();
        std::fs::rename(&a, &moved).unwrap();
        let o = common::open_shard(&other).await.unwrap();
        for _ in 0..200 {
            let x = shard.allocate(300_000).await.unwrap();
            x.write_at(0, b"first").unwrap();
            hs.push(x.into_handle());
        }
        shard.sync().await.unwrap();
        for _ in 0..200 {
            let x = o.allocate(300_000).await.unwrap();
            x.write_at(0, b"other").unwrap();
        }
        o.sync().await.unwrap();
        let mut clobbered = 0;
        for h in &hs {
            let mut b = [0u8; 5];
            shard.pin(*h).await.unwrap().read_at(0, &mut b).unwrap();
            clobbered += usize::from(&b != b"first");
        }
        assert_eq!(clobbered, 0, "of {}", hs.len());
        let names = |d: &Path| {
            let mut v: Vec<_> = std::fs::read_dir(d.join("shard-000"))
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        let data = |v: Vec<String>| v.iter().filter(|n| n.starts_with("data-")).count();
        assert!(data(names(&moved)) > 1, "{:?}", names(&moved));
        assert!(data(names(&a)) > 1, "{:?}", names(&a));
        hs
    });
    // Each directory opens with its own allocations.
    common::run(async {
        let shard = common::open_shard(&cfg(&moved)).await.unwrap();
        assert_eq!(shard.live_count(), kept.len() as u64);
        for h in &kept {
            let mut b = [0u8; 5];
            shard.pin(*h).await.unwrap().read_at(0, &mut b).unwrap();
            assert_eq!(&b, b"first");
        }
        let o = common::open_shard(&cfg(&a)).await.unwrap();
        assert_eq!(o.live_count(), 200);
    });
}

/// A data directory removed while a shard of it is open: the shard's next
/// sync says so (it returned `Ok`, for files no path reaches any more).
#[test]
fn a_sync_after_the_directory_was_removed_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    let cfg = small_cfg(&dir);
    common::run(async {
        let shard = common::open_shard(&cfg).await.unwrap();
        let a = shard.allocate(100).await.unwrap();
        a.write_at(0, b"kept").unwrap();
        drop(a);
        shard.sync().await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let r = shard.sync().await;
        match r {
            Err(Error::Io {
                op: "sync",
                ref source,
                ..
            }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => panic!("sync after the directory was removed: {other:?}"),
        }
        assert!(format!("{}", r.unwrap_err()).contains("removed"));
        // As a failed sync, it poisons the shard: nothing it covered (a
        // free made before it) is handed out again.
        assert!(shard.allocator().is_poisoned());
        assert!(matches!(
            shard.allocate(100).await.map(drop),
            Err(Error::Poisoned { .. })
        ));
    });
}

/// An entry segalloc does not make, at the top of a data directory, is
/// reported by the inspector (`segalloc verify` said clean), since
/// `destroy` and `clear` refuse the directory while it is there.
#[test]
fn the_inspector_reports_an_entry_destroy_would_refuse() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = small_cfg(&tmp.path().join("d"));
    drop(DataDir::open(&cfg).unwrap());
    let before = segalloc::inspect::verify(cfg.dir()).unwrap();
    assert!(before.iter().all(|p| p.shard.is_some()), "{before:?}");
    std::fs::write(cfg.dir().join("stray.txt"), b"x").unwrap();
    let found = segalloc::inspect::verify(cfg.dir()).unwrap();
    assert!(
        found
            .iter()
            .any(|p| p.file.as_deref() == Some("stray.txt") && p.detail.contains("destroy")),
        "{found:?}"
    );
    assert!(matches!(
        DataDir::destroy(cfg.dir()),
        Err(Error::NotDataDir { .. })
    ));
}
