//! A throwaway PostgreSQL server for a restore drill: on a data directory a physical restore laid
//! down (it replays the archive and promotes) or on one `initdb` made for a logical drill's
//! restore, started from the agent's own server binaries, answering the drill's checks and
//! stopped again.
//!
//! What a data directory from the store carries is untrusted: its configuration, its roles'
//! settings, its event triggers and functions were chosen by whoever was superuser of the source
//! database, or can write the bucket. So nothing of it is read or run:
//! - the server reads a configuration the drill writes ([`config::SETTINGS`], in a file of the drill's
//!   directory named by `config_file`, repeated on the command line); the restored
//!   `postgresql.conf` (and every `include` in it) is never opened, and the restored
//!   `postgresql.auto.conf`, which PostgreSQL always reads from the data directory, is replaced
//!   by an empty one. No TCP listener — only a Unix socket inside the drill's own mode-0700
//!   directory — no archiving, no replication, no preloaded library, `jit` off;
//! - every session of the drill carries [`SESSION_OPTIONS`] in its start-up packet, which outrank
//!   `ALTER ROLE/DATABASE … SET` (see there), so no per-role or per-database library, search path
//!   or JIT setting applies;
//! - before anything else runs in a database, every event trigger of it is disabled
//!   ([`ScratchServer::disarm`]); `ALTER EVENT TRIGGER` itself fires none;
//! - the amcheck extension is created fresh, in a schema of its own, in sessions where nothing
//!   can fire, never by `pg_amcheck --install-missing`;
//! - its environment holds no secret ([`super::Child::ScratchServer`]: an allow-list), and WAL
//!   reaches it from the agent over the drill's socket, so its restore_command needs no
//!   credential or key.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

use super::{PgError, Postgres};

mod checks;
mod config;
mod files;
use config::ScratchFiles;
use files::{data_major, log_tail, replace_restored_files};

/// Port number in the socket's file name; there is no TCP listener, so it cannot collide.
const SOCKET_PORT: u16 = 5432;
/// How often start-up progress is looked at.
const POLL: Duration = Duration::from_millis(200);
/// How long a fast shutdown may take before the server is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);
/// Lines of the server log kept for error messages.
const LOG_TAIL_LINES: usize = 15;
/// Bytes of the server log read for its tail.
const LOG_TAIL_BYTES: u64 = 16 * 1024;
/// Longest Unix socket path the kernel accepts (`sun_path` holds 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Options every session of the drill sends in its start-up packet (libpq's `options`). The server
/// applies them with source `PGC_S_CLIENT`, which ranks above `PGC_S_DATABASE_USER`,
/// `PGC_S_USER` and `PGC_S_DATABASE` (PostgreSQL 15, src/include/utils/guc.h, `enum GucSource`:
/// "sources are listed in order of increasing priority"), and per-role and per-database settings
/// are applied by `process_settings` with those lower sources after the packet's options
/// (src/backend/utils/init/postinit.c), so `ALTER ROLE … SET session_preload_libraries` or
/// `search_path` from the backup cannot apply. `session_preload_libraries` is loaded after both
/// (src/backend/tcop/postgres.c), so blanking it here means nothing is loaded.
/// `search_path=pg_catalog` keeps a function from the backup from shadowing a built-in one the
/// drill calls unqualified.
const SESSION_OPTIONS: &str = "-c session_preload_libraries= -c local_preload_libraries= \
     -c jit=off -c search_path=pg_catalog -c default_transaction_read_only=off \
     -c statement_timeout=0 -c lock_timeout=0 -c idle_in_transaction_session_timeout=0";

/// Why a scratch server could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    /// Preparing its files failed.
    #[error("{action} for the drill's scratch server in {}: {source}", dir.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// Where.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The restored data directory is not one this agent can run.
    #[error("{0}")]
    Unusable(String),
    /// The server stopped before it was ready (recovery failed, a setting was refused).
    #[error("the scratch server exited ({status}) before recovery ended; its log ends: {log}")]
    Exited {
        /// How it exited.
        status: String,
        /// The last lines of its log.
        log: String,
    },
    /// Recovery did not end in time.
    #[error("the scratch server was still recovering after {seconds} s; its log ends: {log}")]
    TooSlow {
        /// The limit.
        seconds: u64,
        /// The last lines of its log.
        log: String,
    },
    /// Running a tool failed.
    #[error(transparent)]
    Pg(#[from] PgError),
}

/// A running scratch server; [`ScratchServer::stop`] ends it (dropping it kills it).
#[derive(Debug)]
pub(crate) struct ScratchServer {
    child: Child,
    pgdata: PathBuf,
    log: PathBuf,
    socket_dir: PathBuf,
    major: u32,
    /// The bootstrap superuser, once [`Self::ready`] found it.
    superuser: String,
}

impl Postgres {
    /// A server tool of PostgreSQL `major`: from `--pg-bin-dir` when given, else Debian's
    /// per-major directory when it holds it, else from PATH.
    fn server_tool(&self, tool: &str, major: u32) -> PathBuf {
        if let Some(dir) = &self.bin_dir {
            return dir.join(tool);
        }
        let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin/{tool}"));
        if debian.exists() {
            return debian;
        }
        PathBuf::from(tool)
    }

    /// The role the agent logs in as: the URL's user, else `PGUSER`, else (as libpq does) the
    /// operating-system user.
    fn login_user(&self) -> String {
        if !self.url.username().is_empty() {
            return super::percent_decode(self.url.username());
        }
        if let Ok(user) = std::env::var("PGUSER")
            && !user.is_empty()
        {
            return user;
        }
        nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "postgres".into())
    }

    /// A client of a scratch server: its socket directory, as `user`, with this agent's tools.
    fn scratch_client(&self, socket_dir: &Path, user: &str) -> Postgres {
        // libpq decodes %XX in a URI but not `+`, so every value is percent-encoded byte by byte.
        let mut url = url::Url::parse("postgresql:///postgres").expect("a constant URL parses");
        url.set_query(Some(&format!(
            "host={}&port={SOCKET_PORT}&user={}&options={}",
            uri_encode(&socket_dir.display().to_string()),
            uri_encode(user),
            uri_encode(SESSION_OPTIONS)
        )));
        Postgres {
            url,
            replication_url: None,
            replication_password: None,
            bin_dir: self.bin_dir.clone(),
        }
    }
}

impl ScratchServer {
    /// Makes a fresh data directory `dir/pgdata` with `initdb` of PostgreSQL `major` (as
    /// `run_as` when the agent is root) and starts a server on it, for a logical drill.
    pub(crate) async fn init(
        source: &Postgres,
        dir: &Path,
        run_as: Option<(u32, u32)>,
        major: u32,
    ) -> Result<Self, ScratchError> {
        let pgdata = dir.join("pgdata");
        let binary = source.server_tool("initdb", major);
        let mut cmd = Command::new(&binary);
        super::scrub_env(&mut cmd, super::Child::ScratchServer);
        cmd.arg("-D")
            .arg(&pgdata)
            // The agent's own role name, so the start-up probe finds it as in a restored copy.
            .arg(format!("--username={}", source.login_user()))
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd.output().await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ScratchError::Unusable(format!(
                    "logical drills restore into a scratch PostgreSQL {major} server, and initdb is not at {}: install the PostgreSQL {major} server package in the agent image, or point --pg-bin-dir at its binaries",
                    binary.display()
                ))
            } else {
                PgError::Io {
                    tool: "initdb",
                    source,
                }
                .into()
            }
        })?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(LOG_TAIL_LINES).collect();
            return Err(PgError::ToolFailed {
                tool: "initdb",
                status: out.status.to_string(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            }
            .into());
        }
        Self::start(source, &pgdata, dir, run_as, None).await
    }

    /// Starts a server on `pgdata` with its socket, configuration, log and authentication file
    /// in `dir`, as `run_as` when the agent is root (PostgreSQL refuses to run as root). With
    /// `restore_command`, it recovers (a physical restore laid `pgdata` down) to the end of the
    /// archive and promotes.
    pub(crate) async fn start(
        source: &Postgres,
        pgdata: &Path,
        dir: &Path,
        run_as: Option<(u32, u32)>,
        restore_command: Option<&str>,
    ) -> Result<Self, ScratchError> {
        let socket = dir.join(format!(".s.PGSQL.{SOCKET_PORT}"));
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(ScratchError::Unusable(format!(
                "the drill directory {} is too deep for a Unix socket path (at most {MAX_SOCKET_PATH} bytes with the socket's name); give --drill-dir a shorter path",
                dir.parent().unwrap_or(dir).display()
            )));
        }
        let major = data_major(pgdata).await?;
        let binary = server_binary(source, major).await?;
        let files = ScratchFiles::write(pgdata, dir, run_as, restore_command)?;
        replace_restored_files(pgdata, restore_command.is_some(), run_as).await?;
        let err_file = files
            .log_file
            .try_clone()
            .map_err(scratch_io(dir, "opening the server log"))?;

        let mut cmd = Command::new(&binary);
        super::scrub_env(&mut cmd, super::Child::ScratchServer);
        cmd.arg("-D").arg(pgdata);
        cmd.arg("-c")
            .arg(format!("config_file={}", files.conf.display()));
        for (name, value) in files.settings() {
            cmd.arg("-c").arg(format!("{name}={value}"));
        }
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(files.log_file))
            .stderr(Stdio::from(err_file))
            // Out of the agent's process group: a Ctrl-C meant for the agent reaches the server
            // only through the drill's own clean-up, in order.
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().map_err(|source| PgError::Io {
            tool: "postgres",
            source,
        })?;
        let log = files.log;
        Ok(Self {
            child,
            pgdata: pgdata.to_path_buf(),
            log,
            socket_dir: dir.to_path_buf(),
            major,
            superuser: String::new(),
        })
    }

    /// Waits until recovery has ended and the server accepts connections (it writes "ready"
    /// into postmaster.pid, as `pg_ctl -w` reads it), then returns a client logged in as its
    /// bootstrap superuser (the role with OID 10, whatever its name).
    pub(crate) async fn ready(
        &mut self,
        source: &Postgres,
        home: &str,
        limit: Duration,
    ) -> Result<Postgres, ScratchError> {
        let started = Instant::now();
        let pid_file = self.pgdata.join("postmaster.pid");
        loop {
            if let Some(status) = self.child.try_wait().map_err(|source| PgError::Io {
                tool: "postgres",
                source,
            })? {
                return Err(ScratchError::Exited {
                    status: status.to_string(),
                    log: self.log_tail().await,
                });
            }
            if let Ok(text) = tokio::fs::read_to_string(&pid_file).await
                && text.lines().nth(7).map(str::trim) == Some("ready")
            {
                break;
            }
            if started.elapsed() > limit {
                return Err(ScratchError::TooSlow {
                    seconds: limit.as_secs(),
                    log: self.log_tail().await,
                });
            }
            tokio::time::sleep(POLL).await;
        }
        let probe = source.scratch_client(&self.socket_dir, &source.login_user());
        let superuser = probe
            .query(
                home,
                "select rolname from pg_catalog.pg_roles where oid = 10",
            )
            .await?;
        let superuser = superuser.trim();
        if superuser.is_empty() || superuser.contains('\n') {
            return Err(ScratchError::Unusable(format!(
                "the scratch server named no bootstrap superuser (got {superuser:?})"
            )));
        }
        self.superuser = superuser.to_string();
        Ok(source.scratch_client(&self.socket_dir, superuser))
    }

    /// The last lines of the server's log.
    pub(crate) async fn log_tail(&self) -> String {
        log_tail(&self.log).await
    }

    /// Fast shutdown (SIGINT: sessions end, no checkpoint wait), killed when it takes longer
    /// than [`STOP_GRACE`]; always reaped.
    pub(crate) async fn stop(mut self) {
        use nix::sys::signal::{Signal, kill};
        if let Some(pid) = self.child.id() {
            let _ = kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGINT);
            if tokio::time::timeout(STOP_GRACE, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
            tracing::warn!(
                pid,
                "the drill's scratch server did not stop in time; killing it"
            );
        }
        let _ = self.child.kill().await;
    }
}

/// The `postgres` binary for a data directory of PostgreSQL `major`: refused when it is missing
/// or of another major version.
async fn server_binary(source: &Postgres, major: u32) -> Result<PathBuf, ScratchError> {
    let binary = source.server_tool("postgres", major);
    let (tool_major, tool_version) = source
        .tool_version_at("postgres", &binary)
        .await
        .map_err(|e| match e {
            PgError::ToolMissing { path, .. } => ScratchError::Unusable(format!(
                "drills run a scratch PostgreSQL {major} server, and its binary is not at {path}: install the PostgreSQL {major} server package in the agent image, or point --pg-bin-dir at its binaries"
            )),
            other => other.into(),
        })?;
    if tool_major != major {
        return Err(ScratchError::Unusable(format!(
            "the data directory is PostgreSQL {major}'s, but the server binary at {} is {tool_version}; point --pg-bin-dir at PostgreSQL {major}'s binaries",
            binary.display()
        )));
    }
    Ok(binary)
}

fn scratch_io(dir: &Path, action: &'static str) -> impl FnOnce(std::io::Error) -> ScratchError {
    let dir = dir.to_path_buf();
    move |source| ScratchError::Io {
        action,
        dir,
        source,
    }
}

/// Percent-encodes everything but unreserved characters and `/`.
fn uri_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refuses_a_data_directory_of_no_known_version() {
        let dir = tempfile::tempdir().unwrap();
        tokio::fs::write(dir.path().join("PG_VERSION"), "15\n")
            .await
            .unwrap();
        assert_eq!(data_major(dir.path()).await.unwrap(), 15);
        tokio::fs::write(dir.path().join("PG_VERSION"), "15; rm -rf /")
            .await
            .unwrap();
        let err = data_major(dir.path()).await.unwrap_err().to_string();
        assert!(err.contains("not a PostgreSQL major version"), "{err}");
    }

    #[test]
    fn scratch_clients_reach_the_socket_directory_only() {
        let pg = Postgres::new("postgresql://soma@db.example:5432/appdb", None).unwrap();
        let client = pg.scratch_client(Path::new("/var/lib/soma drill/x"), "postgres");
        let url = client.url_for("app&db");
        assert_eq!(
            url,
            format!(
                "postgresql:///app&db?host=/var/lib/soma%20drill/x&port=5432&user=postgres&options={}",
                "-c%20session_preload_libraries%3D%20-c%20local_preload_libraries%3D%20-c%20jit%3Doff%20-c%20search_path%3Dpg_catalog%20-c%20default_transaction_read_only%3Doff%20-c%20statement_timeout%3D0%20-c%20lock_timeout%3D0%20-c%20idle_in_transaction_session_timeout%3D0"
            )
        );
        // Every session blanks the libraries a role or database could preload.
        assert!(url.contains("session_preload_libraries%3D%20"), "{url}");
        assert!(!url.contains("db.example"));
    }
}
