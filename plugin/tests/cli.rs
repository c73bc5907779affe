//! The plugin binary as a user meets it before any agent is involved: help, usage errors and
//! their exit codes (2 for usage, 1 for a failed operation).

use std::process::{Command, Output};

fn soma(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-soma"))
        .args(args)
        .env_remove("SOMA_AGENT")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run kubectl-soma")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_lists_every_command() {
    let out = soma(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "backup", "restore", "list", "describe", "verify", "delete", "status",
    ] {
        assert!(text.contains(cmd), "help misses {cmd}:\n{text}");
    }
    assert!(
        text.contains("kubectl soma"),
        "help should name the kubectl form:\n{text}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = soma(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let out = soma(&["list"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--agent"), "{}", stderr(&out));

    let out = soma(&["--agent", "127.0.0.1:1", "describe", "../x"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("invalid backup id"),
        "{}",
        stderr(&out)
    );

    let out = soma(&["--agent", "127.0.0.1:1", "delete", "latest", "--yes"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
