//! Proves that agents sharing a production store leave each other alone (issue 11, point 5), with
//! the real binaries, a real PostgreSQL 15 and the real stores (Garage S3, and a local directory):
//! - a production agent (owner "prod") is in the middle of a backup, its multipart upload open:
//!   a drill agent started on the same store with `--owner-id drill` does not abort it at
//!   start-up, and the production backup then completes and verifies;
//! - an agent with `--restore-from` = the production store and its own `--store` lists, verifies
//!   and restores the production backup, and its own backup lands in its own store, while every
//!   object (and upload) under the production prefix stays byte-for-byte the same set;
//! - `--store-read-only`: backup and delete are refused with the read-only message and write
//!   nothing, no sweep runs, and `--wal-stream` with it is refused at start-up;
//! - the production agent killed mid-backup and restarted with its own owner id still sweeps its
//!   leftover upload and the rest of the unfinished backup.
//!
//! The production backup is held open without sleeps: a session holds an ACCESS EXCLUSIVE lock on
//! the table, so pg_dump waits on it (seen in pg_locks) after the agent has opened the upload.

use std::io::Write;
use std::process::{Child, ChildStdin, Stdio};
use std::time::Duration;

use soma_tests::store::S3_PREFIX;
use soma_tests::{Agent, PgCluster, TestStore, assert_same_database, listed_ids, poll_until, soma};

/// How long setting up a lock or opening an upload may take.
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn agents_sharing_a_store_leave_each_other_alone_s3_store_on_garage() {
    agents_sharing_a_store_leave_each_other_alone(&TestStore::garage());
}

#[test]
fn agents_sharing_a_store_leave_each_other_alone_local_store() {
    agents_sharing_a_store_leave_each_other_alone(&TestStore::local());
}

fn agents_sharing_a_store_leave_each_other_alone(store: &TestStore) {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table t (id int primary key, note text);
         insert into t select g, 'row ' || g from generate_series(1, 5000) g;",
    );
    let prod_args = ["--owner-id", "prod"];
    let mut prod = Agent::start(&store.url(), &pg.url("appdb"), &prod_args, &store.env());

    // (1) Production's backup is in flight: upload open, pg_dump waiting on the lock.
    let lock = TableLock::take(&pg, "appdb", "t");
    let backup = soma_tests::soma_spawn(
        prod.addr(),
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    let in_flight = wait_upload_open(store, &pg, "production's backup");
    let drill = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--owner-id", "drill"],
        &store.env(),
    );
    // The sweep runs before the agent listens: it is over now.
    assert_eq!(
        store.pending_uploads(),
        in_flight,
        "the drill agent's start-up sweep touched production's upload in flight"
    );
    assert!(
        drill.logs().contains("another owner"),
        "the drill agent does not say why it left the upload:\n{}",
        drill.logs()
    );
    drop(drill);
    lock.release();
    let out = backup.wait();
    out.assert_success("production's backup, which the drill agent started beside");
    let id = out.json()["id"]
        .as_str()
        .unwrap_or_else(|| panic!("the backup printed no id:\n{out}"))
        .to_owned();
    soma(prod.addr(), &["verify", &id]).assert_success("verify production's backup");
    assert_eq!(
        store.read(&format!("backups/{id}/owner")),
        b"prod",
        "the backup records its owner"
    );
    assert!(
        store.pending_uploads().is_empty(),
        "{:?}",
        store.pending_uploads()
    );

    // (2) A drill agent restores from production's store and backs up into its own.
    let before = Snapshot::of(store);
    let own = OwnStore::beside(store);
    let drill = Agent::start(
        &own.url,
        &pg.url("appdb"),
        &["--owner-id", "drill", "--restore-from", &store.url()],
        &store.env(),
    );
    assert_eq!(
        listed_ids(drill.addr()),
        vec![id.clone()],
        "drill lists production's backups"
    );
    let status = soma(drill.addr(), &["-o", "json", "status"]);
    status.assert_success("status of the drill agent");
    assert_eq!(
        status.json()[0]["restore_from"].as_str(),
        Some(store.url().as_str()),
        "status names the read-only source:\n{status}"
    );
    soma(drill.addr(), &["verify", &id]).assert_success("verify from --restore-from");
    soma(drill.addr(), &["restore", &id, "--database", "appdb_drill"])
        .assert_success("restore from --restore-from");
    assert_same_database(&pg, "appdb", "appdb_drill");
    let out = soma(
        drill.addr(),
        &[
            "-o",
            "json",
            "backup",
            "postgres",
            "--database",
            "appdb_drill",
        ],
    );
    out.assert_success("the drill agent's own backup");
    let drill_id = out.json()["id"].as_str().expect("backup id").to_owned();
    assert_eq!(
        own.manifests(store),
        vec![format!("backups/{drill_id}/manifest.json")],
        "the drill agent's backup is not in its own store"
    );
    drop(drill);
    assert_eq!(
        Snapshot::of(store),
        before,
        "the agent with --restore-from changed production's store"
    );

    // (4, first half) Production is killed mid-backup: its upload and owner marker stay behind.
    let lock = TableLock::take(&pg, "appdb", "t");
    let killed =
        soma_tests::soma_spawn(prod.addr(), &["backup", "postgres", "--database", "appdb"]);
    let left = wait_upload_open(store, &pg, "the backup about to be killed");
    prod.kill_9();
    killed
        .wait()
        .assert_code(1, "the backup whose agent was killed");
    let markers: Vec<String> = store
        .list("backups/")
        .into_iter()
        .filter(|k| k.ends_with("/owner") && !k.contains(&id))
        .collect();
    assert_eq!(
        markers.len(),
        1,
        "one unfinished backup's marker: {markers:?}"
    );
    assert_eq!(store.read(&markers[0]), b"prod");

    // (3) A read-only agent, even with production's owner id: no sweep, no writes.
    let before = Snapshot::of(store);
    let ro_args = ["--owner-id", "prod", "--store-read-only"];
    let ro = Agent::start(&store.url(), &pg.url("appdb"), &ro_args, &store.env());
    assert_eq!(store.pending_uploads(), left, "a read-only agent swept");
    assert_eq!(
        listed_ids(ro.addr()),
        vec![id.clone()],
        "a read-only agent lists"
    );
    soma(ro.addr(), &["backup", "postgres", "--database", "appdb"])
        .assert_code(1, "backup on a read-only store")
        .assert_stderr_contains("this agent's store is read-only (", "backup")
        .assert_stderr_contains("--store-read-only", "backup");
    soma(ro.addr(), &["delete", &id, "--yes"])
        .assert_code(1, "delete on a read-only store")
        .assert_stderr_contains("this agent's store is read-only (", "delete");
    drop(ro);
    assert_eq!(
        Snapshot::of(store),
        before,
        "a read-only agent changed the store"
    );
    let ro_stream = ["--store-read-only", "--wal-stream"];
    match Agent::try_start(&store.url(), &pg.url("appdb"), &ro_stream, &store.env()) {
        Ok(agent) => panic!(
            "--wal-stream with --store-read-only started:\n{}",
            agent.logs()
        ),
        Err(exit) => {
            assert!(!exit.status.success());
            for flag in ["--wal-stream", "--store-read-only"] {
                assert!(exit.output.contains(flag), "no {flag} in:\n{}", exit.output);
            }
        }
    }

    // (4, second half) Production restarts with its own owner id and sweeps its leftovers.
    lock.release();
    let prod = Agent::start(&store.url(), &pg.url("appdb"), &prod_args, &store.env());
    assert_eq!(
        store.pending_uploads(),
        Vec::<String>::new(),
        "production did not sweep its own upload (before: {left:?})"
    );
    assert_eq!(
        store.list(markers[0].trim_end_matches("owner")),
        Vec::<String>::new(),
        "the unfinished backup's marker is left"
    );
    assert_eq!(listed_ids(prod.addr()), vec![id]);
}

/// Waits until an upload is open in `store` while pg_dump waits on a lock, and returns the
/// pending uploads then.
fn wait_upload_open(store: &TestStore, pg: &PgCluster, what: &str) -> Vec<String> {
    poll_until(
        WAIT,
        &format!("{what}: an open upload, pg_dump waiting"),
        || {
            let waiting = pg.psql(
                "appdb",
                "select count(*) from pg_locks where not granted and relation = 't'::regclass",
            );
            let pending = store.pending_uploads();
            (waiting != "0" && !pending.is_empty()).then_some(pending)
        },
    )
}

/// A session holding ACCESS EXCLUSIVE on a table until released (or dropped).
struct TableLock {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl TableLock {
    fn take(pg: &PgCluster, db: &str, table: &str) -> TableLock {
        let mut child = pg
            .client_command("/usr/bin/psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start psql");
        let mut stdin = child.stdin.take().expect("psql stdin");
        writeln!(stdin, "begin; lock table {table} in access exclusive mode;").unwrap();
        stdin.flush().unwrap();
        let sql = format!(
            "select count(*) from pg_locks where granted and mode = 'AccessExclusiveLock' \
             and relation = '{table}'::regclass"
        );
        poll_until(WAIT, "the table lock", || {
            (pg.psql(db, &sql) == "1").then_some(())
        });
        TableLock {
            child,
            stdin: Some(stdin),
        }
    }

    fn release(mut self) {
        let mut stdin = self.stdin.take().expect("stdin");
        writeln!(stdin, "commit;").unwrap();
        drop(stdin);
        let status = self.child.wait().expect("psql");
        assert!(status.success(), "the lock session failed: {status}");
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

/// Every object under a store (key and size) and every pending upload: what "unchanged" means.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    objects: Vec<(String, u64)>,
    uploads: Vec<String>,
}

impl Snapshot {
    fn of(store: &TestStore) -> Snapshot {
        let mut objects = match store.local_root() {
            Some(root) => {
                let mut out = Vec::new();
                walk(root, root, &mut out);
                out
            }
            None => {
                let garage = store.garage_server().expect("an S3 store");
                s3_objects(garage, &format!("{S3_PREFIX}/"))
            }
        };
        objects.sort();
        let mut uploads = store.pending_uploads();
        uploads.sort();
        Snapshot { objects, uploads }
    }
}

fn walk(root: &std::path::Path, dir: &std::path::Path, out: &mut Vec<(String, u64)>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.is_dir() {
            walk(root, &entry.path(), out);
        } else {
            let rel = entry
                .path()
                .strip_prefix(root)
                .unwrap()
                .display()
                .to_string();
            out.push((rel, meta.len()));
        }
    }
}

fn s3_objects(garage: &soma_tests::Garage, prefix: &str) -> Vec<(String, u64)> {
    let client = garage.s3_client();
    garage.block_on(async {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let resp = client
                .list_objects_v2()
                .bucket(garage.bucket())
                .prefix(prefix)
                .set_continuation_token(token)
                .send()
                .await
                .expect("ListObjectsV2");
            for o in resp.contents() {
                out.push((
                    o.key().unwrap_or_default().to_owned(),
                    u64::try_from(o.size().unwrap_or_default()).unwrap_or_default(),
                ));
            }
            if resp.is_truncated() != Some(true) {
                break;
            }
            token = resp.next_continuation_token().map(str::to_owned);
        }
        out
    })
}

/// The drill agent's own store: another prefix of the same bucket on S3, another directory for a
/// local store.
struct OwnStore {
    url: String,
    dir: Option<tempfile::TempDir>,
}

const OWN_PREFIX: &str = "drill/prefix";

impl OwnStore {
    fn beside(store: &TestStore) -> OwnStore {
        match store.garage_server() {
            Some(garage) => OwnStore {
                url: format!("s3://{}/{OWN_PREFIX}", garage.bucket()),
                dir: None,
            },
            None => {
                let dir = tempfile::tempdir().unwrap();
                OwnStore {
                    url: format!("file://{}", dir.path().display()),
                    dir: Some(dir),
                }
            }
        }
    }

    /// Manifests in this store, relative to its root.
    fn manifests(&self, store: &TestStore) -> Vec<String> {
        let keys: Vec<String> = match &self.dir {
            Some(dir) => {
                let mut out = Vec::new();
                walk(dir.path(), dir.path(), &mut out);
                out.into_iter().map(|(k, _)| k).collect()
            }
            None => {
                let garage = store.garage_server().expect("an S3 store");
                s3_objects(garage, &format!("{OWN_PREFIX}/"))
                    .into_iter()
                    .map(|(k, _)| k.trim_start_matches(&format!("{OWN_PREFIX}/")).to_owned())
                    .collect()
            }
        };
        let mut m: Vec<String> = keys
            .into_iter()
            .filter(|k| k.ends_with("/manifest.json"))
            .collect();
        m.sort();
        m
    }
}
