//! gRPC ↔ domain: validates requests, claims targets, starts jobs and maps errors to statuses.

use std::{pin::Pin, sync::Arc};

use chrono::Utc;
use futures::Stream;
use soma_proto::v1::{self, soma_agent_server::SomaAgent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    catalog::{BackupId, IdEngine},
    error::OpError,
    jobs::{EVENT_QUEUE, JobInfo, Jobs, Reporter},
    ops::{self, Context},
};

/// The agent's gRPC service.
#[derive(Debug, Clone)]
pub struct AgentService {
    ctx: Arc<Context>,
    jobs: Arc<Jobs>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::OperationEvent, Status>> + Send>>;

impl AgentService {
    /// A service over `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self {
            ctx: Arc::new(ctx),
            jobs: Arc::new(Jobs::default()),
        }
    }

    fn channel() -> (Reporter, EventStream) {
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        (Reporter::start(tx), Box::pin(ReceiverStream::new(rx)))
    }

    fn claim(&self, id: &BackupId, operation: &'static str, target: String) -> JobInfo {
        JobInfo {
            id: id.to_string(),
            operation,
            target,
            started_at: Utc::now(),
        }
    }

    async fn resolve(&self, id: &str) -> Result<crate::catalog::Manifest, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "missing backup id: name one (see `kubectl soma list`) or use \"latest\"",
            ));
        }
        Ok(self.ctx.catalog.resolve(id).await.map_err(OpError::from)?)
    }
}

impl AgentService {
    /// A physical restore into a data directory on the agent's host.
    fn restore_pgdata(&self, req: v1::RestoreRequest) -> Result<Response<EventStream>, Status> {
        let target = ops::physical::RecoveryTarget::from_options(
            Some(req.target_time.as_str()).filter(|t| !t.is_empty()),
            Some(req.target_lsn.as_str()).filter(|t| !t.is_empty()),
            false,
        )?;
        let backup = if req.backup_id.is_empty() {
            "latest".to_string()
        } else {
            req.backup_id
        };
        let agent_binary = std::env::current_exe()
            .map_err(|e| Status::internal(format!("locating the soma-agent binary: {e}")))?;
        let pgdata = std::path::PathBuf::from(&req.pgdata);
        if !pgdata.is_absolute() {
            return Err(Status::invalid_argument(format!(
                "--pgdata {:?} must be an absolute path on the agent's host",
                req.pgdata
            )));
        }
        let guard = self.jobs.begin(JobInfo {
            id: backup.clone(),
            operation: "restore",
            target: format!("pgdata/{}", pgdata.display()),
            started_at: Utc::now(),
        })?;
        let (reporter, stream) = Self::channel();
        let span = tracing::info_span!("restore", backup_id = %backup, engine = "postgres", pgdata = %pgdata.display());
        ops::spawn_job(
            span,
            reporter.clone(),
            vec![guard],
            ops::physical::restore_pgdata_job(
                self.ctx.clone(),
                ops::physical::PgdataRestore {
                    backup,
                    pgdata,
                    target,
                    agent_binary,
                },
                reporter,
            ),
        );
        Ok(Response::new(stream))
    }
}

#[tonic::async_trait]
impl SomaAgent for AgentService {
    type BackupStream = EventStream;
    type RestoreStream = EventStream;
    type VerifyStream = EventStream;

    async fn backup(
        &self,
        request: Request<v1::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let req = request.into_inner();
        let now = Utc::now();
        let (reporter, stream) = Self::channel();
        if req.all {
            let mut members = Vec::new();
            let mut claims = Vec::new();
            if let Some(pg) = &self.ctx.postgres {
                if req.physical {
                    let id = BackupId::new(now, IdEngine::Postgres, "cluster");
                    claims.push(self.claim(&id, "backup", "postgres/cluster".into()));
                    members.push(("postgres-physical".to_string(), id));
                } else {
                    let db = pg.default_database();
                    let id = BackupId::new(now, IdEngine::Postgres, &db);
                    claims.push(self.claim(&id, "backup", format!("postgres/{db}")));
                    members.push(("postgres".to_string(), id));
                }
            }
            if self.ctx.qdrant.is_some() {
                let id = BackupId::new(now, IdEngine::Qdrant, "all");
                claims.push(self.claim(&id, "backup", "qdrant".into()));
                members.push(("qdrant".to_string(), id));
            }
            if members.is_empty() {
                return Err(Status::failed_precondition(
                    "this agent has no engine configured (--postgres-url, --qdrant-url)",
                ));
            }
            let set_id = BackupId::new(now, IdEngine::Set, "all");
            let guards = self.jobs.begin_all(claims)?;
            let span =
                tracing::info_span!("backup", backup_id = %set_id, engine = "set", target = "all");
            ops::spawn_job(
                span,
                reporter.clone(),
                guards,
                ops::set::backup_set(self.ctx.clone(), set_id, members, reporter),
            );
            return Ok(Response::new(stream));
        }
        match v1::Engine::try_from(req.engine).unwrap_or(v1::Engine::Unspecified) {
            v1::Engine::Postgres if req.physical => {
                self.ctx.postgres()?;
                let id = BackupId::new(now, IdEngine::Postgres, "cluster");
                let guard =
                    self.jobs
                        .begin(self.claim(&id, "backup", "postgres/cluster".into()))?;
                let span = tracing::info_span!("backup", backup_id = %id, engine = "postgres", target = "cluster");
                ops::spawn_job(
                    span,
                    reporter.clone(),
                    vec![guard],
                    ops::physical::backup_physical(self.ctx.clone(), id, reporter),
                );
            }
            v1::Engine::Postgres => {
                let pg = self.ctx.postgres()?;
                let database = if req.database.is_empty() {
                    pg.default_database()
                } else {
                    req.database
                };
                let id = BackupId::new(now, IdEngine::Postgres, &database);
                let guard =
                    self.jobs
                        .begin(self.claim(&id, "backup", format!("postgres/{database}")))?;
                let span = tracing::info_span!("backup", backup_id = %id, engine = "postgres", target = %database);
                ops::spawn_job(
                    span,
                    reporter.clone(),
                    vec![guard],
                    ops::backup_postgres(self.ctx.clone(), id, database, reporter),
                );
            }
            v1::Engine::Qdrant => {
                self.ctx.qdrant()?;
                let slug = match req.collections.as_slice() {
                    [] => "all".to_string(),
                    [one] => one.clone(),
                    many => format!("{}-collections", many.len()),
                };
                let id = BackupId::new(now, IdEngine::Qdrant, &slug);
                let guard = self
                    .jobs
                    .begin(self.claim(&id, "backup", "qdrant".into()))?;
                let mode = v1::QdrantMode::try_from(req.qdrant_mode).unwrap_or_default();
                let span = tracing::info_span!("backup", backup_id = %id, engine = "qdrant", target = %slug);
                ops::spawn_job(
                    span,
                    reporter.clone(),
                    vec![guard],
                    ops::qdrant::backup_qdrant(
                        self.ctx.clone(),
                        id,
                        req.collections,
                        mode,
                        reporter,
                    ),
                );
            }
            v1::Engine::Set | v1::Engine::Unspecified => {
                return Err(Status::invalid_argument(
                    "missing engine: ask for a postgres or qdrant backup, or all",
                ));
            }
        }
        Ok(Response::new(stream))
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let req = request.into_inner();
        if !req.pgdata.is_empty() {
            return self.restore_pgdata(req);
        }
        let manifest = self.resolve(&req.backup_id).await?;
        let (reporter, stream) = Self::channel();
        let span =
            tracing::info_span!("restore", backup_id = %manifest.id, engine = %manifest.engine);
        match manifest.engine.as_str() {
            "postgres" if manifest.kind == ops::physical::PHYSICAL => {
                return Err(Status::invalid_argument(format!(
                    "backup {} is a physical base backup: restore it into an empty data directory with --pgdata DIR (and --target-time / --target-lsn), or run `soma-agent restore-pgdata` where PostgreSQL's data lives",
                    manifest.id
                )));
            }
            "postgres" => {
                self.ctx.postgres()?;
                let database = if req.database.is_empty() {
                    manifest.target.name.clone()
                } else {
                    req.database
                };
                let guard = self.jobs.begin(self.claim(
                    &manifest.id,
                    "restore",
                    format!("postgres/{database}"),
                ))?;
                ops::spawn_job(
                    span,
                    reporter.clone(),
                    vec![guard],
                    ops::restore_postgres(
                        self.ctx.clone(),
                        manifest,
                        database,
                        req.clean,
                        reporter,
                    ),
                );
            }
            "qdrant" => {
                self.ctx.qdrant()?;
                let guard =
                    self.jobs
                        .begin(self.claim(&manifest.id, "restore", "qdrant".into()))?;
                ops::spawn_job(
                    span,
                    reporter.clone(),
                    vec![guard],
                    ops::qdrant::restore_qdrant(
                        self.ctx.clone(),
                        manifest,
                        req.collections,
                        req.rename_to,
                        req.force,
                        reporter,
                    ),
                );
            }
            "set" => {
                let mut claims = Vec::new();
                for id in &manifest.members {
                    match id.engine() {
                        Some(IdEngine::Postgres) => {
                            self.ctx.postgres()?;
                            let member = self.ctx.catalog.get(id).await.map_err(OpError::from)?;
                            claims.push(self.claim(
                                &manifest.id,
                                "restore",
                                format!("postgres/{}", member.target.name),
                            ));
                        }
                        _ => {
                            self.ctx.qdrant()?;
                            claims.push(self.claim(&manifest.id, "restore", "qdrant".into()));
                        }
                    }
                }
                let guards = self.jobs.begin_all(claims)?;
                ops::spawn_job(
                    span,
                    reporter.clone(),
                    guards,
                    ops::set::restore_set(
                        self.ctx.clone(),
                        manifest,
                        req.clean,
                        req.force,
                        reporter,
                    ),
                );
            }
            other => {
                return Err(Status::unimplemented(format!(
                    "restoring {other} backups is not available in this agent version"
                )));
            }
        }
        Ok(Response::new(stream))
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let manifest = self.resolve(&request.into_inner().backup_id).await?;
        let guard = self.jobs.begin(self.claim(
            &manifest.id,
            "verify",
            format!("backup/{}", manifest.id),
        ))?;
        let (reporter, stream) = Self::channel();
        let span =
            tracing::info_span!("verify", backup_id = %manifest.id, engine = %manifest.engine);
        ops::spawn_job(
            span,
            reporter.clone(),
            vec![guard],
            ops::verify(self.ctx.clone(), manifest, reporter),
        );
        Ok(Response::new(stream))
    }

    async fn list_backups(
        &self,
        _request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        let manifests = self.ctx.catalog.list().await.map_err(OpError::from)?;
        let mut windows = ops::physical::Windows::new(&self.ctx.catalog);
        let mut backups = Vec::with_capacity(manifests.len());
        for m in &manifests {
            let mut info = ops::backup_info(m);
            info.recovery_window = windows.of(m).await;
            backups.push(info);
        }
        Ok(Response::new(v1::ListBackupsResponse { backups }))
    }

    async fn describe_backup(
        &self,
        request: Request<v1::DescribeBackupRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        let manifest = self.resolve(&request.into_inner().backup_id).await?;
        let mut info = ops::backup_info(&manifest);
        info.recovery_window = ops::physical::Windows::new(&self.ctx.catalog)
            .of(&manifest)
            .await;
        Ok(Response::new(info))
    }

    async fn delete_backup(
        &self,
        request: Request<v1::DeleteBackupRequest>,
    ) -> Result<Response<v1::DeleteBackupResponse>, Status> {
        let raw = request.into_inner().backup_id;
        if raw == "latest" {
            return Err(Status::invalid_argument(
                "delete needs an explicit backup id, not \"latest\"; see `kubectl soma list`",
            ));
        }
        let id = BackupId::parse(&raw)
            .map_err(|e| OpError::from(crate::catalog::CatalogError::from(e)))?;
        let span = tracing::info_span!("delete", backup_id = %id);
        let catalog = &self.ctx.catalog;
        let mut physical = Vec::new();
        let mut deleted = async {
            let manifest = catalog.get(&id).await?;
            physical.push(manifest.clone());
            // The set first, so it stops existing before its members go.
            let mut deleted = catalog.delete(&id).await?;
            for member in &manifest.members {
                if let Ok(m) = catalog.get(member).await {
                    physical.push(m);
                }
                match catalog.delete(member).await {
                    Ok(n) => deleted += n,
                    Err(crate::catalog::CatalogError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(deleted)
        }
        .instrument(span.clone())
        .await
        .map_err(OpError::from)?;
        // WAL that only the deleted base backups needed goes with them.
        for m in physical
            .iter()
            .filter(|m| m.kind == ops::physical::PHYSICAL)
        {
            match ops::physical::prune_wal(catalog, m)
                .instrument(span.clone())
                .await
            {
                Ok(n) => deleted += n,
                Err(e) => span.in_scope(|| {
                    tracing::warn!(error = %e, "could not prune WAL the deleted base backup needed; it stays in the store")
                }),
            }
        }
        span.in_scope(|| tracing::info!(objects = deleted, "backup deleted"));
        Ok(Response::new(v1::DeleteBackupResponse {
            backup_id: id.to_string(),
            objects_deleted: deleted,
        }))
    }

    async fn get_info(
        &self,
        _request: Request<v1::GetInfoRequest>,
    ) -> Result<Response<v1::AgentInfo>, Status> {
        let mut engines = Vec::new();
        if let Some(pg) = &self.ctx.postgres {
            engines.push(v1::EngineInfo {
                engine: v1::Engine::Postgres as i32,
                target: format!("{}/{}", pg.server(), pg.default_database()),
            });
        }
        if let Some(q) = &self.ctx.qdrant {
            engines.push(v1::EngineInfo {
                engine: v1::Engine::Qdrant as i32,
                target: q.url(),
            });
        }
        let wal_archive = match (&self.ctx.wal_stream, &self.ctx.postgres) {
            (Some(wal), Some(pg)) => Some(ops::physical::wal_archive_status(wal, pg).await),
            _ => None,
        };
        Ok(Response::new(v1::AgentInfo {
            wal_archive,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            engines,
            store: self.ctx.catalog.store().location(),
            running_jobs: self
                .jobs
                .running()
                .into_iter()
                .map(|j| v1::JobInfo {
                    id: j.id,
                    operation: j.operation.into(),
                    target: j.target,
                    started_at: j.started_at.to_rfc3339(),
                })
                .collect(),
        }))
    }
}
