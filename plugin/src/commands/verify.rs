//! `kubectl soma verify ID|latest`.

use serde_json::json;
use soma_proto::v1;

use crate::{
    cli::{IdArg, OutputFormat},
    connect::Agent,
    error::CliError,
    progress,
};

/// Asks the agent to re-read the backup and check it; exit 1 on any mismatch.
pub(crate) async fn run(mut agent: Agent, out: OutputFormat, args: IdArg) -> Result<(), CliError> {
    let stream = agent
        .client
        .verify(v1::VerifyRequest {
            backup_id: args.id,
            engine: args.engine.map_or(0, |e| e.to_proto() as i32),
        })
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let result = progress::follow(stream, "verify", &agent.addr).await?;
    match out {
        format if format.is_table() => {
            outln!("{}", result.summary);
            Ok(())
        }
        format => crate::output::print_structured(
            format,
            &json!({
                "backup_id": result.backup.as_ref().map(|b| b.id.clone()),
                "verified": true,
                "summary": result.summary,
                "raw_bytes": result.raw_bytes,
                "stored_bytes": result.stored_bytes,
                "seconds": result.seconds,
            }),
        ),
    }
}
