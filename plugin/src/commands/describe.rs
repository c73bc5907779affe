//! `kubectl soma describe ID|latest`.

use soma_proto::v1;

use crate::{
    cli::{IdArg, OutputFormat},
    connect::Agent,
    error::CliError,
    output,
};

/// Shows one backup; json/yaml print its manifest.
pub(crate) async fn run(mut agent: Agent, out: OutputFormat, args: IdArg) -> Result<(), CliError> {
    let asked_latest = args.id == "latest";
    let info = agent
        .client
        .describe_backup(v1::DescribeBackupRequest {
            backup_id: args.id,
            engine: args.engine.map_or(0, |e| e.to_proto() as i32),
        })
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let manifest = output::manifest(&info)?;
    match out {
        format if format.is_table() => {
            print_table(&info, &manifest, asked_latest);
            Ok(())
        }
        format => {
            // The manifest as stored, with the last drill's report beside it.
            let mut manifest = manifest;
            if let (Some(d), Some(obj)) = (&info.last_drill, manifest.as_object_mut()) {
                let report = serde_json::from_str(&d.report_json).unwrap_or_else(
                    |_| serde_json::json!({"passed": d.passed, "failure": d.failure}),
                );
                obj.insert("last_drill".into(), report);
            }
            output::print_structured(format, &manifest)
        }
    }
}

/// The backup for a reader: identity, sizes, encryption, what can be recovered, the last drill
/// and every artifact with its digests.
fn print_table(info: &v1::BackupInfo, manifest: &serde_json::Value, asked_latest: bool) {
    let s = text;
    if asked_latest {
        outln!("{}", resolved_line(info, &s(&manifest["kind"])));
    }
    outln!("ID:          {}", info.id);
    outln!(
        "Engine:      {} ({})",
        output::engine_name(info),
        s(&manifest["kind"])
    );
    outln!("Target:      {}", info.target);
    outln!(
        "Server:      {} (version {})",
        s(&manifest["target"]["server"]),
        s(&manifest["target"]["server_version"])
    );
    outln!(
        "Tool:        {} {}",
        s(&manifest["tool"]["name"]),
        s(&manifest["tool"]["version"])
    );
    outln!("Started:     {}", info.started_at);
    outln!("Completed:   {}", info.completed_at);
    outln!(
        "Size:        {} raw, {} stored",
        output::bytes(info.raw_bytes),
        output::bytes(info.stored_bytes)
    );
    outln!("Agent:       {}", s(&manifest["agent_version"]));
    match manifest["encryption"].as_object() {
        Some(e) => outln!(
            "Encryption:  {}, key {}",
            s(&e["algorithm"]),
            s(&e["key_fingerprint"])
        ),
        None => outln!("Encryption:  none"),
    }
    if let Some(w) = &info.recovery_window {
        print_recovery_window(w);
    }
    if s(&manifest["kind"]) == "physical" {
        outln!(
            "Recovery settings: {}",
            recovery_settings_line(&manifest["details"]["recovery_settings"])
        );
    }
    for line in qdrant_layout_lines(&manifest["details"]) {
        outln!("{line}");
    }
    match &info.last_drill {
        Some(d) if d.drilled_at.is_empty() => {
            outln!("Last drill:  unknown ({})", d.failure)
        }
        Some(d) => outln!("Last drill:  {}", drill_line(d)),
        None => outln!("Last drill:  never (run `kubectl soma drill {}`)", info.id),
    }
    print_artifacts(manifest);
}

/// A manifest string field, empty when absent.
fn text(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

/// The span of time a point-in-time restore can reach from this backup, and the WAL in it that
/// cannot be used.
fn print_recovery_window(w: &v1::RecoveryWindow) {
    if w.error.is_empty() {
        outln!(
            "Recoverable: {} (LSN {}) … {} (LSN {}), timeline {}",
            output::short_time(&w.earliest_time),
            w.earliest_lsn,
            output::short_time(&w.latest_time),
            w.latest_lsn,
            w.timeline
        );
        if w.gaps.is_empty() {
            outln!("WAL gaps:    none");
        } else {
            outln!(
                "WAL gaps:    {} — WAL after a gap cannot be replayed",
                w.gaps.join(", ")
            );
        }
        if !w.rejected.is_empty() {
            outln!(
                "WAL skipped: {} — not what their names say, not used",
                w.rejected.join("; ")
            );
        }
    } else {
        outln!("Recoverable: unknown ({})", w.error);
    }
}

fn print_artifacts(manifest: &serde_json::Value) {
    let s = text;
    outln!("Artifacts:");
    for a in manifest["artifacts"].as_array().into_iter().flatten() {
        outln!(
            "  {}  {}  raw {} sha256 {}  stored {} sha256 {}  {} part(s)",
            s(&a["name"]),
            s(&a["format"]),
            output::bytes(a["raw_bytes"].as_u64().unwrap_or(0)),
            s(&a["raw_sha256"]),
            output::bytes(a["stored_bytes"].as_u64().unwrap_or(0)),
            s(&a["stored_sha256"]),
            a["parts"].as_u64().unwrap_or(0),
        );
    }
}

/// A Qdrant backup's cluster and each collection's shards: "docs: 6 shards × 2 replicas (auto),
/// 6000 points: shard 0 1012 from peer 12, …". Nothing for other backups.
fn qdrant_layout_lines(details: &serde_json::Value) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(c) = details["cluster"].as_object() {
        lines.push(format!(
            "Cluster:     {} Qdrant node(s), taken through peer {}",
            c.get("peers")
                .and_then(|p| p.as_array())
                .map_or(0, Vec::len),
            c.get("node").cloned().unwrap_or_default()
        ));
    }
    for (name, record) in details["collections"].as_object().into_iter().flatten() {
        let l = &record["layout"];
        if !l.is_object() {
            continue;
        }
        let shards: Vec<String> = l["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .take(64)
            .map(|sh| {
                format!(
                    "shard {}{} {} from peer {}",
                    sh["id"],
                    sh.get("key")
                        .map(|k| format!(" (key {k})"))
                        .unwrap_or_default(),
                    sh["points_count"],
                    sh["taken_from"]
                )
            })
            .collect();
        lines.push(format!(
            "Collection:  {}: {} shard(s) × {} replica(s), write consistency {}, {} sharding, {} points; payload indexes: {}",
            output::cell(name, 120),
            l["shards"].as_array().map_or(0, Vec::len),
            l["replication_factor"],
            l["write_consistency_factor"],
            l["sharding_method"].as_str().unwrap_or("auto"),
            l["exact_count"],
            match l["payload_schema"].as_object() {
                Some(f) if !f.is_empty() => f.keys().map(|k| output::cell(k, 60)).collect::<Vec<_>>().join(", "),
                _ => "none".into(),
            }
        ));
        lines.push(format!(
            "             {}",
            output::cell(&shards.join("; "), 2000)
        ));
    }
    lines
}

/// "passed 2026-11-29 14:35:09, RTO 3.2 s" or "FAILED …: why".
fn drill_line(d: &v1::DrillReport) -> String {
    let when = output::short_time(&d.drilled_at);
    if d.passed {
        format!("passed {when}, RTO {:.1} s", d.rto_seconds)
    } else {
        format!("FAILED {when}: {}", d.failure)
    }
}

/// The line that tells a user which backup "latest" named, so a restore of "latest" holds no
/// surprise.
fn resolved_line(info: &v1::BackupInfo, kind: &str) -> String {
    let what = if info.members.is_empty() {
        format!("{} {kind}", output::engine_name(info))
    } else {
        format!("set of {} backups", info.members.len())
    };
    format!(
        "latest resolved to {} ({what}, completed {})",
        info.id,
        output::short_time(&info.completed_at)
    )
}

/// What a base backup's configuration files set of recovery settings when it was taken.
fn recovery_settings_line(v: &serde_json::Value) -> String {
    match v.as_array() {
        None => "not recorded (an older agent, or its role could not read pg_file_settings)".into(),
        Some(names) if names.is_empty() => "none carried".into(),
        Some(names) => format!(
            "carried: {} (from an earlier restore or the configuration; a restore neutralises them)",
            output::cell(
                &names
                    .iter()
                    .filter_map(|n| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                400
            )
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_names_the_backup_it_resolved_to() {
        let set = v1::BackupInfo {
            id: "20261129T143501Z-set-all-1a2b".into(),
            engine: v1::Engine::Set as i32,
            completed_at: "2026-11-29T14:35:09.5+00:00".into(),
            members: vec![
                "20261129T143502Z-pg-app-3c4d".into(),
                "20261129T143503Z-qd-all-5e6f".into(),
            ],
            ..Default::default()
        };
        assert_eq!(
            resolved_line(&set, "set"),
            "latest resolved to 20261129T143501Z-set-all-1a2b (set of 2 backups, completed 2026-11-29 14:35:09)"
        );
        let pg = v1::BackupInfo {
            id: "20261129T143502Z-pg-app-3c4d".into(),
            engine: v1::Engine::Postgres as i32,
            completed_at: "2026-11-29T14:35:04+00:00".into(),
            ..Default::default()
        };
        assert_eq!(
            resolved_line(&pg, "logical"),
            "latest resolved to 20261129T143502Z-pg-app-3c4d (postgres logical, completed 2026-11-29 14:35:04)"
        );
    }
}
