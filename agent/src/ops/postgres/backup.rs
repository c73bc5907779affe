//! Logical backups: the globals the databases need first, then one pg_dump per database, each
//! streamed through the pipeline (nothing staged on disk), then the manifest.

use std::{collections::BTreeSet, io::Cursor, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::{process::ChildStdout, task::JoinHandle};

use super::{
    ALL_DATABASES, DatabaseRecord, GLOBALS_FORMAT, GLOBALS_NAME, GlobalsRecord, LogicalDetails,
    PG_DUMP,
};
use crate::{
    catalog::{Artifact, BackupId, Engine, Kind, Manifest, Target, Tool},
    engine::postgres::{
        ChecksumKind, DumpStats, DumpStatsError, DumpTee, PgError, Postgres, ToolProcess,
        globals::{self, DatabaseNeeds, Globals},
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

/// pg_dump as an artifact source: complete only if pg_dump exited cleanly and its archive parsed
/// whole. Its version was checked before anything was read, so a backup fails on a missing or
/// too old pg_dump before it writes. The archive is read for validation data as it passes
/// ([`DumpTee`]); a malformed one fails the backup, since pg_restore would not read it either.
struct PgDump {
    process: ToolProcess,
    database: String,
    stats: Option<JoinHandle<Result<DumpStats, DumpStatsError>>>,
}

impl PgDump {
    fn new(process: ToolProcess, database: &str) -> Self {
        Self {
            process,
            database: database.to_string(),
            stats: None,
        }
    }
}

#[async_trait]
impl Source for PgDump {
    type Reader = DumpTee<ChildStdout>;
    type Verdict = DumpStats;

    fn reader(&mut self) -> DumpTee<ChildStdout> {
        let (tee, stats) = DumpTee::new(self.process.stdout());
        self.stats = Some(stats);
        tee
    }

    async fn verdict(self, _: &UploadSummary) -> Result<DumpStats, OpError> {
        self.process.wait().await?;
        let Some(task) = self.stats else {
            return Err(OpError::Internal("pg_dump's output was never read".into()));
        };
        let stats = task
            .await
            .map_err(|e| OpError::Internal(format!("reading pg_dump's archive: {e}")))?;
        stats.map_err(|source| {
            PgError::Archive {
                database: self.database,
                source,
            }
            .into()
        })
    }

    async fn stop(self) {
        if let Some(task) = self.stats {
            task.abort();
        }
        self.process.kill().await;
    }
}

/// A small document already in memory (the globals) as an artifact source.
struct InMemory(Option<Vec<u8>>);

#[async_trait]
impl Source for InMemory {
    type Reader = Cursor<Vec<u8>>;
    type Verdict = ();

    fn reader(&mut self) -> Cursor<Vec<u8>> {
        Cursor::new(self.0.take().unwrap_or_default())
    }

    async fn verdict(self, _: &UploadSummary) -> Result<(), OpError> {
        Ok(())
    }

    async fn stop(self) {}
}

/// Reads the cluster's globals; without the right to read pg_authid, without password hashes.
async fn capture_globals(pg: &Postgres, database: &str) -> Result<Globals, OpError> {
    let passwords = pg.can_read_passwords(database).await?;
    Ok(pg
        .query_json(
            database,
            "reading roles and tablespaces",
            &globals::globals_query(passwords),
        )
        .await?)
}

/// Reads what restoring `database` needs.
async fn needs_of(pg: &Postgres, database: &str) -> Result<DatabaseNeeds, OpError> {
    Ok(pg
        .query_json(
            database,
            "reading what the database needs",
            globals::NEEDS_QUERY,
        )
        .await?)
}

/// Stores the globals document as the backup's first artifact.
async fn write_globals(
    ctx: &Context,
    id: &BackupId,
    globals: &Globals,
    reporter: &Reporter,
) -> Result<Artifact, OpError> {
    reporter.phase(
        "globals",
        format!(
            "{} roles, {} memberships → zstd → {}",
            globals.roles.len(),
            globals.memberships.len(),
            ctx.catalog.store().location()
        ),
    );
    let json = serde_json::to_vec(globals)
        .map_err(|e| OpError::Internal(format!("serialising the globals: {e}")))?;
    let what = ArtifactName {
        name: GLOBALS_NAME,
        format: GLOBALS_FORMAT,
    };
    let (art, ()) = write_artifact(ctx, id, what, InMemory(Some(json)), reporter).await?;
    Ok(art)
}

/// Streams one database's pg_dump into artifact `what`, with the validation data a restore
/// drill compares against (row counts and checksums) read from the dump as it passes.
async fn dump_database(
    ctx: &Context,
    pg: &Postgres,
    id: &BackupId,
    database: &str,
    what: ArtifactName<'_>,
    reporter: &Reporter,
) -> Result<(Artifact, DumpStats), OpError> {
    let source = PgDump::new(pg.start_dump(database)?, database);
    reporter.phase(
        "dumping",
        format!(
            "pg_dump {database} → zstd → {}",
            ctx.catalog.store().location()
        ),
    );
    write_artifact(ctx, id, what, source, reporter).await
}

/// The manifest's record of one dumped database.
fn database_record(artifact: String, needs: DatabaseNeeds, stats: DumpStats) -> DatabaseRecord {
    DatabaseRecord {
        artifact,
        needs,
        tables: Some(stats.tables),
        checksum: ChecksumKind::CopyText,
        encoding: stats.encoding,
    }
}

/// The sentence a backup summary adds when no password hash could be read.
fn password_note(globals: &Globals) -> &'static str {
    if globals.passwords {
        ""
    } else {
        " (without password hashes: the backup user cannot read pg_authid, so restored roles get no password)"
    }
}

fn globals_record(globals: &Globals) -> GlobalsRecord {
    GlobalsRecord {
        artifact: GLOBALS_NAME.into(),
        passwords: globals.passwords,
        roles: globals.roles.iter().map(|r| r.name.clone()).collect(),
    }
}

fn details_json(details: LogicalDetails) -> Result<serde_json::Value, OpError> {
    Details::Logical(Some(details)).to_value()
}

/// Takes a logical backup of one PostgreSQL database with the roles it needs: globals → pg_dump
/// → pipeline → store → manifest.
pub(crate) async fn backup_postgres(
    ctx: Arc<Context>,
    id: BackupId,
    database: String,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let pg = ctx.postgres()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());
    reporter.phase("preparing", "checking pg_dump");
    let versions = pg.check_tool("pg_dump", &database).await?;
    reporter.phase("globals", format!("reading the roles {database} needs"));
    let needs = needs_of(pg, &database).await?;
    let needed: BTreeSet<String> = needs.roles.iter().cloned().collect();
    let globals = capture_globals(pg, &database).await?.only(&needed);
    let globals_art = write_globals(&ctx, &id, &globals, &reporter).await?;
    let (dump_art, stats) = dump_database(&ctx, pg, &id, &database, PG_DUMP, &reporter).await?;
    let details = LogicalDetails {
        globals: globals_record(&globals),
        databases: vec![database_record(PG_DUMP.name.into(), needs, stats)],
    };
    let manifest = manifest(
        pg,
        id.clone(),
        Kind::Logical,
        database.clone(),
        versions,
        started_at,
    )
    .with_artifacts(vec![globals_art, dump_art])
    .with_details(details_json(details)?);
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    Ok(Outcome::new(
        format!(
            "backup {id} of database {database} complete, with {} role(s) it needs{}",
            globals.roles.len(),
            password_note(&globals)
        ),
        manifest,
    ))
}

/// Takes a logical backup of every database of the cluster (those that accept connections and
/// are not templates) plus the cluster's globals: the globals artifact first, then one pg_dump per
/// database. Each dump is its own snapshot, as with pg_dumpall.
pub(crate) async fn backup_cluster(
    ctx: Arc<Context>,
    id: BackupId,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    let pg = ctx.postgres()?;
    let started_at = Utc::now();
    reporter.set_operation_id(id.as_str());
    let home = pg.default_database();
    reporter.phase("preparing", "checking pg_dump and listing databases");
    let versions = pg.check_tool("pg_dump", &home).await?;
    let databases: Vec<String> = pg
        .query_json(&home, "listing databases", globals::DATABASES_QUERY)
        .await?;
    let globals = capture_globals(pg, &home).await?;
    let mut needs = Vec::with_capacity(databases.len());
    for db in &databases {
        needs.push(needs_of(pg, db).await?);
    }
    let mut artifacts = vec![write_globals(&ctx, &id, &globals, &reporter).await?];
    let mut records = Vec::with_capacity(databases.len());
    for (index, needs) in needs.into_iter().enumerate() {
        // Database names are not safe store keys; an index is.
        let name = format!("db-{:04}.pgdump.zst", index + 1);
        let what = ArtifactName {
            name: &name,
            format: PG_DUMP.format,
        };
        let (art, stats) = dump_database(&ctx, pg, &id, &needs.name, what, &reporter).await?;
        artifacts.push(Artifact {
            database: Some(needs.name.clone()),
            ..art
        });
        records.push(database_record(name, needs, stats));
    }
    let details = LogicalDetails {
        globals: globals_record(&globals),
        databases: records,
    };
    let manifest = manifest(
        pg,
        id.clone(),
        Kind::LogicalCluster,
        ALL_DATABASES.into(),
        versions,
        started_at,
    )
    .with_artifacts(artifacts)
    .with_details(details_json(details)?);
    reporter.phase("committing", "writing the manifest");
    ctx.catalog.commit(&manifest).await?;
    Ok(Outcome::new(
        format!(
            "backup {id} of {} database(s) ({}) and {} role(s) complete{}",
            databases.len(),
            databases.join(", "),
            globals.roles.len(),
            password_note(&globals)
        ),
        manifest,
    ))
}

/// The manifest of a logical backup completed now.
fn manifest(
    pg: &Postgres,
    id: BackupId,
    kind: Kind,
    target: String,
    (tool_version, server_version): (String, String),
    started_at: DateTime<Utc>,
) -> Manifest {
    Manifest::completed(
        id,
        Engine::Postgres,
        kind,
        Target {
            name: target,
            server: pg.server(),
            server_version,
        },
        Tool {
            name: "pg_dump".into(),
            version: tool_version,
        },
        started_at,
    )
}
