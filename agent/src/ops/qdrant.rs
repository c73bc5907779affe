//! Qdrant backups: snapshots streamed from the node through the pipeline into the store, and
//! streamed back into Qdrant's snapshot upload, with the aliases a snapshot does not carry.

use std::{collections::BTreeMap, sync::Arc};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use soma_proto::v1;
use tokio_util::{io::ReaderStream, sync::CancellationToken};

use super::{
    Context, abort_quietly_staged, artifact_of, backup_info, missing_is_data_loss,
    postgres::RESTORE_HOLDBACK,
};
use crate::{
    catalog::{Artifact, BackupId, BackupKeys, CatalogError, Manifest, Target, Tool},
    engine::qdrant::{
        Alias, Qdrant, QdrantError, SHARD_STREAM_SINCE, SnapshotDescription, minor_of,
    },
    error::OpError,
    jobs::Reporter,
    pipeline::{self, PipelineError},
};

/// Format of a collection snapshot artifact's uncompressed bytes.
pub const COLLECTION_FORMAT: &str = "qdrant/collection-snapshot";
/// Format of a shard snapshot artifact.
pub const SHARD_FORMAT: &str = "qdrant/shard-snapshot";
/// Format of a storage snapshot artifact.
pub const STORAGE_FORMAT: &str = "qdrant/storage-snapshot";

/// What a Qdrant backup records beyond its artifacts (the manifest's `details`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QdrantDetails {
    /// `GET /` version of the server backed up.
    pub qdrant_version: String,
    /// "collection", "shard-stream" or "full-storage".
    pub mode: String,
    /// Aliases of the backed-up collections (snapshots do not include them).
    pub aliases: Vec<Alias>,
    /// Per collection: configuration and size at backup time.
    pub collections: BTreeMap<String, CollectionRecord>,
}

/// One collection as it was when backed up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CollectionRecord {
    /// Approximate points count (`CollectionInfo.points_count`).
    pub points_count: Option<u64>,
    /// `CollectionInfo.config`.
    pub config: Value,
    /// Qdrant's description of the snapshot taken (collection mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotDescription>,
}

fn mode_name(mode: v1::QdrantMode) -> &'static str {
    match mode {
        v1::QdrantMode::ShardStream => "shard-stream",
        v1::QdrantMode::FullStorage => "full-storage",
        _ => "collection",
    }
}

/// Parses `--qdrant-mode` values.
pub fn parse_mode(s: &str) -> Result<v1::QdrantMode, String> {
    match s {
        "collection" => Ok(v1::QdrantMode::Collection),
        "shard-stream" => Ok(v1::QdrantMode::ShardStream),
        "full-storage" => Ok(v1::QdrantMode::FullStorage),
        other => Err(format!(
            "unknown Qdrant mode {other:?}: use collection, shard-stream or full-storage"
        )),
    }
}

/// A store key segment for a collection: its position plus a safe slug (the manifest keeps the
/// real name, which may hold characters no key should).
fn collection_slug(index: usize, name: &str) -> String {
    let slug: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(60)
        .collect();
    format!("{index:03}-{slug}")
}

/// Takes a backup of Qdrant collections (all when `requested` is empty).
pub async fn backup_qdrant(
    ctx: Arc<Context>,
    id: BackupId,
    requested: Vec<String>,
    mode: v1::QdrantMode,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let q = ctx.qdrant()?;
    let started_at = Utc::now();
    let mode = match mode {
        v1::QdrantMode::Unspecified => ctx.qdrant_mode,
        m => m,
    };
    reporter.set_operation_id(id.as_str());
    reporter.phase(
        "preparing",
        format!("reading collections and aliases from {}", q.url()),
    );
    let version = q.version().await?;
    if mode == v1::QdrantMode::ShardStream
        && minor_of(&version).is_none_or(|v| v < SHARD_STREAM_SINCE)
    {
        return Err(QdrantError::Unsupported {
            feature: "streaming shard snapshots (no local staging)",
            needs: format!("{}.{}", SHARD_STREAM_SINCE.0, SHARD_STREAM_SINCE.1),
            server: version,
        }
        .into());
    }
    let existing = q.collections().await?;
    let collections = if requested.is_empty() {
        existing
    } else {
        for c in &requested {
            if !existing.contains(c) {
                return Err(QdrantError::NotFound {
                    what: format!("collection {c}"),
                    message: format!("the server has: {}", existing.join(", ")),
                }
                .into());
            }
        }
        requested
    };
    if collections.is_empty() && mode != v1::QdrantMode::FullStorage {
        return Err(OpError::FailedPrecondition(
            "Qdrant has no collections: nothing to back up".into(),
        ));
    }
    let aliases: Vec<Alias> = q
        .aliases()
        .await?
        .into_iter()
        .filter(|a| collections.contains(&a.collection_name))
        .collect();

    let taken = take_snapshots(&ctx, q, &id, &collections, mode, &reporter).await;
    let (artifacts, records) = match taken {
        Ok(taken) => taken,
        Err(e) => {
            if let Err(discard) = ctx.catalog.discard(&id).await {
                tracing::warn!(error = %discard, "could not remove the artifacts of the failed backup");
            }
            return Err(e);
        }
    };
    let manifest = Manifest::completed(
        id.clone(),
        "qdrant",
        &format!("{}-snapshots", mode_name(mode)),
        Target {
            name: if collections.is_empty() {
                "storage".into()
            } else {
                collections.join(",")
            },
            server: q.url(),
            server_version: version.clone(),
        },
        Tool {
            name: "qdrant".into(),
            version: version.clone(),
        },
        started_at,
    )
    .with_artifacts(artifacts)
    .with_details(
        serde_json::to_value(QdrantDetails {
            qdrant_version: version,
            mode: mode_name(mode).into(),
            aliases,
            collections: records,
        })
        .expect("details serialise"),
    );
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    Ok(v1::OperationResult {
        summary: format!(
            "backup {id} of {} Qdrant collection(s) complete",
            collections.len()
        ),
        raw_bytes: manifest.raw_bytes,
        stored_bytes: manifest.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&manifest)),
    })
}

type Taken = (Vec<Artifact>, BTreeMap<String, CollectionRecord>);

async fn take_snapshots(
    ctx: &Context,
    q: &Qdrant,
    id: &BackupId,
    collections: &[String],
    mode: v1::QdrantMode,
    reporter: &Reporter,
) -> Result<Taken, OpError> {
    let mut artifacts = Vec::new();
    let mut records = BTreeMap::new();
    for (index, c) in collections.iter().enumerate() {
        let info = q.collection_info(c).await?;
        let config = info.get("config").cloned().unwrap_or(Value::Null);
        let mut record = CollectionRecord {
            points_count: info.get("points_count").and_then(Value::as_u64),
            config: config.clone(),
            snapshot: None,
        };
        match mode {
            v1::QdrantMode::ShardStream => {
                let shards = config["params"]["shard_number"].as_u64().unwrap_or(1) as u32;
                for shard in 0..shards {
                    let name = format!(
                        "collections/{}/shard-{shard}.snapshot.zst",
                        collection_slug(index, c)
                    );
                    reporter.phase("streaming", format!("{c} shard {shard} → zstd → store"));
                    let reader = q.stream_shard(c, shard).await?;
                    let art = store_artifact(ctx, id, &name, SHARD_FORMAT, reader, reporter, None)
                        .await?;
                    artifacts.push(Artifact {
                        collection: Some(c.clone()),
                        shard: Some(shard),
                        ..art
                    });
                }
            }
            v1::QdrantMode::FullStorage => {}
            _ => {
                let name = format!("collections/{}.snapshot.zst", collection_slug(index, c));
                let (art, desc) = snapshot_collection(ctx, q, id, c, &name, reporter).await?;
                artifacts.push(art);
                record.snapshot = Some(desc);
            }
        }
        records.insert(c.clone(), record);
    }
    if mode == v1::QdrantMode::FullStorage {
        reporter.phase(
            "snapshotting",
            "creating a storage snapshot on the Qdrant node",
        );
        let desc = q.create_full_snapshot().await?;
        let outcome = async {
            let reader = q.download_full_snapshot(&desc.name).await?;
            store_artifact(
                ctx,
                id,
                "storage.snapshot.zst",
                STORAGE_FORMAT,
                reader,
                reporter,
                Some(Announced {
                    collection: "storage",
                    snapshot: &desc,
                }),
            )
            .await
        }
        .await;
        if let Err(e) = q.delete_full_snapshot(&desc.name).await {
            tracing::warn!(error = %e, snapshot = %desc.name, "could not delete the storage snapshot from the Qdrant node; delete it by hand to free its disk");
        }
        artifacts.push(outcome?);
    }
    Ok((artifacts, records))
}

/// What Qdrant announced about a snapshot, which the streamed bytes must match.
struct Announced<'a> {
    collection: &'a str,
    snapshot: &'a SnapshotDescription,
}

/// Streams `reader` into artifact `name` of backup `id` and publishes it — only if it matches
/// what Qdrant `announced` (size and sha256), when Qdrant announced anything.
#[allow(clippy::too_many_arguments)]
async fn store_artifact<R>(
    ctx: &Context,
    id: &BackupId,
    name: &str,
    format: &str,
    reader: R,
    reporter: &Reporter,
    announced: Option<Announced<'_>>,
) -> Result<Artifact, OpError>
where
    R: tokio::io::AsyncRead + Unpin + Send,
{
    let upload = ctx.catalog.store().start_upload(&id.key(name)).await?;
    let staged = pipeline::upload(reader, upload, &ctx.settings, reporter.counters()).await?;
    let summary = staged.summary.clone();
    if let Some(Announced {
        collection,
        snapshot,
    }) = announced
    {
        let digest = &summary.digest;
        let checksum_ok = snapshot
            .checksum
            .as_ref()
            .is_none_or(|c| c.eq_ignore_ascii_case(&digest.raw_sha256));
        if digest.raw_bytes != snapshot.size || !checksum_ok {
            abort_quietly_staged(staged).await;
            return Err(QdrantError::SnapshotChecksum {
                collection: collection.to_string(),
                snapshot: snapshot.name.clone(),
                expected: snapshot
                    .checksum
                    .clone()
                    .unwrap_or_else(|| format!("(none; {} bytes announced)", snapshot.size)),
                actual: digest.raw_sha256.clone(),
                bytes: digest.raw_bytes,
            }
            .into());
        }
    }
    let meta = staged.commit().await?;
    Ok(artifact_of(
        &ctx.settings,
        name,
        format,
        &summary,
        meta.size,
    ))
}

/// Snapshot on the node → stream → store, and always delete the node's copy afterwards.
async fn snapshot_collection(
    ctx: &Context,
    q: &Qdrant,
    id: &BackupId,
    collection: &str,
    name: &str,
    reporter: &Reporter,
) -> Result<(Artifact, SnapshotDescription), OpError> {
    reporter.phase(
        "snapshotting",
        format!("creating a snapshot of collection {collection} on the Qdrant node"),
    );
    let desc = q.create_snapshot(collection).await?;
    let outcome = async {
        reporter.phase(
            "streaming",
            format!("{collection}: {} → zstd → store", desc.name),
        );
        let reader = q.download_snapshot(collection, &desc.name).await?;
        store_artifact(
            ctx,
            id,
            name,
            COLLECTION_FORMAT,
            reader,
            reporter,
            Some(Announced {
                collection,
                snapshot: &desc,
            }),
        )
        .await
    }
    .await;
    // No copy may stay on the node, whether the transfer worked or not.
    if let Err(e) = q.delete_snapshot(collection, &desc.name).await {
        tracing::warn!(error = %e, collection, snapshot = %desc.name, "could not delete the snapshot from the Qdrant node; delete it by hand to free its disk");
    }
    let art = outcome?;
    Ok((
        Artifact {
            collection: Some(collection.to_string()),
            ..art
        },
        desc,
    ))
}

/// Restores collections of a Qdrant backup; everything is checked before anything is uploaded.
pub async fn restore_qdrant(
    ctx: Arc<Context>,
    manifest: Manifest,
    selected: Vec<String>,
    rename_to: String,
    force: bool,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let q = ctx.qdrant()?;
    reporter.set_operation_id(manifest.id.as_str());
    let details: QdrantDetails = serde_json::from_value(manifest.details.clone()).map_err(|e| {
        OpError::Catalog(CatalogError::BadManifest {
            id: manifest.id.to_string(),
            reason: format!("Qdrant details: {e}"),
        })
    })?;
    if details.mode == "full-storage" {
        return Err(OpError::FailedPrecondition(format!(
            "backup {} is a storage snapshot: Qdrant recovers those only at start-up (qdrant --storage-snapshot FILE), not through its API; restore a collection backup instead",
            manifest.id
        )));
    }
    let in_backup: Vec<String> = details.collections.keys().cloned().collect();
    let chosen = if selected.is_empty() {
        in_backup.clone()
    } else {
        for c in &selected {
            if !in_backup.contains(c) {
                return Err(OpError::InvalidArgument(format!(
                    "collection {c} is not in backup {} (it holds: {})",
                    manifest.id,
                    in_backup.join(", ")
                )));
            }
        }
        selected
    };
    if !rename_to.is_empty() && chosen.len() != 1 {
        return Err(OpError::InvalidArgument(
            "--as renames one collection: choose it with --collection NAME".into(),
        ));
    }
    let target_of = |c: &str| {
        if rename_to.is_empty() {
            c.to_string()
        } else {
            rename_to.clone()
        }
    };

    reporter.phase(
        "preparing",
        format!("checking {} before restoring", q.url()),
    );
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
    if !force
        && let Some(c) = chosen
            .iter()
            .map(|c| target_of(c))
            .find(|t| existing.contains(t))
    {
        return Err(QdrantError::Exists(c).into());
    }
    // Aliases follow a restore in place only; a copy under another name must not steal them.
    let current_aliases = q.aliases().await?;
    let mut alias_plan = Vec::new();
    if rename_to.is_empty() {
        for alias in details
            .aliases
            .iter()
            .filter(|a| chosen.contains(&a.collection_name))
        {
            match current_aliases
                .iter()
                .find(|c| c.alias_name == alias.alias_name)
            {
                Some(cur) if cur.collection_name == alias.collection_name => {}
                Some(cur) if !force => {
                    return Err(OpError::FailedPrecondition(format!(
                        "alias {} exists and points to collection {}; pass --force to repoint it to {}",
                        alias.alias_name, cur.collection_name, alias.collection_name
                    )));
                }
                Some(_) => alias_plan.push((alias.clone(), true)),
                None => alias_plan.push((alias.clone(), false)),
            }
        }
    }

    let mut restored = Vec::new();
    for c in &chosen {
        let target = target_of(c);
        let mut arts: Vec<&Artifact> = manifest
            .artifacts
            .iter()
            .filter(|a| a.collection.as_deref() == Some(c.as_str()))
            .collect();
        arts.sort_by_key(|a| a.shard);
        if arts.is_empty() {
            return Err(OpError::DataLoss(format!(
                "backup {} lists collection {c} but has no snapshot of it",
                manifest.id
            )));
        }
        if details.mode == "shard-stream" && !existing.contains(&target) {
            let record = &details.collections[c];
            q.create_collection(&target, &create_body(&record.config))
                .await?;
        }
        for art in arts {
            reporter.set_expected_raw(art.raw_bytes);
            reporter.phase(
                "restoring",
                format!("{} → zstd → Qdrant collection {target}", art.name),
            );
            upload_artifact(&ctx, q, &manifest, art, &target, &reporter).await?;
        }
        restored.push(if target == *c {
            c.clone()
        } else {
            format!("{c} as {target}")
        });
    }
    for (alias, replace) in &alias_plan {
        q.set_alias(&alias.alias_name, &alias.collection_name, *replace)
            .await?;
    }
    let alias_note = if alias_plan.is_empty() {
        String::new()
    } else {
        format!(
            "; aliases {}",
            alias_plan
                .iter()
                .map(|(a, _)| format!("{} → {}", a.alias_name, a.collection_name))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    Ok(v1::OperationResult {
        summary: format!(
            "restored {} from backup {}{alias_note}",
            restored.join(", "),
            manifest.id
        ),
        raw_bytes: manifest.raw_bytes,
        stored_bytes: manifest.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&manifest)),
    })
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
    target: &str,
    reporter: &Reporter,
) -> Result<(), OpError> {
    let (writer, reader) = tokio::io::duplex(1 << 20);
    let cancel = CancellationToken::new();
    let key = manifest.id.key(&art.name);
    let body = ReaderStream::with_capacity(reader, 256 * 1024);
    let file_name = format!("soma-restore-{}.snapshot", manifest.id);
    let upload = q.upload_snapshot(
        target,
        art.shard,
        &file_name,
        body,
        art.raw_bytes,
        &art.raw_sha256,
    );
    let download = async {
        let r = pipeline::download(
            ctx.catalog.store().as_ref(),
            &key,
            &art.digest(),
            writer,
            RESTORE_HOLDBACK,
            reporter.counters(),
        )
        .await;
        if r.is_err() {
            cancel.cancel();
        }
        r
    };
    let upload = async {
        tokio::select! {
            r = upload => Some(r),
            _ = cancel.cancelled() => None,
        }
    };
    let (down, up) = tokio::join!(download, upload);
    match (down, up) {
        (Ok(()), Some(Ok(()))) => {
            // Qdrant keeps an uploaded collection snapshot on the node; no copy may stay there.
            if art.shard.is_none() {
                match q.delete_snapshot(target, &file_name).await {
                    Ok(()) | Err(QdrantError::NotFound { .. }) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, collection = target, snapshot = %file_name, "could not delete the uploaded snapshot from the Qdrant node; delete it by hand to free its disk")
                    }
                }
            }
            Ok(())
        }
        (_, Some(Err(qe))) => Err(qe.into()),
        (Err(e), _) if !matches!(e, PipelineError::Sink(_)) => {
            Err(missing_is_data_loss(manifest, e))
        }
        (Err(e), _) => Err(e.into()),
        (Ok(()), None) => Err(OpError::FailedPrecondition(
            "the upload to Qdrant was cancelled".into(),
        )),
    }
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

    #[test]
    fn collection_keys_are_safe() {
        assert_eq!(collection_slug(3, "docs/../x y"), "003-docs----x-y");
    }
}
