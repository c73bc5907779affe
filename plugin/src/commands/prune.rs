//! `kubectl soma prune [--dry-run] [--keep-last N …] [--yes]`.

use std::io::{BufRead, IsTerminal, Write};

use serde_json::json;
use soma_proto::v1;

use crate::{
    cli::{OutputFormat, PruneArgs},
    connect::Agent,
    error::CliError,
};

/// `--max-age`'s value parser: a humantime duration of at least one second.
pub(crate) fn parse_age(s: &str) -> Result<u64, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.as_secs() >= 1 => Ok(d.as_secs()),
        Ok(_) => Err("max-age must be at least 1s".into()),
        Err(e) => Err(format!(
            "{s:?} is not a duration ({e}); use e.g. 30d or 12h"
        )),
    }
}

/// Applies the retention policy: with `--dry-run` only shows what would go; otherwise asks on a
/// terminal after showing it, and refuses without a terminal unless `--yes`.
pub(crate) async fn run(agent: Agent, out: OutputFormat, args: PruneArgs) -> Result<(), CliError> {
    if !args.dry_run && !args.yes && !std::io::stdin().is_terminal() {
        return Err(CliError::Usage(
            "refusing to prune without confirmation: pass --yes (or --dry-run to see what would be deleted)".into(),
        ));
    }
    let policy = v1::RetentionPolicy {
        keep_last: args.keep_last,
        keep_daily: args.keep_daily,
        keep_weekly: args.keep_weekly,
        keep_monthly: args.keep_monthly,
        max_age_seconds: args.max_age,
    };
    let request = |dry_run: bool| {
        let mut client = agent.client.clone();
        let addr = agent.addr.clone();
        async move {
            client
                .prune(v1::PruneRequest {
                    dry_run,
                    policy: Some(policy),
                })
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| CliError::from_status(s, &addr, "request"))
        }
    };
    if !args.dry_run && !args.yes {
        let preview = request(true).await?;
        print_table(&preview);
        let going = preview.items.iter().filter(|i| i.delete).count();
        if going == 0 {
            outln!("nothing to delete");
            return Ok(());
        }
        eprint!("Delete the {going} item(s) marked DELETE permanently? Type yes to confirm: ");
        std::io::stderr().flush().ok();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer).ok();
        if answer.trim() != "yes" {
            return Err(CliError::Usage("not confirmed; nothing was deleted".into()));
        }
    }
    let resp = request(args.dry_run).await?;
    match out {
        OutputFormat::Table => {
            print_table(&resp);
            for e in &resp.errors {
                errln!("error: {e}");
            }
        }
        format => crate::output::print_structured(format, &response_json(&resp))?,
    }
    if resp.errors.is_empty() {
        Ok(())
    } else {
        Err(CliError::Other(format!(
            "prune finished with {} error(s); see above",
            resp.errors.len()
        )))
    }
}

/// The response as JSON, field for field.
pub(crate) fn response_json(resp: &v1::PruneResponse) -> serde_json::Value {
    json!({
        "dry_run": resp.dry_run,
        "policy": resp.policy,
        "objects_deleted": resp.objects_deleted,
        "errors": resp.errors,
        "items": resp.items.iter().map(|i| json!({
            "what": i.what,
            "name": i.name,
            "delete": i.delete,
            "reason": i.reason,
            "bytes": i.bytes,
            "engine": i.engine,
            "kind": i.kind,
            "target": i.target,
        })).collect::<Vec<_>>(),
    })
}

fn print_table(resp: &v1::PruneResponse) {
    let rows: Vec<Vec<String>> = resp
        .items
        .iter()
        .map(|i| {
            vec![
                if i.delete { "DELETE" } else { "KEEP" }.to_string(),
                i.what.clone(),
                i.name.clone(),
                i.reason.clone(),
                crate::output::bytes(i.bytes),
            ]
        })
        .collect();
    crate::output::table(&["ACTION", "WHAT", "NAME", "REASON", "SIZE"], &rows);
    let (going, bytes) = resp
        .items
        .iter()
        .filter(|i| i.delete)
        .fold((0, 0), |(n, b), i| (n + 1, b + i.bytes));
    let kept = resp
        .items
        .iter()
        .filter(|i| !i.delete && i.what == "backup")
        .count();
    if resp.dry_run {
        outln!(
            "dry run ({}): {going} item(s) would be deleted ({}), {kept} backup(s) kept; nothing was deleted",
            resp.policy,
            crate::output::bytes(bytes)
        );
    } else {
        outln!(
            "pruned ({}): {going} item(s) deleted ({}, {} objects), {kept} backup(s) kept",
            resp.policy,
            crate::output::bytes(bytes),
            resp.objects_deleted
        );
    }
}
