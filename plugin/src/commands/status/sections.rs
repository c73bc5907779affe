//! The per-agent sections `status` prints below its table: the store's requests, the WAL files
//! set aside, the Qdrant cluster, the schedules and the recent failures.

use serde_json::Value;
use soma_proto::v1;

use super::text;
use crate::{commands::list, output};

/// The store's condition in one line: what its requests met since the agent started.
pub(super) fn store_line(h: &Value) -> String {
    if h.is_null() {
        return "local directory".into();
    }
    let condition = h["condition"].as_str().unwrap_or("unknown");
    let counts = format!(
        "{} retries, {} frozen connections dropped, {} downloads resumed, {} requests failed since start",
        h["retries"].as_u64().unwrap_or(0),
        h["timeouts"].as_u64().unwrap_or(0),
        h["resumed_downloads"].as_u64().unwrap_or(0),
        h["failures"].as_u64().unwrap_or(0),
    );
    let mut line = match condition {
        "ok" => format!("ok ({counts})"),
        "slow" => format!("SLOW: requests needed retries in the last 5 minutes ({counts})"),
        "failing" => format!("FAILING: requests give up after every attempt ({counts})"),
        other => format!("{} ({counts})", output::cell(other, 20)),
    };
    if let Some(p) = h["last_problem"].as_str() {
        let at = h["last_problem_at"].as_str().unwrap_or("-");
        line.push_str(&format!("; last problem at {at}: {}", output::cell(p, 300)));
    }
    line
}

/// The WAL spool files the agent moved aside (not this server's WAL), when there are any: how
/// many, and the most recent with their reasons and where they went.
pub(super) fn set_aside_section(w: &Value) -> String {
    let Some(n) = w["set_aside_files"].as_u64().filter(|n| *n > 0) else {
        return String::new();
    };
    let mut out = format!(
        "  WAL spool: {n} file(s) set aside, not this server's WAL (kept in the spool's set-aside folder, never shipped):\n"
    );
    for line in w["set_aside"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "    {}\n",
            output::cell(line.as_str().unwrap_or(""), 400)
        ));
    }
    out
}

/// A distributed Qdrant: its nodes, then per collection shards × replicas and what is not
/// active; nothing for a single node.
pub(super) fn qdrant_cluster_section(c: &Value) -> String {
    if c.is_null() {
        return String::new();
    }
    let peers = c["peers"].as_array().cloned().unwrap_or_default();
    let mut out = format!(
        "  Qdrant cluster: {} node(s) ({} unreachable), this node peer {}\n",
        peers.len(),
        peers.iter().filter(|p| p["reachable"] != true).count(),
        c["this_peer"]
    );
    for p in &peers {
        out.push_str(&format!(
            "    peer {} {}{}\n",
            p["peer_id"],
            output::cell(p["url"].as_str().unwrap_or(""), 200),
            if p["reachable"] == true {
                ""
            } else {
                "  UNREACHABLE"
            }
        ));
    }
    for k in c["collections"].as_array().into_iter().flatten() {
        let unavailable = k["unavailable_shards"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        out.push_str(&format!(
            "    collection {}: {} shard(s), {}/{} replicas active{}\n",
            output::cell(k["name"].as_str().unwrap_or(""), 120),
            k["shards"],
            k["active_replicas"],
            k["replicas"],
            if unavailable.is_empty() {
                String::new()
            } else {
                format!(
                    "; SHARDS WITHOUT AN ACTIVE REPLICA: {}",
                    unavailable
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        ));
        for line in k["not_active"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "      {}\n",
                output::cell(line.as_str().unwrap_or(""), 300)
            ));
        }
    }
    if let Some(e) = c["error"].as_str() {
        out.push_str(&format!(
            "    could not read all of it: {}\n",
            output::cell(e, 300)
        ));
    }
    out
}

pub(super) fn agent_title(r: &Value) -> String {
    match r["namespace"].as_str().filter(|n| !n.is_empty()) {
        Some(ns) => format!("Agent {ns}/{}", text(&r["pod"])),
        None => format!("Agent {}", text(&r["pod"])),
    }
}

pub(super) fn indent(block: &str) -> String {
    block.lines().map(|l| format!("    {l}\n")).collect()
}

/// The schedules of one agent: "Schedules: none" or a table (ACTION, CRON, NEXT RUN, LAST RUN,
/// LAST RESULT, SKIPPED, FAILED; `wide` adds the time zone, the last backup and the last error).
pub(super) fn schedules_section(r: &Value, wide: bool) -> String {
    let schedules = r["schedules"].as_array().cloned().unwrap_or_default();
    if schedules.is_empty() {
        return "  Schedules: none (this agent runs nothing by itself; see --schedule)\n".into();
    }
    let rows: Vec<Vec<String>> = schedules
        .iter()
        .map(|s| {
            let time = |v: &Value| match v.as_str().filter(|t| !t.is_empty()) {
                Some(t) => output::short_time(&output::cell(t, 64)),
                None => "-".into(),
            };
            let result = match (
                s["last_result"].as_str().unwrap_or(""),
                s["last_error"].as_str().unwrap_or(""),
            ) {
                ("", _) => "-".to_string(),
                (result, "") => output::cell(result, 20),
                (result, _) if wide => output::cell(result, 20),
                (result, error) => {
                    format!("{} ({})", output::cell(result, 20), output::cell(error, 60))
                }
            };
            let mut row = vec![
                text(&s["action"]),
                text(&s["cron"]),
                time(&s["next_run"]),
                time(&s["last_run"]),
                result,
                s["skipped"].as_u64().unwrap_or(0).to_string(),
                s["failed"].as_u64().unwrap_or(0).to_string(),
            ];
            if wide {
                row.extend([
                    text(&s["timezone"]),
                    text(&s["last_backup_id"]),
                    text(&s["last_error"]),
                ]);
            }
            row
        })
        .collect();
    let mut headers = vec![
        "ACTION",
        "CRON",
        "NEXT RUN (UTC)",
        "LAST RUN (UTC)",
        "LAST RESULT",
        "SKIPPED",
        "FAILED",
    ];
    if wide {
        headers.extend(["TIMEZONE", "LAST BACKUP", "LAST ERROR"]);
    }
    format!(
        "  Schedules:\n{}",
        indent(&output::render_table(&headers, &rows))
    )
}

/// A failure record back from its JSON form (the row keeps JSON; the table wants the record).
pub(super) fn failure_from_json(v: &Value) -> v1::FailureRecord {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    v1::FailureRecord {
        id: s("id"),
        operation: s("operation"),
        backup_id: s("backup_id"),
        engine: s("engine"),
        kind: s("kind"),
        target: s("target"),
        started_at: s("started_at"),
        failed_at: s("failed_at"),
        error: s("error"),
        trigger: s("trigger"),
    }
}

/// The most recent failures recorded in the store, as a table, or that there are none.
pub(super) fn failures_section(r: &Value, wide: bool) -> String {
    let failures = r["recent_failures"].as_array().cloned().unwrap_or_default();
    if failures.is_empty() {
        return "  Recent failures: no failures recorded\n".into();
    }
    let records: Vec<v1::FailureRecord> = failures.iter().map(failure_from_json).collect();
    let (headers, rows) = list::failure_rows(&records, wide);
    format!(
        "  Recent failures (newest first; all: kubectl soma list --failed):\n{}",
        indent(&output::render_table(&headers, &rows))
    )
}
