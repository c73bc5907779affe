//! `kubectl soma restore ID|latest [--database NAME] [--clean] [--update-roles]`.

use serde_json::json;
use soma_proto::v1;

use super::platform;
use crate::{
    cli::{OutputFormat, RestoreArgs},
    connect::{self, Agent},
    error::CliError,
    output, progress,
};

/// Restores what `args.id` names through the agents given: a set member by member (see
/// [`platform::restore_set`]), anything else through the agent serving its engine.
pub(crate) async fn run_any(
    agents: Vec<Agent>,
    out: OutputFormat,
    mut args: RestoreArgs,
) -> Result<(), CliError> {
    let engine = args.engine.map_or(0, |e| e.to_proto() as i32);
    let info = match (&args.target_time, args.id.as_str(), args.engine) {
        // To a point in time, "latest" is the newest set taken at or before it.
        (Some(at), "latest", None) => {
            platform::newest_set_at_or_before(&agents, platform::parse_time(at)?).await?
        }
        _ => connect::describe_newest(&agents, &args.id, engine).await?.0,
    };
    if args.id == "latest" {
        errln!(
            "latest resolved to {} ({}, started {})",
            info.id,
            info.kind,
            info.started_at
        );
    }
    if info.engine == v1::Engine::Set as i32 {
        let served = platform::survey(agents).await?;
        return platform::restore_set(served, info, out, args).await;
    }
    if args.target_time.is_some() {
        return Err(CliError::Usage(format!(
            "--target-time without --pgdata applies to a backup set; {} is a single {} backup: add --pgdata DIR for a PostgreSQL base backup",
            info.id, info.kind
        )));
    }
    // Restore exactly what was resolved, even if a newer backup lands meanwhile.
    args.id = info.id.clone();
    args.engine = None;
    let agent = if agents.len() == 1 {
        agents.into_iter().next().expect("one")
    } else {
        connect::agent_for_backup(agents, &info.id, 0).await?
    };
    run(agent, out, args).await
}

/// Starts one restore on `agent` and follows it to its result.
pub(crate) async fn follow(
    agent: &mut Agent,
    request: v1::RestoreRequest,
) -> Result<v1::OperationResult, CliError> {
    let stream = agent
        .client
        .restore(request)
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    progress::follow(stream, "restore", &agent.addr).await
}

/// Starts a restore and follows it to the end.
pub(crate) async fn run(
    mut agent: Agent,
    out: OutputFormat,
    args: RestoreArgs,
) -> Result<(), CliError> {
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
        target_name: args.target_name.unwrap_or_default(),
        engine: args.engine.map_or(0, |e| e.to_proto() as i32),
        update_roles: args.update_roles,
    };
    let result = follow(&mut agent, request).await?;
    match out {
        format if format.is_table() => {
            outln!(
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
