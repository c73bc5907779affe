//! Where the last recovery of the server beside the agent ended, against the WAL archive it
//! replayed from.
//!
//! A restore that stops before the end of the archive still promotes, and the cluster looks
//! fine: only the rows are missing. Every promotion writes the new timeline's history file,
//! whose last line says where replay of the parent timeline ended and why (PostgreSQL's reason:
//! `no recovery target specified` for a restore to the end of the archive, else the target it
//! met). The agent reads it over the replication connection and compares it with what the
//! archive holds of the parent timeline: WAL in a later segment than where replay ended was not
//! replayed. A restore without a target that left WAL behind stopped short (a missing segment, a
//! restore_command that ended early); one with a target left it behind as asked, and says so.
//!
//! Only whole segments count: the segment replay ended in may hold a record or two that could
//! not be replayed (an incomplete one at the old server's crash), which is no loss.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::{
    engine::postgres::{PgError, Postgres},
    lsn::Lsn,
    store::Store,
    wal::{Kind, WalArchive, WalError},
};

/// PostgreSQL's history reason for a recovery that ran to the end of the WAL it was given.
const NO_TARGET: &str = "no recovery target specified";

/// How the last recovery ended, compared with the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The archive holds no WAL of the parent timeline after where replay ended.
    ReachedEnd,
    /// Recovery met its target; the archive holds more WAL after it, as the target asked.
    AtTarget,
    /// No target was set, yet the archive holds WAL after where replay ended: rows committed
    /// there are missing from this cluster.
    StoppedShort,
    /// The archive (the agent's restore source) holds no WAL of the parent timeline to compare
    /// with, e.g. the cluster was restored from another store.
    NoArchive,
}

impl Verdict {
    /// As `status` and the metrics' label show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::ReachedEnd => "reached-end",
            Verdict::AtTarget => "at-target",
            Verdict::StoppedShort => "stopped-short",
            Verdict::NoArchive => "no-archive",
        }
    }
}

/// Where the last recovery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayEnd {
    /// The timeline the promoted server runs on.
    pub timeline: u32,
    /// The timeline recovery replayed last.
    pub parent: u32,
    /// Where replay of the parent ended (the new timeline's first position).
    pub switch: Lsn,
    /// PostgreSQL's reason (see [`crate::engine::postgres::HistoryLine::reason`]).
    pub reason: String,
    /// The end of the parent timeline's WAL in the archive beyond the segment replay ended in.
    pub archive_end: Option<Lsn>,
    /// WAL bytes of the parent timeline in the archive after where replay ended (whole
    /// segments after its segment), 0 when none.
    pub unreplayed_bytes: u64,
    /// The comparison.
    pub verdict: Verdict,
    /// When this was found.
    pub checked_at: DateTime<Utc>,
}

impl ReplayEnd {
    /// One sentence for logs and `status`.
    pub fn describe(&self) -> String {
        let at = format!(
            "recovery ended at LSN {} of timeline {} ({}) and the server promoted to timeline {}",
            self.switch, self.parent, self.reason, self.timeline
        );
        match self.verdict {
            Verdict::ReachedEnd => format!(
                "{at}: the archive holds no later WAL of timeline {}",
                self.parent
            ),
            Verdict::AtTarget => format!(
                "{at}: stopped at its recovery target; the archive holds {} bytes more of timeline {} up to LSN {}, not replayed as the target asked",
                self.unreplayed_bytes,
                self.parent,
                self.archive_end.map(|l| l.to_string()).unwrap_or_default()
            ),
            Verdict::StoppedShort => format!(
                "{at}: STOPPED SHORT of the end of the archive, with no recovery target: the archive holds {} bytes more of timeline {} up to LSN {}, and transactions committed there are missing; restore again (the archive is intact) and check the server log of the restore for why replay ended",
                self.unreplayed_bytes,
                self.parent,
                self.archive_end.map(|l| l.to_string()).unwrap_or_default()
            ),
            Verdict::NoArchive => format!(
                "{at}: the agent's restore source holds no WAL of timeline {} to compare with",
                self.parent
            ),
        }
    }
}

/// What the agent found out about the server's last recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayState {
    /// The server is still recovering.
    Recovering,
    /// Timeline 1: the cluster was never recovered from an archive.
    NeverRecovered,
    /// The server promoted after a recovery.
    Ended(ReplayEnd),
}

/// Why the comparison could not be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    /// The server did not answer.
    #[error("reading the server's timeline history: {0}")]
    Pg(#[from] PgError),
    /// The archive could not be listed.
    #[error("listing the WAL archive: {0}")]
    Wal(#[from] WalError),
    /// The server has no history for its own timeline.
    #[error("the server runs on timeline {0} but has no history file for it")]
    NoHistory(u32),
}

/// Compares where the server's last recovery ended with the archive in `source` (the store
/// restores read from).
pub(crate) async fn check(
    pg: &Postgres,
    source: Arc<dyn Store>,
) -> Result<ReplayState, ReplayError> {
    let (recovering, timeline) = pg.recovery_state().await?;
    if recovering {
        return Ok(ReplayState::Recovering);
    }
    if timeline <= 1 {
        return Ok(ReplayState::NeverRecovered);
    }
    let last = pg
        .timeline_history(timeline)
        .await?
        .pop()
        .ok_or(ReplayError::NoHistory(timeline))?;
    let system = pg.identify_system().await?;
    let seg_size = pg.wal_segment_size().await?;
    let objects = WalArchive::new(source, &system.system_id).list().await?;
    let of_parent = objects
        .iter()
        .filter(|o| o.kind != Kind::History && o.file.timeline() == last.parent);
    let switch_segment = last.switch.0 / seg_size;
    let mut any = false;
    let mut archive_end: Option<Lsn> = None;
    for o in of_parent {
        any = true;
        if o.file.segno(seg_size).is_some_and(|s| s > switch_segment)
            && let Some(end) = o.end_lsn(seg_size)
        {
            archive_end = archive_end.max(Some(end));
        }
    }
    let unreplayed_bytes = archive_end.map_or(0, |end| end.0.saturating_sub(last.switch.0));
    let verdict = match (any, unreplayed_bytes > 0) {
        (false, _) => Verdict::NoArchive,
        (true, false) => Verdict::ReachedEnd,
        (true, true) if last.reason == NO_TARGET => Verdict::StoppedShort,
        (true, true) => Verdict::AtTarget,
    };
    Ok(ReplayState::Ended(ReplayEnd {
        timeline,
        parent: last.parent,
        switch: last.switch,
        reason: last.reason,
        archive_end,
        unreplayed_bytes,
        verdict,
        checked_at: Utc::now(),
    }))
}

/// How often the server is looked at until its last recovery is known.
const UNTIL_KNOWN: Duration = Duration::from_secs(30);
/// How often afterwards (a later promotion changes the answer).
const ONCE_KNOWN: Duration = Duration::from_secs(600);

/// The last answer of the watch, shared with `status` and the metrics.
#[derive(Debug, Clone, Default)]
pub struct ReplayWatch(Arc<Mutex<Option<ReplayEnd>>>);

impl ReplayWatch {
    /// Where the server's last recovery ended, once known.
    pub fn get(&self) -> Option<ReplayEnd> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, value: Option<ReplayEnd>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// Watches the server's last recovery until `shutdown`: at once, then every [`UNTIL_KNOWN`]
/// until it is known, then every [`ONCE_KNOWN`]. Logs each new answer once: a warning when
/// recovery stopped short.
pub fn spawn_watch(
    pg: Postgres,
    source: Arc<dyn Store>,
    watch: ReplayWatch,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let mut last_error = String::new();
        loop {
            let wait = match check(&pg, source.clone()).await {
                Ok(ReplayState::Ended(end)) => {
                    let changed = watch.get().is_none_or(|old| {
                        (old.timeline, old.unreplayed_bytes, old.verdict)
                            != (end.timeline, end.unreplayed_bytes, end.verdict)
                    });
                    if changed {
                        if end.verdict == Verdict::StoppedShort {
                            tracing::warn!(
                                unreplayed_bytes = end.unreplayed_bytes,
                                "{}",
                                end.describe()
                            );
                        } else {
                            tracing::info!(
                                unreplayed_bytes = end.unreplayed_bytes,
                                "{}",
                                end.describe()
                            );
                        }
                    }
                    watch.set(Some(end));
                    ONCE_KNOWN
                }
                Ok(ReplayState::NeverRecovered) => {
                    watch.set(None);
                    ONCE_KNOWN
                }
                Ok(ReplayState::Recovering) => UNTIL_KNOWN,
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::warn!(error = %e, "cannot tell where the server's last recovery ended");
                        last_error = e;
                    }
                    UNTIL_KNOWN
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => break,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use crate::engine::postgres::parse_history_lines;

    #[test]
    fn history_lines_parse_and_hostile_ones_are_tamed() {
        let lines = parse_history_lines(
            "1\t0/5005FD0\tno recovery target specified\n\n\
             # comment\n\
             2\t0/7000028\tbefore 2026-12-07 17:40:54.560229+00\n\
             x\tnot a line\n\
             3\t0/9000000\t\u{1b}[31mred\u{7}",
        );
        let got: Vec<_> = lines
            .iter()
            .map(|l| (l.parent, l.switch.to_string(), l.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, "0/5005FD0".to_string(), "no recovery target specified"),
                (
                    2,
                    "0/7000028".to_string(),
                    "before 2026-12-07 17:40:54.560229+00"
                ),
                (3, "0/9000000".to_string(), "[31mred"),
            ]
        );
        let long = format!("1\t0/1\t{}", "y".repeat(10_000));
        assert_eq!(parse_history_lines(&long)[0].reason.len(), 200);
    }
}
