//! Point-in-time recovery helpers: an agent streaming WAL, physical base backups, and restores
//! into fresh data directories with the real `soma-agent restore-pgdata`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Agent, CmdOutput, PgCluster, TestStore, poll_until, soma, util::bin_path};

/// How long a restored server may take to replay and promote.
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(180);

/// Starts an agent beside `pg` that streams WAL to `store` (`--wal-stream`), spooling into
/// `spool`, shipping the segment in progress every `interval` (e.g. "1s").
pub fn wal_agent(
    pg: &PgCluster,
    store: &TestStore,
    spool: &std::path::Path,
    interval: &str,
) -> Agent {
    wal_agent_with(pg, store, spool, interval, &[])
}

/// [`wal_agent`] with `extra` arguments (e.g. `--encryption-key-file`).
pub fn wal_agent_with(
    pg: &PgCluster,
    store: &TestStore,
    spool: &std::path::Path,
    interval: &str,
    extra: &[&str],
) -> Agent {
    wal_agent_env(pg, store, spool, interval, extra, &store.env())
}

/// [`wal_agent_with`] with its environment given (e.g. the store reached through a proxy).
pub fn wal_agent_env(
    pg: &PgCluster,
    store: &TestStore,
    spool: &std::path::Path,
    interval: &str,
    extra: &[&str],
    env: &[(String, String)],
) -> Agent {
    let spool = spool.display().to_string();
    let restore_root = std::env::temp_dir().display().to_string();
    let mut args = vec![
        "--wal-stream",
        "--wal-spool",
        &spool,
        "--wal-partial-interval",
        interval,
        // Physical restores through the API go below the temporary directory, where
        // PgCluster::empty makes its targets.
        "--restore-root",
        &restore_root,
    ];
    args.extend_from_slice(extra);
    Agent::start(&store.url(), &pg.url("postgres"), &args, env)
}

/// Takes a physical base backup through the plugin and returns its id.
pub fn physical_backup(agent_addr: &str) -> String {
    let out = soma(
        agent_addr,
        &["-o", "json", "backup", "postgres", "--physical"],
    );
    out.assert_success("backup postgres --physical");
    out.json()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in the backup's JSON:\n{out}"))
        .to_owned()
}

/// Parses an LSN as PostgreSQL prints it (`0/3000060`).
pub fn lsn(text: &str) -> u64 {
    let (hi, lo) = text
        .trim()
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {text:?}"));
    (u64::from_str_radix(hi, 16).expect("LSN high part") << 32)
        | u64::from_str_radix(lo, 16).expect("LSN low part")
}

/// Formats an LSN as PostgreSQL prints it.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Segment number of a 24-hex-digit segment file name.
pub fn segno_of(file: &str, seg_size: u64) -> u64 {
    assert_eq!(file.len(), 24, "not a WAL segment name: {file}");
    let log = u64::from_str_radix(&file[8..16], 16).expect("log part of a segment name");
    let seg = u64::from_str_radix(&file[16..24], 16).expect("seg part of a segment name");
    log * (0x1_0000_0000 / seg_size) + seg
}

/// PostgreSQL's name of segment `segno` on `timeline`.
pub fn segment_name(timeline: u32, segno: u64, seg_size: u64) -> String {
    let per_log = 0x1_0000_0000 / seg_size;
    format!(
        "{timeline:08X}{:08X}{:08X}",
        segno / per_log,
        segno % per_log
    )
}

/// The agent's WAL archive status (`kubectl soma status -o json`, first row's `wal_archive`).
pub fn wal_status(agent_addr: &str) -> serde_json::Value {
    let out = soma(agent_addr, &["-o", "json", "status"]);
    out.assert_success("status -o json");
    out.json()[0]["wal_archive"].clone()
}

/// Waits until the agent's archive holds every WAL record the server had written when this was
/// called (what `status` reports as the archived position); returns that position.
pub fn wait_archived(agent_addr: &str, pg: &PgCluster) -> u64 {
    let server = lsn(&pg.psql("postgres", "select pg_current_wal_insert_lsn()"));
    poll_until(
        Duration::from_secs(120),
        "the WAL archive to reach the server's position",
        || {
            let status = wal_status(agent_addr);
            let archived = status["archived_lsn"].as_str().filter(|s| !s.is_empty())?;
            (lsn(archived) >= server).then_some(server)
        },
    )
}

/// Runs `soma-agent restore-pgdata --store STORE --pgdata <target's data dir> ARGS...` as the
/// target cluster's owner (as an init container runs as PostgreSQL's user).
pub fn restore_pgdata(target: &PgCluster, store: &TestStore, args: &[&str]) -> CmdOutput {
    let mut cmd = target.owner_command(bin_path("soma-agent"));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("SOMA_") || k.starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    let out = cmd
        .arg("restore-pgdata")
        .arg("--store")
        .arg(store.url())
        .arg("--pgdata")
        .arg(target.data_path())
        .args(args)
        .envs(store.env())
        .output()
        .expect("cannot run soma-agent restore-pgdata");
    CmdOutput::from_output(&out)
}

/// Restores into a fresh cluster directory, starts PostgreSQL there and waits until it promoted;
/// panics with the server log when it does not.
pub fn restore_and_start(store: &TestStore, args: &[&str]) -> PgCluster {
    let mut target = PgCluster::empty();
    let out = restore_pgdata(&target, store, args);
    // Which WAL objects are there (complete or partial) is what explains a refused restore.
    assert!(
        out.code == 0,
        "restore-pgdata {args:?} failed:\n{out}\n--- WAL archive ---\n{:#?}",
        store.list("wal/")
    );
    if let Err(e) = target.start_existing(&store.env()) {
        panic!("the restored server did not start:\n{e}");
    }
    assert!(
        target.wait_promoted_or_stopped(PROMOTE_TIMEOUT),
        "the restored server stopped instead of promoting:\n{}",
        target.log()
    );
    target
}

/// A client committing one row per transaction (`insert into TABLE default values returning …`)
/// as fast as the server acknowledges them, recording every acknowledged row: psql prints a row
/// only after the server reported its transaction committed. Killed on drop.
#[derive(Debug)]
pub struct AckedInserts<T = i64> {
    child: Child,
    acked: Arc<Mutex<Vec<T>>>,
}

impl AckedInserts<i64> {
    /// Starts the client against database `postgres` of `pg`, recording acknowledged ids; `table`
    /// must have a `bigserial` (or otherwise defaulted) `id` and defaults for every other column.
    pub fn start(pg: &PgCluster, table: &str) -> Self {
        Self::start_returning(pg, table, "id", |line| line.trim().parse().ok())
    }
}

impl<T: Clone + Send + 'static> AckedInserts<T> {
    /// Starts the client, recording `parse` of each acknowledged row's `returning` columns (psql
    /// unaligned output: columns separated by `|`).
    pub fn start_returning(
        pg: &PgCluster,
        table: &str,
        returning: &str,
        parse: fn(&str) -> Option<T>,
    ) -> Self {
        let mut child = pg
            .client_command("/usr/bin/psql")
            .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot run psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        let line = format!("insert into {table} default values returning {returning};\n");
        std::thread::spawn(move || {
            // The pipe's backpressure paces the writer; it ends when psql exits.
            for _ in 0..5_000_000 {
                if stdin.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        });
        let acked: Arc<Mutex<Vec<T>>> = Arc::default();
        let sink = acked.clone();
        let stdout = child.stdout.take().expect("psql stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(row) = parse(&line) {
                    sink.lock().expect("acked rows lock").push(row);
                }
            }
        });
        AckedInserts { child, acked }
    }

    /// The rows acknowledged so far, in acknowledgement order.
    pub fn acked(&self) -> Vec<T> {
        self.acked.lock().expect("acked rows lock").clone()
    }

    /// How many rows were acknowledged so far.
    pub fn count(&self) -> usize {
        self.acked.lock().expect("acked rows lock").len()
    }

    /// Waits for psql to exit on its own (after its server went away).
    pub fn wait_exit(&mut self) {
        let _ = self.child.wait();
    }

    /// Stops the client (SIGKILL: an acknowledgement in flight is simply not recorded).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl<T> Drop for AckedInserts<T> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster's system identifier (`pg_control_system()`), which names its WAL archive folder
/// and is written into the first page of every WAL segment.
pub fn system_identifier(pg: &PgCluster) -> u64 {
    pg.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    )
    .parse()
    .expect("system_identifier is a number")
}

/// The cluster's WAL segment size in bytes.
pub fn wal_segment_size(pg: &PgCluster) -> u64 {
    pg.psql(
        "postgres",
        "select setting from pg_settings where name = 'wal_segment_size'",
    )
    .parse()
    .expect("wal_segment_size is a number")
}

/// Completes `n` WAL segments: each round writes a few rows into table `wal_filler` (created if
/// missing) and switches to a new segment. Returns the names of the completed segments, oldest
/// first.
pub fn complete_segments(pg: &PgCluster, n: usize) -> Vec<String> {
    pg.psql(
        "postgres",
        "create table if not exists wal_filler (id bigserial primary key, payload text not null)",
    );
    (0..n)
        .map(|_| {
            pg.psql(
                "postgres",
                "insert into wal_filler (payload) select 'filler ' || i from generate_series(1, 200) i;
                 select pg_walfile_name(pg_switch_wal())",
            )
        })
        .collect()
}

/// Creates pgbench's tables in `db` at `scale` (100 000 accounts each).
pub fn pgbench_init(pg: &PgCluster, db: &str, scale: u32) {
    let out = pg
        .client_command(std::path::Path::new(crate::pg::PG_BIN_DIR).join("pgbench"))
        .args(["-i", "-q", "-s", &scale.to_string(), db])
        .output()
        .expect("cannot run pgbench");
    assert!(
        out.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Inserts `n` rows tagged `tag` into `events(id bigserial, tag text, at timestamptz default
/// clock_timestamp())`, each in its own transaction.
pub fn insert_tagged(pg: &PgCluster, tag: &str, n: usize) {
    let sql = format!("insert into events(tag) values ('{tag}');\n").repeat(n);
    pg.psql("postgres", &sql);
}

/// The server's clock now, as RFC 3339 UTC with microseconds.
pub fn server_time(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        r#"select to_char(clock_timestamp() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#,
    )
}

/// `id|tag|at` (at in UTC) of the rows of `events` matching `filter`, ordered by id.
pub fn tagged_rows(pg: &PgCluster, filter: &str) -> Vec<String> {
    pg.psql(
        "postgres",
        &format!(
            "set timezone = 'UTC';\n\
             select id, tag, at from events {filter} order by id"
        ),
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// The server's timeline, as its control file records it after a checkpoint.
pub fn timeline(pg: &PgCluster) -> u32 {
    let out = pg.psql(
        "postgres",
        "checkpoint;\nselect timeline_id from pg_control_checkpoint()",
    );
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("timeline_id {out:?}: {e}"))
}
