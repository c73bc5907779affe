//! Store contents an agent must survive (issue 14, part 2), each planted through the S3 API on a
//! real Garage server, as another tool, a crash or a person could leave it:
//! - an incomplete multipart upload whose key is not ASCII, under `backups/`: the start-up sweep
//!   parses every pending upload's key, and a byte-index split of such a key used to panic at every
//!   start (a crash loop); the agent must start, serve and leave that upload alone;
//! - WAL objects with segment numbers FFFFFFFF000000FF and FFFFFFFE000000FF: a window computed by
//!   walking segment numbers would spin a core for ~10^12 steps; `describe` of a base backup must
//!   answer, reporting the gap before the second (the first cannot be WAL: it ends past the last
//!   LSN).

use std::time::Duration;

use soma_tests::pitr::{physical_backup, wal_agent};
use soma_tests::store::S3_PREFIX;
use soma_tests::{Agent, PgCluster, TestStore, soma};

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

#[test]
fn a_wal_key_with_a_huge_segment_number_does_not_hang_describe() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let id = physical_backup(agent.addr());
    let system_id =
        soma(agent.addr(), &["-o", "json", "describe", &id]).json()["details"]["system_id"]
            .as_str()
            .expect("system id")
            .to_owned();
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
    // The planted object was read as part of the archive: the window reports the gap before it.
    let human = soma(agent.addr(), &["describe", &id]);
    human.assert_success("describe");
    assert!(
        human.stdout.contains("00000001FFFFFFFE000000FE"),
        "the planted segment is not in the window's gaps:\n{human}"
    );
}

/// A manifest whose `wal_segment_size` is 0 (nothing PostgreSQL can have; every window and WAL
/// name computation divides by it) is refused as a bad backup where it is used, and never takes
/// the agent down: `list` still answers, and so does the next request.
#[test]
fn a_manifest_with_a_zero_segment_size_is_refused_not_divided_by() {
    let store = TestStore::garage();
    let pg = PgCluster::start();
    let spool = tempfile::tempdir().expect("spool");
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let id = physical_backup(agent.addr());
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
