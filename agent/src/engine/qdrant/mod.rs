//! Qdrant through its REST API (followed: Qdrant 1.18, `docs/redoc/master/openapi.json`).
//!
//! Snapshots are streamed, never staged by the agent: a collection snapshot is created on the node
//! (`POST /collections/{c}/snapshots?wait=true`), downloaded as a stream and deleted from the node
//! at once; a shard snapshot (`GET /collections/{c}/shards/{id}/snapshot`, Qdrant ≥ 1.12) streams
//! without any file on the node. Restores upload the snapshot as a streamed multipart body with the
//! snapshot's sha256, which Qdrant checks before it recovers anything. The API key travels only in
//! the `api-key` header and is never logged.

use std::{path::Path, time::Duration};

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;
use url::Url;

use crate::digest::Sha256Digest;

mod cluster;
mod error;
mod snapshots;

#[cfg(test)]
pub(crate) use cluster::ReplicaState;
pub(crate) use cluster::{ClusterStatus, CollectionCluster, PeerId, Replica, ShardKey};
pub(crate) use error::{NameError, QdrantError, check_name};
pub(crate) use snapshots::{Priority, UploadTo};

/// How long a plain API call may take (snapshot creation, recovery and transfers have their own
/// limits, [`Timeouts`]).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest JSON answer read from Qdrant (collection lists, snapshot descriptions): far above any
/// real one, so a broken or hostile server cannot make the agent buffer without end.
const MAX_ANSWER_BYTES: usize = 16 << 20;
/// Error answers are only quoted in messages: at most this much of one is read.
const MAX_ERROR_BYTES: usize = 64 << 10;
/// First Qdrant version that streams shard snapshots without writing a file: the route is served
/// since 1.12.0 (`stream_shard_snapshot` in src/actix/api/snapshot_api.rs) and documented in the
/// OpenAPI document since 1.17.
pub(crate) const SHARD_STREAM_SINCE: (u32, u32) = (1, 12);

/// What Qdrant says about a snapshot (`SnapshotDescription`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDescription {
    /// File name on the node.
    pub name: String,
    /// Creation time as Qdrant formats it.
    #[serde(default)]
    pub creation_time: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of the file, when Qdrant computed it. Parsed as it arrives: a checksum that is not
    /// 64 hex digits makes the whole answer unusable (an error naming the endpoint).
    #[serde(default)]
    pub checksum: Option<Sha256Digest>,
}

/// One alias (`AliasDescription`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Alias {
    /// The alias.
    pub alias_name: String,
    /// The collection it names.
    pub collection_name: String,
}

#[derive(Deserialize)]
struct Envelope<T> {
    result: T,
}

#[derive(Deserialize)]
struct ErrorBody {
    status: ErrorStatus,
}

#[derive(Deserialize)]
struct ErrorStatus {
    error: String,
}

/// A Qdrant server.
#[derive(Clone)]
pub struct Qdrant {
    base: Url,
    client: reqwest::Client,
    api_key: Option<String>,
    timeouts: Timeouts,
    /// REST port of the other nodes of a cluster (pods behind a headless service all listen on
    /// the same one); their hosts come from Qdrant's peer URIs.
    peer_port: u16,
}

/// Limits on the long Qdrant operations, so that a node that stops answering fails the backup or
/// restore with an error instead of holding it forever.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Longest a snapshot download or shard stream may go without a byte (and longest to wait for
    /// its first answer).
    pub stall: Duration,
    /// Longest snapshot creation (`wait=true`) or an upload and its recovery may take in all.
    pub snapshot: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stall: Duration::from_secs(5 * 60),
            snapshot: Duration::from_secs(2 * 60 * 60),
        }
    }
}

impl std::fmt::Debug for Qdrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the API key.
        f.debug_struct("Qdrant")
            .field("url", &self.base.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Major and minor of a version string such as "1.18.3".
pub(crate) fn minor_of(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .ok()?;
    Some((major, minor))
}

impl Qdrant {
    /// A client for the server at `url`; `ca_cert` adds a PEM CA for TLS with a private CA.
    pub fn new(
        url: &str,
        api_key: Option<String>,
        ca_cert: Option<&Path>,
    ) -> Result<Self, QdrantError> {
        let mut base = Url::parse(url).map_err(|e| {
            QdrantError::InvalidUrl(format!("{url:?}: {e}; expected e.g. http://127.0.0.1:6333"))
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(QdrantError::InvalidUrl(format!(
                "{url:?}: use http:// or https://"
            )));
        }
        if base.password().is_some() || !base.username().is_empty() {
            return Err(QdrantError::InvalidUrl(
                "credentials in the URL; put the API key in SOMA_QDRANT_API_KEY".into(),
            ));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let mut builder = reqwest::Client::builder()
            // A redirect would carry the `api-key` header to wherever it points.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true);
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).map_err(|e| QdrantError::Tls {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| QdrantError::Tls {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder
            .build()
            .map_err(|e| QdrantError::InvalidUrl(e.to_string()))?;
        let peer_port = base.port_or_known_default().unwrap_or(6333);
        Ok(Self {
            base,
            client,
            api_key: api_key.filter(|k| !k.is_empty()),
            timeouts: Timeouts::default(),
            peer_port,
        })
    }

    /// The same client with other limits on snapshot operations.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// The limits on snapshot operations.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// The same client reaching the other nodes of a cluster on `port` (default: this URL's).
    pub fn with_peer_port(mut self, port: u16) -> Self {
        self.peer_port = port;
        self
    }

    /// The server URL, for manifests and logs (it holds no secret).
    pub fn url(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    /// The URL of `segments` below the base; every segment must pass [`check_name`], so no name
    /// can step out of the path it was put in.
    fn endpoint(&self, segments: &[&str]) -> Result<Url, QdrantError> {
        for segment in segments {
            check_name(segment).map_err(|reason| {
                QdrantError::InvalidUrl(format!(
                    "the name {segment:?} cannot be part of a Qdrant URL path: {reason}"
                ))
            })?;
        }
        let mut url = self.base.clone();
        url.path_segments_mut()
            .map_err(|()| QdrantError::InvalidUrl(format!("{} has no path", self.url())))?
            .pop_if_empty()
            .extend(segments);
        Ok(url)
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, url);
        if let Some(key) = &self.api_key {
            req = req.header("api-key", key);
        }
        req
    }

    /// A successful answer's body, refused past [`MAX_ANSWER_BYTES`].
    async fn answer(&self, resp: reqwest::Response, endpoint: &str) -> Result<String, QdrantError> {
        let (text, cut) = read_bounded(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| self.unreachable(e))?;
        if cut {
            return Err(QdrantError::Protocol {
                endpoint: endpoint.to_string(),
                detail: format!(
                    "the answer is larger than {} MiB, which no Qdrant answer is",
                    MAX_ANSWER_BYTES >> 20
                ),
            });
        }
        Ok(text)
    }

    fn unreachable(&self, e: reqwest::Error) -> QdrantError {
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        QdrantError::Unreachable {
            url: self.url(),
            detail,
        }
    }

    /// Sends a request and turns error answers into [`QdrantError`]s.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        what: impl FnOnce() -> String,
    ) -> Result<reqwest::Response, QdrantError> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let endpoint = resp.url().path().to_string();
        let text = read_bounded(resp, MAX_ERROR_BYTES)
            .await
            .map(|(text, _)| text)
            .unwrap_or_default();
        // Quoted in errors and logs: a bounded excerpt whatever the server sent.
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.status.error)
            .unwrap_or(text)
            .chars()
            .take(300)
            .collect();
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => QdrantError::Unauthorized {
                endpoint,
                status: status.as_u16(),
            },
            StatusCode::NOT_FOUND => QdrantError::NotFound {
                what: what(),
                message,
            },
            _ => QdrantError::Api {
                endpoint,
                status: status.as_u16(),
                message,
            },
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Option<&Value>,
        what: impl FnOnce() -> String,
    ) -> Result<T, QdrantError> {
        let url = self.endpoint(segments)?;
        let mut req = self
            .request(method, url.clone())
            .query(query)
            .timeout(CALL_TIMEOUT);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = self.send(req, what).await?;
        let text = self.answer(resp, url.path()).await?;
        serde_json::from_str::<Envelope<T>>(&text)
            .map(|e| e.result)
            .map_err(|e| QdrantError::Protocol {
                endpoint: url.path().to_string(),
                detail: e.to_string(),
            })
    }

    /// Server version (`GET /`).
    pub async fn version(&self) -> Result<String, QdrantError> {
        #[derive(Deserialize)]
        struct VersionInfo {
            version: String,
        }
        let url = self.endpoint(&[])?;
        let resp = self
            .send(
                self.request(Method::GET, url.clone()).timeout(CALL_TIMEOUT),
                || "server root".into(),
            )
            .await?;
        let text = self.answer(resp, "/").await?;
        let info: VersionInfo = serde_json::from_str(&text).map_err(|e| QdrantError::Protocol {
            endpoint: "/".into(),
            detail: e.to_string(),
        })?;
        Ok(info.version)
    }

    /// Names of all collections.
    pub async fn collections(&self) -> Result<Vec<String>, QdrantError> {
        #[derive(Deserialize)]
        struct Collections {
            collections: Vec<Named>,
        }
        #[derive(Deserialize)]
        struct Named {
            name: String,
        }
        let c: Collections = self
            .call(Method::GET, &["collections"], &[], None, || {
                "collections".into()
            })
            .await?;
        let mut names: Vec<String> = c.collections.into_iter().map(|n| n.name).collect();
        // Every name goes back into a URL path (a backup of all collections): a bogus one is
        // the server's error, refused here rather than sent back.
        if let Some((name, reason)) = names
            .iter()
            .find_map(|n| check_name(n).err().map(|e| (n, e)))
        {
            return Err(QdrantError::Protocol {
                endpoint: "/collections".into(),
                detail: format!("it lists a collection named {name:?}: {reason}"),
            });
        }
        names.sort();
        Ok(names)
    }

    /// `CollectionInfo` of one collection, kept as JSON for the manifest.
    pub async fn collection_info(&self, collection: &str) -> Result<Value, QdrantError> {
        self.call(Method::GET, &["collections", collection], &[], None, || {
            format!("collection {collection}")
        })
        .await
    }

    /// Every alias on the server.
    pub async fn aliases(&self) -> Result<Vec<Alias>, QdrantError> {
        #[derive(Deserialize)]
        struct Aliases {
            aliases: Vec<Alias>,
        }
        let a: Aliases = self
            .call(Method::GET, &["aliases"], &[], None, || "aliases".into())
            .await?;
        Ok(a.aliases)
    }

    /// Points `alias` at `collection`, replacing an alias of that name if there is one (atomic).
    pub async fn set_alias(
        &self,
        alias: &str,
        collection: &str,
        replace: bool,
    ) -> Result<(), QdrantError> {
        let mut actions = Vec::new();
        if replace {
            actions.push(serde_json::json!({"delete_alias": {"alias_name": alias}}));
        }
        actions.push(serde_json::json!({
            "create_alias": {"collection_name": collection, "alias_name": alias}
        }));
        let _: Value = self
            .call(
                Method::POST,
                &["collections", "aliases"],
                &[],
                Some(&serde_json::json!({ "actions": actions })),
                || format!("alias {alias}"),
            )
            .await?;
        Ok(())
    }

    /// Creates a collection with the `config.params` recorded at backup time (used before
    /// uploading shard snapshots, which need the collection to exist).
    pub async fn create_collection(
        &self,
        collection: &str,
        params: &Value,
    ) -> Result<(), QdrantError> {
        let _: Value = self
            .call(
                Method::PUT,
                &["collections", collection],
                &[],
                Some(params),
                || format!("collection {collection}"),
            )
            .await?;
        Ok(())
    }
}

impl Qdrant {
    /// One point of `collection` with its vector (`POST /collections/{c}/points/scroll`, limit 1),
    /// recorded at backup time for a restore drill's sample search; `None` when it is empty.
    pub async fn sample_point(&self, collection: &str) -> Result<Option<Value>, QdrantError> {
        #[derive(Deserialize)]
        struct Scroll {
            points: Vec<Value>,
        }
        let body = serde_json::json!({"limit": 1, "with_vector": true, "with_payload": false});
        let page: Scroll = self
            .call(
                Method::POST,
                &["collections", collection, "points", "scroll"],
                &[],
                Some(&body),
                || format!("collection {collection}"),
            )
            .await?;
        Ok(page.points.into_iter().next())
    }

    /// The ids of the `limit` nearest points to `vector` by exact (not approximate) search
    /// (`POST /collections/{c}/points/query` with `params.exact`), nearest first; `using` names
    /// the vector of a collection with named vectors.
    pub async fn exact_search(
        &self,
        collection: &str,
        vector: &Value,
        using: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Value>, QdrantError> {
        #[derive(Deserialize)]
        struct Found {
            points: Vec<Scored>,
        }
        #[derive(Deserialize)]
        struct Scored {
            id: Value,
        }
        let mut body = serde_json::json!({
            "query": vector,
            "limit": limit,
            "params": {"exact": true},
            "with_payload": false,
            "with_vector": false,
        });
        if let Some(name) = using {
            body["using"] = Value::String(name.to_string());
        }
        let found: Found = self
            .call(
                Method::POST,
                &["collections", collection, "points", "query"],
                &[],
                Some(&body),
                || format!("collection {collection}"),
            )
            .await?;
        Ok(found.points.into_iter().map(|p| p.id).collect())
    }

    /// Deletes a collection (`DELETE /collections/{c}`); deleting one that is gone succeeds.
    pub async fn delete_collection(&self, collection: &str) -> Result<(), QdrantError> {
        let _: Value = self
            .call(
                Method::DELETE,
                &["collections", collection],
                &[],
                None,
                || format!("collection {collection}"),
            )
            .await?;
        Ok(())
    }
}

/// Reads at most `limit` bytes of a body (as text, invalid UTF-8 replaced); says whether there
/// was more, which is left unread.
async fn read_bounded(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<(String, bool), reqwest::Error> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if buf.len() + chunk.len() > limit {
            buf.extend_from_slice(&chunk[..limit - buf.len()]);
            return Ok((text_of(buf), true));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((text_of(buf), false))
}

/// The body as text without a second copy unless it is not UTF-8 (then replaced, for messages).
fn text_of(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qdrant's checksum is parsed where its answer is read: any case of the same digest is the
    /// same value, and one that is not a digest makes the description unusable, saying why.
    #[test]
    fn a_snapshot_checksum_is_read_as_a_digest() {
        let digest = Sha256Digest::of(b"snapshot");
        let desc = |checksum: &str| {
            serde_json::from_str::<SnapshotDescription>(&format!(
                r#"{{"name": "c-1.snapshot", "size": 8, "checksum": {checksum}}}"#
            ))
        };
        for text in [digest.to_string(), digest.to_string().to_ascii_uppercase()] {
            let read = desc(&format!("\"{text}\"")).unwrap();
            assert_eq!(read.checksum, Some(digest));
        }
        assert_eq!(desc("null").unwrap().checksum, None);
        for bad in ["\"\"", "\"abc\"", &format!("\"{digest} \""), "42"] {
            let err = desc(bad).expect_err(bad).to_string();
            assert!(err.contains("sha256 digest"), "{bad}: {err}");
        }
    }

    #[test]
    fn versions_and_urls() {
        assert_eq!(minor_of("1.18.3"), Some((1, 18)));
        assert_eq!(minor_of("v1.17.0-rc1"), Some((1, 17)));
        assert_eq!(minor_of("dev"), None);
        let q = Qdrant::new("http://127.0.0.1:6333", Some("k".into()), None).unwrap();
        assert_eq!(
            q.endpoint(&["collections", "a b", "snapshots"])
                .unwrap()
                .as_str(),
            "http://127.0.0.1:6333/collections/a%20b/snapshots"
        );
        assert_eq!(
            q.endpoint(&["collections", "...", "snapshots", "x.snapshot"])
                .unwrap()
                .as_str(),
            "http://127.0.0.1:6333/collections/.../snapshots/x.snapshot"
        );
        let q = Qdrant::new("https://q.example/prefix", None, None).unwrap();
        assert_eq!(
            q.endpoint(&["aliases"]).unwrap().as_str(),
            "https://q.example/prefix/aliases"
        );
        assert!(Qdrant::new("http://user:pw@host:6333", None, None).is_err());
        assert!(Qdrant::new("ftp://host", None, None).is_err());
    }

    #[test]
    fn names_that_would_leave_their_path_are_refused() {
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name("."), Err(NameError::Dots));
        assert_eq!(check_name(".."), Err(NameError::Dots));
        assert_eq!(check_name("a/b"), Err(NameError::Separator('/')));
        assert_eq!(check_name("..\\x"), Err(NameError::Separator('\\')));
        assert_eq!(check_name("a\tb"), Err(NameError::Control('\t')));
        assert_eq!(check_name("a\nb"), Err(NameError::Control('\n')));
        assert_eq!(check_name("\u{1b}[2J"), Err(NameError::Control('\u{1b}')));
        assert_eq!(check_name("a\u{9b}b"), Err(NameError::Control('\u{9b}')));
        for ok in [
            "docs",
            "...",
            ".hidden",
            "a..b",
            "ünï cödé",
            "x.snapshot",
            "%2e%2e",
        ] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        let q = Qdrant::new("http://127.0.0.1:6333", None, None).unwrap();
        for bad in ["..", ".", "", "a/b", "a\tb"] {
            let err = q.endpoint(&["collections", bad]).unwrap_err();
            assert!(
                matches!(&err, QdrantError::InvalidUrl(m) if m.contains("URL path")),
                "{bad:?}: {err}"
            );
        }
        let err = q
            .endpoint(&["collections", "docs", "snapshots", ".."])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"..\"") && err.contains("path steps"),
            "{err}"
        );
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let q = Qdrant::new("http://127.0.0.1:6333", Some("s3cr3t-key".into()), None).unwrap();
        let shown = format!("{q:?}");
        assert!(!shown.contains("s3cr3t-key"), "{shown}");
        assert!(shown.contains("<set>"));
    }
}
