//! A test double of the Kubernetes API server (and of the kubelet and container runtime behind
//! its `pods/portforward` subresource). There is no cluster here (see shared/TESTING.md), so this
//! stands in for one: `kubectl` and the Rust `kube` crate talk to it over the real wire protocol.
//!
//! [`KubeDouble::start`] serves HTTP/1.1 on `127.0.0.1:<random port>` from its own runtime, so
//! synchronous tests can use it: HTTPS with a certificate from a throwaway CA ([`KubeDouble::url`],
//! [`KubeDouble::ca_pem`]) and, on the same port, plain HTTP ([`KubeDouble::http_url`]).
//! [`KubeDouble::write_kubeconfig`] writes a real kubeconfig (cluster with
//! `certificate-authority-data`, bearer-token user, context with a default namespace) for
//! `kubectl --kubeconfig` and `kube::Config::from_custom_kubeconfig`. TLS is not decoration:
//! kubectl (client-go `clientcmd`) only sends a kubeconfig user's credentials over TLS, so
//! against `server: http://...` it would send no token at all. A port-forward to a pod is
//! relayed to a real TCP address the test registered for that pod's port ([`PodSpec::forward`]),
//! so real gRPC runs through it.
//!
//! Verified against kubectl v1.32 and kube-rs 5 in `tests/tests/kube_double.rs`: `get` (lists,
//! label selectors, single pods, jsonpath), the 401/403/404 messages kubectl prints, kubectl
//! `port-forward` over both the SPDY-over-WebSocket tunnel and plain SPDY (1 MB echoed), the v4
//! channel protocol byte by byte, and kube-rs `list`/`get`/`portforward`.
//!
//! # What follows upstream Kubernetes (server v1.35, kubectl v1.32 client)
//! Paths are in the kubernetes/kubernetes repository unless another repository is named.
//!
//! - **Objects** (`staging/src/k8s.io/api/core/v1/types.go`): `Pod` with `metadata` (name,
//!   namespace, uid, resourceVersion, creationTimestamp, labels, annotations), `spec.containers`
//!   (ports with protocol TCP), `spec.nodeName`, `status.phase`, `status.conditions` (including
//!   `Ready`), `status.podIP(s)`, `status.containerStatuses`. A `PodList` carries
//!   `metadata.resourceVersion` and, like the real server, items *without* `kind`/`apiVersion`
//!   (kubectl adds them back). Empty label/annotation maps are omitted (`omitempty`).
//! - **Errors** are `Status` objects (`staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go`):
//!   `NewNotFound` → 404 `pods "x" not found` with `details {name, kind: "pods"}`;
//!   `NewForbidden` → 403 `pods "x" is forbidden: ...` / `pods is forbidden: ...` for a
//!   collection; `NewUnauthorized` → 401 `Unauthorized`; `NewBadRequest` → 400. The forbidden
//!   reason is `forbiddenMessage` (`staging/src/k8s.io/apiserver/pkg/endpoints/handlers/
//!   responsewriters/errors.go`): `User "U" cannot VERB resource "pods[/sub]" in API group ""
//!   in the namespace "NS"`.
//! - **Authentication**: `Authorization: Bearer <token>`; an unknown token is 401 even when
//!   anonymous requests are allowed (`WithAuthentication`). Without a token the request is 401,
//!   unless [`KubeDouble::allow_anonymous`] is on (kube-apiserver `--anonymous-auth=true`): then
//!   it runs as `system:anonymous`, which the default RBAC policy lets read only `/version`
//!   (`system:public-info-viewer`), so everything else is 403.
//! - **Authorization** (`staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`):
//!   GET of a collection is `list` (`watch` with `watch=true`), GET of a name is `get`, POST is
//!   `create`. Everything is allowed except what the test [`KubeDouble::deny`]s. A WebSocket
//!   upgrade of `pods/portforward` is a GET, so it needs `get`, and since v1.35
//!   (`AuthorizePodWebsocketUpgradeCreatePermission`, beta and on by default; kubernetes PR
//!   134577) also `create`, exactly as the SPDY upgrade (a POST) does.
//! - **Discovery**: `/version`, and the *legacy* discovery documents `/api` (`APIVersions`),
//!   `/apis` (`APIGroupList`, no groups) and `/api/v1` (`APIResourceList` with `pods`, its
//!   subresources and `namespaces`). A client asking for aggregated discovery
//!   (`as=APIGroupDiscoveryList`) gets the legacy document with `Content-Type:
//!   application/json` and falls back, as client-go does against servers before 1.26.
//! - **Namespaces** exist apart from pods (`default` and the `kube-*` ones always; a pod's is
//!   created with it; [`KubeDouble::add_namespace`]): `GET /api/v1/namespaces[/NAME]`. kubectl
//!   needs this: after a 404 on a pod it reads the namespace, to report `namespaces "x" not
//!   found` instead when that is the cause. Listing pods of a namespace that does not exist is
//!   an empty list, as in the API.
//! - **Label selectors** (`staging/src/k8s.io/apimachinery/pkg/labels/selector.go`): `k=v`,
//!   `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, comma-separated (AND). A selector
//!   that does not parse is a 400 `Status`. `fieldSelector` supports `metadata.name`,
//!   `metadata.namespace` and `status.phase` (the pod field selectors kubectl uses).
//! - **Port-forward, server side** (`pkg/registry/core/pod/rest/subresources.go`,
//!   `pkg/registry/core/pod/strategy.go` `PortForwardLocation`): the pod must exist (404) and be
//!   scheduled — a `Pending` pod here is unscheduled: 400 `pod x does not have a host assigned`.
//!   A request without an upgrade is 400 `Upgrade request required`. Then one of three protocols:
//!   1. **`v4.channel.k8s.io`** (WebSocket; what kube-rs `Api::<Pod>::portforward` speaks;
//!      `pkg/kubelet/cri/streaming/portforward/websocket.go` and
//!      `staging/src/k8s.io/apimachinery/pkg/util/httpstream/wsstream/conn.go`). The subprotocol
//!      is the first of the client's `Sec-WebSocket-Protocol` list that the kubelet supports
//!      (`""`, `v4.channel.k8s.io`, `v4.base64.channel.k8s.io`); none → 403 with an empty body
//!      (`x/net/websocket` handshake failure). Ports come from the `ports` query parameter
//!      (repeated or comma-separated); none → 400 `query parameter "port" is required` (the
//!      kubelet's text, passed through by the API server). For the i-th port, channel `2i`
//!      carries data both ways and `2i+1` errors from the server; the first message the server
//!      sends on each channel is the port as 2 bytes little-endian; every binary message starts
//!      with its channel byte (with the base64 protocol: text messages, channel as an ASCII
//!      digit, payload base64). Messages on unknown or write-only channels and empty messages
//!      are ignored. When every port's forwarding has ended the server closes the WebSocket;
//!      when the client closes it, forwarding stops.
//!   2. **SPDY/3.1 tunnelled over WebSocket** (KEP-4006; what kubectl ≥ 1.31 tries first unless
//!      `KUBECTL_PORT_FORWARD_WEBSOCKETS=false`): a WebSocket upgrade offering
//!      `SPDY/3.1+portforward.k8s.io` (`staging/src/k8s.io/apiserver/pkg/util/proxy/
//!      streamtunnel.go`, `staging/src/k8s.io/client-go/tools/portforward/tunneling_dialer.go`,
//!      `tunneling_connection.go`). Binary WebSocket messages carry the raw SPDY byte stream,
//!      split anywhere; the server answers with the subprotocol `SPDY/3.1+` + the negotiated
//!      `portforward.k8s.io`.
//!   3. **SPDY/3.1** directly (`Upgrade: SPDY/3.1`, `X-Stream-Protocol-Version:
//!      portforward.k8s.io`; kubectl's fallback): 101 with `Connection: Upgrade`, `Upgrade:
//!      SPDY/3.1`, `X-Stream-Protocol-Version: portforward.k8s.io`; an unsupported protocol is
//!      403 `unable to upgrade: unable to negotiate protocol: ...` (`httpstream.Handshake`).
//!
//!   Over SPDY (`pkg/kubelet/cri/streaming/portforward/httpstream.go`, github.com/moby/spdystream)
//!   the client opens an *error* then a *data* stream per forwarded connection (headers
//!   `streamtype`, `port`, `requestid`); each valid stream gets a `SYN_REPLY`, an invalid one a
//!   `RST_STREAM` (REFUSED_STREAM); the pair is matched by `requestid`; the error stream gets
//!   the error text, then both streams end with FIN. PINGs from the client are echoed. Like
//!   spdystream, the double neither sends nor honours flow-control windows. Header blocks use
//!   zlib with the SPDY/3 dictionary ([`spdy`]).
//! - **Forwarding in the "pod"** (containerd `internal/cri/server/sandbox_portforward_linux.go`,
//!   the runtime the kubelet hands port-forwards to): one TCP connection to the pod's port per
//!   forwarded stream pair; bytes are copied both ways; when one direction ends the other gets
//!   up to one second ([`RUNTIME_CLOSE_GRACE`]) before everything is closed. When nothing
//!   listens, the error channel/stream gets the kubelet's message around containerd's:
//!   `error forwarding port P to pod SANDBOX, uid : failed to execute portforward in network
//!   namespace "/var/run/netns/cni-…": failed to connect to localhost:P inside namespace
//!   "SANDBOX", IPv4: dial tcp4 127.0.0.1:P: connect: connection refused IPv6 dial tcp6
//!   [::1]:P: connect: connection refused ` (sic, trailing space). A container port with no
//!   registered address behaves as nothing listening. Readiness does not matter for
//!   port-forward (the kubelet forwards to unready pods too); a pod that is neither `Pending`
//!   nor `Running` has no sandbox network any more (`network namespace for sandbox "…" is
//!   closed`).
//!
//! # Where the double is simpler
//! Bearer tokens only (no client certificates, no exec plugins); pods and namespaces only, in
//! memory, created by the test (no `create`/`delete`/`watch` over the API; `watch=true` is
//! refused with 405); no Table output (`kubectl get` without `-o` gets plain objects and prints
//! them with its default columns); no aggregated discovery; no stream-creation timeout on
//! half-open SPDY stream pairs; no idle timeouts. RBAC is "everything allowed except what the
//! test denied", not roles and bindings.

mod channel;
mod forward;
mod objects;
mod secrets;
mod selector;
mod server;
pub mod spdy;
mod state;
mod tls;
mod tunnel;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use self::state::{Denial, Shared};

/// The server version the double reports on `/version` and whose behaviour it follows.
pub const SERVER_VERSION: &str = "v1.35.0";

/// The user the default token authenticates as.
pub const DEFAULT_USER: &str = "system:serviceaccount:soma:soma-tests";

/// How long the "container runtime" lets the other direction finish once one direction of a
/// forwarded connection has ended (containerd's `PortForward`, after socat).
pub const RUNTIME_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// `status.phase` of a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodPhase {
    /// Not scheduled yet (the double gives it no node, so port-forward is refused).
    Pending,
    /// Scheduled and running.
    #[default]
    Running,
    /// All containers exited successfully.
    Succeeded,
    /// All containers exited, at least one in failure.
    Failed,
    /// The node stopped reporting.
    Unknown,
}

impl PodPhase {
    /// The phase as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }
}

/// One container of a pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Container name.
    pub name: String,
    /// Image reference (only reported).
    pub image: String,
    /// TCP container ports it declares.
    pub ports: Vec<u16>,
}

/// A pod to add to the double.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
    /// Whether the `Ready` condition (and every container's `ready`) is true.
    pub ready: bool,
    /// `status.phase`.
    pub phase: PodPhase,
    /// `spec.containers`; when empty, one container `main` (image `soma/main:test`) declaring
    /// the ports of `forward_to`.
    pub containers: Vec<Container>,
    /// Where a port-forward to each container port goes (e.g. a real agent on 127.0.0.1).
    pub forward_to: HashMap<u16, SocketAddr>,
}

impl PodSpec {
    /// A pod carrying the agent sidecar as the chart renders it (labels `soma.dev/agent=true` and
    /// `soma.dev/engine=ENGINE`, annotation `soma.dev/agent-port: 50051`), its port-forward relayed
    /// to the real agent at `agent`.
    pub fn agent(namespace: &str, name: &str, engine: &str, agent: SocketAddr) -> PodSpec {
        PodSpec::new(namespace, name)
            .label("soma.dev/agent", "true")
            .label("soma.dev/engine", engine)
            .annotation("soma.dev/agent-port", "50051")
            .forward(50051, agent)
    }

    /// A running, ready pod with no labels, one default container and no forwarded ports.
    pub fn new(namespace: &str, name: &str) -> PodSpec {
        PodSpec {
            namespace: namespace.to_string(),
            name: name.to_string(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            ready: true,
            phase: PodPhase::Running,
            containers: Vec::new(),
            forward_to: HashMap::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> PodSpec {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Adds an annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> PodSpec {
        self.annotations.insert(key.to_string(), value.to_string());
        self
    }

    /// Relays port-forwards to container port `port` to `target`.
    pub fn forward(mut self, port: u16, target: SocketAddr) -> PodSpec {
        self.forward_to.insert(port, target);
        self
    }

    /// Adds a container (replacing the default one).
    pub fn container(mut self, name: &str, image: &str, ports: &[u16]) -> PodSpec {
        self.containers.push(Container {
            name: name.to_string(),
            image: image.to_string(),
            ports: ports.to_vec(),
        });
        self
    }

    /// Sets readiness.
    pub fn ready(mut self, ready: bool) -> PodSpec {
        self.ready = ready;
        self
    }

    /// Sets the phase.
    pub fn phase(mut self, phase: PodPhase) -> PodSpec {
        self.phase = phase;
        self
    }
}

/// One request the double received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path, percent-encoding kept.
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// The authenticated user (`system:anonymous` when allowed), `None` when authentication
    /// failed.
    pub user: Option<String>,
    /// Response status (101 for an upgrade); 0 while the request is still being answered.
    pub status: u16,
    /// Whether the connection was upgraded (WebSocket or SPDY).
    pub upgraded: bool,
    /// The negotiated protocol of an upgrade: a WebSocket subprotocol (`v4.channel.k8s.io`,
    /// `SPDY/3.1+portforward.k8s.io`, or `""` when the client offered none) or, for a direct
    /// SPDY upgrade, the `X-Stream-Protocol-Version` (`portforward.k8s.io`).
    pub protocol: Option<String>,
    pub(crate) seq: u64,
}

/// A Kubernetes API server double on 127.0.0.1; stops (dropping every connection) on drop.
#[derive(Debug)]
pub struct KubeDouble {
    shared: Arc<Shared>,
    addr: SocketAddr,
    ca_pem: String,
    token: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl KubeDouble {
    /// Starts the server on a free port with one user, [`DEFAULT_USER`], and a random token.
    pub fn start() -> KubeDouble {
        let shared = Arc::new(Shared::new());
        let token = shared.add_user(DEFAULT_USER);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kube-double")
            .enable_all()
            .build()
            .expect("cannot build the Kubernetes double's runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("cannot bind the Kubernetes double on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("cannot make the Kubernetes double's socket non-blocking");
        let addr = listener.local_addr().expect("bound socket has an address");
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .expect("cannot register the Kubernetes double's socket")
        };
        let tls = tls::generate();
        runtime.spawn(server::serve(listener, shared.clone(), tls.acceptor));
        KubeDouble {
            shared,
            addr,
            ca_pem: tls.ca_pem,
            token,
            runtime: Some(runtime),
        }
    }

    /// `https://127.0.0.1:PORT` (no trailing slash), the server of the kubeconfigs; its CA is
    /// [`KubeDouble::ca_pem`].
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT`: the same server without TLS on the same port (clients that
    /// can, e.g. a hand-made WebSocket in a test; kubectl would send no credentials).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The PEM CA certificate that signed the serving certificate (for `127.0.0.1` and
    /// `localhost`).
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The bearer token of [`DEFAULT_USER`].
    pub fn token(&self) -> String {
        self.token.clone()
    }

    /// Adds a user; returns its new random bearer token.
    pub fn add_user(&self, name: &str) -> String {
        self.shared.add_user(name)
    }

    /// Whether requests without a token run as `system:anonymous` (kube-apiserver's default,
    /// `--anonymous-auth=true`) instead of failing with 401 (the double's default).
    pub fn allow_anonymous(&self, allow: bool) {
        self.shared.lock().anonymous = allow;
    }

    /// Writes a kubeconfig with one cluster (this server), one user ([`DEFAULT_USER`]'s
    /// token) and one context `soma-double` (the current one) whose default namespace is
    /// `namespace`.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) {
        self.kubeconfig()
            .context("soma-double", namespace)
            .write(path);
    }

    /// A kubeconfig with several contexts, e.g. one per namespace or one per user.
    pub fn kubeconfig(&self) -> Kubeconfig {
        Kubeconfig {
            server: self.url(),
            ca_pem: self.ca_pem.clone(),
            default_token: self.token.clone(),
            contexts: Vec::new(),
            current: None,
        }
    }

    /// Adds (or replaces) a pod. Panics on an empty name or namespace.
    pub fn add_pod(&self, spec: PodSpec) {
        assert!(
            !spec.name.is_empty() && !spec.namespace.is_empty(),
            "a pod needs a name and a namespace"
        );
        self.shared.add_pod(spec);
    }

    /// Creates a namespace (pods create theirs; `default` and the `kube-*` ones always exist).
    pub fn add_namespace(&self, name: &str) {
        self.shared.lock().ensure_namespace(name);
    }

    /// Removes a pod; true when it existed.
    pub fn remove_pod(&self, namespace: &str, name: &str) -> bool {
        self.shared.remove_pod(namespace, name)
    }

    /// Sets the readiness of the pod `name` — `NAMESPACE/NAME`, or a bare name that only one
    /// namespace has (panics otherwise). Bumps its resourceVersion and the Ready transition
    /// time.
    pub fn set_ready(&self, name: &str, ready: bool) {
        self.shared.update_pod(name, |pod| pod.set_ready(ready));
    }

    /// Sets the phase of the pod called `name` (as [`KubeDouble::set_ready`]).
    pub fn set_phase(&self, name: &str, phase: PodPhase) {
        self.shared.update_pod(name, |pod| pod.spec.phase = phase);
    }

    /// Points port-forwards to container port `port` of the pod called `name` at `target`
    /// (as [`KubeDouble::set_ready`]).
    pub fn set_forward(&self, name: &str, port: u16, target: SocketAddr) {
        self.shared.update_pod(name, |pod| {
            pod.spec.forward_to.insert(port, target);
        });
    }

    /// The pod as the API would return it (`GET .../pods/NAME`), if it exists.
    pub fn pod_json(&self, namespace: &str, name: &str) -> Option<serde_json::Value> {
        let inner = self.shared.lock();
        inner
            .pods
            .get(&(namespace.to_string(), name.to_string()))
            .map(|p| objects::pod(p, true))
    }

    /// Creates (or replaces) Secret `namespace/name` holding `data` (key → value), unlabelled.
    pub fn add_secret(&self, namespace: &str, name: &str, data: &[(&str, &[u8])]) {
        self.add_labelled_secret(namespace, name, &[], data);
    }

    /// Creates (or replaces) Secret `namespace/name` with `labels`, holding `data`.
    pub fn add_labelled_secret(
        &self,
        namespace: &str,
        name: &str,
        labels: &[(&str, &str)],
        data: &[(&str, &[u8])],
    ) {
        self.shared.lock().secrets.insert(
            (namespace.to_string(), name.to_string()),
            state::StoredSecret {
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                data: data
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_vec()))
                    .collect(),
            },
        );
    }

    /// Denies `verb` (`get`, `list`, `watch`, `create`, ...) on `resource` (`pods`,
    /// `pods/portforward`) in `namespace` to every user, like a missing RBAC rule. For the
    /// cluster-scoped `namespaces`, pass `""` as the namespace.
    pub fn deny(&self, namespace: &str, verb: &str, resource: &str) {
        self.shared.lock().denials.push(Denial {
            namespace: namespace.to_string(),
            verb: verb.to_string(),
            resource: resource.to_string(),
        });
    }

    /// Lifts every [`KubeDouble::deny`].
    pub fn allow_all(&self) {
        self.shared.lock().denials.clear();
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Port-forward requests that were upgraded (one per WebSocket or SPDY connection, however
    /// many ports or forwarded connections it carries).
    pub fn port_forward_count(&self) -> u64 {
        self.shared.lock().port_forwards
    }

    /// TCP connections the double opened to registered targets for port-forwards.
    pub fn forwarded_connections(&self) -> u64 {
        self.shared.lock().forwarded_connections
    }
}

impl Drop for KubeDouble {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A kubeconfig being assembled by [`KubeDouble::kubeconfig`]: one cluster, one user per
/// distinct token, the given contexts.
#[derive(Clone, Debug)]
pub struct Kubeconfig {
    server: String,
    ca_pem: String,
    default_token: String,
    contexts: Vec<(String, String, String)>,
    current: Option<String>,
}

impl Kubeconfig {
    /// A context `name` with default namespace `namespace`, as [`DEFAULT_USER`]. The first
    /// context is the current one unless [`Kubeconfig::current`] says otherwise.
    pub fn context(self, name: &str, namespace: &str) -> Kubeconfig {
        let token = self.default_token.clone();
        self.context_with_token(name, namespace, &token)
    }

    /// A context that authenticates with `token` (from [`KubeDouble::add_user`], or a wrong one
    /// to provoke 401).
    pub fn context_with_token(mut self, name: &str, namespace: &str, token: &str) -> Kubeconfig {
        self.contexts
            .push((name.to_string(), namespace.to_string(), token.to_string()));
        self
    }

    /// Makes `name` the current context.
    pub fn current(mut self, name: &str) -> Kubeconfig {
        self.current = Some(name.to_string());
        self
    }

    /// The kubeconfig as YAML text.
    pub fn to_yaml(&self) -> String {
        assert!(!self.contexts.is_empty(), "a kubeconfig needs a context");
        let q = |s: &str| serde_json::to_string(s).expect("strings serialise");
        let mut users: Vec<&str> = Vec::new();
        for (_, _, token) in &self.contexts {
            if !users.contains(&token.as_str()) {
                users.push(token);
            }
        }
        let user_name = |token: &str| {
            let i = users.iter().position(|t| *t == token).expect("listed");
            if i == 0 {
                "soma-double-user".to_string()
            } else {
                format!("soma-double-user-{i}")
            }
        };
        let mut out = String::new();
        out.push_str("apiVersion: v1\nkind: Config\npreferences: {}\nclusters:\n");
        let _ = writeln!(
            out,
            "- name: soma-double\n  cluster:\n    server: {}\n    certificate-authority-data: {}",
            q(&self.server),
            q(&channel::b64::encode(self.ca_pem.as_bytes()))
        );
        out.push_str("users:\n");
        for token in &users {
            let _ = writeln!(
                out,
                "- name: {}\n  user:\n    token: {}",
                q(&user_name(token)),
                q(token)
            );
        }
        out.push_str("contexts:\n");
        for (name, namespace, token) in &self.contexts {
            let _ = writeln!(
                out,
                "- name: {}\n  context:\n    cluster: soma-double\n    user: {}\n    namespace: {}",
                q(name),
                q(&user_name(token)),
                q(namespace)
            );
        }
        let current = self
            .current
            .clone()
            .unwrap_or_else(|| self.contexts[0].0.clone());
        let _ = writeln!(out, "current-context: {}", q(&current));
        out
    }

    /// Writes the kubeconfig to `path` (mode 0600, as kubectl writes its own).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.to_yaml())
            .unwrap_or_else(|e| panic!("cannot write kubeconfig {}: {e}", path.display()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
}
