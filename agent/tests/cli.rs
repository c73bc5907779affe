//! The agent binary refuses unusable configuration at start-up, before it serves anything, and
//! never echoes a secret while doing so.

use std::process::{Command, Output, Stdio};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_soma-agent"))
        .args(args)
        .env_remove("SOMA_POSTGRES_URL")
        .env_remove("SOMA_STORE")
        .stdin(Stdio::null())
        .output()
        .expect("run soma-agent")
}

#[test]
fn refuses_a_password_in_the_postgres_url() {
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let out = agent(&[
        "--listen",
        "127.0.0.1:0",
        "--store",
        &store_url,
        "--postgres-url",
        "postgresql://soma:hunter2@127.0.0.1:5432/appdb",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("PGPASSWORD"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the password leaked: {stderr}");
    assert!(out.stdout.is_empty(), "must not announce listening");
}

#[test]
fn refuses_an_unknown_store_scheme() {
    let out = agent(&["--listen", "127.0.0.1:0", "--store", "ftp://x/y"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("s3://bucket/prefix or file:///absolute/path"),
        "{stderr}"
    );
}

#[test]
fn refuses_parts_below_the_s3_minimum() {
    let out = agent(&["--part-size", "1MiB"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("at least 5MiB"), "{stderr}");
}
