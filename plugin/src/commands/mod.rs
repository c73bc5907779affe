//! One module per subcommand.

pub(crate) mod backup;
pub(crate) mod delete;
pub(crate) mod describe;
pub(crate) mod drill;
pub(crate) mod list;
pub(crate) mod platform;
pub(crate) mod prune;
pub(crate) mod restore;
pub(crate) mod status;
pub(crate) mod verify;

use soma_proto::{BackupId, IdEngine};

use crate::{cli::Command, error::CliError};

/// Checks what can be checked without the agent, so bad input fails fast with exit code 2.
pub(crate) fn validate(command: &Command) -> Result<(), CliError> {
    match command {
        Command::Restore(a) => {
            check_id(&a.id, true)?;
            if a.target_time.is_some()
                && a.pgdata.is_none()
                && BackupId::parse(&a.id)
                    .ok()
                    .and_then(|id| id.engine())
                    .is_some_and(|e| e != IdEngine::Set)
            {
                return Err(CliError::Usage(format!(
                    "--target-time without --pgdata applies to a backup set (or latest); {} is a single backup: add --pgdata DIR for a PostgreSQL base backup",
                    a.id
                )));
            }
            Ok(())
        }
        Command::Describe(a) | Command::Verify(a) => check_id(&a.id, true),
        Command::Delete(a) => check_id(&a.id, false),
        Command::Drill(a) => check_id(&a.id, true),
        Command::Backup(_)
        | Command::List(_)
        | Command::Status
        | Command::Completion(_)
        | Command::Prune(_) => Ok(()),
    }
}

/// The engine whose agent a command needs, when the command says (a backup of an engine, or an
/// id whose engine code names it); `None` lets any agent answer.
pub(crate) fn engine_of(command: &Command) -> Option<&'static str> {
    use crate::cli::BackupEngine;
    let from_id = |id: &str| match BackupId::parse(id).ok()?.engine()? {
        IdEngine::Postgres => Some("postgres"),
        IdEngine::Qdrant => Some("qdrant"),
        IdEngine::Set => None,
    };
    match command {
        Command::Backup(b) => match b.engine {
            BackupEngine::Postgres { .. } => Some("postgres"),
            BackupEngine::Qdrant { .. } => Some("qdrant"),
            BackupEngine::All { .. } => None,
        },
        Command::Restore(a) if a.pgdata.is_some() => Some("postgres"),
        Command::Restore(a) => a.engine.map(|e| e.label()).or_else(|| from_id(&a.id)),
        Command::Describe(a) | Command::Verify(a) => {
            a.engine.map(|e| e.label()).or_else(|| from_id(&a.id))
        }
        Command::Delete(a) => from_id(&a.id),
        Command::Drill(a) => a.engine.map(|e| e.label()).or_else(|| from_id(&a.id)),
        Command::List(_) | Command::Status | Command::Completion(_) | Command::Prune(_) => None,
    }
}

/// The backup id a command names, if any.
pub(crate) fn backup_id(command: &Command) -> Option<&str> {
    match command {
        Command::Restore(a) => Some(&a.id),
        Command::Describe(a) | Command::Verify(a) => Some(&a.id),
        Command::Delete(a) => Some(&a.id),
        Command::Drill(a) => Some(&a.id),
        _ => None,
    }
}

/// Refuses ids that cannot be backup ids before asking the agent (which checks again), so a typo
/// such as `../x` is a usage error with exit code 2.
pub(crate) fn check_id(id: &str, allow_latest: bool) -> Result<(), CliError> {
    if id == "latest" {
        return if allow_latest {
            Ok(())
        } else {
            Err(CliError::Usage(
                "\"latest\" is not accepted here: name the backup id explicitly (see `kubectl soma list`)".into(),
            ))
        };
    }
    BackupId::parse(id)
        .map(drop)
        .map_err(|e| CliError::Usage(e.to_string()))
}
