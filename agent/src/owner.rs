//! Who started an upload: the owner id an agent records with every backup it begins, so that its
//! start-up sweep aborts only the uploads it (or an earlier run of the same deployment) left
//! behind — never those of another agent writing to the same bucket right now, such as the
//! production agent while a disaster-recovery drill starts against its store.

use std::fmt;

/// Longest owner id accepted: a DNS name's limit, so a host name always fits.
pub(crate) const MAX_OWNER_ID_BYTES: usize = 253;

/// Why an owner id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OwnerIdError {
    /// Nothing given.
    #[error(
        "the owner id is empty; set --owner-id (SOMA_OWNER_ID) to a name unique to this agent's deployment"
    )]
    Empty,
    /// Longer than [`MAX_OWNER_ID_BYTES`].
    #[error(
        "the owner id is {len} bytes long; --owner-id (SOMA_OWNER_ID) takes at most {MAX_OWNER_ID_BYTES}"
    )]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A control character (newline, NUL, escape...), which would garble logs and the marker.
    #[error(
        "the owner id contains a control character at byte {at}; --owner-id (SOMA_OWNER_ID) takes printable characters only"
    )]
    ControlCharacter {
        /// Byte offset of the first one.
        at: usize,
    },
    /// No id given and the host name could not be read.
    #[error(
        "no --owner-id (SOMA_OWNER_ID) given and the host name cannot be read ({reason}); set --owner-id"
    )]
    NoHostName {
        /// What failed.
        reason: String,
    },
}

/// A checked owner id: 1 to [`MAX_OWNER_ID_BYTES`] bytes, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OwnerId(String);

impl OwnerId {
    /// Checks `raw` (as given, not trimmed: the marker must compare byte for byte).
    pub fn parse(raw: &str) -> Result<Self, OwnerIdError> {
        if raw.is_empty() {
            return Err(OwnerIdError::Empty);
        }
        if raw.len() > MAX_OWNER_ID_BYTES {
            return Err(OwnerIdError::TooLong { len: raw.len() });
        }
        if let Some((at, _)) = raw.char_indices().find(|(_, c)| c.is_control()) {
            return Err(OwnerIdError::ControlCharacter { at });
        }
        Ok(Self(raw.to_string()))
    }

    /// The default owner: this machine's host name (in Kubernetes the pod name, which changes
    /// with every pod: the Helm chart therefore sets a stable id).
    pub fn from_host_name() -> Result<Self, OwnerIdError> {
        let no_host = |reason: String| OwnerIdError::NoHostName { reason };
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_err(|e| no_host(format!("/proc/sys/kernel/hostname: {e}")))?;
        Self::parse(raw.trim_end_matches('\n')).map_err(|e| no_host(e.to_string()))
    }

    /// The id as recorded.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `clap` value parser for `--owner-id`.
pub(crate) fn parse_owner_id(raw: &str) -> Result<OwnerId, String> {
    OwnerId::parse(raw).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_names_and_refuses_what_cannot_be_an_owner() {
        for ok in [
            "prod",
            "drill",
            "1f2e/ns/release",
            "host.example.com",
            "é-ü",
        ] {
            assert_eq!(OwnerId::parse(ok).unwrap().as_str(), ok);
        }
        assert_eq!(OwnerId::parse(""), Err(OwnerIdError::Empty));
        assert!(OwnerId::parse(&"a".repeat(253)).is_ok());
        assert_eq!(
            OwnerId::parse(&"a".repeat(254)),
            Err(OwnerIdError::TooLong { len: 254 })
        );
        assert_eq!(
            OwnerId::parse("pr\nod"),
            Err(OwnerIdError::ControlCharacter { at: 2 })
        );
        assert!(OwnerId::parse("a\0").is_err());
        assert!(OwnerId::parse("\u{1b}[31m").is_err());
    }

    #[test]
    fn the_host_name_is_a_valid_default() {
        let id = OwnerId::from_host_name().expect("this machine has a host name");
        assert!(!id.as_str().is_empty());
    }
}
