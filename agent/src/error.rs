//! The agent's operation error: every domain error, classified for gRPC.
//!
//! Each variant keeps the domain error (which names the key, id or target); `status` picks the
//! gRPC code a client can act on, e.g. `DataLoss` for a checksum mismatch, `NotFound` for an
//! unknown backup, `FailedPrecondition` for a non-empty restore target.

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
};

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
pub fn store_code(e: &StoreError) -> Code {
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

    /// The error as a gRPC status carrying the full human-readable message.
    pub fn to_status(&self) -> Status {
        Status::new(self.code(), self.to_string())
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
