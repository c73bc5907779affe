//! Proves the agent speaks standard gRPC beyond its own service, as `grpcurl` and Kubernetes
//! probes expect, and that its API is closed to whoever lacks its token:
//! - the `grpc.health.v1.Health` service reports SERVING for `soma.v1.SomaAgent`, with no token
//!   (the kubelet's gRPC probes carry none);
//! - server reflection (v1) lists the services — only with `--reflection`, and behind the token;
//! - with `--token-file`, every call of the API without the token, or with another one, is
//!   `Unauthenticated` with a message naming the fix; the plugin passes with `--token-file` or
//!   `SOMA_AGENT_TOKEN`, fails clearly without, and never prints the token;
//! - the agent refuses to listen on a non-loopback address without a token.

use soma_tests::{Agent, PgCluster, TestStore, bin_path, soma, soma_env};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const TOKEN: &str = "t0ken-for-the-grpc-test-Zq81";

/// A request carrying `authorization: Bearer <token>` when a token is given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

/// The services reflection lists, or the status it answered with.
async fn reflected(channel: Channel, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(with_token(tokio_stream::iter([request]), token))
        .await?
        .into_inner();
    let response = responses.next().await.expect("a reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    Ok(list.service.into_iter().map(|s| s.name).collect())
}

async fn health(channel: Channel) -> i32 {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "soma.v1.SomaAgent".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn get_info(channel: Channel, token: Option<&str>) -> Result<(), tonic::Status> {
    soma_proto::v1::soma_agent_client::SomaAgentClient::new(channel)
        .get_info(with_token(soma_proto::v1::GetInfoRequest {}, token))
        .await
        .map(drop)
}

async fn connect(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[test]
fn health_answers_and_reflection_is_off_by_default() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = connect(agent.addr()).await;
        assert_eq!(health(channel.clone()).await, ServingStatus::Serving as i32);
        let refused = reflected(channel.clone(), None).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
        // Without a token the loopback agent serves anyone on the host, as before.
        get_info(channel, None).await.unwrap();
    });
}

#[test]
fn the_api_requires_the_token_and_health_does_not() {
    let store = TestStore::local();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let token_arg = token_file.display().to_string();
    let agent = Agent::start(
        &store.url(),
        "",
        &["--token-file", &token_arg, "--reflection"],
        &store.env(),
    );
    let a = agent.addr();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = connect(a).await;
        assert_eq!(health(channel.clone()).await, ServingStatus::Serving as i32);

        let missing = get_info(channel.clone(), None).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("--token-file"), "{missing:?}");
        let wrong = get_info(channel.clone(), Some("another-token-of-enough-length"))
            .await
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("not this agent's"), "{wrong:?}");
        get_info(channel.clone(), Some(TOKEN)).await.unwrap();

        let refused = reflected(channel.clone(), None).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        let names = reflected(channel, Some(TOKEN)).await.unwrap();
        for expected in ["soma.v1.SomaAgent", "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
    });

    // The plugin: refused without a token, passing with --token-file or SOMA_AGENT_TOKEN; the
    // token never appears in what it prints.
    let out = soma(a, &["list"]);
    assert_ne!(out.code, 0, "list without a token succeeded:\n{out}");
    out.assert_stderr_contains("bearer token", "list without a token");
    out.assert_stderr_contains("--token-file", "list without a token");
    soma(a, &["--token-file", &token_arg, "list"]).assert_success("list --token-file");
    soma_env(a, &["list"], &[("SOMA_AGENT_TOKEN", TOKEN)])
        .assert_success("list with SOMA_AGENT_TOKEN");
    let out = soma_env(
        a,
        &["-o", "json", "status"],
        &[("SOMA_AGENT_TOKEN", "wrong-token-0123456789")],
    );
    assert_ne!(out.code, 0, "status with a wrong token succeeded:\n{out}");
    // status reports each agent's health rather than stopping at the first error.
    assert!(
        out.json()[0]["health"]
            .as_str()
            .unwrap()
            .contains("not this agent's"),
        "{out}"
    );
    let out = soma_env(a, &["list", "--token-file", &token_arg, "-o", "json"], &[]);
    out.assert_success("list -o json --token-file");
    assert!(
        !out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN),
        "{out}"
    );
    let log = agent.logs();
    assert!(!log.contains(TOKEN), "the agent logged its token:\n{log}");
}

#[test]
fn refuses_to_listen_beyond_loopback_without_a_token() {
    let store = TestStore::local();
    // TEST-NET-1 (RFC 5737): no interface has it, so nothing could bind even if the check failed.
    let out = std::process::Command::new(bin_path("soma-agent"))
        .args(["--listen", "192.0.2.1:50051", "--store", &store.url()])
        .env_remove("SOMA_AGENT_TOKEN_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("refusing to listen on 192.0.2.1:50051 without --token-file"),
        "{stderr}"
    );
}

/// With `--tls-cert/--tls-key` the API is served over TLS only: a client that trusts the CA
/// reaches it (the token still required), a plaintext client gets nothing, and a client that does
/// not trust the CA refuses the server. This is the case of an agent reached over a network, where
/// the token must not travel in clear.
#[test]
fn with_tls_the_api_is_served_over_tls_only() {
    let store = TestStore::local();
    let dir = tempfile::tempdir().unwrap();
    let cert = soma_tests::tls::serving_cert("soma-agent");
    let (token_file, chain, key, ca) = (
        dir.path().join("token"),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::write(&chain, &cert.chain_pem).unwrap();
    std::fs::write(&key, &cert.key_pem).unwrap();
    std::fs::write(&ca, &cert.ca_pem).unwrap();
    let args = [
        "--token-file",
        token_file.to_str().unwrap(),
        "--tls-cert",
        chain.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let agent = Agent::start(&store.url(), "", &args, &store.env());
    let a = agent.addr().to_owned();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tls = |ca_pem: &str| {
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
                .domain_name("localhost")
        };
        let channel = Channel::from_shared(format!("https://{a}"))
            .unwrap()
            .tls_config(tls(&cert.ca_pem))
            .unwrap()
            .connect()
            .await
            .expect("a TLS connection to the agent");
        let missing = get_info(channel.clone(), None).await.unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        get_info(channel, Some(TOKEN)).await.unwrap();

        // Plaintext: no answer at all, whatever it carries.
        let plain = Channel::from_shared(format!("http://{a}")).unwrap();
        let refused = match plain.connect().await {
            Ok(channel) => get_info(channel, Some(TOKEN)).await.is_err(),
            Err(_) => true,
        };
        assert!(refused, "a plaintext client reached the TLS agent");

        // A client trusting another CA refuses the agent's certificate.
        let other = soma_tests::tls::serving_cert("impostor");
        let untrusted = match Channel::from_shared(format!("https://{a}"))
            .unwrap()
            .tls_config(tls(&other.ca_pem))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => get_info(channel, Some(TOKEN)).await.is_err(),
            Err(_) => true,
        };
        assert!(untrusted, "a client trusting another CA accepted the agent");
    });

    // The plugin: over TLS with --agent-ca (the certificate names 127.0.0.1, the host given),
    // refused without it.
    let token_arg = token_file.display().to_string();
    let ca_arg = ca.display().to_string();
    soma_env(
        &a,
        &["list", "--token-file", &token_arg, "--agent-ca", &ca_arg],
        &[],
    )
    .assert_success("list over TLS with --agent-ca");
    let plain = soma_env(&a, &["list", "--token-file", &token_arg], &[]);
    assert_ne!(
        plain.code, 0,
        "list in plaintext reached a TLS agent:\n{plain}"
    );

    // A key that does not belong to the certificate is refused at start-up, naming the flags.
    let other = soma_tests::tls::serving_cert("other");
    std::fs::write(&key, &other.key_pem).unwrap();
    let exit = Agent::try_start(&store.url(), "", &args, &store.env());
    match exit {
        Ok(_) => panic!("the agent started with a key of another certificate"),
        Err(exit) => assert!(exit.output.contains("--tls-key"), "{}", exit.output),
    }
}
