//! `SEGALLOC_IO` with a value it does not know: refused before anything is
//! created. (Its own test binary: it sets the variable for the process.)

use segalloc::{Config, Error, Runtime};

#[test]
fn an_unknown_io_backend_creates_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("d");
    // SAFETY: the only test of this binary: no other thread reads the
    // environment meanwhile.
    unsafe { std::env::set_var("SEGALLOC_IO", "bogus") };
    let r = Runtime::start(Config::new(&dir));
    assert!(matches!(r, Err(Error::InvalidConfig(_))), "{:?}", r.err());
    assert!(!dir.exists(), "the data directory was created");
}
