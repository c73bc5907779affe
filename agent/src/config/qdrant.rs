//! Flags of the Qdrant engine.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;

use crate::engine::qdrant::{Qdrant, Timeouts};

/// The Qdrant server to back up and how long it may take.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Qdrant")]
pub struct QdrantArgs {
    /// URL of the Qdrant REST API, e.g. `http://127.0.0.1:6333`. The API key comes from
    /// SOMA_QDRANT_API_KEY (never a flag).
    #[arg(long, env = "SOMA_QDRANT_URL")]
    pub qdrant_url: Option<String>,

    /// PEM file with the CA that signed Qdrant's TLS certificate (for https:// with a private CA).
    #[arg(long, env = "SOMA_QDRANT_CA_CERT")]
    pub qdrant_ca_cert: Option<PathBuf>,

    /// REST port of the other nodes of a distributed Qdrant (default: the port of --qdrant-url).
    /// The agent finds the peers in Qdrant's `GET /cluster` and reaches each at its peer URI's
    /// host on this port, as pods behind a headless service are reached.
    #[arg(long, env = "SOMA_QDRANT_PEER_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub qdrant_peer_port: Option<u16>,

    /// Longest a Qdrant snapshot download or shard stream may go without a byte; past it the
    /// backup fails, naming the snapshot, instead of waiting on a frozen node.
    #[arg(long, env = "SOMA_QDRANT_STALL_TIMEOUT", default_value = "5m",
          value_parser = super::parse_timeout)]
    pub qdrant_stall_timeout: Duration,

    /// Longest Qdrant may take to write a snapshot (`wait=true`), or to take an uploaded one and
    /// recover from it; past it the backup or restore fails, naming the collection.
    #[arg(long, env = "SOMA_QDRANT_SNAPSHOT_TIMEOUT", default_value = "2h",
          value_parser = super::parse_timeout)]
    pub qdrant_snapshot_timeout: Duration,

    /// Default Qdrant snapshot mode: `collection` (snapshot on the node, stream, delete),
    /// `shard-stream` (no file on the node; Qdrant ≥ 1.12) or `full-storage` (single node).
    #[arg(long, env = "SOMA_QDRANT_MODE", default_value = "collection",
          value_parser = crate::ops::qdrant::parse_mode)]
    pub qdrant_mode: soma_proto::v1::QdrantMode,
}

impl QdrantArgs {
    /// The engine, when --qdrant-url is given. The API key is read from the environment only, so
    /// it never shows in a process list.
    pub fn engine(&self) -> anyhow::Result<Option<Qdrant>> {
        let Some(url) = &self.qdrant_url else {
            return Ok(None);
        };
        let api_key = std::env::var("SOMA_QDRANT_API_KEY").ok();
        let qdrant = Qdrant::new(url, api_key, self.qdrant_ca_cert.as_deref())
            .context("--qdrant-url / SOMA_QDRANT_URL")?
            .with_timeouts(Timeouts {
                stall: self.qdrant_stall_timeout,
                snapshot: self.qdrant_snapshot_timeout,
            });
        Ok(Some(match self.qdrant_peer_port {
            Some(port) => qdrant.with_peer_port(port),
            None => qdrant,
        }))
    }
}
