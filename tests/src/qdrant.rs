//! A test double of the Qdrant 1.18 REST API (no Qdrant server can be installed here; see
//! shared/TESTING.md).
//!
//! [`QdrantDouble::start`] serves HTTP/1.1 on `127.0.0.1:<random port>` from its own runtime, so
//! synchronous tests can use it and the agent cannot tell it from a single-node Qdrant. Its
//! collections hold synthetic data ([`QdrantDouble::add_collection`]); their snapshots are real
//! tar archives written to the double's own temporary disk, so a backup and restore can be
//! checked byte for byte with [`QdrantDouble::fingerprint`].
//!
//! # What follows real Qdrant 1.18.3
//! Sources: the OpenAPI document (`docs/redoc/master/openapi.json`, cited by operationId) and the
//! server code at tag `v1.18.3` (paths below are in the qdrant/qdrant repository).
//!
//! - **Envelope** (`lib/api/src/rest/models.rs` `ApiResponse`, `src/actix/helpers.rs`): success
//!   `{"result": .., "status": "ok", "time": <seconds>}`; errors `{"status": {"error": msg},
//!   "time": ..}` without `result`; `wait=false` answers 202 `{"status": "accepted", "time": ..}`
//!   and the work goes on (`time_or_accept`, also used with `wait=true`, so a client that hangs
//!   up does not cancel a snapshot being created).
//! - **Status codes** (`HttpError::status_code`): not found 404, bad input 400, already exists
//!   409, internal 500, checksum mismatch 400. Messages are `StorageError`'s Display
//!   (`lib/storage/src/content_manager/errors.rs`): "Not found: Collection `x` doesn't exist!",
//!   "Not found: Snapshot NAME not found", "Not found: shard N not found", "Checksum mismatch:
//!   expected FILE_SHA, actual GIVEN_SHA" (Qdrant passes the uploaded file's hash as
//!   "expected"). Query parameters that do not deserialise (e.g. `priority=bogus`, `wait=yes`)
//!   are 400 "Deserialize error in query parameters: unknown variant `bogus`, expected one of
//!   `no_sync`, `snapshot`, `replica`"; a malformed `checksum` is 422 (`src/actix/mod.rs`
//!   `validation_error_handler`). Handlers that stream a file (`get_snapshot`,
//!   `get_full_snapshot`, `stream_shard_snapshot`) return `HttpError` directly, which actix
//!   renders as a plain-text body with the same status.
//! - **Unknown routes**: 404 with an empty body (actix default). Paths are normalised first
//!   (`NormalizePath::trim`).
//! - **API key** (`src/actix/auth.rs`, `src/common/auth/mod.rs`): checked before routing for
//!   every path except `/`, `/healthz`, `/readyz`, `/livez`; the key is the `api-key` header or
//!   `Authorization: Bearer <key>`. Missing → **401** text "Must provide an API key or an
//!   Authorization bearer token"; wrong → **401** "Invalid API key or JWT". (403 is only for a
//!   valid read-only key or JWT without rights; the double has no read-only key.)
//! - **`GET /`** (`root`): bare `VersionInfo` (no envelope); `version` settable.
//! - **Cluster API** (`cluster_status`, `collection_cluster_info`; `Collection::cluster_info` in
//!   lib/collection/src/collection/collection_ops.rs): a node without `cluster.enabled` answers
//!   `GET /cluster` with `{"status": "disabled"}`, and `GET /collections/{c}/cluster` with its one
//!   shard local and Active under its own peer id, no remote shards, no transfers. A distributed
//!   cluster is `soma_tests::qdrant_cluster`.
//! - **Collections**: `get_collections`, `get_collection` (`CollectionInfo`), `collection_exists`,
//!   `create_collection` (single unnamed vector only), `delete_collection` (result false for an
//!   unknown name; removes the collection's aliases; its snapshot files stay on disk). Names
//!   resolve through aliases like `TableOfContent::resolve_name`.
//! - **Aliases** (`get_collections_aliases`, `get_collection_aliases`, `update_aliases`;
//!   `lib/storage/src/content_manager/toc/collection_meta_ops.rs`, `alias_mapping.rs`): actions
//!   run in order under one lock and stop at the first error, *earlier ones stay applied*;
//!   `delete_alias` of an unknown alias succeeds; `create_alias` onto an existing collection
//!   name is 409; `rename_alias` of an unknown alias is 404 "Alias X does not exists!".
//! - **Collection snapshots** (`create_snapshot`, `list_snapshots`, `get_snapshot`,
//!   `delete_snapshot`; `lib/collection/src/collection/snapshots.rs`,
//!   `lib/collection/src/common/snapshots_manager.rs`): named
//!   `<collection>-<peer id>-<YYYY-MM-DD-HH-MM-SS>.snapshot` (two in the same second collide, as
//!   in Qdrant), written to a temporary file then moved into `snapshots/<collection>/` with a
//!   `<name>.checksum` file beside it (sha256 hex); the description is `{name, creation_time,
//!   size, checksum}`; listing shows only `*.snapshot` files; downloads are served like
//!   actix-files `NamedFile` (`application/octet-stream`, `Content-Length`, `Content-Disposition:
//!   attachment`, single `Range`); delete removes the file and its `.checksum`.
//! - **Shard streaming** (`stream_shard_snapshot`; `ShardHolder::stream_shard_snapshot`): a
//!   *shard* archive generated while it is sent (chunked, no file), named
//!   `<collection>-shard-<id>-<time>.snapshot` in `Content-Disposition`. Only shard 0 exists. The
//!   route exists in the server since **1.12.0** (absent in 1.11.x) and is in the OpenAPI
//!   document since 1.17.0; for a configured version below [`SHARD_STREAM_SINCE`] the double
//!   answers like a server without the route (empty 404). A shard archive is not a collection
//!   snapshot: it is recovered with `recover_shard_from_uploaded_snapshot` into an existing
//!   collection, not with the collection upload.
//! - **Full snapshots** (`create_full_snapshot`, `list_full_snapshots`, `get_full_snapshot`,
//!   `delete_full_snapshot`; `lib/storage/src/content_manager/snapshots/mod.rs`): a tar of one
//!   collection snapshot per collection plus `config.json` (`collections_mapping`,
//!   `collections_aliases`), named `full-snapshot-<time>.snapshot`. Like Qdrant, it first makes
//!   ordinary collection snapshots, moves those files into the archive, and so **leaves their
//!   `.checksum` files behind** in `snapshots/<collection>/`.
//! - **Upload** (`recover_from_uploaded_snapshot`; `upload_snapshot` in
//!   `src/actix/api/snapshot_api.rs`, `lib/storage/src/content_manager/snapshots/recover.rs`):
//!   path and query checked first; the multipart field `snapshot` streamed to a temporary file
//!   (never held in memory); `checksum` compared (mismatch: 400, file deleted, nothing
//!   recovered); the file moved to `snapshots/<collection>/<part file name or a UUID>` and
//!   **left there after recovery** (Qdrant recovers from it in place and does not delete it);
//!   then the collection is created, or overwritten when its vector params match (400 "Snapshot
//!   is not compatible with existing collection: ..." otherwise). A body cut off mid-stream fails
//!   the spool and recovers nothing. Shard uploads (`recover_shard_from_uploaded_snapshot`)
//!   consume their temporary file and answer `"result": null`.
//!
//! # Where the double is simpler than Qdrant
//! One node, one shard, one unnamed dense vector per collection, a points API for count (the
//! collection's `points_count`, exact or not), scroll and query only with points derived from the collection's bytes (see `qdrant/points.rs`), no read-only
//! keys or JWT. Multipart errors, JSON body errors and the exact `Debug` rendering of vector
//! params in messages are approximations. An upload rejected for its path or query parameters
//! is read to its end before the error is sent (Qdrant answers at once, and a client still
//! sending may then see a connection reset instead); one rejected for its API key is not, as in
//! Qdrant. Recovering a shard archive whose vector params differ from the collection's is
//! refused with 400 (the double's own check). The archive layout inside a snapshot is the double's
//! own (described in `qdrant/data.rs`): only the double reads it back.
//!
//! # Memory
//! Snapshot data is generated block by block (1 MiB buffer) or streamed from disk
//! ([`DOWNLOAD_CHUNK`] chunks); uploads are streamed to disk; a shard stream holds at most four
//! chunks in flight. Nothing grows with the data size.

mod data;
pub(crate) mod multipart;
mod points;
pub(crate) mod server;
mod state;

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use self::data::{ArchiveKind, DISTANCE, DataSource, SegmentMeta};
use self::state::{Collection, Shared};

/// The version the double reports unless told otherwise.
pub const DEFAULT_VERSION: &str = "1.18.3";

/// First Qdrant version whose server has `GET /collections/{c}/shards/{id}/snapshot`
/// (verified in the qdrant/qdrant tags: absent in v1.11.5, present from v1.12.0).
pub const SHARD_STREAM_SINCE: (u32, u32, u32) = (1, 12, 0);

/// Size of the chunks downloads are sent in; the chunk delay applies per chunk.
pub const DOWNLOAD_CHUNK: usize = 64 << 10;

/// How often a fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Times {
    /// Every time until cleared.
    Always,
    /// The next N times, then it clears itself.
    Next(u32),
}

/// How a request stood with respect to the API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKeyUse {
    /// The double was started without a key.
    NotConfigured,
    /// The right key (`api-key` header or `Authorization: Bearer`).
    Valid,
    /// No key sent.
    Missing,
    /// A key that is not the configured one.
    Wrong,
}

/// One request the double received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Normalised path (percent-encoding kept).
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Whether it carried the API key.
    pub api_key: ApiKeyUse,
    /// Response status; 0 while the request is still being answered.
    pub status: u16,
    pub(crate) seq: u64,
}

/// A collection as the double holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionState {
    /// Collection name.
    pub name: String,
    /// Dimension of its single vector.
    pub vector_size: u64,
    /// Reported `points_count`.
    pub points_count: u64,
    /// Size of its data in bytes.
    pub data_bytes: u64,
}

/// A Qdrant 1.18 REST server double on 127.0.0.1; stops and deletes its disk on drop.
#[derive(Debug)]
pub struct QdrantDouble {
    shared: Arc<Shared>,
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl QdrantDouble {
    /// Starts the server on a free port. With `api_key`, every request but `GET /` and the
    /// health probes needs it.
    pub fn start(api_key: Option<&str>) -> QdrantDouble {
        let shared = Arc::new(Shared::new(api_key.map(str::to_string), DEFAULT_VERSION));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("qdrant-double")
            .enable_all()
            .build()
            .expect("cannot build the Qdrant double's runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("cannot bind the Qdrant double on 127.0.0.1");
        listener
            .set_nonblocking(true)
            .expect("cannot make the Qdrant double's socket non-blocking");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("bound socket has an address")
        );
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener)
                .expect("cannot register the Qdrant double's socket")
        };
        runtime.spawn(server::serve(listener, shared.clone()));
        QdrantDouble {
            shared,
            url,
            runtime: Some(runtime),
        }
    }

    /// `http://127.0.0.1:PORT`, no trailing slash.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The API key the double requires, if any.
    pub fn api_key(&self) -> Option<&str> {
        self.shared.api_key.as_deref()
    }

    /// Makes `GET /` report `version` and enables only the routes that version has (shard
    /// streaming needs [`SHARD_STREAM_SINCE`]).
    pub fn set_version(&self, version: &str) {
        assert!(
            parse_version(version).is_some(),
            "version {version:?} is not MAJOR.MINOR.PATCH"
        );
        self.shared.lock().version = version.to_string();
    }

    /// The version `GET /` reports.
    pub fn version(&self) -> String {
        self.shared.lock().version.clone()
    }

    /// Adds (or replaces) a collection of `points` points of dimension `vector_size` whose
    /// storage is `data_bytes` pseudo-random bytes derived from `seed`. Nothing is generated
    /// until a snapshot or fingerprint needs it.
    pub fn add_collection(
        &self,
        name: &str,
        vector_size: u64,
        points: u64,
        data_bytes: u64,
        seed: u64,
    ) {
        self.shared.lock().collections.insert(
            name.to_string(),
            Collection {
                meta: SegmentMeta {
                    vector_size,
                    distance: DISTANCE.to_string(),
                    points_count: points,
                },
                data: DataSource::Synthetic {
                    seed,
                    len: data_bytes,
                },
            },
        );
    }

    /// Points `alias` at `collection` (which must exist).
    pub fn add_alias(&self, alias: &str, collection: &str) {
        let mut inner = self.shared.lock();
        assert!(
            inner.collections.contains_key(collection),
            "no collection {collection:?} to alias"
        );
        inner
            .aliases
            .insert(alias.to_string(), collection.to_string());
    }

    /// Collection names, sorted.
    pub fn collections(&self) -> Vec<String> {
        self.shared.lock().collections.keys().cloned().collect()
    }

    /// One collection (aliases resolve), if it exists.
    pub fn collection(&self, name: &str) -> Option<CollectionState> {
        self.shared
            .lock()
            .resolve(name)
            .map(|(name, c)| CollectionState {
                name,
                vector_size: c.meta.vector_size,
                points_count: c.meta.points_count,
                data_bytes: c.data.len(),
            })
    }

    /// `(alias, collection)` pairs, sorted by alias.
    pub fn aliases(&self) -> Vec<(String, String)> {
        self.shared
            .lock()
            .aliases
            .iter()
            .map(|(a, c)| (a.clone(), c.clone()))
            .collect()
    }

    /// sha256 over a collection's vector params, point count and data — independent of its
    /// name, so a collection recovered under another name has the same fingerprint. Reads all
    /// the data (streaming). Panics if the collection does not exist.
    pub fn fingerprint(&self, name: &str) -> String {
        let (_, collection) = self
            .shared
            .lock()
            .resolve(name)
            .unwrap_or_else(|| panic!("the Qdrant double has no collection {name:?}"));
        data::fingerprint(&collection.meta, &collection.data)
            .unwrap_or_else(|e| panic!("cannot read collection {name:?}: {e}"))
    }

    /// Every file left in the node's snapshot and temporary directories (snapshots, their
    /// `.checksum` files, uploads kept after recovery, partial spools), sorted.
    pub fn snapshot_files_on_node(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for dir in [&self.shared.dirs.snapshots, &self.shared.dirs.tmp] {
            collect_files(dir, &mut files);
        }
        files.sort();
        files
    }

    /// The node's snapshot directory (`snapshots/`, collection snapshots in subdirectories).
    pub fn snapshots_dir(&self) -> PathBuf {
        self.shared.dirs.snapshots.clone()
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.clone()
    }

    /// Requests that did not carry the configured API key (including those to the paths that
    /// do not need it). Empty when no key is configured.
    pub fn requests_without_api_key(&self) -> Vec<RequestRecord> {
        self.requests()
            .into_iter()
            .filter(|r| matches!(r.api_key, ApiKeyUse::Missing | ApiKeyUse::Wrong))
            .collect()
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().requests.clear();
    }

    /// Snapshot creation (collection and full) reports a wrong `checksum` — in its response and
    /// in the `.checksum` file, so listings agree — while the file itself is intact.
    pub fn report_wrong_checksum(&self, times: Times) {
        self.shared.lock().faults.wrong_checksum = Some(times);
    }

    /// Snapshot downloads (collection, full, shard stream) send `bytes` body bytes and then drop
    /// the connection. A cut beyond the end of a download has no effect on it.
    pub fn cut_downloads_after(&self, bytes: u64, times: Times) {
        let mut inner = self.shared.lock();
        inner.faults.cut_download_at = bytes;
        inner.faults.cut_download = Some(times);
    }

    /// Sleeps `delay` before every [`DOWNLOAD_CHUNK`] of every download (read live, so it can
    /// be changed mid-download). `Duration::ZERO` turns it off.
    pub fn set_download_chunk_delay(&self, delay: Duration) {
        self.shared.lock().faults.chunk_delay = delay;
    }

    /// Every `GET /collections` answer carries `bytes` of padding in an extra string field:
    /// still valid JSON, but larger than any real answer (a broken proxy or a hostile server).
    pub fn pad_collection_lists(&self, bytes: u64) {
        self.shared.lock().faults.list_padding = bytes;
    }

    /// Sleeps `delay` before creating a snapshot (collection or full). `Duration::ZERO` turns
    /// it off.
    pub fn set_snapshot_create_delay(&self, delay: Duration) {
        self.shared.lock().faults.create_delay = delay;
    }

    /// Sleeps `delay` after a collection snapshot upload is received, before recovering from
    /// it (the answer comes after, as with `wait=true`). `Duration::ZERO` turns it off.
    pub fn set_recovery_delay(&self, delay: Duration) {
        self.shared.lock().faults.recover_delay = delay;
    }

    /// Snapshot creation (collection or full) fails with 500 "Service internal error: failed to
    /// create snapshot: ..." and writes nothing.
    pub fn fail_snapshot_creation(&self, times: Times) {
        self.shared.lock().faults.fail_create = Some(times);
    }

    /// Turns every fault off.
    pub fn clear_faults(&self) {
        self.shared.lock().faults = state::Faults::default();
    }
}

impl Drop for QdrantDouble {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Fingerprint (as [`QdrantDouble::fingerprint`]) of a collection snapshot archive the double
/// produced, read in one pass — e.g. straight from a backup store.
pub fn snapshot_fingerprint(archive: impl Read) -> io::Result<String> {
    data::unpack(archive, ArchiveKind::Collection, None).map(|u| u.fingerprint)
}

/// Fingerprint of a shard snapshot archive (what `stream_shard_snapshot` sends).
pub fn shard_snapshot_fingerprint(archive: impl Read) -> io::Result<String> {
    data::unpack(archive, ArchiveKind::Shard, None).map(|u| u.fingerprint)
}

/// Collection name → fingerprint for every collection in a full storage snapshot.
pub fn full_snapshot_fingerprints(archive: impl Read) -> io::Result<BTreeMap<String, String>> {
    data::full_snapshot_fingerprints(archive)
}

/// `MAJOR.MINOR.PATCH` (a pre-release suffix on the patch is ignored).
pub(crate) fn parse_version(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.trim_start_matches('v').splitn(3, '.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch: String = parts
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor, patch.parse().ok()?))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
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
