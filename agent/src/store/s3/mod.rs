//! Amazon S3 and S3-compatible servers, through aws-sdk-s3.
//!
//! Endpoint, region and credentials come from the SDK's standard chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, keys, web identity / IRSA, profiles). When an endpoint is set, path-style
//! addressing is used, which every S3-compatible server accepts. Every part and every whole object
//! carries its SHA-256 checksum, so the server refuses bytes damaged in transit.

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::{Client, primitives::ByteStream as AwsByteStream, types::ChecksumAlgorithm};
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};

mod download;
mod error;
mod progress;
mod upload;

use self::{
    download::Download,
    error::{map_err, map_head_err},
    progress::Watch,
    upload::S3Upload,
};
use super::{
    ByteStream, ObjectMeta, PartReceipt, PartRule, PartUpload, PendingUpload, Result, RetryPolicy,
    Store, StoreError, StoreHealth, TimedObject, Upload, check_key, check_receipts, refused,
};

/// An S3 bucket, optionally under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    object_lock: Option<ObjectLock>,
    retry: RetryPolicy,
    health: StoreHealth,
}

/// S3 Object Lock retention set on every object this store writes (`--object-lock-days`): until
/// it expires, no one holding the agent's credentials can destroy a backup. On a versioned,
/// lock-enabled bucket a delete then only adds a delete marker, and the locked version stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectLock {
    /// Days from each write until its retention ends.
    pub days: u32,
    /// Compliance: nobody can shorten it; governance: those allowed
    /// `s3:BypassGovernanceRetention` can.
    pub compliance: bool,
}

impl ObjectLock {
    fn mode(&self) -> aws_sdk_s3::types::ObjectLockMode {
        if self.compliance {
            aws_sdk_s3::types::ObjectLockMode::Compliance
        } else {
            aws_sdk_s3::types::ObjectLockMode::Governance
        }
    }

    fn until(&self) -> aws_smithy_types::DateTime {
        let until = std::time::SystemTime::now()
            + std::time::Duration::from_secs(u64::from(self.days) * 86_400);
        aws_smithy_types::DateTime::from(until)
    }
}

/// Longest wait for a TCP (and TLS) connection to the endpoint; the attempt deadline covers
/// everything after it.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Listing pages read for one listing at most: a store that keeps answering "truncated" never
/// holds the agent in a loop (at 1000 keys a page, this is 100 million keys).
const MAX_LIST_PAGES: usize = 100_000;

fn sha256_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data))
}

impl S3Store {
    /// Builds a client from the standard AWS configuration chain.
    pub async fn connect(bucket: &str, prefix: &str) -> Self {
        let shared = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared);
        if shared.endpoint_url().is_some() {
            builder = builder.force_path_style(true);
        }
        // Multipart objects carry part-level checksums the SDK cannot validate on download; the
        // pipeline checks the whole object's sha256 against the manifest instead.
        builder = builder.response_checksum_validation(
            aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
        );
        if shared.region().is_none() {
            builder = builder.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        // Retries, deadlines and stall detection are ours (`retry.rs`, `progress.rs`): the SDK's
        // retries would multiply the attempts a user configured, it has no deadline on an
        // attempt by default, and its stalled-stream protection waits a fixed 20 s and misses
        // an answer that never starts.
        builder =
            builder
                .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled())
                .stalled_stream_protection(
                    aws_sdk_s3::config::StalledStreamProtectionConfig::disabled(),
                )
                .timeout_config(
                    aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                        .connect_timeout(CONNECT_TIMEOUT)
                        .build(),
                );
        Self::from_client(Client::from_conf(builder.build()), bucket, prefix)
    }

    /// A store over an already configured client (e.g. explicit credentials in tests).
    pub fn from_client(client: Client, bucket: &str, prefix: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            object_lock: None,
            retry: RetryPolicy::default(),
            health: StoreHealth::default(),
        }
    }

    /// Retries and deadlines of every request, and where what they meet is recorded.
    pub fn with_retry(mut self, retry: RetryPolicy, health: StoreHealth) -> Self {
        self.retry = retry;
        self.health = health;
        self
    }

    /// Sets Object Lock retention on every object written from now on.
    pub fn with_object_lock(mut self, lock: Option<ObjectLock>) -> Self {
        self.object_lock = lock;
        self
    }

    fn full_key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{}", self.prefix, key)
        })
    }

    fn relative<'a>(&self, full: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(&self.prefix)
                .and_then(|k| k.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    fn full_prefix(&self, prefix: &str) -> String {
        if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}/{}", self.prefix, prefix)
        }
    }
}

#[async_trait]
impl Store for S3Store {
    fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn health(&self) -> Option<StoreHealth> {
        Some(self.health.clone())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key)?;
        let checksum = sha256_b64(&data);
        let (data, full, checksum) = (&data, &full, &checksum);
        self.retry
            .run(&self.health, "PutObject", key, |progress| async move {
                self.client
                    .put_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .checksum_sha256(checksum)
                    .content_length(data.len() as i64)
                    .set_object_lock_mode(self.object_lock.map(|l| l.mode()))
                    .set_object_lock_retain_until_date(self.object_lock.map(|l| l.until()))
                    .body(AwsByteStream::from(data.clone()))
                    .customize()
                    .interceptor(Watch(progress))
                    .send()
                    .await
                    .map_err(|e| map_err(key, &self.bucket, e))
            })
            .await?;
        Ok(())
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>> {
        let full = self.full_key(key)?;
        let full_ref = &full;
        // An attempt whose answer was lost may still have created an upload on the server; the
        // upload remembers that, and aborts such orphans of its key when it ends.
        let tries = std::sync::atomic::AtomicU32::new(0);
        let tries_ref = &tries;
        let out = self
            .retry
            .run(
                &self.health,
                "CreateMultipartUpload",
                key,
                |progress| async move {
                    tries_ref.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.client
                        .create_multipart_upload()
                        .bucket(&self.bucket)
                        .key(full_ref)
                        .checksum_algorithm(ChecksumAlgorithm::Sha256)
                        .set_object_lock_mode(self.object_lock.map(|l| l.mode()))
                        .set_object_lock_retain_until_date(self.object_lock.map(|l| l.until()))
                        .customize()
                        .interceptor(Watch(progress))
                        .send()
                        .await
                        .map_err(|e| map_err(key, &self.bucket, e))
                },
            )
            .await?;
        let upload_id = match out.upload_id() {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => {
                return Err(StoreError::Request {
                    key: key.to_string(),
                    message: "the store started a multipart upload without giving its id".into(),
                    retryable: false,
                    remedy: None,
                    source: None,
                });
            }
        };
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: key.to_string(),
            full_key: full,
            upload_id,
            started: 0,
            parts: PartRule::default(),
            orphans_possible: tries.load(std::sync::atomic::Ordering::Relaxed) > 1,
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let full = self.full_key(key)?;
        let out = self.get_from(key, &full, None).await?;
        let download = Download {
            etag: out.e_tag().map(str::to_string),
            length: out.content_length().and_then(|l| u64::try_from(l).ok()),
            body: Some(out.body),
            store: self.clone(),
            key: key.to_string(),
            full,
            offset: 0,
            stalls: 0,
        };
        let stream = futures::stream::unfold(download, |mut d| async move {
            d.next_chunk().await.map(|item| (item, d))
        });
        Ok(Box::pin(stream))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let full = self.full_key(key)?;
        let full = &full;
        self.retry
            .run(&self.health, "HeadObject", key, |progress| async move {
                match self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .customize()
                    .interceptor(Watch(progress))
                    .send()
                    .await
                {
                    Ok(out) => Ok(Some(ObjectMeta {
                        key: key.to_string(),
                        size: out.content_length().unwrap_or(0).max(0) as u64,
                    })),
                    Err(e) => map_head_err(key, &self.bucket, e),
                }
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .list_timed(prefix)
            .await?
            .into_iter()
            .map(|o| o.meta)
            .collect())
    }

    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        let full_prefix = self.full_prefix(prefix);
        let full_prefix = &full_prefix;
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_LIST_PAGES {
            let page_token = &token;
            let page = self
                .retry
                .run(
                    &self.health,
                    "ListObjectsV2",
                    prefix,
                    |progress| async move {
                        self.client
                            .list_objects_v2()
                            .bucket(&self.bucket)
                            .prefix(full_prefix)
                            .set_continuation_token(page_token.clone())
                            .customize()
                            .interceptor(Watch(progress))
                            .send()
                            .await
                            .map_err(|e| map_err(prefix, &self.bucket, e))
                    },
                )
                .await?;
            for obj in page.contents() {
                if let Some(k) = obj.key() {
                    out.push(TimedObject {
                        meta: ObjectMeta {
                            key: self.relative(k).to_string(),
                            size: obj.size().unwrap_or(0).max(0) as u64,
                        },
                        modified: obj
                            .last_modified()
                            .and_then(|t| SystemTime::try_from(*t).ok()),
                    });
                }
            }
            let next = page.next_continuation_token().map(str::to_string);
            if page.is_truncated() != Some(true) || next.is_none() {
                out.sort_by(|a, b| a.meta.key.cmp(&b.meta.key));
                return Ok(out);
            }
            if next == token {
                return Err(listing_loops(prefix));
            }
            token = next;
        }
        Err(listing_loops(prefix))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        let full = &full;
        self.retry
            .run(&self.health, "DeleteObject", key, |progress| async move {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .customize()
                    .interceptor(Watch(progress))
                    .send()
                    .await
                    .map_err(|e| map_err(key, &self.bucket, e))
            })
            .await?;
        Ok(())
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let full_prefix = self.full_prefix(prefix);
        let full_prefix = &full_prefix;
        let mut out = Vec::new();
        let mut markers: (Option<String>, Option<String>) = (None, None);
        for _ in 0..MAX_LIST_PAGES {
            let page_markers = &markers;
            let page = self
                .retry
                .run(
                    &self.health,
                    "ListMultipartUploads",
                    prefix,
                    |progress| async move {
                        self.client
                            .list_multipart_uploads()
                            .bucket(&self.bucket)
                            .prefix(full_prefix)
                            .set_key_marker(page_markers.0.clone())
                            .set_upload_id_marker(page_markers.1.clone())
                            .customize()
                            .interceptor(Watch(progress))
                            .send()
                            .await
                            .map_err(|e| map_err(prefix, &self.bucket, e))
                    },
                )
                .await?;
            for u in page.uploads() {
                out.push(PendingUpload {
                    key: self.relative(u.key().unwrap_or_default()).to_string(),
                    upload_id: u.upload_id().unwrap_or_default().to_string(),
                    initiated: u.initiated().and_then(|t| SystemTime::try_from(*t).ok()),
                });
            }
            let next = (
                page.next_key_marker().map(str::to_string),
                page.next_upload_id_marker().map(str::to_string),
            );
            if page.is_truncated() != Some(true) || next == (None, None) {
                return Ok(out);
            }
            if next == markers {
                return Err(listing_loops(prefix));
            }
            markers = next;
        }
        Err(listing_loops(prefix))
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        let full = self.full_key(&upload.key)?;
        let full = &full;
        let result = self
            .retry
            .run(
                &self.health,
                "AbortMultipartUpload",
                &upload.key,
                |progress| async move {
                    self.client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(full)
                        .upload_id(&upload.upload_id)
                        .customize()
                        .interceptor(Watch(progress))
                        .send()
                        .await
                        .map_err(|e| map_err(&upload.key, &self.bucket, e))
                },
            )
            .await;
        match result {
            // Already gone: aborted by an earlier attempt whose answer was lost, or by the sweep.
            Ok(_) | Err(StoreError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// A listing whose pages never end: the same continuation comes back, or there are more pages
/// than any real bucket has.
fn listing_loops(prefix: &str) -> StoreError {
    StoreError::Request {
        key: prefix.to_string(),
        message: "the store's listing does not end (it repeats its continuation, or has more than 100 000 pages); the endpoint is not behaving like S3".into(),
        retryable: false,
        remedy: None,
        source: None,
    }
}

impl S3Store {
    /// One GetObject through the retry policy; from `resume` = (offset, etag) on, when given:
    /// a ranged GET that only succeeds if the object is still the one that was being read.
    async fn get_from(
        &self,
        key: &str,
        full: &str,
        resume: Option<(u64, &str)>,
    ) -> Result<aws_sdk_s3::operation::get_object::GetObjectOutput> {
        let out = self
            .retry
            .run(&self.health, "GetObject", key, |progress| async move {
                let mut req = self.client.get_object().bucket(&self.bucket).key(full);
                if let Some((offset, etag)) = resume {
                    req = req.range(format!("bytes={offset}-")).if_match(etag);
                }
                req.customize()
                    .interceptor(Watch(progress))
                    .send()
                    .await
                    .map_err(|e| map_err(key, &self.bucket, e))
            })
            .await?;
        if let Some((offset, _)) = resume {
            // A server that ignored the range would hand the object from its start again, and
            // the bytes already passed on would be repeated.
            let expected = format!("bytes {offset}-");
            if !out
                .content_range()
                .is_some_and(|r| r.starts_with(&expected))
            {
                return Err(StoreError::Request {
                    key: key.to_string(),
                    message: format!(
                        "the store answered a ranged GET from byte {offset} with {:?} instead of that range; the download cannot be resumed",
                        out.content_range().unwrap_or("the whole object")
                    ),
                    retryable: false,
                    remedy: None,
                    source: None,
                });
            }
        }
        Ok(out)
    }
}
