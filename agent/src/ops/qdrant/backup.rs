//! Qdrant backups: each collection's (or shard's, or the storage's) snapshot streamed from the
//! node through the pipeline into the store, checked against what Qdrant announced.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::Value;
use soma_proto::v1;
use tokio::io::AsyncRead;

use super::{
    COLLECTION_FORMAT, ClusterRecord, CollectionRecord, QdrantDetails, QdrantOpError, SHARD_FORMAT,
    STORAGE_FORMAT, SampleRecord, SnapshotMode, collection_slug,
    layout::{self, Nodes, ShardLayout, read_layout},
};
use crate::{
    catalog::{Artifact, BackupId, Engine, Manifest, Target, Tool},
    engine::qdrant::{
        Alias, PeerId, Qdrant, QdrantError, SHARD_STREAM_SINCE, SnapshotDescription, minor_of,
    },
    error::OpError,
    jobs::Reporter,
    ops::{
        Context, Outcome,
        artifact::{ArtifactName, Source, write_artifact},
        details::Details,
    },
    pipeline::UploadSummary,
};

/// Takes a backup of Qdrant collections (all when `requested` is empty).
pub(crate) async fn backup_qdrant(
    ctx: Arc<Context>,
    id: BackupId,
    requested: Vec<String>,
    mode: v1::QdrantMode,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let q = ctx.qdrant()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());
    reporter.phase(
        "preparing",
        format!("reading collections and aliases from {}", q.url()),
    );
    let version = q.version().await?;
    let nodes = Nodes::read(q).await?;
    let mode = mode_for(mode, ctx.qdrant_mode, &nodes, &version)?;
    let collections = choose_collections(q, requested, mode).await?;
    let aliases: Vec<Alias> = q
        .aliases()
        .await?
        .into_iter()
        .filter(|a| collections.contains(&a.collection_name))
        .collect();

    let taken = take_snapshots(&ctx, q, &nodes, &id, &collections, mode, &reporter).await;
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
        Engine::Qdrant,
        mode.kind(),
        Target {
            // A storage snapshot names no collection.
            name: Some(collections.join(","))
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "storage".into()),
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
        Details::Qdrant(QdrantDetails {
            qdrant_version: version,
            mode,
            aliases,
            collections: records,
            cluster: nodes.this.map(|node| ClusterRecord {
                node,
                peers: nodes.peers.keys().copied().collect(),
            }),
        })
        .to_value()?,
    );
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    Ok(Outcome::new(
        format!(
            "backup {id} of {} Qdrant collection(s) complete",
            collections.len()
        ),
        manifest,
    ))
}

/// The mode a backup is taken in: as requested, else the agent's `default`. A distributed
/// Qdrant is streamed shard by shard (a collection snapshot holds one node's shards only) and
/// has no storage snapshot; streaming needs a server recent enough.
fn mode_for(
    requested: v1::QdrantMode,
    default: v1::QdrantMode,
    nodes: &Nodes,
    version: &str,
) -> Result<SnapshotMode, OpError> {
    let mode = SnapshotMode::from_proto(match requested {
        v1::QdrantMode::Unspecified => default,
        m => m,
    });
    let mode = match mode {
        SnapshotMode::FullStorage if nodes.distributed => {
            return Err(QdrantOpError::FullStorageInCluster.into());
        }
        SnapshotMode::Collection if nodes.distributed => {
            tracing::info!(
                peers = nodes.peers.len(),
                "Qdrant runs distributed: a collection snapshot would hold this node's shards only, so every shard is streamed from a node holding an active replica"
            );
            SnapshotMode::ShardStream
        }
        mode => mode,
    };
    if mode == SnapshotMode::ShardStream && minor_of(version).is_none_or(|v| v < SHARD_STREAM_SINCE)
    {
        return Err(QdrantError::Unsupported {
            feature: if nodes.distributed {
                "backing up a distributed Qdrant (it streams each shard from a node holding it)"
            } else {
                "streaming shard snapshots (no local staging)"
            },
            needs: format!("{}.{}", SHARD_STREAM_SINCE.0, SHARD_STREAM_SINCE.1),
            server: version.to_string(),
        }
        .into());
    }
    Ok(mode)
}

/// The collections a backup takes: those requested, each of which the server must have, or all
/// of them (none only for a storage snapshot).
async fn choose_collections(
    q: &Qdrant,
    requested: Vec<String>,
    mode: SnapshotMode,
) -> Result<Vec<String>, OpError> {
    super::check_requested(&requested)?;
    let existing = q.collections().await?;
    let collections = if requested.is_empty() {
        existing
    } else {
        if let Some(c) = requested.iter().find(|c| !existing.contains(c)) {
            return Err(QdrantError::NotFound {
                what: format!("collection {c}"),
                message: format!("the server has: {}", existing.join(", ")),
            }
            .into());
        }
        requested
    };
    if collections.is_empty() && mode != SnapshotMode::FullStorage {
        return Err(QdrantOpError::NoCollections.into());
    }
    Ok(collections)
}

type Taken = (Vec<Artifact>, BTreeMap<String, CollectionRecord>);

async fn take_snapshots(
    ctx: &Context,
    q: &Qdrant,
    nodes: &Nodes,
    id: &BackupId,
    collections: &[String],
    mode: SnapshotMode,
    reporter: &Reporter,
) -> Result<Taken, OpError> {
    let mut taking = Taking {
        ctx,
        q,
        nodes,
        id,
        reporter,
        checked: std::collections::BTreeSet::new(),
        artifacts: Vec::new(),
    };
    let mut records = BTreeMap::new();
    for (index, c) in collections.iter().enumerate() {
        let (info, sharded) = if mode == SnapshotMode::ShardStream {
            let (layout, sources, info) = read_layout(q, nodes, c).await?;
            (info, Some((layout, sources)))
        } else {
            (q.collection_info(c).await?, None)
        };
        let config = info.get("config").cloned().unwrap_or(Value::Null);
        let mut record = CollectionRecord {
            points_count: info.get("points_count").and_then(Value::as_u64),
            config: config.clone(),
            snapshot: None,
            layout: None,
            sample: sample_of(q, c, record_points(&info)).await,
        };
        match mode {
            SnapshotMode::ShardStream => {
                let (layout, sources) = sharded.ok_or_else(|| QdrantOpError::ShardsMissing {
                    collection: c.clone(),
                    detail: "its layout was not read".into(),
                })?;
                let layout = taking.shards(index, c, layout, sources).await?;
                record.layout = Some(layout);
            }
            SnapshotMode::FullStorage => {}
            SnapshotMode::Collection => {
                let name = format!("collections/{}.snapshot.zst", collection_slug(index, c));
                let (art, desc) = snapshot_collection(ctx, q, id, c, &name, reporter).await?;
                taking.artifacts.push(art);
                record.snapshot = Some(desc);
            }
        }
        records.insert(c.clone(), record);
    }
    if mode == SnapshotMode::FullStorage {
        taking.full_storage().await?;
    }
    Ok((taking.artifacts, records))
}

/// One backup's snapshots as they are taken: the artifacts stored so far, and the nodes already
/// asked who they are (once per backup).
struct Taking<'a> {
    ctx: &'a Context,
    q: &'a Qdrant,
    nodes: &'a Nodes,
    id: &'a BackupId,
    reporter: &'a Reporter,
    checked: std::collections::BTreeSet<PeerId>,
    artifacts: Vec<Artifact>,
}

impl Taking<'_> {
    /// Streams every shard of collection `c` from the peer chosen for it; the layout comes back
    /// with the collection's exact count once they are all stored.
    async fn shards(
        &mut self,
        index: usize,
        c: &str,
        mut layout: ShardLayout,
        sources: Vec<layout::Source>,
    ) -> Result<ShardLayout, OpError> {
        for source in sources {
            let shard = source.shard;
            let node = self
                .nodes
                .checked_client(self.q, source.peer, &mut self.checked)
                .await?;
            let name = format!(
                "collections/{}/shard-{shard}.snapshot.zst",
                collection_slug(index, c)
            );
            self.reporter.phase(
                "streaming",
                format!("{c} shard {shard} from {} → zstd → store", node.url()),
            );
            let reader = node.stream_shard(c, shard).await?;
            let what = ArtifactName {
                name: &name,
                format: SHARD_FORMAT,
            };
            let art = store_artifact(self.ctx, self.id, what, reader, self.reporter, None).await?;
            // Qdrant streams a local replica whatever its state: one marked dead while it was
            // streamed may have missed writes, so it must still be active.
            still_active(&node, c, shard, source.peer).await?;
            self.artifacts.push(Artifact {
                collection: Some(c.to_string()),
                shard: Some(shard),
                ..art
            });
        }
        layout.exact_count_end = Some(self.q.exact_count(c).await?);
        Ok(layout)
    }

    /// A storage snapshot of the node, streamed to the store and then deleted from the node
    /// whether or not it was stored.
    async fn full_storage(&mut self) -> Result<(), OpError> {
        let (q, reporter) = (self.q, self.reporter);
        reporter.phase(
            "snapshotting",
            "creating a storage snapshot on the Qdrant node",
        );
        let desc = q.create_full_snapshot().await?;
        let outcome = async {
            let reader = q.download_full_snapshot(&desc.name).await?;
            store_artifact(
                self.ctx,
                self.id,
                ArtifactName {
                    name: "storage.snapshot.zst",
                    format: STORAGE_FORMAT,
                },
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
        self.artifacts.push(outcome?);
        Ok(())
    }
}

/// What Qdrant announced about a snapshot, which the streamed bytes must match.
struct Announced<'a> {
    collection: &'a str,
    snapshot: &'a SnapshotDescription,
}

/// A snapshot download as an artifact source: complete when it matches what Qdrant announced
/// (size and sha256), when Qdrant announced anything.
struct Snapshot<'a, R> {
    reader: Option<R>,
    announced: Option<Announced<'a>>,
}

#[async_trait]
impl<R> Source for Snapshot<'_, R>
where
    R: AsyncRead + Unpin + Send,
{
    type Reader = R;
    type Verdict = ();

    fn reader(&mut self) -> R {
        self.reader.take().expect("reader taken once")
    }

    async fn verdict(self, summary: &UploadSummary) -> Result<(), OpError> {
        let Some(Announced {
            collection,
            snapshot,
        }) = self.announced
        else {
            return Ok(());
        };
        let digest = &summary.digest;
        let checksum_ok = snapshot
            .checksum
            .as_ref()
            .is_none_or(|c| *c == digest.raw_sha256);
        if digest.raw_bytes != snapshot.size || !checksum_ok {
            return Err(QdrantError::SnapshotChecksum {
                collection: collection.to_string(),
                snapshot: snapshot.name.clone(),
                expected: snapshot
                    .checksum
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| format!("(none; {} bytes announced)", snapshot.size)),
                actual: digest.raw_sha256,
                bytes: digest.raw_bytes,
            }
            .into());
        }
        Ok(())
    }

    async fn stop(self) {}
}

/// Streams `reader` into artifact `name` of backup `id` and publishes it.
async fn store_artifact<R>(
    ctx: &Context,
    id: &BackupId,
    what: ArtifactName<'_>,
    reader: R,
    reporter: &Reporter,
    announced: Option<Announced<'_>>,
) -> Result<Artifact, OpError>
where
    R: AsyncRead + Unpin + Send,
{
    let source = Snapshot {
        reader: Some(reader),
        announced,
    };
    let (artifact, ()) = write_artifact(ctx, id, what, source, reporter).await?;
    Ok(artifact)
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
            ArtifactName {
                name,
                format: COLLECTION_FORMAT,
            },
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

/// Fails when the replica of `shard` on `peer` is no longer active after it was streamed.
async fn still_active(
    node: &Qdrant,
    c: &str,
    shard: u32,
    peer: crate::engine::qdrant::PeerId,
) -> Result<(), OpError> {
    let view = node.collection_cluster(c).await?;
    match view.local_shards.iter().find(|l| l.shard_id == shard) {
        Some(l) if l.state.is_active() => Ok(()),
        other => Err(QdrantOpError::ShardChanged {
            collection: c.to_string(),
            shard,
            peer,
            state: other.map_or_else(|| "gone".into(), |l| l.state.to_string()),
        }
        .into()),
    }
}

/// Points count from a `CollectionInfo`.
fn record_points(info: &Value) -> Option<u64> {
    info.get("points_count").and_then(Value::as_u64)
}

/// A sample point of collection `c` and the nearest point to its vector by exact search, for a
/// restore drill's sample search. Taken just before the snapshot: a collection written during the
/// backup may differ from it. Anything unusual (no points, sparse or multi-vectors, a server
/// without the query API) records no sample, with a warning; the backup itself is unaffected.
async fn sample_of(q: &Qdrant, c: &str, points: Option<u64>) -> Option<SampleRecord> {
    if points == Some(0) {
        return None;
    }
    let sampled = async {
        let Some(point) = q.sample_point(c).await? else {
            return Ok(None);
        };
        let Some((using, vector)) = SampleRecord::dense_vector(&point["vector"]) else {
            return Ok(None);
        };
        let nearest = q
            .exact_search(c, &vector, using.as_deref(), 1)
            .await?
            .into_iter()
            .next();
        Ok::<_, crate::engine::qdrant::QdrantError>(nearest.map(|nearest| SampleRecord {
            id: point["id"].clone(),
            vector,
            using,
            nearest,
        }))
    };
    match sampled.await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(collection = c, error = %e, "could not take a sample point for restore drills");
            None
        }
    }
}
