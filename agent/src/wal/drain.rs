//! The drain on shutdown: what the WAL stream does between its token firing and its end.

use std::time::Duration;

use tokio::time::Instant;

use super::{
    spool::Shipper,
    stream::{PID_FILE, SharedStatus, StreamConfig, lock},
};
use crate::{
    engine::postgres::{Postgres, ToolProcess},
    lsn::Lsn,
};

/// How often a drain asks the server how far pg_receivewal has flushed.
const DRAIN_POLL: Duration = Duration::from_millis(100);
/// How long pg_receivewal may take to exit after SIGINT before it is killed.
pub(super) const RECEIVER_STOP: Duration = Duration::from_secs(5);
/// How long a drain may spend shipping what was received, after pg_receivewal stopped.
pub(super) const DRAIN_SHIP: Duration = Duration::from_secs(30);

/// The drain on shutdown: wait (bounded) until pg_receivewal has flushed the WAL the server had
/// flushed when the token fired, stop it, ship everything, and say what was reached.
///
/// How far pg_receivewal got is read from the server, as the replication slot's `restart_lsn`:
/// pg_receivewal runs with `--synchronous`, so it fsyncs what it received and reports that
/// position at once, and the server moves the slot to it. That is pg_receivewal's own statement
/// of what is in the spool. The alternatives are less reliable: `pg_stat_replication.write_lsn`
/// is only refreshed every status interval and is hidden (NULL) from a user that is neither the
/// replication user nor privileged; and the end of the WAL in the `.partial` file can only be
/// guessed from its last non-zero byte, since pg_receivewal pre-fills it with zeros and WAL
/// records can themselves end in zeros.
pub(super) async fn drain(
    config: &StreamConfig,
    pg: &Postgres,
    mut receiver: ToolProcess,
    shipper: &mut Shipper,
    status: &SharedStatus,
) {
    let started = Instant::now();
    let deadline = started + config.drain_timeout;
    let (archived_before, files_before) = shipped_so_far(status);
    let target = flush_target(config, pg, deadline).await;
    let mut wait = match target {
        Some(target) => wait_for_receiver(config, pg, &mut receiver, target, deadline).await,
        None => Wait::default(),
    };
    let waited = started.elapsed();
    let how = match wait.exited.take() {
        Some(exit) => format!(
            "it had exited on its own ({})",
            exit.map_or_else(|e| e.to_string(), |s| s.to_string())
        ),
        None => stop_receiver(receiver).await,
    };
    let _ = tokio::fs::remove_file(config.spool.join(PID_FILE)).await;
    lock(status).receiving = false;
    let shipped = tokio::time::timeout(DRAIN_SHIP, async {
        shipper.ship_complete().await?;
        shipper.ship_partial(true).await
    })
    .await;
    let shipped_error = match shipped {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(crate::error::render(&e)),
        Err(_) => Some(format!("shipping took longer than {DRAIN_SHIP:?}")),
    };
    let (archived, files) = shipped_so_far(status);
    Drained {
        target,
        wait,
        archived,
        stored: files - files_before,
        wal_bytes: archived.0.saturating_sub(archived_before.0),
        waited,
        took: started.elapsed(),
        how,
        shipped_error,
    }
    .report(status);
}

/// How far the archive reaches, and how many files were shipped, as the status says now.
fn shipped_so_far(status: &SharedStatus) -> (Lsn, u64) {
    let s = lock(status);
    (s.archived_lsn, s.segments_shipped + s.partials_shipped)
}

/// The server's WAL flush position when the drain began: what the archive should reach. `None`
/// when the server cannot say in time; the drain then ships what was received.
async fn flush_target(config: &StreamConfig, pg: &Postgres, deadline: Instant) -> Option<Lsn> {
    match tokio::time::timeout_at(deadline, pg.current_wal_lsn()).await {
        Ok(Ok(lsn)) => Some(lsn),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "draining: cannot ask the server for its WAL flush position; shipping what was received");
            None
        }
        Err(_) => {
            tracing::warn!(timeout = ?config.drain_timeout, "draining: the server did not tell its WAL flush position in time; shipping what was received");
            None
        }
    }
}

/// What waiting for pg_receivewal found.
#[derive(Default)]
struct Wait {
    /// How far the slot says pg_receivewal flushed.
    received: Option<Lsn>,
    /// The last error asking the server for the slot's position.
    poll_error: Option<String>,
    /// pg_receivewal's exit, when it ended on its own while waited for.
    exited: Option<std::io::Result<std::process::ExitStatus>>,
}

/// Waits (until `deadline`) for the slot to show that pg_receivewal flushed `target`, or for
/// it to exit on its own.
async fn wait_for_receiver(
    config: &StreamConfig,
    pg: &Postgres,
    receiver: &mut ToolProcess,
    target: Lsn,
    deadline: Instant,
) -> Wait {
    let mut wait = Wait::default();
    tracing::info!(%target, timeout = ?config.drain_timeout, "draining: waiting for pg_receivewal to reach the server's WAL flush position");
    loop {
        match tokio::time::timeout_at(deadline, pg.slot_flushed_lsn(&config.slot)).await {
            Ok(Ok(lsn)) => wait.received = lsn.or(wait.received),
            Ok(Err(e)) => wait.poll_error = Some(e.to_string()),
            Err(_) => break,
        }
        if wait.received.is_some_and(|r| r >= target) || Instant::now() >= deadline {
            break;
        }
        let next = (Instant::now() + DRAIN_POLL).min(deadline);
        tokio::select! {
            exit = receiver.exited() => {
                wait.exited = Some(exit);
                break;
            }
            _ = tokio::time::sleep_until(next) => {}
        }
    }
    wait
}

/// A finished drain, for its one log line (and the status's last error when it fell short).
struct Drained {
    target: Option<Lsn>,
    wait: Wait,
    archived: Lsn,
    stored: u64,
    wal_bytes: u64,
    waited: Duration,
    took: Duration,
    how: String,
    shipped_error: Option<String>,
}

impl Drained {
    fn report(self, status: &SharedStatus) {
        let Drained {
            target,
            wait,
            archived,
            stored,
            wal_bytes,
            waited,
            took,
            how,
            shipped_error,
        } = self;
        let received = wait.received;
        // Reached when pg_receivewal confirmed the target and everything it wrote was shipped
        // after it stopped (the whole partial file goes, so every byte it received), or when the
        // archive's own end shows it.
        let reached = target.is_some_and(|t| received.is_some_and(|r| r >= t) || archived >= t);
        match (target, shipped_error) {
            (Some(target), None) if reached => tracing::info!(
                %target, received = ?received.map(|r| r.to_string()), %archived, stored, wal_bytes,
                ?waited, ?took, receiver = %how,
                "drained: the archive reaches the server's WAL flush position at shutdown"
            ),
            (None, None) => tracing::warn!(
                %archived, stored, wal_bytes, ?took, receiver = %how,
                "drained without a target: the server did not say its WAL flush position, so whether the archive holds all of it is unknown; everything pg_receivewal had received is shipped"
            ),
            (target, shipped_error) => {
                let gap = target.map(|t| t.0.saturating_sub(archived.0));
                if let Some(e) = &shipped_error {
                    lock(status).last_error = Some(e.clone());
                }
                tracing::warn!(
                    target = ?target.map(|t| t.to_string()),
                    %archived,
                    gap_bytes = ?gap,
                    received = ?received.map(|r| r.to_string()),
                    stored, wal_bytes, ?waited, ?took, receiver = %how,
                    error = ?shipped_error,
                    slot_error = ?wait.poll_error,
                    "drained short: WAL the server had flushed at shutdown is not all in the archive; the slot keeps it on the server and the next start ships it"
                );
            }
        }
    }
}

/// Asks pg_receivewal to stop (SIGINT: it closes its file cleanly, keeping `.partial`), and
/// kills it when it has not exited within [`RECEIVER_STOP`]. Says how it ended.
async fn stop_receiver(mut receiver: ToolProcess) -> String {
    if let Some(pid) = receiver.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGINT,
        );
    }
    match tokio::time::timeout(RECEIVER_STOP, receiver.exited()).await {
        Ok(Ok(exit)) => format!("stopped ({exit})"),
        Ok(Err(e)) => {
            receiver.kill().await;
            format!("killed (waiting for it failed: {e})")
        }
        Err(_) => {
            receiver.kill().await;
            format!("killed (still running {RECEIVER_STOP:?} after SIGINT)")
        }
    }
}
