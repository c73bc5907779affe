//! Small helpers shared by the harness: binary lookup, free ports, randomness, bounded polling.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::RngCore;

/// How often [`poll_until`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Directory holding the workspace binaries: `$SOMA_BIN_DIR`, or the cargo profile directory this
/// test executable was built into (`target/debug/deps/<test>` gives `target/debug`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SOMA_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("cannot locate the running test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has no parent directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary (`soma-agent`, `kubectl-soma`); panics with the build command when
/// it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{name} not found at {}: run `cargo build --workspace --bins` first \
         (or point SOMA_BIN_DIR at the directory holding it)",
        path.display()
    );
    path
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind an ephemeral port on 127.0.0.1")
        .port()
}

/// `bytes` random bytes, hex-encoded (so `2 * bytes` hex digits).
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// Calls `probe` until it returns `Some`, at most until `timeout` has passed; panics naming `what`
/// when the deadline passes first.
pub fn poll_until<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
