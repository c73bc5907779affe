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
                vec![
                    format!("{indent}{}", b.id),
                    output::engine_name(b).to_string(),
                    target,
                    output::short_time(&b.completed_at),
                    output::bytes(b.raw_bytes),
                    output::bytes(b.stored_bytes),
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
