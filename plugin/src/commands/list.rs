//! `kubectl soma list`.

use soma_proto::v1;

use crate::{cli::OutputFormat, connect::Agent, error::CliError, output};

/// Lists the complete backups of every given agent (deduplicated when they share a store),
/// newest first; json/yaml print an array of manifests.
pub async fn run_many(agents: Vec<Agent>, out: OutputFormat) -> Result<(), CliError> {
    let mut backups: Vec<v1::BackupInfo> = Vec::new();
    for mut agent in agents {
        let listed = agent
            .client
            .list_backups(v1::ListBackupsRequest {})
            .await
            .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
            .into_inner()
            .backups;
        for b in listed {
            if !backups.iter().any(|x| x.id == b.id) {
                backups.push(b);
            }
        }
    }
    // Newest first, as each agent orders its own.
    backups.sort_by(|a, b| (&b.started_at, &b.id).cmp(&(&a.started_at, &a.id)));
    match out {
        OutputFormat::Table => {
            if backups.is_empty() {
                eprintln!("no backups yet; take one with `kubectl soma backup postgres`");
                return Ok(());
            }
            // Members of a set are listed under it, indented; other backups stand alone.
            let in_set: std::collections::HashSet<&str> = backups
                .iter()
                .flat_map(|b| b.members.iter().map(String::as_str))
                .collect();
            let row = |b: &v1::BackupInfo, indent: &str| {
                let target = if b.members.is_empty() {
                    b.target.clone()
                } else {
                    format!("{} members", b.members.len())
                };
                let engine = match b.kind.as_str() {
                    "physical" => format!("{} (physical)", output::engine_name(b)),
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
                vec![
                    format!("{indent}{}", b.id),
                    engine,
                    target,
                    output::short_time(&b.completed_at),
                    output::bytes(b.raw_bytes),
                    output::bytes(b.stored_bytes),
                    recoverable,
                ]
            };
            let mut rows = Vec::new();
            for b in backups.iter().filter(|b| !in_set.contains(b.id.as_str())) {
                rows.push(row(b, ""));
                for member in &b.members {
                    if let Some(m) = backups.iter().find(|x| &x.id == member) {
                        rows.push(row(m, "└ "));
                    }
                }
            }
            output::table(
                &[
                    "ID",
                    "ENGINE",
                    "TARGET",
                    "COMPLETED (UTC)",
                    "SIZE",
                    "STORED",
                    "RECOVERABLE",
                ],
                &rows,
            );
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
