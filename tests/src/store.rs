//! The two places the agent can keep backups, seen from outside the agent: a local directory and
//! a prefix in a real S3 bucket (Garage). Tests that must hold for every store take a
//! [`TestStore`] and run once per kind.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::garage::Garage;

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Prefix inside the bucket that S3 tests give the agent.
pub const S3_PREFIX: &str = "some/prefix";

/// A store the agent is pointed at, plus direct access to what it wrote there.
#[derive(Debug)]
pub enum TestStore {
    /// `file://<dir>`.
    Local {
        /// The store's root directory.
        dir: TempDir,
    },
    /// `s3://soma-test/some/prefix` on a Garage server of this test's own.
    S3 {
        /// The server.
        garage: Box<Garage>,
    },
}

impl TestStore {
    /// A fresh local store in a temporary directory.
    pub fn local() -> TestStore {
        TestStore::Local {
            dir: tempfile::Builder::new()
                .prefix("soma-store-")
                .tempdir()
                .expect("cannot create a temporary store directory"),
        }
    }

    /// A fresh Garage server; the store is [`S3_PREFIX`] in its bucket.
    pub fn garage() -> TestStore {
        TestStore::S3 {
            garage: Box::new(Garage::start()),
        }
    }

    /// Short name for messages ("local" or "s3").
    pub fn kind(&self) -> &'static str {
        match self {
            TestStore::Local { .. } => "local",
            TestStore::S3 { .. } => "s3",
        }
    }

    /// The `--store` URL for the agent.
    pub fn url(&self) -> String {
        match self {
            TestStore::Local { dir } => format!("file://{}", dir.path().display()),
            TestStore::S3 { garage } => format!("s3://{}/{S3_PREFIX}", garage.bucket()),
        }
    }

    /// Environment the agent needs to reach the store (empty for a local store).
    pub fn env(&self) -> Vec<(String, String)> {
        match self {
            TestStore::Local { .. } => Vec::new(),
            TestStore::S3 { garage } => garage.env(),
        }
    }

    /// The Garage server behind an S3 store.
    pub fn garage_server(&self) -> Option<&Garage> {
        match self {
            TestStore::Local { .. } => None,
            TestStore::S3 { garage } => Some(garage),
        }
    }

    /// The Garage server behind an S3 store, mutably (to stop it).
    pub fn garage_server_mut(&mut self) -> Option<&mut Garage> {
        match self {
            TestStore::Local { .. } => None,
            TestStore::S3 { garage } => Some(garage),
        }
    }

    /// Content of the object at `rel` (relative to the store root, e.g.
    /// `backups/<id>/dump.pgdump.zst`).
    pub fn read(&self, rel: &str) -> Vec<u8> {
        match self {
            TestStore::Local { dir } => std::fs::read(dir.path().join(rel))
                .unwrap_or_else(|e| panic!("cannot read {rel} in the local store: {e}")),
            TestStore::S3 { garage } => garage.get_object(&format!("{S3_PREFIX}/{rel}")),
        }
    }

    /// Writes (or overwrites) the object at `rel` with `bytes`, behind the agent's back.
    pub fn write(&self, rel: &str, bytes: Vec<u8>) {
        match self {
            TestStore::Local { dir } => {
                let path = dir.path().join(rel);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
                }
                std::fs::write(path, bytes)
                    .unwrap_or_else(|e| panic!("cannot write {rel} in the local store: {e}"))
            }
            TestStore::S3 { garage } => garage.put_object(&format!("{S3_PREFIX}/{rel}"), bytes),
        }
    }

    /// Every stored object (relative key) under `rel_prefix`, sorted. For a local store these are
    /// the regular files.
    pub fn list(&self, rel_prefix: &str) -> Vec<String> {
        match self {
            TestStore::Local { dir } => {
                let mut files = Vec::new();
                walk_files(dir.path(), &dir.path().join(rel_prefix), &mut files);
                files.sort();
                files.into_iter().map(|(rel, _)| rel).collect()
            }
            TestStore::S3 { garage } => {
                let root = format!("{S3_PREFIX}/");
                garage
                    .list_keys(&format!("{root}{rel_prefix}"))
                    .into_iter()
                    .map(|k| k.strip_prefix(&root).unwrap_or(&k).to_owned())
                    .collect()
            }
        }
    }

    /// Manifests present under `backups/` (what makes a backup complete).
    pub fn manifests(&self) -> Vec<String> {
        self.list("backups/")
            .into_iter()
            .filter(|k| k.ends_with("/manifest.json"))
            .collect()
    }

    /// Unfinished uploads: for S3, multipart uploads under the prefix ("key (N parts, B bytes)");
    /// for a local store, the regular files under `<root>/.uploads/` ("path (B bytes)").
    pub fn pending_uploads(&self) -> Vec<String> {
        match self {
            TestStore::Local { dir } => {
                let mut files = Vec::new();
                walk_files(dir.path(), &dir.path().join(".uploads"), &mut files);
                files
                    .into_iter()
                    .map(|(rel, size)| format!("{rel} ({size} bytes)"))
                    .collect()
            }
            TestStore::S3 { garage } => garage
                .multipart_uploads(&format!("{S3_PREFIX}/"))
                .into_iter()
                .map(|u| {
                    let parts = garage.part_sizes(&u);
                    format!(
                        "{} ({} parts, {} bytes)",
                        u.key,
                        parts.len(),
                        parts.iter().sum::<i64>()
                    )
                })
                .collect(),
        }
    }

    /// Bytes held by unfinished uploads: for S3, the sizes of the parts uploaded so far to the
    /// multipart uploads under the prefix; for a local store, the sizes of the files under
    /// `.uploads/` (which include a small metadata file per upload: compare against a threshold
    /// well above that, e.g. [`MIB`]).
    pub fn pending_upload_bytes(&self) -> u64 {
        match self {
            TestStore::Local { dir } => {
                let mut files = Vec::new();
                walk_files(dir.path(), &dir.path().join(".uploads"), &mut files);
                files.iter().map(|(_, size)| size).sum()
            }
            TestStore::S3 { garage } => garage
                .multipart_uploads(&format!("{S3_PREFIX}/"))
                .iter()
                .flat_map(|u| garage.part_sizes(u))
                .map(|size| u64::try_from(size).unwrap_or_default())
                .sum(),
        }
    }

    /// The local store's root directory.
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            TestStore::Local { dir } => Some(dir.path()),
            TestStore::S3 { .. } => None,
        }
    }
}

/// Collects (path relative to `root`, size) of every regular file under `dir` (if it exists).
fn walk_files(root: &Path, dir: &Path, out: &mut Vec<(String, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path: PathBuf = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            walk_files(root, &path, out);
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push((rel.display().to_string(), meta.len()));
        }
    }
}

/// Starts `kubectl-soma backup postgres --database DB` in the background and returns once the
/// backup has demonstrably moved data (a mebibyte sits in an unfinished upload in `store`), so a
/// test can act on a backup that is surely still running. Panics if it ends before that.
pub fn backup_in_flight(agent_addr: &str, store: &TestStore, database: &str) -> crate::SomaChild {
    let mut child = crate::soma_spawn(agent_addr, &["backup", "postgres", "--database", database]);
    crate::poll_until(
        std::time::Duration::from_secs(180),
        "the backup to store a mebibyte",
        || {
            if store.pending_upload_bytes() >= MIB {
                return Some(());
            }
            assert!(
                !child.has_exited(),
                "the backup ended before it stored any data; stderr:\n{}",
                child.stderr_so_far()
            );
            None
        },
    );
    child
}
