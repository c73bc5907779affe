//! Queries and scripts through `psql`: reading the catalogs, creating and dropping databases,
//! and applying a restore's globals as one script on stdin (so no value, password hashes
//! included, ever reaches a process argument).
//!
//! psql always talks UTF-8 (`PGCLIENTENCODING`), the encoding every statement here is built in:
//! under a client encoding such as SJIS or BIG5, the second byte of a character can read as a
//! backslash or a quote, and the quoting of `quote_literal` would no longer hold.

use std::process::Stdio;

use super::{NulByte, PgError, Postgres, globals, quote_ident, quote_literal};

/// Largest answer read from psql (a JSON document about the catalogs), so a bogus server cannot
/// exhaust the agent's memory.
const MAX_PSQL_OUTPUT: u64 = 64 * 1024 * 1024;
/// Largest stderr kept from a psql run.
const MAX_PSQL_STDERR: u64 = 64 * 1024;

/// A psql process with its stdin, stdout and stderr piped.
pub(super) type PsqlPipes = (
    tokio::process::Child,
    tokio::process::ChildStdin,
    tokio::process::ChildStdout,
    tokio::process::ChildStderr,
);

impl Postgres {
    /// Starts psql on `database` reading SQL from its stdin: no psqlrc, never a password prompt,
    /// unaligned tuples only, stopping at the first error, and `VERBOSITY=terse` so a failed
    /// statement's text (which may carry password hashes) never reaches an error or a log.
    /// `extra` are further psql options.
    pub(super) fn start_psql(&self, database: &str, extra: &[&str]) -> Result<PsqlPipes, PgError> {
        let mut cmd = self.command("psql");
        cmd.stdin(Stdio::piped())
            .env("PGCLIENTENCODING", "UTF8")
            .args([
                "-X",
                "-w",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "VERBOSITY=terse",
            ])
            .args(extra)
            .arg("-d")
            .arg(self.url_for(database));
        let mut child = cmd
            .spawn()
            .map_err(|source| self.spawn_error("psql", source))?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(PgError::Unexpected {
                what: "starting psql",
                detail: "its pipes are missing".into(),
            });
        };
        Ok((child, stdin, stdout, stderr))
    }

    /// Runs one SQL statement with psql and returns its unaligned output.
    pub(crate) async fn query(&self, database: &str, sql: &str) -> Result<String, PgError> {
        let mut cmd = self.command("psql");
        cmd.env("PGCLIENTENCODING", "UTF8")
            .args(["-X", "-w", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url_for(database))
            .arg("-c")
            .arg(sql);
        let out = cmd
            .output()
            .await
            .map_err(|source| self.spawn_error("psql", source))?;
        psql_result(&out, || self.server())
    }

    /// Runs psql with `sql` on its stdin (`-f -`), reading at most [`MAX_PSQL_OUTPUT`] bytes of
    /// its answer. The SQL never appears in a process argument list, so a script may carry
    /// password hashes; `VERBOSITY=terse` keeps psql from echoing a failed statement's text into
    /// the error (and so into logs). With `single_transaction` the script commits as a whole or
    /// not at all.
    async fn run_script(
        &self,
        database: &str,
        sql: &str,
        single_transaction: bool,
    ) -> Result<String, PgError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Every value went through the quoting helpers, which refuse NUL; this holds for
        // whatever SQL is built elsewhere too.
        if sql.contains('\0') {
            return Err(NulByte.into());
        }
        let mut args = vec!["-f", "-"];
        if single_transaction {
            args.push("-1");
        }
        let (mut child, mut stdin, stdout, stderr) = self.start_psql(database, &args)?;
        let io = |source| PgError::Io {
            tool: "psql",
            source,
        };
        let write = async {
            // psql may exit early (bad connection): its status tells why, not the broken pipe.
            let _ = stdin.write_all(sql.as_bytes()).await;
            drop(stdin);
        };
        let read_out = async {
            let mut out = Vec::new();
            stdout
                .take(MAX_PSQL_OUTPUT + 1)
                .read_to_end(&mut out)
                .await
                .map(|_| out)
        };
        let read_err = async {
            let mut err = Vec::new();
            let mut stderr = stderr.take(MAX_PSQL_STDERR);
            let r = stderr.read_to_end(&mut err).await;
            // Keep draining what is beyond the cap so psql never blocks on a full pipe.
            let _ = tokio::io::copy(&mut stderr.into_inner(), &mut tokio::io::sink()).await;
            r.map(|_| err)
        };
        let ((), out, err) = tokio::join!(write, read_out, read_err);
        let (out, err) = (out.map_err(io)?, err.map_err(io)?);
        if out.len() as u64 > MAX_PSQL_OUTPUT {
            let _ = child.kill().await;
            return Err(PgError::Unexpected {
                what: "a catalog query",
                detail: format!("the answer exceeds {MAX_PSQL_OUTPUT} bytes"),
            });
        }
        let status = child.wait().await.map_err(io)?;
        psql_result(
            &std::process::Output {
                status,
                stdout: out,
                stderr: err,
            },
            || self.server(),
        )
    }

    /// Runs a catalog query whose one value is a JSON document and parses it.
    pub async fn query_json<T: serde::de::DeserializeOwned>(
        &self,
        database: &str,
        what: &'static str,
        sql: &str,
    ) -> Result<T, PgError> {
        let out = self.run_script(database, sql, false).await?;
        serde_json::from_str(&out).map_err(|e| PgError::Unexpected {
            what,
            detail: e.to_string(),
        })
    }

    /// Runs a script (which may hold secrets) in one transaction; see [`Self::run_script`].
    pub async fn execute_script(&self, database: &str, sql: &str) -> Result<(), PgError> {
        self.run_script(database, sql, true).await.map(|_| ())
    }

    /// Whether the connected user may read pg_authid (and so password hashes).
    pub async fn can_read_passwords(&self, database: &str) -> Result<bool, PgError> {
        let out = self
            .query(
                database,
                "select has_table_privilege('pg_catalog.pg_authid', 'SELECT')",
            )
            .await?;
        Ok(out.trim() == "t")
    }

    /// Creates database `database` owned by `owner` (in `tablespace`), with its own settings.
    pub async fn create_database_owned(
        &self,
        database: &str,
        owner: &str,
        tablespace: Option<&str>,
        settings: &[String],
    ) -> Result<(), PgError> {
        // Both built first: a value SQL cannot carry must not leave a database behind.
        let create = globals::create_database_sql(database, owner, tablespace)?;
        let settings = globals::database_setting_sql(database, settings)?;
        self.query("postgres", &create).await?;
        if !settings.is_empty() {
            self.execute_script("postgres", &settings.join("\n"))
                .await?;
        }
        Ok(())
    }

    /// Number of tables outside the system schemas of `database` (for restore summaries).
    pub async fn table_count(&self, database: &str) -> Result<u64, PgError> {
        let out = self
            .query(
                database,
                "select count(*) from pg_catalog.pg_tables \
                 where schemaname not in ('pg_catalog', 'information_schema')",
            )
            .await?;
        out.trim().parse().map_err(|_| PgError::Unexpected {
            what: "counting tables",
            detail: out,
        })
    }

    /// Whether `database` exists on the server.
    pub async fn database_exists(&self, database: &str) -> Result<bool, PgError> {
        let out = self
            .query(
                "postgres",
                &format!(
                    "select count(*) from pg_database where datname = {}",
                    quote_literal(database)?
                ),
            )
            .await?;
        Ok(out.trim() != "0")
    }

    /// Number of user objects (relations, functions, schemas besides public, large objects,
    /// extensions besides plpgsql) in `database`.
    pub async fn user_objects(&self, database: &str) -> Result<u64, PgError> {
        const USER_NS: &str = "n.nspname not in ('pg_catalog', 'information_schema') \
             and n.nspname not like 'pg_toast%' and n.nspname not like 'pg_temp%'";
        let sql = format!(
            "select \
               (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace where {USER_NS}) \
             + (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace where {USER_NS}) \
             + (select count(*) from pg_type t join pg_namespace n on n.oid = t.typnamespace where {USER_NS} and t.typtype in ('e', 'd', 'r', 'm')) \
             + (select count(*) from pg_namespace n where {USER_NS} and n.nspname <> 'public') \
             + (select count(*) from pg_largeobject_metadata) \
             + (select count(*) from pg_extension where extname <> 'plpgsql')"
        );
        let out = self.query(database, &sql).await?;
        out.trim().parse().map_err(|_| PgError::ToolFailed {
            tool: "psql",
            status: "unexpected output".into(),
            stderr: out,
        })
    }

    /// Creates an empty database.
    pub async fn create_database(&self, database: &str) -> Result<(), PgError> {
        self.query(
            "postgres",
            &format!("create database {}", quote_ident(database)?),
        )
        .await
        .map(|_| ())
    }

    /// Drops a restore drill's scratch database, ending any session still in it (a pg_restore
    /// killed mid-drill may not have left yet).
    pub async fn drop_scratch_database(&self, database: &str) -> Result<(), PgError> {
        self.query(
            "postgres",
            &format!(
                "drop database if exists {} with (force)",
                quote_ident(database)?
            ),
        )
        .await
        .map(|_| ())
    }

    /// Drops a database this agent created for a restore that then failed.
    pub async fn drop_database(&self, database: &str) -> Result<(), PgError> {
        self.query(
            "postgres",
            &format!("drop database if exists {}", quote_ident(database)?),
        )
        .await
        .map(|_| ())
    }
}

/// psql's exit status when the connection to the server failed or went bad.
const PSQL_CONNECTION_FAILED: i32 = 2;

/// psql's output, or its error: a connection failure (naming `target`) or a failed statement.
///
/// psql tells the two apart by its exit status — 2 when the connection to the server failed or
/// went bad, 1 or 3 for errors of its own or of a statement — so no message text is parsed.
pub(super) fn psql_result(
    out: &std::process::Output,
    target: impl FnOnce() -> String,
) -> Result<String, PgError> {
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.code() == Some(PSQL_CONNECTION_FAILED) {
        Err(PgError::Connect {
            target: target(),
            detail: stderr,
        })
    } else {
        Err(PgError::ToolFailed {
            tool: "psql",
            status: out.status.to_string(),
            stderr,
        })
    }
}
