//! Entry points for the fuzz targets in `fuzz/` and for the replay of their corpus in
//! `agent/tests/properties.rs`: one function per kind of input the agent reads from outside —
//! backup ids, WAL file names and archive keys, timeline history files, manifests, store listings
//! base-backup tars and pg_dump archives (read for drill validation data).
//!
//! Each takes arbitrary bytes and must return without panicking whatever they hold; for what the
//! parser accepts, it asserts the properties that must hold (what is parsed formats back to the
//! same thing, nothing is written outside the data directory), so a violated property is a crash
//! the fuzzer reports, not a silent pass.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use chrono::{DateTime, Utc};

use crate::{
    catalog::{self, BackupId, BackupKeys, IdEngine, MANIFEST, Manifest},
    lsn::Lsn,
    ops::{physical::PhysicalDetails, physical::untar, postgres::LogicalDetails},
    wal::{Kind, WalFile, WalIndex, WalObject, history::parse_history},
};

/// The archive folder store-listing inputs are decoded under.
pub const WAL_PREFIX: &str = "wal/7312345678901234567/";

/// Every WAL segment size PostgreSQL can have (`initdb --wal-segsize`, 1 MiB to 1 GiB).
fn seg_sizes() -> impl Iterator<Item = u64> {
    (20..=30).map(|exp| 1u64 << exp)
}

/// Backup ids: what parses is exactly what was given and safe as one key component; ids the agent
/// makes (from the time and target encoded in `data`) always parse back with their engine.
pub fn backup_id(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(id) = BackupId::parse(&text) {
        assert_eq!(id.as_str(), text);
        assert_eq!(id.to_string(), text);
        assert!(
            text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "an id that is not one safe key component: {text:?}"
        );
        let _ = id.engine();
        let json = serde_json::to_string(&id).expect("an id serialises");
        assert_eq!(serde_json::from_str::<BackupId>(&json).ok(), Some(id));
    }
    if let Ok(id) = serde_json::from_slice::<BackupId>(data) {
        assert_eq!(BackupId::parse(id.as_str()).ok(), Some(id));
    }
    // A fresh id from the first bytes (time and engine) and the rest (the target's name).
    let Some((head, target)) = data.split_first_chunk::<9>() else {
        return;
    };
    let engine = [IdEngine::Postgres, IdEngine::Qdrant, IdEngine::Set][usize::from(head[8]) % 3];
    let id = BackupId::new(
        time_in_ids(i64::from_le_bytes(head[..8].try_into().expect("8 bytes"))),
        engine,
        &String::from_utf8_lossy(target),
    );
    let parsed = BackupId::parse(id.as_str())
        .unwrap_or_else(|e| panic!("the agent made an id it cannot parse: {e}"));
    assert_eq!(parsed.engine(), Some(engine));
}

/// A time an id can carry: its stamp has four-digit years (0000 to 9999); the agent takes ids at
/// the current time, so `seconds` is folded into that range.
pub fn time_in_ids(seconds: i64) -> DateTime<Utc> {
    // 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z.
    const FIRST: i64 = -62_167_219_200;
    const LAST: i64 = 253_402_300_799;
    let folded = FIRST + seconds.rem_euclid(LAST - FIRST + 1);
    DateTime::from_timestamp(folded, 0).expect("inside chrono's range")
}

/// WAL file names and archive keys: what parses formats back to the same file (the name up to the
/// case of its hex digits); segment numbers round-trip for every segment size; a key written from a
/// decoded key decodes to the same object.
pub fn wal_name(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(file) = WalFile::parse(&text) {
        let name = file.name();
        assert_eq!(WalFile::parse(&name), Some(file));
        assert!(name.eq_ignore_ascii_case(&text), "{name} from {text:?}");
        for size in seg_sizes() {
            if let Some(segno) = file.segno(size) {
                assert_eq!(WalFile::from_segno(file.timeline(), segno, size), file);
                let start = segno.checked_mul(size).map(Lsn);
                if let Some(start) = start {
                    assert_eq!(WalFile::segment_of(file.timeline(), start, size), file);
                }
            }
        }
    }
    for prefix in ["", WAL_PREFIX] {
        let Some(object) = WalObject::parse(&text, prefix) else {
            continue;
        };
        assert_eq!(object.key, text);
        let key = WalObject::key(
            prefix,
            &object.file,
            object.kind,
            object.end,
            object.captured,
            &object.sha256,
        );
        let again = WalObject::parse(&key, prefix)
            .unwrap_or_else(|| panic!("{key:?}, written from {text:?}, does not decode"));
        assert_eq!(
            (
                again.file,
                again.kind,
                again.end,
                again.captured,
                again.sha256
            ),
            (
                object.file,
                object.kind,
                object.end,
                object.captured,
                object.sha256
            )
        );
        for size in seg_sizes() {
            if let Some(end) = object.end_lsn(size) {
                let segno = object.file.segno(size).expect("a position has a segment");
                assert!(end.0 >= segno * size && end.0 - segno * size <= size);
            }
        }
    }
    // A segment number and size from the bytes themselves: number → name → number.
    if let Some((head, _)) = data.split_first_chunk::<13>() {
        let timeline = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        let segno = u64::from_le_bytes(head[4..12].try_into().expect("8 bytes"));
        let size = 1u64 << (20 + head[12] % 11);
        let per_log = (1u64 << 32) / size;
        if segno / per_log <= u64::from(u32::MAX) {
            let file = WalFile::from_segno(timeline, segno, size);
            assert_eq!(file.segno(size), Some(segno));
            assert_eq!(WalFile::parse(&file.name()), Some(file));
        }
    }
}

/// Timeline history files: parsing never panics; what parses, written back as PostgreSQL writes
/// it, parses to the same lines; an index holding the history computes windows and chains.
pub fn history(data: &[u8]) {
    let file = WalFile::History { timeline: 5 };
    let text = String::from_utf8_lossy(data);
    let Ok(lines) = parse_history(&file, &text) else {
        return;
    };
    let written: String = lines
        .iter()
        .map(|(tli, lsn)| format!("{tli}\t{lsn}\tno recovery target specified\n"))
        .collect();
    assert_eq!(
        parse_history(&file, &written).expect("a written history parses"),
        lines
    );
    let object = WalObject::parse(
        &WalObject::key(
            WAL_PREFIX,
            &file,
            Kind::History,
            data.len() as u64,
            DateTime::UNIX_EPOCH,
            &crate::digest::Sha256Digest::from([0; 32]),
        ),
        WAL_PREFIX,
    )
    .expect("a written key decodes");
    let index = WalIndex::new(16 << 20, Vec::new(), [(object, lines.clone())]);
    for &(tli, lsn) in lines.iter().take(4) {
        let window = index.window(tli, lsn);
        assert!(window.latest_lsn >= lsn);
        let _ = index.chain(tli, lsn, lsn);
    }
}

/// Manifests: reading never panics; a manifest the agent reads names the backup it was read for,
/// and what the agent writes for it (as [`catalog::Catalog::commit`] does) it reads back the
/// same; engine details of what it reads parse or are refused, never panic.
pub fn manifest(data: &[u8]) {
    let fixed = BackupId::parse("20261124T120000Z-pg-appdb-7f3a").expect("a valid id");
    let _ = catalog::read_manifest(&fixed, data);
    let Ok(parsed) = serde_json::from_slice::<Manifest>(data) else {
        return;
    };
    let m = match catalog::read_manifest(&parsed.id, data) {
        Ok(m) => m,
        Err(e) => {
            assert!(
                parsed.manifest_version > catalog::MANIFEST_VERSION || data.len() > 4 * 1024 * 1024,
                "a manifest that parses was refused: {e}"
            );
            return;
        }
    };
    assert_eq!(m, parsed);
    let written = serde_json::to_vec_pretty(&m).expect("a manifest serialises");
    let again = catalog::read_manifest(&m.id, &written)
        .unwrap_or_else(|e| panic!("the agent cannot read the manifest it writes: {e}"));
    assert_eq!(again, m);
    let _ = PhysicalDetails::of(&m);
    let _ = LogicalDetails::of(&m);
    let _ = catalog::latest(vec![m.clone()]);
}

/// Store listings: one key per line, decoded as the catalog (`backups/<id>/manifest.json`) and the
/// WAL archive (keys under [`WAL_PREFIX`]) decode a listing; the archive's keys are indexed and a
/// recoverable window and restore chain computed over them, as for a base backup.
///
/// The first line sets the base backup: `<log2 of the segment size> <timeline> <start LSN>
/// <stop LSN>` (missing or unreadable fields take defaults). Lines `H <timeline> <text>` are lines
/// of that timeline's history file, read when the listing holds its object.
pub fn store_listing(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.lines();
    let mut header = lines.next().unwrap_or_default().split_whitespace();
    let seg_size = 1u64
        << (20
            + header
                .next()
                .and_then(|s| s.parse::<u32>().ok())
                .map_or(4, |e| e % 11));
    let timeline = header.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let start: Lsn = header
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    let stop: Lsn = header.next().and_then(|s| s.parse().ok()).unwrap_or(start);
    let start = start.min(stop);

    let mut objects = Vec::new();
    let mut history_text: BTreeMap<u32, String> = BTreeMap::new();
    for line in lines {
        if let Some(rest) = line.strip_prefix("H ") {
            let (tli, text) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Ok(tli) = tli.parse() {
                let t = history_text.entry(tli).or_default();
                t.push_str(text);
                t.push('\n');
            }
            continue;
        }
        if let Some(id) = catalog::manifest_key_id(line) {
            assert_eq!(id.key(MANIFEST), line);
        }
        if let Some(object) = WalObject::parse(line, WAL_PREFIX) {
            objects.push(object);
        }
    }
    let mut histories = Vec::new();
    for o in objects.iter().filter(|o| o.kind == Kind::History) {
        let text = history_text
            .get(&o.file.timeline())
            .map_or("", String::as_str);
        match parse_history(&o.file, text) {
            Ok(lines) => histories.push((o.clone(), lines)),
            // The archive refuses to compute a window through an unreadable history.
            Err(_) => return,
        }
    }
    let keys: HashSet<&str> = objects.iter().map(|o| o.key.as_str()).collect();
    let index = WalIndex::new(seg_size, objects.clone(), histories);
    let window = index.window(timeline, stop);
    assert!(window.latest_lsn >= stop, "{window:?} ends before {stop}");
    let chain = index.chain(timeline, start, stop);
    let mut seen = HashSet::new();
    let mut last_segno = None;
    for o in &chain {
        assert!(keys.contains(o.key.as_str()), "{} is not listed", o.key);
        assert!(seen.insert(o.key.as_str()), "{} is read twice", o.key);
        if let Some(segno) = o.file.segno(seg_size) {
            assert!(last_segno < Some(segno), "the chain goes back at {}", o.key);
            last_segno = Some(segno);
        }
    }
}

/// Base-backup tars, unpacked into a fresh data directory beside a file a hostile archive would
/// like to reach: whatever the archive holds, nothing beside the data directory changes; inside
/// it there are only directories, regular files without special mode bits and the symbolic links
/// a data directory has; an archive holding an absolute or climbing name, a hard link, a device
/// or any other symbolic link is refused.
pub fn untar(data: &[u8]) {
    let scratch = Scratch::new();
    let dir = scratch.0.join("pgdata");
    fs::create_dir(&dir).expect("creating the data directory");
    let outside = scratch.0.join("outside");
    fs::write(&outside, b"precious").expect("writing the file outside");

    let result = untar::unpack_with_tablespaces(data, &dir, data.len() as u64, FUZZ_TABLESPACES);

    assert_eq!(fs::read(&outside).expect("the file outside"), b"precious");
    let mut beside: Vec<_> = fs::read_dir(&scratch.0)
        .expect("listing the scratch directory")
        .map(|e| e.expect("a directory entry").file_name())
        .collect();
    beside.sort();
    assert_eq!(beside, ["outside", "pgdata"], "something appeared beside");
    check_laid(&dir, &mut Vec::new());
    if let Some(hostile) = first_hostile(data) {
        assert!(result.is_err(), "an archive with {hostile} was accepted");
    }
}

/// Checks what an unpack laid under `dir` (`rel` the components walked so far), following no
/// symbolic link.
fn check_laid(dir: &Path, rel: &mut Vec<String>) {
    assert!(rel.len() <= 32, "laid {} levels deep", rel.len());
    for entry in fs::read_dir(dir).expect("listing the data directory") {
        let entry = entry.expect("a directory entry");
        rel.push(entry.file_name().to_string_lossy().into_owned());
        let meta = fs::symlink_metadata(entry.path()).expect("inspecting an entry");
        let t = meta.file_type();
        if t.is_symlink() {
            let parts: Vec<&[u8]> = rel.iter().map(|p| p.as_bytes()).collect();
            assert!(link_allowed(&parts), "a symbolic link at {}", rel.join("/"));
        } else if t.is_dir() {
            assert_eq!(meta.permissions().mode() & 0o7000, 0, "{}", rel.join("/"));
            check_laid(&entry.path(), rel);
        } else if t.is_file() {
            assert_eq!(meta.permissions().mode() & 0o7000, 0, "{}", rel.join("/"));
        } else {
            panic!("a special file at {}", rel.join("/"));
        }
        rel.pop();
    }
}

/// The first entry of `data` (as the tar reader sees it) that a base backup must never hold.
fn first_hostile(data: &[u8]) -> Option<String> {
    let mut archive = tar::Archive::new(data);
    for entry in archive.entries().ok()?.raw(true) {
        let entry = entry.ok()?;
        if let Some(why) = hostile_entry(&entry.path_bytes(), entry.header().entry_type()) {
            return Some(why);
        }
    }
    None
}

/// Why a base backup must never hold an entry named `name` of type `kind`, whatever comes
/// before it: an absolute or climbing name, a link other than a recorded tablespace's `pg_tblspc/<oid>`, or
/// anything but a file or a directory.
pub fn hostile_entry(name: &[u8], kind: tar::EntryType) -> Option<String> {
    use tar::EntryType;
    let parts: Vec<&[u8]> = name
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    if name.first() == Some(&b'/') {
        return Some("an absolute name".into());
    }
    if parts.contains(&&b".."[..]) {
        return Some("a climbing name".into());
    }
    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::Directory => None,
        EntryType::Symlink if link_allowed(&parts) => None,
        EntryType::Symlink => Some("a symbolic link".into()),
        other => Some(format!("an entry of type {other:?}")),
    }
}

/// The tablespaces the fuzzed base backups' manifest records.
const FUZZ_TABLESPACES: &[u32] = &[16384];

/// The links a base backup recording [`FUZZ_TABLESPACES`] may hold, by their path components:
/// `pg_tblspc/16384` and nothing else (`pg_wal` is a directory). Written apart from `untar`'s own
/// rule, so that the check does not share a mistake with the code it checks.
fn link_allowed(parts: &[&[u8]]) -> bool {
    matches!(parts, [tblspc, oid] if *tblspc == b"pg_tblspc" && *oid == b"16384")
}

/// A fresh directory under the system's temporary directory, removed (without following the
/// symbolic links an unpack may have laid) when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "soma-fuzz-untar-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        // Left by an earlier process with the same id that crashed.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).expect("creating a scratch directory");
        Self(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// pg_dump custom archives read for validation data: never a panic; the same bytes read whole
/// or a byte at a time give the same answer; what parses recorded only tables whose rows ended.
pub fn pg_dump_archive(data: &[u8]) {
    use crate::engine::postgres::dump_stats;
    let whole = futures::executor::block_on(dump_stats(data));
    let bytewise =
        futures::executor::block_on(dump_stats(tokio::io::BufReader::with_capacity(1, data)));
    match (&whole, &bytewise) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "read whole and bytewise"),
        (Err(_), Err(_)) => {}
        _ => panic!("read whole: {whole:?}, bytewise: {bytewise:?}"),
    }
}
