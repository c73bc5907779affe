//! What goes wrong talking to Qdrant, and the check that keeps untrusted names out of its URLs.

use std::time::Duration;

use crate::digest::Sha256Digest;

/// Qdrant errors; each names the endpoint or collection.
#[derive(Debug, thiserror::Error)]
pub enum QdrantError {
    /// The URL is unusable.
    #[error("invalid Qdrant URL: {0}")]
    InvalidUrl(String),
    /// The CA certificate cannot be used.
    #[error("cannot use the Qdrant CA certificate {path}: {reason}")]
    Tls {
        /// File given.
        path: String,
        /// Why.
        reason: String,
    },
    /// Connection refused, DNS, TLS handshake, timeout…
    #[error("cannot reach Qdrant at {url}: {detail}")]
    Unreachable {
        /// Base URL.
        url: String,
        /// What failed.
        detail: String,
    },
    /// 401/403.
    #[error(
        "Qdrant refused the request to {endpoint} ({status}); check the API key in SOMA_QDRANT_API_KEY"
    )]
    Unauthorized {
        /// Endpoint.
        endpoint: String,
        /// HTTP status.
        status: u16,
    },
    /// 404 on a collection or snapshot.
    #[error("Qdrant: {what} not found ({message})")]
    NotFound {
        /// What was missing.
        what: String,
        /// Qdrant's message.
        message: String,
    },
    /// Any other error answer.
    #[error("Qdrant answered {status} to {endpoint}: {message}")]
    Api {
        /// Endpoint.
        endpoint: String,
        /// HTTP status.
        status: u16,
        /// Qdrant's `status.error` text.
        message: String,
    },
    /// A snapshot operation ran past its limit: the node is frozen or far slower than allowed.
    #[error(
        "Qdrant {what}: {detail} within {}; the node is frozen or overloaded; check it, or allow more with {flag}",
        humantime::format_duration(*.after)
    )]
    TimedOut {
        /// What was being done.
        what: String,
        /// What did not happen.
        detail: &'static str,
        /// The limit.
        after: Duration,
        /// The flag that sets it.
        flag: &'static str,
    },
    /// A response that does not follow the API.
    #[error("unexpected answer from Qdrant to {endpoint}: {detail}")]
    Protocol {
        /// Endpoint.
        endpoint: String,
        /// What was wrong.
        detail: String,
    },
    /// Qdrant's own checksum of a snapshot does not match the bytes we received.
    #[error(
        "checksum mismatch for the Qdrant snapshot {snapshot} of collection {collection}: Qdrant reports sha256 {expected}, the {bytes} bytes received hash to {actual}; the snapshot was not stored"
    )]
    SnapshotChecksum {
        /// Collection.
        collection: String,
        /// Snapshot name.
        snapshot: String,
        /// Qdrant's checksum.
        expected: String,
        /// What we computed.
        actual: Sha256Digest,
        /// Bytes received.
        bytes: u64,
    },
    /// Restoring across Qdrant minor versions is not supported by Qdrant.
    #[error(
        "the backup was taken from Qdrant {backup}, this server runs {server}: Qdrant restores a snapshot only into the same minor version ({backup_minor}.x); restore into a Qdrant {backup_minor} server, then upgrade it"
    )]
    VersionMismatch {
        /// Version in the manifest.
        backup: String,
        /// Minor of that version.
        backup_minor: String,
        /// Version of the server.
        server: String,
    },
    /// The restore target exists.
    #[error(
        "collection {0} already exists in Qdrant; restore with --as NEW_NAME, or pass --force to overwrite it"
    )]
    Exists(String),
    /// The server is too old for a requested feature.
    #[error("{feature} needs Qdrant {needs} or newer; this server runs {server}")]
    Unsupported {
        /// The feature.
        feature: &'static str,
        /// Minimum version.
        needs: String,
        /// Server version.
        server: String,
    },
}

/// Why a collection or snapshot name cannot be one segment of a Qdrant URL path. Names come from
/// requests, from manifests read back from the store and from Qdrant's own answers, and the URL
/// builder would not refuse them: it drops a `.` or `..` segment (so `DELETE
/// /collections/..` would reach `DELETE /collections`) and strips tabs and newlines (so a name
/// would quietly become another).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Nothing to name.
    #[error("it is empty")]
    Empty,
    /// `.` or `..`.
    #[error("`.` and `..` are path steps, not names")]
    Dots,
    /// A path separator.
    #[error("it contains {0:?}, a path separator")]
    Separator(char),
    /// A control character.
    #[error("it contains the control character {}", .0.escape_default())]
    Control(char),
}

/// Checks a collection or snapshot name before it becomes a URL path segment.
pub(crate) fn check_name(name: &str) -> Result<(), NameError> {
    match name {
        "" => Err(NameError::Empty),
        "." | ".." => Err(NameError::Dots),
        _ => match name
            .chars()
            .find(|c| matches!(c, '/' | '\\') || c.is_control())
        {
            Some(c @ ('/' | '\\')) => Err(NameError::Separator(c)),
            Some(c) => Err(NameError::Control(c)),
            None => Ok(()),
        },
    }
}
