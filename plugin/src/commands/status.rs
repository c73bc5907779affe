//! `kubectl soma status`: every agent found, with version, store, last backup and health.

use serde_json::{Value, json};
use soma_proto::v1;

use crate::{
    cli::{KubeArgs, OutputFormat},
    connect::{self, Agent},
    discovery,
    error::CliError,
    output,
};

/// One agent's row; unreachable or unready agents are rows too, with the reason as health.
async fn probe(agent: Result<Agent, CliError>, namespace: &str, pod: &str, engine: &str) -> Value {
    let mut agent = match agent {
        Ok(a) => a,
        Err(e) => {
            return json!({"namespace": namespace, "pod": pod, "engine": engine, "health": e.to_string()});
        }
    };
    let info = match agent.client.get_info(v1::GetInfoRequest {}).await {
        Ok(info) => info.into_inner(),
        Err(s) => {
            return json!({
                "namespace": namespace, "pod": pod, "engine": engine,
                "health": CliError::from_status(s, &agent.addr, "request").to_string(),
            });
        }
    };
    // An agent whose store fails still reports itself (and its WAL stream, which is when that
    // matters most); the failure is its health.
    let (last, health) = match agent.client.list_backups(v1::ListBackupsRequest {}).await {
        Ok(backups) => (
            backups.into_inner().backups.into_iter().next(),
            "ok".to_string(),
        ),
        Err(s) => (
            None,
            CliError::from_status(s, &agent.addr, "request").to_string(),
        ),
    };
    let engines: Vec<&str> = info
        .engines
        .iter()
        .map(|e| {
            v1::Engine::try_from(e.engine)
                .unwrap_or_default()
                .short_name()
        })
        .collect();
    let age = last.as_ref().and_then(|b| {
        chrono::DateTime::parse_from_rfc3339(&b.completed_at)
            .ok()
            .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds())
    });
    json!({
        "namespace": namespace,
        "pod": pod,
        "engine": if engine.is_empty() { engines.join(",") } else { engine.to_string() },
        "agent_version": info.agent_version,
        "store": info.store,
        "restore_from": Some(info.restore_from.as_str()).filter(|r| !r.is_empty()),
        "last_backup": last.as_ref().map(|b| b.id.clone()),
        "last_backup_age_seconds": age,
        "running_jobs": info.running_jobs.len(),
        "wal_archive": info.wal_archive.as_ref().map(|w| json!({
            "receiving": w.receiving,
            "system_id": w.system_id,
            "timeline": w.timeline,
            "slot": w.slot,
            "archived_lsn": w.archived_lsn,
            "server_lsn": w.server_lsn,
            "lag_bytes": w.lag_bytes,
            "last_shipped_at": w.last_shipped_at,
            "last_file": w.last_file,
            "segments_shipped": w.segments_shipped,
            "partials_shipped": w.partials_shipped,
            "partial_interval_seconds": w.partial_interval_seconds,
            "last_error": w.last_error,
        })),
        "health": health,
    })
}

/// The WAL archive's state in one cell: streaming or not, and how far behind the server it is.
fn wal_cell(w: &Value) -> String {
    if w.is_null() {
        return "off".into();
    }
    let lag = output::bytes(w["lag_bytes"].as_u64().unwrap_or(0));
    let shipped = w["last_shipped_at"]
        .as_str()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_seconds());
    let state = if w["receiving"].as_bool() == Some(true) {
        "streaming"
    } else {
        "NOT streaming"
    };
    let mut cell = format!("{state}, lag {lag}, shipped {} ago", age(shipped));
    if let Some(e) = w["last_error"].as_str().filter(|e| !e.is_empty()) {
        cell.push_str(&format!(" (last error: {e})"));
    }
    cell
}

fn age(seconds: Option<i64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 7200 => format!("{}m", s / 60),
        Some(s) if s < 172_800 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86400),
    }
}

/// Shows every agent (all agent pods of the namespace, or the one at `--agent`).
pub async fn run(agent: Option<&str>, kube: &KubeArgs, out: OutputFormat) -> Result<(), CliError> {
    let rows = match agent {
        Some(addr) => vec![probe(connect::direct(addr).await, "", addr, "").await],
        None => {
            let (client, namespace) = connect::kube(kube).await?;
            let found = discovery::agents(&client, &namespace).await?;
            if found.is_empty() {
                return Err(CliError::Kubernetes(format!(
                    "no soma agent in namespace {namespace} (looked for pods labelled {}=true); is the sidecar injected, or is the namespace wrong (-n)?",
                    discovery::AGENT_LABEL
                )));
            }
            let mut rows = Vec::new();
            for pod in &found {
                let connected = if pod.ready {
                    connect::port_forward(&client, pod).await
                } else {
                    Err(CliError::Kubernetes(format!(
                        "pod not ready ({})",
                        pod.state
                    )))
                };
                rows.push(probe(connected, &pod.namespace, &pod.name, &pod.engine).await);
            }
            rows
        }
    };
    let healthy = rows.iter().all(|r| r["health"] == "ok");
    match out {
        OutputFormat::Table => {
            let s = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        s(&r["namespace"]),
                        s(&r["pod"]),
                        s(&r["engine"]),
                        s(&r["agent_version"]),
                        match r["restore_from"].as_str() {
                            Some(from) => format!("{} (restoring from {from})", s(&r["store"])),
                            None => s(&r["store"]),
                        },
                        s(&r["last_backup"]),
                        age(r["last_backup_age_seconds"].as_i64()),
                        wal_cell(&r["wal_archive"]),
                        s(&r["health"]),
                    ]
                })
                .collect();
            output::table(
                &[
                    "NAMESPACE",
                    "POD",
                    "ENGINE",
                    "VERSION",
                    "STORE",
                    "LAST BACKUP",
                    "AGE",
                    "WAL ARCHIVE",
                    "HEALTH",
                ],
                &table,
            );
        }
        format => output::print_structured(format, &rows)?,
    }
    if healthy {
        Ok(())
    } else {
        Err(CliError::Other(
            "some agents are not healthy (see HEALTH)".into(),
        ))
    }
}
