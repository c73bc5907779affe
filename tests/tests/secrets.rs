//! The agent's secrets stay in the agent. Started with planted store credentials (`AWS_*`), an
//! API token file, a Qdrant API key and a replication password in its environment, the real
//! `soma-agent` takes a logical backup of real PostgreSQL while the test holds a lock that makes
//! `pg_dump` wait; meanwhile every process the agent started is inspected through `/proc`:
//! none inherited a planted secret or any `AWS_*` / `SOMA_*` variable, while `pg_dump` kept
//! libpq's `PGPASSWORD` (how the tools authenticate). No planted secret appears in any process's
//! command line (what `ps` shows), in the agent's logs, in what the plugin printed for the backup
//! and for a failed one, or in any file of the store. The one exception, a drill's scratch
//! server, keeps the store's credentials its restore_command needs, and nothing else.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use soma_tests::{Agent, PgCluster, TestStore, poll_until, random_hex, soma, soma_spawn};

/// How long the agent may take to start pg_dump once the backup was asked for.
const CHILD_DEADLINE: Duration = Duration::from_secs(120);

/// One process as `/proc` shows it.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    comm: String,
}

/// Every process visible in `/proc` (those that exit while they are read are skipped).
fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid …": comm may hold spaces and parentheses, so split at the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            out.push(Proc { pid, ppid, comm });
        }
    }
    out
}

/// The processes below `root` (children, their children, …).
fn descendants(root: u32) -> Vec<Proc> {
    let all = processes();
    let mut children: HashMap<u32, Vec<&Proc>> = HashMap::new();
    for p in &all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut found = Vec::new();
    let mut todo = vec![root];
    while let Some(pid) = todo.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            todo.push(child.pid);
            found.push((*child).clone());
        }
    }
    found
}

/// A process's environment as `NAME=value` entries; `None` once it has exited.
fn environ(pid: u32) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|e| !e.is_empty())
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect(),
    )
}

/// Every process's command line (what `ps` shows), as `pid: arg arg …`.
fn command_lines() -> Vec<String> {
    processes()
        .iter()
        .filter_map(|p| {
            let raw = std::fs::read(format!("/proc/{}/cmdline", p.pid)).ok()?;
            let args: Vec<String> = raw
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(format!("{}: {}", p.pid, args.join(" ")))
        })
        .collect()
}

/// Every regular file under `dir` with its content.
fn files_under(dir: &std::path::Path, out: &mut Vec<(String, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files_under(&path, out),
            Ok(t) if t.is_file() => {
                let bytes = std::fs::read(&path).unwrap_or_default();
                out.push((path.display().to_string(), bytes));
            }
            _ => {}
        }
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A psql session holding `LOCK TABLE … IN ACCESS EXCLUSIVE MODE` in an open transaction, so
/// pg_dump (which takes ACCESS SHARE on every table it dumps) waits for it.
struct TableLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl TableLock {
    fn take(pg: &PgCluster, db: &str, table: &str) -> TableLock {
        let mut child = pg
            .client_command("/usr/bin/psql")
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                db,
                "-f",
                "-",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot run psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        writeln!(
            stdin,
            "begin;\nlock table {table} in access exclusive mode;"
        )
        .and_then(|()| stdin.flush())
        .expect("cannot write to the locking psql session");
        let query = format!(
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation \
             where c.relname = '{table}' and l.mode = 'AccessExclusiveLock' and l.granted"
        );
        poll_until(
            Duration::from_secs(60),
            "the table lock to be granted",
            || (pg.psql(db, &query) == "1").then_some(()),
        );
        TableLock {
            child,
            stdin: Some(stdin),
        }
    }

    /// Rolls the transaction back (the lock goes with it) and waits for psql to exit.
    fn release(mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "rollback;");
        }
        let status = self.child.wait().expect("cannot wait for the locking psql");
        assert!(
            status.success(),
            "the locking psql session failed: {status}"
        );
    }
}

impl Drop for TableLock {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn the_agents_children_inherit_none_of_its_secrets() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table t (id int primary key, note text); \
         insert into t select g, 'row ' || g from generate_series(1, 1000) g;",
    );
    let store = TestStore::local();

    let planted = |what: &str| format!("planted-{what}-{}", random_hex(12));
    let aws_key_id = planted("aws-key-id");
    let aws_secret = planted("aws-secret");
    let aws_session = planted("aws-session-token");
    let token = planted("agent-token");
    let qdrant_key = planted("qdrant-api-key");
    let replication_password = planted("replication-password");
    // libpq's password must reach pg_dump (trust authentication ignores it here), and nothing
    // else: it is a secret too.
    let pg_password = planted("pgpassword");
    let secrets = [
        &aws_key_id,
        &aws_secret,
        &aws_session,
        &token,
        &qdrant_key,
        &replication_password,
    ];

    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let token_arg = token_file.display().to_string();
    let env: Vec<(String, String)> = [
        ("AWS_ACCESS_KEY_ID", aws_key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", aws_secret.as_str()),
        ("AWS_SESSION_TOKEN", aws_session.as_str()),
        ("AWS_REGION", "garage"),
        ("SOMA_AGENT_TOKEN_FILE", token_arg.as_str()),
        ("SOMA_QDRANT_API_KEY", qdrant_key.as_str()),
        ("SOMA_REPLICATION_PASSWORD", replication_password.as_str()),
        ("PGPASSWORD", pg_password.as_str()),
        // Debug logs carry every line the tools print on stderr: those must be clean too.
        ("SOMA_LOG", "debug"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &env);
    let a = agent.addr();

    // The planting worked: the agent itself holds the secrets.
    let own = environ(agent.pid()).expect("the agent's environment is readable");
    assert!(
        own.iter().any(|e| e.contains(aws_secret.as_str())),
        "the agent was not started with the planted AWS secret"
    );

    let lock = TableLock::take(&pg, "appdb", "t");
    let mut backup = soma_spawn(
        a,
        &[
            "--token-file",
            &token_arg,
            "-o",
            "json",
            "backup",
            "postgres",
            "--database",
            "appdb",
        ],
    );
    // The dump (not the `pg_dump --version` run before it) waits for the lock, so it stays
    // alive while it is looked at.
    let (dump_pid, children) = poll_until(CHILD_DEADLINE, "the agent to start pg_dump", || {
        assert!(
            !backup.has_exited(),
            "the backup ended before pg_dump could be inspected:\n{}\n{}",
            backup.stderr_so_far(),
            agent.logs()
        );
        let found = descendants(agent.pid());
        let dump = found.iter().find(|p| {
            std::fs::read(format!("/proc/{}/cmdline", p.pid))
                .is_ok_and(|c| contains(&c, "--format=custom"))
        })?;
        Some((dump.pid, found))
    });

    let mut pg_dump_env = None;
    let agent_exe = std::fs::read_link(format!("/proc/{}/exe", agent.pid())).ok();
    for p in &children {
        // Forked by a runtime thread and not yet exec'd: until execve replaces it, its memory
        // and environment are the agent's own (its name is still the thread's). What it runs
        // next is looked at when it is the program it became.
        let exe = std::fs::read_link(format!("/proc/{}/exe", p.pid)).ok();
        if exe.is_some() && exe == agent_exe && p.comm != "soma-agent" {
            continue;
        }
        let Some(vars) = environ(p.pid) else {
            continue; // exited meanwhile (a short psql query)
        };
        for var in &vars {
            let name = var.split('=').next().unwrap_or_default();
            assert!(
                !name.to_ascii_uppercase().starts_with("AWS_")
                    && !name.to_ascii_uppercase().starts_with("SOMA_"),
                "{} (pid {}, child of {}) inherited {name}",
                p.comm,
                p.pid,
                p.ppid
            );
            for secret in secrets {
                assert!(
                    !var.contains(secret.as_str()),
                    "{} (pid {}) holds a planted secret in {name}",
                    p.comm,
                    p.pid
                );
            }
        }
        if p.pid == dump_pid {
            pg_dump_env = Some(vars);
        }
    }
    let pg_dump_env = pg_dump_env.expect("pg_dump exited before its environment was read");
    assert!(
        pg_dump_env.contains(&format!("PGPASSWORD={pg_password}")),
        "pg_dump lost libpq's PGPASSWORD: {pg_dump_env:?}"
    );
    assert!(
        pg_dump_env.iter().any(|v| v.starts_with("PATH=")),
        "pg_dump lost PATH: {pg_dump_env:?}"
    );
    // What `ps` shows: no process's command line carries a secret (libpq's included).
    for line in command_lines() {
        for secret in secrets.iter().copied().chain([&pg_password]) {
            assert!(
                !line.contains(secret.as_str()),
                "a command line holds a secret: {line}"
            );
        }
    }

    lock.release();
    let out = backup.wait();
    out.assert_success("backup postgres --database appdb (after the lock was released)");
    let id = out.json()["id"]
        .as_str()
        .expect("the backup's manifest has an id")
        .to_owned();

    // An operation that fails: its error names the database, and nothing secret.
    let failed = soma(
        a,
        &[
            "--token-file",
            &token_arg,
            "backup",
            "postgres",
            "--database",
            "no_such_database",
        ],
    );
    assert_ne!(
        failed.code, 0,
        "a backup of a missing database failed:\n{failed}"
    );
    assert!(
        failed.stderr.contains("no_such_database"),
        "the error names the database:\n{failed}"
    );
    let described = soma(
        a,
        &["--token-file", &token_arg, "describe", &id, "-o", "json"],
    );
    described.assert_success("describe ID -o json");

    let logs = agent.logs();
    let mut stored = Vec::new();
    files_under(store.local_root().expect("a local store"), &mut stored);
    assert!(
        stored
            .iter()
            .any(|(path, _)| path.ends_with("manifest.json")),
        "the store holds the backup's manifest: {:?}",
        stored.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for secret in secrets.iter().copied().chain([&pg_password]) {
        for (what, text) in [
            ("the agent's logs", &logs),
            ("the backup's output", &out.to_string()),
            ("the failed backup's output", &failed.to_string()),
            ("describe's output", &described.to_string()),
        ] {
            assert!(
                !text.contains(secret.as_str()),
                "{what} hold a planted secret:\n{text}"
            );
        }
        for (path, bytes) in &stored {
            assert!(
                !contains(bytes, secret),
                "stored file {path} holds a planted secret"
            );
        }
    }
}

/// No exception for a drill on a real S3 store: its scratch PostgreSQL server gets WAL from the
/// agent over the drill's socket (`soma-agent drill-wal-fetch`), so it keeps none of the agent's
/// environment — no `AWS_*` (the store's keys), no `SOMA_*`, no `PG*` (the real server's
/// password has no place beside a data directory read from the store). The drill passing proves
/// WAL reached it all the same.
#[test]
fn a_drills_scratch_server_holds_no_store_credentials() {
    let pg = PgCluster::start();
    let store = TestStore::garage();
    let spool = tempfile::tempdir().unwrap();
    let drill_dir = PgCluster::server_owned_dir("soma-drill-");
    let (spool_arg, drill_arg) = (
        spool.path().display().to_string(),
        drill_dir.path().display().to_string(),
    );
    let qdrant_key = format!("planted-qdrant-api-key-{}", random_hex(12));
    let replication_password = format!("planted-replication-password-{}", random_hex(12));
    let pg_password = format!("planted-pgpassword-{}", random_hex(12));
    let mut env = store.env();
    env.extend(
        [
            ("SOMA_QDRANT_API_KEY", qdrant_key.as_str()),
            ("SOMA_REPLICATION_PASSWORD", replication_password.as_str()),
            ("PGPASSWORD", pg_password.as_str()),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let aws_secret = env
        .iter()
        .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
        .map(|(_, v)| v.clone())
        .expect("Garage's environment names a secret key");
    let agent = Agent::start(
        &store.url(),
        &pg.url("postgres"),
        &[
            "--wal-stream",
            "--wal-spool",
            &spool_arg,
            "--wal-partial-interval",
            "1s",
            "--drill-dir",
            &drill_arg,
        ],
        &env,
    );
    let a = agent.addr();
    pg.psql(
        "postgres",
        "create table t (id bigserial primary key, payload text not null);
         insert into t (payload) select 'before ' || i from generate_series(1, 100) i;",
    );
    let id = soma_tests::pitr::physical_backup(a);
    pg.psql(
        "postgres",
        "insert into t (payload) select 'after ' || i from generate_series(1, 400) i;
         select pg_switch_wal();",
    );
    soma_tests::pitr::wait_archived(a, &pg);

    let mut drill = soma_spawn(a, &["drill", &id]);
    // The scratch server lives from the start of recovery to the end of the drill's checks.
    let scratch_env = poll_until(CHILD_DEADLINE, "the drill's scratch server", || {
        assert!(
            !drill.has_exited(),
            "the drill ended before its scratch server was seen:\n{}\n{}",
            drill.stderr_so_far(),
            agent.logs()
        );
        descendants(agent.pid()).iter().find_map(|p| {
            let cmdline = std::fs::read(format!("/proc/{}/cmdline", p.pid)).ok()?;
            (p.comm == "postgres" && contains(&cmdline, &drill_arg))
                .then(|| environ(p.pid))
                .flatten()
        })
    });
    let out = drill.wait();
    out.assert_success("drill of a base backup on S3 (WAL over the drill's socket)");

    for var in &scratch_env {
        let name = var.split('=').next().unwrap_or_default();
        assert!(
            !name.starts_with("SOMA_") && !name.starts_with("PG") && !name.starts_with("AWS_"),
            "the scratch server inherited {name}"
        );
        for secret in [
            &qdrant_key,
            &replication_password,
            &pg_password,
            &aws_secret,
        ] {
            assert!(
                !var.contains(secret.as_str()),
                "the scratch server holds a planted secret in {name}"
            );
        }
    }
}
