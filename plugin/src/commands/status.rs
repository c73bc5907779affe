//! `kubectl soma status`: every agent found, with version, store, last backup and health, then
//! per agent its schedules, retention policy and most recent failures.

use serde_json::{Value, json};
use soma_proto::v1;

use crate::{
    cli::{KubeArgs, OutputFormat},
    connect::{self, Agent},
    discovery,
    error::CliError,
    output,
};

use super::list;

mod sections;

use sections::{
    agent_title, failures_section, qdrant_cluster_section, schedules_section, set_aside_section,
    store_line,
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
    let (last, health) = match agent.newest_backup().await {
        Ok(last) => (last, "ok".to_string()),
        Err(e) => (None, e.to_string()),
    };
    agent_row(namespace, pod, engine, &info, last.as_ref(), health)
}

/// One agent's row from what it said: identity, store, last backup, WAL archive, schedules,
/// retention policy and most recent failures (the document `status -o json` prints per agent).
fn agent_row(
    namespace: &str,
    pod: &str,
    engine: &str,
    info: &v1::AgentInfo,
    last: Option<&v1::BackupInfo>,
    health: String,
) -> Value {
    let engines: Vec<&str> = info
        .engines
        .iter()
        .map(|e| {
            v1::Engine::try_from(e.engine)
                .unwrap_or_default()
                .short_name()
        })
        .collect();
    let age = last.and_then(|b| {
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
        // Empty from an agent older than encryption at rest: it encrypts nothing.
        "encryption": if info.encryption.is_empty() { "off" } else { info.encryption.as_str() },
        "store_health": info.store_health.as_ref().map(store_health_json),
        "last_backup": last.map(|b| b.id.clone()),
        "last_backup_age_seconds": age,
        "running_jobs": info.running_jobs.len(),
        "wal_archive": info.wal_archive.as_ref().map(wal_archive_json),
        "last_recovery": info.last_recovery.as_ref().map(last_recovery_json),
        "qdrant_cluster": info.qdrant_cluster.as_ref().map(qdrant_cluster_json),
        "schedules": info.schedules.iter().map(schedule_json).collect::<Vec<_>>(),
        "retention": Some(info.retention.as_str()).filter(|r| !r.is_empty()),
        "recent_failures": info.recent_failures.iter().map(list::failure_json).collect::<Vec<_>>(),
        "health": overall_health(info, health),
    })
}

fn store_health_json(h: &v1::StoreHealth) -> Value {
    json!({
        "condition": h.condition,
        "retries": h.retries,
        "timeouts": h.timeouts,
        "failures": h.failures,
        "resumed_downloads": h.resumed_downloads,
        "last_problem": Some(h.last_problem.as_str()).filter(|p| !p.is_empty()),
        "last_problem_at": Some(h.last_problem_at.as_str()).filter(|p| !p.is_empty()),
    })
}

fn wal_archive_json(w: &v1::WalArchiveStatus) -> Value {
    json!({
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
        "set_aside_files": w.set_aside_files,
        "set_aside": w.set_aside,
    })
}

fn last_recovery_json(r: &v1::RecoveryEnd) -> Value {
    json!({
        "timeline": r.timeline,
        "parent_timeline": r.parent_timeline,
        "switch_lsn": r.switch_lsn,
        "reason": r.reason,
        "archive_end_lsn": Some(r.archive_end_lsn.as_str()).filter(|l| !l.is_empty()),
        "unreplayed_bytes": r.unreplayed_bytes,
        "verdict": r.verdict,
        "summary": r.summary,
        "checked_at": r.checked_at,
    })
}

fn qdrant_cluster_json(c: &v1::QdrantCluster) -> Value {
    json!({
        "this_peer": c.this_peer,
        "peers": c.peers.iter().map(|p| json!({
            "peer_id": p.peer_id, "url": p.url, "reachable": p.reachable,
        })).collect::<Vec<_>>(),
        "collections": c.collections.iter().map(|k| json!({
            "name": k.name,
            "shards": k.shards,
            "replicas": k.replicas,
            "active_replicas": k.active_replicas,
            "unavailable_shards": k.unavailable_shards,
            "not_active": k.not_active,
        })).collect::<Vec<_>>(),
        "error": Some(c.error.as_str()).filter(|e| !e.is_empty()),
    })
}

fn schedule_json(s: &v1::ScheduleStatus) -> Value {
    json!({
        "action": s.action,
        "cron": s.cron,
        "timezone": s.timezone,
        "next_run": s.next_run,
        "last_run": s.last_run,
        "last_result": s.last_result,
        "last_error": s.last_error,
        "last_backup_id": s.last_backup_id,
        "skipped": s.skipped,
        "failed": s.failed,
    })
}

/// The agent's health: what it reported about its store, then what its own report shows.
fn overall_health(info: &v1::AgentInfo, health: String) -> String {
    match info.store_health.as_ref() {
        // A store that gives up on requests fails backups and the WAL archive: unhealthy.
        Some(h) if health == "ok" && h.condition == "failing" => {
            format!("store failing: {}", h.last_problem)
        }
        // Committed transactions are missing from the restored server: not healthy.
        _ if health == "ok"
            && info
                .last_recovery
                .as_ref()
                .is_some_and(|r| r.verdict == "stopped-short") =>
        {
            "last recovery stopped short of the archive's end".into()
        }
        // A shard nobody can serve is data a backup cannot take.
        _ if health == "ok"
            && info.qdrant_cluster.as_ref().is_some_and(|c| {
                c.collections
                    .iter()
                    .any(|k| !k.unavailable_shards.is_empty())
            }) =>
        {
            "a Qdrant shard has no active replica".into()
        }
        _ if health == "ok"
            && info
                .qdrant_cluster
                .as_ref()
                .is_some_and(|c| !c.error.is_empty()) =>
        {
            "the Qdrant cluster's layout could not be read whole".into()
        }
        _ => health,
    }
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
    if let Some(n) = w["set_aside_files"].as_u64().filter(|n| *n > 0) {
        cell.push_str(&format!(", {n} spool file(s) set aside"));
    }
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
pub(crate) async fn run(
    agent: Option<&str>,
    kube: &KubeArgs,
    out: OutputFormat,
) -> Result<(), CliError> {
    let rows = match agent {
        Some(addr) => vec![probe(connect::direct(addr, kube).await, "", addr, "").await],
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
            // `--engine` narrows status to that engine's agents, as it narrows the choice elsewhere.
            let wanted = kube.engine.map(|e| e.label());
            let shown: Vec<_> = found
                .iter()
                .filter(|p| wanted.is_none_or(|e| p.engine == e))
                .collect();
            if shown.is_empty() {
                return Err(CliError::Kubernetes(format!(
                    "no soma agent for {} in namespace {namespace} (agents: {}); drop --engine or choose another",
                    wanted.unwrap_or_default(),
                    found
                        .iter()
                        .map(|p| format!("{} ({})", p.name, p.engine))
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            for pod in shown {
                let connected = if pod.ready {
                    connect::port_forward(&client, pod, kube).await
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
    output::print_block(&render(&rows, out)?);
    if healthy {
        Ok(())
    } else {
        Err(CliError::Other(
            "some agents are not healthy (see HEALTH)".into(),
        ))
    }
}

/// A JSON value as a table cell: strings bare (made safe by [`output::cell`]), null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => output::cell(s, 200),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// What `status` prints for `rows` in format `out`. The tables: one line per agent, then per
/// agent its schedules, retention policy and most recent failures (`--no-headers`: the agent lines
/// only, for scripts).
fn render(rows: &[Value], out: OutputFormat) -> Result<String, CliError> {
    let wide = match out {
        OutputFormat::Table => false,
        OutputFormat::Wide => true,
        OutputFormat::Name => {
            return Ok(rows
                .iter()
                .map(|r| format!("agent/{}\n", text(&r["pod"])))
                .collect());
        }
        format => return output::structured(format, &rows, "agent"),
    };
    let mut text_out = agent_table(rows, wide);
    if output::no_headers() {
        return Ok(text_out);
    }
    for r in rows {
        // An agent that did not answer has nothing more to say.
        if r.get("agent_version").is_none() {
            continue;
        }
        text_out.push_str(&agent_details(r, wide));
    }
    Ok(text_out)
}

/// The table of agents, one line each.
fn agent_table(rows: &[Value], wide: bool) -> String {
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut row = vec![
                text(&r["namespace"]),
                text(&r["pod"]),
                text(&r["engine"]),
                text(&r["agent_version"]),
                match r["restore_from"].as_str() {
                    Some(from) => format!(
                        "{} (restoring from {})",
                        text(&r["store"]),
                        output::cell(from, 200)
                    ),
                    None => text(&r["store"]),
                },
                text(&r["last_backup"]),
                age(r["last_backup_age_seconds"].as_i64()),
                wal_cell(&r["wal_archive"]),
            ];
            if wide {
                let w = &r["wal_archive"];
                row.extend([
                    text(&w["slot"]),
                    text(&w["archived_lsn"]),
                    text(&w["server_lsn"]),
                    text(&w["last_file"]),
                    r["running_jobs"].as_u64().unwrap_or(0).to_string(),
                    r["schedules"].as_array().map_or(0, Vec::len).to_string(),
                    text(&r["retention"]),
                ]);
            }
            row.push(text(&r["health"]));
            row
        })
        .collect();
    let mut headers = vec![
        "NAMESPACE",
        "POD",
        "ENGINE",
        "VERSION",
        "STORE",
        "LAST BACKUP",
        "AGE",
        "WAL ARCHIVE",
    ];
    if wide {
        headers.extend([
            "WAL SLOT",
            "ARCHIVED LSN",
            "SERVER LSN",
            "LAST WAL FILE",
            "JOBS",
            "SCHEDULES",
            "RETENTION",
        ]);
    }
    headers.push("HEALTH");
    output::render_table(&headers, &table)
}

/// One agent's sections below the table.
fn agent_details(r: &Value, wide: bool) -> String {
    let mut text_out = format!("\n{}:\n", agent_title(r));
    text_out.push_str(&set_aside_section(&r["wal_archive"]));
    if let Some(summary) = r["last_recovery"]["summary"].as_str() {
        let mark = if r["last_recovery"]["verdict"] == "stopped-short" {
            "LAST RECOVERY STOPPED SHORT"
        } else {
            "Last recovery"
        };
        text_out.push_str(&format!("  {mark}: {}\n", output::cell(summary, 600)));
    }
    text_out.push_str(&qdrant_cluster_section(&r["qdrant_cluster"]));
    text_out.push_str(&schedules_section(r, wide));
    text_out.push_str(&format!(
        "  Encryption: {}\n",
        match r["encryption"].as_str() {
            Some("off") | None => {
                "off (objects are stored as they are; see --encryption-key-file)".into()
            }
            Some(e) => output::cell(e, 200),
        }
    ));
    text_out.push_str(&format!(
        "  Store requests: {}\n",
        store_line(&r["store_health"])
    ));
    text_out.push_str(&format!(
        "  Retention: {}\n",
        match r["retention"].as_str() {
            Some(p) => output::cell(p, 200),
            None => "none (backups are kept until deleted; see --retention)".into(),
        }
    ));
    text_out.push_str(&failures_section(r, wide));
    text_out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> v1::AgentInfo {
        v1::AgentInfo {
            agent_version: "0.2.0".into(),
            store: "s3://soma-backups/prod".into(),
            engines: vec![v1::EngineInfo {
                engine: v1::Engine::Postgres as i32,
                target: "postgresql://soma@127.0.0.1:5432/app".into(),
            }],
            schedules: vec![
                v1::ScheduleStatus {
                    action: "backup".into(),
                    cron: "0 2 * * *".into(),
                    timezone: "UTC".into(),
                    next_run: "2026-11-30T02:00:00Z".into(),
                    last_run: "2026-11-29T02:00:03Z".into(),
                    last_result: "succeeded".into(),
                    last_backup_id: "20261129T020003Z-set-all-1a2b".into(),
                    skipped: 1,
                    failed: 0,
                    ..Default::default()
                },
                v1::ScheduleStatus {
                    action: "drill".into(),
                    cron: "30 3 * * 0".into(),
                    timezone: "UTC".into(),
                    next_run: "2026-12-06T03:30:00Z".into(),
                    last_run: "2026-11-29T03:30:00Z".into(),
                    last_result: "failed".into(),
                    last_error: "row count of public.users: expected 100, found 99".into(),
                    failed: 2,
                    ..Default::default()
                },
            ],
            retention: "keep-last=7,keep-daily=14".into(),
            recent_failures: vec![v1::FailureRecord {
                id: "20261129T033000Z-fail-9f8e".into(),
                operation: "drill".into(),
                backup_id: "20261129T020003Z-set-all-1a2b".into(),
                target: "postgresql://soma@127.0.0.1:5432/app".into(),
                failed_at: "2026-11-29T03:30:41Z".into(),
                error: "row count of public.users: expected 100, found 99".into(),
                trigger: "schedule: drill 30 3 * * 0".into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_qdrant_shard_without_an_active_replica_makes_the_agent_unhealthy() {
        let mut i = info();
        i.qdrant_cluster = Some(v1::QdrantCluster {
            this_peer: 11,
            peers: vec![
                v1::QdrantPeer {
                    peer_id: 11,
                    url: "http://127.0.0.1:6333".into(),
                    reachable: true,
                },
                v1::QdrantPeer {
                    peer_id: 22,
                    url: "http://qdrant-1.qdrant-headless:6333".into(),
                    reachable: false,
                },
            ],
            collections: vec![v1::QdrantCollectionShards {
                name: "docs".into(),
                shards: 6,
                replicas: 12,
                active_replicas: 10,
                unavailable_shards: vec![4],
                not_active: vec!["shard 4: peer 22 Dead, peer 33 Dead".into()],
            }],
            error: String::new(),
        });
        let row = agent_row("shop", "qdrant-0", "qdrant", &i, None, "ok".into());
        assert_eq!(row["health"], "a Qdrant shard has no active replica");
        let text = render(std::slice::from_ref(&row), OutputFormat::Table).unwrap();
        assert!(
            text.contains("Qdrant cluster: 2 node(s) (1 unreachable), this node peer 11"),
            "{text}"
        );
        assert!(
            text.contains("peer 22 http://qdrant-1.qdrant-headless:6333  UNREACHABLE"),
            "{text}"
        );
        assert!(
            text.contains(
                "collection docs: 6 shard(s), 10/12 replicas active; SHARDS WITHOUT AN ACTIVE REPLICA: 4"
            ),
            "{text}"
        );
        assert!(
            text.contains("shard 4: peer 22 Dead, peer 33 Dead"),
            "{text}"
        );

        // All active: healthy, and a single node shows no cluster section.
        let c = i.qdrant_cluster.as_mut().unwrap();
        c.collections[0].unavailable_shards.clear();
        let row = agent_row("shop", "qdrant-0", "qdrant", &i, None, "ok".into());
        assert_eq!(row["health"], "ok");
        i.qdrant_cluster = None;
        let row = agent_row("shop", "qdrant-0", "qdrant", &i, None, "ok".into());
        let text = render(std::slice::from_ref(&row), OutputFormat::Table).unwrap();
        assert!(!text.contains("Qdrant cluster"), "{text}");
    }

    #[test]
    fn status_shows_schedules_retention_and_failures() {
        let row = agent_row(
            "shop",
            "postgresql-0",
            "postgres",
            &info(),
            None,
            "ok".into(),
        );
        let text = render(std::slice::from_ref(&row), OutputFormat::Table).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("NAMESPACE"), "{text}");
        assert!(lines[1].starts_with("shop"), "{text}");
        assert!(text.contains("Agent shop/postgresql-0:"), "{text}");
        let header = lines
            .iter()
            .find(|l| l.contains("ACTION"))
            .unwrap_or_else(|| panic!("no schedules table:\n{text}"));
        for column in [
            "CRON",
            "NEXT RUN (UTC)",
            "LAST RUN (UTC)",
            "LAST RESULT",
            "SKIPPED",
            "FAILED",
        ] {
            assert!(header.contains(column), "{text}");
        }
        let backup = lines
            .iter()
            .find(|l| l.trim_start().starts_with("backup "))
            .unwrap();
        assert!(
            backup.contains("0 2 * * *") && backup.contains("2026-11-30 02:00:00"),
            "{text}"
        );
        let counts: Vec<&str> = backup.split_whitespace().rev().take(2).collect();
        assert!(
            backup.contains("succeeded") && counts == ["0", "1"],
            "{text}"
        );
        let drill = lines
            .iter()
            .find(|l| l.trim_start().starts_with("drill "))
            .unwrap();
        assert!(
            drill.contains("failed (row count of public.users: expected 100, found 99)"),
            "{text}"
        );
        assert!(
            text.contains("  Retention: keep-last=7,keep-daily=14"),
            "{text}"
        );
        assert!(text.contains("Recent failures (newest first"), "{text}");
        assert!(text.contains("schedule: drill 30 3 * * 0"), "{text}");
        assert!(!text.contains("no failures recorded"), "{text}");

        let wide = render(std::slice::from_ref(&row), OutputFormat::Wide).unwrap();
        assert!(
            wide.contains("TIMEZONE") && wide.contains("20261129T020003Z-set-all-1a2b"),
            "{wide}"
        );

        let json: Value =
            serde_json::from_str(&render(std::slice::from_ref(&row), OutputFormat::Json).unwrap())
                .unwrap();
        assert_eq!(json[0]["schedules"][1]["failed"], 2);
        assert_eq!(json[0]["retention"], "keep-last=7,keep-daily=14");
        assert_eq!(json[0]["recent_failures"][0]["operation"], "drill");
        let path = OutputFormat::parse(
            "jsonpath={range .items[*].schedules[*]}{.action}={.next_run}{\"\\n\"}{end}",
        )
        .unwrap();
        assert_eq!(
            render(std::slice::from_ref(&row), path).unwrap(),
            "backup=2026-11-30T02:00:00Z\ndrill=2026-12-06T03:30:00Z\n"
        );
        assert_eq!(
            render(std::slice::from_ref(&row), OutputFormat::Name).unwrap(),
            "agent/postgresql-0\n"
        );
    }

    #[test]
    fn status_names_the_wal_spool_files_set_aside() {
        let mut with_wal = info();
        with_wal.wal_archive = Some(v1::WalArchiveStatus {
            receiving: true,
            set_aside_files: 2,
            set_aside: vec![
                "000000010000000000000001: written by another PostgreSQL cluster; moved to /spool/set-aside/x/000000010000000000000001".into(),
                "00000002.history: timeline 2 is after the server's timeline 1; moved to /spool/set-aside/x/00000002.history".into(),
            ],
            ..Default::default()
        });
        let row = agent_row("shop", "pg-0", "postgres", &with_wal, None, "ok".into());
        let text = render(std::slice::from_ref(&row), OutputFormat::Table).unwrap();
        assert!(
            text.contains("streaming") && text.contains("2 spool file(s) set aside"),
            "{text}"
        );
        assert!(text.contains("  WAL spool: 2 file(s) set aside"), "{text}");
        assert!(
            text.contains("    00000002.history: timeline 2 is after"),
            "{text}"
        );
        let json: Value =
            serde_json::from_str(&render(std::slice::from_ref(&row), OutputFormat::Json).unwrap())
                .unwrap();
        assert_eq!(json[0]["wal_archive"]["set_aside_files"], 2);
        // Nothing set aside, nothing said.
        let text = render(
            &[agent_row("", "a", "", &info(), None, "ok".into())],
            OutputFormat::Table,
        )
        .unwrap();
        assert!(!text.contains("set aside"), "{text}");
    }

    #[test]
    fn an_agent_with_nothing_scheduled_or_failed_says_so() {
        let bare = v1::AgentInfo {
            agent_version: "0.1.0".into(),
            ..Default::default()
        };
        let row = agent_row("", "127.0.0.1:50051", "", &bare, None, "ok".into());
        let text = render(&[row], OutputFormat::Table).unwrap();
        assert!(text.contains("Agent 127.0.0.1:50051:"), "{text}");
        assert!(text.contains("Schedules: none"), "{text}");
        assert!(text.contains("Retention: none"), "{text}");
        assert!(
            text.contains("Recent failures: no failures recorded"),
            "{text}"
        );
        // An agent that could not be reached is a row with its reason, nothing more.
        let down = json!({"namespace": "shop", "pod": "qdrant-0", "engine": "qdrant", "health": "pod not ready"});
        let text = render(&[down], OutputFormat::Table).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }
}
