//! Proves that "latest" means what a user expects when backups are taken back to back, as a cron
//! job or a script does: right after each backup, `describe latest` names the backup just taken and
//! `list` shows every backup newest first — including backups that start within the same second.

use soma_tests::{Agent, PgCluster, TestStore, listed_ids, soma};

/// Enough back-to-back backups that several start within the same second.
const BACKUPS: usize = 10;

#[test]
fn latest_is_the_backup_just_taken() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql("appdb", "create table t (id integer primary key)");
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();

    let mut taken: Vec<String> = Vec::new();
    for n in 0..BACKUPS {
        pg.psql("appdb", &format!("insert into t values ({n})"));
        let out = soma(
            a,
            &["-o", "json", "backup", "postgres", "--database", "appdb"],
        );
        out.assert_success("backup postgres --database appdb");
        let id = out.json()["id"].as_str().expect("backup id").to_owned();

        let out = soma(a, &["describe", "latest", "-o", "json"]);
        out.assert_success("describe latest -o json");
        assert_eq!(
            out.json()["id"].as_str(),
            Some(id.as_str()),
            "right after backup {id} (backup {n} of a back-to-back series, earlier: {taken:?}), \
             latest names another backup:\n{out}"
        );
        taken.push(id);
    }

    let listed = listed_ids(a);
    taken.reverse();
    assert_eq!(listed, taken, "list is not newest first");
}
