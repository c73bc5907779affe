//! A test double of a distributed Qdrant 1.18 cluster: several nodes, each serving the REST API
//! on its own loopback address (`127.0.0.{i+1}`) and the same port, as pods behind a headless
//! service do. No Qdrant can run here; the agent must work unchanged against a real cluster, so
//! every behaviour below follows the real one and names where it comes from (paths in the
//! qdrant/qdrant repository; operationIds of the OpenAPI document `docs/redoc/master/openapi.json`).
//!
//! Cluster-wide state (collections, shard placement, replica states, aliases, payload indexes)
//! is shared by all nodes as Raft consensus would make it; points live per replica, so a
//! replica that was never written or recovered really is empty, and a read sees only what the
//! replica it reads holds.
//!
//! # What follows real Qdrant
//! - **Envelope, errors, API key, snapshot files, uploads**: exactly as the single-node double
//!   (`soma_tests::qdrant`, whose header cites the sources); the same code renders them.
//!   `StorageError::BadRequest` renders "Bad request: ..." with 400.
//! - **`GET /cluster`** (`cluster_status`, src/actix/api/cluster_api.rs; `ClusterStatus::Enabled`
//!   in lib/storage/src/types.rs): `peer_id`, every peer consensus knows (a stopped node too) at
//!   its p2p URI — `http://127.0.0.{i+1}:6335/`, not the REST port, as real peers announce their
//!   internal port — `raft_info`, `consensus_thread_status`, `message_send_failures`. Peer ids
//!   are random like Qdrant's (below 2^53, so they survive JSON readers that use f64).
//! - **Placement** (`ShardDistributionProposal::new`, lib/collection/src/shards/
//!   shard_distribution.rs, via `TableOfContent::suggest_shard_distribution`): `shard_number`
//!   shards × `min(replication_factor, running nodes)` replicas on distinct nodes, least-loaded
//!   node first. The double breaks ties by node index, so placement is deterministic (Qdrant's
//!   follows its peers' hash order). `shard_number` defaults to the number of peers.
//! - **Custom sharding** (`create_shard_key`, lib/collection/src/collection/sharding_keys.rs):
//!   a custom collection has no shards until `PUT /collections/{c}/shards` creates a key with
//!   `shards_number` shards (default the collection's `shard_number`), ids after the highest so
//!   far, on `placement` peers or least-loaded ones; "Shard key K already exists", "Shard Key K
//!   cannot be created with Auto sharding method" (400 "Bad request").
//! - **Points** (`upsert_points`, `count_points`, `scroll_points`, `query_points`;
//!   `ShardHolder::split_by_shard`, lib/collection/src/shards/shard_holder/mod.rs): a write
//!   goes to every Active (and Partial, being transferred) replica of its shard; custom
//!   sharding needs the `shard_key` ("Wrong input: Shard key not specified", "Shard key K not
//!   found"). Reads from ANY node merge one Active replica of every shard. Cosine vectors are
//!   normalised on insert.
//! - **`GET /collections/{c}/cluster`** (`Collection::cluster_info`,
//!   lib/collection/src/collection/collection_ops.rs): `local_shards` with this node's replica
//!   point counts and states, `remote_shards` with every other replica's peer and state,
//!   `shard_key` only for custom sharding, `shard_transfers` under way.
//! - **Shard streaming** (`stream_shard_snapshot`; `ShardHolder::stream_shard_snapshot`): only
//!   from a node with a local replica, else 400 plain text "Bad request: Shard N is not a local
//!   or queue proxy shard"; it streams the LOCAL replica whatever its state (a Dead or empty
//!   replica gives a stale or empty archive).
//! - **Shard recovery** (`recover_shard_from_uploaded_snapshot`; `recover_shard_snapshot_impl`,
//!   src/common/snapshots.rs): checksum first; a node without a local replica: 400 "Bad
//!   request: Shard N is not a local shard"; the local replica's points are replaced; then, when
//!   no other replica is Active, or `priority=no_sync`, this one turns Active; `snapshot` (the
//!   default, `SnapshotPriority::default()`): this one Active and every other Active replica
//!   Dead; `replica`: this one Dead.
//! - **Re-sync** (consensus-driven shard transfers, lib/collection/src/shards/transfer/): a Dead
//!   replica on a running node with an Active replica on a running node is re-synced in the
//!   background: Dead → Partial → Active with the source's points, each step after
//!   [`QdrantCluster::set_transfer_delay`] (default 200 ms); a stopped node's replicas are not.
//! - **Collection snapshots in a cluster** (`Collection::create_snapshot`; recovery in
//!   `_do_recover_from_snapshot`, lib/storage/src/content_manager/snapshots/recover.rs): a
//!   snapshot holds only the asked node's local shards. Recovering one creates the collection
//!   from its config when missing (placement by the double, payload indexes registered), checks
//!   vectors and shard number, and recovers only shards that are local to that node AND held by
//!   the snapshot, states as above (shards the snapshot lacks keep their state). So a collection
//!   backed up through one node and restored into a new cluster loses the shards that node did
//!   not hold — what issue 23 measured on real Qdrant 1.18.3 (3906 of 6000 points).
//! - **A stopped node** refuses connections; its replicas keep the states consensus knew
//!   ([`QdrantCluster::stop_node`]). A write that misses an Active replica on a stopped node
//!   marks it Dead, as consensus does after a failed update.
//!
//! # Where the double is simpler
//! One unnamed dense vector per collection; ids are unsigned integers; no filters (count and
//! scroll cover every point); search is always exact; no full storage snapshots (Qdrant's
//! cluster-wide snapshot is an open request, qdrant/qdrant#2763), shard key deletion,
//! resharding, replica moves or read-only keys. Routing is a fixed hash of the id modulo the
//! shards (Qdrant uses a consistent hash ring), so point counts per shard differ from Qdrant's.
//! A read that needs a shard whose only Active replicas are on stopped nodes fails with 500
//! "Service internal error: ..." (an approximation of Qdrant's message). Collection recovery
//! puts no replica in `ManualRecovery`/`Partial` while it runs (it is instant), and with
//! `priority=snapshot` marks the other Active replicas Dead rather than removing surplus ones.
//! Snapshot archives are the double's own JSON-lines format (`qdrant_cluster/archive.rs`)
//! carrying the collection config, payload schema and shard keys; only the double reads them,
//! and a shard archive is refused by a collection upload and vice versa.
//!
//! # Memory
//! Points live in memory (tests use at most 10 000 points of 64 dims); request bodies are
//! limited (32 MiB for points, 1 MiB for other JSON); uploads are spooled to the node's disk;
//! archives are read back line by line with lines of at most 1 MiB.

mod archive;
mod http;
mod state;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::state::{ACTIVE, Cluster, Params, Point, route_hash, search};
pub use crate::qdrant::RequestRecord;

/// How often the double's consensus looks for replicas to re-sync.
const RESYNC_TICK: Duration = Duration::from_millis(20);

/// What [`QdrantCluster::create_collection`] takes.
#[derive(Clone, Debug)]
pub struct ClusterCollection {
    /// Dimension of the single unnamed vector.
    pub vector_size: u64,
    /// `"Cosine"`, `"Dot"` or `"Euclid"`.
    pub distance: String,
    /// Shards (per shard key with custom sharding).
    pub shard_number: u32,
    /// Replicas per shard.
    pub replication_factor: u32,
    /// Reported; the double does not enforce it.
    pub write_consistency_factor: u32,
    /// Empty: auto sharding; else custom sharding with one key each holding `shard_number`
    /// shards.
    pub shard_keys: Vec<String>,
    /// `(field name, schema type)`, e.g. `("group", "integer")`.
    pub payload_indexes: Vec<(String, String)>,
}

/// A collection's layout as consensus knows it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterLayout {
    /// `shard_number` of the config (per key with custom sharding).
    pub shard_number: u32,
    /// `replication_factor` of the config.
    pub replication_factor: u32,
    /// `write_consistency_factor` of the config.
    pub write_consistency_factor: u32,
    /// `"auto"` or `"custom"`.
    pub sharding_method: String,
    /// Shard id → its key (custom sharding).
    pub shard_keys: BTreeMap<u32, Option<String>>,
    /// Shard id → `(node index, replica state)` for every replica.
    pub replicas: BTreeMap<u32, Vec<(usize, String)>>,
    /// Payload index: field → schema type.
    pub payload_schema: BTreeMap<String, String>,
    /// `config.params.vectors` as the REST API reports it.
    pub vectors: Value,
}

struct NodeTask {
    stop: CancellationToken,
    accept: JoinHandle<()>,
}

/// A running cluster double; dropping it stops every node and deletes their disks.
pub struct QdrantCluster {
    cluster: Arc<Cluster>,
    tasks: Vec<Mutex<Option<NodeTask>>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for QdrantCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantCluster")
            .field("nodes", &self.cluster.nodes.len())
            .field("rest_port", &self.cluster.rest_port)
            .finish()
    }
}

impl Drop for QdrantCluster {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Binds `127.0.0.1..=127.0.0.n` on one port, trying new ports while one is taken elsewhere.
fn bind_all(nodes: usize) -> Vec<TcpListener> {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1");
        let port = first
            .local_addr()
            .expect("bound socket has an address")
            .port();
        let mut listeners = vec![first];
        for i in 1..nodes {
            match TcpListener::bind(format!("127.0.0.{}:{port}", i + 1)) {
                Ok(listener) => listeners.push(listener),
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => break,
                Err(e) => panic!("cannot bind 127.0.0.{}:{port}: {e}", i + 1),
            }
        }
        if listeners.len() == nodes {
            return listeners;
        }
    }
    panic!("no port free on all of 127.0.0.1..=127.0.0.{nodes} after 100 tries");
}

/// A deterministic vector component in [-1, 1) for `(seed, id, j)`.
fn component(seed: u64, id: u64, j: u64) -> f32 {
    let h = route_hash(seed ^ route_hash(id.wrapping_mul(0x1_0000_0001).wrapping_add(j)));
    (h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
}

impl QdrantCluster {
    /// Starts `nodes` nodes (1..=250), node `i` on `127.0.0.{i+1}`, all on one REST port. With
    /// `api_key`, every node requires it (except `GET /` and the health probes).
    pub fn start(nodes: usize, api_key: Option<&str>) -> QdrantCluster {
        assert!((1..=250).contains(&nodes), "1 to 250 nodes, not {nodes}");
        let listeners = bind_all(nodes);
        let port = listeners[0].local_addr().expect("bound").port();
        let cluster = Arc::new(Cluster::new(nodes, api_key.map(str::to_string), port));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("qdrant-cluster-double")
            .enable_all()
            .build()
            .expect("cannot build the Qdrant cluster double's runtime");
        let tasks = listeners
            .into_iter()
            .enumerate()
            .map(|(i, l)| Mutex::new(Some(Self::serve(&runtime, &cluster, i, l))))
            .collect();
        let resync = cluster.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(RESYNC_TICK).await;
                resync.lock().resync_step(Instant::now());
            }
        });
        QdrantCluster {
            cluster,
            tasks,
            runtime: Some(runtime),
        }
    }

    fn serve(
        runtime: &tokio::runtime::Runtime,
        cluster: &Arc<Cluster>,
        node: usize,
        listener: TcpListener,
    ) -> NodeTask {
        listener
            .set_nonblocking(true)
            .expect("cannot make a listening socket non-blocking");
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).expect("cannot register a listening socket")
        };
        let stop = CancellationToken::new();
        let accept = runtime.spawn(http::serve(listener, cluster.clone(), node, stop.clone()));
        NodeTask { stop, accept }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.cluster.nodes.len()
    }

    /// `http://127.0.0.{i+1}:PORT`, no trailing slash.
    pub fn node_url(&self, i: usize) -> String {
        format!(
            "http://{}:{}",
            self.cluster.nodes[i].ip, self.cluster.rest_port
        )
    }

    /// The REST port every node listens on.
    pub fn rest_port(&self) -> u16 {
        self.cluster.rest_port
    }

    /// The port `GET /cluster` reports for peers (nothing listens there).
    pub fn p2p_port(&self) -> u16 {
        self.cluster.p2p_port
    }

    /// Node `i`'s peer id.
    pub fn peer_id(&self, i: usize) -> u64 {
        self.cluster.nodes[i].peer_id
    }

    /// The API key every node requires, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.cluster.api_key.as_deref()
    }

    /// How long each re-sync step (Dead → Partial, Partial → Active) waits.
    pub fn set_transfer_delay(&self, delay: Duration) {
        self.cluster.lock().transfer_delay = delay;
    }

    /// Creates a collection placed as Qdrant would (see the module docs); panics on error.
    pub fn create_collection(&self, name: &str, spec: &ClusterCollection) {
        let mut inner = self.cluster.lock();
        let params = Params {
            vector_size: spec.vector_size,
            distance: spec.distance.clone(),
            shard_number: spec.shard_number,
            replication_factor: spec.replication_factor,
            write_consistency_factor: spec.write_consistency_factor,
            custom: !spec.shard_keys.is_empty(),
            on_disk_payload: true,
        };
        inner
            .create_collection(name, params)
            .unwrap_or_else(|e| panic!("cannot create {name:?}: {e:?}"));
        for key in &spec.shard_keys {
            inner
                .create_shard_key(name, key, None, None, None, None)
                .unwrap_or_else(|e| panic!("cannot create shard key {key:?}: {e:?}"));
        }
        let collection = inner.collections.get_mut(name).expect("just created");
        for (field, kind) in &spec.payload_indexes {
            collection
                .payload_schema
                .insert(field.clone(), kind.clone());
        }
    }

    /// Writes points `1..=count` with vectors drawn from `seed` and payload `{"group": id % 7,
    /// "tag": "t<id % 3>"}`, routed like a REST upsert; with custom sharding, point `id` goes to
    /// key `id % keys`. Panics on error (e.g. a shard without a reachable Active replica).
    pub fn upsert_points(&self, name: &str, count: u64, seed: u64) {
        let mut inner = self.cluster.lock();
        let real = inner
            .resolve(name)
            .unwrap_or_else(|| panic!("no collection {name:?}"));
        let (dim, keys) = {
            let c = &inner.collections[&real];
            (c.params.vector_size, c.keys.clone())
        };
        let mut groups: BTreeMap<Option<String>, Vec<(u64, Point)>> = BTreeMap::new();
        for id in 1..=count {
            let point = Point {
                vector: (0..dim).map(|j| component(seed, id, j)).collect(),
                payload: json!({"group": id % 7, "tag": format!("t{}", id % 3)}),
            };
            let key = (!keys.is_empty()).then(|| keys[(id % keys.len() as u64) as usize].clone());
            groups.entry(key).or_default().push((id, point));
        }
        for (key, points) in groups {
            inner
                .upsert(&real, points, key.as_deref())
                .unwrap_or_else(|e| panic!("cannot upsert into {name:?}: {e:?}"));
        }
    }

    /// Every point, read from an Active replica of every shard; panics if a shard has none.
    pub fn points(&self, name: &str) -> BTreeMap<u64, (Vec<f32>, Value)> {
        let inner = self.cluster.lock();
        let real = inner
            .resolve(name)
            .unwrap_or_else(|| panic!("no collection {name:?}"));
        inner
            .read_points(&real)
            .unwrap_or_else(|e| panic!("cannot read {name:?}: {e:?}"))
            .into_iter()
            .map(|(id, p)| (id, (p.vector, p.payload)))
            .collect()
    }

    /// The exact point count a user would read (`POST .../points/count` with `exact`).
    pub fn exact_count(&self, name: &str) -> u64 {
        self.points(name).len() as u64
    }

    /// The ids of the `k` nearest points by exact search across all shards, best first.
    pub fn nearest(&self, name: &str, vector: &[f32], k: usize) -> Vec<u64> {
        let inner = self.cluster.lock();
        let real = inner
            .resolve(name)
            .unwrap_or_else(|| panic!("no collection {name:?}"));
        let points = inner
            .read_points(&real)
            .unwrap_or_else(|e| panic!("cannot read {name:?}: {e:?}"));
        let distance = inner.collections[&real].params.distance.clone();
        search(&points, &distance, vector, k)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// The collection's layout (aliases resolve), if it exists.
    pub fn layout(&self, name: &str) -> Option<ClusterLayout> {
        let inner = self.cluster.lock();
        let real = inner.resolve(name)?;
        let c = &inner.collections[&real];
        Some(ClusterLayout {
            shard_number: c.params.shard_number,
            replication_factor: c.params.replication_factor,
            write_consistency_factor: c.params.write_consistency_factor,
            sharding_method: if c.params.custom { "custom" } else { "auto" }.to_string(),
            shard_keys: c
                .shards
                .iter()
                .map(|(id, s)| (*id, s.key.clone()))
                .collect(),
            replicas: c
                .shards
                .iter()
                .map(|(id, s)| {
                    let replicas = s
                        .replicas
                        .iter()
                        .map(|(n, r)| (*n, r.state.clone()))
                        .collect();
                    (*id, replicas)
                })
                .collect(),
            payload_schema: c.payload_schema.clone(),
            vectors: c.params.vectors(),
        })
    }

    /// Points per replica: shard id → `(node index, point count)`.
    pub fn replica_counts(&self, name: &str) -> BTreeMap<u32, Vec<(usize, u64)>> {
        let inner = self.cluster.lock();
        let Some(real) = inner.resolve(name) else {
            return BTreeMap::new();
        };
        inner.collections[&real]
            .shards
            .iter()
            .map(|(id, s)| {
                let counts = s
                    .replicas
                    .iter()
                    .map(|(n, r)| (*n, r.points.len() as u64))
                    .collect();
                (*id, counts)
            })
            .collect()
    }

    /// Points `alias` at `collection` (which must exist).
    pub fn add_alias(&self, alias: &str, collection: &str) {
        let mut inner = self.cluster.lock();
        assert!(
            inner.collections.contains_key(collection),
            "no collection {collection:?} to alias"
        );
        inner
            .aliases
            .insert(alias.to_string(), collection.to_string());
        inner.commit += 1;
    }

    /// `(alias, collection)` pairs, sorted by alias.
    pub fn aliases(&self) -> Vec<(String, String)> {
        self.cluster
            .lock()
            .aliases
            .iter()
            .map(|(a, c)| (a.clone(), c.clone()))
            .collect()
    }

    /// Collection names, sorted.
    pub fn collections(&self) -> Vec<String> {
        self.cluster.lock().collections.keys().cloned().collect()
    }

    /// Stops node `i`: it stops listening (connections refused) and drops the connections it
    /// had; its data and its replicas' states are kept.
    pub fn stop_node(&self, i: usize) {
        self.cluster.lock().nodes[i].running = false;
        let task = self.tasks[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            task.stop.cancel();
            task.accept.abort();
            crate::poll_until(
                Duration::from_secs(10),
                "the node's listener to close",
                || task.accept.is_finished().then_some(()),
            );
        }
    }

    /// Starts node `i` again on the same address and port.
    pub fn start_node(&self, i: usize) {
        let mut slot = self.tasks[i].lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return;
        }
        let addr = format!("{}:{}", self.cluster.nodes[i].ip, self.cluster.rest_port);
        let listener =
            crate::poll_until(Duration::from_secs(10), &format!("{addr} to bind"), || {
                TcpListener::bind(&addr).ok()
            });
        *slot = Some(Self::serve(self.runtime(), &self.cluster, i, listener));
        self.cluster.lock().nodes[i].running = true;
    }

    /// Sets a replica's state as consensus would (e.g. `"Dead"`, `"Partial"`, `"Active"`).
    pub fn set_replica_state(&self, collection: &str, shard: u32, node: usize, state: &str) {
        let mut inner = self.cluster.lock();
        let real = inner
            .resolve(collection)
            .unwrap_or_else(|| panic!("no collection {collection:?}"));
        let replica = inner
            .collections
            .get_mut(&real)
            .and_then(|c| c.shards.get_mut(&shard))
            .and_then(|s| s.replicas.get_mut(&node))
            .unwrap_or_else(|| panic!("node {node} holds no replica of shard {shard}"));
        replica.set_state(state);
        inner.commit += 1;
    }

    /// True when every replica of every shard of the collection is Active.
    pub fn all_active(&self, name: &str) -> bool {
        self.layout(name).is_some_and(|l| {
            l.replicas
                .values()
                .all(|rs| rs.iter().all(|(_, s)| s == ACTIVE))
        })
    }

    /// Every file on node `i`'s disk: snapshots, their `.checksum` files, upload spools.
    pub fn snapshot_files_on_node(&self, i: usize) -> Vec<PathBuf> {
        let dirs = &self.cluster.nodes[i].dirs;
        let mut out = Vec::new();
        collect_files(&dirs.snapshots, &mut out);
        collect_files(&dirs.tmp, &mut out);
        out.sort();
        out
    }

    /// Every request node `i` received, in order.
    pub fn requests(&self, i: usize) -> Vec<RequestRecord> {
        self.cluster.lock().nodes[i].requests.clone()
    }

    /// Forgets node `i`'s request log.
    pub fn clear_requests(&self, i: usize) {
        self.cluster.lock().nodes[i].requests.clear();
    }
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}
