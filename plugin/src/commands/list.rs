//! `kubectl soma list [--failed]`.

use serde_json::{Value, json};
use soma_proto::v1;

use crate::{
    cli::OutputFormat,
    connect::{self, Agent},
    error::CliError,
    output,
};

/// Lists the complete backups of every given agent (deduplicated when they share a store),
/// newest first; json/yaml print an array of manifests, `-o name` one `backup/<id>` per line.
pub(crate) async fn run_many(agents: Vec<Agent>, out: OutputFormat) -> Result<(), CliError> {
    let mut backups: Vec<v1::BackupInfo> = Vec::new();
    let mut unreadable: Vec<v1::UnreadableBackup> = Vec::new();
    for mut agent in agents {
        let listed = agent.all_backups().await?;
        for u in listed.unreadable {
            if !unreadable.iter().any(|x| x.id == u.id) {
                unreadable.push(u);
            }
        }
        for b in listed.backups {
            if !backups.iter().any(|x| x.id == b.id) {
                backups.push(b);
            }
        }
    }
    // On stderr whatever the format: -o json stays an array of manifests.
    for u in &unreadable {
        errln!(
            "warning: backup {} is left out: its manifest is unreadable: {}",
            u.id,
            u.reason
        );
    }
    // Newest first, as each agent orders its own.
    backups.sort_by(|a, b| (&b.started_at, &b.id).cmp(&(&a.started_at, &a.id)));
    match out {
        OutputFormat::Table | OutputFormat::Wide => {
            if backups.is_empty() {
                eprintln!("no backups yet; take one with `kubectl soma backup postgres`");
                return Ok(());
            }
            let wide = out == OutputFormat::Wide;
            let (headers, rows) = backup_table(&backups, wide);
            output::table(&headers, &rows);
            Ok(())
        }
        format => {
            let manifests = backups
                .iter()
                .map(output::manifest)
                .collect::<Result<Vec<_>, _>>()?;
            output::print_structured(format, &manifests)
        }
    }
}

/// The `list` table: members of a set under it, indented; `wide` adds the kind, the start time,
/// the members count and the last drill.
fn backup_table(backups: &[v1::BackupInfo], wide: bool) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let in_set: std::collections::HashSet<&str> = backups
        .iter()
        .flat_map(|b| b.members.iter().map(String::as_str))
        .collect();
    let row = |b: &v1::BackupInfo, indent: &str| backup_row(b, indent, wide);
    let mut rows = Vec::new();
    for b in backups.iter().filter(|b| !in_set.contains(b.id.as_str())) {
        rows.push(row(b, ""));
        for member in &b.members {
            if let Some(m) = backups.iter().find(|x| &x.id == member) {
                rows.push(row(m, "└ "));
            }
        }
    }
    let headers = if wide {
        vec![
            "ID",
            "ENGINE",
            "KIND",
            "TARGET",
            "STARTED (UTC)",
            "COMPLETED (UTC)",
            "SIZE",
            "STORED",
            "MEMBERS",
            "RECOVERABLE",
            "LAST DRILL",
        ]
    } else {
        vec![
            "ID",
            "ENGINE",
            "TARGET",
            "COMPLETED (UTC)",
            "SIZE",
            "STORED",
            "RECOVERABLE",
        ]
    };
    (headers, rows)
}

/// One line of the `list` table; `indent` marks a member under its set.
fn backup_row(b: &v1::BackupInfo, indent: &str, wide: bool) -> Vec<String> {
    let target = if b.members.is_empty() {
        output::cell(&b.target, 60)
    } else {
        format!("{} members", b.members.len())
    };
    let engine = match (b.kind.as_str(), wide) {
        ("physical", false) => format!("{} (physical)", output::engine_name(b)),
        _ => output::engine_name(b).to_string(),
    };
    let recoverable = match &b.recovery_window {
        Some(w) if !w.error.is_empty() => "unknown".to_string(),
        Some(w) if !w.gaps.is_empty() => {
            format!("until {} (gap after)", output::short_time(&w.latest_time))
        }
        Some(w) => format!("until {}", output::short_time(&w.latest_time)),
        None => "-".to_string(),
    };
    let id = format!("{indent}{}", b.id);
    if !wide {
        return vec![
            id,
            engine,
            target,
            output::short_time(&b.completed_at),
            output::bytes(b.raw_bytes),
            output::bytes(b.stored_bytes),
            recoverable,
        ];
    }
    let drill = match &b.last_drill {
        None => "-".to_string(),
        Some(d) if d.passed => format!("passed ({:.1}s)", d.rto_seconds),
        Some(_) => "FAILED".to_string(),
    };
    vec![
        id,
        engine,
        output::cell(&b.kind, 20),
        target,
        output::short_time(&b.started_at),
        output::short_time(&b.completed_at),
        output::bytes(b.raw_bytes),
        output::bytes(b.stored_bytes),
        if b.members.is_empty() {
            "-".into()
        } else {
            b.members.len().to_string()
        },
        recoverable,
        drill,
    ]
}

/// `list --failed`: the failures every agent recorded (deduplicated when they share a store),
/// newest first.
pub(crate) async fn run_failed(agents: Vec<Agent>, out: OutputFormat) -> Result<(), CliError> {
    let mut failures: Vec<v1::FailureRecord> = Vec::new();
    for agent in agents {
        let mut client = agent.client.clone();
        let listed = match client
            .list_failures(v1::ListFailuresRequest { limit: 0 })
            .await
        {
            Ok(r) => r.into_inner().failures,
            Err(s) => {
                return Err(
                    connect::call_error(&agent, s, "listing failures (list --failed)").await,
                );
            }
        };
        for f in listed {
            if !failures.iter().any(|x| x.id == f.id) {
                failures.push(f);
            }
        }
    }
    failures.sort_by(|a, b| (&b.failed_at, &b.id).cmp(&(&a.failed_at, &a.id)));
    output::print_block(&render_failures(&failures, out)?);
    if failures.is_empty() && out.is_table() {
        eprintln!("no failures recorded");
    }
    Ok(())
}

/// A failure record as JSON, with the contract's field names.
pub(crate) fn failure_json(f: &v1::FailureRecord) -> Value {
    json!({
        "id": f.id,
        "operation": f.operation,
        "backup_id": f.backup_id,
        "engine": f.engine,
        "kind": f.kind,
        "target": f.target,
        "started_at": f.started_at,
        "failed_at": f.failed_at,
        "error": f.error,
        "trigger": f.trigger,
    })
}

/// The failures table's rows (WHEN, OPERATION, BACKUP, TARGET, TRIGGER, ERROR; `wide` adds the
/// engine, kind, start and the record's id and shows the whole error).
pub(crate) fn failure_rows(
    failures: &[v1::FailureRecord],
    wide: bool,
) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            output::cell(s, 80)
        }
    };
    let rows = failures
        .iter()
        .map(|f| {
            let mut row = vec![
                output::short_time(&f.failed_at),
                dash(&f.operation),
                dash(&f.backup_id),
                dash(&f.target),
                dash(&f.trigger),
            ];
            if wide {
                row.extend([
                    dash(&f.engine),
                    dash(&f.kind),
                    output::short_time(&f.started_at),
                    dash(&f.id),
                    output::cell(&f.error, 4096),
                ]);
            } else {
                row.push(output::cell(&f.error, 100));
            }
            row
        })
        .collect();
    let headers = if wide {
        vec![
            "WHEN (UTC)",
            "OPERATION",
            "BACKUP",
            "TARGET",
            "TRIGGER",
            "ENGINE",
            "KIND",
            "STARTED (UTC)",
            "ID",
            "ERROR",
        ]
    } else {
        vec![
            "WHEN (UTC)",
            "OPERATION",
            "BACKUP",
            "TARGET",
            "TRIGGER",
            "ERROR",
        ]
    };
    (headers, rows)
}

/// What `list --failed` prints for `failures` in format `out`.
fn render_failures(failures: &[v1::FailureRecord], out: OutputFormat) -> Result<String, CliError> {
    match out {
        OutputFormat::Table | OutputFormat::Wide => {
            if failures.is_empty() {
                return Ok(String::new());
            }
            let (headers, rows) = failure_rows(failures, out == OutputFormat::Wide);
            Ok(output::render_table(&headers, &rows))
        }
        format => {
            let docs: Vec<Value> = failures.iter().map(failure_json).collect();
            output::structured(format, &docs, "failure")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures() -> Vec<v1::FailureRecord> {
        vec![
            v1::FailureRecord {
                id: "20261129T020000Z-fail-1a2b".into(),
                operation: "backup".into(),
                backup_id: "20261129T020000Z-pg-app-1a2b".into(),
                engine: "postgres".into(),
                kind: "logical".into(),
                target: "postgresql://soma@127.0.0.1:5432/app".into(),
                started_at: "2026-11-29T02:00:00Z".into(),
                failed_at: "2026-11-29T02:00:07Z".into(),
                error: "pg_dump: connection refused\nis the server running?".into(),
                trigger: "schedule: backup 0 2 * * *".into(),
            },
            v1::FailureRecord {
                id: "20261128T120000Z-fail-3c4d".into(),
                operation: "verify".into(),
                failed_at: "2026-11-28T12:00:01Z".into(),
                error: "checksum mismatch".into(),
                trigger: "client".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn failures_render_in_every_format() {
        let f = failures();
        let table = render_failures(&f, OutputFormat::Table).unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        for h in [
            "WHEN (UTC)",
            "OPERATION",
            "BACKUP",
            "TARGET",
            "TRIGGER",
            "ERROR",
        ] {
            assert!(lines[0].contains(h), "{table}");
        }
        assert!(
            lines[1].starts_with("2026-11-29 02:00:07   backup"),
            "{table}"
        );
        assert!(lines[1].contains("schedule: backup 0 2 * * *"), "{table}");
        // The error's newline stays inside its cell.
        assert!(
            lines[1].ends_with("pg_dump: connection refused is the server running?"),
            "{table}"
        );
        assert!(
            lines[2].contains("verify") && lines[2].contains(" - "),
            "{table}"
        );

        let wide = render_failures(&f, OutputFormat::Wide).unwrap();
        assert!(wide.lines().next().unwrap().contains("KIND"), "{wide}");
        assert!(wide.contains("20261129T020000Z-fail-1a2b"), "{wide}");

        let json: Value =
            serde_json::from_str(&render_failures(&f, OutputFormat::Json).unwrap()).unwrap();
        assert_eq!(json[0]["trigger"], "schedule: backup 0 2 * * *");
        assert_eq!(json[1]["operation"], "verify");
        let yaml = render_failures(&f, OutputFormat::Yaml).unwrap();
        assert!(yaml.contains("operation: verify"), "{yaml}");
        assert_eq!(
            render_failures(&f, OutputFormat::Name).unwrap(),
            "failure/20261129T020000Z-fail-1a2b\nfailure/20261128T120000Z-fail-3c4d\n"
        );
        let path = OutputFormat::parse(
            r#"jsonpath={range .items[*]}{.operation}{"\t"}{.backup_id}{"\n"}{end}"#,
        )
        .unwrap();
        assert_eq!(
            render_failures(&f, path).unwrap(),
            "backup\t20261129T020000Z-pg-app-1a2b\nverify\t\n"
        );
        assert_eq!(render_failures(&[], OutputFormat::Table).unwrap(), "");
        assert_eq!(render_failures(&[], OutputFormat::Json).unwrap(), "[]\n");
    }

    #[test]
    fn wide_list_adds_columns_and_keeps_members_under_their_set() {
        let set = v1::BackupInfo {
            id: "20261129T143501Z-set-all-1a2b".into(),
            engine: v1::Engine::Set as i32,
            kind: "set".into(),
            started_at: "2026-11-29T14:35:01Z".into(),
            completed_at: "2026-11-29T14:35:09Z".into(),
            members: vec!["20261129T143502Z-pg-app-3c4d".into()],
            ..Default::default()
        };
        let member = v1::BackupInfo {
            id: "20261129T143502Z-pg-app-3c4d".into(),
            engine: v1::Engine::Postgres as i32,
            kind: "physical".into(),
            target: "postgresql://soma@127.0.0.1:5432/app".into(),
            started_at: "2026-11-29T14:35:02Z".into(),
            completed_at: "2026-11-29T14:35:04Z".into(),
            last_drill: Some(v1::DrillReport {
                passed: true,
                rto_seconds: 12.34,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (headers, rows) = backup_table(&[set.clone(), member.clone()], true);
        assert_eq!(headers.len(), rows[0].len());
        assert_eq!(rows[0][0], set.id);
        assert_eq!(rows[0][8], "1", "members count");
        assert_eq!(rows[1][0], format!("└ {}", member.id));
        assert_eq!(rows[1][2], "physical");
        assert_eq!(rows[1][4], "2026-11-29 14:35:02");
        assert_eq!(rows[1][10], "passed (12.3s)");
        let (headers, rows) = backup_table(&[set, member], false);
        assert_eq!(headers.len(), 7);
        assert_eq!(rows[1][1], "postgres (physical)");
    }
}
