//! Backup ids, shared by the agent (which makes and stores them) and the plugin (which checks
//! them before asking an agent and routes a command to the agent serving the id's engine): one
//! grammar, parsed in one place.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::v1;

/// Length of the `yyyymmddThhmmssZ` time stamp an id starts with.
const STAMP_LEN: usize = 16;

/// A string that is not a backup id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid backup id {0:?}: expected an id like 20261124T120000Z-pg-appdb-7f3a (see `kubectl soma list`) or \"latest\""
)]
pub struct InvalidBackupId(pub String);

/// What an id says about the backup's engine: the second field of the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdEngine {
    /// `pg`: a PostgreSQL backup (logical or physical).
    Postgres,
    /// `qd`: a Qdrant backup.
    Qdrant,
    /// `set`: a backup set of several engines.
    Set,
}

impl IdEngine {
    /// The code written into ids.
    pub fn code(self) -> &'static str {
        match self {
            IdEngine::Postgres => "pg",
            IdEngine::Qdrant => "qd",
            IdEngine::Set => "set",
        }
    }

    /// The engine of the gRPC contract.
    pub fn engine(self) -> v1::Engine {
        match self {
            IdEngine::Postgres => v1::Engine::Postgres,
            IdEngine::Qdrant => v1::Engine::Qdrant,
            IdEngine::Set => v1::Engine::Set,
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        [IdEngine::Postgres, IdEngine::Qdrant, IdEngine::Set]
            .into_iter()
            .find(|e| e.code() == code)
    }
}

/// A validated backup id: `<UTC yyyymmddThhmmssZ>-<engine code>-<target slug>-<4 hex>`.
///
/// Ids sort by time as plain strings; the target part is a lower-case, shortened form of the real
/// target (the manifest records it exactly). Only ASCII lower-case letters, digits and `-` follow
/// the time stamp, so an id is always safe as one component of a store key or a path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

impl BackupId {
    /// Makes a fresh id for a backup of `engine` and `target` taken at `at`.
    pub fn new(at: DateTime<Utc>, engine: IdEngine, target: &str) -> Self {
        let mut slug = String::with_capacity(target.len().min(64));
        for c in target.chars() {
            let c = if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            };
            // Runs of separators collapse into one.
            if c != '-' || !slug.ends_with('-') {
                slug.push(c);
            }
        }
        let slug = slug.trim_matches('-');
        let slug: String = slug.chars().take(40).collect();
        let slug = slug.trim_end_matches('-');
        let slug = if slug.is_empty() { "x" } else { slug };
        let rand: u16 = rand::random();
        Self(format!(
            "{}-{}-{slug}-{rand:04x}",
            at.format("%Y%m%dT%H%M%SZ"),
            engine.code()
        ))
    }

    /// Parses and validates an id given by a user or read from a store.
    pub fn parse(s: &str) -> Result<Self, InvalidBackupId> {
        let bad = || InvalidBackupId(s.to_string());
        if s.len() < 20 || s.len() > 100 || !s.is_ascii() {
            return Err(bad());
        }
        // ASCII only (checked above), so byte positions are character positions.
        let (stamp, rest) = s.split_at(STAMP_LEN);
        let stamp_ok = stamp.bytes().enumerate().all(|(i, b)| match i {
            8 => b == b'T',
            15 => b == b'Z',
            _ => b.is_ascii_digit(),
        });
        let rest_ok = rest.starts_with('-')
            && rest[1..]
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !rest.ends_with('-');
        if stamp_ok && rest_ok {
            Ok(Self(s.to_string()))
        } else {
            Err(bad())
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The engine the id names, when its code is one this version knows.
    pub fn engine(&self) -> Option<IdEngine> {
        let code = self.0.get(STAMP_LEN + 1..)?.split('-').next()?;
        IdEngine::from_code(code)
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BackupId {
    type Err = InvalidBackupId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for BackupId {
    type Error = InvalidBackupId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> Self {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_time_sortable_and_safe() {
        let at = DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let id = BackupId::new(at, IdEngine::Postgres, "App_DB/../etc");
        assert!(id.as_str().starts_with("20261124T120000Z-pg-app-db-etc-"));
        assert_eq!(BackupId::parse(id.as_str()).unwrap(), id);
        assert_eq!(id.engine(), Some(IdEngine::Postgres));
        let set = BackupId::new(at, IdEngine::Set, "all");
        assert_eq!(set.engine(), Some(IdEngine::Set));
        let odd = BackupId::new(at, IdEngine::Qdrant, "ÄÖ---x");
        assert!(odd.as_str().starts_with("20261124T120000Z-qd-x-"), "{odd}");
        for bad in [
            "../x",
            "latest",
            "20261124T120000Z-pg-../x",
            "20261124T120000Z-pg-appdb-7f3a/",
            "2026112XT120000Z-pg-appdb-7f3a",
            "20261124T120000Z-",
            // Multi-byte characters must be refused, never sliced through.
            "2026112é120000Z-pg-appdb-7f3a",
            "20261124T120000Zé-pg-appdb-7f3a",
        ] {
            assert!(BackupId::parse(bad).is_err(), "{bad:?} must be refused");
        }
        let unknown = BackupId::parse("20261124T120000Z-zz-appdb-7f3a").unwrap();
        assert_eq!(unknown.engine(), None);
    }
}
