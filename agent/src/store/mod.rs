//! Where backup bytes live: object storage (S3) or a local directory that behaves like it.
//!
//! Every caller sees the same semantics whichever backend is configured:
//! - an object becomes visible only when it is complete (`put`, or `complete` of a multipart upload);
//!   a crash before that leaves at most an *incomplete upload*, which `list` never shows and
//!   `list_uploads` / `abort_upload` can find and remove;
//! - keys are relative to the store's prefix and use `/` as separator; `..`, empty and absolute
//!   components are refused so no key can escape the prefix.

pub mod crypt;
#[cfg(test)]
pub(crate) mod faulty;
mod key;
pub mod local;
pub mod read_only;
pub mod retry;
pub mod s3;

pub use crypt::{Crypt, Encryption, Keyring};
pub use key::Key;
pub use read_only::ReadOnly;
pub use retry::{Condition, HealthReport, RetryPolicy, StoreHealth};

use std::{fmt, path::PathBuf, pin::Pin, sync::Arc, time::SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

use crate::error::Remedy;

/// Largest number of parts one multipart upload may have (the S3 limit).
pub const MAX_PARTS: u32 = 10_000;
/// Smallest part size S3 accepts for every part but the last.
pub const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// Largest part size S3 accepts.
pub const MAX_PART_SIZE: usize = 5 * 1024 * 1024 * 1024;

/// A stream of an object's bytes, in order.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// One stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Key relative to the store's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// One stored object and when it was last written, for retention's age checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedObject {
    /// The object.
    pub meta: ObjectMeta,
    /// When it was last written, if the backend says (S3 `LastModified`, a file's mtime).
    pub modified: Option<SystemTime>,
}

/// A multipart upload that was started and neither completed nor aborted (e.g. its writer crashed).
#[derive(Debug, Clone)]
pub struct PendingUpload {
    /// Key the upload would have created, relative to the store's prefix.
    pub key: String,
    /// Backend-specific upload id.
    pub upload_id: String,
    /// When the upload was started, if the backend records it.
    pub initiated: Option<SystemTime>,
}

/// Errors from a store. Each names the key or location it is about.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object {key} not found in the store")]
    NotFound {
        /// The missing key.
        key: String,
    },
    /// The store refused our credentials or permissions.
    #[error("access denied by the store for {key}: {message}")]
    AccessDenied {
        /// The key (or bucket) the request was about.
        key: String,
        /// What the store said.
        message: String,
    },
    /// The store rejected data whose checksum did not match what we sent.
    #[error("the store rejected {key}: checksum mismatch in transit ({message})")]
    ChecksumRejected {
        /// The key being written.
        key: String,
        /// What the store said.
        message: String,
    },
    /// The bucket does not exist.
    #[error("bucket {bucket} does not exist")]
    NoSuchBucket {
        /// The bucket name.
        bucket: String,
    },
    /// A request failed for another reason.
    #[error("store request for {key} failed: {message}")]
    Request {
        /// The key the request was about.
        key: String,
        /// What went wrong, in the agent's words (the client's own reason is `source`).
        message: String,
        /// Whether trying again may succeed (network errors, throttling, 5xx).
        retryable: bool,
        /// What the user can do, when the failure says (an unreachable endpoint, retries spent).
        remedy: Option<Remedy>,
        /// The S3 client's or the system's error, kept whole so its chain can be rendered and
        /// inspected rather than flattened into `message`.
        #[source]
        source: Option<Cause>,
    },
    /// Local filesystem error (local store).
    #[error("local store I/O error at {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key that could escape the store's prefix or is otherwise unusable.
    #[error("invalid object key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A write to a store this agent only reads; nothing was sent to the store.
    #[error(
        "this agent's store is read-only ({location}): it takes no backups and deletes nothing there"
    )]
    ReadOnly {
        /// The store refused, as [`Store::location`] names it.
        location: String,
    },
    /// An encrypted object that does not authenticate: altered, truncated, extended, moved from
    /// another key, or forged by someone without the key. Its bytes were not handed on.
    #[error(
        "object {key} failed authentication: {reason}; it was not written by an agent holding this store's key, so it is refused (restore from another backup, and find out who can write to the bucket)"
    )]
    Tampered {
        /// The object.
        key: String,
        /// What failed.
        reason: String,
    },
    /// An encrypted object whose key this agent does not have.
    #[error(
        "object {key} is encrypted with the key of fingerprint {needed}, which this agent does not have (its keys: {have})"
    )]
    WrongKey {
        /// The object.
        key: String,
        /// Fingerprint of the key it was sealed with.
        needed: String,
        /// Fingerprints of the keys this agent has, or "none".
        have: String,
    },
    /// A plaintext object read by an agent that encrypts: anyone who can write to the bucket
    /// could have put it there.
    #[error(
        "object {key} is not encrypted, but this agent encrypts its store, so the object could have been planted by anyone who can write to the bucket and is refused"
    )]
    NotEncrypted {
        /// The object.
        key: String,
    },
    /// An encrypted object that authenticates, but was sealed for another repository sharing the
    /// key (or the store's own repository id is missing): copied in from elsewhere.
    #[error(
        "object {key} was sealed for repository {found}, but this store is repository {this}: it was copied here from another store that shares the key, so it is refused; restore it from the store it was written to"
    )]
    ForeignRepository {
        /// The object.
        key: String,
        /// The repository id the object was sealed for.
        found: Box<str>,
        /// This store's repository id, or why there is none.
        this: Box<str>,
    },
    /// An object sealed before objects were bound to their repository, stored after this
    /// store's repository id was created: written by an old agent elsewhere and copied in.
    #[error(
        "object {key} was sealed before encryption bound objects to their repository, but was stored here at {stored}, after this store's repository was created ({repository}): it could have been copied in from another store that shares the key, so it is refused; restore it from the store it was written to"
    )]
    Unbound {
        /// The object.
        key: String,
        /// When the store says it was written.
        stored: Box<str>,
        /// This store's repository id and when it was created ("<id> at <time>").
        repository: Box<str>,
    },
    /// A plaintext object read under the migration cut-off (`accept_unencrypted`) that the store
    /// says was written at or after that time, or cannot say when.
    #[error(
        "object {key} is not encrypted and was written {written}, not before the cut-off {cutoff} for unencrypted objects: only objects written before it are read unencrypted, so it could have been planted by anyone who can write to the bucket and is refused"
    )]
    UnencryptedAfterCutoff {
        /// The object.
        key: String,
        /// When the store says it was written ("at <time>"), or that it cannot say.
        written: Box<str>,
        /// The cut-off.
        cutoff: Box<str>,
    },
    /// The store's repository id cannot be read or created.
    #[error("the store's repository id ({key}) cannot be used: {reason}")]
    Repository {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The store's location cannot be used.
    #[error("invalid store location {location:?}: {reason}")]
    InvalidLocation {
        /// The location as given.
        location: String,
        /// Why it was refused.
        reason: String,
    },
}

/// Any error kept as a cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The cause of a failed request (the S3 client's error, a broken connection), kept whole. One
/// pointer wide rather than a boxed trait object's two, so that keeping it does not grow every
/// error that may carry a store error. It stands in for the error it holds: the same message,
/// the same causes below it.
#[derive(Debug)]
pub struct Cause(Box<BoxError>);

impl Cause {
    /// Keeps `err` as a cause.
    pub fn new(err: impl Into<BoxError>) -> Self {
        Cause(Box::new(err.into()))
    }

    /// The error it holds, e.g. to downcast.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &**self.0
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl StoreError {
    /// What the user can do about it, rendered into flags at the edge ([`crate::error`]).
    pub fn remedy(&self) -> Option<Remedy> {
        match self {
            StoreError::AccessDenied { .. } => Some(Remedy::StoreCredentials),
            StoreError::NoSuchBucket { .. } => Some(Remedy::StoreLocation),
            StoreError::ReadOnly { .. } => Some(Remedy::StoreReadOnly),
            StoreError::WrongKey { .. } => Some(Remedy::EncryptionKey),
            StoreError::NotEncrypted { .. } => Some(Remedy::AcceptUnencrypted),
            StoreError::UnencryptedAfterCutoff { .. } => Some(Remedy::UnencryptedCutoff),
            StoreError::Request { remedy, .. } => *remedy,
            _ => None,
        }
    }

    /// Whether the same request may succeed if tried again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Request { retryable, .. } => *retryable,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }

    /// Whether the error says the store itself is failing (rather than one object being
    /// missing, refused or damaged), so that `status` reports it.
    pub fn is_store_failure(&self) -> bool {
        matches!(
            self,
            StoreError::Request { .. }
                | StoreError::AccessDenied { .. }
                | StoreError::NoSuchBucket { .. }
                | StoreError::Io { .. }
        )
    }
}

/// Result type of store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Object storage as the rest of the agent sees it.
///
/// Cancellation: dropping any returned future leaves the store as it was before the call, or, for a
/// multipart upload, with an incomplete upload that `list_uploads` reports and `abort_upload` removes.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Where this store is, for humans (`s3://bucket/prefix`, `file:///path`); never credentials.
    fn location(&self) -> String;

    /// Whether every write is refused with [`StoreError::ReadOnly`] (see [`ReadOnly`]), so the
    /// agent can skip work that only writes, such as the start-up sweep.
    fn is_read_only(&self) -> bool {
        false
    }

    /// Whether objects are encrypted on their way in and authenticated on their way out (see
    /// [`Crypt`], the wrapper every store is opened through).
    fn encryption(&self) -> Encryption {
        Encryption::Off
    }

    /// What this store's requests met (retries, frozen connections, failures), for backends
    /// that go over a network; `None` for a local directory.
    fn health(&self) -> Option<StoreHealth> {
        None
    }

    /// Writes a whole small object atomically (readers see the old object, or none, or the new one).
    async fn put(&self, key: &str, data: Bytes) -> Result<()>;

    /// Starts a multipart upload to `key`. Nothing is visible at `key` until `complete` succeeds.
    async fn start_upload(&self, key: &str) -> Result<Box<dyn Upload>>;

    /// Streams an object's bytes.
    async fn get(&self, key: &str) -> Result<ByteStream>;

    /// Size of an object, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>>;

    /// Complete objects whose key starts with `prefix`, sorted by key.
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>>;

    /// Like [`list`](Self::list), with each object's last-modified time. Backends that cannot
    /// say report `None`, and callers then treat the object as new (never old enough to remove).
    async fn list_timed(&self, prefix: &str) -> Result<Vec<TimedObject>> {
        Ok(self
            .list(prefix)
            .await?
            .into_iter()
            .map(|meta| TimedObject {
                meta,
                modified: None,
            })
            .collect())
    }

    /// Deletes an object; deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Incomplete multipart uploads whose key starts with `prefix`.
    async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>>;

    /// Aborts an incomplete upload, freeing its parts.
    async fn abort_upload(&self, upload: &PendingUpload) -> Result<()>;
}

/// The upload of one part, started by [`Upload::put_part`]. It owns everything it needs
/// (`'static`), so the caller can keep several running at once and decides how many: the pipeline
/// is the one place that bounds parts in flight, and with them memory.
pub type PartUpload = futures::future::BoxFuture<'static, Result<PartReceipt>>;

/// Proof that one part is stored, handed back to [`Upload::complete`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartReceipt {
    number: u32,
    size: u64,
    /// What S3 needs to list the part in CompleteMultipartUpload; `None` for the local store.
    etag: Option<String>,
    /// Base64 SHA-256 of the part, as sent with it and as listed on completion.
    checksum_sha256: Option<String>,
}

impl PartReceipt {
    /// The part's number (1-based: the order `put_part` was called in).
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The part's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// One multipart upload in progress.
///
/// Parts are numbered, and laid out in the object, in the order `put_part` is called; the returned
/// futures may run concurrently and finish in any order. Every part but the last must be at least
/// [`MIN_PART_SIZE`]. The upload itself never buffers or queues a part: at most as many parts exist
/// as the caller keeps futures for. Dropping a part's future cancels that part (the upload then
/// cannot complete without it); dropping the upload without `complete` or `abort` leaves an
/// incomplete upload that [`Store::list_uploads`] reports.
#[async_trait]
pub trait Upload: Send {
    /// Numbers the next part and returns the future that stores it. Rule violations (a short part
    /// that is not the last, too many parts) are returned by the future without storing anything.
    fn put_part(&mut self, data: Bytes) -> PartUpload;
    /// Makes the object visible atomically, made of exactly the parts of `parts` (one receipt for
    /// each number from 1 to the last, in any order). Fails, and aborts, when one is missing.
    async fn complete(self: Box<Self>, parts: Vec<PartReceipt>) -> Result<ObjectMeta>;
    /// Discards every part; the key is left as it was. Part futures still running may fail.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// Sorts `parts` by number and checks that they are exactly parts 1..=`expected`: what `complete`
/// accepts, on every backend alike.
pub(crate) fn check_receipts(
    key: &str,
    mut parts: Vec<PartReceipt>,
    expected: u32,
) -> Result<Vec<PartReceipt>> {
    parts.sort_by_key(|p| p.number);
    let complete = parts.len() == expected as usize
        && parts
            .iter()
            .enumerate()
            .all(|(i, p)| p.number as usize == i + 1);
    if complete {
        Ok(parts)
    } else {
        Err(StoreError::Request {
            key: key.to_string(),
            message: format!(
                "completing with {} part receipts, but {expected} parts were started: every part must be stored, once, before complete",
                parts.len()
            ),
            retryable: false,
            remedy: None,
            source: None,
        })
    }
}

/// A part future that fails at once (a part refused before anything was sent).
pub(crate) fn refused(err: StoreError) -> PartUpload {
    Box::pin(futures::future::ready(Err(err)))
}

/// S3's rule that only the last part may be smaller than [`MIN_PART_SIZE`], enforced by every
/// backend alike (not every S3-compatible server enforces it).
#[derive(Debug, Default)]
pub(crate) struct PartRule {
    short_part_seen: bool,
}

impl PartRule {
    /// Accepts the next part's size, or refuses it because a short part came before it or the
    /// upload already has [`MAX_PARTS`] parts (`started` counts the parts before this one).
    pub(crate) fn check(&mut self, key: &str, len: usize, started: u32) -> Result<()> {
        if started >= MAX_PARTS {
            return Err(StoreError::Request {
                key: key.to_string(),
                message: format!("more than {MAX_PARTS} parts; raise the part size"),
                retryable: false,
                remedy: None,
                source: None,
            });
        }
        if self.short_part_seen {
            return Err(StoreError::Request {
                key: key.to_string(),
                message: format!("only the last part may be smaller than {MIN_PART_SIZE} bytes"),
                retryable: false,
                remedy: None,
                source: None,
            });
        }
        self.short_part_seen = len < MIN_PART_SIZE;
        Ok(())
    }
}

/// How a store is opened beyond its location.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// S3 Object Lock retention on every object written (`--object-lock-days`); refused for a
    /// local directory, which has no such thing.
    pub object_lock: Option<s3::ObjectLock>,
    /// Retries and deadlines of S3 requests.
    pub retry: RetryPolicy,
    /// Where what S3 requests meet is recorded, for `status` and the metrics.
    pub health: StoreHealth,
}

/// Opens the store named by `--store`: `file:///path` or `s3://bucket[/prefix]`, with the
/// default [`Options`].
pub async fn open(location: &str) -> Result<Arc<dyn Store>> {
    open_with(location, &Options::default()).await
}

/// Opens `location` as [`open`] does, with `options`.
pub async fn open_with(location: &str, options: &Options) -> Result<Arc<dyn Store>> {
    let invalid = |reason: &str| StoreError::InvalidLocation {
        location: location.to_string(),
        reason: reason.to_string(),
    };
    if let Some(rest) = location.strip_prefix("file://") {
        if !rest.starts_with('/') {
            return Err(invalid(
                "a file:// store needs an absolute path, e.g. file:///var/lib/soma",
            ));
        }
        if options.object_lock.is_some() {
            return Err(invalid(
                "Object Lock (a retention in days) needs an s3:// store on a bucket with Object Lock enabled",
            ));
        }
        Ok(Arc::new(
            local::LocalStore::open(PathBuf::from(rest)).await?,
        ))
    } else if let Some(rest) = location.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("missing bucket name, e.g. s3://my-bucket/soma"));
        }
        Ok(Arc::new(
            s3::S3Store::connect(bucket, prefix.trim_matches('/'))
                .await
                .with_object_lock(options.object_lock)
                .with_retry(options.retry, options.health.clone()),
        ))
    } else {
        Err(invalid(
            "expected s3://bucket/prefix or file:///absolute/path",
        ))
    }
}

/// Opens `location` as [`open_with`] does, read-only: every write is refused (see
/// [`ReadOnly`]). A local directory must already exist (opening it creates nothing).
pub async fn open_read_only(location: &str, options: &Options) -> Result<Arc<dyn Store>> {
    let inner: Arc<dyn Store> = match location.strip_prefix("file://") {
        Some(rest) if rest.starts_with('/') => {
            Arc::new(local::LocalStore::open_existing(PathBuf::from(rest)).await?)
        }
        _ => {
            let options = Options {
                object_lock: None,
                ..options.clone()
            };
            open_with(location, &options).await?
        }
    };
    Ok(Arc::new(ReadOnly::new(inner)))
}

/// Checks that a key stays inside the store's prefix ([`Key`]'s rules).
pub(crate) fn check_key(key: &str) -> Result<()> {
    Key::check(key)
}
