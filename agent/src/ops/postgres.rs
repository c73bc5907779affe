//! PostgreSQL logical backups: pg_dump → pipeline → store, and back through pg_restore.

use std::sync::Arc;

use chrono::Utc;
use soma_proto::v1;

use super::{
    Context, abort_quietly, abort_quietly_staged, artifact, artifact_of, backup_info,
    missing_is_data_loss,
};
use crate::{
    catalog::{BackupId, BackupKeys, Manifest, Target, Tool},
    engine::postgres::PgError,
    error::OpError,
    jobs::Reporter,
    pipeline::{self, PipelineError},
};

/// Name of the pg_dump artifact inside a backup.
pub const PG_DUMP_ARTIFACT: &str = "dump.pgdump.zst";
/// Format of the pg_dump artifact's uncompressed bytes.
pub const PG_DUMP_FORMAT: &str = "pg_dump/custom";
/// Raw bytes held back from pg_restore until every digest matched: pg_restore cannot reach its
/// COMMIT without the archive's last bytes, so a mismatch found at the end rolls it all back.
pub(super) const RESTORE_HOLDBACK: usize = 1 << 20;

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
    let (summary, object) = super::commit_verified(store.as_ref(), &key, staged).await?;
    let artifact = artifact_of(
        &ctx.settings,
        PG_DUMP_ARTIFACT,
        PG_DUMP_FORMAT,
        &summary,
        object.size,
    );
    let manifest = Manifest::completed(
        id.clone(),
        "postgres",
        "logical",
        Target {
            name: database.clone(),
            server: pg.server(),
            server_version,
        },
        Tool {
            name: "pg_dump".into(),
            version: tool_version,
        },
        started_at,
    )
    .with_artifacts(vec![artifact]);
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
            return Err(PgError::NotEmpty { database, objects }.into());
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
