//! Logical restores. Each database goes through `pg_restore --single-transaction`, committed
//! only after the whole archive matched its checksums; a database the restore created is dropped
//! again when its restore fails.
//!
//! A backup with globals is restored globals first: preflight (read the globals, compare with the
//! target, refuse what cannot work — before anything is written), then the missing roles and
//! memberships in one transaction, then each database, created owned by its owner when missing.

use std::{
    collections::BTreeSet,
    pin::Pin,
    sync::Arc,
    task::{Context as TaskContext, Poll},
};

use tokio::io::AsyncWrite;
use tokio_util::sync::CancellationToken;

use super::{DatabaseRecord, LogicalDetails, LogicalError, MAX_GLOBALS_BYTES, PG_DUMP};
use crate::{
    catalog::{Artifact, Kind, Manifest},
    engine::postgres::{
        PgError, Postgres,
        globals::{
            self, DatabaseNeeds, Globals, GlobalsPlan, PreflightError, RoleSetting, TargetState,
        },
    },
    error::OpError,
    jobs::Reporter,
    ops::{
        Context, Outcome,
        artifact::{RESTORE_HOLDBACK, artifact, read_artifact},
    },
};

/// Restores an old-style logical backup (one dump, no globals) into `database`.
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
    restore_database(&ctx, pg, &manifest, &art, &database, clean, None, &reporter).await?;
    Ok(Outcome::new(
        format!("restored backup {} into database {database}", manifest.id),
        manifest,
    ))
}

/// One database of a [`ClusterRestore`]: its record in the backup and where it goes.
#[derive(Debug, Clone)]
pub(crate) struct DatabaseRestore {
    /// What the backup says about it.
    pub record: DatabaseRecord,
    /// The database restored into.
    pub target: String,
}

/// A restore of a logical backup that carries globals: a whole-cluster backup (all its databases
/// or one) or a single-database backup written since globals are recorded.
#[derive(Debug, Clone)]
pub(crate) struct ClusterRestore {
    /// The backup.
    pub manifest: Manifest,
    /// Its details.
    pub details: LogicalDetails,
    /// The databases restored.
    pub databases: Vec<DatabaseRestore>,
    /// Every role of the backup is brought (a whole-cluster restore), not only those the chosen
    /// databases need.
    pub all_roles: bool,
    /// Drop and recreate existing objects.
    pub clean: bool,
    /// Bring existing roles to the backup's attributes.
    pub update_roles: bool,
}

impl ClusterRestore {
    /// The restore of `manifest` into `database` (empty: the backup's own databases), or `None`
    /// for a backup written before globals were recorded (restored the old way).
    pub(crate) fn new(
        manifest: Manifest,
        database: &str,
        clean: bool,
        update_roles: bool,
    ) -> Result<Option<Self>, LogicalError> {
        let Some(details) = LogicalDetails::of(&manifest)? else {
            return Ok(None);
        };
        let whole_cluster = manifest.kind == Kind::LogicalCluster;
        let databases: Vec<DatabaseRestore> = if whole_cluster {
            let chosen: Vec<_> = details
                .databases
                .iter()
                .filter(|d| database.is_empty() || d.needs.name == database)
                .map(|d| DatabaseRestore {
                    record: d.clone(),
                    target: d.needs.name.clone(),
                })
                .collect();
            if chosen.is_empty() && !database.is_empty() {
                return Err(LogicalError::DatabaseNotInBackup {
                    id: manifest.id.clone(),
                    database: database.to_string(),
                    listed: details
                        .databases
                        .iter()
                        .map(|d| d.needs.name.clone())
                        .collect(),
                });
            }
            chosen
        } else {
            let [record] = details.databases.as_slice() else {
                return Err(LogicalError::BadDetails {
                    id: manifest.id.clone(),
                    reason: format!(
                        "a single-database backup listing {} databases",
                        details.databases.len()
                    ),
                });
            };
            vec![DatabaseRestore {
                record: record.clone(),
                target: if database.is_empty() {
                    manifest.target.name.clone()
                } else {
                    database.to_string()
                },
            }]
        };
        Ok(Some(Self {
            all_roles: whole_cluster && database.is_empty(),
            manifest,
            details,
            databases,
            clean,
            update_roles,
        }))
    }

    /// The databases written.
    pub(crate) fn targets(&self) -> impl Iterator<Item = &str> {
        self.databases.iter().map(|d| d.target.as_str())
    }
}

/// Restores a logical backup with globals: preflight, roles, memberships, then every database.
pub(crate) async fn restore_cluster(
    ctx: Arc<Context>,
    plan: ClusterRestore,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let pg = ctx.postgres()?;
    let manifest = &plan.manifest;
    reporter.set_operation_id(manifest.id.as_str());
    let mut arts = Vec::with_capacity(plan.databases.len());
    for d in &plan.databases {
        arts.push(artifact(manifest, &d.record.artifact)?.clone());
    }
    let globals_art = artifact(manifest, &plan.details.globals.artifact)?.clone();
    reporter
        .set_expected_raw(arts.iter().map(|a| a.raw_bytes).sum::<u64>() + globals_art.raw_bytes);

    // Preflight: nothing below writes until every check passed.
    reporter.phase("preparing", "reading the backup's globals and the target's");
    pg.check_tool("pg_restore", "postgres").await?;
    let globals = load_globals(&ctx, manifest, &globals_art, &reporter).await?;
    let target: TargetState = pg
        .query_json(
            "postgres",
            "reading the target's roles",
            globals::TARGET_QUERY,
        )
        .await?;
    let mut exists = Vec::with_capacity(plan.databases.len());
    for d in &plan.databases {
        exists.push(check_target(pg, &d.target, plan.clean).await?);
    }
    // Needs under the names restored into, so errors and settings speak of the target.
    let needs: Vec<DatabaseNeeds> = plan
        .databases
        .iter()
        .map(|d| DatabaseNeeds {
            name: d.target.clone(),
            ..d.record.needs.clone()
        })
        .collect();
    let selected = selected_roles(plan.all_roles, &globals, &needs);
    let roles = globals::preflight(&globals, &needs, &selected, &target, plan.update_roles)?;
    let per_database = create_roles(pg, &roles, &reporter).await?;

    let mut restored = Vec::with_capacity(plan.databases.len());
    for (((d, art), needs), existed) in plan.databases.iter().zip(&arts).zip(&needs).zip(exists) {
        reporter.phase(
            "restoring",
            format!("{} → zstd → pg_restore into {}", manifest.id, d.target),
        );
        let create = (!existed).then_some(needs);
        restore_database(
            &ctx, pg, manifest, art, &d.target, plan.clean, create, &reporter,
        )
        .await?;
        set_in_database(pg, &per_database, &d.target).await?;
        let tables = pg.table_count(&d.target).await?;
        restored.push(format!("{} ({tables} tables)", d.target));
    }
    Ok(Outcome::new(
        summary(manifest, &roles, &globals, &restored),
        plan.manifest,
    ))
}

/// The roles a restore brings: every role of the backup (`--all-roles`), or those the
/// databases restored name as owner or need.
fn selected_roles(all_roles: bool, globals: &Globals, needs: &[DatabaseNeeds]) -> BTreeSet<String> {
    if all_roles {
        globals.roles.iter().map(|r| r.name.clone()).collect()
    } else {
        needs
            .iter()
            .flat_map(|n| n.roles.iter().chain(std::iter::once(&n.owner)).cloned())
            .collect()
    }
}

/// Creates the planned roles, memberships and role-wide settings in one transaction; returns
/// the settings that apply in one database, set once it is restored.
async fn create_roles(
    pg: &Postgres,
    roles: &GlobalsPlan,
    reporter: &Reporter,
) -> Result<Vec<RoleSetting>, OpError> {
    let (now, per_database): (Vec<_>, Vec<_>) = roles
        .settings
        .iter()
        .cloned()
        .partition(|s| s.database.is_none());
    let script = globals::plan_script(&GlobalsPlan {
        settings: now,
        ..roles.clone()
    })
    .map_err(PreflightError::from)?;
    if !script.is_empty() {
        reporter.phase(
            "roles",
            format!(
                "creating {} role(s), granting {} membership(s)",
                roles.create.len(),
                roles.grants.len()
            ),
        );
        pg.execute_script("postgres", &script).await?;
    }
    Ok(per_database)
}

/// Sets the role settings that apply in `database`, now that it exists.
async fn set_in_database(
    pg: &Postgres,
    per_database: &[RoleSetting],
    database: &str,
) -> Result<(), OpError> {
    let mut settings = Vec::new();
    for s in per_database
        .iter()
        .filter(|s| s.database.as_deref() == Some(database))
    {
        settings.extend(globals::role_setting_sql(s).map_err(PreflightError::from)?);
    }
    if !settings.is_empty() {
        pg.execute_script("postgres", &settings.join("\n")).await?;
    }
    Ok(())
}

/// "restored backup ID: created roles a, b; kept 3 existing roles; restored databases x (n tables)".
fn summary(manifest: &Manifest, roles: &GlobalsPlan, globals: &Globals, dbs: &[String]) -> String {
    let names = |rs: &[globals::Role]| {
        rs.iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = Vec::new();
    if roles.create.is_empty() {
        parts.push("created no roles".to_string());
    } else {
        parts.push(format!("created roles {}", names(&roles.create)));
    }
    if !roles.update.is_empty() {
        parts.push(format!("updated roles {}", names(&roles.update)));
    }
    parts.push(format!("kept {} existing roles", roles.keep.len()));
    if !roles.grants.is_empty() {
        parts.push(format!("granted {} membership(s)", roles.grants.len()));
    }
    parts.push(format!("restored databases {}", dbs.join(", ")));
    let note = if globals.passwords || roles.create.is_empty() {
        ""
    } else {
        " (the backup holds no password hashes: set the created roles' passwords)"
    };
    format!(
        "restored backup {}: {}{note}",
        manifest.id,
        parts.join("; ")
    )
}

/// Whether `database` exists; refuses a non-empty one unless `clean`.
async fn check_target(pg: &Postgres, database: &str, clean: bool) -> Result<bool, OpError> {
    if !pg.database_exists(database).await? {
        return Ok(false);
    }
    let objects = pg.user_objects(database).await?;
    if objects > 0 && !clean {
        return Err(PgError::NotEmpty {
            database: database.to_string(),
            objects,
        }
        .into());
    }
    Ok(true)
}

/// Restores one dump into `database`, creating it when missing (owned as `create` says, when
/// given) and dropping it again when the restore fails.
#[allow(clippy::too_many_arguments)]
async fn restore_database(
    ctx: &Context,
    pg: &Postgres,
    manifest: &Manifest,
    art: &Artifact,
    database: &str,
    clean: bool,
    create: Option<&DatabaseNeeds>,
    reporter: &Reporter,
) -> Result<(), OpError> {
    let created = if check_target(pg, database, clean).await? {
        false
    } else {
        match create {
            Some(n) => {
                pg.create_database_owned(
                    database,
                    &n.owner,
                    n.default_tablespace.as_deref(),
                    &n.settings,
                )
                .await?
            }
            None => pg.create_database(database).await?,
        }
        true
    };
    reporter.phase(
        "restoring",
        format!("{} → zstd → pg_restore into {database}", manifest.id),
    );
    let restored = pg_restore(ctx, pg, manifest, art, database, clean, reporter).await;
    if let Err(e) = restored {
        if created && let Err(drop_err) = pg.drop_database(database).await {
            tracing::warn!(error = %drop_err, database, "could not drop the database created for the failed restore");
        }
        return Err(e);
    }
    Ok(())
}

/// Streams the dump into `pg_restore --single-transaction`; a bad archive kills it before its
/// COMMIT, which rolls everything back.
async fn pg_restore(
    ctx: &Context,
    pg: &Postgres,
    manifest: &Manifest,
    art: &Artifact,
    database: &str,
    clean: bool,
    reporter: &Reporter,
) -> Result<(), OpError> {
    feed_restore(
        ctx,
        manifest,
        art,
        pg.start_restore(database, clean)?,
        reporter,
    )
    .await
}

/// Streams `art` into a started `pg_restore --single-transaction` (a restore or a drill's); a
/// damaged artifact kills it before its COMMIT, which rolls everything back.
pub(crate) async fn feed_restore(
    ctx: &Context,
    manifest: &Manifest,
    art: &Artifact,
    mut restore: crate::engine::postgres::ToolProcess,
    reporter: &Reporter,
) -> Result<(), OpError> {
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

/// Reads the globals artifact, every digest checked, into memory bounded by
/// [`MAX_GLOBALS_BYTES`]; it is used only once the whole object matched the manifest.
async fn load_globals(
    ctx: &Context,
    manifest: &Manifest,
    art: &Artifact,
    reporter: &Reporter,
) -> Result<Globals, OpError> {
    if art.raw_bytes > MAX_GLOBALS_BYTES {
        return Err(LogicalError::GlobalsTooLarge {
            id: manifest.id.clone(),
            bytes: art.raw_bytes,
        }
        .into());
    }
    let mut buf = BoundedBuf {
        bytes: Vec::new(),
        limit: MAX_GLOBALS_BYTES as usize,
    };
    read_artifact(
        ctx.source.store().as_ref(),
        manifest,
        art,
        &mut buf,
        0,
        reporter.counters(),
        |_| async { Ok(()) },
    )
    .await?;
    let globals: Globals =
        serde_json::from_slice(&buf.bytes).map_err(|e| LogicalError::BadGlobals {
            id: manifest.id.clone(),
            reason: e.to_string(),
        })?;
    if globals.format != globals::GLOBALS_FORMAT {
        return Err(LogicalError::BadGlobals {
            id: manifest.id.clone(),
            reason: format!(
                "format {} (this agent reads {})",
                globals.format,
                globals::GLOBALS_FORMAT
            ),
        }
        .into());
    }
    Ok(globals)
}

/// An in-memory sink that refuses to grow past `limit`.
struct BoundedBuf {
    bytes: Vec<u8>,
    limit: usize,
}

impl AsyncWrite for BoundedBuf {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.bytes.len() + buf.len() > this.limit {
            return Poll::Ready(Err(std::io::Error::other(format!(
                "the globals exceed {} bytes",
                this.limit
            ))));
        }
        this.bytes.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
