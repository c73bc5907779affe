//! Drills of logical backups: a scratch PostgreSQL server of the drill's own (`initdb` in the
//! drill directory, the live server's major version, the same rules as a physical drill's:
//! its own configuration, no preloaded library, no secret in its environment), each dumped
//! database restored into a scratch database there with `pg_restore --single-transaction` (no
//! owners, privileges or tablespaces, so no role is created or needed), every event trigger the
//! dump created disabled, then every table counted and checksummed and compared with what the
//! backup recorded in the snapshot it dumped. The live server is only asked for its version:
//! nothing of a backup is ever restored into it by a drill.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::ops::drill::{self as drills, Check, DrillError, Scratch};
use crate::ops::method::DrillResult;
use crate::{
    catalog::{Artifact, Kind, Manifest},
    engine::postgres::{ChecksumKind, Postgres, ScratchServer, TableStats},
    error::OpError,
    jobs::Reporter,
    ops::{
        Context,
        artifact::artifact,
        postgres::{LogicalDetails, PG_DUMP, restore::feed_restore},
    },
};

/// How long a fresh scratch server may take to accept connections.
const START_LIMIT: Duration = Duration::from_secs(300);
/// The database initdb creates, where the drill's sessions start.
const HOME: &str = "postgres";

/// What a report says when a backup predates validation data.
pub(super) const NO_VALIDATION_DATA: &str = "no validation data recorded: counts not compared";

/// One dumped database: its name at backup time, its dump and its recorded tables.
struct Dumped {
    name: String,
    artifact: Artifact,
    tables: Option<Vec<TableStats>>,
    checksum: ChecksumKind,
    encoding: Option<String>,
}

/// Restores every database of `m` into scratch databases of a scratch server and compares; the
/// RTO is the time until the last one was restored.
pub(in crate::ops) async fn drill(
    ctx: &Arc<Context>,
    m: &Manifest,
    scratch: &Scratch,
    reporter: &Reporter,
) -> Result<DrillResult, OpError> {
    let pg = ctx.postgres()?;
    reporter.phase("preparing", "checking pg_restore");
    pg.check_tool("pg_restore", "postgres").await?;
    let dumped = dumped_of(m)?;
    let server = start_server(ctx, pg, scratch, reporter).await?;
    let mut held = scratch.server.lock().await;
    let server = held.insert(server);
    let client = server
        .ready(pg, HOME, START_LIMIT)
        .await
        .map_err(DrillError::from)?;

    let started = Instant::now();
    let mut restored = Vec::with_capacity(dumped.len());
    for (index, d) in dumped.into_iter().enumerate() {
        let db = scratch.name(&(index + 1).to_string());
        reporter.phase(
            "restoring",
            format!(
                "{} ({}) → zstd → pg_restore into scratch database {db} of the drill's server",
                m.id, d.name
            ),
        );
        client.create_database(&db).await?;
        restore_into(ctx, &client, m, &d.artifact, &db, reporter).await?;
        restored.push((d, db));
    }
    let rto_seconds = started.elapsed().as_secs_f64();
    // The dump may have created event triggers: off before the drill runs anything there.
    ScratchServer::disarm(&client, HOME).await?;

    let named = restored.len() > 1 || m.kind == Kind::LogicalCluster;
    let mut checks = Vec::new();
    for (d, db) in restored {
        let prefix = if named {
            format!("{}: ", d.name)
        } else {
            String::new()
        };
        checks.extend(validate(&client, &d, &db, &prefix, reporter).await?);
    }
    Ok(DrillResult {
        rto_seconds,
        checks,
    })
}

/// The databases a logical backup dumped, as its details record them (one, named after the
/// target, for a backup written before details were recorded).
fn dumped_of(m: &Manifest) -> Result<Vec<Dumped>, OpError> {
    match LogicalDetails::of(m)? {
        Some(details) => details
            .databases
            .iter()
            .map(|r| {
                Ok(Dumped {
                    name: r.needs.name.clone(),
                    artifact: artifact(m, &r.artifact)?.clone(),
                    tables: r.tables.clone(),
                    checksum: r.checksum,
                    encoding: r.encoding.clone(),
                })
            })
            .collect(),
        None => Ok(vec![Dumped {
            name: m.target.name.clone(),
            artifact: artifact(m, PG_DUMP.name)?.clone(),
            tables: None,
            checksum: ChecksumKind::default(),
            encoding: None,
        }]),
    }
}

/// An `initdb` of a scratch server of the live server's major version, in a directory of the
/// drill's own under `--drill-dir`.
async fn start_server(
    ctx: &Context,
    pg: &Postgres,
    scratch: &Scratch,
    reporter: &Reporter,
) -> Result<ScratchServer, OpError> {
    let (version_num, _) = pg.server_version(&pg.default_database()).await?;
    let major = version_num / 10000;
    reporter.phase(
        "preparing",
        format!("initdb of a scratch PostgreSQL {major} server of the drill's own"),
    );
    let run_as = drills::run_as(&ctx.drill_dir).await?;
    let root = ctx.drill_dir.join(scratch.name("logical"));
    drills::make_root(&ctx.drill_dir, &root, run_as, scratch).await?;
    Ok(ScratchServer::init(pg, &root, run_as, major)
        .await
        .map_err(DrillError::from)?)
}

/// The checks of one restored database: that it restored, and its tables' rows and checksums
/// against what the backup recorded.
async fn validate(
    client: &Postgres,
    d: &Dumped,
    db: &str,
    prefix: &str,
    reporter: &Reporter,
) -> Result<Vec<Check>, OpError> {
    let mut checks = vec![Check::fact(
        format!("{prefix}restore"),
        "pg_restore completes",
        format!("restored into scratch database {db} of the drill's own server"),
        true,
    )];
    reporter.phase(
        "validating",
        format!("counting rows and checksumming the tables of {db}"),
    );
    let found = match (&d.tables, d.checksum) {
        (Some(recorded), ChecksumKind::CopyText) => {
            let names: std::collections::BTreeSet<(&str, &str)> = recorded
                .iter()
                .map(|t| (t.schema.as_str(), t.table.as_str()))
                .collect();
            let dumped = |schema: &str, table: &str| names.contains(&(schema, table));
            client.copy_stats(db, d.encoding.as_deref(), dumped).await?
        }
        _ => client.table_stats(db, None).await?,
    };
    match &d.tables {
        Some(expected) => checks.extend(compare_tables(prefix, expected, &found)),
        None => checks.push(Check::skipped(
            format!("{prefix}row counts and checksums"),
            NO_VALIDATION_DATA,
        )),
    }
    Ok(checks)
}

/// One check per recorded table for its rows and one for its checksum, a check for the number of
/// tables, and a failed check for any table the backup did not record.
fn compare_tables(prefix: &str, expected: &[TableStats], found: &[TableStats]) -> Vec<Check> {
    let found_by_name: BTreeMap<String, &TableStats> =
        found.iter().map(|t| (t.name(), t)).collect();
    let mut checks = vec![Check::compare(
        format!("{prefix}tables"),
        expected.len().to_string(),
        found.len().to_string(),
    )];
    for e in expected {
        let name = e.name();
        match found_by_name.get(&name) {
            Some(f) => {
                checks.push(Check::compare(
                    format!("{prefix}rows of {name}"),
                    e.rows.to_string(),
                    f.rows.to_string(),
                ));
                checks.push(Check::compare(
                    format!("{prefix}checksum of {name}"),
                    e.checksum.clone(),
                    f.checksum.clone(),
                ));
            }
            None => checks.push(Check::fact(
                format!("{prefix}rows of {name}"),
                &e.rows.to_string(),
                "table missing from the restored copy".into(),
                false,
            )),
        }
    }
    let recorded: std::collections::BTreeSet<String> = expected.iter().map(|t| t.name()).collect();
    for f in found.iter().filter(|f| !recorded.contains(&f.name())) {
        checks.push(Check::fact(
            format!("{prefix}rows of {}", f.name()),
            "no such table recorded",
            format!("{} rows", f.rows),
            false,
        ));
    }
    checks
}

/// Streams the dump into the drill's `pg_restore --single-transaction`; a damaged artifact kills
/// it before its COMMIT.
async fn restore_into(
    ctx: &Context,
    pg: &Postgres,
    manifest: &Manifest,
    art: &Artifact,
    database: &str,
    reporter: &Reporter,
) -> Result<(), OpError> {
    let restore = pg.start_drill_restore(database)?;
    feed_restore(ctx, manifest, art, restore, reporter).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(table: &str, rows: u64, checksum: &str) -> TableStats {
        TableStats {
            schema: "public".into(),
            table: table.into(),
            rows,
            checksum: checksum.into(),
        }
    }

    #[test]
    fn compares_every_recorded_table() {
        let expected = [t("a", 3, "10"), t("b", 1, "5")];
        let same = compare_tables("", &expected, &[t("a", 3, "10"), t("b", 1, "5")]);
        assert!(same.iter().all(|c| c.passed), "{same:?}");
        let off = compare_tables("db: ", &expected, &[t("a", 2, "7"), t("c", 1, "1")]);
        let failed: Vec<&str> = off
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "db: rows of public.a",
                "db: checksum of public.a",
                "db: rows of public.b",
                "db: rows of public.c"
            ]
        );
    }
}
