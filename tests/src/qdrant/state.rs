//! What the double knows: collections, aliases, its disk, the request log and the faults the
//! test asked for. One mutex guards it; no lock is held across an `.await` or disk I/O.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tempfile::TempDir;

use super::data::{DataSource, SegmentMeta};
use super::{RequestRecord, Times};

/// One collection: its single shard's parameters and bytes.
#[derive(Clone, Debug)]
pub(crate) struct Collection {
    pub meta: SegmentMeta,
    pub data: DataSource,
}

/// Misbehaviour the test switched on.
#[derive(Debug, Default)]
pub(crate) struct Faults {
    pub wrong_checksum: Option<Times>,
    /// Bytes after which a download is cut, while `cut_download` fires.
    pub cut_download_at: u64,
    pub cut_download: Option<Times>,
    pub chunk_delay: Duration,
    pub create_delay: Duration,
    pub fail_create: Option<Times>,
    /// Sleep after a collection snapshot upload is received, before it is recovered.
    pub recover_delay: Duration,
    /// Bytes of padding in every `GET /collections` answer.
    pub list_padding: u64,
}

/// Consumes one use of a fault; true when it fires.
pub(crate) fn fire(slot: &mut Option<Times>) -> bool {
    match slot {
        None => false,
        Some(Times::Always) => true,
        Some(Times::Next(n)) => {
            if *n <= 1 {
                *slot = None;
            } else {
                *n -= 1;
            }
            true
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub version: String,
    pub collections: BTreeMap<String, Collection>,
    pub aliases: BTreeMap<String, String>,
    pub requests: Vec<RequestRecord>,
    /// Sequence number of the last logged request.
    pub next_seq: u64,
    pub faults: Faults,
}

/// Paths on the double's "node" disk, laid out like a Qdrant storage directory.
#[derive(Debug)]
pub(crate) struct Dirs {
    /// Kept for its Drop (removes everything).
    _root: TempDir,
    /// `snapshots/` — full snapshots at the top, collection snapshots in `snapshots/<name>/`.
    pub snapshots: PathBuf,
    /// Temporary files: upload spools, archives being written.
    pub tmp: PathBuf,
    /// Bytes of collections recovered from snapshots.
    pub storage: PathBuf,
}

impl Dirs {
    pub(crate) fn new() -> Dirs {
        let root = tempfile::Builder::new()
            .prefix("soma-qdrant-double-")
            .tempdir()
            .expect("cannot create a temporary directory for the Qdrant double");
        let snapshots = root.path().join("snapshots");
        let tmp = root.path().join("tmp");
        let storage = root.path().join("storage");
        for dir in [&snapshots, &tmp, &storage] {
            std::fs::create_dir_all(dir).expect("cannot create the Qdrant double's directories");
        }
        Dirs {
            _root: root,
            snapshots,
            tmp,
            storage,
        }
    }

    /// Directory of one collection's snapshots (`snapshots_path_for_collection`).
    pub(crate) fn collection_snapshots(&self, collection: &str) -> PathBuf {
        self.snapshots.join(collection)
    }
}

/// Everything the server tasks and the test thread share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub dirs: Dirs,
    pub api_key: Option<String>,
    /// Stands in for the peer id in snapshot names.
    pub peer_id: u64,
    inner: Mutex<Inner>,
}

impl Shared {
    pub(crate) fn new(api_key: Option<String>, version: &str) -> Shared {
        Shared {
            dirs: Dirs::new(),
            api_key,
            peer_id: rand::random::<u64>() >> 12,
            inner: Mutex::new(Inner {
                version: version.to_string(),
                collections: BTreeMap::new(),
                aliases: BTreeMap::new(),
                requests: Vec::new(),
                next_seq: 0,
                faults: Faults::default(),
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking handler must not wedge the test that inspects the double afterwards.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// Resolves an alias or collection name the way `TableOfContent::resolve_name` does: the
    /// alias wins, then the collection must exist.
    pub(crate) fn resolve(&self, name: &str) -> Option<(String, Collection)> {
        let real = self.aliases.get(name).map(String::as_str).unwrap_or(name);
        self.collections
            .get(real)
            .map(|c| (real.to_string(), c.clone()))
    }
}
