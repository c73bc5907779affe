//! The agent's operation error: every domain error, classified for gRPC.
//!
//! Each variant keeps the domain error (which names the key, id or target); `status` picks the
//! gRPC code a client can act on, e.g. `DataLoss` for a checksum mismatch, `NotFound` for an
//! unknown backup, `FailedPrecondition` for a non-empty restore target.

use std::error::Error;

use tonic::{Code, Status};

use crate::{
    catalog::{BackupId, CatalogError, Engine},
    engine::{
        postgres::{PgError, globals::PreflightError},
        qdrant::QdrantError,
    },
    jobs::Busy,
    ops::{
        drill::DrillError, physical::PhysicalError, plan::RequestError, postgres::LogicalError,
        qdrant::QdrantOpError, set::SetError,
    },
    pipeline::PipelineError,
    store::StoreError,
    wal::{WalError, stream::StreamError},
};

/// What a user can do about an error raised by a module that does not know how the agent is
/// configured (the store, the WAL archive): the kind of fix, with no flag or variable named.
/// [`Remedy::advice`] renders it into the flags and environment variables, here at the edge
/// where the configuration is known, so a flag renamed in `config` is renamed in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remedy {
    /// The store refused the credentials or the bucket policy denies the request.
    StoreCredentials,
    /// The configured bucket does not exist.
    StoreLocation,
    /// The S3 endpoint could not be reached.
    StoreEndpoint,
    /// Requests gave up after their retries or deadline.
    StoreRetries,
    /// Requests that could not reach the endpoint gave up after their retries or deadline.
    StoreEndpointRetries,
    /// A write to a store this agent was told to only read.
    StoreReadOnly,
    /// An object sealed with a key this agent was not given.
    EncryptionKey,
    /// A plaintext object where the store is encrypted.
    AcceptUnencrypted,
    /// A plaintext object written after the migration cut-off.
    UnencryptedCutoff,
    /// The WAL spool directory cannot be used.
    WalSpool,
    /// The replication user cannot create the replication slot.
    ReplicationUser,
}

impl Remedy {
    /// The advice, naming the flags and environment variables a user changes.
    pub fn advice(self) -> &'static str {
        match self {
            Remedy::StoreCredentials => {
                "check the store credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, IRSA role) and the bucket policy"
            }
            Remedy::StoreLocation => "create it or fix --store",
            Remedy::StoreEndpoint => "check AWS_ENDPOINT_URL and the network",
            Remedy::StoreRetries => {
                "check the store, or allow more with --store-retries / --store-operation-timeout"
            }
            Remedy::StoreEndpointRetries => {
                "check AWS_ENDPOINT_URL and the network, or allow more with --store-retries / --store-operation-timeout"
            }
            Remedy::StoreReadOnly => {
                "back up and delete with the agent that owns this store, or restart this one without --store-read-only (SOMA_STORE_READ_ONLY)"
            }
            Remedy::EncryptionKey => {
                "give it that key with --encryption-key-file (SOMA_ENCRYPTION_KEY_FILE)"
            }
            Remedy::AcceptUnencrypted => {
                "to read backups taken before encryption was turned on, restart the agent with --accept-unencrypted <TIME> (SOMA_ACCEPT_UNENCRYPTED), the time encryption was turned on, for the migration"
            }
            Remedy::UnencryptedCutoff => {
                "the cut-off is --accept-unencrypted (SOMA_ACCEPT_UNENCRYPTED)"
            }
            Remedy::WalSpool => {
                "give --wal-spool (SOMA_WAL_SPOOL) a writable directory on a volume that outlives the container"
            }
            Remedy::ReplicationUser => {
                "the replication user needs the REPLICATION attribute (see --replication-url) and the server max_replication_slots > 0"
            }
        }
    }
}

/// The remedy of the first error in `err`'s chain that has one. Wrappers marked
/// `#[error(transparent)]` hand on their inner error's causes but not the inner error itself, so
/// those that carry a store or WAL error are looked into here.
pub(crate) fn remedy(err: &(dyn Error + 'static)) -> Option<Remedy> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(found) = own_remedy(e) {
            return Some(found);
        }
        next = e.source();
    }
    None
}

fn own_remedy(e: &(dyn Error + 'static)) -> Option<Remedy> {
    if let Some(e) = e.downcast_ref::<StoreError>() {
        return e.remedy();
    }
    if let Some(e) = e.downcast_ref::<StreamError>() {
        return e.remedy();
    }
    if let Some(e) = e.downcast_ref::<WalError>() {
        return inner_store_of_wal(e).and_then(StoreError::remedy);
    }
    if let Some(e) = e.downcast_ref::<PipelineError>() {
        return inner_store_of_pipeline(e).and_then(StoreError::remedy);
    }
    if let Some(CatalogError::Store(s)) = e.downcast_ref::<CatalogError>() {
        return s.remedy();
    }
    if let Some(e) = e.downcast_ref::<OpError>() {
        return match e {
            OpError::Store(s) | OpError::Catalog(CatalogError::Store(s)) => s.remedy(),
            OpError::Pipeline(p) => inner_store_of_pipeline(p).and_then(StoreError::remedy),
            _ => None,
        };
    }
    None
}

fn inner_store_of_pipeline(e: &PipelineError) -> Option<&StoreError> {
    match e {
        PipelineError::Store(s) => Some(s),
        _ => None,
    }
}

fn inner_store_of_wal(e: &WalError) -> Option<&StoreError> {
    match e {
        WalError::Store(s) => Some(s),
        WalError::Pipeline(p) => inner_store_of_pipeline(p),
        _ => None,
    }
}

/// The advice for `err` (see [`Remedy`]), for an edge that renders errors itself.
pub(crate) fn advice(err: &(dyn Error + 'static)) -> Option<&'static str> {
    remedy(err).map(Remedy::advice)
}

/// `err` as a user reads it: its message, each cause its message does not already quote (an S3
/// client's reason, an I/O error), then what to do about it. For gRPC statuses, start-up errors,
/// `status` and logs.
pub(crate) fn render(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    if let Some(advice) = advice(err) {
        out.push_str("; ");
        out.push_str(advice);
    }
    out
}

/// `text` cut to at most `max` bytes on a character boundary, marked with `…` when cut: for
/// names and messages that come from outside (a forged tar entry, a store's answer) and end up
/// in errors, logs and `status`.
pub(crate) fn shorten(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// Catalog: ids and manifests.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Compression, hashing, verification.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// PostgreSQL and its tools.
    #[error(transparent)]
    Postgres(#[from] PgError),
    /// A logical backup that cannot be restored as asked.
    #[error(transparent)]
    Logical(#[from] LogicalError),
    /// A logical restore the target cluster cannot take (missing role, extension, tablespace).
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// Qdrant's API.
    #[error(transparent)]
    Qdrant(#[from] QdrantError),
    /// A Qdrant backup or restore refused.
    #[error(transparent)]
    QdrantOp(#[from] QdrantOpError),
    /// A physical backup or point-in-time restore.
    #[error(transparent)]
    Physical(#[from] PhysicalError),
    /// A request that cannot be served as asked.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// A restore drill that cannot run.
    #[error(transparent)]
    Drill(#[from] DrillError),
    /// Another operation holds what this one needs.
    #[error(transparent)]
    Busy(#[from] Busy),
    /// A platform set that cannot be committed as asked.
    #[error(transparent)]
    Set(#[from] Box<SetError>),
    /// The engine the request needs is not configured on this agent.
    #[error(
        "this agent has no {engine} configured; start it with {flag}",
        flag = match engine {
            Engine::Postgres => "--postgres-url (SOMA_POSTGRES_URL)",
            Engine::Qdrant => "--qdrant-url (SOMA_QDRANT_URL)",
            Engine::Set => "--postgres-url or --qdrant-url",
        }
    )]
    NotConfigured {
        /// The engine.
        engine: Engine,
    },
    /// A member of a backup set failed; the message names the set and the members kept.
    #[error(
        "backup set {set} is incomplete: its {engine} member failed: {source}.{}",
        kept_note(kept)
    )]
    SetMember {
        /// The set.
        set: BackupId,
        /// The failed member's engine.
        engine: Engine,
        /// Members that completed and stay as standalone backups.
        kept: Vec<BackupId>,
        /// The member's error, which decides the code.
        source: Box<OpError>,
    },
    /// A set whose member manifest is missing or unreadable.
    #[error("backup set {set} is damaged: member {member}: {source}")]
    SetDamaged {
        /// The set.
        set: BackupId,
        /// The member.
        member: BackupId,
        /// Why it cannot be read.
        source: CatalogError,
    },
    /// A set listing another set (never written by an agent).
    #[error(
        "backup set {set} lists another set ({member}) as a member; it was not written by this agent"
    )]
    NestedSet {
        /// The set.
        set: BackupId,
        /// The member.
        member: BackupId,
    },
    /// The store holds something else than what was uploaded.
    #[error(
        "{key}: the store reports {} after upload, {sent} bytes were sent; the backup was not recorded",
        found.map_or_else(|| "no object".to_string(), |n| format!("{n} bytes"))
    )]
    StoreMismatch {
        /// The object.
        key: String,
        /// Its size as the store reports it.
        found: Option<u64>,
        /// Bytes sent.
        sent: u64,
    },
    /// A manifest without an artifact it must have.
    #[error("backup {id} has no artifact {name}; its manifest lists {listed:?}")]
    MissingArtifact {
        /// The backup.
        id: BackupId,
        /// The artifact expected.
        name: String,
        /// What the manifest lists.
        listed: Vec<String>,
    },
    /// An artifact object the manifest lists is gone from the store.
    #[error("backup {id} is damaged: its manifest lists {key} but the store does not have it")]
    ObjectMissing {
        /// The backup.
        id: BackupId,
        /// The missing object.
        key: String,
    },
    /// The consumer of a restore was stopped because its input failed a check.
    #[error("the restore was stopped before it could commit")]
    Cancelled,
    /// The agent is shutting down.
    #[error(
        "the agent is shutting down; the operation was interrupted and what it had written was removed — run it again once the agent is back"
    )]
    ShuttingDown,
    /// A failure inside the agent (a task that panicked, no path to its own binary).
    #[error("internal error: {0}")]
    Internal(String),
}

fn kept_note(kept: &[BackupId]) -> String {
    if kept.is_empty() {
        String::new()
    } else {
        format!(
            " Completed members stay available as standalone backups: {}.",
            kept.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// The gRPC code of a store error.
pub(crate) fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::AccessDenied { .. } => Code::PermissionDenied,
        StoreError::ChecksumRejected { .. } | StoreError::Tampered { .. } => Code::DataLoss,
        StoreError::WrongKey { .. }
        | StoreError::NotEncrypted { .. }
        | StoreError::ForeignRepository { .. }
        | StoreError::Unbound { .. }
        | StoreError::UnencryptedAfterCutoff { .. }
        | StoreError::Repository { .. } => Code::FailedPrecondition,
        StoreError::NoSuchBucket { .. } | StoreError::ReadOnly { .. } => Code::FailedPrecondition,
        StoreError::Request { retryable, .. } => {
            if *retryable {
                Code::Unavailable
            } else {
                Code::Internal
            }
        }
        StoreError::Io { .. } => Code::Internal,
        StoreError::InvalidKey { .. } | StoreError::InvalidLocation { .. } => Code::InvalidArgument,
    }
}

impl OpError {
    /// The gRPC code clients act on.
    pub fn code(&self) -> Code {
        match self {
            OpError::Catalog(e) => match e {
                CatalogError::InvalidId(_) => Code::InvalidArgument,
                CatalogError::NotFound(_)
                | CatalogError::NoBackups
                | CatalogError::NoBackupsOf(_) => Code::NotFound,
                CatalogError::BadManifest { .. } => Code::DataLoss,
                CatalogError::Store(s) => store_code(s),
            },
            OpError::Store(e) => store_code(e),
            OpError::Pipeline(e) => match e {
                PipelineError::Store(s) => store_code(s),
                e if e.is_data_loss() => Code::DataLoss,
                _ => Code::Aborted,
            },
            OpError::Postgres(e) => match e {
                PgError::InvalidUrl(_) | PgError::InvalidSlotName { .. } => Code::InvalidArgument,
                PgError::ToolMissing { .. }
                | PgError::ToolTooOld { .. }
                | PgError::NotEmpty { .. } => Code::FailedPrecondition,
                PgError::Connect { .. } => Code::Unavailable,
                PgError::ToolFailed { .. }
                | PgError::Io { .. }
                | PgError::Unexpected { .. }
                | PgError::Archive { .. } => Code::Aborted,
            },
            OpError::Qdrant(e) => match e {
                QdrantError::InvalidUrl(_) | QdrantError::Tls { .. } => Code::InvalidArgument,
                QdrantError::Unreachable { .. } => Code::Unavailable,
                QdrantError::TimedOut { .. } => Code::DeadlineExceeded,
                QdrantError::Unauthorized { .. } => Code::PermissionDenied,
                QdrantError::NotFound { .. } => Code::NotFound,
                QdrantError::Api { status, .. } if *status >= 500 => Code::Unavailable,
                QdrantError::Api { .. } | QdrantError::Protocol { .. } => Code::Aborted,
                QdrantError::SnapshotChecksum { .. } => Code::DataLoss,
                QdrantError::VersionMismatch { .. }
                | QdrantError::Exists(_)
                | QdrantError::Unsupported { .. } => Code::FailedPrecondition,
            },
            OpError::QdrantOp(e) => e.code(),
            OpError::Logical(e) => e.code(),
            OpError::Preflight(e) => match e {
                PreflightError::Invalid { .. } => Code::DataLoss,
                _ => Code::FailedPrecondition,
            },
            OpError::Physical(e) => e.code(),
            OpError::Drill(e) => e.code(),
            OpError::Request(e) => match e {
                RequestError::NoEngine
                | RequestError::SetWithPhysicalMember { .. }
                | RequestError::PgdataNoRoot => Code::FailedPrecondition,
                RequestError::MissingId
                | RequestError::MissingEngine
                | RequestError::LatestNotAllowed
                | RequestError::PgdataNotAbsolute(_)
                | RequestError::PgdataOutsideRoot { .. }
                | RequestError::PhysicalNeedsPgdata(_) => Code::InvalidArgument,
            },
            OpError::SetMember { source, .. } => source.code(),
            OpError::Set(e) => e.code(),
            OpError::Busy(_) | OpError::NotConfigured { .. } => Code::FailedPrecondition,
            OpError::SetDamaged { .. }
            | OpError::NestedSet { .. }
            | OpError::StoreMismatch { .. }
            | OpError::MissingArtifact { .. }
            | OpError::ObjectMissing { .. } => Code::DataLoss,
            OpError::Cancelled => Code::Aborted,
            OpError::ShuttingDown => Code::Unavailable,
            OpError::Internal(_) => Code::Internal,
        }
    }

    /// The error as a gRPC status carrying the full human-readable message: its causes and
    /// what to do (see [`render`]).
    pub fn to_status(&self) -> Status {
        Status::new(self.code(), render(self))
    }
}

impl From<SetError> for OpError {
    fn from(e: SetError) -> Self {
        OpError::Set(Box::new(e))
    }
}

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        e.to_status()
    }
}
