//! Base backups' plans: a request's pg_basebackup of the cluster, and a base backup laid into an
//! empty data directory. A base backup is never restored like a dump: that ask is refused
//! (its method's `plan_restore`) naming the way that works.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::PgdataRestore;
use crate::{
    catalog::{BackupId, Engine, IdEngine, Kind},
    jobs::{JobTarget, Reporter},
    ops::{
        Context,
        plan::{EngineBackup, EngineRestore, OpFuture},
    },
    runner::Interrupted,
};

/// pg_basebackup of the cluster.
#[derive(Debug, Clone)]
pub(crate) struct PhysicalBackup {
    id: BackupId,
}

impl PhysicalBackup {
    /// The base backup a request asks for now.
    pub(crate) fn new(now: DateTime<Utc>) -> Self {
        Self {
            id: BackupId::new(now, IdEngine::Postgres, "cluster"),
        }
    }
}

impl EngineBackup for PhysicalBackup {
    fn id(&self) -> &BackupId {
        &self.id
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn kind(&self) -> Kind {
        Kind::Physical
    }

    fn targets(&self) -> Vec<JobTarget> {
        // One whole-cluster backup at a time (logical or physical).
        vec![JobTarget::Cluster]
    }

    fn target_name(&self) -> String {
        "cluster".into()
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(super::backup_physical(ctx, self.id, reporter))
    }
}

impl EngineRestore for PgdataRestore {
    fn backup(&self) -> String {
        self.backup.clone()
    }

    fn engine(&self) -> Engine {
        Engine::Postgres
    }

    fn targets(&self) -> Vec<JobTarget> {
        vec![JobTarget::Pgdata(self.pgdata.clone())]
    }

    /// "latest" chooses its base backup when it runs; an explicit id is claimed.
    fn uses(&self) -> Vec<BackupId> {
        BackupId::parse(&self.backup).into_iter().collect()
    }

    /// The half-laid data directory (if the restore found it empty).
    fn interrupted(&self) -> Interrupted {
        Interrupted::ClearPgdata(self.clone())
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(super::restore_pgdata_job(ctx, *self, reporter))
    }
}
