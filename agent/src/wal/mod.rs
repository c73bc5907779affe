//! The continuous WAL archive behind point-in-time recovery: how WAL files are named in the store,
//! shipped, fetched back, and how the recoverable window of a base backup is computed from what is
//! actually there.
//!
//! Layout under the store's prefix, one folder per PostgreSQL cluster (its system identifier, which
//! a point-in-time restore keeps, so a restored cluster's new timelines land beside the old ones):
//! ```text
//! wal/<system id>/<file>.<kind>.<end hex>.<captured unix ms>.<sha256 of raw bytes>.zst
//! ```
//! `<file>` is PostgreSQL's own name (`000000010000000000000003`, `00000002.history`); `<kind>` is
//! `seg` (a complete segment), `partial` (the segment being written, shipped every few seconds so
//! the recovery point does not wait for 16 MiB of WAL) or `history`; `<end>` is how many bytes of the
//! file hold WAL (the rest of a partial segment is zeros); `<captured>` is when the agent read it.
//!
//! Objects are content-addressed: the key carries the digest of the bytes, so shipping the same file
//! again finds its object and uploads nothing, and no object is ever overwritten with different
//! content — a different content gets a different key, and for a complete segment that is a conflict
//! the agent refuses to record. Newer partials supersede older ones of the same segment, and a
//! complete segment supersedes them all; superseded objects are deleted only after their successor
//! is stored.

pub mod stream;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::Arc,
};

use chrono::{DateTime, TimeZone, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use crate::{
    lsn::Lsn,
    pipeline::{self, Counters, Digest256, PipelineError, Settings},
    store::{Store, StoreError},
};

/// Folder of all WAL archives, relative to the store prefix.
pub const WAL_DIR: &str = "wal";
/// PostgreSQL aligns every WAL record to this many bytes (MAXALIGN), padding with zeros.
const WAL_ALIGN: u64 = 8;
/// Largest history file we read into memory (they hold one line per timeline switch).
const MAX_HISTORY_BYTES: usize = 1 << 20;

/// WAL archive errors; each names the WAL file it is about.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading, compressing or checking failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Two different complete copies of one WAL file: two clusters (or two timelines' histories)
    /// write into the same archive.
    #[error(
        "WAL file {file} already exists in the archive with different content ({existing}); refusing to store a second version. Two PostgreSQL servers with the same system identifier ship to {prefix} — give each cluster its own store prefix"
    )]
    Conflict {
        /// PostgreSQL's file name.
        file: String,
        /// Key of the existing object.
        existing: String,
        /// The archive folder.
        prefix: String,
    },
    /// A stored WAL file failed its checksum.
    #[error(
        "WAL file {file} in the store is corrupted ({key}): {detail}. Recovery cannot go past it; restore to a point before it, or from a base backup taken after it"
    )]
    Corrupted {
        /// PostgreSQL's file name.
        file: String,
        /// The object.
        key: String,
        /// The mismatch.
        detail: String,
    },
    /// A segment is missing although later WAL of its timeline exists.
    #[error(
        "WAL segment {file} is missing from the archive {prefix}, but later segments of timeline {timeline} exist: the archive has a gap, and replay cannot continue past it. Restore to a point before the gap, or from a base backup taken after it"
    )]
    Gap {
        /// PostgreSQL's file name.
        file: String,
        /// Timeline.
        timeline: u32,
        /// The archive folder.
        prefix: String,
    },
    /// A history file that does not parse.
    #[error("timeline history file {file} is unreadable: {reason}")]
    BadHistory {
        /// PostgreSQL's file name.
        file: String,
        /// Why.
        reason: String,
    },
}

impl WalError {
    /// True when stored data failed an integrity check or is missing from the middle of the archive.
    pub fn is_data_loss(&self) -> bool {
        matches!(self, WalError::Corrupted { .. } | WalError::Gap { .. })
            || matches!(self, WalError::Pipeline(e) if e.is_data_loss())
    }
}

/// A WAL file as PostgreSQL names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFile {
    /// A segment: timeline and segment number (in units of the segment size).
    Segment {
        /// Timeline id.
        timeline: u32,
        /// `log * segments_per_log + seg`, as PostgreSQL's XLogSegNo.
        log: u32,
        /// Low part of the name.
        seg: u32,
    },
    /// A timeline history file.
    History {
        /// The timeline it describes.
        timeline: u32,
    },
}

impl WalFile {
    /// Parses `000000010000000000000003` or `00000002.history`.
    pub fn parse(name: &str) -> Option<Self> {
        let hex8 = |s: &str| {
            (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(s, 16).ok())
                .flatten()
        };
        if let Some(tli) = name.strip_suffix(".history") {
            return Some(WalFile::History {
                timeline: hex8(tli)?,
            });
        }
        if name.len() != 24 {
            return None;
        }
        Some(WalFile::Segment {
            timeline: hex8(&name[0..8])?,
            log: hex8(&name[8..16])?,
            seg: hex8(&name[16..24])?,
        })
    }

    /// PostgreSQL's name for the file.
    pub fn name(&self) -> String {
        match self {
            WalFile::Segment { timeline, log, seg } => format!("{timeline:08X}{log:08X}{seg:08X}"),
            WalFile::History { timeline } => format!("{timeline:08X}.history"),
        }
    }

    /// The segment holding `lsn` on `timeline`.
    pub fn segment_of(timeline: u32, lsn: u64, seg_size: u64) -> Self {
        Self::from_segno(timeline, lsn / seg_size, seg_size)
    }

    /// The segment with number `segno` on `timeline`.
    pub fn from_segno(timeline: u32, segno: u64, seg_size: u64) -> Self {
        let per_log = 0x1_0000_0000 / seg_size;
        WalFile::Segment {
            timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// Segment number (XLogSegNo) of a segment.
    pub fn segno(&self, seg_size: u64) -> Option<u64> {
        match self {
            WalFile::Segment { log, seg, .. } => {
                Some(*log as u64 * (0x1_0000_0000 / seg_size) + *seg as u64)
            }
            WalFile::History { .. } => None,
        }
    }

    /// Timeline of the file.
    pub fn timeline(&self) -> u32 {
        match self {
            WalFile::Segment { timeline, .. } | WalFile::History { timeline } => *timeline,
        }
    }
}

/// What an archived object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A complete segment.
    Seg,
    /// The leading part of a segment still being written.
    Partial,
    /// A timeline history file.
    History,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Seg => "seg",
            Kind::Partial => "partial",
            Kind::History => "history",
        }
    }
}

/// One object of the WAL archive, decoded from its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalObject {
    /// Key relative to the store's prefix.
    pub key: String,
    /// The WAL file.
    pub file: WalFile,
    /// Complete, partial or history.
    pub kind: Kind,
    /// Bytes of the file that hold WAL.
    pub end: u64,
    /// When the agent read the file.
    pub captured: DateTime<Utc>,
    /// Hex sha256 of the file's bytes.
    pub sha256: String,
}

impl WalObject {
    fn parse(key: &str, prefix: &str) -> Option<Self> {
        let rest = key.strip_prefix(prefix)?.strip_suffix(".zst")?;
        let mut parts = rest.rsplitn(5, '.');
        let sha256 = parts.next()?;
        let captured: i64 = parts.next()?.parse().ok()?;
        let end = u64::from_str_radix(parts.next()?, 16).ok()?;
        let kind = match parts.next()? {
            "seg" => Kind::Seg,
            "partial" => Kind::Partial,
            "history" => Kind::History,
            _ => return None,
        };
        let file = WalFile::parse(parts.next()?)?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(Self {
            key: key.to_string(),
            file,
            kind,
            end,
            captured: Utc.timestamp_millis_opt(captured).single()?,
            sha256: sha256.to_string(),
        })
    }

    /// The archive position this object reaches: its segment's start plus its valid bytes.
    pub fn end_lsn(&self, seg_size: u64) -> Option<u64> {
        Some(self.file.segno(seg_size)? * seg_size + self.end)
    }
}

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
        end,
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

    fn key(&self, file: &WalFile, kind: Kind, digest: &FileDigest, at: DateTime<Utc>) -> String {
        format!(
            "{}{}.{}.{:08x}.{}.{}.zst",
            self.prefix(),
            file.name(),
            kind.as_str(),
            digest.end,
            at.timestamp_millis(),
            digest.sha256
        )
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
        let key = self.key(&file, kind, &digest, Utc::now());
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
        let object = WalObject::parse(&key, &self.prefix()).expect("keys we make parse");
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
        let expected = Digest256::raw_only(&object.sha256);
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
    async fn history(&self, object: &WalObject) -> Result<Vec<(u32, u64)>, WalError> {
        let mut out = Vec::new();
        let (tx, mut rx) = tokio::io::duplex(64 * 1024);
        let expected = Digest256::raw_only(&object.sha256);
        let key = object.key.clone();
        let store = self.store.clone();
        let reader = async {
            let mut raw = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = rx.read(&mut buf).await.map_err(|source| WalError::Io {
                    path: key.clone(),
                    source,
                })?;
                if n == 0 || raw.len() > MAX_HISTORY_BYTES {
                    break;
                }
                raw.extend_from_slice(&buf[..n]);
            }
            Ok::<_, WalError>(raw)
        };
        let download = async {
            pipeline::download(
                store.as_ref(),
                &object.key,
                &expected,
                tx,
                0,
                Arc::new(Counters::default()),
            )
            .await
        };
        let (raw, downloaded) = tokio::join!(reader, download);
        downloaded.map_err(|e| WalError::Corrupted {
            file: object.file.name(),
            key: object.key.clone(),
            detail: e.to_string(),
        })?;
        let text = String::from_utf8_lossy(&raw?).into_owned();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let parsed = (|| {
                let tli: u32 = fields.next()?.parse().ok()?;
                let lsn = fields.next()?.parse::<Lsn>().ok()?.0;
                Some((tli, lsn))
            })();
            out.push(parsed.ok_or_else(|| WalError::BadHistory {
                file: object.file.name(),
                reason: format!("line {line:?}"),
            })?);
        }
        Ok(out)
    }

    /// Builds the index that recoverable windows are computed from: one LIST of the archive plus a
    /// read of each (small) history file.
    pub async fn index(&self, seg_size: u64) -> Result<WalIndex, WalError> {
        let objects = self.list().await?;
        let mut histories = HashMap::new();
        let mut history_objects = HashMap::new();
        for o in objects.iter().filter(|o| o.kind == Kind::History) {
            histories.insert(o.file.timeline(), self.history(o).await?);
            history_objects.insert(o.file.timeline(), o.clone());
        }
        let mut segments: BTreeMap<(u32, u64), WalObject> = BTreeMap::new();
        for o in objects {
            let Some(segno) = o.file.segno(seg_size) else {
                continue;
            };
            let slot = segments
                .entry((o.file.timeline(), segno))
                .or_insert(o.clone());
            let better = match (slot.kind, o.kind) {
                (Kind::Seg, _) => false,
                (_, Kind::Seg) => true,
                _ => o.end > slot.end,
            };
            if better {
                *slot = o;
            }
        }
        Ok(WalIndex {
            seg_size,
            segments,
            histories,
            history_objects,
        })
    }
}

/// The archive's segments and timeline histories, for computing recoverable windows.
#[derive(Debug, Clone)]
pub struct WalIndex {
    seg_size: u64,
    /// Best object per (timeline, segment number): complete before partial, longest partial.
    segments: BTreeMap<(u32, u64), WalObject>,
    /// Timeline → its history (parent timeline, switch LSN), oldest first.
    histories: HashMap<u32, Vec<(u32, u64)>>,
    /// Timeline → the object holding its history file.
    history_objects: HashMap<u32, WalObject>,
}

/// How far a base backup can be rolled forward with the WAL in the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryWindow {
    /// The timeline recovery ends on (`recovery_target_timeline = latest`).
    pub timeline: u32,
    /// Archive position reached without a gap.
    pub latest_lsn: u64,
    /// When the agent captured the last WAL before that position: commits up to about then are
    /// recoverable.
    pub latest_time: Option<DateTime<Utc>>,
    /// Missing stretches after which more WAL exists (unusable without the missing part).
    pub gaps: Vec<String>,
}

impl WalIndex {
    /// The timelines recovery follows from `timeline` at `from_lsn`: the newest timeline whose
    /// history passes through `timeline` after `from_lsn`, as (timeline, first LSN) pairs.
    fn path(&self, timeline: u32, from_lsn: u64) -> Vec<(u32, u64)> {
        let mut best = vec![(timeline, from_lsn)];
        for (&tli, history) in &self.histories {
            if tli <= best.last().map_or(0, |b| b.0) {
                continue;
            }
            // history: [(parent, switch)] oldest first; the timeline's ancestry is these parents.
            let Some(pos) = history.iter().position(|&(p, _)| p == timeline) else {
                continue;
            };
            if history[pos].1 < from_lsn {
                continue; // branched off before the backup was consistent
            }
            let mut path = vec![(timeline, from_lsn)];
            for (i, &(_, switch)) in history.iter().enumerate().skip(pos) {
                let next = history.get(i + 1).map_or(tli, |h| h.0);
                path.push((next, switch));
            }
            best = path;
        }
        best
    }

    /// The window of a base backup consistent at `stop_lsn` on `timeline`.
    pub fn window(&self, timeline: u32, stop_lsn: u64) -> RecoveryWindow {
        let path = self.path(timeline, stop_lsn);
        let tli_for = |segno: u64| {
            path.iter()
                .rev()
                .find(|&&(_, begin)| begin / self.seg_size <= segno)
                .map_or(timeline, |p| p.0)
        };
        let last_tli = path.last().map_or(timeline, |p| p.0);
        // Only WAL on the recovery path counts: an older timeline that went on after the switch
        // is not part of it (and its later segments are no gap in the newer one).
        let max_segno = self
            .segments
            .keys()
            .filter(|&&(t, s)| tli_for(s) == t && s >= stop_lsn / self.seg_size)
            .map(|&(_, s)| s)
            .max();
        let mut window = RecoveryWindow {
            timeline: last_tli,
            latest_lsn: stop_lsn,
            latest_time: None,
            gaps: Vec::new(),
        };
        let Some(max_segno) = max_segno else {
            return window;
        };
        let mut segno = stop_lsn / self.seg_size;
        let mut missing_from: Option<u64> = None;
        let mut contiguous = true;
        while segno <= max_segno {
            let tli = tli_for(segno);
            match self.segments.get(&(tli, segno)) {
                Some(o) => {
                    if let Some(from) = missing_from.take() {
                        window.gaps.push(format!(
                            "{} … {}",
                            WalFile::from_segno(tli, from, self.seg_size).name(),
                            WalFile::from_segno(tli, segno - 1, self.seg_size).name()
                        ));
                    }
                    if contiguous {
                        window.latest_lsn = o.end_lsn(self.seg_size).unwrap_or(stop_lsn);
                        window.latest_time = Some(o.captured);
                        // A partial is the end of what is known of this timeline's segment.
                        if o.kind == Kind::Partial && segno < max_segno && tli_for(segno + 1) == tli
                        {
                            contiguous = false;
                        }
                    }
                }
                None => {
                    contiguous = false;
                    missing_from.get_or_insert(segno);
                }
            }
            segno += 1;
        }
        window
    }

    /// The WAL objects a restore of a base backup (replay from `start_lsn`, consistent at
    /// `stop_lsn` on `timeline`) reads to reach the end of its window, in replay order: what
    /// `verify` re-reads to prove the chain restorable.
    pub fn chain(&self, timeline: u32, start_lsn: u64, stop_lsn: u64) -> Vec<WalObject> {
        let path = self.path(timeline, stop_lsn);
        let end = self.window(timeline, stop_lsn).latest_lsn;
        let mut out: Vec<WalObject> = self
            .histories
            .keys()
            .filter(|t| path.iter().any(|p| p.0 == **t))
            .filter_map(|t| self.history_objects.get(t).cloned())
            .collect();
        for segno in start_lsn / self.seg_size..=end.saturating_sub(1) / self.seg_size {
            let tli = path
                .iter()
                .rev()
                .find(|&&(_, begin)| begin / self.seg_size <= segno)
                .map_or(timeline, |p| p.0);
            if let Some(o) = self.segments.get(&(tli, segno)) {
                out.push(o.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn names_and_lsns() {
        let f = WalFile::parse("00000002000000010000003F").unwrap();
        assert_eq!(f.segno(SEG), Some(256 + 63));
        assert_eq!(f.name(), "00000002000000010000003F");
        assert_eq!(WalFile::segment_of(2, (1 << 32) + 63 * SEG + 5, SEG), f);
        assert_eq!(
            WalFile::parse("00000003.history"),
            Some(WalFile::History { timeline: 3 })
        );
        assert!(WalFile::parse("0000000100000000000000ZZ").is_none());
        assert!(WalFile::parse("000000010000000000000001.partial").is_none());
    }

    fn obj(tli: u32, segno: u64, kind: Kind, end: u64, ms: i64) -> WalObject {
        let file = WalFile::from_segno(tli, segno, SEG);
        let key = format!(
            "wal/1/{}.{}.{end:08x}.{ms}.{}.zst",
            file.name(),
            kind.as_str(),
            "a".repeat(64)
        );
        WalObject::parse(&key, "wal/1/").unwrap()
    }

    fn index(objects: Vec<WalObject>, histories: Vec<(u32, Vec<(u32, u64)>)>) -> WalIndex {
        let mut segments = BTreeMap::new();
        for o in objects {
            segments.insert((o.file.timeline(), o.file.segno(SEG).unwrap()), o);
        }
        WalIndex {
            seg_size: SEG,
            segments,
            histories: histories.into_iter().collect(),
            history_objects: HashMap::new(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shipping_is_idempotent_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            crate::store::local::LocalStore::open(dir.path().join("store"))
                .await
                .unwrap(),
        );
        let settings = Settings {
            compression_level: 3,
            compression_threads: 0,
            part_size: 5 << 20,
            parts_in_flight: 1,
        };
        let archive = WalArchive::new(store, "42");
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
    fn keys_round_trip() {
        let o = obj(1, 3, Kind::Partial, 0x2000, 1_700_000_000_000);
        assert_eq!(o.kind, Kind::Partial);
        assert_eq!(o.end_lsn(SEG), Some(3 * SEG + 0x2000));
        assert!(WalObject::parse("wal/1/x.seg.0.0.abc.zst", "wal/1/").is_none());
    }

    #[test]
    fn window_follows_the_archive_and_reports_gaps() {
        let idx = index(
            vec![
                obj(1, 2, Kind::Seg, SEG, 1000),
                obj(1, 3, Kind::Seg, SEG, 2000),
                obj(1, 4, Kind::Partial, 0x4000, 3000),
            ],
            vec![],
        );
        let w = idx.window(1, 2 * SEG + 100);
        assert_eq!(w.latest_lsn, 4 * SEG + 0x4000);
        assert_eq!(w.latest_time.unwrap().timestamp_millis(), 3000);
        assert!(w.gaps.is_empty());

        let gap = index(
            vec![
                obj(1, 2, Kind::Seg, SEG, 1000),
                obj(1, 5, Kind::Seg, SEG, 4000),
            ],
            vec![],
        );
        let w = gap.window(1, 2 * SEG + 100);
        assert_eq!(w.latest_lsn, 3 * SEG);
        // The chain a restore reads stops where the window does.
        let chain: Vec<u64> = gap
            .chain(1, 2 * SEG, 2 * SEG + 100)
            .iter()
            .map(|o| o.file.segno(SEG).unwrap())
            .collect();
        assert_eq!(chain, vec![2]);
        let chain: Vec<u64> = idx
            .chain(1, 2 * SEG, 2 * SEG + 100)
            .iter()
            .map(|o| o.file.segno(SEG).unwrap())
            .collect();
        assert_eq!(chain, vec![2, 3, 4]);
        assert_eq!(
            w.gaps,
            vec!["000000010000000000000003 … 000000010000000000000004"]
        );
    }

    #[test]
    fn window_follows_a_newer_timeline() {
        // Timeline 2 branched from 1 inside segment 4.
        let idx = index(
            vec![
                obj(1, 3, Kind::Seg, SEG, 1000),
                obj(1, 4, Kind::Partial, 0x8000, 2000),
                obj(2, 4, Kind::Seg, SEG, 3000),
                obj(2, 5, Kind::Partial, 0x2000, 4000),
            ],
            vec![(2, vec![(1, 4 * SEG + 0x6000)])],
        );
        let w = idx.window(1, 3 * SEG + 10);
        assert_eq!(w.timeline, 2);
        assert_eq!(w.latest_lsn, 5 * SEG + 0x2000);
        assert!(w.gaps.is_empty(), "{:?}", w.gaps);
        // Timeline 1 going on after the branch (the old server kept running) is no gap in 2.
        let mut idx = idx;
        for segno in 5..9 {
            let o = obj(1, segno, Kind::Seg, SEG, 5000);
            idx.segments.insert((1, segno), o);
        }
        let w = idx.window(1, 3 * SEG + 10);
        assert_eq!(w.timeline, 2);
        assert!(w.gaps.is_empty(), "{:?}", w.gaps);
        assert_eq!(w.latest_lsn, 5 * SEG + 0x2000);
        // A backup taken after the branch point does not follow timeline 2.
        let w = idx.window(1, 4 * SEG + 0x7000);
        assert_eq!(w.timeline, 1);
    }
}
