//! Downloads that survive a broken or frozen connection.

use aws_sdk_s3::primitives::ByteStream as AwsByteStream;
use bytes::Bytes;

use super::{Result, S3Store, StoreError};
use crate::store::Cause;

/// An object being read. When its connection breaks or freezes, the rest is fetched with a
/// ranged GET conditioned on the ETag, so a long restore survives a reset instead of starting
/// over, and can never splice two versions of an object.
pub(super) struct Download {
    pub(super) store: S3Store,
    pub(super) key: String,
    pub(super) full: String,
    pub(super) etag: Option<String>,
    pub(super) body: Option<AwsByteStream>,
    /// Bytes passed on so far.
    pub(super) offset: u64,
    /// The object's length, from the first answer.
    pub(super) length: Option<u64>,
    /// Interruptions since bytes last arrived.
    pub(super) stalls: u32,
}

impl Download {
    pub(super) async fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        loop {
            let body = self.body.as_mut()?;
            let idle = self.store.retry.stall_timeout;
            let (cause, source): (String, Option<Cause>) =
                match tokio::time::timeout(idle, body.next()).await {
                    Ok(Some(Ok(bytes))) => {
                        self.offset += bytes.len() as u64;
                        self.stalls = 0;
                        return Some(Ok(bytes));
                    }
                    Ok(None) => match self.length {
                        Some(len) if self.offset < len => (
                            format!("the connection ended after {} of {len} bytes", self.offset),
                            None,
                        ),
                        _ => {
                            self.body = None;
                            return None;
                        }
                    },
                    Ok(Some(Err(e))) => ("the connection broke".into(), Some(Cause::new(e))),
                    Err(_) => {
                        self.store.health.timed_out();
                        (
                            format!("no bytes arrived for {}s", idle.as_secs_f32()),
                            None,
                        )
                    }
                };
            self.body = None;
            if let Err(e) = self.resume(cause, source).await {
                return Some(Err(e));
            }
        }
    }

    async fn resume(&mut self, cause: String, source: Option<Cause>) -> Result<()> {
        let err = StoreError::Request {
            key: self.key.clone(),
            message: format!("download interrupted at byte {}: {cause}", self.offset),
            retryable: true,
            remedy: None,
            source,
        };
        self.stalls += 1;
        let policy = self.store.retry;
        let Some(etag) = self.etag.clone() else {
            // Without an ETag a resumed read could splice two versions of the object.
            self.store.health.gave_up("GetObject", &err);
            return Err(err);
        };
        if self.stalls >= policy.attempts.max(1) {
            self.store.health.gave_up("GetObject", &err);
            return Err(err);
        }
        self.store.health.resumed();
        let wait = policy.delay(self.stalls + 1);
        tracing::warn!(key = %self.key, offset = self.offset, retry_in = ?wait, error = %crate::error::render(&err), "resuming an interrupted download");
        tokio::time::sleep(wait).await;
        let out = self
            .store
            .get_from(&self.key, &self.full, Some((self.offset, &etag)))
            .await?;
        self.body = Some(out.body);
        Ok(())
    }
}
