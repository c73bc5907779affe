//! A cluster that was itself restored becomes production, and its own base backups must restore
//! to every target. Before, the first restore's recovery settings stayed in the promoted
//! cluster's postgresql.auto.conf, every later base backup carried them, and a restore of one
//! to `latest` silently stopped at the first restore's target time (a restore to an LSN failed
//! with "multiple recovery targets specified").
//! Real PostgreSQL 15 servers, a real Garage S3 server, the real `soma-agent` and `kubectl-soma`.

use std::time::Duration;

use soma_tests::pitr::{
    PROMOTE_TIMEOUT, insert_tagged, physical_backup, restore_and_start, restore_pgdata,
    server_time, tagged_rows, timeline, wait_archived, wal_agent, wal_status,
};
use soma_tests::{Agent, PgCluster, TestStore, metrics, poll_until, soma};

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

/// Where a restore's replay ended is reported by the agent beside the promoted server, compared
/// with the archive: a restore to the end reached it; a restore to a time stopped at its target
/// with WAL after it; a restore whose server ended recovery early with no target (here a
/// `restore_command` on its command line that finds nothing, as a stale pod setting would)
/// stopped short — `status` says so and fails, and the metric says so. `describe` says whether
/// a base backup carries recovery settings of its own (here one set with ALTER SYSTEM, which no
/// restore of it may follow).
#[test]
fn the_agent_beside_a_restored_server_says_where_replay_ended() {
    let store = TestStore::garage();
    let spool = tempfile::tempdir().expect("spool directory");
    let c1 = PgCluster::start();
    let a1 = wal_agent(&c1, &store, spool.path(), "1s");
    c1.psql(
        "postgres",
        "create table events(id bigserial primary key, tag text, \
         at timestamptz default clock_timestamp());\n\
         alter system set recovery_target_name = 'planted'",
    );
    let b1 = physical_backup(a1.addr());
    let described = soma(a1.addr(), &["describe", &b1]);
    described.assert_success("describe BASE");
    assert!(
        described
            .stdout
            .contains("Recovery settings: carried: recovery_target_name"),
        "describe must say the base backup carries a recovery setting:\n{described}"
    );
    insert_tagged(&c1, "before", 20);
    let t1 = server_time(&c1);
    // The WAL after T1 fills later segments: a restore to T1 leaves whole segments behind.
    for _ in 0..3 {
        insert_tagged(&c1, "after", 20);
        c1.psql("postgres", "select pg_switch_wal()");
    }
    let all = tagged_rows(&c1, "");
    wait_archived(a1.addr(), &c1);

    // To the end of the archive: every row, and the agent beside it says it reached the end.
    let latest = restore_and_start(&store, &["--backup", &b1]);
    assert_rows(&latest, &all, "the restore to latest");
    let beside_latest = Agent::start(&store.url(), &latest.url("postgres"), &[], &store.env());
    let r = last_recovery(&beside_latest);
    assert_eq!(r["verdict"], "reached-end", "{r:#}");
    assert_eq!(r["unreplayed_bytes"], 0, "{r:#}");
    assert_eq!(r["reason"], "no recovery target specified", "{r:#}");
    // A base backup of the promoted cluster carries no recovery setting.
    let b2 = physical_backup(beside_latest.addr());
    let described = soma(beside_latest.addr(), &["describe", &b2]);
    assert!(
        described.stdout.contains("Recovery settings: none carried"),
        "a base backup of a restored cluster must carry no recovery settings:\n{described}"
    );

    // To T1: stopped at its target, the later segments not replayed, as asked.
    let at_t1 = restore_and_start(&store, &["--backup", &b1, "--target-time", &t1]);
    assert_rows(&at_t1, &all[..20], &format!("the restore to {t1}"));
    let beside_t1 = Agent::start(&store.url(), &at_t1.url("postgres"), &[], &store.env());
    let r = last_recovery(&beside_t1);
    assert_eq!(r["verdict"], "at-target", "{r:#}");
    assert!(r["unreplayed_bytes"].as_u64() > Some(0), "{r:#}");
    let status = soma(beside_t1.addr(), &["status"]);
    status.assert_success("status beside a restore to a target");

    // No target, yet replay ended early: the server's command line names a restore_command that
    // finds nothing, so it replays only the base backup's own WAL and promotes.
    let mut short = PgCluster::empty();
    restore_pgdata(&short, &store, &["--backup", &b1]).assert_success("restore-pgdata");
    short
        .start_existing_with("-c restore_command=/bin/false", &store.env())
        .unwrap_or_else(|e| panic!("the restored server did not start:\n{e}"));
    assert!(
        short.wait_promoted_or_stopped(PROMOTE_TIMEOUT),
        "{}",
        short.log()
    );
    let beside_short = Agent::start(
        &store.url(),
        &short.url("postgres"),
        &["--metrics-listen", "127.0.0.1:0"],
        &store.env(),
    );
    let r = last_recovery(&beside_short);
    assert_eq!(r["verdict"], "stopped-short", "{r:#}");
    assert!(r["unreplayed_bytes"].as_u64() > Some(0), "{r:#}");
    let status = soma(beside_short.addr(), &["status"]);
    assert_ne!(
        status.code, 0,
        "status must fail beside a short recovery:\n{status}"
    );
    assert!(
        status.stdout.contains("LAST RECOVERY STOPPED SHORT"),
        "status must say the recovery stopped short:\n{status}"
    );
    let samples = metrics::scrape(&beside_short.metrics_addr());
    assert_eq!(
        metrics::value(&samples, "soma_recovery_stopped_short", &[]),
        Some(1.0)
    );
    assert!(
        metrics::value(&samples, "soma_recovery_unreplayed_wal_bytes", &[]) > Some(0.0),
        "the metric must count the WAL left behind"
    );
    assert!(
        beside_short.logs().contains("STOPPED SHORT"),
        "the agent must log it:\n{}",
        beside_short.logs()
    );
}

/// `status -o json`'s `last_recovery`, once the agent found it.
fn last_recovery(agent: &Agent) -> serde_json::Value {
    poll_until(
        Duration::from_secs(60),
        "the agent to say where the last recovery ended",
        || {
            let out = soma(agent.addr(), &["-o", "json", "status"]);
            let r = out.json()[0]["last_recovery"].clone();
            (!r.is_null()).then_some(r)
        },
    )
}
