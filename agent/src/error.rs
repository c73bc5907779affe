//! The agent's operation error: every domain error, classified for gRPC.
//!
//! Each variant keeps the domain error (which names the key, id or target); `status` picks the
//! gRPC code a client can act on, e.g. `DataLoss` for a checksum mismatch, `NotFound` for an
//! unknown backup, `FailedPrecondition` for a non-empty restore target.

use tonic::{Code, Status};

use crate::{
    catalog::CatalogError,
    engine::{postgres::PgError, qdrant::QdrantError},
    pipeline::PipelineError,
    store::StoreError,
};

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
    /// Qdrant's API.
    #[error(transparent)]
    Qdrant(#[from] QdrantError),
    /// A member of a backup set failed; the message names the set and the members kept.
    #[error("{message}")]
    SetMember {
        /// Full explanation.
        message: String,
        /// The member's error, which decides the code.
        source: Box<OpError>,
    },
    /// Another operation holds the target.
    #[error("{0}")]
    Busy(String),
    /// The request is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request cannot be served in the agent's current configuration or state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A backup's manifest names data the store does not have.
    #[error("{0}")]
    DataLoss(String),
}

fn store_code(e: &StoreError) -> Code {
    match e {
        StoreError::NotFound { .. } => Code::NotFound,
        StoreError::AccessDenied { .. } => Code::PermissionDenied,
        StoreError::ChecksumRejected { .. } => Code::DataLoss,
        StoreError::NoSuchBucket { .. } => Code::FailedPrecondition,
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
                CatalogError::NotFound(_) | CatalogError::NoBackups => Code::NotFound,
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
                PgError::ToolFailed { .. } | PgError::Io { .. } => Code::Aborted,
            },
            OpError::Qdrant(e) => match e {
                QdrantError::InvalidUrl(_) | QdrantError::Tls { .. } => Code::InvalidArgument,
                QdrantError::Unreachable { .. } => Code::Unavailable,
                QdrantError::Unauthorized { .. } => Code::PermissionDenied,
                QdrantError::NotFound { .. } => Code::NotFound,
                QdrantError::Api { status, .. } if *status >= 500 => Code::Unavailable,
                QdrantError::Api { .. } | QdrantError::Protocol { .. } => Code::Aborted,
                QdrantError::SnapshotChecksum { .. } => Code::DataLoss,
                QdrantError::VersionMismatch { .. }
                | QdrantError::Exists(_)
                | QdrantError::Unsupported { .. } => Code::FailedPrecondition,
            },
            OpError::SetMember { source, .. } => source.code(),
            OpError::Busy(_) | OpError::FailedPrecondition(_) => Code::FailedPrecondition,
            OpError::InvalidArgument(_) => Code::InvalidArgument,
            OpError::DataLoss(_) => Code::DataLoss,
        }
    }

    /// The error as a gRPC status carrying the full human-readable message.
    pub fn to_status(&self) -> Status {
        Status::new(self.code(), self.to_string())
    }
}

impl From<OpError> for Status {
    fn from(e: OpError) -> Self {
        e.to_status()
    }
}
