//! Qdrant's plans: the snapshots a request asks for, and the snapshots' restore into
//! collections.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use soma_proto::v1;

use super::SnapshotMode;
use crate::{
    catalog::{BackupId, Engine, IdEngine, Kind, Manifest},
    error::OpError,
    jobs::{JobTarget, Reporter},
    ops::{
        Context,
        method::EnginePlans,
        plan::{EngineBackup, EngineRestore, OpFuture, RestoreAsk},
    },
};

/// Qdrant as a request names it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QdrantPlans;

impl EnginePlans for QdrantPlans {
    fn proto(&self) -> v1::Engine {
        v1::Engine::Qdrant
    }

    fn engine(&self) -> Engine {
        Engine::Qdrant
    }

    fn plan_backup(
        &self,
        ctx: &Context,
        req: v1::BackupRequest,
        now: DateTime<Utc>,
    ) -> Result<Box<dyn EngineBackup>, OpError> {
        ctx.qdrant()?;
        let mode = match v1::QdrantMode::try_from(req.qdrant_mode).unwrap_or_default() {
            v1::QdrantMode::Unspecified => ctx.qdrant_mode,
            mode => mode,
        };
        Ok(Box::new(QdrantBackup::new(now, req.collections, mode)))
    }

    fn set_member(
        &self,
        ctx: &Context,
        _physical: bool,
        now: DateTime<Utc>,
    ) -> Option<Box<dyn EngineBackup>> {
        ctx.qdrant.as_ref()?;
        Some(Box::new(QdrantBackup::new(
            now,
            Vec::new(),
            ctx.qdrant_mode,
        )))
    }
}

/// Snapshots of Qdrant collections.
#[derive(Debug, Clone)]
pub(crate) struct QdrantBackup {
    id: BackupId,
    /// Collections (empty: all).
    collections: Vec<String>,
    /// How snapshots are taken.
    mode: v1::QdrantMode,
}

impl QdrantBackup {
    fn new(now: DateTime<Utc>, collections: Vec<String>, mode: v1::QdrantMode) -> Self {
        let slug = match collections.as_slice() {
            [] => "all".to_string(),
            [one] => one.clone(),
            many => format!("{}-collections", many.len()),
        };
        Self {
            id: BackupId::new(now, IdEngine::Qdrant, &slug),
            collections,
            mode,
        }
    }
}

impl EngineBackup for QdrantBackup {
    fn id(&self) -> &BackupId {
        &self.id
    }

    fn engine(&self) -> Engine {
        Engine::Qdrant
    }

    fn kind(&self) -> Kind {
        SnapshotMode::from_proto(self.mode).kind()
    }

    fn targets(&self) -> Vec<JobTarget> {
        vec![JobTarget::Qdrant]
    }

    fn target_name(&self) -> String {
        if self.collections.is_empty() {
            "all".into()
        } else {
            self.collections.join(",")
        }
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        let Self {
            id,
            collections,
            mode,
        } = *self;
        Box::pin(super::backup_qdrant(ctx, id, collections, mode, reporter))
    }
}

/// Qdrant snapshots into collections.
#[derive(Debug, Clone)]
pub(crate) struct QdrantRestore {
    manifest: Manifest,
    /// Collections to restore (empty: all).
    collections: Vec<String>,
    /// Restore the one selected collection under this name (`None`: under its own).
    rename_to: Option<String>,
    /// Overwrite existing collections and aliases.
    force: bool,
}

impl QdrantRestore {
    /// Restoring `manifest` as `ask` says.
    pub(super) fn new(manifest: Manifest, ask: &RestoreAsk) -> Self {
        Self {
            manifest,
            collections: ask.collections.clone(),
            rename_to: ask.rename_to.clone(),
            force: ask.force,
        }
    }
}

impl EngineRestore for QdrantRestore {
    fn backup(&self) -> String {
        self.manifest.id.to_string()
    }

    fn engine(&self) -> Engine {
        Engine::Qdrant
    }

    fn targets(&self) -> Vec<JobTarget> {
        vec![JobTarget::Qdrant]
    }

    fn uses(&self) -> Vec<BackupId> {
        vec![self.manifest.id.clone()]
    }

    fn run(self: Box<Self>, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        let Self {
            manifest,
            collections,
            rename_to,
            force,
        } = *self;
        Box::pin(super::restore_qdrant(
            ctx,
            manifest,
            collections,
            rename_to,
            force,
            reporter,
        ))
    }
}
