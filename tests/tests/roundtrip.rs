//! Proves that a backup taken by the real `soma-agent`, driven by the real `kubectl-soma`, restores
//! into a database that is indistinguishable from the original — same `pg_dump --schema-only`,
//! same rows in every table and materialized view, same sequence positions, same large objects —
//! for a schema that uses most PostgreSQL features, and that this holds for both stores: a local
//! directory and an S3 prefix on a real Garage server. Also proves the catalog commands a user
//! relies on around it: `list`, `describe`, `verify` and `restore latest`.

use serde_json::Value;
use soma_tests::{Agent, PgCluster, TestStore, assert_same_database, fixtures, listed_ids, soma};

#[test]
fn roundtrip_local_store() {
    roundtrip(&TestStore::local());
}

#[test]
fn roundtrip_s3_store_on_garage() {
    roundtrip(&TestStore::garage());
}

fn roundtrip(store: &TestStore) {
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();

    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("backup postgres --database appdb");
    let manifest = out.json();
    let id = manifest["id"]
        .as_str()
        .unwrap_or_else(|| panic!("backup manifest has no string \"id\":\n{out}"))
        .to_owned();
    assert!(
        store
            .list(&format!("backups/{id}/"))
            .contains(&format!("backups/{id}/dump.pgdump.zst")),
        "{} store holds no dump object for {id}: {:?}",
        store.kind(),
        store.list("")
    );

    // The backup is listed and describable.
    let out = soma(a, &["list", "-o", "json"]);
    out.assert_success("list -o json");
    let listed = out.json();
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap_or_else(|| panic!("list -o json is not an array:\n{out}"))
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec![id.as_str()], "list -o json:\n{out}");

    let out = soma(a, &["describe", &id, "-o", "json"]);
    out.assert_success("describe ID -o json");
    assert_eq!(
        out.json()["id"],
        Value::from(id.as_str()),
        "describe:\n{out}"
    );

    soma(a, &["verify", &id]).assert_success("verify ID of an intact backup");

    // Restore into a new database and compare everything a user could look at.
    soma(a, &["restore", &id, "--database", "appdb_restored"])
        .assert_success("restore ID --database appdb_restored");
    assert_same_database(&pg, "appdb", "appdb_restored");

    // "latest" names the newest complete backup: change the database, back it up again (right
    // away, as a script would), and restore "latest".
    pg.psql(
        "appdb",
        "insert into public.scratch values (1000, 'after the first backup')",
    );
    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("second backup postgres --database appdb");
    let second = out.json()["id"]
        .as_str()
        .expect("second backup id")
        .to_owned();
    assert_ne!(second, id);
    let ids = listed_ids(a);
    assert_eq!(
        ids,
        vec![second.clone(), id.clone()],
        "list is newest first:\n{out}"
    );
    soma(a, &["restore", "latest", "--database", "appdb_latest"])
        .assert_success("restore latest --database appdb_latest");
    assert_same_database(&pg, "appdb", "appdb_latest");

    // The restored database works, not just looks the same: the same writes give the same results
    // in both (the trigger fires, identity and sequence defaults continue where the original left
    // off, the enum rejects values it does not have), and the databases stay equal afterwards.
    let exercise = |db: &str| {
        pg.psql(
            db,
            "update sales.\"order\" set note = 'touched' where id = 7",
        );
        let touched = pg.psql(
            db,
            "select updated_at is not null from sales.\"order\" where id = 7",
        );
        assert_eq!(touched, "t", "trigger order_touch did not fire in {db}");
        assert!(
            pg.try_psql(db, "select 'lost'::sales.order_status")
                .is_err(),
            "enum accepted a value it does not have in {db}"
        );
        pg.psql(
            db,
            "insert into sales.\"order\" (customer_id, total, placed_at) \
             values (500, 1, '2025-01-01 00:00:00+00') returning id, invoice, total_cents",
        )
    };
    assert_eq!(exercise("appdb"), exercise("appdb_latest"));
    assert_same_database(&pg, "appdb", "appdb_latest");
}
