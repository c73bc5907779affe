//! Flags of the operations the agent runs: how many at once, retention, drills and restores.

use std::path::PathBuf;

/// Limits and places of backups, restores, drills and prunes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Operations")]
pub struct OperationArgs {
    /// Retention policy `prune` applies (and the `prune` schedule), e.g.
    /// `keep-last=7,keep-daily=14,keep-weekly=8,keep-monthly=12,max-age=30d`: per engine, target
    /// and kind; a backup set counts as one backup; the newest backup of each is always kept.
    #[arg(long, env = "SOMA_RETENTION", value_parser = crate::retention::parse_policy)]
    pub retention: Option<crate::retention::Policy>,

    /// Where a restore drill of a physical base backup lays its scratch data directory and runs
    /// its scratch server (removed after every drill). Put it on a volume with room for the
    /// cluster. An agent running as root runs that server as the directory's owner, else as
    /// `postgres`.
    #[arg(
        long,
        env = "SOMA_DRILL_DIR",
        default_value = "/var/lib/soma-backup/drill"
    )]
    pub drill_dir: PathBuf,

    /// Most operations (backups, restores, verifies, drills, deletes, prunes) running at once,
    /// whoever started them; one more is refused (a schedule's run is skipped). 0: no limit.
    #[arg(long, env = "SOMA_MAX_OPERATIONS", default_value_t = 4)]
    pub max_operations: usize,

    /// The only directory under which `kubectl soma restore --pgdata DIR` may lay a data
    /// directory (the volume meant for restores). Without it the API lays none: run
    /// `soma-agent restore-pgdata` where PostgreSQL's data lives (the chart's init container).
    #[arg(long, env = "SOMA_RESTORE_ROOT", value_name = "DIR")]
    pub restore_root: Option<PathBuf>,
}
