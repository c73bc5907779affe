//! Validation data for restore drills: per-table row counts and an order-independent checksum of
//! the rows, read in exactly the snapshot pg_dump dumps.
//!
//! A backup exports a snapshot from a psql session it holds open ([`SnapshotHolder`]), runs
//! `pg_dump --snapshot` and [`Postgres::table_stats`] in that snapshot, and releases the session
//! once both are done; a drill runs the same query on the restored scratch database and compares.
//! One scan per table: `count(*)` and the sum of a 64-bit hash (`hashtextextended`, the stable
//! hash hash partitioning relies on) of each row's text form, with every setting that changes a
//! row's text form pinned, so the same rows give the same checksum on any server of a version.

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    process::{Child, ChildStdin},
};

use super::{PgError, Postgres, quote_literal, sql::psql_result};

/// Longest snapshot id accepted from the server (they look like `00000003-0000001B-1`).
const MAX_SNAPSHOT_ID: usize = 64;
/// Longest line read from the holding session.
const MAX_LINE: u64 = 1024;

/// Settings that change a row's text form, pinned for every checksum so backup and drill agree.
/// `row_security = off` makes a table the user may not fully read an error, as it is for pg_dump,
/// instead of a silently partial count.
const PINNED_SETTINGS: &str = "set datestyle = 'ISO, MDY'; set timezone = 'UTC'; \
     set extra_float_digits = 3; set bytea_output = 'hex'; set intervalstyle = 'postgres'; \
     set row_security = off;";

/// Counts and checksums every ordinary table outside the system schemas (partitions one by one,
/// never through their parent; extension-owned tables, which pg_dump does not dump as data,
/// skipped). Table names reach the inner query only through `format('%I')`, so any name is
/// quoted; `query_to_xml` runs that query per table in this one statement.
const STATS_QUERY: &str = "select coalesce(json_agg(json_build_object(\
       'schema', s.schema, 'table', s.tbl, \
       'rows', (xpath('/row/n/text()', s.x))[1]::text::bigint, \
       'checksum', (xpath('/row/h/text()', s.x))[1]::text) order by s.schema, s.tbl), '[]') \
     from (select n.nspname as schema, c.relname as tbl, \
       query_to_xml(format('select count(*) as n, coalesce(sum(hashtextextended(t::text, 0)), 0) as h from only %I.%I t', n.nspname, c.relname), false, true, '') as x \
       from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
       where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') \
         and n.nspname not like 'pg_toast%' and n.nspname not like 'pg_temp%' \
         and not exists (select 1 from pg_catalog.pg_depend d where d.classid = 'pg_catalog.pg_class'::regclass \
                         and d.objid = c.oid and d.deptype = 'e')) s;";

/// One table's row count and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableStats {
    /// Schema.
    pub schema: String,
    /// Table.
    pub table: String,
    /// Rows.
    pub rows: u64,
    /// Sum of the 64-bit hashes of the rows' text forms (a decimal that may exceed 64 bits).
    pub checksum: String,
}

impl TableStats {
    /// `schema.table`, as reports name it.
    pub fn name(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }
}

/// A psql session holding a transaction whose snapshot was exported; other sessions (pg_dump,
/// the checksum query) import it while this lives. Dropping it kills psql, which ends the
/// transaction (it only read).
#[derive(Debug)]
pub struct SnapshotHolder {
    child: Child,
    stdin: Option<ChildStdin>,
    snapshot: String,
}

impl SnapshotHolder {
    /// The exported snapshot's id (checked: hex digits and dashes only).
    pub fn snapshot(&self) -> &str {
        &self.snapshot
    }

    /// Ends the session: closing its input ends psql, which rolls the read-only transaction back.
    pub async fn release(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait().await;
    }
}

/// A snapshot id as PostgreSQL prints it, or `None`: it is passed to pg_dump and into SQL.
fn check_snapshot_id(id: &str) -> Option<&str> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SNAPSHOT_ID
        && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(id)
}

impl Postgres {
    /// Opens a session on `database`, starts a read-only repeatable-read transaction and exports
    /// its snapshot.
    pub async fn export_snapshot(&self, database: &str) -> Result<SnapshotHolder, PgError> {
        let (mut child, mut stdin, stdout, stderr) = self.start_psql(database, &[])?;
        let io = |source| PgError::Io {
            tool: "psql",
            source,
        };
        stdin
            .write_all(
                b"begin transaction isolation level repeatable read read only;\nselect pg_catalog.pg_export_snapshot();\n",
            )
            .await
            .map_err(io)?;
        stdin.flush().await.map_err(io)?;
        let mut line = String::new();
        BufReader::new(stdout.take(MAX_LINE))
            .read_line(&mut line)
            .await
            .map_err(io)?;
        let Some(snapshot) = check_snapshot_id(line.trim()).map(str::to_string) else {
            // psql ended (no connection, no permission): its status and stderr say why.
            drop(stdin);
            let status = child.wait().await.map_err(io)?;
            let mut err = Vec::new();
            let _ = stderr.take(64 * 1024).read_to_end(&mut err).await;
            let out = std::process::Output {
                status,
                stdout: Vec::new(),
                stderr: err,
            };
            return Err(match psql_result(&out, || self.server()) {
                Err(e) => e,
                Ok(_) => PgError::Unexpected {
                    what: "exporting a snapshot",
                    detail: format!("psql answered {:?}", line.trim()),
                },
            });
        };
        // Its stderr is not read any more: a session that only waits writes nothing.
        drop(stderr);
        Ok(SnapshotHolder {
            child,
            stdin: Some(stdin),
            snapshot,
        })
    }

    /// Row counts and checksums of every table of `database`, in `snapshot` when given (one
    /// exported by [`Self::export_snapshot`]), else in a snapshot of their own.
    pub async fn table_stats(
        &self,
        database: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<TableStats>, PgError> {
        let import = match snapshot {
            Some(id) => {
                let id = check_snapshot_id(id).ok_or_else(|| PgError::Unexpected {
                    what: "importing a snapshot",
                    detail: "not a snapshot id".into(),
                })?;
                format!("set transaction snapshot {};", quote_literal(id)?)
            }
            None => String::new(),
        };
        let script = format!(
            "begin transaction isolation level repeatable read read only; {import} {PINNED_SETTINGS}\n{STATS_QUERY}\ncommit;\n"
        );
        self.query_json(database, "counting rows and checksumming tables", &script)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_are_checked() {
        assert_eq!(
            check_snapshot_id("00000003-0000001B-1"),
            Some("00000003-0000001B-1")
        );
        assert_eq!(check_snapshot_id(""), None);
        assert_eq!(check_snapshot_id("1'; drop table x; --"), None);
        assert_eq!(check_snapshot_id(&"a".repeat(65)), None);
    }
}
