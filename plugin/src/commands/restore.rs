//! `kubectl soma restore ID|latest [--database NAME] [--clean] [--update-roles]`.

use serde_json::json;
use soma_proto::v1;

use crate::{
    cli::{OutputFormat, RestoreArgs},
    connect::Agent,
    error::CliError,
    output, progress,
};

/// Starts a restore and follows it to the end.
pub async fn run(mut agent: Agent, out: OutputFormat, args: RestoreArgs) -> Result<(), CliError> {
    let request = v1::RestoreRequest {
        backup_id: args.id,
        database: args.database.unwrap_or_default(),
        clean: args.clean,
        collections: args.collections,
        rename_to: args.rename_to.unwrap_or_default(),
        force: args.force,
        pgdata: args.pgdata.unwrap_or_default(),
        target_time: args.target_time.unwrap_or_default(),
        target_lsn: args.target_lsn.unwrap_or_default(),
        update_roles: args.update_roles,
    };
    let stream = agent
        .client
        .restore(request)
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let result = progress::follow(stream, "restore", &agent.addr).await?;
    match out {
        OutputFormat::Table => {
            println!(
                "{} ({} in {:.1}s)",
                result.summary,
                output::bytes(result.raw_bytes),
                result.seconds
            );
            Ok(())
        }
        format => output::print_structured(
            format,
            &json!({
                "backup_id": result.backup.as_ref().map(|b| b.id.clone()),
                "summary": result.summary,
                "raw_bytes": result.raw_bytes,
                "stored_bytes": result.stored_bytes,
                "seconds": result.seconds,
            }),
        ),
    }
}
