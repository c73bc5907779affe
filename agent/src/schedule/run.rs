//! The schedule tasks: wait for the cron time, run the action through the runner, record the run.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use soma_proto::v1;
use tokio_util::sync::CancellationToken;

use super::{Action, RunResult, Schedule, ScheduleHandle, ScheduleState};
use crate::{
    error::OpError,
    failures::Trigger,
    jobs::{JobInfo, Operation},
    metrics::ScheduleLabels,
    ops::{
        Context,
        drill::DrillPlan,
        plan::{BackupPlan, VerifyPlan},
    },
    owner::OwnerId,
    runner::{Interrupted, Runner},
};

/// Missed cron times counted after a long run, at most (a per-second schedule after an hour-long
/// backup must not spin).
const MAX_COUNTED_MISSES: u64 = 10_000;
/// Backups looked at, newest first, for one a scheduled drill can drill.
const MAX_DRILL_CANDIDATES: usize = 50;
/// The persisted state of a schedule is never larger than this.
const MAX_STATE_BYTES: usize = 4096;

/// How schedules run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The time zone cron expressions are read in.
    pub timezone: Tz,
    /// The longest random delay added to a cron time (capped at a tenth of the interval), so many
    /// agents on one schedule do not hit the store at the same second.
    pub jitter: Duration,
    /// Whose runs these are: the persisted last runs are per owner.
    pub owner: OwnerId,
}

/// Refuses schedules this agent cannot run, naming the flag that is missing.
pub(crate) fn validate(schedules: &[Schedule], ctx: &Context) -> Result<(), String> {
    for s in schedules {
        let spec = s.spec();
        let missing = match s.action {
            Action::BackupPostgres | Action::BackupPhysical if ctx.postgres.is_none() => {
                Some("--postgres-url (SOMA_POSTGRES_URL)")
            }
            Action::BackupQdrant if ctx.qdrant.is_none() => Some("--qdrant-url (SOMA_QDRANT_URL)"),
            Action::Backup if ctx.postgres.is_none() && ctx.qdrant.is_none() => {
                Some("--postgres-url or --qdrant-url")
            }
            Action::Prune if ctx.retention.is_none() => Some("--retention (SOMA_RETENTION)"),
            _ => None,
        };
        if let Some(flag) = missing {
            return Err(format!("schedule {spec:?} needs {flag}"));
        }
        if s.action.writes() && ctx.catalog.store().is_read_only() {
            return Err(format!(
                "schedule {spec:?} writes to --store, which --store-read-only forbids"
            ));
        }
    }
    Ok(())
}

/// Starts one task per schedule; they stop when `shutdown` is cancelled (a run in progress is
/// interrupted like any job).
pub(crate) fn spawn(
    schedules: Vec<Schedule>,
    runner: Runner,
    options: Options,
    shutdown: CancellationToken,
) -> Vec<ScheduleHandle> {
    schedules
        .into_iter()
        .map(|schedule| {
            let handle = ScheduleHandle {
                schedule: Arc::new(schedule),
                timezone: options.timezone,
                state: Arc::new(Mutex::new(ScheduleState::default())),
            };
            let task = Task {
                handle: handle.clone(),
                runner: runner.clone(),
                options: options.clone(),
            };
            let span = tracing::info_span!("schedule", schedule = %handle.schedule.spec());
            tokio::spawn(tracing::Instrument::instrument(
                task.run(shutdown.clone()),
                span,
            ));
            handle
        })
        .collect()
}

/// What the store keeps of a schedule between agent runs.
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    schedule: String,
    last_run: DateTime<Utc>,
}

struct Task {
    handle: ScheduleHandle,
    runner: Runner,
    options: Options,
}

/// How one run ended.
enum Ran {
    Done(String),
    Failed(String),
    Skipped(String),
}

impl Task {
    fn state(&self) -> std::sync::MutexGuard<'_, ScheduleState> {
        self.handle.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn labels(&self) -> ScheduleLabels {
        ScheduleLabels {
            action: self.handle.schedule.action.as_str().into(),
            cron: self.handle.schedule.cron_text.clone(),
        }
    }

    fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.handle.schedule.next_after(t, self.options.timezone)
    }

    /// The store key of the persisted last run: per owner and schedule, hashed because owner ids
    /// and cron expressions are not safe key parts.
    fn state_key(&self) -> String {
        let hash = |s: &str| hex::encode(&Sha256::digest(s.as_bytes())[..8]);
        format!(
            "schedules/{}/{}.json",
            hash(self.options.owner.as_str()),
            hash(&self.handle.schedule.spec())
        )
    }

    async fn load_last_run(&self) -> Option<DateTime<Utc>> {
        let store = self.runner.ctx().catalog.store();
        let mut stream = store.get(&self.state_key()).await.ok()?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.try_next().await.ok()? {
            if body.len() + chunk.len() > MAX_STATE_BYTES {
                return None;
            }
            body.extend_from_slice(&chunk);
        }
        let p: Persisted = serde_json::from_slice(&body).ok()?;
        (p.schedule == self.handle.schedule.spec()).then_some(p.last_run)
    }

    async fn save_last_run(&self, at: DateTime<Utc>) {
        let store = self.runner.ctx().catalog.store();
        if store.is_read_only() {
            return;
        }
        let p = Persisted {
            schedule: self.handle.schedule.spec(),
            last_run: at,
        };
        let body = serde_json::to_vec(&p).expect("schedule state serialises");
        if let Err(e) = store.put(&self.state_key(), Bytes::from(body)).await {
            tracing::warn!(error = %e, "could not record the schedule's last run; a restart may run it again");
        }
    }

    /// A random delay of at most the configured jitter and a tenth of the gap to the following run.
    fn jitter(&self, next: DateTime<Utc>) -> Duration {
        let gap = self
            .next_after(next)
            .and_then(|after| (after - next).to_std().ok())
            .unwrap_or_default();
        let max = self.options.jitter.min(gap / 10);
        Duration::from_millis(rand::random_range(0..=max.as_millis() as u64))
    }

    async fn run(self, shutdown: CancellationToken) {
        let labels = self.labels();
        let now = Utc::now();
        // A cron time passed between the last recorded run and now: the agent was down then.
        let mut catch_up = self
            .load_last_run()
            .await
            .and_then(|last| self.next_after(last))
            .is_some_and(|missed| missed <= now);
        if catch_up {
            tracing::info!("a run was missed while the agent was down: running it now");
        }
        loop {
            let now = Utc::now();
            let Some(next) = self.next_after(now) else {
                tracing::error!("the cron expression has no future time; this schedule stops");
                return;
            };
            self.state().next_run = Some(next);
            self.runner.metrics().schedule_next(&labels, next);
            let (due, scheduled) = if std::mem::take(&mut catch_up) {
                (now, now)
            } else {
                (next + self.jitter(next), next)
            };
            let wait = (due - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            let started = Utc::now();
            self.state().last_run = Some(started);
            let ran = self.execute().await;
            {
                let mut state = self.state();
                match ran {
                    Ran::Done(id) => {
                        state.last_result = Some(RunResult::Succeeded);
                        state.last_error.clear();
                        state.last_backup_id = id;
                    }
                    Ran::Failed(e) => {
                        state.last_result = Some(RunResult::Failed);
                        state.last_error = e;
                        state.failed += 1;
                    }
                    Ran::Skipped(why) => {
                        tracing::warn!(reason = %why, "scheduled run skipped");
                        state.last_result = Some(RunResult::Skipped);
                        state.last_error = why;
                        state.skipped += 1;
                        self.runner.metrics().schedule_skipped(&labels);
                    }
                }
            }
            self.save_last_run(started).await;
            // Cron times that passed while this run was going: skipped, not queued.
            let missed = self.missed_between(scheduled, Utc::now());
            if missed > 0 {
                tracing::warn!(
                    missed,
                    "the run outlasted the schedule's interval; the cron times it covered are skipped"
                );
                self.state().skipped += missed;
                for _ in 0..missed {
                    self.runner.metrics().schedule_skipped(&labels);
                }
            }
        }
    }

    fn missed_between(&self, scheduled: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
        let mut n = 0;
        let mut t = scheduled;
        while n < MAX_COUNTED_MISSES {
            match self.next_after(t) {
                Some(next) if next < now => {
                    n += 1;
                    t = next;
                }
                _ => break,
            }
        }
        n
    }

    fn trigger(&self) -> Trigger {
        Trigger::Schedule(self.handle.schedule.spec())
    }

    async fn execute(&self) -> Ran {
        let action = self.handle.schedule.action;
        match action {
            Action::Backup
            | Action::BackupPostgres
            | Action::BackupPhysical
            | Action::BackupQdrant => self.backup(action).await,
            Action::VerifyLatest => self.verify_latest().await,
            Action::Prune => self.prune().await,
            Action::Drill => self.drill().await,
        }
    }

    /// Records a run that failed before it could start as a job.
    async fn failed_to_start(&self, operation: Operation, e: OpError) -> Ran {
        let job = JobInfo::new("", operation, Vec::new(), Vec::new());
        let error = e.to_string();
        self.runner.failed(&job, &error, &self.trigger()).await;
        Ran::Failed(error)
    }

    /// Waits for a started job; a target another job holds is a skip, not a failure.
    async fn follow(&self, started: Result<crate::runner::Events, OpError>) -> Ran {
        match started {
            Err(OpError::Busy(busy)) => Ran::Skipped(busy.to_string()),
            Err(e) => Ran::Failed(e.to_string()),
            Ok(events) => match Runner::outcome(events).await {
                // A drill that ran but did not pass is a failed run.
                Ok(v1::OperationResult {
                    drill: Some(report),
                    ..
                }) if !report.passed => Ran::Failed(report.failure),
                Ok(result) => Ran::Done(result.backup.map(|b| b.id).unwrap_or_default()),
                Err(status) => Ran::Failed(status.message().to_string()),
            },
        }
    }

    async fn backup(&self, action: Action) -> Ran {
        let request = match action {
            Action::Backup => v1::BackupRequest {
                all: true,
                ..Default::default()
            },
            Action::BackupQdrant => v1::BackupRequest {
                engine: v1::Engine::Qdrant as i32,
                ..Default::default()
            },
            _ => v1::BackupRequest {
                engine: v1::Engine::Postgres as i32,
                physical: action == Action::BackupPhysical,
                all_databases: action == Action::BackupPostgres,
                ..Default::default()
            },
        };
        let plan = match BackupPlan::from_request(self.runner.ctx(), request, Utc::now()) {
            Ok(plan) => plan,
            Err(e) => return self.failed_to_start(Operation::Backup, e).await,
        };
        let (job, span, ids) = (plan.job(), plan.span(), plan.ids());
        let started = self.runner.start(
            job,
            span,
            Interrupted::Abandon(ids),
            self.trigger(),
            |ctx, reporter| plan.run(ctx, reporter),
        );
        self.follow(started).await
    }

    async fn prune(&self) -> Ran {
        let Some(policy) = self.runner.ctx().retention.clone() else {
            // validate() refuses a prune schedule without a policy; kept for safety.
            return Ran::Failed("no retention policy (--retention)".into());
        };
        match self.runner.prune(&policy, false, &self.trigger()).await {
            Ok(report) => Ran::Done(format!("{} object(s) deleted", report.objects_deleted)),
            Err(OpError::Busy(busy)) => Ran::Skipped(busy.to_string()),
            Err(e) => Ran::Failed(e.to_string()),
        }
    }

    /// Drills the newest backup this agent can drill (a Qdrant storage snapshot, or a backup of
    /// an engine this agent does not run, is passed over for the next newest).
    async fn drill(&self) -> Ran {
        let ctx = self.runner.ctx();
        let manifests = match ctx.source.list().await {
            Ok(m) => m,
            Err(e) => return self.failed_to_start(Operation::Drill, e.into()).await,
        };
        let mut refused = None;
        let mut plan = None;
        for m in manifests.iter().take(MAX_DRILL_CANDIDATES) {
            let request = v1::DrillRequest {
                backup_id: m.id.to_string(),
                engine: 0,
            };
            match DrillPlan::from_request(ctx, request).await {
                Ok(p) => {
                    plan = Some(p);
                    break;
                }
                Err(e) => refused = refused.or(Some(e)),
            }
        }
        let Some(plan) = plan else {
            let e = refused.unwrap_or(OpError::Catalog(crate::catalog::CatalogError::NoBackups));
            return self.failed_to_start(Operation::Drill, e).await;
        };
        let (job, span) = (plan.job(), plan.span());
        let interrupted = Interrupted::DrillScratch(plan.scratch.clone());
        let started = self
            .runner
            .start(job, span, interrupted, self.trigger(), |ctx, reporter| {
                plan.run(ctx, reporter)
            });
        self.follow(started).await
    }

    async fn verify_latest(&self) -> Ran {
        let request = v1::VerifyRequest {
            backup_id: "latest".into(),
            engine: 0,
        };
        let plan = match VerifyPlan::from_request(self.runner.ctx(), request).await {
            Ok(plan) => plan,
            Err(e) => return self.failed_to_start(Operation::Verify, e).await,
        };
        let (job, span) = (plan.job(), plan.span());
        let started = self.runner.start(
            job,
            span,
            Interrupted::Nothing,
            self.trigger(),
            |ctx, reporter| plan.run(ctx, reporter),
        );
        self.follow(started).await
    }
}
