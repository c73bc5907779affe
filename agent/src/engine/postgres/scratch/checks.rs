//! What a drill asks of its scratch server once it runs: the restored databases, their event
//! triggers disarmed, and amcheck installed fresh and run, all in sessions where nothing of the
//! backup can fire (see the parent module).

use super::{SESSION_OPTIONS, SOCKET_PORT, ScratchServer};
use crate::engine::postgres::{PgError, Postgres, command_at, spawn_error_at};

/// Bytes of pg_amcheck's output kept for the report.
const MAX_AMCHECK_OUTPUT: u64 = 8 * 1024;

/// Disables every event trigger of a database. `\gexec` runs each generated statement; every
/// name is quoted by `format('%I')`, and each function is named with its schema.
const DISARM: &str = "select pg_catalog.format('alter event trigger %I disable', evtname) \
     from pg_catalog.pg_event_trigger where evtenabled operator(pg_catalog.<>) 'D' \\gexec\n";

/// Schema the drill creates the amcheck extension in, in the scratch copy.
const AMCHECK_SCHEMA: &str = "soma_drill_amcheck";

impl ScratchServer {
    /// The databases of the scratch server that accept connections, templates left out.
    pub(crate) async fn databases(client: &Postgres, home: &str) -> Result<Vec<String>, PgError> {
        client
            .query_json(
                home,
                "listing the restored databases",
                "select coalesce(json_agg(datname::text order by datname), '[]'::json) \
                 from pg_database where datallowconn and not datistemplate",
            )
            .await
    }

    /// Disables every event trigger of every database that accepts connections (templates too),
    /// before the drill runs anything else there, and returns those databases. Event triggers
    /// do not fire for commands on event triggers ("Event triggers are … not fired for … commands
    /// targeting event triggers themselves", PostgreSQL 15 docs, 40.1 Overview of Event Trigger
    /// Behavior), and the session carries [`SESSION_OPTIONS`], so nothing of the backup's runs
    /// while they are disabled; even `ENABLE ALWAYS` ones end up `D`.
    pub(crate) async fn disarm(client: &Postgres, home: &str) -> Result<Vec<String>, PgError> {
        let all: Vec<String> = client
            .query_json(
                home,
                "listing the scratch server's databases",
                "select coalesce(pg_catalog.json_agg(datname::text order by datname), '[]'::json) \
                 from pg_catalog.pg_database where datallowconn",
            )
            .await?;
        for db in &all {
            client.execute_script(db, DISARM).await?;
        }
        Ok(all)
    }

    /// Creates the amcheck extension afresh in every database of `databases` (those
    /// [`Self::disarm`] returned, whose event triggers are off): an amcheck the backup carries is
    /// dropped first, since its functions may have been replaced by anything, and the new one
    /// lives in a schema of the drill's, created by the installation's own script.
    pub(crate) async fn install_amcheck(
        client: &Postgres,
        databases: &[String],
    ) -> Result<(), PgError> {
        let script = format!(
            "drop extension if exists amcheck cascade; \
             drop schema if exists {AMCHECK_SCHEMA} cascade; \
             create schema {AMCHECK_SCHEMA}; \
             create extension amcheck schema {AMCHECK_SCHEMA};"
        );
        for db in databases {
            client.execute_script(db, &script).await?;
        }
        Ok(())
    }

    /// `pg_amcheck --all` over the scratch server: every table's heap and every B-tree index,
    /// with each index's tuples matched against its heap and its parent pages. The extension
    /// must be in place ([`Self::install_amcheck`]): pg_amcheck installs nothing. Returns whether
    /// it found nothing wrong and what it printed (at most [`MAX_AMCHECK_OUTPUT`] bytes).
    pub(crate) async fn amcheck(
        &self,
        source: &Postgres,
        home: &str,
    ) -> Result<(bool, String), PgError> {
        use tokio::io::AsyncReadExt;
        let user = &self.superuser;
        let path = source.server_tool("pg_amcheck", self.major);
        let mut cmd = command_at(&path);
        // pg_amcheck opens a session per database: each carries the drill's options.
        cmd.env("PGOPTIONS", SESSION_OPTIONS)
            .args([
                "--all",
                "--heapallindexed",
                "--parent-check",
                "--no-password",
                "--port",
                &SOCKET_PORT.to_string(),
            ])
            .arg(format!("--host={}", self.socket_dir.display()))
            .arg(format!("--username={user}"))
            .arg(format!("--maintenance-db={home}"));
        let mut child = cmd
            .spawn()
            .map_err(|source| spawn_error_at("pg_amcheck", &path, source))?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(PgError::Unexpected {
                what: "starting pg_amcheck",
                detail: "its pipes are missing".into(),
            });
        };
        // Corruption can fill pages of output: keep the first part, drain the rest.
        let read = |pipe: Box<dyn tokio::io::AsyncRead + Unpin + Send>| async move {
            let mut kept = Vec::new();
            let mut pipe = pipe.take(MAX_AMCHECK_OUTPUT);
            let _ = pipe.read_to_end(&mut kept).await;
            let _ = tokio::io::copy(&mut pipe.into_inner(), &mut tokio::io::sink()).await;
            String::from_utf8_lossy(&kept).trim().to_string()
        };
        let (out, err) = tokio::join!(read(Box::new(stdout)), read(Box::new(stderr)));
        let status = child.wait().await.map_err(|source| PgError::Io {
            tool: "pg_amcheck",
            source,
        })?;
        // pg_amcheck exits 0 when it found nothing, 2 when it found corruption, 1 when it could
        // not check.
        match status.code() {
            Some(0) => Ok((true, "no corruption found".into())),
            Some(2) => Ok((false, out)),
            _ => Err(PgError::ToolFailed {
                tool: "pg_amcheck",
                status: status.to_string(),
                stderr: if err.is_empty() { out } else { err },
            }),
        }
    }
}
