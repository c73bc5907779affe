//! Proves that damage to a stored backup is caught before it can hurt a database, on both stores
//! (a local directory and S3 on a real Garage server): after one flipped byte in the middle of the
//! dump object, or after the object is cut to half its size, `verify` fails (exit 1; a flipped
//! byte is reported as a checksum mismatch), `restore --clean` into an existing database fails and
//! leaves that database exactly as it was, and `restore` into a new database fails without leaving
//! a half-restored database behind. Putting the original bytes back makes the same backup verify
//! and restore again, so the failures came from the damage and nothing else.

use soma_tests::db::assert_fingerprints_equal;
use soma_tests::{
    Agent, DbFingerprint, PgCluster, TestStore, assert_same_database, fixtures, soma,
};

#[test]
fn damaged_backup_is_refused_local_store() {
    damaged_backup_is_refused(&TestStore::local());
}

#[test]
fn damaged_backup_is_refused_s3_store_on_garage() {
    damaged_backup_is_refused(&TestStore::garage());
}

fn damaged_backup_is_refused(store: &TestStore) {
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();

    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("backup postgres --database appdb");
    let id = out.json()["id"].as_str().expect("backup id").to_owned();
    let key = format!("backups/{id}/dump.pgdump.zst");
    let original = store.read(&key);
    assert!(
        original.len() > 4096,
        "dump object is only {} bytes",
        original.len()
    );

    // A database with content of its own, which a failed restore must leave alone.
    pg.createdb("appdb_target");
    pg.psql(
        "appdb_target",
        "create table keep (id integer primary key, v text not null);
         insert into keep select i, 'kept ' || i from generate_series(1, 100) i;
         create sequence keep_seq;
         select setval('keep_seq', 77);",
    );
    let before = DbFingerprint::of(&pg, "appdb_target");

    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    store.write(&key, flipped);
    assert_refused(
        &pg,
        a,
        &id,
        "one flipped byte",
        Some("checksum mismatch"),
        "appdb_new_1",
        &before,
    );

    store.write(&key, original[..original.len() / 2].to_vec());
    assert_refused(&pg, a, &id, "cut to half", None, "appdb_new_2", &before);

    // The intact bytes verify and restore again; --clean replaces the objects the backup
    // contains and leaves the target's own table alone.
    store.write(&key, original);
    soma(a, &["verify", &id]).assert_success("verify after putting the original bytes back");
    soma(
        a,
        &["restore", &id, "--database", "appdb_target", "--clean"],
    )
    .assert_success("restore --clean after putting the original bytes back");
    assert_eq!(
        before.relations["public.keep"],
        DbFingerprint::of(&pg, "appdb_target").relations["public.keep"],
        "--clean touched a table the backup does not contain"
    );
    pg.psql("appdb_target", "drop table keep; drop sequence keep_seq");
    assert_same_database(&pg, "appdb", "appdb_target");
}

/// With the stored dump damaged: verify fails, a --clean restore over `appdb_target` fails and
/// leaves it as `before`, and a restore into `fresh_db` fails without leaving tables behind.
fn assert_refused(
    pg: &PgCluster,
    agent: &str,
    id: &str,
    damage: &str,
    phrase: Option<&str>,
    fresh_db: &str,
    before: &DbFingerprint,
) {
    let out = soma(agent, &["verify", id]);
    out.assert_code(1, &format!("verify of a dump with {damage}"));
    if let Some(phrase) = phrase {
        out.assert_stderr_contains(phrase, &format!("verify of a dump with {damage}"));
    }

    let what = format!("restore --clean into appdb_target of a dump with {damage}");
    let out = soma(
        agent,
        &["restore", id, "--database", "appdb_target", "--clean"],
    );
    out.assert_code(1, &what);
    if let Some(phrase) = phrase {
        out.assert_stderr_contains(phrase, &what);
    }
    assert_fingerprints_equal(
        before,
        &DbFingerprint::of(pg, "appdb_target"),
        "appdb_target before",
        &format!("appdb_target after the failed restore ({damage})"),
    );

    let what = format!("restore into new database {fresh_db} of a dump with {damage}");
    let out = soma(agent, &["restore", id, "--database", fresh_db]);
    out.assert_code(1, &what);
    if let Some(phrase) = phrase {
        out.assert_stderr_contains(phrase, &what);
    }
    if pg.database_exists(fresh_db) {
        let tables = pg.user_tables(fresh_db);
        assert!(
            tables.is_empty(),
            "{what}: left a half-restored database with tables {tables:?}\n{out}"
        );
    }
}
