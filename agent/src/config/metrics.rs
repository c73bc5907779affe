//! Flags of the metrics and probes endpoint.

use std::{net::SocketAddr, time::Duration};

/// Prometheus metrics and the kubelet's probes.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Metrics and probes")]
pub struct MetricsArgs {
    /// Serve Prometheus metrics (`/metrics`, OpenMetrics text) and the kubelet probes (`/livez`,
    /// `/readyz`) on this address. It serves nothing else, so it may bind the pod IP (0.0.0.0).
    #[arg(long, env = "SOMA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// `/livez` fails once the WAL stream has not been receiving, or has had WAL waiting while the
    /// archive stood still, for this long; the restart it causes restarts pg_receivewal.
    #[arg(long, env = "SOMA_WAL_STUCK_AFTER", default_value = "10m",
          value_parser = humantime::parse_duration)]
    pub wal_stuck_after: Duration,
}
