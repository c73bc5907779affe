//! Proves the harness itself works, independently of the agent and plugin: a throwaway
//! PostgreSQL 15 starts (as the unprivileged `postgres` user when we are root) and answers
//! queries, the varied fixture database loads and compares equal to itself, and a throwaway
//! Garage accepts authenticated S3 calls (HeadBucket, put/get, listing) and rejects a wrong secret.

use soma_tests::{DbFingerprint, Garage, PgCluster, TestStore, fixtures};

#[test]
fn postgres_cluster_starts_and_answers() {
    let pg = PgCluster::start();
    assert_eq!(pg.psql("postgres", "select 1 + 1"), "2");
    assert!(
        pg.psql("postgres", "show server_version")
            .starts_with("15."),
        "expected PostgreSQL 15"
    );
    if nix::unistd::geteuid().is_root() {
        // The server must not run as root: the data directory belongs to `postgres`.
        let data_dir = pg.psql("postgres", "show data_directory");
        let uid = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(&data_dir).expect("stat data directory"),
        );
        let postgres = nix::unistd::User::from_name("postgres")
            .expect("lookup")
            .expect("postgres user");
        assert_eq!(uid, postgres.uid.as_raw());
    }
    pg.createdb("other");
    assert!(pg.database_exists("other"));
    assert!(!pg.database_exists("missing"));
    let err = pg
        .try_psql("other", "select * from no_such_table")
        .unwrap_err();
    assert!(err.contains("no_such_table"), "{err}");
}

#[test]
fn varied_fixture_loads_and_fingerprints_deterministically() {
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let a = DbFingerprint::of(&pg, "appdb");
    let b = DbFingerprint::of(&pg, "appdb");
    assert_eq!(a, b);
    assert!(a.relations.len() >= 10, "{:?}", a.relations.keys());
    assert!(
        a.relations.values().all(|v| !v.starts_with("0 ")),
        "every fixture table has rows: {:?}",
        a.relations
    );
    assert_eq!(a.large_objects.len(), 2);
    assert_eq!(a.sequences["inventory.countdown"], "-42");
    assert!(a.schema.contains("CREATE MATERIALIZED VIEW sales.monthly"));
}

#[test]
fn garage_serves_authenticated_s3() {
    let garage = Garage::start();
    garage.head_bucket().expect("HeadBucket");
    garage.put_object("a/b/c.txt", b"hello".to_vec());
    assert_eq!(garage.get_object("a/b/c.txt"), b"hello");
    assert_eq!(garage.list_keys("a/"), vec!["a/b/c.txt".to_owned()]);
    assert!(garage.multipart_uploads("a/").is_empty());

    // Through the store view, with the agent's prefix.
    let store = TestStore::garage();
    store.write("backups/x/manifest.json", b"{}".to_vec());
    assert_eq!(
        store.manifests(),
        vec!["backups/x/manifest.json".to_owned()]
    );
    assert!(store.pending_uploads().is_empty());

    // A wrong secret is refused by the real server.
    let bad = garage.s3_client_with_secret(&"0".repeat(64));
    let refused = garage.block_on(bad.head_bucket().bucket(garage.bucket()).send());
    assert!(refused.is_err(), "Garage accepted a wrong secret key");
}

/// The comparison used by the roundtrip tests accepts a faithful copy (pg_dump -Fc piped into
/// pg_restore, the tools the agent drives) and rejects a copy that differs by one row or one
/// sequence step: it is neither too strict nor too lax.
#[test]
fn fingerprint_accepts_a_faithful_copy_and_rejects_a_changed_one() {
    use std::process::Stdio;

    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    pg.createdb("copy");
    let mut dump = pg
        .client_command("/usr/lib/postgresql/15/bin/pg_dump")
        .args(["-Fc", "-d", "appdb"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("pg_dump");
    let restore = pg
        .client_command("/usr/lib/postgresql/15/bin/pg_restore")
        .args(["--exit-on-error", "--single-transaction", "-d", "copy"])
        .stdin(dump.stdout.take().expect("pg_dump stdout"))
        .output()
        .expect("pg_restore");
    assert!(dump.wait().expect("pg_dump").success());
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    soma_tests::assert_same_database(&pg, "appdb", "copy");

    let original = DbFingerprint::of(&pg, "appdb");
    pg.psql(
        "copy",
        "update \"Mixed Case\".\"Weird Table\" set f4 = 0 where \"Key\" = 'key 3'",
    );
    let changed = DbFingerprint::of(&pg, "copy");
    assert_ne!(original.relations, changed.relations);
    assert_eq!(original.sequences, changed.sequences);
    pg.psql("copy", "select nextval('sales.invoice_no')");
    assert_ne!(original.sequences, DbFingerprint::of(&pg, "copy").sequences);
}
