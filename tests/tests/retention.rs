//! Retention and prune end to end: the real agent and plugin, real PostgreSQL 15, Garage.
//!
//! History with chosen timestamps is made from one real backup: its manifest is copied under new
//! ids with edited `started_at` / `completed_at` (and its artifact copied beside it), so every
//! backup prune sees is a complete, restorable one; only its age is chosen. Leftovers of
//! interrupted writers are aged through the store itself: a local store's file times and the start
//! time its incomplete-upload records carry (the only store whose clock a test can set).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use chrono::{DateTime, Datelike, Utc};
use serde_json::Value;
use soma_tests::pitr::{
    lsn, physical_backup, restore_and_start, segno_of, wait_archived, wal_agent,
};
use soma_tests::{Agent, PgCluster, TestStore, listed_ids, random_hex, soma};

const DAY: i64 = 86_400;

/// Midnight UTC today: history is placed on whole days before it, so a rule's calendar periods
/// do not depend on the hour the test runs.
fn today() -> DateTime<Utc> {
    Utc::now()
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
}

/// Writes `bytes` at `rel` in the store, creating folders a local store needs.
fn put(store: &TestStore, rel: &str, bytes: Vec<u8>) {
    if let Some(root) = store.local_root()
        && let Some(parent) = root.join(rel).parent()
    {
        std::fs::create_dir_all(parent).expect("store folder");
    }
    store.write(rel, bytes);
}

/// A copy of the real backup `real` (its manifest JSON) started at `at`, changed by `edit`; its
/// id is made from the edited engine and target like the agent makes ids. Returns the id.
fn synth(
    store: &TestStore,
    real: &Value,
    at: DateTime<Utc>,
    edit: impl FnOnce(&mut Value),
) -> String {
    let mut m = real.clone();
    edit(&mut m);
    let code = match m["engine"].as_str() {
        Some("set") => "set",
        _ => "pg",
    };
    let target = m["target"]["name"].as_str().unwrap_or("x").to_owned();
    let id = format!(
        "{}-{code}-{target}-{}",
        at.format("%Y%m%dT%H%M%SZ"),
        random_hex(2)
    );
    let real_id = real["id"].as_str().expect("real id").to_owned();
    m["id"] = id.clone().into();
    m["started_at"] = at.to_rfc3339().into();
    m["completed_at"] = (at + chrono::Duration::seconds(30)).to_rfc3339().into();
    for a in m["artifacts"].as_array().cloned().unwrap_or_default() {
        let name = a["name"].as_str().expect("artifact name");
        put(
            store,
            &format!("backups/{id}/{name}"),
            store.read(&format!("backups/{real_id}/{name}")),
        );
    }
    put(
        store,
        &format!("backups/{id}/manifest.json"),
        serde_json::to_vec_pretty(&m).unwrap(),
    );
    id
}

/// A set manifest over `members` started at `at`.
fn synth_set(store: &TestStore, real: &Value, at: DateTime<Utc>, members: &[String]) -> String {
    synth(store, real, at, |m| {
        m["engine"] = "set".into();
        m["kind"] = "set".into();
        m["target"]["name"] = "all".into();
        m["artifacts"] = Value::Array(Vec::new());
        m["members"] = members.iter().cloned().map(Value::from).collect();
    })
}

/// `prune ARGS -o json` (with `--yes` when not a dry run); the response.
fn prune(addr: &str, args: &[&str]) -> Value {
    let mut all = vec!["-o", "json", "prune"];
    all.extend_from_slice(args);
    if !args.contains(&"--dry-run") {
        all.push("--yes");
    }
    let out = soma(addr, &all);
    out.assert_success(&format!("prune {args:?}"));
    out.json()
}

/// Names of the items of `what` that go (`delete`) or stay.
fn items(resp: &Value, what: &str, delete: bool) -> BTreeSet<String> {
    resp["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {resp}"))
        .iter()
        .filter(|i| i["what"] == what && i["delete"] == delete)
        .map(|i| i["name"].as_str().unwrap().to_owned())
        .collect()
}

fn set<const N: usize>(ids: [&String; N]) -> BTreeSet<String> {
    ids.into_iter().cloned().collect()
}

/// The newest backup of each of the `n` most recent periods that have one (`history` newest
/// first): what keep-weekly / keep-monthly keep, computed from the chosen times.
fn newest_per_period(
    history: &[(String, DateTime<Utc>)],
    n: usize,
    period: impl Fn(DateTime<Utc>) -> String,
) -> BTreeSet<String> {
    let mut seen = Vec::new();
    let mut out = BTreeSet::new();
    for (id, at) in history {
        let p = period(*at);
        if !seen.contains(&p) && seen.len() < n {
            seen.push(p);
            out.insert(id.clone());
        }
    }
    out
}

/// Every rule keeps exactly what it says over a history with ties on one day, gaps, and sets whose
/// members are newer than standalone backups; a set goes with its members; the dry run lists
/// exactly what the real run then deletes, and nothing else leaves the store.
#[test]
fn each_rule_keeps_exactly_what_it_says_and_sets_go_whole() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    pg.createdb("app");
    pg.psql(
        "app",
        "create table t(v int); insert into t select generate_series(1, 100)",
    );
    let agent = Agent::start(&store.url(), &pg.url("app"), &[], &store.env());
    let a = agent.addr();
    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "app"],
    );
    out.assert_success("backup postgres");
    let real = out.json();
    let real_id = real["id"].as_str().unwrap().to_owned();
    let real_at: DateTime<Utc> = real["started_at"].as_str().unwrap().parse().unwrap();

    let t0 = today();
    let at = |days: i64, hour: i64| t0 - chrono::Duration::seconds(days * DAY - hour * 3600);
    let mk = |days, hour| {
        let t = at(days, hour);
        (synth(&store, &real, t, |_| {}), t)
    };
    // Standalone logical backups of "app": two on day -1 (a tie: 20:00 is that day's newest),
    // two on day -4, none on day -3 (a gap, where only a set member is), then sparser.
    let (d1_20, _) = mk(1, 20);
    let (d1_08, _) = mk(1, 8);
    let (d2_12, _) = mk(2, 12);
    let (d4_23, _) = mk(4, 23);
    let (d4_01, _) = mk(4, 1);
    let (d9, _) = mk(9, 12);
    let (d16, _) = mk(16, 12);
    let (d40, _) = mk(40, 12);
    let (d70, _) = mk(70, 12);
    // Two sets "all", each with one logical member of "app" started a second after it.
    let member = |days, hour| {
        synth(
            &store,
            &real,
            at(days, hour) + chrono::Duration::seconds(1),
            |_| {},
        )
    };
    let m_new = member(3, 6);
    let s_new = synth_set(&store, &real, at(3, 6), std::slice::from_ref(&m_new));
    let m_old = member(20, 6);
    let s_old = synth_set(&store, &real, at(20, 6), std::slice::from_ref(&m_old));

    let history: Vec<(String, DateTime<Utc>)> = vec![
        (real_id.clone(), real_at),
        (d1_20.clone(), at(1, 20)),
        (d1_08.clone(), at(1, 8)),
        (d2_12.clone(), at(2, 12)),
        (d4_23.clone(), at(4, 23)),
        (d4_01.clone(), at(4, 1)),
        (d9.clone(), at(9, 12)),
        (d16.clone(), at(16, 12)),
        (d40.clone(), at(40, 12)),
        (d70.clone(), at(70, 12)),
    ];
    let all: BTreeSet<String> = history
        .iter()
        .map(|(id, _)| id.clone())
        .chain([m_new.clone(), s_new.clone(), m_old.clone(), s_old.clone()])
        .collect();
    assert_eq!(listed_ids(a).into_iter().collect::<BTreeSet<_>>(), all);

    // The sets are a group of their own ("all", kind set): a rule keeps sets by the sets' times
    // alone, and a kept set keeps its member.
    let sets: Vec<(String, DateTime<Utc>)> =
        vec![(s_new.clone(), at(3, 6)), (s_old.clone(), at(20, 6))];
    let with = |app: BTreeSet<String>, kept_sets: BTreeSet<String>| {
        let mut all = app;
        for (set_id, member_id) in [(&s_new, &m_new), (&s_old, &m_old)] {
            if kept_sets.contains(set_id) {
                all.insert(set_id.clone());
                all.insert(member_id.clone());
            }
        }
        all
    };
    let both = set([&s_new, &s_old]);
    let week = |t: DateTime<Utc>| {
        let w = t.iso_week();
        format!("{}-W{:02}", w.year(), w.week())
    };
    let month = |t: DateTime<Utc>| t.format("%Y-%m").to_string();
    let cases: Vec<(&[&str], BTreeSet<String>)> = vec![
        // The newest "app" backup and the newest set; the older set goes with its member.
        (&["--keep-last", "1"], with(set([&real_id]), set([&s_new]))),
        (
            &["--keep-last", "2"],
            with(set([&real_id, &d1_20]), both.clone()),
        ),
        // Today, day -1 (its newest of two), day -2.
        (
            &["--keep-daily", "3"],
            with(set([&real_id, &d1_20, &d2_12]), both.clone()),
        ),
        // Days with a backup: today, -1, -2, -4, -9: the gap on day -3 (only a set member
        // there, which is no "app" backup of its own) is skipped.
        (
            &["--keep-daily", "5"],
            with(set([&real_id, &d1_20, &d2_12, &d4_23, &d9]), both.clone()),
        ),
        (
            &["--keep-weekly", "3"],
            with(
                newest_per_period(&history, 3, week),
                newest_per_period(&sets, 3, week),
            ),
        ),
        (
            &["--keep-monthly", "2"],
            with(
                newest_per_period(&history, 2, month),
                newest_per_period(&sets, 2, month),
            ),
        ),
        // Younger than 5 days: everything from day -4 01:00 on, and the newer set.
        (
            &["--max-age", "5d"],
            with(
                set([&real_id, &d1_20, &d1_08, &d2_12, &d4_23, &d4_01]),
                set([&s_new]),
            ),
        ),
        // Any rule keeps: keep-last=2 adds nothing to max-age for "app", but keeps both sets.
        (
            &["--max-age", "5d", "--keep-last", "2"],
            with(
                set([&real_id, &d1_20, &d1_08, &d2_12, &d4_23, &d4_01]),
                both.clone(),
            ),
        ),
    ];
    for (args, kept) in &cases {
        let mut dry = vec!["--dry-run"];
        dry.extend_from_slice(args);
        let resp = prune(a, &dry);
        assert_eq!(resp["dry_run"], true);
        assert_eq!(
            &items(&resp, "backup", false),
            kept,
            "kept by {args:?}: {resp:#}"
        );
        let gone: BTreeSet<String> = all.difference(kept).cloned().collect();
        assert_eq!(items(&resp, "backup", true), gone, "deleted by {args:?}");
        // Members are decided by their set, never on their own.
        let reason = |id: &str| {
            resp["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["name"] == id)
                .map(|i| i["reason"].as_str().unwrap().to_owned())
                .unwrap()
        };
        assert!(reason(&m_new).contains(&format!("member of kept set {s_new}")));
    }
    assert_eq!(
        listed_ids(a).into_iter().collect::<BTreeSet<_>>(),
        all,
        "dry runs delete nothing"
    );

    // The real run deletes exactly what its dry run listed, sets with their members.
    let args = ["--max-age", "5d"];
    let mut dry = vec!["--dry-run"];
    dry.extend_from_slice(&args);
    let planned = items(&prune(a, &dry), "backup", true);
    assert!(planned.contains(&s_old) && planned.contains(&m_old));
    let done = prune(a, &args);
    assert_eq!(done["dry_run"], false);
    assert_eq!(items(&done, "backup", true), planned);
    assert!(done["objects_deleted"].as_u64().unwrap() >= planned.len() as u64);
    let left: BTreeSet<String> = listed_ids(a).into_iter().collect();
    assert_eq!(left, all.difference(&planned).cloned().collect());
    for id in &planned {
        assert!(
            store.list(&format!("backups/{id}/")).is_empty(),
            "objects of deleted {id} remain"
        );
    }
    // What is kept still restores: the newest backup verifies end to end.
    soma(a, &["verify", &real_id]).assert_success("verify the kept backup");
    // Pruning again with the same rules deletes nothing more.
    assert!(items(&prune(a, &args), "backup", true).is_empty());
}

fn count(pg: &PgCluster, sql: &str) -> u64 {
    pg.psql("postgres", sql).parse().expect("a number")
}

/// WAL segment numbers present in the archive, from the object keys.
fn archived_segments(store: &TestStore, seg_size: u64) -> BTreeSet<u64> {
    store
        .list("wal/")
        .iter()
        .filter_map(|k| {
            let file = k.rsplit('/').next()?;
            let kind = file.split('.').nth(1)?;
            let name = file.get(..24)?;
            (kind == "seg" || kind == "partial").then(|| segno_of(name, seg_size))
        })
        .collect()
}

/// Base backups with WAL: prune keeps the base backups the policy keeps, deletes the WAL before
/// the oldest kept one and only that, the newest base backup's WAL is all there, and a
/// point-in-time restore to a time inside the kept window returns the rows as at that time.
#[test]
fn prune_keeps_the_wal_kept_base_backups_need_and_pitr_still_works() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool dir");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let a = agent.addr();
    pg.psql("postgres", "create table t(phase int)");
    let phase = |n: i32| {
        pg.psql("postgres", &format!("insert into t values ({n})"));
        pg.psql("postgres", "select pg_switch_wal()");
    };
    phase(1);
    let b1 = physical_backup(a);
    phase(2);
    let b2 = physical_backup(a);
    phase(3);
    wait_archived(a, &pg);
    let t = pg.psql("postgres", "select clock_timestamp()");
    phase(4);
    let b3 = physical_backup(a);
    phase(5);
    wait_archived(a, &pg);

    let details = |id: &str| {
        let out = soma(a, &["-o", "json", "describe", id]);
        out.assert_success("describe");
        let d = out.json()["details"].clone();
        let seg = d["wal_segment_size"].as_u64().expect("segment size");
        (lsn(d["start_lsn"].as_str().expect("start lsn")) / seg, seg)
    };
    let (b2_start, seg) = details(&b2);
    let (b3_start, _) = details(&b3);
    let before = archived_segments(&store, seg);
    assert!(
        before.iter().any(|s| *s < b2_start),
        "the archive must hold WAL older than the second base backup: {before:?}"
    );

    let planned = prune(a, &["--dry-run", "--keep-last", "2"]);
    assert_eq!(items(&planned, "backup", true), set([&b1]));
    assert_eq!(items(&planned, "backup", false), set([&b2, &b3]));
    let wal_planned = items(&planned, "wal", true);
    assert!(
        !wal_planned.is_empty(),
        "WAL before {b2} is listed: {planned:#}"
    );
    assert_eq!(
        archived_segments(&store, seg),
        before,
        "a dry run deletes no WAL"
    );

    let done = prune(a, &["--keep-last", "2"]);
    assert_eq!(items(&done, "backup", true), set([&b1]));
    assert_eq!(items(&done, "wal", true), wal_planned);
    assert!(done["errors"].as_array().unwrap().is_empty(), "{done:#}");
    let mut left = listed_ids(a);
    left.sort();
    let mut want = vec![b2.clone(), b3.clone()];
    want.sort();
    assert_eq!(left, want);

    let after = archived_segments(&store, seg);
    assert!(
        after.iter().all(|s| *s >= b2_start),
        "WAL before the oldest kept base backup ({b2_start}) is gone: {after:?}"
    );
    // Every segment the kept base backups replay is still there, the newest's included.
    let expected: BTreeSet<u64> = before.iter().copied().filter(|s| *s >= b2_start).collect();
    assert!(
        after.is_superset(&expected),
        "only WAL before {b2} went: {after:?}"
    );
    let last = *after.last().expect("WAL left");
    assert!(
        (b3_start..=last).all(|s| after.contains(&s)),
        "the newest base backup's WAL is whole"
    );

    // A restore to a time inside the kept window: rows as they were at that time.
    let restored = restore_and_start(&store, &["--backup", "latest", "--target-time", &t]);
    assert_eq!(
        restored.psql(
            "postgres",
            "select string_agg(phase::text, ',' order by phase) from t"
        ),
        "1,2,3",
        "restored to {t}; server log:\n{}",
        restored.log()
    );
    assert_eq!(count(&pg, "select count(*) from t"), 5);
}

/// Sets a local store file's modification time `ago` in the past.
fn age(store: &TestStore, rel: &str, ago: Duration) {
    let path = store.local_root().expect("local store").join(rel);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|f| f.set_modified(SystemTime::now() - ago))
        .unwrap_or_else(|e| panic!("cannot age {}: {e}", path.display()));
}

/// An incomplete upload record of the local store (`.uploads/<id>.json` + `.data`), as a crashed
/// writer leaves it, started `ago` in the past.
fn stale_upload(store: &TestStore, key: &str, ago: Duration) -> String {
    let id = random_hex(16);
    let started = (SystemTime::now() - ago)
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let root = store.local_root().expect("local store").join(".uploads");
    std::fs::write(
        root.join(format!("{id}.json")),
        serde_json::json!({"key": key, "initiated_unix_ms": started}).to_string(),
    )
    .unwrap();
    std::fs::write(root.join(format!("{id}.data")), vec![7u8; 4096]).unwrap();
    id
}

/// Leftovers of interrupted writers older than a day go, fresh ones stay (a backup may still be
/// writing them); old failure records go; the dry run lists exactly that and deletes nothing;
/// prune without --yes and without a terminal refuses; no policy at all is refused with what to do.
#[test]
fn orphans_older_than_a_day_go_fresh_ones_stay_and_prune_needs_confirmation() {
    let store = TestStore::local();
    let pg = PgCluster::start();
    let agent = Agent::start(&store.url(), &pg.url("postgres"), &[], &store.env());
    let a = agent.addr();
    soma(a, &["backup", "postgres"]).assert_success("backup");
    let real = listed_ids(a);

    let two_days = Duration::from_secs(2 * DAY as u64);
    let old_dir = "backups/20200101T000000Z-pg-app-0aa0";
    let new_dir = format!(
        "backups/{}-pg-app-0bb0",
        Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    for dir in [old_dir, new_dir.as_str()] {
        put(&store, &format!("{dir}/owner"), b"someone".to_vec());
        put(&store, &format!("{dir}/dump.pgdump.zst"), vec![1u8; 1000]);
    }
    age(&store, &format!("{old_dir}/owner"), two_days);
    age(&store, &format!("{old_dir}/dump.pgdump.zst"), two_days);
    let old_key = "backups/20200102T000000Z-pg-app-0cc0/dump.pgdump.zst";
    let new_key = "backups/20200103T000000Z-pg-app-0dd0/dump.pgdump.zst";
    let old_upload = stale_upload(&store, old_key, two_days);
    let new_upload = stale_upload(&store, new_key, Duration::from_secs(60));
    put(&store, "failures/old.json", b"{}".to_vec());
    put(&store, "failures/new.json", b"{}".to_vec());
    age(
        &store,
        "failures/old.json",
        Duration::from_secs(100 * DAY as u64),
    );

    // No confirmation and no terminal: refused, nothing deleted.
    let out = soma(a, &["prune", "--keep-last", "1"]);
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains("--yes", "prune without --yes");
    assert!(!store.list(&format!("{old_dir}/")).is_empty());
    // Neither the agent nor the request has a policy.
    let out = soma(a, &["prune", "--yes"]);
    assert_ne!(out.code, 0, "{out}");
    out.assert_stderr_contains("no retention policy", "prune without a policy");
    out.assert_stderr_contains("--retention", "prune without a policy");

    let snapshot = |s: &TestStore| (s.list(""), s.pending_uploads());
    let before = snapshot(&store);
    let dry = prune(a, &["--dry-run", "--keep-last", "1"]);
    assert_eq!(snapshot(&store), before, "a dry run deletes nothing");
    assert_eq!(
        items(&dry, "orphan", true),
        BTreeSet::from([format!("{old_dir}/")])
    );
    assert_eq!(
        items(&dry, "orphan", false),
        BTreeSet::from([format!("{new_dir}/")])
    );
    assert_eq!(
        items(&dry, "incomplete-upload", true),
        BTreeSet::from([old_key.to_owned()])
    );
    assert_eq!(
        items(&dry, "incomplete-upload", false),
        BTreeSet::from([new_key.to_owned()])
    );
    assert_eq!(
        items(&dry, "failure", true),
        BTreeSet::from(["failures/old.json".to_owned()])
    );
    assert_eq!(items(&dry, "backup", false), real.iter().cloned().collect());

    let done = prune(a, &["--keep-last", "1"]);
    for what in ["orphan", "incomplete-upload", "failure", "backup"] {
        assert_eq!(items(&done, what, true), items(&dry, what, true), "{what}");
    }
    assert!(
        store.list(&format!("{old_dir}/")).is_empty(),
        "the old orphan folder is gone"
    );
    assert_eq!(
        store.list(&format!("{new_dir}/")).len(),
        2,
        "the fresh one stays"
    );
    let pending = store.pending_uploads().join("\n");
    assert!(
        !pending.contains(&old_upload),
        "the old upload is aborted:\n{pending}"
    );
    assert!(
        pending.contains(&new_upload),
        "the fresh upload stays:\n{pending}"
    );
    assert_eq!(
        store.list("failures/"),
        vec!["failures/new.json".to_owned()]
    );
    assert_eq!(listed_ids(a), real, "the backup stays");

    // The agent's own policy applies when the request sets none; a bad one stops the start.
    let with_policy = Agent::start(
        &store.url(),
        &pg.url("postgres"),
        &["--retention", "keep-last=3,max-age=7d"],
        &store.env(),
    );
    let resp = prune(with_policy.addr(), &["--dry-run"]);
    assert_eq!(resp["policy"], "keep-last=3,max-age=7days");
    let resp = prune(with_policy.addr(), &["--dry-run", "--keep-last", "1"]);
    assert_eq!(resp["policy"], "keep-last=1,max-age=7days");
    let exit = Agent::try_start(
        &store.url(),
        &pg.url("postgres"),
        &["--retention", "keep-lots=3"],
        &store.env(),
    )
    .expect_err("a bad --retention must stop the agent");
    assert!(
        exit.output.contains("--retention") && exit.output.contains("keep-lots"),
        "{}",
        exit.output
    );
}
