//! PostgreSQL physical backups and point-in-time restores.
//!
//! A base backup is `pg_basebackup` of the whole cluster as one tar stream (every database, so
//! Temporal's come along) through the pipeline into the store, recorded with its WAL positions. A
//! restore lays one down into an empty data directory — how Kubernetes restores, from an init
//! container before PostgreSQL starts — and configures recovery: PostgreSQL fetches WAL from the
//! archive through `soma-agent wal-fetch`, replays to the target and promotes.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use chrono::{DateTime, FixedOffset, Utc};
use serde::{Deserialize, Serialize};
use soma_proto::v1;

use super::{Context, abort_quietly, abort_quietly_staged, artifact, artifact_of, backup_info};
use crate::{
    catalog::{BackupId, BackupKeys, Catalog, Manifest, Target, Tool},
    engine::postgres::parse_basebackup_positions,
    error::OpError,
    jobs::Reporter,
    lsn::Lsn,
    pipeline::{self, Counters, PipelineError},
    wal::{RecoveryWindow, WalArchive},
};

/// Name of the base backup artifact.
pub const BASE_ARTIFACT: &str = "base.tar.zst";
/// Format of its uncompressed bytes.
pub const BASE_FORMAT: &str = "pg_basebackup/tar";
/// Manifest `kind` of a physical base backup.
pub const PHYSICAL: &str = "physical";

/// What a base backup's manifest records beyond the common fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PhysicalDetails {
    /// The cluster's system identifier; its WAL archive is `wal/<system_id>/`.
    pub system_id: String,
    /// Timeline the backup was taken on.
    pub timeline: u32,
    /// Where replay starts (`START WAL LOCATION`).
    pub start_lsn: Lsn,
    /// Where the backup is consistent: the earliest point it can be restored to.
    pub stop_lsn: Lsn,
    /// When pg_basebackup finished (at or after `stop_lsn` was written).
    pub stop_time: DateTime<Utc>,
    /// WAL segment size of the cluster.
    pub wal_segment_size: u64,
}

impl PhysicalDetails {
    /// The details of a physical manifest, or why it is not one.
    pub fn of(m: &Manifest) -> Result<Self, OpError> {
        if m.engine != "postgres" || m.kind != PHYSICAL {
            return Err(OpError::InvalidArgument(format!(
                "backup {} is a {} {} backup, not a physical base backup; point-in-time restores need one: take it with `kubectl soma backup postgres --physical`",
                m.id, m.engine, m.kind
            )));
        }
        serde_json::from_value(m.details.clone()).map_err(|e| {
            OpError::DataLoss(format!(
                "backup {}: its manifest's physical details are unreadable: {e}",
                m.id
            ))
        })
    }

    fn stop(&self) -> Lsn {
        self.stop_lsn
    }
}

/// Takes a physical base backup of the whole cluster: pg_basebackup tar → pipeline → store →
/// manifest.
pub async fn backup_physical(
    ctx: Arc<Context>,
    id: BackupId,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let pg = ctx.postgres()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());
    reporter.phase("preparing", "identifying the cluster");
    let (tool_version, server_version) = pg
        .check_tool("pg_basebackup", &pg.default_database())
        .await?;
    let identity = pg.identify_system().await?;
    let seg_size = pg.wal_segment_size().await?;

    let store = ctx.catalog.store().clone();
    let key = id.key(BASE_ARTIFACT);
    let upload = store.start_upload(&key).await?;
    let mut backup = match pg.start_basebackup() {
        Ok(b) => b,
        Err(e) => {
            abort_quietly(upload).await;
            return Err(e.into());
        }
    };
    reporter.phase(
        "copying",
        format!(
            "pg_basebackup of cluster {} → zstd → {}",
            identity.system_id,
            store.location()
        ),
    );
    let staged =
        match pipeline::upload(backup.stdout(), upload, &ctx.settings, reporter.counters()).await {
            Ok(s) => s,
            Err(e) => {
                backup.kill().await;
                return Err(e.into());
            }
        };
    let stderr = match backup.wait_output().await {
        Ok(stderr) => stderr,
        Err(e) => {
            abort_quietly_staged(staged).await;
            return Err(e.into());
        }
    };
    let stop_time = Utc::now();
    let Some(positions) = parse_basebackup_positions(&stderr) else {
        abort_quietly_staged(staged).await;
        return Err(OpError::FailedPrecondition(format!(
            "pg_basebackup did not report its WAL start and end points; its output was: {stderr}"
        )));
    };
    reporter.phase("committing", "completing the upload");
    let (summary, object) = super::commit_verified(store.as_ref(), &key, staged).await?;
    let artifact = artifact_of(
        &ctx.settings,
        BASE_ARTIFACT,
        BASE_FORMAT,
        &summary,
        object.size,
    );
    let details = PhysicalDetails {
        system_id: identity.system_id.clone(),
        timeline: positions.timeline,
        start_lsn: positions.start_lsn,
        stop_lsn: positions.stop_lsn,
        stop_time,
        wal_segment_size: seg_size,
    };
    let manifest = Manifest::completed(
        id.clone(),
        "postgres",
        PHYSICAL,
        Target {
            name: "cluster".into(),
            server: pg.replication_server(),
            server_version,
        },
        Tool {
            name: "pg_basebackup".into(),
            version: tool_version,
        },
        started_at,
    )
    .with_artifacts(vec![artifact])
    .with_details(serde_json::to_value(&details).expect("details serialise"));
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    Ok(v1::OperationResult {
        summary: format!(
            "base backup {id} of cluster {} complete (timeline {}, consistent at {})",
            details.system_id, details.timeline, details.stop_lsn
        ),
        backup: Some(backup_info(&manifest)),
        raw_bytes: manifest.raw_bytes,
        stored_bytes: manifest.stored_bytes,
        seconds: reporter.elapsed(),
    })
}

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryTarget {
    /// The end of the archive.
    Latest,
    /// Every transaction committed at or before this time.
    Time(DateTime<FixedOffset>),
    /// Every record up to this LSN.
    Lsn(Lsn),
}

impl RecoveryTarget {
    /// Builds the target from the three mutually exclusive options (none given: latest).
    pub fn from_options(
        time: Option<&str>,
        lsn: Option<&str>,
        latest: bool,
    ) -> Result<Self, OpError> {
        match (time, lsn, latest) {
            (Some(t), None, false) => DateTime::parse_from_rfc3339(t)
                .map(RecoveryTarget::Time)
                .map_err(|e| {
                    OpError::InvalidArgument(format!(
                        "--target-time {t:?} is not an RFC 3339 time ({e}); use e.g. 2026-11-25T14:03:07Z or 2026-11-25T15:03:07.250+01:00"
                    ))
                }),
            (None, Some(l), false) => l
                .parse::<Lsn>()
                .map(RecoveryTarget::Lsn)
                .map_err(|_| {
                    OpError::InvalidArgument(format!(
                        "--target-lsn {l:?} is not an LSN; use PostgreSQL's form, e.g. 16/B374D848"
                    ))
                }),
            (None, None, _) => Ok(RecoveryTarget::Latest),
            _ => Err(OpError::InvalidArgument(
                "give one recovery target: --target-time, --target-lsn or --target latest".into(),
            )),
        }
    }

    fn describe(&self) -> String {
        match self {
            RecoveryTarget::Latest => "the end of the WAL archive".into(),
            RecoveryTarget::Time(t) => format!("time {}", t.to_rfc3339()),
            RecoveryTarget::Lsn(l) => format!("LSN {l}"),
        }
    }
}

/// A physical restore request.
#[derive(Debug, Clone)]
pub struct PgdataRestore {
    /// Backup id, or "latest" (the newest base backup that can reach the target).
    pub backup: String,
    /// Data directory to create; must be missing or empty.
    pub pgdata: PathBuf,
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// The agent binary as the PostgreSQL server will find it (written into restore_command).
    pub agent_binary: PathBuf,
}

/// What a physical restore laid down.
#[derive(Debug, Clone)]
pub struct PgdataRestored {
    /// The base backup used.
    pub manifest: Manifest,
    /// Its details.
    pub details: PhysicalDetails,
    /// How far the archive reaches from it.
    pub window: RecoveryWindow,
    /// Human-readable summary with the next step.
    pub summary: String,
}

/// Picks the base backup for a target: the one named, or the newest that ends before the target.
async fn choose_backup(
    catalog: &Catalog,
    backup: &str,
    target: &RecoveryTarget,
) -> Result<(Manifest, PhysicalDetails), OpError> {
    let reaches = |d: &PhysicalDetails| match target {
        RecoveryTarget::Latest => true,
        RecoveryTarget::Time(t) => d.stop_time <= *t,
        RecoveryTarget::Lsn(l) => d.stop_lsn <= *l,
    };
    if backup != "latest" {
        let manifest = catalog.resolve(backup).await?;
        let details = PhysicalDetails::of(&manifest)?;
        if !reaches(&details) {
            return Err(OpError::FailedPrecondition(format!(
                "base backup {} is consistent only from {} (LSN {}), after the target {}; choose an older base backup, or restore with --backup latest to pick one",
                manifest.id,
                details.stop_time.to_rfc3339(),
                details.stop_lsn,
                target.describe()
            )));
        }
        return Ok((manifest, details));
    }
    let mut physical = Vec::new();
    for m in catalog.list().await? {
        if m.engine == "postgres" && m.kind == PHYSICAL {
            let d = PhysicalDetails::of(&m)?;
            physical.push((m, d));
        }
    }
    if physical.is_empty() {
        return Err(OpError::FailedPrecondition(
            "there is no physical base backup in the store; take one with `kubectl soma backup postgres --physical`".into(),
        ));
    }
    let oldest = physical
        .iter()
        .map(|(_, d)| d.stop_time)
        .min()
        .expect("not empty");
    physical
        .into_iter()
        .find(|(_, d)| reaches(d))
        .ok_or_else(|| {
            OpError::FailedPrecondition(format!(
                "no base backup is consistent before the target {}; the earliest restorable point is {}",
                target.describe(),
                oldest.to_rfc3339()
            ))
        })
}

/// Checks that the archive reaches the target from the chosen backup, without a gap.
fn check_window(
    m: &Manifest,
    window: &RecoveryWindow,
    target: &RecoveryTarget,
    prefix: &str,
) -> Result<(), OpError> {
    let gaps = if window.gaps.is_empty() {
        String::new()
    } else {
        format!(
            " The archive has a gap after it: {}.",
            window.gaps.join(", ")
        )
    };
    let reach = format!(
        "WAL from base backup {} reaches LSN {} on timeline {}{} in {prefix}.{gaps}",
        m.id,
        window.latest_lsn,
        window.timeline,
        window
            .latest_time
            .map(|t| format!(" (captured {})", t.to_rfc3339()))
            .unwrap_or_default(),
    );
    match target {
        RecoveryTarget::Latest if !window.gaps.is_empty() => Err(OpError::DataLoss(format!(
            "restoring to the latest point would stop silently at the gap. {reach} Restore to a --target-time or --target-lsn before the gap"
        ))),
        RecoveryTarget::Time(t) if window.latest_time.is_none_or(|l| l < *t) => {
            Err(OpError::FailedPrecondition(format!(
                "the target time {} is later than the newest WAL in the archive: {reach} Pick an earlier time, or --target latest",
                t.to_rfc3339()
            )))
        }
        RecoveryTarget::Lsn(l) if window.latest_lsn < *l => {
            Err(OpError::FailedPrecondition(format!(
                "the target LSN {} is beyond the archive: {reach} Pick an earlier LSN, or --target latest",
                l
            )))
        }
        _ => Ok(()),
    }
}

/// Lays a base backup into an empty data directory and configures recovery to the target.
///
/// Nothing is left half-done: the directory is checked empty first, and if the download, a
/// checksum or the unpacking fails, everything written into it is removed again.
pub async fn restore_pgdata(
    catalog: &Catalog,
    req: &PgdataRestore,
    counters: Arc<Counters>,
) -> Result<PgdataRestored, OpError> {
    let (manifest, details) = choose_backup(catalog, &req.backup, &req.target).await?;
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    let index = archive
        .index(details.wal_segment_size)
        .await
        .map_err(wal_error)?;
    let window = index.window(details.timeline, details.stop());
    check_window(&manifest, &window, &req.target, &archive.prefix())?;
    prepare_pgdata(&req.pgdata).await?;

    let art = artifact(&manifest, BASE_ARTIFACT)?.clone();
    let laid = lay_down(catalog, &manifest, &art, &req.pgdata, counters).await;
    let configured = match laid {
        Ok(()) => write_recovery_config(req, &manifest, &details, catalog).await,
        Err(e) => Err(e),
    };
    if let Err(e) = configured {
        clear_dir(&req.pgdata).await;
        return Err(e);
    }
    adopt_owner(&req.pgdata).await?;
    let summary = format!(
        "base backup {} laid down in {}; PostgreSQL will replay WAL from {} to {} and promote when it starts (the archive reaches LSN {} on timeline {}{})",
        manifest.id,
        req.pgdata.display(),
        archive.prefix(),
        req.target.describe(),
        window.latest_lsn,
        window.timeline,
        window
            .latest_time
            .map(|t| format!(", captured {}", t.to_rfc3339()))
            .unwrap_or_default()
    );
    Ok(PgdataRestored {
        manifest,
        details,
        window,
        summary,
    })
}

fn wal_error(e: crate::wal::WalError) -> OpError {
    if e.is_data_loss() {
        OpError::DataLoss(e.to_string())
    } else {
        match e {
            crate::wal::WalError::Store(s) => s.into(),
            crate::wal::WalError::Pipeline(p) => p.into(),
            other => OpError::FailedPrecondition(other.to_string()),
        }
    }
}

/// Creates the data directory (mode 0700, as PostgreSQL requires) or checks that it is empty.
async fn prepare_pgdata(dir: &Path) -> Result<(), OpError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| {
        OpError::FailedPrecondition(format!("data directory {}: {e}", dir.display()))
    };
    match tokio::fs::read_dir(dir).await {
        Ok(mut entries) => {
            if let Some(entry) = entries.next_entry().await.map_err(io)? {
                return Err(OpError::FailedPrecondition(format!(
                    "data directory {} is not empty (it holds {:?} among others); a physical restore needs an empty or missing directory — remove the old cluster's files first, or restore elsewhere",
                    dir.display(),
                    entry.file_name()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tokio::fs::create_dir_all(dir).await.map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(io)
}

/// Streams the base backup from the store into a tar unpacker writing under `dir`.
async fn lay_down(
    catalog: &Catalog,
    manifest: &Manifest,
    art: &crate::catalog::Artifact,
    dir: &Path,
    counters: Arc<Counters>,
) -> Result<(), OpError> {
    let (writer, reader) = tokio::io::duplex(1 << 20);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let target = dir.to_path_buf();
    let unpack = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(bridge);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        archive.unpack(&target)
    });
    let key = manifest.id.key(&art.name);
    let downloaded = pipeline::download(
        catalog.store().as_ref(),
        &key,
        &art.digest(),
        writer,
        0,
        counters,
    )
    .await;
    let unpacked = unpack.await.expect("tar unpacker panicked");
    match (downloaded, unpacked) {
        (Err(e), _) if !matches!(e, PipelineError::Sink(_)) => {
            Err(super::missing_is_data_loss(manifest, e))
        }
        (_, Err(e)) => Err(OpError::FailedPrecondition(format!(
            "unpacking base backup {} into {}: {e}",
            manifest.id,
            dir.display()
        ))),
        (Err(e), Ok(())) => Err(e.into()),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Quotes a word for the shell that runs restore_command.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Quotes a value for postgresql.conf.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Writes recovery.signal and the recovery settings (appended to postgresql.auto.conf, which
/// PostgreSQL reads last, so they win over the backed-up configuration).
async fn write_recovery_config(
    req: &PgdataRestore,
    manifest: &Manifest,
    details: &PhysicalDetails,
    catalog: &Catalog,
) -> Result<(), OpError> {
    let io = |what: &str, e: std::io::Error| {
        OpError::FailedPrecondition(format!("writing {what} in {}: {e}", req.pgdata.display()))
    };
    let restore_command = format!(
        "{} wal-fetch --store {} --system-id {} %f %p",
        shell_quote(&req.agent_binary.display().to_string()),
        shell_quote(&catalog.store().location()),
        details.system_id
    );
    let mut conf = format!(
        "\n# Point-in-time recovery written by soma-agent restore-pgdata from base backup {} at {}.\n\
         # PostgreSQL removes recovery.signal when recovery ends; these settings are then unused.\n\
         restore_command = {}\n\
         recovery_target_timeline = 'latest'\n",
        manifest.id,
        Utc::now().to_rfc3339(),
        conf_quote(&restore_command)
    );
    match &req.target {
        RecoveryTarget::Latest => {}
        RecoveryTarget::Time(t) => {
            conf.push_str(&format!(
                "recovery_target_time = {}\nrecovery_target_inclusive = on\nrecovery_target_action = 'promote'\n",
                conf_quote(&t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string())
            ));
        }
        RecoveryTarget::Lsn(l) => {
            conf.push_str(&format!(
                "recovery_target_lsn = {}\nrecovery_target_inclusive = on\nrecovery_target_action = 'promote'\n",
                conf_quote(&l.to_string())
            ));
        }
    }
    let auto = req.pgdata.join("postgresql.auto.conf");
    let mut existing = tokio::fs::read_to_string(&auto).await.unwrap_or_default();
    existing.push_str(&conf);
    tokio::fs::write(&auto, existing)
        .await
        .map_err(|e| io("postgresql.auto.conf", e))?;
    tokio::fs::write(req.pgdata.join("recovery.signal"), b"")
        .await
        .map_err(|e| io("recovery.signal", e))?;
    // A standby.signal from the source would turn the restore into a standby that never promotes.
    let _ = tokio::fs::remove_file(req.pgdata.join("standby.signal")).await;
    Ok(())
}

/// Removes everything inside `dir` after a failed restore (the directory was empty before).
async fn clear_dir(dir: &Path) {
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            let removed = if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                tokio::fs::remove_dir_all(&path).await
            } else {
                tokio::fs::remove_file(&path).await
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a file of the failed restore");
            }
        }
    }
}

/// When running as root (the agent beside a test server, or an init container without
/// runAsUser), gives the restored files to the data directory's owner, which PostgreSQL requires.
async fn adopt_owner(dir: &Path) -> Result<(), OpError> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    // The directory's owner when someone prepared it for us, else its parent's.
    let mut meta = None;
    for candidate in [Some(dir), dir.parent()].into_iter().flatten() {
        if let Ok(m) = tokio::fs::metadata(candidate).await
            && m.uid() != 0
        {
            meta = Some(m);
            break;
        }
    }
    let Some(meta) = meta else {
        return Ok(());
    };
    let (uid, gid) = (meta.uid(), meta.gid());
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || chown_tree(&dir, uid, gid))
        .await
        .expect("chown task panicked")
        .map_err(|e| {
            OpError::FailedPrecondition(format!("giving the restored files to uid {uid}: {e}"))
        })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Runs a physical restore as an agent job (the plugin's `restore --pgdata`).
pub async fn restore_pgdata_job(
    ctx: Arc<Context>,
    req: PgdataRestore,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    reporter.phase(
        "restoring",
        format!("laying a base backup into {}", req.pgdata.display()),
    );
    let restored = restore_pgdata(&ctx.catalog, &req, reporter.counters()).await?;
    reporter.set_operation_id(restored.manifest.id.as_str());
    Ok(v1::OperationResult {
        summary: restored.summary,
        raw_bytes: restored.manifest.raw_bytes,
        stored_bytes: restored.manifest.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&restored.manifest)),
    })
}

/// Deletes the WAL that no remaining base backup of `deleted`'s cluster needs: segments before the
/// oldest remaining base backup's start, on every timeline (history files stay; they are tiny and
/// PostgreSQL asks for them when choosing a timeline). With no base backup left the archive is
/// kept whole: it costs storage, but deleting a cluster's entire WAL is never a side effect.
/// Returns the number of objects deleted.
pub async fn prune_wal(catalog: &Catalog, deleted: &Manifest) -> Result<u64, OpError> {
    let details = PhysicalDetails::of(deleted)?;
    let seg_size = details.wal_segment_size;
    let mut oldest_start = None::<u64>;
    for m in catalog.list().await? {
        if m.kind != PHYSICAL {
            continue;
        }
        let Ok(d) = PhysicalDetails::of(&m) else {
            continue;
        };
        if d.system_id != details.system_id {
            continue;
        }
        let start = d.start_lsn.0 / d.wal_segment_size.max(1);
        oldest_start = Some(oldest_start.map_or(start, |o| o.min(start)));
    }
    let Some(oldest_start) = oldest_start else {
        return Ok(0);
    };
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    let mut pruned = 0;
    for object in archive.list().await.map_err(wal_error)? {
        if object
            .file
            .segno(seg_size)
            .is_some_and(|s| s < oldest_start)
        {
            catalog.store().delete(&object.key).await?;
            pruned += 1;
        }
    }
    tracing::info!(
        pruned,
        kept_from = %crate::wal::WalFile::from_segno(details.timeline, oldest_start, seg_size).name(),
        "pruned WAL that only deleted base backups needed"
    );
    Ok(pruned)
}

/// Re-reads every WAL file a restore of `m` would replay (from its start to the end of its
/// window) and checks each against the digest in its name. A corrupted or vanished file fails
/// with data loss naming it; gaps end the window and are reported in the returned summary.
pub async fn verify_wal(
    catalog: &Catalog,
    m: &Manifest,
    reporter: &Reporter,
) -> Result<String, OpError> {
    let details = PhysicalDetails::of(m)?;
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    let index = archive
        .index(details.wal_segment_size)
        .await
        .map_err(wal_error)?;
    let start = details.start_lsn;
    let chain = index.chain(details.timeline, start, details.stop());
    let window = index.window(details.timeline, details.stop());
    for object in &chain {
        pipeline::download(
            catalog.store().as_ref(),
            &object.key,
            &crate::pipeline::Digest256::raw_only(&object.sha256),
            tokio::io::sink(),
            0,
            reporter.counters(),
        )
        .await
        .map_err(|e| {
            OpError::DataLoss(format!(
                "WAL file {} that base backup {} needs is damaged in the store ({}): {e}; the backup restores only to points before it",
                object.file.name(),
                m.id,
                object.key
            ))
        })?;
    }
    let gaps = if window.gaps.is_empty() {
        String::new()
    } else {
        format!(
            "; WAL GAPS after that point: {} (WAL after a gap cannot be replayed)",
            window.gaps.join(", ")
        )
    };
    Ok(format!(
        "; {} WAL file(s) of {} verified, recoverable to LSN {} on timeline {}{gaps}",
        chain.len(),
        m.id,
        window.latest_lsn,
        window.timeline
    ))
}

/// Recoverable windows of base backups, reading each cluster's archive once per request.
#[derive(Debug)]
pub struct Windows<'a> {
    catalog: &'a Catalog,
    indexes: std::collections::HashMap<(String, u64), Result<crate::wal::WalIndex, String>>,
}

impl<'a> Windows<'a> {
    /// An empty cache over `catalog`'s store.
    pub fn new(catalog: &'a Catalog) -> Self {
        Self {
            catalog,
            indexes: Default::default(),
        }
    }

    /// The window of a physical base backup (`None` for other backups).
    pub async fn of(&mut self, m: &Manifest) -> Option<v1::RecoveryWindow> {
        if m.kind != PHYSICAL {
            return None;
        }
        let details = match PhysicalDetails::of(m) {
            Ok(d) => d,
            Err(e) => {
                return Some(v1::RecoveryWindow {
                    error: e.to_string(),
                    ..Default::default()
                });
            }
        };
        let key = (details.system_id.clone(), details.wal_segment_size);
        if !self.indexes.contains_key(&key) {
            let archive = WalArchive::new(self.catalog.store().clone(), &details.system_id);
            let index = archive
                .index(details.wal_segment_size)
                .await
                .map_err(|e| e.to_string());
            self.indexes.insert(key.clone(), index);
        }
        let mut out = v1::RecoveryWindow {
            system_id: details.system_id.clone(),
            earliest_time: details.stop_time.to_rfc3339(),
            earliest_lsn: details.stop_lsn.to_string(),
            timeline: details.timeline,
            ..Default::default()
        };
        match &self.indexes[&key] {
            Ok(index) => {
                let w = index.window(details.timeline, details.stop());
                out.latest_lsn = w.latest_lsn.to_string();
                // Without archived WAL the backup restores to its own end only.
                out.latest_time = w
                    .latest_time
                    .unwrap_or(details.stop_time)
                    .max(details.stop_time)
                    .to_rfc3339();
                out.timeline = w.timeline;
                out.gaps = w.gaps;
            }
            Err(e) => out.error = format!("reading the WAL archive: {e}"),
        }
        Some(out)
    }
}

/// The WAL stream's state for `status`, with the archive lag measured against the server now.
pub async fn wal_archive_status(
    wal: &super::WalStreamInfo,
    pg: &crate::engine::postgres::Postgres,
) -> v1::WalArchiveStatus {
    let s = wal.status.lock().expect("status lock").clone();
    let server = pg.current_wal_lsn().await.ok();
    v1::WalArchiveStatus {
        receiving: s.receiving,
        system_id: s.system_id,
        timeline: s.timeline,
        slot: wal.config.slot.clone(),
        archived_lsn: if s.archived_lsn.0 > 0 {
            s.archived_lsn.to_string()
        } else {
            String::new()
        },
        server_lsn: server.map(|l| l.to_string()).unwrap_or_default(),
        lag_bytes: server.map_or(0, |l| l.0.saturating_sub(s.archived_lsn.0)),
        last_shipped_at: s
            .last_shipped_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        last_file: s.last_file,
        segments_shipped: s.segments_shipped,
        partials_shipped: s.partials_shipped,
        partial_interval_seconds: wal.config.partial_interval.as_secs_f64(),
        last_error: s.last_error.unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_quoting() {
        assert_eq!(
            RecoveryTarget::from_options(None, None, true).unwrap(),
            RecoveryTarget::Latest
        );
        assert!(RecoveryTarget::from_options(Some("yesterday"), None, false).is_err());
        assert!(
            RecoveryTarget::from_options(Some("2026-11-25T10:00:00Z"), Some("0/1"), false).is_err()
        );
        assert_eq!(
            RecoveryTarget::from_options(None, Some("1/2"), false).unwrap(),
            RecoveryTarget::Lsn(Lsn((1 << 32) | 2))
        );
        assert_eq!(shell_quote("/usr/bin/soma-agent"), "/usr/bin/soma-agent");
        assert_eq!(shell_quote("s3://b/p x"), "'s3://b/p x'");
        assert_eq!(conf_quote("a 'b'"), "'a ''b'''");
    }
}
