//! Qdrant's snapshot endpoints: create, download or stream, delete, and upload to recover.

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use reqwest::{Method, header};
use serde_json::Value;
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use super::{Envelope, Qdrant, QdrantError, SnapshotDescription, check_name};

impl Qdrant {
    /// Creates a snapshot of `collection` on the node and waits for it.
    pub async fn create_snapshot(
        &self,
        collection: &str,
    ) -> Result<SnapshotDescription, QdrantError> {
        self.post_snapshot(&["collections", collection, "snapshots"], || {
            format!("collection {collection}")
        })
        .await
    }

    /// Creates a snapshot of the whole storage (single-node deployments).
    pub async fn create_full_snapshot(&self) -> Result<SnapshotDescription, QdrantError> {
        self.post_snapshot(&["snapshots"], || "storage snapshots".into())
            .await
    }

    /// `POST …/snapshots?wait=true`, with no call timeout: a large snapshot takes as long as it
    /// takes to write on the node.
    async fn post_snapshot(
        &self,
        segments: &[&str],
        what: impl FnOnce() -> String,
    ) -> Result<SnapshotDescription, QdrantError> {
        let url = self.endpoint(segments)?;
        let resp = self
            .send(
                self.request(Method::POST, url.clone())
                    .query(&[("wait", "true")]),
                what,
            )
            .await?;
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        let desc = serde_json::from_str::<Envelope<SnapshotDescription>>(&text)
            .map(|e| e.result)
            .map_err(|e| QdrantError::Protocol {
                endpoint: url.path().to_string(),
                detail: e.to_string(),
            })?;
        // The name goes back into the download and delete URLs.
        check_name(&desc.name).map_err(|reason| QdrantError::Protocol {
            endpoint: url.path().to_string(),
            detail: format!("it named the new snapshot {:?}: {reason}", desc.name),
        })?;
        Ok(desc)
    }

    /// `GET` of a snapshot (file or stream) as an `AsyncRead`.
    async fn get_stream(
        &self,
        segments: &[&str],
        what: String,
    ) -> Result<impl AsyncRead + Send + Unpin + use<>, QdrantError> {
        let resp = self
            .send(self.request(Method::GET, self.endpoint(segments)?), || what)
            .await?;
        Ok(Self::body_reader(resp))
    }

    fn body_reader(resp: reqwest::Response) -> impl AsyncRead + Send + Unpin + use<> {
        let stream = resp.bytes_stream().map_err(std::io::Error::other);
        StreamReader::new(Box::pin(stream))
    }

    /// Streams a collection snapshot file.
    pub async fn download_snapshot(
        &self,
        collection: &str,
        name: &str,
    ) -> Result<impl AsyncRead + Send + Unpin + use<>, QdrantError> {
        self.get_stream(
            &["collections", collection, "snapshots", name],
            format!("snapshot {name} of collection {collection}"),
        )
        .await
    }

    /// Streams a storage snapshot file.
    pub async fn download_full_snapshot(
        &self,
        name: &str,
    ) -> Result<impl AsyncRead + Send + Unpin + use<>, QdrantError> {
        self.get_stream(&["snapshots", name], format!("storage snapshot {name}"))
            .await
    }

    /// Streams a snapshot of one shard, generated on the fly (no file on the node).
    pub async fn stream_shard(
        &self,
        collection: &str,
        shard: u32,
    ) -> Result<impl AsyncRead + Send + Unpin + use<>, QdrantError> {
        let shard_id = shard.to_string();
        self.get_stream(
            &["collections", collection, "shards", &shard_id, "snapshot"],
            format!("shard {shard} of collection {collection}"),
        )
        .await
    }

    /// Deletes a collection snapshot from the node.
    pub async fn delete_snapshot(&self, collection: &str, name: &str) -> Result<(), QdrantError> {
        let _: Value = self
            .call(
                Method::DELETE,
                &["collections", collection, "snapshots", name],
                &[("wait", "true")],
                None,
                || format!("snapshot {name} of collection {collection}"),
            )
            .await?;
        Ok(())
    }

    /// Deletes a storage snapshot from the node.
    pub async fn delete_full_snapshot(&self, name: &str) -> Result<(), QdrantError> {
        let _: Value = self
            .call(
                Method::DELETE,
                &["snapshots", name],
                &[("wait", "true")],
                None,
                || format!("storage snapshot {name}"),
            )
            .await?;
        Ok(())
    }

    /// Uploads a snapshot into `collection` (created or overwritten) as a streamed multipart body.
    /// Qdrant checks `sha256` over the uploaded file before recovering anything.
    ///
    /// `file_name` is what Qdrant names the file: it keeps an uploaded collection snapshot in the
    /// collection's snapshot directory after recovering from it (`MaybeTempPath::Persistent` in
    /// lib/storage/src/content_manager/snapshots/download.rs), so callers delete it afterwards.
    pub async fn upload_snapshot<S>(
        &self,
        collection: &str,
        shard: Option<u32>,
        file_name: &str,
        body: S,
        length: u64,
        sha256: &str,
    ) -> Result<(), QdrantError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let shard_id = shard.map(|s| s.to_string());
        let url = match &shard_id {
            Some(id) => self.endpoint(&[
                "collections",
                collection,
                "shards",
                id,
                "snapshots",
                "upload",
            ])?,
            None => self.endpoint(&["collections", collection, "snapshots", "upload"])?,
        };
        let part =
            reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(body), length)
                .file_name(file_name.to_string())
                .mime_str("application/octet-stream")
                .expect("valid mime type");
        let form = reqwest::multipart::Form::new().part("snapshot", part);
        let resp = self
            .send(
                self.request(Method::POST, url.clone())
                    .query(&[
                        ("wait", "true"),
                        ("priority", "snapshot"),
                        ("checksum", sha256),
                    ])
                    .header(header::ACCEPT, "application/json")
                    .multipart(form),
                || format!("collection {collection}"),
            )
            .await?;
        let text = resp.text().await.map_err(|e| self.unreachable(e))?;
        match serde_json::from_str::<Envelope<Value>>(&text) {
            // Collection recovery answers `true`; shard recovery answers `null` (its handler
            // returns `()`, see upload_shard_snapshot in src/actix/api/snapshot_api.rs).
            Ok(e) if e.result == Value::Bool(true) || e.result.is_null() => Ok(()),
            Ok(e) => Err(QdrantError::Protocol {
                endpoint: url.path().to_string(),
                detail: format!("recovery answered {}", e.result),
            }),
            Err(e) => Err(QdrantError::Protocol {
                endpoint: url.path().to_string(),
                detail: e.to_string(),
            }),
        }
    }
}
