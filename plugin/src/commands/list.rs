//! `kubectl soma list`.

use soma_proto::v1;

use crate::{cli::OutputFormat, connect::Agent, error::CliError, output};

/// Lists complete backups, newest first; json/yaml print an array of manifests.
pub async fn run(mut agent: Agent, out: OutputFormat) -> Result<(), CliError> {
    let backups = agent
        .client
        .list_backups(v1::ListBackupsRequest {})
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner()
        .backups;
    match out {
        OutputFormat::Table => {
            if backups.is_empty() {
                eprintln!("no backups yet; take one with `kubectl soma backup postgres`");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = backups
                .iter()
                .map(|b| {
                    vec![
                        b.id.clone(),
                        output::engine_name(b).to_string(),
                        b.target.clone(),
                        output::short_time(&b.completed_at),
                        output::bytes(b.raw_bytes),
                        output::bytes(b.stored_bytes),
                    ]
                })
                .collect();
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
