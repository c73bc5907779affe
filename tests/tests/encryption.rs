//! Encryption at rest (`--encryption-key-file`), end to end with the real agent and plugin, a
//! real PostgreSQL 15 and real stores (Garage for S3). What a user relies on:
//! - every engine round-trips encrypted: a logical dump, Qdrant collections (against the Qdrant
//!   REST double, which follows Qdrant's documented snapshot API), and point-in-time recovery,
//!   whose WAL a real PostgreSQL replays through `soma-agent wal-fetch` holding the key;
//! - what lands in the store is not readable: no object is zstd or tar, the manifest is not JSON;
//! - someone who can write to the bucket but has no key cannot get anything restored: a flipped
//!   byte, an object swapped in from another backup, a forged manifest (plaintext with digests
//!   recomputed to match, another backup's sealed manifest, or one byte edited) are each refused
//!   before the target database changes, and so are an agent with another key or none, naming
//!   the fingerprint of the key that is needed;
//! - the manifest records the key's fingerprint, `status` says the store is encrypted, and the
//!   key itself is never in the logs;
//! - a whole backup copied from another store that shares the key (sealed and authentic, but
//!   for that store's repository) is refused by `list`, `verify` and `restore`, naming both
//!   repositories, while a copy of the whole store reads through `--restore-from`;
//! - `--accept-unencrypted TIME` reads unencrypted objects Garage says were written before TIME,
//!   and refuses the same object rewritten after it.

use std::path::{Path, PathBuf};

use soma_tests::db::assert_fingerprints_equal;
use soma_tests::pitr::{physical_backup, wait_archived, wal_agent_with};
use soma_tests::qdrant::QdrantDouble;
use soma_tests::{
    Agent, DbFingerprint, PgCluster, TestStore, assert_same_database, fixtures, soma,
};

const MAGIC: &[u8] = b"SOMAENC2";
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// A key file of 32 random bytes, as `head -c 32 /dev/urandom > key` writes it.
fn key_file(dir: &Path, name: &str) -> (PathBuf, Vec<u8>) {
    let bytes: Vec<u8> = (0..32).map(|_| rand::random::<u8>()).collect();
    let path = dir.join(name);
    std::fs::write(&path, &bytes).expect("writing a key file");
    (path, bytes)
}

/// Every object under `prefix` is sealed: starts with the header, is no zstd frame and no tar.
fn assert_sealed(store: &TestStore, prefix: &str) -> usize {
    let keys = store.list(prefix);
    assert!(!keys.is_empty(), "nothing stored under {prefix}");
    for key in &keys {
        let bytes = store.read(key);
        assert!(bytes.starts_with(MAGIC), "{key} is not encrypted");
        assert!(
            !bytes.windows(4).take(64).any(|w| w == ZSTD_MAGIC),
            "{key} shows a zstd frame header"
        );
        assert!(
            zstd::decode_all(&bytes[..]).is_err(),
            "{key} decompresses as zstd"
        );
        assert!(
            tar::Archive::new(&bytes[..])
                .entries()
                .is_ok_and(|mut e| e.next().is_none_or(|e| e.is_err())),
            "{key} reads as a tar archive"
        );
    }
    keys.len()
}

fn backup(agent: &Agent, db: &str) -> String {
    let out = soma(
        agent.addr(),
        &["-o", "json", "backup", "postgres", "--database", db],
    );
    out.assert_success("backup postgres");
    out.json()["id"].as_str().expect("backup id").to_owned()
}

#[test]
fn a_logical_backup_round_trips_encrypted_on_garage() {
    let store = TestStore::garage();
    let keys = tempfile::tempdir().unwrap();
    let (key, key_bytes) = key_file(keys.path(), "key");
    let key = key.display().to_string();
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--encryption-key-file", &key],
        &store.env(),
    );
    let a = agent.addr();
    let id = backup(&agent, "appdb");
    assert!(assert_sealed(&store, &format!("backups/{id}/")) >= 2);
    let manifest = store.read(&format!("backups/{id}/manifest.json"));
    assert!(
        serde_json::from_slice::<serde_json::Value>(&manifest).is_err()
            && !String::from_utf8_lossy(&manifest).contains("appdb"),
        "the stored manifest is readable"
    );

    let described = soma(a, &["-o", "json", "describe", &id]);
    described.assert_success("describe");
    let fingerprint = described.json()["encryption"]["key_fingerprint"]
        .as_str()
        .unwrap_or_else(|| panic!("the manifest records no key fingerprint:\n{described}"))
        .to_owned();
    assert_eq!(fingerprint.len(), 16, "{described}");
    let status = soma(a, &["status"]);
    status.assert_success("status");
    assert!(
        status.stdout.contains(&fingerprint) && status.stdout.contains("aes-256-gcm"),
        "status does not say the store is encrypted:\n{status}"
    );

    soma(a, &["verify", &id]).assert_success("verify an encrypted backup");
    soma(a, &["restore", &id, "--database", "appdb_restored"])
        .assert_success("restore an encrypted backup");
    assert_same_database(&pg, "appdb", "appdb_restored");

    let logs = agent.logs();
    for secret in [
        hex::encode(&key_bytes),
        String::from_utf8_lossy(&key_bytes).into_owned(),
    ] {
        assert!(!logs.contains(&secret), "the key is in the agent's logs");
    }
}

#[test]
fn forged_or_damaged_objects_and_wrong_keys_are_refused_before_the_database_changes() {
    let store = TestStore::local();
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keys.path(), "key");
    let (other_key, _) = key_file(keys.path(), "other");
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let key_arg = key.display().to_string();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--encryption-key-file", &key_arg],
        &store.env(),
    );
    let a = agent.addr();
    let first = backup(&agent, "appdb");
    pg.psql(
        "appdb",
        "insert into public.scratch values (2000, 'second')",
    );
    let second = backup(&agent, "appdb");
    let described = soma(a, &["-o", "json", "describe", &first]);
    described.assert_success("describe");
    let fingerprint = described.json()["encryption"]["key_fingerprint"]
        .as_str()
        .expect("key fingerprint")
        .to_owned();

    // The database a restore --clean would overwrite, with content a forged backup must not
    // reach.
    pg.createdb("target");
    pg.psql(
        "target",
        "create table keep (id integer primary key, v text not null);
         insert into keep select i, 'kept ' || i from generate_series(1, 100) i;",
    );
    let before = DbFingerprint::of(&pg, "target");
    let refused = |what: &str, phrase: &str| {
        let out = soma(a, &["restore", &first, "--database", "target", "--clean"]);
        out.assert_code(1, what)
            .assert_stderr_contains(phrase, what);
        assert_fingerprints_equal(
            &before,
            &DbFingerprint::of(&pg, "target"),
            "target before",
            &format!("target after the refused restore ({what})"),
        );
    };

    let dump = format!("backups/{first}/dump.pgdump.zst");
    let manifest = format!("backups/{first}/manifest.json");
    let (dump_bytes, manifest_bytes) = (store.read(&dump), store.read(&manifest));

    let mut flipped = dump_bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    store.write(&dump, flipped);
    refused("a flipped byte in the dump", "failed authentication");
    // The other backup's dump, sealed with the same key: bound to its own name.
    store.write(
        &dump,
        store.read(&format!("backups/{second}/dump.pgdump.zst")),
    );
    refused(
        "the dump swapped for another backup's",
        "failed authentication",
    );
    store.write(&dump, dump_bytes.clone());

    // Any byte of the manifest edited, even one no size or digest check looks at.
    for at in [
        MAGIC.len() + 20,
        manifest_bytes.len() / 2,
        manifest_bytes.len() - 1,
    ] {
        let mut edited = manifest_bytes.clone();
        edited[at] ^= 0x20;
        store.write(&manifest, edited);
        refused(
            &format!("manifest byte {at} edited"),
            "failed authentication",
        );
    }
    store.write(
        &manifest,
        store.read(&format!("backups/{second}/manifest.json")),
    );
    refused("another backup's manifest", "failed authentication");
    // A plaintext manifest, digests recomputed to match a forged dump: exactly what an attacker
    // without the key can write.
    let forged_dump = zstd::encode_all(&b"PGDMP forged"[..], 3).unwrap();
    let mut forged = described.json();
    let artifact = &mut forged["artifacts"][0];
    artifact["stored_bytes"] = forged_dump.len().into();
    artifact["stored_sha256"] = hex::encode(sha2::Sha256::digest(&forged_dump)).into();
    artifact["raw_bytes"] = 12.into();
    artifact["raw_sha256"] = hex::encode(sha2::Sha256::digest(b"PGDMP forged")).into();
    forged.as_object_mut().unwrap().remove("encryption");
    store.write(&dump, forged_dump);
    store.write(&manifest, serde_json::to_vec(&forged).unwrap());
    refused("a forged plaintext manifest and dump", "not encrypted");
    store.write(&dump, dump_bytes);
    store.write(&manifest, manifest_bytes);

    // The intact backup restores, so the refusals came from the damage alone.
    soma(a, &["verify", &first]).assert_success("verify after the originals are back");

    // An agent with another key, and one with none, name the key that is needed.
    for extra in [
        vec!["--encryption-key-file", other_key.to_str().unwrap()],
        vec![],
    ] {
        let wrong = Agent::start(&store.url(), &pg.url("appdb"), &extra, &store.env());
        let what = format!("restore by an agent with keys {extra:?}");
        let out = soma(
            wrong.addr(),
            &["restore", &first, "--database", "target", "--clean"],
        );
        out.assert_code(1, &what)
            .assert_stderr_contains(&fingerprint, &what)
            .assert_stderr_contains("--encryption-key-file", &what);
        assert_fingerprints_equal(
            &before,
            &DbFingerprint::of(&pg, "target"),
            "target before",
            &what,
        );
    }
}

use sha2::Digest as _;

#[test]
fn qdrant_collections_round_trip_encrypted() {
    const MIB: u64 = 1024 * 1024;
    let store = TestStore::local();
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keys.path(), "key");
    let q = QdrantDouble::start(None);
    q.add_collection("memory", 16, 5_000, 6 * MIB + 123, 2);
    let original = q.fingerprint("memory");
    let url = q.url();
    let agent = Agent::start(
        &store.url(),
        "",
        &[
            "--qdrant-url",
            &url,
            "--encryption-key-file",
            key.to_str().unwrap(),
        ],
        &store.env(),
    );
    let out = soma(agent.addr(), &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup qdrant");
    let id = out.json()["id"].as_str().unwrap().to_owned();
    assert_sealed(&store, &format!("backups/{id}/"));
    q.add_collection("memory", 16, 5_000, 6 * MIB + 123, 99);
    assert_ne!(q.fingerprint("memory"), original);
    soma(agent.addr(), &["restore", &id, "--force"]).assert_success("restore --force");
    assert_eq!(
        q.fingerprint("memory"),
        original,
        "memory differs after the restore"
    );
}

#[test]
fn point_in_time_recovery_replays_encrypted_wal_through_wal_fetch() {
    let store = TestStore::local();
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keys.path(), "key");
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent_with(
        &pg,
        &store,
        spool.path(),
        "1s",
        &["--encryption-key-file", key.to_str().unwrap()],
    );
    physical_backup(agent.addr());
    pg.psql(
        "postgres",
        "create table kept as select generate_series(1, 1000) as n",
    );
    wait_archived(agent.addr(), &pg);
    assert_sealed(&store, "wal/");
    assert_sealed(&store, "backups/");

    let mut target = PgCluster::empty();
    let data = target.data_path().display().to_string();
    soma(agent.addr(), &["restore", "latest", "--pgdata", &data])
        .assert_success("restore --pgdata of an encrypted base backup");
    // The restored server fetches every WAL file through wal-fetch, which reads the key file
    // named in its restore_command.
    target
        .start_existing(&store.env())
        .unwrap_or_else(|e| panic!("the restored server did not start:\n{e}"));
    assert!(
        target.wait_promoted_or_stopped(soma_tests::pitr::PROMOTE_TIMEOUT),
        "{}",
        target.log()
    );
    assert_eq!(target.psql("postgres", "select sum(n) from kept"), "500500");
    assert!(
        target.log().contains("from archive"),
        "no WAL came through wal-fetch:\n{}",
        target.log()
    );
}

/// Copies every object under `from` to the same names under `to` in one Garage bucket, as
/// someone who can write to the bucket (or `aws s3 sync`) would.
fn copy_prefix(store: &TestStore, from: &str, to: &str) -> usize {
    let garage = store.garage_server().expect("a Garage store");
    let keys = garage.list_keys(from);
    for k in &keys {
        let rel = k.strip_prefix(from).expect("listed under the prefix");
        garage.put_object(&format!("{to}{rel}"), garage.get_object(k));
    }
    keys.len()
}

/// The repository id `status` names.
fn repository_of(agent: &Agent) -> String {
    let status = soma(agent.addr(), &["status"]);
    status.assert_success("status");
    let at = status
        .stdout
        .find("repository ")
        .unwrap_or_else(|| panic!("status names no repository:\n{status}"));
    status.stdout[at + "repository ".len()..]
        .chars()
        .take_while(char::is_ascii_hexdigit)
        .collect()
}

/// Returns once the wall clock is `by` past `t` (S3 times have a resolution of a second or
/// better): a probe of the clock, not a sleep standing in for an event.
fn clock_past(t: std::time::SystemTime, by: std::time::Duration) {
    soma_tests::poll_until(
        std::time::Duration::from_secs(10),
        "the clock to move on",
        || (std::time::SystemTime::now() > t + by).then_some(()),
    );
}

#[test]
fn a_backup_copied_from_another_store_with_the_same_key_is_refused_by_name() {
    let store = TestStore::garage();
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keys.path(), "key");
    let key = key.display().to_string();
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let ours = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--encryption-key-file", &key],
        &store.env(),
    );
    // Another cluster's agent, its own store in the same bucket, the same key (one key Secret
    // shared by two releases).
    let bucket = store.garage_server().expect("Garage").bucket().to_owned();
    let other_url = format!("s3://{bucket}/other/cluster");
    let theirs = Agent::start(
        &other_url,
        &pg.url("appdb"),
        &["--encryption-key-file", &key],
        &store.env(),
    );
    pg.psql(
        "appdb",
        "insert into public.scratch values (4242, 'theirs')",
    );
    let foreign = backup(&theirs, "appdb");
    let own = backup(&ours, "appdb");
    let (our_id, their_id) = (repository_of(&ours), repository_of(&theirs));
    assert_eq!(our_id.len(), 32, "{our_id}");
    assert_ne!(our_id, their_id, "two stores, two repositories");

    // Their whole backup, manifest and dump, copied into our store: every object authentic under
    // the shared key, and named exactly as it was there.
    let copied = copy_prefix(
        &store,
        &format!("other/cluster/backups/{foreign}/"),
        &format!("{}/backups/{foreign}/", soma_tests::store::S3_PREFIX),
    );
    assert!(copied >= 2, "copied {copied} objects");

    let listed = soma(ours.addr(), &["-o", "json", "list"]);
    listed.assert_success("list");
    let ids: Vec<String> = listed
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(ids.contains(&own), "our own backup is listed:\n{listed}");
    assert!(
        !ids.contains(&foreign),
        "the copied backup is listed as ours:\n{listed}"
    );
    listed.assert_stderr_contains(&foreign, "list names the backup it leaves out");
    listed.assert_stderr_contains(&their_id, "list names the other repository");

    let verify = soma(ours.addr(), &["verify", &foreign]);
    verify
        .assert_code(1, "verify the copied backup")
        .assert_stderr_contains("sealed for repository", "verify")
        .assert_stderr_contains(&their_id, "verify")
        .assert_stderr_contains(&our_id, "verify");
    let restore = soma(
        ours.addr(),
        &["restore", &foreign, "--database", "copied_in"],
    );
    restore
        .assert_code(1, "restore the copied backup")
        .assert_stderr_contains("sealed for repository", "restore");
    assert!(
        !pg.database_exists("copied_in"),
        "a refused restore created the database"
    );
    soma(ours.addr(), &["verify", &own]).assert_success("our own backup still verifies");

    // A copy of their whole store (repository id included, as `aws s3 sync` makes it) is
    // their repository still: an agent restoring from it reads their backup.
    assert!(copy_prefix(&store, "other/cluster/", "copy/of/other/") > copied);
    let copy_url = format!("s3://{bucket}/copy/of/other");
    let reader = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--encryption-key-file", &key, "--restore-from", &copy_url],
        &store.env(),
    );
    soma(reader.addr(), &["verify", &foreign]).assert_success("verify from a copy of their store");
    soma(
        reader.addr(),
        &["restore", &foreign, "--database", "from_the_copy"],
    )
    .assert_success("restore from a copy of their store");
    assert_eq!(
        pg.psql(
            "from_the_copy",
            "select v from public.scratch where k = 4242"
        ),
        "theirs"
    );
}

#[test]
fn accept_unencrypted_reads_only_objects_garage_stored_before_the_cutoff() {
    let store = TestStore::garage();
    let keys = tempfile::tempdir().unwrap();
    let (key, _) = key_file(keys.path(), "key");
    let key = key.display().to_string();
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    // Backups taken before encryption was turned on.
    let plain = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let old = backup(&plain, "appdb");
    drop(plain);
    // Encryption turned on a second later.
    clock_past(
        std::time::SystemTime::now(),
        std::time::Duration::from_millis(1100),
    );
    let cutoff = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let migrating = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &[
            "--encryption-key-file",
            &key,
            "--accept-unencrypted",
            &cutoff,
        ],
        &store.env(),
    );
    let status = soma(migrating.addr(), &["status"]);
    status.assert_success("status");
    assert!(
        status.stdout.contains(&format!(
            "unencrypted objects written before {}",
            &cutoff[..19]
        )),
        "status does not say which unencrypted objects are read:\n{status}"
    );
    soma(migrating.addr(), &["verify", &old])
        .assert_success("verify a backup from before the cut-off");
    soma(
        migrating.addr(),
        &["restore", &old, "--database", "from_before"],
    )
    .assert_success("restore a backup from before the cut-off");
    assert_same_database(&pg, "appdb", "from_before");

    // Someone who can write to the bucket rewrites the old backup after the cut-off (here with
    // the same bytes: what counts is when the store says it was written).
    clock_past(
        chrono::DateTime::parse_from_rfc3339(&cutoff)
            .unwrap()
            .into(),
        std::time::Duration::from_millis(1100),
    );
    let manifest = format!("backups/{old}/manifest.json");
    store.write(&manifest, store.read(&manifest));
    let verify = soma(migrating.addr(), &["verify", &old]);
    verify
        .assert_code(1, "verify a manifest rewritten after the cut-off")
        .assert_stderr_contains("not before the cut-off", "verify")
        .assert_stderr_contains("--accept-unencrypted", "verify");
    let restore = soma(
        migrating.addr(),
        &["restore", &old, "--database", "planted"],
    );
    restore.assert_code(1, "restore a manifest rewritten after the cut-off");
    assert!(!pg.database_exists("planted"));

    // The old boolean form is refused, not taken as "accept anything".
    let env: Vec<(String, String)> = store
        .env()
        .into_iter()
        .chain([("SOMA_ACCEPT_UNENCRYPTED".to_owned(), "true".to_owned())])
        .collect();
    let exit = Agent::try_start(
        &store.url(),
        &pg.url("appdb"),
        &["--encryption-key-file", &key],
        &env,
    )
    .expect_err("an agent given SOMA_ACCEPT_UNENCRYPTED=true starts");
    assert!(
        exit.output.contains("RFC 3339") && exit.output.contains("SOMA_ACCEPT_UNENCRYPTED"),
        "{}",
        exit.output
    );
}

#[test]
fn a_passphrase_is_not_a_key() {
    let dir = tempfile::tempdir().unwrap();
    // 31 characters and a newline: 32 bytes, which the agent once took as a raw key.
    let passphrase = dir.path().join("passphrase");
    std::fs::write(&passphrase, "our-company-backup-password-026\n").unwrap();
    assert_eq!(std::fs::metadata(&passphrase).unwrap().len(), 32);
    let store = TestStore::local();
    let exit = Agent::try_start(
        &store.url(),
        "",
        &["--encryption-key-file", passphrase.to_str().unwrap()],
        &store.env(),
    )
    .expect_err("an agent given a passphrase as its key starts");
    assert!(
        exit.output.contains(passphrase.to_str().unwrap())
            && exit.output.contains("openssl rand -base64 32"),
        "the error names the file and how to make a key:\n{}",
        exit.output
    );
    assert!(!exit.output.contains("backup-password"), "{}", exit.output);
    // What the README tells users to run is a key.
    let made = std::process::Command::new("openssl")
        .args(["rand", "-base64", "32"])
        .output()
        .expect("openssl");
    let key = dir.path().join("key");
    std::fs::write(&key, &made.stdout).unwrap();
    Agent::start(
        &store.url(),
        "",
        &["--encryption-key-file", key.to_str().unwrap()],
        &store.env(),
    );
}
