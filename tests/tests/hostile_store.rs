//! Store contents an agent must survive (issue 14, part 2), each planted through the S3 API on a
//! real Garage server, as another tool, a crash or a person could leave it:
//! - an incomplete multipart upload whose key is not ASCII, under `backups/`: the start-up sweep
//!   parses every pending upload's key, and a byte-index split of such a key used to panic at every
//!   start (a crash loop); the agent must start, serve and leave that upload alone;
//! - WAL objects with segment numbers FFFFFFFF000000FF and FFFFFFFE000000FF: a window computed by
//!   walking segment numbers would spin a core for ~10^12 steps; `describe` of a base backup must
//!   answer, naming the second as skipped (its content is not WAL) instead of a gap before it (the
//!   first cannot be WAL: it ends past the last LSN);
//! - names planted in the archive (issue 22): a far-future segment, a second object for a stored
//!   segment, the names the server will write next, a history file of a far timeline — none
//!   blocks WAL archiving, a `latest` restore or a drill, and each is named as skipped.
//!
//! And an S3 endpoint that misbehaves (part 1): Garage behind [`FaultProxy`], which answers 503
//! SlowDown, resets connections mid-body and freezes others, as throttling S3, dying load
//! balancers and stuck endpoints do.

use std::time::{Duration, Instant};

use soma_tests::db::assert_same_database;
use soma_tests::faults::{FaultPlan, FaultProxy};
use soma_tests::fixtures::{create_big_table, create_varied_database};
use soma_tests::pg::PG_BIN_DIR;
use soma_tests::pitr::{
    AckedInserts, pgbench_init, physical_backup, restore_and_start, segment_name, segno_of,
    wait_archived, wal_agent, wal_agent_env, wal_agent_with, wal_segment_size,
};
use soma_tests::store::S3_PREFIX;
use soma_tests::{
    Agent, PgCluster, QdrantDouble, SomaChild, TestStore, poll_until, soma, soma_spawn,
};

#[test]
fn a_pending_upload_with_a_non_ascii_key_does_not_stop_the_agent() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let key = format!("{S3_PREFIX}/backups/20261130T000000Z-pg-é漢字/dump.pgdump.zst");
    let client = garage.s3_client();
    let upload = garage
        .block_on(
            client
                .create_multipart_upload()
                .bucket(garage.bucket())
                .key(&key)
                .send(),
        )
        .expect("create a multipart upload with a non-ASCII key");
    let agent = Agent::start(&store.url(), "", &[], &store.env());
    soma(agent.addr(), &["list"]).assert_success("list after the start-up sweep");
    // Not this agent's: it is left for whoever started it.
    let pending = store.pending_uploads();
    assert!(
        pending
            .iter()
            .any(|k| k.contains("dump.pgdump.zst") && k.contains('é')),
        "the foreign upload was touched: {pending:?} (upload {:?})",
        upload.upload_id()
    );
}

/// A WAL-streaming agent on Garage and a fresh cluster, with one base backup (its id last).
fn base_backup_on_garage() -> (TestStore, PgCluster, tempfile::TempDir, Agent, String) {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let id = physical_backup(agent.addr());
    (store, pg, spool, agent, id)
}

/// The system identifier a physical backup records, under which its WAL is archived.
fn system_id_of(agent: &Agent, id: &str) -> String {
    soma(agent.addr(), &["-o", "json", "describe", id]).json()["details"]["system_id"]
        .as_str()
        .expect("system id")
        .to_owned()
}

#[test]
fn a_wal_key_with_a_huge_segment_number_does_not_hang_describe() {
    let (store, _pg, _spool, agent, id) = base_backup_on_garage();
    let system_id = system_id_of(&agent, &id);
    // The measured key (its end lies past the last LSN, so it cannot be WAL and is left out), and
    // one just inside the LSN space, which the window must take in without walking to it.
    for name in ["00000001FFFFFFFF000000FF", "00000001FFFFFFFE000000FF"] {
        let planted = format!(
            "wal/{system_id}/{name}.seg.0000000001000000.1764460800000.{}.zst",
            "a".repeat(64)
        );
        store.write(&planted, zstd::encode_all(&b"not wal"[..], 3).unwrap());
    }
    let started = std::time::Instant::now();
    let out = soma(agent.addr(), &["-o", "json", "describe", &id]);
    out.assert_success("describe with a hostile WAL key in the archive");
    // Bounded: a walk over the segment numbers would take days, not the seconds allowed here.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "describe took {:?}",
        started.elapsed()
    );
    assert_eq!(out.json()["id"], id.as_str(), "{out}");
    // The planted object was read back and judged: not WAL, so it opens no gap and is named.
    let human = soma(agent.addr(), &["describe", &id]);
    human.assert_success("describe");
    assert!(
        human.stdout.contains("WAL gaps:    none")
            && human
                .stdout
                .lines()
                .any(|l| l.starts_with("WAL skipped:") && l.contains("00000001FFFFFFFE000000FF")),
        "the planted segment is not named as skipped, or opened a gap:\n{human}"
    );
}

/// A manifest whose `wal_segment_size` is 0 (nothing PostgreSQL can have; every window and WAL
/// name computation divides by it) is refused as a bad backup where it is used, and never takes
/// the agent down: `list` still answers, and so does the next request.
#[test]
fn a_manifest_with_a_zero_segment_size_is_refused_not_divided_by() {
    let (store, _pg, _spool, agent, id) = base_backup_on_garage();
    let key = format!("backups/{id}/manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&store.read(&key)).expect("manifest JSON");
    manifest["details"]["wal_segment_size"] = 0.into();
    store.write(&key, serde_json::to_vec(&manifest).unwrap());

    soma(agent.addr(), &["list"]).assert_success("list with a zero segment size");
    let mut target = PgCluster::empty();
    let data = target.data_path().display().to_string();
    let out = soma(agent.addr(), &["restore", &id, "--pgdata", &data]);
    assert_ne!(out.code, 0, "a restore used a zero segment size:\n{out}");
    out.assert_stderr_contains("WAL segment size 0", "the refusal names the field");
    assert!(
        target.start_existing(&store.env()).is_err(),
        "a data directory was laid down"
    );
    soma(agent.addr(), &["status"]).assert_success("the agent still answers");
}

/// The agent's environment with its S3 endpoint replaced by `proxy`'s.
fn through(store: &TestStore, proxy: &FaultProxy) -> Vec<(String, String)> {
    store
        .env()
        .into_iter()
        .map(|(k, v)| {
            if k == "AWS_ENDPOINT_URL" {
                (k, proxy.endpoint())
            } else {
                (k, v)
            }
        })
        .collect()
}

fn store_health(agent: &Agent) -> serde_json::Value {
    let out = soma(agent.addr(), &["-o", "json", "status"]);
    out.json()[0]["store_health"].clone()
}

/// Issue 14, part 1: Garage behind a proxy that answers some connections 503 SlowDown, resets
/// others mid-body (uploads and downloads alike) and freezes others without answering. Every
/// backup completes, verifies and restores equal through those faults (downloads resume with a
/// ranged GET checked against the ETag), the faults were really met, status counts them, and
/// no multipart upload is left pending.
#[test]
fn backups_through_a_faulty_store_complete_verify_and_restore_equal() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(
        garage.endpoint(),
        FaultPlan {
            slow_down: 10,
            reset: 20,
            freeze: 5,
            freeze_for: Duration::from_secs(20),
            reset_within: 4 << 20,
            recycle_within: 32 << 20,
            seed: 14,
        },
    );
    let pg = PgCluster::start();
    pg.createdb("faulty");
    // ~24 MB of poorly compressible rows: about 12 MB stored, three 5 MiB parts a backup.
    create_big_table(&pg, "faulty", "payload", 24);
    let agent = Agent::start(
        &store.url(),
        &pg.url("faulty"),
        &[
            "--part-size",
            "5MiB",
            "--store-retries",
            "12",
            "--store-attempt-timeout",
            "3s",
        ],
        &through(&store, &proxy),
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let out = soma(
            agent.addr(),
            &["-o", "json", "backup", "postgres", "--database", "faulty"],
        );
        out.assert_success("backup through the faulty store");
        ids.push(out.json()["id"].as_str().expect("backup id").to_owned());
    }
    for (i, id) in ids.iter().enumerate() {
        soma(agent.addr(), &["verify", id]).assert_success("verify through the faulty store");
        let target = format!("faulty_restored_{i}");
        soma(agent.addr(), &["restore", id, "--database", &target])
            .assert_success("restore through the faulty store");
        assert_same_database(&pg, "faulty", &target);
    }
    let met = proxy.counts();
    eprintln!("faults met: {met:?}");
    assert!(
        met.slow_down > 0 && met.reset > 0 && met.frozen > 0,
        "the proxy did not inject every kind of fault: {met:?}"
    );
    let health = store_health(&agent);
    assert!(
        health["retries"].as_u64().unwrap_or(0) > 0 && health["timeouts"].as_u64().unwrap_or(0) > 0,
        "status does not show the retries and frozen connections: {health}"
    );
    assert_eq!(health["failures"], 0, "a request gave up: {health}");
    let pending = store.pending_uploads();
    assert!(pending.is_empty(), "uploads left pending: {pending:?}");
}

/// Issue 14, part 1: a download whose connections are all cut after a few megabytes resumes
/// where it stopped instead of failing the restore, and status counts the resumptions.
#[test]
fn a_restore_whose_connections_keep_breaking_resumes_and_restores_equal() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(garage.endpoint(), FaultPlan::clean());
    let pg = PgCluster::start();
    pg.createdb("broken");
    create_big_table(&pg, "broken", "payload", 24);
    let agent = Agent::start(
        &store.url(),
        &pg.url("broken"),
        &["--store-retries", "12", "--store-attempt-timeout", "5s"],
        &through(&store, &proxy),
    );
    let out = soma(
        agent.addr(),
        &["-o", "json", "backup", "postgres", "--database", "broken"],
    );
    out.assert_success("backup through a clean proxy");
    let id = out.json()["id"].as_str().expect("backup id").to_owned();
    // From now on every connection is cut somewhere in its first 3 MiB.
    proxy.set_plan(FaultPlan {
        reset: 100,
        reset_within: 3 << 20,
        seed: 7,
        ..FaultPlan::clean()
    });
    soma(
        agent.addr(),
        &["restore", &id, "--database", "broken_restored"],
    )
    .assert_success("restore through connections that keep breaking");
    assert_same_database(&pg, "broken", "broken_restored");
    proxy.set_plan(FaultPlan::clean());
    let health = store_health(&agent);
    assert!(
        health["resumed_downloads"].as_u64().unwrap_or(0) > 0,
        "no download was resumed: {health}"
    );
    assert!(proxy.counts().reset > 0, "{:?}", proxy.counts());
}

/// Issue 14, part 1: a store that stops answering fails a backup in bounded time with an error
/// that says so, status reports the store as failing (and exits non-zero), and once the store
/// answers again backups succeed and status is healthy.
#[test]
fn a_frozen_store_fails_a_backup_in_bounded_time_and_status_says_so() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(garage.endpoint(), FaultPlan::clean());
    let pg = PgCluster::start();
    create_varied_database(&pg, "frozen");
    let agent = Agent::start(
        &store.url(),
        &pg.url("frozen"),
        &[
            "--store-retries",
            "3",
            "--store-attempt-timeout",
            "2s",
            "--store-operation-timeout",
            "20s",
        ],
        &through(&store, &proxy),
    );
    proxy.set_plan(FaultPlan {
        freeze: 100,
        freeze_for: Duration::from_secs(120),
        ..FaultPlan::clean()
    });
    let started = Instant::now();
    let out = soma(
        agent.addr(),
        &["backup", "postgres", "--database", "frozen"],
    );
    let took = started.elapsed();
    assert_ne!(
        out.code, 0,
        "a backup into a frozen store succeeded:\n{out}"
    );
    out.assert_stderr_contains("no answer within", "backup into a frozen store");
    out.assert_stderr_contains("gave up", "backup into a frozen store");
    // Three attempts of 2 s and their backoff per request, never the 2 minutes of the freeze.
    assert!(took < Duration::from_secs(90), "the failure took {took:?}");
    let status = soma(agent.addr(), &["status"]);
    assert_ne!(
        status.code, 0,
        "status of a failing store exited 0:\n{status}"
    );
    assert!(status.stdout.contains("FAILING"), "{status}");
    assert_eq!(store_health(&agent)["condition"], "failing");

    proxy.set_plan(FaultPlan::clean());
    soma(
        agent.addr(),
        &["backup", "postgres", "--database", "frozen"],
    )
    .assert_success("backup once the store answers again");
    let status = soma(agent.addr(), &["status"]);
    status.assert_success("status once the store answers again");
    assert!(status.stdout.contains("Store requests: SLOW"), "{status}");
}

/// pgbench's TPC-B-like load on `db`, rate-limited so two cores keep up; stopped when dropped.
struct Pgbench(std::process::Child);

impl Pgbench {
    fn start(pg: &PgCluster, db: &str) -> Self {
        let child = pg
            .client_command(std::path::Path::new(PG_BIN_DIR).join("pgbench"))
            .args(["-n", "-c", "2", "-j", "1", "-R", "200", "-T", "3600", db])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("cannot run pgbench");
        Pgbench(child)
    }
}

impl Drop for Pgbench {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// pgbench's invariant: every transaction adds the same delta to one account, teller and branch
/// and records it in the history, so in any consistent state the four sums agree. Returns them
/// and the number of history rows.
fn pgbench_sums(pg: &PgCluster, db: &str) -> (String, i64) {
    let sums = pg.psql(
        db,
        "select (select coalesce(sum(abalance), 0) from pgbench_accounts) || ' ' || \
                (select coalesce(sum(tbalance), 0) from pgbench_tellers) || ' ' || \
                (select coalesce(sum(bbalance), 0) from pgbench_branches) || ' ' || \
                (select coalesce(sum(delta), 0) from pgbench_history)",
    );
    let count = pg
        .psql(db, "select count(*) from pgbench_history")
        .parse()
        .expect("count");
    (sums, count)
}

/// Issue 14, part 5: a bounded soak through store faults. Two write loads run while the agent
/// streams WAL: pgbench, and a client that records each row the server acknowledged; three
/// times, three logical backups of different databases and a Qdrant backup run at once, while
/// list, describe and status are polled; every S3 request crosses the fault proxy.
/// Then: every backup verifies and restores equal, the WAL archive caught up with no gap and a
/// point-in-time restore holds every acknowledged row and pgbench's invariant, no upload is left
/// pending, and the agent's peak memory stayed bounded.
#[test]
fn soak_wal_stream_concurrent_backups_and_polling_through_store_faults() {
    let store = TestStore::garage();
    let garage = store.garage_server().expect("garage");
    let proxy = FaultProxy::start(
        garage.endpoint(),
        FaultPlan {
            slow_down: 8,
            reset: 8,
            freeze: 3,
            freeze_for: Duration::from_secs(10),
            reset_within: 4 << 20,
            recycle_within: 32 << 20,
            seed: 1414,
        },
    );
    let pg = PgCluster::start();
    let databases = ["soak_a", "soak_b", "soak_c"];
    for db in databases {
        create_varied_database(&pg, db);
        create_big_table(&pg, db, "payload", 6);
    }
    pg.psql(
        "postgres",
        "create table soak (id bigserial primary key, at timestamptz not null default now(), pad text not null default repeat('x', 200))",
    );
    pgbench_init(&pg, "postgres", 2);
    let q = QdrantDouble::start(None);
    q.add_collection("memory", 16, 5_000, 6 << 20, 2);
    let original_memory = q.fingerprint("memory");
    let spool = tempfile::tempdir().expect("spool");
    let qdrant_url = q.url();
    let mut agent = wal_agent_env(
        &pg,
        &store,
        spool.path(),
        "1s",
        &[
            "--qdrant-url",
            &qdrant_url,
            "--part-size",
            "5MiB",
            "--store-retries",
            "12",
            "--store-attempt-timeout",
            "3s",
        ],
        &through(&store, &proxy),
    );
    let a = agent.addr();
    let base = physical_backup(a);
    let mut writer = AckedInserts::start(&pg, "soak");
    let pgbench = Pgbench::start(&pg, "postgres");

    // Three rounds of four concurrent backups. Polling is the load here, not a wait: each
    // round of it is three real requests, and the rounds are bounded.
    let mut ids = Vec::new();
    let mut rounds = 0;
    for round in 0..3 {
        let mut running: Vec<(String, SomaChild)> = databases
            .iter()
            .map(|db| {
                (
                    db.to_string(),
                    soma_spawn(a, &["-o", "json", "backup", "postgres", "--database", db]),
                )
            })
            .collect();
        running.push((
            "qdrant".into(),
            soma_spawn(a, &["-o", "json", "backup", "qdrant"]),
        ));
        while running.iter_mut().any(|(_, c)| !c.has_exited()) {
            assert!(
                rounds < 5_000,
                "the backups did not end after {rounds} polling rounds"
            );
            soma(a, &["list"]).assert_success("list during the soak");
            soma(a, &["describe", &base]).assert_success("describe during the soak");
            soma(a, &["-o", "json", "status"]);
            rounds += 1;
        }
        for (what, child) in running {
            let out = child.wait();
            out.assert_success(&format!("backup of {what} in round {round} of the soak"));
            ids.push((
                what,
                round,
                out.json()["id"].as_str().expect("id").to_owned(),
            ));
        }
    }
    writer.stop();
    drop(pgbench);
    // A COMMIT the server received before the client died still commits: wait for the sessions
    // to end so the archive is awaited past every transaction.
    poll_until(Duration::from_secs(30), "pgbench's sessions to end", || {
        let left = pg.psql(
            "postgres",
            "select count(*) from pg_stat_activity where application_name = 'pgbench'",
        );
        (left == "0").then_some(())
    });
    let acked = writer.acked();
    assert!(!acked.is_empty(), "the write load committed nothing");

    // The WAL archive catches up with the server (within wait_archived's bound) with no gap.
    wait_archived(a, &pg);
    let window = soma(a, &["-o", "json", "describe", &base]).json();
    assert_eq!(
        window["recovery_window"]["gaps"].as_array().map(Vec::len),
        Some(0),
        "{window}"
    );
    for (what, round, id) in &ids {
        soma(a, &["verify", id]).assert_success(&format!("verify {what}"));
        if what == "qdrant" {
            let copy = format!("memory_restored_{round}");
            soma(a, &["restore", id, "--collection", "memory", "--as", &copy])
                .assert_success("restore the Qdrant collection under another name");
            assert_eq!(q.fingerprint(&copy), original_memory);
        } else {
            let target = format!("{what}_restored_{round}");
            soma(a, &["restore", id, "--database", &target])
                .assert_success(&format!("restore {what}"));
            assert_same_database(&pg, what, &target);
        }
    }
    let peak = agent.peak_rss_kib() / 1024;
    let met = proxy.counts();
    eprintln!(
        "soak: {rounds} polling rounds, {} rows acknowledged, agent peak {peak} MiB, faults {met:?}",
        acked.len()
    );
    assert!(
        met.slow_down + met.reset + met.frozen > 0,
        "no fault was injected: {met:?}"
    );
    // Parts in flight and the WAL pipeline are bounded buffers; a leak or a buffered object
    // would grow with the data (~20 MB stored per database) and the hours a real soak runs.
    assert!(peak < 400, "agent peak memory {peak} MiB");
    // A WAL stream ships partial segments all the time: one may be in flight right now. Stopped
    // the way Kubernetes stops it, the agent finishes or aborts what it has in flight.
    let stopped = agent.terminate(Duration::from_secs(60));
    assert!(
        stopped.is_some(),
        "the agent did not stop within 60 s of SIGTERM"
    );
    let pending = store.pending_uploads();
    assert!(pending.is_empty(), "uploads left pending: {pending:?}");

    // Every acknowledged row is in a point-in-time restore to the end of the archive.
    drop(agent);
    let restored = restore_and_start(&store, &["--backup", &base, "--target", "latest"]);
    let max_acked = acked.iter().max().copied().unwrap_or(0);
    let missing = restored.psql(
        "postgres",
        &format!("select count(*) from generate_series(1, {max_acked}) i where not exists (select 1 from soak where id = i)"),
    );
    let restored_ids: i64 = restored
        .psql("postgres", "select count(*) from soak")
        .parse()
        .expect("count");
    assert!(
        restored_ids >= acked.len() as i64,
        "the restore has {restored_ids} rows, {} were acknowledged ({missing} ids up to the last acknowledged one are missing)",
        acked.len()
    );
    // pgbench's transactions came back whole: its four sums agree, and the ones it ran after the
    // base backup are there (at least as many as a restore to the base backup alone would hold).
    let (sums, transactions) = pgbench_sums(&restored, "postgres");
    let (live_sums, live_transactions) = pgbench_sums(&pg, "postgres");
    eprintln!("pgbench: {live_transactions} transactions, {transactions} restored");
    let parts: Vec<&str> = sums.split(' ').collect();
    assert!(
        parts.len() == 4 && parts.iter().all(|p| *p == parts[0]),
        "pgbench's sums disagree after the restore (accounts, tellers, branches, history): {sums}"
    );
    assert!(transactions > 0, "no pgbench transaction was restored");
    assert_eq!(
        (sums, transactions),
        (live_sums, live_transactions),
        "the restore to the end of the archive differs from the server after pgbench stopped"
    );
}

/// Issue 14, part 2: a timeline history object of 2 MiB planted in the WAL archive (no real
/// history file is larger than a few KiB). The reader used to stop at 1 MiB while keeping its
/// pipe open, so the download blocked and `describe` never answered; now the object is refused,
/// and `describe` answers at once, naming it with the reason among the objects it skipped
/// (issue 22: a planted name no longer stops the window from being computed).
#[test]
fn a_history_file_over_one_mebibyte_is_refused_not_waited_on() {
    use sha2::Digest as _;
    let (store, _pg, _spool, agent, id) = base_backup_on_garage();
    let system_id = system_id_of(&agent, &id);
    let line = "1\t0/3000000\tno recovery target specified\n";
    let raw = line.repeat((2 << 20) / line.len() + 1).into_bytes();
    let sha = hex::encode(sha2::Sha256::digest(&raw));
    store.write(
        &format!("wal/{system_id}/00000002.history.history.00000000.1764460800000.{sha}.zst"),
        zstd::encode_all(&raw[..], 3).unwrap(),
    );
    let started = Instant::now();
    let out = soma(agent.addr(), &["-o", "json", "describe", &id]);
    out.assert_success("describe with an oversized history file in the archive");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "describe took {:?}",
        started.elapsed()
    );
    let window = &out.json()["recovery_window"];
    assert_eq!(window["error"], "", "{out}");
    let rejected = window["rejected"].to_string();
    assert!(
        rejected.contains("00000002.history") && rejected.contains("larger than 1024 KiB"),
        "the window does not name the oversized history file: {out}"
    );
}

/// Puts `raw` into the WAL archive of `system_id` under the key of WAL file `name` as `kind`
/// (`seg` or `history`), its key carrying the true sha256 of `raw`, as anyone who can write to
/// the bucket can; returns the key relative to the store's prefix.
fn plant_wal(store: &TestStore, system_id: &str, name: &str, kind: &str, raw: &[u8]) -> String {
    use sha2::Digest as _;
    let sha = hex::encode(sha2::Sha256::digest(raw));
    let key = format!(
        "wal/{system_id}/{name}.{kind}.{:08x}.1764460800000.{sha}.zst",
        raw.len()
    );
    store.write(&key, zstd::encode_all(raw, 3).unwrap());
    key
}

/// Issue 22, point 4: names in the store are not trusted. Into a real archive on Garage, as
/// anyone who can write to the (unencrypted) bucket could, go: a segment far ahead of the
/// archive, a second object for a segment it holds, the names of the next segments the server
/// will write, and a history file of a far timeline — each key carrying the true digest of its
/// bytes, so only judging the content tells them from WAL. On the code before this change the
/// far-future name opened a gap (a `latest` restore refused), the planted history file made the
/// window unreadable, the second object was a conflict `wal-fetch` refused, and the names ahead
/// were conflicts that kept the server's real segments out of the archive.
///
/// Now: the agent archives the server's real segments under the planted names; `describe` shows
/// no gap, a window reaching the archived position, and names every planted object as skipped;
/// a `latest` restore promotes with every row; and a drill of the base backup passes with every
/// row.
#[test]
fn planted_wal_names_block_neither_archiving_nor_a_latest_restore_nor_a_drill() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool");
    let drill_dir = PgCluster::server_owned_dir("soma-drill-");
    let drill = drill_dir.path().display().to_string();
    let agent = wal_agent_with(&pg, &store, spool.path(), "1s", &["--drill-dir", &drill]);
    let a = agent.addr();
    pg.psql(
        "postgres",
        "create table t (id bigserial primary key, payload text not null);
         insert into t (payload) select 'before ' || i from generate_series(1, 100) i;",
    );
    let id = physical_backup(a);
    let system_id = system_id_of(&agent, &id);
    let seg_size = wal_segment_size(&pg);
    pg.psql(
        "postgres",
        "insert into t (payload) select 'first ' || i from generate_series(1, 400) i;
         select pg_switch_wal();",
    );
    wait_archived(a, &pg);
    let archive = format!("wal/{system_id}/");
    let stored_seg = store
        .list(&archive)
        .into_iter()
        .rfind(|k| k.contains(".seg."))
        .expect("a complete segment in the archive");
    let stored_name = stored_seg
        .trim_start_matches(&archive)
        .split('.')
        .next()
        .expect("a WAL file name")
        .to_owned();
    let current = pg.psql("postgres", "select pg_walfile_name(pg_current_wal_lsn())");
    let current_segno = segno_of(&current, seg_size);
    let timeline = u32::from_str_radix(&current[..8], 16).expect("timeline");

    // Each planted object's bytes are not WAL of this cluster: another cluster's text, as long
    // as a segment so that only its content, not its size, gives it away.
    let junk = |what: &str| {
        what.repeat(seg_size as usize / what.len() + 1)[..seg_size as usize]
            .to_owned()
            .into_bytes()
    };
    let mut planted = Vec::new();
    let ahead: Vec<String> = (0..3)
        .map(|i| segment_name(timeline, current_segno + i, seg_size))
        .collect();
    for name in &ahead {
        planted.push(plant_wal(
            &store,
            &system_id,
            name,
            "seg",
            &junk(&format!("ahead {name} ")),
        ));
    }
    let far = segment_name(timeline, current_segno + 100_000, seg_size);
    planted.push(plant_wal(
        &store,
        &system_id,
        &far,
        "seg",
        &junk("far future "),
    ));
    planted.push(plant_wal(
        &store,
        &system_id,
        &stored_name,
        "seg",
        &junk("second object "),
    ));
    planted.push(plant_wal(
        &store,
        &system_id,
        "00000009.history",
        "history",
        b"a history file of a timeline nobody made\n",
    ));

    // The server writes through the planted names; the agent archives its real segments.
    for round in 1..=3 {
        pg.psql(
            "postgres",
            &format!(
                "insert into t (payload) select 'round {round} ' || i from generate_series(1, 400) i;
                 select pg_switch_wal();"
            ),
        );
    }
    pg.psql(
        "postgres",
        "insert into t (payload) select 'last ' || i from generate_series(1, 100) i",
    );
    let archived_at = wait_archived(a, &pg);
    let keys = store.list(&archive);
    for name in &ahead {
        let real: Vec<&String> = keys
            .iter()
            .filter(|k| k.contains(&format!("/{name}.seg.")) && !planted.contains(k))
            .collect();
        assert_eq!(
            real.len(),
            1,
            "the server's own segment {name} is not archived beside the planted one:\n{keys:#?}"
        );
    }
    let rows = pg.psql("postgres", "select count(*) from t");
    assert_eq!(rows, (100 + 400 + 3 * 400 + 100).to_string());

    // describe: no gap, the window reaches the archive, every planted object named as skipped.
    let described = soma(a, &["-o", "json", "describe", &id]);
    described.assert_success("describe with planted WAL names");
    let window = &described.json()["recovery_window"];
    assert_eq!(window["error"], "", "{described}");
    assert_eq!(window["gaps"], serde_json::json!([]), "{described}");
    let reach = soma_tests::pitr::lsn(window["latest_lsn"].as_str().expect("latest_lsn"));
    assert!(
        reach >= archived_at,
        "the window ends at {} before the archived position {}: {described}",
        soma_tests::pitr::format_lsn(reach),
        soma_tests::pitr::format_lsn(archived_at)
    );
    let rejected = window["rejected"].to_string();
    for key in &planted {
        let file = key.trim_start_matches(&archive);
        assert!(
            rejected.contains(file),
            "{file} is not named as skipped: {described}"
        );
    }

    // A `latest` restore replays past every planted name and promotes with every row.
    let restored = restore_and_start(&store, &["--backup", &id, "--target", "latest"]);
    assert_eq!(restored.psql("postgres", "select count(*) from t"), rows);
    drop(restored);

    // So does a drill of the base backup.
    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_success("drill with planted WAL names");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    let counted = report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "postgres: rows of public.t")
        .unwrap_or_else(|| panic!("no row count of public.t: {report}"));
    assert_eq!(counted["found"], rows.as_str(), "{report}");
}
