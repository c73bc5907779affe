//! PostgreSQL physical backups and point-in-time restores.
//!
//! A base backup is `pg_basebackup` of the whole cluster as one tar stream (every database, so
//! Temporal's come along) through the pipeline into the store, recorded with its WAL positions
//! ([`backup`]). A restore ([`restore`]) chooses the base backup for a target and checks that the
//! archive reaches it, then lays it into an empty data directory — how Kubernetes restores, from an
//! init container before PostgreSQL starts — and configures recovery ([`pgdata`]): PostgreSQL
//! fetches WAL from the archive through `soma-agent wal-fetch`, replays to the target and
//! promotes. [`wal`] holds what base backups mean for their WAL: windows, verification, retention.

mod backup;
mod drill;
mod pgdata;
mod plan;
mod recovery_conf;
mod replay;
mod restore;
pub mod untar;
mod wal;

pub(crate) use backup::backup_physical;
pub(crate) use plan::PhysicalBackup;
pub(crate) use recovery_conf::{RECOVERY_SETTINGS, recovery_end};
pub(crate) use replay::{ReplayEnd, ReplayWatch, Verdict, spawn_watch};
pub(crate) use restore::{
    PgdataRestore, PgdataRestored, RecoveryTarget, restore_pgdata, restore_pgdata_job,
};
pub(crate) use untar::UntarError;
pub(crate) use wal::{BaseWindow, Windows, oldest_base, prune_wal, verify_wal, wal_before};

use crate::{error::OpError, jobs::Reporter};
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{
    Context,
    artifact::ArtifactName,
    details::Details,
    drill::Scratch,
    method::{DrillResult, Method, MethodFuture},
    plan::{EngineRestore, RequestError, RestoreAsk},
};
use crate::{
    catalog::{BackupId, Engine, Kind, Manifest},
    lsn::{InvalidLsn, Lsn},
    wal::WalError,
};

/// The base backup artifact.
pub(crate) const BASE: ArtifactName<'static> = ArtifactName {
    name: "base.tar.zst",
    format: "pg_basebackup/tar",
};

/// What a base backup's manifest records beyond the common fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PhysicalDetails {
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
    /// The recovery settings the cluster's configuration files set when the backup was taken
    /// (names only: `primary_conninfo` may hold a password), e.g. those of an earlier restore of
    /// it. A restore neutralises them; `describe` shows them. `None`: not recorded (an older
    /// agent, or a role that may not read `pg_file_settings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovery_settings: Option<Vec<String>>,
    /// OIDs of the tablespaces (besides `pg_default` and `pg_global`) whose `pg_tblspc/<oid>`
    /// links the base backup holds: the only links a restore lays. pg_basebackup refuses to write
    /// a cluster with any to a single stream, as this agent takes base backups, so it records
    /// none; a manifest written before the field existed records none either, which is the same
    /// truth and refuses every link.
    #[serde(default)]
    pub tablespaces: Vec<u32>,
}

impl PhysicalDetails {
    /// The details of a physical manifest, or why it is not one. A segment size of zero (a
    /// damaged or forged manifest) is refused here, so nothing downstream divides by it.
    pub(crate) fn of(m: &Manifest) -> Result<Self, PhysicalError> {
        if m.engine != Engine::Postgres || m.kind != Kind::Physical {
            return Err(PhysicalError::NotPhysical {
                id: m.id.clone(),
                engine: m.engine,
                kind: m.kind,
            });
        }
        let details: Self =
            serde_json::from_value(m.details.clone()).map_err(|e| PhysicalError::BadDetails {
                id: m.id.clone(),
                reason: e.to_string(),
            })?;
        if !crate::wal::valid_system_id(&details.system_id) {
            return Err(PhysicalError::BadDetails {
                id: m.id.clone(),
                reason: format!(
                    "system id {:?} is not a PostgreSQL system identifier (a decimal number)",
                    details.system_id.chars().take(40).collect::<String>()
                ),
            });
        }
        if !details.wal_segment_size.is_power_of_two() || details.wal_segment_size < 1 << 20 {
            return Err(PhysicalError::BadDetails {
                id: m.id.clone(),
                reason: format!(
                    "WAL segment size {} is not a power of two of at least 1 MiB",
                    details.wal_segment_size
                ),
            });
        }
        Ok(details)
    }
}

/// Why a physical backup or restore failed; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PhysicalError {
    /// A point-in-time operation on a backup that is not a base backup.
    #[error(
        "backup {id} is a {engine} {kind} backup, not a physical base backup; point-in-time restores need one: take it with `kubectl soma backup postgres --physical`"
    )]
    NotPhysical {
        /// The backup.
        id: BackupId,
        /// Its engine.
        engine: Engine,
        /// Its kind.
        kind: Kind,
    },
    /// The manifest's physical details do not parse.
    #[error("backup {id}: its manifest's physical details are unreadable: {reason}")]
    BadDetails {
        /// The backup.
        id: BackupId,
        /// Why.
        reason: String,
    },
    /// pg_basebackup exited cleanly but did not say where its WAL starts and ends.
    #[error("pg_basebackup did not report its WAL start and end points; its output was: {stderr}")]
    NoPositions {
        /// What it printed.
        stderr: String,
    },
    /// `--target-time` that is not a time.
    #[error(
        "--target-time {value:?} is not a time ({reason}); give it in RFC 3339, e.g. 2026-11-25T14:03:07Z or 2026-11-25T15:03:07.250+01:00, or as PostgreSQL prints it, e.g. 2026-11-25 15:03:07.25+01"
    )]
    BadTime {
        /// As given.
        value: String,
        /// What the parser said.
        reason: String,
    },
    /// `--target-lsn` that is not an LSN.
    #[error("--target-lsn: {0}")]
    BadLsn(#[from] InvalidLsn),
    /// `--target-name` that PostgreSQL could not have created.
    #[error("--target-name {value:?}: {why}; give the name passed to pg_create_restore_point()")]
    BadName {
        /// As given (cut short).
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// More than one recovery target.
    #[error(
        "give one recovery target: --target-time, --target-lsn, --target-name or --target latest"
    )]
    TwoTargets,
    /// The named base backup is consistent only after the target.
    #[error(
        "base backup {id} is consistent only from {consistent_at} (LSN {stop_lsn}), after the target {target}; choose an older base backup, or restore with --backup latest to pick one"
    )]
    AfterTarget {
        /// The backup.
        id: BackupId,
        /// Its stop time.
        consistent_at: DateTime<Utc>,
        /// Its stop LSN.
        stop_lsn: Lsn,
        /// The target, described.
        target: String,
    },
    /// No base backup at all.
    #[error(
        "there is no physical base backup in the store; take one with `kubectl soma backup postgres --physical`"
    )]
    NoBaseBackup,
    /// Every base backup is consistent only after the target.
    #[error(
        "no base backup is consistent before the target {target}; the earliest restorable point is {earliest}"
    )]
    NothingBeforeTarget {
        /// The target, described.
        target: String,
        /// The oldest base backup's stop time.
        earliest: DateTime<Utc>,
    },
    /// "latest" would stop silently at a gap.
    #[error(
        "restoring to the latest point would stop silently at the gap. {reach} Restore to a --target-time or --target-lsn before the gap"
    )]
    GapBeforeLatest {
        /// How far the archive reaches.
        reach: String,
    },
    /// The target lies beyond the newest archived WAL.
    #[error(
        "the target {target} is later than the newest WAL in the archive: {reach} Pick an earlier target, or --target latest"
    )]
    BeyondArchive {
        /// The target, described.
        target: String,
        /// How far the archive reaches.
        reach: String,
    },
    /// The data directory holds files.
    #[error(
        "data directory {} is not empty (it holds {entry:?} among others); a physical restore needs an empty or missing directory — remove the old cluster's files first, or restore elsewhere",
        dir.display()
    )]
    PgdataNotEmpty {
        /// The directory.
        dir: PathBuf,
        /// One of its entries.
        entry: String,
    },
    /// The base backup's postgresql.auto.conf cannot be rewritten with this restore's settings.
    #[error(
        "base backup {id}: its {why}, so the restore cannot make its recovery settings the only ones in force; the restore was undone"
    )]
    AutoConf {
        /// The backup.
        id: BackupId,
        /// What is wrong with the file.
        why: String,
    },
    /// A file operation in the data directory failed.
    #[error("{action} in data directory {}: {source}", dir.display())]
    Pgdata {
        /// The directory.
        dir: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The base backup holds what pg_basebackup never writes: anyone who can write to the store
    /// can forge one, digests included, so this is refused rather than laid down.
    #[error(
        "base backup {id} was refused: {reason}. Nothing was written outside {} and what was laid there was removed. A base backup pg_basebackup wrote never does this, so the stored one was forged or damaged: restore another backup, and check who can write to the store",
        dir.display()
    )]
    UnsafeBaseBackup {
        /// The backup.
        id: BackupId,
        /// The data directory.
        dir: PathBuf,
        /// What it holds.
        reason: UntarError,
    },
    /// A WAL file a base backup needs is damaged.
    #[error(
        "WAL file {file} that base backup {id} needs is damaged in the store ({key}): {reason}; the backup restores only to points before it"
    )]
    WalDamaged {
        /// PostgreSQL's file name.
        file: String,
        /// The base backup.
        id: BackupId,
        /// The object.
        key: String,
        /// What the check found.
        reason: String,
    },
    /// The WAL archive failed.
    #[error(transparent)]
    Wal(#[from] WalError),
}

impl PhysicalError {
    /// The gRPC code a client can act on.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            PhysicalError::NotPhysical { .. }
            | PhysicalError::BadTime { .. }
            | PhysicalError::BadLsn(_)
            | PhysicalError::BadName { .. }
            | PhysicalError::TwoTargets => Code::InvalidArgument,
            PhysicalError::BadDetails { .. }
            | PhysicalError::GapBeforeLatest { .. }
            | PhysicalError::UnsafeBaseBackup { .. }
            | PhysicalError::AutoConf { .. }
            | PhysicalError::WalDamaged { .. } => Code::DataLoss,
            PhysicalError::Wal(e) if e.is_data_loss() => Code::DataLoss,
            PhysicalError::Wal(WalError::Store(s)) => crate::error::store_code(s),
            PhysicalError::NoPositions { .. }
            | PhysicalError::AfterTarget { .. }
            | PhysicalError::NoBaseBackup
            | PhysicalError::NothingBeforeTarget { .. }
            | PhysicalError::BeyondArchive { .. }
            | PhysicalError::PgdataNotEmpty { .. }
            | PhysicalError::Pgdata { .. }
            | PhysicalError::Wal(_) => Code::FailedPrecondition,
        }
    }
}

/// Empties the data directory an interrupted physical restore was filling, so no half-laid
/// cluster is left looking like one — only when this restore found it empty (or created it).
pub(crate) async fn abandon_pgdata(req: &PgdataRestore) {
    if req.prepared.load(std::sync::atomic::Ordering::SeqCst) {
        pgdata::clear(&req.pgdata).await;
    }
}

/// PostgreSQL base backups as a [`Method`]: a verify also reads the WAL that rolls one forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PhysicalMethod;

impl Method for PhysicalMethod {
    fn check_drillable(&self, ctx: &Context, _m: &Manifest) -> Result<(), OpError> {
        ctx.postgres().map(drop)
    }

    fn drill<'a>(
        &'a self,
        ctx: &'a Arc<Context>,
        m: &'a Manifest,
        scratch: &'a Scratch,
        reporter: &'a Reporter,
    ) -> MethodFuture<'a, DrillResult> {
        Box::pin(drill::drill(ctx, m, scratch, reporter))
    }

    /// A base backup is laid into an empty data directory (a request with a data directory,
    /// planned apart), never restored into a running server: refused, naming that way.
    fn plan_restore(
        &self,
        _ctx: &Context,
        m: Manifest,
        _ask: &RestoreAsk,
        set: Option<&BackupId>,
    ) -> Result<Box<dyn EngineRestore>, OpError> {
        Err(match set {
            Some(set) => RequestError::SetWithPhysicalMember {
                set: set.clone(),
                member: m.id,
            },
            None => RequestError::PhysicalNeedsPgdata(m.id),
        }
        .into())
    }

    fn details(&self, m: &Manifest) -> Result<Details, OpError> {
        Ok(Details::Physical(PhysicalDetails::of(m)?))
    }

    fn verify_beyond<'a>(
        &'a self,
        ctx: &'a Context,
        m: &'a Manifest,
        reporter: &'a Reporter,
    ) -> MethodFuture<'a, String> {
        Box::pin(async move {
            reporter.phase(
                "verifying",
                format!("reading the WAL that rolls {} forward", m.id),
            );
            verify_wal(&ctx.source, m, reporter).await
        })
    }
}
