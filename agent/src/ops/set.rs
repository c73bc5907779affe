//! Backup sets: one backup of every configured engine under one set id. The set's manifest,
//! listing its members, is written only after every member is complete, so a set exists only when
//! all of it does.

use std::sync::Arc;

use chrono::Utc;

use super::{
    Context, Outcome,
    plan::{BackupPlan, RestorePlan},
};
use crate::{
    catalog::{BackupId, Catalog, Engine, Kind, Manifest, Target, Tool},
    error::OpError,
    jobs::Reporter,
};

/// Backs up every member in turn, then writes the set manifest. A failed member fails the set;
/// the members completed before it stay as standalone backups and the error names them.
pub(crate) async fn backup_set(
    ctx: Arc<Context>,
    set_id: BackupId,
    members: Vec<BackupPlan>,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let started_at = Utc::now();
    let mut done: Vec<Manifest> = Vec::new();
    for member in members {
        let engine = member.engine();
        match member.run(ctx.clone(), reporter.clone()).await {
            Ok(outcome) => done.push(outcome.manifest),
            Err(e) => {
                return Err(OpError::SetMember {
                    set: set_id,
                    engine,
                    kept: done.into_iter().map(|m| m.id).collect(),
                    source: Box::new(e),
                });
            }
        }
    }
    reporter.set_operation_id(set_id.as_str());
    reporter.phase("committing", "writing the set manifest");
    let target = done
        .iter()
        .map(|m| format!("{} {}", m.engine, m.target.name))
        .collect::<Vec<_>>()
        .join(" + ");
    let manifest = Manifest::completed(
        set_id.clone(),
        Engine::Set,
        Kind::Set,
        Target {
            name: target,
            server: String::new(),
            server_version: String::new(),
        },
        Tool {
            name: "soma-agent".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        started_at,
    )
    .with_members(&done);
    ctx.catalog.commit(&manifest).await?;
    let ids = manifest
        .members
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Outcome::new(
        format!("backup set {set_id} complete: {ids}"),
        manifest,
    ))
}

/// The member manifests of a set; a set with a missing or unreadable member is damaged.
pub(crate) async fn members_of(
    catalog: &Catalog,
    set: &Manifest,
) -> Result<Vec<Manifest>, OpError> {
    let mut members = Vec::with_capacity(set.members.len());
    for id in &set.members {
        members.push(
            catalog
                .get(id)
                .await
                .map_err(|source| OpError::SetDamaged {
                    set: set.id.clone(),
                    member: id.clone(),
                    source,
                })?,
        );
    }
    Ok(members)
}

/// Restores every member of a set in order, with the same safety rules as restoring each alone.
pub(crate) async fn restore_set(
    ctx: Arc<Context>,
    set: Manifest,
    members: Vec<RestorePlan>,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let mut summaries = Vec::new();
    for member in members {
        let outcome = member.run(ctx.clone(), reporter.clone()).await?;
        summaries.push(outcome.summary);
    }
    Ok(Outcome::new(
        format!("restored backup set {}: {}", set.id, summaries.join("; ")),
        set,
    ))
}
