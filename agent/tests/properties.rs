//! Properties of the parsers of what the agent reads from outside (issue 14): backup ids, WAL file
//! names and archive keys, timeline history files, manifests, store listings and base-backup tars.
//! Arbitrary input never panics them, what they accept round-trips through what the agent writes,
//! and a hostile tar never writes outside its directory.
//!
//! The committed fuzz corpus (`fuzz/corpus/<target>/`) is replayed here through the same entry
//! points the fuzz targets call ([`soma_agent::fuzzing`]), so CI exercises it on stable without
//! cargo-fuzz.

use std::{
    fs,
    io::{self, Read},
    os::unix::fs::PermissionsExt,
    path::Path,
};

use chrono::{DateTime, TimeZone, Utc};
use proptest::{collection::vec, prelude::*};
use soma_agent::{
    catalog::{
        self, Artifact, BackupId, BackupKeys, Compression, EncryptionRecord, Engine, IdEngine,
        Kind, MANIFEST, Manifest, Target, Tool,
    },
    digest::Sha256Digest,
    fuzzing,
    lsn::Lsn,
    testing::{
        WalFile, WalIndex, WalKind, WalObject, parse_history,
        untar::{self, Stop},
    },
};
use tar::EntryType;

fn cases(n: u32) -> ProptestConfig {
    ProptestConfig::with_cases(n)
}

// ---------------------------------------------------------------------------------------------
// Backup ids

const ENGINES: [IdEngine; 3] = [IdEngine::Postgres, IdEngine::Qdrant, IdEngine::Set];

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn ids_of_the_grammar_round_trip(
        id in "[0-9]{8}T[0-9]{6}Z-[a-z0-9][a-z0-9-]{1,60}[a-z0-9]",
    ) {
        let parsed = BackupId::parse(&id).expect("an id of the grammar parses");
        prop_assert_eq!(parsed.as_str(), id.as_str());
        prop_assert_eq!(parsed.to_string(), id.clone());
        let json = serde_json::to_string(&parsed).unwrap();
        prop_assert_eq!(serde_json::from_str::<BackupId>(&json).unwrap(), parsed);
        fuzzing::backup_id(id.as_bytes());
    }

    #[test]
    fn arbitrary_strings_never_panic_the_id_parser(s in any::<String>()) {
        if let Ok(id) = BackupId::parse(&s) {
            prop_assert_eq!(id.as_str(), s.as_str());
        }
        fuzzing::backup_id(s.as_bytes());
    }

    #[test]
    fn near_ids_never_panic_the_id_parser(
        s in "[0-9T Z/.é-]{14,18}[a-zé/.A-Z0-9-]{0,12}",
    ) {
        if BackupId::parse(&s).is_ok() {
            prop_assert!(!s.contains('/') && s.is_ascii());
        }
        fuzzing::backup_id(s.as_bytes());
    }

    #[test]
    fn ids_the_agent_makes_parse_and_sort_by_time(
        a in any::<i64>(),
        b in any::<i64>(),
        engine in 0..3usize,
        target in any::<String>(),
    ) {
        let (at, bt) = (fuzzing::time_in_ids(a), fuzzing::time_in_ids(b));
        let engine = ENGINES[engine];
        let id = BackupId::new(at, engine, &target);
        let parsed = BackupId::parse(id.as_str()).expect("a made id parses");
        prop_assert_eq!(parsed.engine(), Some(engine));
        let other = BackupId::new(bt, engine, &target);
        if at < bt {
            prop_assert!(id < other, "{} sorts after {}", id, other);
        }
    }

    #[test]
    fn manifest_keys_round_trip(
        id in "[0-9]{8}T[0-9]{6}Z-[a-z0-9][a-z0-9-]{1,60}[a-z0-9]",
        other in "[a-z./]{0,20}",
    ) {
        let id = BackupId::parse(&id).unwrap();
        prop_assert_eq!(catalog::manifest_key_id(&id.key(MANIFEST)), Some(id.clone()));
        if other != MANIFEST {
            prop_assert_eq!(catalog::manifest_key_id(&id.key(&other)), None);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// WAL file names and archive keys

const SEG: u64 = 16 << 20;

fn wal_file() -> impl Strategy<Value = WalFile> {
    prop_oneof![
        (any::<u32>(), any::<u32>(), any::<u32>())
            .prop_map(|(timeline, log, seg)| WalFile::Segment { timeline, log, seg }),
        any::<u32>().prop_map(|timeline| WalFile::History { timeline }),
    ]
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn wal_names_round_trip(file in wal_file()) {
        let name = file.name();
        prop_assert_eq!(WalFile::parse(&name), Some(file));
        prop_assert_eq!(WalFile::parse(&name.to_ascii_lowercase()), Some(file));
        fuzzing::wal_name(name.as_bytes());
    }

    #[test]
    fn segment_numbers_round_trip_for_every_segment_size(
        timeline in any::<u32>(),
        exp in 20u32..=30,
        segno in any::<u64>(),
        offset in any::<u64>(),
    ) {
        let size = 1u64 << exp;
        let per_log = (1u64 << 32) / size;
        // The largest segment number a name can hold.
        let segno = segno % ((u64::from(u32::MAX) + 1) * per_log);
        let file = WalFile::from_segno(timeline, segno, size);
        prop_assert_eq!(file.segno(size), Some(segno));
        prop_assert_eq!(WalFile::parse(&file.name()), Some(file));
        if let Some(lsn) = segno.checked_mul(size).and_then(|s| s.checked_add(offset % size)) {
            prop_assert_eq!(WalFile::segment_of(timeline, Lsn(lsn), size), file);
        }
    }

    #[test]
    fn arbitrary_strings_never_panic_the_wal_name_parser(s in any::<String>()) {
        if let Some(file) = WalFile::parse(&s) {
            prop_assert!(file.name().eq_ignore_ascii_case(&s));
        }
        fuzzing::wal_name(s.as_bytes());
    }

    #[test]
    fn near_wal_names_never_panic(s in "[0-9A-Fa-fé+ -]{6,26}(\\.history|\\.partial)?") {
        if let Some(file) = WalFile::parse(&s) {
            prop_assert!(file.name().eq_ignore_ascii_case(&s));
        }
        fuzzing::wal_name(s.as_bytes());
    }

    #[test]
    fn archive_keys_round_trip(
        file in wal_file(),
        partial in any::<bool>(),
        end in any::<u64>(),
        // Up to the year 250000, inside chrono's range.
        ms in 0i64..7_700_000_000_000_000,
        sha in any::<[u8; 32]>().prop_map(Sha256Digest::from),
    ) {
        let kind = match (file, partial) {
            (WalFile::History { .. }, _) => WalKind::History,
            (_, true) => WalKind::Partial,
            (_, false) => WalKind::Seg,
        };
        let captured = Utc.timestamp_millis_opt(ms).unwrap();
        let prefix = fuzzing::WAL_PREFIX;
        let key = WalObject::key(prefix, &file, kind, end, captured, &sha);
        let o = WalObject::parse(&key, prefix).expect("a written key decodes");
        prop_assert_eq!((o.file, o.kind, o.end, o.captured), (file, kind, end, captured));
        prop_assert_eq!(o.sha256, sha);
        let stored = format!(".{sha}.zst");
        prop_assert!(key.ends_with(&stored));
        prop_assert_eq!(&o.key, &key);
        fuzzing::wal_name(key.as_bytes());
        fuzzing::wal_name(key.trim_start_matches(prefix).as_bytes());
    }

    #[test]
    fn near_archive_keys_never_panic(
        file in "[0-9A-F]{24}|[0-9A-F]{8}\\.history|[0-9é.]{0,24}",
        kind in "seg|partial|history|[a-z]{0,8}",
        end in "[0-9a-fA-F+-]{0,18}",
        ms in "[0-9+-]{0,20}",
        sha in "[0-9a-f]{64}|[0-9a-fé.]{0,70}",
    ) {
        let key = format!("{}{file}.{kind}.{end}.{ms}.{sha}.zst", fuzzing::WAL_PREFIX);
        if let Some(o) = WalObject::parse(&key, fuzzing::WAL_PREFIX) {
            prop_assert_eq!(o.sha256.to_string(), sha.to_ascii_lowercase());
        }
        fuzzing::wal_name(key.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Timeline history files

fn history_line() -> impl Strategy<Value = (u32, u64, String)> {
    (any::<u32>(), any::<u64>(), "[^\n\r]{0,40}")
}

proptest! {
    #![proptest_config(cases(256))]

    #[test]
    fn histories_round_trip(
        lines in vec(history_line(), 0..8),
        comments in vec(prop_oneof![Just(""), Just("# comment"), Just("   "), Just("\t# x")], 0..8),
        crlf in any::<bool>(),
    ) {
        let file = WalFile::History { timeline: 9 };
        let eol = if crlf { "\r\n" } else { "\n" };
        let mut text = String::new();
        for (i, (tli, lsn, reason)) in lines.iter().enumerate() {
            if let Some(c) = comments.get(i) {
                text.push_str(c);
                text.push_str(eol);
            }
            text.push_str(&format!("{tli}\t{}\t{reason}{eol}", Lsn(*lsn)));
        }
        let parsed = parse_history(&file, &text).expect("a written history parses");
        let expected: Vec<(u32, Lsn)> = lines.iter().map(|(t, l, _)| (*t, Lsn(*l))).collect();
        prop_assert_eq!(parsed, expected);
        fuzzing::history(text.as_bytes());
    }

    #[test]
    fn arbitrary_text_never_panics_the_history_parser(s in any::<String>()) {
        let _ = parse_history(&WalFile::History { timeline: 2 }, &s);
        fuzzing::history(s.as_bytes());
    }

    #[test]
    fn near_histories_never_panic(s in "([0-9+-]{0,12}[ \t][0-9A-Fa-f/+ -]{0,20}[ \t]?[a-z]{0,4}\n){0,5}") {
        fuzzing::history(s.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has finite numbers only", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
            vec(("[a-z_]{1,8}", inner), 0..4)
                .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

fn time() -> impl Strategy<Value = DateTime<Utc>> {
    (any::<i64>(), 0u32..1_000_000_000).prop_map(|(s, nanos)| {
        let t = fuzzing::time_in_ids(s);
        DateTime::from_timestamp(t.timestamp(), nanos).unwrap()
    })
}

fn artifact() -> impl Strategy<Value = Artifact> {
    (
        // Sizes the agent can have measured: a manifest sums them.
        (
            any::<String>(),
            any::<String>(),
            0..1u64 << 60,
            0..1u64 << 60,
        ),
        (
            any::<[u8; 32]>().prop_map(Sha256Digest::from),
            any::<[u8; 32]>().prop_map(Sha256Digest::from),
            any::<i32>(),
            any::<u32>(),
        ),
        (any::<u64>(), any::<u64>(), any::<u32>()),
        (
            proptest::option::of(any::<String>()),
            proptest::option::of(any::<u32>()),
            proptest::option::of(any::<String>()),
        ),
    )
        .prop_map(
            |(
                (name, format, raw_bytes, stored_bytes),
                (raw_sha256, stored_sha256, level, threads),
                (part_size, max_part_size, parts),
                (collection, shard, database),
            )| Artifact {
                name,
                format,
                raw_bytes,
                stored_bytes,
                raw_sha256,
                stored_sha256,
                compression: Compression {
                    algorithm: "zstd".into(),
                    level,
                    threads,
                },
                part_size,
                max_part_size,
                parts,
                collection,
                shard,
                database,
            },
        )
}

fn manifest() -> impl Strategy<Value = Manifest> {
    let engines = prop_oneof![
        Just((Engine::Postgres, Kind::Logical)),
        Just((Engine::Postgres, Kind::LogicalCluster)),
        Just((Engine::Postgres, Kind::Physical)),
        Just((Engine::Qdrant, Kind::QdrantCollections)),
        Just((Engine::Qdrant, Kind::QdrantShards)),
        Just((Engine::Qdrant, Kind::QdrantStorage)),
        Just((Engine::Set, Kind::Set)),
    ];
    (
        (engines, any::<String>(), time(), time()),
        (any::<[String; 3]>(), any::<[String; 2]>(), any::<String>()),
        (
            vec(artifact(), 0..3),
            vec("[0-9]{8}T[0-9]{6}Z-[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", 0..3),
            json_value(),
            proptest::option::of(("[a-z0-9-]{1,20}", "[0-9a-f]{16}")),
        ),
    )
        .prop_map(
            |(
                ((engine, kind), name, started, completed),
                ([target, server, server_version], [tool, tool_version], agent_version),
                (artifacts, members, details, encryption),
            )| {
                let id = BackupId::new(started, engine.id_engine(), &name);
                let mut m = Manifest::completed(
                    id,
                    engine,
                    kind,
                    Target {
                        name: target,
                        server,
                        server_version,
                    },
                    Tool {
                        name: tool,
                        version: tool_version,
                    },
                    started,
                )
                .with_artifacts(artifacts)
                .with_details(details);
                m.completed_at = completed;
                m.agent_version = agent_version;
                m.members = members
                    .iter()
                    .map(|s| BackupId::parse(s).unwrap())
                    .collect();
                m.encryption = encryption.map(|(algorithm, key_fingerprint)| EncryptionRecord {
                    algorithm,
                    key_fingerprint,
                });
                m
            },
        )
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn manifests_the_agent_writes_it_reads_back(m in manifest()) {
        for json in [serde_json::to_vec_pretty(&m).unwrap(), serde_json::to_vec(&m).unwrap()] {
            let read = catalog::read_manifest(&m.id, &json).expect("a written manifest reads");
            prop_assert_eq!(&read, &m);
            fuzzing::manifest(&json);
        }
    }

    #[test]
    fn manifests_of_another_backup_or_a_newer_format_are_refused(
        m in manifest(),
        version in 2u32..,
    ) {
        let other = BackupId::new(Utc::now(), IdEngine::Postgres, "other");
        let json = serde_json::to_vec(&m).unwrap();
        prop_assert!(catalog::read_manifest(&other, &json).is_err());
        let mut newer = m.clone();
        newer.manifest_version = version;
        let json = serde_json::to_vec(&newer).unwrap();
        prop_assert!(catalog::read_manifest(&m.id, &json).is_err());
        fuzzing::manifest(&json);
    }

    #[test]
    fn damaged_manifests_never_panic_the_reader(
        m in manifest(),
        cuts in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut json = serde_json::to_vec_pretty(&m).unwrap();
        for (at, byte) in cuts {
            let i = at.index(json.len());
            json[i] = byte;
        }
        if let Some(at) = truncate {
            json.truncate(at.index(json.len()));
        }
        let _ = catalog::read_manifest(&m.id, &json);
        fuzzing::manifest(&json);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_manifest_reader(bytes in vec(any::<u8>(), 0..512)) {
        fuzzing::manifest(&bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// Store listings

fn segment_key(segno: u64, kind: WalKind, end: u64) -> String {
    WalObject::key(
        fuzzing::WAL_PREFIX,
        &WalFile::from_segno(1, segno, SEG),
        kind,
        end,
        Utc.timestamp_millis_opt(1_700_000_000_000 + segno as i64)
            .unwrap(),
        &Sha256Digest::from_hex(&format!("{segno:064x}")).unwrap(),
    )
}

fn archive(keys: &[String]) -> Vec<WalObject> {
    keys.iter()
        .map(|k| WalObject::parse(k, fuzzing::WAL_PREFIX).expect("a written key"))
        .collect()
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn a_contiguous_archive_recovers_to_its_end(
        first in 0u64..100_000,
        count in 1u64..24,
        partial_end in proptest::option::of(0u64..SEG),
    ) {
        let mut keys: Vec<String> = (first..first + count)
            .map(|s| segment_key(s, WalKind::Seg, SEG))
            .collect();
        let mut end = (first + count) * SEG;
        if let Some(p) = partial_end {
            keys.push(segment_key(first + count, WalKind::Partial, p));
            end += p;
        }
        let index = WalIndex::new(SEG, archive(&keys), Vec::new());
        let stop = Lsn(first * SEG);
        let w = index.window(1, stop);
        prop_assert!(w.gaps.is_empty(), "{:?}", w.gaps);
        prop_assert_eq!(w.latest_lsn, Lsn(end));
        let chain: Vec<String> = index.chain(1, stop, stop).into_iter().map(|o| o.key).collect();
        // A partial that adds no WAL after the last segment is not needed.
        let needed = if partial_end == Some(0) { &keys[..keys.len() - 1] } else { &keys[..] };
        prop_assert_eq!(chain, needed.to_vec());
        fuzzing::store_listing(format!("24 1 {stop} {stop}\n{}", keys.join("\n")).as_bytes());
    }

    #[test]
    fn a_missing_segment_ends_the_window_there(
        first in 0u64..100_000,
        count in 3u64..24,
        missing in any::<prop::sample::Index>(),
    ) {
        let missing = first + 1 + missing.index(count as usize - 2) as u64;
        let keys: Vec<String> = (first..first + count)
            .filter(|&s| s != missing)
            .map(|s| segment_key(s, WalKind::Seg, SEG))
            .collect();
        let index = WalIndex::new(SEG, archive(&keys), Vec::new());
        let stop = Lsn(first * SEG);
        let w = index.window(1, stop);
        prop_assert_eq!(w.latest_lsn, Lsn(missing * SEG));
        prop_assert_eq!(w.gaps.len(), 1);
        let chain = index.chain(1, stop, stop);
        prop_assert_eq!(chain.len() as u64, missing - first);
        fuzzing::store_listing(format!("24 1 {stop} {stop}\n{}", keys.join("\n")).as_bytes());
    }

    #[test]
    fn arbitrary_listings_never_panic(
        header in "[0-9]{0,3} [0-9]{0,3} [0-9A-F]{1,3}/[0-9A-F]{1,8} [0-9A-F]{1,3}/[0-9A-F]{1,8}",
        lines in vec(
            prop_oneof![
                (0u64..64, 0usize..3, any::<u64>()).prop_map(|(s, k, end)| {
                    let kind = [WalKind::Seg, WalKind::Partial, WalKind::Seg][k];
                    segment_key(s, kind, end % (SEG + 2))
                }),
                (1u32..5).prop_map(|t| WalObject::key(
                    fuzzing::WAL_PREFIX,
                    &WalFile::History { timeline: t },
                    WalKind::History,
                    40,
                    DateTime::UNIX_EPOCH,
                    &Sha256Digest::from([0; 32]),
                )),
                (1u32..5, 1u32..5, any::<u32>()).prop_map(|(t, p, l)| format!("H {t} {p}\t0/{l:X}\tr")),
                "[0-9]{8}T[0-9]{6}Z-[a-z0-9][a-z0-9-]{1,20}[a-z0-9]"
                    .prop_map(|id| format!("backups/{id}/manifest.json")),
                any::<String>(),
            ],
            0..24,
        ),
    ) {
        fuzzing::store_listing(format!("{header}\n{}", lines.join("\n")).as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// Base-backup tars

/// One entry of a forged archive: its raw name, type, mode, link target and data.
#[derive(Debug, Clone)]
struct Forged {
    name: Vec<u8>,
    kind: EntryType,
    mode: u32,
    link: &'static str,
    data: Vec<u8>,
}

fn forged() -> impl Strategy<Value = Forged> {
    let component = prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just(String::new()),
        Just("pg_wal".to_string()),
        Just("pg_tblspc".to_string()),
        Just("16384".to_string()),
        Just("base".to_string()),
        Just("outside".to_string()),
        "[a-c]{1,2}",
    ];
    let name = (any::<bool>(), vec(component, 1..5), any::<bool>()).prop_map(
        |(absolute, parts, trailing)| {
            let mut name = if absolute {
                "/".to_string()
            } else {
                String::new()
            };
            name.push_str(&parts.join("/"));
            if trailing {
                name.push('/');
            }
            name.into_bytes()
        },
    );
    let kind = prop_oneof![
        4 => Just(EntryType::Regular),
        3 => Just(EntryType::Directory),
        2 => Just(EntryType::Symlink),
        1 => Just(EntryType::Link),
        1 => Just(EntryType::Char),
        1 => Just(EntryType::Block),
        1 => Just(EntryType::Fifo),
        1 => Just(EntryType::Continuous),
        1 => Just(EntryType::GNULongName),
        1 => Just(EntryType::XHeader),
        1 => Just(EntryType::GNUSparse),
        1 => any::<u8>().prop_map(EntryType::new),
    ];
    let mode = prop_oneof![
        Just(0o644),
        Just(0o4755),
        Just(0o7777),
        Just(0),
        Just(0o2750)
    ];
    let link = prop_oneof![
        Just(".."),
        Just("../outside"),
        Just("/etc"),
        Just("pgdata"),
        Just("x"),
        Just(""),
    ];
    (name, kind, mode, link, vec(any::<u8>(), 0..48)).prop_map(|(name, kind, mode, link, data)| {
        Forged {
            name,
            kind,
            mode,
            link,
            data,
        }
    })
}

/// Builds the archive with the headers as given: the tar crate's own setters refuse `..` and
/// absolute names, which is exactly what a forger would not use.
fn build(entries: &[Forged]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        let field = &mut h.as_old_mut().name;
        field.fill(0);
        field[..e.name.len()].copy_from_slice(&e.name);
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_mtime(1_700_000_000);
        let data: &[u8] = if e.kind.is_file() { &e.data } else { &[] };
        h.set_size(data.len() as u64);
        if !e.link.is_empty() {
            h.set_link_name(e.link).unwrap();
        }
        h.set_cksum();
        builder.append(&h, data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Whether a base backup must never hold `e` whatever comes before it.
fn hostile(e: &Forged) -> bool {
    fuzzing::hostile_entry(&e.name, e.kind).is_some()
}

proptest! {
    #![proptest_config(cases(128))]

    #[test]
    fn hostile_tars_never_write_outside_the_directory(entries in vec(forged(), 0..8)) {
        let tar = build(&entries);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pgdata");
        fs::create_dir(&dir).unwrap();
        fs::write(tmp.path().join("outside"), b"precious").unwrap();
        let result = untar::unpack(&tar[..], &dir, tar.len() as u64);
        prop_assert_eq!(fs::read(tmp.path().join("outside")).unwrap(), b"precious");
        prop_assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 2);
        if entries.iter().any(hostile) {
            prop_assert!(
                matches!(result, Err(Stop::Refused(_))),
                "a hostile archive was not refused: {:?}",
                result
            );
        }
        if result.is_ok() {
            // Every file is where its entry names it, with its bytes and no special mode bits.
            for e in entries.iter().filter(|e| e.kind.is_file()) {
                let mut path = dir.clone();
                for part in std::str::from_utf8(&e.name).unwrap().split('/').filter(|p| !p.is_empty() && *p != ".") {
                    path.push(part);
                }
                let mut got = Vec::new();
                fs::File::open(&path).unwrap().read_to_end(&mut got).unwrap();
                prop_assert_eq!(&got, &e.data);
                let mode = fs::symlink_metadata(&path).unwrap().permissions().mode();
                prop_assert_eq!(mode & 0o7777, e.mode & 0o777);
            }
        }
        // The shared checks: nothing beside, only allowed things inside, hostile refused.
        fuzzing::untar(&tar);
    }

    #[test]
    fn damaged_tars_never_panic_the_unpack(
        entries in vec(forged(), 1..4),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut tar = build(&entries);
        for (at, byte) in flips {
            let i = at.index(tar.len());
            tar[i] = byte;
        }
        if let Some(at) = cut {
            tar.truncate(at.index(tar.len()));
        }
        fuzzing::untar(&tar);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_unpack(bytes in vec(any::<u8>(), 0..2048)) {
        fuzzing::untar(&bytes);
    }
}

// ---------------------------------------------------------------------------------------------
// The committed fuzz corpus, replayed

/// Runs every file of `fuzz/corpus/<target>/` through `run`, naming the file that fails.
fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let files: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the fuzz corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        !files.is_empty(),
        "the fuzz corpus {} is empty",
        dir.display()
    );
    for path in files {
        let data = fs::read(&path).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| run(&data)) {
            let why = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            panic!("{} fails: {why}", path.display());
        }
    }
}

#[test]
fn fuzz_corpus_backup_id() {
    replay("backup_id", fuzzing::backup_id);
}

#[test]
fn fuzz_corpus_wal_name() {
    replay("wal_name", fuzzing::wal_name);
}

#[test]
fn fuzz_corpus_history() {
    replay("history", fuzzing::history);
}

#[test]
fn fuzz_corpus_manifest() {
    replay("manifest", fuzzing::manifest);
}

#[test]
fn fuzz_corpus_store_listing() {
    replay("store_listing", fuzzing::store_listing);
}

#[test]
fn fuzz_corpus_untar() {
    replay("untar", fuzzing::untar);
}

/// The reader used by the tar properties must see what the unpack sees: a sanity check of
/// [`build`] itself, so a property that passes is not passing on archives nobody reads.
#[test]
fn forged_archives_read_back_as_forged() {
    let entries = [Forged {
        name: b"../x".to_vec(),
        kind: EntryType::Regular,
        mode: 0o644,
        link: "",
        data: b"abc".to_vec(),
    }];
    let tar = build(&entries);
    let mut archive = tar::Archive::new(io::Cursor::new(&tar));
    let entry = archive
        .entries()
        .unwrap()
        .raw(true)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(&*entry.path_bytes(), b"../x");
}

#[test]
fn fuzz_corpus_pg_dump_archive() {
    replay("pg_dump_archive", fuzzing::pg_dump_archive);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic_the_pg_dump_archive_parser(data in vec(any::<u8>(), 0..512)) {
        fuzzing::pg_dump_archive(&data);
    }

    #[test]
    fn a_damaged_real_archive_never_panics_the_parser(at in 0usize..4096, xor in 1u8..=255, cut in 0usize..4096) {
        let seed = fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/pg_dump_archive/small.dump")).unwrap();
        let mut data = seed.clone();
        let at = at % data.len();
        data[at] ^= xor;
        data.truncate(cut.max(at + 1).min(data.len()));
        fuzzing::pg_dump_archive(&data);
        fuzzing::pg_dump_archive(&seed);
    }
}
