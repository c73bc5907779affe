//! A directory that behaves like an object store: the embedded default, and the test double-free
//! way to run the agent without S3.
//!
//! Objects live at `<root>/<key>`. Uploads in progress live in `<root>/.uploads/` as `<id>.data`
//! plus `<id>.json` (the target key and start time) and are renamed into place on `complete` after
//! an fsync, so an object appears whole or not at all, exactly like an S3 multipart upload.

use std::{
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::{fs, io::AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{
    ByteStream, ObjectMeta, PartReceipt, PartRule, PartUpload, PendingUpload, Result, Store,
    StoreError, TimedObject, Upload, check_key, check_receipts, refused,
};

const UPLOADS_DIR: &str = ".uploads";

/// A local directory store.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct UploadMeta {
    key: String,
    initiated_unix_ms: u128,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub async fn open(root: PathBuf) -> Result<Self> {
        let uploads = root.join(UPLOADS_DIR);
        fs::create_dir_all(&uploads)
            .await
            .map_err(io_err(&uploads))?;
        Ok(Self { root })
    }

    /// Opens an existing store rooted at `root` without creating anything (a read-only source:
    /// a missing directory is a wrong location, not an empty store).
    pub async fn open_existing(root: PathBuf) -> Result<Self> {
        match fs::metadata(&root).await {
            Ok(meta) if meta.is_dir() => Ok(Self { root }),
            Ok(_) => Err(StoreError::InvalidLocation {
                location: format!("file://{}", root.display()),
                reason: "not a directory".into(),
            }),
            Err(source) => Err(StoreError::Io { path: root, source }),
        }
    }

    fn path_of(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        if key == UPLOADS_DIR || key.starts_with(".uploads/") {
            return Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason: "the .uploads directory is reserved for uploads in progress",
            });
        }
        Ok(self.root.join(key))
    }

    fn uploads(&self) -> PathBuf {
        self.root.join(UPLOADS_DIR)
    }

    /// Moves a finished temporary file to its key durably: fsync the data, rename, fsync the dir.
    async fn publish(&self, tmp: &Path, key: &str) -> Result<()> {
        let dest = self.path_of(key)?;
        let parent = dest.parent().expect("key has a parent").to_path_buf();
        fs::create_dir_all(&parent).await.map_err(io_err(&parent))?;
        fs::rename(tmp, &dest).await.map_err(io_err(&dest))?;
        let dir = parent.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
            .await
            .expect("fsync task")
            .map_err(io_err(&parent))
    }

    async fn new_upload_files(&self, key: &str) -> Result<(String, fs::File, PathBuf)> {
        let id = format!(
            "{:016x}{:016x}",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let meta = UploadMeta {
            key: key.to_string(),
            initiated_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
        };
        let meta_path = self.uploads().join(format!("{id}.json"));
        fs::write(&meta_path, serde_json::to_vec(&meta).expect("serialise"))
            .await
            .map_err(io_err(&meta_path))?;
        let data_path = self.uploads().join(format!("{id}.data"));
        let file = fs::File::create(&data_path)
            .await
            .map_err(io_err(&data_path))?;
        Ok((id, file, data_path))
    }

    async fn remove_upload(&self, id: &str) -> Result<()> {
        for ext in ["data", "json"] {
            let p = self.uploads().join(format!("{id}.{ext}"));
            match fs::remove_file(&p).await {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&p)(e)),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Store for LocalStore {
    fn location(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.path_of(key)?;
        let (id, mut file, data_path) = self.new_upload_files(key).await?;
        file.write_all(&data).await.map_err(io_err(&data_path))?;
        file.sync_all().await.map_err(io_err(&data_path))?;
        drop(file);
        self.publish(&data_path, key).await?;
        self.remove_upload(&id).await
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>> {
        self.path_of(key)?;
        let (id, file, data_path) = self.new_upload_files(key).await?;
        Ok(Box::new(LocalUpload {
            store: self.clone(),
            key: key.to_string(),
            id,
            file: Arc::new(file.into_std().await),
            data_path,
            size: 0,
            started: 0,
            parts: PartRule::default(),
        }))
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let path = self.path_of(key)?;
        let file = match fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::NotFound {
                    key: key.to_string(),
                });
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let stream = ReaderStream::with_capacity(file, 1 << 20).map(move |r| {
            r.map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })
        });
        Ok(Box::pin(stream))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let path = self.path_of(key)?;
        match fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: m.len(),
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut dirs = vec![(self.root.clone(), String::new())];
        while let Some((dir, rel)) = dirs.pop() {
            let mut entries = match fs::read_dir(&dir).await {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&dir)(e)),
            };
            while let Some(entry) = entries.next_entry().await.map_err(io_err(&dir))? {
                let name = entry.file_name().to_string_lossy().into_owned();
                if rel.is_empty() && name == UPLOADS_DIR {
                    continue;
                }
                let key = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let ft = entry.file_type().await.map_err(io_err(&entry.path()))?;
                if ft.is_dir() {
                    // Only descend where the prefix can still match.
                    if key.starts_with(prefix) || prefix.starts_with(&format!("{key}/")) {
                        dirs.push((entry.path(), key));
                    }
                } else if ft.is_file() && key.starts_with(prefix) {
                    let size = entry.metadata().await.map_err(io_err(&entry.path()))?.len();
                    out.push(ObjectMeta { key, size });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        let mut out = Vec::new();
        for meta in self.list(prefix).await? {
            let path = self.path_of(&meta.key)?;
            match fs::metadata(&path).await {
                Ok(m) => out.push(TimedObject {
                    meta,
                    modified: m.modified().ok(),
                }),
                // Deleted between the listing and now.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        }
        // Remove directories the delete emptied, like a prefix disappears in S3.
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.root || fs::remove_dir(&d).await.is_err() {
                break;
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        let dir = self.uploads();
        let mut entries = match fs::read_dir(&dir).await {
            Ok(entries) => entries,
            // A store opened read-only that never had an upload (open_existing creates nothing).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&dir)(e)),
        };
        let mut out = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(io_err(&dir))? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            let raw = match fs::read(entry.path()).await {
                Ok(raw) => raw,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&entry.path())(e)),
            };
            // A crash between creating the two files can leave a torn record: report it under an
            // empty key so a sweep of the whole store still removes it.
            let meta: Option<UploadMeta> = serde_json::from_slice(&raw).ok();
            let key = meta.as_ref().map(|m| m.key.clone()).unwrap_or_default();
            if !key.starts_with(prefix) {
                continue;
            }
            out.push(PendingUpload {
                key,
                upload_id: id.to_string(),
                initiated: meta.map(|m| {
                    SystemTime::UNIX_EPOCH
                        + std::time::Duration::from_millis(m.initiated_unix_ms as u64)
                }),
            });
        }
        Ok(out)
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        if upload.upload_id.contains('/') || upload.upload_id.contains("..") {
            return Err(StoreError::InvalidKey {
                key: upload.upload_id.clone(),
                reason: "not an upload id",
            });
        }
        self.remove_upload(&upload.upload_id).await
    }
}

struct LocalUpload {
    store: LocalStore,
    key: String,
    id: String,
    /// Shared with the part writes in flight, each of which writes at its own offset.
    file: Arc<std::fs::File>,
    data_path: PathBuf,
    /// Bytes of the parts numbered so far: where the next part goes.
    size: u64,
    started: u32,
    parts: PartRule,
}

#[async_trait]
impl Upload for LocalUpload {
    /// The part's place in the file is fixed now, by call order, so parts can be written
    /// concurrently and in any order, like S3 parts, and still form the object in call order.
    fn put_part(&mut self, data: Bytes) -> PartUpload {
        if let Err(e) = self.parts.check(&self.key, data.len(), self.started) {
            return refused(e);
        }
        self.started += 1;
        let (number, offset, size) = (self.started, self.size, data.len() as u64);
        self.size += size;
        let file = self.file.clone();
        let path = self.data_path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
                .await
                .map_err(|e| StoreError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?
                .map_err(io_err(&path))?;
            Ok(PartReceipt {
                number,
                size,
                etag: None,
                checksum_sha256: None,
            })
        })
    }

    async fn complete(self: Box<Self>, parts: Vec<PartReceipt>) -> Result<ObjectMeta> {
        if let Err(e) = check_receipts(&self.key, parts, self.started) {
            let _ = self.store.remove_upload(&self.id).await;
            return Err(e);
        }
        let file = self.file.clone();
        // Every part is in (checked above), so the file has no gap: make it durable, then publish.
        tokio::task::spawn_blocking(move || file.sync_all())
            .await
            .map_err(|e| StoreError::Io {
                path: self.data_path.clone(),
                source: std::io::Error::other(e),
            })?
            .map_err(io_err(&self.data_path))?;
        self.store.publish(&self.data_path, &self.key).await?;
        self.store.remove_upload(&self.id).await?;
        Ok(ObjectMeta {
            key: self.key.clone(),
            size: self.size,
        })
    }

    async fn abort(self: Box<Self>) -> Result<()> {
        self.store.remove_upload(&self.id).await
    }
}
