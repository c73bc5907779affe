//! The Kubernetes API double against the real clients: `kubectl` v1.32 (lists, errors,
//! port-forward over the SPDY-over-WebSocket tunnel and over plain SPDY), a raw WebSocket client
//! speaking `v4.channel.k8s.io` byte by byte, and kube-rs (`Api::<Pod>::list/get/portforward`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use soma_tests::kube::{DEFAULT_USER, KubeDouble, PodPhase, PodSpec};
use soma_tests::poll_until;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP echo server on 127.0.0.1 (one thread per connection), standing in for a pod's port.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo server");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                loop {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// An address nothing listens on (bound, then released).
fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A cluster with pods in `shop` (two labelled `app=db`) and one in `other`.
struct Cluster {
    double: KubeDouble,
    dir: TempDir,
    kubeconfig: PathBuf,
    echo: SocketAddr,
}

impl Cluster {
    fn new() -> Cluster {
        let double = KubeDouble::start();
        let echo = echo_server();
        double.add_pod(
            PodSpec::new("shop", "db-0")
                .label("app", "db")
                .label("role", "primary")
                .annotation("soma.dev/agent-port", "7000")
                .forward(7000, echo),
        );
        double.add_pod(PodSpec::new("shop", "db-1").label("app", "db").ready(false));
        double.add_pod(PodSpec::new("shop", "web-0").label("app", "web"));
        double.add_pod(PodSpec::new("other", "db-0").label("app", "db"));
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        double.write_kubeconfig(&kubeconfig, "shop");
        Cluster {
            double,
            dir,
            kubeconfig,
            echo,
        }
    }

    fn kubectl_command(&self, kubeconfig: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("cache"))
            .args(args)
            .env("HOME", self.dir.path())
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    fn kubectl_with(&self, kubeconfig: &Path, args: &[&str]) -> Output {
        self.kubectl_command(kubeconfig, args)
            .output()
            .expect("kubectl is not on PATH (shared/TESTING.md: kubectl v1.32 is installed)")
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(&self.kubeconfig, args)
    }
}

fn stdout_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "kubectl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("kubectl printed JSON")
}

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "kubectl unexpectedly succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn kubectl_lists_and_gets_pods() {
    let c = Cluster::new();
    let all = stdout_json(&c.kubectl(&["get", "pods", "-n", "shop", "-o", "json"]));
    assert_eq!(names(&all), ["db-0", "db-1", "web-0"]);
    // The context's namespace is the default.
    let default_ns = stdout_json(&c.kubectl(&["get", "pods", "-o", "json"]));
    assert_eq!(names(&default_ns), ["db-0", "db-1", "web-0"]);

    let db = stdout_json(&c.kubectl(&["get", "pods", "-l", "app=db", "-o", "json"]));
    assert_eq!(names(&db), ["db-0", "db-1"]);
    let primary = stdout_json(&c.kubectl(&["get", "pods", "-l", "app=db,role", "-o", "json"]));
    assert_eq!(names(&primary), ["db-0"]);
    let not_db = stdout_json(&c.kubectl(&["get", "pods", "-l", "app!=db", "-o", "json"]));
    assert_eq!(names(&not_db), ["web-0"]);
    assert!(
        c.double
            .requests()
            .iter()
            .any(|r| r.path == "/api/v1/namespaces/shop/pods"
                && r.query
                    .as_deref()
                    .unwrap_or("")
                    .contains("labelSelector=app%3Ddb")),
        "the selector reached the server: {:#?}",
        c.double.requests()
    );

    let pod = stdout_json(&c.kubectl(&["get", "pod", "db-0", "-o", "json"]));
    assert_eq!(pod["kind"], "Pod");
    assert_eq!(pod["apiVersion"], "v1");
    assert_eq!(pod["metadata"]["namespace"], "shop");
    assert_eq!(pod["metadata"]["labels"]["role"], "primary");
    assert_eq!(
        pod["metadata"]["annotations"]["soma.dev/agent-port"],
        "7000"
    );
    assert_eq!(pod["status"]["phase"], "Running");
    assert_eq!(
        pod["spec"]["containers"][0]["ports"][0]["containerPort"],
        7000
    );
    let ready = |pod: &Value| {
        pod["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready")
            .map(|c| c["status"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(ready(&pod), "True");
    let rv = pod["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    c.double.set_ready("shop/db-0", false);
    let pod = stdout_json(&c.kubectl(&["get", "pod", "db-0", "-o", "json"]));
    assert_eq!(ready(&pod), "False");
    assert_ne!(pod["metadata"]["resourceVersion"].as_str().unwrap(), rv);

    // jsonpath works on what the server returned, as scripts use it.
    let out = c.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=db",
        "-o",
        "jsonpath={.items[*].status.podIP}",
    ]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).split(' ').count(), 2);
}

#[test]
fn kubectl_shows_the_servers_errors() {
    let c = Cluster::new();
    let err = failure(&c.kubectl(&["get", "pod", "nope"]));
    assert!(
        err.contains("Error from server (NotFound): pods \"nope\" not found"),
        "{err}"
    );
    // kubectl then checks the namespace, to tell a missing namespace apart.
    let err = failure(&c.kubectl(&["get", "pod", "nope", "-n", "nowhere"]));
    assert!(
        err.contains("Error from server (NotFound): namespaces \"nowhere\" not found"),
        "{err}"
    );

    let bad = c.dir.path().join("bad-token");
    c.double
        .kubeconfig()
        .context_with_token("bad", "shop", "not-a-token")
        .write(&bad);
    let err = failure(&c.kubectl_with(&bad, &["get", "pods"]));
    assert!(
        err.contains("You must be logged in to the server (Unauthorized)"),
        "{err}"
    );
    assert!(
        c.double
            .requests()
            .iter()
            .any(|r| r.status == 401 && r.user.is_none())
    );

    c.double.deny("shop", "list", "pods");
    let err = failure(&c.kubectl(&["get", "pods"]));
    let want = format!(
        "Error from server (Forbidden): pods is forbidden: User \"{DEFAULT_USER}\" cannot list resource \"pods\" in API group \"\" in the namespace \"shop\""
    );
    assert!(err.contains(&want), "{err}");
    // Another namespace is unaffected; get is a different verb.
    assert!(c.kubectl(&["get", "pods", "-n", "other"]).status.success());
    assert!(c.kubectl(&["get", "pod", "db-0"]).status.success());
    c.double.deny("shop", "get", "pods");
    let err = failure(&c.kubectl(&["get", "pod", "db-0"]));
    assert!(
        err.contains(&format!(
            "pods \"db-0\" is forbidden: User \"{DEFAULT_USER}\" cannot get resource \"pods\""
        )),
        "{err}"
    );

    // A second user through a second context.
    let token = c.double.add_user("system:serviceaccount:shop:reader");
    let multi = c.dir.path().join("multi");
    c.double
        .kubeconfig()
        .context("admin", "shop")
        .context_with_token("reader", "other", &token)
        .current("reader")
        .write(&multi);
    let list = stdout_json(&c.kubectl_with(&multi, &["get", "pods", "-o", "json"]));
    assert_eq!(names(&list), ["db-0"]);
    assert!(
        c.double
            .requests()
            .iter()
            .any(|r| r.user.as_deref() == Some("system:serviceaccount:shop:reader"))
    );

    // A bad selector is the server's 400.
    c.double.allow_all();
    let err = failure(&c.kubectl(&["get", "pods", "-l", "app in ()"]));
    assert!(err.contains("Error from server (BadRequest)"), "{err}");
}

#[test]
fn anonymous_requests_follow_the_default_rbac() {
    let c = Cluster::new();
    let get = |path: &str| {
        let mut s = TcpStream::connect(c.double.addr()).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        response
    };
    assert!(get("/api/v1/namespaces/shop/pods").starts_with("HTTP/1.1 401"));
    c.double.allow_anonymous(true);
    assert!(get("/version").starts_with("HTTP/1.1 200"));
    let pods = get("/api/v1/namespaces/shop/pods");
    assert!(pods.starts_with("HTTP/1.1 403"), "{pods}");
    assert!(
        pods.contains("User \\\"system:anonymous\\\" cannot list resource"),
        "{pods}"
    );
}

/// Opens a `v4.channel.k8s.io` WebSocket to the double as kube-rs would, byte for byte.
async fn open_v4(
    c: &Cluster,
    pod: &str,
    ports: &str,
    protocols: &str,
) -> (
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    Option<String>,
) {
    let url = format!(
        "{}/api/v1/namespaces/shop/pods/{pod}/portforward?ports={ports}",
        c.double.http_url().replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert(
        "Authorization",
        format!("Bearer {}", c.double.token()).parse().unwrap(),
    );
    headers.insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(c.double.addr())
        .await
        .unwrap();
    let (ws, response) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("WebSocket upgrade");
    let protocol = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .map(|v| v.to_str().unwrap().to_string());
    (ws, protocol)
}

async fn next_binary(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
) -> Option<Vec<u8>> {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("frame in time")
        {
            Some(Ok(Message::Binary(b))) => return Some(b.to_vec()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn v4_channel_protocol_byte_by_byte() {
    let c = Cluster::new();
    let closed = closed_port();
    c.double.set_forward("web-0", 8080, closed);
    runtime().block_on(async {
        // kube-rs offers v5 first; the kubelet's port-forward only speaks v4.
        let (mut ws, protocol) =
            open_v4(&c, "db-0", "7000", "v5.channel.k8s.io, v4.channel.k8s.io").await;
        assert_eq!(protocol.as_deref(), Some("v4.channel.k8s.io"));
        // The port, little-endian, first on the data channel then on the error channel.
        let port = 7000u16.to_le_bytes();
        assert_eq!(next_binary(&mut ws).await.unwrap(), [0, port[0], port[1]]);
        assert_eq!(next_binary(&mut ws).await.unwrap(), [1, port[0], port[1]]);
        ws.send(Message::binary(b"\x00hello through the double".to_vec()))
            .await
            .unwrap();
        let mut echoed = Vec::new();
        while echoed.len() < 24 {
            let frame = next_binary(&mut ws).await.expect("echo");
            assert_eq!(frame[0], 0, "data comes back on the data channel");
            echoed.extend_from_slice(&frame[1..]);
        }
        assert_eq!(echoed, b"hello through the double");
        // Frames on the error channel and unknown channels are ignored.
        ws.send(Message::binary(b"\x01ignored".to_vec()))
            .await
            .unwrap();
        ws.send(Message::binary(b"\x09ignored".to_vec()))
            .await
            .unwrap();
        ws.send(Message::binary(b"\x00again".to_vec()))
            .await
            .unwrap();
        assert_eq!(next_binary(&mut ws).await.unwrap(), b"\x00again");
        ws.close(None).await.unwrap();

        // Nothing listening: the kubelet's error on the error channel, then the server closes.
        let (mut ws, _) = open_v4(&c, "web-0", "8080", "v4.channel.k8s.io").await;
        let port = 8080u16.to_le_bytes();
        assert_eq!(next_binary(&mut ws).await.unwrap(), [0, port[0], port[1]]);
        assert_eq!(next_binary(&mut ws).await.unwrap(), [1, port[0], port[1]]);
        let error = next_binary(&mut ws).await.expect("error message");
        assert_eq!(error[0], 1);
        let text = String::from_utf8(error[1..].to_vec()).unwrap();
        assert!(
            text.starts_with("error forwarding port 8080 to pod ")
                && text.contains("failed to connect to localhost:8080 inside namespace")
                && text.contains("connect: connection refused"),
            "{text}"
        );
        assert_eq!(next_binary(&mut ws).await, None, "the server closes");

        // The base64 variant: text messages, the channel as an ASCII digit.
        let (mut ws, protocol) = open_v4(&c, "db-0", "7000", "v4.base64.channel.k8s.io").await;
        assert_eq!(protocol.as_deref(), Some("v4.base64.channel.k8s.io"));
        let mut texts = Vec::new();
        while texts.len() < 2 {
            match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
                Some(Ok(Message::Text(t))) => texts.push(t.to_string()),
                other => panic!("expected a text message, got {other:?}"),
            }
        }
        // 7000 = 0x1b58, little-endian [0x58, 0x1b] = "WBs=".
        assert_eq!(texts, ["0WBs=", "1WBs="]);
        ws.send(Message::text("0aGk=")).await.unwrap();
        match tokio::time::timeout(TIMEOUT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), "0aGk="),
            other => panic!("expected the echo, got {other:?}"),
        }
        ws.close(None).await.unwrap();

        // Two ports on one connection: channels 0/1 and 2/3.
        c.double.set_forward("shop/db-0", 7001, c.echo);
        let (mut ws, _) = open_v4(&c, "db-0", "7000,7001", "v4.channel.k8s.io").await;
        let mut headers = Vec::new();
        for _ in 0..4 {
            headers.push(next_binary(&mut ws).await.unwrap());
        }
        let p0 = 7000u16.to_le_bytes();
        let p1 = 7001u16.to_le_bytes();
        assert_eq!(
            headers,
            [
                vec![0, p0[0], p0[1]],
                vec![1, p0[0], p0[1]],
                vec![2, p1[0], p1[1]],
                vec![3, p1[0], p1[1]]
            ]
        );
        ws.send(Message::binary(b"\x02second".to_vec()))
            .await
            .unwrap();
        assert_eq!(next_binary(&mut ws).await.unwrap(), b"\x02second");
        ws.close(None).await.unwrap();
    });
    assert_eq!(c.double.port_forward_count(), 4);
    let upgrades: Vec<_> = c
        .double
        .requests()
        .into_iter()
        .filter(|r| r.upgraded)
        .collect();
    assert_eq!(upgrades.len(), 4);
    assert!(
        upgrades
            .iter()
            .all(|r| r.status == 101 && r.method == "GET" && r.protocol.is_some())
    );
}

#[test]
fn port_forward_refusals_follow_the_api_server() {
    let c = Cluster::new();
    c.double
        .add_pod(PodSpec::new("shop", "pending").phase(PodPhase::Pending));
    let rt = runtime();
    let attempt = |pod: &str, query: &str, protocols: &str| {
        rt.block_on(async {
            let url = format!(
                "{}/api/v1/namespaces/shop/pods/{pod}/portforward{query}",
                c.double.http_url().replacen("http", "ws", 1)
            );
            let mut request = url.into_client_request().unwrap();
            request.headers_mut().insert(
                "Authorization",
                format!("Bearer {}", c.double.token()).parse().unwrap(),
            );
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", protocols.parse().unwrap());
            let tcp = tokio::net::TcpStream::connect(c.double.addr())
                .await
                .unwrap();
            match tokio_tungstenite::client_async(request, tcp).await {
                Ok(_) => panic!("upgrade unexpectedly succeeded"),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
                    response.status().as_u16(),
                    String::from_utf8_lossy(response.body().as_deref().unwrap_or(&[])).into_owned(),
                ),
                Err(e) => panic!("unexpected error {e}"),
            }
        })
    };
    let (code, body) = attempt("gone", "?ports=1", "v4.channel.k8s.io");
    assert_eq!(code, 404);
    assert!(
        body.contains(r#""message":"pods \"gone\" not found""#),
        "{body}"
    );
    let (code, body) = attempt("pending", "?ports=1", "v4.channel.k8s.io");
    assert_eq!(code, 400);
    assert!(
        body.contains("pod pending does not have a host assigned"),
        "{body}"
    );
    let (code, body) = attempt("db-0", "", "v4.channel.k8s.io");
    assert_eq!(
        (code, body.trim()),
        (400, "query parameter \"port\" is required")
    );
    let (code, _) = attempt("db-0", "?ports=7000", "v5.channel.k8s.io");
    assert_eq!(code, 403, "no common subprotocol");
    c.double.deny("shop", "create", "pods/portforward");
    let (code, body) = attempt("db-0", "?ports=7000", "v4.channel.k8s.io");
    assert_eq!(code, 403);
    assert!(
        body.contains(&format!(
            r#"pods \"db-0\" is forbidden: User \"{DEFAULT_USER}\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"shop\""#
        )),
        "{body}"
    );
    assert_eq!(c.double.port_forward_count(), 0);
}

#[test]
fn kube_rs_lists_gets_and_port_forwards() {
    let c = Cluster::new();
    // This test binary links both of rustls's providers (aws-sdk-s3 and kube), so name one.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    runtime().block_on(async {
        let kubeconfig = Kubeconfig::read_from(&c.kubeconfig).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        assert_eq!(config.default_namespace, "shop");
        let client = kube::Client::try_from(config).unwrap();
        let pods: Api<Pod> = Api::default_namespaced(client.clone());

        let list = pods
            .list(&ListParams::default().labels("app=db"))
            .await
            .unwrap();
        let mut listed: Vec<_> = list
            .items
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        listed.sort();
        assert_eq!(listed, ["db-0", "db-1"]);
        let db1 = list
            .items
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("db-1"))
            .unwrap();
        let ready = db1
            .status
            .as_ref()
            .unwrap()
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "False");

        let pod = pods.get("db-0").await.unwrap();
        assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
        match pods.get("nope").await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 404);
                assert_eq!(status.message, "pods \"nope\" not found");
            }
            other => panic!("expected a 404 Status, got {other:?}"),
        }

        let mut pf = pods.portforward("db-0", &[7000]).await.unwrap();
        let mut stream = pf.take_stream(7000).unwrap();
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut rd, mut wr) = tokio::io::split(&mut stream);
        let writer = async {
            wr.write_all(&payload).await.unwrap();
        };
        let reader = async {
            let mut back = vec![0u8; payload.len()];
            rd.read_exact(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::time::timeout(TIMEOUT, async { tokio::join!(writer, reader) })
            .await
            .expect("echo in time");
        assert!(back == payload, "200 kB came back intact");
        drop(stream);
        tokio::time::timeout(TIMEOUT, pf.join())
            .await
            .unwrap()
            .unwrap();

        // An error on the error channel reaches kube-rs's error future.
        c.double.set_forward("web-0", 9, closed_port());
        let mut pf = pods.portforward("web-0", &[9]).await.unwrap();
        let error = tokio::time::timeout(TIMEOUT, pf.take_error(9).unwrap())
            .await
            .unwrap()
            .expect("an error message");
        assert!(error.contains("connection refused"), "{error}");

        c.double.deny("shop", "list", "pods");
        match pods.list(&ListParams::default()).await {
            Err(kube::Error::Api(status)) => {
                assert_eq!(status.code, 403);
                assert!(
                    status.message.starts_with("pods is forbidden: User"),
                    "{}",
                    status.message
                );
            }
            other => panic!("expected a 403 Status, got {other:?}"),
        }
    });
    assert_eq!(c.double.port_forward_count(), 2);
    assert!(c.double.forwarded_connections() >= 1);
}

/// A running `kubectl port-forward`, killed on drop.
struct PortForward {
    child: Child,
    local: u16,
    stderr: mpsc::Receiver<String>,
}

impl PortForward {
    fn start(c: &Cluster, target: &str, remote: u16, websockets: bool) -> PortForward {
        let mut cmd = c.kubectl_command(
            &c.kubeconfig,
            &["port-forward", target, &format!(":{remote}")],
        );
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        if !websockets {
            cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
        }
        let mut child = cmd.spawn().expect("kubectl is not on PATH");
        let (line_tx, line_rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = line_tx.send(line);
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = err_tx.send(line);
            }
        });
        // "Forwarding from 127.0.0.1:PORT -> REMOTE", printed once the upgrade succeeded.
        let deadline = Instant::now() + TIMEOUT;
        let local = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match line_rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                        break rest.split(' ').next().unwrap().parse().unwrap();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let errors: Vec<String> = err_rx.try_iter().collect();
                    panic!("kubectl port-forward did not start: {}", errors.join("\n"));
                }
            }
        };
        PortForward {
            child,
            local,
            stderr: err_rx,
        }
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn echo_through(local: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", local)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut writer = s.try_clone().unwrap();
    let data = payload.to_vec();
    let sender = std::thread::spawn(move || writer.write_all(&data).unwrap());
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).unwrap();
    sender.join().unwrap();
    back
}

#[test]
fn kubectl_port_forward_over_the_websocket_tunnel() {
    let c = Cluster::new();
    let pf = PortForward::start(&c, "pod/db-0", 7000, true);
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    assert!(echo_through(pf.local, &payload) == payload, "1 MB echoed");
    // A second connection through the same tunnel: a new SPDY stream pair.
    assert_eq!(echo_through(pf.local, b"again"), b"again");
    assert_eq!(c.double.port_forward_count(), 1);
    poll_until(TIMEOUT, "two forwarded connections", || {
        (c.double.forwarded_connections() == 2).then_some(())
    });
    let upgrade = c
        .double
        .requests()
        .into_iter()
        .find(|r| r.upgraded)
        .expect("an upgraded request");
    assert_eq!(upgrade.method, "GET");
    assert_eq!(
        upgrade.path,
        "/api/v1/namespaces/shop/pods/db-0/portforward"
    );
    assert_eq!(
        upgrade.protocol.as_deref(),
        Some("SPDY/3.1+portforward.k8s.io")
    );
    drop(pf);
}

#[test]
fn kubectl_port_forward_over_plain_spdy() {
    let c = Cluster::new();
    let pf = PortForward::start(&c, "db-0", 7000, false);
    assert_eq!(echo_through(pf.local, b"spdy!"), b"spdy!");
    let upgrade = c
        .double
        .requests()
        .into_iter()
        .find(|r| r.upgraded)
        .unwrap();
    assert_eq!(upgrade.method, "POST");
    assert_eq!(upgrade.protocol.as_deref(), Some("portforward.k8s.io"));
    assert!(
        !c.double
            .requests()
            .iter()
            .any(|r| r.method == "GET" && r.path.ends_with("/portforward")),
        "no WebSocket attempt"
    );
}

#[test]
fn kubectl_port_forward_errors() {
    let c = Cluster::new();
    // Nothing listens on the pod's port: kubectl reports the kubelet's message and gives up.
    c.double.set_forward("web-0", 8080, closed_port());
    let pf = PortForward::start(&c, "web-0", 8080, true);
    let mut s = TcpStream::connect(("127.0.0.1", pf.local)).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        s.read(&mut buf).unwrap_or(0),
        0,
        "the local connection is closed"
    );
    let mut seen = Vec::new();
    let line = poll_until(TIMEOUT, "kubectl's error line", || {
        seen.extend(pf.stderr.try_iter());
        seen.iter()
            .find(|l| l.contains("connection refused"))
            .cloned()
    });
    assert!(line.contains("error forwarding port 8080 to pod"), "{line}");
    drop(pf);

    // RBAC: without create on pods/portforward both the WebSocket and the SPDY attempt fail.
    c.double.clear_requests();
    c.double.deny("shop", "create", "pods/portforward");
    let out = c.kubectl(&["port-forward", "db-0", ":7000"]);
    let err = failure(&out);
    assert!(
        err.contains("cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"shop\""),
        "{err}"
    );
    let attempts: Vec<String> = c
        .double
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/portforward"))
        .map(|r| format!("{} {}", r.method, r.status))
        .collect();
    assert_eq!(
        attempts,
        ["GET 403", "POST 403"],
        "tunnel first, then the SPDY fallback"
    );

    // kubectl itself refuses a pod that is not running, after reading it from the server.
    c.double.allow_all();
    c.double.set_phase("db-1", PodPhase::Succeeded);
    let err = failure(&c.kubectl(&["port-forward", "db-1", ":7000"]));
    assert!(err.contains("pod is not running"), "{err}");
}
