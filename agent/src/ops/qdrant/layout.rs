//! Where a collection's shards live, read before a backup and rebuilt by a restore.
//!
//! A collection snapshot holds only the shards of the node it is taken on (Qdrant's docs:
//! "Snapshots … in distributed mode … must be created for each node"), so a backup of a
//! distributed Qdrant streams every shard from one node that holds an active replica of it, and
//! records the layout a restore needs: shard number, replication, sharding method and keys,
//! payload indexes and each shard's point count. A single node is the one-node case of the same
//! thing: its cluster API lists every shard as local.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::QdrantOpError;
use crate::{
    engine::qdrant::{
        ClusterStatus, CollectionCluster, PeerId, Qdrant, QdrantError, Replica, ShardKey,
    },
    error::OpError,
};

/// How often a restore looks at the replicas' states while it waits for them to become active.
const ACTIVE_POLL: Duration = Duration::from_millis(250);
/// How many times the layout and the exact count are read again when their sums disagree (a
/// write landing between the two reads, an optimizer merging segments).
const COUNT_READS: usize = 3;
/// Pause between those reads, for an optimizer or a write to finish.
const COUNT_RETRY: Duration = Duration::from_secs(1);

/// The nodes of the Qdrant this agent talks to.
#[derive(Debug, Clone)]
pub(crate) struct Nodes {
    /// Distributed mode is on.
    pub distributed: bool,
    /// This node's peer id, when distributed.
    pub this: Option<PeerId>,
    /// Every peer consensus knows, with its p2p URI.
    pub peers: BTreeMap<PeerId, String>,
}

impl Nodes {
    /// Asks the node the agent is configured with.
    pub(crate) async fn read(q: &Qdrant) -> Result<Nodes, QdrantError> {
        Ok(match q.cluster_status().await? {
            ClusterStatus::Disabled => Nodes {
                distributed: false,
                this: None,
                peers: BTreeMap::new(),
            },
            ClusterStatus::Enabled { peer_id, peers } => Nodes {
                distributed: true,
                this: Some(peer_id),
                peers,
            },
        })
    }

    /// A client for `peer`: the configured one for this node (and for a single node), the
    /// peer's host on the peers' REST port otherwise.
    pub(crate) fn client(&self, q: &Qdrant, peer: PeerId) -> Result<Qdrant, OpError> {
        if !self.distributed || self.this == Some(peer) {
            return Ok(q.clone());
        }
        let uri = self
            .peers
            .get(&peer)
            .ok_or(QdrantOpError::UnknownPeer { peer })?;
        Ok(q.peer(uri)?)
    }
}

impl Nodes {
    /// [`Nodes::client`] for a node this backup or restore streams to or from, once checked to
    /// be the peer it is taken for (`GET /cluster` on it names that peer id): a load-balanced
    /// `--qdrant-url` or a reused peer address must not swap one node's replica for another's.
    pub(crate) async fn checked_client(
        &self,
        q: &Qdrant,
        peer: PeerId,
        checked: &mut std::collections::BTreeSet<PeerId>,
    ) -> Result<Qdrant, OpError> {
        let node = self.client(q, peer)?;
        if !self.distributed || checked.contains(&peer) {
            return Ok(node);
        }
        match node.cluster_status().await? {
            ClusterStatus::Enabled { peer_id, .. } if peer_id == peer => {
                checked.insert(peer);
                Ok(node)
            }
            ClusterStatus::Enabled { peer_id, .. } => Err(QdrantOpError::WrongPeer {
                url: node.url(),
                expected: peer,
                found: peer_id.to_string(),
            }
            .into()),
            ClusterStatus::Disabled => Err(QdrantOpError::WrongPeer {
                url: node.url(),
                expected: peer,
                found: "a single node".into(),
            }
            .into()),
        }
    }
}

/// How points are spread over shards (`ShardingMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ShardingMethod {
    /// By a hash of the point id.
    Auto,
    /// By a shard key the writer names.
    Custom,
}

/// A collection's layout at backup time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ShardLayout {
    /// `shard_number` (per shard key with custom sharding).
    pub shard_number: u32,
    /// Replicas per shard.
    pub replication_factor: u32,
    /// Replicas a write must reach.
    pub write_consistency_factor: u32,
    /// Auto or custom.
    pub sharding_method: ShardingMethod,
    /// Exact points count of the collection when its layout was read.
    pub exact_count: u64,
    /// Exact count once every shard was streamed: with writes during the backup the restored
    /// collection holds a count between the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact_count_end: Option<u64>,
    /// `CollectionInfo.payload_schema`: the payload indexes to create again.
    #[serde(default)]
    pub payload_schema: Value,
    /// Every shard, by id.
    pub shards: Vec<ShardRecord>,
}

/// One shard at backup time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ShardRecord {
    /// Shard id.
    pub id: u32,
    /// Its custom key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<ShardKey>,
    /// Points in the replica streamed, as its node counted them.
    pub points_count: u64,
    /// The node whose replica was streamed.
    pub taken_from: PeerId,
    /// Every node that held a replica.
    pub replicas: Vec<PeerId>,
}

/// A shard to stream: which node to ask.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    /// Shard id.
    pub shard: u32,
    /// The node holding the active replica chosen.
    pub peer: PeerId,
}

/// Reads the layout of collection `c` (and then its `CollectionInfo`, returned too) and chooses
/// one active replica of every shard; fails by name when a shard has none, when a node holding one cannot say how many points it has, or
/// when the shards' counts do not add up to the collection's exact count.
pub(crate) async fn read_layout(
    q: &Qdrant,
    nodes: &Nodes,
    c: &str,
) -> Result<(ShardLayout, Vec<Source>, Value), OpError> {
    let mut last = None;
    let mut attempt = 0;
    for _ in 0..COUNT_READS {
        let here = q.collection_cluster(c).await?;
        let shards = here.shards();
        check_shards(c, &here, &shards)?;
        let records = ShardViews::new(q, nodes, c, &here).records(&shards).await?;
        // Only now: the collection's count and info need every shard, and the shards were
        // checked first so a missing one is named as such. Two counts around the info: when
        // they differ, writes are landing.
        let exact_before = q.exact_count(c).await?;
        let info = q.collection_info(c).await?;
        let exact_count = q.exact_count(c).await?;
        let settled = exact_before == exact_count;
        let sum: u64 = records.iter().map(|r| r.points_count).sum();
        let layout = layout_of(&info, exact_count, records);
        attempt += 1;
        // Writes in flight on every read: the shards' estimates cannot settle, and the listing
        // of every shard id against the shard count already proved none is missing.
        let busy = !settled && attempt == COUNT_READS;
        if busy {
            tracing::warn!(
                collection = c,
                sum,
                exact_before,
                exact_count,
                "writes kept changing the collection while its shards were counted: their sum is not compared"
            );
        }
        if sum == exact_count || busy {
            let sources = layout
                .shards
                .iter()
                .map(|s| Source {
                    shard: s.id,
                    peer: s.taken_from,
                })
                .collect();
            return Ok((layout, sources, info));
        }
        last = Some((sum, layout));
        if attempt < COUNT_READS {
            tokio::time::sleep(COUNT_RETRY).await;
        }
    }
    let (sum, layout) = last.expect("read at least once");
    Err(QdrantOpError::CountMismatch {
        collection: c.to_string(),
        sum,
        exact: layout.exact_count,
        shards: layout
            .shards
            .iter()
            .map(|s| format!("shard {}: {}", s.id, s.points_count))
            .collect::<Vec<_>>()
            .join(", "),
    }
    .into())
}

/// Shards as the cluster lists them, by id: their key and replicas.
type ListedShards = BTreeMap<u32, (Option<ShardKey>, Vec<Replica>)>;

/// Every shard Qdrant counts is listed and has an active replica, before anything else is asked
/// (the collection's count and info need every shard: a missing one would be named only by
/// Qdrant).
fn check_shards(c: &str, here: &CollectionCluster, shards: &ListedShards) -> Result<(), OpError> {
    if shards.len() as u64 != here.shard_count {
        return Err(QdrantOpError::ShardsMissing {
            collection: c.to_string(),
            detail: format!(
                "Qdrant counts {} shards but lists replicas of {}",
                here.shard_count,
                shards.len()
            ),
        }
        .into());
    }
    for (&id, (_, replicas)) in shards {
        if active_replicas(here.peer_id, replicas).is_empty() {
            return Err(QdrantOpError::ShardUnavailable {
                collection: c.to_string(),
                shard: id,
                replicas: describe_replicas(replicas),
            }
            .into());
        }
    }
    Ok(())
}

/// Each node's own view of a collection: `points_count` is local to the node asked. A node that
/// does not answer is asked once; its shards are taken from another active replica.
struct ShardViews<'a> {
    q: &'a Qdrant,
    nodes: &'a Nodes,
    c: &'a str,
    this: PeerId,
    views: BTreeMap<PeerId, Result<CollectionCluster, String>>,
}

impl<'a> ShardViews<'a> {
    fn new(q: &'a Qdrant, nodes: &'a Nodes, c: &'a str, here: &CollectionCluster) -> Self {
        let mut views = BTreeMap::new();
        views.insert(here.peer_id, Ok(here.clone()));
        ShardViews {
            q,
            nodes,
            c,
            this: here.peer_id,
            views,
        }
    }

    /// Every shard with the peer it is taken from and that peer's point count.
    async fn records(&mut self, shards: &ListedShards) -> Result<Vec<ShardRecord>, OpError> {
        let c = self.c;
        let mut records = Vec::with_capacity(shards.len());
        for (&id, (key, replicas)) in shards {
            let candidates = active_replicas(self.this, replicas);
            if candidates.is_empty() {
                return Err(QdrantOpError::ShardUnavailable {
                    collection: c.to_string(),
                    shard: id,
                    replicas: describe_replicas(replicas),
                }
                .into());
            }
            let mut tried = Vec::new();
            let mut found = None;
            for peer in candidates {
                match self.local_count(peer, id).await {
                    Ok(points_count) => {
                        found = Some((peer, points_count));
                        break;
                    }
                    Err(reason) => tried.push(format!("peer {peer}: {reason}")),
                }
            }
            let Some((peer, points_count)) = found else {
                return Err(QdrantOpError::PeerUnreachable {
                    collection: c.to_string(),
                    shard: id,
                    reason: tried.join("; "),
                }
                .into());
            };
            if !tried.is_empty() {
                tracing::warn!(collection = c, shard = id, peer, skipped = %tried.join("; "), "shard taken from another active replica");
            }
            records.push(ShardRecord {
                id,
                key: key.clone(),
                points_count,
                taken_from: peer,
                replicas: replicas.iter().map(|r| r.peer_id).collect(),
            });
        }
        Ok(records)
    }

    /// The points of shard `id` on `peer`, or why that peer cannot give it.
    async fn local_count(&mut self, peer: PeerId, id: u32) -> Result<u64, String> {
        if let std::collections::btree_map::Entry::Vacant(slot) = self.views.entry(peer) {
            let view = match self.nodes.client(self.q, peer) {
                Ok(node) => node
                    .collection_cluster(self.c)
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            slot.insert(view);
        }
        match &self.views[&peer] {
            Ok(view) => view
                .local_shards
                .iter()
                .find(|l| l.shard_id == id && l.state.is_active())
                .map(|l| l.points_count)
                .ok_or_else(|| "it does not hold an active replica of the shard".into()),
            Err(e) => Err(e.clone()),
        }
    }
}

/// The layout recorded for a restore, from the collection's info and the shards as counted.
fn layout_of(info: &Value, exact_count: u64, records: Vec<ShardRecord>) -> ShardLayout {
    let params = &info["config"]["params"];
    ShardLayout {
        shard_number: param(params, "shard_number"),
        replication_factor: param(params, "replication_factor"),
        write_consistency_factor: param(params, "write_consistency_factor"),
        sharding_method: if params["sharding_method"] == "custom" {
            ShardingMethod::Custom
        } else {
            ShardingMethod::Auto
        },
        exact_count,
        exact_count_end: None,
        payload_schema: info.get("payload_schema").cloned().unwrap_or(Value::Null),
        shards: records,
    }
}

impl ShardLayout {
    /// The exact counts a restore of this backup may hold: the collection's at the start and at
    /// the end of the backup (writes during it land in some shards' snapshots and not others).
    pub(crate) fn count_range(&self) -> (u64, u64) {
        let end = self.exact_count_end.unwrap_or(self.exact_count);
        (self.exact_count.min(end), self.exact_count.max(end))
    }
}

/// An integer parameter of `config.params`, 1 when absent (Qdrant's default for all three).
fn param(params: &Value, name: &str) -> u32 {
    params[name]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(1)
}

/// The nodes holding an active replica of a shard, in the order they are tried: this node first
/// (no network hop), then by peer id (stable from one backup to the next).
fn active_replicas(this: PeerId, replicas: &[Replica]) -> Vec<PeerId> {
    let mut peers: Vec<PeerId> = replicas
        .iter()
        .filter(|r| r.state.is_active())
        .map(|r| r.peer_id)
        .collect();
    peers.sort_by_key(|&p| (p != this, p));
    peers
}

/// `peer 12 Dead, peer 40 Partial` for messages.
pub(crate) fn describe_replicas(replicas: &[Replica]) -> String {
    if replicas.is_empty() {
        return "no replica at all".into();
    }
    replicas
        .iter()
        .map(|r| format!("peer {} {}", r.peer_id, r.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shards of a freshly created collection, matched to the recorded ones: the same id with
/// auto sharding (the hash ring depends only on the shard number), the same key and rank among
/// that key's shards with custom sharding (new ids are Qdrant's to choose).
pub(crate) fn match_shards(
    recorded: &ShardLayout,
    created: &BTreeMap<u32, (Option<ShardKey>, Vec<Replica>)>,
) -> Result<BTreeMap<u32, (u32, Vec<PeerId>)>, String> {
    let mut matched = BTreeMap::new();
    match recorded.sharding_method {
        ShardingMethod::Auto => {
            for s in &recorded.shards {
                let (_, replicas) = created
                    .get(&s.id)
                    .ok_or_else(|| format!("shard {} was not created", s.id))?;
                matched.insert(s.id, (s.id, peers_of(replicas)));
            }
        }
        ShardingMethod::Custom => {
            let mut by_key: BTreeMap<&ShardKey, Vec<u32>> = BTreeMap::new();
            for (id, (key, _)) in created {
                if let Some(key) = key {
                    by_key.entry(key).or_default().push(*id);
                }
            }
            let mut per_key: BTreeMap<&ShardKey, usize> = BTreeMap::new();
            for key in recorded.shards.iter().filter_map(|s| s.key.as_ref()) {
                *per_key.entry(key).or_insert(0) += 1;
            }
            let mut rank: BTreeMap<&ShardKey, usize> = BTreeMap::new();
            for s in &recorded.shards {
                let key = s.key.as_ref().ok_or_else(|| {
                    format!("shard {} of a custom-sharded collection has no key", s.id)
                })?;
                let n = rank.entry(key).or_insert(0);
                let new_id = by_key
                    .get(key)
                    .and_then(|ids| ids.get(*n))
                    .copied()
                    .ok_or_else(|| {
                        format!("no shard was created for key {key} (shard {})", s.id)
                    })?;
                *n += 1;
                // Within a key, Qdrant's hash ring places points by shard id: other ids would
                // route the restored points to shards that do not hold them.
                if per_key[key] > 1 && new_id != s.id {
                    return Err(format!(
                        "shard key {key} has {} shards; the new collection numbered shard {} as {new_id} (the source's shard ids have gaps, e.g. from a dropped shard key), and Qdrant routes points within a key by shard id, so the restored points would not be found where Qdrant looks for them; this collection cannot be restored shard by shard as it is",
                        per_key[key], s.id
                    ));
                }
                matched.insert(s.id, (new_id, peers_of(&created[&new_id].1)));
            }
        }
    }
    for (old, (new, peers)) in &matched {
        if peers.is_empty() {
            return Err(format!(
                "shard {new} (recorded as {old}) has no replica on any node"
            ));
        }
    }
    Ok(matched)
}

fn peers_of(replicas: &[Replica]) -> Vec<PeerId> {
    replicas.iter().map(|r| r.peer_id).collect()
}

/// Waits until every replica of collection `c` is active and no transfer runs; fails naming
/// the replicas that are not, once `limit` has passed.
pub(crate) async fn wait_active(q: &Qdrant, c: &str, limit: Duration) -> Result<(), OpError> {
    let started = Instant::now();
    loop {
        let info = q.collection_cluster(c).await?;
        let lagging: Vec<String> = info
            .shards()
            .iter()
            .filter(|(_, (_, replicas))| replicas.iter().any(|r| !r.state.is_active()))
            .map(|(id, (_, replicas))| format!("shard {id}: {}", describe_replicas(replicas)))
            .collect();
        if lagging.is_empty() && info.shard_transfers.is_empty() {
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(QdrantOpError::NotActive {
                collection: c.to_string(),
                after: limit,
                detail: if lagging.is_empty() {
                    format!(
                        "{} shard transfer(s) still running",
                        info.shard_transfers.len()
                    )
                } else {
                    lagging.join("; ")
                },
            }
            .into());
        }
        tokio::time::sleep(ACTIVE_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::qdrant::ReplicaState;

    fn replica(peer_id: PeerId, state: ReplicaState) -> Replica {
        Replica { peer_id, state }
    }

    #[test]
    fn an_active_replica_is_chosen_this_node_first() {
        use ReplicaState::*;
        let rs = [replica(1, Active), replica(5, Active), replica(9, Dead)];
        assert_eq!(active_replicas(5, &rs), vec![5, 1]);
        assert_eq!(active_replicas(9, &rs), vec![1, 5]);
        assert!(active_replicas(1, &[replica(1, Partial), replica(2, Dead)]).is_empty());
        assert!(active_replicas(1, &[]).is_empty());
        assert_eq!(
            describe_replicas(&[replica(1, Partial), replica(2, Dead)]),
            "peer 1 Partial, peer 2 Dead"
        );
    }

    fn layout(method: ShardingMethod, shards: &[(u32, Option<ShardKey>)]) -> ShardLayout {
        ShardLayout {
            shard_number: 1,
            replication_factor: 1,
            write_consistency_factor: 1,
            sharding_method: method,
            exact_count: 0,
            exact_count_end: None,
            payload_schema: Value::Null,
            shards: shards
                .iter()
                .map(|(id, key)| ShardRecord {
                    id: *id,
                    key: key.clone(),
                    points_count: 0,
                    taken_from: 1,
                    replicas: vec![1],
                })
                .collect(),
        }
    }

    #[test]
    fn shards_match_by_id_or_by_key_and_rank() {
        use ReplicaState::Active;
        let key = |k: &str| Some(ShardKey::Keyword(k.into()));
        let auto = layout(ShardingMethod::Auto, &[(0, None), (1, None)]);
        let created = BTreeMap::from([
            (0, (None, vec![replica(7, Active), replica(8, Active)])),
            (1, (None, vec![replica(8, Active)])),
        ]);
        let m = match_shards(&auto, &created).unwrap();
        assert_eq!(m[&0], (0, vec![7, 8]));
        assert_eq!(m[&1], (1, vec![8]));
        let short = BTreeMap::from([(0, (None, vec![replica(7, Active)]))]);
        assert!(match_shards(&auto, &short).unwrap_err().contains("shard 1"));
        let empty = BTreeMap::from([(0, (None, vec![])), (1, (None, vec![replica(8, Active)]))]);
        assert!(
            match_shards(&auto, &empty)
                .unwrap_err()
                .contains("no replica")
        );

        // One shard per key: matched by key whatever its id.
        let custom = layout(
            ShardingMethod::Custom,
            &[(1, key("eu")), (2, key("eu")), (9, key("us"))],
        );
        let created = BTreeMap::from([
            (0, (key("us"), vec![replica(7, Active)])),
            (1, (key("eu"), vec![replica(8, Active)])),
            (2, (key("eu"), vec![replica(7, Active)])),
        ]);
        let m = match_shards(&custom, &created).unwrap();
        assert_eq!(m[&1].0, 1);
        assert_eq!(m[&2].0, 2);
        assert_eq!(m[&9].0, 0);
        // Several shards under one key: their ids must be kept, or points would be routed away.
        let gaps = layout(
            ShardingMethod::Custom,
            &[(3, key("eu")), (4, key("eu")), (9, key("us"))],
        );
        let err = match_shards(&gaps, &created).unwrap_err();
        assert!(
            err.contains("routes points within a key by shard id"),
            "{err}"
        );
        let missing = BTreeMap::from([(0, (key("us"), vec![replica(7, Active)]))]);
        assert!(
            match_shards(&custom, &missing)
                .unwrap_err()
                .contains("\"eu\"")
        );
    }
}
