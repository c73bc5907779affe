//! `kubectl soma delete ID [--yes]`.

use std::io::{BufRead, IsTerminal, Write};

use serde_json::json;
use soma_proto::v1;

use crate::{
    cli::{DeleteArgs, OutputFormat},
    connect::Agent,
    error::CliError,
};

/// Deletes a backup after confirmation (typing the id on a terminal, or `--yes`).
pub(crate) async fn run(
    mut agent: Agent,
    out: OutputFormat,
    args: DeleteArgs,
) -> Result<(), CliError> {
    if !args.yes {
        if !std::io::stdin().is_terminal() {
            return Err(CliError::Usage(format!(
                "refusing to delete backup {} without confirmation: pass --yes",
                args.id
            )));
        }
        eprint!(
            "Delete backup {} permanently? Type its id to confirm: ",
            args.id
        );
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if answer.trim() != args.id {
            return Err(CliError::Usage("not confirmed; nothing was deleted".into()));
        }
    }
    let resp = agent
        .client
        .delete_backup(v1::DeleteBackupRequest { backup_id: args.id })
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    match out {
        format if format.is_table() => {
            outln!(
                "deleted backup {} ({} objects)",
                resp.backup_id,
                resp.objects_deleted
            );
            Ok(())
        }
        format => crate::output::print_structured(
            format,
            &json!({"backup_id": resp.backup_id, "objects_deleted": resp.objects_deleted}),
        ),
    }
}
