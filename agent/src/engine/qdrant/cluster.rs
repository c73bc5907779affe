//! A distributed Qdrant: who the peers are (`GET /cluster`), where each shard's replicas live and
//! in which state (`GET /collections/{c}/cluster`), and what a restore needs to rebuild a
//! collection's layout (shard keys, payload indexes, exact counts).
//!
//! Followed: the OpenAPI document's `ClusterStatus`, `CollectionClusterInfo`, `LocalShardInfo`,
//! `RemoteShardInfo` and `ReplicaState` schemas (Qdrant 1.18). Everything here comes from the
//! server and is bounded before it is used: at most [`MAX_PEERS`] peers and [`MAX_REPLICAS`]
//! replica entries, peer URIs reduced to a host name.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use super::{Qdrant, QdrantError};

/// A Qdrant peer id (a random u64 chosen by each node).
pub(crate) type PeerId = u64;

/// Most peers a cluster answer may list; far above any real cluster.
const MAX_PEERS: usize = 1024;
/// Most replica entries a collection's cluster answer may list.
const MAX_REPLICAS: usize = 1 << 16;

/// A custom shard key (`ShardKey`: a keyword or a number).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ShardKey {
    /// A number key.
    Number(u64),
    /// A keyword key.
    Keyword(String),
}

impl std::fmt::Display for ShardKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShardKey::Number(n) => write!(f, "{n}"),
            ShardKey::Keyword(k) => write!(f, "{k:?}"),
        }
    }
}

/// The state of one replica of a shard (`ReplicaState`); only `Active` serves everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplicaState {
    /// Serves reads and writes.
    Active,
    /// Failed; Qdrant will try to recover it from another replica.
    Dead,
    /// Receiving a transfer.
    Partial,
    /// Being created.
    Initializing,
    /// Receives writes, serves no reads.
    Listener,
    /// Receiving a snapshot transfer.
    PartialSnapshot,
    /// Being recovered.
    Recovery,
    /// Being resharded.
    Resharding,
    /// Being resharded down (still serves).
    ReshardingScaleDown,
    /// Serves reads only.
    ActiveRead,
    /// Waiting for a manual snapshot recovery.
    ManualRecovery,
    /// A state this agent does not know (a newer Qdrant): treated as not active.
    #[serde(other)]
    Unknown,
}

impl ReplicaState {
    /// Whether a replica in this state holds the shard's current data (the states Qdrant itself
    /// counts as active when it decides whether a recovered replica is the only one).
    pub fn is_active(self) -> bool {
        matches!(
            self,
            ReplicaState::Active | ReplicaState::ReshardingScaleDown
        )
    }
}

impl std::fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Whether the server runs distributed, and its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterStatus {
    /// A single node (`cluster.enabled` off).
    Disabled,
    /// Distributed mode.
    Enabled {
        /// The node asked.
        peer_id: PeerId,
        /// Every peer consensus knows, with its p2p URI as Qdrant reports it.
        peers: BTreeMap<PeerId, String>,
    },
}

/// One shard replica held by the node asked (`LocalShardInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalShard {
    /// Shard id.
    pub shard_id: u32,
    /// Its custom key, when the collection uses custom sharding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_key: Option<ShardKey>,
    /// Points in this replica as the node estimates them.
    pub points_count: u64,
    /// Its state.
    pub state: ReplicaState,
}

/// One shard replica held by another node (`RemoteShardInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteShard {
    /// Shard id.
    pub shard_id: u32,
    /// Its custom key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_key: Option<ShardKey>,
    /// The node holding it.
    pub peer_id: PeerId,
    /// Its state.
    pub state: ReplicaState,
}

/// Where a collection's shards live, as one node sees it (`CollectionClusterInfo`).
#[derive(Debug, Clone, Deserialize)]
pub struct CollectionCluster {
    /// The node asked.
    pub peer_id: PeerId,
    /// Shards in the collection.
    pub shard_count: u64,
    /// Replicas on the node asked.
    pub local_shards: Vec<LocalShard>,
    /// Replicas on other nodes.
    pub remote_shards: Vec<RemoteShard>,
    /// Transfers under way (only counted).
    #[serde(default)]
    pub shard_transfers: Vec<Value>,
}

/// One replica wherever it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// The node holding it.
    pub peer_id: PeerId,
    /// Its state.
    pub state: ReplicaState,
}

impl CollectionCluster {
    /// Every shard with its key and all its replicas (local and remote), by shard id.
    pub fn shards(&self) -> BTreeMap<u32, (Option<ShardKey>, Vec<Replica>)> {
        let mut shards: BTreeMap<u32, (Option<ShardKey>, Vec<Replica>)> = BTreeMap::new();
        for l in &self.local_shards {
            let entry = shards
                .entry(l.shard_id)
                .or_insert_with(|| (l.shard_key.clone(), Vec::new()));
            entry.1.push(Replica {
                peer_id: self.peer_id,
                state: l.state,
            });
        }
        for r in &self.remote_shards {
            let entry = shards
                .entry(r.shard_id)
                .or_insert_with(|| (r.shard_key.clone(), Vec::new()));
            entry.1.push(Replica {
                peer_id: r.peer_id,
                state: r.state,
            });
        }
        for (_, replicas) in shards.values_mut() {
            replicas.sort_by_key(|r| r.peer_id);
            replicas.dedup_by_key(|r| r.peer_id);
        }
        shards
    }
}

impl Qdrant {
    /// `GET /cluster`: distributed or not, and the peers.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, QdrantError> {
        #[derive(Deserialize)]
        struct Raw {
            status: String,
            #[serde(default)]
            peer_id: Option<PeerId>,
            #[serde(default)]
            peers: BTreeMap<String, PeerInfo>,
        }
        #[derive(Deserialize)]
        struct PeerInfo {
            uri: String,
        }
        let raw: Raw = self
            .call(Method::GET, &["cluster"], &[], None, || "cluster".into())
            .await?;
        let bad = |detail: String| QdrantError::Protocol {
            endpoint: "/cluster".into(),
            detail,
        };
        match raw.status.as_str() {
            "disabled" => Ok(ClusterStatus::Disabled),
            "enabled" => {
                let peer_id = raw
                    .peer_id
                    .ok_or_else(|| bad("an enabled cluster without this node's peer_id".into()))?;
                if raw.peers.len() > MAX_PEERS {
                    return Err(bad(format!(
                        "it lists {} peers, more than {MAX_PEERS}",
                        raw.peers.len()
                    )));
                }
                let mut peers = BTreeMap::new();
                for (id, info) in raw.peers {
                    let id: PeerId = id
                        .parse()
                        .map_err(|_| bad(format!("peer id {id:?} is not a number")))?;
                    peers.insert(id, info.uri);
                }
                if !peers.contains_key(&peer_id) {
                    return Err(bad(format!(
                        "this node's peer id {peer_id} is not among its peers"
                    )));
                }
                Ok(ClusterStatus::Enabled { peer_id, peers })
            }
            other => Err(bad(format!("unknown cluster status {other:?}"))),
        }
    }

    /// `GET /collections/{c}/cluster` as this node sees it.
    pub async fn collection_cluster(&self, c: &str) -> Result<CollectionCluster, QdrantError> {
        let info: CollectionCluster = self
            .call(
                Method::GET,
                &["collections", c, "cluster"],
                &[],
                None,
                || format!("collection {c}"),
            )
            .await?;
        if info.local_shards.len() + info.remote_shards.len() > MAX_REPLICAS {
            return Err(QdrantError::Protocol {
                endpoint: format!("/collections/{c}/cluster"),
                detail: format!("more than {MAX_REPLICAS} replicas listed"),
            });
        }
        Ok(info)
    }

    /// Exact number of points (`POST /collections/{c}/points/count` with `exact`).
    pub async fn exact_count(&self, c: &str) -> Result<u64, QdrantError> {
        #[derive(Deserialize)]
        struct Count {
            count: u64,
        }
        let n: Count = self
            .call(
                Method::POST,
                &["collections", c, "points", "count"],
                &[],
                Some(&serde_json::json!({"exact": true})),
                || format!("collection {c}"),
            )
            .await?;
        Ok(n.count)
    }

    /// Creates a custom shard key with its shards (`PUT /collections/{c}/shards`).
    pub async fn create_shard_key(
        &self,
        c: &str,
        key: &ShardKey,
        shards_number: u32,
        replication_factor: u32,
    ) -> Result<(), QdrantError> {
        let body = serde_json::json!({
            "shard_key": key,
            "shards_number": shards_number,
            "replication_factor": replication_factor,
        });
        let _: Value = self
            .call(
                Method::PUT,
                &["collections", c, "shards"],
                &[("wait", "true")],
                Some(&body),
                || format!("collection {c}"),
            )
            .await?;
        Ok(())
    }

    /// Creates a payload index (`PUT /collections/{c}/index`), `schema` as
    /// `CollectionInfo.payload_schema` recorded it (`data_type` and `params`).
    pub async fn create_payload_index(
        &self,
        c: &str,
        field: &str,
        schema: &Value,
    ) -> Result<(), QdrantError> {
        let field_schema = match schema.get("params").filter(|p| p.is_object()) {
            Some(params) => params.clone(),
            None => schema.get("data_type").cloned().unwrap_or(Value::Null),
        };
        let body = serde_json::json!({"field_name": field, "field_schema": field_schema});
        let _: Value = self
            .call(
                Method::PUT,
                &["collections", c, "index"],
                &[("wait", "true")],
                Some(&body),
                || format!("collection {c}"),
            )
            .await?;
        Ok(())
    }

    /// A client for the peer whose p2p URI is `uri`: its host, this client's scheme, API key, CA
    /// and limits, and the peers' REST port. Only the host is taken from the server's answer.
    pub fn peer(&self, uri: &str) -> Result<Qdrant, QdrantError> {
        let bad = |detail: String| QdrantError::Protocol {
            endpoint: "/cluster".into(),
            detail,
        };
        let parsed = Url::parse(uri).map_err(|e| bad(format!("peer URI {uri:?}: {e}")))?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad(format!("peer URI {uri:?} names no host")))?;
        let mut base = self.base.clone();
        base.set_host(Some(host))
            .map_err(|e| bad(format!("peer URI {uri:?}: {e}")))?;
        base.set_port(Some(self.peer_port))
            .map_err(|()| bad(format!("peer URI {uri:?}: cannot set a port")))?;
        Ok(Qdrant {
            base,
            ..self.clone()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_as_the_openapi_document_shapes_them() {
        let info: CollectionCluster = serde_json::from_value(serde_json::json!({
            "peer_id": 7, "shard_count": 3,
            "local_shards": [{"shard_id": 0, "points_count": 10, "state": "Active"},
                             {"shard_id": 2, "points_count": 4, "state": "Partial"}],
            "remote_shards": [{"shard_id": 1, "peer_id": 9, "state": "Active"},
                              {"shard_id": 2, "peer_id": 9, "state": "SomethingNew"},
                              {"shard_id": 0, "peer_id": 9, "state": "Dead", "shard_key": "eu"}],
            "shard_transfers": []
        }))
        .unwrap();
        let shards = info.shards();
        assert_eq!(shards.len(), 3);
        assert_eq!(
            shards[&2].1,
            vec![
                Replica {
                    peer_id: 7,
                    state: ReplicaState::Partial
                },
                Replica {
                    peer_id: 9,
                    state: ReplicaState::Unknown
                }
            ]
        );
        assert!(!ReplicaState::Unknown.is_active());
        assert_eq!(
            serde_json::from_value::<ShardKey>(serde_json::json!(12)).unwrap(),
            ShardKey::Number(12)
        );
        assert_eq!(
            serde_json::from_value::<ShardKey>(serde_json::json!("eu")).unwrap(),
            ShardKey::Keyword("eu".into())
        );
    }

    #[test]
    fn peers_keep_only_the_host_of_their_uri() {
        let q = Qdrant::new("https://127.0.0.1:6333", Some("k".into()), None)
            .unwrap()
            .with_peer_port(7333);
        let p = q
            .peer("http://qdrant-1.qdrant-headless:6335/some/path?x=1")
            .unwrap();
        assert_eq!(p.url(), "https://qdrant-1.qdrant-headless:7333");
        assert_eq!(p.api_key.as_deref(), Some("k"));
        assert!(q.peer("not a uri").is_err());
        assert!(q.peer("unix:/run/socket").is_err());
    }
}
