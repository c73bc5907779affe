//! Delete: a backup (a set with its members) and the WAL that only it needed. A delete claims the
//! backups it removes like any other job, so it is refused while a restore or verify reads them,
//! and nothing can start reading them while it runs.

use std::sync::Arc;

use super::{Context, physical, plan::RequestError};
use crate::{
    catalog::{BackupId, CatalogError, Kind, Manifest},
    error::OpError,
    jobs::{JobInfo, JobTarget, Jobs, Operation},
};

/// What a delete removed.
#[derive(Debug, Clone)]
pub(crate) struct Deleted {
    /// The backup deleted.
    pub id: BackupId,
    /// Objects removed from the store (manifests, artifacts, pruned WAL).
    pub objects: u64,
}

/// What a delete does with the WAL of the base backups it removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WalAfterDelete {
    /// Delete the WAL no remaining base backup needs (`delete`).
    Prune,
    /// Leave the archive alone: the caller decides about WAL once, for every backup it deleted
    /// (`prune`, which must list that WAL in a dry run too).
    Leave,
}

/// Deletes backup `raw` (never "latest": deleting must name what it deletes).
pub(crate) async fn delete_backup(
    ctx: &Context,
    jobs: &Arc<Jobs>,
    raw: &str,
) -> Result<Deleted, OpError> {
    if raw == "latest" {
        return Err(RequestError::LatestNotAllowed.into());
    }
    if raw.is_empty() {
        return Err(RequestError::MissingId.into());
    }
    let id = BackupId::parse(raw).map_err(CatalogError::from)?;
    let manifest = ctx.catalog.get(&id).await?;
    delete_manifest(ctx, jobs, &manifest, WalAfterDelete::Prune).await
}

/// Deletes the backup `manifest` describes, a set with its members, while holding a delete claim
/// on all of them: a backup a running restore, verify or drill reads is refused with
/// [`crate::jobs::Busy`] before anything is removed. The one path by which `delete` and `prune`
/// remove backups.
pub(crate) async fn delete_manifest(
    ctx: &Context,
    jobs: &Arc<Jobs>,
    manifest: &Manifest,
    wal: WalAfterDelete,
) -> Result<Deleted, OpError> {
    let id = manifest.id.clone();
    let catalog = &ctx.catalog;
    let ids: Vec<BackupId> = std::iter::once(id.clone())
        .chain(manifest.members.iter().cloned())
        .collect();
    let _guard = jobs.begin(JobInfo::new(
        id.as_str(),
        Operation::Delete,
        ids.iter().cloned().map(JobTarget::Backup).collect(),
        ids.clone(),
    ))?;
    let mut removed = vec![manifest.clone()];
    for member in &manifest.members {
        if let Ok(m) = catalog.get(member).await {
            removed.push(m);
        }
    }
    // The set first, so it stops existing before its members go.
    let mut objects = catalog.delete(&id).await?;
    for member in &manifest.members {
        match catalog.delete(member).await {
            Ok(n) => objects += n,
            Err(CatalogError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // WAL that only the deleted base backups needed goes with them.
    if wal == WalAfterDelete::Prune {
        for m in removed.iter().filter(|m| m.kind == Kind::Physical) {
            match physical::prune_wal(catalog, m).await {
                Ok(n) => objects += n,
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune WAL the deleted base backup needed; it stays in the store")
                }
            }
        }
    }
    tracing::info!(backup_id = %id, objects, "backup deleted");
    Ok(Deleted { id, objects })
}
