//! Proves restore drills end to end with the real agent and plugin, a real PostgreSQL 15 and real
//! stores (a local directory and S3 on Garage), and the Qdrant REST double. What a user relies on:
//! - a logical backup records per-table row counts and checksums, and `drill` restores it into a
//!   scratch database, compares them all and passes, with a report (`passed`, `rto_seconds`, every
//!   check) stored beside the backup and shown by `describe`;
//! - a drill of a backup with a flipped byte fails naming the checksum mismatch; a drill of a
//!   backup whose recorded count disagrees with its data fails naming the table;
//! - a backup written before validation data existed still drills, its counts reported as not
//!   compared; a whole-cluster backup drills every database;
//! - a Qdrant drill checks points count, vector configuration and a sample search on a scratch
//!   collection;
//! - after every drill, passing or failing, the source database (or collection) is unchanged and
//!   nothing is left behind: no `soma_drill_*` database or collection.

use serde_json::Value;
use soma_tests::db::assert_fingerprints_equal;
use soma_tests::qdrant::QdrantDouble;
use soma_tests::{Agent, DbFingerprint, PgCluster, TestStore, fixtures, pitr, soma};

const SCRATCH: &str = "soma_drill_";

#[test]
fn logical_drills_local_store() {
    logical_drills(&TestStore::local());
}

#[test]
fn logical_drills_s3_store_on_garage() {
    logical_drills(&TestStore::garage());
}

/// Databases of the cluster whose name marks them as drill scratch databases.
fn scratch_databases(pg: &PgCluster) -> Vec<String> {
    pg.psql(
        "postgres",
        &format!("select datname from pg_database where datname like '{SCRATCH}%' order by 1"),
    )
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Asserts the drill left the source as `before` and no scratch database behind.
fn assert_untouched(pg: &PgCluster, before: &DbFingerprint, what: &str) {
    assert_fingerprints_equal(
        before,
        &DbFingerprint::of(pg, "appdb"),
        "appdb before",
        &format!("appdb after {what}"),
    );
    let left = scratch_databases(pg);
    assert!(left.is_empty(), "{what} left scratch databases {left:?}");
}

/// Flips one bit of the middle byte of a stored object; returns the original bytes.
fn flip_middle_byte(store: &TestStore, key: &str) -> Vec<u8> {
    let original = store.read(key);
    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    store.write(key, flipped);
    original
}

fn checks(report: &Value) -> Vec<Value> {
    report["checks"].as_array().cloned().unwrap_or_default()
}

fn logical_drills(store: &TestStore) {
    let pg = PgCluster::start();
    fixtures::create_varied_database(&pg, "appdb");
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();

    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("backup postgres --database appdb");
    let manifest = out.json();
    let id = manifest["id"].as_str().expect("backup id").to_owned();
    let tables = manifest["details"]["databases"][0]["tables"]
        .as_array()
        .cloned()
        .expect("the manifest records per-table validation data");
    assert!(!tables.is_empty(), "no tables recorded: {manifest}");
    let (busiest, rows) = tables
        .iter()
        .map(|t| {
            (
                format!(
                    "{}.{}",
                    t["schema"].as_str().unwrap(),
                    t["table"].as_str().unwrap()
                ),
                t["rows"].as_u64().unwrap(),
            )
        })
        .max_by_key(|(_, rows)| *rows)
        .unwrap();
    assert!(rows > 0, "the fixture's tables are empty: {tables:?}");
    let rows_text = rows.to_string();
    let before = DbFingerprint::of(&pg, "appdb");

    // A good backup passes, every table compared.
    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_success("drill of a good logical backup");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["backup_id"], id.as_str());
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0, "{report}");
    let all = checks(&report);
    assert!(all.iter().all(|c| c["passed"] == true), "{report}");
    assert!(!all.iter().any(|c| c["skipped"] == true), "{report}");
    assert!(
        all.iter()
            .any(|c| c["name"] == format!("rows of {busiest}") && c["found"] == rows_text.as_str()),
        "no row count check of {busiest}: {report}"
    );
    assert!(
        all.iter()
            .any(|c| c["name"] == format!("checksum of {busiest}")),
        "{report}"
    );
    assert_untouched(&pg, &before, "a passing drill");
    // Stored beside the backup, shown by describe.
    let stored: Value = serde_json::from_slice(&store.read(&format!("backups/{id}/drill.json")))
        .expect("drill.json is JSON");
    assert_eq!(stored, report);
    let described = soma(a, &["-o", "json", "describe", &id]);
    described.assert_success("describe after a drill");
    assert_eq!(described.json()["last_drill"]["passed"], true);
    let described = soma(a, &["describe", &id]);
    described.assert_success("describe (table) after a drill");
    assert!(
        described.stdout.contains("Last drill:  passed"),
        "{}",
        described.stdout
    );
    // The table form lists the checks.
    let table = soma(a, &["drill", &id]);
    table.assert_success("drill (table)");
    assert!(
        table.stdout.contains(&format!("rows of {busiest}")),
        "{}",
        table.stdout
    );
    assert!(table.stdout.contains("RTO:"), "{}", table.stdout);

    // Validation data that disagrees with the data: the drill runs and fails, naming the table.
    let manifest_key = format!("backups/{id}/manifest.json");
    let original_manifest = store.read(&manifest_key);
    let mut edited: Value = serde_json::from_slice(&original_manifest).unwrap();
    for t in edited["details"]["databases"][0]["tables"]
        .as_array_mut()
        .unwrap()
    {
        if format!(
            "{}.{}",
            t["schema"].as_str().unwrap(),
            t["table"].as_str().unwrap()
        ) == busiest
        {
            t["rows"] = (rows + 1).into();
        }
    }
    store.write(&manifest_key, serde_json::to_vec_pretty(&edited).unwrap());
    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_code(1, "drill of a backup whose recorded count disagrees");
    out.assert_stderr_contains(&format!("rows of {busiest}"), "the failed drill");
    out.assert_stderr_contains("did not pass", "the failed drill");
    let report = out.json();
    assert_eq!(report["passed"], false, "{report}");
    assert!(
        report["failure"].as_str().unwrap().contains(&format!(
            "rows of {busiest}: expected {}, found {rows}",
            rows + 1
        )),
        "{report}"
    );
    assert_untouched(&pg, &before, "a drill that found a mismatch");
    let described = soma(a, &["-o", "json", "describe", &id]).json();
    assert_eq!(described["last_drill"]["passed"], false);

    // A backup written before validation data existed: drills, counts not compared.
    let mut old: Value = serde_json::from_slice(&original_manifest).unwrap();
    old["details"]["databases"][0]
        .as_object_mut()
        .unwrap()
        .remove("tables");
    store.write(&manifest_key, serde_json::to_vec_pretty(&old).unwrap());
    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_success("drill of a backup without validation data");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    assert!(
        checks(&report).iter().any(|c| c["skipped"] == true
            && c["found"] == "no validation data recorded: counts not compared"),
        "{report}"
    );
    store.write(&manifest_key, original_manifest);
    assert_untouched(&pg, &before, "a drill without validation data");

    // One flipped byte in the dump: the drill cannot run, says why, and cleans up.
    let dump_key = format!("backups/{id}/dump.pgdump.zst");
    let original = flip_middle_byte(store, &dump_key);
    let out = soma(a, &["drill", &id]);
    out.assert_code(1, "drill of a backup with a flipped byte");
    out.assert_stderr_contains("checksum mismatch", "drill of a damaged backup");
    assert_untouched(&pg, &before, "a drill of a damaged backup");
    store.write(&dump_key, original);

    // A whole-cluster backup: every database drilled into its own scratch database.
    pg.createdb("second db");
    pg.psql(
        "second db",
        "create table \"Odd \"\"name\" (id int, v text);
         insert into \"Odd \"\"name\" select i, 'v' || i from generate_series(1, 42) i;",
    );
    let out = soma(a, &["-o", "json", "backup", "postgres", "--all-databases"]);
    out.assert_success("backup postgres --all-databases");
    let cluster_id = out.json()["id"].as_str().unwrap().to_owned();
    let out = soma(a, &["-o", "json", "drill", &cluster_id]);
    out.assert_success("drill of a whole-cluster backup");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    let all = checks(&report);
    assert!(
        all.iter()
            .any(|c| c["name"] == "second db: rows of public.Odd \"name" && c["found"] == "42"),
        "{report}"
    );
    assert!(
        all.iter()
            .any(|c| c["name"] == format!("appdb: rows of {busiest}")),
        "{report}"
    );
    assert_untouched(&pg, &before, "a whole-cluster drill");
}

#[test]
fn qdrant_drill_checks_a_scratch_collection_and_leaves_nothing() {
    let store = TestStore::local();
    let q = QdrantDouble::start(None);
    q.add_collection("docs", 8, 300, 256 * 1024, 7);
    q.add_collection("tiny", 4, 3, 1000, 8);
    q.add_alias("docs-live", "docs");
    let fingerprints = [q.fingerprint("docs"), q.fingerprint("tiny")];
    let aliases = q.aliases();
    let url = q.url();
    let agent = Agent::start(&store.url(), "", &["--qdrant-url", &url], &store.env());
    let a = agent.addr();

    let out = soma(a, &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup qdrant");
    let manifest = out.json();
    let id = manifest["id"].as_str().unwrap().to_owned();
    let sample = &manifest["details"]["collections"]["docs"]["sample"];
    assert!(
        sample["vector"].is_array(),
        "no sample recorded: {manifest}"
    );

    let assert_untouched = |what: &str| {
        assert_eq!(q.collections(), ["docs", "tiny"], "{what}");
        assert_eq!(
            [q.fingerprint("docs"), q.fingerprint("tiny")],
            fingerprints,
            "{what} changed a collection"
        );
        assert_eq!(q.aliases(), aliases, "{what} moved an alias");
    };

    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_success("drill of a Qdrant backup");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    let all = checks(&report);
    for name in [
        "docs: points count",
        "docs: vector configuration",
        "tiny: points count",
    ] {
        assert!(
            all.iter().any(|c| c["name"] == name && c["passed"] == true),
            "no passing check {name:?}: {report}"
        );
    }
    assert!(
        all.iter().any(|c| c["name"]
            .as_str()
            .unwrap()
            .starts_with("docs: sample search")
            && c["passed"] == true
            && c["skipped"] != true),
        "{report}"
    );
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0);
    assert_untouched("a passing Qdrant drill");

    // A recorded points count that disagrees: the drill fails naming the collection.
    let key = format!("backups/{id}/manifest.json");
    let original = store.read(&key);
    let mut edited: Value = serde_json::from_slice(&original).unwrap();
    edited["details"]["collections"]["docs"]["points_count"] = 299.into();
    store.write(&key, serde_json::to_vec_pretty(&edited).unwrap());
    let out = soma(a, &["drill", &id]);
    out.assert_code(1, "drill of a Qdrant backup whose recorded count disagrees");
    out.assert_stderr_contains(
        "docs: points count: expected 299, found 300",
        "the failed drill",
    );
    assert_untouched("a failing Qdrant drill");
}

/// Rows `t` holds after the writes that follow the base backup.
const PHYSICAL_ROWS: i64 = 100 + 3 * 400;

/// A base backup drill: laid into a scratch data directory under `--drill-dir`, replayed by a
/// scratch server (the real PostgreSQL 15 binaries, running as the `postgres` user) through
/// `soma-agent drill-wal-fetch` (WAL the agent fetched and verified) to the end of the archive, promoted and checked with pg_amcheck. The
/// source server, its database and the WAL archive stay as they were; nothing is left behind.
#[test]
fn physical_drill_replays_a_scratch_copy_and_leaves_nothing() {
    let pg = PgCluster::start();
    let store = TestStore::local();
    let spool = tempfile::tempdir().expect("spool dir");
    let drill_dir = PgCluster::server_owned_dir("soma-drill-");
    let drill = drill_dir.path().display().to_string();
    let spool_arg = spool.path().display().to_string();
    // What a killed agent's drill left: a scratch directory whose server still runs (a stand-in
    // whose command line names the data directory, as a postmaster's does), and one whose
    // postmaster.pid names a recycled process id (an unrelated process, which must survive).
    let orphan = |tag: &str, pid: u32| {
        let pgdata = drill_dir
            .path()
            .join(format!("soma_drill_{tag}_cluster/pgdata"));
        std::fs::create_dir_all(&pgdata).unwrap();
        std::fs::write(pgdata.join("postmaster.pid"), format!("{pid}\n")).unwrap();
    };
    let stand_in_pgdata = drill_dir
        .path()
        .join("soma_drill_0123456789ab_cluster/pgdata");
    let mut stand_in = std::process::Command::new("sh")
        .args(["-c", "sleep 600", "postgres"])
        .arg(&stand_in_pgdata)
        .spawn()
        .unwrap();
    orphan("0123456789ab", stand_in.id());
    let mut unrelated = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    orphan("ba9876543210", unrelated.id());
    let agent = Agent::start(
        &store.url(),
        &pg.url("postgres"),
        &[
            "--wal-stream",
            "--wal-spool",
            &spool_arg,
            "--wal-partial-interval",
            "1s",
            "--drill-dir",
            &drill,
        ],
        &store.env(),
    );
    let a = agent.addr();
    // The agent swept both before it listened, stopping only the server of its own directory.
    assert!(
        stand_in.try_wait().unwrap().is_some(),
        "the orphaned scratch server still runs"
    );
    assert!(
        unrelated.try_wait().unwrap().is_none(),
        "the sweep signalled an unrelated process"
    );
    unrelated.kill().unwrap();
    unrelated.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(drill_dir.path()).unwrap().collect();
    assert!(left.is_empty(), "the start-up sweep left {left:?}");
    pg.psql(
        "postgres",
        "create table t (id bigserial primary key, payload text not null);
         insert into t (payload) select 'before ' || i from generate_series(1, 100) i;",
    );
    let id = pitr::physical_backup(a);
    // Writes after the backup, over several segments: only WAL replay brings them back.
    for round in 1..=3 {
        pg.psql(
            "postgres",
            &format!(
                "insert into t (payload) select 'round {round} ' || i from generate_series(1, 400) i;
                 select pg_switch_wal();"
            ),
        );
    }
    pg.psql("postgres", "create index t_payload on t (payload)");
    pitr::wait_archived(a, &pg);
    let before = DbFingerprint::of(&pg, "postgres");
    let archive_before = store.list("wal/");

    let assert_untouched = |what: &str| {
        assert_fingerprints_equal(
            &before,
            &DbFingerprint::of(&pg, "postgres"),
            "the source before",
            &format!("the source after {what}"),
        );
        let left: Vec<_> = std::fs::read_dir(drill_dir.path())
            .expect("the drill directory")
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(
            left.is_empty(),
            "{what} left {left:?} in the drill directory"
        );
        // The promoted scratch copy archived nothing: no new timeline, no WAL of its own.
        let archive: Vec<String> = store.list("wal/");
        assert!(
            !archive.iter().any(|k| k.contains(".history.")),
            "{what} pushed a timeline history into the archive: {archive:#?}"
        );
        assert!(
            archive_before.iter().all(|k| archive.contains(k)),
            "{what} removed WAL from the archive"
        );
    };

    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_success("drill of a base backup");
    let report = out.json();
    assert_eq!(report["passed"], true, "{report}");
    assert_eq!(report["kind"], "physical", "{report}");
    assert!(report["rto_seconds"].as_f64().unwrap() > 0.0, "{report}");
    let all = checks(&report);
    for name in ["base backup", "recovery", "amcheck"] {
        assert!(
            all.iter().any(|c| c["name"] == name && c["passed"] == true),
            "no passing {name:?} check: {report}"
        );
    }
    // The rows written after the backup are there: replay reached the end of the archive.
    let rows = all
        .iter()
        .find(|c| c["name"] == "postgres: rows of public.t")
        .unwrap_or_else(|| panic!("no row count of public.t: {report}"));
    assert_eq!(rows["found"], PHYSICAL_ROWS.to_string(), "{report}");
    assert_eq!(
        pg.psql("postgres", "select count(*) from t"),
        PHYSICAL_ROWS.to_string()
    );
    assert_untouched("a passing physical drill");
    let described = soma(a, &["-o", "json", "describe", &id]).json();
    assert_eq!(described["last_drill"]["passed"], true, "{described}");

    // One flipped byte in a WAL segment the replay needs: wal-fetch refuses it, recovery stops
    // and the drill fails naming it, where an unchecked replay would have promoted early.
    let segments: Vec<String> = archive_before
        .iter()
        .filter(|k| k.contains(".seg."))
        .cloned()
        .collect();
    let victim = segments
        .get(segments.len().saturating_sub(2))
        .unwrap_or_else(|| panic!("too few complete segments: {archive_before:#?}"))
        .clone();
    let original = flip_middle_byte(&store, &victim);
    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_code(1, "drill of a base backup whose WAL is damaged");
    out.assert_stderr_contains("did not pass", "the failed physical drill");
    let report = out.json();
    assert_eq!(report["passed"], false, "{report}");
    let failure = report["failure"].as_str().unwrap();
    assert!(
        failure.contains("recovery") && failure.contains("soma-agent drill-wal-fetch: FATAL"),
        "{report}"
    );
    store.write(&victim, original);
    assert_untouched("a physical drill of damaged WAL");

    // This agent has no --restore-root: it lays no data directory through its API.
    let target = drill_dir.path().join("restored");
    let out = soma(
        a,
        &["restore", &id, "--pgdata", &target.display().to_string()],
    );
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains("lays no data directory", "restore --pgdata without a root")
        .assert_stderr_contains("--restore-root", "restore --pgdata without a root");
    assert!(!target.exists());

    // A damaged base backup: the drill cannot run, says why, and cleans up.
    let base_key = format!("backups/{id}/base.tar.zst");
    flip_middle_byte(&store, &base_key);
    let out = soma(a, &["drill", &id]);
    out.assert_code(1, "drill of a damaged base backup");
    out.assert_stderr_contains("checksum mismatch", "drill of a damaged base backup");
    assert_untouched("a drill of a damaged base backup");
}

/// The recorded rows and checksum of `table` in a logical backup's manifest.
fn recorded_table(store: &TestStore, id: &str, table: &str) -> Value {
    let manifest: Value =
        serde_json::from_slice(&store.read(&format!("backups/{id}/manifest.json"))).unwrap();
    manifest["details"]["databases"][0]["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table)
        .cloned()
        .unwrap_or_else(|| panic!("{table} not recorded: {manifest}"))
}

#[test]
fn a_restored_table_that_differs_fails_the_drill() {
    let store = TestStore::local();
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table t (id int, v text); insert into t select i, 'row ' || i from generate_series(1, 100) i;
         create table other (k int); insert into other values (1), (2);",
    );
    // A drill directory of its own: an agent starting elsewhere sweeps the shared one.
    let drill_dir = PgCluster::server_owned_dir("soma-drill-");
    let drill = drill_dir.path().display().to_string();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--drill-dir", &drill],
        &store.env(),
    );
    let a = agent.addr();
    let backup = |what: &str| {
        let out = soma(
            a,
            &["-o", "json", "backup", "postgres", "--database", "appdb"],
        );
        out.assert_success(what);
        out.json()["id"].as_str().unwrap().to_owned()
    };
    let id = backup("backup of the original rows");
    let manifest_key = format!("backups/{id}/manifest.json");
    let original = store.read(&manifest_key);
    let recorded = recorded_table(&store, &id, "t");
    assert_eq!(recorded["rows"], 100);

    // Each variant of t recorded in place of the original: the restored t (the original rows)
    // differs from what the manifest says, the way a restore that lost or altered rows would.
    let variants = [
        (
            "a changed row",
            "update t set v = 'changed' where id = 50",
            "checksum of public.t",
        ),
        (
            "a missing row",
            "delete from t where id = 51",
            "rows of public.t",
        ),
        (
            "an extra row",
            "insert into t values (51, 'row 51'), (101, 'extra')",
            "rows of public.t",
        ),
    ];
    for (what, change, failing) in variants {
        pg.psql("appdb", change);
        let variant = recorded_table(&store, &backup(what), "t");
        assert_ne!(variant, recorded, "{what} changes what a backup records");
        let mut edited: Value = serde_json::from_slice(&original).unwrap();
        for t in edited["details"]["databases"][0]["tables"]
            .as_array_mut()
            .unwrap()
        {
            if t["table"] == "t" {
                *t = variant.clone();
            }
        }
        store.write(&manifest_key, serde_json::to_vec_pretty(&edited).unwrap());
        let out = soma(a, &["-o", "json", "drill", &id]);
        out.assert_code(1, &format!("drill with {what}"));
        let report = out.json();
        let failed: Vec<String> = checks(&report)
            .iter()
            .filter(|c| c["passed"] == false)
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        assert!(failed.iter().any(|n| n == failing), "{what}: {report}");
        assert!(
            failed.iter().all(|n| n.ends_with("public.t")),
            "{what}: only t differs: {report}"
        );
    }
    store.write(&manifest_key, original);
    let out = soma(a, &["-o", "json", "drill", &id]);
    out.assert_success("drill of the untouched backup");
    assert_eq!(out.json()["passed"], true);
}
