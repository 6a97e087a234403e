//! Where io_uring is refused (a container runtime's default seccomp profile
//! makes `io_uring_setup` fail with `ENOSYS` or `EPERM`), a runtime starts on
//! plain syscalls and leaves no descriptor behind, however often it starts.
//! (Its own test binary: it counts the process's descriptors and sets
//! `SEGALLOC_IO`.)

#![cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]

use segalloc::{Config, IoBackend, Runtime};

/// `AUDIT_ARCH_*` of this build's architecture (`<linux/audit.h>`): the
/// filter matches syscall numbers of this architecture only.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// Make `io_uring_setup` fail with `ENOSYS` on this thread and every thread
/// it starts from now on (other threads of the process are not affected).
fn refuse_io_uring_setup() {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    // `struct seccomp_data`: the syscall number at 0, the architecture at 4.
    let filter = [
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 4,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
        libc::sock_filter {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: JEQ_K,
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        },
        libc::sock_filter {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: plain prctl calls; `prog` and `filter` outlive the second
    // one, which copies the program into the kernel.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0,
            "seccomp: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn without_io_uring_a_runtime_runs_on_syscalls_and_leaks_no_descriptor() {
    // The automatic choice, whatever the suite runs with: the fallback
    // under test is its.
    // SAFETY: the only test of this binary: no other thread reads the
    // environment meanwhile.
    unsafe { std::env::set_var("SEGALLOC_IO", "auto") };
    refuse_io_uring_setup();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = Config::builder(tmp.path().join("d"))
        .shards(2)
        .build()
        .unwrap();
    let round = || {
        let rt = Runtime::start(cfg.clone()).unwrap();
        let backends = futures::executor::block_on(rt.stats())
            .unwrap()
            .shards
            .iter()
            .map(|s| s.io_backend)
            .collect::<Vec<_>>();
        rt.shutdown().unwrap();
        backends
    };
    // The first start may set up what lives as long as the process.
    assert_eq!(round(), [IoBackend::Sync, IoBackend::Sync]);
    let before = open_fds();
    for _ in 0..5 {
        assert_eq!(round(), [IoBackend::Sync, IoBackend::Sync]);
    }
    let after = open_fds();
    assert_eq!(
        after, before,
        "descriptors open: {before} before 5 starts, {after} after"
    );
}
