//! A store this agent must never write to: the `--restore-from` source (another cluster's backups,
//! read during a disaster-recovery drill or after a disaster) and `--store` under
//! `--store-read-only`.
//!
//! Read-only is enforced here and only here: every writing method answers
//! [`StoreError::ReadOnly`] without calling the inner store, so no code path — backup, delete,
//! abandon, sweep, WAL archive — can write there by accident, whatever it forgets to check.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ByteStream, ObjectMeta, PendingUpload, Result, Store, StoreError, TimedObject, Upload,
};

/// Wraps a store, passing reads through and refusing every write.
#[derive(Debug, Clone)]
pub struct ReadOnly {
    inner: Arc<dyn Store>,
}

impl ReadOnly {
    /// `inner`, read-only.
    pub fn new(inner: Arc<dyn Store>) -> Self {
        Self { inner }
    }

    fn refuse(&self) -> StoreError {
        StoreError::ReadOnly {
            location: self.inner.location(),
        }
    }
}

#[async_trait]
impl Store for ReadOnly {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn health(&self) -> Option<super::StoreHealth> {
        self.inner.health()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    async fn put(&self, _key: &str, _data: Bytes) -> Result<()> {
        Err(self.refuse())
    }

    async fn start_upload(&self, _key: &str) -> Result<Box<dyn Upload>> {
        Err(self.refuse())
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        self.inner.get(key).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        self.inner.head(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(prefix).await
    }

    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        self.inner.list_timed(prefix).await
    }

    async fn delete(&self, _key: &str) -> Result<()> {
        Err(self.refuse())
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        self.inner.list_uploads(prefix).await
    }

    async fn abort_upload(&self, _upload: &PendingUpload) -> Result<()> {
        Err(self.refuse())
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::{MIN_PART_SIZE, local::LocalStore};

    /// A local store holding one object and one incomplete upload, and a read-only view of it.
    async fn setup() -> (tempfile::TempDir, Arc<dyn Store>, ReadOnly) {
        let dir = tempfile::tempdir().unwrap();
        let inner: Arc<dyn Store> = Arc::new(
            LocalStore::open(dir.path().to_path_buf())
                .await
                .expect("local store"),
        );
        inner
            .put("backups/a/manifest.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let mut upload = inner.start_upload("backups/b/dump.zst").await.unwrap();
        upload
            .put_part(Bytes::from(vec![7u8; MIN_PART_SIZE]))
            .await
            .unwrap();
        // Left incomplete on purpose: what a crashed writer leaves.
        drop(upload);
        let ro = ReadOnly::new(inner.clone());
        (dir, inner, ro)
    }

    /// Everything the inner store holds, complete and incomplete.
    async fn snapshot(s: &dyn Store) -> (Vec<ObjectMeta>, Vec<String>) {
        let objects = s.list("").await.unwrap();
        let mut uploads: Vec<String> = s
            .list_uploads("")
            .await
            .unwrap()
            .into_iter()
            .map(|u| format!("{} {}", u.key, u.upload_id))
            .collect();
        uploads.sort();
        (objects, uploads)
    }

    fn assert_refused<T>(what: &str, r: Result<T>, location: &str) {
        match r {
            Err(StoreError::ReadOnly { location: l }) => {
                assert_eq!(l, location, "{what}: the error names the store");
            }
            Err(other) => panic!("{what}: expected ReadOnly, got {other}"),
            Ok(_) => panic!("{what}: a read-only store accepted a write"),
        }
    }

    #[tokio::test]
    async fn every_write_is_refused_and_the_inner_store_is_untouched() {
        let (_dir, inner, ro) = setup().await;
        let before = snapshot(inner.as_ref()).await;
        let loc = inner.location();
        assert!(ro.is_read_only());
        assert!(!inner.is_read_only());

        assert_refused(
            "put",
            ro.put("backups/c/manifest.json", Bytes::from_static(b"{}"))
                .await,
            &loc,
        );
        assert_refused(
            "put over an existing object",
            ro.put("backups/a/manifest.json", Bytes::from_static(b"x"))
                .await,
            &loc,
        );
        assert_refused(
            "start_upload",
            ro.start_upload("backups/c/dump.zst").await,
            &loc,
        );
        assert_refused("delete", ro.delete("backups/a/manifest.json").await, &loc);
        let pending = ro.list_uploads("backups/").await.unwrap();
        assert_eq!(pending.len(), 1, "the read-only view lists the upload");
        assert_refused("abort_upload", ro.abort_upload(&pending[0]).await, &loc);

        assert_eq!(
            snapshot(inner.as_ref()).await,
            before,
            "a refused write changed the inner store"
        );
        let msg = StoreError::ReadOnly {
            location: loc.clone(),
        }
        .to_string();
        assert!(
            msg.starts_with(&format!("this agent's store is read-only ({loc}): ")),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (_dir, inner, ro) = setup().await;
        assert_eq!(ro.location(), inner.location());
        let mut body = Vec::new();
        let mut stream = ro.get("backups/a/manifest.json").await.unwrap();
        while let Some(chunk) = stream.next().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(body, b"{}");
        assert_eq!(
            ro.head("backups/a/manifest.json")
                .await
                .unwrap()
                .unwrap()
                .size,
            2
        );
        assert!(ro.head("backups/a/missing").await.unwrap().is_none());
        assert!(matches!(
            ro.get("backups/a/missing").await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(
            ro.list("backups/").await.unwrap(),
            inner.list("backups/").await.unwrap()
        );
        assert_eq!(ro.list_uploads("backups/").await.unwrap().len(), 1);
    }
}
