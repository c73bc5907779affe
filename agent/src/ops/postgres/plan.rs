//! PostgreSQL's plans: the backups a request asks of the engine (a logical dump of one database
//! or of the whole cluster; a base backup is [`super::super::physical`]'s) and the restores of
//! logical backups.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use soma_proto::v1;

use super::{ALL_DATABASES, ClusterRestore};
use crate::{
    catalog::{BackupId, Engine, IdEngine, Kind, Manifest},
    error::OpError,
    jobs::{JobTarget, Reporter},
    ops::{
        Context,
        method::EnginePlans,
        physical::PhysicalBackup,
        plan::{EngineBackup, EngineRestore, OpFuture},
    },
};

/// PostgreSQL as a request names it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PostgresPlans;

impl EnginePlans for PostgresPlans {
    fn proto(&self) -> v1::Engine {
        v1::Engine::Postgres
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn plan_backup(
        &self,
        ctx: &Context,
        req: v1::BackupRequest,
        now: DateTime<Utc>,
    ) -> Result<Box<dyn EngineBackup>, OpError> {
        let pg = ctx.postgres()?;
        Ok(if req.physical {
            Box::new(PhysicalBackup::new(now))
        } else if req.all_databases {
            Box::new(ClusterBackup::new(now))
        } else if req.database.is_empty() {
            Box::new(LogicalBackup::new(now, pg.default_database()))
        } else {
            Box::new(LogicalBackup::new(now, req.database))
        })
    }

    fn set_member(
        &self,
        ctx: &Context,
        physical: bool,
        now: DateTime<Utc>,
    ) -> Option<Box<dyn EngineBackup>> {
        ctx.postgres.as_ref()?;
        // Restoring "all" must bring back every database and the roles they need.
        Some(if physical {
            Box::new(PhysicalBackup::new(now))
        } else {
            Box::new(ClusterBackup::new(now))
        })
    }
}

/// pg_dump of one database, with the roles it needs.
#[derive(Debug, Clone)]
pub(crate) struct LogicalBackup {
    id: BackupId,
    database: String,
}

impl LogicalBackup {
    fn new(now: DateTime<Utc>, database: String) -> Self {
        let id = BackupId::new(now, IdEngine::Postgres, &database);
        Self { id, database }
    }
}

impl EngineBackup for LogicalBackup {
    fn id(&self) -> &BackupId {
        &self.id
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn kind(&self) -> Kind {
        Kind::Logical
    }

    fn targets(&self) -> Vec<JobTarget> {
        vec![JobTarget::Database(self.database.clone())]
    }

    fn target_name(&self) -> String {
        self.database.clone()
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(super::backup_postgres(
            ctx,
            self.id,
            self.database,
            reporter,
        ))
    }
}

/// pg_dump of every database of the cluster, with the cluster's globals.
#[derive(Debug, Clone)]
pub(crate) struct ClusterBackup {
    id: BackupId,
}

impl ClusterBackup {
    fn new(now: DateTime<Utc>) -> Self {
        Self {
            id: BackupId::new(now, IdEngine::Postgres, ALL_DATABASES),
        }
    }
}

impl EngineBackup for ClusterBackup {
    fn id(&self) -> &BackupId {
        &self.id
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn kind(&self) -> Kind {
        Kind::LogicalCluster
    }

    fn targets(&self) -> Vec<JobTarget> {
        // One whole-cluster backup at a time (logical or physical).
        vec![JobTarget::Cluster]
    }

    fn target_name(&self) -> String {
        ALL_DATABASES.into()
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(super::backup_cluster(ctx, self.id, reporter))
    }
}

/// A logical restore: with globals (roles first) when the backup records them, the old way for
/// a backup written before. `database` empty means the backup's own database(s).
pub(super) fn restore_plan(
    manifest: Manifest,
    database: &str,
    clean: bool,
    update_roles: bool,
) -> Result<Box<dyn EngineRestore>, OpError> {
    match ClusterRestore::new(manifest.clone(), database, clean, update_roles)? {
        Some(cluster) => Ok(Box::new(cluster)),
        None => Ok(Box::new(LogicalRestore {
            database: if database.is_empty() {
                manifest.target.name.clone()
            } else {
                database.to_string()
            },
            manifest,
            clean,
        })),
    }
}

/// pg_restore of a dump written before globals were recorded into a database.
#[derive(Debug, Clone)]
pub(crate) struct LogicalRestore {
    manifest: Manifest,
    database: String,
    /// Drop and recreate existing objects.
    clean: bool,
}

impl EngineRestore for LogicalRestore {
    fn backup(&self) -> String {
        self.manifest.id.to_string()
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn targets(&self) -> Vec<JobTarget> {
        vec![JobTarget::Database(self.database.clone())]
    }

    fn uses(&self) -> Vec<BackupId> {
        vec![self.manifest.id.clone()]
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        let Self {
            manifest,
            database,
            clean,
        } = *self;
        Box::pin(super::restore_postgres(
            ctx, manifest, database, clean, reporter,
        ))
    }
}

impl EngineRestore for ClusterRestore {
    fn backup(&self) -> String {
        self.manifest.id.to_string()
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn targets(&self) -> Vec<JobTarget> {
        ClusterRestore::targets(self)
            .map(|d| JobTarget::Database(d.to_string()))
            .collect()
    }

    fn uses(&self) -> Vec<BackupId> {
        vec![self.manifest.id.clone()]
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(super::restore_cluster(ctx, *self, reporter))
    }
}
