//! The one-shot subcommands and their arguments.

use std::path::PathBuf;

/// One-shot subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Lay a physical base backup into an empty data directory and configure point-in-time
    /// recovery; PostgreSQL replays WAL from the store to the target when it starts there.
    RestorePgdata(RestorePgdataArgs),
    /// PostgreSQL's restore_command: fetch one WAL file from the store, checking its digest.
    /// Exits 1 when the archive has no such file (its end), and with status 255 — which stops
    /// recovery — when the file is corrupted, missing in the middle of the archive, or the store
    /// cannot be read.
    WalFetch(WalFetchArgs),
    /// PostgreSQL's recovery_end_command, written by restore-pgdata: removes that restore's
    /// recovery settings from postgresql.auto.conf in the current directory (the data
    /// directory) once recovery ended, so the promoted cluster and its base backups carry none.
    RecoveryEnd(RecoveryEndArgs),
    /// The restore_command of a restore drill's scratch server: asks the drill's agent for one
    /// WAL file over the drill's socket (it holds no store credential or key itself). Exits as
    /// `wal-fetch` does. Run by the scratch server, never by hand.
    #[command(hide = true)]
    DrillWalFetch(DrillWalFetchArgs),
}

/// Arguments of `recovery-end` (as written into recovery_end_command by restore-pgdata).
#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryEndArgs {
    /// The block of settings to remove, as restore-pgdata named it.
    #[arg(long)]
    pub block: String,
    /// The data directory (default: the current directory, where PostgreSQL runs the command).
    #[arg(long)]
    pub pgdata: Option<PathBuf>,
}

/// Arguments of `restore-pgdata`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestorePgdataArgs {
    /// Base backup id, or `latest` for the newest base backup that can reach the target.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Data directory to create; it must be missing or empty.
    #[arg(long, env = "PGDATA")]
    pub pgdata: PathBuf,
    /// Recover every transaction committed at or before this time (RFC 3339, or as PostgreSQL
    /// prints it: `2026-11-29 14:35:01.8+00`).
    #[arg(long, conflicts_with_all = ["target_lsn", "target_name", "target"])]
    pub target_time: Option<String>,
    /// Recover up to this WAL position, e.g. 16/B374D848.
    #[arg(long, conflicts_with_all = ["target_name", "target"])]
    pub target_lsn: Option<String>,
    /// Recover up to the restore point of this name (`pg_create_restore_point`). Name the base
    /// backup taken before it: `latest` picks the newest, which may be after it.
    #[arg(long, conflicts_with = "target")]
    pub target_name: Option<String>,
    /// `latest`: recover everything in the archive (the default).
    #[arg(long, value_parser = ["latest"])]
    pub target: Option<String>,
    /// Path of soma-agent as the PostgreSQL server will run it in restore_command (default: this
    /// binary). In Kubernetes: where the init container copied it in a shared volume.
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
}

/// `--system-id`: a PostgreSQL system identifier, nothing else (it names a store folder).
fn parse_system_id(s: &str) -> Result<String, String> {
    if crate::wal::valid_system_id(s) {
        Ok(s.to_string())
    } else {
        Err("expected a PostgreSQL system identifier: a decimal number, as pg_controldata prints it".into())
    }
}

/// Arguments of `wal-fetch` (as written into restore_command by restore-pgdata).
#[derive(Debug, Clone, clap::Args)]
pub struct WalFetchArgs {
    /// System identifier of the cluster whose archive to read.
    #[arg(long, value_parser = parse_system_id)]
    pub system_id: String,
    /// WAL file name PostgreSQL asks for (%f).
    pub file: String,
    /// Where PostgreSQL wants it (%p).
    pub destination: PathBuf,
}

/// Arguments of `drill-wal-fetch` (as written into a drill's restore_command).
#[derive(Debug, Clone, clap::Args)]
pub struct DrillWalFetchArgs {
    /// The drill's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// WAL file name PostgreSQL asks for (%f).
    pub file: String,
    /// Where PostgreSQL wants it (%p).
    pub destination: PathBuf,
}
