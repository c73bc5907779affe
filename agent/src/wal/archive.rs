//! The archive's I/O: shipping local WAL files into the store, fetching them back for
//! `restore_command`, listing what is there and reading timeline histories. Names and keys are in
//! [`super::naming`], the window computation over a listing in [`super::index`].

use std::{path::Path, sync::Arc};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::{
    WAL_DIR, WalError,
    index::WalIndex,
    naming::{Kind, WalFile, WalObject, valid_seg_size},
};
use crate::{
    lsn::Lsn,
    pipeline::{self, Counters, Expected, PipelineError, Settings},
    store::Store,
};

/// PostgreSQL aligns every WAL record to this many bytes (MAXALIGN), padding with zeros.
const WAL_ALIGN: u64 = 8;
/// Largest history file we read into memory (they hold one line per timeline switch).
const MAX_HISTORY_BYTES: usize = 1 << 20;

/// A local file's digest and the number of its bytes that hold WAL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDigest {
    /// Hex sha256 of the whole file.
    pub sha256: String,
    /// File size.
    pub size: u64,
    /// Where the WAL in it ends: after its last non-zero byte, aligned as records are. The rest of
    /// a segment being written is zeros, so this is the end of its last record (or a few bytes
    /// short of it, never beyond it).
    pub end: u64,
}

/// Hashes a local file and finds where its WAL ends, in one read.
pub async fn digest_file(path: &Path) -> Result<FileDigest, WalError> {
    let io = |source| WalError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut size, mut end) = (0u64, 0u64);
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..]).await.map_err(io)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        hasher.update(&buf[..filled]);
        if let Some(last) = buf[..filled].iter().rposition(|&b| b != 0) {
            end = (size + last as u64 + 1).div_ceil(WAL_ALIGN) * WAL_ALIGN;
        }
        size += filled as u64;
        if filled < buf.len() {
            break;
        }
    }
    Ok(FileDigest {
        sha256: hex::encode(hasher.finalize()),
        size,
        // A file whose length is not a multiple of the alignment (a history file) ends at its end.
        end: end.min(size),
    })
}

/// What [`WalArchive::ship`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shipped {
    /// A new object was stored.
    Stored(WalObject),
    /// The same content (or, for a partial, a complete segment) was already there.
    AlreadyThere(WalObject),
}

/// What [`WalArchive::fetch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fetched {
    /// The file was written to the destination, checked against its digest.
    Restored(WalObject),
    /// The archive has no such file (and, for a segment, nothing later on its timeline).
    NotFound,
}

/// PostgreSQL's largest WAL segment size (`initdb --wal-segsize=1024`): no WAL file is larger.
const MAX_WAL_FILE_BYTES: u64 = 1 << 30;

/// The WAL archive of one PostgreSQL cluster.
#[derive(Debug, Clone)]
pub struct WalArchive {
    store: Arc<dyn Store>,
    system_id: String,
}

impl WalArchive {
    /// The archive of the cluster with `system_id` (PostgreSQL's system identifier).
    pub fn new(store: Arc<dyn Store>, system_id: &str) -> Self {
        Self {
            store,
            system_id: system_id.to_string(),
        }
    }

    /// The archive's folder, relative to the store prefix.
    pub fn prefix(&self) -> String {
        format!("{WAL_DIR}/{}/", self.system_id)
    }

    /// Every object of the archive, sorted by WAL file name.
    pub async fn list(&self) -> Result<Vec<WalObject>, WalError> {
        self.list_prefix(&self.prefix()).await
    }

    async fn list_prefix(&self, prefix: &str) -> Result<Vec<WalObject>, WalError> {
        let archive = self.prefix();
        Ok(self
            .store
            .list(prefix)
            .await?
            .iter()
            .filter_map(|o| WalObject::parse(&o.key, &archive))
            .collect())
    }

    /// Objects stored for one WAL file.
    pub async fn objects_of(&self, file: &WalFile) -> Result<Vec<WalObject>, WalError> {
        self.list_prefix(&format!("{}{}.", self.prefix(), file.name()))
            .await
    }

    /// Ships a local WAL file (`kind` says whether it is complete): compressed, named by its
    /// digest, skipped when the same content is stored already. Superseded partials of the same
    /// segment are deleted once the new object is stored.
    pub async fn ship(
        &self,
        path: &Path,
        file: WalFile,
        kind: Kind,
        settings: &Settings,
    ) -> Result<Shipped, WalError> {
        let mut digest = digest_file(path).await?;
        if kind != Kind::Partial {
            // A complete file is valid to its end, zeros included (a segment ended early by a
            // WAL switch is zero-filled by PostgreSQL itself).
            digest.end = digest.size;
        }
        let existing = self.objects_of(&file).await?;
        // The same bytes stored as a partial do not make a complete segment: a partial shipped
        // just before pg_receivewal renamed the finished file has its final content.
        if let Some(same) = existing
            .iter()
            .find(|o| o.sha256 == digest.sha256 && (o.kind == kind || o.kind == Kind::Seg))
        {
            return Ok(Shipped::AlreadyThere(same.clone()));
        }
        if kind == Kind::Partial
            && let Some(done) = existing.iter().find(|o| o.kind == Kind::Seg)
        {
            return Ok(Shipped::AlreadyThere(done.clone()));
        }
        if kind != Kind::Partial
            && let Some(other) = existing.iter().find(|o| o.kind == kind)
        {
            return Err(WalError::Conflict {
                file: file.name(),
                existing: other.key.clone(),
                prefix: self.prefix(),
            });
        }
        // The key records milliseconds; the object returned is what a listing will decode.
        let now = Utc::now();
        let captured = DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now);
        let key = WalObject::key(
            &self.prefix(),
            &file,
            kind,
            digest.end,
            captured,
            &digest.sha256,
        );
        let source = tokio::fs::File::open(path)
            .await
            .map_err(|source| WalError::Io {
                path: path.display().to_string(),
                source,
            })?;
        let upload = self.store.start_upload(&key).await?;
        let staged =
            pipeline::upload(source, upload, settings, Arc::new(Counters::default())).await?;
        if staged.summary.digest.raw_sha256 != digest.sha256 {
            // The file changed between hashing and uploading (a partial being written): the name
            // would lie about the content, so store nothing and let the next round try again.
            staged.abort().await?;
            return Err(WalError::Io {
                path: path.display().to_string(),
                source: std::io::Error::other("the file changed while it was being shipped"),
            });
        }
        staged.commit().await?;
        let object = WalObject {
            key,
            file,
            kind,
            end: digest.end,
            captured,
            sha256: digest.sha256,
        };
        // Only now may what it supersedes go.
        for old in existing.iter().filter(|o| o.kind == Kind::Partial) {
            if kind == Kind::Seg || old.end <= object.end {
                self.store.delete(&old.key).await?;
            }
        }
        Ok(Shipped::Stored(object))
    }

    /// Fetches WAL file `name` into `dest` for PostgreSQL's `restore_command`, checking its digest
    /// before it appears at `dest`. A complete segment is preferred to a partial one; a missing
    /// segment followed by later ones of its timeline is a [`WalError::Gap`], never "not found",
    /// because PostgreSQL would take "not found" for the end of the archive and stop early.
    pub async fn fetch(&self, file: &WalFile, dest: &Path) -> Result<Fetched, WalError> {
        let objects = self.objects_of(file).await?;
        let complete: Vec<&WalObject> =
            objects.iter().filter(|o| o.kind != Kind::Partial).collect();
        let chosen = match complete.as_slice() {
            [one] => Some(*one),
            [first, ..] => {
                return Err(WalError::Conflict {
                    file: file.name(),
                    existing: first.key.clone(),
                    prefix: self.prefix(),
                });
            }
            [] => objects
                .iter()
                .filter(|o| o.kind == Kind::Partial)
                .max_by_key(|o| o.end),
        };
        let Some(object) = chosen else {
            if let WalFile::Segment { timeline, .. } = file {
                let later = self
                    .list_prefix(&format!("{}{timeline:08X}", self.prefix()))
                    .await?
                    .into_iter()
                    .any(|o| matches!(o.file, WalFile::Segment { .. }) && o.file > *file);
                if later {
                    return Err(WalError::Gap {
                        file: file.name(),
                        timeline: *timeline,
                        prefix: self.prefix(),
                    });
                }
            }
            return Ok(Fetched::NotFound);
        };
        let tmp = dest.with_extension("soma-partial");
        let io = |source| WalError::Io {
            path: tmp.display().to_string(),
            source,
        };
        let sink = tokio::fs::File::create(&tmp).await.map_err(io)?;
        // Named by its digest, but read from the store: a forged object must not fill pg_wal.
        let expected = Expected::raw_only(&object.sha256).at_most(MAX_WAL_FILE_BYTES);
        let fetched = pipeline::download(
            self.store.as_ref(),
            &object.key,
            &expected,
            sink,
            0,
            Arc::new(Counters::default()),
        )
        .await;
        if let Err(e) = fetched {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(match e {
                PipelineError::Decode { source, .. } => WalError::Corrupted {
                    file: file.name(),
                    key: object.key.clone(),
                    detail: format!("its compressed bytes do not decode ({source})"),
                },
                e if e.is_data_loss() => WalError::Corrupted {
                    file: file.name(),
                    key: object.key.clone(),
                    detail: e.to_string(),
                },
                e => e.into(),
            });
        }
        tokio::fs::rename(&tmp, dest).await.map_err(io)?;
        Ok(Fetched::Restored(object.clone()))
    }

    /// Reads a timeline history file: each line is `parent timeline`, `switch LSN`, `reason`.
    /// The file comes from the store, so it is read into at most [`MAX_HISTORY_BYTES`]: a larger
    /// one is refused (and its download stopped), never buffered or waited on.
    async fn history(&self, object: &WalObject) -> Result<Vec<(u32, Lsn)>, WalError> {
        let too_large = || WalError::BadHistory {
            file: object.file.name(),
            reason: format!(
                "it is larger than {} KiB, which no history file is",
                MAX_HISTORY_BYTES >> 10
            ),
        };
        let (tx, rx) = tokio::io::duplex(64 * 1024);
        let expected = Expected::raw_only(&object.sha256);
        let key = object.key.clone();
        // The reader owns its end of the pipe: when it stops early, the download's writes fail
        // instead of blocking on a pipe nobody reads.
        let reader = async move {
            let mut rx = rx;
            let mut raw = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = rx.read(&mut buf).await.map_err(|source| WalError::Io {
                    path: key.clone(),
                    source,
                })?;
                if n == 0 {
                    return Ok(Some(raw));
                }
                if raw.len() + n > MAX_HISTORY_BYTES {
                    return Ok(None);
                }
                raw.extend_from_slice(&buf[..n]);
            }
        };
        let download = pipeline::download(
            self.store.as_ref(),
            &object.key,
            &expected,
            tx,
            0,
            Arc::new(Counters::default()),
        );
        let (raw, downloaded): (Result<_, WalError>, _) = tokio::join!(reader, download);
        let raw = raw?.ok_or_else(too_large)?;
        downloaded.map_err(|e| match e {
            e if e.is_data_loss() => WalError::Corrupted {
                file: object.file.name(),
                key: object.key.clone(),
                detail: e.to_string(),
            },
            e => e.into(),
        })?;
        parse_history(&object.file, &String::from_utf8_lossy(&raw))
    }

    /// Builds the index that recoverable windows are computed from: one LIST of the archive plus a
    /// read of each (small) history file. `seg_size` is the cluster's WAL segment size as a base
    /// backup's manifest records it.
    pub async fn index(&self, seg_size: u64) -> Result<WalIndex, WalError> {
        if !valid_seg_size(seg_size) {
            return Err(WalError::BadSegmentSize {
                size: seg_size,
                prefix: self.prefix(),
            });
        }
        let objects = self.list().await?;
        let mut histories = Vec::new();
        for o in objects.iter().filter(|o| o.kind == Kind::History) {
            histories.push((o.clone(), self.history(o).await?));
        }
        Ok(WalIndex::new(seg_size, objects, histories))
    }
}

/// Parses a history file's text: `parent timeline`, `switch LSN`, `reason` per line, `#` comments.
pub fn parse_history(file: &WalFile, text: &str) -> Result<Vec<(u32, Lsn)>, WalError> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let parsed = (|| {
            let tli: u32 = fields.next()?.parse().ok()?;
            let lsn: Lsn = fields.next()?.parse().ok()?;
            Some((tli, lsn))
        })();
        out.push(parsed.ok_or_else(|| WalError::BadHistory {
            file: file.name(),
            reason: format!("line {line:?} is not `timeline  LSN  reason`"),
        })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            compression_level: 3,
            compression_threads: 0,
            part_size: 5 << 20,
            parts_in_flight: 1,
        }
    }

    async fn local_archive(dir: &Path) -> WalArchive {
        let store: Arc<dyn Store> = Arc::new(
            crate::store::local::LocalStore::open(dir.join("store"))
                .await
                .unwrap(),
        );
        WalArchive::new(store, "42")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shipping_is_idempotent_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let settings = settings();
        let archive = local_archive(dir.path()).await;
        let file = WalFile::parse("000000010000000000000003").unwrap();
        let path = dir.path().join("seg");
        let mut bytes = vec![0u8; 1 << 20];
        bytes[..100].fill(7);
        std::fs::write(&path, &bytes).unwrap();

        // The partial shipped with the segment's final bytes does not stand in for it.
        let partial = archive
            .ship(&path, file, Kind::Partial, &settings)
            .await
            .unwrap();
        assert!(matches!(partial, Shipped::Stored(ref o) if o.end == 104));
        let Shipped::Stored(seg) = archive
            .ship(&path, file, Kind::Seg, &settings)
            .await
            .unwrap()
        else {
            panic!("the complete segment must be stored");
        };
        assert_eq!(seg.end, 1 << 20);
        // The complete segment superseded the partial; shipping it again stores nothing.
        assert_eq!(archive.objects_of(&file).await.unwrap(), vec![seg.clone()]);
        assert_eq!(
            archive
                .ship(&path, file, Kind::Seg, &settings)
                .await
                .unwrap(),
            Shipped::AlreadyThere(seg.clone())
        );
        // Different content under the same name is refused, and the stored one stays.
        bytes[500] = 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = archive
            .ship(&path, file, Kind::Seg, &settings)
            .await
            .unwrap_err();
        assert!(matches!(err, WalError::Conflict { .. }), "{err}");
        assert_eq!(archive.objects_of(&file).await.unwrap(), vec![seg.clone()]);

        // Fetch checks the digest; a name past the end is "not found", one before a later
        // segment is a gap.
        let out = dir.path().join("out");
        assert!(matches!(
            archive.fetch(&file, &out).await.unwrap(),
            Fetched::Restored(_)
        ));
        assert_eq!(std::fs::read(&out).unwrap().len(), 1 << 20);
        let later = WalFile::parse("000000010000000000000009").unwrap();
        assert_eq!(
            archive.fetch(&later, &out).await.unwrap(),
            Fetched::NotFound
        );
        let earlier = WalFile::parse("000000010000000000000002").unwrap();
        assert!(matches!(
            archive.fetch(&earlier, &out).await.unwrap_err(),
            WalError::Gap { .. }
        ));
    }

    #[test]
    fn history_lines_parse_with_checks() {
        let file = WalFile::History { timeline: 3 };
        let text = "1\t0/3000060\tno recovery target specified\n\n# comment\n2\t0/5000000\tbefore 2026-01-01\n";
        assert_eq!(
            parse_history(&file, text).unwrap(),
            vec![(1, Lsn(0x300_0060)), (2, Lsn(0x500_0000))]
        );
        for bad in ["x 0/1 r", "1 0/ r", "1", "é 0/1", "99999999999 0/1 r"] {
            let err = parse_history(&file, bad).unwrap_err();
            assert!(matches!(err, WalError::BadHistory { .. }), "{bad:?}: {err}");
        }
    }

    /// A history file from the store larger than any real one is refused, and reading it stops:
    /// an earlier reader stopped taking bytes but kept its end of the pipe, and waited forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_oversized_history_file_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let archive = local_archive(dir.path()).await;
        let path = dir.path().join("00000002.history");
        std::fs::write(&path, "1\t0/3000060\tx\n".repeat(200_000)).unwrap();
        archive
            .ship(
                &path,
                WalFile::History { timeline: 2 },
                Kind::History,
                &settings(),
            )
            .await
            .unwrap();
        let index =
            tokio::time::timeout(std::time::Duration::from_secs(30), archive.index(16 << 20))
                .await
                .expect("reading an oversized history file must not hang");
        let err = index.unwrap_err();
        assert!(
            matches!(err, WalError::BadHistory { .. }) && err.to_string().contains("larger"),
            "{err}"
        );
        // A segment size no PostgreSQL has is refused before anything is read.
        let err = archive.index(0).await.unwrap_err();
        assert!(matches!(err, WalError::BadSegmentSize { .. }), "{err}");
    }
}
