//! Proves that an agent killed with SIGKILL in the middle of a backup (data already uploaded, no
//! chance to clean up) leaves nothing a user could mistake for a backup, and nothing that costs
//! storage for long: the plugin reports the failure (exit 1), the next agent on the same store lists
//! no backups, and before it announces that it listens it has aborted the multipart upload the
//! crash left on S3 (a real Garage server: ListMultipartUploads under the prefix is empty) or
//! removed the partial upload file of the local store; no backup directory has a manifest.

use std::time::Duration;

use soma_tests::store::MIB;
use soma_tests::{Agent, PgCluster, TestStore, fixtures, poll_until, soma, soma_spawn};

/// Enough poorly compressible data that the backup is still running when its first 5 MiB part
/// has been stored (about 100 MB reach the store).
const BIG_TABLE_MB: u64 = 200;

#[test]
fn killed_backup_leaves_no_trace_s3_store_on_garage() {
    killed_backup_leaves_no_trace(&TestStore::garage());
}

#[test]
fn killed_backup_leaves_no_trace_local_store() {
    killed_backup_leaves_no_trace(&TestStore::local());
}

fn killed_backup_leaves_no_trace(store: &TestStore) {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    fixtures::create_big_table(&pg, "appdb", "blob", BIG_TABLE_MB);
    let mut agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--part-size", "5MiB"],
        &store.env(),
    );

    let mut backup = soma_spawn(agent.addr(), &["backup", "postgres", "--database", "appdb"]);
    poll_until(
        Duration::from_secs(180),
        "an unfinished upload holding at least a mebibyte in the store",
        || {
            if store.pending_upload_bytes() >= MIB {
                return Some(());
            }
            assert!(
                !backup.has_exited(),
                "the backup finished before any upload with data was seen; stderr:\n{}",
                backup.stderr_so_far()
            );
            None
        },
    );
    agent.kill_9();

    let out = backup.wait();
    out.assert_code(1, "backup whose agent was killed");
    let left_behind = store.pending_uploads();
    assert!(
        !left_behind.is_empty(),
        "the killed agent left no unfinished upload in the {} store, so this test proves nothing",
        store.kind()
    );

    // Checked before the new agent is asked anything: the sweep runs before it listens.
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    assert_eq!(
        store.pending_uploads(),
        Vec::<String>::new(),
        "the restarted agent left uploads from the crash in place (before restart: {left_behind:?})"
    );
    let out = soma(agent.addr(), &["list", "-o", "json"]);
    out.assert_success("list -o json after the crash");
    assert_eq!(
        out.json(),
        serde_json::json!([]),
        "an interrupted backup is listed:\n{out}"
    );
    assert_eq!(
        store.manifests(),
        Vec::<String>::new(),
        "an interrupted backup has a manifest"
    );
}
