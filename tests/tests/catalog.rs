//! Proves that "latest" means what a user expects when backups are taken back to back, as a cron
//! job or a script does: right after each backup, `describe latest` names the backup just taken and
//! `list` shows every backup newest first — including backups that start within the same second.

use soma_tests::{Agent, PgCluster, TestStore, listed_ids, soma};

/// Enough back-to-back backups that several start within the same second.
const BACKUPS: usize = 10;

#[test]
fn latest_is_the_backup_just_taken() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql("appdb", "create table t (id integer primary key)");
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();

    let mut taken: Vec<String> = Vec::new();
    for n in 0..BACKUPS {
        pg.psql("appdb", &format!("insert into t values ({n})"));
        let out = soma(
            a,
            &["-o", "json", "backup", "postgres", "--database", "appdb"],
        );
        out.assert_success("backup postgres --database appdb");
        let id = out.json()["id"].as_str().expect("backup id").to_owned();

        let out = soma(a, &["describe", "latest", "-o", "json"]);
        out.assert_success("describe latest -o json");
        assert_eq!(
            out.json()["id"].as_str(),
            Some(id.as_str()),
            "right after backup {id} (backup {n} of a back-to-back series, earlier: {taken:?}), \
             latest names another backup:\n{out}"
        );
        taken.push(id);
    }

    let listed = listed_ids(a);
    taken.reverse();
    assert_eq!(listed, taken, "list is not newest first");
}

/// One unreadable manifest (here garbage planted through the S3 API on Garage, as a broken tool
/// or a person could leave it) does not stop `list` or `latest`: the backup is left out and named
/// with the reason, the others are listed and restore. Deleting on the strength of the list is
/// another matter: `prune` refuses while a manifest cannot be read, since the backup behind it
/// may still need WAL or be one to keep.
#[test]
fn an_unreadable_manifest_is_named_and_skipped_but_stops_pruning() {
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql("appdb", "create table t (id integer primary key)");
    let store = TestStore::garage();
    let agent = Agent::start(
        &store.url(),
        &pg.url("appdb"),
        &["--retention", "keep-last=1"],
        &store.env(),
    );
    let a = agent.addr();
    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("backup");
    let good = out.json()["id"].as_str().expect("backup id").to_owned();
    // Newer than the real one, so "latest" would pick it if it were trusted.
    let bad = "29991231T235959Z-pg-appdb-dead";
    store.write(
        &format!("backups/{bad}/manifest.json"),
        b"\x00not a manifest".to_vec(),
    );
    // More of them, so that the first pages status reads for the newest backup hold only
    // unreadable ones.
    for i in 0..40 {
        store.write(
            &format!("backups/29991231T2358{i:02}Z-pg-appdb-dead/manifest.json"),
            b"garbage".to_vec(),
        );
    }

    let out = soma(a, &["list"]);
    out.assert_success("list with one unreadable manifest");
    assert!(out.stdout.contains(&good), "{out}");
    assert!(!out.stdout.contains(bad), "{out}");
    out.assert_stderr_contains(bad, "list names the unreadable backup");
    out.assert_stderr_contains("unreadable", "list says why it is left out");
    assert_eq!(listed_ids(a), vec![good.clone()]);

    let out = soma(a, &["describe", "latest", "-o", "json"]);
    out.assert_success("describe latest");
    assert_eq!(out.json()["id"], good.as_str());
    let status = soma(a, &["-o", "json", "status"]);
    assert_eq!(status.json()[0]["last_backup"], good.as_str(), "{status}");
    soma(a, &["restore", "latest", "--database", "appdb_restored"])
        .assert_success("restore latest past an unreadable manifest");

    let out = soma(a, &["prune", "--yes"]);
    assert_ne!(
        out.code, 0,
        "prune deleted with an unreadable manifest:\n{out}"
    );
    out.assert_stderr_contains(bad, "prune names the unreadable backup");
    assert!(
        store.list(&format!("backups/{good}/")).len() > 1,
        "prune deleted the readable backup"
    );
}

/// Issue 14, part 2: a store holding more backups than one gRPC answer can carry (each backup
/// comes with its manifest; tonic clients decode at most 4 MiB a message). `list` used to fail
/// with "message length too large"; it now reads the list a page at a time and shows them all,
/// and status asks for the newest only.
#[test]
fn a_list_larger_than_one_grpc_message_is_read_page_by_page() {
    const PLANTED: usize = 3000;
    let pg = PgCluster::start();
    pg.createdb("appdb");
    pg.psql("appdb", "create table t (id integer primary key)");
    let store = TestStore::local();
    let agent = Agent::start(&store.url(), &pg.url("appdb"), &[], &store.env());
    let a = agent.addr();
    let out = soma(
        a,
        &["-o", "json", "backup", "postgres", "--database", "appdb"],
    );
    out.assert_success("backup");
    let real = out.json()["id"].as_str().expect("backup id").to_owned();
    let manifest = String::from_utf8(store.read(&format!("backups/{real}/manifest.json")))
        .expect("manifest is text");
    // Copies under other ids, one second apart and all older than the real one.
    let start = chrono::NaiveDate::from_ymd_opt(2025, 1, 1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap();
    let mut bytes = 0;
    for i in 0..PLANTED {
        let at = start + chrono::Duration::seconds(i as i64);
        let id = format!("{}-pg-appdb-{:04x}", at.format("%Y%m%dT%H%M%SZ"), i);
        let copy = manifest.replace(&real, &id);
        bytes += copy.len();
        store.write(&format!("backups/{id}/manifest.json"), copy.into_bytes());
    }
    assert!(
        bytes > 4 << 20,
        "the planted manifests ({bytes} bytes) would fit in one message"
    );
    let out = soma(a, &["-o", "json", "list"]);
    out.assert_success("list of more backups than one message holds");
    let listed = out.json();
    let listed = listed.as_array().expect("a JSON array");
    assert_eq!(listed.len(), PLANTED + 1);
    assert_eq!(listed[0]["id"], real.as_str(), "newest first");
    let ids: Vec<&str> = listed
        .iter()
        .map(|b| b["id"].as_str().expect("id"))
        .collect();
    // Page after page, nothing twice and nothing skipped: strictly newest first.
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "the pages overlap or are out of order"
    );
    let status = soma(a, &["-o", "json", "status"]);
    status.assert_success("status");
    assert_eq!(status.json()[0]["last_backup"], real.as_str());

    // A backup deleted between two pages (the last of the first, which the token names): the
    // next page still starts right after it.
    let first = list_page(a, 10, "");
    let token = first.next_page_token.clone();
    assert_eq!(token, ids[9]);
    let first_ids: Vec<&str> = first.backups.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(first_ids, ids[..10]);
    let second = list_page(a, 10, &token);
    let second_ids: Vec<&str> = second.backups.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(second_ids, ids[10..20], "the second page overlaps or skips");
    soma(a, &["delete", &token, "--yes"]).assert_success("delete between pages");
    let second = list_page(a, 10, &token);
    let second_ids: Vec<&str> = second.backups.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(second_ids, ids[10..20]);
}

/// One `ListBackups` call, straight over gRPC (the plugin always reads every page).
fn list_page(addr: &str, size: u32, token: &str) -> soma_proto::v1::ListBackupsResponse {
    let request = soma_proto::v1::ListBackupsRequest {
        page_size: size,
        page_token: token.to_string(),
    };
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect to the agent");
            soma_proto::v1::soma_agent_client::SomaAgentClient::new(channel)
                .list_backups(request)
                .await
                .expect("ListBackups")
                .into_inner()
        })
}
