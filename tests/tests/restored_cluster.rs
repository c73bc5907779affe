//! A cluster that was itself restored becomes production, and its own base backups must restore
//! to every target. Before, the first restore's recovery settings stayed in the promoted
//! cluster's postgresql.auto.conf, every later base backup carried them, and a restore of one
//! to `latest` silently stopped at the first restore's target time (a restore to an LSN failed
//! with "multiple recovery targets specified").
//! Real PostgreSQL 15 servers, a real Garage S3 server, the real `soma-agent` and `kubectl-soma`.

use std::time::Duration;

use soma_tests::pitr::{
    insert_tagged, physical_backup, restore_and_start, server_time, tagged_rows, timeline,
    wait_archived, wal_agent, wal_status,
};
use soma_tests::{Agent, PgCluster, TestStore, poll_until};

/// Every setting that steers recovery; none may be in force in a promoted cluster's files.
const RECOVERY_SETTINGS: &str = "'restore_command', 'recovery_end_command', \
    'archive_cleanup_command', 'recovery_target', 'recovery_target_name', 'recovery_target_time', \
    'recovery_target_xid', 'recovery_target_lsn', 'recovery_target_inclusive', \
    'recovery_target_timeline', 'recovery_target_action', 'recovery_min_apply_delay', \
    'primary_conninfo', 'primary_slot_name', 'promote_trigger_file'";

/// Generation 1 is restored to a time (generation 2), which becomes production: its agent takes
/// a base backup, rows are written, a restore point, a time and an LSN are marked between them.
/// That backup restores to `latest`, to the time, to the LSN and to the restore point, each with
/// exactly the rows committed by then; and a third generation (a base backup of the `latest`
/// restore, more rows, restored to `latest`) holds every row again.
#[test]
fn a_restored_clusters_own_backups_restore_to_every_target() {
    let store = TestStore::garage();
    let spools: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("spool directory"))
        .collect();

    // Generation 1, restored to T1 in the middle of its rows.
    let c1 = PgCluster::start();
    let mut a1 = wal_agent(&c1, &store, spools[0].path(), "1s");
    c1.psql(
        "postgres",
        "create table events(id bigserial primary key, tag text, \
         at timestamptz default clock_timestamp())",
    );
    let b1 = physical_backup(a1.addr());
    insert_tagged(&c1, "gen1-before", 3);
    let t1 = server_time(&c1);
    insert_tagged(&c1, "gen1-after", 3);
    wait_archived(a1.addr(), &c1);
    // The disaster: the first cluster and its agent are gone.
    a1.terminate(Duration::from_secs(30));
    drop(c1);

    let c2 = restore_and_start(&store, &["--backup", &b1, "--target-time", &t1]);
    assert_eq!(
        tagged_rows(&c2, "where tag <> 'gen1-before'"),
        Vec::<String>::new()
    );
    assert_no_recovery_settings(&c2, "the restore of generation 1");

    // Generation 2 is production now. Its configuration also sets recovery settings through
    // postgresql.conf's include (a restore point never created, a day's apply delay): unused
    // while it runs, carried by its base backup, and outranked by every restore of it.
    let data = c2.data_path();
    std::fs::write(
        data.join("inherited-recovery.conf"),
        "recovery_target_name = 'never-created'\nrecovery_min_apply_delay = '1d'\n",
    )
    .expect("writing an included configuration file");
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("postgresql.conf");
    conf.push_str("\ninclude_if_exists = 'inherited-recovery.conf'\n");
    std::fs::write(data.join("postgresql.conf"), conf).expect("writing postgresql.conf");
    let a2 = streaming_agent(&c2, &store, spools[1].path(), 2);
    let b2 = physical_backup(a2.addr());
    insert_tagged(&c2, "gen2-a", 40);
    c2.psql("postgres", "select pg_create_restore_point('gen2-point')");
    let upto_point = tagged_rows(&c2, "");
    insert_tagged(&c2, "gen2-b", 30);
    let t2 = server_time(&c2);
    let upto_t2 = tagged_rows(&c2, "");
    insert_tagged(&c2, "gen2-c", 30);
    let l2 = c2.psql("postgres", "select pg_current_wal_insert_lsn()");
    let upto_l2 = tagged_rows(&c2, "");
    insert_tagged(&c2, "gen2-d", 30);
    let all2 = tagged_rows(&c2, "");
    wait_archived(a2.addr(), &c2);
    assert_eq!(all2.len(), 3 + 130);

    let latest = restore_and_start(&store, &["--backup", &b2, "--target", "latest"]);
    assert_rows(
        &latest,
        &all2,
        "the restore of generation 2's backup to latest",
    );
    assert_no_recovery_settings(&latest, "the restore of generation 2's backup to latest");
    let at_t2 = restore_and_start(&store, &["--backup", &b2, "--target-time", &t2]);
    assert_rows(&at_t2, &upto_t2, &format!("the restore to {t2}"));
    let at_l2 = restore_and_start(&store, &["--backup", &b2, "--target-lsn", &l2]);
    assert_rows(&at_l2, &upto_l2, &format!("the restore to LSN {l2}"));
    let at_point = restore_and_start(&store, &["--backup", &b2, "--target-name", "gen2-point"]);
    assert_rows(
        &at_point,
        &upto_point,
        "the restore to restore point gen2-point",
    );
    drop((at_t2, at_l2, at_point));

    // Generation 3: the `latest` restore of generation 2 becomes production in turn.
    let a3 = streaming_agent(&latest, &store, spools[2].path(), timeline(&latest));
    let b3 = physical_backup(a3.addr());
    insert_tagged(&latest, "gen3", 25);
    let all3 = tagged_rows(&latest, "");
    wait_archived(a3.addr(), &latest);
    let gen4 = restore_and_start(&store, &["--backup", &b3]);
    assert_rows(
        &gen4,
        &all3,
        "the restore of generation 3's backup to latest",
    );
    assert_no_recovery_settings(&gen4, "the restore of generation 3's backup");
    drop(a2);
}

/// An agent beside `pg` streaming WAL into `store`, once it receives on `timeline`.
fn streaming_agent(
    pg: &PgCluster,
    store: &TestStore,
    spool: &std::path::Path,
    timeline: u32,
) -> Agent {
    let agent = wal_agent(pg, store, spool, "1s");
    poll_until(
        Duration::from_secs(60),
        "the restored cluster's agent to stream its new timeline",
        || {
            let s = wal_status(agent.addr());
            (s["receiving"] == serde_json::Value::Bool(true) && s["timeline"] == timeline)
                .then_some(())
        },
    );
    agent
}

/// The restored server holds exactly `expected` (`id|tag|at`, by id).
fn assert_rows(restored: &PgCluster, expected: &[String], what: &str) {
    let got = tagged_rows(restored, "");
    assert!(
        got == expected,
        "{what} holds {} rows, {} expected (last: {:?} instead of {:?}); server log:\n{}",
        got.len(),
        expected.len(),
        got.last(),
        expected.last(),
        restored.log()
    );
}

/// The promoted server's postgresql.auto.conf sets no recovery setting any more: the restore's
/// own settings were removed when recovery ended, so a base backup of it carries none (what the
/// operator's postgresql.conf sets is the operator's, and every restore outranks it).
/// `pg_file_settings` reads the files as they are now, not the settings the server started with.
fn assert_no_recovery_settings(pg: &PgCluster, what: &str) {
    let left = pg.psql(
        "postgres",
        &format!(
            "select coalesce(string_agg(name || ' = ' || setting, ', '), '') \
             from pg_file_settings where name in ({RECOVERY_SETTINGS}) \
             and sourcefile like '%/postgresql.auto.conf'"
        ),
    );
    assert_eq!(
        left,
        "",
        "{what}: the promoted cluster's configuration still sets recovery settings; server log:\n{}",
        pg.log()
    );
}
