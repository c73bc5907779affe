//! The data directory of a physical restore: checked empty (or created 0700), the base backup
//! unpacked into it, recovery configured, and — when anything fails — emptied again.

use std::{path::Path, sync::Arc};

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::{
    PhysicalDetails, PhysicalError, recovery_conf,
    restore::{PgdataRestore, RecoveryTarget},
    untar::{self, Stop, UntarError},
};
use crate::{
    catalog::{Artifact, Catalog, Manifest},
    error::OpError,
    ops::artifact::read_artifact,
    pipeline::Counters,
    store::Encryption,
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

/// Streams the base backup from the store into the unpacker writing under `dir`, which treats
/// the archive as hostile (see [`untar`]) and reads no more than the manifest's raw size of it.
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
    let limit = art.raw_bytes;
    let unpack = tokio::task::spawn_blocking(move || untar::unpack(bridge, &target, limit));
    let id = manifest.id.clone();
    // A failed download drops the writer: the unpacker sees the end of its input and stops; the
    // caller then empties the directory. A refusal drops the reader: the download stops too.
    let unpacked = |_: CancellationToken| async move {
        match unpack.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Stop::Refused(reason))) => Err(PhysicalError::UnsafeBaseBackup {
                id,
                dir: unpack_dir,
                reason,
            }
            .into()),
            Ok(Err(Stop::Io(source))) => Err(PhysicalError::Pgdata {
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

/// PostgreSQL's restore_command: `wal-fetch` reading the store the base backup came from
/// (`--restore-from`, so it opens that store read-only, whichever flag named it here), with the
/// same encryption keys, named by path (the PostgreSQL container mounts them where the agent
/// does). Every word is shell-quoted, and `%` doubled so PostgreSQL substitutes only its own `%f`
/// and `%p`: the system id comes from a manifest, which is read from the store and so untrusted.
/// Neither the location nor the key paths carry secrets (credentials come from the AWS
/// environment, keys from the files).
fn restore_command(
    agent_binary: &str,
    location: &str,
    system_id: &str,
    encryption: &Encryption,
) -> String {
    let word = |s: &str| shell_quote(s).replace('%', "%%");
    let mut keys = String::new();
    if let Encryption::On {
        key_files,
        accept_unencrypted,
        ..
    } = encryption
    {
        for file in key_files {
            keys.push_str(" --encryption-key-file ");
            keys.push_str(&word(&file.display().to_string()));
        }
        if let Some(cutoff) = accept_unencrypted {
            keys.push_str(" --accept-unencrypted ");
            keys.push_str(&word(
                &chrono::DateTime::<chrono::Utc>::from(*cutoff)
                    .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            ));
        }
    }
    format!(
        "{} wal-fetch --restore-from {}{keys} --system-id {} %f %p",
        word(agent_binary),
        word(location),
        word(system_id)
    )
}

/// Writes recovery.signal and this restore's recovery settings, which are the only ones left in
/// force (see [`recovery_conf`]): every inherited recovery setting in postgresql.auto.conf is
/// commented out, and the block appended last sets each one explicitly and removes itself when
/// recovery ends.
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
    let block = recovery_block(req, manifest, details, catalog);
    // The files come from the archive: none may be a link that would carry the writes outside.
    let refused = |reason| PhysicalError::UnsafeBaseBackup {
        id: manifest.id.clone(),
        dir: req.pgdata.clone(),
        reason,
    };
    let inherited_from = format!("inherited from base backup {}", manifest.id);
    let dir = req.pgdata.clone();
    let written = tokio::task::spawn_blocking(move || -> Result<(), Refusal> {
        write_auto_conf(&dir, &inherited_from, &block)?;
        create_recovery_signal(&dir)?;
        remove_standby_signal(&dir)
    })
    .await
    .map_err(|e| io("writing the recovery settings", std::io::Error::other(e)))?;
    match written {
        Ok(()) => Ok(()),
        Err(Refusal::Unsafe(reason)) => Err(refused(reason)),
        Err(Refusal::Io(action, e)) => Err(io(action, e)),
        Err(Refusal::Conf(why)) => Err(PhysicalError::AutoConf {
            id: manifest.id.clone(),
            why,
        }),
    }
}

/// The block of recovery settings this restore appends to postgresql.auto.conf.
fn recovery_block(
    req: &PgdataRestore,
    manifest: &Manifest,
    details: &PhysicalDetails,
    catalog: &Catalog,
) -> String {
    let agent = req.agent_binary.display().to_string();
    let nonce = recovery_conf::new_nonce();
    let origin = format!(
        "point-in-time recovery to {} from base backup {}, written at {}",
        req.target.describe(),
        manifest.id,
        Utc::now().to_rfc3339()
    );
    recovery_conf::Block {
        origin,
        restore_command: restore_command(
            &agent,
            &catalog.store().location(),
            &details.system_id,
            &catalog.store().encryption(),
        ),
        recovery_end_command: format!(
            "{} recovery-end --block {nonce}",
            shell_quote(&agent).replace('%', "%%")
        ),
        nonce,
        target: recovery_target(&req.target),
        has_promote_trigger_file: major_version(&req.pgdata).is_some_and(|v| v <= 15),
    }
    .render()
}

/// The one `recovery_target_*` setting a target needs; none to replay to the archive's end.
fn recovery_target(target: &RecoveryTarget) -> Option<recovery_conf::Target<'static>> {
    match target {
        RecoveryTarget::Latest => None,
        RecoveryTarget::Time(t) => Some(recovery_conf::Target {
            setting: "recovery_target_time",
            value: t.format("%Y-%m-%d %H:%M:%S%.6f%:z").to_string(),
        }),
        RecoveryTarget::Lsn(l) => Some(recovery_conf::Target {
            setting: "recovery_target_lsn",
            value: l.to_string(),
        }),
        RecoveryTarget::Name(n) => Some(recovery_conf::Target {
            setting: "recovery_target_name",
            value: n.clone(),
        }),
    }
}

/// A standby.signal from the source would turn the restore into a standby that never promotes.
/// Removing a link removes the link, not what it points to.
fn remove_standby_signal(dir: &Path) -> Result<(), Refusal> {
    match std::fs::symlink_metadata(dir.join(STANDBY_SIGNAL)) {
        Ok(m) if m.is_dir() => Err(Refusal::Unsafe(UntarError::NotAFile {
            file: STANDBY_SIGNAL,
            found: untar::found(&m),
        })),
        Ok(_) => std::fs::remove_file(dir.join(STANDBY_SIGNAL))
            .map_err(|e| Refusal::Io("removing standby.signal", e)),
        Err(_) => Ok(()),
    }
}

/// The major version in the laid-down `PG_VERSION` (from the archive: only ever compared).
fn major_version(dir: &Path) -> Option<u32> {
    let m = std::fs::symlink_metadata(dir.join("PG_VERSION")).ok()?;
    if !m.is_file() || m.len() > 16 {
        return None;
    }
    std::fs::read_to_string(dir.join("PG_VERSION"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

use recovery_conf::AUTO_CONF;
const RECOVERY_SIGNAL: &str = "recovery.signal";
const STANDBY_SIGNAL: &str = "standby.signal";

/// Why a recovery file was not written.
#[derive(Debug)]
enum Refusal {
    /// The archive put something other than a regular file there.
    Unsafe(UntarError),
    /// The filesystem failed.
    Io(&'static str, std::io::Error),
    /// A configuration file the restore cannot rewrite (too large).
    Conf(String),
}

/// Rewrites the configuration files in `dir` so this restore's recovery settings are the only
/// ones: postgresql.conf (when the data directory holds it) with its recovery settings commented
/// out, and postgresql.auto.conf (created when missing) with its recovery settings and include
/// directives commented out, followed by `block`. Nothing is read or written through a link (see
/// [`recovery_conf::read_conf`] and [`recovery_conf::replace_conf`]).
fn write_auto_conf(dir: &Path, inherited_from: &str, block: &str) -> Result<(), Refusal> {
    use recovery_conf::ReadError;
    let read = |name: &'static str| match recovery_conf::read_conf(
        dir,
        name,
        recovery_conf::MAX_AUTO_CONF,
    ) {
        Ok(text) => Ok(text),
        Err(ReadError::NotAFile(found)) => {
            Err(Refusal::Unsafe(UntarError::NotAFile { file: name, found }))
        }
        Err(ReadError::Refused(why)) => Err(Refusal::Conf(format!("{name} {why}"))),
        Err(ReadError::Io(action, e)) => Err(Refusal::Io(action, e)),
    };
    let write = |name: &str, bytes: &[u8]| {
        recovery_conf::replace_conf(dir, name, bytes).map_err(|(action, e)| Refusal::Io(action, e))
    };
    if let Some(main) = read(MAIN_CONF)? {
        let neutral = recovery_conf::neutralise(&main, inherited_from, false);
        if neutral != main {
            write(MAIN_CONF, &recovery_conf::latin1(&neutral))?;
        }
    }
    let old = read(AUTO_CONF)?.unwrap_or_default();
    let mut bytes = recovery_conf::latin1(&recovery_conf::neutralise(&old, inherited_from, true));
    bytes.extend_from_slice(block.as_bytes());
    write(AUTO_CONF, &bytes)
}

/// The main configuration file, when the data directory holds it (Docker images do; Debian's
/// packages keep it in /etc, which the restore leaves alone: the operator's own).
const MAIN_CONF: &str = "postgresql.conf";

/// Creates `path` (mode 0600), failing if anything is there: `create_new` is O_CREAT|O_EXCL, which
/// fails on a symbolic link instead of following it.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// Creates the empty recovery.signal in `dir`, accepting a regular file already there (PostgreSQL
/// only checks that it exists) and refusing anything else, without following a symbolic link.
fn create_recovery_signal(dir: &Path) -> Result<(), Refusal> {
    let path = dir.join(RECOVERY_SIGNAL);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) => Err(Refusal::Unsafe(UntarError::NotAFile {
            file: RECOVERY_SIGNAL,
            found: untar::found(&m),
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_new(&path)
            .map(drop)
            .map_err(|e| Refusal::Io("writing recovery.signal", e)),
        Err(e) => Err(Refusal::Io("inspecting recovery.signal", e)),
    }
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
        assert_eq!(recovery_conf::conf_quote("a 'b'"), "'a ''b'''");
    }

    #[test]
    fn restore_command_reads_the_source_read_only_and_quotes_every_word() {
        assert_eq!(
            restore_command(
                "/soma-bin/soma-agent",
                "s3://old/prod",
                "7312345678901234567",
                &Encryption::Off
            ),
            "/soma-bin/soma-agent wal-fetch --restore-from s3://old/prod --system-id 7312345678901234567 %f %p"
        );
        // A forged manifest cannot smuggle a second command into the shell, nor a `%` escape.
        assert_eq!(
            restore_command(
                "/a b/soma-agent",
                "file:///x",
                "1; rm -rf / %p",
                &Encryption::Off
            ),
            "'/a b/soma-agent' wal-fetch --restore-from file:///x --system-id '1; rm -rf / %%p' %f %p"
        );
        // The keys travel by path, every one, in order.
        let keys = Encryption::On {
            fingerprints: vec!["0011223344556677".into(), "8899aabbccddeeff".into()],
            accept_unencrypted: Some(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_083_200_500),
            ),
            repository: None,
            key_files: vec!["/keys/new".into(), "/keys/my old".into()],
        };
        assert_eq!(
            restore_command("/soma-agent", "s3://b/p", "7", &keys),
            "/soma-agent wal-fetch --restore-from s3://b/p --encryption-key-file /keys/new --encryption-key-file '/keys/my old' --accept-unencrypted 2026-12-01T00:00:00.500Z --system-id 7 %f %p"
        );
    }

    /// A data directory where the archive left `name` as a link to `outside`, a file beside it.
    fn linked(name: &str) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pgdata");
        std::fs::create_dir(&dir).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(name)).unwrap();
        (tmp, dir, outside)
    }

    /// The measured attack: `recovery.signal` a link to a file outside the data directory, which
    /// writing the empty signal file truncated (any file on the host, restored as root).
    #[test]
    fn the_signal_file_is_never_written_through_a_link() {
        let (_tmp, dir, outside) = linked(RECOVERY_SIGNAL);
        match create_recovery_signal(&dir) {
            Err(Refusal::Unsafe(UntarError::NotAFile { file, found })) => {
                assert_eq!((file, found), (RECOVERY_SIGNAL, "a symbolic link"));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    }

    /// The same with postgresql.auto.conf, which the restore rewrites: through a link it would
    /// read, and replace, a file outside.
    #[test]
    fn the_settings_are_never_written_through_a_link() {
        let (_tmp, dir, outside) = linked(AUTO_CONF);
        match write_auto_conf(&dir, "test", "restore_command = 'x'\n") {
            Err(Refusal::Unsafe(UntarError::NotAFile { found, .. })) => {
                assert_eq!(found, "a symbolic link");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        // A dangling link (to a file that does not exist yet) is not created through either.
        std::fs::remove_file(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, dir.join(RECOVERY_SIGNAL)).unwrap();
        assert!(matches!(
            write_auto_conf(&dir, "test", "x"),
            Err(Refusal::Unsafe(_))
        ));
        assert!(matches!(
            create_recovery_signal(&dir),
            Err(Refusal::Unsafe(_))
        ));
        assert!(!outside.exists());
    }

    #[test]
    fn recovery_files_are_rewritten_or_created() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join(AUTO_CONF),
            b"work_mem = '8MB'\nrecovery_target_time = '2026-01-01 00:00:00+00'\n",
        )
        .unwrap();
        write_auto_conf(tmp.path(), "old", "restore_command = 'x'\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(AUTO_CONF)).unwrap(),
            "work_mem = '8MB'\n\
             # soma-agent restore-pgdata (old): lines starting \"#~ \" set recovery settings or included files, and are disabled\n\
             #~ recovery_target_time = '2026-01-01 00:00:00+00'\n\
             restore_command = 'x'\n"
        );
        create_recovery_signal(tmp.path()).unwrap();
        create_recovery_signal(tmp.path()).unwrap();
        assert!(tmp.path().join(RECOVERY_SIGNAL).is_file());
        let fresh = tmp.path().join("fresh");
        std::fs::create_dir(&fresh).unwrap();
        write_auto_conf(&fresh, "old", "a = 1\n").unwrap();
        assert_eq!(std::fs::read(fresh.join(AUTO_CONF)).unwrap(), b"a = 1\n");
        // Too large to be an automatic configuration file: refused, nothing replaced.
        let big = "# padding\n".repeat(1_700_000);
        std::fs::write(fresh.join(AUTO_CONF), &big).unwrap();
        assert!(matches!(
            write_auto_conf(&fresh, "old", "a = 1\n"),
            Err(Refusal::Conf(_))
        ));
        assert_eq!(std::fs::read_to_string(fresh.join(AUTO_CONF)).unwrap(), big);
    }
}
