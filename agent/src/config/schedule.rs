//! Flags of the schedules the agent runs on its own.

use std::time::Duration;

use crate::{
    owner::OwnerId,
    schedule::{Schedule, run::Options},
};

/// Cron schedules: what runs when no client asks.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Schedules")]
pub struct ScheduleArgs {
    /// Run ACTION on a cron schedule with no client: `"ACTION MIN HOUR DOM MON DOW"`, e.g.
    /// `"backup 0 2 * * *"`. ACTION: backup (every engine as a set), backup-postgres (every
    /// database with its roles), backup-physical, backup-qdrant, verify-latest, drill, prune.
    /// Repeatable; in SOMA_SCHEDULES one per line (blank lines and lines starting with # are
    /// ignored). A sixth leading field (seconds) is accepted.
    #[arg(
        long = "schedule",
        env = "SOMA_SCHEDULES",
        value_delimiter = '\n',
        value_name = "ACTION CRON"
    )]
    pub schedules: Vec<String>,

    /// Time zone the schedules' cron expressions are read in (IANA name).
    #[arg(long, env = "SOMA_SCHEDULE_TIMEZONE", default_value = "UTC",
          value_parser = crate::schedule::parse_timezone)]
    pub schedule_timezone: chrono_tz::Tz,

    /// Longest random delay added to each scheduled run (at most a tenth of the schedule's
    /// interval), so agents sharing a store and a schedule do not start in the same second.
    #[arg(long, env = "SOMA_SCHEDULE_JITTER", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub schedule_jitter: Duration,
}

impl ScheduleArgs {
    /// The `--schedule` values parsed; an error names the bad one.
    pub fn parsed(&self) -> Result<Vec<Schedule>, String> {
        self.schedules
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty() && !s.starts_with('#'))
            .map(|s| Schedule::parse(s).map_err(|e| format!("--schedule / SOMA_SCHEDULES: {e}")))
            .collect()
    }

    /// How the schedules of `owner` run.
    pub fn options(&self, owner: OwnerId) -> Options {
        Options {
            timezone: self.schedule_timezone,
            jitter: self.schedule_jitter,
            owner,
        }
    }
}
