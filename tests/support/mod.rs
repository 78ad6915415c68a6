//! Shared by the test binaries: real processes (the Distribution registry, pier, skopeo), OCI
//! image layouts generated on the spot, and small helpers.
#![allow(dead_code)]

pub mod image;
pub mod process;

use std::net::TcpListener;
use std::path::PathBuf;

/// A free TCP port on loopback (bound and released; the caller binds it again at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join(program).is_file()))
        .unwrap_or(false)
}

/// Checks that the real components a test needs are installed. Under CI=true a missing one fails
/// the test; elsewhere the test is skipped with a message, returning false.
pub fn require(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs.iter().copied().filter(|p| !have(p)).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("missing {missing:?}: run tests/run.sh, which installs them");
    }
    eprintln!("SKIPPED: {missing:?} not installed (tests/run.sh installs them)");
    false
}

/// The pier binary cargo built for these tests.
pub fn pier_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pier"))
}
