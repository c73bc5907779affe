//! The local spool pg_receivewal writes into, and shipping from it: which files are complete,
//! which one is in progress, what may be deleted once shipped, and repairing what an interrupted
//! pg_receivewal or agent left behind.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono::Utc;

use super::{
    Kind, Shipped, WalArchive, WalError, WalFile,
    stream::{PID_FILE, SharedStatus, StreamError, lock},
};
use crate::pipeline::Settings;

/// Ships the spool's files and keeps the status current.
pub(super) struct Shipper {
    archive: WalArchive,
    spool: PathBuf,
    settings: Settings,
    seg_size: u64,
    status: SharedStatus,
    /// (file, modification time in ns) of the last partial shipped, so an unchanged one is not
    /// read again.
    last_partial: Option<(String, u64)>,
    /// Complete files shipped in this session (the newest stays in the spool; it is not read
    /// again every scan).
    shipped: HashSet<WalFile>,
}

impl Shipper {
    /// A shipper of `spool` into `archive`, for a cluster with `seg_size` segments.
    pub(super) fn new(
        archive: WalArchive,
        spool: PathBuf,
        settings: Settings,
        seg_size: u64,
        status: SharedStatus,
    ) -> Self {
        Self {
            archive,
            spool,
            settings,
            seg_size,
            status,
            last_partial: None,
            shipped: HashSet::new(),
        }
    }

    /// Local WAL files in the spool (complete, partial and history), oldest first.
    async fn spool_files(&self) -> Result<Vec<(WalFile, Kind, PathBuf)>, StreamError> {
        let mut out = Vec::new();
        let mut dir =
            tokio::fs::read_dir(&self.spool)
                .await
                .map_err(|source| StreamError::Spool {
                    path: self.spool.clone(),
                    source,
                })?;
        while let Ok(Some(entry)) = dir.next_entry().await {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (base, kind) = match name.strip_suffix(".partial") {
                Some(base) => (base.to_string(), Kind::Partial),
                None => (name.clone(), Kind::Seg),
            };
            let Some(file) = WalFile::parse(&base) else {
                continue;
            };
            let kind = match (file, kind) {
                (WalFile::History { .. }, Kind::Seg) => Kind::History,
                (WalFile::History { .. }, _) => continue,
                (_, k) => k,
            };
            out.push((file, kind, entry.path()));
        }
        out.sort_by_key(|f| (f.0, f.1 as u8));
        Ok(out)
    }

    async fn ship_one(&mut self, path: &Path, file: WalFile, kind: Kind) -> Result<(), WalError> {
        let shipped = self.archive.ship(path, file, kind, &self.settings).await?;
        let object = match &shipped {
            Shipped::Stored(o) | Shipped::AlreadyThere(o) => o.clone(),
        };
        if let Shipped::Stored(o) = &shipped {
            tracing::debug!(key = %o.key, "shipped");
        }
        let mut s = lock(&self.status);
        if let Some(end) = object.end_lsn(self.seg_size)
            && end > s.archived_lsn
        {
            s.archived_lsn = end;
        }
        s.last_file = object.file.name();
        s.last_shipped_at = Some(Utc::now());
        if matches!(shipped, Shipped::Stored(_)) {
            match kind {
                Kind::Seg => s.segments_shipped += 1,
                Kind::Partial => s.partials_shipped += 1,
                Kind::History => {}
            }
        }
        Ok(())
    }

    /// Complete segments in the spool not shipped yet.
    pub(super) async fn unshipped(&self) -> usize {
        self.spool_files().await.map_or(0, |files| {
            files
                .iter()
                .filter(|f| f.1 == Kind::Seg && !self.shipped.contains(&f.0))
                .count()
        })
    }

    /// Ships complete segments and history files; deletes all but the newest segment afterwards.
    pub(super) async fn ship_complete(&mut self) -> Result<(), StreamError> {
        let files = self.spool_files().await?;
        let newest_segment = files.iter().filter(|f| f.1 == Kind::Seg).map(|f| f.0).max();
        let newest_partial = files
            .iter()
            .filter(|f| f.1 == Kind::Partial)
            .map(|f| f.0)
            .max();
        for (file, kind, path) in files {
            match kind {
                Kind::Partial => {
                    // A partial older than a complete copy of itself is a leftover: the complete
                    // segment supersedes it.
                    if Some(file) != newest_partial {
                        let _ = tokio::fs::remove_file(&path).await;
                    }
                    continue;
                }
                Kind::Seg | Kind::History => {
                    if !self.shipped.contains(&file) {
                        match self.ship_one(&path, file, kind).await {
                            Ok(()) => {}
                            // Another version is stored: keeping on trying would stop all WAL
                            // after it from being archived. Say so, keep the local file for the
                            // operator, and go on.
                            Err(e @ WalError::Conflict { .. }) => {
                                tracing::error!(error = %e, "WAL file not archived");
                                lock(&self.status).last_error = Some(e.to_string());
                                self.shipped.insert(file);
                                continue;
                            }
                            Err(source) => {
                                return Err(StreamError::Ship {
                                    file: file.name(),
                                    source,
                                });
                            }
                        }
                        self.shipped.insert(file);
                    }
                    // pg_receivewal resumes after the newest file it finds, so that one stays.
                    let keep = kind == Kind::History
                        || (Some(file) == newest_segment
                            && newest_partial.is_none_or(|p| p < file));
                    if !keep {
                        let _ = tokio::fs::remove_file(&path).await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Ships the segment being received, when it grew since the last time (`always`: whether or
    /// not it seems to have grown) — after every complete file before it, so the archived
    /// position never runs ahead of what the store holds.
    ///
    /// "Grew" is judged by the modification time, which the kernel keeps at a granularity of
    /// milliseconds: a write in the same tick as the last shipment's copy goes unnoticed until
    /// the next write. The final shipment, after pg_receivewal stopped, passes `always`.
    pub(super) async fn ship_partial(&mut self, always: bool) -> Result<(), StreamError> {
        self.ship_complete().await?;
        let files = self.spool_files().await?;
        if files
            .iter()
            .any(|f| f.1 != Kind::Partial && !self.shipped.contains(&f.0))
        {
            // A segment completed since: the next scan ships it, then the partial after it.
            return Ok(());
        }
        let Some((file, _, path)) = files.into_iter().rfind(|f| f.1 == Kind::Partial) else {
            return Ok(());
        };
        let spool_error = |path: &Path, source| StreamError::Spool {
            path: path.to_path_buf(),
            source,
        };
        // pg_receivewal pre-allocates the file, so the size says nothing; the modification time
        // and the digest do. Cheap enough to hash 16 MiB every few seconds.
        let modified = match tokio::fs::metadata(&path).await {
            Ok(m) => m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as u64),
            // Renamed to complete between listing and now: the next scan ships it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(spool_error(&path, e)),
        };
        if !always && self.last_partial.as_ref() == Some(&(file.name(), modified)) {
            return Ok(());
        }
        // Ship a copy: pg_receivewal keeps writing the original, and the object's name must be
        // the digest of exactly what is uploaded.
        let snapshot = self.spool.join(format!(".soma-{}.snapshot", file.name()));
        if let Err(e) = tokio::fs::copy(&path, &snapshot).await {
            let _ = tokio::fs::remove_file(&snapshot).await;
            return match e.kind() {
                std::io::ErrorKind::NotFound => Ok(()), // renamed meanwhile
                // E.g. the spool volume is full: say so rather than skip the WAL silently.
                _ => Err(spool_error(&snapshot, e)),
            };
        }
        let shipped = self.ship_one(&snapshot, file, Kind::Partial).await;
        let _ = tokio::fs::remove_file(&snapshot).await;
        shipped.map_err(|source| StreamError::Ship {
            file: format!("{}.partial", file.name()),
            source,
        })?;
        self.last_partial = Some((file.name(), modified));
        Ok(())
    }
}

/// pg_receivewal zero-fills a new `.partial` file to the segment size before writing WAL into it,
/// and refuses to resume from one of any other size. Killed during that fill (with the agent, or
/// by the node going down) it leaves a short file that would stop it for good: its bytes are a
/// valid prefix (zeros, or WAL followed by zeros), so finishing the fill is what pg_receivewal
/// itself would have done.
pub(super) async fn complete_torn_preallocation(
    spool: &Path,
    seg_size: u64,
) -> Result<(), StreamError> {
    let mut dir = tokio::fs::read_dir(spool)
        .await
        .map_err(|source| StreamError::Spool {
            path: spool.to_path_buf(),
            source,
        })?;
    while let Ok(Some(entry)) = dir.next_entry().await {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(base) = name.strip_suffix(".partial") else {
            continue;
        };
        if !matches!(WalFile::parse(base), Some(WalFile::Segment { .. })) {
            continue;
        }
        let size = entry.metadata().await.map(|m| m.len()).unwrap_or(0);
        if size == 0 || size >= seg_size {
            continue;
        }
        tracing::warn!(file = %name, size, "completing the zero-fill of a partial segment an interrupted pg_receivewal left short");
        let spool_error = |source| StreamError::Spool {
            path: entry.path(),
            source,
        };
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(entry.path())
            .await
            .map_err(spool_error)?;
        file.set_len(seg_size).await.map_err(spool_error)?;
        file.sync_all().await.map_err(spool_error)?;
    }
    Ok(())
}

/// Stops a pg_receivewal that a killed agent left running (it would hold the slot).
pub(super) async fn stop_leftover_receiver(spool: &Path) {
    let Ok(pid) = tokio::fs::read_to_string(spool.join(PID_FILE)).await else {
        return;
    };
    // Only a single positive pid: 0 and negative numbers would signal whole process groups.
    let Some(pid) = pid.trim().parse::<i32>().ok().filter(|p| *p > 0) else {
        return;
    };
    // A live pg_receivewal: a process that exited but was not reaped yet (a zombie) has an
    // empty command line, and counts as gone.
    let running = || async move {
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline"))
            .await
            .unwrap_or_default();
        String::from_utf8_lossy(&cmdline).contains("pg_receivewal")
    };
    if !running().await {
        return;
    }
    tracing::warn!(
        pid,
        "stopping the pg_receivewal a previous agent left running"
    );
    let target = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..100 {
        if !running().await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if running().await {
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = tokio::fs::remove_file(spool.join(PID_FILE)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_short_partial_is_zero_filled_to_the_segment_size_keeping_its_bytes() {
        let spool = tempfile::tempdir().unwrap();
        let seg = 1 << 20;
        let torn = spool.path().join("000000010000000000000008.partial");
        std::fs::write(&torn, [7u8; 4096]).unwrap();
        let whole = spool.path().join("000000010000000000000007.partial");
        std::fs::write(&whole, vec![1u8; seg as usize]).unwrap();
        let other = spool.path().join("notes.partial");
        std::fs::write(&other, b"x").unwrap();

        complete_torn_preallocation(spool.path(), seg)
            .await
            .unwrap();

        let bytes = std::fs::read(&torn).unwrap();
        assert_eq!(bytes.len() as u64, seg);
        assert!(bytes[..4096].iter().all(|&b| b == 7));
        assert!(bytes[4096..].iter().all(|&b| b == 0));
        assert_eq!(std::fs::read(&whole).unwrap(), vec![1u8; seg as usize]);
        assert_eq!(std::fs::read(&other).unwrap(), b"x");
    }
}
