//! Backup ids, manifests, and the layout of backups in the store.
//!
//! Layout under the store's prefix:
//! ```text
//! backups/<id>/<artifact>        one or more artifacts (e.g. dump.pgdump.zst)
//! backups/<id>/manifest.json     written LAST, only after every artifact is complete
//! backups/<id>/owner             the owner id of the agent that took it, written before its
//!                                first upload (see [`Catalog::record_owner`])
//! ```
//! A backup exists if and only if its manifest exists: list, describe, verify and restore read only
//! manifests, so a crash at any point before the manifest leaves nothing that looks valid. Delete
//! removes the manifest first for the same reason. The WAL archive for point-in-time recovery
//! lives beside `backups/`, under `wal/<system id>/` (see [`crate::wal`]); a base backup's
//! manifest names its cluster's system id.

use std::{collections::HashMap, sync::Arc};

use bytes::Bytes;
use futures::StreamExt;

pub use soma_proto::{BackupId, IdEngine, InvalidBackupId};

mod manifest;

pub use manifest::{Artifact, Compression, EncryptionRecord, Engine, Kind, Manifest, Target, Tool};

use crate::{
    owner::{MAX_OWNER_ID_BYTES, OwnerId},
    store::{PendingUpload, Store, StoreError},
};

/// Folder of all backups, relative to the store prefix.
pub const BACKUPS_DIR: &str = "backups";
/// Name of the manifest object inside a backup's folder.
pub const MANIFEST: &str = "manifest.json";
/// Manifest format version this agent writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest we accept, so a bogus object cannot exhaust memory.
const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// Manifests read at once by a listing: store round trips overlap, while at most this many
/// manifests (each at most [`MAX_MANIFEST_BYTES`]) are in flight.
const READ_AHEAD: usize = 8;
/// Name of the owner marker inside a backup's folder: the owner id of the agent that took it.
pub const OWNER_MARKER: &str = "owner";

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The id cannot be a backup id (and could otherwise escape the prefix).
    #[error(transparent)]
    InvalidId(#[from] InvalidBackupId),
    /// No complete backup with that id.
    #[error(
        "backup {0} not found (no manifest in the store); run `kubectl soma list` to see the backups"
    )]
    NotFound(String),
    /// "latest" was asked for but there is no backup.
    #[error("there is no complete backup in the store yet; take one with `kubectl soma backup`")]
    NoBackups,
    /// "latest --engine E" was asked for but there is no backup of E.
    #[error(
        "there is no complete {0} backup in the store yet; take one with `kubectl soma backup {0}`"
    )]
    NoBackupsOf(Engine),
    /// A manifest that cannot be read.
    #[error("manifest of backup {id} is unreadable: {reason}")]
    BadManifest {
        /// Backup id.
        id: String,
        /// Why.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where a backup's objects live in the store (ids are safe as one key component: see
/// [`BackupId`]).
pub trait BackupKeys {
    /// Folder of this backup, relative to the store prefix.
    fn dir(&self) -> String;
    /// Key of an artifact (or the manifest) of this backup.
    fn key(&self, name: &str) -> String;
}

impl BackupKeys for BackupId {
    fn dir(&self) -> String {
        format!("{BACKUPS_DIR}/{}", self.as_str())
    }

    fn key(&self, name: &str) -> String {
        format!("{BACKUPS_DIR}/{}/{name}", self.as_str())
    }
}

/// The backup "latest" names among `manifests` (complete backups in any order): the newest
/// top-level one, that is a backup set or a backup that belongs to no set. A set records its start
/// before its members start, so the newest by start time alone would be a member of the newest
/// set, and restoring it would restore only part of what `backup all` took.
pub fn latest(manifests: Vec<Manifest>) -> Option<Manifest> {
    let members: std::collections::HashSet<BackupId> = manifests
        .iter()
        .flat_map(|m| m.members.iter().cloned())
        .collect();
    manifests
        .into_iter()
        .filter(|m| !members.contains(&m.id))
        .max_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)))
}

/// The backup "latest" of one engine names (`latest --engine postgres`): the newest complete
/// backup of that engine, whether it stands alone or is a member of a set, since the newest data
/// of that engine is what is asked for.
pub fn latest_of(manifests: Vec<Manifest>, engine: Engine) -> Option<Manifest> {
    manifests
        .into_iter()
        .filter(|m| m.engine == engine)
        .max_by(|a, b| (a.started_at, &a.id).cmp(&(b.started_at, &b.id)))
}

/// The backup whose manifest `key` (a key listed under [`BACKUPS_DIR`]) is:
/// `backups/<id>/manifest.json` with a valid id, and nothing else.
pub fn manifest_key_id(key: &str) -> Option<BackupId> {
    let rest = key.strip_prefix(BACKUPS_DIR)?.strip_prefix('/')?;
    let (id, MANIFEST) = rest.split_once('/')? else {
        return None;
    };
    BackupId::parse(id).ok()
}

/// Reads the manifest of backup `id` from `raw`, the bytes of its object: refused when it is larger
/// than any manifest the agent writes, does not parse, is of a newer format, or names another
/// backup (a manifest copied or forged into the wrong folder).
pub fn read_manifest(id: &BackupId, raw: &[u8]) -> Result<Manifest, CatalogError> {
    let bad = |reason: String| CatalogError::BadManifest {
        id: id.to_string(),
        reason,
    };
    if raw.len() > MAX_MANIFEST_BYTES {
        return Err(bad("larger than 4 MiB".into()));
    }
    let manifest: Manifest = serde_json::from_slice(raw).map_err(|e| bad(e.to_string()))?;
    if manifest.manifest_version > MANIFEST_VERSION {
        return Err(bad(format!(
            "manifest version {} is newer than this agent understands ({MANIFEST_VERSION}); upgrade the agent",
            manifest.manifest_version
        )));
    }
    if manifest.id != *id {
        return Err(bad(format!("it names backup {}", manifest.id)));
    }
    Ok(manifest)
}

/// What [`Catalog::list_all`] found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Readable manifests, newest first.
    pub manifests: Vec<Manifest>,
    /// Backups whose manifests cannot be read, and why.
    pub unreadable: Vec<Unreadable>,
}

/// A backup whose manifest exists but cannot be read.
#[derive(Debug, Clone)]
pub struct Unreadable {
    /// The backup.
    pub id: BackupId,
    /// Why (the error, naming what to do).
    pub reason: String,
}

impl CatalogError {
    /// Whether this is about one object (a damaged, forged or foreign-key manifest) rather than
    /// the store as a whole: the one backup is unreadable, the others are not.
    pub fn is_unreadable_object(&self) -> bool {
        matches!(
            self,
            CatalogError::BadManifest { .. }
                | CatalogError::Store(
                    StoreError::Tampered { .. }
                        | StoreError::WrongKey { .. }
                        | StoreError::NotEncrypted { .. }
                        | StoreError::ForeignRepository { .. }
                        | StoreError::Unbound { .. }
                        | StoreError::UnencryptedAfterCutoff { .. }
                )
        )
    }
}

/// Reads and writes manifests and ids in a store.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: Arc<dyn Store>,
    /// Recorded with every backup this catalog starts (see [`Catalog::record_owner`]).
    owner: Option<OwnerId>,
}

impl Catalog {
    /// A catalog over `store` that records no owner with the backups it starts.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store, owner: None }
    }

    /// The same catalog, recording `owner` with every backup it starts, so that only a sweep by
    /// the same owner ever aborts their uploads.
    pub fn with_owner(mut self, owner: OwnerId) -> Self {
        self.owner = Some(owner);
        self
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Publishes a backup: writes its manifest, the last step of every backup.
    pub async fn commit(&self, manifest: &Manifest) -> Result<(), CatalogError> {
        let mut manifest = manifest.clone();
        manifest.encryption = match self.store.encryption() {
            crate::store::Encryption::Off => None,
            crate::store::Encryption::On { fingerprints, .. } => Some(EncryptionRecord {
                algorithm: crate::store::crypt::ALGORITHM.into(),
                key_fingerprint: fingerprints[0].clone(),
            }),
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
        self.store
            .put(&manifest.id.key(MANIFEST), Bytes::from(json))
            .await?;
        Ok(())
    }

    /// Every complete backup whose manifest can be read, newest first. A manifest that cannot
    /// (damaged, forged, sealed with a key this agent lacks) is left out with a warning, so one
    /// bad object in the store cannot stop every `list` and `latest`; [`list_all`](Self::list_all)
    /// names them, and [`list_strict`](Self::list_strict) is for what deletes on the strength of
    /// the list.
    pub async fn list(&self) -> Result<Vec<Manifest>, CatalogError> {
        let listing = self.list_all().await?;
        for bad in &listing.unreadable {
            tracing::warn!(backup_id = %bad.id, reason = %bad.reason, "skipping a backup whose manifest is unreadable");
        }
        Ok(listing.manifests)
    }

    /// Every complete backup, newest first, failing on the first unreadable manifest: for
    /// retention and WAL pruning, which must not delete what an unreadable backup may still need.
    pub async fn list_strict(&self) -> Result<Vec<Manifest>, CatalogError> {
        let listing = self.list_all().await?;
        match listing.unreadable.into_iter().next() {
            Some(bad) => Err(CatalogError::BadManifest {
                id: bad.id.to_string(),
                reason: format!(
                    "{}; nothing is deleted while a manifest cannot be read (delete that backup, or fix the key or the object)",
                    bad.reason
                ),
            }),
            None => Ok(listing.manifests),
        }
    }

    /// Every complete backup, newest first, and the backups whose manifests cannot be read.
    /// Errors of the store as a whole (unreachable, access denied) still fail the listing.
    pub async fn list_all(&self) -> Result<Listing, CatalogError> {
        let ids = self.ids().await?;
        self.read(&ids).await
    }

    /// The ids of every backup with a manifest, newest first, from one listing and without
    /// reading a manifest: ids begin with their UTC second, so they sort by time as strings (the
    /// order of backups started within one second is the order of their ids).
    pub async fn ids(&self) -> Result<Vec<BackupId>, CatalogError> {
        let objects = self.store.list(&format!("{BACKUPS_DIR}/")).await?;
        let mut ids: Vec<BackupId> = objects
            .iter()
            .filter_map(|obj| manifest_key_id(&obj.key))
            .collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.dedup();
        Ok(ids)
    }

    /// The manifests of `ids`, [`READ_AHEAD`] at a time, newest first, and the ids whose
    /// manifests cannot be read. A manifest deleted since the listing is left out.
    pub async fn read(&self, ids: &[BackupId]) -> Result<Listing, CatalogError> {
        let mut reads = futures::stream::iter(ids.iter().cloned())
            .map(|id| async move {
                let read = self.get(&id).await;
                (id, read)
            })
            .buffered(READ_AHEAD);
        let mut out = Vec::with_capacity(ids.len());
        let mut unreadable = Vec::new();
        while let Some((id, read)) = reads.next().await {
            match read {
                Ok(m) => out.push(m),
                Err(CatalogError::NotFound(_)) => {}
                Err(e) if e.is_unreadable_object() => unreadable.push(Unreadable {
                    id,
                    reason: e.to_string(),
                }),
                Err(e) => return Err(e),
            }
        }
        // Ids have one-second resolution; the start time orders backups taken within a second.
        out.sort_by(|a, b| (b.started_at, &b.id).cmp(&(a.started_at, &a.id)));
        Ok(Listing {
            manifests: out,
            unreadable,
        })
    }

    /// One backup's manifest.
    pub async fn get(&self, id: &BackupId) -> Result<Manifest, CatalogError> {
        let key = id.key(MANIFEST);
        let mut stream = match self.store.get(&key).await {
            Ok(s) => s,
            Err(StoreError::NotFound { .. }) => return Err(CatalogError::NotFound(id.to_string())),
            Err(e) => return Err(e.into()),
        };
        let mut raw = Vec::new();
        while let Some(chunk) = stream.next().await {
            raw.extend_from_slice(&chunk?);
            if raw.len() > MAX_MANIFEST_BYTES {
                return Err(CatalogError::BadManifest {
                    id: id.to_string(),
                    reason: "larger than 4 MiB".into(),
                });
            }
        }
        read_manifest(id, &raw)
    }

    /// Resolves "latest" (the newest complete top-level backup: see [`latest`]) or a literal id.
    pub async fn resolve(&self, id_or_latest: &str) -> Result<Manifest, CatalogError> {
        self.resolve_of(id_or_latest, None).await
    }

    /// Like [`resolve`](Self::resolve); with an engine, "latest" is narrowed to it (see
    /// [`latest_of`]), and an explicit id must be of that engine.
    pub async fn resolve_of(
        &self,
        id_or_latest: &str,
        engine: Option<Engine>,
    ) -> Result<Manifest, CatalogError> {
        if id_or_latest == "latest" {
            let all = self.list().await?;
            match engine {
                None => latest(all).ok_or(CatalogError::NoBackups),
                Some(engine) => latest_of(all, engine).ok_or(CatalogError::NoBackupsOf(engine)),
            }
        } else {
            let id = BackupId::parse(id_or_latest)?;
            self.get(&id).await
        }
    }

    /// Deletes a backup: manifest first (it stops existing at once), then every object left in its
    /// folder, including leftovers of a failed attempt. Returns the number of objects deleted.
    pub async fn delete(&self, id: &BackupId) -> Result<u64, CatalogError> {
        let manifest_key = id.key(MANIFEST);
        if self.store.head(&manifest_key).await?.is_none() {
            return Err(CatalogError::NotFound(id.to_string()));
        }
        self.store.delete(&manifest_key).await?;
        let mut deleted = 1;
        for obj in self.store.list(&format!("{}/", id.dir())).await? {
            self.store.delete(&obj.key).await?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Removes whatever a failed attempt at backup `id` stored (it has no manifest, so nothing
    /// refers to it).
    pub async fn discard(&self, id: &BackupId) -> Result<(), CatalogError> {
        for obj in self.store.list(&format!("{}/", id.dir())).await? {
            self.store.delete(&obj.key).await?;
        }
        Ok(())
    }

    /// Aborts the incomplete uploads of backup `id` and removes whatever it completed: what an
    /// interrupted backup leaves. A backup whose manifest was written before the interruption is
    /// complete and stays.
    pub async fn abandon(&self, id: &BackupId) -> Result<(), CatalogError> {
        if self.store.head(&id.key(MANIFEST)).await?.is_some() {
            return Ok(());
        }
        for upload in self.store.list_uploads(&format!("{}/", id.dir())).await? {
            self.store.abort_upload(&upload).await?;
        }
        self.discard(id).await
    }

    /// Records this catalog's owner for backup `id`: called before the backup's first upload
    /// starts, so every incomplete upload a crash can leave has its owner in the store. The marker
    /// is not a manifest, so a crash still leaves nothing that looks like a backup; `discard`,
    /// `abandon` and `delete` remove it with the rest of the backup's folder. Without an owner
    /// (a catalog that only reads) nothing is written.
    pub async fn record_owner(&self, id: &BackupId) -> Result<(), CatalogError> {
        if let Some(owner) = &self.owner {
            self.store
                .put(
                    &id.key(OWNER_MARKER),
                    Bytes::from(owner.as_str().to_owned()),
                )
                .await?;
        }
        Ok(())
    }

    /// The owner recorded for backup `id` (see [`record_owner`](Self::record_owner)), `None`
    /// when it has no marker. At most a few hundred bytes are read whatever the object holds; a
    /// longer marker comes back cut, so it never equals a valid owner id.
    pub async fn recorded_owner(&self, id: &BackupId) -> Result<Option<String>, StoreError> {
        const LIMIT: usize = MAX_OWNER_ID_BYTES + 1;
        let mut stream = match self.store.get(&id.key(OWNER_MARKER)).await {
            Ok(s) => s,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut raw = Vec::with_capacity(LIMIT);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let room = LIMIT - raw.len();
            raw.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if raw.len() == LIMIT {
                break;
            }
        }
        Ok(Some(String::from_utf8_lossy(&raw).into_owned()))
    }

    /// Aborts the incomplete uploads that a crashed or killed run of `owner` left: uploads of
    /// backups by the given engines whose recorded owner is `owner`, then removes the rest of each
    /// such unfinished backup (its marker, artifacts it completed). Run at start-up, before any
    /// job of this agent can have begun one.
    ///
    /// Uploads of other owners are left alone: another agent may be writing them right now (a
    /// disaster-recovery drill started against the production bucket must not break production's
    /// backup). So is an upload whose backup records no owner (written by an agent older than the
    /// marker, or one killed between its marker and its upload) and one whose marker cannot be
    /// read: each is logged with its key, for an operator to judge.
    pub async fn sweep_incomplete(
        &self,
        engines: &[IdEngine],
        owner: &OwnerId,
    ) -> Result<Vec<PendingUpload>, CatalogError> {
        let mut aborted = Vec::new();
        // One marker read per backup, however many uploads it left.
        let mut owned: HashMap<BackupId, bool> = HashMap::new();
        for upload in self.store.list_uploads(&format!("{BACKUPS_DIR}/")).await? {
            let Some(id) = upload
                .key
                .strip_prefix(&format!("{BACKUPS_DIR}/"))
                .and_then(|rest| rest.split('/').next())
                .and_then(|id| BackupId::parse(id).ok())
            else {
                // No backup id, so no owner to ask: not provably ours.
                continue;
            };
            if !id.engine().is_some_and(|e| engines.contains(&e)) {
                continue;
            }
            let ours = match owned.get(&id) {
                Some(ours) => *ours,
                None => {
                    let ours = self.owned_by(&id, &upload, owner).await;
                    owned.insert(id.clone(), ours);
                    ours
                }
            };
            if ours {
                self.store.abort_upload(&upload).await?;
                aborted.push(upload);
            }
        }
        for (id, _) in owned.into_iter().filter(|(_, ours)| *ours) {
            // An upload still pending means the backup never got its manifest; checked all the
            // same, since a complete backup must never lose an object.
            if self.store.head(&id.key(MANIFEST)).await?.is_none() {
                self.discard(&id).await?;
            }
        }
        Ok(aborted)
    }

    /// Whether the backup that `upload` belongs to was started by `owner`; logs why not.
    async fn owned_by(&self, id: &BackupId, upload: &PendingUpload, owner: &OwnerId) -> bool {
        match self.recorded_owner(id).await {
            Ok(Some(recorded)) if recorded == owner.as_str() => true,
            Ok(Some(recorded)) => {
                tracing::info!(key = %upload.key, recorded_owner = ?recorded, owner = %owner, "leaving an incomplete upload of another owner in place; that agent may still be writing it");
                false
            }
            Ok(None) => {
                tracing::warn!(key = %upload.key, "leaving an incomplete upload in place: its backup records no owner (taken by an older agent, or one stopped before its first upload), so it may belong to another agent; abort it by hand once no agent writes it");
                false
            }
            Err(e) => {
                tracing::warn!(key = %upload.key, error = %e, "leaving an incomplete upload in place: its owner cannot be read");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;

    fn manifest(engine: Engine, kind: Kind, name: &str, started_second: u32) -> Manifest {
        let at = Utc
            .with_ymd_and_hms(2026, 11, 29, 14, 0, started_second)
            .unwrap();
        let mut m = Manifest::completed(
            BackupId::new(at, engine.id_engine(), name),
            engine,
            kind,
            Target {
                name: name.into(),
                server: "localhost".into(),
                server_version: "1".into(),
            },
            Tool {
                name: "tool".into(),
                version: "1".into(),
            },
            at,
        );
        m.completed_at = at + chrono::Duration::seconds(1);
        m
    }

    /// Found by the property test `manifests_the_agent_writes_it_reads_back`
    /// (agent/tests/properties.rs): serde_json's default float parser read this number one unit
    /// in the last place off what it had written, so a manifest's details (Qdrant collection
    /// configs hold floats) did not read back as written. Fixed with `float_roundtrip`.
    #[test]
    fn a_float_in_a_manifests_details_reads_back_exactly() {
        let m = manifest(Engine::Qdrant, Kind::QdrantCollections, "docs", 0)
            .with_details(serde_json::json!({ "a": 1.5471947613644907e-302, "b": 0.99 }));
        let json = serde_json::to_vec_pretty(&m).unwrap();
        assert_eq!(read_manifest(&m.id, &json).unwrap(), m);
    }

    #[test]
    fn manifests_are_read_with_checks() {
        let m = manifest(Engine::Postgres, Kind::Logical, "app", 0);
        let json = serde_json::to_vec(&m).unwrap();
        let other = manifest(Engine::Postgres, Kind::Logical, "other", 1);
        assert!(
            read_manifest(&other.id, &json)
                .unwrap_err()
                .to_string()
                .contains("it names backup")
        );
        let mut newer = m.clone();
        newer.manifest_version = MANIFEST_VERSION + 1;
        let err = read_manifest(&m.id, &serde_json::to_vec(&newer).unwrap()).unwrap_err();
        assert!(err.to_string().contains("upgrade the agent"), "{err}");
        assert_eq!(manifest_key_id(&m.id.key(MANIFEST)), Some(m.id.clone()));
        for key in [
            "backups/latest/manifest.json",
            "backupsX/manifest.json",
            "backups//manifest.json",
        ] {
            assert_eq!(manifest_key_id(key), None, "{key}");
        }
        assert_eq!(manifest_key_id(&format!("{}/", m.id.key(MANIFEST))), None);
    }

    #[test]
    fn latest_is_the_set_not_its_members_that_started_later() {
        let older = manifest(Engine::Postgres, Kind::Logical, "older", 0);
        let pg = manifest(Engine::Postgres, Kind::Logical, "app", 11);
        let qd = manifest(Engine::Qdrant, Kind::QdrantCollections, "all", 12);
        let set =
            manifest(Engine::Set, Kind::Set, "all", 10).with_members(&[pg.clone(), qd.clone()]);
        // Newest first, as `Catalog::list` returns them: both members are newer than the set.
        let chosen = latest(vec![qd, pg, set.clone(), older]).unwrap();
        assert_eq!(chosen.id, set.id);
    }

    #[test]
    fn latest_is_a_standalone_backup_newer_than_the_last_set() {
        let pg = manifest(Engine::Postgres, Kind::Logical, "app", 1);
        let set =
            manifest(Engine::Set, Kind::Set, "all", 0).with_members(std::slice::from_ref(&pg));
        let standalone = manifest(Engine::Qdrant, Kind::QdrantCollections, "docs", 5);
        let chosen = latest(vec![pg, standalone.clone(), set]).unwrap();
        assert_eq!(chosen.id, standalone.id);
    }

    #[test]
    fn latest_of_an_engine_includes_set_members() {
        let pg = manifest(Engine::Postgres, Kind::Logical, "app", 1);
        let q_old = manifest(Engine::Qdrant, Kind::QdrantCollections, "all", 0);
        let q_member = manifest(Engine::Qdrant, Kind::QdrantCollections, "all", 3);
        let set = manifest(Engine::Set, Kind::Set, "all", 2)
            .with_members(std::slice::from_ref(&q_member));
        let all = vec![pg.clone(), q_old, q_member.clone(), set];
        assert_eq!(
            latest_of(all.clone(), Engine::Qdrant).map(|m| m.id),
            Some(q_member.id)
        );
        assert_eq!(
            latest_of(all, Engine::Postgres).map(|m| m.id),
            Some(pg.id.clone())
        );
        assert!(latest_of(vec![pg], Engine::Qdrant).is_none());
    }

    #[tokio::test]
    async fn a_manifest_the_store_fails_to_take_publishes_no_backup() {
        use crate::store::faulty::{Fault, Faulty, Op};
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Store> = Arc::new(
            crate::store::local::LocalStore::open(dir.path().to_path_buf())
                .await
                .unwrap(),
        );
        let faulty = Faulty::new(local.clone()).inject(Op::Put, 1, Fault::Fail { retryable: true });
        let catalog = Catalog::new(Arc::new(faulty));
        let m = manifest(Engine::Postgres, Kind::Logical, "app", 1);
        let err = catalog.commit(&m).await.unwrap_err();
        assert!(err.to_string().contains("injected failure"), "{err}");
        assert!(catalog.list().await.unwrap().is_empty());
        // The same commit once the store takes it: the backup exists.
        catalog.commit(&m).await.unwrap();
        assert_eq!(catalog.list().await.unwrap()[0].id, m.id);
    }

    #[test]
    fn latest_of_nothing_is_none_and_a_member_without_its_set_counts() {
        assert!(latest(Vec::new()).is_none());
        // Members whose set was deleted are top-level again.
        let pg = manifest(Engine::Postgres, Kind::Logical, "app", 1);
        assert_eq!(latest(vec![pg.clone()]).unwrap().id, pg.id);
    }
}
