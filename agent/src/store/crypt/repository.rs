//! The repository id: 16 random bytes created with an encrypted store and bound into every object
//! sealed for it, so a backup copied in from another store that shares the key does not
//! authenticate as this store's own. A copy of the whole store (`aws s3 sync`, a `--restore-from`
//! of it) carries the id along and reads as the original does.
//!
//! The id lives at [`ID_KEY`], sealed with the key like every object (in the format before
//! binding, as it is what binds), with the time it was created: objects sealed before binding
//! existed are read only if the store says they were written before that time.
//!
//! Who creates it: the first agent that opens the store for writing and finds none. Two agents
//! creating the same fresh store at the same moment both write, and each then uses what it reads
//! back; the last write wins. S3 offers no create-if-absent that every server honours (Garage
//! does not), so the window is narrowed rather than closed: an agent that lost it would have its
//! first objects refused by name as sealed for another repository, never read as this one's.

use std::time::SystemTime;

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Crypt, FINGERPRINT, MAGIC, open::open_stream, seal::seal_all};
use crate::store::{Result, StoreError};

/// Where the repository id is kept, relative to the store's prefix.
pub const ID_KEY: &str = "repository.id";
/// Bytes of a repository id.
pub(super) const ID_LEN: usize = 16;
/// Largest repository id object read (it is a few dozen bytes): nothing read from the store
/// grows a buffer without bound.
const MAX_ID_OBJECT: usize = 4096;
/// Where manifests are, to refuse creating a new id over a store already bound to one.
const BACKUPS_PREFIX: &str = "backups/";

/// A repository id: safe to print (it is no secret; it names the store's lineage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepositoryId(pub(super) [u8; ID_LEN]);

impl std::fmt::Display for RepositoryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The repository an encrypted store belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repository {
    /// Bound into every object sealed for it.
    pub id: RepositoryId,
    /// When the id was created: objects sealed before binding and stored after it are refused.
    pub created: SystemTime,
}

/// What [`ID_KEY`] holds, before sealing.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    created: DateTime<Utc>,
}

fn unusable(reason: impl Into<String>) -> StoreError {
    StoreError::Repository {
        key: ID_KEY.to_string(),
        reason: reason.into(),
    }
}

/// A time as errors and `status` print it.
pub(super) fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Crypt {
    /// This store's repository, read once and then kept; `create` (writers) makes one when the
    /// store has none, and re-seals it with the current key after a rotation. `None`: the store
    /// has no repository id and the caller only reads.
    pub async fn repository(&self, create: bool) -> Result<Option<Repository>> {
        if let Some(r) = self.repo.known.get() {
            return Ok(Some(*r));
        }
        let mut looked = self.repo.looked.lock().await;
        if let Some(r) = self.repo.known.get() {
            return Ok(Some(*r));
        }
        if *looked && !create {
            return Ok(None);
        }
        let found = self.load(create).await?;
        *looked = true;
        let repository = match found {
            Some(r) => r,
            None if !create => return Ok(None),
            None => self.create().await?,
        };
        tracing::info!(repository = %repository.id, created = %rfc3339(repository.created), "store repository");
        Ok(Some(*self.repo.known.get_or_init(|| repository)))
    }

    /// Reads [`ID_KEY`]; `reseal`: rewrites it under the current key when another sealed it.
    async fn load(&self, reseal: bool) -> Result<Option<Repository>> {
        let Some(keyring) = &self.keyring else {
            return Ok(None);
        };
        let raw = match self.inner.get(ID_KEY).await {
            Ok(stream) => read_bounded(stream).await?,
            Err(StoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let fingerprint = raw
            .get(MAGIC.len()..MAGIC.len() + FINGERPRINT)
            .map(<[u8]>::to_vec);
        let opened = read_bounded(open_stream(
            Box::pin(futures::stream::once(async move { Ok(raw) })),
            ID_KEY.to_string(),
            self.clone(),
            true,
        ))
        .await?;
        let record: Record = serde_json::from_slice(&opened)
            .map_err(|e| unusable(format!("it is not a repository record: {e}")))?;
        let id: [u8; ID_LEN] = hex::decode(&record.id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| unusable("its id is not 32 hex digits"))?;
        let repository = Repository {
            id: RepositoryId(id),
            created: record.created.into(),
        };
        if reseal && fingerprint.as_deref() != Some(&keyring.current().fingerprint[..]) {
            self.store_record(&repository).await?;
            tracing::info!(repository = %repository.id, "repository id re-sealed with the current key");
        }
        Ok(Some(repository))
    }

    /// Makes a repository id for a store that has none, and returns what the store then holds.
    async fn create(&self) -> Result<Repository> {
        self.refuse_if_bound().await?;
        let mut id = [0u8; ID_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut id);
        let repository = Repository {
            id: RepositoryId(id),
            created: SystemTime::now(),
        };
        self.store_record(&repository).await?;
        // Another agent may have created one at the same moment: the store's copy is the one.
        let stored = self
            .load(false)
            .await?
            .ok_or_else(|| unusable("it vanished just after it was written"))?;
        if stored.id != repository.id {
            tracing::warn!(ours = %repository.id, theirs = %stored.id, "another agent created the store's repository id at the same moment; using the stored one");
        }
        Ok(stored)
    }

    async fn store_record(&self, repository: &Repository) -> Result<()> {
        let keyring = self
            .keyring
            .as_ref()
            .ok_or_else(|| unusable("this agent has no key"))?;
        let record = Record {
            id: repository.id.to_string(),
            created: repository.created.into(),
        };
        let json = serde_json::to_vec(&record).map_err(|e| unusable(e.to_string()))?;
        let sealed = seal_all(keyring.current(), ID_KEY, None, &json)?;
        self.inner.put(ID_KEY, sealed).await
    }

    /// A store holding a manifest already bound to a repository lost its id object: a new id
    /// would make every backup in it unreadable, so nothing is created. Every manifest is looked
    /// at (its first bytes, newest first, stopping at the first bound one), not only the newest,
    /// which someone who can write the bucket could plant unbound; this runs once per store.
    async fn refuse_if_bound(&self) -> Result<()> {
        let listing = self.inner.list(BACKUPS_PREFIX).await?;
        for manifest in listing
            .iter()
            .rev()
            .filter(|o| o.key.ends_with("/manifest.json"))
        {
            let mut stream = match self.inner.get(&manifest.key).await {
                Ok(s) => s,
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            };
            let mut head = Vec::new();
            while head.len() < MAGIC.len() {
                match stream.next().await {
                    Some(chunk) => head.extend_from_slice(&chunk?),
                    None => break,
                }
            }
            if head.starts_with(MAGIC) {
                return Err(unusable(format!(
                    "it is missing, but {} is sealed for a repository: the id was deleted; restore {ID_KEY} from a copy of the store or an earlier version of the bucket (a new id would make every backup here unreadable)",
                    manifest.key
                )));
            }
        }
        Ok(())
    }
}

/// All of a small object, refused when it is larger than [`MAX_ID_OBJECT`].
async fn read_bounded(mut stream: crate::store::ByteStream) -> Result<Bytes> {
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if out.len() + chunk.len() > MAX_ID_OBJECT {
            return Err(unusable(format!("it is larger than {MAX_ID_OBJECT} bytes")));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}
