//! Unattended operation, with the real agent and plugin binaries against a real PostgreSQL 15:
//! schedules the agent runs with no client, failure records, and the Prometheus metrics that
//! change as backups, failures and WAL shipping happen (scraped over HTTP and parsed, as
//! Prometheus would).
//!
//! Schedules use a six-field cron expression that fires every second, with `--schedule-jitter 0s`,
//! so a scheduled run starts within a second; the tests wait by polling what a user would look at
//! (the backup list, `/metrics`), never by sleeping.

use std::{io::Write as _, time::Duration};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use soma_tests::{
    Agent, PgCluster, TestStore, listed_ids,
    metrics::{http_get, scrape, value},
    poll_until, soma,
};

fn small_cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table t (id int primary key); insert into t values (1), (2);",
    );
    pg
}

fn metric(addr: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    value(&scrape(addr), name, labels)
}

fn now_secs() -> f64 {
    Utc::now().timestamp_millis() as f64 / 1000.0
}

#[test]
fn a_schedule_backs_up_with_no_client_and_the_metrics_and_failure_records_show_it() {
    let pg = small_cluster();
    let store = TestStore::local();
    let started = now_secs();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &[
            "--schedule",
            "backup-postgres */2 * * * * *",
            "--schedule-jitter",
            "0s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &store.env(),
    );
    let m = agent.metrics_addr();
    // The store is probed in the background (scrapes only read memory): up within a refresh.
    poll_until(Duration::from_secs(30), "soma_store_up 1", || {
        (metric(&m, "soma_store_up", &[]) == Some(1.0)).then_some(())
    });
    let next = metric(
        &m,
        "soma_schedule_next_run_timestamp_seconds",
        &[("action", "backup-postgres"), ("cron", "*/2 * * * * *")],
    )
    .expect("the schedule's next run is exposed");
    assert!(next > started - 1.0 && next < now_secs() + 3.0, "{next}");

    // Nobody asks for a backup: the schedule takes one.
    let ids = poll_until(Duration::from_secs(90), "a scheduled backup", || {
        let ids = listed_ids(agent.addr());
        (!ids.is_empty()).then_some(ids)
    });
    let described = soma(agent.addr(), &["-o", "json", "describe", &ids[0]]);
    described.assert_success("describe the scheduled backup");
    assert_eq!(described.json()["kind"], "logical-cluster", "{described}");

    // The backup gauges come from the store, so they show it as soon as the run ends.
    let labels = [("engine", "postgres"), ("kind", "logical-cluster")];
    let last = poll_until(Duration::from_secs(60), "the backup gauges", || {
        metric(&m, "soma_backup_last_success_timestamp_seconds", &labels)
    });
    assert!(last >= started && last <= now_secs() + 1.0, "{last}");
    let samples = scrape(&m);
    let raw = value(
        &samples,
        "soma_backup_last_bytes",
        &[labels[0], labels[1], ("stage", "raw")],
    )
    .unwrap();
    let stored = value(
        &samples,
        "soma_backup_last_bytes",
        &[labels[0], labels[1], ("stage", "stored")],
    )
    .unwrap();
    assert!(raw > 0.0 && stored > 0.0, "raw {raw} stored {stored}");
    assert!(value(&samples, "soma_backup_last_duration_seconds", &labels).unwrap() >= 0.0);
    assert!(value(&samples, "soma_backups", &labels).unwrap() >= 1.0);

    // A failed backup is counted and recorded, and leaves nothing that looks like a backup.
    let before = listed_ids(agent.addr()).len();
    let failed = soma(agent.addr(), &["backup", "postgres", "--database", "nope"]);
    assert_ne!(failed.code, 0, "{failed}");
    let count = poll_until(Duration::from_secs(30), "the failure counter", || {
        metric(&m, "soma_backup_failures_total", &[("target", "nope")])
    });
    assert_eq!(count, 1.0);
    let records = store.list("failures/");
    let record: serde_json::Value = records
        .iter()
        .map(|k| serde_json::from_slice(&store.read(k)).unwrap())
        .find(|r: &serde_json::Value| r["target"] == "nope")
        .unwrap_or_else(|| panic!("no failure record for the failed backup: {records:?}"));
    assert_eq!(record["operation"], "backup");
    assert_eq!(record["trigger"], "client");
    assert!(
        record["error"].as_str().unwrap().contains("nope"),
        "{record}"
    );
    assert!(
        !listed_ids(agent.addr())
            .iter()
            .any(|id| id.contains("nope")),
        "a failed backup must not be listed"
    );
    assert!(listed_ids(agent.addr()).len() >= before);
}

#[test]
fn a_run_that_outlasts_its_interval_holds_its_target_and_skips_the_cron_times_it_covered() {
    let pg = small_cluster();
    // pg_dump cannot read t while this transaction holds it exclusively: the scheduled backup
    // waits, deterministically, until the test lets it go.
    let mut blocker = pg
        .client_command("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "appdb"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql");
    let mut blocker_in = blocker.stdin.take().expect("stdin");
    writeln!(blocker_in, "begin; lock table t in access exclusive mode;").unwrap();
    blocker_in.flush().unwrap();
    poll_until(Duration::from_secs(30), "the blocking lock", || {
        let held = pg.psql(
            "appdb",
            "select count(*) from pg_locks l join pg_class c on c.oid = l.relation where c.relname = 't' and l.granted and l.pid <> pg_backend_pid()",
        );
        (held.trim() != "0").then_some(())
    });

    let store = TestStore::local();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &[
            "--schedule",
            "backup-postgres * * * * * *",
            "--schedule-jitter",
            "0s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &store.env(),
    );
    let m = agent.metrics_addr();
    poll_until(
        Duration::from_secs(60),
        "the scheduled backup to wait for the lock",
        || {
            let waiting = pg.psql(
                "postgres",
                "select count(*) from pg_locks where not granted",
            );
            (waiting.trim() != "0").then_some(())
        },
    );
    let waiting_since = Utc::now();

    // The scheduled run holds the cluster: a client's whole-cluster backup is refused, naming it.
    let busy = soma(agent.addr(), &["backup", "postgres", "--all-databases"]);
    assert_ne!(busy.code, 0, "{busy}");
    busy.assert_stderr_contains("busy", "the refusal says the target is busy");
    busy.assert_stderr_contains("backup is already running", "and names the running job");

    // Two cron times pass while the run waits (the clock is what is being waited for here).
    poll_until(Duration::from_secs(10), "two cron times to pass", || {
        (Utc::now() - waiting_since > chrono::Duration::milliseconds(2100)).then_some(())
    });
    writeln!(blocker_in, "commit;").unwrap();
    drop(blocker_in);
    blocker.wait().expect("psql exits");

    let skipped = poll_until(
        Duration::from_secs(60),
        "the skipped runs to be counted",
        || {
            metric(
                &m,
                "soma_schedule_skipped_runs_total",
                &[("action", "backup-postgres")],
            )
            .filter(|n| *n >= 2.0)
        },
    );
    assert!(skipped >= 2.0, "{skipped}");
    let ids = poll_until(
        Duration::from_secs(60),
        "the held backup to complete",
        || {
            let ids = listed_ids(agent.addr());
            (!ids.is_empty()).then_some(ids)
        },
    );
    soma(agent.addr(), &["verify", &ids[ids.len() - 1]])
        .assert_success("verify the scheduled backup");
}

#[test]
fn a_run_missed_while_the_agent_was_down_runs_once_at_start_up() {
    let pg = small_cluster();
    let store = TestStore::local();
    let owner = "test-cluster/soma";
    let spec = "backup-postgres 0 3 1 1 *";
    // What an agent that last ran this yearly schedule on 2025-01-01 left in the store; the agent
    // was down at 2026-01-01 03:00 UTC, so that run was missed.
    let hash = |s: &str| hex::encode(&Sha256::digest(s.as_bytes())[..8]);
    let key = format!("schedules/{}/{}.json", hash(owner), hash(spec));
    let root = store.local_root().unwrap();
    std::fs::create_dir_all(root.join(&key).parent().unwrap()).unwrap();
    std::fs::write(
        root.join(&key),
        serde_json::json!({"schedule": spec, "last_run": "2025-01-01T03:00:00Z"}).to_string(),
    )
    .unwrap();
    let started = Utc::now();

    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &[
            "--owner-id",
            owner,
            "--schedule",
            spec,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &store.env(),
    );
    let ids = poll_until(Duration::from_secs(90), "the missed run", || {
        let ids = listed_ids(agent.addr());
        (!ids.is_empty()).then_some(ids)
    });
    assert_eq!(ids.len(), 1, "one missed run is run once: {ids:?}");
    let next = metric(
        &agent.metrics_addr(),
        "soma_schedule_next_run_timestamp_seconds",
        &[("action", "backup-postgres")],
    )
    .unwrap();
    let expected = DateTime::parse_from_rfc3339("2027-01-01T03:00:00Z").unwrap();
    assert_eq!(next, expected.timestamp() as f64);
    // The run is recorded, so the next start-up does not run it again.
    let persisted = poll_until(Duration::from_secs(30), "the recorded run", || {
        let p: serde_json::Value =
            serde_json::from_slice(&std::fs::read(root.join(&key)).ok()?).ok()?;
        let at = DateTime::parse_from_rfc3339(p["last_run"].as_str()?).ok()?;
        (at >= started).then_some(at)
    });
    assert!(persisted <= Utc::now());
}

#[test]
fn wal_shipping_and_base_backups_move_the_metrics_and_the_probes_answer() {
    let pg = PgCluster::start();
    pg.psql(
        "postgres",
        "create table w (id serial primary key, v text);",
    );
    let store = TestStore::local();
    let spool = tempfile::tempdir().unwrap();
    let spool_path = spool.path().display().to_string();
    let agent = Agent::start(
        &store.url(),
        &pg.url("postgres"),
        &[
            "--wal-stream",
            "--wal-spool",
            &spool_path,
            "--wal-partial-interval",
            "1s",
            "--wal-stuck-after",
            "3s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &store.env(),
    );
    let m = agent.metrics_addr();
    soma_tests::pitr::wait_archived(agent.addr(), &pg);
    let samples = scrape(&m);
    assert_eq!(value(&samples, "soma_wal_streaming", &[]), Some(1.0));
    assert_eq!(value(&samples, "soma_wal_receiving", &[]), Some(1.0));
    let first =
        value(&samples, "soma_wal_last_shipped_timestamp_seconds", &[]).expect("WAL was shipped");
    assert!(first > 0.0);
    // No base backup yet: no recovery window.
    assert_eq!(
        value(
            &samples,
            "soma_recovery_window_start_timestamp_seconds",
            &[]
        ),
        Some(0.0)
    );

    // New WAL is shipped: the shipped time moves and the lag drains.
    pg.psql(
        "postgres",
        "insert into w (v) select repeat('x', 1000) from generate_series(1, 5000);",
    );
    soma_tests::pitr::wait_archived(agent.addr(), &pg);
    let moved = poll_until(Duration::from_secs(60), "a later WAL shipment", || {
        metric(&m, "soma_wal_last_shipped_timestamp_seconds", &[]).filter(|t| *t > first)
    });
    assert!(moved > first);
    let lag = metric(&m, "soma_wal_archive_lag_bytes", &[]).unwrap();
    assert!(lag < 16.0 * 1024.0 * 1024.0, "lag {lag}");

    // A base backup opens the recovery window at its consistent point.
    let id = soma_tests::pitr::physical_backup(agent.addr());
    let described = soma(agent.addr(), &["-o", "json", "describe", &id]);
    described.assert_success("describe");
    let window_start = poll_until(Duration::from_secs(60), "the recovery window gauge", || {
        metric(&m, "soma_recovery_window_start_timestamp_seconds", &[]).filter(|t| *t > 0.0)
    });
    let earliest = described.json()["recovery_window"]["earliest_time"]
        .as_str()
        .map(|t| DateTime::parse_from_rfc3339(t).unwrap().timestamp_millis() as f64 / 1000.0)
        .unwrap_or_else(|| panic!("no recovery window in {described}"));
    assert!(
        (window_start - earliest).abs() < 0.01,
        "{window_start} vs {earliest}"
    );

    // The probes: alive while the stream moves; ready; nothing else is served.
    let (code, _, body) = http_get(&m, "/livez");
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(&m, "/readyz").0, 200);
    assert_eq!(http_get(&m, "/v1/backups").0, 404);

    // The server goes away: the stream stops receiving, and once that has lasted longer than
    // --wal-stuck-after the liveness probe fails, saying why (the kubelet then restarts the
    // sidecar, which restarts pg_receivewal). Readiness stays up: it must never take the
    // database's pod out of its Service.
    let mut pg = pg;
    pg.kill_9();
    let (code, _, body) = poll_until(
        Duration::from_secs(60),
        "the liveness probe to fail",
        || {
            let r = http_get(&m, "/livez");
            (r.0 == 503).then_some(r)
        },
    );
    assert_eq!(code, 503);
    assert!(body.contains("not been receiving"), "{body}");
    assert_eq!(metric(&m, "soma_wal_receiving", &[]), Some(0.0));
    assert_eq!(http_get(&m, "/readyz").0, 200);
}

#[test]
fn scheduled_verifies_and_drills_are_recorded_and_measured() {
    let pg = small_cluster();
    let store = TestStore::local();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &[
            "--schedule",
            "verify-latest * * * * * *",
            "--schedule",
            "drill */2 * * * * *",
            "--schedule-jitter",
            "0s",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &store.env(),
    );
    let m = agent.metrics_addr();
    // An empty store: the scheduled verify has nothing to read, and says so in a record.
    let failures = poll_until(
        Duration::from_secs(60),
        "a scheduled verify's failure",
        || {
            let out = soma(agent.addr(), &["list", "--failed", "-o", "json"]);
            out.assert_success("list --failed");
            let records = out.json();
            records
                .as_array()?
                .iter()
                .find(|r| r["trigger"] == "schedule: verify-latest * * * * * *")
                .cloned()
        },
    );
    assert_eq!(failures["operation"], "verify");
    assert!(
        failures["error"]
            .as_str()
            .unwrap()
            .contains("no complete backup"),
        "{failures}"
    );

    // Once there is a backup, both schedules pass on it: the gauges say when, and how fast the
    // drill restored it.
    let started = now_secs();
    soma(agent.addr(), &["backup", "postgres"]).assert_success("backup");
    let labels = [
        ("engine", "postgres"),
        ("target", "appdb"),
        ("kind", "logical"),
    ];
    let drilled = poll_until(Duration::from_secs(90), "a passing scheduled drill", || {
        metric(&m, "soma_drill_last_success_timestamp_seconds", &labels)
    });
    assert!(drilled >= started, "{drilled}");
    let rto = metric(&m, "soma_drill_last_rto_seconds", &labels).unwrap();
    assert!(rto > 0.0 && rto < 60.0, "{rto}");
    let verified = poll_until(
        Duration::from_secs(90),
        "a passing scheduled verify",
        || metric(&m, "soma_verify_last_success_timestamp_seconds", &labels),
    );
    assert!(verified >= started, "{verified}");
    // The drill left its report beside the backup, which `describe` shows.
    let ids = listed_ids(agent.addr());
    let described = soma(agent.addr(), &["-o", "json", "describe", &ids[0]]);
    described.assert_success("describe");
    assert_eq!(
        described.json()["last_drill"]["passed"],
        true,
        "{described}"
    );

    // A restarted agent reports the last passing drill from the stored report at once, rather
    // than nothing until its next drill.
    drop(agent);
    let report: serde_json::Value =
        serde_json::from_slice(&store.read(&format!("backups/{}/drill.json", ids[0])))
            .expect("drill.json");
    assert_eq!(report["passed"], true, "{report}");
    let drilled_at = chrono::DateTime::parse_from_rfc3339(report["drilled_at"].as_str().unwrap())
        .expect("drilled_at")
        .timestamp_micros() as f64
        / 1e6;
    let restarted = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--metrics-listen", "127.0.0.1:0"],
        &store.env(),
    );
    let m = restarted.metrics_addr();
    let restored = poll_until(
        Duration::from_secs(60),
        "the drill gauge of the restarted agent",
        || metric(&m, "soma_drill_last_success_timestamp_seconds", &labels),
    );
    assert!(
        (restored - drilled_at).abs() < 1e-3,
        "{restored} vs {drilled_at}"
    );
    let rto = metric(&m, "soma_drill_last_rto_seconds", &labels).unwrap();
    assert!(
        (rto - report["rto_seconds"].as_f64().unwrap()).abs() < 1e-6,
        "{rto} vs {report}"
    );
}
