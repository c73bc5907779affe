//! A throwaway PostgreSQL 15 cluster in a temporary directory.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::unistd::{Gid, Uid, User, geteuid};
use tempfile::TempDir;

use crate::util::{free_port, tail};

/// Where Debian puts the PostgreSQL 15 server binaries.
pub const PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
/// The psql client (Debian's wrapper picks the installed version).
const PSQL: &str = "/usr/bin/psql";
/// Schemas that belong to PostgreSQL itself, not to the application.
pub const SYSTEM_SCHEMAS: &str = "('pg_catalog', 'information_schema', 'pg_toast')";

/// A PostgreSQL 15 server on 127.0.0.1, trust authentication for user `postgres`, stopped
/// (`pg_ctl stop -m immediate`) and deleted on drop.
///
/// The server refuses to run as root, so when the test runs as root (as CI does) the data
/// directory is owned by, and the server runs as, the unprivileged `postgres` user.
#[derive(Debug)]
pub struct PgCluster {
    dir: TempDir,
    port: u16,
    owner: Option<(Uid, Gid)>,
}

impl PgCluster {
    /// Runs initdb and starts the server on a free port; panics with the server log on failure.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Like [`start`](Self::start), with extra server options (`-c name=value ...`) that override
    /// the defaults, e.g. `-c synchronous_commit=on` where a test measures what a crash loses.
    pub fn start_with(extra_options: &str) -> Self {
        let mut cluster = Self::empty();
        let data = cluster.data_dir();
        let out = cluster
            .server_command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("cannot run initdb");
        assert!(out.status.success(), "initdb failed:\n{}", show(&out));
        if let Err(e) = cluster.try_start(extra_options, &[]) {
            panic!("PostgreSQL did not start:\n{e}");
        }
        cluster
    }

    /// A temporary directory owned by the user PostgreSQL runs as (`postgres` when the tests
    /// run as root), e.g. an agent's `--drill-dir`, where a scratch server runs.
    pub fn server_owned_dir(prefix: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("cannot create a temporary directory");
        if let Some((uid, gid)) = server_user() {
            std::os::unix::fs::chown(dir.path(), Some(uid.as_raw()), Some(gid.as_raw()))
                .expect("cannot chown the temporary directory to user postgres");
        }
        dir
    }

    /// A temporary directory for a cluster, owned by the server's user, with no data directory
    /// yet ([`data_path`](Self::data_path) does not exist): the target of a physical restore.
    pub fn empty() -> Self {
        PgCluster {
            dir: Self::server_owned_dir("soma-pg-"),
            port: 0,
            owner: server_user(),
        }
    }

    /// Starts the server on the existing data directory (e.g. one a physical restore laid down)
    /// with `env` added to its environment (restore_command inherits it: the store's
    /// credentials). Returns pg_ctl's output and the server log when it does not start.
    pub fn start_existing(&mut self, env: &[(String, String)]) -> Result<(), String> {
        self.try_start("", env)
    }

    /// [`start_existing`](Self::start_existing) with extra server options (`-c name=value`),
    /// which outrank every configuration file.
    pub fn start_existing_with(
        &mut self,
        extra_options: &str,
        env: &[(String, String)],
    ) -> Result<(), String> {
        self.try_start(extra_options, env)
    }

    fn try_start(&mut self, extra_options: &str, env: &[(String, String)]) -> Result<(), String> {
        let data = self.data_dir();
        // The port was free when picked but another test may take it before the server binds it:
        // try a few ports.
        let mut last_failure = String::new();
        for _ in 0..5 {
            self.port = free_port();
            // fsync and friends are off because these clusters are disposable; nothing under test
            // depends on PostgreSQL's own crash durability.
            let options = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_wal_size=4GB {extra_options}",
                self.port,
                self.dir.path().display()
            );
            let out = self
                .server_command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "120", "-o", &options, "start"])
                .envs(env.iter().map(|(k, v)| (k, v)))
                .output()
                .expect("cannot run pg_ctl");
            if out.status.success() {
                return Ok(());
            }
            last_failure = format!("{}\n--- server log ---\n{}", show(&out), self.log());
            // Only a port taken meanwhile is worth another try; anything else (e.g. a recovery
            // that failed) would fail again.
            if !self.log().contains("Address already in use") {
                break;
            }
        }
        self.port = 0;
        Err(last_failure)
    }

    /// The data directory (missing for a cluster made by [`empty`](Self::empty) until a restore
    /// creates it).
    pub fn data_path(&self) -> PathBuf {
        self.data_dir()
    }

    /// A command run as the cluster's owner (the `postgres` user when the test runs as root), in
    /// the cluster's directory: what an init container running as PostgreSQL's user does.
    pub fn owner_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(self.dir.path()).stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }

    /// Kills the postmaster with SIGKILL (a crash: no shutdown checkpoint, nothing flushed).
    pub fn kill_9(&mut self) {
        let pid_file = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .expect("cannot read postmaster.pid");
        let pid: i32 = pid_file
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster.pid starts with the pid");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("cannot SIGKILL the postmaster");
        crate::util::poll_until(
            std::time::Duration::from_secs(30),
            "the killed postmaster to be gone",
            || {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                    .is_err()
                    .then_some(())
            },
        );
    }

    /// Whether a server is running on the data directory (`pg_ctl status`).
    pub fn is_running(&self) -> bool {
        self.server_command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("status")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Polls until the server has left recovery (a restored server promoted) or stopped; returns
    /// true when it promoted.
    pub fn wait_promoted_or_stopped(&self, timeout: std::time::Duration) -> bool {
        crate::util::poll_until(
            timeout,
            "the restored server to promote or stop",
            || match self.try_psql("postgres", "select pg_is_in_recovery()") {
                Ok(r) if r == "f" => Some(true),
                Ok(_) => None,
                Err(_) if !self.is_running() => Some(false),
                Err(_) => None,
            },
        )
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection URL for database `db` as user `postgres`, without a password.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `sql` (one or more statements) in database `db` with psql; returns the unaligned,
    /// tuples-only output without the final newline, or psql's stderr when it fails.
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let mut child = self
            .client_command(PSQL)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        let sql = sql.to_owned();
        // Written from another thread so a large script cannot deadlock against a large result.
        let writer = std::thread::spawn(move || stdin.write_all(sql.as_bytes()));
        let out = child.wait_with_output().expect("cannot wait for psql");
        let written = writer.join().expect("psql stdin writer panicked");
        if out.status.success() {
            written.expect("cannot write the SQL to psql");
            let stdout = String::from_utf8_lossy(&out.stdout);
            Ok(stdout.strip_suffix('\n').unwrap_or(&stdout).to_owned())
        } else {
            Err(format!(
                "psql failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Like [`try_psql`](Self::try_psql) but panics (with psql's stderr) on failure.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("in database {db}: {e}\nSQL:\n{}", tail(sql, 40)))
    }

    /// Creates database `name` (a plain lower-case identifier).
    pub fn createdb(&self, name: &str) {
        self.psql("postgres", &format!("create database \"{name}\""));
    }

    /// Whether database `name` exists.
    pub fn database_exists(&self, name: &str) -> bool {
        let n = self.psql(
            "postgres",
            &format!(
                "select count(*) from pg_database where datname = '{}'",
                name.replace('\'', "''")
            ),
        );
        n == "1"
    }

    /// Tables (`schema.table`, quoted where needed) outside the system schemas, sorted.
    pub fn user_tables(&self, db: &str) -> Vec<String> {
        let out = self.psql(
            db,
            &format!(
                "select quote_ident(schemaname) || '.' || quote_ident(tablename) \
                 from pg_tables where schemaname not in {SYSTEM_SCHEMAS} \
                 order by 1 collate \"C\""
            ),
        );
        out.lines().map(str::to_owned).collect()
    }

    /// `pg_dump --schema-only` of database `db` (plain SQL). `--restrict-key` is fixed because
    /// pg_dump otherwise writes a random key into every dump.
    pub fn dump_schema(&self, db: &str) -> String {
        let out = self
            .client_command(Path::new(PG_BIN_DIR).join("pg_dump"))
            .args(["--schema-only", "--restrict-key=somatests", "-d", db])
            .stdin(Stdio::null())
            .output()
            .expect("cannot run pg_dump");
        assert!(
            out.status.success(),
            "pg_dump --schema-only {db} failed:\n{}",
            show(&out)
        );
        String::from_utf8(out.stdout).expect("pg_dump wrote non-UTF-8 output")
    }

    /// A client command (psql, pg_dump) connected to this server as `postgres` over TCP.
    pub fn client_command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGCONNECT_TIMEOUT", "10")
            .env_remove("PGPASSWORD")
            .env_remove("PGDATABASE")
            .env_remove("PGSERVICE");
        cmd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// A server-side command (initdb, pg_ctl) run as the cluster's owner.
    fn server_command(&self, name: &str) -> Command {
        let mut cmd = Command::new(Path::new(PG_BIN_DIR).join(name));
        cmd.current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C")
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env_remove("PGHOST")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.owner {
            // std drops root's supplementary groups when it switches uid.
            cmd.uid(uid.as_raw()).gid(gid.as_raw());
        }
        cmd
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.port != 0 {
            let _ = self
                .server_command("pg_ctl")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- PostgreSQL log (port {}), last lines ---\n{}",
                self.port,
                tail(&self.log(), 30)
            );
        }
    }
}

/// The user the server must run as: `None` when not root (run as ourselves), else `postgres`.
fn server_user() -> Option<(Uid, Gid)> {
    if !geteuid().is_root() {
        return None;
    }
    let user = User::from_name("postgres")
        .expect("cannot look up user postgres")
        .expect(
            "running as root but there is no `postgres` user to run PostgreSQL as \
             (apt-get install postgresql-15 creates it)",
        );
    Some((user.uid, user.gid))
}

/// A command's status, stdout and stderr for failure messages.
fn show(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
