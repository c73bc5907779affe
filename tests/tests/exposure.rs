//! Where the API token may travel, with the real binaries: an agent listening beyond loopback
//! serves only with a token and TLS, and the plugin never sends its token in clear beyond
//! loopback. Addresses beyond loopback are TEST-NET-1 (RFC 5737): no interface has them, so
//! nothing is ever bound or reached there.

use std::time::{Duration, Instant};

use soma_tests::{TestStore, bin_path, soma_env};

const TOKEN: &str = "exposure-token-0123456789abcdef";

fn agent_at(listen: &str, args: &[&str], store: &TestStore) -> (bool, String) {
    let out = std::process::Command::new(bin_path("soma-agent"))
        .args(["--listen", listen, "--store", &store.url()])
        .args(args)
        .env_remove("SOMA_AGENT_TOKEN_FILE")
        .env_remove("SOMA_TLS_CERT")
        .env_remove("SOMA_TLS_KEY")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A token alone is not enough beyond loopback: every call would carry it in clear. With a
/// certificate as well, the agent goes on to bind (and fails there only because no interface
/// has the TEST-NET address).
#[test]
fn an_agent_beyond_loopback_needs_tls_as_well_as_a_token() {
    let store = TestStore::local();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let token_arg = token.display().to_string();

    let (ok, stderr) = agent_at("192.0.2.1:50051", &["--token-file", &token_arg], &store);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("refusing to listen on 192.0.2.1:50051 without TLS")
            && stderr.contains("--tls-cert"),
        "{stderr}"
    );
    assert!(!stderr.contains(TOKEN), "{stderr}");
    // The same on every address of the host, and on IPv6 ones.
    for listen in ["0.0.0.0:50051", "[::]:50051"] {
        let (ok, stderr) = agent_at(listen, &["--token-file", &token_arg], &store);
        assert!(!ok && stderr.contains("without TLS"), "{listen}: {stderr}");
    }

    let cert = soma_tests::tls::serving_cert("soma-agent");
    let (chain, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&chain, &cert.chain_pem).unwrap();
    std::fs::write(&key, &cert.key_pem).unwrap();
    let tls = [
        "--token-file",
        &token_arg,
        "--tls-cert",
        chain.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let (ok, stderr) = agent_at("192.0.2.1:50051", &tls, &store);
    assert!(!ok, "{stderr}");
    assert!(
        !stderr.contains("refusing") && stderr.contains("binding --listen 192.0.2.1:50051"),
        "with a token and TLS the agent goes on to bind: {stderr}"
    );
}

/// `kubectl soma --agent HOST:PORT` with a token and no `--agent-ca`: refused before connecting
/// when HOST is beyond loopback, naming the way to reach the agent safely.
#[test]
fn the_plugin_sends_no_token_in_clear_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let token_arg = token.display().to_string();
    for (addr, args, env) in [
        (
            "192.0.2.1:50051",
            vec!["list"],
            vec![("SOMA_AGENT_TOKEN", TOKEN)],
        ),
        (
            "192.0.2.1:50051",
            vec!["list", "--token-file", &token_arg],
            vec![],
        ),
        (
            "[2001:db8::1]:50051",
            vec!["describe", "latest"],
            vec![("SOMA_AGENT_TOKEN", TOKEN)],
        ),
        (
            "agent.example:50051",
            vec!["list"],
            vec![("SOMA_AGENT_TOKEN", TOKEN)],
        ),
    ] {
        let started = Instant::now();
        let out = soma_env(addr, &args, &env);
        out.assert_code(2, addr);
        out.assert_stderr_contains("refusing to send the agent token in clear", addr);
        out.assert_stderr_contains("--agent-ca", addr);
        assert!(!out.stderr.contains(TOKEN), "{out}");
        // Refused before any connection attempt (which would take up to its 10 s timeout).
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{addr}: {:?}",
            started.elapsed()
        );
    }
}
