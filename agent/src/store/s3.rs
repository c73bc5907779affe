//! Amazon S3 and S3-compatible servers, through aws-sdk-s3.
//!
//! Endpoint, region and credentials come from the SDK's standard chain (`AWS_ENDPOINT_URL`,
//! `AWS_REGION`, keys, web identity / IRSA, profiles). When an endpoint is set, path-style
//! addressing is used, which every S3-compatible server accepts. Every part and every whole object
//! carries its SHA-256 checksum, so the server refuses bytes damaged in transit.

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::{
    Client,
    error::{ProvideErrorMetadata, SdkError},
    primitives::ByteStream as AwsByteStream,
    types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart},
};
use base64::Engine as _;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::{
    ByteStream, ObjectMeta, PartReceipt, PartRule, PartUpload, PendingUpload, Result, Store,
    StoreError, TimedObject, Upload, check_key, check_receipts, refused,
};

/// An S3 bucket, optionally under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    object_lock: Option<ObjectLock>,
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

/// Converts any SDK error into a [`StoreError`] that names the key and says what to do.
fn map_err<E, R>(key: &str, bucket: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let key = key.to_string();
    match &err {
        SdkError::DispatchFailure(_) => StoreError::Request {
            key,
            message: format!(
                "could not reach the S3 endpoint ({}); check AWS_ENDPOINT_URL and the network",
                describe_chain(&err)
            ),
            retryable: true,
        },
        SdkError::TimeoutError(_) => StoreError::Request {
            key,
            message: "timed out talking to the S3 endpoint".into(),
            retryable: true,
        },
        SdkError::ServiceError(svc) => {
            let e = svc.err();
            let code = e.code().unwrap_or("").to_string();
            let message = e.message().unwrap_or("").to_string();
            let detail = if message.is_empty() {
                code.clone()
            } else {
                format!("{code}: {message}")
            };
            match code.as_str() {
                "NoSuchKey" | "NotFound" | "NoSuchUpload" => StoreError::NotFound { key },
                "NoSuchBucket" => StoreError::NoSuchBucket {
                    bucket: bucket.to_string(),
                },
                "AccessDenied"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch"
                | "InvalidToken"
                | "ExpiredToken"
                | "Forbidden" => StoreError::AccessDenied {
                    key,
                    message: detail,
                },
                "InvalidDigest" | "BadDigest" | "XAmzContentSHA256Mismatch" | "InvalidPart" => {
                    StoreError::ChecksumRejected {
                        key,
                        message: detail,
                    }
                }
                "SlowDown" | "InternalError" | "ServiceUnavailable" | "RequestTimeout" => {
                    StoreError::Request {
                        key,
                        message: detail,
                        retryable: true,
                    }
                }
                _ => StoreError::Request {
                    key,
                    message: if detail.is_empty() {
                        format!("{err}")
                    } else {
                        detail
                    },
                    retryable: false,
                },
            }
        }
        SdkError::ResponseError(_) | SdkError::ConstructionFailure(_) => StoreError::Request {
            key,
            message: describe_chain(&err),
            retryable: false,
        },
        _ => StoreError::Request {
            key,
            message: describe_chain(&err),
            retryable: false,
        },
    }
}

/// HEAD responses have no body, so S3 cannot say *why* a HEAD failed; map by status code.
fn map_head_err(
    key: &str,
    bucket: &str,
    err: SdkError<
        aws_sdk_s3::operation::head_object::HeadObjectError,
        aws_sdk_s3::config::http::HttpResponse,
    >,
) -> Result<Option<ObjectMeta>> {
    if let SdkError::ServiceError(svc) = &err {
        if svc.err().is_not_found() {
            return Ok(None);
        }
        match svc.raw().status().as_u16() {
            404 => return Ok(None),
            403 => {
                return Err(StoreError::AccessDenied {
                    key: key.to_string(),
                    message: "403 Forbidden".into(),
                });
            }
            _ => {}
        }
    }
    Err(map_err(key, bucket, err))
}

fn describe_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

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
        Self::from_client(Client::from_conf(builder.build()), bucket, prefix)
    }

    /// A store over an already configured client (e.g. explicit credentials in tests).
    pub fn from_client(client: Client, bucket: &str, prefix: &str) -> Self {
        Self {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            object_lock: None,
        }
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

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        let full = self.full_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .checksum_sha256(sha256_b64(&data))
            .content_length(data.len() as i64)
            .set_object_lock_mode(self.object_lock.map(|l| l.mode()))
            .set_object_lock_retain_until_date(self.object_lock.map(|l| l.until()))
            .body(AwsByteStream::from(data))
            .send()
            .await
            .map_err(|e| map_err(key, &self.bucket, e))?;
        Ok(())
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .set_object_lock_mode(self.object_lock.map(|l| l.mode()))
            .set_object_lock_retain_until_date(self.object_lock.map(|l| l.until()))
            .send()
            .await
            .map_err(|e| map_err(key, &self.bucket, e))?;
        let upload_id = out.upload_id().unwrap_or_default().to_string();
        Ok(Box::new(S3Upload {
            store: self.clone(),
            key: key.to_string(),
            full_key: full,
            upload_id,
            started: 0,
            parts: PartRule::default(),
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let full = self.full_key(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| map_err(key, &self.bucket, e))?;
        let key = key.to_string();
        let stream = futures::stream::unfold(Some(out.body), move |body| {
            let key = key.clone();
            async move {
                let mut body = body?;
                match body.next().await {
                    None => None,
                    Some(Ok(bytes)) => Some((Ok(bytes), Some(body))),
                    Some(Err(e)) => Some((
                        Err(StoreError::Request {
                            key,
                            message: format!("download interrupted: {}", describe_chain(&e)),
                            retryable: true,
                        }),
                        None,
                    )),
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
            })),
            Err(e) => map_head_err(key, &self.bucket, e),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let full_prefix = self.full_prefix(prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| map_err(prefix, &self.bucket, e))?;
            for obj in page.contents() {
                if let Some(k) = obj.key() {
                    out.push(ObjectMeta {
                        key: self.relative(k).to_string(),
                        size: obj.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        let full_prefix = self.full_prefix(prefix);
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| map_err(prefix, &self.bucket, e))?;
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
        }
        out.sort_by(|a, b| a.meta.key.cmp(&b.meta.key));
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| map_err(key, &self.bucket, e))?;
        Ok(())
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let full_prefix = self.full_prefix(prefix);
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .prefix(&full_prefix)
                .set_key_marker(key_marker.clone())
                .set_upload_id_marker(id_marker.clone())
                .send()
                .await
                .map_err(|e| map_err(prefix, &self.bucket, e))?;
            for u in page.uploads() {
                out.push(PendingUpload {
                    key: self.relative(u.key().unwrap_or_default()).to_string(),
                    upload_id: u.upload_id().unwrap_or_default().to_string(),
                    initiated: u.initiated().and_then(|t| SystemTime::try_from(*t).ok()),
                });
            }
            if page.is_truncated() != Some(true) {
                break;
            }
            key_marker = page.next_key_marker().map(str::to_string);
            id_marker = page.next_upload_id_marker().map(str::to_string);
            if key_marker.is_none() && id_marker.is_none() {
                break;
            }
        }
        Ok(out)
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        let full = self.full_key(&upload.key)?;
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload.upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match map_err(&upload.key, &self.bucket, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}

struct S3Upload {
    store: S3Store,
    key: String,
    full_key: String,
    upload_id: String,
    /// Parts numbered so far.
    started: u32,
    parts: PartRule,
}

impl S3Upload {
    async fn abort_now(&self) -> Result<()> {
        self.store
            .abort_upload(&PendingUpload {
                key: self.key.clone(),
                upload_id: self.upload_id.clone(),
                initiated: None,
            })
            .await
    }
}

#[async_trait]
impl Upload for S3Upload {
    fn put_part(&mut self, data: Bytes) -> PartUpload {
        if let Err(e) = self.parts.check(&self.key, data.len(), self.started) {
            return refused(e);
        }
        self.started += 1;
        let number = self.started;
        let client = self.store.client.clone();
        let (bucket, full_key, key, upload_id) = (
            self.store.bucket.clone(),
            self.full_key.clone(),
            self.key.clone(),
            self.upload_id.clone(),
        );
        Box::pin(async move {
            let size = data.len() as u64;
            // Hashing 16 MiB takes ~10 ms: off the runtime's worker threads, which also move the
            // other parts' bytes.
            let hashed = data.clone();
            let checksum = tokio::task::spawn_blocking(move || sha256_b64(&hashed))
                .await
                .map_err(|e| StoreError::Request {
                    key: key.clone(),
                    message: format!("hashing part {number} failed: {e}"),
                    retryable: false,
                })?;
            let out = client
                .upload_part()
                .bucket(&bucket)
                .key(&full_key)
                .upload_id(&upload_id)
                .part_number(number as i32)
                .checksum_algorithm(ChecksumAlgorithm::Sha256)
                .checksum_sha256(&checksum)
                .content_length(size as i64)
                .body(AwsByteStream::from(data))
                .send()
                .await
                .map_err(|e| map_err(&key, &bucket, e))?;
            Ok(PartReceipt {
                number,
                size,
                etag: out.e_tag().map(str::to_string),
                checksum_sha256: Some(checksum),
            })
        })
    }

    async fn complete(self: Box<Self>, parts: Vec<PartReceipt>) -> Result<ObjectMeta> {
        let parts = match check_receipts(&self.key, parts, self.started) {
            Ok(parts) => parts,
            Err(e) => {
                let _ = self.abort_now().await;
                return Err(e);
            }
        };
        let size = parts.iter().map(|p| p.size).sum();
        let completed = parts
            .into_iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number as i32)
                    .set_e_tag(p.etag)
                    .set_checksum_sha256(p.checksum_sha256)
                    .build()
            })
            .collect();
        let result = self
            .store
            .client
            .complete_multipart_upload()
            .bucket(&self.store.bucket)
            .key(&self.full_key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await;
        match result {
            Ok(_) => Ok(ObjectMeta {
                key: self.key.clone(),
                size,
            }),
            Err(e) => {
                let err = map_err(&self.key, &self.store.bucket, e);
                let _ = self.abort_now().await;
                Err(err)
            }
        }
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.abort_now().await
    }
}
