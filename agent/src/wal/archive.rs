//! The archive's I/O: shipping local WAL files into the store, fetching them back for
//! `restore_command`, listing what is there and reading timeline histories. Names and keys are in
//! [`super::naming`], the window computation over a listing in [`super::index`].

use std::{path::Path, sync::Arc};

use chrono::{DateTime, Utc};
use tokio::io::AsyncReadExt;

use super::{
    WAL_DIR, WalError,
    history::parse_history,
    index::WalIndex,
    judge::{self, MAX_JUDGED, MAX_WAL_FILE_BYTES, Verdict, Verdicts},
    local::{FileDigest, digest_file, read_head},
    naming::{Kind, WalFile, WalObject, valid_seg_size},
};
use crate::{
    lsn::Lsn,
    pipeline::{self, Counters, Expected, PipelineError, Settings},
    store::Store,
};

/// Largest history file we read into memory (they hold one line per timeline switch).
const MAX_HISTORY_BYTES: usize = 1 << 20;

/// What [`WalArchive::ship`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Shipped {
    /// A new object was stored.
    Stored(WalObject),
    /// The same content (or, for a partial, a complete segment) was already there.
    AlreadyThere(WalObject),
}

/// What [`WalArchive::fetch`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// The file was written to the destination, checked against its digest.
    Restored(WalObject),
    /// The archive has no such file (and, for a segment, nothing later on its timeline).
    NotFound,
}

/// What [`WalArchive::any_genuine`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A genuine object.
    Genuine,
    /// Only bad objects, or none.
    Nothing,
    /// More objects than one call judges, none of the judged ones genuine.
    Unknown,
}

/// The WAL archive of one PostgreSQL cluster.
#[derive(Debug, Clone)]
pub(crate) struct WalArchive {
    store: Arc<dyn Store>,
    system_id: String,
    /// Objects already read back and judged (see [`super::judge`]).
    verdicts: Verdicts,
}

impl WalArchive {
    /// The archive of the cluster with `system_id` (PostgreSQL's system identifier).
    pub(crate) fn new(store: Arc<dyn Store>, system_id: &str) -> Self {
        Self {
            store,
            system_id: system_id.to_string(),
            verdicts: Verdicts::default(),
        }
    }

    /// Reads `object` back and judges it by its content, once per archive value: a bad one is
    /// logged at warn, naming its key and why. `seg_size` is the cluster's when known.
    pub(crate) async fn verdict(
        &self,
        object: &WalObject,
        seg_size: Option<u64>,
    ) -> Result<Verdict, WalError> {
        if let Some(v) = self.verdicts.get(&object.key) {
            return Ok(v);
        }
        let verdict = if object.kind == Kind::History {
            // Its digest and that it reads as a history file: it has no header to check.
            match self.history(object).await {
                Ok(_) => Verdict::Genuine,
                Err(e @ (WalError::BadHistory { .. } | WalError::Corrupted { .. })) => {
                    Verdict::Bad(e.to_string())
                }
                Err(WalError::Pipeline(e)) if judge::content_failure(&e) => {
                    Verdict::Bad(e.to_string())
                }
                Err(WalError::Pipeline(e)) if judge::gone(&e) => Verdict::Gone,
                Err(e) => return Err(e),
            }
        } else {
            judge::judge(
                self.store.as_ref(),
                object,
                self.system_id.parse().ok(),
                seg_size,
            )
            .await?
        };
        if let Verdict::Bad(why) = &verdict {
            tracing::warn!(key = %object.key, file = %object.file.name(), why = %why,
                "an object of the WAL archive is not what its name says; it is skipped");
        }
        self.verdicts.remember(&object.key, &verdict);
        Ok(verdict)
    }

    /// Whether any of `objects` is genuine, judging them in order and at most [`MAX_JUDGED`].
    async fn any_genuine(
        &self,
        objects: impl IntoIterator<Item = WalObject>,
    ) -> Result<Found, WalError> {
        for (i, o) in objects.into_iter().enumerate() {
            if i >= MAX_JUDGED {
                return Ok(Found::Unknown);
            }
            if self.verdict(&o, None).await? == Verdict::Genuine {
                return Ok(Found::Genuine);
            }
        }
        Ok(Found::Nothing)
    }

    /// The archive's folder, relative to the store prefix.
    pub(crate) fn prefix(&self) -> String {
        format!("{WAL_DIR}/{}/", self.system_id)
    }

    /// Every object of the archive, sorted by WAL file name.
    pub(crate) async fn list(&self) -> Result<Vec<WalObject>, WalError> {
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
    pub(crate) async fn objects_of(&self, file: &WalFile) -> Result<Vec<WalObject>, WalError> {
        self.list_prefix(&format!("{}{}.", self.prefix(), file.name()))
            .await
    }

    /// Ships a local WAL file (`kind` says whether it is complete): compressed, named by its
    /// digest, skipped when the same content is stored already. Superseded partials of the same
    /// segment are deleted once the new object is stored.
    pub(crate) async fn ship(
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
        if let Some(there) = self.stored_already(&file, kind, &digest, &existing).await? {
            return Ok(Shipped::AlreadyThere(there));
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

    /// The object that already holds `file`'s content (`digest`) among `existing`, so shipping
    /// it again would add nothing; a [`WalError::Conflict`] when a genuine complete copy holds
    /// other content.
    async fn stored_already(
        &self,
        file: &WalFile,
        kind: Kind,
        digest: &FileDigest,
        existing: &[WalObject],
    ) -> Result<Option<WalObject>, WalError> {
        // The same bytes stored as a partial do not make a complete segment: a partial shipped
        // just before pg_receivewal renamed the finished file has its final content.
        if let Some(same) = existing
            .iter()
            .find(|o| o.sha256 == digest.sha256 && (o.kind == kind || o.kind == Kind::Seg))
        {
            return Ok(Some(same.clone()));
        }
        // Another object under this name counts only if it is what its key says: a name planted
        // ahead of the archive neither stands in for the real segment nor blocks it.
        if kind == Kind::Partial {
            for done in existing
                .iter()
                .filter(|o| o.kind == Kind::Seg)
                .take(MAX_JUDGED)
            {
                if self.verdict(done, None).await? == Verdict::Genuine {
                    return Ok(Some(done.clone()));
                }
            }
        } else {
            for other in existing.iter().filter(|o| o.kind == kind).take(MAX_JUDGED) {
                if self.verdict(other, None).await? == Verdict::Genuine {
                    return Err(WalError::Conflict {
                        file: file.name(),
                        existing: other.key.clone(),
                        prefix: self.prefix(),
                    });
                }
            }
        }
        Ok(None)
    }

    /// Fetches WAL file `name` into `dest` for PostgreSQL's `restore_command`, judging each
    /// candidate by its content before it appears at `dest` (see [`super::judge`]): complete
    /// objects first, then partial ones, longest first; a bad one is logged and skipped. Two
    /// genuine complete objects with different content are a [`WalError::Conflict`].
    ///
    /// When no candidate is usable, what follows decides: genuine WAL later on the timeline (for
    /// a history file: any genuine segment of its timeline) makes it a [`WalError::Gap`] (nothing
    /// stored) or [`WalError::Corrupted`] (only bad objects), never "not found", because
    /// PostgreSQL would take that for the end of the archive and stop early. With nothing genuine
    /// after it, it is the end of the archive: names alone, planted ahead, do not make one.
    pub(crate) async fn fetch(&self, file: &WalFile, dest: &Path) -> Result<Fetched, WalError> {
        let objects = self.objects_of(file).await?;
        let mut complete: Vec<WalObject> = objects
            .iter()
            .filter(|o| o.kind != Kind::Partial)
            .take(MAX_JUDGED)
            .cloned()
            .collect();
        let mut rejected: Vec<(WalObject, String)> = Vec::new();
        if complete.len() > 1 {
            let mut genuine: Vec<WalObject> = Vec::new();
            for o in complete {
                match self.verdict(&o, None).await? {
                    Verdict::Genuine => genuine.push(o),
                    Verdict::Bad(why) => rejected.push((o, why)),
                    Verdict::Gone => {}
                }
            }
            if let [first, second, ..] = genuine.as_slice()
                && first.sha256 != second.sha256
            {
                return Err(WalError::Conflict {
                    file: file.name(),
                    existing: first.key.clone(),
                    prefix: self.prefix(),
                });
            }
            complete = genuine;
        }
        let mut partials: Vec<WalObject> = objects
            .iter()
            .filter(|o| o.kind == Kind::Partial)
            .cloned()
            .collect();
        partials.sort_by_key(|o| std::cmp::Reverse(o.end));
        let candidates = complete
            .into_iter()
            .chain(partials)
            .take(MAX_JUDGED.saturating_sub(rejected.len()));
        for object in candidates {
            match self.fetch_one(&object, dest).await? {
                Verdict::Genuine => return Ok(Fetched::Restored(object)),
                Verdict::Bad(why) => rejected.push((object, why)),
                Verdict::Gone => {}
            }
        }
        if rejected.is_empty() && matches!(file, WalFile::History { .. }) {
            // PostgreSQL probes for the history files of timelines that do not exist.
            return Ok(Fetched::NotFound);
        }
        self.nothing_usable(file, &rejected).await
    }

    /// What fetching `file` answers when none of its objects is usable (`rejected` are the bad
    /// ones): a refusal when genuine WAL follows it, else the end of the archive.
    async fn nothing_usable(
        &self,
        file: &WalFile,
        rejected: &[(WalObject, String)],
    ) -> Result<Fetched, WalError> {
        // Nothing usable under this name: is there genuine WAL after it?
        let after: Vec<WalObject> = match file {
            WalFile::Segment { timeline, .. } => self
                .list_prefix(&format!("{}{timeline:08X}", self.prefix()))
                .await?
                .into_iter()
                .filter(|o| matches!(o.file, WalFile::Segment { .. }) && o.file > *file)
                .collect(),
            WalFile::History { timeline } => self
                .list_prefix(&format!("{}{timeline:08X}", self.prefix()))
                .await?
                .into_iter()
                .filter(|o| matches!(o.file, WalFile::Segment { .. }))
                .collect(),
        };
        // Past the bound nothing is known: treated as genuine, so it is a refusal, never an end.
        let needed = self.any_genuine(after).await? != Found::Nothing;
        match rejected.first() {
            Some((bad, why)) if needed => Err(WalError::Corrupted {
                file: file.name(),
                key: bad.key.clone(),
                detail: why.clone(),
            }),
            _ if needed && matches!(file, WalFile::Segment { .. }) => Err(WalError::Gap {
                file: file.name(),
                timeline: file.timeline(),
                prefix: self.prefix(),
            }),
            Some((bad, why)) => {
                tracing::warn!(file = %file.name(), key = %bad.key, why = %why, rejected = rejected.len(),
                    "no genuine copy of this WAL file and no genuine WAL after it: the end of the archive");
                Ok(Fetched::NotFound)
            }
            None => Ok(Fetched::NotFound),
        }
    }

    /// Downloads one candidate to a temporary file beside `dest`, checking its digest as it
    /// comes and its header after, and moves it to `dest` only when it is genuine.
    async fn fetch_one(&self, object: &WalObject, dest: &Path) -> Result<Verdict, WalError> {
        let tmp = dest.with_extension("soma-partial");
        let io = |source| WalError::Io {
            path: tmp.display().to_string(),
            source,
        };
        let sink = tokio::fs::File::create(&tmp).await.map_err(io)?;
        // Named by its digest, but read from the store: a forged object must not fill pg_wal.
        let expected = Expected::raw_only(object.sha256).at_most(MAX_WAL_FILE_BYTES);
        let fetched = pipeline::download(
            self.store.as_ref(),
            &object.key,
            &expected,
            sink,
            0,
            Arc::new(Counters::default()),
        )
        .await;
        let verdict = match fetched {
            Ok(()) => {
                let (size, head) = read_head(&tmp).await.map_err(io)?;
                match judge::header_problem(object, self.system_id.parse().ok(), None, size, &head)
                {
                    Some(why) => Verdict::Bad(why),
                    None => Verdict::Genuine,
                }
            }
            Err(PipelineError::Decode { source, .. }) => {
                Verdict::Bad(format!("its compressed bytes do not decode ({source})"))
            }
            Err(e) if judge::content_failure(&e) => Verdict::Bad(e.to_string()),
            Err(e) if judge::gone(&e) => Verdict::Gone,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e.into());
            }
        };
        match &verdict {
            Verdict::Genuine => tokio::fs::rename(&tmp, dest).await.map_err(io)?,
            Verdict::Bad(why) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                tracing::warn!(key = %object.key, file = %object.file.name(), why = %why,
                    "an object of the WAL archive is not what its name says; it is skipped");
            }
            Verdict::Gone => {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
        }
        self.verdicts.remember(&object.key, &verdict);
        Ok(verdict)
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
        let expected = Expected::raw_only(object.sha256);
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
    ///
    /// Names alone neither extend nor cut a window: every object whose name would (the last of
    /// each timeline, the first after a hole in one, any of two complete objects for one file, a
    /// history file) is read back and judged by its content, at most [`MAX_JUDGED`] per index; a
    /// bad one is left out and named in [`WalIndex::rejected`]. Objects in the middle of an
    /// unbroken run are not read here (`verify` and `wal-fetch` read them): leaving one out could
    /// only open a gap, and a gap of a genuine segment is what fetching it reports anyway.
    pub(crate) async fn index(&self, seg_size: u64) -> Result<WalIndex, WalError> {
        if !valid_seg_size(seg_size) {
            return Err(WalError::BadSegmentSize {
                size: seg_size,
                prefix: self.prefix(),
            });
        }
        let mut objects = self.list().await?;
        let mut rejected: Vec<String> = Vec::new();
        let mut judged = 0usize;
        let mut histories = Vec::new();
        // Every history file is read, as before (each at most 1 MiB): a timeline's is needed whole.
        for o in objects.iter().filter(|o| o.kind == Kind::History) {
            match self.verdict(o, Some(seg_size)).await? {
                Verdict::Genuine => histories.push((o.clone(), self.history(o).await?)),
                Verdict::Bad(why) => rejected.push(format!("{}: {why}", o.key)),
                Verdict::Gone => {}
            }
        }
        objects.retain(|o| o.kind != Kind::History);
        let mut genuine = std::collections::HashSet::new();
        loop {
            let index = WalIndex::new(seg_size, objects.iter().cloned(), histories.iter().cloned());
            let mut seen = std::collections::HashSet::new();
            let suspects: Vec<WalObject> = index
                .suspects()
                .into_iter()
                .chain(duplicates(&objects))
                .filter(|o| !genuine.contains(&o.key) && seen.insert(o.key.clone()))
                .collect();
            if suspects.is_empty() || judged >= MAX_JUDGED {
                if !suspects.is_empty() {
                    tracing::warn!(prefix = %self.prefix(), unjudged = suspects.len(),
                        "more WAL objects need judging than one listing reads; the rest count by their names");
                }
                return Ok(index.with_rejected(rejected));
            }
            for o in suspects.into_iter().take(MAX_JUDGED - judged) {
                judged += 1;
                match self.verdict(&o, Some(seg_size)).await? {
                    Verdict::Genuine => {
                        genuine.insert(o.key);
                    }
                    Verdict::Bad(why) => {
                        rejected.push(format!("{}: {why}", o.key));
                        objects.retain(|x| x.key != o.key);
                    }
                    Verdict::Gone => objects.retain(|x| x.key != o.key),
                }
            }
        }
    }
}

/// Every complete segment that shares its file with another complete one: which is the
/// file's only content judging can tell.
fn duplicates(objects: &[WalObject]) -> Vec<WalObject> {
    let mut count: std::collections::HashMap<WalFile, usize> = std::collections::HashMap::new();
    for o in objects.iter().filter(|o| o.kind == Kind::Seg) {
        *count.entry(o.file).or_default() += 1;
    }
    objects
        .iter()
        .filter(|o| o.kind == Kind::Seg && count.get(&o.file).is_some_and(|&n| n > 1))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Sha256Digest;

    fn settings() -> Settings {
        Settings {
            compression_level: 3,
            compression_threads: 0,
            part_size: 5 << 20,
            parts_in_flight: 1,
        }
    }

    const SEG: u64 = 1 << 20;

    /// A segment of cluster 42 with `SEG`-byte segments as PostgreSQL starts it: its long
    /// header, then zeros.
    fn segment(tli: u32, segno: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; SEG as usize];
        let header = crate::wal::header::first_page_header(42, tli, segno, SEG);
        bytes[..header.len()].copy_from_slice(&header);
        bytes
    }

    /// Puts `bytes` into the archive under the key of `file` as `kind`, digest and all, as anyone
    /// who can write to the bucket can; returns the key.
    async fn plant(
        archive: &WalArchive,
        file: WalFile,
        kind: Kind,
        bytes: &[u8],
        ms: i64,
    ) -> String {
        let digest = Sha256Digest::of(bytes);
        let at = DateTime::from_timestamp_millis(ms).unwrap();
        let end = if kind == Kind::Partial {
            0x100
        } else {
            bytes.len() as u64
        };
        let key = WalObject::key(&archive.prefix(), &file, kind, end, at, &digest);
        let upload = archive.store.start_upload(&key).await.unwrap();
        pipeline::upload(bytes, upload, &settings(), Arc::new(Counters::default()))
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
        key
    }

    fn named(name: &str) -> WalFile {
        WalFile::parse(name).unwrap()
    }

    /// Ships `bytes` as `name` of `kind` through a file, as the agent ships its spool.
    async fn ship(
        archive: &WalArchive,
        dir: &Path,
        name: &str,
        kind: Kind,
        bytes: &[u8],
    ) -> Shipped {
        let path = dir.join(format!("{name}.{}", kind.as_str()));
        std::fs::write(&path, bytes).unwrap();
        archive
            .ship(&path, named(name), kind, &settings())
            .await
            .unwrap()
    }

    /// Names planted ahead of the archive (junk whose key carries its true digest, and another
    /// cluster's segment) neither block shipping the real segment nor stand in for it, and a
    /// second object for a stored segment does not replace it when fetched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn planted_names_neither_block_shipping_nor_replace_the_real_segment() {
        let dir = tempfile::tempdir().unwrap();
        let archive = local_archive(dir.path()).await;
        let junk = vec![0x5Au8; SEG as usize];
        let mut foreign = segment(1, 4);
        foreign[24..32].copy_from_slice(&7u64.to_ne_bytes());
        plant(
            &archive,
            named("000000010000000000000004"),
            Kind::Seg,
            &junk,
            1,
        )
        .await;
        plant(
            &archive,
            named("000000010000000000000004"),
            Kind::Seg,
            &foreign,
            2,
        )
        .await;
        plant(
            &archive,
            named("000000010000000000000005"),
            Kind::Seg,
            &junk,
            3,
        )
        .await;

        // The partial of segment 4 is shipped: the planted complete ones do not stand in for it.
        let mut real = segment(1, 4);
        real[100..300].fill(9);
        assert!(matches!(
            ship(&archive, dir.path(), "000000010000000000000004", Kind::Partial, &real).await,
            Shipped::Stored(ref o) if o.kind == Kind::Partial
        ));
        // And so is the complete segment, with no conflict.
        let Shipped::Stored(stored) = ship(
            &archive,
            dir.path(),
            "000000010000000000000004",
            Kind::Seg,
            &real,
        )
        .await
        else {
            panic!("the real segment must be stored");
        };
        // Fetching it returns the real bytes, whatever else is stored under its name.
        let out = dir.path().join("out");
        let fetched = archive
            .fetch(&named("000000010000000000000004"), &out)
            .await
            .unwrap();
        assert_eq!(fetched, Fetched::Restored(stored));
        assert_eq!(std::fs::read(&out).unwrap(), real);
        // The planted segment 5 ahead of the archive is not WAL: it is the end of the archive.
        assert_eq!(
            archive
                .fetch(&named("000000010000000000000005"), &out)
                .await
                .unwrap(),
            Fetched::NotFound
        );
        // A genuine complete segment under the same name with other content is still a conflict.
        let mut other = real.clone();
        other[400] = 1;
        let path = dir.path().join("other");
        std::fs::write(&path, &other).unwrap();
        let err = archive
            .ship(
                &path,
                named("000000010000000000000004"),
                Kind::Seg,
                &settings(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, WalError::Conflict { .. }), "{err}");

        // The window: the planted names neither extend it nor open a gap, and are named.
        let index = archive.index(SEG).await.unwrap();
        let w = index.window(1, Lsn(4 * SEG));
        assert_eq!(w.latest_lsn, Lsn(5 * SEG));
        assert!(w.gaps.is_empty(), "{:?}", w.gaps);
        assert_eq!(w.rejected.len(), 3, "{:?}", w.rejected);
        assert!(
            w.rejected
                .iter()
                .any(|r| r.contains("another PostgreSQL cluster")),
            "{:?}",
            w.rejected
        );
    }

    /// A planted far-future name neither opens a gap in the window nor turns the end of the
    /// archive into one for `wal-fetch`; a genuine segment after a missing one still does both.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_far_future_name_is_no_gap_but_genuine_wal_after_a_hole_is() {
        let dir = tempfile::tempdir().unwrap();
        let archive = local_archive(dir.path()).await;
        ship(
            &archive,
            dir.path(),
            "000000010000000000000003",
            Kind::Seg,
            &segment(1, 3),
        )
        .await;
        let far = named("00000001000000FF000000FF");
        plant(&archive, far, Kind::Seg, &[1u8; 64], 1).await;
        // A second, bogus history file is skipped; the index still reads.
        plant(
            &archive,
            WalFile::History { timeline: 2 },
            Kind::History,
            b"garbage",
            1,
        )
        .await;
        let out = dir.path().join("out");
        assert_eq!(
            archive
                .fetch(&named("000000010000000000000004"), &out)
                .await
                .unwrap(),
            Fetched::NotFound
        );
        let index = archive.index(SEG).await.unwrap();
        let w = index.window(1, Lsn(3 * SEG));
        assert_eq!(
            (w.latest_lsn, w.gaps.len(), w.rejected.len()),
            (Lsn(4 * SEG), 0, 2),
            "{w:?}"
        );

        // Genuine WAL after a missing segment: a gap, loudly.
        ship(
            &archive,
            dir.path(),
            "000000010000000000000006",
            Kind::Seg,
            &segment(1, 6),
        )
        .await;
        let err = archive
            .fetch(&named("000000010000000000000004"), &out)
            .await
            .unwrap_err();
        assert!(matches!(err, WalError::Gap { .. }), "{err}");
        let w = archive.index(SEG).await.unwrap().window(1, Lsn(3 * SEG));
        assert_eq!(w.gaps.len(), 1, "{w:?}");
        // A bad only copy of a segment with genuine WAL after it is corruption, not the end.
        plant(
            &archive,
            named("000000010000000000000004"),
            Kind::Seg,
            &[2u8; 64],
            1,
        )
        .await;
        let err = archive
            .fetch(&named("000000010000000000000004"), &out)
            .await
            .unwrap_err();
        assert!(matches!(err, WalError::Corrupted { .. }), "{err}");
        assert!(!out.exists());
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
        let mut bytes = segment(1, 3);
        bytes[100..200].fill(7);
        std::fs::write(&path, &bytes).unwrap();

        // The partial shipped with the segment's final bytes does not stand in for it.
        let partial = archive
            .ship(&path, file, Kind::Partial, &settings)
            .await
            .unwrap();
        assert!(matches!(partial, Shipped::Stored(ref o) if o.end == 200));
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
        // genuine segment is a gap.
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

    /// A history file from the store larger than any real one is refused (left out of the index
    /// and named), and reading it stops: an earlier reader stopped taking bytes but kept its end
    /// of the pipe, and waited forever.
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
        let index = index.unwrap();
        assert!(
            index.rejected().len() == 1
                && index.rejected()[0].contains("00000002.history")
                && index.rejected()[0].contains("larger"),
            "{:?}",
            index.rejected()
        );
        // A segment size no PostgreSQL has is refused before anything is read.
        let err = archive.index(0).await.unwrap_err();
        assert!(matches!(err, WalError::BadSegmentSize { .. }), "{err}");
    }
}
