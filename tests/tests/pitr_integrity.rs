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
//! - WAL files in the agent's spool that its server cannot have written — another cluster's
//!   segments under the very names this cluster writes, a segment or history file past the
//!   server's WAL — are moved aside intact into the spool's `set-aside/` folder, named with their
//!   reason in the log and in `status`, and never shipped; the agent then streams and archives its
//!   own WAL without a gap, instead of shipping the foreign segment under its own system
//!   identifier and asking the server, for ever, for WAL it does not have.
//!
//! Each test first checks its starting point: once `status` reports the archive at the server's
//! WAL position, every segment the server completed since the base backup is stored in the archive
//! as a complete segment.

use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use soma_tests::pitr::{
    PROMOTE_TIMEOUT, complete_segments, format_lsn, lsn, physical_backup, restore_and_start,
    restore_pgdata, segment_name, segno_of, system_identifier, wait_archived, wal_agent,
    wal_segment_size, wal_status,
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

/// What pg_receivewal's server says when asked for WAL past its flush position: the endless
/// loop a spool file ahead of the server caused.
const AHEAD_OF_FLUSH: &str = "ahead of the WAL flush position";

/// sha256 of `bytes`, hex.
fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The system identifier and page address in the long header of a WAL segment's first page
/// (`xlp_sysid` at byte 24, `xlp_pageaddr` at byte 8; the machine's byte order).
fn first_page(bytes: &[u8]) -> (u64, u64) {
    let u64_at = |at: usize| {
        u64::from_ne_bytes(
            bytes[at..at + 8]
                .try_into()
                .expect("8 bytes of a WAL page header"),
        )
    };
    (u64_at(24), u64_at(8))
}

/// The folders of `<spool>/set-aside/`, sorted.
fn set_aside_folders(spool: &Path) -> Vec<std::path::PathBuf> {
    let mut folders: Vec<_> = std::fs::read_dir(spool.join("set-aside"))
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    folders.sort();
    folders
}

/// Waits until the agent streams (status: receiving) having set aside `n` spool files; returns
/// the status.
fn wait_streaming_with_set_aside(agent: &Agent, n: u64) -> serde_json::Value {
    poll_until(
        Duration::from_secs(60),
        &format!("the agent to set {n} spool file(s) aside and stream WAL"),
        || {
            let status = wal_status(agent.addr());
            (status["receiving"].as_bool() == Some(true)
                && status["set_aside_files"].as_u64() == Some(n))
            .then_some(status)
        },
    )
}

/// Asserts that `status` names each of `expected` (file, reason) among its set-aside files, and
/// that the agent's log warned of each.
fn assert_set_aside_said(agent: &Agent, status: &serde_json::Value, expected: &[(&str, &str)]) {
    let said: Vec<&str> = status["set_aside"]
        .as_array()
        .unwrap_or_else(|| panic!("no set_aside list in the status: {status:#}"))
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let logs = agent.logs();
    for (file, reason) in expected {
        assert!(
            said.iter()
                .any(|m| m.starts_with(&format!("{file}: ")) && m.contains(reason)),
            "status does not say that {file} was set aside because {reason:?}: {said:#?}"
        );
        assert!(
            logs.lines().any(|l| l.contains("WAL spool file set aside")
                && l.contains(file)
                && l.contains(reason)),
            "the agent's log does not warn that {file} was set aside ({reason:?}):\n{logs}"
        );
    }
    // The plugin's table says it too.
    let table = soma(agent.addr(), &["status"]);
    assert!(
        table
            .stdout
            .contains(&format!("{} spool file(s) set aside", expected.len()))
            && expected.iter().all(|(file, _)| table.stdout.contains(file)),
        "`status` does not show the files set aside:\n{table}"
    );
}

/// The WAL objects of `store` (relative keys), and those of the archive folder `system_id`.
fn wal_objects(store: &TestStore, system_id: u64) -> (Vec<String>, Vec<String>) {
    let all = store.list("wal/");
    let own = all
        .iter()
        .filter(|k| k.starts_with(&format!("wal/{system_id}/")))
        .cloned()
        .collect();
    (all, own)
}

/// A spool that another PostgreSQL cluster left behind — its complete segments 1–3 and the
/// partial 4, the very names this cluster writes, and a history file of timeline 2 — is found by
/// a new agent for this cluster: every one of those files is moved aside intact into the spool's
/// `set-aside/<time>/` folder, named with its reason in the log and in `status`, and none reaches
/// the store. The agent streams its own cluster's WAL from the slot: segments 1–3 in the archive
/// are this cluster's (their first page carries its system identifier) and the archive has no
/// gap up to the server's position.
#[test]
fn another_clusters_spool_is_set_aside_and_this_clusters_wal_archived() {
    let began = Instant::now();
    let other = PgCluster::start();
    let theirs = complete_segments(&other, 3);
    assert_eq!(
        theirs,
        [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000003"
        ],
        "the other cluster's completed segments"
    );
    let other_id = system_identifier(&other);
    let spool = tempfile::Builder::new()
        .prefix("soma-spool-")
        .tempdir()
        .expect("cannot create the WAL spool directory");
    // The segment the other cluster is writing, as pg_receivewal keeps it: PostgreSQL creates
    // the file when it first writes WAL into it (its walwriter, within a fraction of a second).
    other.psql(
        "postgres",
        "insert into wal_filler (payload) values ('after the last switch')",
    );
    let wal_dir = other.data_path().join("pg_wal");
    poll_until(
        Duration::from_secs(30),
        "the other cluster to write into its segment 4",
        || {
            let bytes = std::fs::read(wal_dir.join("000000010000000000000004")).ok()?;
            (bytes.len() >= 40 && first_page(&bytes).0 == other_id).then_some(())
        },
    );
    let mut planted = Vec::new();
    for (source, name) in [
        ("000000010000000000000001", "000000010000000000000001"),
        ("000000010000000000000002", "000000010000000000000002"),
        ("000000010000000000000003", "000000010000000000000003"),
        (
            "000000010000000000000004",
            "000000010000000000000004.partial",
        ),
    ] {
        let bytes = std::fs::read(wal_dir.join(source))
            .unwrap_or_else(|e| panic!("the other cluster's {source}: {e}"));
        assert_eq!(
            first_page(&bytes).0,
            other_id,
            "{source} of the other cluster"
        );
        std::fs::write(spool.path().join(name), &bytes).expect("cannot plant a spool file");
        planted.push((name, bytes));
    }
    let history = b"1\t0/3000060\tno recovery target specified\n".to_vec();
    std::fs::write(spool.path().join("00000002.history"), &history)
        .expect("cannot plant a history file");
    planted.push(("00000002.history", history));
    drop(other);

    let pg = PgCluster::start();
    let id = system_identifier(&pg);
    assert_ne!(id, other_id, "two clusters with one system identifier");
    let seg_size = wal_segment_size(&pg);
    let store = TestStore::local();
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let status = wait_streaming_with_set_aside(&agent, planted.len() as u64);
    let foreign = format!(
        "written by another PostgreSQL cluster (system identifier {other_id}; this server's is {id})"
    );
    assert_set_aside_said(
        &agent,
        &status,
        &[
            ("000000010000000000000001", &foreign),
            ("000000010000000000000002", &foreign),
            ("000000010000000000000003", &foreign),
            ("000000010000000000000004.partial", &foreign),
            (
                "00000002.history",
                "timeline 2 is after the server's timeline 1",
            ),
        ],
    );
    // Moved, not deleted: every byte is in one set-aside folder.
    let folders = set_aside_folders(spool.path());
    assert_eq!(folders.len(), 1, "set-aside folders: {folders:?}");
    for (name, bytes) in &planted {
        let kept = std::fs::read(folders[0].join(name))
            .unwrap_or_else(|e| panic!("{name} is not in {}: {e}", folders[0].display()));
        assert!(kept == *bytes, "{name} changed on its way aside");
    }

    // This cluster's own WAL, past the names the other cluster used.
    let ours = complete_segments(&pg, 3);
    pg.psql(
        "postgres",
        "insert into wal_filler (payload) select 'after the last switch ' || i from generate_series(1, 200) i",
    );
    let archived = wait_archived(agent.addr(), &pg);
    let (all, own) = wal_objects(&store, id);
    assert_eq!(
        all, own,
        "WAL objects outside this cluster's folder wal/{id}/"
    );
    let digests: Vec<String> = planted.iter().map(|(_, b)| sha256_hex(b)).collect();
    for key in &all {
        assert!(
            !digests.iter().any(|d| key.contains(d.as_str())),
            "the other cluster's file was shipped: {key}"
        );
    }
    // Every segment from the first up to the archived position is a complete segment of this
    // cluster's, at the place its name says.
    let fetched = tempfile::tempdir().expect("a directory for fetched WAL");
    let last_complete = archived / seg_size;
    assert!(
        last_complete >= 4,
        "archived only to {}",
        format_lsn(archived)
    );
    for segno in 1..last_complete {
        let name = segment_name(1, segno, seg_size);
        assert!(
            own.iter().any(|k| k.contains(&format!("/{name}.seg."))),
            "{name} is not archived as a complete segment (the archive has a gap before {}): {own:#?}",
            format_lsn(archived)
        );
        let dest = fetched.path().join(&name);
        wal_fetch(&store, &id.to_string(), &name, &dest)
            .assert_success(&format!("wal-fetch {name}"));
        let bytes = std::fs::read(&dest).expect("the fetched segment");
        assert_eq!(
            first_page(&bytes),
            (id, segno * seg_size),
            "the archived {name} is not this cluster's segment {segno}"
        );
    }
    assert!(
        ours.iter().all(|n| segno_of(n, seg_size) < last_complete),
        "{ours:?}"
    );
    let logs = agent.logs();
    assert!(
        !logs.contains(AHEAD_OF_FLUSH),
        "pg_receivewal asked for WAL past the server's:\n{logs}"
    );
    eprintln!("foreign spool test took {:?}", began.elapsed());
}

/// A spool holding files past this server's WAL — one of its own segments renamed far ahead with
/// its page address rewritten to match (a header that is this cluster's in every respect but
/// position), the same segment renamed ahead as it is, and a zero-filled partial further on —
/// would have pg_receivewal resume past the server's flush position and be refused for ever. The
/// agent moves them aside, each with its reason, streams from the slot and archives up to the
/// server's position; none of them reaches the store. Started again on the same spool, it sets
/// nothing more aside: its own files pass the check.
#[test]
fn spool_files_ahead_of_the_server_are_set_aside_and_streaming_works() {
    let began = Instant::now();
    let pg = PgCluster::start();
    let id = system_identifier(&pg);
    let seg_size = wal_segment_size(&pg);
    let done = complete_segments(&pg, 1);
    let real = std::fs::read(pg.data_path().join("pg_wal").join(&done[0]))
        .expect("the cluster's completed segment");
    assert_eq!(
        first_page(&real),
        (id, segno_of(&done[0], seg_size) * seg_size)
    );

    let spool = tempfile::Builder::new()
        .prefix("soma-spool-")
        .tempdir()
        .expect("cannot create the WAL spool directory");
    let ahead = segment_name(1, 0xF0, seg_size);
    let mut rewritten = real.clone();
    rewritten[8..16].copy_from_slice(&(0xF0 * seg_size).to_ne_bytes());
    let renamed = segment_name(1, 0xF1, seg_size);
    let zeros = format!("{}.partial", segment_name(1, 0xF2, seg_size));
    let planted = [
        (ahead.clone(), rewritten),
        (renamed.clone(), real.clone()),
        (
            zeros.clone(),
            vec![0u8; usize::try_from(seg_size).expect("segment size")],
        ),
    ];
    for (name, bytes) in &planted {
        std::fs::write(spool.path().join(name), bytes).expect("cannot plant a spool file");
    }
    let store = TestStore::local();
    let mut agent = wal_agent(&pg, &store, spool.path(), "1s");
    let status = wait_streaming_with_set_aside(&agent, 3);
    let named_at = format!(
        "its first page is at {}, but its name puts it at {}",
        format_lsn(segno_of(&done[0], seg_size) * seg_size),
        format_lsn(0xF1 * seg_size)
    );
    assert_set_aside_said(
        &agent,
        &status,
        &[
            (
                &ahead,
                &format!(
                    "it reaches {}, ahead of the server's WAL flush position",
                    format_lsn(0xF1 * seg_size)
                ),
            ),
            (&renamed, &named_at),
            (&zeros, "no WAL page header at its start (zeros)"),
        ],
    );
    let folders = set_aside_folders(spool.path());
    assert_eq!(folders.len(), 1, "set-aside folders: {folders:?}");
    for (name, bytes) in &planted {
        let kept = std::fs::read(folders[0].join(name))
            .unwrap_or_else(|e| panic!("{name} is not in {}: {e}", folders[0].display()));
        assert!(kept == *bytes, "{name} changed on its way aside");
    }

    complete_segments(&pg, 2);
    let archived = wait_archived(agent.addr(), &pg);
    assert!(
        archived > 2 * seg_size,
        "archived only to {}",
        format_lsn(archived)
    );
    let (all, own) = wal_objects(&store, id);
    assert_eq!(
        all, own,
        "WAL objects outside this cluster's folder wal/{id}/"
    );
    for (name, _) in &planted {
        let base = name.trim_end_matches(".partial");
        assert!(
            !all.iter().any(|k| k.contains(base)),
            "{name}, set aside, reached the store: {all:#?}"
        );
    }

    // Stopped and started again on its own spool: nothing more is set aside, WAL flows on.
    assert!(
        agent
            .terminate(Duration::from_secs(60))
            .is_some_and(|s| s.success()),
        "the agent did not stop cleanly:\n{}",
        agent.logs()
    );
    let logs = agent.logs();
    assert!(
        !logs.contains(AHEAD_OF_FLUSH),
        "pg_receivewal asked for WAL past the server's:\n{logs}"
    );
    drop(agent);
    let agent = wal_agent(&pg, &store, spool.path(), "1s");
    let status = wait_streaming_with_set_aside(&agent, 0);
    assert_eq!(status["set_aside"], serde_json::json!([]), "{status:#}");
    complete_segments(&pg, 1);
    wait_archived(agent.addr(), &pg);
    assert_eq!(
        set_aside_folders(spool.path()).len(),
        1,
        "a second set-aside folder"
    );
    eprintln!("spool ahead test took {:?}", began.elapsed());
}
