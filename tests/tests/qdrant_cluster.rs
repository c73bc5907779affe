//! Proves a distributed Qdrant is backed up whole and comes back whole: the real agent and plugin
//! against the multi-node Qdrant double (`soma_tests::qdrant::QdrantCluster`: nodes on their own
//! loopback addresses sharing one REST port, shard placement with replicas, replica states, the
//! shard snapshot stream and upload, and a collection snapshot holding only the asked node's
//! shards, as Qdrant documents) and Garage. What a user relies on:
//! - a backup through the agent beside ONE node of a 3-node cluster (6 shards × 2 replicas, and a
//!   custom-sharded collection with two shard keys) holds every shard once, with the layout;
//! - restored into a new empty cluster of 3 nodes, and of 2, every point comes back with its
//!   vector and payload, exact searches find the same neighbours, the layout (shard number,
//!   replication, shard keys, payload indexes) and the aliases are there, every replica is active;
//! - a node that is down is worked around while another active replica of each of its shards
//!   answers; a shard without any answering active replica fails the backup, naming the shard,
//!   and stores nothing;
//! - full-storage snapshots are refused against a cluster, with the reason;
//! - `status` shows the nodes and the shards, and fails while a shard has no active replica;
//! - with an agent beside every node, `backup all` stores each shard once.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;
use soma_tests::metrics::{scrape, value};
use soma_tests::qdrant_cluster::{ClusterCollection, QdrantCluster};
use soma_tests::{
    Agent, KubeDouble, PgCluster, PodSpec, TestStore, kubectl_soma, listed_ids, poll_until, soma,
};

const API_KEY: &str = "test-qdrant-cluster-key-91ab";
const NS: &str = "soma-qdrant-cluster";

fn agent_beside(store: &TestStore, cluster: &QdrantCluster, node: usize, extra: &[&str]) -> Agent {
    let mut env = store.env();
    env.push(("SOMA_QDRANT_API_KEY".into(), API_KEY.into()));
    let url = cluster.node_url(node);
    let mut args = vec!["--qdrant-url", url.as_str()];
    args.extend_from_slice(extra);
    Agent::start(&store.url(), "", &args, &env)
}

fn memory_spec() -> ClusterCollection {
    ClusterCollection {
        vector_size: 16,
        distance: "Cosine".into(),
        shard_number: 6,
        replication_factor: 2,
        write_consistency_factor: 1,
        shard_keys: vec![],
        payload_indexes: vec![("group".into(), "integer".into())],
    }
}

fn tenants_spec() -> ClusterCollection {
    ClusterCollection {
        vector_size: 8,
        distance: "Dot".into(),
        shard_number: 2,
        replication_factor: 2,
        write_consistency_factor: 2,
        shard_keys: vec!["eu".into(), "us".into()],
        payload_indexes: vec![("tag".into(), "keyword".into())],
    }
}

/// The source platform: 6000 points in `memory` (6 × 2), 900 in `tenants` (custom sharding).
fn source_cluster() -> QdrantCluster {
    let c = QdrantCluster::start(3, Some(API_KEY));
    c.create_collection("memory", &memory_spec());
    c.upsert_points("memory", 6000, 7);
    c.create_collection("tenants", &tenants_spec());
    c.upsert_points("tenants", 900, 8);
    c.add_alias("memory-live", "memory");
    c
}

/// Query vectors for the neighbour comparison: a few stored points' own vectors.
fn probes(points: &BTreeMap<u64, (Vec<f32>, Value)>) -> Vec<Vec<f32>> {
    [1u64, 777, 2048, 4999]
        .iter()
        .filter_map(|id| points.get(id).map(|(v, _)| v.clone()))
        .collect()
}

/// Everything a user checks after restoring `name` into `dst`: the same points (vectors and
/// payloads), the same exact neighbours, the recorded layout, every replica active.
fn assert_same_collection(src: &QdrantCluster, dst: &QdrantCluster, name: &str, nodes: usize) {
    let want = src.points(name);
    let got = dst.points(name);
    assert_eq!(got.len(), want.len(), "{name}: points count after restore");
    assert!(got == want, "{name}: points differ after the restore");
    assert_eq!(dst.exact_count(name), src.exact_count(name));
    for v in probes(&want) {
        assert_eq!(
            dst.nearest(name, &v, 10),
            src.nearest(name, &v, 10),
            "{name}: exact nearest neighbours differ"
        );
    }
    let (a, b) = (src.layout(name).unwrap(), dst.layout(name).unwrap());
    assert_eq!(b.shard_number, a.shard_number, "{name}: shard number");
    assert_eq!(b.replication_factor, a.replication_factor, "{name}");
    assert_eq!(b.write_consistency_factor, a.write_consistency_factor);
    assert_eq!(b.sharding_method, a.sharding_method, "{name}");
    assert_eq!(
        b.shard_keys
            .values()
            .collect::<std::collections::BTreeSet<_>>(),
        a.shard_keys
            .values()
            .collect::<std::collections::BTreeSet<_>>(),
        "{name}: shard keys"
    );
    assert_eq!(
        b.payload_schema, a.payload_schema,
        "{name}: payload indexes"
    );
    assert_eq!(b.replicas.len(), a.replicas.len(), "{name}: shards");
    for (shard, replicas) in &b.replicas {
        let expected = (a.replication_factor as usize).min(nodes);
        assert_eq!(
            replicas.len(),
            expected,
            "{name}: replicas of shard {shard}"
        );
        assert!(
            replicas.iter().all(|(_, state)| state == "Active"),
            "{name}: shard {shard} not active everywhere: {replicas:?}"
        );
    }
}

#[test]
fn a_cluster_backed_up_through_one_node_restores_whole_into_new_clusters() {
    let store = TestStore::garage();
    let src = source_cluster();
    let agent = agent_beside(&store, &src, 0, &[]);

    let out = soma(agent.addr(), &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup a 3-node Qdrant through one agent");
    let m = out.json();
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["details"]["mode"], "shard-stream", "{m}");
    assert_eq!(
        m["details"]["cluster"]["peers"].as_array().unwrap().len(),
        3,
        "{m}"
    );
    // Every shard exactly once: 6 of memory, 2 keys × 2 of tenants.
    let mut held: Vec<(String, u64)> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["collection"].as_str().unwrap().to_string(),
                a["shard"].as_u64().unwrap(),
            )
        })
        .collect();
    held.sort();
    let before = held.len();
    held.dedup();
    assert_eq!(before, held.len(), "a shard stored twice: {held:?}");
    assert_eq!(held.iter().filter(|(c, _)| c == "memory").count(), 6);
    assert_eq!(held.iter().filter(|(c, _)| c == "tenants").count(), 4);
    let layout = &m["details"]["collections"]["memory"]["layout"];
    assert_eq!(layout["exact_count"], 6000, "{layout}");
    assert_eq!(layout["replication_factor"], 2);
    let shard_sum: u64 = layout["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["points_count"].as_u64().unwrap())
        .sum();
    assert_eq!(shard_sum, 6000);
    for s in layout["shards"].as_array().unwrap() {
        assert_eq!(s["replicas"].as_array().unwrap().len(), 2, "{s}");
    }
    assert_eq!(
        m["details"]["collections"]["tenants"]["layout"]["sharding_method"],
        "custom"
    );
    assert!(
        (0..3).all(|n| src.snapshot_files_on_node(n).is_empty()),
        "shard streams leave no file on any node"
    );

    soma(agent.addr(), &["verify", &id])
        .assert_success("verify")
        .assert_stdout_contains("every shard its layout records is there (10)", "verify");
    soma(agent.addr(), &["describe", &id])
        .assert_success("describe")
        .assert_stdout_contains("Cluster:     3 Qdrant node(s)", "describe")
        .assert_stdout_contains(
            "memory: 6 shard(s) × 2 replica(s), write consistency 1, auto sharding, 6000 points; payload indexes: group",
            "describe",
        );

    // The disaster: a new, empty cluster of the same size, and one smaller.
    for nodes in [3, 2] {
        let dst = QdrantCluster::start(nodes, Some(API_KEY));
        let restorer = agent_beside(&store, &dst, nodes - 1, &[]);
        soma(restorer.addr(), &["restore", &id])
            .assert_success(&format!("restore into a new {nodes}-node cluster"));
        assert_same_collection(&src, &dst, "memory", nodes);
        assert_same_collection(&src, &dst, "tenants", nodes);
        assert_eq!(
            dst.aliases(),
            vec![("memory-live".to_string(), "memory".to_string())]
        );
        assert!(
            (0..nodes).all(|n| dst.snapshot_files_on_node(n).is_empty()),
            "uploads left on a node"
        );
        // A copy under another name, through the same path.
        soma(
            restorer.addr(),
            &[
                "restore",
                &id,
                "--collection",
                "memory",
                "--as",
                "memory-copy",
            ],
        )
        .assert_success("restore --as");
        assert!(dst.points("memory-copy") == src.points("memory"));
        assert!(!restorer.logs().contains(API_KEY), "the API key leaked");
    }

    // In place with --force, after damage: the old points back, the alias still there.
    let original = src.points("memory");
    src.upsert_points("memory", 50, 99);
    assert!(src.points("memory") != original);
    soma(agent.addr(), &["restore", &id, "--collection", "memory"])
        .assert_code(1, "restore over an existing collection")
        .assert_stderr_contains("--force", "restore over an existing collection");
    soma(
        agent.addr(),
        &["restore", &id, "--collection", "memory", "--force"],
    )
    .assert_success("restore in place with --force");
    assert!(
        src.points("memory") == original,
        "points differ after --force"
    );
    assert!(
        src.aliases()
            .contains(&("memory-live".to_string(), "memory".to_string())),
        "{:?}",
        src.aliases()
    );

    // A drill restores into scratch collections of the same layout on the source cluster.
    soma(agent.addr(), &["drill", &id])
        .assert_success("drill a distributed backup")
        .assert_stdout_contains("memory: shard layout", "drill");
    assert_eq!(
        src.collections(),
        vec!["memory".to_string(), "tenants".to_string()],
        "the drill's scratch collections are gone"
    );

    // Full-storage snapshots hold one node's shards only: refused against a cluster.
    soma(agent.addr(), &["backup", "qdrant", "--full-storage"])
        .assert_code(1, "full-storage against a cluster")
        .assert_stderr_contains("distributed mode", "full-storage against a cluster");
}

#[test]
fn a_shard_nobody_can_serve_fails_the_backup_by_name() {
    let store = TestStore::local();
    let src = QdrantCluster::start(3, Some(API_KEY));
    src.create_collection("memory", &memory_spec());
    src.upsert_points("memory", 3000, 3);
    let agent = agent_beside(&store, &src, 0, &["--metrics-listen", "127.0.0.1:0"]);

    // One node down: every shard still has an active replica that answers.
    src.stop_node(2);
    let out = soma(agent.addr(), &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup with one node of three down");
    let m = out.json();
    let taken_from: Vec<u64> = m["details"]["collections"]["memory"]["layout"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["taken_from"].as_u64().unwrap())
        .collect();
    assert!(
        !taken_from.contains(&src.peer_id(2)),
        "a shard taken from the stopped node: {taken_from:?}"
    );
    let before = listed_ids(agent.addr());

    // Two down: the shards only they held have no answering replica.
    src.stop_node(1);
    let lost = src
        .layout("memory")
        .unwrap()
        .replicas
        .iter()
        .find(|(_, r)| r.iter().all(|(node, _)| *node != 0))
        .map(|(shard, _)| *shard)
        .expect("some shard lives only on nodes 1 and 2");
    soma(agent.addr(), &["backup", "qdrant"])
        .assert_code(1, "backup with a shard unreachable")
        .assert_stderr_contains(&format!("shard {lost}"), "names the shard")
        .assert_stderr_contains("never succeeds with a shard missing", "says why");
    assert_eq!(listed_ids(agent.addr()), before, "a failed backup listed");
    src.start_node(1);
    src.start_node(2);

    // A shard whose replicas are all dead: refused by name before anything is streamed.
    let holders: Vec<usize> = src.layout("memory").unwrap().replicas[&4]
        .iter()
        .map(|(node, _)| *node)
        .collect();
    for node in holders {
        src.set_replica_state("memory", 4, node, "Dead");
    }
    soma(agent.addr(), &["backup", "qdrant"])
        .assert_code(1, "backup with a dead shard")
        .assert_stderr_contains("shard 4 has no active replica", "names the shard");
    assert_eq!(listed_ids(agent.addr()), before);
    let status = soma(agent.addr(), &["status"]);
    status
        .assert_code(1, "status with a dead shard")
        .assert_stdout_contains("Qdrant cluster: 3 node(s) (0 unreachable)", "status")
        .assert_stdout_contains("SHARDS WITHOUT AN ACTIVE REPLICA: 4", "status");
    let metrics = agent.metrics_addr();
    let gauge = |name: &str| value(&scrape(&metrics), name, &[]);
    poll_until(Duration::from_secs(30), "the shard gauge", || {
        (gauge("soma_qdrant_shards_unavailable") == Some(1.0)).then_some(())
    });
    assert_eq!(gauge("soma_qdrant_cluster_peers"), Some(3.0));
    assert_eq!(gauge("soma_qdrant_cluster_peers_unreachable"), Some(0.0));
    assert!(gauge("soma_qdrant_replicas_not_active").unwrap() >= 2.0);
}

#[test]
fn backup_all_with_an_agent_beside_every_node_stores_each_shard_once() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table t (id int primary key); insert into t values (1);",
    );
    let store = TestStore::local();
    let pg_agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let src = QdrantCluster::start(3, Some(API_KEY));
    src.create_collection("memory", &memory_spec());
    src.upsert_points("memory", 1200, 5);
    let agents: Vec<Agent> = (0..3).map(|n| agent_beside(&store, &src, n, &[])).collect();
    let kube = KubeDouble::start();
    kube.add_pod(
        PodSpec::agent(
            NS,
            "postgresql-0",
            "postgres",
            pg_agent.addr().parse().unwrap(),
        )
        .label("app.kubernetes.io/component", "primary"),
    );
    for (n, a) in agents.iter().enumerate() {
        kube.add_pod(PodSpec::agent(
            NS,
            &format!("qdrant-{n}"),
            "qdrant",
            a.addr().parse().unwrap(),
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig, NS);

    let out = kubectl_soma(&kubeconfig, &["-o", "json", "backup", "all"]);
    out.assert_success("backup all across a PostgreSQL agent and three Qdrant agents");
    let members: Vec<String> = out.json()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members.len(), 2, "one backup per engine: {members:?}");
    let qd = members.iter().find(|m| m.contains("-qd-")).unwrap();
    let m = soma(agents[0].addr(), &["-o", "json", "describe", qd]);
    m.assert_success("describe the Qdrant member");
    assert_eq!(
        m.json()["artifacts"].as_array().unwrap().len(),
        6,
        "each of the 6 shards once"
    );

    // Three Qdrant agents, one cluster: any of them serves a Qdrant command, no --pod needed.
    let out = kubectl_soma(&kubeconfig, &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup qdrant with an agent beside every node");
    assert_eq!(out.json()["artifacts"].as_array().unwrap().len(), 6);
    // A second, unrelated Qdrant in the namespace: the choice is the user's again.
    let other = QdrantCluster::start(2, Some(API_KEY));
    let stranger = agent_beside(&store, &other, 0, &[]);
    kube.add_pod(PodSpec::agent(
        NS,
        "search-0",
        "qdrant",
        stranger.addr().parse().unwrap(),
    ));
    kubectl_soma(&kubeconfig, &["backup", "qdrant"])
        .assert_code(1, "two Qdrant deployments")
        .assert_stderr_contains("--pod NAME", "asks which");
}

/// A restore that cannot bring back every shard fails by name and leaves no half collection.
#[test]
fn a_restore_missing_a_shard_leaves_no_half_collection() {
    let store = TestStore::local();
    let src = QdrantCluster::start(3, Some(API_KEY));
    src.create_collection("memory", &memory_spec());
    src.upsert_points("memory", 2400, 11);
    let agent = agent_beside(&store, &src, 0, &[]);
    let out = soma(agent.addr(), &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup");
    let id = out.json()["id"].as_str().unwrap().to_string();

    // Someone who can write the bucket removes one shard's object.
    let root = store.local_root().unwrap().to_path_buf();
    let victim = walk(&root)
        .into_iter()
        .find(|p| p.to_string_lossy().ends_with("shard-3.snapshot.zst"))
        .expect("shard 3's object in the store");
    std::fs::remove_file(&victim).unwrap();

    let dst = QdrantCluster::start(3, Some(API_KEY));
    let restorer = agent_beside(&store, &dst, 0, &[]);
    soma(restorer.addr(), &["restore", &id])
        .assert_code(1, "restore with a shard's object gone")
        .assert_stderr_contains("shard-3", "names the shard's object");
    assert!(
        dst.collections().is_empty(),
        "a half-restored collection stayed: {:?}",
        dst.collections()
    );
    assert!(
        (0..3).all(|n| dst.snapshot_files_on_node(n).is_empty()),
        "uploads left on a node"
    );

    // --force over a live collection: nothing is deleted before every snapshot is known to be
    // there, so the live one survives the refused restore.
    dst.create_collection("memory", &memory_spec());
    dst.upsert_points("memory", 100, 1);
    let live = dst.points("memory");
    soma(restorer.addr(), &["restore", &id, "--force"])
        .assert_code(1, "restore --force with a shard's object gone")
        .assert_stderr_contains("shard 3", "names the shard");
    assert!(
        dst.points("memory") == live,
        "the live collection was touched"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
