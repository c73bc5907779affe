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
    catalog::BackupId,
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

    async fn resolve(&self, id: &str) -> Result<crate::catalog::Manifest, Status> {
        if id.is_empty() {
            return Err(Status::invalid_argument(
                "missing backup id: name one (see `kubectl soma list`) or use \"latest\"",
            ));
        }
        Ok(self.ctx.catalog.resolve(id).await.map_err(OpError::from)?)
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
        match v1::Engine::try_from(req.engine).unwrap_or(v1::Engine::Unspecified) {
            v1::Engine::Postgres => {}
            v1::Engine::Qdrant => {
                return Err(Status::unimplemented(
                    "Qdrant backups are not available in this agent version",
                ));
            }
            v1::Engine::Unspecified => {
                return Err(Status::invalid_argument(
                    "missing engine: ask for a postgres backup",
                ));
            }
        }
        let pg = self.ctx.postgres()?;
        let database = if req.database.is_empty() {
            pg.default_database()
        } else {
            req.database
        };
        let id = BackupId::new(Utc::now(), "pg", &database);
        let guard = self.jobs.begin(JobInfo {
            id: id.to_string(),
            operation: "backup",
            target: format!("postgres/{database}"),
            started_at: Utc::now(),
        })?;
        let (reporter, stream) = Self::channel();
        let span =
            tracing::info_span!("backup", backup_id = %id, engine = "postgres", target = %database);
        ops::spawn_job(
            span,
            reporter.clone(),
            guard,
            ops::backup_postgres(self.ctx.clone(), id, database, reporter),
        );
        Ok(Response::new(stream))
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let req = request.into_inner();
        let manifest = self.resolve(&req.backup_id).await?;
        if manifest.engine != "postgres" {
            return Err(Status::unimplemented(format!(
                "restoring {} backups is not available in this agent version",
                manifest.engine
            )));
        }
        self.ctx.postgres()?;
        let database = if req.database.is_empty() {
            manifest.target.name.clone()
        } else {
            req.database
        };
        let guard = self.jobs.begin(JobInfo {
            id: format!("restore-{}", manifest.id),
            operation: "restore",
            target: format!("postgres/{database}"),
            started_at: Utc::now(),
        })?;
        let (reporter, stream) = Self::channel();
        let span = tracing::info_span!("restore", backup_id = %manifest.id, engine = "postgres", target = %database);
        ops::spawn_job(
            span,
            reporter.clone(),
            guard,
            ops::restore_postgres(self.ctx.clone(), manifest, database, req.clean, reporter),
        );
        Ok(Response::new(stream))
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let manifest = self.resolve(&request.into_inner().backup_id).await?;
        let guard = self.jobs.begin(JobInfo {
            id: format!("verify-{}", manifest.id),
            operation: "verify",
            target: format!("backup/{}", manifest.id),
            started_at: Utc::now(),
        })?;
        let (reporter, stream) = Self::channel();
        let span =
            tracing::info_span!("verify", backup_id = %manifest.id, engine = %manifest.engine);
        ops::spawn_job(
            span,
            reporter.clone(),
            guard,
            ops::verify(self.ctx.clone(), manifest, reporter),
        );
        Ok(Response::new(stream))
    }

    async fn list_backups(
        &self,
        _request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        let manifests = self.ctx.catalog.list().await.map_err(OpError::from)?;
        Ok(Response::new(v1::ListBackupsResponse {
            backups: manifests.iter().map(ops::backup_info).collect(),
        }))
    }

    async fn describe_backup(
        &self,
        request: Request<v1::DescribeBackupRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        let manifest = self.resolve(&request.into_inner().backup_id).await?;
        Ok(Response::new(ops::backup_info(&manifest)))
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
        let id = BackupId::parse(&raw).map_err(OpError::from)?;
        let span = tracing::info_span!("delete", backup_id = %id);
        let deleted = self
            .ctx
            .catalog
            .delete(&id)
            .instrument(span.clone())
            .await
            .map_err(OpError::from)?;
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
        Ok(Response::new(v1::AgentInfo {
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
