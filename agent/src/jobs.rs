//! Operations run as jobs: at most one per target, detached from the client that started them.
//!
//! A job is a task of the registry's join set, so a client that disconnects (a closed laptop, a
//! killed port-forward) does not stop a backup halfway; the client merely stops seeing progress.
//! The registry refuses a second job on a target that already has one, and a delete of a backup
//! another job reads, naming the running job. On shutdown every job is interrupted and cleans up
//! after itself, and the agent waits for that before it exits.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use soma_proto::v1::{self, OperationEvent, operation_event::Event};
use tokio::sync::mpsc;
use tonic::Status;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{catalog::BackupId, error::OpError, pipeline::Counters};

/// How often progress is sent to the client.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Events buffered for a slow client before progress ticks are dropped (results are never dropped
/// while the client is connected).
pub(crate) const EVENT_QUEUE: usize = 16;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    /// Writes a new backup.
    Backup,
    /// Restores a backup into a target.
    Restore,
    /// Re-reads a backup.
    Verify,
    /// Deletes a backup (and WAL only it needed).
    Delete,
    /// Restores a backup into a scratch target and validates it.
    Drill,
    /// Applies the retention policy.
    Prune,
}

impl Operation {
    /// The word used in messages and `GetInfo`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Backup => "backup",
            Operation::Restore => "restore",
            Operation::Verify => "verify",
            Operation::Delete => "delete",
            Operation::Drill => "drill",
            Operation::Prune => "prune",
        }
    }
}

/// What a job holds exclusively: two jobs on one target never run at once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum JobTarget {
    /// One PostgreSQL database (logical backup or restore).
    Database(String),
    /// The whole PostgreSQL cluster (base backup).
    Cluster,
    /// The Qdrant server.
    Qdrant,
    /// A data directory a physical restore writes.
    Pgdata(std::path::PathBuf),
    /// One backup (verify and delete).
    Backup(BackupId),
}

impl std::fmt::Display for JobTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobTarget::Database(db) => write!(f, "postgres/{db}"),
            JobTarget::Cluster => f.write_str("postgres/cluster"),
            JobTarget::Qdrant => f.write_str("qdrant"),
            JobTarget::Pgdata(dir) => write!(f, "pgdata/{}", dir.display()),
            JobTarget::Backup(id) => write!(f, "backup/{id}"),
        }
    }
}

/// A running job, as `GetInfo` reports it.
#[derive(Debug, Clone)]
pub(crate) struct JobInfo {
    /// Operation id (the backup id for backups).
    pub id: String,
    /// What it does.
    pub operation: Operation,
    /// The targets it holds.
    pub targets: Vec<JobTarget>,
    /// Backups it reads (restore, verify) or deletes (delete): a delete never runs while another
    /// job uses one of its backups, and no job starts on a backup being deleted.
    pub uses: Vec<BackupId>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// What it is about, for failure records and metrics: engine, target and kind (empty when
    /// not known before it runs).
    pub about: About,
}

/// The engine, target and kind an operation is about, as failure records and metric labels name
/// them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct About {
    /// "postgres", "qdrant" or "set".
    pub engine: String,
    /// The database, collection(s), "cluster" or "all".
    pub target: String,
    /// The backup kind, e.g. "logical" or "physical".
    pub kind: String,
}

impl JobInfo {
    /// A job starting now.
    pub(crate) fn new(
        id: impl Into<String>,
        operation: Operation,
        targets: Vec<JobTarget>,
        uses: Vec<BackupId>,
    ) -> Self {
        Self {
            id: id.into(),
            operation,
            targets,
            uses,
            started_at: Utc::now(),
            about: About::default(),
        }
    }

    /// Records what the job is about.
    pub(crate) fn about(mut self, engine: &str, target: &str, kind: &str) -> Self {
        self.about = About {
            engine: engine.into(),
            target: target.into(),
            kind: kind.into(),
        };
        self
    }

    /// Why `self` cannot start while `running` runs, if it cannot.
    fn conflict(&self, running: &JobInfo) -> Option<String> {
        if let Some(t) = self.targets.iter().find(|t| running.targets.contains(t)) {
            return Some(t.to_string());
        }
        let deletes = |op| matches!(op, Operation::Delete | Operation::Prune);
        if (deletes(self.operation) || deletes(running.operation))
            && let Some(id) = self.uses.iter().find(|id| running.uses.contains(id))
        {
            return Some(format!("backup {id}"));
        }
        None
    }
}

/// Why a job cannot start now.
#[derive(Debug, thiserror::Error)]
pub enum Busy {
    /// Another job holds what a new one needs.
    #[error(
        "{what} is busy: a {operation} is already running (job {job}, started {started}); wait for it to finish, then try again"
    )]
    Held {
        /// The target or backup both need.
        what: String,
        /// The running job's operation.
        operation: &'static str,
        /// The running job's id.
        job: String,
        /// When it started.
        started: String,
    },
    /// The agent already runs as many operations as it may.
    #[error(
        "the agent already runs {limit} operation(s), its limit (--max-operations): {running}; wait for one to finish, then try again"
    )]
    Full {
        /// The limit.
        limit: usize,
        /// What runs, for the message.
        running: String,
    },
}

/// The registry of running jobs, and the tasks running them.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    running: Mutex<HashMap<u64, JobInfo>>,
    /// Most jobs at once (0: no limit), so whoever can call the agent cannot make it start
    /// unbounded work against the databases and the store.
    limit: usize,
    next: std::sync::atomic::AtomicU64,
    tasks: Mutex<tokio::task::JoinSet<()>>,
    shutdown: CancellationToken,
}

/// Holds a job's claims until dropped.
#[derive(Debug)]
pub(crate) struct JobGuard {
    jobs: Arc<Jobs>,
    key: u64,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs
            .running
            .lock()
            .expect("jobs lock")
            .remove(&self.key);
    }
}

impl Jobs {
    /// A registry whose jobs stop when `shutdown` is cancelled.
    pub(crate) fn new(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            ..Default::default()
        }
    }

    /// At most `limit` jobs at once (0: no limit).
    pub(crate) fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Claims everything `info` needs, or explains which job holds it (or that the agent runs
    /// as many jobs as it may).
    pub(crate) fn begin(self: &Arc<Self>, info: JobInfo) -> Result<JobGuard, Busy> {
        let mut running = self.running.lock().expect("jobs lock");
        if self.limit > 0 && running.len() >= self.limit {
            let mut jobs: Vec<&JobInfo> = running.values().collect();
            jobs.sort_by_key(|j| j.started_at);
            return Err(Busy::Full {
                limit: self.limit,
                running: jobs
                    .iter()
                    .map(|j| format!("{} {}", j.operation.as_str(), j.id))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if let Some((what, current)) = running
            .values()
            .find_map(|r| info.conflict(r).map(|what| (what, r)))
        {
            return Err(Busy::Held {
                what,
                operation: current.operation.as_str(),
                job: current.id.clone(),
                started: current
                    .started_at
                    .format("%Y-%m-%d %H:%M:%S UTC")
                    .to_string(),
            });
        }
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        running.insert(key, info);
        Ok(JobGuard {
            jobs: self.clone(),
            key,
        })
    }

    /// Jobs running now.
    pub(crate) fn running(&self) -> Vec<JobInfo> {
        let mut jobs: Vec<_> = self
            .running
            .lock()
            .expect("jobs lock")
            .values()
            .cloned()
            .collect();
        jobs.sort_by_key(|j| j.started_at);
        jobs
    }

    /// Runs `op` as a task of this registry: detached from the client (a disconnect does not stop
    /// it) but not from the agent — on shutdown `op` is dropped (its tools are killed on drop) and
    /// `interrupted` runs instead, to abort what it left half-written and tell the client.
    pub(crate) fn spawn<F, C>(&self, span: tracing::Span, op: F, interrupted: C)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
        C: std::future::Future<Output = ()> + Send + 'static,
    {
        let shutdown = self.shutdown.clone();
        let mut tasks = self.tasks.lock().expect("tasks lock");
        // Reap finished tasks so the set does not grow with the agent's lifetime.
        while tasks.try_join_next().is_some() {}
        tasks.spawn(
            async move {
                tokio::select! {
                    () = op => {}
                    () = shutdown.cancelled() => {
                        tracing::warn!("the agent is shutting down: operation interrupted");
                        interrupted.await;
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Waits for every job task to end (after shutdown was signalled, they end promptly).
    pub(crate) async fn drain(&self) {
        let mut tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        while tasks.join_next().await.is_some() {}
    }
}

/// Sends a job's progress to its client, if the client is still there.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    tx: mpsc::Sender<Result<OperationEvent, Status>>,
    state: Arc<ReporterState>,
}

#[derive(Debug)]
struct ReporterState {
    counters: Arc<Counters>,
    started: Instant,
    phase: Mutex<(String, String)>,
    operation_id: Mutex<String>,
    expected_raw: std::sync::atomic::AtomicU64,
}

impl Reporter {
    /// A reporter sending to `tx`, ticking every [`PROGRESS_EVERY`] until the job ends.
    pub(crate) fn start(tx: mpsc::Sender<Result<OperationEvent, Status>>) -> Self {
        let reporter = Self {
            tx,
            state: Arc::new(ReporterState {
                counters: Arc::new(Counters::default()),
                started: Instant::now(),
                phase: Mutex::new(("starting".into(), String::new())),
                operation_id: Mutex::new(String::new()),
                expected_raw: Default::default(),
            }),
        };
        let ticker = reporter.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(PROGRESS_EVERY);
            every.tick().await;
            loop {
                every.tick().await;
                // Stops once the job dropped every other clone of the state.
                if Arc::strong_count(&ticker.state) <= 1 || ticker.tx.is_closed() {
                    break;
                }
                ticker.send_progress();
            }
        });
        reporter
    }

    /// The byte counters the pipeline updates.
    pub(crate) fn counters(&self) -> Arc<Counters> {
        self.state.counters.clone()
    }

    /// Records the operation id (e.g. the new backup id) shown with every event.
    pub(crate) fn set_operation_id(&self, id: &str) {
        *self.state.operation_id.lock().expect("lock") = id.to_string();
    }

    /// Records the expected raw size, when known, so clients can show a percentage.
    pub(crate) fn set_expected_raw(&self, bytes: u64) {
        self.state.expected_raw.store(bytes, Ordering::Relaxed);
    }

    /// Enters a new phase and tells the client at once.
    pub(crate) fn phase(&self, phase: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(phase, "{message}");
        *self.state.phase.lock().expect("lock") = (phase.to_string(), message);
        self.send_progress();
    }

    fn send_progress(&self) {
        let (phase, message) = self.state.phase.lock().expect("lock").clone();
        let raw = self.state.counters.raw.load(Ordering::Relaxed);
        let secs = self.state.started.elapsed().as_secs_f64();
        let event = OperationEvent {
            event: Some(Event::Progress(v1::Progress {
                operation_id: self.state.operation_id.lock().expect("lock").clone(),
                phase,
                raw_bytes: raw,
                stored_bytes: self.state.counters.stored.load(Ordering::Relaxed),
                raw_bytes_per_second: if secs > 0.0 { raw as f64 / secs } else { 0.0 },
                expected_raw_bytes: self.state.expected_raw.load(Ordering::Relaxed),
                message,
            })),
        };
        // A slow or gone client misses ticks; the job never waits for it.
        let _ = self.tx.try_send(Ok(event));
    }

    /// Seconds since the job started.
    pub(crate) fn elapsed(&self) -> f64 {
        self.state.started.elapsed().as_secs_f64()
    }

    /// Ends the stream with the result or the error.
    pub(crate) async fn finish(self, result: Result<v1::OperationResult, OpError>) {
        let item = match result {
            Ok(r) => Ok(OperationEvent {
                event: Some(Event::Result(r)),
            }),
            Err(e) => {
                tracing::error!(error = %crate::error::render(&e), "operation failed");
                Err(e.to_status())
            }
        };
        // If the client left, nobody is waiting for the result; the log has it.
        let _ = self.tx.send(item).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> BackupId {
        BackupId::parse(s).unwrap()
    }

    #[test]
    fn no_more_jobs_than_the_limit() {
        let jobs = Arc::new(Jobs::default().with_limit(2));
        let db = |name: &str| vec![JobTarget::Database(name.into())];
        let a = jobs
            .begin(JobInfo::new("a", Operation::Backup, db("one"), vec![]))
            .unwrap();
        let _b = jobs
            .begin(JobInfo::new("b", Operation::Backup, db("two"), vec![]))
            .unwrap();
        let err = jobs
            .begin(JobInfo::new("c", Operation::Backup, db("three"), vec![]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--max-operations") && err.contains("backup a"),
            "{err}"
        );
        drop(a);
        jobs.begin(JobInfo::new("c", Operation::Backup, db("three"), vec![]))
            .unwrap();
    }

    #[test]
    fn one_job_per_target() {
        let jobs = Arc::new(Jobs::default());
        let db = |name: &str| vec![JobTarget::Database(name.into())];
        let first = jobs
            .begin(JobInfo::new("a", Operation::Backup, db("appdb"), vec![]))
            .unwrap();
        let err = jobs
            .begin(JobInfo::new("b", Operation::Restore, db("appdb"), vec![]))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("a backup is already running (job a"),
            "{err}"
        );
        let _other = jobs
            .begin(JobInfo::new("c", Operation::Backup, db("other"), vec![]))
            .unwrap();
        assert_eq!(jobs.running().len(), 2);
        drop(first);
        assert!(
            jobs.begin(JobInfo::new("d", Operation::Backup, db("appdb"), vec![]))
                .is_ok()
        );
    }

    #[test]
    fn a_backup_in_use_cannot_be_deleted_and_a_deleted_one_cannot_be_used() {
        let jobs = Arc::new(Jobs::default());
        let b = id("20261124T120000Z-pg-appdb-7f3a");
        let other = id("20261124T120000Z-pg-appdb-0000");
        let restore = jobs
            .begin(JobInfo::new(
                b.as_str(),
                Operation::Restore,
                vec![JobTarget::Database("appdb".into())],
                vec![b.clone()],
            ))
            .unwrap();
        let delete = |i: &BackupId| {
            JobInfo::new(
                i.as_str(),
                Operation::Delete,
                vec![JobTarget::Backup(i.clone())],
                vec![i.clone()],
            )
        };
        let err = jobs.begin(delete(&b)).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("backup {b} is busy: a restore")),
            "{err}"
        );
        let deleting_other = jobs.begin(delete(&other)).unwrap();
        drop(restore);
        let deleting = jobs.begin(delete(&b)).unwrap();
        let err = jobs
            .begin(JobInfo::new(
                b.as_str(),
                Operation::Restore,
                vec![JobTarget::Database("x".into())],
                vec![b.clone()],
            ))
            .unwrap_err();
        assert!(
            err.to_string().contains("a delete is already running"),
            "{err}"
        );
        drop((deleting, deleting_other));
    }
}
