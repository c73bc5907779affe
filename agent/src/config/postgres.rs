//! Flags of the PostgreSQL engine: the server and the client programs.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::engine::postgres::Postgres;

/// The PostgreSQL server to back up and the programs that reach it.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "PostgreSQL")]
pub struct PostgresArgs {
    /// libpq URL of the PostgreSQL server, e.g. `postgresql://soma@127.0.0.1:5432/appdb`. No
    /// password here: use PGPASSWORD or a passfile.
    #[arg(long, env = "SOMA_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// libpq URL for base backups and WAL streaming, as a user with the REPLICATION attribute
    /// (default: --postgres-url). No password here: the replication user's password comes from
    /// SOMA_REPLICATION_PASSWORD (environment only), else PGPASSWORD or a passfile.
    #[arg(long, env = "SOMA_REPLICATION_URL", requires = "postgres_url")]
    pub replication_url: Option<String>,

    /// Directory holding pg_dump, pg_restore and psql (default: found on PATH).
    #[arg(long, env = "SOMA_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,
}

impl PostgresArgs {
    /// The engine, when --postgres-url is given. The replication password is read from the
    /// environment only, so it never shows in a process list.
    pub fn engine(&self) -> anyhow::Result<Option<Postgres>> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let mut pg = Postgres::new(url, self.pg_bin_dir.clone())
            .context("--postgres-url / SOMA_POSTGRES_URL")?;
        // clap makes --replication-url require --postgres-url.
        if let Some(url) = &self.replication_url {
            pg = pg
                .with_replication_url(url)
                .context("--replication-url / SOMA_REPLICATION_URL")?;
        }
        Ok(Some(pg.with_replication_password(
            std::env::var("SOMA_REPLICATION_PASSWORD").ok(),
        )))
    }
}
