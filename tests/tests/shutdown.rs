//! Stopping the agent: SIGTERM (what Kubernetes sends before it deletes a pod) must not cost WAL.
//! A real PostgreSQL 15 under a write load, the real agent streaming its WAL into a real S3 server
//! (Garage), and a restore with the real `soma-agent restore-pgdata` replayed by a real PostgreSQL.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use soma_tests::pitr::{
    AckedInserts, format_lsn, lsn, physical_backup, restore_and_start, wal_agent, wal_status,
};
use soma_tests::{Agent, PgCluster, TestStore, poll_until, soma};

/// The longest the agent may take to exit after SIGTERM: its 10 s wait for the WAL (the default
/// --wal-drain-timeout), 5 s to stop pg_receivewal, 30 s to ship, plus a second
/// (`StreamConfig::stop_bound`).
const EXIT_BOUND: Duration = Duration::from_secs(46);
/// The agent's default replication slot.
const SLOT: &str = "soma_wal_archive";

/// SIGTERM drains the WAL stream: every transaction the server acknowledged before the agent was
/// told to stop is in the archive when the agent exits, and a restore to `latest` has it.
///
/// The server commits synchronously (an acknowledged row is flushed), and the partial segment is
/// shipped only once an hour, so nothing but the drain can put the WAL written since the last
/// complete segment into the archive. A client commits rows one per transaction, recording every
/// id the server acknowledged; while it runs, the server's WAL flush position is read and the agent
/// gets SIGTERM. The agent must exit 0 within its bound, leave no pg_receivewal holding the slot,
/// and leave an archive whose recoverable window reaches that flush position; a restore of it to
/// `latest` must hold every row acknowledged before the signal. Before the drain existed the agent
/// exited at once and the restore lacked all of those rows.
#[test]
fn sigterm_drains_every_acknowledged_transaction_into_the_archive() {
    let store = TestStore::garage();
    let pg = PgCluster::start_with("-c synchronous_commit=on");
    let spool = tempfile::tempdir().expect("spool dir");
    let mut agent = wal_agent(&pg, &store, spool.path(), "1h");
    pg.psql(
        "postgres",
        "create table acked(id bigserial primary key, at timestamptz not null default clock_timestamp())",
    );
    let backup = physical_backup(agent.addr());

    let mut load = AckedInserts::start(&pg, "acked");
    // About 20 MiB of WAL beside the load: complete segments are shipped while it runs, so the
    // drain ships a partial segment after complete ones.
    pg.psql("postgres", "create table filler(n int, pad text)");
    pg.psql(
        "postgres",
        "insert into filler select g, repeat(md5(g::text), 16) from generate_series(1, 40000) g",
    );
    poll_until(
        Duration::from_secs(120),
        "a complete segment shipped and 1000 rows acknowledged",
        || {
            let status = wal_status(agent.addr());
            (status["segments_shipped"].as_u64() >= Some(1) && load.count() >= 1000).then_some(())
        },
    );
    let status = wal_status(agent.addr());
    assert_eq!(status["receiving"], true, "{status:#}");

    // The signal, while the client is still committing: everything acknowledged before the
    // flush position was read is at or before it.
    let acked_before: Vec<i64> = load.acked();
    let flushed = lsn(&pg.psql("postgres", "select pg_current_wal_flush_lsn()"));
    let archived_at_signal = lsn(status["archived_lsn"].as_str().unwrap_or("0/0"));
    let signalled = Instant::now();
    let exit = agent.terminate(EXIT_BOUND);
    let took = signalled.elapsed();
    let during_drain = load.count() - acked_before.len();
    load.stop();
    let logs = agent.logs();
    let exit = exit.unwrap_or_else(|| {
        panic!("the agent did not exit within {EXIT_BOUND:?} of SIGTERM:\n{logs}")
    });
    assert!(
        exit.success(),
        "the agent must exit 0 after a clean drain ({exit}):\n{logs}"
    );
    // What the agent says it did, for the record; the assertions below check what it did.
    let drained = logs
        .lines()
        .find(|l| l.contains("drained"))
        .unwrap_or("(no drain logged)");
    eprintln!(
        "shutdown: {} rows acknowledged before SIGTERM, {during_drain} more while draining; \
         server flush {}, archive status just before the signal {} ({} bytes behind); agent exited {exit} \
         {:.2} s after SIGTERM\n  {drained}",
        acked_before.len(),
        format_lsn(flushed),
        format_lsn(archived_at_signal),
        flushed.saturating_sub(archived_at_signal),
        took.as_secs_f64(),
    );
    // The archive's window, as any agent reads it from the store, reaches the flush position.
    let reader = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let described = soma(reader.addr(), &["-o", "json", "describe", &backup]);
    described.assert_success("describe -o json");
    let window = &described.json()["recovery_window"];
    let reached = lsn(window["latest_lsn"].as_str().unwrap_or("0/0"));
    assert!(
        reached >= flushed,
        "the archive reaches {} but the server had flushed {} at SIGTERM: {window:#}",
        format_lsn(reached),
        format_lsn(flushed)
    );
    assert_eq!(
        window["gaps"].as_array().map(Vec::len),
        Some(0),
        "{window:#}"
    );
    drop(reader);

    let restored = restore_and_start(&store, &["--backup", "latest", "--target", "latest"]);
    let present: BTreeSet<i64> = restored
        .psql(
            "postgres",
            "select coalesce(string_agg(id::text, ','), '') from acked",
        )
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let missing: Vec<i64> = acked_before
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} rows acknowledged before SIGTERM are missing from the restore (first {:?}); \
         the archive reaches {}, the server had flushed {}",
        missing.len(),
        acked_before.len(),
        &missing[..missing.len().min(10)],
        format_lsn(reached),
        format_lsn(flushed)
    );
    // pg_receivewal is gone with the agent: the slot has no receiver and no pid file is left.
    poll_until(
        Duration::from_secs(30),
        "the replication slot to have no receiver",
        || {
            let active = pg.psql(
                "postgres",
                &format!("select active from pg_replication_slots where slot_name = '{SLOT}'"),
            );
            (active == "f").then_some(())
        },
    );
    assert!(
        !spool.path().join("soma-pg_receivewal.pid").exists(),
        "the pid file of pg_receivewal must be removed"
    );

    assert!(
        drained.contains("the archive reaches the server's WAL flush position"),
        "the agent must log that its drain reached the flush position:\n{logs}"
    );
    eprintln!(
        "shutdown: the restore holds all {} rows acknowledged before SIGTERM ({} rows in all)",
        acked_before.len(),
        present.len()
    );
}

/// A stream that is not receiving has nothing to drain: with the server gone (killed, so
/// pg_receivewal exited and the agent is retrying with back-off), SIGTERM stops the agent at once
/// and it exits 0 — the back-off sleep and the next attempt's connection do not hold it up.
#[test]
fn sigterm_with_the_server_down_stops_at_once() {
    let store = TestStore::garage();
    let mut pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let mut agent = wal_agent(&pg, &store, spool.path(), "1s");
    poll_until(Duration::from_secs(60), "the stream to receive", || {
        (wal_status(agent.addr())["receiving"] == true).then_some(())
    });
    pg.kill_9();
    poll_until(
        Duration::from_secs(60),
        "the stream to notice the server is gone",
        || {
            let status = wal_status(agent.addr());
            (status["receiving"] == false && status["last_error"] != "").then_some(status)
        },
    );
    let signalled = Instant::now();
    let exit = agent.terminate(Duration::from_secs(10));
    let took = signalled.elapsed();
    let logs = agent.logs();
    let exit = exit.unwrap_or_else(|| panic!("the agent did not exit within 10 s:\n{logs}"));
    assert!(exit.success(), "{exit}:\n{logs}");
    assert!(
        took < Duration::from_secs(5),
        "stopping took {took:?} with nothing to drain:\n{logs}"
    );
    assert!(logs.contains("WAL stream stopped"), "{logs}");
    eprintln!(
        "shutdown with the server down: exited {exit} {:.2} s after SIGTERM",
        took.as_secs_f64()
    );
}
