//! Proves the Qdrant cluster double (soma_tests::qdrant_cluster) behaves as its module docs say,
//! through its REST API with a plain HTTP client as the agent would use it: the cluster listing
//! from every node, placement, routing, shard streaming only from a holder, shard recovery with
//! each priority and the automatic re-sync, checksums, collection snapshots holding only the
//! asked node's shards (and the loss that makes when restored through one node), stopped
//! nodes, and custom sharding.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::blocking::{Client, Response, multipart};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use soma_tests::poll_until;
use soma_tests::qdrant_cluster::{ClusterCollection, QdrantCluster};

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn json_of(response: Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.text().unwrap();
    let value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("not JSON ({e}), status {status}: {body:?}"));
    (status, value)
}

fn get(q: &QdrantCluster, node: usize, path: &str) -> (StatusCode, Value) {
    json_of(
        client()
            .get(format!("{}{path}", q.node_url(node)))
            .send()
            .unwrap(),
    )
}

fn send(
    q: &QdrantCluster,
    node: usize,
    method: &str,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let url = format!("{}{path}", q.node_url(node));
    let request = match method {
        "PUT" => client().put(url),
        "POST" => client().post(url),
        other => panic!("no method {other}"),
    };
    json_of(request.json(&body).send().unwrap())
}

fn ok_result((status, body): (StatusCode, Value)) -> Value {
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok", "{body}");
    body["result"].clone()
}

fn error_message((status, body): (StatusCode, Value), expected: StatusCode) -> String {
    assert_eq!(status, expected, "{body}");
    assert!(body.get("result").is_none(), "{body}");
    body["status"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no status.error in {body}"))
        .to_string()
}

fn spec(shards: u32, replicas: u32) -> ClusterCollection {
    ClusterCollection {
        vector_size: 16,
        distance: "Cosine".to_string(),
        shard_number: shards,
        replication_factor: replicas,
        write_consistency_factor: 1,
        shard_keys: Vec::new(),
        payload_indexes: vec![
            ("group".to_string(), "integer".to_string()),
            ("tag".to_string(), "keyword".to_string()),
        ],
    }
}

/// The node indices holding a replica of `shard`, with their states.
fn holders(q: &QdrantCluster, collection: &str, shard: u32) -> Vec<(usize, String)> {
    q.layout(collection).unwrap().replicas[&shard].clone()
}

fn download(q: &QdrantCluster, node: usize, path: &str) -> Vec<u8> {
    let response = client()
        .get(format!("{}{path}", q.node_url(node)))
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "GET {path} on node {node}"
    );
    response.bytes().unwrap().to_vec()
}

fn upload(
    q: &QdrantCluster,
    node: usize,
    path: &str,
    archive: &[u8],
    query: &str,
) -> (StatusCode, Value) {
    let form = multipart::Form::new().part(
        "snapshot",
        multipart::Part::bytes(archive.to_vec()).file_name("upload.snapshot"),
    );
    json_of(
        client()
            .post(format!("{}{path}?{query}", q.node_url(node)))
            .multipart(form)
            .send()
            .unwrap(),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// This node's replica state and point count of `shard`, as `GET /collections/{c}/cluster`
/// on that node reports it.
fn local_shard(q: &QdrantCluster, node: usize, collection: &str, shard: u32) -> (String, u64) {
    let info = ok_result(get(q, node, &format!("/collections/{collection}/cluster")));
    let local = info["local_shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard_id"] == shard)
        .unwrap_or_else(|| panic!("node {node} has no local shard {shard}: {info}"))
        .clone();
    (
        local["state"].as_str().unwrap().to_string(),
        local["points_count"].as_u64().unwrap(),
    )
}

/// Waits until every replica of the collection is Active.
fn wait_all_active(q: &QdrantCluster, collection: &str) {
    poll_until(
        Duration::from_secs(30),
        "every replica to be Active",
        || q.all_active(collection).then_some(()),
    );
}

/// `exact` count as a user reads it from a node.
fn rest_count(q: &QdrantCluster, node: usize, collection: &str) -> u64 {
    ok_result(send(
        q,
        node,
        "POST",
        &format!("/collections/{collection}/points/count"),
        json!({"exact": true}),
    ))["count"]
        .as_u64()
        .unwrap()
}

#[test]
fn every_node_lists_the_whole_cluster_with_its_own_peer_id() {
    let q = QdrantCluster::start(3, None);
    assert_ne!(q.p2p_port(), q.rest_port());
    let ids: BTreeSet<u64> = (0..3).map(|i| q.peer_id(i)).collect();
    assert_eq!(ids.len(), 3, "peer ids are distinct");
    for node in 0..3 {
        assert_eq!(
            q.node_url(node),
            format!("http://127.0.0.{}:{}", node + 1, q.rest_port())
        );
        let root = get(&q, node, "/").1;
        assert_eq!(root["version"], "1.18.3", "{root}");
        let status = ok_result(get(&q, node, "/cluster"));
        assert_eq!(status["status"], "enabled", "{status}");
        assert_eq!(status["peer_id"], q.peer_id(node), "{status}");
        let peers = status["peers"].as_object().unwrap();
        assert_eq!(peers.len(), 3, "{status}");
        for other in 0..3 {
            assert_eq!(
                peers[&q.peer_id(other).to_string()]["uri"],
                format!("http://127.0.0.{}:{}/", other + 1, q.p2p_port()),
                "{status}"
            );
        }
        assert_eq!(status["raft_info"]["leader"], q.peer_id(0), "{status}");
        let role = if node == 0 { "Leader" } else { "Follower" };
        assert_eq!(status["raft_info"]["role"], role, "{status}");
        assert_eq!(
            status["consensus_thread_status"]["consensus_thread_status"], "working",
            "{status}"
        );
        assert!(
            q.requests(node)
                .iter()
                .any(|r| r.path == "/cluster" && r.status == 200)
        );
    }

    // A stopped node refuses connections and is still listed by the others.
    q.stop_node(2);
    let refused = client().get(format!("{}/cluster", q.node_url(2))).send();
    assert!(
        refused.as_ref().is_err_and(|e| e.is_connect()),
        "{refused:?}"
    );
    let status = ok_result(get(&q, 1, "/cluster"));
    assert!(
        status["peers"].get(q.peer_id(2).to_string()).is_some(),
        "{status}"
    );
    q.start_node(2);
    assert_eq!(ok_result(get(&q, 2, "/cluster"))["peer_id"], q.peer_id(2));

    // With an API key, every node wants it.
    let keyed = QdrantCluster::start(2, Some("cluster-key"));
    let response = client()
        .get(format!("{}/cluster", keyed.node_url(1)))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = client()
        .get(format!("{}/cluster", keyed.node_url(1)))
        .header("api-key", "cluster-key")
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[test]
fn six_shards_of_two_replicas_spread_over_three_nodes() {
    let q = QdrantCluster::start(3, None);
    ok_result(send(
        &q,
        1,
        "PUT",
        "/collections/spread",
        json!({"vectors": {"size": 8, "distance": "Dot"}, "shard_number": 6,
               "replication_factor": 2, "write_consistency_factor": 1}),
    ));
    let mut seen: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for node in 0..3 {
        let info = ok_result(get(&q, node, "/collections/spread/cluster"));
        assert_eq!(info["peer_id"], q.peer_id(node), "{info}");
        assert_eq!(info["shard_count"], 6, "{info}");
        let local = info["local_shards"].as_array().unwrap();
        assert_eq!(local.len(), 4, "every node holds 4 replicas: {info}");
        for shard in local {
            assert_eq!(shard["state"], "Active", "{info}");
            assert_eq!(shard["points_count"], 0, "{info}");
            assert!(
                shard.get("shard_key").is_none(),
                "auto sharding has no key: {info}"
            );
            seen.entry(shard["shard_id"].as_u64().unwrap())
                .or_default()
                .insert(q.peer_id(node));
        }
        let remote = info["remote_shards"].as_array().unwrap();
        assert_eq!(remote.len(), 8, "{info}");
        assert!(
            remote.iter().all(|r| r["peer_id"] != q.peer_id(node)),
            "{info}"
        );
        assert_eq!(info["shard_transfers"], json!([]), "{info}");
    }
    assert_eq!(seen.len(), 6);
    for (shard, peers) in &seen {
        assert_eq!(
            peers.len(),
            2,
            "shard {shard} on two distinct nodes: {seen:?}"
        );
    }
    let layout = q.layout("spread").unwrap();
    assert_eq!(layout.sharding_method, "auto");
    assert_eq!(layout.replicas.len(), 6);

    let info = ok_result(get(&q, 2, "/collections/spread"));
    let params = &info["config"]["params"];
    assert_eq!(params["shard_number"], 6, "{info}");
    assert_eq!(params["replication_factor"], 2, "{info}");
    assert_eq!(params["write_consistency_factor"], 1, "{info}");
    assert_eq!(
        params["vectors"],
        json!({"size": 8, "distance": "Dot"}),
        "{info}"
    );
    assert!(params.get("sharding_method").is_none(), "{info}");
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/spread",
            json!({"vectors": {"size": 8, "distance": "Dot"}}),
        ),
        StatusCode::CONFLICT,
    );
    assert_eq!(message, "Wrong input: Collection `spread` already exists!");
}

#[test]
fn every_point_lands_in_one_shard_on_all_its_replicas_and_reads_from_any_node() {
    let q = QdrantCluster::start(3, None);
    q.create_collection("routed", &spec(6, 2));
    // Written through the REST API of one node, in batches.
    for batch in 0..3u64 {
        let points: Vec<Value> = (1..=200u64)
            .map(|i| {
                let id = batch * 200 + i;
                let vector: Vec<f32> = (0..16).map(|j| ((id * 31 + j) % 17) as f32 - 8.0).collect();
                json!({"id": id, "vector": vector, "payload": {"group": id % 7}})
            })
            .collect();
        let result = ok_result(send(
            &q,
            (batch % 3) as usize,
            "PUT",
            "/collections/routed/points?wait=true",
            json!({"points": points}),
        ));
        assert_eq!(result["status"], "completed", "{result}");
    }
    let counts = q.replica_counts("routed");
    let mut total = 0;
    for (shard, replicas) in &counts {
        assert_eq!(replicas.len(), 2);
        assert_eq!(
            replicas[0].1, replicas[1].1,
            "both replicas of shard {shard} hold the same points: {counts:?}"
        );
        assert!(replicas[0].1 > 0, "shard {shard} got points: {counts:?}");
        total += replicas[0].1;
    }
    assert_eq!(total, 600, "every point in exactly one shard: {counts:?}");

    for node in 0..3 {
        assert_eq!(rest_count(&q, node, "routed"), 600);
        let info = ok_result(get(&q, node, "/collections/routed"));
        assert_eq!(info["points_count"], 600, "{info}");
        assert_eq!(
            info["payload_schema"]["group"]["data_type"], "integer",
            "{info}"
        );
        assert_eq!(info["payload_schema"]["group"]["points"], 600, "{info}");
        assert_eq!(info["payload_schema"]["tag"]["points"], 0, "{info}");
        // A scroll from any node pages through every id once, in order.
        let mut ids = Vec::new();
        let mut offset = Value::Null;
        loop {
            let page = ok_result(send(
                &q,
                node,
                "POST",
                "/collections/routed/points/scroll",
                json!({"limit": 128, "offset": offset, "with_vector": true}),
            ));
            for p in page["points"].as_array().unwrap() {
                ids.push(p["id"].as_u64().unwrap());
                assert_eq!(p["vector"].as_array().unwrap().len(), 16);
                assert_eq!(p["payload"]["group"], p["id"].as_u64().unwrap() % 7);
            }
            offset = page["next_page_offset"].clone();
            if offset.is_null() {
                break;
            }
        }
        assert_eq!(ids, (1..=600).collect::<Vec<u64>>());
    }
    // Exact search across shards answers the same from every node.
    let query: Vec<f32> = (0..16).map(|j| (j as f32) - 7.5).collect();
    let expected = q.nearest("routed", &query, 10);
    assert_eq!(expected.len(), 10);
    for node in 0..3 {
        let hits = ok_result(send(
            &q,
            node,
            "POST",
            "/collections/routed/points/query",
            json!({"query": query, "limit": 10, "params": {"exact": true}}),
        ));
        let ids: Vec<u64> = hits["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["id"].as_u64().unwrap())
            .collect();
        assert_eq!(ids, expected, "node {node}");
    }
}

#[test]
fn a_shard_streams_only_from_a_node_that_holds_it() {
    let q = QdrantCluster::start(3, None);
    q.create_collection("streamed", &spec(6, 2));
    q.upsert_points("streamed", 300, 1);
    for shard in 0..6u32 {
        let held: Vec<usize> = holders(&q, "streamed", shard)
            .iter()
            .map(|(n, _)| *n)
            .collect();
        for node in 0..3 {
            let response = client()
                .get(format!(
                    "{}/collections/streamed/shards/{shard}/snapshot",
                    q.node_url(node)
                ))
                .send()
                .unwrap();
            if held.contains(&node) {
                assert_eq!(response.status(), StatusCode::OK);
                let disposition = response.headers()["content-disposition"]
                    .to_str()
                    .unwrap()
                    .to_string();
                assert!(
                    disposition
                        .starts_with(&format!("attachment; filename=\"streamed-shard-{shard}-")),
                    "{disposition}"
                );
                assert!(!response.bytes().unwrap().is_empty());
            } else {
                assert_eq!(response.status(), StatusCode::BAD_REQUEST);
                assert_eq!(
                    response.text().unwrap(),
                    format!("Bad request: Shard {shard} is not a local or queue proxy shard")
                );
            }
        }
    }
    let response = client()
        .get(format!(
            "{}/collections/streamed/shards/6/snapshot",
            q.node_url(0)
        ))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(response.text().unwrap(), "Not found: shard 6 not found");
    let response = client()
        .get(format!(
            "{}/collections/nope/shards/0/snapshot",
            q.node_url(0)
        ))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[test]
fn shard_recovery_follows_each_priority_and_dead_replicas_resync() {
    let q = QdrantCluster::start(3, None);
    // Long enough that a replica's Dead state is seen right after the upload even on a loaded
    // machine; the transfer's Partial state lasts as long.
    q.set_transfer_delay(Duration::from_secs(1));
    q.create_collection("prio", &spec(6, 2));
    q.upsert_points("prio", 300, 7);
    let shard = 0u32;
    let held = holders(&q, "prio", shard);
    let (a, b) = (held[0].0, held[1].0);
    let stranger = (0..3).find(|n| *n != a && *n != b).unwrap();
    let path = format!("/collections/prio/shards/{shard}/snapshot");
    let upload_path = format!("/collections/prio/shards/{shard}/snapshots/upload");
    let old = download(&q, a, &path);
    let old_count = local_shard(&q, a, "prio", shard).1;
    // More points: the archive is now older than both replicas.
    q.upsert_points("prio", 600, 7);
    let new_count = local_shard(&q, a, "prio", shard).1;
    assert!(new_count > old_count, "{old_count} -> {new_count}");

    // A node without a replica refuses, after the checksum.
    let message = error_message(
        upload(
            &q,
            stranger,
            &upload_path,
            &old,
            &format!("checksum={}", sha256_hex(&old)),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        format!("Bad request: Shard {shard} is not a local shard")
    );
    // A wrong checksum is refused and changes nothing.
    let wrong = sha256_hex(b"something else");
    let message = error_message(
        upload(&q, b, &upload_path, &old, &format!("checksum={wrong}")),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        format!(
            "Checksum mismatch: expected {}, actual {wrong}",
            sha256_hex(&old)
        )
    );
    assert_eq!(
        local_shard(&q, b, "prio", shard),
        ("Active".to_string(), new_count)
    );

    // `replica`: the uploaded replica turns Dead, is re-synced from the other, and keeps the
    // other's (newer) points.
    let result = ok_result(upload(
        &q,
        b,
        &upload_path,
        &old,
        &format!("priority=replica&checksum={}", sha256_hex(&old)),
    ));
    assert_eq!(result, Value::Null);
    assert_eq!(
        local_shard(&q, b, "prio", shard),
        ("Dead".to_string(), old_count)
    );
    assert_eq!(
        local_shard(&q, a, "prio", shard),
        ("Active".to_string(), new_count)
    );
    let mut states = BTreeSet::new();
    let mut transfers_seen = Vec::new();
    poll_until(Duration::from_secs(30), "the replica re-synced", || {
        let (state, count) = local_shard(&q, b, "prio", shard);
        if state == "Partial" {
            let info = ok_result(get(&q, a, "/collections/prio/cluster"));
            transfers_seen.extend(info["shard_transfers"].as_array().unwrap().iter().cloned());
        }
        states.insert(state.clone());
        (state == "Active").then_some(count)
    });
    assert!(
        transfers_seen.iter().any(|t| t["shard_id"] == shard
            && t["from"] == q.peer_id(a)
            && t["to"] == q.peer_id(b)),
        "the transfer is listed while the replica is Partial: {transfers_seen:?}"
    );
    assert!(
        states.contains("Partial"),
        "a transfer was seen: {states:?}"
    );
    assert_eq!(local_shard(&q, b, "prio", shard).1, new_count);

    // `no_sync`: the uploaded replica is Active with the archive's points; the other keeps its
    // own, untouched.
    ok_result(upload(&q, b, &upload_path, &old, "priority=no_sync"));
    assert_eq!(
        local_shard(&q, b, "prio", shard),
        ("Active".to_string(), old_count)
    );
    assert_eq!(
        local_shard(&q, a, "prio", shard),
        ("Active".to_string(), new_count)
    );

    // `snapshot` (the default): the uploaded replica wins, the other turns Dead and is re-synced
    // from it.
    ok_result(upload(&q, a, &upload_path, &old, ""));
    assert_eq!(
        local_shard(&q, a, "prio", shard),
        ("Active".to_string(), old_count)
    );
    assert_eq!(local_shard(&q, b, "prio", shard).0, "Dead");
    poll_until(
        Duration::from_secs(30),
        "the other replica re-synced",
        || (local_shard(&q, b, "prio", shard) == ("Active".to_string(), old_count)).then_some(()),
    );

    // No other Active replica: even `replica` activates the uploaded one. The other is on a
    // stopped node, so it is not re-synced meanwhile.
    q.stop_node(b);
    q.set_replica_state("prio", shard, b, "Dead");
    let fresh = download(&q, a, &path);
    ok_result(upload(&q, a, &upload_path, &fresh, "priority=replica"));
    assert_eq!(local_shard(&q, a, "prio", shard).0, "Active");
    assert_eq!(
        holders(&q, "prio", shard)
            .iter()
            .find(|(n, _)| *n == b)
            .unwrap()
            .1,
        "Dead"
    );
    q.start_node(b);
    poll_until(
        Duration::from_secs(30),
        "the restarted node re-synced",
        || (local_shard(&q, b, "prio", shard).0 == "Active").then_some(()),
    );

    // A collection archive is not a shard archive, and the other way round.
    let collection_archive = download_collection_snapshot(&q, a, "prio");
    let message = error_message(
        upload(&q, a, &upload_path, &collection_archive, ""),
        StatusCode::BAD_REQUEST,
    );
    assert!(
        message.starts_with("Wrong input: Invalid shard snapshot"),
        "{message}"
    );
    let message = error_message(
        upload(&q, a, "/collections/prio/snapshots/upload", &old, ""),
        StatusCode::BAD_REQUEST,
    );
    assert!(
        message.starts_with("Wrong input: Invalid collection snapshot"),
        "{message}"
    );
    assert!(
        q.snapshot_files_on_node(a)
            .iter()
            .all(|p| !p.to_string_lossy().contains("/tmp/upload-")),
        "no upload spool left behind"
    );
}

/// Creates a collection snapshot on `node` and downloads it, checking its checksum.
fn download_collection_snapshot(q: &QdrantCluster, node: usize, collection: &str) -> Vec<u8> {
    let description = ok_result(send(
        q,
        node,
        "POST",
        &format!("/collections/{collection}/snapshots?wait=true"),
        json!({}),
    ));
    let name = description["name"].as_str().unwrap();
    assert!(
        name.contains(&format!("-{}-", q.peer_id(node))) && name.ends_with(".snapshot"),
        "named <collection>-<peer id>-<time>.snapshot: {description}"
    );
    let listed = ok_result(get(
        q,
        node,
        &format!("/collections/{collection}/snapshots"),
    ));
    assert!(
        listed.as_array().unwrap().iter().any(|s| s["name"] == name),
        "{listed}"
    );
    let bytes = download(
        q,
        node,
        &format!("/collections/{collection}/snapshots/{name}"),
    );
    assert_eq!(description["checksum"], sha256_hex(&bytes));
    assert_eq!(description["size"], bytes.len());
    bytes
}

#[test]
fn a_collection_snapshot_holds_the_nodes_local_shards_only() {
    let old = QdrantCluster::start(3, None);
    old.create_collection("vectors", &spec(6, 2));
    old.upsert_points("vectors", 6000, 42);
    old.add_alias("current", "vectors");
    let held_by_0: Vec<u32> = old
        .layout("vectors")
        .unwrap()
        .replicas
        .iter()
        .filter(|(_, rs)| rs.iter().any(|(n, _)| *n == 0))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(held_by_0.len(), 4);
    let counts = old.replica_counts("vectors");
    let expected: u64 = held_by_0.iter().map(|id| counts[id][0].1).sum();

    // Backed up through node 0 (via the alias, as a user might), restored through node 0 of a
    // new, empty cluster of the same size: both succeed, and points are lost.
    let archive = download_collection_snapshot(&old, 0, "current");
    let new = QdrantCluster::start(3, None);
    let result = ok_result(upload(
        &new,
        0,
        "/collections/vectors/snapshots/upload",
        &archive,
        &format!("wait=true&checksum={}", sha256_hex(&archive)),
    ));
    assert_eq!(result, json!(true));
    wait_all_active(&new, "vectors");
    let restored = rest_count(&new, 1, "vectors");
    eprintln!(
        "collection snapshot through one node: {restored} of 6000 points restored \
         (issue 23 measured 3906 of 6000 on real Qdrant 1.18.3)"
    );
    assert_eq!(restored, expected);
    assert!(restored < 6000 && restored > 0, "{restored}");
    let layout = new.layout("vectors").unwrap();
    assert_eq!(layout.shard_number, 6);
    assert_eq!(layout.replication_factor, 2);
    assert_eq!(
        layout.payload_schema,
        old.layout("vectors").unwrap().payload_schema
    );
    // The uploaded file stays in the node's snapshot directory, as in Qdrant.
    assert!(
        new.snapshot_files_on_node(0)
            .iter()
            .any(|p| p.ends_with("vectors/upload.snapshot"))
    );
    assert!(
        new.aliases().is_empty(),
        "aliases are not in a collection snapshot"
    );

    // Shard by shard — each shard streamed from an Active holder in the old cluster, recovered
    // on one holder in the new one, whose peers re-sync — restores every point.
    let by_shard = QdrantCluster::start(2, None);
    by_shard.create_collection("vectors", &spec(6, 2));
    for (shard, replicas) in old.layout("vectors").unwrap().replicas {
        let (from, _) = replicas.iter().find(|(_, s)| s == "Active").unwrap();
        let bytes = download(
            &old,
            *from,
            &format!("/collections/vectors/shards/{shard}/snapshot"),
        );
        let (to, _) = holders(&by_shard, "vectors", shard)[0].clone();
        ok_result(upload(
            &by_shard,
            to,
            &format!("/collections/vectors/shards/{shard}/snapshots/upload"),
            &bytes,
            &format!(
                "wait=true&priority=snapshot&checksum={}",
                sha256_hex(&bytes)
            ),
        ));
    }
    wait_all_active(&by_shard, "vectors");
    assert_eq!(by_shard.points("vectors"), old.points("vectors"));
    let query: Vec<f32> = (0..16).map(|j| (j as f32 * 0.37).sin()).collect();
    assert_eq!(
        by_shard.nearest("vectors", &query, 20),
        old.nearest("vectors", &query, 20)
    );
}

#[test]
fn a_stopped_node_is_unreachable_and_resyncs_when_back() {
    let q = QdrantCluster::start(3, None);
    q.set_transfer_delay(Duration::from_millis(50));
    q.create_collection("durable", &spec(6, 2));
    q.create_collection("fragile", &spec(3, 1));
    q.upsert_points("durable", 500, 3);
    q.upsert_points("fragile", 500, 3);

    q.stop_node(1);
    let refused = client()
        .get(format!("{}/collections", q.node_url(1)))
        .send();
    assert!(
        refused.as_ref().is_err_and(|e| e.is_connect()),
        "{refused:?}"
    );
    // Two replicas: every shard still has an Active one on a running node.
    assert_eq!(rest_count(&q, 0, "durable"), 500);
    // One replica: the shard on the stopped node cannot be read.
    let message = error_message(
        send(
            &q,
            2,
            "POST",
            "/collections/fragile/points/count",
            json!({"exact": true}),
        ),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    assert!(message.starts_with("Service internal error: "), "{message}");
    let message = error_message(
        get(&q, 0, "/collections/fragile"),
        StatusCode::INTERNAL_SERVER_ERROR,
    );
    assert!(message.starts_with("Service internal error: "), "{message}");

    // Writes while it is stopped miss its replicas, which consensus marks Dead; they are not
    // re-synced while the node is down.
    q.upsert_points("durable", 800, 3);
    let dead: Vec<u32> = q
        .layout("durable")
        .unwrap()
        .replicas
        .iter()
        .filter(|(_, rs)| rs.iter().any(|(n, s)| *n == 1 && s == "Dead"))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(
        dead.len(),
        4,
        "node 1's replicas of written shards are Dead"
    );
    assert_eq!(rest_count(&q, 2, "durable"), 800);
    let info = ok_result(get(&q, 0, "/collections/durable/cluster"));
    assert_eq!(info["shard_transfers"], json!([]), "{info}");

    q.start_node(1);
    wait_all_active(&q, "durable");
    for (shard, replicas) in q.replica_counts("durable") {
        assert_eq!(replicas[0].1, replicas[1].1, "shard {shard}: {replicas:?}");
    }
    assert_eq!(rest_count(&q, 1, "durable"), 800);
    assert_eq!(rest_count(&q, 1, "fragile"), 500);
}

#[test]
fn custom_sharding_creates_shards_per_key_and_routes_by_key() {
    let q = QdrantCluster::start(3, None);
    ok_result(send(
        &q,
        0,
        "PUT",
        "/collections/tenants",
        json!({"vectors": {"size": 4, "distance": "Euclid"}, "sharding_method": "custom",
               "shard_number": 2, "replication_factor": 2}),
    ));
    let info = ok_result(get(&q, 0, "/collections/tenants/cluster"));
    assert_eq!(info["shard_count"], 0, "no shards before a key: {info}");
    let config = ok_result(get(&q, 0, "/collections/tenants"));
    assert_eq!(
        config["config"]["params"]["sharding_method"], "custom",
        "{config}"
    );

    ok_result(send(
        &q,
        1,
        "PUT",
        "/collections/tenants/shards",
        json!({"shard_key": "eu"}),
    ));
    ok_result(send(
        &q,
        2,
        "PUT",
        "/collections/tenants/shards",
        json!({"shard_key": "us", "shards_number": 1, "replication_factor": 1,
               "placement": [q.peer_id(2)]}),
    ));
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/tenants/shards",
            json!({"shard_key": "eu"}),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(message, "Bad request: Shard key eu already exists");
    let layout = q.layout("tenants").unwrap();
    assert_eq!(
        layout.shard_keys,
        BTreeMap::from([
            (0, Some("eu".to_string())),
            (1, Some("eu".to_string())),
            (2, Some("us".to_string()))
        ])
    );
    assert_eq!(layout.replicas[&2], vec![(2, "Active".to_string())]);
    assert_eq!(layout.replicas[&0].len(), 2);

    let point = |id: u64| json!({"id": id, "vector": [id as f32, 0.0, 1.0, 2.0]});
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/tenants/points",
            json!({"points": [point(1)]}),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(message, "Wrong input: Shard key not specified");
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/tenants/points",
            json!({"points": [point(1)], "shard_key": "asia"}),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(message, "Wrong input: Shard key asia not found");
    let eu: Vec<Value> = (1..=40).map(point).collect();
    let us: Vec<Value> = (41..=50).map(point).collect();
    ok_result(send(
        &q,
        0,
        "PUT",
        "/collections/tenants/points",
        json!({"points": eu, "shard_key": "eu"}),
    ));
    ok_result(send(
        &q,
        1,
        "PUT",
        "/collections/tenants/points",
        json!({"points": us, "shard_key": "us"}),
    ));
    let counts = q.replica_counts("tenants");
    assert_eq!(counts[&2], vec![(2, 10)], "{counts:?}");
    assert_eq!(counts[&0][0].1 + counts[&1][0].1, 40, "{counts:?}");
    let info = ok_result(get(&q, 2, "/collections/tenants/cluster"));
    let us_local = info["local_shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["shard_id"] == 2)
        .unwrap()
        .clone();
    assert_eq!(us_local["shard_key"], "us", "{info}");
    assert_eq!(us_local["points_count"], 10, "{info}");
    assert_eq!(rest_count(&q, 0, "tenants"), 50);

    // Auto sharding has no keys to create.
    q.create_collection("auto", &spec(2, 1));
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/auto/shards",
            json!({"shard_key": "x"}),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        "Bad request: Shard Key x cannot be created with Auto sharding method"
    );

    // The helpers: one key per `shard_keys` entry, points spread over keys by id.
    let mut custom = spec(2, 2);
    custom.shard_keys = vec!["a".to_string(), "b".to_string()];
    q.create_collection("helper", &custom);
    q.upsert_points("helper", 100, 9);
    let layout = q.layout("helper").unwrap();
    assert_eq!(layout.sharding_method, "custom");
    assert_eq!(layout.shard_keys.len(), 4);
    let counts = q.replica_counts("helper");
    let per_key = |key: &str| -> u64 {
        layout
            .shard_keys
            .iter()
            .filter(|(_, k)| k.as_deref() == Some(key))
            .map(|(id, _)| counts[id][0].1)
            .sum()
    };
    assert_eq!((per_key("a"), per_key("b")), (50, 50));

    // A collection snapshot of a custom collection restores its keys into a new cluster.
    let archive = download_collection_snapshot(&q, 0, "helper");
    let new = QdrantCluster::start(3, None);
    ok_result(upload(
        &new,
        0,
        "/collections/helper/snapshots/upload",
        &archive,
        "",
    ));
    let restored = new.layout("helper").unwrap();
    assert_eq!(restored.shard_keys, layout.shard_keys);
    assert_eq!(restored.sharding_method, "custom");
}

#[test]
fn bad_archives_names_and_sizes_are_refused_without_a_trace() {
    let q = QdrantCluster::start(2, None);
    q.create_collection("kept", &spec(2, 2));
    q.upsert_points("kept", 50, 5);

    // Bytes that are not one of the double's archives recover nothing.
    for junk in [&b""[..], b"not json\n", b"{\"format\":\"other\"}\n"] {
        let message = error_message(
            upload(&q, 0, "/collections/fresh/snapshots/upload", junk, ""),
            StatusCode::BAD_REQUEST,
        );
        assert!(
            message.starts_with("Wrong input: Invalid collection snapshot"),
            "{message}"
        );
        let message = error_message(
            upload(
                &q,
                0,
                "/collections/kept/shards/0/snapshots/upload",
                junk,
                "",
            ),
            StatusCode::BAD_REQUEST,
        );
        assert!(
            message.starts_with("Wrong input: Invalid shard snapshot"),
            "{message}"
        );
    }
    assert_eq!(q.collections(), vec!["kept".to_string()]);
    assert_eq!(q.exact_count("kept"), 50);

    // A name that would climb out of the snapshot directory, and numbers that would drive
    // unbounded work, are refused.
    // (An HTTP client's URL parser resolves `..` and `%2E%2E` away, so the request is sent raw.)
    for name in ["%2E%2E", "%2e"] {
        let mut stream =
            std::net::TcpStream::connect(format!("127.0.0.1:{}", q.rest_port())).unwrap();
        write!(
            stream,
            "POST /collections/{name}/snapshots/upload HTTP/1.1\r\nHost: x\r\n\
             Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    }
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/huge",
            json!({"vectors": {"size": 4, "distance": "Dot"}, "shard_number": 100000}),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert!(
        message.contains("shard_number must be from 1 to 1024"),
        "{message}"
    );
    let message = error_message(
        send(
            &q,
            0,
            "PUT",
            "/collections/kept/points",
            json!({"points": [{"id": 1, "vector": [1.0, 2.0]}]}),
        ),
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(
        message,
        "Wrong input: Vector dimension error: expected dim: 16, got 2"
    );
    assert_eq!(q.collections(), vec!["kept".to_string()]);
}
