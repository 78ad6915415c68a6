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

/// Whether a program is on PATH (or, given as a path, is there).
pub fn have(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).is_file();
    }
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

/// A plain HTTP/1.1 GET with std only: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write request");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
