//! `backup all`: one set id across the agents, each backing up the engines it serves as
//! members, and the set committed only once every member is complete.

use chrono::Utc;
use futures::future::join_all;
use soma_proto::{BackupId, IdEngine, v1};

use super::Served;
use crate::{
    cli::{BackupArgs, BackupEngine, OutputFormat},
    error::CliError,
    output, progress,
};

/// `backup all` across agents: one set id, every agent's members, then the set manifest.
pub(crate) async fn backup_all(
    served: Vec<Served>,
    out: OutputFormat,
    args: BackupArgs,
) -> Result<(), CliError> {
    let BackupEngine::All { physical } = args.engine else {
        return Err(CliError::Other(
            "backup_all is only for `backup all`".into(),
        ));
    };
    one_store(&served)?;
    let started_at = Utc::now();
    let set_id = BackupId::new(started_at, IdEngine::Set, "platform");
    errln!(
        "backing up the platform as set {set_id} through {} agents: {}",
        served.len(),
        served
            .iter()
            .map(Served::name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let members = back_up_members(&served, &set_id, physical).await?;
    let mut first = served[0].agent.clone();
    let info = first
        .client
        .commit_set(v1::CommitSetRequest {
            set_id: set_id.to_string(),
            members: members.clone(),
            started_at: started_at.to_rfc3339(),
        })
        .await
        .map_err(|s| CliError::from_status(s, &first.addr, "request"))?
        .into_inner();
    let seconds = (Utc::now() - started_at).num_milliseconds() as f64 / 1000.0;
    match out {
        format if format.is_table() => {
            outln!(
                "platform backup set {} complete: {}",
                info.id,
                info.members.join(", ")
            );
            outln!("id: {}", info.id);
            outln!(
                "size: {} raw, {} stored ({:.1}x), {seconds:.1}s",
                output::bytes(info.raw_bytes),
                output::bytes(info.stored_bytes),
                info.raw_bytes as f64 / info.stored_bytes.max(1) as f64,
            );
            Ok(())
        }
        format => output::print_structured(format, &output::manifest(&info)?),
    }
}

/// A set lives in one store, so agents writing to different ones are refused before any backup.
fn one_store(served: &[Served]) -> Result<(), CliError> {
    let stores: Vec<&str> = served.iter().map(|s| s.store.as_str()).collect();
    if stores.windows(2).any(|w| w[0] != w[1]) {
        return Err(CliError::Other(format!(
            "the agents write to different stores ({}): a platform set lives in one store; point every agent's --store at the same bucket and prefix, or back them up one by one with --pod NAME",
            served
                .iter()
                .map(|s| format!("{}: {}", s.name(), s.store))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(())
}

/// Backs up every agent's engines as members of `set_id` and returns the member ids; any agent
/// failing means no set, and the members that did complete are named as standalone backups.
async fn back_up_members(
    served: &[Served],
    set_id: &BackupId,
    physical: bool,
) -> Result<Vec<String>, CliError> {
    // Every agent at once: the members are taken as close together in time as the engines allow.
    let runs = served.iter().map(|s| {
        let mut agent = s.agent.clone();
        let set_id = set_id.to_string();
        async move {
            let stream = agent
                .client
                .backup(v1::BackupRequest {
                    all: true,
                    physical,
                    set_id,
                    ..Default::default()
                })
                .await
                .map_err(|st| CliError::from_status(st, &agent.addr, "request"))?
                .into_inner();
            progress::follow(stream, "backup", &agent.addr).await
        }
    });
    let results = join_all(runs).await;
    let mut members = Vec::new();
    let mut failures = Vec::new();
    for (s, result) in served.iter().zip(results) {
        match result {
            Ok(r) => members.extend(r.backup.map(|b| b.members).unwrap_or_default()),
            Err(e) => failures.push(format!("{}: {e}", s.name())),
        }
    }
    if !failures.is_empty() {
        return Err(CliError::Other(format!(
            "platform set {set_id} was not written: {}.{}",
            failures.join("; "),
            if members.is_empty() {
                String::new()
            } else {
                format!(
                    " The members that completed stay as standalone backups: {}",
                    members.join(", ")
                )
            }
        )));
    }
    Ok(members)
}
