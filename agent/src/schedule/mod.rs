//! Schedules the agent runs by itself (`--schedule "ACTION CRON"`), so backups, verifies, drills
//! and retention happen with no client and no port-forward.
//!
//! Each schedule is a task: it waits for the next cron time (in `--schedule-timezone`) plus a
//! random jitter, then runs its action through the same [`Runner`](crate::runner::Runner) a
//! client's request uses. A run whose target is busy (a client's job, or this schedule's own
//! previous run still going) is skipped and counted, never queued. The last run of each schedule
//! is kept in the store, so a run missed while the agent was down runs once when it starts.

pub(crate) mod run;

use std::{
    str::FromStr,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::{
    Cron,
    parser::{CronParser, Seconds},
};
use soma_proto::v1;

pub(crate) use run::spawn;

/// What a schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Every engine this agent serves, as one backup set (`backup all`).
    Backup,
    /// A logical backup of every database of the cluster with its roles.
    BackupPostgres,
    /// A physical base backup of the cluster.
    BackupPhysical,
    /// Snapshots of every Qdrant collection.
    BackupQdrant,
    /// Re-read the newest backup from the store.
    VerifyLatest,
    /// Restore the newest backup into a scratch target and validate it.
    Drill,
    /// Apply the retention policy (`--retention`).
    Prune,
}

impl Action {
    /// Every action, as written in `--schedule`.
    pub const ALL: [Action; 7] = [
        Action::Backup,
        Action::BackupPostgres,
        Action::BackupPhysical,
        Action::BackupQdrant,
        Action::VerifyLatest,
        Action::Drill,
        Action::Prune,
    ];

    /// The name in `--schedule`, logs and `status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Backup => "backup",
            Action::BackupPostgres => "backup-postgres",
            Action::BackupPhysical => "backup-physical",
            Action::BackupQdrant => "backup-qdrant",
            Action::VerifyLatest => "verify-latest",
            Action::Drill => "drill",
            Action::Prune => "prune",
        }
    }

    /// Whether the action writes to the store (refused on a read-only store).
    pub fn writes(self) -> bool {
        !matches!(self, Action::VerifyLatest | Action::Drill)
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown schedule action {s:?}: use one of {}",
                    Action::ALL.map(Action::as_str).join(", ")
                )
            })
    }
}

/// One `--schedule` value: an action and when it runs.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// What runs.
    pub action: Action,
    /// The cron expression as given.
    pub cron_text: String,
    cron: Cron,
}

/// How many fields a cron expression may have: the standard five, or six with seconds first.
const MAX_SPEC_LEN: usize = 200;

impl Schedule {
    /// Parses `ACTION CRON`, e.g. `backup 0 2 * * *`. A sixth leading field (seconds) is accepted
    /// for fine-grained schedules.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        if spec.len() > MAX_SPEC_LEN {
            return Err(format!("schedule is longer than {MAX_SPEC_LEN} characters"));
        }
        let (action, cron_text) = spec.split_once(char::is_whitespace).ok_or_else(|| {
            format!(
                "schedule {spec:?} needs an action and a cron expression, e.g. \"backup 0 2 * * *\""
            )
        })?;
        let action: Action = action.parse()?;
        let cron_text = cron_text.split_whitespace().collect::<Vec<_>>().join(" ");
        let fields = cron_text.split(' ').count();
        if !(5..=6).contains(&fields) {
            return Err(format!(
                "schedule {spec:?}: the cron expression {cron_text:?} has {fields} field(s); use the standard five (minute hour day-of-month month day-of-week), e.g. \"0 2 * * *\""
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(&cron_text)
            .map_err(|e| {
                format!("schedule {spec:?}: invalid cron expression {cron_text:?}: {e}")
            })?;
        Ok(Self {
            action,
            cron_text,
            cron,
        })
    }

    /// `ACTION CRON`, as given.
    pub fn spec(&self) -> String {
        format!("{} {}", self.action.as_str(), self.cron_text)
    }

    /// The first cron time strictly after `after`, read in `tz`.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// Parses `--schedule-timezone`: an IANA name such as `Europe/Berlin`, or `UTC`.
pub(crate) fn parse_timezone(s: &str) -> Result<Tz, String> {
    s.parse::<Tz>().map_err(|_| {
        format!("unknown time zone {s:?}: use an IANA name such as UTC or Europe/Berlin")
    })
}

/// How a run ended, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunResult {
    /// It ran to the end.
    Succeeded,
    /// It failed (a failure record says why).
    Failed,
    /// A job of the same target was running.
    Skipped,
}

impl RunResult {
    fn as_str(self) -> &'static str {
        match self {
            RunResult::Succeeded => "succeeded",
            RunResult::Failed => "failed",
            RunResult::Skipped => "skipped",
        }
    }
}

/// A schedule's live state.
#[derive(Debug, Clone, Default)]
pub(crate) struct ScheduleState {
    /// The next cron time.
    pub next_run: Option<DateTime<Utc>>,
    /// When the last run started.
    pub last_run: Option<DateTime<Utc>>,
    /// How it ended.
    pub last_result: Option<RunResult>,
    /// Why it failed or was skipped.
    pub last_error: String,
    /// The backup it wrote or read.
    pub last_backup_id: String,
    /// Runs skipped since the agent started.
    pub skipped: u64,
    /// Runs failed since the agent started.
    pub failed: u64,
}

/// A running schedule, as `GetInfo` reports it.
#[derive(Debug, Clone)]
pub(crate) struct ScheduleHandle {
    /// The schedule.
    pub schedule: Arc<Schedule>,
    /// The time zone its expression is read in.
    pub timezone: Tz,
    /// Its live state.
    pub state: Arc<Mutex<ScheduleState>>,
}

impl ScheduleHandle {
    /// The state on the wire.
    pub(crate) fn status(&self) -> v1::ScheduleStatus {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_default();
        v1::ScheduleStatus {
            action: self.schedule.action.as_str().into(),
            cron: self.schedule.cron_text.clone(),
            timezone: self.timezone.name().into(),
            next_run: time(s.next_run),
            last_run: time(s.last_run),
            last_result: s.last_result.map(|r| r.as_str().into()).unwrap_or_default(),
            last_error: s.last_error,
            last_backup_id: s.last_backup_id,
            skipped: s.skipped,
            failed: s.failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn parses_actions_and_standard_cron() {
        let s = Schedule::parse("  backup   0  2 * * *  ").unwrap();
        assert_eq!(s.action, Action::Backup);
        assert_eq!(s.spec(), "backup 0 2 * * *");
        assert_eq!(
            s.next_after(utc("2026-11-29T01:59:59Z"), Tz::UTC),
            Some(utc("2026-11-29T02:00:00Z"))
        );
        // Strictly after: at 02:00 the next run is tomorrow's.
        assert_eq!(
            s.next_after(utc("2026-11-29T02:00:00Z"), Tz::UTC),
            Some(utc("2026-11-30T02:00:00Z"))
        );
        let every_second = Schedule::parse("verify-latest * * * * * *").unwrap();
        assert_eq!(
            every_second.next_after(utc("2026-11-29T02:00:00Z"), Tz::UTC),
            Some(utc("2026-11-29T02:00:01Z"))
        );
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>().unwrap(), a);
        }
    }

    #[test]
    fn reads_the_expression_in_the_time_zone() {
        let s = Schedule::parse("backup 0 2 * * *").unwrap();
        let berlin = parse_timezone("Europe/Berlin").unwrap();
        // 02:00 in Berlin in winter is 01:00 UTC.
        assert_eq!(
            s.next_after(utc("2026-11-29T00:00:00Z"), berlin),
            Some(utc("2026-11-29T01:00:00Z"))
        );
        assert!(parse_timezone("Mars/Olympus").unwrap_err().contains("IANA"));
    }

    #[test]
    fn bad_schedules_name_what_is_wrong() {
        let cases = [
            ("backup", "needs an action and a cron expression"),
            ("backups 0 2 * * *", "unknown schedule action \"backups\""),
            ("backup 0 2 * *", "has 4 field(s)"),
            ("backup 61 2 * * *", "invalid cron expression"),
            ("prune 0 2 * * * * *", "has 7 field(s)"),
        ];
        for (spec, want) in cases {
            let err = Schedule::parse(spec).unwrap_err();
            assert!(err.contains(want), "{spec}: {err}");
        }
        assert!(Schedule::parse(&"x".repeat(500)).is_err());
    }
}
