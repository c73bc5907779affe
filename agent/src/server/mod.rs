//! gRPC ↔ domain: turns each request into a plan, claims what the plan holds, runs it as a job,
//! and maps results and errors to the wire. No domain work happens here.

pub(crate) mod auth;
pub(crate) mod convert;
pub(crate) mod tls;

use std::{pin::Pin, sync::Arc};

use chrono::Utc;
use futures::Stream;
use soma_proto::v1::{self, soma_agent_server::SomaAgent};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::{
    error::OpError,
    failures::Trigger,
    jobs::{JobInfo, Jobs, Reporter},
    ops::{
        self, Context,
        drill::DrillPlan,
        plan::{BackupPlan, OpFuture, RestorePlan, VerifyPlan},
    },
    retention,
    runner::{Interrupted, Runner},
    schedule::ScheduleHandle,
};

/// The agent's gRPC service.
#[derive(Debug, Clone)]
pub(crate) struct AgentService {
    ctx: Arc<Context>,
    jobs: Arc<Jobs>,
    runner: Runner,
    schedules: Vec<ScheduleHandle>,
}

/// Failures `GetInfo` shows.
const RECENT_FAILURES: usize = 5;
/// Most backups one `ListBackups` answer carries.
const MAX_PAGE_SIZE: usize = 1000;
/// How long `GetInfo` waits for the store (the recent failures); a store that retries or
/// hangs must not keep status from answering.
const STATUS_STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::OperationEvent, Status>> + Send>>;

impl AgentService {
    /// A service running its operations through `runner`; `schedules` are reported by GetInfo.
    pub(crate) fn new(runner: Runner, schedules: Vec<ScheduleHandle>) -> Self {
        Self {
            ctx: runner.ctx().clone(),
            jobs: runner.jobs().clone(),
            runner,
            schedules,
        }
    }

    /// Claims `info`, then runs `op` as a job whose progress and result stream to the client.
    fn start(
        &self,
        info: JobInfo,
        span: tracing::Span,
        interrupted: Interrupted,
        op: impl FnOnce(Arc<Context>, Reporter) -> OpFuture,
    ) -> Result<Response<EventStream>, Status> {
        let events = self
            .runner
            .start(info, span, interrupted, Trigger::Client, op)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(events))))
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
        let (info, span) = (plan.job(), plan.span());
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
        let (info, span, interrupted) = (plan.job(), plan.span(), plan.interrupted());
        self.start(info, span, interrupted, |ctx, reporter| {
            plan.run(ctx, reporter)
        })
    }

    async fn verify(
        &self,
        request: Request<v1::VerifyRequest>,
    ) -> Result<Response<Self::VerifyStream>, Status> {
        let plan = VerifyPlan::from_request(&self.ctx, request.into_inner()).await?;
        let (info, span) = (plan.job(), plan.span());
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
        let (info, span) = (plan.job(), plan.span());
        let interrupted = Interrupted::DrillScratch(plan.scratch.clone());
        self.start(info, span, interrupted, |ctx, reporter| {
            plan.run(ctx, reporter)
        })
    }

    async fn prune(
        &self,
        request: Request<v1::PruneRequest>,
    ) -> Result<Response<v1::PruneResponse>, Status> {
        let request = request.into_inner();
        let policy =
            retention::Policy::for_request(self.ctx.retention.as_ref(), request.policy.as_ref())
                .map_err(|e| e.to_status())?;
        let span = tracing::info_span!("prune", dry_run = request.dry_run, policy = %policy);
        let report = self
            .runner
            .prune(&policy, request.dry_run, &Trigger::Client)
            .instrument(span)
            .await?;
        Ok(Response::new(report.to_proto()))
    }

    async fn list_failures(
        &self,
        request: Request<v1::ListFailuresRequest>,
    ) -> Result<Response<v1::ListFailuresResponse>, Status> {
        let limit = request.into_inner().limit as usize;
        let failures = self
            .runner
            .failures()
            .list(limit)
            .await
            .map_err(OpError::from)?;
        Ok(Response::new(v1::ListFailuresResponse {
            failures: failures.iter().map(|f| f.to_proto()).collect(),
        }))
    }

    async fn list_backups(
        &self,
        request: Request<v1::ListBackupsRequest>,
    ) -> Result<Response<v1::ListBackupsResponse>, Status> {
        let request = request.into_inner();
        // Pages are cut from the ids alone (one store listing), so a page reads only its own
        // manifests, however many backups the store holds.
        let ids = self.ctx.source.ids().await.map_err(OpError::from)?;
        // The token is the id of the last backup of the previous page: the page starts at the
        // first older id, whether or not that backup still exists.
        let start = if request.page_token.is_empty() {
            0
        } else {
            let token = crate::catalog::BackupId::parse(&request.page_token).map_err(|_| {
                Status::invalid_argument(format!(
                    "page token {:?} is not a backup id; list again from the start",
                    output_safe(&request.page_token)
                ))
            })?;
            ids.partition_point(|id| *id >= token)
        };
        let size = match request.page_size {
            0 => ids.len(),
            n => (n as usize).min(MAX_PAGE_SIZE),
        };
        let page = &ids[start..ids.len().min(start.saturating_add(size))];
        let listing = self.ctx.source.read(page).await.map_err(OpError::from)?;
        let mut windows = ops::physical::Windows::new(&self.ctx.source);
        let mut backups = Vec::with_capacity(listing.manifests.len());
        for m in &listing.manifests {
            let mut info = convert::backup_info(m);
            info.recovery_window = windows.of(m).await.map(convert::recovery_window);
            backups.push(info);
        }
        let next_page_token = match page.last() {
            Some(last) if start + page.len() < ids.len() => last.to_string(),
            _ => String::new(),
        };
        let unreadable = listing
            .unreadable
            .into_iter()
            .map(|u| v1::UnreadableBackup {
                id: u.id.to_string(),
                reason: u.reason,
            })
            .collect();
        Ok(Response::new(v1::ListBackupsResponse {
            backups,
            unreadable,
            next_page_token,
        }))
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
        let qdrant_cluster = match &self.ctx.qdrant {
            Some(q) => crate::ops::qdrant::cluster_view::ClusterView::read(q)
                .await
                .map(convert::qdrant_cluster),
            None => None,
        };
        Ok(Response::new(v1::AgentInfo {
            qdrant_cluster,
            wal_archive,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            engines,
            store: self.ctx.catalog.store().location(),
            encryption: self.ctx.catalog.store().encryption().to_string(),
            store_health: self
                .ctx
                .catalog
                .store()
                .health()
                .map(|h| convert::store_health(&h.report())),
            last_recovery: self.ctx.replay.get().map(|r| convert::recovery_end(&r)),
            restore_from: Some(self.ctx.source.store().location())
                .filter(|source| *source != self.ctx.catalog.store().location())
                .unwrap_or_default(),
            running_jobs: self
                .jobs
                .running()
                .into_iter()
                .map(convert::job_info)
                .collect(),
            schedules: self.schedules.iter().map(ScheduleHandle::status).collect(),
            retention: self
                .ctx
                .retention
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            // Best effort: an unreadable store already shows in `store_health`, and status must
            // answer while the store retries.
            recent_failures: tokio::time::timeout(
                STATUS_STORE_WAIT,
                self.runner.failures().list(RECENT_FAILURES),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .map(|f| f.iter().map(|f| f.to_proto()).collect())
            .unwrap_or_default(),
        }))
    }
}

/// A client's string quoted back in an error, shortened and without control characters.
fn output_safe(text: &str) -> String {
    text.chars()
        .take(80)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}
