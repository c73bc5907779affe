//! Runs operations as jobs for either caller — a gRPC client or the agent's own scheduler — and
//! records how each ended: the metrics, and a failure record in the store when it failed or was
//! interrupted. One path for both callers, so a scheduled backup is the same backup a client
//! would have taken, claimed, reported and recorded the same way.

use std::sync::Arc;

use chrono::Utc;
use soma_proto::v1::{self, OperationEvent};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{
    catalog::BackupId,
    error::OpError,
    failures::{FailureRecord, Failures, Trigger},
    jobs::{EVENT_QUEUE, JobInfo, Jobs, Operation, Reporter},
    metrics::Metrics,
    ops::{self, Context, Outcome, plan::OpFuture},
    retention,
    server::convert,
};

/// How long writing a failure record may take before the client is told without it.
const RECORD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The events of one running operation: progress, then exactly one result or error.
pub(crate) type Events = mpsc::Receiver<Result<OperationEvent, Status>>;

/// What to do when the agent stops while a job runs.
#[derive(Debug)]
pub(crate) enum Interrupted {
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

/// Starts operations and records their ends.
#[derive(Debug, Clone)]
pub(crate) struct Runner {
    ctx: Arc<Context>,
    jobs: Arc<Jobs>,
    metrics: Arc<Metrics>,
    failures: Failures,
}

impl Runner {
    /// A runner over `ctx` whose jobs live in `jobs`; failures are recorded in the store this
    /// agent writes to.
    pub(crate) fn new(ctx: Arc<Context>, jobs: Arc<Jobs>, metrics: Arc<Metrics>) -> Self {
        let failures = Failures::new(ctx.catalog.store().clone());
        Self {
            ctx,
            jobs,
            metrics,
            failures,
        }
    }

    /// The agent's context.
    pub(crate) fn ctx(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The job registry.
    pub(crate) fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// The metrics.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The failure records.
    pub(crate) fn failures(&self) -> &Failures {
        &self.failures
    }

    /// Claims what `info` holds, then runs `op` as a job; its progress and result arrive on the
    /// returned receiver (dropping it does not stop the job). Fails at once, running nothing,
    /// when another job holds a target.
    pub(crate) fn start(
        &self,
        info: JobInfo,
        span: tracing::Span,
        interrupted: Interrupted,
        trigger: Trigger,
        op: impl FnOnce(Arc<Context>, Reporter) -> OpFuture,
    ) -> Result<Events, OpError> {
        let job = info.clone();
        let guard = self.jobs.begin(info)?;
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let reporter = Reporter::start(tx);
        let running = op(self.ctx.clone(), reporter.clone());
        let finisher = reporter.clone();
        let this = self.clone();
        let ended = trigger.clone();
        let record = job.clone();
        let work = async move {
            let result = running.await;
            let failure = match &result {
                Ok(outcome) => this.succeeded(&record, outcome).await,
                Err(e) => Some(crate::error::render(e)),
            };
            let result = result.map(|outcome| {
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
            // Release the claims before telling the client, so an immediate retry is accepted,
            // and record a failure before, so `list --failed` right after the error shows it.
            drop(guard);
            if let Some(error) = failure {
                this.failed(&record, &error, &ended).await;
            }
            reporter.finish(result).await;
        };
        let this = self.clone();
        let cleanup = async move {
            match interrupted {
                Interrupted::Abandon(ids) => {
                    for id in ids {
                        if let Err(e) = this.ctx.catalog.abandon(&id).await {
                            tracing::warn!(backup_id = %id, error = %e, "could not remove what the interrupted backup wrote; the next start-up sweeps its uploads");
                        }
                    }
                }
                Interrupted::ClearPgdata(req) => ops::physical::abandon_pgdata(&req).await,
                Interrupted::DrillScratch(scratch) => scratch.clean_up(&this.ctx).await,
                Interrupted::Nothing => {}
            }
            this.failed(&job, &OpError::ShuttingDown.to_string(), &trigger)
                .await;
            finisher.finish(Err(OpError::ShuttingDown)).await;
        };
        self.jobs.spawn(span, work, cleanup);
        Ok(rx)
    }

    /// Updates the metrics after a successful operation; returns why it counts as failed when
    /// it ran to the end but found a problem (a drill that did not pass).
    async fn succeeded(&self, job: &JobInfo, outcome: &Outcome) -> Option<String> {
        match job.operation {
            Operation::Backup | Operation::Delete | Operation::Prune => {
                let (metrics, catalog) = (self.metrics.clone(), self.ctx.catalog.clone());
                // Off the job's path: listing a large catalog must not delay the client's result.
                tokio::spawn(async move { metrics.refresh_catalog(&catalog).await });
                None
            }
            Operation::Verify => {
                self.metrics.verified(&outcome.manifest);
                None
            }
            Operation::Drill => match &outcome.drill {
                Some(report) if report.passed => {
                    self.metrics.drill_passed(
                        &outcome.manifest,
                        report.drilled_at,
                        report.rto_seconds,
                    );
                    None
                }
                Some(report) => Some(format!("the drill did not pass: {}", report.failure)),
                None => None,
            },
            Operation::Restore => None,
        }
    }

    /// Counts a failure and records it in the store (best effort: the log has it either way).
    pub(crate) async fn failed(&self, job: &JobInfo, error: &str, trigger: &Trigger) {
        self.metrics.failed(job.operation.as_str(), &job.about);
        let record = FailureRecord::new(
            job.operation.as_str(),
            &job.id,
            &job.about,
            job.started_at,
            error,
            trigger,
        );
        // Bounded: a store that does not answer must not hold the client's error back.
        match tokio::time::timeout(RECORD_TIMEOUT, self.failures.record(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not write the failure record to the store")
            }
            Err(_) => tracing::warn!("writing the failure record to the store timed out"),
        }
    }

    /// Applies `policy` (see [`retention::prune`]) and records the run: the metrics after a real
    /// run, a failure record when it fails or cannot delete everything it should.
    pub(crate) async fn prune(
        &self,
        policy: &retention::Policy,
        dry_run: bool,
        trigger: &Trigger,
    ) -> Result<retention::PruneReport, OpError> {
        let job = JobInfo::new("", Operation::Prune, Vec::new(), Vec::new());
        let result = retention::prune(&self.ctx, &self.jobs, policy, dry_run, Utc::now()).await;
        match &result {
            Ok(report) if !dry_run => {
                self.metrics.pruned(report.objects_deleted);
                self.metrics.refresh_catalog(&self.ctx.catalog).await;
                if !report.errors.is_empty() {
                    let error = format!(
                        "prune finished but could not delete everything: {}",
                        report.errors.join("; ")
                    );
                    self.failed(&job, &error, trigger).await;
                }
            }
            Ok(_) => {}
            // Another job holds what prune needs: nothing was done, nothing failed.
            Err(OpError::Busy(_)) => {}
            Err(e) => self.failed(&job, &crate::error::render(e), trigger).await,
        }
        result
    }

    /// Waits for the end of a job started with [`start`](Self::start): its result, or its error
    /// as the client would have seen it.
    pub(crate) async fn outcome(mut events: Events) -> Result<v1::OperationResult, Status> {
        while let Some(event) = events.recv().await {
            match event {
                Ok(OperationEvent {
                    event: Some(v1::operation_event::Event::Result(r)),
                }) => return Ok(r),
                Ok(_) => {}
                Err(status) => return Err(status),
            }
        }
        Err(Status::internal("the operation ended without a result"))
    }
}
