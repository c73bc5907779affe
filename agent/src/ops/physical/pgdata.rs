//! The data directory of a physical restore: checked empty (or created 0700), the base backup
//! unpacked into it, recovery configured, and — when anything fails — emptied again.

use std::{path::Path, sync::Arc};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{
    PhysicalDetails, PhysicalError,
    restore::{PgdataRestore, RecoveryTarget},
};
use crate::{
    catalog::{Artifact, Catalog, Manifest},
    error::OpError,
    ops::artifact::read_artifact,
    pipeline::Counters,
};

/// Creates the data directory (mode 0700, as PostgreSQL requires) or checks that it is empty.
pub(super) async fn prepare(dir: &Path) -> Result<(), PhysicalError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |action: &'static str| {
        move |source: std::io::Error| PhysicalError::Pgdata {
            dir: dir.to_path_buf(),
            action,
            source,
        }
    };
    match tokio::fs::read_dir(dir).await {
        Ok(mut entries) => {
            if let Some(entry) = entries.next_entry().await.map_err(io("listing"))? {
                return Err(PhysicalError::PgdataNotEmpty {
                    dir: dir.to_path_buf(),
                    entry: entry.file_name().to_string_lossy().into_owned(),
                });
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io("creating"))?;
        }
        Err(e) => return Err(io("opening")(e)),
    }
    tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(io("setting mode 0700"))
}

/// Streams the base backup from the store into a tar unpacker writing under `dir`.
pub(super) async fn lay_down(
    catalog: &Catalog,
    manifest: &Manifest,
    art: &Artifact,
    dir: &Path,
    counters: Arc<Counters>,
) -> Result<(), OpError> {
    let (writer, reader) = tokio::io::duplex(1 << 20);
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let (target, unpack_dir) = (dir.to_path_buf(), dir.to_path_buf());
    let unpack = tokio::task::spawn_blocking(move || {
        let mut archive = tar::Archive::new(bridge);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        archive.unpack(&target)
    });
    // A failed download drops the writer: the unpacker sees the end of its input and stops; the
    // caller then empties the directory.
    let unpacked = |_: CancellationToken| async move {
        match unpack.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(PhysicalError::Pgdata {
                dir: unpack_dir,
                action: "unpacking the base backup",
                source,
            }
            .into()),
            Err(join) => Err(OpError::Internal(format!(
                "the tar unpacker failed: {join}"
            ))),
        }
    };
    read_artifact(
        catalog.store().as_ref(),
        manifest,
        art,
        writer,
        0,
        counters,
        unpacked,
    )
    .await
}

/// Quotes a word for the shell that runs restore_command.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Quotes a value for postgresql.conf.
fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// PostgreSQL's restore_command: `wal-fetch` reading the store the base backup came from
/// (`--restore-from`, so it opens that store read-only, whichever flag named it here). Every word
/// is shell-quoted: the system id comes from a manifest, which is read from the store and so
/// untrusted. The location never carries credentials (those come from the AWS environment).
fn restore_command(agent_binary: &str, location: &str, system_id: &str) -> String {
    format!(
        "{} wal-fetch --restore-from {} --system-id {} %f %p",
        shell_quote(agent_binary),
        shell_quote(location),
        shell_quote(system_id)
    )
}

/// Writes recovery.signal and the recovery settings (appended to postgresql.auto.conf, which
/// PostgreSQL reads last, so they win over the backed-up configuration).
pub(super) async fn write_recovery_config(
    req: &PgdataRestore,
    manifest: &Manifest,
    details: &PhysicalDetails,
    catalog: &Catalog,
) -> Result<(), PhysicalError> {
    let io = |action: &'static str, source: std::io::Error| PhysicalError::Pgdata {
        dir: req.pgdata.clone(),
        action,
        source,
    };
    let restore_command = restore_command(
        &req.agent_binary.display().to_string(),
        &catalog.store().location(),
        &details.system_id,
    );
    let mut conf = format!(
        "\n# Point-in-time recovery written by soma-agent restore-pgdata from base backup {} at {}.\n\
         # PostgreSQL removes recovery.signal when recovery ends; these settings are then unused.\n\
         restore_command = {}\n\
         recovery_target_timeline = 'latest'\n",
        manifest.id,
        Utc::now().to_rfc3339(),
        conf_quote(&restore_command)
    );
    match &req.target {
        RecoveryTarget::Latest => {}
        RecoveryTarget::Time(t) => {
            conf.push_str(&format!(
                "recovery_target_time = {}\nrecovery_target_inclusive = on\nrecovery_target_action = 'promote'\n",
                conf_quote(&t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string())
            ));
        }
        RecoveryTarget::Lsn(l) => {
            conf.push_str(&format!(
                "recovery_target_lsn = {}\nrecovery_target_inclusive = on\nrecovery_target_action = 'promote'\n",
                conf_quote(&l.to_string())
            ));
        }
    }
    let auto = req.pgdata.join("postgresql.auto.conf");
    let mut existing = tokio::fs::read_to_string(&auto).await.unwrap_or_default();
    existing.push_str(&conf);
    tokio::fs::write(&auto, existing)
        .await
        .map_err(|e| io("writing postgresql.auto.conf", e))?;
    tokio::fs::write(req.pgdata.join("recovery.signal"), b"")
        .await
        .map_err(|e| io("writing recovery.signal", e))?;
    // A standby.signal from the source would turn the restore into a standby that never promotes.
    let _ = tokio::fs::remove_file(req.pgdata.join("standby.signal")).await;
    Ok(())
}

/// Removes everything inside `dir` after a failed restore (the directory was empty before).
pub(super) async fn clear(dir: &Path) {
    if let Ok(mut entries) = tokio::fs::read_dir(dir).await {
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            let removed = if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                tokio::fs::remove_dir_all(&path).await
            } else {
                tokio::fs::remove_file(&path).await
            };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "could not remove a file of the failed restore");
            }
        }
    }
}

/// When running as root (the agent beside a test server, or an init container without
/// runAsUser), gives the restored files to the data directory's owner, which PostgreSQL requires.
pub(super) async fn adopt_owner(dir: &Path) -> Result<(), PhysicalError> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    // The directory's owner when someone prepared it for us, else its parent's.
    let mut meta = None;
    for candidate in [Some(dir), dir.parent()].into_iter().flatten() {
        if let Ok(m) = tokio::fs::metadata(candidate).await
            && m.uid() != 0
        {
            meta = Some(m);
            break;
        }
    }
    let Some(meta) = meta else {
        return Ok(());
    };
    let (uid, gid) = (meta.uid(), meta.gid());
    let (dir, dir_for_error) = (dir.to_path_buf(), dir.to_path_buf());
    tokio::task::spawn_blocking(move || chown_tree(&dir, uid, gid))
        .await
        .expect("chown task panicked")
        .map_err(|source| PhysicalError::Pgdata {
            dir: dir_for_error,
            action: "giving the restored files to the directory's owner",
            source,
        })
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/usr/bin/soma-agent"), "/usr/bin/soma-agent");
        assert_eq!(shell_quote("s3://b/p x"), "'s3://b/p x'");
        assert_eq!(conf_quote("a 'b'"), "'a ''b'''");
    }

    #[test]
    fn restore_command_reads_the_source_read_only_and_quotes_every_word() {
        assert_eq!(
            restore_command(
                "/soma-bin/soma-agent",
                "s3://old/prod",
                "7312345678901234567"
            ),
            "/soma-bin/soma-agent wal-fetch --restore-from s3://old/prod --system-id 7312345678901234567 %f %p"
        );
        // A forged manifest cannot smuggle a second command into the shell.
        assert_eq!(
            restore_command("/a b/soma-agent", "file:///x", "1; rm -rf /"),
            "'/a b/soma-agent' wal-fetch --restore-from file:///x --system-id '1; rm -rf /' %f %p"
        );
    }
}
