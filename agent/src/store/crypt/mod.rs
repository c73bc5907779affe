//! Encryption at rest: every object this agent writes — dumps, base backups, WAL, Qdrant
//! snapshots, manifests and every record beside them — is encrypted and authenticated here, and
//! only here, so no code path can write or read plaintext by forgetting to.
//!
//! Why at the store seam: anyone who can write to the bucket could otherwise forge a backup that
//! passes every check, because the digests sit next to the data. With a key, an object is accepted
//! only if it was sealed with that key *for that very object key*, so a flipped byte, a truncated
//! object, an object swapped in from another backup or another WAL segment, and a manifest with
//! any field edited (or rewritten with digests recomputed to match forged data) all fail
//! authentication before their bytes are handed on.
//!
//! Format of one object (all sizes in bytes):
//!
//! ```text
//! header  "SOMAENC2" | key fingerprint (8) | repository id (16) | wrap nonce (12) | wrapped data key (32 + 16) | stream nonce (7)
//! body    chunks of 64 KiB + 16 (tag), the last one shorter (0..64 KiB of data + 16)
//! ```
//!
//! Each object gets a fresh random 256-bit data key (so every backup, and every object in it, has
//! its own), wrapped with AES-256-GCM by the configured key; the wrap's associated data is the
//! magic, the fingerprint, the repository id and the object key, which binds the object to its
//! name and to its store's repository (see [`repository`]): a whole backup copied from another
//! store that shares the key authenticates, but as that store's, and is refused. The body is
//! the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár; `aead::stream::StreamBE32` from
//! RustCrypto) over AES-256-GCM with the data key: every chunk is authenticated on its own, in
//! order, and the last one carries a flag, so a reordered, dropped or truncated chunk fails. The
//! whole header is each chunk's associated data. Memory stays bounded: one chunk at a time on the
//! way back, one part at a time on the way out, nothing staged.
//!
//! Objects sealed before repositories existed ("SOMAENC1", no repository id) are read only when
//! the store says they were written before its repository id was created; plaintext objects
//! only under `--accept-unencrypted <TIME>`, when the store says they were written before TIME.
//! Which time: the store's own (S3 `LastModified`, which a bucket writer cannot set; a file's
//! mtime for a local directory), never a manifest's, which a bucket writer can write.
//!
//! Rotation: several keys may be configured; the first encrypts, every one decrypts, picked by
//! the fingerprint in the header. A 96-bit random wrap nonce per object stays safe for far more
//! objects than a store ever holds under one key (2^32).

mod key;
mod open;
pub mod repository;
mod seal;

pub use key::{Key, KeyError, Keyring};
pub use repository::{Repository, RepositoryId};

use std::{
    fmt,
    sync::{Arc, OnceLock},
    time::SystemTime,
};

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    ByteStream, ObjectMeta, PendingUpload, Result, Store, StoreError, TimedObject, Upload,
};
use open::open_stream;
use seal::{SealedUpload, seal_all, seal_header};

/// First bytes of every encrypted object, bound to its repository.
pub const MAGIC: &[u8; 8] = b"SOMAENC2";
/// First bytes of an object sealed before repository binding (and of the repository id itself).
pub const LEGACY_MAGIC: &[u8; 8] = b"SOMAENC1";
/// Plaintext bytes per STREAM chunk.
pub const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
const FINGERPRINT: usize = 8;
const WRAP_NONCE: usize = 12;
const WRAPPED_KEY: usize = 32 + TAG;
const STREAM_NONCE: usize = 7;
/// Size of the header in front of every encrypted object.
pub const HEADER: usize =
    MAGIC.len() + FINGERPRINT + repository::ID_LEN + WRAP_NONCE + WRAPPED_KEY + STREAM_NONCE;
/// Size of the header of an object sealed before repository binding.
const LEGACY_HEADER: usize = HEADER - repository::ID_LEN;
const SEALED_CHUNK: usize = CHUNK + TAG;

/// The name of the algorithm, as manifests and `status` report it.
pub const ALGORITHM: &str = "aes-256-gcm-stream-be32";

/// What a store does with encryption, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encryption {
    /// Objects are written and read as they are.
    Off,
    /// Objects are encrypted with the first key; `fingerprints` lists all.
    On {
        /// Fingerprints of the keys, the encrypting one first.
        fingerprints: Vec<String>,
        /// Unencrypted objects written before this time are still read (`--accept-unencrypted`).
        accept_unencrypted: Option<SystemTime>,
        /// The store's repository id, once known.
        repository: Option<RepositoryId>,
        /// The key files, for a `wal-fetch` started by PostgreSQL to read the same store.
        key_files: Vec<std::path::PathBuf>,
    },
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encryption::Off => f.write_str("off"),
            Encryption::On {
                fingerprints,
                accept_unencrypted,
                repository,
                ..
            } => {
                write!(f, "{ALGORITHM}, key {}", fingerprints[0])?;
                if fingerprints.len() > 1 {
                    write!(f, " (also decrypts {})", fingerprints[1..].join(", "))?;
                }
                if let Some(id) = repository {
                    write!(f, ", repository {id}")?;
                }
                if let Some(cutoff) = accept_unencrypted {
                    write!(
                        f,
                        "; unencrypted objects written before {} accepted",
                        repository::rfc3339(*cutoff)
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// The store seen through encryption: wraps every store the agent opens. Without a keyring it
/// writes plaintext and refuses to hand out an encrypted object as if it were plaintext; with
/// one it seals every write and opens every read, refusing plaintext unless told otherwise.
#[derive(Debug, Clone)]
pub struct Crypt {
    inner: Arc<dyn Store>,
    keyring: Option<Arc<Keyring>>,
    accept_unencrypted: Option<SystemTime>,
    repo: Arc<RepositoryState>,
}

/// The repository id, looked up once per agent (clones share it).
#[derive(Debug, Default)]
struct RepositoryState {
    known: OnceLock<Repository>,
    /// Whether the store was found to have none (then readers stop asking).
    looked: tokio::sync::Mutex<bool>,
}

/// What the first bytes of an object say it is, once its header (if any) authenticated.
#[derive(Debug, Clone, Copy)]
pub(super) enum Found {
    Plain,
    Legacy,
    Bound(RepositoryId),
}

impl Crypt {
    /// `inner` through `keyring` (none: plaintext). `accept_unencrypted` lets a keyed agent still
    /// read unencrypted objects the store says were written before that time: backups taken
    /// before encryption was turned on.
    pub fn new(
        inner: Arc<dyn Store>,
        keyring: Option<Keyring>,
        accept_unencrypted: Option<SystemTime>,
    ) -> Self {
        Self {
            inner,
            keyring: keyring.map(Arc::new),
            accept_unencrypted,
            repo: Arc::default(),
        }
    }

    /// The repository new objects are sealed for (created with the store's first write).
    async fn sealing_for(&self) -> Result<RepositoryId> {
        self.repository(true)
            .await?
            .map(|r| r.id)
            .ok_or_else(|| StoreError::Repository {
                key: repository::ID_KEY.to_string(),
                reason: "it could not be created".into(),
            })
    }

    /// When the store says `key` was written: its own clock, which nobody who merely writes
    /// objects can set on S3. Asked after the object's bytes were requested, so an object
    /// replaced in between shows the newer time.
    async fn stored_at(&self, key: &str) -> Result<Option<SystemTime>> {
        Ok(self
            .inner
            .list_timed(key)
            .await?
            .into_iter()
            .find(|t| t.meta.key == key)
            .and_then(|t| t.modified))
    }

    /// Whether the object `key`, found to be `found`, may be handed out. `root`: the repository
    /// id object itself, which is sealed before binding by design.
    pub(super) async fn admit(&self, key: &str, found: Found, root: bool) -> Result<()> {
        match found {
            Found::Plain => {
                if self.keyring.is_none() {
                    return Ok(());
                }
                let Some(cutoff) = self.accept_unencrypted else {
                    return Err(StoreError::NotEncrypted {
                        key: key.to_string(),
                    });
                };
                match self.stored_at(key).await? {
                    Some(at) if at < cutoff => Ok(()),
                    at => Err(StoreError::UnencryptedAfterCutoff {
                        key: key.to_string(),
                        written: at
                            .map_or_else(
                                || "at a time the store does not say".into(),
                                |t| format!("at {}", repository::rfc3339(t)),
                            )
                            .into(),
                        cutoff: repository::rfc3339(cutoff).into(),
                    }),
                }
            }
            Found::Legacy if root => Ok(()),
            Found::Legacy => {
                let Some(repo) = self.repository(false).await? else {
                    // A store no agent of this version has written to: nothing to bind to.
                    return Ok(());
                };
                match self.stored_at(key).await? {
                    Some(at) if at < repo.created => Ok(()),
                    at => Err(StoreError::Unbound {
                        key: key.to_string(),
                        stored: at
                            .map_or_else(|| "an unknown time".into(), repository::rfc3339)
                            .into(),
                        repository: format!(
                            "{} at {}",
                            repo.id,
                            repository::rfc3339(repo.created)
                        )
                        .into(),
                    }),
                }
            }
            Found::Bound(_) if root => Err(tampered(
                key,
                "the repository id is sealed for a repository itself",
            )),
            Found::Bound(id) => match self.repository(false).await? {
                Some(repo) if repo.id == id => Ok(()),
                this => Err(StoreError::ForeignRepository {
                    key: key.to_string(),
                    found: id.to_string().into(),
                    this: match this {
                        Some(repo) => repo.id.to_string(),
                        None => format!(
                            "unknown: its {} is missing (restore it from a copy of the store or an earlier version of the bucket)",
                            repository::ID_KEY
                        ),
                    }
                    .into(),
                }),
            },
        }
    }

    fn plaintext_size(&self, stored: u64) -> u64 {
        match &self.keyring {
            Some(_) => plaintext_len(stored).unwrap_or(stored),
            None => stored,
        }
    }
}

/// The plaintext size of a well-formed encrypted object of `stored` bytes.
pub fn plaintext_len(stored: u64) -> Option<u64> {
    let body = stored.checked_sub(HEADER as u64)?;
    let full = body / SEALED_CHUNK as u64;
    let last = body % SEALED_CHUNK as u64;
    let last_data = last.checked_sub(TAG as u64)?;
    Some(full * CHUNK as u64 + last_data)
}

/// The stored size of `plain` bytes, encrypted.
pub fn sealed_len(plain: u64) -> u64 {
    HEADER as u64 + plain / CHUNK as u64 * SEALED_CHUNK as u64 + plain % CHUNK as u64 + TAG as u64
}

/// Why an object was refused: it does not authenticate.
fn tampered(key: &str, why: &str) -> StoreError {
    StoreError::Tampered {
        key: key.to_string(),
        reason: why.to_string(),
    }
}

/// The wrap's associated data: the magic, the key's fingerprint, the repository id and the
/// object's name, which binds a sealed object to the name it was written under and to the
/// repository it was written for. Without a repository: the format before binding.
fn wrap_aad(fingerprint: &[u8], repository: Option<&RepositoryId>, key: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(HEADER + key.len());
    match repository {
        Some(id) => {
            aad.extend_from_slice(MAGIC);
            aad.extend_from_slice(fingerprint);
            aad.extend_from_slice(&id.0);
        }
        None => {
            aad.extend_from_slice(LEGACY_MAGIC);
            aad.extend_from_slice(fingerprint);
        }
    }
    aad.extend_from_slice(key.as_bytes());
    aad
}

#[async_trait]
impl Store for Crypt {
    fn location(&self) -> String {
        self.inner.location()
    }

    fn health(&self) -> Option<super::StoreHealth> {
        self.inner.health()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn encryption(&self) -> Encryption {
        match &self.keyring {
            None => Encryption::Off,
            Some(k) => Encryption::On {
                fingerprints: k.fingerprints(),
                accept_unencrypted: self.accept_unencrypted,
                repository: self.repo.known.get().map(|r| r.id),
                key_files: k.files.clone(),
            },
        }
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<()> {
        match &self.keyring {
            None => self.inner.put(key, data).await,
            Some(k) => {
                let repository = self.sealing_for().await?;
                let sealed = seal_all(k.current(), key, Some(&repository), &data)?;
                self.inner.put(key, sealed).await
            }
        }
    }

    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>> {
        let repository = match &self.keyring {
            Some(_) => Some(self.sealing_for().await?),
            None => None,
        };
        let upload = self.inner.start_upload(key).await?;
        match (&self.keyring, repository) {
            (Some(k), Some(repository)) => {
                let (header, enc) = seal_header(k.current(), key, Some(&repository))?;
                Ok(Box::new(SealedUpload::new(upload, key, header, enc)))
            }
            _ => Ok(upload),
        }
    }

    async fn get(&self, key: &str) -> Result<ByteStream> {
        let stream = self.inner.get(key).await?;
        Ok(open_stream(stream, key.to_string(), self.clone(), false))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        Ok(self.inner.head(key).await?.map(|mut m| {
            m.size = self.plaintext_size(m.size);
            m
        }))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut all = self.inner.list(prefix).await?;
        for m in &mut all {
            m.size = self.plaintext_size(m.size);
        }
        Ok(all)
    }

    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        let mut all = self.inner.list_timed(prefix).await?;
        for t in &mut all {
            t.meta.size = self.plaintext_size(t.meta.size);
        }
        Ok(all)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.inner.delete(key).await
    }

    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>> {
        self.inner.list_uploads(prefix).await
    }

    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()> {
        self.inner.abort_upload(upload).await
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::store::{MIN_PART_SIZE, local::LocalStore};

    fn key(n: u8) -> Key {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = n.wrapping_mul(31).wrapping_add(i as u8);
        }
        Key::from_bytes(&b)
    }

    async fn stores(keys: Vec<Key>) -> (tempfile::TempDir, Arc<dyn Store>, Crypt) {
        let dir = tempfile::tempdir().unwrap();
        let raw: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path().into()).await.unwrap());
        let crypt = Crypt::new(raw.clone(), Keyring::new(keys), None);
        (dir, raw, crypt)
    }

    async fn read(store: &dyn Store, key: &str) -> Result<Vec<u8>> {
        let mut s = store.get(key).await?;
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    /// Returns once the wall clock is well past `t`: file times come from the kernel's coarse
    /// clock, which may lag the one `SystemTime::now` reads by a tick.
    async fn wait_past(t: SystemTime) {
        let past = t + std::time::Duration::from_millis(30);
        for _ in 0..1000 {
            if SystemTime::now() > past {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        panic!("the clock did not pass {t:?}");
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn round_trips_objects_of_every_length_and_seals_them() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let k = format!("a/{n}");
            let plain = data(n);
            crypt.put(&k, Bytes::from(plain.clone())).await.unwrap();
            assert_eq!(read(&crypt, &k).await.unwrap(), plain, "length {n}");
            let stored = read(raw.as_ref(), &k).await.unwrap();
            assert_eq!(stored.len() as u64, sealed_len(n as u64));
            assert_eq!(&stored[..8], MAGIC);
            assert_eq!(plaintext_len(stored.len() as u64), Some(n as u64));
            assert_eq!(crypt.head(&k).await.unwrap().unwrap().size, n as u64);
        }
    }

    #[tokio::test]
    async fn multipart_uploads_round_trip_whatever_the_last_part() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        // Last part short; last part full-size (the final chunk becomes an extra part).
        for sizes in [
            vec![MIN_PART_SIZE, 1000],
            vec![MIN_PART_SIZE, MIN_PART_SIZE],
            vec![0],
        ] {
            let k = format!("m/{}", sizes.len() * 10 + sizes[sizes.len() - 1] % 7);
            let mut up = crypt.start_upload(&k).await.unwrap();
            let mut plain = Vec::new();
            let mut receipts = Vec::new();
            for (i, s) in sizes.iter().enumerate() {
                let part = data(*s + i);
                let part = if *s == 0 {
                    Vec::new()
                } else {
                    part[..*s].to_vec()
                };
                plain.extend_from_slice(&part);
                receipts.push(up.put_part(Bytes::from(part)).await.unwrap());
            }
            let meta = up.complete(receipts).await.unwrap();
            assert_eq!(meta.size, plain.len() as u64);
            assert_eq!(read(&crypt, &k).await.unwrap(), plain);
            assert!(read(raw.as_ref(), &k).await.unwrap().len() > plain.len());
        }
    }

    #[tokio::test]
    async fn refuses_every_tampering_before_handing_out_its_bytes() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        let plain = data(3 * CHUNK + 5);
        crypt.put("x/a", Bytes::from(plain.clone())).await.unwrap();
        crypt.put("x/b", Bytes::from(plain.clone())).await.unwrap();
        let sealed = read(raw.as_ref(), "x/a").await.unwrap();

        let check = |what: &str, bytes: Vec<u8>| {
            let raw = raw.clone();
            let crypt = crypt.clone();
            let what = what.to_string();
            async move {
                raw.put("x/a", Bytes::from(bytes)).await.unwrap();
                let err = read(&crypt, "x/a").await.expect_err(&what);
                // A flipped fingerprint names a key nobody has: refused all the same.
                assert!(
                    matches!(
                        err,
                        StoreError::Tampered { .. } | StoreError::WrongKey { .. }
                    ),
                    "{what}: {err}"
                );
            }
        };
        for at in [
            9,
            MAGIC.len() + FINGERPRINT + 3,
            HEADER - 1,
            HEADER + 5,
            HEADER + SEALED_CHUNK + 3,
            sealed.len() - 1,
        ] {
            let mut b = sealed.clone();
            b[at] ^= 1;
            check(&format!("flipped byte {at}"), b).await;
        }
        check(
            "truncated at a chunk boundary",
            sealed[..HEADER + SEALED_CHUNK].to_vec(),
        )
        .await;
        check("truncated mid-chunk", sealed[..sealed.len() - 3].to_vec()).await;
        check("truncated in the header", sealed[..20].to_vec()).await;
        let mut extended = sealed.clone();
        extended.extend_from_slice(&sealed[HEADER..HEADER + SEALED_CHUNK]);
        check("a chunk appended", extended).await;
        let mut swapped = sealed.clone();
        let (one, two) = (
            HEADER..HEADER + SEALED_CHUNK,
            HEADER + SEALED_CHUNK..HEADER + 2 * SEALED_CHUNK,
        );
        swapped[one.clone()].copy_from_slice(&sealed[two.clone()]);
        swapped[two].copy_from_slice(&sealed[one]);
        check("two chunks swapped", swapped).await;
        // Another object's bytes, sealed with the same key, moved to this name.
        check(
            "object from another key",
            read(raw.as_ref(), "x/b").await.unwrap(),
        )
        .await;
        // Plaintext planted by someone with write access to the bucket.
        raw.put("x/a", Bytes::from(plain)).await.unwrap();
        let err = read(&crypt, "x/a").await.unwrap_err();
        assert!(matches!(err, StoreError::NotEncrypted { .. }), "{err}");
        // The advice names the flag where the configuration is known, not in the store.
        let shown = crate::error::render(&err);
        assert!(shown.contains("--accept-unencrypted"), "{shown}");
    }

    #[tokio::test]
    async fn rotation_reads_old_keys_and_names_a_missing_one() {
        let (_d, raw, old) = stores(vec![key(1)]).await;
        old.put("k", Bytes::from_static(b"hello")).await.unwrap();
        let rotated = Crypt::new(raw.clone(), Keyring::new(vec![key(2), key(1)]), None);
        assert_eq!(read(&rotated, "k").await.unwrap(), b"hello");
        rotated.put("k2", Bytes::from_static(b"new")).await.unwrap();
        let err = crate::error::render(&read(&old, "k2").await.unwrap_err());
        assert!(err.contains(&key(2).fingerprint()), "{err}");
        assert!(err.contains("--encryption-key-file"), "{err}");
        let plain = Crypt::new(raw.clone(), None, None);
        let err = read(&plain, "k").await.unwrap_err().to_string();
        assert!(err.contains(&key(1).fingerprint()), "{err}");
        // Plaintext stores keep working without a key, and a keyed agent may read them when told.
        raw.put("p", Bytes::from_static(b"plain")).await.unwrap();
        assert_eq!(read(&plain, "p").await.unwrap(), b"plain");
        let cutoff = SystemTime::now() + std::time::Duration::from_secs(1);
        let migrating = Crypt::new(raw.clone(), Keyring::new(vec![key(1)]), Some(cutoff));
        assert_eq!(read(&migrating, "p").await.unwrap(), b"plain");
        // The repository id was sealed with the old key; a writer with the new one first
        // re-seals it, so the old key can go once no backup needs it.
        let writer = Crypt::new(raw.clone(), Keyring::new(vec![key(2), key(1)]), None);
        writer.repository(true).await.unwrap();
        let only_new = Crypt::new(raw, Keyring::new(vec![key(2)]), None);
        assert_eq!(read(&only_new, "k2").await.unwrap(), b"new");
    }

    #[tokio::test]
    async fn unencrypted_objects_are_read_only_when_written_before_the_cutoff() {
        let (_d, raw, _) = stores(vec![key(1)]).await;
        raw.put("old", Bytes::from_static(b"before")).await.unwrap();
        let cutoff = SystemTime::now() + std::time::Duration::from_millis(50);
        let migrating = Crypt::new(raw.clone(), Keyring::new(vec![key(1)]), Some(cutoff));
        assert_eq!(read(&migrating, "old").await.unwrap(), b"before");
        // Planted after the cut-off: the store's clock says so.
        wait_past(cutoff).await;
        raw.put("planted", Bytes::from_static(b"after"))
            .await
            .unwrap();
        let err = read(&migrating, "planted").await.unwrap_err();
        assert!(
            matches!(err, StoreError::UnencryptedAfterCutoff { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("planted") && msg.contains(&repository::rfc3339(cutoff)),
            "{msg}"
        );
        // Without a cut-off nothing unencrypted is read.
        let strict = Crypt::new(raw, Keyring::new(vec![key(1)]), None);
        let err = read(&strict, "old").await.unwrap_err();
        assert!(matches!(err, StoreError::NotEncrypted { .. }), "{err}");
    }

    /// A copy of a whole directory store, as `aws s3 sync` copies a bucket.
    fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                std::fs::create_dir_all(&target).unwrap();
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn objects_copied_from_another_repository_with_the_same_key_are_refused() {
        let (dir_a, raw_a, a) = stores(vec![key(1)]).await;
        let (_dir_b, raw_b, b) = stores(vec![key(1)]).await;
        a.put("backups/x/manifest.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        b.put("backups/y/manifest.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let id_a = a.repository(false).await.unwrap().unwrap().id;
        let id_b = b.repository(false).await.unwrap().unwrap().id;
        assert_ne!(id_a, id_b, "each store has an id of its own");
        let copied = read(raw_a.as_ref(), "backups/x/manifest.json")
            .await
            .unwrap();
        raw_b
            .put("backups/x/manifest.json", Bytes::from(copied))
            .await
            .unwrap();
        let err = read(&b, "backups/x/manifest.json").await.unwrap_err();
        assert!(matches!(err, StoreError::ForeignRepository { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&id_a.to_string()) && msg.contains(&id_b.to_string()),
            "{msg}"
        );
        // A swapped id field does not authenticate.
        let mut forged = read(raw_a.as_ref(), "backups/x/manifest.json")
            .await
            .unwrap();
        forged[MAGIC.len() + FINGERPRINT..MAGIC.len() + FINGERPRINT + repository::ID_LEN]
            .copy_from_slice(&id_b.0);
        raw_b
            .put("backups/x/manifest.json", Bytes::from(forged))
            .await
            .unwrap();
        let err = read(&b, "backups/x/manifest.json").await.unwrap_err();
        assert!(matches!(err, StoreError::Tampered { .. }), "{err}");

        // A copy of the whole store keeps its id and reads, and new writes there stay bound to it.
        let dir_c = tempfile::tempdir().unwrap();
        copy_tree(dir_a.path(), dir_c.path());
        let raw_c: Arc<dyn Store> = Arc::new(LocalStore::open(dir_c.path().into()).await.unwrap());
        let c = Crypt::new(raw_c, Keyring::new(vec![key(1)]), None);
        assert_eq!(read(&c, "backups/x/manifest.json").await.unwrap(), b"{}");
        assert_eq!(c.repository(true).await.unwrap().unwrap().id, id_a);
    }

    #[tokio::test]
    async fn objects_sealed_before_binding_are_read_only_if_stored_before_the_id_existed() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        // An agent of the previous version wrote this store.
        let old = seal_all(&key(1), "backups/old/manifest.json", None, b"old").unwrap();
        raw.put("backups/old/manifest.json", old).await.unwrap();
        assert_eq!(
            read(&crypt, "backups/old/manifest.json").await.unwrap(),
            b"old",
            "a store with no repository id reads as before"
        );
        let writer = Crypt::new(raw.clone(), Keyring::new(vec![key(1)]), None);
        let repo = writer.repository(true).await.unwrap().unwrap();
        let reader = Crypt::new(raw.clone(), Keyring::new(vec![key(1)]), None);
        assert_eq!(
            read(&reader, "backups/old/manifest.json").await.unwrap(),
            b"old"
        );
        // The same kind of object, copied in after the id was created.
        wait_past(repo.created).await;
        let copied = seal_all(&key(1), "backups/new/manifest.json", None, b"new").unwrap();
        raw.put("backups/new/manifest.json", copied).await.unwrap();
        let err = read(&reader, "backups/new/manifest.json")
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unbound { .. }), "{err}");
        assert!(err.to_string().contains(&repo.id.to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_lost_repository_id_is_never_replaced_by_a_new_one() {
        let (_d, raw, crypt) = stores(vec![key(1)]).await;
        crypt
            .put("backups/a/manifest.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let id = crypt.repository(false).await.unwrap().unwrap().id;
        let mut id_object = read(raw.as_ref(), repository::ID_KEY).await.unwrap();
        raw.delete(repository::ID_KEY).await.unwrap();
        // A newer, unbound manifest planted in front of it changes nothing.
        raw.put("backups/z/manifest.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let fresh = Crypt::new(raw.clone(), Keyring::new(vec![key(1)]), None);
        let err = fresh.repository(true).await.unwrap_err().to_string();
        assert!(
            err.contains("restore repository.id") && err.contains("backups/a/manifest.json"),
            "{err}"
        );
        let err = read(&fresh, "backups/a/manifest.json").await.unwrap_err();
        assert!(matches!(err, StoreError::ForeignRepository { .. }), "{err}");
        assert!(raw.head(repository::ID_KEY).await.unwrap().is_none());
        // A forged id object (plaintext, or another byte) is refused, not trusted.
        raw.put(
            repository::ID_KEY,
            Bytes::from(format!(
                r#"{{"id":"{id}","created":"2020-01-01T00:00:00Z"}}"#
            )),
        )
        .await
        .unwrap();
        let forged = Crypt::new(raw.clone(), Keyring::new(vec![key(1)]), None);
        assert!(forged.repository(false).await.is_err());
        let last = id_object.len() - 1;
        id_object[last] ^= 1;
        raw.put(repository::ID_KEY, Bytes::from(id_object))
            .await
            .unwrap();
        let flipped = Crypt::new(raw, Keyring::new(vec![key(1)]), None);
        let err = flipped.repository(false).await.unwrap_err();
        assert!(matches!(err, StoreError::Tampered { .. }), "{err}");
    }

    #[test]
    fn reads_key_files_raw_hex_and_base64_and_refuses_the_rest() {
        use base64::Engine as _;
        let dir = tempfile::tempdir().unwrap();
        let bytes: [u8; 32] = data(32).try_into().unwrap();
        let write = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            p
        };
        let fp = Key::from_bytes(&bytes).fingerprint();
        for p in [
            write("raw", &bytes),
            write("hex", format!("{}\n", hex::encode(bytes)).as_bytes()),
            write(
                "b64",
                base64::engine::general_purpose::STANDARD
                    .encode(bytes)
                    .as_bytes(),
            ),
            // What `openssl rand -base64 32 > key` writes.
            write(
                "b64-newline",
                format!(
                    "{}\n",
                    base64::engine::general_purpose::STANDARD.encode(bytes)
                )
                .as_bytes(),
            ),
        ] {
            assert_eq!(Key::from_file(&p).unwrap().fingerprint(), fp);
        }
        for (name, content) in [
            ("short", &b"0123456789"[..]),
            ("zeros", &[0u8; 32][..]),
            ("text", &b"correct horse battery staple"[..]),
            // 32 characters: once taken as 32 raw bytes, a key of far less than 256 bits.
            ("passphrase", &b"correct horse battery staple 123"[..]),
            (
                "passphrase-newline",
                &b"correct horse battery staple 12\n"[..],
            ),
            ("alnum-newline", &b"abcdefghijklmnopqrstuvwxyzABCDEF\n"[..]),
            ("hex-short", &b"00112233445566778899aabbccddeeff\n"[..]),
        ] {
            let err = Key::from_file(&write(name, content))
                .unwrap_err()
                .to_string();
            assert!(err.contains("32 random bytes"), "{err}");
            assert!(
                err.contains(name) && err.contains("openssl rand -base64 32"),
                "the error names the file and how to make a key: {err}"
            );
            assert!(
                !err.contains("horse"),
                "a key file's contents never reach an error: {err}"
            );
        }
        let raw = write("raw2", &bytes);
        let err = Keyring::from_files(&[raw.clone(), raw]).unwrap_err();
        assert!(matches!(err, KeyError::Duplicate { .. }));
    }

    /// An inner stream that panics when polled after its end, as the S3 body stream does.
    fn unfused(data: Vec<u8>, piece: usize) -> ByteStream {
        let pieces: Vec<Bytes> = data
            .chunks(piece.max(1))
            .map(Bytes::copy_from_slice)
            .collect();
        Box::pin(futures::stream::unfold(
            pieces.into_iter(),
            |mut it| async move { it.next().map(|b| (Ok(b), it)) },
        ))
    }

    async fn drain(mut s: ByteStream) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(out)
    }

    #[tokio::test]
    async fn never_polls_an_ended_inner_stream() {
        let plain = data(3 * CHUNK + 9);
        let (_d, raw, keyed) = stores(vec![key(1)]).await;
        let id = keyed.repository(true).await.unwrap().unwrap().id;
        let sealed = seal_all(&key(1), "k", Some(&id), &plain).unwrap().to_vec();
        let unkeyed = Crypt::new(raw, None, None);
        for piece in [1, 7, 4096, CHUNK + 3, 1 << 20] {
            let out = drain(open_stream(
                unfused(sealed.clone(), piece),
                "k".into(),
                keyed.clone(),
                false,
            ));
            assert_eq!(out.await.unwrap(), plain, "sealed, pieces of {piece}");
            for small in [Vec::new(), b"abc".to_vec(), plain.clone()] {
                let out = drain(open_stream(
                    unfused(small.clone(), piece),
                    "k".into(),
                    unkeyed.clone(),
                    false,
                ));
                assert_eq!(out.await.unwrap(), small, "plain, pieces of {piece}");
            }
        }
    }

    #[test]
    fn sizes_invert() {
        for n in [0u64, 1, 65535, 65536, 65537, 10 << 20] {
            assert_eq!(plaintext_len(sealed_len(n)), Some(n));
        }
        assert_eq!(plaintext_len(3), None);
    }
}
