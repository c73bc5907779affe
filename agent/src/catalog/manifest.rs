//! The manifest: the versioned record of one complete backup (its artifacts, what was backed up,
//! by which tool, and how to restore it), as stored in `backups/<id>/manifest.json`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{BackupId, IdEngine, MANIFEST_VERSION};
use crate::{digest::Sha256Digest, pipeline::Expected};

/// How an artifact was compressed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Compression {
    /// Always "zstd" for now.
    pub algorithm: String,
    /// zstd level.
    pub level: i32,
    /// zstd worker threads used.
    pub threads: u32,
}

/// One stored object of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    /// Name inside the backup folder, e.g. "dump.pgdump.zst".
    pub name: String,
    /// What the uncompressed bytes are, e.g. "pg_dump/custom".
    pub format: String,
    /// Uncompressed size.
    pub raw_bytes: u64,
    /// Stored size.
    pub stored_bytes: u64,
    /// sha256 of the uncompressed bytes (hex in the JSON).
    pub raw_sha256: Sha256Digest,
    /// sha256 of the stored object (hex in the JSON).
    pub stored_sha256: Sha256Digest,
    /// Compression settings.
    pub compression: Compression,
    /// Size of the first parts of the multipart upload.
    pub part_size: u64,
    /// Largest part actually uploaded.
    pub max_part_size: u64,
    /// Number of parts.
    pub parts: u32,
    /// Qdrant: the collection this artifact holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collection: Option<String>,
    /// Qdrant: the shard this artifact holds (shard-stream backups).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<u32>,
    /// PostgreSQL: the database this dump holds (whole-cluster logical backups, whose artifact
    /// names are indexes because a database name is not a safe store key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<String>,
}

impl Artifact {
    /// The sizes and digests a download of this artifact must match.
    pub fn expected(&self) -> Expected {
        Expected::all(
            self.raw_sha256,
            self.raw_bytes,
            self.stored_sha256,
            self.stored_bytes,
        )
    }
}

/// Which engine a backup is of. Serialised as the lower-case names manifests have always used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// PostgreSQL (logical dumps and physical base backups).
    Postgres,
    /// Qdrant snapshots.
    Qdrant,
    /// A backup set: one backup of each engine, listed as members.
    Set,
}

impl Engine {
    /// The name in manifests, logs and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Qdrant => "qdrant",
            Engine::Set => "set",
        }
    }

    /// The engine of the gRPC contract.
    pub fn to_proto(self) -> soma_proto::v1::Engine {
        match self {
            Engine::Postgres => soma_proto::v1::Engine::Postgres,
            Engine::Qdrant => soma_proto::v1::Engine::Qdrant,
            Engine::Set => soma_proto::v1::Engine::Set,
        }
    }

    /// The code backup ids of this engine carry.
    pub fn id_engine(self) -> IdEngine {
        match self {
            Engine::Postgres => IdEngine::Postgres,
            Engine::Qdrant => IdEngine::Qdrant,
            Engine::Set => IdEngine::Set,
        }
    }
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of backup, which decides how it is restored. Serialised as manifests always wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// A `pg_dump` of one database (since issue 11 with the roles it needs).
    #[serde(rename = "logical")]
    Logical,
    /// A `pg_dump` of every database of a cluster plus its globals (roles, memberships,
    /// tablespaces), restorable into a fresh cluster.
    #[serde(rename = "logical-cluster")]
    LogicalCluster,
    /// A `pg_basebackup` of the whole cluster, rolled forward with the WAL archive.
    #[serde(rename = "physical")]
    Physical,
    /// Qdrant collection snapshots taken on the node and streamed.
    #[serde(rename = "collection-snapshots")]
    QdrantCollections,
    /// Qdrant shard snapshots streamed without a file on the node.
    #[serde(rename = "shard-stream-snapshots")]
    QdrantShards,
    /// A Qdrant storage snapshot (restored only at Qdrant's start-up).
    #[serde(rename = "full-storage-snapshots")]
    QdrantStorage,
    /// A backup set.
    #[serde(rename = "set")]
    Set,
}

impl Kind {
    /// The name in manifests and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Logical => "logical",
            Kind::LogicalCluster => "logical-cluster",
            Kind::Physical => "physical",
            Kind::QdrantCollections => "collection-snapshots",
            Kind::QdrantShards => "shard-stream-snapshots",
            Kind::QdrantStorage => "full-storage-snapshots",
            Kind::Set => "set",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What was backed up.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    /// Database (PostgreSQL) or collection (Qdrant) name.
    pub name: String,
    /// Server the target lives on, without credentials.
    pub server: String,
    /// Server version as reported by the server.
    pub server_version: String,
}

/// The tool that produced the artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tool {
    /// e.g. "pg_dump".
    pub name: String,
    /// e.g. "15.18".
    pub version: String,
}

/// The versioned record of one complete backup, stored as `backups/<id>/manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Format version ([`MANIFEST_VERSION`]).
    pub manifest_version: u32,
    /// Backup id.
    pub id: BackupId,
    /// Which engine.
    pub engine: Engine,
    /// How it was taken, which decides how it is restored.
    pub kind: Kind,
    /// What was backed up.
    pub target: Target,
    /// The tool that produced the data.
    pub tool: Tool,
    /// Version of the agent that wrote the backup.
    pub agent_version: String,
    /// When the backup started.
    pub started_at: DateTime<Utc>,
    /// When the last artifact was complete.
    pub completed_at: DateTime<Utc>,
    /// Sum of the artifacts' raw sizes.
    pub raw_bytes: u64,
    /// Sum of the artifacts' stored sizes.
    pub stored_bytes: u64,
    /// The stored objects.
    pub artifacts: Vec<Artifact>,
    /// For a backup set: its member backups, each complete with its own manifest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<BackupId>,
    /// Engine-specific facts needed to restore (e.g. Qdrant version, collection configs, aliases).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    /// How the backup's objects (and this manifest) are encrypted; absent: not encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<EncryptionRecord>,
}

/// The encryption of a backup, as its manifest records it: which key a restore needs, by
/// fingerprint. The key itself is never recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EncryptionRecord {
    /// The construction ([`crate::store::crypt::ALGORITHM`]).
    pub algorithm: String,
    /// Fingerprint of the key the objects were sealed with.
    pub key_fingerprint: String,
}

impl Manifest {
    /// The manifest of a backup this agent completes now; artifacts and details are added with
    /// [`with_artifacts`](Self::with_artifacts) and [`with_details`](Self::with_details).
    pub fn completed(
        id: BackupId,
        engine: Engine,
        kind: Kind,
        target: Target,
        tool: Tool,
        started_at: DateTime<Utc>,
    ) -> Self {
        Self {
            manifest_version: MANIFEST_VERSION,
            id,
            engine,
            kind,
            target,
            tool,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            started_at,
            completed_at: Utc::now(),
            raw_bytes: 0,
            stored_bytes: 0,
            artifacts: Vec::new(),
            members: Vec::new(),
            details: serde_json::Value::Null,
            encryption: None,
        }
    }

    /// Records the artifacts, and their sizes as the backup's.
    pub fn with_artifacts(mut self, artifacts: Vec<Artifact>) -> Self {
        self.raw_bytes = artifacts.iter().map(|a| a.raw_bytes).sum();
        self.stored_bytes = artifacts.iter().map(|a| a.stored_bytes).sum();
        self.artifacts = artifacts;
        self
    }

    /// Records the members of a set, and their sizes as the set's.
    pub fn with_members(mut self, members: &[Manifest]) -> Self {
        self.raw_bytes = members.iter().map(|m| m.raw_bytes).sum();
        self.stored_bytes = members.iter().map(|m| m.stored_bytes).sum();
        self.members = members.iter().map(|m| m.id.clone()).collect();
        self
    }

    /// Records engine-specific facts needed to restore.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as the agent wrote it before digests were typed (pretty JSON, as the catalog
    /// stores it), with a Qdrant artifact's optional fields.
    const WRITTEN: &str = r#"{
  "manifest_version": 1,
  "id": "20261129T140000Z-qd-docs-0a1b",
  "engine": "qdrant",
  "kind": "collection-snapshots",
  "target": {
    "name": "docs",
    "server": "http://127.0.0.1:6333",
    "server_version": "1.12.4"
  },
  "tool": {
    "name": "qdrant",
    "version": "1.12.4"
  },
  "agent_version": "0.1.0",
  "started_at": "2026-11-29T14:00:00Z",
  "completed_at": "2026-11-29T14:00:01Z",
  "raw_bytes": 3,
  "stored_bytes": 12,
  "artifacts": [
    {
      "name": "docs.snapshot.zst",
      "format": "qdrant/snapshot",
      "raw_bytes": 3,
      "stored_bytes": 12,
      "raw_sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
      "stored_sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
      "compression": {
        "algorithm": "zstd",
        "level": 3,
        "threads": 0
      },
      "part_size": 8388608,
      "max_part_size": 8388608,
      "parts": 1,
      "collection": "docs"
    }
  ]
}"#;

    #[test]
    fn a_manifest_written_before_typed_digests_reads_and_writes_back_byte_for_byte() {
        let m: Manifest = serde_json::from_str(WRITTEN).unwrap();
        assert_eq!(
            m.artifacts[0].raw_sha256,
            crate::digest::Sha256Digest::of(b"abc")
        );
        assert_eq!(
            m.artifacts[0].stored_sha256,
            crate::digest::Sha256Digest::of(b"")
        );
        assert_eq!(serde_json::to_string_pretty(&m).unwrap(), WRITTEN);
    }

    #[test]
    fn a_manifest_with_a_digest_that_is_not_one_is_refused() {
        let short = WRITTEN.replace("ba7816bf", "ba7816b");
        let err = serde_json::from_str::<Manifest>(&short).unwrap_err();
        assert!(err.to_string().contains("is not a sha256 digest"), "{err}");
    }
}
