//! Flags of the WAL stream (point-in-time recovery).

use std::{path::PathBuf, time::Duration};

use crate::{engine::postgres::check_slot_name, wal::stream::StreamConfig};

/// Continuous WAL archiving with pg_receivewal.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "WAL stream")]
pub struct WalArgs {
    /// Stream WAL continuously to the store (point-in-time recovery): pg_receivewal through a
    /// physical replication slot, complete segments shipped at once, the segment in progress every
    /// --wal-partial-interval. Needs a user with REPLICATION (see --replication-url).
    #[arg(long, env = "SOMA_WAL_STREAM", requires_if("true", "postgres_url"))]
    pub wal_stream: bool,

    /// Directory pg_receivewal writes into before segments are shipped. Keep it across container
    /// restarts (an emptyDir): the agent resumes from it.
    #[arg(
        long,
        env = "SOMA_WAL_SPOOL",
        default_value = "/var/lib/soma-backup/wal-spool"
    )]
    pub wal_spool: PathBuf,

    /// Physical replication slot holding WAL on the server until the agent has it. Bound what it
    /// may hold with the server's max_slot_wal_keep_size.
    #[arg(long, env = "SOMA_WAL_SLOT", default_value = "soma_wal_archive")]
    pub wal_slot: String,

    /// How often the WAL segment in progress is shipped: the recovery point objective.
    #[arg(long, env = "SOMA_WAL_PARTIAL_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub wal_partial_interval: Duration,

    /// Complete WAL segments that may wait in the spool while the store refuses them; then
    /// receiving pauses (the slot keeps the WAL on the server) so the spool cannot fill its volume.
    #[arg(long, env = "SOMA_WAL_SPOOL_MAX_SEGMENTS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub wal_spool_max_segments: u32,

    /// On SIGTERM, how long the WAL stream waits for pg_receivewal to receive the WAL the server
    /// had flushed at that moment, before it ships what it has and stops. Shipping afterwards
    /// takes up to 30 s more: keep the pod's terminationGracePeriodSeconds above both.
    #[arg(long, env = "SOMA_WAL_DRAIN_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub wal_drain_timeout: Duration,
}

impl WalArgs {
    /// The stream's settings with --wal-stream, checked; `None` without it. Both rules are about
    /// parsed values, which clap cannot state: the slot's name, and --store-read-only being
    /// true (clap counts `SOMA_WAL_STREAM=false` as given, so its `conflicts_with` would refuse
    /// that too).
    pub fn stream(&self, store_read_only: bool) -> anyhow::Result<Option<StreamConfig>> {
        if !self.wal_stream {
            return Ok(None);
        }
        // Its error names the flag.
        check_slot_name(&self.wal_slot)?;
        if store_read_only {
            anyhow::bail!(
                "--wal-stream (SOMA_WAL_STREAM) writes the WAL archive to --store, which --store-read-only (SOMA_STORE_READ_ONLY) forbids; drop one of the two"
            );
        }
        Ok(Some(StreamConfig {
            spool: self.wal_spool.clone(),
            slot: self.wal_slot.clone(),
            partial_interval: self.wal_partial_interval,
            max_unshipped: self.wal_spool_max_segments as usize,
            drain_timeout: self.wal_drain_timeout,
        }))
    }
}
