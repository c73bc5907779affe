//! The local spool pg_receivewal writes into, and shipping from it: which files are complete,
//! which one is in progress, what may be deleted once shipped, repairing what an interrupted
//! pg_receivewal or agent left behind, and moving aside what the server cannot have written.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::Duration,
};

use chrono::Utc;
use tokio::io::AsyncReadExt;

use super::{
    Kind, Shipped, WalArchive, WalError, WalFile,
    header::{self, Impossible, LONG_HEADER_LEN, ServerWal},
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
        spool_files(&self.spool).await
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

/// WAL files in `spool` (complete, partial and history), oldest first; other entries (the pid
/// file, snapshots being shipped, the set-aside folder) are not WAL and are left out.
async fn spool_files(spool: &Path) -> Result<Vec<(WalFile, Kind, PathBuf)>, StreamError> {
    let mut out = Vec::new();
    let mut dir = tokio::fs::read_dir(spool)
        .await
        .map_err(|source| StreamError::Spool {
            path: spool.to_path_buf(),
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

/// Folder of the spool that files the server cannot have written are moved into, one subfolder
/// per start that found any. pg_receivewal and the shipper look at the spool's files only, not
/// into folders.
pub(super) const SET_ASIDE_DIR: &str = "set-aside";
/// How many set-aside files `status` names (the count covers them all).
pub(super) const SET_ASIDE_SHOWN: usize = 10;

/// Moves every WAL file of `spool` that `server` cannot have written (see [`header::check`]:
/// another cluster's, a timeline or position past the server's, a damaged first page) into
/// `set-aside/<time>/` of the spool, each named in a warning and in the status. None is deleted
/// (they are the only copy of whatever they are) and none is shipped; pg_receivewal then resumes
/// after the files that are the server's, or from the slot.
///
/// Run before anything in the spool is shipped or pg_receivewal started: pg_receivewal resumes
/// after the newest file it finds, whoever wrote it. Fails when a file cannot be moved, and then
/// nothing may be shipped or received until it can. Returns how many files were moved.
pub(super) async fn set_aside_impossible(
    spool: &Path,
    server: &ServerWal,
    status: &SharedStatus,
) -> Result<usize, StreamError> {
    let mut folder: Option<PathBuf> = None;
    let mut moved = 0;
    for (file, kind, path) in spool_files(spool).await? {
        let Err(reason) = judge(&path, file, kind, server).await else {
            continue;
        };
        let folder = match &folder {
            Some(f) => f.clone(),
            None => folder.insert(new_set_aside_folder(spool).await?).clone(),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let target = folder.join(&name);
        match tokio::fs::rename(&path, &target).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(StreamError::Spool { path, source }),
        }
        tracing::warn!(
            file = %name,
            %reason,
            moved_to = %target.display(),
            "WAL spool file set aside: the server cannot have written it; it is neither shipped nor resumed from"
        );
        let mut s = lock(status);
        s.set_aside_files += 1;
        if s.set_aside.len() >= SET_ASIDE_SHOWN {
            s.set_aside.remove(0);
        }
        s.set_aside
            .push(format!("{name}: {reason}; moved to {}", target.display()));
        moved += 1;
    }
    if moved > 0 {
        // The moves are durable before anything is shipped or received after them.
        for dir in folder.iter().map(PathBuf::as_path).chain([spool]) {
            if let Ok(dir) = tokio::fs::File::open(dir).await {
                let _ = dir.sync_all().await;
            }
        }
    }
    Ok(moved)
}

/// Whether `server` can have written the spool file at `path`: reads its size and first page
/// header and asks [`header::check`].
async fn judge(
    path: &Path,
    file: WalFile,
    kind: Kind,
    server: &ServerWal,
) -> Result<(), Impossible> {
    if kind == Kind::History {
        return header::check(file, kind, 0, &[], server);
    }
    let read = async {
        let f = tokio::fs::File::open(path).await?;
        let size = f.metadata().await?.len();
        let mut head = Vec::with_capacity(LONG_HEADER_LEN);
        f.take(LONG_HEADER_LEN as u64)
            .read_to_end(&mut head)
            .await?;
        Ok::<_, std::io::Error>((size, head))
    };
    let (size, head) = read
        .await
        .map_err(|e| Impossible::Unreadable(e.to_string()))?;
    header::check(file, kind, size, &head, server)
}

/// A new, empty `set-aside/<UTC time>` folder in `spool` (with a suffix when one of that name
/// exists, so no set-aside file ever replaces another).
async fn new_set_aside_folder(spool: &Path) -> Result<PathBuf, StreamError> {
    let parent = spool.join(SET_ASIDE_DIR);
    let spool_error = |path: &Path, source| StreamError::Spool {
        path: path.to_path_buf(),
        source,
    };
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| spool_error(&parent, e))?;
    let stamp = Utc::now().format("%Y%m%dT%H%M%S%.3fZ").to_string();
    let mut attempt = 0u32;
    loop {
        let folder = match attempt {
            0 => parent.join(&stamp),
            n => parent.join(format!("{stamp}-{n}")),
        };
        match tokio::fs::create_dir(&folder).await {
            Ok(()) => return Ok(folder),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => {
                attempt += 1;
            }
            Err(e) => return Err(spool_error(&folder, e)),
        }
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
    for (file, kind, path) in spool_files(spool).await? {
        if kind != Kind::Partial || !matches!(file, WalFile::Segment { .. }) {
            continue;
        }
        // Not following a link, as the directory entry's metadata does not.
        let size = tokio::fs::symlink_metadata(&path)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if size == 0 || size >= seg_size {
            continue;
        }
        tracing::warn!(file = %path.display(), size, "completing the zero-fill of a partial segment an interrupted pg_receivewal left short");
        let spool_error = |source| StreamError::Spool {
            path: path.clone(),
            source,
        };
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(&path)
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
    use crate::lsn::Lsn;

    /// A spool with this server's WAL, another cluster's colliding names, a history file of a
    /// timeline the server does not have and a file that is not WAL: only the impossible ones
    /// move, intact, into one set-aside folder, and the status names them; a second look finds
    /// nothing more.
    #[tokio::test]
    async fn files_the_server_cannot_have_written_are_moved_aside_intact() {
        let spool = tempfile::tempdir().unwrap();
        let seg = 1u64 << 20;
        let server = ServerWal {
            system_id: 7,
            timeline: 1,
            flush: Lsn(2 * seg + 100),
            seg_size: seg,
        };
        let segment = |system_id: u64, segno: u64| {
            let mut bytes = header::first_page_header(system_id, 1, segno, seg);
            bytes.resize(seg as usize, 0);
            bytes[1000] = 0xAB;
            bytes
        };
        let write =
            |name: &str, bytes: &[u8]| std::fs::write(spool.path().join(name), bytes).unwrap();
        // This server's complete segment 1 is shipped and gone; the partial 2 is being written.
        write("000000010000000000000002.partial", &segment(7, 2));
        // Another cluster's segments, under names this server writes too.
        write("000000010000000000000000", &segment(8, 0));
        let foreign = segment(8, 1);
        write("000000010000000000000001", &foreign);
        // This server's segment 1, renamed ahead.
        let own = segment(7, 1);
        write("000000010000000000000004", &own);
        // A partial pg_receivewal filled with zeros and wrote nothing into.
        write("000000010000000000000003.partial", &vec![0; seg as usize]);
        write(
            "00000002.history",
            b"1\t0/3000060\tno recovery target specified\n",
        );
        write("notes.txt", b"not WAL");
        let status = SharedStatus::default();

        let moved = set_aside_impossible(spool.path(), &server, &status)
            .await
            .unwrap();
        assert_eq!(moved, 5);
        let mut left: Vec<String> = std::fs::read_dir(spool.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "000000010000000000000002.partial",
                "notes.txt",
                SET_ASIDE_DIR
            ]
        );
        let folders: Vec<PathBuf> = std::fs::read_dir(spool.path().join(SET_ASIDE_DIR))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(folders.len(), 1, "{folders:?}");
        assert_eq!(
            std::fs::read(folders[0].join("000000010000000000000001")).unwrap(),
            foreign
        );
        assert_eq!(
            std::fs::read(folders[0].join("000000010000000000000004")).unwrap(),
            own
        );
        let s = lock(&status).clone();
        assert_eq!(s.set_aside_files, 5);
        let said = s.set_aside.join("\n");
        for expected in [
            "000000010000000000000000: written by another PostgreSQL cluster (system identifier 8; this server's is 7)",
            "000000010000000000000001: written by another PostgreSQL cluster",
            "000000010000000000000003.partial: no WAL page header at its start (zeros)",
            "000000010000000000000004: its first page is at 0/100000, but its name puts it at 0/400000",
            "00000002.history: timeline 2 is after the server's timeline 1",
        ] {
            assert!(said.contains(expected), "{expected:?} not in:\n{said}");
        }
        assert!(said.contains("moved to "), "{said}");

        // What is left is the server's: a second start moves nothing, and makes no folder.
        assert_eq!(
            set_aside_impossible(spool.path(), &server, &status)
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            std::fs::read_dir(spool.path().join(SET_ASIDE_DIR))
                .unwrap()
                .count(),
            1
        );
        assert_eq!(lock(&status).set_aside_files, 5);
    }

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
