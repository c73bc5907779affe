//! Backup sets: one backup of every configured engine under one set id. The set's manifest,
//! listing its members, is written only after every member is complete, so a set exists only when
//! all of it does.

use std::{collections::HashSet, sync::Arc};

use chrono::{DateTime, Utc};
use tonic::Code;

use super::{
    Context, Outcome,
    plan::{EngineBackup, EngineRestore},
};
use crate::{
    catalog::{BackupId, Catalog, CatalogError, Engine, IdEngine, Kind, Manifest, Target, Tool},
    error::OpError,
    jobs::Reporter,
};

/// Why a platform set cannot be written as asked.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    /// A set id that is not one.
    #[error(
        "{0:?} is not a backup set id (it must carry the engine code \"set\", e.g. 20261129T143501Z-set-platform-ab12)"
    )]
    NotASetId(String),
    /// A commit naming no member.
    #[error("backup set {0} has no members: back up every agent's engines first")]
    NoMembers(BackupId),
    /// A member listed twice.
    #[error("backup set {set} lists member {member} twice")]
    DuplicateMember {
        /// The set.
        set: BackupId,
        /// The member.
        member: BackupId,
    },
    /// The set exists already: a commit never overwrites one.
    #[error("backup set {0} already exists; a set is committed once")]
    Exists(BackupId),
    /// A member that is not complete in this agent's store.
    #[error(
        "backup set {set} cannot be committed: member {member} is not complete in this agent's store ({store}): {source}. Every agent of a platform set must write to the same store (--store)"
    )]
    MemberMissing {
        /// The set.
        set: BackupId,
        /// The member.
        member: BackupId,
        /// The store looked in.
        store: String,
        /// What the catalog said.
        source: Box<CatalogError>,
    },
    /// A member that already belongs to another set: deleting either set would take it from the
    /// other.
    #[error(
        "backup {member} already belongs to backup set {other}; a backup is a member of one set"
    )]
    AlreadyMember {
        /// The member.
        member: BackupId,
        /// The set it belongs to.
        other: BackupId,
    },
    /// A member that is itself a set.
    #[error("backup set {set} cannot list another set ({member}) as a member")]
    NestedMember {
        /// The set.
        set: BackupId,
        /// The member.
        member: BackupId,
    },
}

impl SetError {
    /// The gRPC code clients act on.
    pub fn code(&self) -> Code {
        match self {
            SetError::NotASetId(_)
            | SetError::NoMembers(_)
            | SetError::DuplicateMember { .. }
            | SetError::NestedMember { .. } => Code::InvalidArgument,
            SetError::AlreadyMember { .. } => Code::FailedPrecondition,
            SetError::Exists(_) => Code::AlreadyExists,
            SetError::MemberMissing { .. } => Code::FailedPrecondition,
        }
    }
}

/// Parses the id of a platform set given by a client.
pub(crate) fn parse_set_id(id: &str) -> Result<BackupId, SetError> {
    match BackupId::parse(id) {
        Ok(parsed) if parsed.engine() == Some(IdEngine::Set) => Ok(parsed),
        _ => Err(SetError::NotASetId(id.chars().take(80).collect())),
    }
}

/// Refuses to write members for a platform set that exists already.
pub(crate) async fn refuse_existing(ctx: &Context, set_id: &BackupId) -> Result<(), OpError> {
    match ctx.catalog.get(set_id).await {
        Ok(_) => Err(SetError::Exists(set_id.clone()).into()),
        Err(CatalogError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The manifest of set `set_id` over its complete `members`.
fn set_manifest(set_id: BackupId, started_at: DateTime<Utc>, members: &[Manifest]) -> Manifest {
    let target = members
        .iter()
        .map(|m| format!("{} {}", m.engine, m.target.name))
        .collect::<Vec<_>>()
        .join(" + ");
    Manifest::completed(
        set_id,
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
    .with_members(members)
}

/// Writes the manifest of a platform set whose members the agents of a namespace wrote (each
/// through its own `backup all` with the set id): only when every member is complete in this
/// agent's store, and never over an existing set.
pub(crate) async fn commit_set(
    ctx: &Context,
    set_id: &str,
    member_ids: &[String],
    started_at: DateTime<Utc>,
) -> Result<Manifest, OpError> {
    let set_id = parse_set_id(set_id)?;
    if member_ids.is_empty() {
        return Err(SetError::NoMembers(set_id).into());
    }
    refuse_existing(ctx, &set_id).await?;
    let mut seen = HashSet::new();
    let mut members = Vec::with_capacity(member_ids.len());
    for raw in member_ids {
        let member = BackupId::parse(raw).map_err(CatalogError::from)?;
        if !seen.insert(member.clone()) {
            return Err(SetError::DuplicateMember {
                set: set_id,
                member,
            }
            .into());
        }
        let manifest = ctx
            .catalog
            .get(&member)
            .await
            .map_err(|source| match source {
                CatalogError::Store(_) => OpError::Catalog(source),
                source => SetError::MemberMissing {
                    set: set_id.clone(),
                    member: member.clone(),
                    store: ctx.catalog.store().location(),
                    source: Box::new(source),
                }
                .into(),
            })?;
        if manifest.engine == Engine::Set {
            return Err(SetError::NestedMember {
                set: set_id,
                member,
            }
            .into());
        }
        members.push(manifest);
    }
    let existing = ctx.catalog.list().await?;
    for set in existing.iter().filter(|m| m.engine == Engine::Set) {
        if let Some(member) = members.iter().find(|m| set.members.contains(&m.id)) {
            return Err(SetError::AlreadyMember {
                member: member.id.clone(),
                other: set.id.clone(),
            }
            .into());
        }
    }
    // The set started when its first member did: a client's clock (or a hostile value) must not
    // make it the newest backup for ever, nor older than what it holds.
    let earliest = members
        .iter()
        .map(|m| m.started_at)
        .min()
        .unwrap_or(started_at);
    let started_at = if started_at <= earliest && earliest - started_at < chrono::Duration::hours(1)
    {
        started_at
    } else {
        earliest
    };
    // Restores run PostgreSQL before Qdrant whatever order the agents answered in.
    members.sort_by_key(|m| (m.engine != Engine::Postgres, m.id.clone()));
    let manifest = set_manifest(set_id, started_at, &members);
    ctx.catalog.commit(&manifest).await?;
    Ok(manifest)
}

/// Backs up every member in turn, then writes the set manifest — or, for a platform set the
/// plugin coordinates (`commit` false), leaves that to [`commit_set`] once every agent is done. A
/// failed member fails the set; the members completed before it stay as standalone backups and
/// the error names them.
pub(crate) async fn backup_set(
    ctx: Arc<Context>,
    set_id: BackupId,
    members: Vec<Box<dyn EngineBackup>>,
    commit: bool,
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
    let manifest = set_manifest(set_id.clone(), started_at, &done);
    let ids = manifest
        .members
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if !commit {
        return Ok(Outcome::new(
            format!("members of platform set {set_id} complete: {ids}"),
            manifest,
        ));
    }
    reporter.phase("committing", "writing the set manifest");
    ctx.catalog.commit(&manifest).await?;
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
    members: Vec<Box<dyn EngineRestore>>,
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
