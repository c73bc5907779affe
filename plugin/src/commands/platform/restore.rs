//! `restore SET`: every member brought back through the agent that serves it, PostgreSQL before
//! Qdrant, and with `--target-time` each Qdrant member replaced by the newest backup at or before it.

use chrono::{DateTime, Utc};
use serde_json::json;
use soma_proto::v1;

use super::{Served, describe_anywhere, engine_name, list, newest_at_or_before, parse_time};
use crate::{
    cli::{OutputFormat, RestoreArgs},
    error::CliError,
    output,
};

/// What `restore` does with one member of a set.
#[derive(Debug)]
enum Step {
    /// Restore this backup through this agent.
    Restore {
        served: usize,
        backup: v1::BackupInfo,
    },
    /// A base backup: restored into an empty data directory before PostgreSQL starts.
    Pgdata { backup: v1::BackupInfo },
}

/// Restores a set (or `latest`, when it is one) member by member through the agents serving
/// them: PostgreSQL first (a whole-cluster member brings its roles before its databases), then
/// Qdrant. With `--target-time`, the PostgreSQL member is a point-in-time restore and each Qdrant
/// member is replaced by the newest Qdrant backup taken at or before that time.
pub(crate) async fn restore_set(
    served: Vec<Served>,
    set: v1::BackupInfo,
    out: OutputFormat,
    args: RestoreArgs,
) -> Result<(), CliError> {
    let target_time = args.target_time.as_deref().map(parse_time).transpose()?;
    let plan = SetPlan::make(&served, &set, target_time).await?;
    for note in &plan.chosen_notes {
        errln!("{note}");
    }
    let started = std::time::Instant::now();
    let mut done = SetProgress::default();
    for step in plan.steps {
        match step {
            Step::Restore { served: i, backup } => {
                done.restore(&served[i], &set, backup, out, &args).await?
            }
            Step::Pgdata { backup } => done.pgdata(&backup, out, &args),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let SetProgress { restored, pending } = done;
    match out {
        format if format.is_table() => {
            outln!(
                "restored backup set {}: {} member(s) in {seconds:.1}s{}",
                set.id,
                restored.len(),
                if pending.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; {} restored before PostgreSQL starts (see above)",
                        pending.len()
                    )
                }
            );
            Ok(())
        }
        format => output::print_structured(
            format,
            &json!({
                "backup_id": set.id,
                "restored": restored,
                "pending": pending,
                "qdrant_chosen": plan.chosen_notes,
                "seconds": seconds,
            }),
        ),
    }
}

/// The steps of a set restore in the order they run, and which Qdrant backups `--target-time`
/// chose in place of the set's own.
struct SetPlan {
    steps: Vec<Step>,
    chosen_notes: Vec<String>,
}

impl SetPlan {
    async fn make(
        served: &[Served],
        set: &v1::BackupInfo,
        target_time: Option<DateTime<Utc>>,
    ) -> Result<Self, CliError> {
        let mut all_backups: Option<Vec<v1::BackupInfo>> = None;
        let mut plan = SetPlan {
            steps: Vec::new(),
            chosen_notes: Vec::new(),
        };
        for member_id in &set.members {
            let member = describe_anywhere(served, member_id).await?;
            let engine = v1::Engine::try_from(member.engine).unwrap_or(v1::Engine::Unspecified);
            if engine == v1::Engine::Postgres && member.kind == "physical" {
                plan.steps.push(Step::Pgdata { backup: member });
                continue;
            }
            let Some(index) = served.iter().position(|s| s.serves(engine)) else {
                return Err(CliError::Kubernetes(format!(
                    "set {} has a {} member ({}), but no ready agent serves {}; start one (or pass --agent HOST:PORT of one)",
                    set.id,
                    engine_name(engine),
                    member.id,
                    engine_name(engine)
                )));
            };
            let member = match (engine, target_time) {
                (v1::Engine::Qdrant, Some(at)) => {
                    if all_backups.is_none() {
                        all_backups = Some(list(&served[index]).await?);
                    }
                    let chosen = qdrant_at(all_backups.as_deref().unwrap_or_default(), at)?;
                    plan.chosen_notes.push(format!(
                        "Qdrant: {} (started {}), the newest at or before {}",
                        chosen.id, chosen.started_at, at
                    ));
                    chosen
                }
                _ => member,
            };
            plan.steps.push(Step::Restore {
                served: index,
                backup: member,
            });
        }
        // PostgreSQL first: Qdrant payloads may name rows, never the other way round.
        plan.steps.sort_by_key(|s| match s {
            Step::Pgdata { .. } => 0,
            Step::Restore { backup, .. } => {
                if backup.engine == v1::Engine::Postgres as i32 {
                    1
                } else {
                    2
                }
            }
        });
        Ok(plan)
    }
}

/// The Qdrant backup a point-in-time set restore uses: the newest at or before `at`.
fn qdrant_at(backups: &[v1::BackupInfo], at: DateTime<Utc>) -> Result<v1::BackupInfo, CliError> {
    newest_at_or_before(backups, v1::Engine::Qdrant, at).ok_or_else(|| {
        CliError::Other(format!(
            "no Qdrant backup was taken at or before {at}; choose a later --target-time (see `kubectl soma list`)"
        ))
    })
}

/// What a set restore has done so far: members restored, and base backups left for the user to
/// lay down before PostgreSQL starts. A failing member's error names what was already restored.
#[derive(Default)]
struct SetProgress {
    restored: Vec<serde_json::Value>,
    pending: Vec<serde_json::Value>,
}

impl SetProgress {
    async fn restore(
        &mut self,
        served: &Served,
        set: &v1::BackupInfo,
        backup: v1::BackupInfo,
        out: OutputFormat,
        args: &RestoreArgs,
    ) -> Result<(), CliError> {
        let mut agent = served.agent.clone();
        let engine = v1::Engine::try_from(backup.engine).unwrap_or_default();
        let request = v1::RestoreRequest {
            backup_id: backup.id.clone(),
            clean: args.clean && engine == v1::Engine::Postgres,
            force: args.force && engine == v1::Engine::Qdrant,
            update_roles: args.update_roles && engine == v1::Engine::Postgres,
            ..Default::default()
        };
        let result = crate::commands::restore::follow(&mut agent, request)
            .await
            .map_err(|e| {
                CliError::Other(format!(
                    "restoring set {}: member {} failed: {e}.{}",
                    set.id,
                    backup.id,
                    done_note(&self.restored)
                ))
            })?;
        if out.is_table() {
            outln!(
                "{} ({} in {:.1}s)",
                result.summary,
                output::bytes(result.raw_bytes),
                result.seconds
            );
        }
        self.restored.push(json!({
            "backup_id": backup.id,
            "engine": engine_name(engine),
            "summary": result.summary,
            "raw_bytes": result.raw_bytes,
            "seconds": result.seconds,
        }));
        Ok(())
    }

    /// A base backup cannot be restored into a running server: say how to lay it down instead.
    fn pgdata(&mut self, backup: &v1::BackupInfo, out: OutputFormat, args: &RestoreArgs) {
        let mut command = format!("soma-agent restore-pgdata --backup {}", backup.id);
        if let Some(t) = &args.target_time {
            command.push_str(&format!(" --target-time '{t}'"));
        }
        let note = format!(
            "PostgreSQL member {} is a physical base backup: it is restored into an EMPTY data directory before PostgreSQL starts, not into a running server. In Kubernetes: `helm soma-restore` with the chart's restore init container; elsewhere: `{command} --pgdata DIR`, then start PostgreSQL on DIR (it replays WAL to the target).",
            backup.id
        );
        if out.is_table() {
            outln!("{note}");
        }
        self.pending.push(json!({
            "backup_id": backup.id,
            "engine": "postgres",
            "kind": "physical",
            "command": command,
            "note": note,
        }));
    }
}

fn done_note(restored: &[serde_json::Value]) -> String {
    if restored.is_empty() {
        " Nothing was restored".into()
    } else {
        format!(
            " Already restored: {}",
            restored
                .iter()
                .filter_map(|r| r["backup_id"].as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}
