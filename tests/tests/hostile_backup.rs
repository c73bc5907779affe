//! Proves that a forged base backup cannot reach outside the data directory of a physical restore,
//! nor make it write without bound.
//!
//! Anyone who can write to the bucket can replace a base backup and rewrite its manifest so that
//! every size and digest matches, so the checks proven here are ones digests cannot give. A real
//! PostgreSQL 15 base backup is taken through the real agent into a local store; behind the
//! agent's back its archive gets one hostile addition, the object and its manifest are rewritten
//! with recomputed digests, and `soma-agent restore-pgdata` — run as root, as an init container
//! without `runAsUser` runs — restores it into a fresh directory beside a file it must not touch:
//!
//! - `recovery.signal` as a symbolic link to that file (the measured attack: the restore wrote the
//!   empty signal file through the link, truncating the file outside) is refused, naming the
//!   entry; the file is unchanged and the data directory is left empty;
//! - a tablespace link (`pg_tblspc/<oid>`, which a data directory may hold) to a directory outside,
//!   followed by an entry below it, is refused before anything lands there;
//! - a setuid executable (restored as root, a setuid-root binary) is laid down without its setuid
//!   bit, and the restore otherwise succeeds;
//! - decompression bombs — an entry whose header claims 2 GiB, and 2 GiB of zeros after the end of
//!   the archive, each well under 4 MiB stored, the manifest claiming the original raw size — stop
//!   at the manifest's size ("more than its manifest's N bytes"), not after writing or decoding
//!   all of it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use soma_tests::pitr::{physical_backup, wait_archived, wal_agent, wal_status};
use soma_tests::{Agent, CmdOutput, PgCluster, TestStore, bin_path, poll_until};
use tempfile::TempDir;

/// Size of each bomb: far beyond any test cluster's base backup, small enough that a regression
/// that wrote it all would not fill the test machine's disk.
const BOMB: u64 = 2 << 30;

/// A real base backup in a local store, and the means to replace it.
struct Fixture {
    // Dropped first: the agent and its pg_receivewal go before the server they stream from.
    _agent: Agent,
    _pg: PgCluster,
    store: TestStore,
    _spool: TempDir,
    id: String,
    /// The manifest as the agent wrote it.
    manifest: serde_json::Value,
    /// The stored object as the agent wrote it.
    stored: Vec<u8>,
    /// Its raw tar stream.
    tar: Vec<u8>,
    /// Where the archive's entries end (its end-of-archive blocks start).
    entries_end: usize,
}

impl Fixture {
    fn new() -> Self {
        let pg = PgCluster::start();
        let store = TestStore::local();
        let spool = tempfile::tempdir().expect("spool dir");
        let agent = wal_agent(&pg, &store, spool.path(), "1s");
        let a = agent.addr().to_owned();
        poll_until(
            Duration::from_secs(60),
            "the agent to stream WAL (status: receiving)",
            || (wal_status(&a)["receiving"].as_bool() == Some(true)).then_some(()),
        );
        pg.psql(
            "postgres",
            "create table t as select i from generate_series(1, 1000) i",
        );
        let id = physical_backup(&a);
        wait_archived(&a, &pg);
        let manifest: serde_json::Value =
            serde_json::from_slice(&store.read(&format!("backups/{id}/manifest.json")))
                .expect("the manifest is JSON");
        let stored = store.read(&format!("backups/{id}/base.tar.zst"));
        let tar = zstd::decode_all(&stored[..]).expect("the base backup decodes");
        let entries_end = entries_end(&tar);
        Fixture {
            _agent: agent,
            _pg: pg,
            store,
            _spool: spool,
            id,
            manifest,
            stored,
            tar,
            entries_end,
        }
    }

    /// The manifest's raw size of the original base backup.
    fn raw_bytes(&self) -> u64 {
        self.artifact(&self.manifest)["raw_bytes"]
            .as_u64()
            .expect("raw_bytes")
    }

    fn artifact<'a>(&self, manifest: &'a serde_json::Value) -> &'a serde_json::Value {
        manifest["artifacts"]
            .as_array()
            .expect("artifacts")
            .iter()
            .find(|a| a["name"] == "base.tar.zst")
            .expect("the base backup artifact")
    }

    /// The original archive with `add` appended to its entries.
    fn tar_with(&self, add: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(self.tar[..self.entries_end].to_vec());
        add(&mut builder);
        builder.into_inner().expect("the forged archive")
    }

    /// Replaces the base backup with `tar`, manifest digests and sizes recomputed to match.
    fn forge(&self, tar: &[u8]) {
        let stored = zstd::encode_all(tar, 3).expect("zstd");
        self.publish(stored, hex_sha(tar), tar.len() as u64);
    }

    /// Replaces the stored object with `stored` and its manifest entry with the stored object's
    /// true size and digest, and `raw_sha256` / `raw_bytes` as given.
    fn publish(&self, stored: Vec<u8>, raw_sha256: String, raw_bytes: u64) {
        let mut manifest = self.manifest.clone();
        let art = manifest["artifacts"]
            .as_array_mut()
            .expect("artifacts")
            .iter_mut()
            .find(|a| a["name"] == "base.tar.zst")
            .expect("the base backup artifact");
        art["stored_sha256"] = hex_sha(&stored).into();
        art["stored_bytes"] = (stored.len() as u64).into();
        art["raw_sha256"] = raw_sha256.into();
        art["raw_bytes"] = raw_bytes.into();
        self.store
            .write(&format!("backups/{}/base.tar.zst", self.id), stored);
        self.store.write(
            &format!("backups/{}/manifest.json", self.id),
            serde_json::to_vec_pretty(&manifest).expect("manifest JSON"),
        );
    }

    /// Runs `soma-agent restore-pgdata` of the backup into `target`, as this test's user (root
    /// in CI, so a write through a link could reach any file on the host).
    fn restore(&self, target: &Target) -> CmdOutput {
        let mut cmd = std::process::Command::new(bin_path("soma-agent"));
        for (key, _) in std::env::vars_os() {
            let k = key.to_string_lossy();
            if k.starts_with("AWS_") || k.starts_with("SOMA_") || k.starts_with("PG") {
                cmd.env_remove(&key);
            }
        }
        let out = cmd
            .arg("restore-pgdata")
            .arg("--store")
            .arg(self.store.url())
            .arg("--pgdata")
            .arg(target.pgdata())
            .args(["--backup", &self.id])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("cannot run soma-agent restore-pgdata");
        CmdOutput::from_output(&out)
    }
}

/// A directory holding the data directory to restore into (`pgdata`, missing until the restore
/// creates it) and, beside it, what a hostile archive would reach for: a file `outside` holding
/// "precious" and an empty directory `elsewhere`.
struct Target(TempDir);

impl Target {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("soma-hostile-")
            .tempdir()
            .expect("temporary directory");
        std::fs::write(root.path().join("outside"), b"precious").expect("outside file");
        std::fs::create_dir(root.path().join("elsewhere")).expect("outside directory");
        Target(root)
    }

    fn pgdata(&self) -> PathBuf {
        self.0.path().join("pgdata")
    }

    fn outside(&self) -> PathBuf {
        self.0.path().join("outside")
    }

    fn elsewhere(&self) -> PathBuf {
        self.0.path().join("elsewhere")
    }

    /// The restore failed naming every phrase, wrote nothing beside the data directory and left
    /// the data directory empty.
    fn assert_refused(&self, out: &CmdOutput, what: &str, phrases: &[&str]) {
        assert_ne!(out.code, 0, "{what}: the restore succeeded:\n{out}");
        for phrase in phrases {
            out.assert_stderr_contains(phrase, what);
        }
        self.assert_outside_untouched(what);
        let left: Vec<_> = std::fs::read_dir(self.pgdata())
            .map(|d| d.map(|e| e.expect("entry").file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "{what}: the failed restore left {left:?} in the data directory"
        );
    }

    fn assert_outside_untouched(&self, what: &str) {
        assert_eq!(
            std::fs::read(self.outside()).expect("outside file"),
            b"precious",
            "{what}: the file outside the data directory changed"
        );
        let mut beside: Vec<_> = std::fs::read_dir(self.0.path())
            .expect("restore root")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        beside.sort();
        assert_eq!(
            beside,
            ["elsewhere", "outside", "pgdata"],
            "{what}: something appeared beside the data directory"
        );
        let written = std::fs::read_dir(self.elsewhere())
            .expect("outside directory")
            .count();
        assert_eq!(written, 0, "{what}: something was written outside");
    }
}

/// Where the entries of a tar archive end.
fn entries_end(tar: &[u8]) -> usize {
    let mut archive = tar::Archive::new(tar);
    let mut end = 0;
    for entry in archive.entries().expect("tar entries") {
        let entry = entry.expect("tar entry");
        end = entry.raw_file_position() + entry.size().div_ceil(512) * 512;
    }
    usize::try_from(end).expect("fits")
}

fn hex_sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn symlink_header(name: &str, target: &Path) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_path(name).expect("name");
    h.set_link_name(target).expect("link name");
    h.set_mode(0o777);
    h.set_size(0);
    h.set_cksum();
    h
}

/// `n` zstd frames of 1 MiB of zeros each: concatenated frames decode as one stream.
fn zero_frames(n: u64) -> Vec<u8> {
    let frame = zstd::encode_all(&vec![0u8; 1 << 20][..], 3).expect("zstd");
    let mut out = Vec::with_capacity(frame.len() * n as usize);
    for _ in 0..n {
        out.extend_from_slice(&frame);
    }
    out
}

#[test]
fn a_forged_base_backup_cannot_reach_outside_the_data_directory() {
    let f = Fixture::new();

    // The measured attack: recovery.signal a link to a file outside the data directory. The
    // restore wrote the empty signal file through it, truncating that file (as root, any file).
    let target = Target::new();
    f.forge(&f.tar_with(|b| {
        b.append(
            &symlink_header("recovery.signal", &target.outside()),
            std::io::empty(),
        )
        .expect("append");
    }));
    let out = f.restore(&target);
    target.assert_refused(
        &out,
        "recovery.signal linked outside",
        &["\"recovery.signal\" is a symbolic link", "was refused"],
    );

    // A tablespace link pointing outside, then an entry below it: writing the entry would follow
    // the link (a planted file anywhere on the host). The manifest records no tablespace (a base
    // backup taken to a stream never has one), so the link itself is refused, before the entry.
    let target = Target::new();
    f.forge(&f.tar_with(|b| {
        b.append(
            &symlink_header("pg_tblspc/16384", &target.elsewhere()),
            std::io::empty(),
        )
        .expect("append");
        let mut h = tar::Header::new_ustar();
        h.set_path("pg_tblspc/16384/planted").expect("name");
        h.set_mode(0o600);
        h.set_size(7);
        h.set_cksum();
        b.append(&h, &b"planted"[..]).expect("append");
    }));
    let out = f.restore(&target);
    target.assert_refused(
        &out,
        "a file below a tablespace link",
        &[
            "\"pg_tblspc/16384\" is a symbolic link",
            "the tablespaces its manifest records",
        ],
    );
}

/// The system id reaches restore_command, which PostgreSQL runs through a shell: a manifest whose
/// system id carries a command (digests untouched, since no digest covers the manifest itself) is
/// refused before anything is laid down, and the command never runs.
#[test]
fn a_shell_payload_in_the_system_id_is_refused() {
    let f = Fixture::new();
    let target = Target::new();
    let pwned = target.elsewhere().join("pwned");
    let mut manifest = f.manifest.clone();
    manifest["details"]["system_id"] =
        format!("7312345678901234567; touch {} #", pwned.display()).into();
    f.store.write(
        &format!("backups/{}/manifest.json", f.id),
        serde_json::to_vec_pretty(&manifest).expect("manifest JSON"),
    );
    let out = f.restore(&target);
    let what = "a shell payload in system_id";
    assert_ne!(out.code, 0, "{what}: the restore succeeded:\n{out}");
    out.assert_stderr_contains("system", what);
    assert!(!pwned.exists(), "{what}: the payload ran");
    // Refused while reading the manifest: not even the data directory was created.
    assert!(
        !target.pgdata().exists(),
        "{what}: the data directory was created"
    );
    assert_eq!(
        std::fs::read(target.outside()).expect("outside file"),
        b"precious"
    );
}

/// A setuid executable in a forged base backup restored as root would be a setuid-root binary
/// on the host: it is laid down without the bit, and the rest of the restore proceeds.
#[test]
fn a_forged_setuid_file_loses_its_setuid_bit() {
    let f = Fixture::new();
    let target = Target::new();
    f.forge(&f.tar_with(|b| {
        let mut h = tar::Header::new_ustar();
        h.set_path("soma-setuid-tool").expect("name");
        h.set_mode(0o4755);
        h.set_size(14);
        h.set_cksum();
        b.append(&h, &b"#!/bin/sh\nid\n"[..]).expect("append");
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_path("soma-setgid-dir/").expect("name");
        h.set_mode(0o3777);
        h.set_size(0);
        h.set_cksum();
        b.append(&h, std::io::empty()).expect("append");
    }));
    let out = f.restore(&target);
    out.assert_success("restore of a base backup holding a setuid file");
    target.assert_outside_untouched("setuid file");
    let mode = |p: &str| {
        std::fs::symlink_metadata(target.pgdata().join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .mode()
            & 0o7777
    };
    assert_eq!(mode("soma-setuid-tool"), 0o755, "setuid bit kept");
    assert_eq!(mode("soma-setgid-dir"), 0o777, "setgid or sticky bit kept");
    // The rest of the cluster is there, recovery configured.
    assert!(target.pgdata().join("PG_VERSION").is_file());
    assert!(target.pgdata().join("recovery.signal").is_file());
}

/// Decompression bombs: a few hundred KiB stored that decode to 2 GiB, the manifest claiming the
/// original raw size (the stored size and digest recomputed, so the download's checks pass until
/// the end). The restore stops at the manifest's size instead of writing (or decoding) it all.
#[test]
fn a_decompression_bomb_stops_at_the_manifest_size() {
    let f = Fixture::new();
    let raw = f.raw_bytes();
    let raw_sha = f.artifact(&f.manifest)["raw_sha256"]
        .as_str()
        .expect("raw_sha256")
        .to_owned();
    let phrase = format!("more than its manifest's {raw} bytes");

    // An archive opening with an entry whose header admits its 2 GiB (the tar crate's unpack, as
    // used before, wrote all of it before the download's size check at the end): refused at that
    // header, since the entry ends past the manifest's size.
    let target = Target::new();
    let mut h = tar::Header::new_ustar();
    h.set_path("base/bomb").expect("name");
    h.set_mode(0o600);
    h.set_size(BOMB);
    h.set_cksum();
    let mut stored = zstd::encode_all(h.as_bytes().as_slice(), 3).expect("zstd");
    stored.extend_from_slice(&zero_frames(BOMB >> 20));
    assert!(
        stored.len() < 4 << 20,
        "stored bomb: {} bytes",
        stored.len()
    );
    f.publish(stored, raw_sha.clone(), raw);
    let out = f.restore(&target);
    target.assert_refused(
        &out,
        "a 2 GiB entry",
        &[&format!("the base backup unpacks to {phrase}")],
    );

    // The real archive, every header as the agent wrote it, then 2 GiB of zeros after its end:
    // decoding stops at the manifest's size instead of running through all of it (the decoder
    // sees it before the unpacker, which stops reading there too).
    let target = Target::new();
    let mut stored = f.stored.clone();
    stored.extend_from_slice(&zero_frames(BOMB >> 20));
    f.publish(stored, raw_sha, raw);
    let out = f.restore(&target);
    target.assert_refused(&out, "2 GiB after the archive", &[&phrase]);
}
