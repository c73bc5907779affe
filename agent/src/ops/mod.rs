//! The operations themselves: backup, restore, verify and delete, composed from engine, pipeline,
//! store and catalog. The server turns a request into a [`plan`]; each plan runs inside a job
//! (see [`crate::jobs`]) and reports through a [`Reporter`].

pub(crate) mod artifact;
pub(crate) mod delete;
pub(crate) mod details;
pub(crate) mod drill;
pub(crate) mod method;
pub(crate) mod physical;
pub(crate) mod plan;
pub(crate) mod postgres;
pub(crate) mod qdrant;
pub(crate) mod set;
pub(crate) mod verify;

use soma_proto::v1;

use crate::{
    catalog::{Catalog, Engine, Manifest},
    engine::{postgres::Postgres, qdrant::Qdrant},
    error::OpError,
    pipeline::Settings,
};

/// Everything an operation needs from the agent.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    /// Where this agent writes: new backups, deletes and the WAL archive.
    pub catalog: Catalog,
    /// Where restores, verifies, list and describe read from: the same store as `catalog`, or a
    /// read-only one (`--restore-from`) that this agent never writes to.
    pub source: Catalog,
    /// The PostgreSQL server, when configured.
    pub postgres: Option<Postgres>,
    /// The Qdrant server, when configured.
    pub qdrant: Option<Qdrant>,
    /// How Qdrant snapshots are taken when a request does not say.
    pub qdrant_mode: v1::QdrantMode,
    /// Compression and part settings.
    pub settings: Settings,
    /// The continuous WAL archive, when streaming is on.
    pub wal_stream: Option<WalStreamInfo>,
    /// The agent's retention policy (`--retention`), applied by `prune` unless a request overrides it.
    pub retention: Option<crate::retention::Policy>,
    /// Where restore drills of base backups lay their scratch data directories (`--drill-dir`).
    pub drill_dir: std::path::PathBuf,
    /// Where physical restores requested through the API may write (`--restore-root`); none
    /// without it.
    pub restore_root: Option<std::path::PathBuf>,
    /// Where the PostgreSQL server's last recovery ended, as the watch last found it.
    pub replay: physical::ReplayWatch,
}

/// The WAL stream as the rest of the agent sees it.
#[derive(Debug, Clone)]
pub(crate) struct WalStreamInfo {
    /// Its settings.
    pub config: crate::wal::stream::StreamConfig,
    /// Its live status.
    pub status: crate::wal::stream::SharedStatus,
}

impl Context {
    /// The PostgreSQL engine, or an error saying how to configure it.
    pub(crate) fn postgres(&self) -> Result<&Postgres, OpError> {
        self.postgres.as_ref().ok_or(OpError::NotConfigured {
            engine: Engine::Postgres,
        })
    }

    /// The Qdrant engine, or an error saying how to configure it.
    pub(crate) fn qdrant(&self) -> Result<&Qdrant, OpError> {
        self.qdrant.as_ref().ok_or(OpError::NotConfigured {
            engine: Engine::Qdrant,
        })
    }
}

/// What a finished operation reports: a sentence for humans and the backup it was about.
#[derive(Debug, Clone)]
pub(crate) struct Outcome {
    /// One line saying what was done.
    pub summary: String,
    /// The backup written, restored or verified.
    pub manifest: Manifest,
    /// A restore drill's report.
    pub drill: Option<drill::DrillReport>,
}

impl Outcome {
    /// An outcome about `manifest`.
    pub(crate) fn new(summary: String, manifest: Manifest) -> Self {
        Self {
            summary,
            manifest,
            drill: None,
        }
    }
}

/// A context over a fresh local store in a temporary directory, with the engines given and the
/// smallest pipeline settings: what the unit tests of operations and retention run against.
#[cfg(test)]
pub(crate) async fn test_context(
    postgres: Option<Postgres>,
    qdrant: Option<Qdrant>,
) -> (tempfile::TempDir, Context) {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::open(&format!("file://{}", dir.path().display()))
        .await
        .unwrap();
    let catalog = Catalog::new(store);
    let ctx = Context {
        source: catalog.clone(),
        catalog,
        postgres,
        qdrant,
        qdrant_mode: v1::QdrantMode::Collection,
        settings: Settings {
            compression_level: 3,
            compression_threads: 0,
            part_size: crate::store::MIN_PART_SIZE,
            parts_in_flight: 1,
        },
        wal_stream: None,
        retention: None,
        drill_dir: dir.path().join("drill"),
        restore_root: None,
        replay: Default::default(),
    };
    (dir, ctx)
}
