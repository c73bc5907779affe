//! The continuous WAL archive behind point-in-time recovery: how WAL files are named in the store,
//! shipped, fetched back, and how the recoverable window of a base backup is computed from what is
//! actually there.
//!
//! Layout under the store's prefix, one folder per PostgreSQL cluster (its system identifier, which
//! a point-in-time restore keeps, so a restored cluster's new timelines land beside the old ones):
//! ```text
//! wal/<system id>/<file>.<kind>.<end hex>.<captured unix ms>.<sha256 of raw bytes>.zst
//! ```
//! `<file>` is PostgreSQL's own name (`000000010000000000000003`, `00000002.history`); `<kind>` is
//! `seg` (a complete segment), `partial` (the segment being written, shipped every few seconds so
//! the recovery point does not wait for 16 MiB of WAL) or `history`; `<end>` is how many bytes of the
//! file hold WAL (the rest of a partial segment is zeros); `<captured>` is when the agent read it.
//!
//! Objects are content-addressed: the key carries the digest of the bytes, so shipping the same file
//! again finds its object and uploads nothing, and no object is ever overwritten with different
//! content — a different content gets a different key, and for a complete segment that is a conflict
//! the agent refuses to record. Newer partials supersede older ones of the same segment, and a
//! complete segment supersedes them all; superseded objects are deleted only after their successor
//! is stored.
//!
//! A key is only where to look: anyone who can write to the bucket can put any key there. Whatever
//! a name alone would decide — that a segment is already stored, that two versions conflict, where
//! the archive ends, that a gap lies before later WAL — is decided by reading the object back and
//! judging its content ([`judge`]); what fails is logged, named and skipped.

pub(crate) mod archive;
mod drain;
pub(crate) mod header;
pub(crate) mod history;
pub(crate) mod index;
mod judge;
mod local;
pub(crate) mod naming;
mod spool;
pub(crate) mod stream;

pub(crate) use archive::{Fetched, Shipped, WalArchive};
pub(crate) use index::{RecoveryWindow, WalIndex};
pub(crate) use naming::{Kind, WalFile, WalObject, valid_seg_size, valid_system_id};

use crate::{pipeline::PipelineError, store::StoreError};

/// Folder of all WAL archives, relative to the store prefix.
pub(crate) const WAL_DIR: &str = "wal";

/// WAL archive errors; each names the WAL file it is about.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Reading, compressing or checking failed.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Two different complete copies of one WAL file: two clusters (or two timelines' histories)
    /// write into the same archive.
    #[error(
        "WAL file {file} already exists in the archive with different content ({existing}); refusing to store a second version. Two PostgreSQL servers with the same system identifier ship to {prefix} — give each cluster its own store prefix"
    )]
    Conflict {
        /// PostgreSQL's file name.
        file: String,
        /// Key of the existing object.
        existing: String,
        /// The archive folder.
        prefix: String,
    },
    /// A stored WAL file failed its checksum.
    #[error(
        "WAL file {file} in the store is corrupted ({key}): {detail}. Recovery cannot go past it; restore to a point before it, or from a base backup taken after it"
    )]
    Corrupted {
        /// PostgreSQL's file name.
        file: String,
        /// The object.
        key: String,
        /// The mismatch.
        detail: String,
    },
    /// A segment is missing although later WAL of its timeline exists.
    #[error(
        "WAL segment {file} is missing from the archive {prefix}, but later segments of timeline {timeline} exist: the archive has a gap, and replay cannot continue past it. Restore to a point before the gap, or from a base backup taken after it"
    )]
    Gap {
        /// PostgreSQL's file name.
        file: String,
        /// Timeline.
        timeline: u32,
        /// The archive folder.
        prefix: String,
    },
    /// A history file that does not parse.
    #[error(
        "timeline history file {file} in the archive is unreadable: {reason}. Recovery cannot choose a timeline through it; restore to a point on the timeline before it"
    )]
    BadHistory {
        /// PostgreSQL's file name.
        file: String,
        /// Why.
        reason: String,
    },
    /// A segment size PostgreSQL cannot have (a power of two from 1 MiB to 1 GiB), from a damaged
    /// manifest.
    #[error(
        "WAL segment size {size} is not one PostgreSQL can have (a power of two from 1 MiB to 1 GiB): the base backup's manifest is damaged, so the archive {prefix} cannot be read for it. Use another base backup"
    )]
    BadSegmentSize {
        /// The size read.
        size: u64,
        /// The archive folder.
        prefix: String,
    },
}

impl WalError {
    /// True when stored data failed an integrity check or is missing from the middle of the archive.
    pub fn is_data_loss(&self) -> bool {
        matches!(self, WalError::Corrupted { .. } | WalError::Gap { .. })
            || matches!(self, WalError::Pipeline(e) if e.is_data_loss())
    }
}
