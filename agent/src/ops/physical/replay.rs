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
    engine::postgres::{HistoryLine, PgError, Postgres},
    lsn::Lsn,
    store::Store,
    wal::{Kind, WalArchive, WalError, WalObject},
};

/// PostgreSQL's history reason for a recovery that ran to the end of the WAL it was given.
const NO_TARGET: &str = "no recovery target specified";

/// How the last recovery ended, compared with the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
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
    pub(crate) fn as_str(self) -> &'static str {
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
pub(crate) struct ReplayEnd {
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
    /// Recovery settings the server's configuration files still set (names): a restore's
    /// settings that outlived it, or the operator's.
    pub leftover_settings: Vec<String>,
    /// When this was found.
    pub checked_at: DateTime<Utc>,
}

impl ReplayEnd {
    /// One sentence for logs and `status`.
    pub(crate) fn describe(&self) -> String {
        let mut said = self.verdict_sentence();
        if !self.leftover_settings.is_empty() {
            said.push_str(&format!(
                "; the configuration files still set {} (a restore's settings that outlived it when recovery_end_command could not run, or set by hand): base backups carry them, restores neutralise them; remove them with ALTER SYSTEM RESET",
                self.leftover_settings.join(", ")
            ));
        }
        said
    }

    fn verdict_sentence(&self) -> String {
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
pub(crate) enum ReplayState {
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
    if pg.in_recovery().await? {
        return Ok(ReplayState::Recovering);
    }
    // The timeline the server writes on now (a checkpoint's may still be the old one for minutes
    // after a fast promotion).
    let system = pg.identify_system().await?;
    let timeline = system.timeline;
    if timeline <= 1 {
        return Ok(ReplayState::NeverRecovered);
    }
    let last = pg
        .timeline_history(timeline)
        .await?
        .pop()
        .ok_or(ReplayError::NoHistory(timeline))?;
    let seg_size = pg.wal_segment_size().await?;
    let objects = WalArchive::new(source, &system.system_id).list().await?;
    let (archive_end, any) = beyond(&objects, seg_size, &last);
    let unreplayed_bytes = archive_end.map_or(0, |end| end.0.saturating_sub(last.switch.0));
    let verdict = match (any, unreplayed_bytes > 0) {
        (false, _) => Verdict::NoArchive,
        (true, false) => Verdict::ReachedEnd,
        (true, true) if last.reason == NO_TARGET => Verdict::StoppedShort,
        (true, true) => Verdict::AtTarget,
    };
    // A restore's own settings that outlived it (recovery-end could not run): a base backup of
    // this cluster carries them. Restores neutralise them; people should know.
    let leftover = pg.recovery_settings_in_files().await.unwrap_or_default();
    Ok(ReplayState::Ended(ReplayEnd {
        timeline,
        parent: last.parent,
        switch: last.switch,
        reason: last.reason,
        archive_end,
        unreplayed_bytes,
        verdict,
        leftover_settings: leftover,
        checked_at: Utc::now(),
    }))
}

/// The end of the WAL of `last.parent` in `objects` that replay never read — segments that start
/// at or after where replay ended, holding more than a page header (a partial the old server
/// had only just begun is no WAL) — and whether the archive holds any WAL of that timeline.
fn beyond(objects: &[WalObject], seg_size: u64, last: &HistoryLine) -> (Option<Lsn>, bool) {
    /// PostgreSQL's long page header, at the start of every segment.
    const LONG_HEADER: u64 = 40;
    let mut any = false;
    let mut end_beyond: Option<Lsn> = None;
    for o in objects
        .iter()
        .filter(|o| o.kind != Kind::History && o.file.timeline() == last.parent)
    {
        any = true;
        let (Some(segno), Some(end)) = (o.file.segno(seg_size), o.end_lsn(seg_size)) else {
            continue;
        };
        let start = segno.saturating_mul(seg_size);
        if start >= last.switch.0 && end.0 > start.saturating_add(LONG_HEADER) {
            end_beyond = end_beyond.max(Some(end));
        }
    }
    (end_beyond, any)
}

/// How often the server is looked at until its last recovery is known.
const UNTIL_KNOWN: Duration = Duration::from_secs(30);
/// How often afterwards (a later promotion changes the answer).
const ONCE_KNOWN: Duration = Duration::from_secs(600);

/// The last answer of the watch, shared with `status` and the metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplayWatch(Arc<Mutex<Option<ReplayEnd>>>);

impl ReplayWatch {
    /// Where the server's last recovery ended, once known.
    pub(crate) fn get(&self) -> Option<ReplayEnd> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, value: Option<ReplayEnd>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = value;
    }
}

/// Watches the server's last recovery until `shutdown`: at once, then every [`UNTIL_KNOWN`]
/// until it is known, then every [`ONCE_KNOWN`]. Logs each new answer once: a warning when
/// recovery stopped short.
pub(crate) fn spawn_watch(
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
    fn only_wal_replay_never_read_counts_as_left_behind() {
        use super::{HistoryLine, Lsn, beyond};
        use crate::wal::{Kind, WalFile, WalObject};
        let seg: u64 = 16 << 20;
        let object = |tli: u32, segno: u64, kind: Kind, end: u64| WalObject {
            key: String::new(),
            file: WalFile::from_segno(tli, segno, seg),
            kind,
            end,
            captured: chrono::Utc::now(),
            sha256: crate::digest::Sha256Digest::of(b""),
        };
        let at = |switch: u64| HistoryLine {
            parent: 1,
            switch: Lsn(switch),
            reason: "no recovery target specified".into(),
        };
        let archive = vec![
            object(1, 3, Kind::Seg, seg),
            object(1, 4, Kind::Seg, seg),
            object(1, 5, Kind::Partial, 40),
            object(2, 6, Kind::Seg, seg),
        ];
        // Replay ended inside segment 4: nothing after it but a header-only partial.
        assert_eq!(beyond(&archive, seg, &at(4 * seg + 100)), (None, true));
        // Replay ended exactly at the start of segment 4 (after a WAL switch): segment 4 was
        // never read.
        assert_eq!(
            beyond(&archive, seg, &at(4 * seg)),
            (Some(Lsn(5 * seg)), true)
        );
        // Inside segment 3: segment 4 is left behind.
        assert_eq!(
            beyond(&archive, seg, &at(3 * seg + 5)),
            (Some(Lsn(5 * seg)), true)
        );
        // Another timeline's WAL is not this one's.
        let mut other = at(3 * seg);
        other.parent = 3;
        assert_eq!(beyond(&archive, seg, &other), (None, false));
    }

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
