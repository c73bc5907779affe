//! The platform: every agent of a namespace at once. `backup all` writes one set across the
//! agents (each backs up the engines it serves as members of a set id the plugin chooses; the set
//! is committed only once every member is complete), and `restore SET` brings every member back
//! through the agent that serves it, PostgreSQL before Qdrant.

use chrono::{DateTime, Utc};
use futures::future::join_all;
use serde_json::json;
use soma_proto::{BackupId, IdEngine, v1};

use crate::{
    cli::{BackupArgs, BackupEngine, OutputFormat, RestoreArgs},
    connect::Agent,
    error::CliError,
    output, progress,
};

/// One agent and what it serves, as it says itself.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// The connection.
    pub agent: Agent,
    /// Engines it is configured for.
    pub engines: Vec<v1::Engine>,
    /// Its store location (no credentials).
    pub store: String,
    /// The peer ids of the distributed Qdrant beside it, sorted; empty for a single node.
    pub qdrant_peers: Vec<u64>,
}

impl Served {
    fn name(&self) -> String {
        self.agent
            .pod
            .as_ref()
            .map_or_else(|| self.agent.addr.clone(), |p| p.name.clone())
    }

    fn serves(&self, engine: v1::Engine) -> bool {
        self.engines.contains(&engine)
    }
}

/// Asks every agent what it serves and keeps one per engine: among several PostgreSQL agents the
/// primary's (the replicas' sidecars see the same cluster). Anything still ambiguous is refused,
/// never guessed.
pub(crate) async fn survey(agents: Vec<Agent>) -> Result<Vec<Served>, CliError> {
    let mut served = Vec::new();
    for agent in agents {
        let mut client = agent.client.clone();
        let info = client
            .get_info(v1::GetInfoRequest {})
            .await
            .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
            .into_inner();
        let engines = info
            .engines
            .iter()
            .filter_map(|e| v1::Engine::try_from(e.engine).ok())
            .filter(|e| matches!(e, v1::Engine::Postgres | v1::Engine::Qdrant))
            .collect::<Vec<_>>();
        if !engines.is_empty() {
            let mut qdrant_peers: Vec<u64> = info
                .qdrant_cluster
                .iter()
                .flat_map(|c| c.peers.iter().map(|p| p.peer_id))
                .collect();
            qdrant_peers.sort_unstable();
            served.push(Served {
                agent,
                engines,
                store: info.store,
                qdrant_peers,
            });
        }
    }
    let postgres: Vec<usize> = (0..served.len())
        .filter(|&i| served[i].serves(v1::Engine::Postgres))
        .collect();
    if postgres.len() > 1 {
        let primaries: Vec<usize> = postgres
            .iter()
            .copied()
            .filter(|&i| served[i].agent.pod.as_ref().is_some_and(|p| p.primary))
            .collect();
        if primaries.len() == 1 {
            let keep = primaries[0];
            let mut i = 0;
            served.retain(|_| {
                let drop = postgres.contains(&i) && i != keep;
                i += 1;
                !drop
            });
        }
    }
    keep_one_agent_per_qdrant_cluster(&mut served);
    for engine in [v1::Engine::Postgres, v1::Engine::Qdrant] {
        let names: Vec<String> = served
            .iter()
            .filter(|s| s.serves(engine))
            .map(Served::name)
            .collect();
        if names.len() > 1 {
            return Err(CliError::Kubernetes(format!(
                "several agents serve {} ({}) and none is labelled the primary: a platform set takes one backup per engine; back them up one by one with --pod NAME",
                engine_name(engine),
                names.join(", ")
            )));
        }
    }
    if served.is_empty() {
        return Err(CliError::Kubernetes(
            "no agent in the namespace serves PostgreSQL or Qdrant (check each agent's --postgres-url / --qdrant-url)".into(),
        ));
    }
    Ok(served)
}

/// Agents beside the nodes of one distributed Qdrant each back up the whole cluster: one of them
/// (the first by name) is enough, so each shard is stored once. Agents of one cluster see the
/// same peer ids; agents that serve PostgreSQL too are never dropped.
fn keep_one_agent_per_qdrant_cluster(served: &mut Vec<Served>) {
    let entries: Vec<(String, &[u64])> = served
        .iter()
        .map(|s| {
            let only_qdrant = s.serves(v1::Engine::Qdrant) && !s.serves(v1::Engine::Postgres);
            let peers: &[u64] = if only_qdrant { &s.qdrant_peers } else { &[] };
            (s.name(), peers)
        })
        .collect();
    let drop = same_qdrant_cluster(&entries);
    let mut i = 0;
    served.retain(|_| {
        let keep = !drop[i];
        i += 1;
        keep
    });
}

/// For `(agent name, Qdrant peer ids)` entries (no ids: not a clustered Qdrant-only agent),
/// which to drop: every one but the first by name of each set of equal peer ids.
fn same_qdrant_cluster(entries: &[(String, &[u64])]) -> Vec<bool> {
    let mut order: Vec<usize> = (0..entries.len())
        .filter(|&i| !entries[i].1.is_empty())
        .collect();
    order.sort_by(|&a, &b| entries[a].0.cmp(&entries[b].0));
    let mut seen: Vec<&[u64]> = Vec::new();
    let mut drop = vec![false; entries.len()];
    for i in order {
        if seen.contains(&entries[i].1) {
            drop[i] = true;
        } else {
            seen.push(entries[i].1);
        }
    }
    drop
}

fn engine_name(engine: v1::Engine) -> &'static str {
    match engine {
        v1::Engine::Postgres => "postgres",
        v1::Engine::Qdrant => "qdrant",
        v1::Engine::Set => "set",
        v1::Engine::Unspecified => "unknown",
    }
}

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
        let result = super::restore::follow(&mut agent, request)
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

/// Describes a backup through the first agent that knows it (they share the store).
pub(crate) async fn describe_anywhere(
    served: &[Served],
    id: &str,
) -> Result<v1::BackupInfo, CliError> {
    let mut last = None;
    for s in served {
        let mut agent = s.agent.clone();
        match agent
            .client
            .describe_backup(v1::DescribeBackupRequest {
                backup_id: id.to_string(),
                engine: 0,
            })
            .await
        {
            Ok(info) => return Ok(info.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => {
                last = Some(CliError::from_status(status, &agent.addr, "request"));
            }
            Err(status) => return Err(CliError::from_status(status, &agent.addr, "request")),
        }
    }
    Err(last.unwrap_or_else(|| CliError::Other(format!("backup {id} not found"))))
}

/// The newest backup set that started at or before `at`, among what the agents list.
pub(crate) async fn newest_set_at_or_before(
    agents: &[Agent],
    at: DateTime<Utc>,
) -> Result<v1::BackupInfo, CliError> {
    let mut all = Vec::new();
    for agent in agents {
        let mut agent = agent.clone();
        all.extend(agent.all_backups().await?.backups);
    }
    newest_at_or_before(&all, v1::Engine::Set, at).ok_or_else(|| {
        CliError::Other(format!(
            "no backup set was taken at or before {at}; choose a later --target-time or name a backup (see `kubectl soma list`)"
        ))
    })
}

async fn list(served: &Served) -> Result<Vec<v1::BackupInfo>, CliError> {
    let mut agent = served.agent.clone();
    Ok(agent.all_backups().await?.backups)
}

/// The newest backup of `engine` that started at or before `at` (a snapshot holds the state of
/// when it was taken, so one started later may hold writes after the target).
fn newest_at_or_before(
    backups: &[v1::BackupInfo],
    engine: v1::Engine,
    at: DateTime<Utc>,
) -> Option<v1::BackupInfo> {
    backups
        .iter()
        .filter(|b| b.engine == engine as i32)
        .filter_map(|b| {
            DateTime::parse_from_rfc3339(&b.started_at)
                .ok()
                .map(|t| (t.with_timezone(&Utc), b))
        })
        .filter(|(t, _)| *t <= at)
        .max_by(|(a, x), (b, y)| (a, &x.id).cmp(&(b, &y.id)))
        .map(|(_, b)| b.clone())
}

/// A `--target-time` as RFC 3339 or as PostgreSQL prints timestamps.
pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>, CliError> {
    soma_proto::time::parse_target_time(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            CliError::Usage(format!(
                "--target-time {text:?}: {e}; give RFC 3339 (2026-11-29T14:35:01Z) or PostgreSQL's form (2026-11-29 14:35:01.8+00)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, engine: v1::Engine, started_at: &str) -> v1::BackupInfo {
        v1::BackupInfo {
            id: id.into(),
            engine: engine as i32,
            started_at: started_at.into(),
            ..Default::default()
        }
    }

    #[test]
    fn one_agent_per_qdrant_cluster_backs_it_up() {
        let cluster: &[u64] = &[3, 7, 9];
        let other: &[u64] = &[4, 5];
        let entries = vec![
            ("qdrant-2".to_string(), cluster),
            ("qdrant-0".to_string(), cluster),
            ("postgres-0".to_string(), &[][..]),
            ("qdrant-1".to_string(), cluster),
            ("search-0".to_string(), other),
            ("single".to_string(), &[][..]),
        ];
        assert_eq!(
            same_qdrant_cluster(&entries),
            vec![true, false, false, true, false, false]
        );
    }

    #[test]
    fn the_qdrant_backup_chosen_for_a_time_is_the_newest_not_after_it() {
        let backups = vec![
            info("q1", v1::Engine::Qdrant, "2026-11-29T10:00:00Z"),
            info("q2", v1::Engine::Qdrant, "2026-11-29T11:00:00Z"),
            info("q3", v1::Engine::Qdrant, "2026-11-29T12:00:00Z"),
            info("p1", v1::Engine::Postgres, "2026-11-29T11:30:00Z"),
        ];
        let at = "2026-11-29T11:45:00Z".parse().unwrap();
        let chosen = newest_at_or_before(&backups, v1::Engine::Qdrant, at).unwrap();
        assert_eq!(chosen.id, "q2");
        let exact = "2026-11-29T12:00:00Z".parse().unwrap();
        assert_eq!(
            newest_at_or_before(&backups, v1::Engine::Qdrant, exact)
                .unwrap()
                .id,
            "q3"
        );
        let before_all = "2026-11-29T09:00:00Z".parse().unwrap();
        assert!(newest_at_or_before(&backups, v1::Engine::Qdrant, before_all).is_none());
    }
}
