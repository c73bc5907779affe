//! Plans: a request turned into what will run, what it holds and which backups it touches, before
//! anything starts. The server validates a request into a plan, claims the plan's targets, and runs
//! it as a job; a backup set is a plan of plans.

use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use soma_proto::v1;

use super::{Context, Outcome, method, set, verify};
use crate::{
    catalog::{BackupId, Engine, IdEngine, Kind, Manifest},
    error::OpError,
    jobs::{JobInfo, JobTarget, Operation, Reporter},
};

mod restore;
#[cfg(test)]
mod tests;

pub(crate) use restore::{EngineRestore, RestoreAsk, RestorePlan};

/// A request that cannot be served as asked; each says what to ask instead.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No backup id given.
    #[error("missing backup id: name one (see `kubectl soma list`) or use \"latest\"")]
    MissingId,
    /// A backup request naming no engine.
    #[error("missing engine: ask for a postgres or qdrant backup, or all")]
    MissingEngine,
    /// `backup all` on an agent with no engine.
    #[error("this agent has no engine configured (--postgres-url, --qdrant-url)")]
    NoEngine,
    /// "latest" where only an explicit id is safe.
    #[error("delete needs an explicit backup id, not \"latest\"; see `kubectl soma list`")]
    LatestNotAllowed,
    /// A physical restore through the API on an agent without `--restore-root`.
    #[error(
        "this agent lays no data directory through its API: start it with --restore-root DIR (the volume meant for restores) to allow `restore --pgdata` below DIR, or run `soma-agent restore-pgdata` where PostgreSQL's data lives (the chart's init container)"
    )]
    PgdataNoRoot,
    /// A data directory outside `--restore-root`.
    #[error(
        "--pgdata {pgdata:?} is not inside the agent's --restore-root {root}: {why}; restore into a new directory below {root}"
    )]
    PgdataOutsideRoot {
        /// As requested.
        pgdata: String,
        /// The agent's root.
        root: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A relative data directory.
    #[error("--pgdata {0:?} must be an absolute path on the agent's host")]
    PgdataNotAbsolute(String),
    /// A base backup asked to be restored like a dump.
    #[error(
        "backup {0} is a physical base backup: restore it into an empty data directory with --pgdata DIR (and --target-time / --target-lsn), or run `soma-agent restore-pgdata` where PostgreSQL's data lives"
    )]
    PhysicalNeedsPgdata(BackupId),
    /// A set holding a base backup, which cannot be restored into a running server.
    #[error(
        "backup set {set} holds a physical PostgreSQL base backup ({member}), which is restored into an empty data directory: run `soma-agent restore-pgdata --backup {member}` where PostgreSQL's data lives (or `kubectl soma restore {member} --pgdata DIR`), and restore the other members one by one"
    )]
    SetWithPhysicalMember {
        /// The set.
        set: BackupId,
        /// Its base backup.
        member: BackupId,
    },
}

/// One engine's backup, planned: what it writes, what it holds while it runs, and how it runs.
/// Each engine (and each mode of one) implements it in its own module; a [`BackupPlan`] holds one,
/// or a set of them.
pub(crate) trait EngineBackup: std::fmt::Debug + Send {
    /// The new backup's id.
    fn id(&self) -> &BackupId;
    /// The engine written.
    fn engine(&self) -> Engine;
    /// The kind of backup written, as manifests name it.
    fn kind(&self) -> Kind;
    /// What it holds while it runs (one whole-cluster backup at a time, one per database...).
    fn targets(&self) -> Vec<JobTarget>;
    /// A short name of what is backed up, for logs.
    fn target_name(&self) -> String;
    /// Runs the backup.
    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture;
}

/// A backup about to run.
#[derive(Debug)]
pub(crate) enum BackupPlan {
    /// One engine's backup.
    One(Box<dyn EngineBackup>),
    /// One backup of every configured engine under one set id. Members are engine backups, so a
    /// set cannot nest.
    Set {
        /// The set's id.
        id: BackupId,
        /// Its members, run in order.
        members: Vec<Box<dyn EngineBackup>>,
        /// Write the set manifest when the members are done; false for a platform set the
        /// plugin commits once every agent's members are complete.
        commit: bool,
    },
}

/// A boxed operation future (plans nest, so their futures must be boxed).
pub(crate) type OpFuture = Pin<Box<dyn Future<Output = Result<Outcome, OpError>> + Send>>;

impl BackupPlan {
    /// Validates a backup request against what this agent serves: the engine it names plans its
    /// own backup ([`method::for_request`]); "all" asks every registered engine this agent runs.
    pub(crate) fn from_request(
        ctx: &Context,
        req: v1::BackupRequest,
        now: DateTime<Utc>,
    ) -> Result<Self, OpError> {
        if req.all {
            let members: Vec<_> = method::ENGINES
                .iter()
                .filter_map(|engine| engine.set_member(ctx, req.physical, now))
                .collect();
            if members.is_empty() {
                return Err(RequestError::NoEngine.into());
            }
            return Ok(if req.set_id.is_empty() {
                let id = BackupId::new(now, IdEngine::Set, "all");
                BackupPlan::Set {
                    id,
                    members,
                    commit: true,
                }
            } else {
                BackupPlan::Set {
                    id: set::parse_set_id(&req.set_id)?,
                    members,
                    commit: false,
                }
            });
        }
        let named = v1::Engine::try_from(req.engine).unwrap_or(v1::Engine::Unspecified);
        let engine = method::for_request(named).ok_or(RequestError::MissingEngine)?;
        Ok(BackupPlan::One(engine.plan_backup(ctx, req, now)?))
    }

    /// The id of the backup this plan writes.
    pub(crate) fn id(&self) -> &BackupId {
        match self {
            BackupPlan::One(backup) => backup.id(),
            BackupPlan::Set { id, .. } => id,
        }
    }

    /// Every backup id this plan writes: a set's (unless the plugin commits it) and its
    /// members'. An interrupted backup removes what these ids hold, so a platform set's id, which
    /// this agent never writes, is not among them.
    pub(crate) fn ids(&self) -> Vec<BackupId> {
        match self {
            BackupPlan::One(backup) => vec![backup.id().clone()],
            BackupPlan::Set {
                id,
                members,
                commit,
            } => commit
                .then(|| id.clone())
                .into_iter()
                .chain(members.iter().map(|m| m.id().clone()))
                .collect(),
        }
    }

    /// The engine written.
    pub(crate) fn engine(&self) -> Engine {
        match self {
            BackupPlan::One(backup) => backup.engine(),
            BackupPlan::Set { .. } => Engine::Set,
        }
    }

    /// The kind of backup written, as manifests name it.
    pub(crate) fn kind(&self) -> Kind {
        match self {
            BackupPlan::One(backup) => backup.kind(),
            BackupPlan::Set { .. } => Kind::Set,
        }
    }

    /// The job this backup runs as: what it holds and what it is about.
    pub(crate) fn job(&self) -> JobInfo {
        JobInfo::new(
            self.id().as_str(),
            Operation::Backup,
            self.targets(),
            Vec::new(),
        )
        .about(
            self.engine().as_str(),
            &self.target_name(),
            self.kind().as_str(),
        )
    }

    /// The span its logs carry.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!("backup", backup_id = %self.id(), engine = %self.engine(), target = %self.target_name())
    }

    /// What this plan holds while it runs.
    pub(crate) fn targets(&self) -> Vec<JobTarget> {
        match self {
            BackupPlan::One(backup) => backup.targets(),
            BackupPlan::Set { members, .. } => members.iter().flat_map(|m| m.targets()).collect(),
        }
    }

    /// A short name of what is backed up, for logs.
    pub(crate) fn target_name(&self) -> String {
        match self {
            BackupPlan::One(backup) => backup.target_name(),
            BackupPlan::Set { .. } => "all".into(),
        }
    }

    /// Runs the backup.
    pub(crate) fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        match self {
            BackupPlan::One(backup) => backup.run(ctx, reporter),
            BackupPlan::Set {
                id,
                members,
                commit,
            } => Box::pin(set::backup_set(ctx, id, members, commit, reporter)),
        }
    }
}

/// A verify about to run.
#[derive(Debug, Clone)]
pub(crate) struct VerifyPlan {
    /// The backup.
    pub manifest: Manifest,
}

impl VerifyPlan {
    /// Resolves the backup a verify request names.
    pub(crate) async fn from_request(
        ctx: &Context,
        req: v1::VerifyRequest,
    ) -> Result<Self, OpError> {
        Ok(Self {
            manifest: resolve(ctx, &req.backup_id, req.engine).await?,
        })
    }

    /// The job this verify runs as.
    pub(crate) fn job(&self) -> JobInfo {
        reading_job(&self.manifest, Operation::Verify)
    }

    /// The span its logs carry.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!("verify", backup_id = %self.manifest.id, engine = %self.manifest.engine)
    }

    /// Runs the verify.
    pub(crate) fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(verify::verify(ctx, self.manifest, reporter))
    }
}

/// The job of an operation that reads one backup (verify, drill): it holds the backup itself —
/// one such job per backup at a time, and delete or prune cannot remove it meanwhile — and reads
/// it and its members.
pub(crate) fn reading_job(manifest: &Manifest, operation: Operation) -> JobInfo {
    JobInfo::new(
        manifest.id.as_str(),
        operation,
        vec![JobTarget::Backup(manifest.id.clone())],
        std::iter::once(manifest.id.clone())
            .chain(manifest.members.iter().cloned())
            .collect(),
    )
    .about(
        manifest.engine.as_str(),
        &manifest.target.name,
        manifest.kind.as_str(),
    )
}

/// Resolves "latest" or an id named in a request; `engine` (the request's proto engine, 0 when
/// unset) narrows "latest" to backups of that engine.
pub(crate) async fn resolve(ctx: &Context, id: &str, engine: i32) -> Result<Manifest, OpError> {
    if id.is_empty() {
        return Err(RequestError::MissingId.into());
    }
    let engine = match v1::Engine::try_from(engine).unwrap_or(v1::Engine::Unspecified) {
        v1::Engine::Set => Some(Engine::Set),
        named => method::for_request(named).map(|e| e.engine()),
    };
    Ok(ctx.source.resolve_of(id, engine).await?)
}
