//! PostgreSQL logical backups: pg_dump → pipeline → store, and back through pg_restore.
//!
//! A logical backup is either one database ([`Kind::Logical`]) or every database of the cluster
//! ([`Kind::LogicalCluster`]). Both record the cluster globals their databases need (a
//! `globals.json.zst` artifact) and, in the manifest's details, what each database needs on the
//! target (owner, roles, extensions, tablespaces), so a restore into a fresh cluster can create
//! the missing roles first and refuse, before writing anything, what cannot work.
//! [`backup`] takes them, [`restore`] restores them; old single-database manifests without
//! globals restore as they always did.

use crate::{error::OpError, jobs::Reporter};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Context,
    details::Details,
    drill::Scratch,
    method::{DrillResult, Method, MethodFuture},
    plan::{EngineRestore, RestoreAsk},
};

use crate::{
    catalog::{BackupId, Kind, Manifest},
    engine::postgres::{ChecksumKind, TableStats, globals::DatabaseNeeds},
};

pub(crate) mod backup;
mod drill;
mod plan;
pub(crate) mod restore;

pub(crate) use backup::{backup_cluster, backup_postgres};
pub(crate) use plan::PostgresPlans;
pub(crate) use restore::ClusterRestore;
pub(crate) use restore::{restore_cluster, restore_postgres};

/// The pg_dump artifact inside a single-database logical backup.
pub(crate) const PG_DUMP: crate::ops::artifact::ArtifactName<'static> =
    crate::ops::artifact::ArtifactName {
        name: "dump.pgdump.zst",
        format: "pg_dump/custom",
    };

/// Name of the globals artifact.
pub(crate) const GLOBALS_NAME: &str = "globals.json.zst";
/// Format of the globals artifact's raw bytes.
pub(crate) const GLOBALS_FORMAT: &str = "soma/pg-globals+json";
/// Target name of a whole-cluster logical backup.
pub(crate) const ALL_DATABASES: &str = "all-databases";
/// Largest globals document a restore reads into memory.
pub(crate) const MAX_GLOBALS_BYTES: u64 = 64 * 1024 * 1024;

/// A logical backup that cannot be restored as asked.
#[derive(Debug, thiserror::Error)]
pub enum LogicalError {
    /// The manifest's details are not what an agent writes.
    #[error("backup {id} has unreadable PostgreSQL details in its manifest: {reason}")]
    BadDetails {
        /// The backup.
        id: BackupId,
        /// Why.
        reason: String,
    },
    /// The globals artifact is larger than any real cluster's globals.
    #[error(
        "backup {id}: its globals artifact holds {bytes} bytes, more than the {MAX_GLOBALS_BYTES} a restore reads; it was not written by this agent"
    )]
    GlobalsTooLarge {
        /// The backup.
        id: BackupId,
        /// Its announced size.
        bytes: u64,
    },
    /// The globals artifact matched its checksums but is not a globals document.
    #[error("backup {id}: its globals artifact is unreadable: {reason}")]
    BadGlobals {
        /// The backup.
        id: BackupId,
        /// Why.
        reason: String,
    },
    /// `--database` names a database the whole-cluster backup does not hold.
    #[error(
        "backup {id} holds no database {database:?}; it holds {listed:?} (omit --database to restore them all)"
    )]
    DatabaseNotInBackup {
        /// The backup.
        id: BackupId,
        /// The database asked for.
        database: String,
        /// The databases it holds.
        listed: Vec<String>,
    },
}

impl LogicalError {
    /// The gRPC code clients act on.
    pub fn code(&self) -> tonic::Code {
        match self {
            LogicalError::BadDetails { .. }
            | LogicalError::GlobalsTooLarge { .. }
            | LogicalError::BadGlobals { .. } => tonic::Code::DataLoss,
            LogicalError::DatabaseNotInBackup { .. } => tonic::Code::InvalidArgument,
        }
    }
}

/// The manifest details of a logical backup written since issue 11.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LogicalDetails {
    /// The globals artifact.
    pub globals: GlobalsRecord,
    /// One entry per database dump, in artifact order.
    pub databases: Vec<DatabaseRecord>,
}

/// What the manifest says about the globals artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GlobalsRecord {
    /// Artifact name.
    pub artifact: String,
    /// Whether password hashes were captured.
    pub passwords: bool,
    /// Roles it holds.
    pub roles: Vec<String>,
}

/// One database of a logical backup and what restoring it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DatabaseRecord {
    /// Its dump artifact.
    pub artifact: String,
    /// What restoring it needs.
    #[serde(flatten)]
    pub needs: DatabaseNeeds,
    /// Validation data for restore drills: every table's rows and checksum. Absent in backups
    /// written before drills, and in older ones whose snapshot could not be counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tables: Option<Vec<TableStats>>,
    /// The function the checksums were made with; absent in backups that counted with a query.
    #[serde(default)]
    pub checksum: ChecksumKind,
    /// The client encoding of the dump's `COPY` text, which a drill copies the tables out in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<String>,
}

impl LogicalDetails {
    /// The details of a logical backup, or `None` for one written before globals were recorded.
    pub(crate) fn of(manifest: &Manifest) -> Result<Option<Self>, LogicalError> {
        if manifest.details.is_null() {
            if manifest.kind == Kind::LogicalCluster {
                return Err(LogicalError::BadDetails {
                    id: manifest.id.clone(),
                    reason: "a whole-cluster backup without details".into(),
                });
            }
            return Ok(None);
        }
        serde_json::from_value(manifest.details.clone())
            .map(Some)
            .map_err(|e| LogicalError::BadDetails {
                id: manifest.id.clone(),
                reason: e.to_string(),
            })
    }
}

/// PostgreSQL logical backups (one database or the whole cluster) as a [`Method`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogicalMethod;

impl Method for LogicalMethod {
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

    fn plan_restore(
        &self,
        ctx: &Context,
        m: Manifest,
        ask: &RestoreAsk,
        _set: Option<&BackupId>,
    ) -> Result<Box<dyn EngineRestore>, OpError> {
        ctx.postgres()?;
        plan::restore_plan(m, &ask.database, ask.clean, ask.update_roles)
    }

    fn details(&self, m: &Manifest) -> Result<Details, OpError> {
        Ok(Details::Logical(LogicalDetails::of(m)?))
    }
}
