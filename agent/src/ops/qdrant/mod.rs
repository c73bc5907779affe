//! Qdrant backups: snapshots streamed from the node through the pipeline into the store
//! ([`backup`]), and streamed back into Qdrant's snapshot upload with the aliases a snapshot does
//! not carry ([`restore`]).

mod backup;
pub(crate) mod cluster_view;
mod drill;
pub(crate) mod layout;
mod plan;
mod restore;

pub(crate) use backup::backup_qdrant;
pub(crate) use plan::QdrantPlans;
pub(crate) use restore::restore_qdrant;

use crate::{catalog::Manifest, error::OpError, jobs::Reporter};
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use soma_proto::v1;

use super::{
    Context,
    details::Details,
    drill::{DrillError, Scratch},
    method::{DrillResult, Method, MethodFuture},
    plan::{EngineRestore, RestoreAsk},
};

use crate::{
    catalog::{BackupId, Kind},
    engine::qdrant::{Alias, NameError, SnapshotDescription, check_name},
};

/// Format of a collection snapshot artifact's uncompressed bytes.
pub(crate) const COLLECTION_FORMAT: &str = "qdrant/collection-snapshot";
/// Format of a shard snapshot artifact.
pub(crate) const SHARD_FORMAT: &str = "qdrant/shard-snapshot";
/// Format of a storage snapshot artifact.
pub(crate) const STORAGE_FORMAT: &str = "qdrant/storage-snapshot";

/// How the snapshots of a backup were taken; recorded in its details as manifests always wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SnapshotMode {
    /// A snapshot of each collection, created on the node and streamed.
    Collection,
    /// Each shard streamed without a file on the node.
    ShardStream,
    /// One snapshot of the whole storage.
    FullStorage,
}

impl SnapshotMode {
    /// The mode a request asks for (`Unspecified` must be resolved to the agent's default first).
    pub(crate) fn from_proto(mode: v1::QdrantMode) -> Self {
        match mode {
            v1::QdrantMode::ShardStream => SnapshotMode::ShardStream,
            v1::QdrantMode::FullStorage => SnapshotMode::FullStorage,
            v1::QdrantMode::Collection | v1::QdrantMode::Unspecified => SnapshotMode::Collection,
        }
    }

    /// The manifest kind of a backup taken this way.
    pub(crate) fn kind(self) -> Kind {
        match self {
            SnapshotMode::Collection => Kind::QdrantCollections,
            SnapshotMode::ShardStream => Kind::QdrantShards,
            SnapshotMode::FullStorage => Kind::QdrantStorage,
        }
    }
}

/// Parses `--qdrant-mode` values.
pub(crate) fn parse_mode(s: &str) -> Result<v1::QdrantMode, String> {
    match s {
        "collection" => Ok(v1::QdrantMode::Collection),
        "shard-stream" => Ok(v1::QdrantMode::ShardStream),
        "full-storage" => Ok(v1::QdrantMode::FullStorage),
        other => Err(format!(
            "unknown Qdrant mode {other:?}: use collection, shard-stream or full-storage"
        )),
    }
}

/// What a Qdrant backup records beyond its artifacts (the manifest's `details`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct QdrantDetails {
    /// `GET /` version of the server backed up.
    pub qdrant_version: String,
    /// How the snapshots were taken.
    pub mode: SnapshotMode,
    /// Aliases of the backed-up collections (snapshots do not include them).
    pub aliases: Vec<Alias>,
    /// Per collection: configuration and size at backup time.
    pub collections: BTreeMap<String, CollectionRecord>,
    /// The cluster backed up, when Qdrant ran distributed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterRecord>,
}

impl QdrantDetails {
    /// The details of a Qdrant manifest (read back from the store: untrusted), or why they are
    /// not what an agent writes.
    pub(crate) fn of(m: &crate::catalog::Manifest) -> Result<Self, QdrantOpError> {
        serde_json::from_value(m.details.clone()).map_err(|e| QdrantOpError::BadDetails {
            id: m.id.clone(),
            reason: e.to_string(),
        })
    }
}

/// The distributed Qdrant a backup was taken from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ClusterRecord {
    /// The node the agent that took it runs beside.
    pub node: crate::engine::qdrant::PeerId,
    /// Every peer of the cluster.
    pub peers: Vec<crate::engine::qdrant::PeerId>,
}

/// One collection as it was when backed up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CollectionRecord {
    /// Approximate points count (`CollectionInfo.points_count`).
    pub points_count: Option<u64>,
    /// `CollectionInfo.config`.
    pub config: Value,
    /// Qdrant's description of the snapshot taken (collection mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotDescription>,
    /// Shards and replicas (shard-stream backups, which every distributed one is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<layout::ShardLayout>,
    /// A sample point for a restore drill's sample search (absent in backups written before
    /// drills and for collections without a dense vector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<SampleRecord>,
}

/// One point of a collection and what an exact search with its vector found at backup time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SampleRecord {
    /// The point's id (an integer or a UUID string, as Qdrant gave it).
    pub id: Value,
    /// Its dense vector.
    pub vector: Value,
    /// The vector's name, for a collection with named vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub using: Option<String>,
    /// The id an exact search with `vector` ranked first (the point itself, unless another point
    /// scores higher, as can happen with the Dot distance).
    pub nearest: Value,
}

impl SampleRecord {
    /// The dense vector of a point's `vector` field: the unnamed one, or the first named dense
    /// vector; `None` for sparse or multi-vectors only.
    pub(crate) fn dense_vector(vector: &Value) -> Option<(Option<String>, Value)> {
        let dense = |v: &Value| v.as_array().is_some_and(|a| a.iter().all(Value::is_number));
        match vector {
            v if dense(v) => Some((None, v.clone())),
            Value::Object(named) => named
                .iter()
                .find(|(_, v)| dense(v))
                .map(|(name, v)| (Some(name.clone()), v.clone())),
            _ => None,
        }
    }
}

/// Why a Qdrant backup or restore was refused; each says what to do instead.
#[derive(Debug, thiserror::Error)]
pub enum QdrantOpError {
    /// Nothing to back up.
    #[error("Qdrant has no collections: nothing to back up")]
    NoCollections,
    /// A storage snapshot asked to be restored through the API.
    #[error(
        "backup {0} is a storage snapshot: Qdrant recovers those only at start-up (qdrant --storage-snapshot FILE), not through its API; restore a collection backup instead"
    )]
    StorageSnapshot(BackupId),
    /// A collection the backup does not hold.
    #[error("collection {collection} is not in backup {id} (it holds: {holds})")]
    NotInBackup {
        /// As asked.
        collection: String,
        /// The backup.
        id: BackupId,
        /// What it holds, comma-separated.
        holds: String,
    },
    /// `--as` with several collections.
    #[error("--as renames one collection: choose it with --collection NAME")]
    RenameNeedsOne,
    /// A collection name in a request that can name no Qdrant collection.
    #[error(
        "collection name {name:?} is invalid: {reason}; name a collection without `/`, `\\` or control characters, and neither `.` nor `..`"
    )]
    InvalidName {
        /// As asked.
        name: String,
        /// What is wrong with it.
        reason: NameError,
    },
    /// An alias that points elsewhere.
    #[error(
        "alias {alias} exists and points to collection {current}; pass --force to repoint it to {wanted}"
    )]
    AliasTaken {
        /// The alias.
        alias: String,
        /// Where it points now.
        current: String,
        /// Where the backup had it.
        wanted: String,
    },
    /// A manifest listing a collection without its snapshot.
    #[error("backup {id} lists collection {collection} but has no snapshot of it")]
    MissingSnapshot {
        /// The backup.
        id: BackupId,
        /// The collection.
        collection: String,
    },
    /// A shard replica lives on a node `GET /cluster` does not list.
    #[error(
        "Qdrant lists a replica on peer {peer}, which its cluster status does not name; wait until the cluster's membership settles (GET /cluster on every node) and retry"
    )]
    UnknownPeer {
        /// The peer.
        peer: crate::engine::qdrant::PeerId,
    },
    /// The cluster's answer about a collection's shards does not add up.
    #[error("collection {collection}: {detail}; the backup would miss shards, so none was taken")]
    ShardsMissing {
        /// The collection.
        collection: String,
        /// What does not add up.
        detail: String,
    },
    /// A shard with no active replica: its data cannot be read now.
    #[error(
        "collection {collection}: shard {shard} has no active replica ({replicas}); a backup never succeeds with a shard missing: bring a node holding it back (GET /collections/{collection}/cluster shows the replicas) and retry"
    )]
    ShardUnavailable {
        /// The collection.
        collection: String,
        /// The shard.
        shard: u32,
        /// Its replicas and their states.
        replicas: String,
    },
    /// No node holding an active replica of a shard answered for it.
    #[error(
        "collection {collection}: shard {shard} cannot be read from any node holding an active replica ({reason}); a backup never succeeds with a shard missing: check those nodes, and that the agent reaches their REST port (--qdrant-peer-port)"
    )]
    PeerUnreachable {
        /// The collection.
        collection: String,
        /// The shard.
        shard: u32,
        /// Each node tried and why it failed.
        reason: String,
    },
    /// The shards' point counts do not add up to the collection's exact count.
    #[error(
        "collection {collection}: its shards hold {sum} points ({shards}) but the collection counts {exact} exactly; a shard may be missing or out of date, so no backup was taken; retry once writes and transfers settle"
    )]
    CountMismatch {
        /// The collection.
        collection: String,
        /// Sum of the shards' counts.
        sum: u64,
        /// `points/count` with `exact`.
        exact: u64,
        /// Per shard counts.
        shards: String,
    },
    /// A replica that stopped being active while it was streamed.
    #[error(
        "collection {collection}: the replica of shard {shard} on peer {peer} became {state} while it was streamed, so it may have missed writes; no backup was recorded; retry once the cluster settles"
    )]
    ShardChanged {
        /// The collection.
        collection: String,
        /// The shard.
        shard: u32,
        /// The peer streamed from.
        peer: crate::engine::qdrant::PeerId,
        /// Its state now.
        state: String,
    },
    /// A node answering at a peer's address that is not that peer.
    #[error(
        "the Qdrant node at {url} is {found}, not peer {expected} as the cluster says: the agent must reach every node itself (--qdrant-url the pod's own node, never a load-balanced Service; peers at their own host names)"
    )]
    WrongPeer {
        /// Where the agent asked.
        url: String,
        /// The peer it expected.
        expected: crate::engine::qdrant::PeerId,
        /// What answered.
        found: String,
    },
    /// Full-storage snapshots asked of a distributed Qdrant.
    #[error(
        "Qdrant runs in distributed mode, where storage snapshots are not supported (each would hold one node's shards only); back up collections instead (--qdrant-mode shard-stream or collection, both stream every shard)"
    )]
    FullStorageInCluster,
    /// A restore could not place every shard.
    #[error("collection {collection} cannot be restored: {detail}; nothing of it was left behind")]
    Placement {
        /// The collection (as restored).
        collection: String,
        /// What failed.
        detail: String,
    },
    /// Replicas that did not become active in time.
    #[error(
        "collection {collection}: replicas still not active after {}: {detail}; the collection was removed; check the nodes, or allow more with --qdrant-snapshot-timeout",
        humantime::format_duration(*.after)
    )]
    NotActive {
        /// The collection.
        collection: String,
        /// How long the restore waited.
        after: std::time::Duration,
        /// Which replicas.
        detail: String,
    },
    /// The restored collection holds fewer or more points than the backup recorded.
    #[error(
        "collection {collection} holds {found} points after the restore, the backup recorded {expected}; the collection was removed"
    )]
    RestoredShort {
        /// The collection (as restored).
        collection: String,
        /// Recorded: a count, or the range writes during the backup allow.
        expected: String,
        /// Counted.
        found: u64,
    },
    /// A shard the layout records without its snapshot.
    #[error(
        "backup {id} records shard {shard} of collection {collection} but has no snapshot of it"
    )]
    MissingShard {
        /// The backup.
        id: BackupId,
        /// The collection.
        collection: String,
        /// The shard.
        shard: u32,
    },
    /// The manifest's Qdrant details do not parse.
    #[error("backup {id}: its manifest's Qdrant details are unreadable: {reason}")]
    BadDetails {
        /// The backup.
        id: BackupId,
        /// Why.
        reason: String,
    },
}

impl QdrantOpError {
    /// The gRPC code a client can act on.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            QdrantOpError::NotInBackup { .. }
            | QdrantOpError::RenameNeedsOne
            | QdrantOpError::InvalidName { .. } => Code::InvalidArgument,
            QdrantOpError::MissingSnapshot { .. }
            | QdrantOpError::MissingShard { .. }
            | QdrantOpError::BadDetails { .. }
            | QdrantOpError::RestoredShort { .. } => Code::DataLoss,
            QdrantOpError::NoCollections
            | QdrantOpError::StorageSnapshot(_)
            | QdrantOpError::AliasTaken { .. }
            | QdrantOpError::FullStorageInCluster
            | QdrantOpError::Placement { .. }
            | QdrantOpError::ShardsMissing { .. }
            | QdrantOpError::CountMismatch { .. }
            | QdrantOpError::UnknownPeer { .. }
            | QdrantOpError::WrongPeer { .. } => Code::FailedPrecondition,
            QdrantOpError::ShardChanged { .. } => Code::Aborted,
            QdrantOpError::ShardUnavailable { .. } | QdrantOpError::PeerUnreachable { .. } => {
                Code::Unavailable
            }
            QdrantOpError::NotActive { .. } => Code::DeadlineExceeded,
        }
    }
}

/// Most shards, shard keys or payload indexes a recorded layout may name: far above any real
/// collection, so a manifest written by someone who can write the bucket cannot make a restore
/// send requests without end.
const MAX_LAYOUT_ITEMS: usize = 4096;

/// What `verify` adds to the digests for a Qdrant backup; empty for other backups.
pub(crate) fn check_shards_complete(m: &crate::catalog::Manifest) -> Result<String, QdrantOpError> {
    if m.engine != crate::catalog::Engine::Qdrant {
        return Ok(String::new());
    }
    let details = QdrantDetails::of(m)?;
    let shards = check_shards(m, &details)?;
    Ok(if shards == 0 {
        String::new()
    } else {
        format!("; every shard its layout records is there ({shards})")
    })
}

/// A shard-by-shard backup holds exactly one snapshot of every shard its layout records, and
/// nothing else, within bounds (the manifest is read back from the store: untrusted). Returns
/// how many shards the layouts record.
pub(super) fn check_shards(
    m: &crate::catalog::Manifest,
    details: &QdrantDetails,
) -> Result<usize, QdrantOpError> {
    let bad = |reason: String| QdrantOpError::BadDetails {
        id: m.id.clone(),
        reason,
    };
    let mut shards = 0;
    for (name, record) in &details.collections {
        let Some(layout) = &record.layout else {
            continue;
        };
        let fields = layout.payload_schema.as_object().map_or(0, |f| f.len());
        if layout.shards.len() > MAX_LAYOUT_ITEMS || fields > MAX_LAYOUT_ITEMS {
            return Err(bad(format!(
                "collection {name:?} records {} shards and {fields} payload indexes, more than {MAX_LAYOUT_ITEMS}",
                layout.shards.len()
            )));
        }
        let mut recorded: Vec<u32> = layout.shards.iter().map(|s| s.id).collect();
        recorded.sort_unstable();
        if recorded.windows(2).any(|w| w[0] == w[1]) {
            return Err(bad(format!("collection {name:?} records a shard twice")));
        }
        let mut held: Vec<u32> = m
            .artifacts
            .iter()
            .filter(|a| a.collection.as_deref() == Some(name))
            .map(|a| a.shard.unwrap_or(u32::MAX))
            .collect();
        held.sort_unstable();
        if let Some(missing) = recorded.iter().find(|id| held.binary_search(id).is_err()) {
            return Err(QdrantOpError::MissingShard {
                id: m.id.clone(),
                collection: name.clone(),
                shard: *missing,
            });
        }
        if held.len() != recorded.len() {
            return Err(bad(format!(
                "collection {name:?}: its layout records {} shards but the backup holds {} snapshots of it",
                recorded.len(),
                held.len()
            )));
        }
        shards += recorded.len();
    }
    Ok(shards)
}

/// Checks collection names a request gives before any reaches Qdrant.
pub(super) fn check_requested<'a>(
    names: impl IntoIterator<Item = &'a String>,
) -> Result<(), QdrantOpError> {
    for name in names {
        check_name(name).map_err(|reason| QdrantOpError::InvalidName {
            name: name.clone(),
            reason,
        })?;
    }
    Ok(())
}

/// Checks the collection names a manifest records (read back from the store, so untrusted)
/// before any reaches Qdrant.
pub(super) fn check_recorded(id: &BackupId, details: &QdrantDetails) -> Result<(), QdrantOpError> {
    for name in details.collections.keys() {
        check_name(name).map_err(|reason| QdrantOpError::BadDetails {
            id: id.clone(),
            reason: format!("it records a collection named {name:?}: {reason}"),
        })?;
    }
    Ok(())
}

/// A store key segment for a collection: its position plus a safe slug (the manifest keeps the
/// real name, which may hold characters no key should).
pub(super) fn collection_slug(index: usize, name: &str) -> String {
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    format!("{index:03}-{slug}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collection_keys_are_safe() {
        assert_eq!(collection_slug(3, "docs/../x y"), "003-docs----x-y");
    }

    #[test]
    fn names_from_requests_and_manifests_are_checked() {
        let asked = ["docs".to_string(), "..".to_string()];
        let err = check_requested(&asked).unwrap_err();
        assert!(matches!(
            &err,
            QdrantOpError::InvalidName { name, reason: NameError::Dots } if name == ".."
        ));
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("\"..\""), "{err}");
        check_requested(&["docs".to_string(), "a.b".to_string()]).unwrap();
        for bad in ["", ".", "a/b", "a\\b", "a\u{1b}[2J"] {
            assert!(check_requested(&[bad.to_string()]).is_err(), "{bad:?}");
        }

        let id = BackupId::parse("20261129T143501Z-qd-all-1a2b").unwrap();
        let mut details = QdrantDetails {
            qdrant_version: "1.18.0".into(),
            mode: SnapshotMode::Collection,
            aliases: vec![],
            collections: BTreeMap::new(),
            cluster: None,
        };
        let record = CollectionRecord {
            points_count: None,
            config: Value::Null,
            snapshot: None,
            layout: None,
            sample: None,
        };
        details.collections.insert("docs".into(), record.clone());
        check_recorded(&id, &details).unwrap();
        details.collections.insert(".".into(), record);
        let err = check_recorded(&id, &details).unwrap_err();
        assert!(matches!(err, QdrantOpError::BadDetails { .. }));
        assert_eq!(err.code(), tonic::Code::DataLoss);
    }

    #[test]
    fn modes_read_as_manifests_wrote_them() {
        for (text, mode) in [
            ("\"collection\"", SnapshotMode::Collection),
            ("\"shard-stream\"", SnapshotMode::ShardStream),
            ("\"full-storage\"", SnapshotMode::FullStorage),
        ] {
            assert_eq!(serde_json::from_str::<SnapshotMode>(text).unwrap(), mode);
            assert_eq!(serde_json::to_string(&mode).unwrap(), text);
        }
    }
}

/// Qdrant snapshots as a [`Method`]: a verify also checks that a shard-by-shard backup holds
/// every shard its layout records; storage snapshots cannot be drilled.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QdrantMethod;

impl Method for QdrantMethod {
    fn check_drillable(&self, ctx: &Context, m: &Manifest) -> Result<(), OpError> {
        if m.kind == Kind::QdrantStorage {
            return Err(DrillError::Unsupported {
                id: m.id.clone(),
                kind: "Qdrant storage snapshot",
                why: "Qdrant recovers storage snapshots only at its start-up, not into a scratch collection; drill a collection backup instead",
            }
            .into());
        }
        ctx.qdrant().map(drop)
    }

    fn drill<'a>(
        &'a self,
        ctx: &'a Arc<Context>,
        m: &'a Manifest,
        scratch: &'a Scratch,
        reporter: &'a Reporter,
    ) -> MethodFuture<'a, DrillResult> {
        Box::pin(drill::drill(ctx, m, scratch, reporter))
    }

    fn plan_restore(
        &self,
        ctx: &Context,
        m: Manifest,
        ask: &RestoreAsk,
        _set: Option<&BackupId>,
    ) -> Result<Box<dyn EngineRestore>, OpError> {
        ctx.qdrant()?;
        Ok(Box::new(plan::QdrantRestore::new(m, ask)))
    }

    fn details(&self, m: &Manifest) -> Result<Details, OpError> {
        Ok(Details::Qdrant(QdrantDetails::of(m)?))
    }

    fn verify_manifest(&self, m: &Manifest) -> Result<String, OpError> {
        Ok(check_shards_complete(m)?)
    }
}
