//! Operations run as jobs: at most one per target, detached from the client that started them.
//!
//! A job is a spawned task, so a client that disconnects (a closed laptop, a killed port-forward)
//! does not stop a backup halfway; the client merely stops seeing progress. The registry refuses a
//! second job on a target that already has one, naming the running job.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use soma_proto::v1::{self, OperationEvent, operation_event::Event};
use tokio::sync::mpsc;
use tonic::Status;

use crate::{error::OpError, pipeline::Counters};

/// How often progress is sent to the client.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// Events buffered for a slow client before progress ticks are dropped (results are never dropped
/// while the client is connected).
pub const EVENT_QUEUE: usize = 16;

/// A running job, as `GetInfo` reports it.
#[derive(Debug, Clone)]
pub struct JobInfo {
    /// Operation id (the backup id for backups).
    pub id: String,
    /// "backup", "restore" or "verify".
    pub operation: &'static str,
    /// The target it holds, e.g. "postgres/appdb".
    pub target: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
}

/// The registry of running jobs.
#[derive(Debug, Default)]
pub struct Jobs {
    running: Mutex<HashMap<String, JobInfo>>,
}

/// Holds a target until dropped.
#[derive(Debug)]
pub struct JobGuard {
    jobs: Arc<Jobs>,
    target: String,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.jobs
            .running
            .lock()
            .expect("jobs lock")
            .remove(&self.target);
    }
}

impl Jobs {
    /// Claims `info.target`, or explains which job holds it.
    pub fn begin(self: &Arc<Self>, info: JobInfo) -> Result<JobGuard, OpError> {
        let mut running = self.running.lock().expect("jobs lock");
        if let Some(current) = running.get(&info.target) {
            return Err(OpError::Busy(format!(
                "a {} of {} is already running (job {}, started {}); wait for it to finish, then try again",
                current.operation,
                current.target,
                current.id,
                current.started_at.format("%Y-%m-%d %H:%M:%S UTC"),
            )));
        }
        let target = info.target.clone();
        running.insert(target.clone(), info);
        Ok(JobGuard {
            jobs: self.clone(),
            target,
        })
    }

    /// Claims every target of `infos` or none of them.
    pub fn begin_all(self: &Arc<Self>, infos: Vec<JobInfo>) -> Result<Vec<JobGuard>, OpError> {
        infos.into_iter().map(|info| self.begin(info)).collect()
    }

    /// Jobs running now.
    pub fn running(&self) -> Vec<JobInfo> {
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
}

/// Sends a job's progress to its client, if the client is still there.
#[derive(Debug, Clone)]
pub struct Reporter {
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
    pub fn start(tx: mpsc::Sender<Result<OperationEvent, Status>>) -> Self {
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
    pub fn counters(&self) -> Arc<Counters> {
        self.state.counters.clone()
    }

    /// Records the operation id (e.g. the new backup id) shown with every event.
    pub fn set_operation_id(&self, id: &str) {
        *self.state.operation_id.lock().expect("lock") = id.to_string();
    }

    /// Records the expected raw size, when known, so clients can show a percentage.
    pub fn set_expected_raw(&self, bytes: u64) {
        self.state.expected_raw.store(bytes, Ordering::Relaxed);
    }

    /// Enters a new phase and tells the client at once.
    pub fn phase(&self, phase: &str, message: impl Into<String>) {
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
    pub fn elapsed(&self) -> f64 {
        self.state.started.elapsed().as_secs_f64()
    }

    /// Ends the stream with the result or the error.
    pub async fn finish(self, result: Result<v1::OperationResult, OpError>) {
        let item = match result {
            Ok(r) => Ok(OperationEvent {
                event: Some(Event::Result(r)),
            }),
            Err(e) => {
                tracing::error!(error = %e, "operation failed");
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

    #[test]
    fn one_job_per_target() {
        let jobs = Arc::new(Jobs::default());
        let info = |id: &str, target: &str| JobInfo {
            id: id.into(),
            operation: "backup",
            target: target.into(),
            started_at: Utc::now(),
        };
        let first = jobs.begin(info("a", "postgres/appdb")).unwrap();
        let err = jobs.begin(info("b", "postgres/appdb")).unwrap_err();
        assert!(err.to_string().contains("already running (job a"), "{err}");
        let _other = jobs.begin(info("c", "postgres/other")).unwrap();
        assert_eq!(jobs.running().len(), 2);
        drop(first);
        assert!(jobs.begin(info("d", "postgres/appdb")).is_ok());
    }
}
