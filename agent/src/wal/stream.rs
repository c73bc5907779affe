//! Continuous WAL archiving: `pg_receivewal` under the agent's supervision, shipping what it writes.
//!
//! pg_receivewal holds a physical replication slot, so the primary keeps every WAL segment until it
//! was received, and writes into the spool directory: complete segments under their own name, the
//! segment being received as `<name>.partial`. The agent ships complete segments (and timeline
//! history files) within a second of their appearance, and the partial segment every
//! `partial_interval` when it has grown, so the recovery point trails the primary by that interval
//! rather than by a whole segment. When pg_receivewal exits (the server went away, or restarts), the
//! partial segment is shipped at once, then the agent starts it again with a growing back-off.
//!
//! Local files are deleted once shipped, except the newest segment: pg_receivewal resumes from the
//! spool after a restart (the agent's or its own), and the slot holds everything after it, so a
//! restart loses no WAL. Re-shipping a file after a restart uploads nothing: objects are named by
//! their content's digest.
//!
//! **Shutdown.** The stream runs until its cancellation token fires (the agent got SIGTERM). It
//! then *drains*: it asks the server for its WAL flush position at that moment, lets pg_receivewal
//! run until it has flushed the WAL up to there (at most `drain_timeout`), stops it, and ships
//! every complete segment and the partial one. Everything the server had made durable when the
//! agent was told to stop is then in the archive, unless the timeout hit — then a warning names
//! the gap. A stream that is not receiving (server down, store refusing) just stops: its spool and
//! the slot keep what it has not shipped, and the next start ships it.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{WalArchive, WalError, drain, header::ServerWal, spool};
use crate::{
    engine::postgres::{PgError, Postgres, ToolProcess},
    error::Remedy,
    lsn::Lsn,
    pipeline::Settings,
    store::Store,
};

/// How often the spool is scanned for complete segments.
const SCAN_EVERY: Duration = Duration::from_millis(500);
/// Longest wait before pg_receivewal is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The file where the agent records pg_receivewal's pid, to stop one a killed agent left behind.
pub(super) const PID_FILE: &str = "soma-pg_receivewal.pid";

/// Why a WAL streaming session ended; each says what happens next, or has a [`Remedy`]. The
/// stream itself retries every one of them with back-off, so these reach the status and the log
/// (rendered with their causes and remedy by [`crate::error::render`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    /// The spool directory (or a file in it) cannot be used.
    #[error(
        "WAL spool {}: {source}",
        path.display()
    )]
    Spool {
        /// The directory or file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The server could not tell which cluster it is (typically: it is down or restarting).
    #[error(
        "cannot identify the PostgreSQL cluster whose WAL to archive: {source}; streaming starts again when the server answers"
    )]
    Identify {
        /// The error.
        source: PgError,
    },
    /// The replication slot could not be created.
    #[error("creating replication slot {slot}: {source}")]
    Slot {
        /// The slot.
        slot: String,
        /// The error.
        source: PgError,
    },
    /// pg_receivewal could not be started.
    #[error("starting pg_receivewal: {source}")]
    StartReceiver {
        /// The error.
        source: PgError,
    },
    /// pg_receivewal exited on its own: the connection ended (server stopped or restarted) or it
    /// failed; its last words are included.
    #[error(
        "pg_receivewal exited ({status}): {stderr}; streaming starts again with back-off, and the slot keeps the WAL on the server meanwhile"
    )]
    ReceiverExited {
        /// Its exit status.
        status: String,
        /// The last lines of its stderr.
        stderr: String,
    },
    /// A WAL file could not be shipped.
    #[error("shipping WAL file {file}: {source}")]
    Ship {
        /// The spool file.
        file: String,
        /// The error.
        source: WalError,
    },
    /// WAL a previous session left in the spool could not be shipped: receiving waits for it.
    #[error("receiving is paused until the WAL waiting in the spool can be shipped: {source}")]
    Leftover {
        /// Why shipping failed.
        source: Box<StreamError>,
    },
    /// Too many complete segments wait in the spool because the store refuses them.
    #[error(
        "{waiting} complete WAL segments wait in the spool and cannot be shipped ({source}); receiving is paused so the spool stops growing — the replication slot holds the WAL on the server (up to max_slot_wal_keep_size) until the store takes it again"
    )]
    SpoolFull {
        /// Complete segments not shipped.
        waiting: usize,
        /// The last shipping error.
        source: Box<StreamError>,
    },
}

impl StreamError {
    /// What the user can do, rendered into flags at the edge; `None` for what streaming
    /// recovers from by itself.
    pub(crate) fn remedy(&self) -> Option<Remedy> {
        match self {
            StreamError::Spool { .. } => Some(Remedy::WalSpool),
            StreamError::Slot { .. } => Some(Remedy::ReplicationUser),
            _ => None,
        }
    }
}

/// Settings of the WAL stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Directory pg_receivewal writes into; keep it across container restarts (an emptyDir).
    pub spool: PathBuf,
    /// Physical replication slot name.
    pub slot: String,
    /// How often the in-progress segment is shipped.
    pub partial_interval: Duration,
    /// Complete segments that may wait in the spool (the store refusing them) before receiving
    /// pauses, so the spool volume cannot fill up.
    pub max_unshipped: usize,
    /// How long a drain on shutdown waits for pg_receivewal to reach the server's flush position.
    pub drain_timeout: Duration,
}

impl StreamConfig {
    /// The longest a stream takes to stop once cancelled: waiting for the WAL, stopping
    /// pg_receivewal and shipping, each bounded, plus a second for everything else.
    pub fn stop_bound(&self) -> Duration {
        self.drain_timeout + drain::RECEIVER_STOP + drain::DRAIN_SHIP + Duration::from_secs(1)
    }
}

/// What the stream is doing, for `status` and the archive lag.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct StreamStatus {
    /// pg_receivewal is connected and running.
    pub receiving: bool,
    /// The cluster's system identifier (the archive's folder).
    pub system_id: String,
    /// Timeline being received.
    pub timeline: u32,
    /// WAL segment size.
    pub seg_size: u64,
    /// Archive position: everything before it is in the store.
    pub archived_lsn: Lsn,
    /// The last file shipped.
    pub last_file: String,
    /// When the last file was shipped.
    pub last_shipped_at: Option<DateTime<Utc>>,
    /// Complete segments shipped since the agent started.
    pub segments_shipped: u64,
    /// Partial segments shipped since the agent started.
    pub partials_shipped: u64,
    /// The last error, if the most recent attempt failed.
    pub last_error: Option<String>,
    /// Spool files moved aside since the agent started, because the server cannot have written
    /// them (another cluster's, a timeline or position past the server's, a damaged header).
    pub set_aside_files: u64,
    /// The most recent of them (at most [`spool::SET_ASIDE_SHOWN`]), oldest first: the file,
    /// why, and where it went.
    pub set_aside: Vec<String>,
}

/// Shared view of the stream's status.
pub(crate) type SharedStatus = Arc<Mutex<StreamStatus>>;

/// The status, even if a thread panicked while holding it (it holds plain counters).
pub(super) fn lock(status: &SharedStatus) -> MutexGuard<'_, StreamStatus> {
    status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running stream: its live status, and its task, which ends after the drain once the token
/// given to [`spawn`] is cancelled.
#[derive(Debug)]
pub(crate) struct StreamHandle {
    /// Live status.
    pub status: SharedStatus,
    /// The task; await it (bounded by [`StreamConfig::stop_bound`]) after cancelling.
    pub task: JoinHandle<()>,
}

/// Starts the stream in the background; it runs until `cancel` fires, then drains and ends.
pub(crate) fn spawn(
    config: StreamConfig,
    postgres: Postgres,
    store: Arc<dyn Store>,
    settings: Settings,
    cancel: CancellationToken,
) -> StreamHandle {
    let status: SharedStatus = Arc::default();
    let shared = status.clone();
    let span = tracing::info_span!("wal_stream", slot = %config.slot);
    let task =
        tokio::spawn(run(config, postgres, store, settings, shared, cancel).instrument(span));
    StreamHandle { status, task }
}

/// The supervisor: sessions of pg_receivewal, with back-off between them, until cancelled.
async fn run(
    config: StreamConfig,
    pg: Postgres,
    store: Arc<dyn Store>,
    settings: Settings,
    status: SharedStatus,
    cancel: CancellationToken,
) {
    if let Err(source) = tokio::fs::create_dir_all(&config.spool).await {
        let e = StreamError::Spool {
            path: config.spool.clone(),
            source,
        };
        tracing::error!(error = %crate::error::render(&e), "WAL streaming cannot start");
        lock(&status).last_error = Some(crate::error::render(&e));
        return;
    }
    spool::stop_leftover_receiver(&config.spool).await;
    let mut backoff = Duration::from_secs(1);
    while !cancel.is_cancelled() {
        let started = Instant::now();
        match session(&config, &pg, &store, &settings, &status, &cancel).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %crate::error::render(&e), retry_in = ?backoff, "WAL streaming interrupted");
                lock(&status).last_error = Some(crate::error::render(&e));
            }
        }
        lock(&status).receiving = false;
        // A session that ran for a while was healthy: its end is a new incident.
        if started.elapsed() > MAX_BACKOFF {
            backoff = Duration::from_secs(1);
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    lock(&status).receiving = false;
    tracing::info!("WAL stream stopped");
}

/// What ended the receiving loop of a session.
enum Ended {
    /// The token fired: drain.
    Cancelled,
    /// pg_receivewal exited on its own.
    Exited(std::io::Result<std::process::ExitStatus>),
    /// The spool is full of segments the store refuses.
    Paused(StreamError),
}

/// One pg_receivewal run: identify, ensure the slot, receive and ship until it exits (an error,
/// retried) or the token fires (drained, `Ok`).
async fn session(
    config: &StreamConfig,
    pg: &Postgres,
    store: &Arc<dyn Store>,
    settings: &Settings,
    status: &SharedStatus,
    cancel: &CancellationToken,
) -> Result<(), StreamError> {
    // Nothing is receiving yet, so a cancellation here has nothing to drain: the spool and the
    // slot keep whatever is not shipped. An upload cut short is aborted by the next start.
    let prepared = tokio::select! {
        biased;
        _ = cancel.cancelled() => return Ok(()),
        prepared = prepare(config, pg, store, settings, status) => prepared?,
    };
    let (mut shipper, mut receiver) = prepared;
    if let Some(pid) = receiver.id() {
        let _ = tokio::fs::write(config.spool.join(PID_FILE), pid.to_string()).await;
    }
    {
        let mut s = lock(status);
        s.receiving = true;
        s.last_error = None;
    }
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut partial = tokio::time::interval(config.partial_interval);
    partial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A shipment under way finishes before the token is looked at: it is never cut in half.
    let ended = loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break Ended::Cancelled,
            exit = receiver.exited() => break Ended::Exited(exit),
            _ = scan.tick() => {
                if let Err(e) = shipper.ship_complete().await {
                    tracing::warn!(error = %crate::error::render(&e), "shipping WAL failed; retrying");
                    lock(status).last_error = Some(crate::error::render(&e));
                    let waiting = shipper.unshipped().await;
                    if waiting >= config.max_unshipped {
                        break Ended::Paused(StreamError::SpoolFull { waiting, source: Box::new(e) });
                    }
                }
            }
            _ = partial.tick() => {
                if let Err(e) = shipper.ship_partial(false).await {
                    tracing::warn!(error = %crate::error::render(&e), "shipping the partial WAL segment failed; retrying");
                    lock(status).last_error = Some(crate::error::render(&e));
                }
            }
        }
    };
    match ended {
        Ended::Cancelled => {
            drain::drain(config, pg, receiver, &mut shipper, status).await;
            Ok(())
        }
        Ended::Paused(e) => {
            receiver.kill().await;
            let _ = tokio::fs::remove_file(config.spool.join(PID_FILE)).await;
            Err(e)
        }
        Ended::Exited(exit) => {
            let _ = tokio::fs::remove_file(config.spool.join(PID_FILE)).await;
            lock(status).receiving = false;
            // The receiver is gone (typically the server): ship everything it wrote, now.
            let stderr = receiver.stderr_tail().await;
            shipper.ship_complete().await?;
            shipper.ship_partial(true).await?;
            Err(StreamError::ReceiverExited {
                status: exit.map_or_else(|e| e.to_string(), |s| s.to_string()),
                stderr: stderr.trim().to_string(),
            })
        }
    }
}

/// Identifies the cluster, moves aside what in the spool the server cannot have written, ships
/// what a previous session left there, ensures the slot and starts pg_receivewal.
async fn prepare(
    config: &StreamConfig,
    pg: &Postgres,
    store: &Arc<dyn Store>,
    settings: &Settings,
    status: &SharedStatus,
) -> Result<(spool::Shipper, ToolProcess), StreamError> {
    let identify = |source| StreamError::Identify { source };
    let identity = pg.identify_system().await.map_err(identify)?;
    // Every file in the spool is judged against these before anything is shipped from it; the
    // segment size is one PostgreSQL can have (checked where it is read).
    let seg_size = pg.wal_segment_size().await.map_err(identify)?;
    let server = ServerWal {
        system_id: identity.system_id.parse().map_err(|_| {
            identify(PgError::ToolFailed {
                tool: "psql",
                status: "unexpected system identifier".into(),
                stderr: identity.system_id.clone(),
            })
        })?,
        timeline: identity.timeline,
        flush: identity.xlogpos,
        seg_size,
    };
    {
        let mut s = lock(status);
        s.system_id = identity.system_id.clone();
        s.timeline = identity.timeline;
        s.seg_size = seg_size;
    }
    // Before anything is shipped or resumed from: pg_receivewal resumes after the newest file in
    // the spool, whoever wrote it.
    spool::set_aside_impossible(&config.spool, &server, status).await?;
    let archive = WalArchive::new(store.clone(), &identity.system_id);
    // Multipart uploads a killed agent left half-done. Only this task ships this cluster's WAL,
    // one file at a time, and it is not shipping now.
    match store.list_uploads(&archive.prefix()).await {
        Ok(pending) => {
            for upload in pending {
                if let Err(e) = store.abort_upload(&upload).await {
                    tracing::warn!(key = %upload.key, error = %crate::error::render(&e), "could not abort an interrupted WAL upload");
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::render(&e), "could not list interrupted WAL uploads")
        }
    }
    let mut shipper = spool::Shipper::new(
        archive,
        config.spool.clone(),
        settings.clone(),
        seg_size,
        status.clone(),
    );
    // Whatever a previous run left in the spool goes first; until it is shipped, receiving stays
    // paused (the slot keeps the WAL on the server).
    shipper
        .ship_complete()
        .await
        .map_err(|e| StreamError::Leftover {
            source: Box::new(e),
        })?;
    spool::complete_torn_preallocation(&config.spool, seg_size).await?;
    pg.create_slot(&config.slot)
        .await
        .map_err(|source| StreamError::Slot {
            slot: config.slot.clone(),
            source,
        })?;
    let receiver = pg
        .start_receivewal(&config.spool, &config.slot)
        .map_err(|source| StreamError::StartReceiver { source })?;
    tracing::info!(
        system_id = %identity.system_id,
        timeline = identity.timeline,
        spool = %config.spool.display(),
        "streaming WAL"
    );
    Ok((shipper, receiver))
}
