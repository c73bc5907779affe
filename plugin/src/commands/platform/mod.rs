//! The platform: every agent of a namespace at once. `backup all` writes one set across the
//! agents (each backs up the engines it serves as members of a set id the plugin chooses; the set
//! is committed only once every member is complete), and `restore SET` brings every member back
//! through the agent that serves it, PostgreSQL before Qdrant.

use chrono::{DateTime, Utc};
use soma_proto::v1;

use crate::{connect::Agent, error::CliError};

mod backup;
mod restore;

pub(crate) use backup::backup_all;
pub(crate) use restore::restore_set;

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
