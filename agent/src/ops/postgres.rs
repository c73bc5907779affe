//! PostgreSQL logical backups: pg_dump → pipeline → store, and back through pg_restore.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tokio::process::ChildStdout;
use tokio_util::sync::CancellationToken;

use super::{
    Context, Outcome,
    artifact::{ArtifactName, RESTORE_HOLDBACK, Source, artifact, read_artifact, write_artifact},
};
use crate::{
    catalog::{BackupId, Engine, Kind, Manifest, Target, Tool},
    engine::postgres::{PgError, Postgres, ToolProcess},
    error::OpError,
    jobs::Reporter,
    pipeline::UploadSummary,
};

/// The pg_dump artifact inside a logical backup.
pub const PG_DUMP: ArtifactName<'static> = ArtifactName {
    name: "dump.pgdump.zst",
    format: "pg_dump/custom",
};

/// pg_dump as an artifact source: complete only if the tool version check passed and pg_dump
/// exited cleanly.
struct PgDump {
    dump: ToolProcess,
    /// The version check runs beside the dump rather than before it (it costs a connection and
    /// two process starts); a dump is only ever committed after the check passed.
    check: tokio::task::JoinHandle<Result<(String, String), PgError>>,
}

#[async_trait]
impl Source for PgDump {
    type Reader = ChildStdout;
    type Verdict = (String, String);

    fn reader(&mut self) -> ChildStdout {
        self.dump.stdout()
    }

    async fn verdict(self, _: &UploadSummary) -> Result<(String, String), OpError> {
        let versions = match self.check.await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.dump.kill().await;
                return Err(e.into());
            }
            Err(join) => {
                self.dump.kill().await;
                return Err(OpError::Internal(format!(
                    "the version check failed: {join}"
                )));
            }
        };
        self.dump.wait().await?;
        Ok(versions)
    }

    async fn stop(self) {
        self.check.abort();
        self.dump.kill().await;
    }
}

/// Takes a logical backup of one PostgreSQL database: pg_dump → pipeline → store → manifest.
pub(crate) async fn backup_postgres(
    ctx: Arc<Context>,
    id: BackupId,
    database: String,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let pg = ctx.postgres()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());
    let source = PgDump {
        dump: pg.start_dump(&database)?,
        check: tokio::spawn({
            let (pg, database) = (pg.clone(), database.clone());
            async move { pg.check_tool("pg_dump", &database).await }
        }),
    };
    reporter.phase(
        "dumping",
        format!(
            "pg_dump {database} → zstd → {}",
            ctx.catalog.store().location()
        ),
    );
    let (artifact, (tool_version, server_version)) =
        write_artifact(&ctx, &id, PG_DUMP, source, &reporter).await?;
    let manifest = Manifest::completed(
        id.clone(),
        Engine::Postgres,
        Kind::Logical,
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
    Ok(Outcome::new(
        format!("backup {id} of database {database} complete"),
        manifest,
    ))
}

/// Restores a PostgreSQL logical backup into `database` in one transaction, committed only after
/// the whole archive matched its checksums. A database the restore created is dropped again when
/// the restore fails.
pub(crate) async fn restore_postgres(
    ctx: Arc<Context>,
    manifest: Manifest,
    database: String,
    clean: bool,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let pg = ctx.postgres()?;
    let art = artifact(&manifest, PG_DUMP.name)?.clone();
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

    reporter.phase(
        "restoring",
        format!("{} → zstd → pg_restore into {database}", manifest.id),
    );
    let restored = pg_restore(&ctx, pg, &manifest, &art, &database, clean, &reporter).await;
    if let Err(e) = restored {
        if created && let Err(drop_err) = pg.drop_database(&database).await {
            tracing::warn!(error = %drop_err, database, "could not drop the database created for the failed restore");
        }
        return Err(e);
    }
    Ok(Outcome::new(
        format!("restored backup {} into database {database}", manifest.id),
        manifest,
    ))
}

/// Streams the dump into `pg_restore --single-transaction`; a bad archive kills it before its
/// COMMIT, which rolls everything back.
async fn pg_restore(
    ctx: &Context,
    pg: &Postgres,
    manifest: &Manifest,
    art: &crate::catalog::Artifact,
    database: &str,
    clean: bool,
    reporter: &Reporter,
) -> Result<(), OpError> {
    let mut restore = pg.start_restore(database, clean)?;
    let stdin = restore.stdin();
    let consumer = |cancel: CancellationToken| async move {
        let exited = tokio::select! {
            _ = restore.exited() => true,
            () = cancel.cancelled() => false,
        };
        if exited {
            restore.wait().await.map_err(OpError::from)
        } else {
            restore.kill().await;
            Err(OpError::Cancelled)
        }
    };
    read_artifact(
        ctx.source.store().as_ref(),
        manifest,
        art,
        stdin,
        RESTORE_HOLDBACK,
        reporter.counters(),
        consumer,
    )
    .await
}
