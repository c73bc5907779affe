//! Plans: a request turned into what will run, what it holds and which backups it touches, before
//! anything starts. The server validates a request into a plan, claims the plan's targets, and runs
//! it as a job; a backup set is a plan of plans.

use std::{future::Future, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use soma_proto::v1;

use super::{Context, Outcome, physical, postgres, qdrant, set, verify};
use crate::{
    catalog::{BackupId, Engine, IdEngine, Kind, Manifest},
    error::OpError,
    jobs::{JobInfo, JobTarget, Operation, Reporter},
};

mod restore;

pub use restore::RestorePlan;

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

/// A backup about to run.
#[derive(Debug, Clone)]
pub enum BackupPlan {
    /// pg_dump of one database, with the roles it needs.
    Logical {
        /// The new backup's id.
        id: BackupId,
        /// The database.
        database: String,
    },
    /// pg_dump of every database of the cluster, with the cluster's globals.
    LogicalCluster {
        /// The new backup's id.
        id: BackupId,
    },
    /// pg_basebackup of the cluster.
    Physical {
        /// The new backup's id.
        id: BackupId,
    },
    /// Snapshots of Qdrant collections.
    Qdrant {
        /// The new backup's id.
        id: BackupId,
        /// Collections (empty: all).
        collections: Vec<String>,
        /// How snapshots are taken.
        mode: v1::QdrantMode,
    },
    /// One backup of every configured engine under one set id.
    Set {
        /// The set's id.
        id: BackupId,
        /// Its members, run in order.
        members: Vec<BackupPlan>,
        /// Write the set manifest when the members are done; false for a platform set the
        /// plugin commits once every agent's members are complete.
        commit: bool,
    },
}

/// A boxed operation future (plans nest, so their futures must be boxed).
pub type OpFuture = Pin<Box<dyn Future<Output = Result<Outcome, OpError>> + Send>>;

impl BackupPlan {
    /// Validates a backup request against what this agent serves.
    pub fn from_request(
        ctx: &Context,
        req: v1::BackupRequest,
        now: DateTime<Utc>,
    ) -> Result<Self, OpError> {
        if req.all {
            let mut members = Vec::new();
            if ctx.postgres.is_some() {
                // Restoring "all" must bring back every database and the roles they need.
                members.push(if req.physical {
                    Self::physical(now)
                } else {
                    Self::logical_cluster(now)
                });
            }
            if ctx.qdrant.is_some() {
                members.push(Self::qdrant(now, Vec::new(), ctx.qdrant_mode));
            }
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
        match v1::Engine::try_from(req.engine).unwrap_or(v1::Engine::Unspecified) {
            v1::Engine::Postgres => {
                let pg = ctx.postgres()?;
                Ok(if req.physical {
                    Self::physical(now)
                } else if req.all_databases {
                    Self::logical_cluster(now)
                } else if req.database.is_empty() {
                    Self::logical(now, pg.default_database())
                } else {
                    Self::logical(now, req.database)
                })
            }
            v1::Engine::Qdrant => {
                ctx.qdrant()?;
                let mode = match v1::QdrantMode::try_from(req.qdrant_mode).unwrap_or_default() {
                    v1::QdrantMode::Unspecified => ctx.qdrant_mode,
                    mode => mode,
                };
                Ok(Self::qdrant(now, req.collections, mode))
            }
            v1::Engine::Set | v1::Engine::Unspecified => Err(RequestError::MissingEngine.into()),
        }
    }

    fn logical(now: DateTime<Utc>, database: String) -> Self {
        let id = BackupId::new(now, IdEngine::Postgres, &database);
        BackupPlan::Logical { id, database }
    }

    fn logical_cluster(now: DateTime<Utc>) -> Self {
        BackupPlan::LogicalCluster {
            id: BackupId::new(now, IdEngine::Postgres, postgres::ALL_DATABASES),
        }
    }

    fn physical(now: DateTime<Utc>) -> Self {
        BackupPlan::Physical {
            id: BackupId::new(now, IdEngine::Postgres, "cluster"),
        }
    }

    fn qdrant(now: DateTime<Utc>, collections: Vec<String>, mode: v1::QdrantMode) -> Self {
        let slug = match collections.as_slice() {
            [] => "all".to_string(),
            [one] => one.clone(),
            many => format!("{}-collections", many.len()),
        };
        BackupPlan::Qdrant {
            id: BackupId::new(now, IdEngine::Qdrant, &slug),
            collections,
            mode,
        }
    }

    /// The id of the backup this plan writes.
    pub fn id(&self) -> &BackupId {
        match self {
            BackupPlan::Logical { id, .. }
            | BackupPlan::LogicalCluster { id }
            | BackupPlan::Physical { id }
            | BackupPlan::Qdrant { id, .. }
            | BackupPlan::Set { id, .. } => id,
        }
    }

    /// Every backup id this plan writes: a set's (unless the plugin commits it) and its
    /// members'. An interrupted backup removes what these ids hold, so a platform set's id, which
    /// this agent never writes, is not among them.
    pub fn ids(&self) -> Vec<BackupId> {
        match self {
            BackupPlan::Set {
                id,
                members,
                commit,
            } => commit
                .then(|| id.clone())
                .into_iter()
                .chain(members.iter().flat_map(BackupPlan::ids))
                .collect(),
            plan => vec![plan.id().clone()],
        }
    }

    /// The engine written.
    pub fn engine(&self) -> Engine {
        match self {
            BackupPlan::Logical { .. }
            | BackupPlan::LogicalCluster { .. }
            | BackupPlan::Physical { .. } => Engine::Postgres,
            BackupPlan::Qdrant { .. } => Engine::Qdrant,
            BackupPlan::Set { .. } => Engine::Set,
        }
    }

    /// The kind of backup written, as manifests name it.
    pub fn kind(&self) -> Kind {
        match self {
            BackupPlan::Logical { .. } => Kind::Logical,
            BackupPlan::LogicalCluster { .. } => Kind::LogicalCluster,
            BackupPlan::Physical { .. } => Kind::Physical,
            BackupPlan::Qdrant { mode, .. } => qdrant::SnapshotMode::from_proto(*mode).kind(),
            BackupPlan::Set { .. } => Kind::Set,
        }
    }

    /// The job this backup runs as: what it holds and what it is about.
    pub fn job(&self) -> JobInfo {
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
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("backup", backup_id = %self.id(), engine = %self.engine(), target = %self.target_name())
    }

    /// What this plan holds while it runs.
    pub fn targets(&self) -> Vec<JobTarget> {
        match self {
            BackupPlan::Logical { database, .. } => vec![JobTarget::Database(database.clone())],
            // One whole-cluster backup at a time (logical or physical).
            BackupPlan::LogicalCluster { .. } | BackupPlan::Physical { .. } => {
                vec![JobTarget::Cluster]
            }
            BackupPlan::Qdrant { .. } => vec![JobTarget::Qdrant],
            BackupPlan::Set { members, .. } => members.iter().flat_map(|m| m.targets()).collect(),
        }
    }

    /// A short name of what is backed up, for logs.
    pub fn target_name(&self) -> String {
        match self {
            BackupPlan::Logical { database, .. } => database.clone(),
            BackupPlan::LogicalCluster { .. } => postgres::ALL_DATABASES.into(),
            BackupPlan::Physical { .. } => "cluster".into(),
            BackupPlan::Qdrant { collections, .. } if collections.is_empty() => "all".into(),
            BackupPlan::Qdrant { collections, .. } => collections.join(","),
            BackupPlan::Set { .. } => "all".into(),
        }
    }

    /// Runs the backup.
    pub fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        match self {
            BackupPlan::Logical { id, database } => {
                Box::pin(postgres::backup_postgres(ctx, id, database, reporter))
            }
            BackupPlan::LogicalCluster { id } => {
                Box::pin(postgres::backup_cluster(ctx, id, reporter))
            }
            BackupPlan::Physical { id } => Box::pin(physical::backup_physical(ctx, id, reporter)),
            BackupPlan::Qdrant {
                id,
                collections,
                mode,
            } => Box::pin(qdrant::backup_qdrant(ctx, id, collections, mode, reporter)),
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
pub struct VerifyPlan {
    /// The backup.
    pub manifest: Manifest,
}

impl VerifyPlan {
    /// Resolves the backup a verify request names.
    pub async fn from_request(ctx: &Context, req: v1::VerifyRequest) -> Result<Self, OpError> {
        Ok(Self {
            manifest: resolve(ctx, &req.backup_id, req.engine).await?,
        })
    }

    /// The job this verify runs as.
    pub fn job(&self) -> JobInfo {
        reading_job(&self.manifest, Operation::Verify)
    }

    /// The span its logs carry.
    pub fn span(&self) -> tracing::Span {
        tracing::info_span!("verify", backup_id = %self.manifest.id, engine = %self.manifest.engine)
    }

    /// Runs the verify.
    pub fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(verify::verify(ctx, self.manifest, reporter))
    }
}

/// The job of an operation that reads one backup (verify, drill): it holds the backup itself —
/// one such job per backup at a time, and delete or prune cannot remove it meanwhile — and reads
/// it and its members.
pub fn reading_job(manifest: &Manifest, operation: Operation) -> JobInfo {
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
pub async fn resolve(ctx: &Context, id: &str, engine: i32) -> Result<Manifest, OpError> {
    if id.is_empty() {
        return Err(RequestError::MissingId.into());
    }
    let engine = match v1::Engine::try_from(engine).unwrap_or(v1::Engine::Unspecified) {
        v1::Engine::Unspecified => None,
        v1::Engine::Postgres => Some(Engine::Postgres),
        v1::Engine::Qdrant => Some(Engine::Qdrant),
        v1::Engine::Set => Some(Engine::Set),
    };
    Ok(ctx.source.resolve_of(id, engine).await?)
}
