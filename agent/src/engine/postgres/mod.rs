//! PostgreSQL through its client tools: `pg_dump --format=custom` out and `pg_restore
//! --single-transaction` in for logical backups; `pg_basebackup` (tar on stdout) for base backups;
//! `pg_receivewal` on a physical replication slot for the WAL archive; `psql` for queries and
//! replication commands.
//!
//! The agent talks to the server only through these tools, so connection behaviour (TLS,
//! passfile, service files, `PG*` variables) is exactly libpq's. The connection URL never carries
//! a password: libpq reads `PGPASSWORD` or the passfile from the agent's environment, so no secret
//! ever appears in a process argument list. The tools inherit that environment without the
//! store's credentials and the agent's own settings ([`scrub_env`]). [`replication`] holds the
//! replication side (base backups, the WAL stream's slot and receiver), [`process`] a running
//! tool.

use std::{path::PathBuf, process::Stdio};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};
use url::Url;

pub(crate) mod dump_stats;
pub(crate) mod globals;
mod process;
mod replication;
mod scratch;
mod sql;
pub(crate) mod validation;

pub(crate) use dump_stats::{ChecksumKind, DumpStats, DumpStatsError, RowHasher, dump_stats};
pub(crate) use process::ToolProcess;
#[cfg(test)]
pub(crate) use replication::parse_history_lines;
pub(crate) use replication::{
    BaseBackupPositions, HistoryLine, check_slot_name, parse_basebackup_positions,
};
pub(crate) use scratch::{ScratchError, ScratchServer};
pub(crate) use validation::{DumpTee, TableStats};

/// Quotes a value for a PostgreSQL configuration file.
pub(crate) fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// Lines of a tool's stderr kept for error messages.
const STDERR_TAIL_LINES: usize = 20;

/// PostgreSQL engine errors.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The connection URL is unusable.
    #[error("invalid PostgreSQL URL: {0}")]
    InvalidUrl(String),
    /// A client tool is not installed.
    #[error(
        "{tool} not found at {path}: install the PostgreSQL client tools of the server's major version in the agent image, or point --pg-bin-dir at them"
    )]
    ToolMissing {
        /// Tool name.
        tool: &'static str,
        /// Where we looked.
        path: String,
    },
    /// pg_dump cannot dump a newer server.
    #[error(
        "{tool} {tool_version} is older than the PostgreSQL server ({server_version}); it cannot dump a newer server. Install the PostgreSQL {server_major} client tools in the agent image, or point --pg-bin-dir at them"
    )]
    ToolTooOld {
        /// Tool name.
        tool: &'static str,
        /// Tool version.
        tool_version: String,
        /// Server version.
        server_version: String,
        /// Server major version.
        server_major: u32,
    },
    /// The server could not be reached or refused us.
    #[error("cannot connect to PostgreSQL at {target}: {detail}")]
    Connect {
        /// URL without credentials.
        target: String,
        /// What libpq said.
        detail: String,
    },
    /// A tool exited with an error.
    #[error("{tool} failed ({status}): {stderr}")]
    ToolFailed {
        /// Tool name.
        tool: &'static str,
        /// Exit status.
        status: String,
        /// Last lines of its stderr.
        stderr: String,
    },
    /// The restore target holds objects.
    #[error(
        "database {database} is not empty ({objects} user objects); restore into a new database with --database NAME, or pass --clean to drop and replace the objects the backup contains (in one transaction)"
    )]
    NotEmpty {
        /// Database name.
        database: String,
        /// How many objects it holds.
        objects: u64,
    },
    /// Spawning or talking to a tool failed.
    #[error("running {tool}: {source}")]
    Io {
        /// Tool name.
        tool: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The server answered a catalog query with something unusable.
    #[error("unexpected answer from PostgreSQL to {what}: {detail}")]
    Unexpected {
        /// What was asked.
        what: &'static str,
        /// What was wrong with the answer.
        detail: String,
    },
    /// A replication slot name PostgreSQL would refuse (it is also spliced into replication
    /// commands, so nothing else may pass).
    #[error(
        "replication slot name {slot:?} is invalid: use 1 to 63 lower-case letters, digits and underscores (--wal-slot / SOMA_WAL_SLOT)"
    )]
    InvalidSlotName {
        /// The name given.
        slot: String,
    },
    /// pg_dump's archive could not be read for the drill's validation data.
    #[error("database {database}: {source}")]
    Archive {
        /// The database dumped.
        database: String,
        /// What was wrong.
        source: DumpStatsError,
    },
}

/// A PostgreSQL server reached through the client tools.
#[derive(Debug, Clone)]
pub struct Postgres {
    url: Url,
    /// Connection for physical backups and WAL streaming (a user with REPLICATION); defaults to
    /// `url`.
    replication_url: Option<Url>,
    /// Password of the replication user, when it differs from the main user's (which libpq takes
    /// from PGPASSWORD or the passfile). Only ever passed through a child's environment.
    replication_password: Option<String>,
    bin_dir: Option<PathBuf>,
}

/// A name or value bound for SQL that holds a NUL byte. No PostgreSQL string can hold one, and
/// psql reading a script cuts its line there, so what follows on the line — a closing quote
/// included — would be lost and the rest of the script read out of step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a name or value bound for SQL holds a NUL byte, which PostgreSQL cannot store")]
pub struct NulByte;

impl From<NulByte> for PgError {
    /// What spawning psql with the statement as an argument reports too: refused input.
    fn from(e: NulByte) -> Self {
        PgError::Io {
            tool: "psql",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        }
    }
}

/// A quoted identifier: any name but one with a NUL byte.
fn quote_ident(name: &str) -> Result<String, NulByte> {
    if name.contains('\0') {
        return Err(NulByte);
    }
    Ok(format!("\"{}\"", name.replace('"', "\"\"")))
}

/// A string literal that means the same whatever `standard_conforming_strings` is. With it on, a
/// backslash in `'…'` is an ordinary character; with it off, it escapes the next one (and a
/// value ending in a backslash would swallow the closing quote). So a value with a backslash is
/// written as an escape string, `E'…'`, where backslashes always escape, with each one doubled;
/// quotes are doubled in both forms.
fn quote_literal(value: &str) -> Result<String, NulByte> {
    if value.contains('\0') {
        return Err(NulByte);
    }
    let quoted = value.replace('\'', "''");
    Ok(if value.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    })
}

/// Major version from `server_version_num` (e.g. 150018 → 15).
fn major_of_num(num: u32) -> u32 {
    num / 10000
}

/// Parses the version printed by `pg_dump --version`, e.g. "pg_dump (PostgreSQL) 15.18 (Debian …)".
fn parse_tool_version(out: &str) -> Option<(u32, String)> {
    let version = out
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, version.to_string()))
}

impl Postgres {
    /// Validates the connection URL: `postgres://` or `postgresql://`, and no password in it.
    pub fn new(url: &str, bin_dir: Option<PathBuf>) -> Result<Self, PgError> {
        Ok(Self {
            url: Self::parse_url(url)?,
            replication_url: None,
            replication_password: None,
            bin_dir,
        })
    }

    /// Uses `url` (a user with the REPLICATION attribute) for base backups and WAL streaming.
    pub fn with_replication_url(mut self, url: &str) -> Result<Self, PgError> {
        self.replication_url = Some(Self::parse_url(url)?);
        Ok(self)
    }

    /// Uses `password` for the replication connection (from SOMA_REPLICATION_PASSWORD).
    pub fn with_replication_password(mut self, password: Option<String>) -> Self {
        self.replication_password = password.filter(|p| !p.is_empty());
        self
    }

    fn parse_url(url: &str) -> Result<Url, PgError> {
        let parsed = Url::parse(url).map_err(|e| {
            PgError::InvalidUrl(format!(
                "{e}; expected e.g. postgresql://soma@127.0.0.1:5432/appdb"
            ))
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(PgError::InvalidUrl(format!(
                "scheme {:?}; expected postgresql://USER@HOST:PORT/DATABASE",
                parsed.scheme()
            )));
        }
        if parsed.password().is_some() {
            return Err(PgError::InvalidUrl(
                "the URL contains a password; remove it and supply the password through PGPASSWORD or a passfile (PGPASSFILE), so it never appears in process arguments or logs".into(),
            ));
        }
        for (k, _) in parsed.query_pairs() {
            if k == "password" {
                return Err(PgError::InvalidUrl(
                    "the URL has a password parameter; use PGPASSWORD or a passfile (PGPASSFILE) instead".into(),
                ));
            }
        }
        Ok(parsed)
    }

    /// The server's URL without a database, for manifests and logs (it holds no secret).
    pub fn server(&self) -> String {
        let mut u = self.url.clone();
        u.set_path("");
        u.set_query(None);
        u.to_string()
    }

    /// The database named in the URL (libpq's default, the user name, when there is none).
    pub fn default_database(&self) -> String {
        let path = self.url.path().trim_start_matches('/');
        if !path.is_empty() {
            return percent_decode(path);
        }
        if !self.url.username().is_empty() {
            return percent_decode(self.url.username());
        }
        std::env::var("PGDATABASE")
            .or_else(|_| std::env::var("PGUSER"))
            .unwrap_or_else(|_| "postgres".into())
    }

    /// The connection URL for `database`.
    fn url_for(&self, database: &str) -> String {
        let mut u = self.url.clone();
        u.path_segments_mut()
            .map(|mut p| {
                p.clear().push(database);
            })
            .ok();
        u.to_string()
    }

    fn tool_path(&self, tool: &str) -> PathBuf {
        match &self.bin_dir {
            Some(dir) => dir.join(tool),
            None => PathBuf::from(tool),
        }
    }

    fn command(&self, tool: &'static str) -> Command {
        command_at(&self.tool_path(tool))
    }

    /// A tool that cannot be started is missing (with where we looked) or failed to start.
    fn spawn_error(&self, tool: &'static str, source: std::io::Error) -> PgError {
        spawn_error_at(tool, &self.tool_path(tool), source)
    }

    fn spawn(&self, tool: &'static str, mut cmd: Command) -> Result<ToolProcess, PgError> {
        let mut child = cmd
            .spawn()
            .map_err(|source| self.spawn_error(tool, source))?;
        let stderr = child.stderr.take().map(|err| {
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                let mut tail = std::collections::VecDeque::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::debug!(tool, "{line}");
                    if tail.len() == STDERR_TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                tail.into_iter().collect::<Vec<_>>().join("\n")
            })
        });
        Ok(ToolProcess {
            tool,
            child,
            stderr,
        })
    }

    /// The server's version: (`server_version_num`, `server_version`).
    pub async fn server_version(&self, database: &str) -> Result<(u32, String), PgError> {
        let out = self
            .query(
                database,
                "select current_setting('server_version_num') || ' ' || current_setting('server_version')",
            )
            .await?;
        let (num, text) = out.split_once(' ').unwrap_or((&out, ""));
        let num = num.parse().map_err(|_| PgError::ToolFailed {
            tool: "psql",
            status: "unexpected output".into(),
            stderr: out.clone(),
        })?;
        let text = text.split_whitespace().next().unwrap_or(text).to_string();
        Ok((num, text))
    }

    /// A client tool's version: (major, full version).
    pub async fn tool_version(&self, tool: &'static str) -> Result<(u32, String), PgError> {
        self.tool_version_at(tool, &self.tool_path(tool)).await
    }

    /// The version of `tool` at `path`.
    async fn tool_version_at(
        &self,
        tool: &'static str,
        path: &std::path::Path,
    ) -> Result<(u32, String), PgError> {
        let out = command_at(path)
            .arg("--version")
            .output()
            .await
            .map_err(|source| spawn_error_at(tool, path, source))?;
        let text = String::from_utf8_lossy(&out.stdout);
        parse_tool_version(&text).ok_or_else(|| PgError::ToolFailed {
            tool,
            status: out.status.to_string(),
            stderr: format!("unexpected --version output: {}", text.trim()),
        })
    }

    /// Checks that `tool` can handle this server: its major version must be at least the server's.
    pub async fn check_tool(
        &self,
        tool: &'static str,
        database: &str,
    ) -> Result<(String, String), PgError> {
        let (tool_major, tool_version) = self.tool_version(tool).await?;
        let (server_num, server_version) = self.server_version(database).await?;
        let server_major = major_of_num(server_num);
        if tool_major < server_major {
            return Err(PgError::ToolTooOld {
                tool,
                tool_version,
                server_version,
                server_major,
            });
        }
        Ok((tool_version, server_version))
    }

    /// Starts `pg_dump --format=custom` of `database` without its own compression (the pipeline
    /// compresses), writing to stdout.
    pub fn start_dump(&self, database: &str) -> Result<ToolProcess, PgError> {
        let mut cmd = self.command("pg_dump");
        cmd.args(["--format=custom", "--compress=0", "--no-password"]);
        // pg_dump pins DateStyle, IntervalStyle and extra_float_digits itself; these two settings
        // also change COPY's text, which the drill hashes again under the same values.
        let pinned = validation::DUMP_OPTIONS;
        let options = match std::env::var("PGOPTIONS") {
            Ok(own) if !own.trim().is_empty() => format!("{own} {pinned}"),
            _ => pinned.to_string(),
        };
        cmd.env("PGOPTIONS", options);
        cmd.arg("--dbname").arg(self.url_for(database));
        self.spawn("pg_dump", cmd)
    }

    /// Starts `pg_restore` for a restore drill into the scratch `database`, as one transaction
    /// reading stdin like [`Self::start_restore`], but without owners, privileges, tablespaces
    /// or subscriptions: a drill checks the data and never creates or alters roles, nor connects
    /// a subscription to a publisher.
    pub fn start_drill_restore(&self, database: &str) -> Result<ToolProcess, PgError> {
        let mut cmd = self.command("pg_restore");
        cmd.stdin(Stdio::piped()).args([
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            "--no-owner",
            "--no-privileges",
            "--no-tablespaces",
            "--no-subscriptions",
            "--dbname",
        ]);
        cmd.arg(self.url_for(database));
        self.spawn("pg_restore", cmd)
    }

    /// Starts `pg_restore` into `database` as ONE transaction reading the archive from stdin: it
    /// commits only after reading the whole archive, and killing it rolls everything back.
    pub fn start_restore(&self, database: &str, clean: bool) -> Result<ToolProcess, PgError> {
        let mut cmd = self.command("pg_restore");
        cmd.stdin(Stdio::piped()).args([
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            "--dbname",
        ]);
        cmd.arg(self.url_for(database));
        if clean {
            cmd.args(["--clean", "--if-exists"]);
        }
        self.spawn("pg_restore", cmd)
    }
}

/// A tool's command: no stdin, stdout and stderr piped, killed when dropped, and none of the
/// agent's own secrets in its environment ([`scrub_env`]).
pub(super) fn command_at(path: &std::path::Path) -> Command {
    let mut cmd = Command::new(path);
    scrub_env(&mut cmd, Child::Tool);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// Which kind of process the agent starts, for what it may inherit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Child {
    /// A client tool (pg_dump, pg_restore, psql, pg_basebackup, pg_receivewal, pg_amcheck, a
    /// `--version` probe): it keeps libpq's `PG*` variables, which is how it authenticates.
    Tool,
    /// A drill's scratch server (and its initdb). It runs a data directory read from the store,
    /// so it keeps only an allow-list ([`kept_by_scratch_server`]): no store credential, no
    /// `SOMA_*` setting, no libpq variable (its settings are in its own configuration, it
    /// connects nowhere; WAL comes from the agent over the drill's socket).
    ScratchServer,
}

/// Removes from `cmd`'s environment every variable of the agent's that `child` must not see.
/// A child inherits the agent's environment otherwise, and a PostgreSQL tool (or a server
/// replaying an untrusted data directory) has no business with the store's credentials or the
/// agent's token. Variables set on `cmd` after this (a replication password) stay.
pub(super) fn scrub_env(cmd: &mut Command, child: Child) {
    if child == Child::ScratchServer {
        cmd.env_clear();
        for (name, value) in std::env::vars_os() {
            if kept_by_scratch_server(&name) {
                cmd.env(name, value);
            }
        }
        return;
    }
    for (name, _) in std::env::vars_os() {
        if removed_for(&name, child) {
            cmd.env_remove(&name);
        }
    }
}

/// Whether a variable carries a secret of the agent's, or the path of one: the store's
/// credentials (the AWS SDK reads the whole `AWS_` family — keys, session token, web identity
/// token file, role, profile, container credentials) and the agent's own settings (`SOMA_`:
/// the API token file, the replication password, the Qdrant API key…). Prefixes match without
/// regard to case, so no spelling slips through.
fn is_secret_var(name: &std::ffi::OsStr) -> bool {
    has_prefix(name, "AWS_") || has_prefix(name, "SOMA_")
}

/// Whether `child` must not inherit variable `name`.
fn removed_for(name: &std::ffi::OsStr, child: Child) -> bool {
    match child {
        Child::Tool => is_secret_var(name),
        Child::ScratchServer => !kept_by_scratch_server(name),
    }
}

/// What a scratch server inherits: where programs are, its locale and time zone. Nothing else —
/// a new kind of secret in the agent's environment cannot slip through.
fn kept_by_scratch_server(name: &std::ffi::OsStr) -> bool {
    matches!(
        name.as_encoded_bytes(),
        b"PATH" | b"LANG" | b"LANGUAGE" | b"TZ" | b"TZDIR"
    ) || name.as_encoded_bytes().starts_with(b"LC_")
}

fn has_prefix(name: &std::ffi::OsStr, prefix: &str) -> bool {
    name.as_encoded_bytes()
        .get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// A tool at `path` that cannot be started is missing (with where we looked) or failed to start.
pub(super) fn spawn_error_at(
    tool: &'static str,
    path: &std::path::Path,
    source: std::io::Error,
) -> PgError {
    if source.kind() == std::io::ErrorKind::NotFound {
        PgError::ToolMissing {
            tool,
            path: path.display().to_string(),
        }
    } else {
        PgError::Io { tool, source }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_else(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_passwords_in_the_url() {
        let err = Postgres::new("postgresql://u:secret@127.0.0.1/db", None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("PGPASSWORD") && !msg.contains("secret"),
            "{msg}"
        );
        assert!(Postgres::new("postgresql://u@127.0.0.1/db?password=x", None).is_err());
        assert!(Postgres::new("mysql://u@127.0.0.1/db", None).is_err());
    }

    #[test]
    fn builds_urls_per_database() {
        let pg = Postgres::new(
            "postgresql://soma@127.0.0.1:5432/appdb?sslmode=disable",
            None,
        )
        .unwrap();
        assert_eq!(pg.default_database(), "appdb");
        assert_eq!(
            pg.url_for("other db"),
            "postgresql://soma@127.0.0.1:5432/other%20db?sslmode=disable"
        );
        assert_eq!(pg.server(), "postgresql://soma@127.0.0.1:5432");
    }

    #[test]
    fn parses_tool_versions() {
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some((15, "15.18".into()))
        );
        assert_eq!(
            parse_tool_version("pg_dump (PostgreSQL) 17devel"),
            Some((17, "17devel".into()))
        );
        assert_eq!(major_of_num(150018), 15);
    }

    #[test]
    fn quotes_for_either_standard_conforming_strings() {
        assert_eq!(quote_ident("a\"b").unwrap(), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's").unwrap(), "'it''s'");
        assert_eq!(quote_literal("").unwrap(), "''");
        // A backslash always means an escape string with every backslash doubled: in a plain
        // '…' literal, `\'` would end the string early when standard_conforming_strings is off.
        assert_eq!(quote_literal("a\\'b").unwrap(), "E'a\\\\''b'");
        assert_eq!(quote_literal("tail\\").unwrap(), "E'tail\\\\'");
        assert_eq!(
            quote_literal("x\\'; drop table t; --").unwrap(),
            "E'x\\\\''; drop table t; --'"
        );
        assert_eq!(quote_literal("\\n").unwrap(), "E'\\\\n'");
        // Newlines and psql's own syntax stay inside the literal as they are.
        assert_eq!(
            quote_literal("a\n\\! id\n:'v'").unwrap(),
            "E'a\n\\\\! id\n:''v'''"
        );
    }

    #[test]
    fn refuses_nul_bytes_in_sql() {
        assert_eq!(quote_literal("a\0b"), Err(NulByte));
        assert_eq!(quote_literal("\0"), Err(NulByte));
        assert_eq!(quote_ident("db\0"), Err(NulByte));
        let err = PgError::from(NulByte).to_string();
        assert!(err.contains("NUL byte"), "{err}");
    }

    #[test]
    fn children_lose_the_agents_secrets_and_keep_libpqs() {
        use std::ffi::OsStr;
        for secret in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
            "AWS_ROLE_ARN",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
            "AWS_PROFILE",
            "AWS_SHARED_CREDENTIALS_FILE",
            "AWS_CONFIG_FILE",
            "aws_secret_access_key",
            "SOMA_AGENT_TOKEN",
            "SOMA_AGENT_TOKEN_FILE",
            "SOMA_ENCRYPTION_KEY_FILE",
            "SOMA_QDRANT_API_KEY",
            "SOMA_REPLICATION_PASSWORD",
            "Soma_Store",
        ] {
            assert!(is_secret_var(OsStr::new(secret)), "{secret}");
            assert!(removed_for(OsStr::new(secret), Child::Tool), "{secret}");
        }
        for kept in [
            "PGPASSWORD",
            "PGPASSFILE",
            "PGSSLMODE",
            "PATH",
            "HOME",
            "LANG",
            "LC_ALL",
            "TZ",
            "AWS",
            "SOMA",
            "MY_AWS_KEY",
        ] {
            assert!(!is_secret_var(OsStr::new(kept)), "{kept}");
            assert!(!removed_for(OsStr::new(kept), Child::Tool), "{kept}");
        }
        // The scratch server keeps nothing of the agent's, the store's or libpq's.
        for gone in [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_ENDPOINT_URL",
            "HOME",
            "DATABASE_PASSWORD",
            "MY_TOKEN",
            "SOMA_AGENT_TOKEN_FILE",
            "SOMA_ENCRYPTION_KEY_FILE",
            "SOMA_ACCEPT_UNENCRYPTED",
            "SOMA_QDRANT_API_KEY",
            "SOMA_REPLICATION_PASSWORD",
            "PGPASSWORD",
            "PGDATA",
            "PGPASSFILE",
        ] {
            assert!(
                removed_for(OsStr::new(gone), Child::ScratchServer),
                "{gone}"
            );
        }
        for kept in ["PATH", "LANG", "LC_ALL", "LC_MESSAGES", "TZ"] {
            assert!(
                !removed_for(OsStr::new(kept), Child::ScratchServer),
                "{kept}"
            );
        }
    }

    #[test]
    fn built_commands_drop_the_agents_secrets() {
        // Reads (never sets) this process's environment: whatever of it is secret must be
        // removed from the command, and nothing else.
        let cmd = command_at(std::path::Path::new("pg_dump"));
        let removed: Vec<_> = cmd
            .as_std()
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_os_string())
            .collect();
        for (name, _) in std::env::vars_os() {
            assert_eq!(removed.contains(&name), is_secret_var(&name), "{name:?}");
        }
    }
}
