//! The HTTP side of the double: one hyper HTTP/1.1 connection task per client, a hand-written
//! router (so unknown paths and methods answer exactly like actix's default 404, and auth runs
//! before routing like Qdrant's `AuthTransform` middleware), and one handler per operation.

use std::convert::Infallible;
use std::fs;
use std::future::Future;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::data::{self, ArchiveKind, DataSource, HashingWriter, SegmentMeta, StoredFile};
use super::multipart;
use super::state::{Collection, Shared, fire};
use super::{ApiKeyUse, DOWNLOAD_CHUNK, RequestRecord, SHARD_STREAM_SINCE, parse_version};

pub(crate) type Body = UnsyncBoxBody<Bytes, io::Error>;
/// A response that ends a handler early (boxed: responses are large).
pub(crate) type Rejection = Box<Response<Body>>;

/// Largest JSON request body the double reads (alias changes, collection creation).
const MAX_JSON_BODY: usize = 1 << 20;
/// Buffer for spooling uploads and writing archives.
const IO_BUF: usize = 1 << 20;
/// Time the double gives hyper to flush the bytes before a cut connection.
const FLUSH_BEFORE_CUT: Duration = Duration::from_millis(100);

/// Accepts connections until the runtime is shut down.
pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A `StorageError` of Qdrant (lib/storage/src/content_manager/errors.rs), with the HTTP status
/// `HttpError::status_code` (src/actix/helpers.rs) gives it, plus actix's validation errors.
#[derive(Debug)]
pub(crate) enum ApiError {
    NotFound(String),
    BadInput(String),
    AlreadyExists(String),
    Service(String),
    ChecksumMismatch {
        expected: String,
        actual: String,
    },
    /// Request validation (`validation_error_handler` in src/actix/mod.rs): its own status and
    /// full message.
    Validation(StatusCode, String),
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::BadInput(_) | ApiError::ChecksumMismatch { .. } => StatusCode::BAD_REQUEST,
            ApiError::AlreadyExists(_) => StatusCode::CONFLICT,
            ApiError::Service(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Validation(status, _) => *status,
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::NotFound(d) => format!("Not found: {d}"),
            ApiError::BadInput(d) | ApiError::AlreadyExists(d) => format!("Wrong input: {d}"),
            ApiError::Service(d) => format!("Service internal error: {d}"),
            ApiError::ChecksumMismatch { expected, actual } => {
                format!("Checksum mismatch: expected {expected}, actual {actual}")
            }
            ApiError::Validation(_, m) => m.clone(),
        }
    }

    pub(crate) fn collection_missing(name: &str) -> ApiError {
        ApiError::NotFound(format!("Collection `{name}` doesn't exist!"))
    }

    pub(crate) fn snapshot_missing(name: &str) -> ApiError {
        // `CollectionError::not_found("Snapshot {name}")` renders as "{what} not found".
        ApiError::NotFound(format!("Snapshot {name} not found"))
    }

    pub(crate) fn shard_missing(shard: u32) -> ApiError {
        ApiError::NotFound(format!("shard {shard} not found"))
    }

    pub(crate) fn io(context: &str, e: io::Error) -> ApiError {
        ApiError::Service(format!("{context}: {e}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Responses

pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("JSON values always serialise");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("static response parts are valid")
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `ApiResponse { result, status: ok, time }` (lib/api/src/rest/models.rs).
pub(crate) fn ok(started: Instant, result: Value) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"result": result, "status": "ok", "time": started.elapsed().as_secs_f64()}),
    )
}

/// `process_response_error`: the error as `{"status": {"error": ...}, "time": ...}`.
pub(crate) fn error(started: Instant, e: &ApiError) -> Response<Body> {
    json_response(
        e.status(),
        &json!({"status": {"error": e.message()}, "time": started.elapsed().as_secs_f64()}),
    )
}

/// `accepted_response`: 202 for `wait=false`.
fn accepted(started: Instant) -> Response<Body> {
    json_response(
        StatusCode::ACCEPTED,
        &json!({"status": "accepted", "time": started.elapsed().as_secs_f64()}),
    )
}

pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(full(body.into()))
        .expect("static response parts are valid")
}

/// Errors of handlers that return `Result<SnapshotStream, HttpError>`: actix renders those with
/// the default `ResponseError::error_response`, i.e. the message as plain text.
pub(crate) fn text_error(e: &ApiError) -> Response<Body> {
    text(e.status(), e.message())
}

pub(crate) fn reject(status: StatusCode, body: impl Into<String>) -> Rejection {
    Box::new(text(status, body))
}

/// actix's answer for a path no route matches.
pub(crate) fn not_routed() -> Response<Body> {
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .body(full(Bytes::new()))
        .expect("static response parts are valid")
}

/// `helpers::time_or_accept`: the work runs in its own task (a client that goes away does not
/// cancel it); `wait=false` answers 202 at once.
pub(crate) async fn time_or_accept<F>(started: Instant, wait: bool, work: F) -> Response<Body>
where
    F: Future<Output = Result<Value, ApiError>> + Send + 'static,
{
    let task = tokio::spawn(work);
    if !wait {
        return accepted(started);
    }
    match task.await {
        Ok(Ok(result)) => ok(started, result),
        Ok(Err(e)) => error(started, &e),
        Err(e) => error(
            started,
            &ApiError::Service(format!("Tokio task join error: {e}")),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Entry: log, authenticate, route

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let path = normalize_path(req.uri().path());
    let query = req.uri().query().map(str::to_string);
    let key = api_key_use(&shared, req.headers());
    let seq = {
        let mut inner = shared.lock();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        inner.requests.push(RequestRecord {
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
        // `AuthTransform` (src/actix/auth.rs): a 401 with a plain-text body, before routing, for
        // every path but the whitelist (`/`, `/healthz`, `/readyz`, `/livez`; src/actix/mod.rs).
        ApiKeyUse::Missing if !whitelisted(&path) => text(
            StatusCode::UNAUTHORIZED,
            "Must provide an API key or an Authorization bearer token",
        ),
        ApiKeyUse::Wrong if !whitelisted(&path) => {
            text(StatusCode::UNAUTHORIZED, "Invalid API key or JWT")
        }
        _ => route(&shared, req, &path, query.as_deref(), started).await,
    };
    let status = response.status().as_u16();
    let mut inner = shared.lock();
    if let Some(record) = inner.requests.iter_mut().rev().find(|r| r.seq == seq) {
        record.status = status;
    }
    response
}

/// actix `NormalizePath::trim`: merge repeated slashes, drop a trailing one.
pub(crate) fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

pub(crate) fn whitelisted(path: &str) -> bool {
    matches!(path, "/" | "/healthz" | "/readyz" | "/livez")
}

fn api_key_use(shared: &Shared, headers: &HeaderMap) -> ApiKeyUse {
    let Some(expected) = &shared.api_key else {
        return ApiKeyUse::NotConfigured;
    };
    // `AuthKeys::validate_request`: the `api-key` header, else `Authorization: Bearer <key>`.
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

async fn route(
    shared: &Arc<Shared>,
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
    let shared = shared.clone();
    match (method, segs.as_slice()) {
        (Method::GET, []) => version_info(&shared),
        (Method::GET, ["healthz" | "livez"]) => text(StatusCode::OK, "healthz check passed"),
        (Method::GET, ["readyz"]) => text(StatusCode::OK, "all shards are ready"),
        (Method::GET, ["collections"]) => list_collections(&shared, started),
        // `cluster_status` (src/actix/api/cluster_api.rs): a node started without
        // `cluster.enabled` answers `ClusterStatus::Disabled`.
        (Method::GET, ["cluster"]) => ok(started, json!({"status": "disabled"})),
        (Method::GET, ["collections", c, "cluster"]) => {
            collection_cluster_info(&shared, c, started)
        }
        (Method::GET, ["aliases"]) => list_aliases(&shared, None, started),
        (Method::POST, ["collections", "aliases"]) => change_aliases(&shared, req, started).await,
        (Method::GET, ["collections", c]) => get_collection(&shared, c, started),
        (Method::PUT, ["collections", c]) => create_collection(&shared, c, req, started).await,
        (Method::DELETE, ["collections", c]) => delete_collection(&shared, c, started),
        (Method::GET, ["collections", c, "exists"]) => {
            let exists = shared.lock().resolve(c).is_some();
            ok(started, json!({"exists": exists}))
        }
        (Method::POST, ["collections", c, "points", "count"]) => {
            count_points(&shared, c, req, started).await
        }
        (Method::POST, ["collections", c, "points", op @ ("scroll" | "query")]) => {
            points_request(&shared, c, op, req, started).await
        }
        (Method::GET, ["collections", c, "aliases"]) => list_aliases(&shared, Some(c), started),
        (Method::GET, ["collections", c, "snapshots"]) => {
            list_collection_snapshots(&shared, c, started)
        }
        (Method::POST, ["collections", c, "snapshots"]) => {
            create_collection_snapshot(shared, c.to_string(), query, started).await
        }
        (Method::POST, ["collections", c, "snapshots", "upload"]) => {
            upload_collection_snapshot(shared, c.to_string(), req, query, started).await
        }
        (Method::GET, ["collections", c, "snapshots", name]) => {
            download_collection_snapshot(&shared, c, name, req.headers()).await
        }
        (Method::DELETE, ["collections", c, "snapshots", name]) => {
            delete_collection_snapshot(shared, c.to_string(), name.to_string(), query, started)
                .await
        }
        (Method::GET, ["collections", c, "shards", shard, "snapshot"]) => {
            stream_shard_snapshot(shared, c, shard).await
        }
        (Method::POST, ["collections", c, "shards", shard, "snapshots", "upload"]) => {
            upload_shard_snapshot(shared, c.to_string(), shard, req, query, started).await
        }
        (Method::GET, ["snapshots"]) => list_full_snapshots(&shared, started),
        (Method::POST, ["snapshots"]) => create_full_snapshot(shared, query, started).await,
        (Method::GET, ["snapshots", name]) => {
            download_full_snapshot(&shared, name, req.headers()).await
        }
        (Method::DELETE, ["snapshots", name]) => {
            delete_full_snapshot(shared, name.to_string(), query, started).await
        }
        _ => not_routed(),
    }
}

// ---------------------------------------------------------------------------------------------
// Query and path parameters

pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

pub(crate) fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// How a handler's query extractor reports a parameter that does not deserialise.
#[derive(Clone, Copy)]
pub(crate) enum QueryStyle {
    /// `actix_web_validator::Query`: JSON envelope, "Deserialize error in query parameters".
    Validated,
    /// plain `web::Query`: actix's default plain-text 400.
    Plain,
}

fn query_error(style: QueryStyle, detail: &str) -> Rejection {
    Box::new(match style {
        QueryStyle::Validated => error(
            Instant::now(),
            &ApiError::Validation(
                StatusCode::BAD_REQUEST,
                format!("Deserialize error in query parameters: {detail}"),
            ),
        ),
        QueryStyle::Plain => text(
            StatusCode::BAD_REQUEST,
            format!("Query deserialize error: {detail}"),
        ),
    })
}

/// The `wait` parameter (serde's bool from a query string), default true.
pub(crate) fn wait_param(pairs: &[(String, String)], style: QueryStyle) -> Result<bool, Rejection> {
    match query_value(pairs, "wait") {
        None => Ok(true),
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(_) => Err(query_error(
            style,
            "provided string was not `true` or `false`",
        )),
    }
}

/// `SnapshotUploadingParam` (src/actix/api/snapshot_api.rs): `wait`, `priority`
/// (`SnapshotPriority`, snake_case), `checksum` (validated as 64 hex digits when the extractor
/// validates).
pub(crate) struct UploadParams {
    pub(crate) wait: bool,
    /// `no_sync`, `snapshot` or `replica` as given; `None` means Qdrant's default (`snapshot`).
    pub(crate) priority: Option<String>,
    pub(crate) checksum: Option<String>,
}

pub(crate) fn upload_params(
    query: Option<&str>,
    style: QueryStyle,
) -> Result<UploadParams, Rejection> {
    let pairs = query_pairs(query);
    let wait = wait_param(&pairs, style)?;
    if let Some(priority) = query_value(&pairs, "priority")
        && !matches!(priority, "no_sync" | "snapshot" | "replica")
    {
        return Err(query_error(
            style,
            &format!(
                "unknown variant `{priority}`, expected one of `no_sync`, `snapshot`, `replica`"
            ),
        ));
    }
    let priority = query_value(&pairs, "priority").map(str::to_string);
    let checksum = query_value(&pairs, "checksum").map(str::to_string);
    if let (QueryStyle::Validated, Some(sum)) = (style, &checksum) {
        // `validate_sha256_hash` (lib/common/common/src/validation.rs), reported with a 422.
        let problem = if sum.len() != 64 {
            Some(format!(
                "Validation error: invalid_sha256_hash [{{\"expected_length\": 64, \"length\": {}}}]",
                sum.len()
            ))
        } else if !sum.chars().all(|c| c.is_ascii_hexdigit()) {
            Some("invalid characters, expected 0-9, a-f, A-F".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(Box::new(error(
                Instant::now(),
                &ApiError::Validation(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("Validation error in query parameters: [checksum: {problem}]"),
                ),
            )));
        }
    }
    Ok(UploadParams {
        wait,
        priority,
        checksum,
    })
}

/// `validate_collection_name` (strict, for names that create collections).
pub(crate) fn strict_name_error(name: &str) -> Option<Response<Body>> {
    const INVALID: [char; 11] = ['<', '>', ':', '"', '/', '\\', '|', '?', '*', '\0', '\u{1F}'];
    let problem = if name.is_empty() || name.len() > 255 {
        "must be from 1 to 255 characters".to_string()
    } else {
        let c = INVALID.into_iter().find(|c| name.contains(*c))?;
        format!("collection name cannot contain \"{c}\" char")
    };
    Some(error(
        Instant::now(),
        &ApiError::Validation(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("Validation error in path parameters: [collection_name: {problem}]"),
        ),
    ))
}

pub(crate) fn shard_id(raw: &str) -> Result<u32, Rejection> {
    raw.parse::<u32>().map_err(|_| {
        Box::new(error(
            Instant::now(),
            &ApiError::Validation(
                StatusCode::BAD_REQUEST,
                format!("Deserialize error in path parameters: can not parse \"{raw}\" to a u32"),
            ),
        ))
    })
}

/// `sha_256::hashes_equal`: ignores whitespace and case.
pub(crate) fn hashes_equal(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(|c| !c.is_whitespace())
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    norm(a) == norm(b)
}

pub(crate) async fn read_json_body(req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::Validation(StatusCode::BAD_REQUEST, e.to_string()))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::Validation(
            StatusCode::BAD_REQUEST,
            format!("Format error in JSON body: {e}"),
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Service and collections

/// `GET /` (operationId `root`): `VersionInfo`, not wrapped in the envelope.
pub(crate) fn version_info(shared: &Shared) -> Response<Body> {
    let version = shared.lock().version.clone();
    let commit = if version == super::DEFAULT_VERSION {
        // The commit the v1.18.3 tag points at.
        "db8fa43fcb6aedec1e739487e17a99731b74590a".to_string()
    } else {
        hex::encode(Sha256::digest(version.as_bytes()))[..40].to_string()
    };
    json_response(
        StatusCode::OK,
        &json!({"title": "qdrant - vector search engine", "version": version, "commit": commit}),
    )
}

fn list_collections(shared: &Shared, started: Instant) -> Response<Body> {
    let (names, padding) = {
        let inner = shared.lock();
        let names: Vec<Value> = inner
            .collections
            .keys()
            .map(|name| json!({"name": name}))
            .collect();
        (names, inner.faults.list_padding)
    };
    if padding == 0 {
        return ok(started, json!({"collections": names}));
    }
    // Streamed, so the double never holds the padding: the answer up to an open string, then
    // `padding` bytes of it, then the close.
    let head = format!(
        r#"{{"result":{{"collections":{}}},"status":"ok","time":0.0,"padding":""#,
        Value::Array(names)
    );
    let pad = tokio::io::AsyncReadExt::take(tokio::io::repeat(b'x'), padding);
    let body = futures::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(tokio_util::io::ReaderStream::with_capacity(
            pad,
            DOWNLOAD_CHUNK,
        ))
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"\"}"))
        }))
        .map(|b: io::Result<Bytes>| b.map(Frame::data));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(body)))
        .expect("static response parts are valid")
}

/// `CollectionInfo` (OpenAPI schema), for a green single-segment collection.
fn get_collection(shared: &Shared, name: &str, started: Instant) -> Response<Body> {
    let Some((_, collection)) = shared.lock().resolve(name) else {
        return error(started, &ApiError::collection_missing(name));
    };
    let points = collection.meta.points_count;
    ok(
        started,
        json!({
            "status": "green",
            "optimizer_status": "ok",
            "warnings": [],
            "indexed_vectors_count": points,
            "points_count": points,
            "segments_count": 1,
            "config": collection.meta.collection_config(),
            "payload_schema": {},
            "update_queue": {"length": 0}
        }),
    )
}

/// `GET /collections/{name}/cluster` (operationId `collection_cluster_info`,
/// `Collection::cluster_info`): on a single node the one shard is local and Active.
fn collection_cluster_info(shared: &Shared, name: &str, started: Instant) -> Response<Body> {
    let Some((_, collection)) = shared.lock().resolve(name) else {
        return error(started, &ApiError::collection_missing(name));
    };
    ok(
        started,
        json!({
            "peer_id": shared.peer_id,
            "shard_count": 1,
            "local_shards": [{
                "shard_id": 0,
                "points_count": collection.meta.points_count,
                "state": "Active"
            }],
            "remote_shards": [],
            "shard_transfers": []
        }),
    )
}

/// `POST /collections/{c}/points/count` (operationId `count_points`, `CountResult {count}`): the
/// collection's `points_count`, exact or not (the double has no estimate to differ from it).
async fn count_points(
    shared: &Arc<Shared>,
    name: &str,
    req: Request<Incoming>,
    started: Instant,
) -> Response<Body> {
    let Some((_, collection)) = shared.lock().resolve(name) else {
        return error(started, &ApiError::collection_missing(name));
    };
    if let Err(e) = read_json_body(req).await {
        return error(started, &e);
    }
    ok(started, json!({"count": collection.meta.points_count}))
}

/// `POST /collections/{c}/points/scroll` and `/points/query` (see `qdrant/points.rs`).
async fn points_request(
    shared: &Arc<Shared>,
    name: &str,
    op: &str,
    req: Request<Incoming>,
    started: Instant,
) -> Response<Body> {
    let Some((_, collection)) = shared.lock().resolve(name) else {
        return error(started, &ApiError::collection_missing(name));
    };
    let body = match read_json_body(req).await {
        Ok(body) => body,
        Err(e) => return error(started, &e),
    };
    let points = match tokio::task::spawn_blocking(move || {
        super::points::points(&collection.meta, &collection.data)
    })
    .await
    {
        Ok(Ok(points)) => points,
        Ok(Err(e)) => return error(started, &ApiError::io("reading the collection", e)),
        Err(e) => return error(started, &ApiError::Service(e.to_string())),
    };
    match op {
        "scroll" => ok(started, super::points::scroll(&points, &body)),
        _ => match super::points::query(&points, &body) {
            Ok(result) => ok(started, result),
            Err(message) => error(started, &ApiError::BadInput(message)),
        },
    }
}

/// `PUT /collections/{name}` (operationId `create_collection`), for a single unnamed vector.
async fn create_collection(
    shared: &Shared,
    name: &str,
    req: Request<Incoming>,
    started: Instant,
) -> Response<Body> {
    if let Some(response) = strict_name_error(name) {
        return response;
    }
    let body = match read_json_body(req).await {
        Ok(body) => body,
        Err(e) => return error(started, &e),
    };
    let vectors = &body["vectors"];
    let (Some(size), Some(distance)) = (vectors["size"].as_u64(), vectors["distance"].as_str())
    else {
        return error(
            started,
            &ApiError::Validation(
                StatusCode::BAD_REQUEST,
                "Format error in JSON body: the Qdrant double supports only \
                 {\"vectors\": {\"size\": N, \"distance\": D}}"
                    .to_string(),
            ),
        );
    };
    if !matches!(distance, "Cosine" | "Euclid" | "Dot" | "Manhattan") {
        return error(
            started,
            &ApiError::Validation(
                StatusCode::BAD_REQUEST,
                format!(
                    "Format error in JSON body: vectors.distance: unknown variant `{distance}`, \
                     expected one of `Cosine`, `Euclid`, `Dot`, `Manhattan`"
                ),
            ),
        );
    }
    let mut inner = shared.lock();
    if inner.collections.contains_key(name) {
        return error(
            started,
            &ApiError::AlreadyExists(format!("Collection `{name}` already exists!")),
        );
    }
    inner.collections.insert(
        name.to_string(),
        Collection {
            meta: SegmentMeta {
                vector_size: size,
                distance: distance.to_string(),
                points_count: 0,
            },
            data: DataSource::Synthetic { seed: 0, len: 0 },
        },
    );
    ok(started, json!(true))
}

/// `DELETE /collections/{name}`: true if it existed, false otherwise (not an error); its
/// aliases go too, its snapshot files stay (`TableOfContent::delete_collection`).
fn delete_collection(shared: &Shared, name: &str, started: Instant) -> Response<Body> {
    let mut inner = shared.lock();
    inner.aliases.retain(|_, target| target != name);
    let existed = inner.collections.remove(name).is_some();
    ok(started, json!(existed))
}

/// `GET /aliases` and `GET /collections/{name}/aliases` (the latter does not check that the
/// collection exists).
fn list_aliases(shared: &Shared, collection: Option<&str>, started: Instant) -> Response<Body> {
    let aliases: Vec<Value> = shared
        .lock()
        .aliases
        .iter()
        .filter(|(_, target)| collection.is_none_or(|c| c == target.as_str()))
        .map(|(alias, target)| json!({"alias_name": alias, "collection_name": target}))
        .collect();
    ok(started, json!({"aliases": aliases}))
}

/// `POST /collections/aliases` (operationId `update_aliases`). Like
/// `TableOfContent::update_aliases`, the actions run in order under one lock and stop at the
/// first error; earlier actions stay applied.
async fn change_aliases(
    shared: &Shared,
    req: Request<Incoming>,
    started: Instant,
) -> Response<Body> {
    let body = match read_json_body(req).await {
        Ok(body) => body,
        Err(e) => return error(started, &e),
    };
    let Some(actions) = body["actions"].as_array() else {
        return error(
            started,
            &ApiError::Validation(
                StatusCode::BAD_REQUEST,
                "Format error in JSON body: missing field `actions`".to_string(),
            ),
        );
    };
    let mut inner = shared.lock();
    let inner = &mut *inner;
    for action in actions {
        let exists = |c: &str| inner.collections.contains_key(c);
        if let Err(e) = apply_alias_action(&mut inner.aliases, exists, action) {
            return error(started, &e);
        }
    }
    ok(started, json!(true))
}

/// One action of `update_aliases` (`collection_meta_ops.rs`): `create_alias` onto a missing
/// collection is 404 and onto a collection's own name 409, `delete_alias` of an unknown alias
/// succeeds, `rename_alias` of an unknown one is 404. Shared by the single-node and the cluster
/// doubles.
pub(crate) fn apply_alias_action(
    aliases: &mut std::collections::BTreeMap<String, String>,
    collection_exists: impl Fn(&str) -> bool,
    action: &Value,
) -> Result<(), ApiError> {
    let field = |op: &str, key: &str| action[op][key].as_str().map(str::to_string);
    if action.get("create_alias").is_some() {
        match (
            field("create_alias", "collection_name"),
            field("create_alias", "alias_name"),
        ) {
            (Some(collection), Some(alias)) => {
                if !collection_exists(&collection) {
                    Err(ApiError::collection_missing(&collection))
                } else if collection_exists(&alias) {
                    Err(ApiError::AlreadyExists(format!(
                        "Collection `{alias}` already exists!"
                    )))
                } else {
                    aliases.insert(alias, collection);
                    Ok(())
                }
            }
            _ => Err(bad_alias_action()),
        }
    } else if action.get("delete_alias").is_some() {
        match field("delete_alias", "alias_name") {
            Some(alias) => {
                aliases.remove(&alias);
                Ok(())
            }
            None => Err(bad_alias_action()),
        }
    } else if action.get("rename_alias").is_some() {
        match (
            field("rename_alias", "old_alias_name"),
            field("rename_alias", "new_alias_name"),
        ) {
            (Some(old), Some(new)) => match aliases.remove(&old) {
                Some(target) => {
                    aliases.insert(new, target);
                    Ok(())
                }
                None => Err(ApiError::NotFound(format!("Alias {old} does not exists!"))),
            },
            _ => Err(bad_alias_action()),
        }
    } else {
        Err(bad_alias_action())
    }
}

pub(crate) fn bad_alias_action() -> ApiError {
    ApiError::Validation(
        StatusCode::BAD_REQUEST,
        "Format error in JSON body: data did not match any variant of untagged enum \
         AliasOperations"
            .to_string(),
    )
}

// ---------------------------------------------------------------------------------------------
// Snapshot files on disk

pub(crate) fn checksum_path(snapshot: &Path) -> PathBuf {
    let mut path = snapshot.as_os_str().to_owned();
    path.push(".checksum");
    PathBuf::from(path)
}

/// `get_snapshot_description`: name, creation time (whole seconds, no zone), size, and the
/// checksum from the `.checksum` file beside it when there is one.
pub(crate) fn describe(path: &Path) -> io::Result<Value> {
    let meta = fs::metadata(path)?;
    let created = meta.created().or_else(|_| meta.modified()).ok();
    let creation_time = created.map(|t| {
        chrono::DateTime::<chrono::Utc>::from(t)
            .format("%Y-%m-%dT%H:%M:%S")
            .to_string()
    });
    let mut description = json!({
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "creation_time": creation_time,
        "size": meta.len(),
    });
    if let Ok(checksum) = fs::read_to_string(checksum_path(path)) {
        description["checksum"] = Value::String(checksum);
    }
    Ok(description)
}

/// `list_snapshots` of the local storage manager: regular files ending in `.snapshot`.
pub(crate) fn list_snapshot_dir(dir: &Path) -> io::Result<Vec<Value>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|ext| ext == "snapshot") {
            paths.push(path);
        }
    }
    paths.sort();
    paths.iter().map(|p| describe(p)).collect()
}

/// `get_snapshot_path`: the file must exist inside `dir` (no escaping with `..`).
pub(crate) fn snapshot_path(dir: &Path, name: &str) -> Result<PathBuf, ApiError> {
    let dir = fs::canonicalize(dir).map_err(|_| {
        ApiError::NotFound(format!("Snapshot directory: {} not found", dir.display()))
    })?;
    let path = fs::canonicalize(dir.join(name)).map_err(|_| ApiError::snapshot_missing(name))?;
    if !path.starts_with(&dir) || !path.is_file() {
        return Err(ApiError::snapshot_missing(name));
    }
    Ok(path)
}

pub(crate) fn now_stamp() -> String {
    chrono::Utc::now().format("%Y-%m-%d-%H-%M-%S").to_string()
}

/// Writes an archive into a temporary file in `tmp`, then moves it to `target` with its
/// `.checksum` beside it (`SnapshotStorageLocalFS::store_file`).
fn store_archive(
    tmp: &Path,
    target: &Path,
    wrong_checksum: bool,
    write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
) -> io::Result<Value> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = tempfile::Builder::new()
        .prefix(&format!("{name}-arc-"))
        .tempfile_in(tmp)?;
    let mut writer = HashingWriter::new(BufWriter::with_capacity(IO_BUF, file.as_file()));
    write(&mut writer)?;
    let (buffered, mut checksum) = writer.finish();
    buffered
        .into_inner()
        .map_err(|e| e.into_error())?
        .sync_all()?;
    if wrong_checksum {
        checksum = hex::encode(Sha256::digest(checksum.as_bytes()));
    }
    if let Some(dir) = target.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(checksum_path(target), &checksum)?;
    file.persist(target).map_err(|e| e.error)?;
    describe(target)
}

fn collection_snapshot_file(
    shared: &Shared,
    collection_name: &str,
    collection: &Collection,
    version: &str,
    wrong_checksum: bool,
) -> io::Result<(PathBuf, Value)> {
    let name = format!(
        "{collection_name}-{}-{}.snapshot",
        shared.peer_id,
        now_stamp()
    );
    let target = shared.dirs.collection_snapshots(collection_name).join(name);
    let description = store_archive(&shared.dirs.tmp, &target, wrong_checksum, |out| {
        data::write_collection_snapshot(out, &collection.meta, &collection.data, version).map(drop)
    })?;
    Ok((target, description))
}

/// Applies the creation delay and failure faults; `Err` when creation must fail.
async fn creation_faults(shared: &Shared) -> Result<bool, ApiError> {
    let delay = shared.lock().faults.create_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut inner = shared.lock();
    if fire(&mut inner.faults.fail_create) {
        return Err(ApiError::Service(
            "failed to create snapshot: injected failure (Qdrant test double)".to_string(),
        ));
    }
    Ok(fire(&mut inner.faults.wrong_checksum))
}

pub(crate) async fn blocking<T: Send + 'static>(
    context: &'static str,
    work: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(ApiError::io(context, e)),
        Err(e) => Err(ApiError::Service(format!("Tokio task join error: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Collection snapshots

/// `POST /collections/{name}/snapshots` (operationId `create_snapshot`).
async fn create_collection_snapshot(
    shared: Arc<Shared>,
    name: String,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
        Ok(wait) => wait,
        Err(response) => return *response,
    };
    time_or_accept(started, wait, async move {
        let (real, collection) = shared
            .lock()
            .resolve(&name)
            .ok_or_else(|| ApiError::collection_missing(&name))?;
        let wrong_checksum = creation_faults(&shared).await?;
        let version = shared.lock().version.clone();
        let (_, description) = blocking("failed to create snapshot", move || {
            collection_snapshot_file(&shared, &real, &collection, &version, wrong_checksum)
        })
        .await?;
        Ok(description)
    })
    .await
}

/// `GET /collections/{name}/snapshots` (operationId `list_snapshots`).
fn list_collection_snapshots(shared: &Shared, name: &str, started: Instant) -> Response<Body> {
    let Some((real, _)) = shared.lock().resolve(name) else {
        return error(started, &ApiError::collection_missing(name));
    };
    match list_snapshot_dir(&shared.dirs.collection_snapshots(&real)) {
        Ok(list) => ok(started, Value::Array(list)),
        Err(e) => error(started, &ApiError::io("listing snapshots", e)),
    }
}

/// `GET /collections/{name}/snapshots/{snapshot}` (operationId `get_snapshot`).
async fn download_collection_snapshot(
    shared: &Arc<Shared>,
    name: &str,
    snapshot: &str,
    headers: &HeaderMap,
) -> Response<Body> {
    let resolved = shared.lock().resolve(name);
    let path = resolved
        .ok_or_else(|| ApiError::collection_missing(name))
        .and_then(|(real, _)| snapshot_path(&shared.dirs.collection_snapshots(&real), snapshot));
    match path {
        Ok(path) => send_file(shared, &path, headers).await,
        Err(e) => text_error(&e),
    }
}

/// `DELETE /collections/{name}/snapshots/{snapshot}` (operationId `delete_snapshot`): removes
/// the file and its `.checksum`.
async fn delete_collection_snapshot(
    shared: Arc<Shared>,
    name: String,
    snapshot: String,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
        Ok(wait) => wait,
        Err(response) => return *response,
    };
    time_or_accept(started, wait, async move {
        let (real, _) = shared
            .lock()
            .resolve(&name)
            .ok_or_else(|| ApiError::collection_missing(&name))?;
        let path = snapshot_path(&shared.dirs.collection_snapshots(&real), &snapshot)?;
        remove_snapshot(&path)
    })
    .await
}

pub(crate) fn remove_snapshot(path: &Path) -> Result<Value, ApiError> {
    fs::remove_file(path).map_err(|e| ApiError::io("deleting snapshot", e))?;
    let _ = fs::remove_file(checksum_path(path));
    Ok(json!(true))
}

// ---------------------------------------------------------------------------------------------
// Full storage snapshots

/// `POST /snapshots` (operationId `create_full_snapshot`). Like `_do_create_full_snapshot`, it
/// snapshots every collection into its own directory, moves those archives into the full one,
/// and so leaves each collection snapshot's `.checksum` file behind.
async fn create_full_snapshot(
    shared: Arc<Shared>,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
        Ok(wait) => wait,
        Err(response) => return *response,
    };
    time_or_accept(started, wait, async move {
        let wrong_checksum = creation_faults(&shared).await?;
        let (collections, aliases, version) = {
            let inner = shared.lock();
            (
                inner.collections.clone(),
                inner.aliases.clone(),
                inner.version.clone(),
            )
        };
        blocking("failed to create full snapshot", move || {
            let mut parts = Vec::new();
            let result = (|| {
                for (name, collection) in &collections {
                    let (path, _) =
                        collection_snapshot_file(&shared, name, collection, &version, false)?;
                    parts.push((name.clone(), path));
                }
                let target = shared
                    .dirs
                    .snapshots
                    .join(format!("full-snapshot-{}.snapshot", now_stamp()));
                store_archive(&shared.dirs.tmp, &target, wrong_checksum, |out| {
                    data::write_full_snapshot(out, &parts, &aliases).map(drop)
                })
            })();
            for (_, path) in &parts {
                let _ = fs::remove_file(path);
            }
            result
        })
        .await
    })
    .await
}

fn list_full_snapshots(shared: &Shared, started: Instant) -> Response<Body> {
    match list_snapshot_dir(&shared.dirs.snapshots) {
        Ok(list) => ok(started, Value::Array(list)),
        Err(e) => error(started, &ApiError::io("listing snapshots", e)),
    }
}

async fn download_full_snapshot(
    shared: &Arc<Shared>,
    name: &str,
    headers: &HeaderMap,
) -> Response<Body> {
    match snapshot_path(&shared.dirs.snapshots, name) {
        Ok(path) => send_file(shared, &path, headers).await,
        Err(e) => text_error(&e),
    }
}

async fn delete_full_snapshot(
    shared: Arc<Shared>,
    name: String,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    let wait = match wait_param(&query_pairs(query), QueryStyle::Validated) {
        Ok(wait) => wait,
        Err(response) => return *response,
    };
    time_or_accept(started, wait, async move {
        let path = snapshot_path(&shared.dirs.snapshots, &name)?;
        remove_snapshot(&path)
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Downloads

/// Serves a snapshot file like actix-files' `NamedFile`: `application/octet-stream`,
/// `Content-Length`, attachment disposition, `Accept-Ranges: bytes` and single byte ranges.
async fn send_file(shared: &Arc<Shared>, path: &Path, headers: &HeaderMap) -> Response<Body> {
    let mut file = match tokio::fs::File::open(path).await {
        Ok(file) => file,
        Err(e) => return text(StatusCode::NOT_FOUND, format!("File not found: {e}")),
    };
    let meta = match file.metadata().await {
        Ok(meta) => meta,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Failed to open file: {e}"),
            );
        }
    };
    let len = meta.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|v| parse_range(v, len));
    let (status, start, end) = match range {
        None => (StatusCode::OK, 0, len),
        Some(Some((start, end))) => (StatusCode::PARTIAL_CONTENT, start, end),
        Some(None) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(full(Bytes::new()))
                .expect("static response parts are valid");
        }
    };
    if start > 0
        && let Err(e) = file.seek(io::SeekFrom::Start(start)).await
    {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Failed to open file: {e}"),
        );
    }
    let reader = tokio::io::AsyncReadExt::take(file, end - start);
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, DOWNLOAD_CHUNK);
    let mut builder = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, end - start)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .header(header::ACCEPT_RANGES, "bytes");
    if let Ok(modified) = meta.modified() {
        builder = builder.header(header::LAST_MODIFIED, http_date(modified));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        );
    }
    builder
        .body(download_body(shared, stream))
        .expect("response parts are valid")
}

/// One `bytes=` range as `[start, end)`; None when unsatisfiable or not understood.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (start, end) = if first.is_empty() {
        let suffix: u64 = last.parse().ok()?;
        (len.saturating_sub(suffix), len)
    } else {
        let start: u64 = first.parse().ok()?;
        let end = if last.is_empty() {
            len
        } else {
            last.parse::<u64>().ok()?.saturating_add(1).min(len)
        };
        (start, end)
    };
    (start < end).then_some((start, end))
}

fn http_date(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// Wraps a download stream with the download faults: a delay before every chunk (read live, so
/// a test can change it mid-download) and a connection cut after N bytes (decided when the
/// download starts).
fn download_body<S>(shared: &Arc<Shared>, inner: S) -> Body
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    let cut = {
        let mut inner = shared.lock();
        let at = inner.faults.cut_download_at;
        fire(&mut inner.faults.cut_download).then_some(at)
    };
    struct State<S> {
        inner: Pin<Box<S>>,
        shared: Arc<Shared>,
        sent: u64,
        cut: Option<u64>,
        done: bool,
    }
    let state = State {
        inner: Box::pin(inner),
        shared: shared.clone(),
        sent: 0,
        cut,
        done: false,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if st.cut.is_some_and(|cut| st.sent >= cut) {
            // Give hyper a moment to flush what was sent, then fail the body: hyper drops the
            // connection without completing the response.
            tokio::time::sleep(FLUSH_BEFORE_CUT).await;
            st.done = true;
            let e = io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "download cut by the Qdrant double's fault injection",
            );
            return Some((Err(e), st));
        }
        let delay = st.shared.lock().faults.chunk_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        match st.inner.next().await {
            None => None,
            Some(Err(e)) => {
                st.done = true;
                Some((Err(e), st))
            }
            Some(Ok(mut chunk)) => {
                if let Some(cut) = st.cut {
                    let room = usize::try_from(cut - st.sent).unwrap_or(usize::MAX);
                    chunk.truncate(room);
                }
                st.sent += chunk.len() as u64;
                Some((Ok(Frame::data(chunk)), st))
            }
        }
    });
    BodyExt::boxed_unsync(StreamBody::new(stream))
}

/// A `Write` that hands fixed-size chunks to a bounded channel (the archive is produced on a
/// blocking thread while the response streams it). A closed channel — the client went away —
/// fails the write, which stops the producer.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(DOWNLOAD_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "snapshot stream receiver gone"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(DOWNLOAD_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == DOWNLOAD_CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// `GET /collections/{name}/shards/{shard}/snapshot` (operationId `stream_shard_snapshot`):
/// the shard archive generated while it streams, chunked, nothing written to disk. Absent from
/// servers older than [`SHARD_STREAM_SINCE`].
async fn stream_shard_snapshot(shared: Arc<Shared>, name: &str, shard: &str) -> Response<Body> {
    let version = shared.lock().version.clone();
    if parse_version(&version).is_some_and(|v| v < SHARD_STREAM_SINCE) {
        return not_routed();
    }
    let shard = match shard_id(shard) {
        Ok(shard) => shard,
        Err(response) => return *response,
    };
    let Some((real, collection)) = shared.lock().resolve(name) else {
        return text_error(&ApiError::collection_missing(name));
    };
    if shard != 0 {
        return text_error(&ApiError::shard_missing(shard));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let errors = tx.clone();
        let writer = ChannelWriter {
            tx,
            buf: Vec::with_capacity(DOWNLOAD_CHUNK),
        };
        let result = data::write_shard_snapshot(writer, &collection.meta, &collection.data)
            .and_then(|mut writer| writer.flush());
        if let Err(e) = result
            && e.kind() != io::ErrorKind::BrokenPipe
        {
            let _ = errors.blocking_send(Err(e));
        }
    });
    let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
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
        .body(download_body(&shared, stream))
        .expect("response parts are valid")
}

// ---------------------------------------------------------------------------------------------
// Uploads

/// Reads and discards the request body, then answers `response`. Qdrant rejects bad path or
/// query parameters of an upload before reading the body; answering while the client is still
/// sending makes the kernel reset the connection, and the client may never see the answer. The
/// double reads the rest first so the error reliably reaches the client.
pub(crate) async fn drain_then(req: Request<Incoming>, response: Response<Body>) -> Response<Body> {
    let mut body = req.into_body();
    while let Some(Ok(_)) = body.frame().await {}
    response
}

/// An upload spooled to the double's temporary directory; deleted on drop unless persisted.
pub(crate) struct Spooled {
    pub(crate) file: tempfile::TempPath,
    pub(crate) sha256: String,
    pub(crate) file_name: Option<String>,
}

/// Reads a `multipart/form-data` body, streaming the `snapshot` field into a temporary file and
/// hashing it on the way (actix `MultipartForm` with a `TempFile` field). Other fields are read
/// and dropped. A body that ends early fails here, and the partial file is deleted.
pub(crate) async fn spool_upload(tmp: &Path, req: Request<Incoming>) -> Result<Spooled, Rejection> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(boundary) = multipart::boundary(content_type) else {
        return Err(reject(
            StatusCode::BAD_REQUEST,
            "Multipart error: content type is not multipart/form-data with a boundary",
        ));
    };
    let mut form = multipart::Multipart::new(req.into_body(), &boundary);
    let fail = |e: multipart::MultipartError| {
        reject(StatusCode::BAD_REQUEST, format!("Multipart error: {e}"))
    };
    let internal = |e: io::Error| reject(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    let mut spooled = None;
    while let Some(part) = form.next_part().await.map_err(fail)? {
        if part.name.as_deref() != Some("snapshot") || spooled.is_some() {
            continue;
        }
        let (file, temp_path) = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(tmp)
            .map_err(internal)?
            .into_parts();
        let mut out = tokio::io::BufWriter::with_capacity(IO_BUF, tokio::fs::File::from_std(file));
        let mut hasher = Sha256::new();
        while let Some(chunk) = form.chunk().await.map_err(fail)? {
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(internal)?;
        }
        out.flush().await.map_err(internal)?;
        spooled = Some(Spooled {
            file: temp_path,
            sha256: hex::encode(hasher.finalize()),
            file_name: part.file_name,
        });
    }
    spooled.ok_or_else(|| {
        reject(
            StatusCode::BAD_REQUEST,
            "Multipart error: field `snapshot` is required",
        )
    })
}

pub(crate) fn check_checksum(spooled: &Spooled, expected: Option<&str>) -> Result<(), ApiError> {
    match expected {
        // `StorageError::checksum_mismatch(snapshot_checksum, checksum)`: Qdrant passes the
        // file's hash as "expected" and the caller's as "actual".
        Some(given) if !hashes_equal(&spooled.sha256, given) => Err(ApiError::ChecksumMismatch {
            expected: spooled.sha256.clone(),
            actual: given.to_string(),
        }),
        _ => Ok(()),
    }
}

/// A fresh file name under the storage directory.
fn storage_file(shared: &Shared) -> PathBuf {
    shared
        .dirs
        .storage
        .join(format!("{}.bin", hex::encode(rand::random::<[u8; 12]>())))
}

pub(crate) fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn vectors_debug(vectors: &Value) -> String {
    format!(
        "Single(VectorParams {{ size: {}, distance: {}, .. }})",
        vectors["size"],
        vectors["distance"].as_str().unwrap_or("?")
    )
}

/// `POST /collections/{name}/snapshots/upload` (operationId `recover_from_uploaded_snapshot`).
///
/// Order as in `upload_snapshot` (src/actix/api/snapshot_api.rs): path and query are checked
/// before the body is read; the body is spooled to disk; a `checksum` is compared; the file is
/// moved into the collection's snapshot directory under the part's file name (a UUID when it
/// has none) — where it stays after recovery, as in Qdrant 1.18, which recovers from it in
/// place — and the collection is created or overwritten from it.
async fn upload_collection_snapshot(
    shared: Arc<Shared>,
    name: String,
    req: Request<Incoming>,
    query: Option<&str>,
    started: Instant,
) -> Response<Body> {
    if let Some(response) = strict_name_error(&name) {
        return drain_then(req, response).await;
    }
    let params = match upload_params(query, QueryStyle::Validated) {
        Ok(params) => params,
        Err(response) => return drain_then(req, *response).await,
    };
    let spooled = match spool_upload(&shared.dirs.tmp, req).await {
        Ok(spooled) => spooled,
        Err(response) => return *response,
    };
    let delay = shared.lock().faults.recover_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    time_or_accept(started, params.wait, async move {
        check_checksum(&spooled, params.checksum.as_deref())?;
        let file_name = spooled
            .file_name
            .as_deref()
            .and_then(|n| Path::new(n).file_name())
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .unwrap_or_else(uuid_v4);
        let dir = shared.dirs.collection_snapshots(&name);
        let saved = dir.join(file_name);
        fs::create_dir_all(&dir).map_err(|e| ApiError::io("saving uploaded snapshot", e))?;
        spooled
            .file
            .persist(&saved)
            .map_err(|e| ApiError::io("saving uploaded snapshot", e.error))?;
        let data_path = storage_file(&shared);
        let target = data_path.clone();
        let unpacked = blocking("failed to unpack snapshot", move || {
            data::unpack_to_file(&saved, ArchiveKind::Collection, &target)
        })
        .await?;
        let stored = Arc::new(StoredFile { path: data_path });
        let snapshot_vectors = unpacked.config_vectors.clone().unwrap_or(Value::Null);
        let mut inner = shared.lock();
        let real = match inner.resolve(&name) {
            Some((real, existing)) => {
                let existing_vectors = json!({
                    "size": existing.meta.vector_size,
                    "distance": existing.meta.distance,
                });
                if existing_vectors != snapshot_vectors {
                    return Err(ApiError::BadInput(format!(
                        "Snapshot is not compatible with existing collection: Collection \
                         vectors: {} Snapshot Vectors: {}",
                        vectors_debug(&existing_vectors),
                        vectors_debug(&snapshot_vectors)
                    )));
                }
                real
            }
            None => name.clone(),
        };
        inner.collections.insert(
            real,
            Collection {
                meta: unpacked.meta,
                data: DataSource::Stored {
                    file: stored,
                    len: unpacked.data_len,
                },
            },
        );
        Ok(json!(true))
    })
    .await
}

/// `POST /collections/{name}/shards/{shard}/snapshots/upload` (operationId
/// `recover_shard_from_uploaded_snapshot`): replaces an existing collection's shard with an
/// uploaded shard snapshot (what the streaming endpoint produced). The spooled file is consumed
/// and deleted. Answers `"result": null`, as the handler's future returns `()`.
async fn upload_shard_snapshot(
    shared: Arc<Shared>,
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
    let spooled = match spool_upload(&shared.dirs.tmp, req).await {
        Ok(spooled) => spooled,
        Err(response) => return *response,
    };
    time_or_accept(started, params.wait, async move {
        check_checksum(&spooled, params.checksum.as_deref())?;
        let (real, existing) = shared
            .lock()
            .resolve(&name)
            .ok_or_else(|| ApiError::collection_missing(&name))?;
        if shard != 0 {
            return Err(ApiError::shard_missing(shard));
        }
        let data_path = storage_file(&shared);
        let target = data_path.clone();
        let unpacked = blocking("failed to recover shard snapshot", move || {
            let unpacked = data::unpack_to_file(&spooled.file, ArchiveKind::Shard, &target);
            drop(spooled);
            unpacked
        })
        .await?;
        let stored = Arc::new(StoredFile { path: data_path });
        // The double's own check: a shard whose vectors differ from the collection's would be
        // unusable; real Qdrant's segments carry their own config.
        if unpacked.meta.vector_size != existing.meta.vector_size
            || unpacked.meta.distance != existing.meta.distance
        {
            return Err(ApiError::BadInput(format!(
                "Shard snapshot vectors ({}/{}) do not match collection `{real}` ({}/{})",
                unpacked.meta.vector_size,
                unpacked.meta.distance,
                existing.meta.vector_size,
                existing.meta.distance
            )));
        }
        shared.lock().collections.insert(
            real,
            Collection {
                meta: unpacked.meta,
                data: DataSource::Stored {
                    file: stored,
                    len: unpacked.data_len,
                },
            },
        );
        Ok(Value::Null)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 10)));
        assert_eq!(parse_range("bytes=2-4", 10), Some((2, 5)));
        assert_eq!(parse_range("bytes=-3", 10), Some((7, 10)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=0-1,3-4", 10), None);
    }

    #[test]
    fn paths_are_normalised_like_actix() {
        assert_eq!(normalize_path("/"), "/");
        assert_eq!(normalize_path("//collections//a/"), "/collections/a");
    }
}
