//! The drill directory (`--drill-dir`): the user a scratch server runs as, each drill's own
//! root under it, and the sweep of what a drill of an agent that died mid-drill left there. Every
//! PostgreSQL drill (logical and physical) lays its scratch server here.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use super::{DrillError, Scratch, ScratchItem};
use crate::{engine::postgres::ScratchError, error::OpError};

/// Who the scratch server runs as: the agent's own user, unless that is root (PostgreSQL
/// refuses to run as root) — then the owner of the drill directory, else the `postgres` user.
pub(in crate::ops) async fn run_as(drill_dir: &Path) -> Result<Option<(u32, u32)>, OpError> {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    if let Ok(meta) = tokio::fs::metadata(drill_dir).await
        && meta.uid() != 0
    {
        return Ok(Some((meta.uid(), meta.gid())));
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some((user.uid.as_raw(), user.gid.as_raw()))),
        _ => Err(DrillError::from(ScratchError::Unusable(format!(
            "the agent runs as root, which PostgreSQL refuses to run as, and there is no `postgres` user: give --drill-dir ({}) to the user the scratch server should run as",
            drill_dir.display()
        )))
        .into()),
    }
}

/// Creates one of the drill's own directories (mode 0700, given to `run_as`) under the drill
/// directory, registered first so an interruption at any point removes it.
pub(in crate::ops) async fn make_root(
    drill_dir: &Path,
    root: &PathBuf,
    run_as: Option<(u32, u32)>,
    scratch: &Scratch,
) -> Result<(), OpError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |action: &'static str, dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| {
            OpError::from(DrillError::from(ScratchError::Io {
                action,
                dir,
                source,
            }))
        }
    };
    tokio::fs::create_dir_all(drill_dir)
        .await
        .map_err(io("creating the drill directory (--drill-dir)", drill_dir))?;
    let item = ScratchItem::Directory(root.clone());
    scratch.register(item.clone());
    if let Err(e) = tokio::fs::create_dir(root).await {
        // Not ours: never remove a directory this drill did not create.
        scratch.forget(&item);
        return Err(io("creating the scratch directory", root)(e));
    }
    tokio::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
        .await
        .map_err(io("setting mode 0700", root))?;
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(root, Some(uid), Some(gid)).map_err(io(
            "giving the scratch directory to the server's user",
            root,
        ))?;
    }
    Ok(())
}

/// Removes what drills of an agent that died mid-drill (killed, out of memory) left in the
/// drill directory: every `soma_drill_*` entry, after stopping the scratch server still running
/// in it — only a process whose command line names that very directory, so a recycled process id
/// is never signalled. The drill directory belongs to this agent alone (one per pod), so nothing
/// of another agent's drill is there.
pub(crate) async fn sweep(drill_dir: &Path) {
    let Ok(mut entries) = tokio::fs::read_dir(drill_dir).await else {
        return;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(super::SCRATCH_PREFIX) {
            continue;
        }
        let dir = entry.path();
        if let Some(pid) = orphan_server(&dir).await {
            stop_orphan(pid).await;
        }
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), "removed a scratch directory an interrupted drill left")
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "could not remove a scratch directory an interrupted drill left; remove it by hand")
            }
        }
    }
}

/// The process id in `dir/pgdata/postmaster.pid`, if that process is a server on that directory.
async fn orphan_server(dir: &Path) -> Option<i32> {
    let pgdata = dir.join("pgdata");
    let text = tokio::fs::read_to_string(pgdata.join("postmaster.pid"))
        .await
        .ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    if pid <= 1 {
        return None;
    }
    let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let wanted = pgdata.as_os_str().as_encoded_bytes();
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == wanted)
        .then_some(pid)
}

/// Immediate shutdown of an orphaned scratch server, waiting a bounded time for it to go.
async fn stop_orphan(pid: i32) {
    use nix::sys::signal::{Signal, kill};
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGQUIT);
    for _ in 0..100 {
        if !alive(pid.as_raw()).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Whether process `pid` still runs (a zombie has ended: only its parent's reaping is left).
async fn alive(pid: i32) -> bool {
    match tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}
