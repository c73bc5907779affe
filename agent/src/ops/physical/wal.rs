//! What base backups mean for their cluster's WAL archive: how far each can be rolled forward
//! (its window), proof that the WAL it needs is intact, and which WAL no base backup needs any
//! more.

use std::collections::HashMap;

use super::{PhysicalDetails, PhysicalError};
use crate::{
    catalog::{Catalog, Kind, Manifest},
    error::OpError,
    jobs::Reporter,
    pipeline::{self, Expected},
    wal::{RecoveryWindow, WalArchive, WalFile, WalIndex, WalObject},
};

/// The oldest base backup of the cluster `system_id` among `manifests`: the WAL it needs, from its
/// start segment on, is the WAL every one of them needs. `None` when none of them is of that
/// cluster. A base backup whose details cannot be read protects nothing it could name.
pub(crate) fn oldest_base(
    manifests: &[Manifest],
    system_id: &str,
) -> Option<(Manifest, PhysicalDetails)> {
    let mut oldest: Option<(u64, Manifest, PhysicalDetails)> = None;
    for m in manifests.iter().filter(|m| m.kind == Kind::Physical) {
        let Ok(d) = PhysicalDetails::of(m) else {
            continue;
        };
        if d.system_id != system_id {
            continue;
        }
        let Some(start) = d.start_lsn.segno(d.wal_segment_size) else {
            continue;
        };
        if oldest.as_ref().is_none_or(|(o, ..)| start < *o) {
            oldest = Some((start, m.clone(), d));
        }
    }
    oldest.map(|(_, m, d)| (m, d))
}

/// The archive objects of `details`' cluster that come before segment `oldest_start` on any
/// timeline: WAL no base backup starting at or after that segment replays. History files have no
/// segment and are never among them.
pub(crate) async fn wal_before(
    catalog: &Catalog,
    details: &PhysicalDetails,
    oldest_start: u64,
) -> Result<Vec<WalObject>, OpError> {
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    Ok(archive
        .list()
        .await
        .map_err(PhysicalError::from)?
        .into_iter()
        .filter(|o| {
            o.file
                .segno(details.wal_segment_size)
                .is_some_and(|s| s < oldest_start)
        })
        .collect())
}

/// Deletes the WAL that no remaining base backup of `deleted`'s cluster needs: segments before the
/// oldest remaining base backup's start, on every timeline (history files stay; they are tiny and
/// PostgreSQL asks for them when choosing a timeline). With no base backup left the archive is
/// kept whole: it costs storage, but deleting a cluster's entire WAL is never a side effect.
/// Returns the number of objects deleted.
pub(crate) async fn prune_wal(catalog: &Catalog, deleted: &Manifest) -> Result<u64, OpError> {
    let details = PhysicalDetails::of(deleted)?;
    // Strict: an unreadable base backup may still need the WAL this would delete.
    let remaining = catalog.list_strict().await?;
    let Some((_, oldest)) = oldest_base(&remaining, &details.system_id) else {
        return Ok(0);
    };
    let Some(oldest_start) = oldest.start_lsn.segno(oldest.wal_segment_size) else {
        return Ok(0);
    };
    let mut pruned = 0;
    for object in wal_before(catalog, &oldest, oldest_start).await? {
        catalog.store().delete(&object.key).await?;
        pruned += 1;
    }
    tracing::info!(
        pruned,
        kept_from = %WalFile::from_segno(oldest.timeline, oldest_start, oldest.wal_segment_size).name(),
        "pruned WAL that only deleted base backups needed"
    );
    Ok(pruned)
}

/// Re-reads every WAL file a restore of `m` would replay (from its start to the end of its
/// window) and checks each against the digest in its name. A corrupted or vanished file fails
/// with data loss naming it; gaps end the window and are reported in the returned summary.
pub(crate) async fn verify_wal(
    catalog: &Catalog,
    m: &Manifest,
    reporter: &Reporter,
) -> Result<String, OpError> {
    let details = PhysicalDetails::of(m)?;
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    let index = archive
        .index(details.wal_segment_size)
        .await
        .map_err(PhysicalError::from)?;
    let chain = index.chain(details.timeline, details.start_lsn, details.stop_lsn);
    let window = index.window(details.timeline, details.stop_lsn);
    for object in &chain {
        pipeline::download(
            catalog.store().as_ref(),
            &object.key,
            &Expected::raw_only(object.sha256),
            tokio::io::sink(),
            0,
            reporter.counters(),
        )
        .await
        .map_err(|e| PhysicalError::WalDamaged {
            file: object.file.name(),
            id: m.id.clone(),
            key: object.key.clone(),
            reason: e.to_string(),
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
    let rejected = if window.rejected.is_empty() {
        String::new()
    } else {
        format!(
            "; SKIPPED, not what their names say: {}",
            window.rejected.join("; ")
        )
    };
    Ok(format!(
        "; {} WAL file(s) of {} verified, recoverable to LSN {} on timeline {}{gaps}{rejected}",
        chain.len(),
        m.id,
        window.latest_lsn,
        window.timeline
    ))
}

/// A base backup's window as `list` and `describe` show it.
#[derive(Debug, Clone)]
pub(crate) struct BaseWindow {
    /// The backup's details.
    pub details: PhysicalDetails,
    /// How far the archive reaches, or why the archive could not be read.
    pub window: Result<RecoveryWindow, String>,
}

/// Recoverable windows of base backups, reading each cluster's archive once per request.
#[derive(Debug)]
pub(crate) struct Windows<'a> {
    catalog: &'a Catalog,
    indexes: HashMap<(String, u64), Result<WalIndex, String>>,
}

impl<'a> Windows<'a> {
    /// An empty cache over `catalog`'s store.
    pub(crate) fn new(catalog: &'a Catalog) -> Self {
        Self {
            catalog,
            indexes: HashMap::new(),
        }
    }

    /// The window of a physical base backup (`None` for other backups; an error for a base backup
    /// whose details cannot be read).
    pub(crate) async fn of(&mut self, m: &Manifest) -> Option<Result<BaseWindow, PhysicalError>> {
        if m.kind != Kind::Physical {
            return None;
        }
        let details = match PhysicalDetails::of(m) {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
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
        let window = match &self.indexes[&key] {
            Ok(index) => Ok(index.window(details.timeline, details.stop_lsn)),
            Err(e) => Err(format!("reading the WAL archive: {e}")),
        };
        Some(Ok(BaseWindow { details, window }))
    }
}
