//! Proves Qdrant backups end to end: the real agent and plugin against the Qdrant 1.18 REST double
//! (`soma_tests::qdrant`, which follows Qdrant's documented snapshot, upload, alias and api-key
//! behaviour) and real stores. What a user relies on:
//! - several collections round-trip exactly (same content fingerprint), with their aliases, and no
//!   snapshot file is left on the Qdrant node;
//! - a checksum Qdrant reports that does not match the bytes received, or a download cut off
//!   mid-stream, records no backup and leaves nothing in the store or on the node;
//! - a restore refuses to overwrite an existing collection without `--force`, refuses a server of
//!   another minor version, and `--as` restores a copy without moving the aliases;
//! - shard streaming takes a backup without any snapshot file on the node;
//! - a multi-GB snapshot streams with bounded agent memory (VmHWM);
//! - `backup all` takes PostgreSQL and Qdrant as one set, and `restore SET` brings both back;
//!   after it, `latest` names the set (not a member, which starts later), so `restore latest`
//!   brings back every member.
//!
//! The API key reaches the double on every request and never appears in the agent's logs.

use soma_tests::qdrant::{QdrantDouble, Times};
use soma_tests::{Agent, PgCluster, TestStore, listed_ids, soma};

const API_KEY: &str = "test-qdrant-key-5f2c";
const MIB: u64 = 1024 * 1024;

fn qdrant_agent(store: &TestStore, q: &QdrantDouble, pg_url: &str, extra: &[&str]) -> Agent {
    let mut env = store.env();
    env.push(("SOMA_QDRANT_API_KEY".into(), API_KEY.into()));
    let url = q.url();
    let mut args = vec!["--qdrant-url", url.as_str()];
    args.extend_from_slice(extra);
    Agent::start(&store.url(), pg_url, &args, &env)
}

fn three_collections(q: &QdrantDouble) {
    q.add_collection("docs", 8, 2_000, 3 * MIB, 1);
    q.add_collection("memory", 16, 5_000, 6 * MIB + 123, 2);
    q.add_collection("tiny", 4, 3, 1000, 3);
    q.add_alias("docs-live", "docs");
    q.add_alias("memory-live", "memory");
}

fn ids(agent: &Agent) -> Vec<String> {
    listed_ids(agent.addr())
}

fn round_trip(store: TestStore) {
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let originals: Vec<String> = ["docs", "memory", "tiny"]
        .iter()
        .map(|c| q.fingerprint(c))
        .collect();
    let agent = qdrant_agent(&store, &q, "", &["--part-size", "5MiB"]);

    let out = soma(agent.addr(), &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup qdrant");
    let manifest = out.json();
    let id = manifest["id"].as_str().unwrap().to_string();
    assert_eq!(manifest["engine"], "qdrant");
    assert_eq!(manifest["artifacts"].as_array().unwrap().len(), 3);
    assert_eq!(manifest["details"]["qdrant_version"], "1.18.3");
    assert_eq!(
        manifest["details"]["collections"]["memory"]["points_count"],
        5000
    );
    let aliases = manifest["details"]["aliases"].as_array().unwrap();
    assert_eq!(aliases.len(), 2, "{aliases:?}");
    assert!(
        q.snapshot_files_on_node().is_empty(),
        "snapshots left on the node: {:?}",
        q.snapshot_files_on_node()
    );
    soma(agent.addr(), &["verify", &id]).assert_success("verify");

    // Everything exists: a restore in place must refuse without --force.
    soma(agent.addr(), &["restore", &id])
        .assert_code(1, "restore over existing collections")
        .assert_stderr_contains("already exists", "restore over existing collections")
        .assert_stderr_contains("--force", "restore over existing collections");

    // A copy under another name: same content, aliases untouched.
    soma(
        agent.addr(),
        &[
            "restore",
            &id,
            "--collection",
            "memory",
            "--as",
            "memory-copy",
        ],
    )
    .assert_success("restore --as");
    assert_eq!(q.fingerprint("memory-copy"), originals[1]);
    assert!(
        q.aliases()
            .contains(&("memory-live".into(), "memory".into()))
    );

    // Damage the live data, repoint an alias, then restore in place with --force.
    q.add_collection("docs", 8, 2_000, 3 * MIB, 99);
    q.add_alias("docs-live", "tiny");
    assert_ne!(q.fingerprint("docs"), originals[0]);
    soma(agent.addr(), &["restore", &id, "--force"]).assert_success("restore --force");
    for (c, fp) in ["docs", "memory", "tiny"].iter().zip(&originals) {
        assert_eq!(
            &q.fingerprint(c),
            fp,
            "collection {c} differs after restore"
        );
    }
    let aliases = q.aliases();
    assert!(
        aliases.contains(&("docs-live".into(), "docs".into())),
        "{aliases:?}"
    );
    assert!(
        aliases.contains(&("memory-live".into(), "memory".into())),
        "{aliases:?}"
    );
    assert!(
        q.snapshot_files_on_node().is_empty(),
        "files left on the node after the restore: {:?}",
        q.snapshot_files_on_node()
    );
    assert!(
        q.requests_without_api_key().is_empty(),
        "requests without the API key: {:?}",
        q.requests_without_api_key()
    );
    assert!(
        !agent.logs().contains(API_KEY),
        "the API key leaked into the logs"
    );
}

#[test]
fn collections_round_trip_with_aliases_on_the_local_store() {
    round_trip(TestStore::local());
}

#[test]
fn collections_round_trip_with_aliases_on_s3() {
    round_trip(TestStore::garage());
}

fn nothing_recorded(store: &TestStore, agent: &Agent, q: &QdrantDouble) {
    assert!(ids(agent).is_empty(), "a backup was recorded");
    assert!(store.manifests().is_empty());
    assert!(
        store.list("backups/").is_empty(),
        "objects left in the store: {:?}",
        store.list("backups/")
    );
    assert!(
        store.pending_uploads().is_empty(),
        "{:?}",
        store.pending_uploads()
    );
    assert!(
        q.snapshot_files_on_node().is_empty(),
        "{:?}",
        q.snapshot_files_on_node()
    );
}

#[test]
fn a_wrong_checksum_from_qdrant_is_detected() {
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, "", &[]);
    q.report_wrong_checksum(Times::Next(1));
    soma(agent.addr(), &["backup", "qdrant"])
        .assert_code(1, "backup with a wrong Qdrant checksum")
        .assert_stderr_contains("checksum mismatch", "backup with a wrong Qdrant checksum");
    nothing_recorded(&store, &agent, &q);
}

#[test]
fn a_cut_download_records_no_backup() {
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, "", &[]);
    q.cut_downloads_after(MIB, Times::Next(1));
    let out = soma(
        agent.addr(),
        &["backup", "qdrant", "--collection", "memory"],
    );
    out.assert_code(1, "backup with a cut download");
    nothing_recorded(&store, &agent, &q);
    // The next attempt works.
    soma(
        agent.addr(),
        &["backup", "qdrant", "--collection", "memory"],
    )
    .assert_success("backup after the fault cleared");
    assert_eq!(ids(&agent).len(), 1);
}

#[test]
fn a_restore_into_another_minor_version_is_explained() {
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, "", &[]);
    soma(agent.addr(), &["backup", "qdrant", "--collection", "tiny"]).assert_success("backup");
    q.set_version("1.19.0");
    soma(agent.addr(), &["restore", "latest", "--force"])
        .assert_code(1, "restore into 1.19")
        .assert_stderr_contains("Qdrant 1.18.3", "restore into 1.19")
        .assert_stderr_contains("same minor version", "restore into 1.19");
}

#[test]
fn shard_streaming_leaves_no_file_on_the_node() {
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, "", &[]);
    q.clear_requests();
    let out = soma(
        agent.addr(),
        &[
            "-o",
            "json",
            "backup",
            "qdrant",
            "--stream-shards",
            "--collection",
            "memory",
        ],
    );
    out.assert_success("backup --stream-shards");
    let manifest = out.json();
    assert_eq!(manifest["kind"], "shard-stream-snapshots");
    assert_eq!(manifest["artifacts"][0]["shard"], 0);
    let created_on_node: Vec<_> = q
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/snapshots"))
        .collect();
    assert!(created_on_node.is_empty(), "{created_on_node:?}");
    assert!(q.snapshot_files_on_node().is_empty());
    let id = manifest["id"].as_str().unwrap();
    soma(
        agent.addr(),
        &[
            "restore",
            id,
            "--collection",
            "memory",
            "--as",
            "memory-from-shards",
        ],
    )
    .assert_success("restore a shard-stream backup");
    assert_eq!(q.fingerprint("memory-from-shards"), q.fingerprint("memory"));

    // A server without the streaming route is refused with the version that has it.
    q.set_version("1.11.5");
    soma(agent.addr(), &["backup", "qdrant", "--stream-shards"])
        .assert_code(1, "shard streaming on 1.11")
        .assert_stderr_contains("needs Qdrant 1.12", "shard streaming on 1.11");
}

#[test]
fn a_multi_gigabyte_snapshot_streams_with_bounded_memory() {
    let q = QdrantDouble::start(None);
    // Pseudo-random bytes: incompressible, so every byte crosses the pipeline at full size.
    q.add_collection("big", 64, 1_000_000, 2 * 1024 * MIB + 17, 7);
    let store = TestStore::local();
    let url = q.url();
    let agent = Agent::start(&store.url(), "", &["--qdrant-url", &url], &store.env());
    let out = soma(agent.addr(), &["-o", "json", "backup", "qdrant"]);
    out.assert_success("backup of a 2 GiB collection");
    let raw = out.json()["raw_bytes"].as_u64().unwrap();
    assert!(raw > 2 * 1024 * MIB, "raw bytes {raw}");
    let peak_mib = agent.peak_rss_kib() / 1024;
    eprintln!("agent VmHWM after streaming {raw} bytes: {peak_mib} MiB");
    // Part buffers: (2 in flight + 1 filling) x 8 MiB, plus zstd, the code and the runtime:
    // measured 63 MiB here; 16 MiB parts (or buffers kept per thread) would pass 80.
    assert!(
        peak_mib < 80,
        "agent peak RSS {peak_mib} MiB while streaming a {raw}-byte snapshot"
    );
    assert!(q.snapshot_files_on_node().is_empty());
}

#[test]
fn a_backup_set_takes_and_restores_postgres_and_qdrant_together() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table policy (id int primary key, rule text);
         insert into policy select i, 'rule ' || i from generate_series(1, 500) i;",
    );
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, &pg.url("appdb"), &[]);

    let out = soma(agent.addr(), &["-o", "json", "backup", "all"]);
    out.assert_success("backup all");
    let set = out.json();
    let set_id = set["id"].as_str().unwrap().to_string();
    assert_eq!(set["engine"], "set");
    let members: Vec<String> = set["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members.len(), 2, "{members:?}");
    let listed = ids(&agent);
    for id in members.iter().chain([&set_id]) {
        assert!(listed.contains(id), "{id} not listed in {listed:?}");
    }
    let table = soma(agent.addr(), &["list"]);
    table.assert_success("list");
    assert!(
        table.stdout.contains(&format!("└ {}", members[0])),
        "{}",
        table.stdout
    );
    soma(agent.addr(), &["verify", &set_id]).assert_success("verify the set");

    // Change both engines, then bring both back with one command.
    let before = pg.psql(
        "appdb",
        "select md5(string_agg(rule, ',' order by id)) from policy",
    );
    let docs_before = q.fingerprint("docs");
    pg.psql("appdb", "delete from policy where id > 100");
    q.add_collection("docs", 8, 2_000, 3 * MIB, 42);
    soma(agent.addr(), &["restore", &set_id])
        .assert_code(1, "restore a set over live data")
        .assert_stderr_contains("--clean", "restore a set over live data");
    soma(agent.addr(), &["restore", &set_id, "--clean", "--force"])
        .assert_success("restore the set");
    assert_eq!(
        pg.psql(
            "appdb",
            "select md5(string_agg(rule, ',' order by id)) from policy"
        ),
        before
    );
    assert_eq!(q.fingerprint("docs"), docs_before);

    // Deleting the set deletes its members.
    soma(agent.addr(), &["delete", &set_id, "--yes"]).assert_success("delete the set");
    assert!(ids(&agent).is_empty(), "{:?}", ids(&agent));
}

#[test]
fn latest_after_backup_all_is_the_set_and_restores_every_member() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql(
        "appdb",
        "create table policy (id int primary key, rule text);
         insert into policy select i, 'rule ' || i from generate_series(1, 50) i;",
    );
    let q = QdrantDouble::start(Some(API_KEY));
    q.add_collection("docs", 4, 20, 1000, 1);
    q.add_collection("tiny", 4, 3, 1000, 3);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, &pg.url("appdb"), &[]);
    let a = agent.addr();

    let out = soma(a, &["-o", "json", "backup", "all"]);
    out.assert_success("backup all");
    let set_id = out.json()["id"].as_str().expect("set id").to_string();

    let out = soma(a, &["describe", "latest", "-o", "json"]);
    out.assert_success("describe latest -o json");
    let described = out.json();
    assert_eq!(
        described["id"].as_str(),
        Some(set_id.as_str()),
        "right after backup all, latest names another backup than the set:\n{out}"
    );
    assert_eq!(described["engine"], "set", "{out}");
    let out = soma(a, &["describe", "latest"]);
    out.assert_success("describe latest");
    assert!(
        out.stdout
            .lines()
            .next()
            .is_some_and(|l| l.starts_with(&format!("latest resolved to {set_id} (set of 2"))),
        "{out}"
    );

    let rules = "select md5(string_agg(rule, ',' order by id)) from policy";
    let before = pg.psql("appdb", rules);
    let (docs, tiny) = (q.fingerprint("docs"), q.fingerprint("tiny"));
    pg.psql("appdb", "delete from policy where id > 10");
    q.add_collection("docs", 4, 20, 1000, 42);
    q.add_collection("tiny", 4, 3, 1000, 43);
    assert_ne!(
        q.fingerprint("docs"),
        docs,
        "the change must be visible to be undone"
    );
    soma(a, &["restore", "latest", "--clean", "--force"]).assert_success("restore latest");
    assert_eq!(
        pg.psql("appdb", rules),
        before,
        "PostgreSQL member not restored"
    );
    assert_eq!(
        q.fingerprint("docs"),
        docs,
        "Qdrant collection docs not restored"
    );
    assert_eq!(
        q.fingerprint("tiny"),
        tiny,
        "Qdrant collection tiny not restored"
    );
}

#[test]
fn a_full_storage_snapshot_is_streamed_and_explained_on_restore() {
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, "", &[]);
    let out = soma(
        agent.addr(),
        &["-o", "json", "backup", "qdrant", "--full-storage"],
    );
    out.assert_success("backup --full-storage");
    let manifest = out.json();
    assert_eq!(manifest["kind"], "full-storage-snapshots");
    assert_eq!(manifest["artifacts"].as_array().unwrap().len(), 1);
    let id = manifest["id"].as_str().unwrap().to_string();
    // The stored artifact is exactly the storage snapshot Qdrant produced: every collection's
    // content is inside it.
    let raw = store.read(&format!("backups/{id}/storage.snapshot.zst"));
    let archive = zstd_decode(&raw);
    let inside = soma_tests::qdrant::full_snapshot_fingerprints(&archive[..]).unwrap();
    for c in ["docs", "memory", "tiny"] {
        assert_eq!(inside.get(c), Some(&q.fingerprint(c)), "collection {c}");
    }
    let left: Vec<_> = q
        .snapshot_files_on_node()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "snapshot"))
        .collect();
    assert!(left.is_empty(), "snapshots left on the node: {left:?}");
    soma(agent.addr(), &["verify", &id]).assert_success("verify a storage snapshot");
    soma(agent.addr(), &["restore", &id, "--force"])
        .assert_code(1, "restore of a storage snapshot")
        .assert_stderr_contains("--storage-snapshot", "restore of a storage snapshot");
}

fn zstd_decode(bytes: &[u8]) -> Vec<u8> {
    zstd::decode_all(bytes).expect("the stored artifact is a valid zstd stream")
}

#[test]
fn a_slow_qdrant_still_completes_and_progress_is_reported() {
    let q = QdrantDouble::start(Some(API_KEY));
    q.add_collection("docs", 8, 2_000, 3 * MIB, 1);
    // 48 chunks of 64 KiB at 100 ms each: about five seconds of streaming, while the plugin
    // prints a plain progress line at least every two seconds when stderr is not a terminal.
    q.set_download_chunk_delay(std::time::Duration::from_millis(100));
    let store = TestStore::local();
    let agent = qdrant_agent(&store, &q, "", &[]);
    let out = soma(agent.addr(), &["backup", "qdrant"]);
    out.assert_success("backup from a slow Qdrant");
    let streaming: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains(": streaming — raw ") && !l.contains("raw 0 B"))
        .collect();
    assert!(
        !streaming.is_empty(),
        "no progress with bytes while streaming:\n{}",
        out.stderr
    );
}

/// A Qdrant node that freezes, or answers without end, fails the backup or restore in bounded
/// time with an error naming what and the flag, and leaves nothing recorded. The double follows
/// real Qdrant in when it answers: `wait=true` creation and upload answer only once done, and a
/// download sends its file chunk by chunk; the faults hold those answers back or pad them. A
/// frozen node is modelled as one that does nothing until it answers (a node that is only slow
/// may still finish a snapshot after the agent gave up: README says how to find it).
/// The holds last 90 s, so a broken limit fails the 60 s bound instead of hanging the test.
#[test]
fn a_frozen_or_boundless_qdrant_fails_in_bounded_time() {
    use std::time::{Duration, Instant};
    const HOLD: Duration = Duration::from_secs(90);
    let q = QdrantDouble::start(Some(API_KEY));
    three_collections(&q);
    let store = TestStore::local();
    let agent = qdrant_agent(
        &store,
        &q,
        "",
        &[
            "--qdrant-stall-timeout",
            "2s",
            "--qdrant-snapshot-timeout",
            "3s",
        ],
    );
    let fails_with = |what: &str, args: &[&str], needles: &[&str]| {
        let started = Instant::now();
        let out = soma(agent.addr(), args);
        let took = started.elapsed();
        eprintln!("{what} ({took:?}): {}", out.stderr.trim());
        out.assert_code(1, what);
        for needle in needles {
            out.assert_stderr_contains(needle, what);
        }
        // Bounded: the limits are seconds; without them each case waits for the hold (or reads
        // a gibibyte).
        assert!(took < Duration::from_secs(60), "{what} took {took:?}");
        q.clear_faults();
        nothing_recorded(&store, &agent, &q);
    };

    // 1 GiB of padding in the collection list: refused at 16 MiB, never held.
    q.pad_collection_lists(1024 * MIB);
    fails_with(
        "a boundless collection list",
        &["backup", "qdrant"],
        &["/collections", "larger than 16 MiB"],
    );
    let peak_mib = agent.peak_rss_kib() / 1024;
    assert!(peak_mib < 200, "agent peak RSS {peak_mib} MiB");

    // A download that stops sending (one chunk, so a broken limit ends after one hold).
    q.set_download_chunk_delay(HOLD);
    fails_with(
        "a frozen download",
        &["backup", "qdrant", "--collection", "tiny"],
        &["sent nothing more", "for 2s", "--qdrant-stall-timeout"],
    );

    // A snapshot creation that never finishes.
    q.set_snapshot_create_delay(HOLD);
    fails_with(
        "a frozen snapshot creation",
        &["backup", "qdrant"],
        &["not finished within 3s", "--qdrant-snapshot-timeout"],
    );

    // Back to normal: the backup works, and a restore whose recovery never answers fails.
    soma(agent.addr(), &["backup", "qdrant", "--collection", "tiny"])
        .assert_success("backup once Qdrant answers");
    let before = q.fingerprint("tiny");
    q.set_recovery_delay(HOLD);
    let started = Instant::now();
    soma(agent.addr(), &["restore", "latest", "--force"])
        .assert_code(1, "restore into a frozen Qdrant")
        .assert_stderr_contains("not recovered within 3s", "restore into a frozen Qdrant")
        .assert_stderr_contains("--qdrant-snapshot-timeout", "restore into a frozen Qdrant");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(q.fingerprint("tiny"), before, "the collection was changed");
}
