//! The HTTP side: one hyper HTTP/1.1 connection task per client (with upgrades), then per
//! request the API server's filter order — authentication, authorization, then the handler
//! (`staging/src/k8s.io/apiserver/pkg/server/config.go` `DefaultBuildHandlerChain`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::forward::PodKey;
use super::selector::{FieldSelector, LabelSelector};
use super::state::Shared;
use super::{PodPhase, RequestRecord, channel, objects, spdy, tunnel};

pub(super) type Body = Full<Bytes>;

/// The anonymous user (`user.Anonymous`).
pub(super) const ANONYMOUS: &str = "system:anonymous";

/// Accepts connections until the runtime is shut down: TLS when the client's first byte is a
/// TLS handshake record (0x16), plain HTTP otherwise, on the same port.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 1];
            let tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
            if tls {
                if let Ok(stream) = acceptor.accept(stream).await {
                    serve_connection(stream, shared).await;
                }
            } else {
                serve_connection(stream, shared).await;
            }
        });
    }
}

async fn serve_connection<IO>(io: IO, shared: Arc<Shared>)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, req).await) }
    });
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
}

pub(super) fn json(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(body).expect("JSON values serialise"),
        )))
        .expect("static response parts are valid")
}

/// A `Status` error response with its own code.
pub(super) fn status(body: Value) -> Response<Body> {
    let code = body["code"].as_u64().unwrap_or(500) as u16;
    json(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

fn text(code: StatusCode, body: &str) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header("X-Content-Type-Options", "nosniff")
        .body(Full::new(Bytes::from(format!("{body}\n"))))
        .expect("static response parts are valid")
}

fn bad_request(message: &str) -> Response<Body> {
    status(objects::status(400, "BadRequest", message, None))
}

/// How the request authenticated.
enum Auth {
    User(String),
    Failed,
}

fn authenticate(shared: &Shared, headers: &HeaderMap) -> Auth {
    let inner = shared.lock();
    match headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        Some(value) => {
            // `bearertoken.Authenticator`: scheme case-insensitive, token after one space.
            let token = value
                .split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, t)| t.trim());
            match token.and_then(|t| inner.users.get(t)) {
                Some(user) => Auth::User(user.clone()),
                None => Auth::Failed,
            }
        }
        None if inner.anonymous => Auth::User(ANONYMOUS.to_string()),
        None => Auth::Failed,
    }
}

fn query_map(query: Option<&str>) -> HashMap<String, Vec<String>> {
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        map.entry(k.into_owned()).or_default().push(v.into_owned());
    }
    map
}

fn first<'a>(q: &'a HashMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    q.get(key).and_then(|v| v.first()).map(String::as_str)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let auth = authenticate(&shared, req.headers());
    let seq = {
        let mut inner = shared.lock();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        inner.requests.push(RequestRecord {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
            user: match &auth {
                Auth::User(u) => Some(u.clone()),
                Auth::Failed => None,
            },
            status: 0,
            upgraded: false,
            protocol: None,
            seq,
        });
        seq
    };
    let response = match auth {
        // `WithAuthentication` → `Unauthorized`.
        Auth::Failed => status(objects::status(401, "Unauthorized", "Unauthorized", None)),
        Auth::User(user) => route(&shared, req, &path, query.as_deref(), &user).await,
    };
    let code = response.status().as_u16();
    let protocol = response
        .extensions()
        .get::<Negotiated>()
        .map(|n| n.0.clone());
    let mut inner = shared.lock();
    if let Some(record) = inner.requests.iter_mut().rev().find(|r| r.seq == seq) {
        record.status = code;
        if code == 101 {
            record.upgraded = true;
            record.protocol = protocol;
        }
    }
    response
}

/// The negotiated protocol of an upgrade, for the request log.
#[derive(Clone)]
struct Negotiated(String);

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    path: &str,
    query: Option<&str>,
    user: &str,
) -> Response<Body> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let anonymous = user == ANONYMOUS;
    // Non-resource paths: `system:discovery` and `system:public-info-viewer` let every
    // authenticated user read them; anonymous users only `/version` (and the health checks).
    let non_resource = |body: Value| {
        if method != Method::GET {
            return status(objects::status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                None,
            ));
        }
        if anonymous && path != "/version" {
            return status(objects::forbidden_path(user, "get", path));
        }
        json(StatusCode::OK, &body)
    };
    match segments.as_slice() {
        ["version"] => return non_resource(objects::version()),
        ["api"] => {
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("127.0.0.1")
                .to_string();
            return non_resource(objects::api_versions(&host));
        }
        ["apis"] => return non_resource(objects::api_group_list()),
        ["api", "v1"] => return non_resource(objects::core_v1_resources()),
        _ => {}
    }
    if let ["api", "v1", "namespaces", rest @ ..] = segments.as_slice()
        && rest.len() <= 1
    {
        return namespaces(shared, &method, rest.first().copied(), user);
    }
    if let ["api", "v1", "namespaces", ns, "secrets", name] = segments.as_slice() {
        return super::secrets::get(shared, &method, ns, name, user);
    }
    let (namespace, name, sub) = match segments.as_slice() {
        ["api", "v1", "pods"] => (None, None, None),
        ["api", "v1", "namespaces", ns, "pods"] => (Some(*ns), None, None),
        ["api", "v1", "namespaces", ns, "pods", name] => (Some(*ns), Some(*name), None),
        ["api", "v1", "namespaces", ns, "pods", name, sub] => (Some(*ns), Some(*name), Some(*sub)),
        ["api", ..] | ["apis", ..] => {
            return status(objects::status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                Some(serde_json::json!({})),
            ));
        }
        _ => return text(StatusCode::NOT_FOUND, "404 page not found"),
    };
    let q = query_map(query);
    // `RequestInfoFactory.NewRequestInfo`: the verb from the method and the path's shape.
    let verb = match (&method, name) {
        (&Method::GET, None) if first(&q, "watch").is_some_and(|w| w == "true" || w == "1") => {
            "watch"
        }
        (&Method::GET, None) => "list",
        (&Method::GET, Some(_)) => "get",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, None) => "deletecollection",
        (&Method::DELETE, Some(_)) => "delete",
        _ => "unknown",
    };
    let ns = namespace.unwrap_or("");
    let resource_name = match sub {
        Some(s) => format!("pods/{s}"),
        None => "pods".to_string(),
    };
    let allowed = |verb: &str| {
        let inner = shared.lock();
        // Default RBAC grants `system:anonymous` nothing on resources.
        !anonymous && !inner.denied(ns, verb, &resource_name)
    };
    if !allowed(verb) {
        return status(objects::forbidden(user, verb, "pods", sub, ns, name));
    }

    match (sub, name) {
        (None, None) if method == Method::GET => {
            if verb == "watch" {
                return status(objects::status(
                    405,
                    "MethodNotAllowed",
                    "the Kubernetes double does not serve watches",
                    None,
                ));
            }
            list_pods(shared, namespace, &q)
        }
        (None, Some(name)) if method == Method::GET => {
            let inner = shared.lock();
            match inner.pods.get(&(ns.to_string(), name.to_string())) {
                Some(pod) => json(StatusCode::OK, &objects::pod(pod, true)),
                None => status(objects::pod_not_found(name)),
            }
        }
        (Some("portforward"), Some(name)) if method == Method::GET || method == Method::POST => {
            port_forward(shared, req, &q, ns, name, user)
        }
        (Some("status"), Some(name)) if method == Method::GET => {
            let inner = shared.lock();
            match inner.pods.get(&(ns.to_string(), name.to_string())) {
                Some(pod) => json(StatusCode::OK, &objects::pod(pod, true)),
                None => status(objects::pod_not_found(name)),
            }
        }
        (Some(_), Some(_)) if !matches!(sub, Some("portforward" | "status")) => {
            status(objects::status(
                404,
                "NotFound",
                "the server could not find the requested resource",
                Some(serde_json::json!({})),
            ))
        }
        _ => status(objects::status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        )),
    }
}

/// `namespaces` (cluster-scoped): list and get.
fn namespaces(shared: &Shared, method: &Method, name: Option<&str>, user: &str) -> Response<Body> {
    if method != Method::GET {
        return status(objects::status(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            None,
        ));
    }
    let verb = if name.is_some() { "get" } else { "list" };
    let inner = shared.lock();
    if user == ANONYMOUS || inner.denied("", verb, "namespaces") {
        return status(objects::forbidden(user, verb, "namespaces", None, "", name));
    }
    match name {
        None => json(
            StatusCode::OK,
            &objects::namespace_list(inner.namespaces.values(), inner.revision),
        ),
        Some(name) => match inner.namespaces.get(name) {
            Some(ns) => json(StatusCode::OK, &objects::namespace(ns, true)),
            None => status(objects::not_found("namespaces", name)),
        },
    }
}

fn list_pods(
    shared: &Shared,
    namespace: Option<&str>,
    q: &HashMap<String, Vec<String>>,
) -> Response<Body> {
    let labels = match LabelSelector::parse(first(q, "labelSelector").unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    let fields = match FieldSelector::parse(first(q, "fieldSelector").unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return bad_request(&e),
    };
    let inner = shared.lock();
    let pods = inner
        .pods
        .values()
        .filter(|p| namespace.is_none_or(|ns| p.spec.namespace == ns))
        .filter(|p| labels.matches(&p.spec.labels) && fields.matches(p));
    json(StatusCode::OK, &objects::pod_list(pods, inner.revision))
}

/// `Connection` lists `upgrade` (`connectionUpgradeRegex`).
fn connection_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// The `ports` query parameter (`PodPortForwardOptions.Ports`), repeated or comma-separated.
fn requested_ports(q: &HashMap<String, Vec<String>>) -> Result<Vec<u16>, String> {
    let values = q.get("ports").cloned().unwrap_or_default();
    if values.is_empty() {
        return Err("query parameter \"port\" is required".to_string());
    }
    let mut ports = Vec::new();
    for value in &values {
        if value.is_empty() {
            return Err("query parameter \"port\" cannot be empty".to_string());
        }
        for p in value.split(',') {
            let port: u16 = p
                .parse()
                .map_err(|e| format!("unable to parse {value:?} as a port: {e}"))?;
            if port < 1 {
                return Err(format!("port {value:?} must be > 0"));
            }
            ports.push(port);
        }
    }
    Ok(ports)
}

/// `PortForwardREST.Connect` (API server) and `ServePortForward` (kubelet), together.
fn port_forward(
    shared: &Arc<Shared>,
    mut req: Request<Incoming>,
    q: &HashMap<String, Vec<String>>,
    ns: &str,
    name: &str,
    user: &str,
) -> Response<Body> {
    let headers = req.headers().clone();
    let websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
        && connection_upgrade(&headers);
    // v1.35 `AuthorizePodWebsocketUpgradeCreatePermission`: a WebSocket upgrade (a GET, so
    // authorized as `get` above) must also be allowed to `create`.
    if websocket
        && req.method() == Method::GET
        && shared.lock().denied(ns, "create", "pods/portforward")
    {
        return status(objects::forbidden(
            user,
            "create",
            "pods",
            Some("portforward"),
            ns,
            Some(name),
        ));
    }
    let phase = {
        let inner = shared.lock();
        match inner.pods.get(&(ns.to_string(), name.to_string())) {
            Some(pod) => pod.spec.phase,
            None => return status(objects::pod_not_found(name)),
        }
    };
    if phase == PodPhase::Pending {
        return bad_request(&format!("pod {name} does not have a host assigned"));
    }
    let pod = PodKey {
        namespace: ns.to_string(),
        name: name.to_string(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);

    if websocket {
        let Some(key) = headers.get("sec-websocket-key").cloned() else {
            return text(StatusCode::BAD_REQUEST, "Bad Request");
        };
        let offered = header_values(&headers, "sec-websocket-protocol");
        let tunnelled: Vec<String> = offered
            .iter()
            .filter(|p| p.starts_with(tunnel::PREFIX) && p.ends_with(".k8s.io"))
            .map(|p| p[tunnel::PREFIX.len()..].to_string())
            .collect();
        let (protocol, session): (String, Session) = if !tunnelled.is_empty() {
            // `TunnelingHandler` → kubelet `httpstream.Handshake` on the SPDY protocols.
            if !tunnelled.iter().any(|p| p == spdy::PORT_FORWARD_PROTOCOL) {
                return negotiation_failed(&tunnelled);
            }
            (
                format!("{}{}", tunnel::PREFIX, spdy::PORT_FORWARD_PROTOCOL),
                Session::Tunnel,
            )
        } else {
            let ports = match requested_ports(q) {
                Ok(p) => p,
                Err(e) => return text(StatusCode::BAD_REQUEST, &e),
            };
            let Some(protocol) = channel::negotiate(&offered) else {
                // x/net/websocket answers a failed handshake with a bare 403.
                return Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .body(Full::new(Bytes::new()))
                    .expect("static response parts are valid");
            };
            let base64 = protocol == channel::BASE64;
            (protocol, Session::Channels { base64, ports })
        };
        shared.lock().port_forwards += 1;
        let shared = shared.clone();
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let ws =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            match session {
                Session::Tunnel => tunnel::serve(ws, shared, pod).await,
                Session::Channels { base64, ports } => {
                    channel::serve(ws, base64, ports, shared, pod).await;
                }
            }
        });
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::UPGRADE, "websocket")
            .header(header::CONNECTION, "Upgrade")
            .header(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()),
            );
        if !protocol.is_empty() {
            response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol.as_str());
        }
        let mut response = response
            .body(Full::new(Bytes::new()))
            .expect("static response parts are valid");
        response.extensions_mut().insert(Negotiated(protocol));
        return response;
    }

    let spdy_upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("spdy/3.1"))
        && connection_upgrade(&headers);
    if !spdy_upgrade {
        return bad_request("Upgrade request required");
    }
    // `httpstream.Handshake`.
    let offered = header_values(&headers, "x-stream-protocol-version");
    if offered.is_empty() {
        return text(
            StatusCode::BAD_REQUEST,
            "unable to upgrade: X-Stream-Protocol-Version is required",
        );
    }
    if !offered.iter().any(|p| p == spdy::PORT_FORWARD_PROTOCOL) {
        return negotiation_failed(&offered);
    }
    shared.lock().port_forwards += 1;
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            spdy::serve(TokioIo::new(upgraded), shared, pod).await;
        }
    });
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header(
            "X-Stream-Protocol-Version",
            HeaderValue::from_static(spdy::PORT_FORWARD_PROTOCOL),
        )
        .body(Full::new(Bytes::new()))
        .expect("static response parts are valid");
    response
        .extensions_mut()
        .insert(Negotiated(spdy::PORT_FORWARD_PROTOCOL.to_string()));
    response
}

enum Session {
    Tunnel,
    Channels { base64: bool, ports: Vec<u16> },
}

/// `httpstream.Handshake` when no protocol matches: 403, the accepted versions in a header.
fn negotiation_failed(offered: &[String]) -> Response<Body> {
    let mut response = text(
        StatusCode::FORBIDDEN,
        &format!(
            "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{}]",
            offered.join(" "),
            spdy::PORT_FORWARD_PROTOCOL
        ),
    );
    response.headers_mut().insert(
        "X-Accepted-Stream-Protocol-Versions",
        HeaderValue::from_static(spdy::PORT_FORWARD_PROTOCOL),
    );
    response
}
