//! The operations themselves: backup, restore and verify, composed from engine, pipeline, store and
//! catalog. Each runs inside a job (see [`crate::jobs`]) and reports through a [`Reporter`].

pub mod physical;
pub mod postgres;
pub mod qdrant;
pub mod set;

pub use postgres::{PG_DUMP_ARTIFACT, backup_postgres, restore_postgres};

use std::sync::Arc;

use soma_proto::v1;
use tracing::Instrument;

use crate::{
    catalog::{Artifact, BackupKeys, Catalog, Compression, Manifest},
    engine::{postgres::Postgres, qdrant::Qdrant},
    error::OpError,
    jobs::Reporter,
    pipeline::{self, PipelineError, Settings},
    store::StoreError,
};

/// Everything an operation needs from the agent.
#[derive(Debug, Clone)]
pub struct Context {
    /// Manifests and the store.
    pub catalog: Catalog,
    /// The PostgreSQL server, when configured.
    pub postgres: Option<Postgres>,
    /// The Qdrant server, when configured.
    pub qdrant: Option<Qdrant>,
    /// How Qdrant snapshots are taken when a request does not say.
    pub qdrant_mode: v1::QdrantMode,
    /// Compression and part settings.
    pub settings: Settings,
    /// The continuous WAL archive, when streaming is on.
    pub wal_stream: Option<WalStreamInfo>,
}

/// The WAL stream as the rest of the agent sees it.
#[derive(Debug, Clone)]
pub struct WalStreamInfo {
    /// Its settings.
    pub config: crate::wal::stream::StreamConfig,
    /// Its live status.
    pub status: crate::wal::stream::SharedStatus,
}

impl Context {
    /// The PostgreSQL engine, or an error saying how to configure it.
    pub fn postgres(&self) -> Result<&Postgres, OpError> {
        self.postgres.as_ref().ok_or_else(|| {
            OpError::FailedPrecondition(
                "this agent has no PostgreSQL configured; start it with --postgres-url (SOMA_POSTGRES_URL)".into(),
            )
        })
    }

    /// The Qdrant engine, or an error saying how to configure it.
    pub fn qdrant(&self) -> Result<&Qdrant, OpError> {
        self.qdrant.as_ref().ok_or_else(|| {
            OpError::FailedPrecondition(
                "this agent has no Qdrant configured; start it with --qdrant-url (SOMA_QDRANT_URL)"
                    .into(),
            )
        })
    }
}

/// The manifest entry of an artifact the pipeline uploaded.
pub(crate) fn artifact_of(
    settings: &Settings,
    name: &str,
    format: &str,
    summary: &pipeline::UploadSummary,
    stored_bytes: u64,
) -> Artifact {
    Artifact {
        name: name.into(),
        format: format.into(),
        raw_bytes: summary.digest.raw_bytes,
        stored_bytes,
        raw_sha256: summary.digest.raw_sha256.clone(),
        stored_sha256: summary.digest.stored_sha256.clone(),
        compression: Compression {
            algorithm: "zstd".into(),
            level: settings.compression_level,
            threads: settings.compression_threads,
        },
        part_size: settings.part_size as u64,
        max_part_size: summary.max_part_size as u64,
        parts: summary.parts,
        collection: None,
        shard: None,
    }
}

/// The wire form of a manifest.
pub fn backup_info(m: &Manifest) -> v1::BackupInfo {
    let engine = match m.engine.as_str() {
        "postgres" => v1::Engine::Postgres,
        "qdrant" => v1::Engine::Qdrant,
        "set" => v1::Engine::Set,
        _ => v1::Engine::Unspecified,
    };
    v1::BackupInfo {
        id: m.id.to_string(),
        engine: engine as i32,
        target: m.target.name.clone(),
        started_at: m.started_at.to_rfc3339(),
        completed_at: m.completed_at.to_rfc3339(),
        raw_bytes: m.raw_bytes,
        stored_bytes: m.stored_bytes,
        manifest_json: serde_json::to_string_pretty(m).expect("manifest serialises"),
        members: m.members.iter().map(ToString::to_string).collect(),
        kind: m.kind.clone(),
        recovery_window: None,
    }
}

/// Publishes a staged artifact and checks that the store holds exactly the bytes sent (the store
/// verified every part's sha256; this catches a server that published something else).
pub(crate) async fn commit_verified(
    store: &dyn crate::store::Store,
    key: &str,
    staged: pipeline::Staged,
) -> Result<(pipeline::UploadSummary, crate::store::ObjectMeta), OpError> {
    let summary = staged.summary.clone();
    let object = staged.commit().await?;
    match store.head(key).await? {
        Some(meta) if meta.size == summary.digest.stored_bytes => Ok((summary, object)),
        other => Err(OpError::DataLoss(format!(
            "{key}: the store reports {} bytes after upload, {} were sent; the backup was not recorded",
            other
                .map(|m| m.size.to_string())
                .unwrap_or_else(|| "no object".into()),
            summary.digest.stored_bytes
        ))),
    }
}

/// Aborts an upload nobody will complete; a failure only leaves what the next start-up sweeps.
pub(crate) async fn abort_quietly(upload: Box<dyn crate::store::Upload>) {
    if let Err(e) = upload.abort().await {
        tracing::warn!(error = %e, "aborting an unused upload failed; the agent removes it at its next start");
    }
}

pub(crate) async fn abort_quietly_staged(staged: pipeline::Staged) {
    if let Err(e) = staged.abort().await {
        tracing::warn!(error = %e, "aborting an unused upload failed; the agent removes it at its next start");
    }
}

pub(crate) fn artifact<'a>(m: &'a Manifest, name: &str) -> Result<&'a Artifact, OpError> {
    m.artifacts.iter().find(|a| a.name == name).ok_or_else(|| {
        OpError::DataLoss(format!(
            "backup {} has no artifact {name}; its manifest lists {:?}",
            m.id,
            m.artifacts.iter().map(|a| &a.name).collect::<Vec<_>>()
        ))
    })
}

/// Maps a missing artifact object to data loss: its manifest promised it.
pub(crate) fn missing_is_data_loss(m: &Manifest, e: PipelineError) -> OpError {
    match e {
        PipelineError::Store(StoreError::NotFound { key }) => OpError::DataLoss(format!(
            "backup {} is damaged: its manifest lists {key} but the store does not have it",
            m.id
        )),
        other => other.into(),
    }
}

/// Reads every artifact of a backup (for a set: of every member) back from the store and checks
/// sizes and digests.
pub async fn verify(
    ctx: Arc<Context>,
    manifest: Manifest,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    reporter.set_operation_id(manifest.id.as_str());
    let mut backups = Vec::new();
    for id in &manifest.members {
        backups.push(ctx.catalog.get(id).await.map_err(|e| {
            OpError::DataLoss(format!(
                "backup set {} is damaged: member {id}: {e}",
                manifest.id
            ))
        })?);
    }
    if manifest.members.is_empty() {
        backups.push(manifest.clone());
    }
    reporter.set_expected_raw(backups.iter().map(|b| b.raw_bytes).sum());
    let mut artifacts = 0;
    for backup in &backups {
        for art in &backup.artifacts {
            reporter.phase(
                "verifying",
                format!("reading {} of {}", art.name, backup.id),
            );
            pipeline::download(
                ctx.catalog.store().as_ref(),
                &backup.id.key(&art.name),
                &art.digest(),
                tokio::io::sink(),
                0,
                reporter.counters(),
            )
            .await
            .map_err(|e| missing_is_data_loss(backup, e))?;
            artifacts += 1;
        }
    }
    // A base backup is only as good as the WAL that rolls it forward: re-read that too.
    let mut wal_report = String::new();
    for backup in backups.iter().filter(|b| b.kind == physical::PHYSICAL) {
        reporter.phase(
            "verifying",
            format!("reading the WAL that rolls {} forward", backup.id),
        );
        wal_report.push_str(&physical::verify_wal(&ctx.catalog, backup, &reporter).await?);
    }
    Ok(v1::OperationResult {
        summary: format!(
            "backup {} verified: {artifacts} artifact(s), sizes and sha256 digests match the manifest{wal_report}",
            manifest.id,
        ),
        raw_bytes: manifest.raw_bytes,
        stored_bytes: manifest.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&manifest)),
    })
}

/// Runs an operation as a detached job with a span carrying its id, then reports its end.
pub fn spawn_job<F>(
    span: tracing::Span,
    reporter: Reporter,
    guard: Vec<crate::jobs::JobGuard>,
    op: F,
) where
    F: std::future::Future<Output = Result<v1::OperationResult, OpError>> + Send + 'static,
{
    tokio::spawn(
        async move {
            let result = op.await;
            if let Ok(r) = &result {
                tracing::info!(
                    seconds = r.seconds,
                    raw_bytes = r.raw_bytes,
                    stored_bytes = r.stored_bytes,
                    "{}",
                    r.summary
                );
            }
            // Release the target before telling the client, so an immediate retry is accepted.
            drop(guard);
            reporter.finish(result).await;
        }
        .instrument(span),
    );
}
