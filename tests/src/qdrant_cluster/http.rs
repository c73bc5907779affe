//! The REST API every node of the cluster double serves: one hyper HTTP/1.1 task per
//! connection, authentication before routing, one handler per operation. The envelope, error
//! rendering, query parameters, multipart spooling and snapshot files are the single-node
//! double's (`qdrant/server.rs`), so both doubles answer alike.

use std::convert::Infallible;
use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::archive::{self, Header, Kind};
use super::state::{Cluster, Inner, MAX_SHARDS, OpError, Params, Point, Points, search};
use crate::qdrant::server::{
    ApiError, Body, QueryStyle, apply_alias_action, check_checksum, describe, drain_then, error,
    json_response, list_snapshot_dir, normalize_path, not_routed, now_stamp, ok, query_pairs,
    read_json_body, remove_snapshot, shard_id, snapshot_path, spool_upload, strict_name_error,
    text, text_error, time_or_accept, upload_params, uuid_v4, wait_param, whitelisted,
};
use crate::qdrant::{ApiKeyUse, DEFAULT_VERSION, DOWNLOAD_CHUNK, RequestRecord};

/// Largest points request body: Qdrant's default `service.max_request_size_mb` (32).
const MAX_POINTS_BODY: usize = 32 << 20;

/// Accepts connections for node `node` until `stop` is cancelled; every connection it accepted
/// is dropped then too, so a stopped node refuses and resets like a dead process.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    cluster: Arc<Cluster>,
    node: usize,
    stop: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let cluster = cluster.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let cluster = cluster.clone();
                async move { Ok::<_, Infallible>(handle(cluster, node, req).await) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = connection => {}
            }
        });
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> ApiError {
        match e {
            OpError::NotFound(m) => ApiError::NotFound(m),
            OpError::BadInput(m) => ApiError::BadInput(m),
            OpError::BadRequest(m) => {
                ApiError::Validation(StatusCode::BAD_REQUEST, format!("Bad request: {m}"))
            }
            OpError::Service(m) => ApiError::Service(m),
        }
    }
}

fn api_key_use(cluster: &Cluster, headers: &HeaderMap) -> ApiKeyUse {
    let Some(expected) = &cluster.api_key else {
        return ApiKeyUse::NotConfigured;
    };
    let given = headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        });
    match given {
        None => ApiKeyUse::Missing,
        Some(key) if key == expected => ApiKeyUse::Valid,
        Some(_) => ApiKeyUse::Wrong,
    }
}

async fn handle(cluster: Arc<Cluster>, node: usize, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = normalize_path(req.uri().path());
    let query = req.uri().query().map(str::to_string);
    let key = api_key_use(&cluster, req.headers());
    let seq = {
        let mut inner = cluster.lock();
        let log = &mut inner.nodes[node];
        log.next_seq += 1;
        let seq = log.next_seq;
        log.requests.push(RequestRecord {
            method: req.method().to_string(),
            path: path.clone(),
            query: query.clone(),
            api_key: key,
            status: 0,
            seq,
        });
        seq
    };
    let response = match key {
        ApiKeyUse::Missing if !whitelisted(&path) => text(
            StatusCode::UNAUTHORIZED,
            "Must provide an API key or an Authorization bearer token",
        ),
        ApiKeyUse::Wrong if !whitelisted(&path) => {
            text(StatusCode::UNAUTHORIZED, "Invalid API key or JWT")
        }
        _ => route(cluster.clone(), node, req, &path, query.as_deref(), started).await,
    };
    let status = response.status().as_u16();
    let mut inner = cluster.lock();
    if let Some(record) = inner.nodes[node]
        .requests
        .iter_mut()
        .rev()
        .find(|r| r.seq == seq)
    {
        record.status = status;
    }
    response
}

async fn route(
    cluster: Arc<Cluster>,
    node: usize,
    req: Request<Incoming>,
    path: &str,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method().clone();
    let c = &cluster;
    match (method, segs.as_slice()) {
        (Method::GET, []) => version_info(),
        (Method::GET, ["healthz" | "livez"]) => text(StatusCode::OK, "healthz check passed"),
        (Method::GET, ["readyz"]) => text(StatusCode::OK, "all shards are ready"),
        (Method::GET, ["cluster"]) => ok(started, cluster_status(c, node)),
        (Method::GET, ["collections"]) => {
            let names: Vec<Value> = c
                .lock()
                .collections
                .keys()
                .map(|n| json!({"name": n}))
                .collect();
            ok(started, json!({"collections": names}))
        }
        (Method::GET, ["aliases"]) => list_aliases(c, None, started),
        (Method::POST, ["collections", "aliases"]) => change_aliases(c, req, started).await,
        (Method::GET, ["collections", name]) => answer(started, get_collection(c, name)),
        (Method::PUT, ["collections", name]) => {
            if let Some(response) = strict_name_error(name).or_else(|| dot_name_error(name)) {
                return response;
            }
            let result = match read_json_body(req).await {
                Ok(body) => create_collection(c, name, &body),
                Err(e) => Err(e),
            };
            answer(started, result)
        }
        (Method::DELETE, ["collections", name]) => {
            let mut inner = c.lock();
            inner.aliases.retain(|_, target| target != name);
            inner.transfers.retain(|t| t.collection != *name);
            let existed = inner.collections.remove(*name).is_some();
            inner.commit += 1;
            ok(started, json!(existed))
        }
        (Method::GET, ["collections", name, "exists"]) => {
            let exists = c.lock().resolve(name).is_some();
            ok(started, json!({"exists": exists}))
        }
        (Method::GET, ["collections", name, "aliases"]) => list_aliases(c, Some(name), started),
        (Method::GET, ["collections", name, "cluster"]) => {
            answer(started, collection_cluster_info(c, node, name))
        }
        (Method::PUT, ["collections", name, "shards"]) => {
            let result = match read_json_body(req).await {
                Ok(body) => create_shard_key(c, name, &body),
                Err(e) => Err(e),
            };
            answer(started, result)
        }
        (Method::PUT, ["collections", name, "index"]) => {
            let result = match read_json_body(req).await {
                Ok(body) => create_index(c, name, &body),
                Err(e) => Err(e),
            };
            answer(started, result)
        }
        (Method::PUT, ["collections", name, "points"]) => {
            let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
                Ok(wait) => wait,
                Err(response) => return *response,
            };
            let result = match read_body(req, MAX_POINTS_BODY).await {
                Ok(body) => upsert(c, name, &body, wait),
                Err(e) => Err(e),
            };
            answer(started, result)
        }
        (
            Method::POST,
            [
                "collections",
                name,
                "points",
                op @ ("count" | "scroll" | "query"),
            ],
        ) => {
            let result = match read_body(req, MAX_POINTS_BODY).await {
                Ok(body) => read_request(c, name, op, &body),
                Err(e) => Err(e),
            };
            answer(started, result)
        }
        (Method::GET, ["collections", name, "shards", shard, "snapshot"]) => {
            stream_shard_snapshot(c, node, name, shard)
        }
        (Method::POST, ["collections", name, "shards", shard, "snapshots", "upload"]) => {
            upload_shard_snapshot(
                cluster.clone(),
                node,
                name.to_string(),
                shard,
                req,
                query,
                started,
            )
            .await
        }
        (Method::POST, ["collections", name, "snapshots"]) => {
            let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
                Ok(wait) => wait,
                Err(response) => return *response,
            };
            let (cluster, name) = (cluster.clone(), name.to_string());
            time_or_accept(started, wait, async move {
                create_collection_snapshot(&cluster, node, &name)
            })
            .await
        }
        (Method::GET, ["collections", name, "snapshots"]) => {
            let Some(real) = c.lock().resolve(name) else {
                return error(started, &ApiError::collection_missing(name));
            };
            let dir = c.nodes[node].dirs.collection_snapshots(&real);
            match list_snapshot_dir(&dir) {
                Ok(list) => ok(started, Value::Array(list)),
                Err(e) => error(started, &ApiError::io("listing snapshots", e)),
            }
        }
        (Method::POST, ["collections", name, "snapshots", "upload"]) => {
            upload_collection_snapshot(cluster.clone(), node, name.to_string(), req, query, started)
                .await
        }
        (Method::GET, ["collections", name, "snapshots", snapshot]) => {
            let real = c.lock().resolve(name);
            let path = real
                .ok_or_else(|| ApiError::collection_missing(name))
                .and_then(|real| {
                    snapshot_path(&c.nodes[node].dirs.collection_snapshots(&real), snapshot)
                });
            match path {
                Ok(path) => send_file(&path).await,
                Err(e) => text_error(&e),
            }
        }
        (Method::DELETE, ["collections", name, "snapshots", snapshot]) => {
            let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
                Ok(wait) => wait,
                Err(response) => return *response,
            };
            let (cluster, name, snapshot) =
                (cluster.clone(), name.to_string(), snapshot.to_string());
            time_or_accept(started, wait, async move {
                let real = cluster
                    .lock()
                    .resolve(&name)
                    .ok_or_else(|| ApiError::collection_missing(&name))?;
                let dir = cluster.nodes[node].dirs.collection_snapshots(&real);
                remove_snapshot(&snapshot_path(&dir, &snapshot)?)
            })
            .await
        }
        _ => not_routed(),
    }
}

/// `.` and `..` would name a directory outside the node's snapshot directory; the double
/// refuses them like the other names that cannot be a directory (422).
fn dot_name_error(name: &str) -> Option<Response<Body>> {
    matches!(name, "." | "..").then(|| {
        error(
            Instant::now(),
            &ApiError::Validation(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "Validation error in path parameters: [collection_name: {name:?} cannot be a \
                     collection name]"
                ),
            ),
        )
    })
}

fn answer(started: Instant, result: Result<Value, ApiError>) -> Response<Body> {
    match result {
        Ok(value) => ok(started, value),
        Err(e) => error(started, &e),
    }
}

/// A JSON body of at most `limit` bytes; an empty body is `{}`.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| ApiError::Validation(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::Validation(
            StatusCode::BAD_REQUEST,
            format!("Format error in JSON body: {e}"),
        )
    })
}

fn format_error(what: impl std::fmt::Display) -> ApiError {
    ApiError::Validation(
        StatusCode::BAD_REQUEST,
        format!("Format error in JSON body: {what}"),
    )
}

// ---------------------------------------------------------------------------------------------
// Service and cluster

/// `GET /` (operationId `root`): bare `VersionInfo`.
fn version_info() -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({
            "title": "qdrant - vector search engine",
            "version": DEFAULT_VERSION,
            "commit": "db8fa43fcb6aedec1e739487e17a99731b74590a"
        }),
    )
}

/// `GET /cluster` (operationId `cluster_status`, `ClusterStatus::Enabled`): every peer consensus
/// knows, stopped ones included, at its p2p address; node 0 stands in for the Raft leader.
fn cluster_status(cluster: &Cluster, node: usize) -> Value {
    let commit = cluster.lock().commit;
    let peers: serde_json::Map<String, Value> = cluster
        .nodes
        .iter()
        .map(|n| {
            (
                n.peer_id.to_string(),
                json!({"uri": format!("http://{}:{}/", n.ip, cluster.p2p_port)}),
            )
        })
        .collect();
    json!({
        "status": "enabled",
        "peer_id": cluster.nodes[node].peer_id,
        "peers": peers,
        "raft_info": {
            "term": 1,
            "commit": commit,
            "pending_operations": 0,
            "leader": cluster.nodes[0].peer_id,
            "role": if node == 0 { "Leader" } else { "Follower" },
            "is_voter": true
        },
        "consensus_thread_status": {
            "consensus_thread_status": "working",
            "last_update": chrono::Utc::now().to_rfc3339()
        },
        "message_send_failures": {}
    })
}

/// `GET /collections/{name}/cluster` (`Collection::cluster_info`): this node's replicas with
/// their point counts and states, every other node's replicas with theirs, transfers under way.
fn collection_cluster_info(cluster: &Cluster, node: usize, name: &str) -> Result<Value, ApiError> {
    let inner = cluster.lock();
    let real = inner
        .resolve(name)
        .ok_or_else(|| ApiError::collection_missing(name))?;
    let collection = &inner.collections[&real];
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for (id, shard) in &collection.shards {
        for (n, replica) in &shard.replicas {
            let mut info = if *n == node {
                json!({"shard_id": id, "points_count": replica.points.len(), "state": replica.state})
            } else {
                json!({"shard_id": id, "peer_id": cluster.nodes[*n].peer_id, "state": replica.state})
            };
            if let Some(key) = &shard.key {
                info["shard_key"] = json!(key);
            }
            if *n == node {
                local.push(info);
            } else {
                remote.push(info);
            }
        }
    }
    let transfers: Vec<Value> = inner
        .transfers
        .iter()
        .filter(|t| t.collection == real)
        .map(|t| {
            json!({
                "shard_id": t.shard,
                "from": cluster.nodes[t.from].peer_id,
                "to": cluster.nodes[t.to].peer_id,
                "sync": true,
                "method": "stream_records"
            })
        })
        .collect();
    Ok(json!({
        "peer_id": cluster.nodes[node].peer_id,
        "shard_count": collection.shards.len(),
        "local_shards": local,
        "remote_shards": remote,
        "shard_transfers": transfers
    }))
}

// ---------------------------------------------------------------------------------------------
// Collections

/// `CollectionInfo`: the point count sums one Active replica of every shard, so it fails like
/// any read when a shard has none reachable.
fn get_collection(cluster: &Cluster, name: &str) -> Result<Value, ApiError> {
    let inner = cluster.lock();
    let real = inner
        .resolve(name)
        .ok_or_else(|| ApiError::collection_missing(name))?;
    let points = inner.read_points(&real)?;
    let collection = &inner.collections[&real];
    let schema: serde_json::Map<String, Value> = collection
        .payload_schema
        .iter()
        .map(|(field, kind)| {
            let n = points
                .values()
                .filter(|p| p.payload.get(field).is_some())
                .count();
            (
                field.clone(),
                json!({"data_type": kind, "params": {"type": kind}, "points": n}),
            )
        })
        .collect();
    Ok(json!({
        "status": "green",
        "optimizer_status": "ok",
        "warnings": [],
        "indexed_vectors_count": 0,
        "points_count": points.len(),
        "segments_count": collection.shards.len(),
        "config": collection.params.config(),
        "payload_schema": schema,
        "update_queue": {"length": 0}
    }))
}

fn u32_field(body: &Value, field: &str) -> Result<Option<u32>, ApiError> {
    match body.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| format_error(format!("{field}: expected a positive integer, got {v}"))),
    }
}

/// `PUT /collections/{name}` (operationId `create_collection`), a single unnamed vector.
fn create_collection(cluster: &Cluster, name: &str, body: &Value) -> Result<Value, ApiError> {
    let vectors = &body["vectors"];
    let (Some(size), Some(distance)) = (vectors["size"].as_u64(), vectors["distance"].as_str())
    else {
        return Err(format_error(
            "the Qdrant cluster double supports only {\"vectors\": {\"size\": N, \"distance\": D}}",
        ));
    };
    if !matches!(distance, "Cosine" | "Euclid" | "Dot" | "Manhattan") {
        return Err(format_error(format!(
            "vectors.distance: unknown variant `{distance}`, expected one of `Cosine`, `Euclid`, \
             `Dot`, `Manhattan`"
        )));
    }
    let custom = match body.get("sharding_method").and_then(Value::as_str) {
        None | Some("auto") => false,
        Some("custom") => true,
        Some(other) => {
            return Err(format_error(format!(
                "sharding_method: unknown variant `{other}`, expected `auto` or `custom`"
            )));
        }
    };
    let mut inner = cluster.lock();
    // Qdrant's default in a cluster: one shard per peer (`default_shard_number` × peers).
    let default_shards = if custom {
        1
    } else {
        inner.running().len().max(1) as u32
    };
    let params = Params {
        vector_size: size,
        distance: distance.to_string(),
        shard_number: u32_field(body, "shard_number")?.unwrap_or(default_shards),
        replication_factor: u32_field(body, "replication_factor")?.unwrap_or(1),
        write_consistency_factor: u32_field(body, "write_consistency_factor")?.unwrap_or(1),
        custom,
        on_disk_payload: body["on_disk_payload"].as_bool().unwrap_or(true),
    };
    inner.create_collection(name, params).map_err(|e| match e {
        OpError::BadInput(m) if m.ends_with("already exists!") => ApiError::AlreadyExists(m),
        other => other.into(),
    })?;
    Ok(json!(true))
}

/// `PUT /collections/{name}/shards` (operationId `create_shard_key`).
fn create_shard_key(cluster: &Cluster, name: &str, body: &Value) -> Result<Value, ApiError> {
    let key = match &body["shard_key"] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => {
            return Err(format_error(format!(
                "shard_key: expected a string, got {other}"
            )));
        }
    };
    let placement = match body.get("placement") {
        None | Some(Value::Null) => None,
        Some(Value::Array(peers)) => {
            let mut nodes = Vec::new();
            for peer in peers {
                let node = peer
                    .as_u64()
                    .and_then(|p| cluster.node_by_peer(p))
                    .ok_or_else(|| {
                        ApiError::Validation(
                            StatusCode::BAD_REQUEST,
                            format!("Bad request: Peers {peer} are not known"),
                        )
                    })?;
                nodes.push(node);
            }
            Some(nodes)
        }
        Some(other) => {
            return Err(format_error(format!(
                "placement: expected peer ids, got {other}"
            )));
        }
    };
    let shards = u32_field(body, "shards_number")?;
    let rf = u32_field(body, "replication_factor")?;
    let mut inner = cluster.lock();
    let real = inner
        .resolve(name)
        .ok_or_else(|| ApiError::collection_missing(name))?;
    inner.create_shard_key(&real, &key, shards, rf, placement, None)?;
    Ok(json!(true))
}

/// `PUT /collections/{name}/index` (operationId `create_field_index`).
fn create_index(cluster: &Cluster, name: &str, body: &Value) -> Result<Value, ApiError> {
    let Some(field) = body["field_name"].as_str() else {
        return Err(format_error("missing field `field_name`"));
    };
    let kind = match &body["field_schema"] {
        Value::String(s) => s.clone(),
        Value::Object(o) => o
            .get("type")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format_error("field_schema: missing `type`"))?,
        _ => return Err(format_error("missing field `field_schema`")),
    };
    let mut inner = cluster.lock();
    let real = inner
        .resolve(name)
        .ok_or_else(|| ApiError::collection_missing(name))?;
    inner
        .collections
        .get_mut(&real)
        .expect("resolved")
        .payload_schema
        .insert(field.to_string(), kind);
    inner.commit += 1;
    inner.operation_id += 1;
    Ok(json!({"operation_id": inner.operation_id, "status": "completed"}))
}

// ---------------------------------------------------------------------------------------------
// Points

/// `PUT /collections/{name}/points` (operationId `upsert_points`), the `points` list form.
fn upsert(cluster: &Cluster, name: &str, body: &Value, wait: bool) -> Result<Value, ApiError> {
    let Some(list) = body["points"].as_array() else {
        return Err(format_error(
            "the Qdrant cluster double supports only {\"points\": [...]}",
        ));
    };
    let mut points = Vec::with_capacity(list.len());
    for p in list {
        let Some(id) = p["id"].as_u64() else {
            return Err(format_error(format!(
                "point id must be an unsigned integer: {}",
                p["id"]
            )));
        };
        let Some(vector) = p["vector"].as_array() else {
            return Err(format_error(format!(
                "point {id}: `vector` must be a list of numbers"
            )));
        };
        let vector: Option<Vec<f32>> = vector
            .iter()
            .map(|x| x.as_f64().map(|x| x as f32))
            .collect();
        let Some(vector) = vector else {
            return Err(format_error(format!(
                "point {id}: `vector` must be a list of numbers"
            )));
        };
        let payload = match &p["payload"] {
            Value::Null => json!({}),
            Value::Object(_) => p["payload"].clone(),
            other => {
                return Err(format_error(format!(
                    "point {id}: payload must be an object, got {other}"
                )));
            }
        };
        points.push((id, Point { vector, payload }));
    }
    let key = match &body["shard_key"] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        other => {
            return Err(format_error(format!(
                "shard_key: expected a string, got {other}"
            )));
        }
    };
    let mut inner = cluster.lock();
    let real = inner
        .resolve(name)
        .ok_or_else(|| ApiError::collection_missing(name))?;
    inner.upsert(&real, points, key.as_deref())?;
    let status = if wait { "completed" } else { "acknowledged" };
    Ok(json!({"operation_id": inner.operation_id, "status": status}))
}

/// `count_points`, `scroll_points` and `query_points`, merging one Active replica of every shard
/// (filters are not implemented: a count or scroll covers every point).
fn read_request(cluster: &Cluster, name: &str, op: &str, body: &Value) -> Result<Value, ApiError> {
    let (points, distance) = {
        let inner = cluster.lock();
        let real = inner
            .resolve(name)
            .ok_or_else(|| ApiError::collection_missing(name))?;
        (
            inner.read_points(&real)?,
            inner.collections[&real].params.distance.clone(),
        )
    };
    match op {
        "count" => Ok(json!({"count": points.len()})),
        "scroll" => Ok(scroll(&points, body)),
        _ => query(&points, &distance, body),
    }
}

fn with_flag(body: &Value, field: &str, default: bool) -> bool {
    match &body[field] {
        Value::Bool(b) => *b,
        Value::Null => default,
        // A selector (list of fields) asks for some of it.
        _ => true,
    }
}

/// `ScrollResult`: points by id from `offset`, `limit` (default 10) of them; payload by default,
/// vectors on request.
fn scroll(points: &Points, body: &Value) -> Value {
    let limit = body["limit"].as_u64().unwrap_or(10).clamp(1, 100_000) as usize;
    let offset = body["offset"].as_u64().unwrap_or(0);
    let with_payload = with_flag(body, "with_payload", true);
    let with_vector = with_flag(body, "with_vector", false);
    let mut page = points.range(offset..);
    let mut out = Vec::new();
    for (id, p) in page.by_ref().take(limit) {
        let mut point = json!({"id": id});
        if with_payload {
            point["payload"] = p.payload.clone();
        }
        if with_vector {
            point["vector"] = json!(p.vector);
        }
        out.push(point);
    }
    let next = page.next().map(|(id, _)| json!(id)).unwrap_or(Value::Null);
    json!({"points": out, "next_page_offset": next})
}

/// `QueryResponse`: exact nearest neighbours over every shard (search is always exact here).
fn query(points: &Points, distance: &str, body: &Value) -> Result<Value, ApiError> {
    if let Some(name) = body["using"].as_str().filter(|n| !n.is_empty()) {
        return Err(ApiError::BadInput(format!(
            "Not existing vector name error: {name}"
        )));
    }
    let raw = body["query"]
        .as_array()
        .or_else(|| body["query"]["nearest"].as_array());
    let Some(raw) = raw else {
        return Err(format_error(
            "the Qdrant cluster double supports only a dense vector as `query`",
        ));
    };
    let q: Vec<f32> = raw
        .iter()
        .map(|x| x.as_f64().unwrap_or(0.0) as f32)
        .collect();
    if let Some(p) = points.values().next()
        && p.vector.len() != q.len()
    {
        return Err(ApiError::BadInput(format!(
            "Vector dimension error: expected dim: {}, got {}",
            p.vector.len(),
            q.len()
        )));
    }
    let limit = body["limit"].as_u64().unwrap_or(10).clamp(1, 100_000) as usize;
    let with_payload = with_flag(body, "with_payload", false);
    let hits: Vec<Value> = search(points, distance, &q, limit)
        .into_iter()
        .map(|(id, score)| {
            let mut hit = json!({"id": id, "version": 0, "score": score});
            if with_payload {
                hit["payload"] = points[&id].payload.clone();
            }
            hit
        })
        .collect();
    Ok(json!({"points": hits}))
}

// ---------------------------------------------------------------------------------------------
// Aliases (cluster-wide, as in the single-node double)

fn list_aliases(cluster: &Cluster, collection: Option<&str>, started: Instant) -> Response<Body> {
    let aliases: Vec<Value> = cluster
        .lock()
        .aliases
        .iter()
        .filter(|(_, target)| collection.is_none_or(|c| c == target.as_str()))
        .map(|(alias, target)| json!({"alias_name": alias, "collection_name": target}))
        .collect();
    ok(started, json!({"aliases": aliases}))
}

/// `POST /collections/aliases`: actions in order, stopping at the first error.
async fn change_aliases(
    cluster: &Cluster,
    req: Request<Incoming>,
    started: Instant,
) -> Response<Body> {
    let body = match read_json_body(req).await {
        Ok(body) => body,
        Err(e) => return error(started, &e),
    };
    let Some(actions) = body["actions"].as_array() else {
        return error(started, &format_error("missing field `actions`"));
    };
    let mut inner = cluster.lock();
    let inner = &mut *inner;
    inner.commit += 1;
    for action in actions {
        let exists = |c: &str| inner.collections.contains_key(c);
        if let Err(e) = apply_alias_action(&mut inner.aliases, exists, action) {
            return error(started, &e);
        }
    }
    ok(started, json!(true))
}

// ---------------------------------------------------------------------------------------------
// Shard snapshots

/// `GET /collections/{name}/shards/{shard}/snapshot` (`ShardHolder::stream_shard_snapshot`):
/// only a node with a local replica can stream it, and it streams that replica whatever its
/// state. Errors are plain text, as the handler returns `HttpError` directly.
fn stream_shard_snapshot(
    cluster: &Cluster,
    node: usize,
    name: &str,
    shard: &str,
) -> Response<Body> {
    let shard = match shard_id(shard) {
        Ok(shard) => shard,
        Err(response) => return *response,
    };
    let (real, bytes) = {
        let inner = cluster.lock();
        let Some(real) = inner.resolve(name) else {
            return text_error(&ApiError::collection_missing(name));
        };
        let collection = &inner.collections[&real];
        let Some(s) = collection.shards.get(&shard) else {
            return text_error(&ApiError::shard_missing(shard));
        };
        let Some(replica) = s.replicas.get(&node) else {
            return text_error(&ApiError::from(OpError::BadRequest(format!(
                "Shard {shard} is not a local or queue proxy shard"
            ))));
        };
        let header = header_of(&real, collection, Kind::Shard, vec![shard]);
        let shards = [(shard, replica.points.clone())].into_iter().collect();
        (real, archive::write(&header, &shards))
    };
    let chunks: Vec<std::io::Result<Frame<Bytes>>> = Bytes::from(bytes)
        .chunks(DOWNLOAD_CHUNK)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(
            header::CONTENT_DISPOSITION,
            format!(
                "attachment; filename=\"{real}-shard-{shard}-{}.snapshot\"",
                now_stamp()
            ),
        )
        .body(BodyExt::boxed_unsync(StreamBody::new(
            futures::stream::iter(chunks),
        )))
        .expect("response parts are valid")
}

fn header_of(
    name: &str,
    collection: &super::state::Collection,
    kind: Kind,
    shards: Vec<u32>,
) -> Header {
    Header {
        format: archive::FORMAT.to_string(),
        kind,
        collection: name.to_string(),
        params: collection.params.clone(),
        payload_schema: collection.payload_schema.clone(),
        shard_keys: collection
            .shards
            .iter()
            .map(|(id, s)| (*id, s.key.clone()))
            .collect(),
        shards,
    }
}

/// Reads an uploaded archive on a blocking thread; one that is not the double's archive of
/// `kind` is bad input (the file is deleted when `file` is a spool).
async fn read_archive<P: AsRef<Path> + Send + 'static>(
    file: P,
    kind: Kind,
) -> Result<(Header, std::collections::BTreeMap<u32, Points>), ApiError> {
    let what = match kind {
        Kind::Shard => "shard",
        Kind::Collection => "collection",
    };
    let read = tokio::task::spawn_blocking(move || {
        let read = fs::File::open(file.as_ref()).and_then(|f| archive::read(f, kind));
        drop(file);
        read
    })
    .await
    .map_err(|e| ApiError::Service(format!("Tokio task join error: {e}")))?;
    read.map_err(|e| match e.kind() {
        io::ErrorKind::InvalidData => ApiError::BadInput(format!("Invalid {what} snapshot: {e}")),
        _ => ApiError::io(&format!("failed to read the {what} snapshot"), e),
    })
}

/// The priority an upload asked for; Qdrant's default is `snapshot`.
fn priority_of(priority: Option<String>) -> String {
    priority.unwrap_or_else(|| "snapshot".to_string())
}

/// `POST /collections/{name}/shards/{shard}/snapshots/upload`
/// (`recover_shard_from_uploaded_snapshot`): checksum first, then the shard must have a local
/// replica here; its points are replaced by the archive's and states follow
/// `recover_shard_snapshot_impl`. Answers `"result": null`.
async fn upload_shard_snapshot(
    cluster: Arc<Cluster>,
    node: usize,
    name: String,
    shard: &str,
    req: Request<Incoming>,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    let shard = match shard_id(shard) {
        Ok(shard) => shard,
        Err(response) => return drain_then(req, *response).await,
    };
    let params = match upload_params(query, QueryStyle::Plain) {
        Ok(params) => params,
        Err(response) => return drain_then(req, *response).await,
    };
    let spooled = match spool_upload(&cluster.nodes[node].dirs.tmp, req).await {
        Ok(spooled) => spooled,
        Err(response) => return *response,
    };
    let priority = priority_of(params.priority);
    time_or_accept(started, params.wait, async move {
        check_checksum(&spooled, params.checksum.as_deref())?;
        {
            let inner = cluster.lock();
            let real = inner
                .resolve(&name)
                .ok_or_else(|| ApiError::collection_missing(&name))?;
            let s = inner.collections[&real]
                .shards
                .get(&shard)
                .ok_or_else(|| ApiError::shard_missing(shard))?;
            if !s.replicas.contains_key(&node) {
                return Err(
                    OpError::BadRequest(format!("Shard {shard} is not a local shard")).into(),
                );
            }
        }
        let (header, mut shards) = read_archive(spooled.file, Kind::Shard).await?;
        let [held] = header.shards[..] else {
            return Err(ApiError::BadInput(format!(
                "Invalid shard snapshot: it holds {} shards, not one",
                header.shards.len()
            )));
        };
        let points = shards.remove(&held).unwrap_or_default();
        let mut inner = cluster.lock();
        let real = inner
            .resolve(&name)
            .ok_or_else(|| ApiError::collection_missing(&name))?;
        let collection = inner.collections.get_mut(&real).expect("resolved");
        if header.params.vectors() != collection.params.vectors() {
            return Err(ApiError::BadInput(format!(
                "Shard snapshot vectors {} do not match collection `{real}` vectors {}",
                header.params.vectors(),
                collection.params.vectors()
            )));
        }
        let s = collection
            .shards
            .get_mut(&shard)
            .ok_or_else(|| ApiError::shard_missing(shard))?;
        let Some(replica) = s.replicas.get_mut(&node) else {
            return Err(OpError::BadRequest(format!("Shard {shard} is not a local shard")).into());
        };
        replica.points = points;
        Inner::states_after_recovery(s, node, &priority);
        inner.commit += 1;
        Ok(Value::Null)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Collection snapshots

/// `POST /collections/{name}/snapshots`: in a cluster, `Collection::create_snapshot` archives
/// only this node's local shards (whatever their state).
fn create_collection_snapshot(
    cluster: &Cluster,
    node: usize,
    name: &str,
) -> Result<Value, ApiError> {
    let (real, bytes) = {
        let inner = cluster.lock();
        let real = inner
            .resolve(name)
            .ok_or_else(|| ApiError::collection_missing(name))?;
        let collection = &inner.collections[&real];
        let local: std::collections::BTreeMap<u32, Points> = collection
            .shards
            .iter()
            .filter_map(|(id, s)| s.replicas.get(&node).map(|r| (*id, r.points.clone())))
            .collect();
        let header = header_of(
            &real,
            collection,
            Kind::Collection,
            local.keys().copied().collect(),
        );
        (real.clone(), archive::write(&header, &local))
    };
    let dirs = &cluster.nodes[node].dirs;
    let file_name = format!(
        "{real}-{}-{}.snapshot",
        cluster.nodes[node].peer_id,
        now_stamp()
    );
    let dir = dirs.collection_snapshots(&real);
    let target = dir.join(&file_name);
    let io = |e| ApiError::io("failed to create snapshot", e);
    fs::create_dir_all(&dir).map_err(io)?;
    let tmp = tempfile::NamedTempFile::new_in(&dirs.tmp).map_err(io)?;
    fs::write(tmp.path(), &bytes).map_err(io)?;
    let mut checksum_file = target.as_os_str().to_owned();
    checksum_file.push(".checksum");
    fs::write(checksum_file, hex::encode(Sha256::digest(&bytes))).map_err(io)?;
    tmp.persist(&target).map_err(|e| io(e.error))?;
    describe(&target).map_err(io)
}

/// `POST /collections/{name}/snapshots/upload` (`recover_from_uploaded_snapshot`,
/// `_do_recover_from_snapshot`): checksum first; the file is kept in the node's snapshot
/// directory; a missing collection is created from the snapshot's config (placement by the
/// double, payload indexes registered); then only the shards that are local to THIS node and
/// held by the snapshot are recovered, states per the priority.
async fn upload_collection_snapshot(
    cluster: Arc<Cluster>,
    node: usize,
    name: String,
    req: Request<Incoming>,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    if let Some(response) = strict_name_error(&name).or_else(|| dot_name_error(&name)) {
        return drain_then(req, response).await;
    }
    let params = match upload_params(query, QueryStyle::Validated) {
        Ok(params) => params,
        Err(response) => return drain_then(req, *response).await,
    };
    let spooled = match spool_upload(&cluster.nodes[node].dirs.tmp, req).await {
        Ok(spooled) => spooled,
        Err(response) => return *response,
    };
    let priority = priority_of(params.priority);
    time_or_accept(started, params.wait, async move {
        check_checksum(&spooled, params.checksum.as_deref())?;
        let file_name = spooled
            .file_name
            .as_deref()
            .and_then(|n| Path::new(n).file_name())
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .unwrap_or_else(uuid_v4);
        let dir = cluster.nodes[node].dirs.collection_snapshots(&name);
        let saved = dir.join(file_name);
        fs::create_dir_all(&dir).map_err(|e| ApiError::io("saving uploaded snapshot", e))?;
        spooled
            .file
            .persist(&saved)
            .map_err(|e| ApiError::io("saving uploaded snapshot", e.error))?;
        let (header, shards) = read_archive(saved, Kind::Collection).await?;
        recover_collection(&cluster, node, &name, header, shards, &priority)?;
        Ok(json!(true))
    })
    .await
}

/// The shard keys of a custom collection's snapshot, with their shard ids.
fn create_shard_keys(inner: &mut Inner, name: &str, header: &Header) -> Result<(), ApiError> {
    if !header.params.custom {
        return Ok(());
    }
    let mut by_key: Vec<(String, Vec<u32>)> = Vec::new();
    for (id, key) in &header.shard_keys {
        let key = key.clone().unwrap_or_default();
        match by_key.iter_mut().find(|(k, _)| *k == key) {
            Some((_, ids)) => ids.push(*id),
            None => by_key.push((key, vec![*id])),
        }
    }
    for (key, ids) in by_key {
        inner.create_shard_key(name, &key, None, None, None, Some(ids))?;
    }
    Ok(())
}

fn recover_collection(
    cluster: &Cluster,
    node: usize,
    name: &str,
    header: Header,
    mut shards: std::collections::BTreeMap<u32, Points>,
    priority: &str,
) -> Result<(), ApiError> {
    let mut inner = cluster.lock();
    let real = match inner.resolve(name) {
        Some(real) => real,
        None => {
            if header.shard_keys.len() > MAX_SHARDS as usize {
                return Err(ApiError::BadInput(format!(
                    "Invalid collection snapshot: more than {MAX_SHARDS} shards"
                )));
            }
            inner.create_collection(name, header.params.clone())?;
            if let Err(e) = create_shard_keys(&mut inner, name, &header) {
                // No half collection: a snapshot whose keys cannot be created leaves nothing.
                inner.collections.remove(name);
                return Err(e);
            }
            inner
                .collections
                .get_mut(name)
                .expect("just created")
                .payload_schema = header.payload_schema.clone();
            name.to_string()
        }
    };
    let collection = inner.collections.get_mut(&real).expect("resolved");
    if header.params.vectors() != collection.params.vectors() {
        return Err(ApiError::BadInput(format!(
            "Snapshot is not compatible with existing collection: Collection vectors: {} \
             Snapshot Vectors: {}",
            collection.params.vectors(),
            header.params.vectors()
        )));
    }
    if header.params.shard_number != collection.params.shard_number {
        return Err(ApiError::BadInput(format!(
            "Snapshot is not compatible with existing collection: Collection shard number: {} \
             Snapshot shard number: {}",
            collection.params.shard_number, header.params.shard_number
        )));
    }
    for (id, shard) in collection.shards.iter_mut() {
        let Some(points) = shards.remove(id) else {
            continue;
        };
        let Some(replica) = shard.replicas.get_mut(&node) else {
            continue;
        };
        replica.points = points;
        Inner::states_after_recovery(shard, node, priority);
    }
    inner.commit += 1;
    Ok(())
}

/// A snapshot file, whole (snapshots of the double are small), as actix-files would send it.
async fn send_file(path: &Path) -> Response<Body> {
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) => return text(StatusCode::NOT_FOUND, format!("File not found: {e}")),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let len = bytes.len();
    let chunks: Vec<io::Result<Frame<Bytes>>> = vec![Ok(Frame::data(Bytes::from(bytes)))];
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(BodyExt::boxed_unsync(StreamBody::new(
            futures::stream::iter(chunks),
        )))
        .expect("response parts are valid")
}
