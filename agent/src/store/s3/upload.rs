//! Multipart uploads: every part, the complete and the abort through the retry policy.

use async_trait::async_trait;
use aws_sdk_s3::{
    primitives::ByteStream as AwsByteStream,
    types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart},
};
use bytes::Bytes;

use super::{
    ObjectMeta, PartReceipt, PartRule, PartUpload, PendingUpload, Result, S3Store, Store as _,
    StoreError, Upload, check_receipts, error::map_err, progress::Watch, refused, sha256_b64,
};

pub(super) struct S3Upload {
    pub(super) store: S3Store,
    pub(super) key: String,
    pub(super) full_key: String,
    pub(super) upload_id: String,
    /// Parts numbered so far.
    pub(super) started: u32,
    pub(super) parts: PartRule,
    /// CreateMultipartUpload was retried, so the server may hold other uploads of this key.
    pub(super) orphans_possible: bool,
}

impl S3Upload {
    async fn abort_now(&self) -> Result<()> {
        let result = self
            .store
            .abort_upload(&PendingUpload {
                key: self.key.clone(),
                upload_id: self.upload_id.clone(),
                initiated: None,
            })
            .await;
        self.abort_orphans().await;
        result
    }

    /// Aborts the uploads of this key that a retried CreateMultipartUpload may have started
    /// (keys are unique to one backup, so any other upload of it is ours); best effort, since
    /// the start-up sweep finds whatever is left.
    async fn abort_orphans(&self) {
        if !self.orphans_possible {
            return;
        }
        let Ok(pending) = self.store.list_uploads(&self.key).await else {
            return;
        };
        for orphan in pending
            .iter()
            .filter(|u| u.key == self.key && u.upload_id != self.upload_id)
        {
            match self.store.abort_upload(orphan).await {
                Ok(()) => {
                    tracing::info!(key = %self.key, "aborted an upload left by a retried CreateMultipartUpload")
                }
                Err(e) => {
                    tracing::warn!(key = %self.key, error = %e, "could not abort an upload left by a retried CreateMultipartUpload")
                }
            }
        }
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
        let store = self.store.clone();
        let (full_key, key, upload_id) = (
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
                    remedy: None,
                    source: None,
                })?;
            let (store, data, checksum, full_key, upload_id, key) =
                (&store, &data, &checksum, &full_key, &upload_id, &key);
            let out = store
                .retry
                .run(&store.health, "UploadPart", key, |progress| async move {
                    store
                        .client
                        .upload_part()
                        .bucket(&store.bucket)
                        .key(full_key)
                        .upload_id(upload_id)
                        .part_number(number as i32)
                        .checksum_algorithm(ChecksumAlgorithm::Sha256)
                        .checksum_sha256(checksum)
                        .content_length(size as i64)
                        .body(AwsByteStream::from(data.clone()))
                        .customize()
                        .interceptor(Watch(progress))
                        .send()
                        .await
                        .map_err(|e| map_err(key, &store.bucket, e))
                })
                .await?;
            Ok(PartReceipt {
                number,
                size,
                etag: out.e_tag().map(str::to_string),
                checksum_sha256: Some(checksum.clone()),
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
        let completed: Vec<CompletedPart> = parts
            .into_iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number as i32)
                    .set_e_tag(p.etag)
                    .set_checksum_sha256(p.checksum_sha256)
                    .build()
            })
            .collect();
        let tries = std::sync::atomic::AtomicU32::new(0);
        let this: &S3Upload = &self;
        let (store, completed, tries_ref) = (&this.store, &completed, &tries);
        let result = store
            .retry
            .run(
                &store.health,
                "CompleteMultipartUpload",
                &this.key,
                |progress| async move {
                    tries_ref.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    store
                        .client
                        .complete_multipart_upload()
                        .bucket(&store.bucket)
                        .key(&this.full_key)
                        .upload_id(&this.upload_id)
                        .multipart_upload(
                            CompletedMultipartUpload::builder()
                                .set_parts(Some(completed.clone()))
                                .build(),
                        )
                        .customize()
                        .interceptor(Watch(progress))
                        .send()
                        .await
                        .map_err(|e| map_err(&this.key, &store.bucket, e))
                },
            )
            .await;
        let done = ObjectMeta {
            key: self.key.clone(),
            size,
        };
        match result {
            Ok(_) => {}
            // An earlier attempt completed the upload but its answer was lost: the upload is
            // gone and the object is there, whole.
            Err(StoreError::NotFound { .. })
                if tries.load(std::sync::atomic::Ordering::Relaxed) > 1
                    && self
                        .store
                        .head(&self.key)
                        .await
                        .ok()
                        .flatten()
                        .map(|m| m.size)
                        == Some(size) => {}
            Err(err) => {
                // Aborts this upload and any orphan of a retried create.
                let _ = self.abort_now().await;
                return Err(err);
            }
        }
        self.abort_orphans().await;
        Ok(done)
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.abort_now().await
    }
}
