//! Backup sets: one backup of every configured engine under one set id. The set's manifest,
//! listing its members, is written only after every member is complete, so a set exists only when
//! all of it does.

use std::sync::Arc;

use chrono::Utc;
use soma_proto::v1;

use super::{Context, backup_info, backup_postgres, qdrant};
use crate::{
    catalog::{BackupId, MANIFEST_VERSION, Manifest, Target, Tool},
    error::OpError,
    jobs::Reporter,
};

/// Why a set failed, naming the members that completed (they stay as standalone backups).
fn member_failed(set: &BackupId, engine: &str, done: &[BackupId], e: OpError) -> OpError {
    let kept = if done.is_empty() {
        String::new()
    } else {
        format!(
            " Completed members stay available as standalone backups: {}.",
            done.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    OpError::SetMember {
        message: format!("backup set {set} is incomplete: its {engine} member failed: {e}.{kept}"),
        source: Box::new(e),
    }
}

/// Backs up every configured engine, then writes the set manifest.
pub async fn backup_set(
    ctx: Arc<Context>,
    set_id: BackupId,
    members: Vec<(String, BackupId)>,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let started_at = Utc::now();
    let mut done = Vec::new();
    let mut manifests = Vec::new();
    for (engine, id) in members {
        let result = match engine.as_str() {
            "postgres" => {
                let database = ctx.postgres()?.default_database();
                backup_postgres(ctx.clone(), id.clone(), database, reporter.clone()).await
            }
            "postgres-physical" => {
                super::physical::backup_physical(ctx.clone(), id.clone(), reporter.clone()).await
            }
            _ => {
                qdrant::backup_qdrant(
                    ctx.clone(),
                    id.clone(),
                    Vec::new(),
                    v1::QdrantMode::Unspecified,
                    reporter.clone(),
                )
                .await
            }
        };
        match result {
            Ok(r) => {
                done.push(id);
                manifests.push(r.backup.expect("member result names its backup"));
            }
            Err(e) => return Err(member_failed(&set_id, &engine, &done, e)),
        }
    }
    reporter.set_operation_id(set_id.as_str());
    reporter.phase("committing", "writing the set manifest");
    let manifest = Manifest {
        manifest_version: MANIFEST_VERSION,
        id: set_id.clone(),
        engine: "set".into(),
        kind: "set".into(),
        target: Target {
            name: manifests
                .iter()
                .map(|m| {
                    let engine = soma_proto::v1::Engine::try_from(m.engine)
                        .unwrap_or_default()
                        .short_name();
                    format!("{engine} {}", m.target)
                })
                .collect::<Vec<_>>()
                .join(" + "),
            server: String::new(),
            server_version: String::new(),
        },
        tool: Tool {
            name: "soma-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        agent_version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        completed_at: Utc::now(),
        raw_bytes: manifests.iter().map(|m| m.raw_bytes).sum(),
        stored_bytes: manifests.iter().map(|m| m.stored_bytes).sum(),
        artifacts: Vec::new(),
        members: done,
        details: serde_json::Value::Null,
    };
    ctx.catalog.commit(&manifest).await?;
    Ok(v1::OperationResult {
        summary: format!(
            "backup set {set_id} complete: {}",
            manifest
                .members
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        raw_bytes: manifest.raw_bytes,
        stored_bytes: manifest.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&manifest)),
    })
}

/// Restores every member of a set, PostgreSQL into its own database and Qdrant collections under
/// their own names, with the same safety rules as restoring each alone.
pub async fn restore_set(
    ctx: Arc<Context>,
    set: Manifest,
    clean: bool,
    force: bool,
    reporter: Reporter,
) -> Result<v1::OperationResult, OpError> {
    let mut summaries = Vec::new();
    // Resolve every member first: a set with a missing member is refused before anything changes.
    let mut members = Vec::new();
    for id in &set.members {
        members.push(ctx.catalog.get(id).await.map_err(|e| {
            OpError::DataLoss(format!(
                "backup set {} is damaged: member {id}: {e}",
                set.id
            ))
        })?);
    }
    if let Some(physical) = members.iter().find(|m| m.kind == super::physical::PHYSICAL) {
        return Err(OpError::FailedPrecondition(format!(
            "backup set {} holds a physical PostgreSQL base backup ({}), which is restored into an empty data directory: run `soma-agent restore-pgdata --backup {}` where PostgreSQL's data lives (or `kubectl soma restore {} --pgdata DIR`), and restore the other members one by one",
            set.id, physical.id, physical.id, physical.id
        )));
    }
    for m in members {
        let result = match m.engine.as_str() {
            "postgres" => {
                let database = m.target.name.clone();
                super::restore_postgres(ctx.clone(), m, database, clean, reporter.clone()).await?
            }
            "qdrant" => {
                qdrant::restore_qdrant(
                    ctx.clone(),
                    m,
                    Vec::new(),
                    String::new(),
                    force,
                    reporter.clone(),
                )
                .await?
            }
            other => {
                return Err(OpError::DataLoss(format!(
                    "backup set {} has a member of unknown engine {other}",
                    set.id
                )));
            }
        };
        summaries.push(result.summary);
    }
    Ok(v1::OperationResult {
        summary: format!("restored backup set {}: {}", set.id, summaries.join("; ")),
        raw_bytes: set.raw_bytes,
        stored_bytes: set.stored_bytes,
        seconds: reporter.elapsed(),
        backup: Some(backup_info(&set)),
    })
}
