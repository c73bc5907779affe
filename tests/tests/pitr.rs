//! PostgreSQL point-in-time recovery end to end: a real PostgreSQL 15 whose WAL the real agent
//! streams (pg_receivewal through a replication slot) into a real S3 server (Garage), physical base
//! backups through the plugin, and restores with `soma-agent restore-pgdata` into fresh data
//! directories that a real PostgreSQL then replays through `soma-agent wal-fetch`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use soma_tests::pg::PG_BIN_DIR;
use soma_tests::pitr::{
    AckedInserts, pgbench_init, physical_backup, restore_and_start, wait_archived, wal_agent,
    wal_status,
};
use soma_tests::{PgCluster, TestStore, poll_until, soma};

/// The server's clock now, as psql prints a timestamptz (`2026-11-29 14:35:01.800778+00`): what a
/// user copies into --target-time.
fn server_now(pg: &PgCluster) -> String {
    pg.psql("postgres", "select clock_timestamp()")
}

/// Starts pgbench against `pg` in the background with `args` (output captured, killed on drop).
fn pgbench(pg: &PgCluster, args: &[&str]) -> std::process::Child {
    pg.client_command(Path::new(PG_BIN_DIR).join("pgbench"))
        .args(args)
        .arg("postgres")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run pgbench")
}

fn count(pg: &PgCluster, sql: &str) -> u64 {
    pg.psql("postgres", sql)
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: not a number ({e})"))
}

/// Restoring to a time T returns exactly the transactions committed at or before T: rows are
/// inserted in a steady stream (their commit times tracked by PostgreSQL itself with
/// track_commit_timestamp), T is taken in the middle, the stream goes on, and the restored
/// cluster must hold exactly the rows whose commit time is ≤ T — no more, no fewer.
#[test]
fn restore_to_a_time_returns_exactly_the_rows_committed_by_then() {
    let store = TestStore::garage();
    let pg = PgCluster::start_with("-c track_commit_timestamp=on");
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    pg.psql(
        "postgres",
        "create table stamped(id bigserial primary key, at timestamptz not null default clock_timestamp())",
    );
    let backup = physical_backup(agent.addr());

    let script = tempfile::NamedTempFile::new().expect("pgbench script");
    std::fs::write(script.path(), "insert into stamped default values;\n").unwrap();
    std::fs::set_permissions(
        script.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let script_path = script.path().display().to_string();
    // 150 transactions a second for 8 seconds, one row each.
    let load = pgbench(
        &pg,
        &["-n", "-c", "1", "-R", "150", "-T", "8", "-f", &script_path],
    );
    poll_until(Duration::from_secs(30), "400 rows before T", || {
        (count(&pg, "select count(*) from stamped") >= 400).then_some(())
    });
    let t = server_now(&pg);
    let out = load.wait_with_output().expect("pgbench");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let committed_by_t = format!(
        "select coalesce(string_agg(id::text, ',' order by id), '') from stamped \
         where pg_xact_commit_timestamp(xmin) <= '{t}'::timestamptz"
    );
    let expected = pg.psql("postgres", &committed_by_t);
    let after_t = count(
        &pg,
        &format!(
            "select count(*) from stamped where pg_xact_commit_timestamp(xmin) > '{t}'::timestamptz"
        ),
    );
    assert!(
        after_t >= 100,
        "the stream must go on after T (only {after_t} rows after it)"
    );
    assert!(expected.split(',').count() >= 400);
    wait_archived(agent.addr(), &pg);

    let restored = restore_and_start(&store, &["--backup", &backup, "--target-time", &t]);
    let got = restored.psql(
        "postgres",
        "select coalesce(string_agg(id::text, ',' order by id), '') from stamped",
    );
    assert_eq!(
        got,
        expected,
        "the restored rows differ from those committed at or before {t}; server log:\n{}",
        restored.log()
    );
    assert!(
        restored.log().contains("recovery stopping before commit"),
        "recovery must stop at the target, not at the end of the WAL:\n{}",
        restored.log()
    );
    // `latest` picks the same base backup (the only one) and reaches the same point.
    let again = restore_and_start(&store, &["--backup", "latest", "--target-time", &t]);
    assert_eq!(
        again.psql(
            "postgres",
            "select coalesce(string_agg(id::text, ',' order by id), '') from stamped"
        ),
        expected
    );
}

/// A row a client saw committed: (id, commit-side timestamp as epoch seconds).
fn id_and_time(line: &str) -> Option<(i64, f64)> {
    let (id, at) = line.split_once('|')?;
    Some((id.parse().ok()?, at.parse().ok()?))
}

/// The disaster: under a pgbench load plus a client committing rows one by one, the whole pod dies
/// at once (agent and server killed with SIGKILL) and the data directory is deleted. Restoring
/// `latest` brings back every acknowledged transaction except those of the last partial-shipping
/// interval: the measured loss (RPO) must be within the interval (5 s, the default) plus a few
/// seconds; the restore time (RTO) for this database is measured and printed.
#[test]
fn disaster_restore_latest_loses_at_most_the_partial_interval() {
    const INTERVAL_S: f64 = 5.0;
    let store = TestStore::garage();
    // Every acknowledged commit is flushed, as in production (the harness default is off).
    let mut pg = PgCluster::start_with("-c synchronous_commit=on");
    let spool = tempfile::tempdir().expect("spool dir");
    let mut agent = wal_agent(&pg, &store, spool.path(), "5s");
    pgbench_init(&pg, "postgres", 2);
    pg.psql(
        "postgres",
        "create table stamped(id bigserial primary key, at timestamptz not null default clock_timestamp())",
    );
    physical_backup(agent.addr());

    let mut load = pgbench(&pg, &["-n", "-c", "2", "-T", "120"]);
    let mut inserter =
        AckedInserts::start_returning(&pg, "stamped", "id, extract(epoch from at)", id_and_time);
    // Run long enough for complete segments and several partial shipments.
    let started = Instant::now();
    poll_until(
        Duration::from_secs(90),
        "12 s of load with WAL shipped",
        || {
            let status = wal_status(agent.addr());
            (started.elapsed() >= Duration::from_secs(12)
                && status["segments_shipped"].as_u64() >= Some(1)
                && status["partials_shipped"].as_u64() >= Some(1))
            .then_some(())
        },
    );

    // The pod dies: the sidecar and the server together, then the volume is lost.
    agent.kill_9();
    pg.kill_9();
    let crashed_at = Instant::now();
    inserter.wait_exit();
    let _ = load.kill();
    let _ = load.wait();
    std::fs::remove_dir_all(pg.data_path()).expect("delete the data directory");
    let acked = inserter.acked();
    assert!(acked.len() > 1000, "only {} rows acknowledged", acked.len());
    let &(last_id, last_at) = acked.last().unwrap();

    let rto = Instant::now();
    let restored = restore_and_start(&store, &["--backup", "latest", "--target", "latest"]);
    let rto = rto.elapsed();
    let (max_id, max_at): (i64, f64) = {
        let row = restored.psql(
            "postgres",
            "select max(id), extract(epoch from max(at)) from stamped",
        );
        let (a, b) = row.split_once('|').expect("two columns");
        (a.parse().unwrap(), b.parse().unwrap())
    };
    // No acknowledged row before the recovery point may be missing.
    let present: BTreeSet<i64> = restored
        .psql(
            "postgres",
            "select coalesce(string_agg(id::text, ','), '') from stamped",
        )
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let holes: Vec<i64> = acked
        .iter()
        .map(|a| a.0)
        .filter(|id| *id <= max_id && !present.contains(id))
        .collect();
    assert!(
        holes.is_empty(),
        "acknowledged rows missing before the recovery point: {holes:?}"
    );
    let lost: Vec<&(i64, f64)> = acked.iter().filter(|a| a.0 > max_id).collect();
    let window = (last_at - max_at).max(0.0);
    eprintln!(
        "disaster: {} acknowledged commits, last id {last_id}; restored up to id {max_id}; \
         lost {} committed transactions spanning {window:.2} s (RPO); \
         restore-pgdata + replay + promote took {:.1} s (RTO), {:.1} s after the crash; \
         pgbench tables: {} accounts",
        acked.len(),
        lost.len(),
        rto.as_secs_f64(),
        crashed_at.elapsed().as_secs_f64(),
        restored.psql("postgres", "select count(*) from pgbench_accounts"),
    );
    assert!(
        window <= INTERVAL_S + 3.0,
        "lost {} transactions spanning {window:.2} s, more than the {INTERVAL_S} s interval plus 3 s",
        lost.len()
    );
    assert_eq!(
        count(&restored, "select count(*) from pgbench_accounts"),
        200_000,
        "the pgbench tables came back whole"
    );
}

/// Killing the agent mid-stream (SIGKILL, while pg_receivewal keeps running as an orphan and the
/// server keeps writing) and starting it again on the same spool loses no WAL — the replication
/// slot held it — and stores no second, different copy of any segment: the archive has no gap, and
/// a restore to `latest` equals the live server row for row.
#[test]
fn an_agent_restart_mid_stream_loses_no_wal() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let mut agent = wal_agent(&pg, &store, spool.path(), "1s");
    pgbench_init(&pg, "postgres", 1);
    let backup = physical_backup(agent.addr());

    pg.psql("postgres", "create table filler(n int, pad text)");
    // About 20 MiB of WAL per call: more than a segment, whatever pgbench manages meanwhile.
    let fill = || {
        pg.psql(
            "postgres",
            "insert into filler select g, repeat(md5(g::text), 16) from generate_series(1, 40000) g",
        )
    };
    let load = pgbench(&pg, &["-n", "-c", "2", "-T", "10"]);
    fill();
    poll_until(Duration::from_secs(60), "a segment shipped", || {
        (wal_status(agent.addr())["segments_shipped"].as_u64() >= Some(1)).then_some(())
    });
    agent.kill_9();
    // The server goes on writing while no agent runs (its orphaned pg_receivewal may still be
    // receiving); then the agent comes back on its spool and must take the slot over.
    fill();
    fill();
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    fill();
    let out = load.wait_with_output().expect("pgbench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    pg.psql("postgres", "create table marker as select 1 as done");
    // The new agent took the slot over from the orphaned pg_receivewal and caught up.
    wait_archived(agent.addr(), &pg);
    assert!(
        agent
            .logs()
            .contains("stopping the pg_receivewal a previous agent left running"),
        "the killed agent's pg_receivewal must be stopped by its successor:\n{}",
        agent.logs()
    );

    // At most one complete object per segment: nothing stored twice with different content.
    let garage = store.garage_server().expect("S3 store");
    let keys = garage.list_keys("some/prefix/wal/");
    let mut complete: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for key in &keys {
        let name = key.rsplit('/').next().unwrap();
        let mut parts = name.split('.');
        let (file, kind) = (parts.next().unwrap(), parts.next().unwrap());
        if kind == "seg" {
            complete
                .entry(file.to_owned())
                .or_default()
                .push(key.clone());
        }
    }
    assert!(complete.len() >= 3, "too few segments archived: {keys:#?}");
    for (file, objects) in &complete {
        assert_eq!(
            objects.len(),
            1,
            "segment {file} stored more than once: {objects:#?}"
        );
    }
    let described = soma(agent.addr(), &["-o", "json", "describe", &backup]);
    described.assert_success("describe");
    let window = &described.json()["recovery_window"];
    assert_eq!(
        window["gaps"].as_array().map(Vec::len),
        Some(0),
        "the archive must have no gap: {window:#}"
    );

    let restored = restore_and_start(&store, &["--backup", "latest", "--target", "latest"]);
    for sql in [
        "select count(*) from pgbench_history",
        "select sum(abalance) from pgbench_accounts",
        "select count(*) from marker",
        "select count(*), sum(n) from filler",
    ] {
        assert_eq!(
            restored.psql("postgres", sql),
            pg.psql("postgres", sql),
            "{sql}"
        );
    }
}

/// The base backup's manifest and the live archive are visible to the user: `describe` shows the
/// recoverable window growing as WAL is shipped, and `status` the archive lag.
#[test]
fn describe_shows_the_recoverable_window_and_status_the_archive() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let backup = physical_backup(agent.addr());
    let manifest = soma(agent.addr(), &["-o", "json", "describe", &backup]);
    manifest.assert_success("describe");
    let m = manifest.json();
    assert_eq!(m["kind"], "physical");
    assert_eq!(m["artifacts"][0]["name"], "base.tar.zst");
    let system_id = pg.psql(
        "postgres",
        "select system_identifier from pg_control_system()",
    );
    assert_eq!(m["details"]["system_id"], system_id.as_str());
    let stop = soma_tests::pitr::lsn(m["details"]["stop_lsn"].as_str().unwrap());

    pg.psql(
        "postgres",
        "create table t as select generate_series(1, 100000) as n",
    );
    let server = wait_archived(agent.addr(), &pg);
    let described = soma(agent.addr(), &["-o", "json", "describe", &backup]).json();
    let w = &described["recovery_window"];
    assert!(soma_tests::pitr::lsn(w["latest_lsn"].as_str().unwrap()) >= server);
    assert!(soma_tests::pitr::lsn(w["earliest_lsn"].as_str().unwrap()) == stop);
    assert_eq!(w["gaps"].as_array().map(Vec::len), Some(0));
    let table = soma(agent.addr(), &["describe", &backup]);
    table.assert_success("describe");
    assert!(
        table.stdout.contains("Recoverable:") && table.stdout.contains("WAL gaps:    none"),
        "{table}"
    );

    let status = wal_status(agent.addr());
    assert_eq!(status["receiving"], true, "{status:#}");
    assert_eq!(status["system_id"], system_id.as_str());
    assert_eq!(
        status["lag_bytes"].as_u64().map(|l| l < (16 << 20)),
        Some(true)
    );
    let list = soma(agent.addr(), &["list"]);
    assert!(list.stdout.contains("postgres (physical)"), "{list}");

    // A logical restore of a physical backup is refused with the way to do it.
    let wrong = soma(agent.addr(), &["restore", &backup]);
    assert_ne!(wrong.code, 0);
    assert!(wrong.stderr.contains("--pgdata"), "{wrong}");

    // A data directory outside the agent's --restore-root is refused before anything is
    // written: elsewhere, through `..`, or through a symbolic link leading out.
    let tmp = std::env::temp_dir();
    let escape = tempfile::tempdir_in(&tmp).unwrap();
    let elsewhere = tempfile::tempdir_in("/var/tmp").unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), escape.path().join("out")).unwrap();
    for (pgdata, why) in [
        ("/var/tmp/soma-restore-target".to_string(), "not below it"),
        (
            format!("{}/../var/tmp/soma-restore-target", tmp.display()),
            "`..`",
        ),
        (
            format!("{}/out/data", escape.path().display()),
            "symbolic link",
        ),
    ] {
        let out = soma(agent.addr(), &["restore", &backup, "--pgdata", &pgdata]);
        assert_ne!(out.code, 0, "{pgdata}: {out}");
        out.assert_stderr_contains("--restore-root", &pgdata)
            .assert_stderr_contains(why, &pgdata);
    }
    assert!(!std::path::Path::new("/var/tmp/soma-restore-target").exists());
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}

/// Command-line mistakes of a physical restore are refused before anything is written.
#[test]
fn restore_pgdata_refuses_bad_requests_without_writing() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let logical = soma(agent.addr(), &["-o", "json", "backup", "postgres"]);
    logical.assert_success("logical backup");
    let logical_id = logical.json()["id"].as_str().unwrap().to_owned();

    let target = PgCluster::empty();
    // No physical backup yet.
    let out = soma_tests::pitr::restore_pgdata(&target, &store, &["--target", "latest"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("--physical"), "{out}");
    // A logical backup named explicitly.
    let out = soma_tests::pitr::restore_pgdata(&target, &store, &["--backup", &logical_id]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not a physical base backup"), "{out}");
    let backup = physical_backup(agent.addr());
    // A manifest forged to carry a shell payload (or a path) as the system identifier, which
    // names the archive's folder and reaches restore_command: refused before anything is written.
    let key = format!("backups/{backup}/manifest.json");
    let original = store.read(&key);
    let marker = std::env::temp_dir().join(format!("soma-forged-{}", std::process::id()));
    for forged in [
        format!("1; touch {}", marker.display()),
        "../backups".to_string(),
    ] {
        let mut manifest: serde_json::Value = serde_json::from_slice(&original).unwrap();
        manifest["details"]["system_id"] = forged.clone().into();
        store.write(&key, serde_json::to_vec_pretty(&manifest).unwrap());
        let out = soma_tests::pitr::restore_pgdata(&target, &store, &["--backup", &backup]);
        assert_ne!(out.code, 0, "{forged}: {out}");
        assert!(
            out.stderr.contains("not a PostgreSQL system identifier"),
            "{forged}: {out}"
        );
        assert!(!target.data_path().exists() && !marker.exists(), "{forged}");
    }
    store.write(&key, original);
    // A target before the base backup was consistent.
    let out = soma_tests::pitr::restore_pgdata(
        &target,
        &store,
        &["--backup", &backup, "--target-time", "2020-01-01T00:00:00Z"],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("after the target"), "{out}");
    // A target in the future, beyond the archive.
    let out = soma_tests::pitr::restore_pgdata(
        &target,
        &store,
        &["--target-time", "2099-01-01T00:00:00Z"],
    );
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("later than the newest WAL"), "{out}");
    assert!(
        !target.data_path().exists(),
        "nothing may be written for a refused restore"
    );
    // A non-empty data directory.
    std::fs::create_dir_all(target.data_path()).unwrap();
    std::fs::write(target.data_path().join("PG_VERSION"), "15\n").unwrap();
    let out = soma_tests::pitr::restore_pgdata(&target, &store, &["--target", "latest"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not empty"), "{out}");
    assert_eq!(
        std::fs::read_dir(target.data_path()).unwrap().count(),
        1,
        "the existing directory is left alone"
    );
}

/// Direct use without Kubernetes: `kubectl soma backup all --physical` takes the PostgreSQL member
/// as a base backup, and `kubectl soma restore latest --pgdata DIR --target-lsn L` has the agent lay
/// it into a directory on its host, owned by the directory's owner so PostgreSQL can start there.
#[test]
fn the_plugin_drives_physical_backups_and_restores_through_the_agent() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let set = soma(agent.addr(), &["-o", "json", "backup", "all", "--physical"]);
    set.assert_success("backup all --physical");
    let member = set.json()["members"][0]
        .as_str()
        .expect("the set names its member")
        .to_owned();
    let described = soma(agent.addr(), &["-o", "json", "describe", &member]);
    described.assert_success("describe member");
    assert_eq!(described.json()["kind"], "physical");

    pg.psql(
        "postgres",
        "create table kept as select generate_series(1, 1000) as n",
    );
    let target_lsn = pg.psql("postgres", "select pg_current_wal_insert_lsn()");
    pg.psql("postgres", "create table dropped_later as select 1 as n");
    wait_archived(agent.addr(), &pg);

    let mut target = PgCluster::empty();
    let data = target.data_path().display().to_string();
    let out = soma(
        agent.addr(),
        &[
            "restore",
            "latest",
            "--pgdata",
            &data,
            "--target-lsn",
            &target_lsn,
        ],
    );
    out.assert_success("restore --pgdata");
    assert!(out.stdout.contains(&member), "{out}");
    target
        .start_existing(&store.env())
        .unwrap_or_else(|e| panic!("the restored server did not start:\n{e}"));
    assert!(
        target.wait_promoted_or_stopped(soma_tests::pitr::PROMOTE_TIMEOUT),
        "{}",
        target.log()
    );
    assert_eq!(target.psql("postgres", "select sum(n) from kept"), "500500");
    assert_eq!(
        target.psql(
            "postgres",
            "select count(*) from pg_tables where tablename = 'dropped_later'"
        ),
        "0",
        "recovery stops at the target LSN"
    );
    // The set's physical member cannot go into a running server: restoring the set says how it
    // is restored (the exact restore-pgdata command) and restores nothing in place.
    let set_id = set.json()["id"].as_str().unwrap().to_owned();
    let explained = soma(agent.addr(), &["restore", &set_id]);
    explained.assert_success("restore of a set with a physical member");
    assert!(
        explained
            .stdout
            .contains(&format!("soma-agent restore-pgdata --backup {member}")),
        "{explained}"
    );
    assert!(explained.stdout.contains("0 member(s)"), "{explained}");
}

/// Retention: deleting a base backup also deletes the WAL segments that no remaining base backup
/// needs (those before the oldest remaining one's start), and nothing else — the remaining backup
/// still restores, with no gap. Deleting the last base backup keeps the archive whole.
#[test]
fn deleting_a_base_backup_prunes_only_the_wal_no_other_backup_needs() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    pg.psql("postgres", "create table t(n int)");
    let first = physical_backup(agent.addr());
    for i in 0..3 {
        pg.psql(
            "postgres",
            &format!("insert into t values ({i}); select pg_switch_wal();"),
        );
    }
    let second = physical_backup(agent.addr());
    pg.psql(
        "postgres",
        "insert into t values (100); select pg_switch_wal(); insert into t values (101);",
    );
    wait_archived(agent.addr(), &pg);

    let garage = store.garage_server().expect("S3 store");
    let described = soma(agent.addr(), &["-o", "json", "describe", &second]).json();
    let details = &described["details"];
    let seg_size = details["wal_segment_size"].as_u64().unwrap();
    let second_start = soma_tests::pitr::lsn(details["start_lsn"].as_str().unwrap()) / seg_size;
    // Segment number from a WAL object's key (history files have none).
    let segno = |key: &str| -> Option<u64> {
        let name = key.rsplit('/').next()?.split('.').next()?;
        (name.len() == 24).then(|| soma_tests::pitr::segno_of(name, seg_size))
    };
    let older = |keys: &[String]| {
        keys.iter()
            .filter(|k| segno(k).is_some_and(|s| s < second_start))
            .count()
    };
    let before = garage.list_keys("some/prefix/wal/");
    assert!(
        older(&before) >= 3,
        "WAL before the second backup: {before:#?}"
    );

    let out = soma(agent.addr(), &["-o", "json", "delete", &first, "--yes"]);
    out.assert_success("delete the first base backup");
    let after = garage.list_keys("some/prefix/wal/");
    assert_eq!(
        older(&after),
        0,
        "WAL only the deleted backup needed: {after:#?}"
    );
    // Every complete segment the remaining backup needs is still there (partials of the segment
    // in progress may have been superseded meanwhile: the server keeps writing).
    for key in before
        .iter()
        .filter(|k| k.contains(".seg.") && segno(k).is_some_and(|s| s >= second_start))
    {
        assert!(after.contains(key), "{key} was deleted: {after:#?}");
    }
    let window = soma(agent.addr(), &["-o", "json", "describe", &second]).json();
    assert_eq!(
        window["recovery_window"]["gaps"].as_array().map(Vec::len),
        Some(0)
    );
    let restored = restore_and_start(&store, &["--backup", "latest", "--target", "latest"]);
    assert_eq!(restored.psql("postgres", "select count(*) from t"), "5");

    soma(agent.addr(), &["delete", &second, "--yes"]).assert_success("delete the last base backup");
    let kept = garage.list_keys("some/prefix/wal/");
    for key in after.iter().filter(|k| k.contains(".seg.")) {
        assert!(
            kept.contains(key),
            "with no base backup left the archive is kept whole, but {key} is gone"
        );
    }
}

/// The store going away does not fill the agent's volume: once the configured number of complete
/// segments waits in the spool, the agent stops receiving (the replication slot keeps the WAL on
/// the server instead) and says why in `status`.
#[test]
fn receiving_pauses_when_the_store_is_gone_and_the_spool_fills() {
    let mut store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let spool_path = spool.path().display().to_string();
    let agent = soma_tests::Agent::start(
        &store.url(),
        &pg.url("postgres"),
        &[
            "--wal-stream",
            "--wal-spool",
            &spool_path,
            "--wal-partial-interval",
            "1s",
            "--wal-spool-max-segments",
            "2",
        ],
        &store.env(),
    );
    wait_archived(agent.addr(), &pg);
    store.garage_server_mut().expect("S3 store").stop();
    pg.psql("postgres", "create table t(n int)");
    for i in 0..4 {
        pg.psql(
            "postgres",
            &format!("insert into t values ({i}); select pg_switch_wal();"),
        );
    }
    let status = poll_until(
        Duration::from_secs(120),
        "receiving to pause with the store gone",
        || {
            // `status` exits 1 here (listing backups fails without the store) but still reports.
            let out = soma(agent.addr(), &["-o", "json", "status"]);
            let s = serde_json::from_str::<serde_json::Value>(&out.stdout).ok()?[0]["wal_archive"]
                .clone();
            (s["receiving"] == false
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("receiving is paused")))
            .then_some(s)
        },
    );
    let waiting = std::fs::read_dir(spool.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().len() == 24)
        .count();
    assert!(
        (2..=4).contains(&waiting),
        "the spool holds the unshipped segments and no more: {waiting}; {status:#}"
    );
    // The slot keeps the WAL on the server meanwhile.
    let restart = pg.psql(
        "postgres",
        "select restart_lsn is not null from pg_replication_slots where slot_name = 'soma_wal_archive'",
    );
    assert_eq!(restart, "t");
}
