//! Base backups: pg_basebackup's tar stream through the pipeline into the store, recorded with
//! the WAL positions it reported.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use tokio::process::ChildStdout;

use super::{BASE, PhysicalDetails, PhysicalError};
use crate::{
    catalog::{BackupId, Engine, Kind, Manifest, Target, Tool},
    engine::postgres::{BaseBackupPositions, ToolProcess, parse_basebackup_positions},
    error::OpError,
    jobs::Reporter,
    ops::{
        Context, Outcome,
        artifact::{Source, write_artifact},
        details::Details,
    },
    pipeline::UploadSummary,
};

/// pg_basebackup as an artifact source: complete when it exited cleanly and reported where its
/// WAL starts and ends.
struct BaseBackup(ToolProcess);

#[async_trait]
impl Source for BaseBackup {
    type Reader = ChildStdout;
    type Verdict = (BaseBackupPositions, chrono::DateTime<Utc>);

    fn reader(&mut self) -> ChildStdout {
        self.0.stdout()
    }

    async fn verdict(self, _: &UploadSummary) -> Result<Self::Verdict, OpError> {
        let stderr = self.0.wait_output().await?;
        let stop_time = Utc::now();
        let positions =
            parse_basebackup_positions(&stderr).ok_or(PhysicalError::NoPositions { stderr })?;
        Ok((positions, stop_time))
    }

    async fn stop(self) {
        self.0.kill().await;
    }
}

/// Takes a physical base backup of the whole cluster: pg_basebackup tar → pipeline → store →
/// manifest.
pub(crate) async fn backup_physical(
    ctx: Arc<Context>,
    id: BackupId,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let pg = ctx.postgres()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());
    reporter.phase("preparing", "identifying the cluster");
    let (tool_version, server_version) = pg
        .check_tool("pg_basebackup", &pg.default_database())
        .await?;
    let identity = pg.identify_system().await?;
    let seg_size = pg.wal_segment_size().await?;
    let recovery_settings = match pg.recovery_settings_in_files().await {
        Ok(names) => Some(names),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read which recovery settings the configuration files set; the backup records none");
            None
        }
    };

    let source = BaseBackup(pg.start_basebackup()?);
    reporter.phase(
        "copying",
        format!(
            "pg_basebackup of cluster {} → zstd → {}",
            identity.system_id,
            ctx.catalog.store().location()
        ),
    );
    let (artifact, (positions, stop_time)) =
        write_artifact(&ctx, &id, BASE, source, &reporter).await?;
    let details = PhysicalDetails {
        system_id: identity.system_id.clone(),
        timeline: positions.timeline,
        start_lsn: positions.start_lsn,
        stop_lsn: positions.stop_lsn,
        stop_time,
        wal_segment_size: seg_size,
        recovery_settings,
        // pg_basebackup --pgdata=- fails on a cluster with a tablespace: this backup has none.
        tablespaces: Vec::new(),
    };
    let manifest = Manifest::completed(
        id.clone(),
        Engine::Postgres,
        Kind::Physical,
        Target {
            name: "cluster".into(),
            server: pg.replication_server(),
            server_version,
        },
        Tool {
            name: "pg_basebackup".into(),
            version: tool_version,
        },
        started_at,
    )
    .with_artifacts(vec![artifact])
    .with_details(Details::Physical(details.clone()).to_value()?);
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    Ok(Outcome::new(
        format!(
            "base backup {id} of cluster {} complete (timeline {}, consistent at {})",
            details.system_id, details.timeline, details.stop_lsn
        ),
        manifest,
    ))
}
