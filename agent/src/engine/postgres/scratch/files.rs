//! The files of a scratch server: what the drill writes into directories the server's user may
//! also write (created new, given away by descriptor), the restored files it replaces, and what
//! it reads back (PG_VERSION, the log's tail), all as untrusted.

use std::path::Path;

use super::{LOG_TAIL_BYTES, LOG_TAIL_LINES, ScratchError};

/// Creates `path` holding `text`, owned by `run_as` when given. The directories are the server's
/// user's to write, so the file is created new (never opened through a link planted there) and
/// given away by its descriptor, not its name.
pub(super) fn create_owned(
    path: &Path,
    text: &str,
    run_as: Option<(u32, u32)>,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    Ok(file)
}

/// Replaces what PostgreSQL reads from the data directory whatever `config_file` says: the
/// restored postgresql.auto.conf becomes an empty file of the drill's, and the signal files are
/// the drill's (recovery.signal when it recovers, never standby.signal). Removing an entry
/// removes a link itself, never what it points to; a directory in their place is refused.
pub(super) async fn replace_restored_files(
    pgdata: &Path,
    recovers: bool,
    run_as: Option<(u32, u32)>,
) -> Result<(), ScratchError> {
    let pgdata = pgdata.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let io = |action: &'static str| {
            let dir = pgdata.clone();
            move |source| ScratchError::Io {
                action,
                dir,
                source,
            }
        };
        for name in ["postgresql.auto.conf", "recovery.signal", "standby.signal"] {
            match std::fs::symlink_metadata(pgdata.join(name)) {
                Ok(m) if m.is_dir() => {
                    return Err(ScratchError::Unusable(format!(
                        "the restored data directory {} holds a directory named {name}; the drill refuses it",
                        pgdata.display()
                    )));
                }
                Ok(_) => std::fs::remove_file(pgdata.join(name))
                    .map_err(io("removing a restored configuration file"))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io("inspecting a restored configuration file")(e)),
            }
        }
        let mut written = vec![(
            "postgresql.auto.conf",
            "# Replaced by the restore drill: nothing of the restored file is read.\n",
        )];
        if recovers {
            written.push(("recovery.signal", ""));
        }
        for (name, text) in written {
            create_owned(&pgdata.join(name), text, run_as)
                .map_err(io("writing the drill's own configuration file"))?;
        }
        Ok(())
    })
    .await
    .map_err(|e| ScratchError::Unusable(format!("preparing the scratch data directory: {e}")))?
}

/// The major version a data directory was made by (its PG_VERSION file, read as untrusted).
pub(super) async fn data_major(pgdata: &Path) -> Result<u32, ScratchError> {
    let path = pgdata.join("PG_VERSION");
    let text = tokio::fs::read(&path)
        .await
        .map_err(|source| ScratchError::Io {
            action: "reading PG_VERSION",
            dir: pgdata.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&text[..text.len().min(16)])
        .trim()
        .to_string();
    match text.parse::<u32>() {
        Ok(major) if (10..100).contains(&major) => Ok(major),
        _ => Err(ScratchError::Unusable(format!(
            "the restored data directory's PG_VERSION says {text:?}, not a PostgreSQL major version"
        ))),
    }
}

/// The last [`LOG_TAIL_LINES`] lines of a log file, read from at most its last
/// [`LOG_TAIL_BYTES`].
pub(super) async fn log_tail(path: &Path) -> String {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return "(no server log)".into();
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let _ = file
        .seek(std::io::SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))
        .await;
    let mut buf = Vec::new();
    let _ = file.take(LOG_TAIL_BYTES).read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}
