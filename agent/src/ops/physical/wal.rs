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
    wal::{RecoveryWindow, WalArchive, WalFile, WalIndex},
};

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
        if m.kind != Kind::Physical {
            continue;
        }
        // A base backup whose details cannot be read protects nothing it could name.
        let Ok(d) = PhysicalDetails::of(&m) else {
            continue;
        };
        if d.system_id != details.system_id {
            continue;
        }
        let Some(start) = d.start_lsn.segno(d.wal_segment_size) else {
            continue;
        };
        oldest_start = Some(oldest_start.map_or(start, |o| o.min(start)));
    }
    let Some(oldest_start) = oldest_start else {
        return Ok(0);
    };
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    let mut pruned = 0;
    for object in archive.list().await.map_err(PhysicalError::from)? {
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
        kept_from = %WalFile::from_segno(details.timeline, oldest_start, seg_size).name(),
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
        .map_err(PhysicalError::from)?;
    let chain = index.chain(details.timeline, details.start_lsn, details.stop_lsn);
    let window = index.window(details.timeline, details.stop_lsn);
    for object in &chain {
        pipeline::download(
            catalog.store().as_ref(),
            &object.key,
            &Expected::raw_only(&object.sha256),
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
    Ok(format!(
        "; {} WAL file(s) of {} verified, recoverable to LSN {} on timeline {}{gaps}",
        chain.len(),
        m.id,
        window.latest_lsn,
        window.timeline
    ))
}

/// A base backup's window as `list` and `describe` show it.
#[derive(Debug, Clone)]
pub struct BaseWindow {
    /// The backup's details.
    pub details: PhysicalDetails,
    /// How far the archive reaches, or why the archive could not be read.
    pub window: Result<RecoveryWindow, String>,
}

/// Recoverable windows of base backups, reading each cluster's archive once per request.
#[derive(Debug)]
pub struct Windows<'a> {
    catalog: &'a Catalog,
    indexes: HashMap<(String, u64), Result<WalIndex, String>>,
}

impl<'a> Windows<'a> {
    /// An empty cache over `catalog`'s store.
    pub fn new(catalog: &'a Catalog) -> Self {
        Self {
            catalog,
            indexes: HashMap::new(),
        }
    }

    /// The window of a physical base backup (`None` for other backups; an error for a base backup
    /// whose details cannot be read).
    pub async fn of(&mut self, m: &Manifest) -> Option<Result<BaseWindow, PhysicalError>> {
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
