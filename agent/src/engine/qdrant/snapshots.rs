//! Qdrant's snapshot endpoints: create, download or stream, delete, and upload to recover.

use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use reqwest::{Method, header};
use serde_json::Value;
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use super::{Envelope, Qdrant, QdrantError, SnapshotDescription, check_name};
use crate::digest::Sha256Digest;

/// Which copy wins when an uploaded snapshot lands on a shard that has other active replicas
/// (`SnapshotPriority`; see `recover_shard_snapshot_impl` in Qdrant's src/common/snapshots.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// The snapshot: other active replicas are marked dead and re-synced from it.
    Snapshot,
    /// No synchronisation: used when every replica is recovered from the same snapshot.
    NoSync,
}

/// Where an uploaded snapshot is recovered.
#[derive(Debug, Clone, Copy)]
pub struct UploadTo<'a> {
    /// The collection (created by a collection snapshot's recovery when missing).
    pub collection: &'a str,
    /// The shard, for a shard snapshot (the collection must exist and hold it on this node).
    pub shard: Option<u32>,
    /// Which copy wins over other active replicas.
    pub priority: Priority,
}

impl Priority {
    fn as_str(self) -> &'static str {
        match self {
            Priority::Snapshot => "snapshot",
            Priority::NoSync => "no_sync",
        }
    }
}

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

    /// `POST …/snapshots?wait=true`: a large snapshot takes as long as it takes to write on the
    /// node, up to [`Timeouts::snapshot`](super::Timeouts).
    async fn post_snapshot(
        &self,
        segments: &[&str],
        what: impl FnOnce() -> String,
    ) -> Result<SnapshotDescription, QdrantError> {
        let what = what();
        let url = self.endpoint(segments)?;
        let answer = async {
            let resp = self
                .send(
                    self.request(Method::POST, url.clone())
                        .query(&[("wait", "true")]),
                    || what.clone(),
                )
                .await?;
            self.answer(resp, url.path()).await
        };
        let text = self
            .within_snapshot_limit(answer, || format!("snapshot of {what}"), "not finished")
            .await
            .inspect_err(|e| {
                if matches!(e, QdrantError::TimedOut { .. }) {
                    tracing::warn!(endpoint = url.path(), "Qdrant may still finish the snapshot it was asked for; once the node answers, list its snapshots and delete the one this backup left");
                }
            })?;
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

    /// Runs a snapshot creation or recovery within [`Timeouts::snapshot`](super::Timeouts);
    /// past it the request is dropped (its connection closed).
    async fn within_snapshot_limit<T>(
        &self,
        work: impl Future<Output = Result<T, QdrantError>>,
        what: impl FnOnce() -> String,
        detail: &'static str,
    ) -> Result<T, QdrantError> {
        let limit = self.timeouts.snapshot;
        tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
            Err(QdrantError::TimedOut {
                what: what(),
                detail,
                after: limit,
                flag: "--qdrant-snapshot-timeout",
            })
        })
    }

    /// `GET` of a snapshot (file or stream) as an `AsyncRead` that fails once Qdrant sends
    /// nothing for [`Timeouts::stall`](super::Timeouts).
    async fn get_stream(
        &self,
        segments: &[&str],
        what: String,
    ) -> Result<impl AsyncRead + Send + Unpin + use<>, QdrantError> {
        let stall = self.timeouts.stall;
        let request = self.send(self.request(Method::GET, self.endpoint(segments)?), || {
            what.clone()
        });
        let resp = match tokio::time::timeout(stall, request).await {
            Ok(resp) => resp?,
            Err(_) => {
                return Err(QdrantError::TimedOut {
                    what,
                    detail: "no answer",
                    after: stall,
                    flag: "--qdrant-stall-timeout",
                });
            }
        };
        Ok(body_reader(resp, what, stall))
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
        to: UploadTo<'_>,
        file_name: &str,
        body: S,
        length: u64,
        sha256: &Sha256Digest,
    ) -> Result<(), QdrantError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    {
        let UploadTo {
            collection,
            shard,
            priority,
        } = to;
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
        let upload = async {
            let resp = self
                .send(
                    self.request(Method::POST, url.clone())
                        .query(&[
                            ("wait", "true"),
                            ("priority", priority.as_str()),
                            ("checksum", &sha256.to_string()),
                        ])
                        .header(header::ACCEPT, "application/json")
                        .multipart(form),
                    || format!("collection {collection}"),
                )
                .await?;
            self.answer(resp, url.path()).await
        };
        let text = self
            .within_snapshot_limit(
                upload,
                || format!("upload of a snapshot into collection {collection}"),
                "not recovered",
            )
            .await?;
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

/// A response body as an `AsyncRead`; a wait of `stall` for the next chunk ends it with a
/// `TimedOut` error that names the download and the flag.
fn body_reader(
    resp: reqwest::Response,
    what: String,
    stall: Duration,
) -> impl AsyncRead + Send + Unpin + use<> {
    let chunks = futures::stream::try_unfold(Some(resp), move |resp| {
        let what = what.clone();
        async move {
            let Some(mut resp) = resp else {
                return Ok(None);
            };
            match tokio::time::timeout(stall, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => Ok(Some((chunk, Some(resp)))),
                Ok(Ok(None)) => Ok(None),
                Ok(Err(e)) => Err(std::io::Error::other(e)),
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "Qdrant sent nothing more of the {what} for {}; the node is frozen or overloaded; check it, or allow more with --qdrant-stall-timeout",
                        humantime::format_duration(stall)
                    ),
                )),
            }
        }
    });
    StreamReader::new(Box::pin(chunks))
}
