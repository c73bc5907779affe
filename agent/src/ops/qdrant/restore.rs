//! Qdrant restores: everything is checked (version, existing collections, aliases) before
//! anything is uploaded; then each snapshot is streamed back and the aliases recreated.

use std::{collections::BTreeMap, sync::Arc};

use serde_json::Value;
use tokio_util::{io::ReaderStream, sync::CancellationToken};

use super::{
    CollectionRecord, QdrantDetails, QdrantOpError, SnapshotMode,
    layout::{Nodes, ShardLayout, ShardingMethod, match_shards, wait_active},
};
use crate::{
    catalog::{Artifact, BackupKeys, Manifest},
    engine::qdrant::{
        Alias, PeerId, Priority, Qdrant, QdrantError, Replica, ShardKey, UploadTo, minor_of,
    },
    error::OpError,
    jobs::Reporter,
    ops::{
        Context, Outcome,
        artifact::{RESTORE_HOLDBACK, read_artifact},
    },
};

/// Restores collections of a Qdrant backup; everything is checked before anything is uploaded.
/// `rename_to` restores the one selected collection under another name (and leaves aliases alone).
pub(crate) async fn restore_qdrant(
    ctx: Arc<Context>,
    manifest: Manifest,
    selected: Vec<String>,
    rename_to: Option<String>,
    force: bool,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let q = ctx.qdrant()?;
    reporter.set_operation_id(manifest.id.as_str());
    let details = QdrantDetails::of(&manifest)?;
    if details.mode == SnapshotMode::FullStorage {
        return Err(QdrantOpError::StorageSnapshot(manifest.id.clone()).into());
    }
    super::check_recorded(&manifest.id, &details)?;
    super::check_shards(&manifest, &details)?;
    super::check_requested(selected.iter().chain(rename_to.as_ref()))?;
    let chosen = choose(&manifest, &details, selected)?;
    if rename_to.is_some() && chosen.len() != 1 {
        return Err(QdrantOpError::RenameNeedsOne.into());
    }
    let restore = Restore {
        ctx: &ctx,
        q,
        manifest: &manifest,
        details: &details,
        chosen,
        rename_to,
        force,
        reporter: &reporter,
    };
    reporter.phase(
        "preparing",
        format!("checking {} before restoring", q.url()),
    );
    let server = restore.check_server().await?;
    let mut restored = Vec::with_capacity(restore.chosen.len());
    for c in &restore.chosen {
        if let Some(line) = restore.collection(c, &server).await? {
            restored.push(line);
        }
    }
    for (alias, replace) in &server.aliases {
        q.set_alias(&alias.alias_name, &alias.collection_name, *replace)
            .await?;
    }
    let alias_note = if server.aliases.is_empty() {
        String::new()
    } else {
        format!(
            "; aliases {}",
            server
                .aliases
                .iter()
                .map(|(a, _)| format!("{} → {}", a.alias_name, a.collection_name))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(Outcome::new(
        format!(
            "restored {} from backup {}{alias_note}",
            restored.join(", "),
            manifest.id
        ),
        manifest,
    ))
}

/// The collections a restore brings back: those selected, each of which the backup must hold,
/// or all of them.
fn choose(
    manifest: &Manifest,
    details: &QdrantDetails,
    selected: Vec<String>,
) -> Result<Vec<String>, OpError> {
    let in_backup: Vec<String> = details.collections.keys().cloned().collect();
    if selected.is_empty() {
        return Ok(in_backup);
    }
    if let Some(c) = selected.iter().find(|c| !in_backup.contains(c)) {
        return Err(QdrantOpError::NotInBackup {
            collection: c.clone(),
            id: manifest.id.clone(),
            holds: in_backup.join(", "),
        }
        .into());
    }
    Ok(selected)
}

/// One Qdrant restore, checked against the request, while it runs.
struct Restore<'a> {
    ctx: &'a Context,
    q: &'a Qdrant,
    manifest: &'a Manifest,
    details: &'a QdrantDetails,
    chosen: Vec<String>,
    rename_to: Option<String>,
    force: bool,
    reporter: &'a Reporter,
}

/// What the server holds, read before anything is uploaded.
struct ServerState {
    existing: Vec<String>,
    nodes: Nodes,
    /// The recorded aliases to set once the collections are back, and whether each replaces one.
    aliases: Vec<(Alias, bool)>,
}

impl Restore<'_> {
    /// The name collection `c` of the backup is restored under.
    fn target_of(&self, c: &str) -> String {
        self.rename_to.clone().unwrap_or_else(|| c.to_string())
    }

    /// Checks the server's version, the collections and aliases the restore would replace
    /// (refused without `--force`), and plans the aliases.
    async fn check_server(&self) -> Result<ServerState, OpError> {
        let (q, details) = (self.q, self.details);
        let server_version = q.version().await?;
        if minor_of(&server_version) != minor_of(&details.qdrant_version) {
            let backup_minor = minor_of(&details.qdrant_version)
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_else(|| details.qdrant_version.clone());
            return Err(QdrantError::VersionMismatch {
                backup: details.qdrant_version.clone(),
                backup_minor,
                server: server_version,
            }
            .into());
        }
        let existing = q.collections().await?;
        let nodes = Nodes::read(q).await?;
        if !self.force
            && let Some(c) = self
                .chosen
                .iter()
                .map(|c| self.target_of(c))
                .find(|t| existing.contains(t))
        {
            return Err(QdrantError::Exists(c).into());
        }
        Ok(ServerState {
            aliases: self.plan_aliases().await?,
            existing,
            nodes,
        })
    }

    /// The recorded aliases of the chosen collections to set, and whether each replaces one
    /// the server has; an alias naming another collection is refused without `--force`.
    /// Aliases follow a restore in place only; a copy under another name must not steal them.
    async fn plan_aliases(&self) -> Result<Vec<(Alias, bool)>, OpError> {
        let current_aliases = self.q.aliases().await?;
        let mut alias_plan = Vec::new();
        if self.rename_to.is_some() {
            return Ok(alias_plan);
        }
        for alias in self
            .details
            .aliases
            .iter()
            .filter(|a| self.chosen.contains(&a.collection_name))
        {
            match current_aliases
                .iter()
                .find(|c| c.alias_name == alias.alias_name)
            {
                Some(cur) if cur.collection_name == alias.collection_name => {}
                Some(cur) if !self.force => {
                    return Err(QdrantOpError::AliasTaken {
                        alias: alias.alias_name.clone(),
                        current: cur.collection_name.clone(),
                        wanted: alias.collection_name.clone(),
                    }
                    .into());
                }
                Some(_) => alias_plan.push((alias.clone(), true)),
                None => alias_plan.push((alias.clone(), false)),
            }
        }
        Ok(alias_plan)
    }

    /// Restores collection `c` of the backup; returns the summary's line for it (none for a
    /// shard-stream collection its details do not record).
    async fn collection(&self, c: &str, server: &ServerState) -> Result<Option<String>, OpError> {
        let (q, details, manifest, reporter) = (self.q, self.details, self.manifest, self.reporter);
        let target = self.target_of(c);
        let mut arts: Vec<&Artifact> = manifest
            .artifacts
            .iter()
            .filter(|a| a.collection.as_deref() == Some(c))
            .collect();
        arts.sort_by_key(|a| a.shard);
        // A custom-sharded collection with no shard key yet has no shard to hold.
        let no_shards = details.mode == SnapshotMode::ShardStream
            && details
                .collections
                .get(c)
                .and_then(|r| r.layout.as_ref())
                .is_some_and(|l| l.shards.is_empty());
        if arts.is_empty() && !no_shards {
            return Err(QdrantOpError::MissingSnapshot {
                id: manifest.id.clone(),
                collection: c.to_string(),
            }
            .into());
        }
        let note = if details.mode == SnapshotMode::ShardStream {
            let Some(record) = details.collections.get(c) else {
                return Ok(None);
            };
            let sharded = Sharded {
                manifest,
                name: c,
                target: &target,
                record,
                arts: &arts,
            };
            let exists = server.existing.contains(&target);
            restore_sharded(self.ctx, q, &server.nodes, sharded, exists, reporter).await?
        } else {
            for art in arts {
                reporter.set_expected_raw(art.raw_bytes);
                reporter.phase(
                    "restoring",
                    format!("{} → zstd → Qdrant collection {target}", art.name),
                );
                let into = UploadTo {
                    collection: &target,
                    shard: None,
                    priority: Priority::Snapshot,
                };
                upload_artifact(self.ctx, q, manifest, art, into, reporter).await?;
            }
            String::new()
        };
        Ok(Some(if target == c {
            format!("{c}{note}")
        } else {
            format!("{c} as {target}{note}")
        }))
    }
}

/// One collection of a shard-stream backup and where it goes.
struct Sharded<'a> {
    manifest: &'a Manifest,
    /// The collection's name in the backup.
    name: &'a str,
    target: &'a str,
    record: &'a CollectionRecord,
    arts: &'a [&'a Artifact],
}

/// Restores a collection backed up shard by shard: created afresh with the recorded layout
/// (shard keys, payload indexes), every shard's snapshot uploaded to every node Qdrant placed a
/// replica of it on (`no_sync`: all replicas recover the same bytes, none waits for another), then
/// every replica active and the exact count equal to the backup's. Anything failing after the
/// collection was created removes it: no half collection stays. Returns a note for the summary.
async fn restore_sharded(
    ctx: &Context,
    q: &Qdrant,
    nodes: &Nodes,
    job: Sharded<'_>,
    exists: bool,
    reporter: &Reporter,
) -> Result<String, OpError> {
    let target = job.target;
    // Qdrant drops a collection's aliases with it: those naming the old one are put back.
    let mut kept = Vec::new();
    if exists {
        // Nothing is deleted before every snapshot this collection needs is known to be there.
        let store = ctx.source.store();
        for art in job.arts {
            let key = job.manifest.id.key(&art.name);
            if store.head(&key).await?.is_none() {
                return Err(QdrantOpError::MissingShard {
                    id: job.manifest.id.clone(),
                    collection: job.name.to_string(),
                    shard: art.shard.unwrap_or(0),
                }
                .into());
            }
        }
        // --force: the caller checked; the layout may differ, so the collection is made anew.
        kept = q.aliases().await?;
        kept.retain(|a| a.collection_name == target);
        q.delete_collection(target).await?;
    }
    q.create_collection(target, &create_body(&job.record.config))
        .await?;
    let mut placed = place_shards(ctx, q, nodes, &job, reporter).await;
    if placed.is_ok() {
        for alias in &kept {
            if let Err(e) = q.set_alias(&alias.alias_name, target, true).await {
                placed = Err(e.into());
                break;
            }
        }
    }
    if placed.is_err() {
        if exists {
            tracing::error!(
                collection = target,
                "the restore with --force had replaced the existing collection and failed: the old collection is gone; restore again once the cause is fixed"
            );
        }
        match q.delete_collection(target).await {
            Ok(()) => tracing::warn!(
                collection = target,
                "removed the collection the failed restore had created"
            ),
            Err(e) => {
                tracing::error!(collection = target, error = %e, "could not remove the collection the failed restore created; delete it by hand")
            }
        }
    }
    placed
}

async fn place_shards(
    ctx: &Context,
    q: &Qdrant,
    nodes: &Nodes,
    job: &Sharded<'_>,
    reporter: &Reporter,
) -> Result<String, OpError> {
    let Sharded {
        manifest,
        target,
        record,
        arts,
        ..
    } = *job;
    let placement = |detail: String| QdrantOpError::Placement {
        collection: target.to_string(),
        detail,
    };
    if let Some(layout) = &record.layout {
        rebuild_layout(q, target, layout).await?;
    }
    // Qdrant may still be activating the new replicas: uploads must not race its own transfers.
    wait_active(q, target, q.timeouts().snapshot).await?;
    let created = q.collection_cluster(target).await?.shards();
    let plan = shard_plan(job, &created)?;
    let mut replicas = 0;
    let mut checked = std::collections::BTreeSet::new();
    for art in arts {
        let recorded = art.shard.unwrap_or(0);
        let (shard, peers) = plan.get(&recorded).ok_or_else(|| {
            placement(format!(
                "the backup holds shard {recorded}, which the layout does not record"
            ))
        })?;
        for &peer in peers {
            let node = nodes.checked_client(q, peer, &mut checked).await?;
            reporter.set_expected_raw(art.raw_bytes);
            reporter.phase(
                "restoring",
                format!(
                    "{} → zstd → Qdrant collection {target} shard {shard} on {}",
                    art.name,
                    node.url()
                ),
            );
            let into = UploadTo {
                collection: target,
                shard: Some(*shard),
                priority: Priority::NoSync,
            };
            upload_artifact(ctx, &node, manifest, art, into, reporter).await?;
            replicas += 1;
        }
    }
    reporter.phase(
        "activating",
        format!("waiting until every replica of {target} is active"),
    );
    wait_active(q, target, q.timeouts().snapshot).await?;
    if let Some(layout) = &record.layout {
        check_restored_count(q, target, layout).await?;
    }
    Ok(format!(" ({} shards, {replicas} replicas)", plan.len()))
}

/// Where each shard of the backup goes: by recorded shard id, the created shard and the peers
/// holding its replicas.
fn shard_plan(
    job: &Sharded<'_>,
    created: &BTreeMap<u32, (Option<ShardKey>, Vec<Replica>)>,
) -> Result<BTreeMap<u32, (u32, Vec<PeerId>)>, QdrantOpError> {
    let placement = |detail: String| QdrantOpError::Placement {
        collection: job.target.to_string(),
        detail,
    };
    match &job.record.layout {
        Some(layout) => match_shards(layout, created).map_err(placement),
        // Backups of a single node before layouts were recorded: shard ids are kept.
        None => job
            .arts
            .iter()
            .map(|a| a.shard.unwrap_or(0))
            .map(|id| match created.get(&id) {
                Some((_, replicas)) if !replicas.is_empty() => {
                    Ok((id, (id, replicas.iter().map(|r| r.peer_id).collect())))
                }
                _ => Err(placement(format!("shard {id} was not created"))),
            })
            .collect(),
    }
}

/// The restored collection's exact count must be within what the backup counted while it was
/// taken.
async fn check_restored_count(
    q: &Qdrant,
    target: &str,
    layout: &ShardLayout,
) -> Result<(), OpError> {
    let found = q.exact_count(target).await?;
    let (low, high) = layout.count_range();
    if !(low..=high).contains(&found) {
        return Err(QdrantOpError::RestoredShort {
            collection: target.to_string(),
            expected: if low == high {
                low.to_string()
            } else {
                format!("between {low} and {high}")
            },
            found,
        }
        .into());
    }
    Ok(())
}

/// Shard keys (custom sharding creates no shard until its key exists) and payload indexes.
async fn rebuild_layout(q: &Qdrant, target: &str, layout: &ShardLayout) -> Result<(), OpError> {
    if layout.sharding_method == ShardingMethod::Custom {
        let mut keys: Vec<(&ShardKey, u32)> = Vec::new();
        for shard in &layout.shards {
            let Some(key) = &shard.key else { continue };
            match keys.iter_mut().find(|(k, _)| *k == key) {
                Some((_, n)) => *n += 1,
                None => keys.push((key, 1)),
            }
        }
        for (key, shards) in keys {
            q.create_shard_key(target, key, shards, layout.replication_factor)
                .await?;
        }
    }
    if let Some(fields) = layout.payload_schema.as_object() {
        for (field, schema) in fields {
            q.create_payload_index(target, field, schema).await?;
        }
    }
    Ok(())
}

/// `PUT /collections/{c}` body from a recorded `CollectionInfo.config`.
fn create_body(config: &Value) -> Value {
    let mut body = config["params"].clone();
    if !body.is_object() {
        body = Value::Object(Default::default());
    }
    let map = body.as_object_mut().expect("object");
    for (from, to) in [
        ("hnsw_config", "hnsw_config"),
        ("optimizer_config", "optimizers_config"),
        ("wal_config", "wal_config"),
        ("quantization_config", "quantization_config"),
    ] {
        if let Some(v) = config.get(from).filter(|v| !v.is_null()) {
            map.insert(to.into(), v.clone());
        }
    }
    body
}

/// Streams one stored snapshot into Qdrant's upload endpoint. The last bytes reach Qdrant only
/// after the stored object matched the manifest; on a mismatch the upload is cut off, and Qdrant's
/// own check of the snapshot's sha256 refuses anything incomplete.
async fn upload_artifact(
    ctx: &Context,
    q: &Qdrant,
    manifest: &Manifest,
    art: &Artifact,
    into: UploadTo<'_>,
    reporter: &Reporter,
) -> Result<(), OpError> {
    let (target, shard) = (into.collection, into.shard);
    let (writer, reader) = tokio::io::duplex(1 << 20);
    let body = ReaderStream::with_capacity(reader, 256 * 1024);
    let file_name = format!("soma-restore-{}.snapshot", manifest.id);
    let upload = q.upload_snapshot(into, &file_name, body, art.raw_bytes, &art.raw_sha256);
    let consumer = |cancel: CancellationToken| async move {
        tokio::select! {
            r = upload => r.map_err(OpError::from),
            () = cancel.cancelled() => Err(OpError::Cancelled),
        }
    };
    let restored = read_artifact(
        ctx.source.store().as_ref(),
        manifest,
        art,
        writer,
        RESTORE_HOLDBACK,
        reporter.counters(),
        consumer,
    )
    .await;
    // Qdrant keeps an uploaded collection snapshot on the node; no copy may stay there, whether
    // the recovery succeeded, failed or ran out of time.
    if shard.is_none() {
        match q.delete_snapshot(target, &file_name).await {
            Ok(()) | Err(QdrantError::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, collection = target, snapshot = %file_name, "could not delete the uploaded snapshot from the Qdrant node; delete it by hand to free its disk")
            }
        }
    }
    restored
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_renames_optimizer_config() {
        let config = serde_json::json!({
            "params": {"vectors": {"size": 4, "distance": "Dot"}, "shard_number": 2},
            "hnsw_config": {"m": 16},
            "optimizer_config": {"indexing_threshold": 20000},
            "wal_config": {"wal_capacity_mb": 32},
            "quantization_config": null
        });
        let body = create_body(&config);
        assert_eq!(body["vectors"]["size"], 4);
        assert_eq!(body["shard_number"], 2);
        assert_eq!(body["optimizers_config"]["indexing_threshold"], 20000);
        assert!(body.get("quantization_config").is_none());
    }
}
