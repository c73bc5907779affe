//! Proves how the agent behaves around its operations, with the real binaries and a real
//! PostgreSQL 15:
//! - a backup keeps running to completion when the client that started it goes away;
//! - a missing pg_dump, or one older than the server, is refused with what to install;
//! - no more operations run at once than `--max-operations` allows.
//!
//! The "old pg_dump" case uses a test double: a script that answers `--version` exactly as
//! pg_dump 14 does (`pg_dump (PostgreSQL) 14.11`), since only PostgreSQL 15 is installed here. The
//! agent reaches it through `--pg-bin-dir`, the same flag a real deployment uses.

use std::{os::unix::fs::PermissionsExt, time::Duration};

use soma_tests::{Agent, PgCluster, TestStore, fixtures, listed_ids, poll_until, soma};

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

#[test]
fn a_backup_finishes_after_its_client_disconnects() {
    let store = TestStore::local();
    let (_pg, agent, client) = big_backup_in_flight(&store);
    assert!(
        store.manifests().is_empty(),
        "the backup must still be running when its client goes away"
    );
    // Dropping the background command kills it: the client is gone mid-backup.
    drop(client);

    let ids = poll_until(
        Duration::from_secs(300),
        "the backup to complete without its client",
        || {
            let ids = listed_ids(agent.addr());
            (!ids.is_empty()).then_some(ids)
        },
    );
    assert_eq!(ids.len(), 1, "{ids:?}");
    soma(agent.addr(), &["verify", &ids[0]]).assert_success("verify the detached backup");
    assert!(
        store.pending_uploads().is_empty(),
        "nothing may be left half-uploaded: {:?}",
        store.pending_uploads()
    );
}

/// With `--max-operations 1`, a second operation — on another database, so nothing else stands in
/// its way — is refused while the first runs, naming the limit and the running backup, and runs
/// once the first is done.
#[test]
fn no_more_operations_than_the_limit_run_at_once() {
    let store = TestStore::local();
    let (pg, agent, client) = big_backup_in_flight_with(&store, &["--max-operations", "1"]);
    pg.createdb("other");
    let out = soma(agent.addr(), &["backup", "postgres", "--database", "other"]);
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains("--max-operations", "a second operation over the limit");
    out.assert_stderr_contains("backup ", "a second operation over the limit");
    client
        .wait()
        .assert_success("the backup that held the only slot");
    soma(agent.addr(), &["backup", "postgres", "--database", "other"])
        .assert_success("the second operation once the first is done");
}

/// A cluster whose `appdb` holds a 200 MiB table, an agent on `store` with 5 MiB parts, and a
/// backup of `appdb` that has already stored a mebibyte: surely still running.
fn big_backup_in_flight(store: &TestStore) -> (PgCluster, Agent, soma_tests::SomaChild) {
    big_backup_in_flight_with(store, &[])
}

/// [`big_backup_in_flight`] with more agent arguments.
fn big_backup_in_flight_with(
    store: &TestStore,
    extra: &[&str],
) -> (PgCluster, Agent, soma_tests::SomaChild) {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    fixtures::create_big_table(&pg, "appdb", "blob", 200);
    let mut args = vec!["--part-size", "5MiB"];
    args.extend_from_slice(extra);
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &args, &store.env());
    let client = soma_tests::store::backup_in_flight(agent.addr(), store, "appdb");
    (pg, agent, client)
}

fn small_cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table t (id int primary key); insert into t values (1);",
    );
    pg
}

#[test]
fn a_missing_pg_dump_is_reported_with_what_to_install() {
    let pg = small_cluster();
    let store = TestStore::local();
    let empty = tempfile::tempdir().unwrap();
    let bin_dir = empty.path().to_str().unwrap();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--pg-bin-dir", bin_dir],
        &store.env(),
    );
    soma(agent.addr(), &["backup", "postgres"])
        .assert_code(1, "backup without pg_dump")
        .assert_stderr_contains("pg_dump not found", "backup without pg_dump")
        .assert_stderr_contains("--pg-bin-dir", "backup without pg_dump");
    assert!(store.manifests().is_empty());
}

#[test]
fn a_pg_dump_older_than_the_server_is_refused() {
    let pg = small_cluster();
    let store = TestStore::local();
    let bin = tempfile::tempdir().unwrap();
    for tool in ["psql", "pg_restore"] {
        std::os::unix::fs::symlink(format!("{PG_BIN}/{tool}"), bin.path().join(tool)).unwrap();
    }
    let fake = bin.path().join("pg_dump");
    std::fs::write(
        &fake,
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo 'pg_dump (PostgreSQL) 14.11'; exit 0; fi\n\
         echo 'pg_dump: error: aborting because of server version mismatch' >&2; exit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--pg-bin-dir", bin.path().to_str().unwrap()],
        &store.env(),
    );
    soma(agent.addr(), &["backup", "postgres"])
        .assert_code(1, "backup with an old pg_dump")
        .assert_stderr_contains(
            "pg_dump 14.11 is older than the PostgreSQL server",
            "backup with an old pg_dump",
        )
        .assert_stderr_contains("PostgreSQL 15 client tools", "backup with an old pg_dump");
    assert!(store.manifests().is_empty());
    assert!(store.pending_uploads().is_empty());
}

/// A delete of a backup that a restore is reading is refused, naming the restore, and the
/// restore completes. The restore is held mid-way deterministically: it restores with `--clean`
/// into a database where another session holds a lock on a table pg_restore must drop, so it
/// waits (as PostgreSQL makes any DDL wait) until that session commits.
#[test]
fn a_backup_being_restored_cannot_be_deleted() {
    let pg = small_cluster();
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let out = soma(agent.addr(), &["-o", "json", "backup", "postgres"]);
    out.assert_success("backup");
    let id = out.json()["id"].as_str().expect("backup id").to_owned();

    // The target database holds table t, locked by an open transaction.
    pg.createdb("target");
    pg.psql("target", "create table t (id int primary key);");
    let mut blocker = pg
        .client_command("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "target"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let mut blocker_in = blocker.stdin.take().expect("stdin");
    use std::io::Write as _;
    writeln!(blocker_in, "begin; lock table t in access share mode;").unwrap();
    blocker_in.flush().unwrap();
    poll_until(Duration::from_secs(30), "the blocking lock", || {
        let held = pg.psql(
            "target",
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = 't' and l.granted and l.pid <> pg_backend_pid()",
        );
        (held.trim() != "0").then_some(())
    });

    let restore = soma_tests::soma_spawn(
        agent.addr(),
        &["restore", &id, "--database", "target", "--clean"],
    );
    // pg_restore is waiting for the lock: the restore is surely running.
    poll_until(
        Duration::from_secs(60),
        "the restore to wait for the lock",
        || {
            let waiting = pg.psql(
                "postgres",
                "select count(*) from pg_locks where not granted",
            );
            (waiting.trim() != "0").then_some(())
        },
    );

    let deleted = soma(agent.addr(), &["delete", &id, "--yes"]);
    assert_ne!(deleted.code, 0, "the delete must be refused: {deleted}");
    deleted.assert_stderr_contains("restore", "the refusal names the running restore");
    deleted.assert_stderr_contains(&id, "the refusal names the backup");
    assert!(
        listed_ids(agent.addr()).contains(&id),
        "the backup must still exist"
    );

    writeln!(blocker_in, "commit;").unwrap();
    drop(blocker_in);
    blocker.wait().expect("psql exits");
    restore.wait().assert_success("the restore completes");
    assert_eq!(pg.psql("target", "select id from t").trim(), "1");
    // Once the restore is done the backup can be deleted.
    soma(agent.addr(), &["delete", &id, "--yes"]).assert_success("delete after the restore");
}

/// SIGTERM in the middle of a backup to S3 (Garage): the agent stops accepting requests,
/// interrupts the backup, aborts its multipart upload and exits 0; the client is told why; the
/// bucket holds nothing of it — no object, no manifest, no incomplete upload — so nothing looks
/// like a backup and nothing is left for the next start-up to sweep.
#[test]
fn sigterm_interrupts_a_backup_and_leaves_nothing_in_the_bucket() {
    let store = TestStore::garage();
    let (_pg, mut agent, client) = big_backup_in_flight(&store);
    assert!(
        store.manifests().is_empty(),
        "the backup must still be running at the signal"
    );

    let status = agent
        .terminate(Duration::from_secs(60))
        .expect("the agent must stop within a minute of SIGTERM");
    assert!(
        status.success(),
        "the agent must exit 0 on SIGTERM: {status}"
    );
    let out = client.wait();
    assert_ne!(
        out.code, 0,
        "the interrupted backup must not report success: {out}"
    );
    out.assert_stderr_contains("shutting down", "the client is told why");
    assert!(
        store.pending_uploads().is_empty(),
        "the interrupted upload must be aborted: {:?}",
        store.pending_uploads()
    );
    assert!(
        store.list("backups/").is_empty(),
        "nothing of the interrupted backup may remain: {:?}",
        store.list("backups/")
    );
}
