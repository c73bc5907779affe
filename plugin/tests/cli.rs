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

    // Without --agent the plugin needs Kubernetes; with no configuration at all it says how to
    // give one (a failed operation, not a usage error).
    let out = Command::new(env!("CARGO_BIN_EXE_kubectl-soma"))
        .arg("list")
        .env_remove("SOMA_AGENT")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    for hint in ["--kubeconfig", "--agent"] {
        assert!(stderr(&out).contains(hint), "{}", stderr(&out));
    }

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

/// The real kubectl finds the plugin on PATH, as users invoke it: `kubectl soma ...`.
#[test]
fn kubectl_finds_the_plugin_on_path() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-soma"));
    let dir = bin.parent().unwrap();
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .args(args)
            .env("PATH", &path)
            .env("KUBECONFIG", "/dev/null")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("kubectl is installed (apt-get install kubectl, or see .ci/run)")
    };
    let out = kubectl(&["plugin", "list"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(&bin.display().to_string()),
        "kubectl plugin list does not show {}:\n{listed}\n{}",
        bin.display(),
        stderr(&out)
    );
    let out = kubectl(&["soma", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("backup") && help.contains("--namespace"),
        "{help}"
    );
}
