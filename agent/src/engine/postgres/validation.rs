//! Validation data for restore drills: per-table row counts and an order-independent checksum of
//! the rows.
//!
//! Backups read it from the dump as it streams past ([`DumpTee`], [`super::dump_stats`]), so it
//! describes exactly the rows pg_dump dumped, and drills hash the restored tables' `COPY` text the
//! same way ([`Postgres::copy_stats`]).
//!
//! Backups recorded before that, and physical drills, use [`Postgres::table_stats`]: one scan per
//! table, `count(*)` and the sum of a 64-bit hash (`hashtextextended`, the stable hash hash
//! partitioning relies on) of each row's text form, with every setting that changes a row's text
//! form pinned, so the same rows give the same checksum on any server of a version.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tokio_util::{io::StreamReader, sync::PollSender};

use super::{
    DumpStats, DumpStatsError, NulByte, PgError, Postgres, RowHasher, dump_stats, quote_literal,
    sql::psql_result,
};

/// Startup options for pg_dump's session: the settings that change `COPY` text which pg_dump
/// does not pin itself (it sets DateStyle ISO, IntervalStyle postgres, extra_float_digits 3).
/// Client options outrank role and database settings, so the dump's text is what a drill
/// session with [`COPY_SETTINGS`] prints.
pub(super) const DUMP_OPTIONS: &str = "-c timezone=UTC -c bytea_output=hex";

/// What a drill's `COPY` session sets: pg_dump's own pins plus [`DUMP_OPTIONS`]. `row_security =
/// off` makes a table it may not fully read an error, as for pg_dump.
const COPY_SETTINGS: &str = "set datestyle = 'ISO'; set intervalstyle = 'postgres'; \
     set extra_float_digits = 3; set timezone = 'UTC'; set bytea_output = 'hex'; \
     set row_security = off;";

/// Every ordinary table outside the system schemas, as [`STATS_QUERY`] chooses them, with the
/// columns pg_dump copies (not dropped, not generated) and whether an extension owns it (pg_dump
/// dumps those only when the extension marked them as configuration).
const TABLES_QUERY: &str = "select coalesce(json_agg(json_build_object(\
       'schema', n.nspname, 'table', c.relname, \
       'columns', (select coalesce(json_agg(a.attname order by a.attnum), '[]') from pg_catalog.pg_attribute a \
                   where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped and a.attgenerated = ''), \
       'extension', exists (select 1 from pg_catalog.pg_depend d where d.classid = 'pg_catalog.pg_class'::regclass \
                            and d.objid = c.oid and d.deptype = 'e')) \
       order by n.nspname, c.relname), '[]') \
     from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace \
     where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema') \
       and n.nspname not like 'pg_toast%' and n.nspname not like 'pg_temp%';";

/// Chunks of the dump in flight to its parser: the tee waits when the parser lags, so this bounds
/// the copies held (each at most one read of pg_dump's output).
const TEE_CHUNKS: usize = 16;
/// Largest stderr kept from a `COPY` session.
const MAX_COPY_STDERR: u64 = 64 * 1024;

/// Longest snapshot id accepted from the server (they look like `00000003-0000001B-1`).
const MAX_SNAPSHOT_ID: usize = 64;

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

/// A snapshot id as PostgreSQL prints it, or `None`: it is spliced into SQL.
fn check_snapshot_id(id: &str) -> Option<&str> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SNAPSHOT_ID
        && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    ok.then_some(id)
}

/// A table as the drill lists it.
#[derive(Debug, Deserialize)]
struct Listed {
    schema: String,
    table: String,
    columns: Vec<String>,
    extension: bool,
}

/// pg_dump's output on its way to the pipeline, a copy of every piece going to the archive
/// parser ([`dump_stats`]) on its own task. If the parser stops (a malformed archive), the dump
/// still flows and the parser's error fails the backup at its verdict.
#[derive(Debug)]
pub struct DumpTee<R> {
    inner: R,
    tx: PollSender<Bytes>,
    pending: Option<Bytes>,
}

impl<R: AsyncRead + Unpin> DumpTee<R> {
    /// Tees `inner`; the task returns the dump's validation data once the tee has ended.
    pub fn new(inner: R) -> (Self, JoinHandle<Result<DumpStats, DumpStatsError>>) {
        let (tx, rx) = mpsc::channel::<Bytes>(TEE_CHUNKS);
        let reader = StreamReader::new(ReceiverStream::new(rx).map(Ok::<_, std::io::Error>));
        let task = tokio::spawn(dump_stats(reader));
        let tee = Self {
            inner,
            tx: PollSender::new(tx),
            pending: None,
        };
        (tee, task)
    }

    /// Hands the pending piece to the parser; `Pending` while its queue is full.
    fn poll_flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.pending.is_none() {
            return Poll::Ready(());
        }
        match ready!(self.tx.poll_reserve(cx)) {
            Ok(()) => {
                if let Some(chunk) = self.pending.take() {
                    // Only fails when the parser is gone, which its result reports.
                    let _ = self.tx.send_item(chunk);
                }
            }
            Err(_) => self.pending = None,
        }
        Poll::Ready(())
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for DumpTee<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_flush_pending(cx));
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if read.is_empty() {
            // The end: the parser sees it once the queue drains.
            this.tx.close();
        } else if !this.tx.is_closed() {
            this.pending = Some(Bytes::copy_from_slice(read));
            // Sent now if there is room, else before the next read.
            let _ = this.poll_flush_pending(cx);
        }
        Poll::Ready(Ok(()))
    }
}

/// An identifier in ASCII only (`U&"…"` with escapes), so the statement reads the same under
/// any client encoding the drill's `COPY` session switches to.
fn ascii_ident(name: &str) -> Result<String, NulByte> {
    if name.contains('\0') {
        return Err(NulByte);
    }
    let mut out = String::with_capacity(name.len() + 4);
    out.push_str("U&\"");
    for c in name.chars() {
        match c {
            '"' => out.push_str("\"\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            _ => out.push_str(&format!("\\+{:06X}", u32::from(c))),
        }
    }
    out.push('"');
    Ok(out)
}

/// Whether `name` may be spliced into `set client_encoding` (it comes from a manifest).
fn plain_encoding(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl Postgres {
    /// Row counts and checksums of every table of `database`, in `snapshot` when given (one
    /// exported with `pg_export_snapshot()`), else in a snapshot of their own.
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

impl Postgres {
    /// Rows and checksums of the tables of `database` as a backup read them from its dump:
    /// every ordinary table's `COPY` text, in `encoding` (the dump's), hashed by [`RowHasher`].
    /// Tables an extension owns count only when `include` names them (the dump had their data).
    pub async fn copy_stats(
        &self,
        database: &str,
        encoding: Option<&str>,
        include: impl Fn(&str, &str) -> bool,
    ) -> Result<Vec<TableStats>, PgError> {
        let encoding = encoding.unwrap_or("UTF8");
        if !plain_encoding(encoding) {
            return Err(PgError::Unexpected {
                what: "the dump's encoding",
                detail: format!("{encoding:?} is not an encoding name"),
            });
        }
        let listed: Vec<Listed> = self
            .query_json(database, "listing tables", TABLES_QUERY)
            .await?;
        let mut out = Vec::with_capacity(listed.len());
        for t in listed {
            if t.extension && !include(&t.schema, &t.table) {
                continue;
            }
            let mut columns = Vec::with_capacity(t.columns.len());
            for c in &t.columns {
                columns.push(ascii_ident(c)?);
            }
            let list = if columns.is_empty() {
                String::new()
            } else {
                format!(" ({})", columns.join(", "))
            };
            let script = format!(
                "set client_encoding = '{encoding}'; {COPY_SETTINGS}\ncopy {}.{}{list} to stdout;\n",
                ascii_ident(&t.schema)?,
                ascii_ident(&t.table)?
            );
            let hasher = self.hash_copy(database, &script).await?;
            out.push(TableStats {
                schema: t.schema,
                table: t.table,
                rows: hasher.rows(),
                checksum: hasher.checksum(),
            });
        }
        Ok(out)
    }

    /// Runs one `COPY … TO STDOUT` script and hashes what it prints, never holding more than a
    /// read's worth of it.
    async fn hash_copy(&self, database: &str, script: &str) -> Result<RowHasher, PgError> {
        let (mut child, mut stdin, mut stdout, stderr) = self.start_psql(database, &["-f", "-"])?;
        let io = |source| PgError::Io {
            tool: "psql",
            source,
        };
        let write = async {
            // psql may exit early (bad connection): its status tells why, not the broken pipe.
            let _ = stdin.write_all(script.as_bytes()).await;
            drop(stdin);
        };
        let hash = async {
            let mut hasher = RowHasher::default();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = stdout.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(hasher);
                }
                hasher.update(&buf[..n]);
            }
        };
        let read_err = async {
            let mut err = Vec::new();
            let mut stderr = stderr.take(MAX_COPY_STDERR);
            let r = stderr.read_to_end(&mut err).await;
            let _ = tokio::io::copy(&mut stderr.into_inner(), &mut tokio::io::sink()).await;
            r.map(|_| err)
        };
        let ((), hasher, err) = tokio::join!(write, hash, read_err);
        let (hasher, err) = (hasher.map_err(io)?, err.map_err(io)?);
        let status = child.wait().await.map_err(io)?;
        psql_result(
            &std::process::Output {
                status,
                stdout: Vec::new(),
                stderr: err,
            },
            || self.server(),
        )?;
        if !hasher.is_complete() {
            return Err(PgError::Unexpected {
                what: "copying a table out",
                detail: "the output ends inside a row or goes on after its end".into(),
            });
        }
        Ok(hasher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_ascii_and_quoted() {
        assert_eq!(ascii_ident("t").unwrap(), "U&\"t\"");
        assert_eq!(ascii_ident("a\"b\\c").unwrap(), "U&\"a\"\"b\\\\c\"");
        assert_eq!(ascii_ident("é").unwrap(), "U&\"\\+0000E9\"");
        assert!(ascii_ident("a\0").is_err());
        assert!(plain_encoding("UTF8") && plain_encoding("WIN1252"));
        assert!(!plain_encoding("UTF8'; drop") && !plain_encoding(""));
    }

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
