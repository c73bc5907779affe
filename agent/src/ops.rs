//! The operations themselves: backup, restore and verify, composed from engine, pipeline, store and
//! catalog. Each runs inside a job (see [`crate::jobs`]) and reports through a [`Reporter`].

use std::sync::Arc;

use chrono::Utc;
use soma_proto::v1;
use tracing::Instrument;

use crate::{
    catalog::{Artifact, BackupId, Catalog, Compression, MANIFEST_VERSION, Manifest, Target, Tool},
    engine::postgres::Postgres,
    error::OpError,
    jobs::Reporter,
    pipeline::{self, PipelineError, Settings},
    store::StoreError,
};

/// Name of the pg_dump artifact inside a backup.
pub const PG_DUMP_ARTIFACT: &str = "dump.pgdump.zst";
/// Format of the pg_dump artifact's uncompressed bytes.
pub const PG_DUMP_FORMAT: &str = "pg_dump/custom";
/// Raw bytes held back from pg_restore until every digest matched: pg_restore cannot reach its
/// COMMIT without the archive's last bytes, so a mismatch found at the end rolls it all back.
const RESTORE_HOLDBACK: usize = 1 << 20;

/// Everything an operation needs from the agent.
#[derive(Debug, Clone)]
pub struct Context {
    /// Manifests and the store.
    pub catalog: Catalog,
    /// The PostgreSQL server, when configured.
    pub postgres: Option<Postgres>,
    /// Compression and part settings.
    pub settings: Settings,
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
}

/// The wire form of a manifest.
pub fn backup_info(m: &Manifest) -> v1::BackupInfo {
    let engine = match m.engine.as_str() {
        "postgres" => v1::Engine::Postgres,
        "qdrant" => v1::Engine::Qdrant,
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
    }
}

/// Takes a logical backup of one PostgreSQL database: pg_dump → pipeline → store → manifest.
pub async fn backup_postgres(
    ctx: Arc<Context>,
    id: BackupId,
    database: String,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let pg = ctx.postgres()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());

    let store = ctx.catalog.store().clone();
    let key = id.key(PG_DUMP_ARTIFACT);
    let upload = store.start_upload(&key).await?;
    let mut dump = match pg.start_dump(&database) {
        Ok(dump) => dump,
        Err(e) => {
            abort_quietly(upload).await;
            return Err(e.into());
        }
    };
    reporter.phase(
        "dumping",
        format!("pg_dump {database} → zstd → {}", store.location()),
    );
    // The version check runs beside the dump rather than before it (it costs a connection and
    // two process starts); a dump is only ever committed after the check passed.
    let (check, staged) = tokio::join!(
        pg.check_tool("pg_dump", &database),
        pipeline::upload(dump.stdout(), upload, &ctx.settings, reporter.counters())
    );
    let (tool_version, server_version) = match check {
        Ok(versions) => versions,
        Err(e) => {
            dump.kill().await;
            if let Ok(staged) = staged {
                abort_quietly_staged(staged).await;
            }
            return Err(e.into());
        }
    };
    let staged = match staged {
        Ok(staged) => staged,
        Err(e) => {
            dump.kill().await;
            return Err(e.into());
        }
    };
    // The dump is complete only if pg_dump says so; otherwise its bytes never become visible.
    if let Err(e) = dump.wait().await {
        abort_quietly_staged(staged).await;
        return Err(e.into());
    }
    reporter.phase("committing", "completing the upload");
    let summary = staged.summary.clone();
    let object = staged.commit().await?;
    // The store verified every part's sha256; make sure what it published is what we sent.
    match store.head(&key).await? {
        Some(meta) if meta.size == summary.digest.stored_bytes => {}
        other => {
            return Err(OpError::DataLoss(format!(
                "{key}: the store reports {} bytes after upload, {} were sent; the backup was not recorded",
                other
                    .map(|m| m.size.to_string())
                    .unwrap_or_else(|| "no object".into()),
                summary.digest.stored_bytes
            )));
        }
    }
    let artifact = Artifact {
        name: PG_DUMP_ARTIFACT.into(),
        format: PG_DUMP_FORMAT.into(),
        raw_bytes: summary.digest.raw_bytes,
        stored_bytes: object.size,
        raw_sha256: summary.digest.raw_sha256.clone(),
        stored_sha256: summary.digest.stored_sha256.clone(),
        compression: Compression {
            algorithm: "zstd".into(),
            level: ctx.settings.compression_level,
            threads: ctx.settings.compression_threads,
        },
        part_size: ctx.settings.part_size as u64,
        max_part_size: summary.max_part_size as u64,
        parts: summary.parts,
    };
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        id: id.clone(),
        engine: "postgres".into(),
        kind: "logical".into(),
        target: Target {
            name: database.clone(),
            server: pg.server(),
            server_version,
        },
        tool: Tool {
            name: "pg_dump".into(),
            version: tool_version,
        },
        agent_version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        completed_at: Utc::now(),
        raw_bytes: artifact.raw_bytes,
        stored_bytes: artifact.stored_bytes,
        artifacts: vec![artifact],
    };
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    let (raw, stored) = (manifest.raw_bytes, manifest.stored_bytes);
    Ok(v1::OperationResult {
        summary: format!("backup {id} of database {database} complete"),
        backup: Some(backup_info(&manifest)),
        raw_bytes: raw,
        stored_bytes: stored,
        seconds: reporter.elapsed(),
    })
}

/// Aborts an upload nobody will complete; a failure only leaves what the next start-up sweeps.
async fn abort_quietly(upload: Box<dyn crate::store::Upload>) {
    if let Err(e) = upload.abort().await {
        tracing::warn!(error = %e, "aborting an unused upload failed; the agent removes it at its next start");
    }
}

async fn abort_quietly_staged(staged: pipeline::Staged) {
    if let Err(e) = staged.abort().await {
        tracing::warn!(error = %e, "aborting an unused upload failed; the agent removes it at its next start");
    }
}

fn artifact<'a>(m: &'a Manifest, name: &str) -> Result<&'a Artifact, OpError> {
    m.artifacts.iter().find(|a| a.name == name).ok_or_else(|| {
        OpError::DataLoss(format!(
            "backup {} has no artifact {name}; its manifest lists {:?}",
            m.id,
            m.artifacts.iter().map(|a| &a.name).collect::<Vec<_>>()
        ))
    })
}

/// Maps a missing artifact object to data loss: its manifest promised it.
fn missing_is_data_loss(m: &Manifest, e: PipelineError) -> OpError {
    match e {
        PipelineError::Store(StoreError::NotFound { key }) => OpError::DataLoss(format!(
            "backup {} is damaged: its manifest lists {key} but the store does not have it",
            m.id
        )),
        other => other.into(),
    }
}

/// Restores a PostgreSQL logical backup into `database` in one transaction, committed only after
/// the whole archive matched its checksums.
pub async fn restore_postgres(
    ctx: Arc<Context>,
    manifest: Manifest,
    database: String,
    clean: bool,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let pg = ctx.postgres()?;
    let art = artifact(&manifest, PG_DUMP_ARTIFACT)?.clone();
    reporter.set_operation_id(manifest.id.as_str());
    reporter.set_expected_raw(art.raw_bytes);
    reporter.phase("preparing", format!("checking restore target {database}"));
    pg.check_tool("pg_restore", "postgres").await?;

    let created = if pg.database_exists(&database).await? {
        let objects = pg.user_objects(&database).await?;
        if objects > 0 && !clean {
            return Err(crate::engine::postgres::PgError::NotEmpty { database, objects }.into());
        }
        false
    } else {
        pg.create_database(&database).await?;
        true
    };

    let mut restore = pg.start_restore(&database, clean)?;
    reporter.phase(
        "restoring",
        format!("{} → zstd → pg_restore into {database}", manifest.id),
    );
    let key = manifest.id.key(&art.name);
    let streamed = pipeline::download(
        ctx.catalog.store().as_ref(),
        &key,
        &art.digest(),
        restore.stdin(),
        RESTORE_HOLDBACK,
        reporter.counters(),
    )
    .await;

    let outcome = match streamed {
        Ok(()) => restore.wait().await.map_err(OpError::from),
        Err(e) if matches!(e, PipelineError::Sink(_)) => {
            // pg_restore stopped reading: its own error says why.
            match restore.wait().await {
                Err(tool) => Err(tool.into()),
                Ok(()) => Err(e.into()),
            }
        }
        Err(e) => {
            // Never let pg_restore see the end of a bad archive: killing it rolls back.
            restore.kill().await;
            Err(missing_is_data_loss(&manifest, e))
        }
    };
    if let Err(e) = outcome {
        if created && let Err(drop_err) = pg.drop_database(&database).await {
            tracing::warn!(error = %drop_err, database, "could not drop the database created for the failed restore");
        }
        return Err(e);
    }
    Ok(v1::OperationResult {
        summary: format!("restored backup {} into database {database}", manifest.id),
        raw_bytes: art.raw_bytes,
        stored_bytes: art.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&manifest)),
    })
}

/// Reads every artifact of a backup back from the store and checks sizes and digests.
pub async fn verify(
    ctx: Arc<Context>,
    manifest: Manifest,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    reporter.set_operation_id(manifest.id.as_str());
    reporter.set_expected_raw(manifest.raw_bytes);
    for art in &manifest.artifacts {
        reporter.phase("verifying", format!("reading {}", art.name));
        pipeline::download(
            ctx.catalog.store().as_ref(),
            &manifest.id.key(&art.name),
            &art.digest(),
            tokio::io::sink(),
            0,
            reporter.counters(),
        )
        .await
        .map_err(|e| missing_is_data_loss(&manifest, e))?;
    }
    Ok(v1::OperationResult {
        summary: format!(
            "backup {} verified: {} artifact(s), sizes and sha256 digests match the manifest",
            manifest.id,
            manifest.artifacts.len()
        ),
        raw_bytes: manifest.raw_bytes,
        stored_bytes: manifest.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&manifest)),
    })
}

/// Runs an operation as a detached job with a span carrying its id, then reports its end.
pub fn spawn_job<F>(span: tracing::Span, reporter: Reporter, guard: crate::jobs::JobGuard, op: F)
where
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
