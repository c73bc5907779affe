//! Reaching agents: directly at `--agent HOST:PORT`, or through the Kubernetes API server with a
//! port-forward to the agent's pod (the pods/portforward subresource over WebSocket), so no
//! Service or exposed port is needed and the agent keeps listening on 127.0.0.1 in its pod.

use soma_proto::{BackupId, IdEngine, v1};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use soma_proto::v1::soma_agent_client::SomaAgentClient;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Channel, Endpoint, Uri},
};

use crate::{
    cli::KubeArgs,
    discovery::{self, AgentPod},
    error::CliError,
};

mod token;

pub(crate) use token::Bearer;
use token::{given_token, is_loopback_host, pod_token};

/// How long to wait for the TCP/HTTP2 connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The client every command uses: gRPC with the bearer token on each call.
pub(crate) type AgentClient = SomaAgentClient<InterceptedService<Channel, Bearer>>;

/// A connected client plus where it leads, for messages.
#[derive(Debug, Clone)]
pub(crate) struct Agent {
    /// gRPC client.
    pub client: AgentClient,
    /// `HOST:PORT`, or `pod NAMESPACE/NAME` for a port-forward.
    pub addr: String,
    /// The pod, when reached through Kubernetes.
    pub pod: Option<AgentPod>,
}

/// Backups asked for per `ListBackups` page: small enough that one answer (each backup carries
/// its manifest, a few KiB) stays below the 4 MiB a gRPC client decodes.
const LIST_PAGE_SIZE: u32 = 250;
/// Backups asked for per page when only the newest is wanted: the agent cuts pages by id (ids
/// begin with their UTC second) and orders each page by start time, so the first page's first
/// backup is the newest unless more than this many started within one second. The next pages are
/// read only while a page's manifests are all unreadable.
const NEWEST_PAGE_SIZE: u32 = 16;
/// Pages read at most for the newest backup.
const NEWEST_MAX_PAGES: usize = 64;
/// Pages read at most: 2 million backups, far more than any store holds; an agent whose pages
/// never end cannot hold the plugin in a loop.
const MAX_LIST_PAGES: usize = 10_000;

impl Agent {
    /// Every backup the agent lists, newest first, read page by page, with the unreadable ones.
    pub(crate) async fn all_backups(&mut self) -> Result<v1::ListBackupsResponse, CliError> {
        let mut all = v1::ListBackupsResponse::default();
        let mut token = String::new();
        for _ in 0..MAX_LIST_PAGES {
            let page = self.list_page(LIST_PAGE_SIZE, &token).await?;
            all.backups.extend(page.backups);
            all.unreadable.extend(page.unreadable);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            if page.next_page_token == token {
                break;
            }
            token = page.next_page_token;
        }
        Err(CliError::Other(format!(
            "{}: the agent's list of backups does not end (its page token repeats, or it has more than {MAX_LIST_PAGES} pages)",
            self.addr
        )))
    }

    /// The newest backup whose manifest can be read, if any, from the first pages only.
    pub(crate) async fn newest_backup(&mut self) -> Result<Option<v1::BackupInfo>, CliError> {
        let mut token = String::new();
        for _ in 0..NEWEST_MAX_PAGES {
            let page = self.list_page(NEWEST_PAGE_SIZE, &token).await?;
            if let Some(newest) = page.backups.into_iter().next() {
                return Ok(Some(newest));
            }
            if page.next_page_token.is_empty() || page.next_page_token == token {
                break;
            }
            token = page.next_page_token;
        }
        Ok(None)
    }

    async fn list_page(
        &mut self,
        page_size: u32,
        token: &str,
    ) -> Result<v1::ListBackupsResponse, CliError> {
        self.client
            .list_backups(v1::ListBackupsRequest {
                page_size,
                page_token: token.to_string(),
            })
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| CliError::from_status(s, &self.addr, "request"))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut detail = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !detail.contains(&text) {
            detail = format!("{detail}: {text}");
        }
        source = s.source();
    }
    detail
}

/// The endpoint for `uri` (`http://…`): over TLS with `--agent-ca`, checking the certificate
/// against `default_name` unless `--agent-tls-name` says otherwise.
fn endpoint(uri: String, args: &KubeArgs, default_name: &str) -> Result<Endpoint, CliError> {
    let Some(ca) = &args.agent_ca else {
        return Endpoint::from_shared(uri).map_err(|e| CliError::Usage(e.to_string()));
    };
    let pem = std::fs::read(ca)
        .map_err(|e| CliError::Usage(format!("--agent-ca {}: {e}", ca.display())))?;
    let name = args.agent_tls_name.as_deref().unwrap_or(default_name);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        .domain_name(name);
    Endpoint::from_shared(uri.replacen("http://", "https://", 1))
        .map_err(|e| CliError::Usage(e.to_string()))?
        .tls_config(tls)
        .map_err(|e| CliError::Usage(format!("--agent-ca {}: {}", ca.display(), chain(&e))))
}

/// Connects to the agent at `addr` (HOST:PORT), with the token `args` give.
pub(crate) async fn direct(addr: &str, args: &KubeArgs) -> Result<Agent, CliError> {
    let bearer = given_token(args)?;
    if addr.contains("://") || !addr.contains(':') {
        return Err(CliError::Usage(format!(
            "--agent {addr:?}: expected HOST:PORT, e.g. 127.0.0.1:50051"
        )));
    }
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_matches(['[', ']']);
    // Checked before connecting: nothing is sent.
    if bearer.is_some() && args.agent_ca.is_none() && !is_loopback_host(host) {
        return Err(CliError::Usage(format!(
            "--agent {addr:?}: refusing to send the agent token in clear beyond loopback, where anyone on the path could read and replay it. Reach the agent over TLS with --agent-ca PATH (SOMA_AGENT_CA; the agent serves --tls-cert), or through a port-forward (kubectl soma -n NAMESPACE finds it, or kubectl port-forward and --agent 127.0.0.1:PORT)"
        )));
    }
    let bearer = bearer.unwrap_or_default();
    let endpoint = endpoint(format!("http://{addr}"), args, host)
        .map_err(|e| CliError::Usage(format!("--agent {addr:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| CliError::Unreachable {
            addr: addr.to_string(),
            detail: chain(&e),
        })?;
    Ok(Agent {
        client: SomaAgentClient::with_interceptor(channel, bearer),
        addr: addr.to_string(),
        pod: None,
    })
}

/// A Kubernetes client and the namespace to work in, configured as kubectl would be: an explicit
/// `--kubeconfig`, else `KUBECONFIG` or `~/.kube/config`, else the in-cluster service account.
pub(crate) async fn kube(args: &KubeArgs) -> Result<(Client, String), CliError> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|e| {
                CliError::Kubernetes(format!("cannot read --kubeconfig {}: {}", path.display(), chain(&e)))
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| CliError::Kubernetes(format!("kubeconfig {}: {}", path.display(), chain(&e))))?
        }
        None if args.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| CliError::Kubernetes(format!("kubeconfig: {}", chain(&e))))?,
        None => Config::infer().await.map_err(|e| {
            CliError::Kubernetes(format!(
                "no Kubernetes configuration found ({}); pass --kubeconfig, set KUBECONFIG, or use --agent HOST:PORT",
                chain(&e)
            ))
        })?,
    };
    // The agent token travels through the API server's port-forward: never in clear across a
    // network (kubectl itself sends no credentials over plain http).
    let url = &config.cluster_url;
    if url.scheme_str() != Some("https") && !url.host().is_some_and(is_loopback_host) {
        return Err(CliError::Kubernetes(format!(
            "the Kubernetes API server {url} is reached without TLS beyond loopback: refusing to send credentials and the agent token through it in clear. Use the cluster's https:// address in the kubeconfig"
        )));
    }
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config)
        .map_err(|e| CliError::Kubernetes(format!("Kubernetes client: {}", chain(&e))))?;
    Ok((client, namespace))
}

/// Connects to an agent pod through a port-forward opened by the API server. Every gRPC
/// connection opens its own forward; the forward's error channel is reported if it speaks.
pub(crate) async fn port_forward(
    client: &Client,
    pod: &AgentPod,
    args: &KubeArgs,
) -> Result<Agent, CliError> {
    let bearer = pod_token(client, pod, args).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let (name, namespace, port) = (pod.name.clone(), pod.namespace.clone(), pod.port);
    let addr = format!("pod {namespace}/{name}");
    let connector = tower::service_fn(move |_: Uri| {
        let (pods, name, namespace) = (pods.clone(), name.clone(), namespace.clone());
        async move {
            let mut forwarder = pods.portforward(&name, &[port]).await.map_err(|e| {
                let message = discovery::api_error(e, &namespace, "create pods/portforward");
                std::io::Error::other(message.to_string())
            })?;
            let stream = forwarder.take_stream(port).ok_or_else(|| {
                std::io::Error::other(format!(
                    "the port-forward to {name} has no stream for port {port}"
                ))
            })?;
            if let Some(error) = forwarder.take_error(port) {
                let name = name.clone();
                tokio::spawn(async move {
                    if let Some(message) = error.await {
                        errln!("port-forward to pod {name} port {port}: {message}");
                    }
                });
            }
            tokio::spawn(async move {
                let _ = forwarder.join().await;
            });
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    let channel = endpoint("http://soma-agent.pod".into(), args, "localhost")?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|e| CliError::Unreachable {
            addr: addr.clone(),
            detail: chain(&e),
        })?;
    Ok(Agent {
        client: SomaAgentClient::with_interceptor(channel, bearer),
        addr,
        pod: Some(pod.clone()),
    })
}

/// The agent for one command: `--agent`, or the pod discovery picks for `engine`.
pub(crate) async fn connect(
    agent: Option<&str>,
    args: &KubeArgs,
    engine: Option<&str>,
) -> Result<Agent, CliError> {
    if let Some(addr) = agent {
        return direct(addr, args).await;
    }
    let (client, namespace) = kube(args).await?;
    let found = discovery::agents(&client, &namespace).await?;
    let engine = args.engine.map(|t| t.label()).or(engine);
    let pod = match discovery::choose(&found, &namespace, engine, args.pod.as_deref()) {
        Ok(pod) => pod,
        Err(ambiguous) if engine == Some("qdrant") && args.pod.is_none() => {
            return match one_agent_of_a_qdrant_cluster(&client, &found, args).await {
                Some(agent) => Ok(agent),
                None => Err(ambiguous),
            };
        }
        Err(e) => return Err(e),
    };
    port_forward(&client, &pod, args).await
}

/// Several ready Qdrant agents are the sidecars of one distributed Qdrant when each reports the
/// same peer ids: any of them serves the whole cluster, so the first by name is used. `None`
/// when they are not (or one does not answer): the choice stays the user's.
async fn one_agent_of_a_qdrant_cluster(
    client: &Client,
    found: &[discovery::AgentPod],
    args: &KubeArgs,
) -> Option<Agent> {
    let mut pods: Vec<&discovery::AgentPod> = found
        .iter()
        .filter(|p| p.ready && p.engine == "qdrant")
        .collect();
    pods.sort_by(|a, b| a.name.cmp(&b.name));
    let mut first = None;
    let mut cluster: Option<Vec<u64>> = None;
    for pod in pods {
        let mut agent = port_forward(client, pod, args).await.ok()?;
        let info = agent
            .client
            .get_info(soma_proto::v1::GetInfoRequest {})
            .await
            .ok()?
            .into_inner();
        let mut peers: Vec<u64> = info
            .qdrant_cluster?
            .peers
            .iter()
            .map(|p| p.peer_id)
            .collect();
        peers.sort_unstable();
        if peers.is_empty() || cluster.as_ref().is_some_and(|c| *c != peers) {
            return None;
        }
        cluster = Some(peers);
        first.get_or_insert(agent);
    }
    first
}

/// The error for a call `agent` answered with `status`: an Unimplemented answer means an agent
/// older than this plugin, said as such with its version (asked for here) instead of a raw gRPC
/// message.
pub(crate) async fn call_error(agent: &Agent, status: tonic::Status, what: &str) -> CliError {
    if status.code() != tonic::Code::Unimplemented {
        return CliError::from_status(status, &agent.addr, "request");
    }
    let mut client = agent.client.clone();
    let version = match client.get_info(soma_proto::v1::GetInfoRequest {}).await {
        Ok(info) => info.into_inner().agent_version,
        Err(_) => String::new(),
    };
    CliError::Unsupported {
        version: if version.is_empty() {
            "unknown".into()
        } else {
            version
        },
        what: what.to_string(),
    }
}

/// Every ready agent of the namespace, connected (discovery explains when there is none).
pub(crate) async fn ready_agents(args: &KubeArgs) -> Result<Vec<Agent>, CliError> {
    let (client, namespace) = kube(args).await?;
    let found = discovery::agents(&client, &namespace).await?;
    let ready: Vec<&AgentPod> = found.iter().filter(|p| p.ready).collect();
    if ready.is_empty() {
        // Says why: no agent at all, or none ready.
        discovery::choose(&found, &namespace, None, None)?;
    }
    let mut agents = Vec::new();
    for pod in ready {
        agents.push(port_forward(&client, pod, args).await?);
    }
    Ok(agents)
}

/// What `id` names (for "latest": the newest any agent knows — agents of an older layout may each
/// write to their own store), and the index of the agent that answered.
pub(crate) async fn describe_newest(
    agents: &[Agent],
    id: &str,
    engine: i32,
) -> Result<(soma_proto::v1::BackupInfo, usize), CliError> {
    use soma_proto::v1;
    let mut found: Option<(v1::BackupInfo, usize)> = None;
    for (index, agent) in agents.iter().enumerate() {
        let mut client = agent.client.clone();
        match client
            .describe_backup(v1::DescribeBackupRequest {
                backup_id: id.to_string(),
                engine,
            })
            .await
        {
            Ok(info) => {
                let info = info.into_inner();
                if found
                    .as_ref()
                    .is_none_or(|(f, _)| info.started_at > f.started_at)
                {
                    found = Some((info, index));
                }
                if id != "latest" {
                    break;
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(CliError::from_status(s, &agent.addr, "request")),
        }
    }
    found.ok_or_else(|| CliError::Agent {
        code: tonic::Code::NotFound,
        message: format!(
            "backup {id} not found by any agent in the namespace; run `kubectl soma list`"
        ),
    })
}

/// The agent that can act on backup `id` (or "latest"): the one serving its engine — for a set,
/// the engine of its members.
pub(crate) async fn agent_for_backup(
    agents: Vec<Agent>,
    id: &str,
    engine: i32,
) -> Result<Agent, CliError> {
    let (info, found_by) = describe_newest(&agents, id, engine).await?;
    // A set is read from the store whole (verify, describe): the agent that found it will do.
    if !info.members.is_empty() {
        return Ok(agents.into_iter().nth(found_by).expect("index in range"));
    }
    let engine_of_id = |id: &str| match BackupId::parse(id).ok().and_then(|id| id.engine()) {
        Some(IdEngine::Postgres) => "postgres",
        Some(IdEngine::Qdrant) => "qdrant",
        _ => "",
    };
    let mut needed: Vec<&str> = if info.members.is_empty() {
        vec![engine_of_id(&info.id)]
    } else {
        info.members.iter().map(|m| engine_of_id(m)).collect()
    };
    needed.sort();
    needed.dedup();
    let serving: Vec<Agent> = agents
        .into_iter()
        .filter(|a| {
            a.pod
                .as_ref()
                .is_some_and(|p| needed.contains(&p.engine.as_str()))
        })
        .collect();
    // As in discovery: among PostgreSQL agents, the primary's.
    let primaries: Vec<usize> = serving
        .iter()
        .enumerate()
        .filter(|(_, a)| a.pod.as_ref().is_some_and(|p| p.primary))
        .map(|(i, _)| i)
        .collect();
    if serving.len() > 1 && primaries.len() == 1 {
        return Ok(serving
            .into_iter()
            .nth(primaries[0])
            .expect("index in range"));
    }
    match serving.len() {
        1 => Ok(serving.into_iter().next().expect("one")),
        0 => Err(CliError::Kubernetes(format!(
            "backup {} needs an agent serving {}; none of the ready agents in the namespace does",
            info.id,
            needed.join(" and ")
        ))),
        _ => Err(CliError::Kubernetes(format!(
            "backup {} can be handled by several agents ({}); choose one with --pod NAME",
            info.id,
            serving
                .iter()
                .filter_map(|a| a.pod.as_ref().map(|p| p.name.clone()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_only_this_machine() {
        for host in [
            "127.0.0.1",
            "127.1.2.3",
            "localhost",
            "LOCALHOST",
            "::1",
            "[::1]",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "10.0.0.7",
            "0.0.0.0",
            "::",
            "agent.example",
            "localhost.example",
            "127.0.0.1.nip.io",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
