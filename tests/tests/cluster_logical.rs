//! Proves that a whole-cluster logical backup (`backup postgres --all-databases`) restores into a
//! NEW cluster — fresh initdb, its own data directory and port, no roles but the bootstrap
//! superuser — with everything a user would check: every database and its owner, every role with
//! its attributes and the very same password hash, memberships, table ownership and grants,
//! extensions, sequence positions and rows. Restoring again keeps the roles that now exist as they
//! are. A single-database backup brings the roles its database needs.

use serde_json::Value;
use soma_tests::{Agent, DbFingerprint, PgCluster, TestStore, db::assert_fingerprints_equal, soma};

/// Databases the old cluster holds besides `postgres` (one with a name that needs quoting).
const DATABASES: [&str; 4] = ["appdb", "odd \"name\"", "temporal", "temporal_visibility"];
/// Roles the old cluster holds besides `postgres`.
const ROLES: &str = "('app_owner', 'app_reader', 'temporal', 'we\"ird')";

/// The cluster a team would back up: an application database owned by a login role with a
/// read-only group role and per-role settings, two Temporal databases using an extension, and a
/// role and a database whose names need quoting.
fn old_cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.psql(
        "postgres",
        "create role app_reader nologin;
         create role app_owner login password 'secret' connection limit 7;
         grant app_reader to app_owner;
         create role temporal login password 'temporal''s pw' createdb valid until '2999-01-01 00:00:00+00';
         create role \"we\"\"ird\" login password 'x\\y''z';
         create database appdb owner app_owner;
         create database temporal owner temporal;
         create database temporal_visibility owner temporal;
         create database \"odd \"\"name\"\"\" owner \"we\"\"ird\";
         alter role app_owner set statement_timeout = '5min';
         alter role app_owner in database appdb set search_path = \"$user\", public, \"Odd, Schema\";
         alter database appdb set work_mem = '8MB';",
    );
    pg.psql(
        "odd \"name\"",
        "create table \"t'x\" (v text); insert into \"t'x\" values ('it''s here');",
    );
    pg.psql(
        "appdb",
        "set role app_owner;
         create table accounts (id bigserial primary key, name text not null, balance numeric);
         insert into accounts (name, balance)
           select 'acct-' || g, g * 1.5 from generate_series(1, 200) g;
         select setval('accounts_id_seq', 5000);
         grant select on accounts to app_reader;
         grant select on accounts to \"we\"\"ird\";
         reset role;",
    );
    for db in ["temporal", "temporal_visibility"] {
        pg.psql(
            db,
            "create extension btree_gin;
             set role temporal;
             create table executions (id int primary key, payload bytea not null);
             insert into executions
               select g, decode(md5(g::text), 'hex') || '\\x00ff00'::bytea
               from generate_series(1, 300) g;
             create index executions_gin on executions using gin (id);
             reset role;",
        );
    }
    pg
}

/// Every attribute of the test's roles, their password hashes included.
fn roles(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        &format!(
            "select rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin, \
               rolreplication, rolbypassrls, rolconnlimit, rolvaliduntil, rolpassword \
             from pg_authid where rolname in {ROLES} order by rolname"
        ),
    )
}

/// Memberships among non-built-in roles.
fn memberships(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        "select r.rolname, m.rolname, a.admin_option from pg_auth_members a \
           join pg_roles r on r.oid = a.roleid join pg_roles m on m.oid = a.member \
         where m.rolname !~ '^pg_' order by 1, 2",
    )
}

/// Per-role and per-database settings.
fn settings(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        "select coalesce(r.rolname, '-'), coalesce(d.datname, '-'), s.setconfig \
         from pg_db_role_setting s left join pg_roles r on r.oid = s.setrole \
         left join pg_database d on d.oid = s.setdatabase order by 1, 2",
    )
}

/// Databases and their owners.
fn database_owners(pg: &PgCluster) -> String {
    pg.psql(
        "postgres",
        "select datname, pg_get_userbyid(datdba) from pg_database \
         where not datistemplate order by 1",
    )
}

/// Asserts `new` holds what `old` does: roles, memberships, databases with their owners, and per
/// database the same schema (owners and grants included), rows, sequences and extensions.
fn assert_cluster_restored(old: &PgCluster, new: &PgCluster, databases: &[&str]) {
    let old_roles = roles(old);
    assert_eq!(old_roles.lines().count(), 4, "old roles:\n{old_roles}");
    assert!(old_roles.contains("SCRAM-SHA-256$"), "{old_roles}");
    assert_eq!(roles(new), old_roles, "roles (attributes, password hashes)");
    assert_eq!(memberships(new), memberships(old), "memberships");
    if databases.contains(&"appdb") {
        let old_settings = settings(old);
        assert_eq!(old_settings.lines().count(), 3, "{old_settings}");
        assert_eq!(settings(new), old_settings, "role and database settings");
    }
    for db in databases {
        assert!(new.database_exists(db), "database {db} was not restored");
        let (a, b) = (DbFingerprint::of(old, db), DbFingerprint::of(new, db));
        assert_fingerprints_equal(&a, &b, &format!("old {db}"), &format!("new {db}"));
    }
    let owners = |pg: &PgCluster| {
        database_owners(pg)
            .lines()
            .filter(|l| databases.iter().any(|d| l.starts_with(&format!("{d}|"))))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(owners(new), owners(old), "database owners");
    if databases.contains(&"appdb") {
        assert_eq!(
            new.psql(
                "appdb",
                "select has_table_privilege('app_reader', 'public.accounts', 'SELECT'), \
                        has_table_privilege('app_reader', 'public.accounts', 'INSERT'), \
                        has_table_privilege('we\"ird', 'public.accounts', 'SELECT'), \
                        pg_get_userbyid(relowner) from pg_class where relname = 'accounts'"
            ),
            "t|f|t|app_owner"
        );
        assert_eq!(
            new.psql("appdb", "select last_value from accounts_id_seq"),
            "5000"
        );
    }
    for db in databases.iter().filter(|d| d.starts_with("temporal")) {
        assert_eq!(
            new.psql(
                db,
                "select extversion from pg_extension where extname = 'btree_gin'"
            ),
            old.psql(
                db,
                "select extversion from pg_extension where extname = 'btree_gin'"
            ),
            "extension btree_gin in {db}"
        );
        assert_eq!(
            new.psql(db, "select count(*), sum(length(payload)) from executions"),
            "300|5700"
        );
    }
}

#[test]
fn whole_cluster_restores_into_a_fresh_cluster_local_store() {
    whole_cluster(&TestStore::local());
}

#[test]
fn whole_cluster_restores_into_a_fresh_cluster_s3_store_on_garage() {
    whole_cluster(&TestStore::garage());
}

fn whole_cluster(store: &TestStore) {
    let old = old_cluster();
    let agent = Agent::start(&store.url(), &old.url("postgres"), &[], &store.env());
    let out = soma(
        agent.addr(),
        &["-o", "json", "backup", "postgres", "--all-databases"],
    );
    out.assert_success("backup postgres --all-databases");
    let manifest = out.json();
    let id = manifest["id"].as_str().expect("manifest id").to_owned();
    assert_eq!(manifest["kind"], Value::from("logical-cluster"), "{out}");
    assert_eq!(manifest["target"]["name"], Value::from("all-databases"));
    // The globals first, then one dump per database, keyed by index, never by name.
    let artifacts: Vec<(&str, &str)> = manifest["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap_or_default(),
                a["database"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        artifacts,
        [
            ("globals.json.zst", ""),
            ("db-0001.pgdump.zst", "appdb"),
            ("db-0002.pgdump.zst", "odd \"name\""),
            ("db-0003.pgdump.zst", "postgres"),
            ("db-0004.pgdump.zst", "temporal"),
            ("db-0005.pgdump.zst", "temporal_visibility"),
        ],
        "{out}"
    );
    let keys = store.list(&format!("backups/{id}/"));
    assert!(
        keys.contains(&format!("backups/{id}/db-0005.pgdump.zst")),
        "{keys:?}"
    );
    // What each database needs is recorded for the restore's preflight.
    let temporal = &manifest["details"]["databases"][3];
    assert_eq!(temporal["name"], Value::from("temporal"));
    assert_eq!(temporal["owner"], Value::from("temporal"));
    assert!(
        temporal["extensions"]
            .as_array()
            .is_some_and(|e| e.iter().any(|x| x["name"] == "btree_gin")),
        "{temporal}"
    );
    let appdb_roles = &manifest["details"]["databases"][0]["roles"];
    for role in ["app_owner", "app_reader", "we\"ird"] {
        assert!(
            appdb_roles
                .as_array()
                .is_some_and(|r| r.iter().any(|x| x == role)),
            "appdb needs {role}: {appdb_roles}"
        );
    }
    // The secret never reaches the manifest or the agent's logs.
    assert!(!out.stdout.contains("SCRAM-SHA-256$"), "{out}");

    let out = soma(agent.addr(), &["verify", &id]);
    out.assert_success("verify a whole-cluster backup");
    assert!(out.stdout.contains("6 artifact(s)"), "{out}");
    let out = soma(agent.addr(), &["describe", &id, "-o", "json"]);
    out.assert_success("describe");
    assert_eq!(out.json()["kind"], Value::from("logical-cluster"));

    // A new cluster: fresh initdb, own data directory and port, no roles but postgres.
    let new = PgCluster::start();
    let target = Agent::start(&store.url(), &new.url("postgres"), &[], &store.env());
    let out = soma(target.addr(), &["restore", &id]);
    out.assert_success("restore a whole-cluster backup into a fresh cluster");
    for fragment in [
        "created roles app_owner, app_reader, temporal, we\"ird",
        "kept 1 existing roles",
        "appdb (1 tables)",
        "temporal_visibility (1 tables)",
    ] {
        assert!(out.stdout.contains(fragment), "{fragment:?} not in:\n{out}");
    }
    assert_cluster_restored(&old, &new, &DATABASES);
    for log in [agent.logs(), target.logs()] {
        assert!(
            !log.contains("SCRAM-SHA-256$"),
            "a password hash was logged:\n{log}"
        );
    }

    // Again into the same target: roles that exist now are kept as the target has them.
    new.psql("postgres", "alter role app_owner connection limit 3");
    let out = soma(target.addr(), &["restore", &id]);
    out.assert_code(1, "restore into non-empty databases without --clean")
        .assert_stderr_contains("not empty", "restore without --clean");
    let out = soma(target.addr(), &["restore", &id, "--clean"]);
    out.assert_success("restore again with --clean");
    assert!(
        out.stdout.contains("created no roles") && out.stdout.contains("kept 5 existing roles"),
        "{out}"
    );
    assert_eq!(
        new.psql(
            "postgres",
            "select rolconnlimit from pg_roles where rolname = 'app_owner'"
        ),
        "3",
        "an existing role was altered"
    );
    for db in DATABASES {
        let (a, b) = (DbFingerprint::of(&old, db), DbFingerprint::of(&new, db));
        assert_fingerprints_equal(&a, &b, &format!("old {db}"), &format!("new {db}"));
    }
    // ... unless asked to.
    soma(
        target.addr(),
        &[
            "restore",
            &id,
            "--clean",
            "--update-roles",
            "--database",
            "appdb",
        ],
    )
    .assert_success("restore --update-roles --database appdb");
    assert_eq!(
        new.psql(
            "postgres",
            "select rolconnlimit from pg_roles where rolname = 'app_owner'"
        ),
        "7"
    );
}

#[test]
fn single_database_backup_brings_the_roles_it_needs() {
    let store = TestStore::local();
    let old = old_cluster();
    let agent = Agent::start(&store.url(), &old.url("appdb"), &[], &store.env());
    let out = soma(agent.addr(), &["-o", "json", "backup", "postgres"]);
    out.assert_success("backup postgres (the default database)");
    let manifest = out.json();
    assert_eq!(manifest["kind"], Value::from("logical"));
    let id = manifest["id"].as_str().expect("id").to_owned();
    let names: Vec<&str> = manifest["artifacts"]
        .as_array()
        .expect("artifacts")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["globals.json.zst", "dump.pgdump.zst"]);

    let new = PgCluster::start();
    let target = Agent::start(&store.url(), &new.url("postgres"), &[], &store.env());
    let out = soma(target.addr(), &["restore", &id]);
    out.assert_success("restore a single-database backup into a fresh cluster");
    assert!(
        out.stdout
            .contains("created roles app_owner, app_reader, we\"ird"),
        "{out}"
    );
    let (a, b) = (
        DbFingerprint::of(&old, "appdb"),
        DbFingerprint::of(&new, "appdb"),
    );
    assert_fingerprints_equal(&a, &b, "old appdb", "new appdb");
    // Only what appdb needs: the temporal role stays out.
    assert_eq!(
        new.psql(
            "postgres",
            "select count(*) from pg_roles where rolname = 'temporal'"
        ),
        "0"
    );
    let only = |pg: &PgCluster| {
        pg.psql(
            "postgres",
            "select rolname, rolconnlimit, rolcanlogin, rolpassword from pg_authid \
             where rolname in ('app_owner', 'app_reader') order by 1",
        )
    };
    assert_eq!(only(&new), only(&old));
    assert_eq!(memberships(&new), memberships(&old));
    assert_eq!(
        new.psql(
            "postgres",
            "select pg_get_userbyid(datdba) from pg_database where datname = 'appdb'"
        ),
        "app_owner"
    );
}
