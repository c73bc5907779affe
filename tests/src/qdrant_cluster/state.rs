//! What consensus would agree on (collections, shard placement, replica states, aliases) and
//! what each node holds (its replicas' points, its disk, its request log). One mutex guards it;
//! no lock is held across an `.await` or disk I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::qdrant::RequestRecord;

/// `ReplicaState::Active` (lib/collection/src/shards/replica_set/replica_set_state.rs).
pub(crate) const ACTIVE: &str = "Active";
/// `ReplicaState::Dead`.
pub(crate) const DEAD: &str = "Dead";
/// `ReplicaState::Partial`: receiving a shard transfer.
pub(crate) const PARTIAL: &str = "Partial";
/// Most points one collection may hold in the double (all of them live in memory).
pub(crate) const MAX_POINTS: usize = 1_000_000;
/// Most shards one collection may have in the double (a number read from a request or an
/// archive never drives an unbounded loop).
pub(crate) const MAX_SHARDS: u32 = 1024;
/// Largest vector dimension (Qdrant's own limit is 65 536).
pub(crate) const MAX_DIMENSION: u64 = 65_536;

/// One point as a replica stores it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Point {
    pub vector: Vec<f32>,
    pub payload: Value,
}

/// Points of one replica, by id.
pub(crate) type Points = BTreeMap<u64, Point>;

/// One node's copy of a shard.
#[derive(Clone, Debug)]
pub(crate) struct Replica {
    pub state: String,
    /// When `state` last changed: a Dead replica waits the transfer delay before re-sync.
    pub since: Instant,
    pub points: Points,
}

impl Replica {
    pub(crate) fn new(state: &str) -> Replica {
        Replica {
            state: state.to_string(),
            since: Instant::now(),
            points: Points::new(),
        }
    }

    pub(crate) fn set_state(&mut self, state: &str) {
        if self.state != state {
            self.state = state.to_string();
            self.since = Instant::now();
        }
    }
}

/// A shard: its key (custom sharding) and its replicas by node index.
#[derive(Clone, Debug)]
pub(crate) struct Shard {
    pub key: Option<String>,
    pub replicas: BTreeMap<usize, Replica>,
}

/// `CollectionParams` the double varies (OpenAPI schema `CollectionParams`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Params {
    pub vector_size: u64,
    pub distance: String,
    pub shard_number: u32,
    pub replication_factor: u32,
    pub write_consistency_factor: u32,
    pub custom: bool,
    pub on_disk_payload: bool,
}

impl Params {
    /// `params.vectors` as Qdrant reports a single unnamed vector.
    pub(crate) fn vectors(&self) -> Value {
        json!({"size": self.vector_size, "distance": self.distance})
    }

    /// `CollectionConfig` (OpenAPI schema), Qdrant 1.18's defaults for what the double does not
    /// vary. `sharding_method` is omitted for auto sharding, as Qdrant skips a `None`.
    pub(crate) fn config(&self) -> Value {
        let mut params = json!({
            "vectors": self.vectors(),
            "shard_number": self.shard_number,
            "replication_factor": self.replication_factor,
            "write_consistency_factor": self.write_consistency_factor,
            "on_disk_payload": self.on_disk_payload
        });
        if self.custom {
            params["sharding_method"] = json!("custom");
        }
        json!({
            "params": params,
            "hnsw_config": {"m": 16, "ef_construct": 100, "full_scan_threshold": 10000,
                            "max_indexing_threads": 0, "on_disk": false},
            "optimizer_config": {"deleted_threshold": 0.2, "vacuum_min_vector_number": 1000,
                                 "default_segment_number": 0, "max_segment_size": null,
                                 "memmap_threshold": null, "indexing_threshold": 10000,
                                 "flush_interval_sec": 5, "max_optimization_threads": null},
            "wal_config": {"wal_capacity_mb": 32, "wal_segments_ahead": 0, "wal_retain_closed": 1},
            "quantization_config": null,
            "strict_mode_config": {"enabled": false}
        })
    }
}

/// A collection as consensus knows it, with every replica's points.
#[derive(Clone, Debug)]
pub(crate) struct Collection {
    pub params: Params,
    pub shards: BTreeMap<u32, Shard>,
    /// Shard keys in creation order (custom sharding).
    pub keys: Vec<String>,
    /// Payload index: field name → schema type.
    pub payload_schema: BTreeMap<String, String>,
}

/// A shard transfer under way (consensus re-syncing a Dead replica from an Active one).
#[derive(Clone, Debug)]
pub(crate) struct Transfer {
    pub collection: String,
    pub shard: u32,
    pub from: usize,
    pub to: usize,
    pub due: Instant,
}

/// Per node state that is not consensus: whether it listens, and what it was asked.
#[derive(Debug, Default)]
pub(crate) struct NodeLog {
    pub running: bool,
    pub requests: Vec<RequestRecord>,
    pub next_seq: u64,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub collections: BTreeMap<String, Collection>,
    pub aliases: BTreeMap<String, String>,
    pub transfers: Vec<Transfer>,
    pub transfer_delay: Duration,
    pub nodes: Vec<NodeLog>,
    /// Raft commit index stand-in: bumped by every change of cluster-wide state.
    pub commit: u64,
    /// Operation ids of point updates.
    pub operation_id: u64,
}

/// One node's disk, laid out like a Qdrant storage directory.
#[derive(Debug)]
pub(crate) struct NodeDirs {
    /// `snapshots/<collection>/` holds collection snapshots.
    pub snapshots: PathBuf,
    /// Upload spools and archives being written.
    pub tmp: PathBuf,
}

impl NodeDirs {
    pub(crate) fn collection_snapshots(&self, collection: &str) -> PathBuf {
        self.snapshots.join(collection)
    }
}

/// Fixed facts of one node.
#[derive(Debug)]
pub(crate) struct NodeInfo {
    pub peer_id: u64,
    pub ip: String,
    pub dirs: NodeDirs,
}

/// Everything the node servers, the re-sync task and the test thread share.
#[derive(Debug)]
pub(crate) struct Cluster {
    /// Kept for its Drop (removes every node's disk).
    _root: TempDir,
    pub nodes: Vec<NodeInfo>,
    pub api_key: Option<String>,
    pub rest_port: u16,
    /// Port peers would talk on (reported, never listened on), like Qdrant's 6335.
    pub p2p_port: u16,
    inner: Mutex<Inner>,
}

impl Cluster {
    pub(crate) fn new(nodes: usize, api_key: Option<String>, rest_port: u16) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("soma-qdrant-cluster-")
            .tempdir()
            .expect("cannot create a temporary directory for the Qdrant cluster double");
        let infos = (0..nodes)
            .map(|i| {
                let node = root.path().join(format!("node-{i}"));
                let dirs = NodeDirs {
                    snapshots: node.join("snapshots"),
                    tmp: node.join("tmp"),
                };
                for dir in [&dirs.snapshots, &dirs.tmp] {
                    std::fs::create_dir_all(dir)
                        .expect("cannot create the Qdrant cluster double's directories");
                }
                NodeInfo {
                    // Qdrant draws a random u64 peer id; kept below 2^53 so JSON readers that
                    // go through f64 see it exactly.
                    peer_id: (rand::random::<u64>() >> 11).max(1),
                    ip: format!("127.0.0.{}", i + 1),
                    dirs,
                }
            })
            .collect();
        Cluster {
            _root: root,
            nodes: infos,
            api_key,
            rest_port,
            p2p_port: if rest_port == 6335 { 6336 } else { 6335 },
            inner: Mutex::new(Inner {
                collections: BTreeMap::new(),
                aliases: BTreeMap::new(),
                transfers: Vec::new(),
                transfer_delay: Duration::from_millis(200),
                nodes: (0..nodes)
                    .map(|_| NodeLog {
                        running: true,
                        ..NodeLog::default()
                    })
                    .collect(),
                commit: 1,
                operation_id: 0,
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking handler must not wedge the test that inspects the double afterwards.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn node_by_peer(&self, peer_id: u64) -> Option<usize> {
        self.nodes.iter().position(|n| n.peer_id == peer_id)
    }
}

/// Why a cluster operation failed, rendered by the HTTP layer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpError {
    NotFound(String),
    /// `StorageError::BadInput`: "Wrong input: ...".
    BadInput(String),
    /// `StorageError::BadRequest`: "Bad request: ...".
    BadRequest(String),
    /// `StorageError::ServiceError`: "Service internal error: ...".
    Service(String),
}

/// The fixed routing hash: splitmix64's finaliser of the point id.
pub(crate) fn route_hash(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Picks `count` distinct running nodes with the fewest replicas of the collection so far, ties
/// by node index — `ShardDistributionProposal::new`'s least-loaded-first rule, made
/// deterministic (Qdrant breaks ties by its peers' hash order).
pub(crate) fn place(
    load: &mut BTreeMap<usize, usize>,
    running: &[usize],
    count: usize,
) -> Vec<usize> {
    let mut candidates: Vec<usize> = running.to_vec();
    candidates.sort_by_key(|n| (load.get(n).copied().unwrap_or(0), *n));
    candidates.truncate(count);
    for n in &candidates {
        *load.entry(*n).or_default() += 1;
    }
    candidates
}

impl Inner {
    /// Resolves an alias or a collection name like `TableOfContent::resolve_name`.
    pub(crate) fn resolve(&self, name: &str) -> Option<String> {
        let real = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        self.collections
            .contains_key(real)
            .then(|| real.to_string())
    }

    pub(crate) fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].running)
            .collect()
    }

    /// Replicas per node over one collection.
    fn load(collection: &Collection) -> BTreeMap<usize, usize> {
        let mut load = BTreeMap::new();
        for shard in collection.shards.values() {
            for node in shard.replicas.keys() {
                *load.entry(*node).or_default() += 1;
            }
        }
        load
    }

    /// Creates a collection: auto sharding places every shard now; custom sharding creates no
    /// shards until shard keys are created (`CreateCollection` in
    /// lib/storage/src/content_manager/toc/create_collection.rs).
    pub(crate) fn create_collection(&mut self, name: &str, params: Params) -> Result<(), OpError> {
        if self.collections.contains_key(name) || self.aliases.contains_key(name) {
            return Err(OpError::BadInput(format!(
                "Collection `{name}` already exists!"
            )));
        }
        if params.shard_number == 0 || params.shard_number > MAX_SHARDS {
            return Err(OpError::BadInput(format!(
                "shard_number must be from 1 to {MAX_SHARDS} in the Qdrant cluster double, not {}",
                params.shard_number
            )));
        }
        if params.vector_size == 0 || params.vector_size > MAX_DIMENSION {
            return Err(OpError::BadInput(format!(
                "vector size must be from 1 to {MAX_DIMENSION}, not {}",
                params.vector_size
            )));
        }
        let running = self.running();
        let mut collection = Collection {
            params: params.clone(),
            shards: BTreeMap::new(),
            keys: Vec::new(),
            payload_schema: BTreeMap::new(),
        };
        if !params.custom {
            let mut load = BTreeMap::new();
            for id in 0..params.shard_number {
                let nodes = place(&mut load, &running, params.replication_factor as usize);
                collection.shards.insert(
                    id,
                    Shard {
                        key: None,
                        replicas: nodes
                            .into_iter()
                            .map(|n| (n, Replica::new(ACTIVE)))
                            .collect(),
                    },
                );
            }
        }
        self.collections.insert(name.to_string(), collection);
        self.commit += 1;
        Ok(())
    }

    /// `create_shard_key`: `shards_number` new shards (ids after the highest so far) placed on
    /// `placement` or least-loaded nodes, all Active. Returns the new shard ids.
    pub(crate) fn create_shard_key(
        &mut self,
        name: &str,
        key: &str,
        shards_number: Option<u32>,
        replication_factor: Option<u32>,
        placement: Option<Vec<usize>>,
        ids: Option<Vec<u32>>,
    ) -> Result<Vec<u32>, OpError> {
        let running = self.running();
        let collection = self
            .collections
            .get_mut(name)
            .ok_or_else(|| OpError::NotFound(format!("Collection `{name}` doesn't exist!")))?;
        if !collection.params.custom {
            return Err(OpError::BadRequest(format!(
                "Shard Key {key} cannot be created with Auto sharding method"
            )));
        }
        if collection.keys.iter().any(|k| k == key) {
            return Err(OpError::BadRequest(format!(
                "Shard key {key} already exists"
            )));
        }
        if placement.as_ref().is_some_and(Vec::is_empty) {
            return Err(OpError::BadRequest(format!(
                "Shard key {key} placement cannot be empty"
            )));
        }
        let number = shards_number
            .unwrap_or(collection.params.shard_number)
            .max(1);
        let total = collection.shards.len() as u64
            + ids
                .as_ref()
                .map_or(u64::from(number), |ids| ids.len() as u64);
        if total > u64::from(MAX_SHARDS)
            || ids
                .as_ref()
                .is_some_and(|ids| ids.iter().any(|id| collection.shards.contains_key(id)))
        {
            return Err(OpError::BadInput(format!(
                "shard key {key} would give the collection more than {MAX_SHARDS} shards or \
                 reuse a shard id"
            )));
        }
        let rf = replication_factor
            .unwrap_or(collection.params.replication_factor)
            .max(1) as usize;
        let mut load = Self::load(collection);
        let first = collection.shards.keys().next_back().map_or(0, |id| id + 1);
        let ids = ids.unwrap_or_else(|| (first..first + number).collect());
        for id in &ids {
            let nodes = match &placement {
                Some(nodes) => nodes.clone(),
                None => place(&mut load, &running, rf),
            };
            collection.shards.insert(
                *id,
                Shard {
                    key: Some(key.to_string()),
                    replicas: nodes
                        .into_iter()
                        .map(|n| (n, Replica::new(ACTIVE)))
                        .collect(),
                },
            );
        }
        collection.keys.push(key.to_string());
        self.commit += 1;
        Ok(ids)
    }

    /// Routes and writes points: a fixed hash of the id modulo the shards of the key (all
    /// shards for auto sharding), written to every Active or Partial replica on a running node.
    /// An Active replica on a stopped node misses the write and is marked Dead, as Qdrant's
    /// consensus does after a failed update, so it is re-synced once its node is back.
    pub(crate) fn upsert(
        &mut self,
        name: &str,
        points: Vec<(u64, Point)>,
        shard_key: Option<&str>,
    ) -> Result<(), OpError> {
        let running = self.running();
        let collection = self
            .collections
            .get_mut(name)
            .ok_or_else(|| OpError::NotFound(format!("Collection `{name}` doesn't exist!")))?;
        let shard_ids: Vec<u32> = match (collection.params.custom, shard_key) {
            (false, None) => collection.shards.keys().copied().collect(),
            (false, Some(_)) => {
                return Err(OpError::BadInput(
                    "Shard key specified for a collection with auto sharding".into(),
                ));
            }
            (true, None) => return Err(OpError::BadInput("Shard key not specified".into())),
            (true, Some(key)) => {
                let ids: Vec<u32> = collection
                    .shards
                    .iter()
                    .filter(|(_, s)| s.key.as_deref() == Some(key))
                    .map(|(id, _)| *id)
                    .collect();
                if ids.is_empty() {
                    return Err(OpError::BadInput(format!("Shard key {key} not found")));
                }
                ids
            }
        };
        if shard_ids.is_empty() {
            return Err(OpError::BadInput("No shards found for shard key".into()));
        }
        let dim = collection.params.vector_size as usize;
        let cosine = collection.params.distance == "Cosine";
        let mut routed: BTreeMap<u32, Vec<(u64, Point)>> = BTreeMap::new();
        for (id, mut point) in points {
            if point.vector.len() != dim {
                return Err(OpError::BadInput(format!(
                    "Vector dimension error: expected dim: {dim}, got {}",
                    point.vector.len()
                )));
            }
            if cosine {
                normalise(&mut point.vector);
            }
            let shard = shard_ids[(route_hash(id) % shard_ids.len() as u64) as usize];
            routed.entry(shard).or_default().push((id, point));
        }
        for shard_id in routed.keys() {
            let shard = &collection.shards[shard_id];
            if !shard
                .replicas
                .iter()
                .any(|(n, r)| r.state == ACTIVE && running.contains(n))
            {
                return Err(OpError::Service(format!(
                    "No active replica of shard {shard_id} is reachable to accept the update"
                )));
            }
        }
        let mut total = collection
            .shards
            .values()
            .map(|s| {
                s.replicas
                    .values()
                    .map(|r| r.points.len())
                    .max()
                    .unwrap_or(0)
            })
            .sum::<usize>();
        for (shard_id, points) in routed {
            total += points.len();
            if total > MAX_POINTS {
                return Err(OpError::BadInput(format!(
                    "the Qdrant cluster double holds at most {MAX_POINTS} points per collection"
                )));
            }
            let shard = collection
                .shards
                .get_mut(&shard_id)
                .expect("routed to a shard");
            for (node, replica) in shard.replicas.iter_mut() {
                if !running.contains(node) {
                    if replica.state == ACTIVE {
                        replica.set_state(DEAD);
                    }
                    continue;
                }
                if replica.state == ACTIVE || replica.state == PARTIAL {
                    for (id, point) in &points {
                        replica.points.insert(*id, point.clone());
                    }
                }
            }
        }
        self.operation_id += 1;
        Ok(())
    }

    /// Every point of a collection, read from one Active replica of every shard on a running
    /// node (the lowest node index). Fails like Qdrant when a shard has none.
    pub(crate) fn read_points(&self, name: &str) -> Result<Points, OpError> {
        let collection = self
            .collections
            .get(name)
            .ok_or_else(|| OpError::NotFound(format!("Collection `{name}` doesn't exist!")))?;
        let mut out = Points::new();
        for (shard_id, shard) in &collection.shards {
            let replica = shard
                .replicas
                .iter()
                .find(|(n, r)| r.state == ACTIVE && self.nodes[**n].running)
                .map(|(_, r)| r)
                .ok_or_else(|| {
                    OpError::Service(format!(
                        "The replica set for shard {shard_id} has no active replica on a \
                         reachable peer"
                    ))
                })?;
            out.extend(replica.points.iter().map(|(id, p)| (*id, p.clone())));
        }
        Ok(out)
    }

    /// Applies the replica states `recover_shard_snapshot_impl` (src/common/snapshots.rs) sets
    /// after `node`'s replica of `shard` was recovered from a snapshot with `priority`.
    pub(crate) fn states_after_recovery(shard: &mut Shard, node: usize, priority: &str) {
        let others_active = shard
            .replicas
            .iter()
            .any(|(n, r)| *n != node && r.state == ACTIVE);
        let this_state = if !others_active || priority == "no_sync" || priority == "snapshot" {
            ACTIVE
        } else {
            DEAD
        };
        if others_active && priority == "snapshot" {
            for (n, r) in shard.replicas.iter_mut() {
                if *n != node && r.state == ACTIVE {
                    r.set_state(DEAD);
                }
            }
        }
        if let Some(r) = shard.replicas.get_mut(&node) {
            r.set_state(this_state);
        }
    }

    /// One step of the re-sync consensus runs: transfers that are due complete (the target
    /// gets the source's points and turns Active; one whose source or target went away turns
    /// the target Dead again), and Dead replicas on running nodes that have waited the transfer
    /// delay and have an Active replica on a running node start one (Dead → Partial).
    pub(crate) fn resync_step(&mut self, now: Instant) {
        let delay = self.transfer_delay;
        let running: Vec<bool> = self.nodes.iter().map(|n| n.running).collect();
        let mut changed = false;
        let transfers = std::mem::take(&mut self.transfers);
        for t in transfers {
            if t.due > now {
                self.transfers.push(t);
                continue;
            }
            let Some(shard) = self
                .collections
                .get_mut(&t.collection)
                .and_then(|c| c.shards.get_mut(&t.shard))
            else {
                continue;
            };
            let source = shard
                .replicas
                .get(&t.from)
                .filter(|r| r.state == ACTIVE && running[t.from])
                .map(|r| r.points.clone());
            if let Some(target) = shard.replicas.get_mut(&t.to) {
                match source {
                    Some(points) if running[t.to] && target.state == PARTIAL => {
                        target.points = points;
                        target.set_state(ACTIVE);
                    }
                    _ => target.set_state(DEAD),
                }
                changed = true;
            }
        }
        for (name, collection) in self.collections.iter_mut() {
            for (shard_id, shard) in collection.shards.iter_mut() {
                let source = shard
                    .replicas
                    .iter()
                    .find(|(n, r)| r.state == ACTIVE && running[**n])
                    .map(|(n, _)| *n);
                let Some(from) = source else { continue };
                for (node, replica) in shard.replicas.iter_mut() {
                    if replica.state == DEAD
                        && running[*node]
                        && now.saturating_duration_since(replica.since) >= delay
                    {
                        replica.set_state(PARTIAL);
                        self.transfers.push(Transfer {
                            collection: name.clone(),
                            shard: *shard_id,
                            from,
                            to: *node,
                            due: now + delay,
                        });
                        changed = true;
                    }
                }
            }
        }
        if changed {
            self.commit += 1;
        }
    }
}

/// Scales a vector to unit length, as Qdrant does on insert into a Cosine collection.
pub(crate) fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > f32::MIN_POSITIVE {
        for x in v.iter_mut() {
            *x /= norm;
        }
    }
}

/// Exact search: `(id, score)` best first, scored like Qdrant scores `distance` (Cosine on
/// normalised vectors and Dot: dot product, higher first; Euclid and Manhattan: the distance,
/// lower first); ties by id.
pub(crate) fn search(points: &Points, distance: &str, query: &[f32], k: usize) -> Vec<(u64, f32)> {
    let mut q = query.to_vec();
    if distance == "Cosine" {
        normalise(&mut q);
    }
    let lower_is_better = matches!(distance, "Euclid" | "Manhattan");
    let mut scored: Vec<(u64, f32)> = points
        .iter()
        .map(|(id, p)| {
            let score = match distance {
                "Euclid" => p
                    .vector
                    .iter()
                    .zip(&q)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>()
                    .sqrt(),
                "Manhattan" => p.vector.iter().zip(&q).map(|(a, b)| (a - b).abs()).sum(),
                _ => p.vector.iter().zip(&q).map(|(a, b)| a * b).sum(),
            };
            (*id, score)
        })
        .collect();
    scored.sort_by(|a, b| {
        let order = if lower_is_better {
            a.1.total_cmp(&b.1)
        } else {
            b.1.total_cmp(&a.1)
        };
        order.then(a.0.cmp(&b.0))
    });
    scored.truncate(k);
    scored
}
