//! Drills of backups whose source superuser planted code, with the real agent and plugin, a real
//! PostgreSQL 15 and a real store. The measured attack (issue 22): a shared library in the data
//! directory named by `ALTER ROLE postgres SET session_preload_libraries`, a `jit_provider` that
//! climbs out of `$libdir` to another one (in `postgresql.auto.conf`, with `jit` switched on by a
//! file the restored `postgresql.conf` includes), and event triggers that shell out on
//! `ddl_command_start` / `sql_drop`, `ENABLE ALWAYS`. What a user relies on:
//! - neither the physical nor the logical drill loads a library or fires a trigger of the backup
//!   (each leaves a marker file when it runs inside a drill's server), and both still pass, with
//!   amcheck run, not skipped;
//! - a logical drill restores into a scratch server of its own: the live server sees no session
//!   on a scratch database;
//! - the scratch server holds no secret: no `AWS_*`, password or token in its environment, no key
//!   file or store location on its command line or in its configuration, and it runs as a user
//!   that can read neither the agent's environment nor its key file.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use soma_tests::{Agent, PgCluster, TestStore, pitr, poll_until, soma, soma_spawn};

/// A library whose loading leaves `marker` when it is loaded by a process whose working
/// directory — a PostgreSQL backend's is its data directory — is a drill's: the live server loads
/// it too (the role's setting applies there), harmlessly. Its magic block is PostgreSQL 15's, so
/// the live server accepts it.
const LIBRARY: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
typedef struct { int len; int version; int funcmaxargs; int indexmaxkeys; int namedatalen;
                 int float8byval; char abi_extra[32]; } Pg_magic_struct;
static const Pg_magic_struct magic = { sizeof(Pg_magic_struct), 1500, 100, 32, 64, 1, "PostgreSQL" };
const Pg_magic_struct *Pg_magic_func(void) { return &magic; }
void _PG_init(void) {}
__attribute__((constructor)) static void loaded(void) {
    char cwd[4096];
    if (getcwd(cwd, sizeof cwd) && strstr(cwd, "soma_drill_")) {
        FILE *f = fopen(MARKER, "a");
        if (f) { fprintf(f, "loaded by %d in %s\n", getpid(), cwd); fclose(f); }
    }
}
"#;

/// Builds [`LIBRARY`] into `out`, writing to `marker` when loaded.
fn build_library(dir: &Path, out: &Path, marker: &Path) {
    let source = dir.join("evil.c");
    std::fs::write(&source, LIBRARY).unwrap();
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(out)
        .arg(format!("-DMARKER=\"{}\"", marker.display()))
        .arg(&source)
        .status()
        .expect("cannot run cc: a C compiler builds the test's planted library");
    assert!(status.success(), "cc failed building {}", out.display());
}

/// Gives `path` to the server's user, as a file the superuser wrote into the data directory.
fn give_to_server(pg: &PgCluster, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(pg.data_path()).unwrap();
    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid())).unwrap();
}

/// The live cluster's superuser plants everything of the attack; each leaves a file in `markers`.
fn plant(pg: &PgCluster, markers: &Path) {
    let data = pg.data_path();
    let build = tempfile::tempdir().unwrap();
    let session = data.join("soma_evil_session.so");
    let jit = data.join("soma_evil_jit.so");
    build_library(
        build.path(),
        &session,
        &markers.join("session_preload_library"),
    );
    build_library(build.path(), &jit, &markers.join("jit_provider"));
    give_to_server(pg, &session);
    give_to_server(pg, &jit);
    // `include` in the restored postgresql.conf: JIT on for every query.
    let included = data.join("soma_evil.conf");
    std::fs::write(
        &included,
        format!(
            "jit = on\njit_above_cost = 0\njit_inline_above_cost = 0\njit_optimize_above_cost = 0\n\
             session_preload_libraries = '{}'\n",
            session.display()
        ),
    )
    .unwrap();
    give_to_server(pg, &included);
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\ninclude = 'soma_evil.conf'\n");
    std::fs::write(&conf, text).unwrap();
    // The provider is `$libdir/<name>.so`: enough `..` reach the root from any $libdir.
    let provider = format!(
        "{}{}",
        "../".repeat(12),
        jit.with_extension("")
            .display()
            .to_string()
            .trim_start_matches('/')
    );
    pg.psql(
        "postgres",
        &format!(
            "alter system set jit_provider = '{provider}';
             alter role postgres set session_preload_libraries = '{}';",
            session.display()
        ),
    );
    for db in ["postgres", "appdb"] {
        pg.psql(
            db,
            &format!(
                "create function soma_evil() returns event_trigger language plpgsql as $f$
                 begin
                   if current_setting('data_directory') like '%soma_drill_%' then
                     copy (select 1) to program 'echo fired >> {}/event_trigger';
                   end if;
                 end $f$;
                 create event trigger soma_evil_start on ddl_command_start execute function soma_evil();
                 create event trigger soma_evil_drop on sql_drop execute function soma_evil();
                 alter event trigger soma_evil_start enable always;
                 alter event trigger soma_evil_drop enable always;",
                markers.display()
            ),
        );
    }
}

fn markers_left(markers: &Path) -> Vec<(String, String)> {
    std::fs::read_dir(markers)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_to_string(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

fn checks(report: &Value) -> Vec<Value> {
    report["checks"].as_array().cloned().unwrap_or_default()
}

/// The measured attack, drilled physically and logically: nothing of it runs, both pass.
#[test]
fn drills_run_nothing_the_backup_carries() {
    let pg = PgCluster::start_with("-c log_connections=on");
    let store = TestStore::local();
    let spool = tempfile::tempdir().unwrap();
    let drill_dir = PgCluster::server_owned_dir("soma-drill-");
    let markers = PgCluster::server_owned_dir("soma-markers-");
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table orders (id bigint primary key, item text not null);
         insert into orders select i, 'item ' || i from generate_series(1, 500) i;",
    );
    plant(&pg, markers.path());
    pg.psql(
        "postgres",
        "create table t (id bigint primary key); insert into t select generate_series(1, 300);",
    );
    // Live sessions load the library (the role's setting applies there too), but leave no marker.
    assert!(
        markers_left(markers.path()).is_empty(),
        "{:?}",
        markers_left(markers.path())
    );
    let drill = drill_dir.path().display().to_string();
    let agent = pitr::wal_agent_with(&pg, &store, spool.path(), "1s", &["--drill-dir", &drill]);
    let a = agent.addr();
    let physical = pitr::physical_backup(a);
    pg.psql(
        "postgres",
        "insert into t select generate_series(301, 400); select pg_switch_wal();",
    );
    pitr::wait_archived(a, &pg);
    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("logical backup of appdb");
    let logical = out.json()["id"].as_str().unwrap().to_owned();

    let out = soma(a, &["-o", "json", "drill", &physical]);
    out.assert_success("physical drill of the planted backup");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    let all = checks(&report);
    let amcheck = all
        .iter()
        .find(|c| c["name"] == "amcheck")
        .unwrap_or_else(|| panic!("no amcheck check: {report}"));
    assert_eq!(amcheck["passed"], true, "{report}");
    assert_ne!(amcheck["skipped"], true, "amcheck was skipped: {report}");
    let rows = all
        .iter()
        .find(|c| c["name"] == "postgres: rows of public.t")
        .unwrap_or_else(|| panic!("no row count of public.t: {report}"));
    assert_eq!(rows["found"], "400", "{report}");
    let left = markers_left(markers.path());
    assert!(
        left.is_empty(),
        "the physical drill ran code the backup carries: {left:?}"
    );

    let out = soma(a, &["-o", "json", "drill", &logical]);
    out.assert_success("logical drill of the planted database");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    assert!(
        checks(&report)
            .iter()
            .any(|c| c["name"] == "rows of public.orders" && c["found"] == "500"),
        "{report}"
    );
    let left = markers_left(markers.path());
    assert!(
        left.is_empty(),
        "the logical drill ran code the backup carries: {left:?}"
    );
    // Restored into a server of its own: the live server never saw a scratch database.
    let log = pg.log();
    assert!(
        !log.contains("database=soma_drill_"),
        "the logical drill connected to a scratch database on the live server:\n{log}"
    );
    let scratch = report["scratch"].to_string();
    assert!(scratch.contains("directory"), "{report}");
    let left: Vec<_> = std::fs::read_dir(drill_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "the drills left {left:?}");
}

/// The scratch server of a physical drill, looked at while it runs: no secret in reach.
#[test]
fn the_scratch_server_holds_no_secret() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let spool = tempfile::tempdir().unwrap();
    let drill_dir = PgCluster::server_owned_dir("soma-drill-");
    // The agent's key, readable by the agent alone (a tempdir is mode 0700).
    use std::os::unix::fs::PermissionsExt;
    let keys = tempfile::tempdir().unwrap();
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let key = keys.path().join("store.key");
    std::fs::write(
        &key,
        (0..32).map(|_| rand::random::<u8>()).collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key_arg = key.display().to_string();
    let drill = drill_dir.path().display().to_string();
    let canary = format!("canary{}", soma_tests::random_hex(8));
    let mut env = store.env();
    for name in [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "PGPASSWORD",
        "DB_PASSWORD",
    ] {
        env.push((name.into(), canary.clone()));
    }
    let spool_arg = spool.path().display().to_string();
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
            &drill,
            "--encryption-key-file",
            &key_arg,
        ],
        &env,
    );
    let a = agent.addr();
    pg.psql(
        "postgres",
        "create table t (id bigint primary key); insert into t select generate_series(1, 100);",
    );
    let id = pitr::physical_backup(a);
    for round in 0..3 {
        pg.psql(
            "postgres",
            &format!(
                "insert into t select generate_series({}, {}); select pg_switch_wal();",
                10_000 * (round + 1),
                10_000 * (round + 1) + 2000
            ),
        );
    }
    pitr::wait_archived(a, &pg);

    let drilling = soma_spawn(a, &["-o", "json", "drill", &id]);
    let pgdata: PathBuf = poll_until(Duration::from_secs(120), "the scratch server", || {
        std::fs::read_dir(drill_dir.path())
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path().join("pgdata"))
            .find(|p| p.join("postmaster.pid").exists())
    });
    let pid: u32 = poll_until(Duration::from_secs(60), "the postmaster's pid", || {
        std::fs::read_to_string(pgdata.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    });
    let environ =
        std::fs::read(format!("/proc/{pid}/environ")).expect("the postmaster's environment");
    let cmdline =
        std::fs::read(format!("/proc/{pid}/cmdline")).expect("the postmaster's arguments");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let root = pgdata.parent().unwrap();
    let mut config = String::new();
    for file in [
        root.join("scratch.conf"),
        pgdata.join("postgresql.auto.conf"),
    ] {
        config.push_str(&std::fs::read_to_string(&file).unwrap_or_default());
    }
    let out = drilling.wait();
    out.assert_success("physical drill");
    assert_eq!(out.json()["passed"], true, "{out}");

    let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
    for (what, text) in [
        ("environment", environ.as_str()),
        (
            "command line",
            &String::from_utf8_lossy(&cmdline).replace('\0', " "),
        ),
        ("configuration", config.as_str()),
    ] {
        for secret in [
            canary.as_str(),
            "AWS_",
            "PGPASSWORD",
            "SOMA_",
            &key_arg,
            "--restore-from",
            "--encryption-key-file",
        ] {
            assert!(
                !text.contains(secret),
                "the scratch server's {what} holds {secret:?}:\n{text}"
            );
        }
    }
    // It runs as another user than the agent, which can read neither the agent's environment nor
    // its key.
    let id_of = |field: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in the postmaster's status"))
    };
    let (uid, gid) = (id_of("Uid:"), id_of("Gid:"));
    assert_ne!(
        uid,
        nix::unistd::geteuid().as_raw(),
        "the scratch server runs as the agent's user"
    );
    for secret in [format!("/proc/{}/environ", agent.pid()), key_arg.clone()] {
        let read = std::process::Command::new("cat")
            .arg(&secret)
            .uid(uid)
            .gid(gid)
            .output()
            .unwrap();
        assert!(
            !read.status.success(),
            "the scratch server's user can read {secret}"
        );
    }
}
