//! Point-in-time recovery across timelines: a cluster restored to a point in time starts a new
//! timeline, its agent streams that timeline into the same WAL archive (same system identifier),
//! and a later restore from the original base backup follows timeline 1 up to the switch and then
//! timeline 2 — as PostgreSQL's `recovery_target_timeline = 'latest'` does with a real archive.
//! Real PostgreSQL 15 servers, a real Garage S3 server, the real `soma-agent` and `kubectl-soma`.

use std::time::Duration;

use soma_tests::pitr::{
    insert_tagged, physical_backup, restore_and_start, server_time, tagged_rows as rows, timeline,
    wait_archived, wal_agent, wal_status,
};
use soma_tests::store::S3_PREFIX;
use soma_tests::{PgCluster, TestStore, poll_until, soma};

/// Rows committed before the first restore point, on the original timeline.
const TL1_BEFORE: &str = "tl1-before";
/// Rows committed after the first restore point: discarded by the first restore.
const TL1_AFTER: &str = "tl1-after";
/// Rows written on the restored cluster (timeline 2) before the second restore point.
const TL2_BEFORE: &str = "tl2-before";
/// Rows written on timeline 2 after the second restore point: discarded by the second restore.
const TL2_AFTER: &str = "tl2-after";

/// Restores to a time T1, writes on the restored cluster (now on timeline 2, streamed by its own
/// agent into the same archive), then restores the same base backup again to a time T2 on
/// timeline 2. Checks what a user checks: the first restore holds exactly the rows committed
/// before T1 and runs on timeline 2; the archive holds `00000002.history`; the second restore
/// (by backup id, and again with `--backup latest`) holds exactly the rows committed before T1 on
/// timeline 1 plus those committed before T2 on timeline 2 — the same ids, tags and times as the
/// timeline-2 cluster — replayed from timeline 2's archived segments, and runs on timeline 3;
/// `describe` shows the base backup's recoverable window ending on timeline 2 without gaps.
#[test]
fn restore_write_and_restore_again_to_a_time_on_the_new_timeline() {
    let store = TestStore::garage();
    let spool1 = tempfile::tempdir().expect("spool directory");
    let spool2 = tempfile::tempdir().expect("spool directory");

    // 1. The original cluster, its streaming agent, and a base backup.
    let c1 = PgCluster::start_with("-c track_commit_timestamp=on");
    let a1 = wal_agent(&c1, &store, spool1.path(), "1s");
    c1.psql(
        "postgres",
        "create table events(id bigserial primary key, tag text, \
         at timestamptz default clock_timestamp())",
    );
    let system_id = c1.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    );
    let backup = physical_backup(a1.addr());

    // 2. Timeline 1: rows before T1, T1, rows after T1, all archived.
    insert_tagged(&c1, TL1_BEFORE, 3);
    let t1 = server_time(&c1);
    insert_tagged(&c1, TL1_AFTER, 3);
    wait_archived(a1.addr(), &c1);
    let c1_before = rows(&c1, &format!("where tag = '{TL1_BEFORE}'"));
    assert_eq!(c1_before.len(), 3, "rows on the original cluster");

    // 3. Restore to T1: a new cluster on timeline 2 with exactly the rows before T1.
    let c2 = restore_and_start(&store, &["--backup", &backup, "--target-time", &t1]);
    // Its agent starts at once: pg_receivewal begins at the start of the server's current WAL
    // segment, which must still be the one holding the switch to timeline 2.
    let a2 = wal_agent(&c2, &store, spool2.path(), "1s");
    poll_until(
        Duration::from_secs(60),
        "the restored cluster's agent to stream timeline 2",
        || {
            let s = wal_status(a2.addr());
            (s["receiving"] == serde_json::Value::Bool(true) && s["timeline"] == 2).then_some(())
        },
    );
    assert_eq!(
        rows(&c2, ""),
        c1_before,
        "the restore to T1 = {t1} does not hold exactly the rows committed before T1"
    );
    assert_eq!(
        timeline(&c2),
        2,
        "the restore to T1 is not on timeline 2; server log:\n{}",
        c2.log()
    );
    assert!(
        c2.log().contains("selected new timeline ID: 2"),
        "the server log of the restore to T1 does not report the new timeline:\n{}",
        c2.log()
    );
    assert_eq!(
        c2.psql(
            "postgres",
            "select system_identifier from pg_control_system()"
        ),
        system_id,
        "a point-in-time restore keeps the system identifier (so the archive folder)"
    );

    // 4. Timeline 2: rows before T2, T2, rows after T2, all archived in the same folder.
    insert_tagged(&c2, TL2_BEFORE, 3);
    let t2 = server_time(&c2);
    insert_tagged(&c2, TL2_AFTER, 3);
    wait_archived(a2.addr(), &c2);
    let c2_upto_t2 = rows(&c2, &format!("where tag <> '{TL2_AFTER}'"));
    assert_eq!(
        c2_upto_t2.len(),
        6,
        "rows on timeline 2 before T2: {c2_upto_t2:?}"
    );

    let garage = store.garage_server().expect("an S3 store");
    let wal_keys = garage.list_keys(&format!("{S3_PREFIX}/wal/"));
    let folder = format!("{S3_PREFIX}/wal/{system_id}/");
    assert!(
        wal_keys
            .iter()
            .any(|k| k.starts_with(&format!("{folder}00000002.history."))),
        "the archive holds no 00000002.history in {folder}: {wal_keys:#?}"
    );
    assert!(
        wal_keys
            .iter()
            .any(|k| k.starts_with(&format!("{folder}00000002")) && !k.contains(".history.")),
        "the archive holds no WAL segment of timeline 2 in {folder}: {wal_keys:#?}"
    );

    // The base backup's recoverable window now ends on timeline 2, without gaps.
    let out = soma(a1.addr(), &["describe", &backup, "-o", "json"]);
    out.assert_success("describe BASE -o json");
    let window = &out.json()["recovery_window"];
    assert_eq!(
        window["timeline"], 2,
        "the recoverable window does not follow timeline 2:\n{out}"
    );
    assert_eq!(
        window["gaps"],
        serde_json::json!([]),
        "the recoverable window has gaps:\n{out}"
    );
    // `verify` re-reads that whole chain, across the switch, including timeline 2's history.
    let verified = soma(a1.addr(), &["verify", &backup]);
    verified.assert_success("verify BASE");
    assert!(
        verified.stdout.contains("on timeline 2"),
        "verify must follow the chain onto timeline 2:\n{verified}"
    );

    // 5. Restore the same base backup to T2: timeline 1 up to the switch, then timeline 2.
    let c3 = restore_and_start(&store, &["--backup", &backup, "--target-time", &t2]);
    check_second_restore(&c3, &c2_upto_t2, &t2);

    // `--backup latest` picks the base backup itself and gets the same result.
    let c4 = restore_and_start(&store, &["--backup", "latest", "--target-time", &t2]);
    check_second_restore(&c4, &c2_upto_t2, &t2);
}

/// The checks on a restore to T2 (on timeline 2) from the base backup taken on timeline 1.
fn check_second_restore(restored: &PgCluster, expected: &[String], t2: &str) {
    let log = restored.log();
    assert_eq!(
        rows(restored, ""),
        expected,
        "the restore to T2 = {t2} does not hold exactly the rows of timeline 1 before T1 and of \
         timeline 2 before T2; server log:\n{log}"
    );
    assert!(
        log.contains("restored log file \"00000002.history\" from archive"),
        "the restore to T2 did not read timeline 2's history from the archive; server log:\n{log}"
    );
    assert!(
        log.contains("restored log file \"00000002"),
        "the restore to T2 replayed no WAL segment of timeline 2; server log:\n{log}"
    );
    // Promotion after following timeline 2 starts timeline 3.
    assert_eq!(
        timeline(restored),
        3,
        "the restore to T2 is not on timeline 3; server log:\n{log}"
    );
}
