//! Finding agent pods through the Kubernetes API.
//!
//! The chart marks every pod that carries the agent sidecar: label `soma.dev/agent=true`, label
//! `soma.dev/engine=postgres|qdrant`, annotation `soma.dev/agent-port` (default 50051). For
//! PostgreSQL the primary is the pod labelled `app.kubernetes.io/component=primary`, as the
//! bitnami chart labels it. Only ready pods are used; when the choice is ambiguous the user is
//! asked to name one, never guessed for.

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};

use crate::error::CliError;

/// Label that marks agent pods.
pub(crate) const AGENT_LABEL: &str = "soma.dev/agent";
/// Label naming the engine the agent serves.
pub(crate) const ENGINE_LABEL: &str = "soma.dev/engine";
/// Annotation with the agent's port inside the pod.
pub(crate) const PORT_ANNOTATION: &str = "soma.dev/agent-port";
/// Names the Secret (key `token`) holding the agent's bearer token.
pub(crate) const TOKEN_SECRET_ANNOTATION: &str = "soma.dev/token-secret";
/// Labels a Secret must carry, with these values, before kubectl soma reads a token from it: the
/// chart puts them on the token Secret it creates; a Secret you bring needs them too.
pub(crate) const TOKEN_SECRET_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/part-of", "soma-backup"),
    ("app.kubernetes.io/component", "agent-token"),
];
/// Default agent port.
pub(crate) const DEFAULT_PORT: u16 = 50051;

/// One pod carrying an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AgentPod {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// `postgres`, `qdrant`, or what the label says.
    pub engine: String,
    /// Agent port inside the pod.
    pub port: u16,
    /// Pod phase Running and condition Ready true.
    pub ready: bool,
    /// Labelled as the PostgreSQL primary.
    pub primary: bool,
    /// Why it is not ready, for messages.
    pub state: String,
    /// The Secret holding the agent's bearer token (annotation `soma.dev/token-secret`).
    pub token_secret: Option<String>,
}

impl AgentPod {
    fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let labels = meta.labels.as_ref()?;
        if labels.get(AGENT_LABEL).map(String::as_str) != Some("true") {
            return None;
        }
        let status = pod.status.as_ref();
        let phase = status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into());
        let ready_condition = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status == "True")
            .unwrap_or(false);
        let ready = phase == "Running" && ready_condition && meta.deletion_timestamp.is_none();
        let state = if ready {
            "ready".to_string()
        } else if meta.deletion_timestamp.is_some() {
            "terminating".to_string()
        } else {
            format!("phase {phase}, Ready={ready_condition}")
        };
        Some(Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone()?,
            engine: labels.get(ENGINE_LABEL).cloned().unwrap_or_default(),
            token_secret: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TOKEN_SECRET_ANNOTATION))
                .filter(|s| !s.is_empty())
                .cloned(),
            port: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(PORT_ANNOTATION))
                .and_then(|p| p.parse().ok())
                .unwrap_or(DEFAULT_PORT),
            ready,
            primary: labels
                .get("app.kubernetes.io/component")
                .map(String::as_str)
                == Some("primary"),
            state,
        })
    }
}

/// Turns an API error into what the user needs to do.
pub(crate) fn api_error(e: kube::Error, namespace: &str, action: &str) -> CliError {
    match &e {
        kube::Error::Api(status) if status.code == 403 => CliError::Kubernetes(format!(
            "the Kubernetes API refused to {action} in namespace {namespace}: {}. kubectl soma needs {} there (see the chart's Role)",
            status.message,
            if action.starts_with("get secret") {
                "get on that Secret (the chart's Role grants it by name)"
            } else {
                "get/list on pods and create on pods/portforward"
            }
        )),
        kube::Error::Api(status) if status.code == 401 => CliError::Kubernetes(format!(
            "the Kubernetes API did not accept your credentials ({}); refresh them (e.g. log in again) or check --kubeconfig/--context",
            status.message
        )),
        kube::Error::Api(status) => CliError::Kubernetes(format!(
            "the Kubernetes API answered {} while trying to {action} in namespace {namespace}: {}",
            status.code, status.message
        )),
        _ => CliError::Kubernetes(format!(
            "cannot reach the Kubernetes API to {action} in namespace {namespace}: {e}"
        )),
    }
}

/// Every agent pod in `namespace`, ready or not, sorted by name.
pub(crate) async fn agents(client: &Client, namespace: &str) -> Result<Vec<AgentPod>, CliError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!("{AGENT_LABEL}=true")))
        .await
        .map_err(|e| api_error(e, namespace, "list pods"))?;
    let mut found: Vec<AgentPod> = list.items.iter().filter_map(AgentPod::from_pod).collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

fn describe(pods: &[&AgentPod]) -> String {
    pods.iter()
        .map(|p| format!("{} ({}, {})", p.name, p.engine, p.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Picks the one agent pod to talk to.
pub(crate) fn choose(
    found: &[AgentPod],
    namespace: &str,
    engine: Option<&str>,
    pod: Option<&str>,
) -> Result<AgentPod, CliError> {
    if let Some(name) = pod {
        let p = found.iter().find(|p| p.name == name).ok_or_else(|| {
            CliError::Kubernetes(format!(
                "pod {name} in namespace {namespace} is not a soma agent (no label {AGENT_LABEL}=true){}",
                if found.is_empty() {
                    String::new()
                } else {
                    format!("; agent pods: {}", describe(&found.iter().collect::<Vec<_>>()))
                }
            ))
        })?;
        if !p.ready {
            return Err(CliError::Kubernetes(format!(
                "agent pod {} in namespace {namespace} is not ready ({}); wait for it (kubectl get pod {} -n {namespace}) or choose another with --pod",
                p.name, p.state, p.name
            )));
        }
        return Ok(p.clone());
    }
    let for_engine = engine.map(|e| format!(" for {e}")).unwrap_or_default();
    let candidates: Vec<&AgentPod> = found
        .iter()
        .filter(|p| engine.is_none_or(|e| p.engine == e))
        .collect();
    if candidates.is_empty() {
        return Err(CliError::Kubernetes(format!(
            "no soma agent{for_engine} in namespace {namespace} (looked for pods labelled {AGENT_LABEL}=true{}); is the sidecar injected (see helm/examples), or is the namespace wrong (-n)?",
            engine
                .map(|e| format!(", {ENGINE_LABEL}={e}"))
                .unwrap_or_default()
        )));
    }
    let ready: Vec<&AgentPod> = candidates.iter().copied().filter(|p| p.ready).collect();
    if ready.is_empty() {
        return Err(CliError::Kubernetes(format!(
            "no ready soma agent{for_engine} in namespace {namespace}: {}; wait for the pod to become ready",
            describe(&candidates)
        )));
    }
    if ready.len() == 1 {
        return Ok(ready[0].clone());
    }
    let primaries: Vec<&AgentPod> = ready.iter().copied().filter(|p| p.primary).collect();
    if engine == Some("postgres") && primaries.len() == 1 {
        return Ok(primaries[0].clone());
    }
    Err(CliError::Kubernetes(format!(
        "several soma agents{for_engine} in namespace {namespace} could serve this: {}; choose one with --pod NAME{}",
        describe(&ready),
        if engine.is_none() {
            " or --engine postgres|qdrant"
        } else {
            ""
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, engine: &str, ready: bool, primary: bool) -> AgentPod {
        AgentPod {
            namespace: "ns".into(),
            name: name.into(),
            engine: engine.into(),
            port: DEFAULT_PORT,
            ready,
            primary,
            state: if ready {
                "ready".into()
            } else {
                "phase Pending, Ready=false".into()
            },
            token_secret: None,
        }
    }

    #[test]
    fn picks_the_ready_primary_or_asks() {
        let found = vec![
            pod("pg-0", "postgres", true, true),
            pod("pg-1", "postgres", true, false),
            pod("qd-0", "qdrant", true, false),
            pod("qd-1", "qdrant", false, false),
        ];
        assert_eq!(
            choose(&found, "ns", Some("postgres"), None).unwrap().name,
            "pg-0"
        );
        assert_eq!(
            choose(&found, "ns", Some("qdrant"), None).unwrap().name,
            "qd-0"
        );
        let err = choose(&found, "ns", None, None).unwrap_err().to_string();
        assert!(err.contains("--pod") && err.contains("--engine"), "{err}");
        let err = choose(&found, "ns", None, Some("qd-1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not ready"), "{err}");
        let err = choose(&[], "ns", Some("postgres"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no soma agent for postgres"), "{err}");
    }
}
