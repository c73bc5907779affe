//! gRPC ↔ domain: turns each request into a plan, claims what the plan holds, runs it as a job,
//! and maps results and errors to the wire. No domain work happens here.

pub mod convert;

use std::{pin::Pin, sync::Arc};

use chrono::Utc;
use futures::Stream;
use soma_proto::v1::{self, soma_agent_server::SomaAgent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    catalog::BackupId,
    error::OpError,
    jobs::{EVENT_QUEUE, JobInfo, Jobs, Operation, Reporter},
    ops::{
        self, Context,
        drill::DrillPlan,
        plan::{BackupPlan, OpFuture, RestorePlan, VerifyPlan},
    },
};

/// The agent's gRPC service.
#[derive(Debug, Clone)]
pub struct AgentService {
    ctx: Arc<Context>,
    jobs: Arc<Jobs>,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::OperationEvent, Status>> + Send>>;

/// What to do when the agent stops while a job runs.
enum Interrupted {
    /// Abort the uploads of these unfinished backups and remove what they completed.
    Abandon(Vec<BackupId>),
    /// Empty the data directory a physical restore was filling (if it found it empty).
    ClearPgdata(ops::physical::PgdataRestore),
    /// Remove a restore drill's scratch targets.
    DrillScratch(ops::drill::Scratch),
    /// Nothing is left half-done (a restore into PostgreSQL rolls back when pg_restore dies; a
    /// cut-off Qdrant upload is refused by Qdrant's checksum; a verify writes nothing).
    Nothing,
}

impl AgentService {
    /// A service over `ctx` whose jobs are interrupted when `shutdown` is cancelled.
    pub fn new(ctx: Context, shutdown: CancellationToken) -> Self {
        Self {
            ctx: Arc::new(ctx),
            jobs: Arc::new(Jobs::new(shutdown)),
        }
    }

    /// The running jobs, so the agent can wait for them on shutdown.
    pub fn jobs(&self) -> Arc<Jobs> {
        self.jobs.clone()
    }

    /// Claims `info`, then runs `op` as a job whose progress and result stream to the client.
    fn start(
        &self,
        info: JobInfo,
        span: tracing::Span,
        interrupted: Interrupted,
        op: impl FnOnce(Arc<Context>, Reporter) -> OpFuture,
    ) -> Result<Response<EventStream>, Status> {
        let guard = self.jobs.begin(info).map_err(OpError::from)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let reporter = Reporter::start(tx);
        let running = op(self.ctx.clone(), reporter.clone());
        let finisher = reporter.clone();
        let work = async move {
            let result = running.await.map(|outcome| {
                let r = convert::operation_result(outcome, reporter.elapsed());
                tracing::info!(
                    seconds = r.seconds,
                    raw_bytes = r.raw_bytes,
                    stored_bytes = r.stored_bytes,
                    "{}",
                    r.summary
                );
                r
            });
            // Release the claims before telling the client, so an immediate retry is accepted.
            drop(guard);
            reporter.finish(result).await;
        };
        let ctx = self.ctx.clone();
        let cleanup = async move {
            match interrupted {
                Interrupted::Abandon(ids) => {
                    for id in ids {
                        if let Err(e) = ctx.catalog.abandon(&id).await {
                            tracing::warn!(backup_id = %id, error = %e, "could not remove what the interrupted backup wrote; the next start-up sweeps its uploads");
                        }
                    }
                }
                Interrupted::ClearPgdata(req) => ops::physical::abandon_pgdata(&req).await,
                Interrupted::DrillScratch(scratch) => scratch.clean_up(&ctx).await,
                Interrupted::Nothing => {}
            }
            finisher.finish(Err(OpError::ShuttingDown)).await;
        };
        self.jobs.spawn(span, work, cleanup);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl SomaAgent for AgentService {
    type BackupStream = EventStream;
    type RestoreStream = EventStream;
    type VerifyStream = EventStream;
    type DrillStream = EventStream;

    async fn backup(
        &self,
        request: Request<v1::BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let plan = BackupPlan::from_request(&self.ctx, request.into_inner(), Utc::now())?;
        if let BackupPlan::Set {
            id, commit: false, ..
        } = &plan
        {
            ops::set::refuse_existing(&self.ctx, id).await?;
        }
        let span = tracing::info_span!("backup", backup_id = %plan.id(), engine = %plan.engine(), target = %plan.target_name());
        let info = JobInfo::new(
            plan.id().as_str(),
            Operation::Backup,
            plan.targets(),
            Vec::new(),
        );
        let interrupted = Interrupted::Abandon(plan.ids());
        self.start(info, span, interrupted, |ctx, reporter| {
            plan.run(ctx, reporter)
        })
    }

    async fn restore(
        &self,
        request: Request<v1::RestoreRequest>,
    ) -> Result<Response<Self::RestoreStream>, Status> {
        let plan = RestorePlan::from_request(&self.ctx, request.into_inner()).await?;
        let span =
            tracing::info_span!("restore", backup_id = %plan.backup(), engine = %plan.engine());
        let info = JobInfo::new(
            plan.backup(),
            Operation::Restore,
            plan.targets(),
            plan.uses(),
        );
        let interrupted = match &plan {
            RestorePlan::Pgdata(req) => Interrupted::ClearPgdata(req.clone()),
            _ => Interrupted::Nothing,
        };
        self.start(info, span, interrupted, |ctx, reporter| {
            plan.run(ctx, reporter)
        })
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let plan = VerifyPlan::from_request(&self.ctx, request.into_inner()).await?;
        let span = tracing::info_span!("verify", backup_id = %plan.manifest.id, engine = %plan.manifest.engine);
        let info = JobInfo::new(
            plan.manifest.id.as_str(),
            Operation::Verify,
            plan.targets(),
            plan.uses(),
        );
        self.start(info, span, Interrupted::Nothing, |ctx, reporter| {
            plan.run(ctx, reporter)
        })
    }

    async fn commit_set(
        &self,
        request: Request<v1::CommitSetRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        let request = request.into_inner();
        let started_at = chrono::DateTime::parse_from_rfc3339(&request.started_at)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_else(|_| Utc::now());
        let span = tracing::info_span!("commit_set", backup_id = %request.set_id.chars().take(80).collect::<String>());
        let manifest =
            ops::set::commit_set(&self.ctx, &request.set_id, &request.members, started_at)
                .instrument(span)
                .await?;
        tracing::info!(backup_id = %manifest.id, members = manifest.members.len(), "platform set committed");
        Ok(Response::new(convert::backup_info(&manifest)))
    }

    async fn drill(
        &self,
        request: Request<v1::DrillRequest>,
    ) -> Result<Response<Self::DrillStream>, Status> {
        let plan = DrillPlan::from_request(&self.ctx, request.into_inner()).await?;
        let span = tracing::info_span!("drill", backup_id = %plan.manifest.id, engine = %plan.manifest.engine);
        // Operation::Drill belongs in jobs.rs (the lead's); until then a drill shows as a verify.
        let info = JobInfo::new(
            plan.manifest.id.as_str(),
            Operation::Verify,
            plan.targets(),
            plan.uses(),
        );
        let interrupted = Interrupted::DrillScratch(plan.scratch.clone());
        self.start(info, span, interrupted, |ctx, reporter| {
            plan.run(ctx, reporter)
        })
    }

    async fn prune(
        &self,
        _request: Request<v1::PruneRequest>,
    ) -> Result<Response<v1::PruneResponse>, Status> {
        Err(Status::unimplemented("prune is not implemented yet"))
    }

    async fn list_failures(
        &self,
        _request: Request<v1::ListFailuresRequest>,
    ) -> Result<Response<v1::ListFailuresResponse>, Status> {
        Err(Status::unimplemented(
            "failure records are not implemented yet",
        ))
    }

    async fn list_backups(
        &self,
        _request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        let manifests = self.ctx.source.list().await.map_err(OpError::from)?;
        let mut windows = ops::physical::Windows::new(&self.ctx.source);
        let mut backups = Vec::with_capacity(manifests.len());
        for m in &manifests {
            let mut info = convert::backup_info(m);
            info.recovery_window = windows.of(m).await.map(convert::recovery_window);
            backups.push(info);
        }
        Ok(Response::new(v1::ListBackupsResponse { backups }))
    }

    async fn describe_backup(
        &self,
        request: Request<v1::DescribeBackupRequest>,
    ) -> Result<Response<v1::BackupInfo>, Status> {
        let request = request.into_inner();
        let manifest = ops::plan::resolve(&self.ctx, &request.backup_id, request.engine).await?;
        let mut info = convert::backup_info(&manifest);
        info.recovery_window = ops::physical::Windows::new(&self.ctx.source)
            .of(&manifest)
            .await
            .map(convert::recovery_window);
        info.last_drill = convert::last_drill(
            ops::drill::read_report(self.ctx.source.store().as_ref(), &manifest.id).await,
        );
        Ok(Response::new(info))
    }

    async fn delete_backup(
        &self,
        request: Request<v1::DeleteBackupRequest>,
    ) -> Result<Response<v1::DeleteBackupResponse>, Status> {
        let raw = request.into_inner().backup_id;
        let span = tracing::info_span!("delete", backup_id = %raw);
        let deleted = ops::delete::delete_backup(&self.ctx, &self.jobs, &raw)
            .instrument(span)
            .await?;
        Ok(Response::new(v1::DeleteBackupResponse {
            backup_id: deleted.id.to_string(),
            objects_deleted: deleted.objects,
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
            (Some(wal), Some(pg)) => Some(convert::wal_archive_status(
                wal,
                pg.current_wal_lsn().await.ok(),
            )),
            _ => None,
        };
        Ok(Response::new(v1::AgentInfo {
            wal_archive,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            engines,
            store: self.ctx.catalog.store().location(),
            restore_from: Some(self.ctx.source.store().location())
                .filter(|source| *source != self.ctx.catalog.store().location())
                .unwrap_or_default(),
            running_jobs: self
                .jobs
                .running()
                .into_iter()
                .map(convert::job_info)
                .collect(),
            schedules: Vec::new(),
            retention: String::new(),
            recent_failures: Vec::new(),
        }))
    }
}
