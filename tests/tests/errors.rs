//! Proves that `kubectl-soma` and `soma-agent` fail the way a user needs when given bad input or a
//! bad environment: exit code 2 for a usage error (bad flag, bad id, a confirmation that was not
//! given), exit 1 for an operation that failed, and a message that names the problem and the way
//! out. Also proves that the refusals protect data: a non-empty database is not restored over
//! without `--clean`, a backup is not deleted without `--yes`, and a second backup of the same
//! database does not start (nor disturb the first) while one is running. Everything runs against
//! the real binaries, a real PostgreSQL and, for credentials, a real Garage server.

use soma_tests::{Agent, DbFingerprint, Garage, PgCluster, TestStore, fixtures, free_port, soma};

/// A cluster with a small `appdb` and an agent on a local store.
struct Setup {
    // Fields drop in declaration order: the agent stops before its database and store go.
    agent: Agent,
    pg: PgCluster,
    store: TestStore,
}

impl Setup {
    fn new() -> Setup {
        let pg = PgCluster::start();
        pg.createdb("appdb");
        pg.psql(
            "appdb",
            "create table item (id integer primary key, name text not null);
             insert into item select i, 'item ' || i from generate_series(1, 50) i;",
        );
        let store = TestStore::local();
        let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
        Setup { agent, pg, store }
    }

    fn addr(&self) -> &str {
        self.agent.addr()
    }

    fn backup(&self) -> String {
        let out = soma(
            self.addr(),
            &["-o", "json", "backup", "postgres", "--database", "appdb"],
        );
        out.assert_success("backup postgres --database appdb");
        out.json()["id"].as_str().expect("backup id").to_owned()
    }

    fn listed_ids(&self) -> Vec<String> {
        soma_tests::listed_ids(self.addr())
    }
}

#[test]
fn unreachable_agent_is_reported() {
    // Bound a moment ago and released: nothing listens there.
    let closed = format!("127.0.0.1:{}", free_port());
    soma(&closed, &["list"])
        .assert_code(1, "list against a closed port")
        .assert_stderr_contains("cannot reach the agent", "list against a closed port");
}

#[test]
fn unknown_backup_id_is_not_found() {
    let s = Setup::new();
    soma(s.addr(), &["describe", "20200101T000000Z-pg-appdb-0000"])
        .assert_code(1, "describe of an id that was never taken")
        .assert_stderr_contains("not found", "describe of an id that was never taken");
}

#[test]
fn malformed_backup_id_is_a_usage_error() {
    let s = Setup::new();
    for args in [
        &["describe", "../x"][..],
        &["restore", "../x", "--database", "other"][..],
    ] {
        soma(s.addr(), args)
            .assert_code(2, &format!("{args:?}"))
            .assert_stderr_contains("invalid backup id", &format!("{args:?}"));
    }
    assert!(
        !s.pg.database_exists("other"),
        "a restore with an invalid id created its target"
    );
}

#[test]
fn unknown_subcommand_is_a_usage_error() {
    let s = Setup::new();
    let out = soma(s.addr(), &["frobnicate"]);
    out.assert_code(2, "unknown subcommand");
    assert!(
        !out.stderr.is_empty(),
        "usage error without a message:\n{out}"
    );
}

#[test]
fn wrong_store_credentials_are_reported_as_access_denied() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql("appdb", "create table item (id integer primary key)");
    let garage = Garage::start();
    let store = format!("s3://{}/some/prefix", garage.bucket());
    let agent = Agent::start(
        &store,
        &pg.url("appdb"),
        &[],
        &garage.env_with_secret(&"0".repeat(64)),
    );
    let out = soma(agent.addr(), &["backup", "postgres", "--database", "appdb"]);
    out.assert_code(1, "backup with a wrong S3 secret key")
        .assert_stderr_contains("access denied", "backup with a wrong S3 secret key")
        .assert_stderr_contains("credentials", "backup with a wrong S3 secret key");
    assert!(
        garage.list_keys("some/prefix/").is_empty(),
        "something was stored with wrong credentials"
    );
}

#[test]
fn restore_over_a_non_empty_database_needs_clean() {
    let s = Setup::new();
    let id = s.backup();
    s.pg.createdb("appdb_target");
    s.pg.psql(
        "appdb_target",
        "create table item (id integer primary key, name text not null);
         insert into item values (1, 'precious');",
    );
    let before = DbFingerprint::of(&s.pg, "appdb_target");
    soma(s.addr(), &["restore", &id, "--database", "appdb_target"])
        .assert_code(1, "restore into a non-empty database without --clean")
        .assert_stderr_contains("not empty", "restore without --clean")
        .assert_stderr_contains("--clean", "restore without --clean");
    assert_eq!(
        before,
        DbFingerprint::of(&s.pg, "appdb_target"),
        "a refused restore changed the target"
    );
}

#[test]
fn delete_needs_yes() {
    let s = Setup::new();
    let id = s.backup();
    soma(s.addr(), &["delete", &id])
        .assert_code(2, "delete without --yes (stdin is not a terminal)")
        .assert_stderr_contains("--yes", "delete without --yes");
    assert_eq!(
        s.listed_ids(),
        vec![id.clone()],
        "delete without --yes deleted"
    );

    soma(s.addr(), &["delete", &id, "--yes"]).assert_success("delete --yes");
    assert_eq!(s.listed_ids(), Vec::<String>::new());
    soma(s.addr(), &["describe", &id])
        .assert_code(1, "describe of a deleted backup")
        .assert_stderr_contains("not found", "describe of a deleted backup");
    assert_eq!(
        s.store.list(&format!("backups/{id}/")),
        Vec::<String>::new(),
        "delete left the backup's objects in the store"
    );
}

#[test]
fn password_in_postgres_url_is_refused_at_startup() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let password = "s3cr3t-must-not-be-logged";
    let url = format!(
        "postgresql://postgres:{password}@127.0.0.1:{}/postgres",
        pg.port()
    );
    match Agent::try_start(&store.url(), &url, &[], &store.env()) {
        Ok(agent) => panic!(
            "the agent started with a password in --postgres-url:\n{}",
            agent.logs()
        ),
        Err(exit) => {
            assert!(!exit.status.success(), "{exit:?}");
            assert!(
                exit.output.contains("PGPASSWORD"),
                "the refusal does not point at PGPASSWORD:\n{}",
                exit.output
            );
            assert!(
                !exit.output.contains(password),
                "the agent printed the password:\n{}",
                exit.output
            );
        }
    }
}

#[test]
fn second_backup_of_a_database_is_refused_while_one_runs() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    // Big enough that the first backup is still uploading when the second request arrives.
    fixtures::create_big_table(&pg, "appdb", "blob", 200);
    let store = TestStore::local();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--part-size", "5MiB"],
        &store.env(),
    );

    let first = soma_tests::store::backup_in_flight(agent.addr(), &store, "appdb");
    let second = soma(agent.addr(), &["backup", "postgres", "--database", "appdb"]);
    let first = first.wait();
    second
        .assert_code(1, "a second backup while one runs")
        .assert_stderr_contains("already running", "a second backup while one runs");
    first.assert_success("the first backup, after a second was refused");

    let out = soma(agent.addr(), &["list", "-o", "json"]);
    out.assert_success("list -o json");
    assert_eq!(
        out.json().as_array().map(Vec::len),
        Some(1),
        "exactly one backup was taken:\n{out}"
    );
}
