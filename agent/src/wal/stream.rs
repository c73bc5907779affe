//! Continuous WAL archiving: `pg_receivewal` under the agent's supervision, shipping what it writes.
//!
//! pg_receivewal holds a physical replication slot, so the primary keeps every WAL segment until it
//! was received, and writes into the spool directory: complete segments under their own name, the
//! segment being received as `<name>.partial`. The agent ships complete segments (and timeline
//! history files) within a second of their appearance, and the partial segment every
//! `partial_interval` when it has grown, so the recovery point trails the primary by that interval
//! rather than by a whole segment. When pg_receivewal exits (the server went away, or restarts), the
//! partial segment is shipped at once, then the agent starts it again with a growing back-off.
//!
//! Local files are deleted once shipped, except the newest segment: pg_receivewal resumes from the
//! spool after a restart (the agent's or its own), and the slot holds everything after it, so a
//! restart loses no WAL. Re-shipping a file after a restart uploads nothing: objects are named by
//! their content's digest.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::Instrument;

use super::{Kind, Shipped, WalArchive, WalError, WalFile};
use crate::{engine::postgres::Postgres, pipeline::Settings, store::Store};

/// How often the spool is scanned for complete segments.
const SCAN_EVERY: Duration = Duration::from_millis(500);
/// Longest wait before pg_receivewal is started again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The file where the agent records pg_receivewal's pid, to stop one a killed agent left behind.
const PID_FILE: &str = "soma-pg_receivewal.pid";

/// Settings of the WAL stream.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Directory pg_receivewal writes into; keep it across container restarts (an emptyDir).
    pub spool: PathBuf,
    /// Physical replication slot name.
    pub slot: String,
    /// How often the in-progress segment is shipped.
    pub partial_interval: Duration,
    /// Complete segments that may wait in the spool (the store refusing them) before receiving
    /// pauses, so the spool volume cannot fill up.
    pub max_unshipped: usize,
}

/// What the stream is doing, for `status` and the archive lag.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamStatus {
    /// pg_receivewal is connected and running.
    pub receiving: bool,
    /// The cluster's system identifier (the archive's folder).
    pub system_id: String,
    /// Timeline being received.
    pub timeline: u32,
    /// WAL segment size.
    pub seg_size: u64,
    /// Archive position: everything before it is in the store.
    pub archived_lsn: u64,
    /// The last file shipped.
    pub last_file: String,
    /// When the last file was shipped.
    pub last_shipped_at: Option<DateTime<Utc>>,
    /// Complete segments shipped since the agent started.
    pub segments_shipped: u64,
    /// Partial segments shipped since the agent started.
    pub partials_shipped: u64,
    /// The last error, if the most recent attempt failed.
    pub last_error: Option<String>,
}

/// Shared view of the stream's status.
pub type SharedStatus = Arc<Mutex<StreamStatus>>;

/// Starts the stream in the background; it runs until the agent stops.
pub fn spawn(
    config: StreamConfig,
    postgres: Postgres,
    store: Arc<dyn Store>,
    settings: Settings,
) -> SharedStatus {
    let status: SharedStatus = Arc::default();
    let shared = status.clone();
    let span = tracing::info_span!("wal_stream", slot = %config.slot);
    tokio::spawn(run(config, postgres, store, settings, shared).instrument(span));
    status
}

async fn run(
    config: StreamConfig,
    pg: Postgres,
    store: Arc<dyn Store>,
    settings: Settings,
    status: SharedStatus,
) {
    let mut backoff = Duration::from_secs(1);
    if let Err(e) = tokio::fs::create_dir_all(&config.spool).await {
        set_error(
            &status,
            format!(
                "cannot create the WAL spool {}: {e}",
                config.spool.display()
            ),
        );
        return;
    }
    stop_leftover_receiver(&config.spool).await;
    loop {
        match session(&config, &pg, &store, &settings, &status).await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "WAL streaming interrupted");
                set_error(&status, e);
            }
        }
        status.lock().expect("status lock").receiving = false;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

fn set_error(status: &SharedStatus, e: String) {
    status.lock().expect("status lock").last_error = Some(e);
}

/// One pg_receivewal run: identify, ensure the slot, receive and ship until it exits.
async fn session(
    config: &StreamConfig,
    pg: &Postgres,
    store: &Arc<dyn Store>,
    settings: &Settings,
    status: &SharedStatus,
) -> Result<(), String> {
    let identity = pg.identify_system().await.map_err(|e| e.to_string())?;
    let seg_size = pg.wal_segment_size().await.map_err(|e| e.to_string())?;
    {
        let mut s = status.lock().expect("status lock");
        s.system_id = identity.system_id.clone();
        s.timeline = identity.timeline;
        s.seg_size = seg_size;
    }
    let archive = WalArchive::new(store.clone(), &identity.system_id);
    // Multipart uploads a killed agent left half-done. Only this task ships this cluster's WAL,
    // one file at a time, and it is not shipping now.
    match store.list_uploads(&archive.prefix()).await {
        Ok(pending) => {
            for upload in pending {
                if let Err(e) = store.abort_upload(&upload).await {
                    tracing::warn!(key = %upload.key, error = %e, "could not abort an interrupted WAL upload");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not list interrupted WAL uploads"),
    }
    let mut shipper = Shipper {
        archive,
        spool: config.spool.clone(),
        settings: settings.clone(),
        seg_size,
        status: status.clone(),
        last_partial: None,
        shipped: Default::default(),
    };
    // Whatever a previous run left in the spool goes first; until it is shipped, receiving stays
    // paused (the slot keeps the WAL on the server).
    shipper.ship_complete().await.map_err(|e| {
        format!("receiving is paused until the WAL waiting in the spool can be shipped: {e}")
    })?;
    complete_torn_preallocation(&config.spool, seg_size).await?;
    pg.create_slot(&config.slot)
        .await
        .map_err(|e| format!("creating replication slot {}: {e}", config.slot))?;
    let mut receiver = pg
        .start_receivewal(&config.spool, &config.slot)
        .map_err(|e| e.to_string())?;
    if let Some(pid) = receiver.id() {
        let _ = tokio::fs::write(config.spool.join(PID_FILE), pid.to_string()).await;
    }
    tracing::info!(
        system_id = %identity.system_id,
        timeline = identity.timeline,
        spool = %config.spool.display(),
        "streaming WAL"
    );
    {
        let mut s = status.lock().expect("status lock");
        s.receiving = true;
        s.last_error = None;
    }
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut partial = tokio::time::interval(config.partial_interval);
    partial.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let outcome = loop {
        tokio::select! {
            exit = receiver.exited() => break Ok(exit),
            _ = scan.tick() => {
                if let Err(e) = shipper.ship_complete().await {
                    tracing::warn!(error = %e, "shipping WAL failed; retrying");
                    set_error(status, e.clone());
                    let waiting = shipper.unshipped().await;
                    if waiting >= config.max_unshipped {
                        break Err(format!(
                            "{waiting} complete WAL segments wait in the spool and cannot be shipped ({e}); receiving is paused so the spool stops growing — the replication slot holds the WAL on the server (up to max_slot_wal_keep_size) until the store takes it again"
                        ));
                    }
                }
            }
            _ = partial.tick() => {
                if let Err(e) = shipper.ship_partial().await {
                    tracing::warn!(error = %e, "shipping the partial WAL segment failed; retrying");
                    set_error(status, e);
                }
            }
        }
    };
    let outcome = match outcome {
        Ok(exit) => exit,
        Err(paused) => {
            receiver.kill().await;
            let _ = tokio::fs::remove_file(config.spool.join(PID_FILE)).await;
            return Err(paused);
        }
    };
    let _ = tokio::fs::remove_file(config.spool.join(PID_FILE)).await;
    // The receiver is gone (typically the server): ship everything it wrote, now.
    let stderr = receiver.stderr_tail().await;
    shipper.ship_complete().await?;
    shipper.ship_partial().await?;
    let how = outcome.map_or_else(|e| e.to_string(), |s| s.to_string());
    Err(format!("pg_receivewal exited ({how}): {}", stderr.trim()))
}

/// Ships the spool's files and keeps the status current.
struct Shipper {
    archive: WalArchive,
    spool: PathBuf,
    settings: Settings,
    seg_size: u64,
    status: SharedStatus,
    /// (file, digest) of the last partial shipped, so an unchanged one is not read again.
    last_partial: Option<(String, u64)>,
    /// Complete files shipped in this session (the newest stays in the spool; it is not read
    /// again every scan).
    shipped: std::collections::HashSet<WalFile>,
}

impl Shipper {
    /// Local WAL files of `kind` in the spool, oldest first.
    async fn spool_files(&self) -> Result<Vec<(WalFile, Kind, PathBuf)>, String> {
        let mut out = Vec::new();
        let mut dir = tokio::fs::read_dir(&self.spool)
            .await
            .map_err(|e| format!("reading the WAL spool {}: {e}", self.spool.display()))?;
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
        let mut s = self.status.lock().expect("status lock");
        if let Some(end) = object.end_lsn(self.seg_size).map(u64::from)
            && object.kind != Kind::History
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
    async fn unshipped(&self) -> usize {
        self.spool_files().await.map_or(0, |files| {
            files
                .iter()
                .filter(|f| f.1 == Kind::Seg && !self.shipped.contains(&f.0))
                .count()
        })
    }

    /// Ships complete segments and history files; deletes all but the newest segment afterwards.
    async fn ship_complete(&mut self) -> Result<(), String> {
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
                                set_error(&self.status, e.to_string());
                                self.shipped.insert(file);
                                continue;
                            }
                            Err(e) => return Err(format!("{}: {e}", file.name())),
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

    /// Ships the segment being received, when it grew since the last time — after every complete
    /// file before it, so the archived position never runs ahead of what the store holds.
    async fn ship_partial(&mut self) -> Result<(), String> {
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
        let len = match tokio::fs::metadata(&path).await {
            Ok(m) => m.len(),
            // Renamed to complete between listing and now: the next scan ships it.
            Err(_) => return Ok(()),
        };
        // pg_receivewal pre-allocates the file, so the size says nothing; the modification time
        // and the digest do. Cheap enough to hash 16 MiB every few seconds.
        let modified = tokio::fs::metadata(&path)
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .map(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64
            })
            .unwrap_or(len);
        if self.last_partial.as_ref() == Some(&(file.name(), modified)) {
            return Ok(());
        }
        // Ship a copy: pg_receivewal keeps writing the original, and the object's name must be
        // the digest of exactly what is uploaded.
        let snapshot = self.spool.join(format!(".soma-{}.snapshot", file.name()));
        if tokio::fs::copy(&path, &snapshot).await.is_err() {
            return Ok(()); // renamed meanwhile
        }
        let shipped = self.ship_one(&snapshot, file, Kind::Partial).await;
        let _ = tokio::fs::remove_file(&snapshot).await;
        shipped.map_err(|e| format!("{}: {e}", file.name()))?;
        self.last_partial = Some((file.name(), modified));
        Ok(())
    }
}

/// pg_receivewal zero-fills a new `.partial` file to the segment size before writing WAL into it,
/// and refuses to resume from one of any other size. Killed during that fill (with the agent, or
/// by the node going down) it leaves a short file that would stop it for good: its bytes are a
/// valid prefix (zeros, or WAL followed by zeros), so finishing the fill is what pg_receivewal
/// itself would have done.
async fn complete_torn_preallocation(spool: &Path, seg_size: u64) -> Result<(), String> {
    let mut dir = tokio::fs::read_dir(spool)
        .await
        .map_err(|e| format!("reading the WAL spool {}: {e}", spool.display()))?;
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
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(entry.path())
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        file.set_len(seg_size)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        file.sync_all().await.map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// Stops a pg_receivewal that a killed agent left running (it would hold the slot).
async fn stop_leftover_receiver(spool: &Path) {
    let Ok(pid) = tokio::fs::read_to_string(spool.join(PID_FILE)).await else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
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
