//! Restore plans: which backup, into what, and what an interrupted restore leaves to clean.

use std::sync::Arc;

use soma_proto::v1;

use super::{OpFuture, RequestError, resolve};
use crate::{
    catalog::{BackupId, Engine, Kind, Manifest},
    error::OpError,
    jobs::{JobInfo, JobTarget, Operation, Reporter},
    ops::{Context, physical, postgres, qdrant, set},
};

/// A restore about to run.
#[derive(Debug, Clone)]
pub enum RestorePlan {
    /// pg_restore of a dump into a database.
    Logical {
        /// The backup.
        manifest: Manifest,
        /// Target database.
        database: String,
        /// Drop and recreate existing objects.
        clean: bool,
    },
    /// A logical backup with globals: roles first, then its databases.
    Cluster(postgres::ClusterRestore),
    /// Qdrant snapshots into collections.
    Qdrant {
        /// The backup.
        manifest: Manifest,
        /// Collections to restore (empty: all).
        collections: Vec<String>,
        /// Restore the one selected collection under this name (the request's empty string:
        /// under its own).
        rename_to: Option<String>,
        /// Overwrite existing collections and aliases.
        force: bool,
    },
    /// Every member of a set, in order.
    Set {
        /// The set.
        manifest: Manifest,
        /// One plan per member.
        members: Vec<RestorePlan>,
    },
    /// A base backup laid into an empty data directory.
    Pgdata(physical::PgdataRestore),
}

impl RestorePlan {
    /// The job this restore runs as: what it writes and what it reads.
    pub fn job(&self) -> JobInfo {
        JobInfo::new(
            self.backup(),
            Operation::Restore,
            self.targets(),
            self.uses(),
        )
        .about(self.engine().as_str(), "", "")
    }

    /// The span its logs carry.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("restore", backup_id = %self.backup(), engine = %self.engine())
    }

    /// What an interrupted restore leaves to clean: a physical restore's half-laid data
    /// directory (logical restores roll back by themselves).
    pub fn interrupted(&self) -> crate::runner::Interrupted {
        match self {
            RestorePlan::Pgdata(req) => crate::runner::Interrupted::ClearPgdata(req.clone()),
            _ => crate::runner::Interrupted::Nothing,
        }
    }

    /// Validates a restore request and resolves the backup it names.
    pub async fn from_request(ctx: &Context, req: v1::RestoreRequest) -> Result<Self, OpError> {
        if !req.pgdata.is_empty() {
            return Self::pgdata(ctx, req);
        }
        let manifest = resolve(ctx, &req.backup_id, req.engine).await?;
        match (manifest.engine, manifest.kind) {
            (Engine::Postgres, Kind::Physical) => {
                Err(RequestError::PhysicalNeedsPgdata(manifest.id).into())
            }
            (Engine::Postgres, _) => {
                ctx.postgres()?;
                Self::logical(manifest, &req.database, req.clean, req.update_roles)
            }
            (Engine::Qdrant, _) => {
                ctx.qdrant()?;
                Ok(RestorePlan::Qdrant {
                    manifest,
                    collections: req.collections,
                    rename_to: Some(req.rename_to).filter(|r| !r.is_empty()),
                    force: req.force,
                })
            }
            (Engine::Set, _) => {
                let mut members = Vec::new();
                for m in set::members_of(&ctx.source, &manifest).await? {
                    members.push(match (m.engine, m.kind) {
                        (Engine::Postgres, Kind::Physical) => {
                            return Err(RequestError::SetWithPhysicalMember {
                                set: manifest.id.clone(),
                                member: m.id,
                            }
                            .into());
                        }
                        (Engine::Postgres, _) => {
                            ctx.postgres()?;
                            Self::logical(m, "", req.clean, req.update_roles)?
                        }
                        (Engine::Qdrant, _) => {
                            ctx.qdrant()?;
                            RestorePlan::Qdrant {
                                manifest: m,
                                collections: Vec::new(),
                                rename_to: None,
                                force: req.force,
                            }
                        }
                        (Engine::Set, _) => {
                            return Err(OpError::NestedSet {
                                set: manifest.id.clone(),
                                member: m.id,
                            });
                        }
                    });
                }
                Ok(RestorePlan::Set { manifest, members })
            }
        }
    }

    /// A logical restore: with globals (roles first) when the backup records them, the old way
    /// for a backup written before. `database` empty means the backup's own database(s).
    fn logical(
        manifest: Manifest,
        database: &str,
        clean: bool,
        update_roles: bool,
    ) -> Result<Self, OpError> {
        match postgres::ClusterRestore::new(manifest.clone(), database, clean, update_roles)? {
            Some(cluster) => Ok(RestorePlan::Cluster(cluster)),
            None => Ok(RestorePlan::Logical {
                database: if database.is_empty() {
                    manifest.target.name.clone()
                } else {
                    database.to_string()
                },
                manifest,
                clean,
            }),
        }
    }

    fn pgdata(ctx: &Context, req: v1::RestoreRequest) -> Result<Self, OpError> {
        let target = physical::RecoveryTarget::from_options(
            Some(req.target_time.as_str()).filter(|t| !t.is_empty()),
            Some(req.target_lsn.as_str()).filter(|t| !t.is_empty()),
            Some(req.target_name.as_str()).filter(|t| !t.is_empty()),
            false,
        )?;
        let backup = if req.backup_id.is_empty() {
            "latest".to_string()
        } else {
            req.backup_id
        };
        let pgdata = std::path::PathBuf::from(&req.pgdata);
        if !pgdata.is_absolute() {
            return Err(RequestError::PgdataNotAbsolute(req.pgdata).into());
        }
        check_restore_root(ctx.restore_root.as_deref(), &pgdata, &req.pgdata)?;
        let agent_binary = std::env::current_exe()
            .map_err(|e| OpError::Internal(format!("locating the soma-agent binary: {e}")))?;
        Ok(RestorePlan::Pgdata(physical::PgdataRestore::new(
            backup,
            pgdata,
            target,
            agent_binary,
        )))
    }

    /// The backup restored, as named in logs ("latest" for a physical restore that picks one).
    pub fn backup(&self) -> String {
        match self {
            RestorePlan::Logical { manifest, .. }
            | RestorePlan::Qdrant { manifest, .. }
            | RestorePlan::Set { manifest, .. } => manifest.id.to_string(),
            RestorePlan::Cluster(c) => c.manifest.id.to_string(),
            RestorePlan::Pgdata(req) => req.backup.clone(),
        }
    }

    /// The engine restored.
    pub fn engine(&self) -> Engine {
        match self {
            RestorePlan::Logical { .. } | RestorePlan::Cluster(_) | RestorePlan::Pgdata(_) => {
                Engine::Postgres
            }
            RestorePlan::Qdrant { .. } => Engine::Qdrant,
            RestorePlan::Set { .. } => Engine::Set,
        }
    }

    /// What this plan holds while it runs.
    pub fn targets(&self) -> Vec<JobTarget> {
        match self {
            RestorePlan::Logical { database, .. } => vec![JobTarget::Database(database.clone())],
            RestorePlan::Cluster(c) => c
                .targets()
                .map(|d| JobTarget::Database(d.to_string()))
                .collect(),
            RestorePlan::Qdrant { .. } => vec![JobTarget::Qdrant],
            RestorePlan::Set { members, .. } => members.iter().flat_map(|m| m.targets()).collect(),
            RestorePlan::Pgdata(req) => vec![JobTarget::Pgdata(req.pgdata.clone())],
        }
    }

    /// The backups this plan reads, so none of them is deleted under it. A physical restore of
    /// "latest" chooses its base backup when it runs; an explicit id is claimed.
    pub fn uses(&self) -> Vec<BackupId> {
        match self {
            RestorePlan::Logical { manifest, .. } | RestorePlan::Qdrant { manifest, .. } => {
                vec![manifest.id.clone()]
            }
            RestorePlan::Cluster(c) => vec![c.manifest.id.clone()],
            RestorePlan::Set { manifest, members } => std::iter::once(manifest.id.clone())
                .chain(members.iter().flat_map(|m| m.uses()))
                .collect(),
            RestorePlan::Pgdata(req) => BackupId::parse(&req.backup).into_iter().collect(),
        }
    }

    /// Runs the restore.
    pub fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        match self {
            RestorePlan::Logical {
                manifest,
                database,
                clean,
            } => Box::pin(postgres::restore_postgres(
                ctx, manifest, database, clean, reporter,
            )),
            RestorePlan::Cluster(c) => Box::pin(postgres::restore_cluster(ctx, c, reporter)),
            RestorePlan::Qdrant {
                manifest,
                collections,
                rename_to,
                force,
            } => Box::pin(qdrant::restore_qdrant(
                ctx,
                manifest,
                collections,
                rename_to,
                force,
                reporter,
            )),
            RestorePlan::Set { manifest, members } => {
                Box::pin(set::restore_set(ctx, manifest, members, reporter))
            }
            RestorePlan::Pgdata(req) => Box::pin(physical::restore_pgdata_job(ctx, req, reporter)),
        }
    }
}

/// A data directory requested through the API must lie strictly below `--restore-root`: as
/// written (no `.` or `..`), and on disk (its deepest existing ancestor, symbolic links resolved,
/// is inside the resolved root), so a request cannot reach the live data directory, `/etc` or
/// anything else the agent may write.
fn check_restore_root(
    root: Option<&std::path::Path>,
    pgdata: &std::path::Path,
    raw: &str,
) -> Result<(), RequestError> {
    use std::path::Component;
    let Some(root) = root else {
        return Err(RequestError::PgdataNoRoot);
    };
    let outside = |why| RequestError::PgdataOutsideRoot {
        pgdata: raw.to_string(),
        root: root.display().to_string(),
        why,
    };
    if pgdata
        .components()
        .any(|c| !matches!(c, Component::RootDir | Component::Normal(_)))
    {
        return Err(outside("it has `.` or `..` components"));
    }
    if !pgdata.starts_with(root) || pgdata == root {
        return Err(outside("it is not below it"));
    }
    let real_root =
        std::fs::canonicalize(root).map_err(|_| outside("the root cannot be resolved"))?;
    // The deepest part that exists, without following a final symbolic link (a dangling one
    // would otherwise be created through).
    let mut existing = pgdata.to_path_buf();
    while std::fs::symlink_metadata(&existing).is_err() {
        if !existing.pop() {
            break;
        }
    }
    let real = std::fs::canonicalize(&existing)
        .map_err(|_| outside("a part of it cannot be resolved (a dangling symbolic link?)"))?;
    if !real.starts_with(&real_root) {
        return Err(outside("a symbolic link leads out of it"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_directories_stay_below_the_restore_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("restores");
        std::fs::create_dir(&root).unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("link")).unwrap();
        std::os::unix::fs::symlink("/nonexistent-target", root.join("dangling")).unwrap();
        let check = |p: std::path::PathBuf| {
            check_restore_root(Some(&root), &p, &p.display().to_string()).map_err(|e| e.to_string())
        };
        assert!(check(root.join("new/data")).is_ok());
        assert!(check(root.clone()).unwrap_err().contains("not below"));
        assert!(
            check(dir.path().join("elsewhere"))
                .unwrap_err()
                .contains("not below")
        );
        assert!(
            check(root.join("../elsewhere"))
                .unwrap_err()
                .contains("`..`")
        );
        assert!(
            check(root.join("link/data"))
                .unwrap_err()
                .contains("symbolic link")
        );
        assert!(check(root.join("dangling/data")).is_err());
        let none = check_restore_root(None, &root.join("x"), "x")
            .unwrap_err()
            .to_string();
        assert!(none.contains("--restore-root"), "{none}");
    }
}
