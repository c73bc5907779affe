//! Proves that damage to the WAL archive behind point-in-time recovery is never replayed past
//! silently. A real PostgreSQL 15 server streams its WAL through the agent into a real Garage S3
//! server; then, behind the agent's back, one stored segment gets one flipped byte, or one segment
//! in the middle of the archive disappears:
//!
//! - a flipped byte makes the restored server's recovery stop with a FATAL from
//!   `soma-agent wal-fetch` that names the segment, instead of ending recovery early and promoting
//!   a database that silently lacks every later transaction; with the original bytes back the same
//!   restore promotes with every row;
//! - a missing segment is shown as a gap by `describe` and `list`, and `restore-pgdata --target
//!   latest` refuses to lay anything down;
//! - `soma-agent wal-fetch`, PostgreSQL's restore_command, answers with the exit statuses
//!   PostgreSQL acts on: 0 with the checked bytes, 1 past the end of the archive, 255 (abort
//!   recovery) for a gap or a corrupted object, leaving nothing behind at the destination.
//!
//! Each test first checks its starting point: once `status` reports the archive at the server's
//! WAL position, every segment the server completed since the base backup is stored in the archive
//! as a complete segment.

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use soma_tests::pitr::{
    PROMOTE_TIMEOUT, format_lsn, lsn, physical_backup, restore_and_start, restore_pgdata,
    segment_name, segno_of, wait_archived, wal_agent, wal_status,
};
use soma_tests::store::S3_PREFIX;
use soma_tests::{Agent, CmdOutput, PgCluster, TestStore, bin_path, poll_until, soma};
use tempfile::TempDir;

/// Rounds of `insert …; select pg_switch_wal();` after the base backup: each completes a segment.
const ROUNDS: i64 = 4;
/// Rows each round inserts.
const ROWS_PER_ROUND: i64 = 500;

/// One object of the WAL archive as it sits in Garage (see agent/src/wal/mod.rs for the layout).
#[derive(Debug, Clone)]
struct WalKey {
    /// The full Garage key.
    key: String,
    /// PostgreSQL's file name, e.g. `000000010000000000000005`.
    file: String,
    /// `seg`, `partial` or `history`.
    kind: String,
    /// Hex sha256 of the WAL file's raw bytes.
    sha256: String,
}

impl WalKey {
    /// Decodes `<archive>/<file>.<kind>.<end hex>.<captured ms>.<sha256>.zst`.
    fn parse(key: &str, archive: &str) -> Option<Self> {
        let rest = key.strip_prefix(archive)?.strip_suffix(".zst")?;
        let mut parts = rest.rsplitn(5, '.');
        let sha256 = parts.next()?.to_owned();
        let _captured = parts.next()?;
        let _end = parts.next()?;
        let kind = parts.next()?.to_owned();
        let file = parts.next()?.to_owned();
        Some(Self {
            key: key.to_owned(),
            file,
            kind,
            sha256,
        })
    }

    /// Segment number (PostgreSQL's XLogSegNo) of a segment's file name.
    fn segno(&self, seg_size: u64) -> u64 {
        segno_of(&self.file, seg_size)
    }
}

/// A PostgreSQL server whose WAL the agent streams into Garage, a physical base backup of it, and
/// at least three complete segments archived after the point the backup is consistent at.
struct ArchivedCluster {
    // Dropped first: the agent and its pg_receivewal go before the server they stream from.
    agent: Agent,
    _pg: PgCluster,
    store: TestStore,
    _spool: TempDir,
    /// The base backup's id.
    id: String,
    /// The cluster's system identifier (the archive's folder).
    system_id: String,
    /// Timeline the backup was taken on.
    timeline: u32,
    /// WAL segment size.
    seg_size: u64,
    /// Rows in table `t` when everything was archived.
    rows: i64,
    /// The server's WAL position that `status` reported archived.
    archived_at: u64,
    /// Complete segments archived after the base backup's stop segment, oldest first.
    after_backup: Vec<WalKey>,
}

impl ArchivedCluster {
    fn new() -> Self {
        let pg = PgCluster::start();
        let store = TestStore::garage();
        let spool = tempfile::Builder::new()
            .prefix("soma-spool-")
            .tempdir()
            .expect("cannot create the WAL spool directory");
        let agent = wal_agent(&pg, &store, spool.path(), "1s");
        let a = agent.addr().to_owned();
        poll_until(
            Duration::from_secs(60),
            "the agent to stream WAL (status: receiving)",
            || (wal_status(&a)["receiving"].as_bool() == Some(true)).then_some(()),
        );
        pg.psql(
            "postgres",
            "create table t (id bigserial primary key, round integer not null, payload text not null);
             insert into t (round, payload) select 0, 'before the backup ' || i from generate_series(1, 100) i;",
        );
        wait_archived(&a, &pg);

        let id = physical_backup(&a);
        let details = describe_json(&a, &id)["details"].clone();
        let system_id = details["system_id"]
            .as_str()
            .expect("details.system_id")
            .to_owned();
        let timeline = u32::try_from(details["timeline"].as_u64().expect("details.timeline"))
            .expect("timeline fits in u32");
        let seg_size = details["wal_segment_size"]
            .as_u64()
            .expect("details.wal_segment_size");
        let start = lsn(details["start_lsn"].as_str().expect("details.start_lsn"));
        let stop = lsn(details["stop_lsn"].as_str().expect("details.stop_lsn"));
        assert!(start <= stop, "start_lsn after stop_lsn: {details}");

        for round in 1..=ROUNDS {
            pg.psql(
                "postgres",
                &format!(
                    "insert into t (round, payload)
                       select {round}, 'round {round} row ' || i from generate_series(1, {ROWS_PER_ROUND}) i;
                     select pg_switch_wal();"
                ),
            );
        }
        // More WAL after the last switch, as a live server writes: the archive ends with the
        // partial segment the agent ships every second. (Without it, after a pg_switch_wal on an
        // idle server, the archived position that `status` reports stays short of
        // pg_current_wal_lsn() until PostgreSQL writes some record of its own: a complete segment
        // counts only up to its last page holding WAL.)
        pg.psql(
            "postgres",
            &format!(
                "insert into t (round, payload)
                   select {}, 'after the last switch ' || i from generate_series(1, {ROWS_PER_ROUND}) i",
                ROUNDS + 1
            ),
        );
        let archived_at = wait_archived(&a, &pg);
        let rows: i64 = pg
            .psql("postgres", "select count(*) from t")
            .parse()
            .expect("count(*)");
        assert_eq!(rows, 100 + (ROUNDS + 1) * ROWS_PER_ROUND);

        // `status` now says the archive holds everything the server had written, so every segment
        // the server completed since the backup started is stored as a complete segment.
        let start_segno = start / seg_size;
        let stop_segno = stop / seg_size;
        let archive = wal_keys(&store, &system_id);
        let mut problems = Vec::new();
        for segno in start_segno..archived_at / seg_size {
            let name = segment_name(timeline, segno, seg_size);
            let stored: Vec<&str> = archive
                .iter()
                .filter(|k| k.file == name)
                .map(|k| k.kind.as_str())
                .collect();
            if !stored.contains(&"seg") {
                problems.push(if stored.is_empty() {
                    format!("{name} is missing")
                } else {
                    format!("{name} is stored only as {stored:?}, not as a complete segment")
                });
            }
        }
        assert!(
            problems.is_empty(),
            "`status` reported the archive at {} (the server's position), but of the segments the \
             server completed since the base backup, {problems:?}\nstatus: {}\narchive: {:#?}",
            format_lsn(archived_at),
            wal_status(&a),
            archive
                .iter()
                .map(|k| k.key.rsplit('/').next().unwrap_or_default())
                .collect::<Vec<_>>()
        );
        let after_backup: Vec<WalKey> = archive
            .into_iter()
            .filter(|k| k.kind == "seg" && k.segno(seg_size) > stop_segno)
            .collect();
        assert!(
            after_backup.len() >= 3,
            "expected at least 3 complete segments archived after the backup's stop segment {}, got {:?}",
            segment_name(timeline, stop_segno, seg_size),
            after_backup.iter().map(|k| &k.key).collect::<Vec<_>>()
        );
        ArchivedCluster {
            agent,
            _pg: pg,
            store,
            _spool: spool,
            id,
            system_id,
            timeline,
            seg_size,
            rows,
            archived_at,
            after_backup,
        }
    }

    fn addr(&self) -> &str {
        self.agent.addr()
    }

    fn garage(&self) -> &soma_tests::Garage {
        self.store.garage_server().expect("an S3 store on Garage")
    }

    /// Flips one byte in the middle of the stored object `key` (same key, so the name's digest no
    /// longer matches the content); returns the original bytes.
    fn flip_a_byte(&self, key: &str) -> Vec<u8> {
        let original = self.garage().get_object(key);
        assert!(
            original.len() > 64,
            "object {key} is only {} bytes",
            original.len()
        );
        let mut damaged = original.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x40;
        self.garage().put_object(key, damaged);
        assert_ne!(
            self.garage().get_object(key),
            original,
            "the damaged object reads back unchanged"
        );
        original
    }

    /// Deletes the stored object `key`; returns its bytes.
    fn delete(&self, key: &str) -> Vec<u8> {
        let garage = self.garage();
        let original = garage.get_object(key);
        garage
            .block_on(
                garage
                    .s3_client()
                    .delete_object()
                    .bucket(soma_tests::garage::BUCKET)
                    .key(key)
                    .send(),
            )
            .unwrap_or_else(|e| panic!("DeleteObject {key}: {e:?}"));
        assert!(
            !garage.list_keys(key).contains(&key.to_owned()),
            "{key} is still listed after DeleteObject"
        );
        original
    }
}

/// Every object of the cluster's WAL archive in Garage, sorted by key.
fn wal_keys(store: &TestStore, system_id: &str) -> Vec<WalKey> {
    let archive = format!("{S3_PREFIX}/wal/{system_id}/");
    store
        .garage_server()
        .expect("an S3 store on Garage")
        .list_keys(&archive)
        .iter()
        .filter_map(|k| WalKey::parse(k, &archive))
        .collect()
}

/// `kubectl-soma -o json describe ID`.
fn describe_json(agent: &str, id: &str) -> serde_json::Value {
    let out = soma(agent, &["-o", "json", "describe", id]);
    out.assert_success("describe -o json");
    out.json()
}

/// Runs `soma-agent wal-fetch --store STORE --system-id ID FILE DEST` as PostgreSQL's
/// restore_command does, with only the store's credentials in its environment.
fn wal_fetch(store: &TestStore, system_id: &str, file: &str, dest: &Path) -> CmdOutput {
    let mut cmd = std::process::Command::new(bin_path("soma-agent"));
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("AWS_") || k.starts_with("SOMA_") || k.starts_with("PG") {
            cmd.env_remove(&key);
        }
    }
    let out = cmd
        .arg("wal-fetch")
        .arg("--store")
        .arg(store.url())
        .arg("--system-id")
        .arg(system_id)
        .arg(file)
        .arg(dest)
        .envs(store.env())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot run soma-agent wal-fetch");
    CmdOutput::from_output(&out)
}

/// The names of the files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The last complete segment of the archive (WAL of a partial segment follows it) has one flipped
/// byte: the restore lays the base backup down (it reads no WAL content), but the restored server's recovery stops at that segment with
/// `soma-agent wal-fetch: FATAL … corrupted`, naming it, and the server shuts down without ending
/// recovery or picking a new timeline — it never serves a database that silently lacks what came
/// after. With the original bytes put back, the same restore replays everything and promotes with
/// every row, so the stop came from the damage and nothing else.
#[test]
fn a_corrupted_wal_segment_stops_recovery_loudly_naming_it() {
    let began = Instant::now();
    let c = ArchivedCluster::new();
    // The last complete segment: recovery to the latest point must replay it.
    let victim = c
        .after_backup
        .last()
        .expect("segments after the backup")
        .clone();
    let previous = segment_name(c.timeline, victim.segno(c.seg_size) - 1, c.seg_size);
    // `verify` proves the whole chain beforehand: the base backup and every WAL file after it.
    let verified = soma(c.agent.addr(), &["verify", &c.id]);
    verified.assert_success("verify before the damage");
    assert!(
        verified.stdout.contains("WAL file(s)") && verified.stdout.contains("verified"),
        "{verified}"
    );
    let original = c.flip_a_byte(&victim.key);
    // ... and finds the damage before any restore is attempted.
    let refused = soma(c.agent.addr(), &["verify", &c.id]);
    assert_eq!(
        refused.code, 1,
        "verify of a damaged WAL chain must fail:\n{refused}"
    );
    assert!(
        refused.stderr.contains(&victim.file) && refused.stderr.contains("damaged"),
        "verify must name the damaged WAL file {}:\n{refused}",
        victim.file
    );

    let mut target = PgCluster::empty();
    restore_pgdata(
        &target,
        &c.store,
        &["--backup", &c.id, "--target", "latest"],
    )
    .assert_success("restore-pgdata --target latest over an archive with a corrupted segment");
    // The server either dies before it accepts connections (Err) or reaches consistency first
    // and dies during the rest of the replay (Ok): both are fine, promotion is not.
    let started = target.start_existing(&c.store.env());
    let promoted = target.wait_promoted_or_stopped(PROMOTE_TIMEOUT);
    let log = target.log();
    assert!(
        !promoted,
        "the restored server promoted although segment {} is corrupted (start: {started:?}):\n{log}",
        victim.file
    );
    assert!(
        !target.is_running(),
        "the restored server is still running:\n{log}"
    );

    let fatal_line = log
        .lines()
        .find(|l| l.contains("soma-agent wal-fetch: FATAL"))
        .unwrap_or_else(|| panic!("no `soma-agent wal-fetch: FATAL` in the server log:\n{log}"));
    assert!(
        fatal_line.contains(&victim.file) && fatal_line.contains("corrupted"),
        "wal-fetch's FATAL line does not name the corrupted segment {}:\n{fatal_line}\n--- log ---\n{log}",
        victim.file
    );
    // PostgreSQL itself says that the restore_command failure is what ends recovery: the exit
    // status 255 makes it abort instead of taking the failure for the end of the archive.
    let restore_failed = format!(
        "could not restore file \"{}\" from archive: child process exited with exit code 255",
        victim.file
    );
    assert!(
        log.contains(&restore_failed),
        "the server log lacks {restore_failed:?}:\n{log}"
    );
    assert!(
        log.contains("startup process") && log.contains("exited with exit code 1"),
        "the server log does not show the startup process failing:\n{log}"
    );
    // Replay got as far as the segment before the damaged one, so it stopped exactly there.
    let restored_previous = format!("restored log file \"{previous}\" from archive");
    assert!(
        log.contains(&restored_previous),
        "the server log lacks {restored_previous:?}:\n{log}"
    );
    for forbidden in ["archive recovery complete", "selected new timeline ID"] {
        assert!(
            !log.contains(forbidden),
            "the server log contains {forbidden:?} although recovery could not finish:\n{log}"
        );
    }
    drop(target);

    // The original bytes replay: the same restore promotes with every row.
    c.garage().put_object(&victim.key, original);
    let restored = restore_and_start(&c.store, &["--backup", &c.id, "--target", "latest"]);
    assert_eq!(
        restored.psql("postgres", "select count(*) from t"),
        c.rows.to_string(),
        "rows after restoring with the original bytes back"
    );
    assert_eq!(
        restored.psql("postgres", "select max(round) from t"),
        (ROUNDS + 1).to_string(),
        "the last round (WAL after the last complete segment) after restoring"
    );
    eprintln!("corrupted segment test took {:?}", began.elapsed());
}

/// A complete segment in the middle of the archive is deleted while later segments remain:
/// `describe -o json` lists the gap in `recovery_window.gaps`, the table of `describe` shows it on
/// its "WAL gaps:" line, `list` shows it for that backup, and `restore-pgdata --target latest`
/// refuses (recovery would stop silently at the gap), names the missing segment, and creates
/// nothing in the target. Putting the segment back makes the gap disappear.
#[test]
fn a_gap_in_the_wal_is_reported_by_describe_and_refused_by_restore() {
    let began = Instant::now();
    let c = ArchivedCluster::new();
    let a = c.addr();
    let before = describe_json(a, &c.id);
    assert_eq!(
        before["recovery_window"]["gaps"],
        serde_json::json!([]),
        "gaps before any damage: {before}"
    );
    let reach = lsn(before["recovery_window"]["latest_lsn"]
        .as_str()
        .expect("recovery_window.latest_lsn"));
    assert!(
        reach >= c.archived_at,
        "before any damage, the recoverable window should reach the archived position {}: {before}",
        format_lsn(c.archived_at)
    );

    let middle = c.after_backup[c.after_backup.len() / 2].clone();
    let later: Vec<&str> = c
        .after_backup
        .iter()
        .filter(|k| k.segno(c.seg_size) > middle.segno(c.seg_size))
        .map(|k| k.file.as_str())
        .collect();
    assert!(!later.is_empty(), "no segment after {}", middle.file);
    let original = c.delete(&middle.key);

    // describe -o json
    let described = describe_json(a, &c.id);
    let gaps = described["recovery_window"]["gaps"]
        .as_array()
        .unwrap_or_else(|| panic!("no recovery_window.gaps array:\n{described}"));
    assert!(
        gaps.iter()
            .any(|g| g.as_str().is_some_and(|g| g.contains(&middle.file))),
        "recovery_window.gaps does not name the missing segment {} (later ones {later:?} exist): {gaps:?}",
        middle.file
    );
    // The recoverable window ends in the segment before the gap (where its WAL ends: a segment
    // closed by pg_switch_wal holds zeros after its last record).
    let latest = lsn(described["recovery_window"]["latest_lsn"]
        .as_str()
        .expect("recovery_window.latest_lsn"));
    let gap_start = middle.segno(c.seg_size) * c.seg_size;
    assert!(
        gap_start - c.seg_size < latest && latest <= gap_start,
        "recovery_window.latest_lsn should end in the segment before the missing {}: {described}",
        middle.file
    );

    // describe (table)
    let table = soma(a, &["describe", &c.id]);
    table.assert_success("describe");
    let gap_line = table
        .stdout
        .lines()
        .find(|l| l.starts_with("WAL gaps:"))
        .unwrap_or_else(|| panic!("no `WAL gaps:` line in describe:\n{table}"));
    assert!(
        gap_line.contains(&middle.file),
        "the `WAL gaps:` line does not name {}: {gap_line}",
        middle.file
    );

    // list -o json and list
    let listed = soma(a, &["-o", "json", "list"]);
    listed.assert_success("list -o json");
    let entry = listed
        .json()
        .as_array()
        .and_then(|all| all.iter().find(|m| m["id"] == c.id.as_str()).cloned())
        .unwrap_or_else(|| panic!("backup {} is not in list -o json:\n{listed}", c.id));
    let listed_gaps = entry["recovery_window"]["gaps"].to_string();
    assert!(
        listed_gaps.contains(&middle.file),
        "list -o json does not show the gap at {} for {}: {listed_gaps}",
        middle.file,
        c.id
    );
    let list_table = soma(a, &["list"]);
    list_table.assert_success("list");
    let row = list_table
        .stdout
        .lines()
        .find(|l| l.starts_with(c.id.as_str()))
        .unwrap_or_else(|| panic!("no row for {} in list:\n{list_table}", c.id));
    assert!(
        row.contains("gap after"),
        "the list row of {} does not warn of the gap: {row}",
        c.id
    );

    // restore-pgdata --target latest refuses and creates nothing.
    let target = PgCluster::empty();
    let out = restore_pgdata(
        &target,
        &c.store,
        &["--backup", &c.id, "--target", "latest"],
    );
    assert_ne!(
        out.code, 0,
        "restore-pgdata --target latest succeeded across a gap:\n{out}"
    );
    out.assert_stderr_contains(&middle.file, "restore-pgdata across a gap")
        .assert_stderr_contains("gap", "restore-pgdata across a gap");
    let data = target.data_path();
    assert!(
        !data.exists() || files_in(&data).is_empty(),
        "the refused restore left files in {}: {:?}",
        data.display(),
        files_in(&data)
    );

    // The segment back, the gap is gone.
    c.garage().put_object(&middle.key, original);
    let healed = describe_json(a, &c.id);
    assert_eq!(
        healed["recovery_window"]["gaps"],
        serde_json::json!([]),
        "gaps after putting {} back: {healed}",
        middle.file
    );
    let table = soma(a, &["describe", &c.id]);
    table.assert_success("describe");
    assert!(
        table.stdout.contains("WAL gaps:    none"),
        "describe after putting the segment back:\n{table}"
    );
    eprintln!("gap test took {:?}", began.elapsed());
}

/// `soma-agent wal-fetch`, run exactly as PostgreSQL's restore_command runs it, answers each case
/// with the exit status PostgreSQL acts on: a stored segment → 0 and the destination holds exactly
/// the bytes whose sha256 the archive recorded; a segment beyond the end of the archive → 1 (the
/// end of the archive) and no destination; a segment deleted from the middle of the archive → 255
/// naming the gap (PostgreSQL aborts recovery instead of stopping early); an object with a flipped
/// byte → 255 saying it is corrupted, with neither the destination nor a temporary file left
/// behind.
#[test]
fn wal_fetch_exit_codes() {
    let began = Instant::now();
    let c = ArchivedCluster::new();
    let dir = tempfile::Builder::new()
        .prefix("soma-wal-fetch-")
        .tempdir()
        .expect("cannot create a temporary directory");
    // The name PostgreSQL gives the file it asks for (%p is pg_wal/RECOVERYXLOG).
    let dest = dir.path().join("RECOVERYXLOG");

    // Present: exit 0, the bytes whose digest the archive names.
    let present = c.after_backup[0].clone();
    let out = wal_fetch(&c.store, &c.system_id, &present.file, &dest);
    out.assert_success(&format!("wal-fetch of stored segment {}", present.file));
    let bytes = std::fs::read(&dest).expect("wal-fetch exited 0 but wrote no destination");
    assert_eq!(
        bytes.len() as u64,
        c.seg_size,
        "size of the fetched complete segment"
    );
    assert_eq!(
        hex::encode(Sha256::digest(&bytes)),
        present.sha256,
        "sha256 of the fetched segment"
    );
    assert_eq!(files_in(dir.path()), vec!["RECOVERYXLOG".to_owned()]);
    std::fs::remove_file(&dest).expect("cannot remove the fetched file");

    // Beyond the end of the archive: exit 1, nothing written.
    let newest = wal_keys(&c.store, &c.system_id)
        .iter()
        .filter(|k| k.kind == "seg" || k.kind == "partial")
        .map(|k| k.segno(c.seg_size))
        .max()
        .expect("archived segments");
    let beyond = segment_name(c.timeline, newest + 10, c.seg_size);
    let out = wal_fetch(&c.store, &c.system_id, &beyond, &dest);
    out.assert_code(
        1,
        &format!("wal-fetch of {beyond}, beyond the end of the archive"),
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "wal-fetch of a missing file left {:?}",
        files_in(dir.path())
    );

    // A gap: exit 255, naming it.
    let middle = c.after_backup[c.after_backup.len() / 2].clone();
    let original_middle = c.delete(&middle.key);
    let out = wal_fetch(&c.store, &c.system_id, &middle.file, &dest);
    let what = format!("wal-fetch of {} deleted from the middle", middle.file);
    out.assert_code(255, &what)
        .assert_stderr_contains("gap", &what)
        .assert_stderr_contains(&middle.file, &what)
        .assert_stderr_contains("soma-agent wal-fetch: FATAL", &what);
    assert!(
        files_in(dir.path()).is_empty(),
        "{what} left {:?}",
        files_in(dir.path())
    );
    c.garage().put_object(&middle.key, original_middle);

    // Corrupted: exit 255, nothing left behind.
    let victim = c.after_backup.last().expect("segments").clone();
    c.flip_a_byte(&victim.key);
    let out = wal_fetch(&c.store, &c.system_id, &victim.file, &dest);
    let what = format!("wal-fetch of {} with a flipped byte", victim.file);
    out.assert_code(255, &what)
        .assert_stderr_contains("corrupted", &what)
        .assert_stderr_contains(&victim.file, &what)
        .assert_stderr_contains("soma-agent wal-fetch: FATAL", &what);
    assert!(
        files_in(dir.path()).is_empty(),
        "{what} left {:?} behind",
        files_in(dir.path())
    );

    // The segment put back after the gap fetches again.
    let out = wal_fetch(&c.store, &c.system_id, &middle.file, &dest);
    out.assert_success(&format!("wal-fetch of {} put back", middle.file));
    assert_eq!(
        hex::encode(Sha256::digest(std::fs::read(&dest).expect("destination"))),
        middle.sha256
    );
    eprintln!("wal-fetch test took {:?}", began.elapsed());
}
