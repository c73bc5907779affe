//! Restore plans: which backup, into what, and what an interrupted restore leaves to clean.

use std::sync::Arc;

use soma_proto::v1;

use super::{OpFuture, RequestError, resolve};
use crate::{
    catalog::{BackupId, Engine, Manifest},
    error::OpError,
    jobs::{JobInfo, JobTarget, Operation, Reporter},
    ops::{Context, method, physical, set},
    runner::Interrupted,
};

/// One engine's restore, planned: which backup, into what, and what an interrupted run leaves to
/// clean. Each engine implements it in its own module; a [`RestorePlan`] holds one, or a set's.
pub(crate) trait EngineRestore: std::fmt::Debug + Send {
    /// The backup restored, as named in logs ("latest" for a physical restore that picks one).
    fn backup(&self) -> String;
    /// The engine restored.
    fn engine(&self) -> Engine;
    /// What it holds while it runs.
    fn targets(&self) -> Vec<JobTarget>;
    /// The backups it reads, so none of them is deleted under it.
    fn uses(&self) -> Vec<BackupId>;
    /// What an interrupted run leaves to clean (logical restores roll back by themselves).
    fn interrupted(&self) -> Interrupted {
        Interrupted::Nothing
    }
    /// Runs the restore.
    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture;
}

/// What a restore request asks of the backup it names, apart from naming it: each engine reads
/// the options that concern it.
#[derive(Debug, Clone, Default)]
pub(crate) struct RestoreAsk {
    /// Target database (empty: the backup's own database(s)).
    pub database: String,
    /// Drop and recreate existing objects.
    pub clean: bool,
    /// Update the passwords and attributes of roles that exist already.
    pub update_roles: bool,
    /// Collections to restore (empty: all).
    pub collections: Vec<String>,
    /// Restore the one selected collection under this name (the request's empty string: under
    /// its own).
    pub rename_to: Option<String>,
    /// Overwrite existing collections and aliases.
    pub force: bool,
}

impl RestoreAsk {
    fn of(req: &v1::RestoreRequest) -> Self {
        Self {
            database: req.database.clone(),
            clean: req.clean,
            update_roles: req.update_roles,
            collections: req.collections.clone(),
            rename_to: Some(req.rename_to.clone()).filter(|r| !r.is_empty()),
            force: req.force,
        }
    }

    /// What a set's member is restored with: whole, under its own names, with the request's
    /// safety switches.
    fn for_member(&self) -> Self {
        Self {
            clean: self.clean,
            update_roles: self.update_roles,
            force: self.force,
            ..Self::default()
        }
    }
}

/// A restore about to run.
#[derive(Debug)]
pub(crate) enum RestorePlan {
    /// One engine's restore (a base backup laid into a data directory among them).
    One(Box<dyn EngineRestore>),
    /// Every member of a set, in order.
    Set {
        /// The set (boxed: a manifest is large beside a plan's pointer).
        manifest: Box<Manifest>,
        /// One plan per member.
        members: Vec<Box<dyn EngineRestore>>,
    },
}

impl RestorePlan {
    /// The job this restore runs as: what it writes and what it reads.
    pub(crate) fn job(&self) -> JobInfo {
        JobInfo::new(
            self.backup(),
            Operation::Restore,
            self.targets(),
            self.uses(),
        )
        .about(self.engine().as_str(), "", "")
    }

    /// The span its logs carry.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!("restore", backup_id = %self.backup(), engine = %self.engine())
    }

    /// What an interrupted restore leaves to clean: a physical restore's half-laid data
    /// directory (logical restores roll back by themselves).
    pub(crate) fn interrupted(&self) -> Interrupted {
        match self {
            RestorePlan::One(restore) => restore.interrupted(),
            RestorePlan::Set { .. } => Interrupted::Nothing,
        }
    }

    /// Validates a restore request and resolves the backup it names; the backup's method plans
    /// its restore, a set's members each through theirs.
    ///
    /// A request with a data directory is planned apart: it names a directory to lay a base
    /// backup into and may ask for "latest", which the restore chooses when it runs (the
    /// recovery target decides which base backup), so there is no manifest to ask a method yet.
    pub(crate) async fn from_request(
        ctx: &Context,
        req: v1::RestoreRequest,
    ) -> Result<Self, OpError> {
        if !req.pgdata.is_empty() {
            return Self::pgdata(ctx, req);
        }
        let ask = RestoreAsk::of(&req);
        let manifest = resolve(ctx, &req.backup_id, req.engine).await?;
        let Some(method) = method::of(manifest.engine, manifest.kind) else {
            return Self::set(ctx, manifest, &ask.for_member()).await;
        };
        Ok(RestorePlan::One(
            method.plan_restore(ctx, manifest, &ask, None)?,
        ))
    }

    /// A set's restore: each member planned by its method, in the set's order; a member that is
    /// a set itself is refused.
    async fn set(ctx: &Context, manifest: Manifest, ask: &RestoreAsk) -> Result<Self, OpError> {
        let mut members = Vec::new();
        for m in set::members_of(&ctx.source, &manifest).await? {
            let Some(method) = method::of(m.engine, m.kind) else {
                return Err(OpError::NestedSet {
                    set: manifest.id.clone(),
                    member: m.id,
                });
            };
            members.push(method.plan_restore(ctx, m, ask, Some(&manifest.id))?);
        }
        Ok(RestorePlan::Set {
            manifest: Box::new(manifest),
            members,
        })
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
        Ok(RestorePlan::One(Box::new(physical::PgdataRestore::new(
            backup,
            pgdata,
            target,
            agent_binary,
        ))))
    }

    /// The backup restored, as named in logs ("latest" for a physical restore that picks one).
    pub(crate) fn backup(&self) -> String {
        match self {
            RestorePlan::One(restore) => restore.backup(),
            RestorePlan::Set { manifest, .. } => manifest.id.to_string(),
        }
    }

    /// The engine restored.
    pub(crate) fn engine(&self) -> Engine {
        match self {
            RestorePlan::One(restore) => restore.engine(),
            RestorePlan::Set { .. } => Engine::Set,
        }
    }

    /// What this plan holds while it runs.
    pub(crate) fn targets(&self) -> Vec<JobTarget> {
        match self {
            RestorePlan::One(restore) => restore.targets(),
            RestorePlan::Set { members, .. } => members.iter().flat_map(|m| m.targets()).collect(),
        }
    }

    /// The backups this plan reads, so none of them is deleted under it. A physical restore of
    /// "latest" chooses its base backup when it runs; an explicit id is claimed.
    pub(crate) fn uses(&self) -> Vec<BackupId> {
        match self {
            RestorePlan::One(restore) => restore.uses(),
            RestorePlan::Set { manifest, members } => std::iter::once(manifest.id.clone())
                .chain(members.iter().flat_map(|m| m.uses()))
                .collect(),
        }
    }

    /// Runs the restore.
    pub(crate) fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        match self {
            RestorePlan::One(restore) => restore.run(ctx, reporter),
            RestorePlan::Set { manifest, members } => {
                Box::pin(set::restore_set(ctx, *manifest, members, reporter))
            }
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
