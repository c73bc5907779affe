//! Drills of base backups: the backup laid into a scratch data directory under `--drill-dir` (as a
//! real physical restore lays it), a scratch server ([`ScratchServer`]) with the drill's own
//! configuration replaying WAL to the end of its window — WAL the agent fetches, verifies and
//! hands over the drill's socket ([`super::wal_feed`]), so the server holds no credential — and
//! promoting, then checks on the promoted copy: that replay reached the last archived segment,
//! `pg_amcheck` over every database, and every table's rows and checksum, recorded in the
//! report. Every event trigger of the copy is disabled before any of that runs.
//!
//! The counts are recorded, not compared: a base backup replayed to the end of its window holds
//! every write committed after the backup too, so nothing recorded at backup time can match it.
//! What fails a physical drill is what would fail a real restore — a damaged base backup or WAL
//! file, a gap, a server that cannot recover — and corruption that amcheck finds.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Check, DrillError, Scratch, ScratchItem, wal_feed};
use crate::{
    catalog::Manifest,
    engine::postgres::{Postgres, ScratchError, ScratchServer},
    error::OpError,
    jobs::Reporter,
    lsn::Lsn,
    ops::{
        Context,
        method::DrillResult,
        physical::{PgdataRestore, PgdataRestored, RecoveryTarget, restore_pgdata},
    },
    wal::WalArchive,
};

/// How long a scratch server may replay before the drill gives up.
const RECOVERY_LIMIT: Duration = Duration::from_secs(12 * 3600);

/// Restores `m` into a scratch data directory, recovers and checks it; the RTO runs from the
/// start of the download until the promoted copy accepted connections.
pub(in crate::ops) async fn drill(
    ctx: &Arc<Context>,
    m: &Manifest,
    scratch: &Scratch,
    reporter: &Reporter,
) -> Result<DrillResult, OpError> {
    let pg = ctx.postgres()?;
    let laid = lay_down(ctx, m, scratch, reporter).await?;
    let mut checks = vec![Check::fact(
        "base backup",
        "restores with every checksum verified",
        format!("laid down in {:.1} s", laid.seconds),
        true,
    )];
    let (restored, root, run_as) = (&laid.restored, &laid.root, laid.run_as);
    reporter.phase(
        "recovering",
        format!(
            "a scratch PostgreSQL server replays WAL from {} to the end of the archive (LSN {} on timeline {}) and promotes",
            restored.details.start_lsn, restored.window.latest_lsn, restored.window.timeline
        ),
    );
    // Fetched into a directory of the agent's own, which the scratch server cannot write.
    let staging = ctx.drill_dir.join(scratch.name("wal"));
    make_root(&ctx.drill_dir, &staging, None, scratch).await?;
    let socket = root.join("wal.sock");
    let archive = WalArchive::new(ctx.source.store().clone(), &restored.details.system_id);
    let _feed = wal_feed::WalFeed::start(archive, &socket, staging, run_as)
        .await
        .map_err(DrillError::from)?;
    let restore_command = wal_feed::restore_command(&laid.req.agent_binary, &socket);
    let server = ScratchServer::start(pg, &laid.req.pgdata, root, run_as, Some(&restore_command))
        .await
        .map_err(DrillError::from)?;
    let mut held = scratch.server.lock().await;
    let server = held.insert(server);
    let client = match server
        .ready(pg, &pg.default_database(), RECOVERY_LIMIT)
        .await
    {
        Ok(client) => client,
        Err(e @ (ScratchError::Exited { .. } | ScratchError::TooSlow { .. })) => {
            checks.push(Check::fact(
                "recovery",
                "replays the archive and promotes",
                e.to_string(),
                false,
            ));
            let rto_seconds = laid.started.elapsed().as_secs_f64();
            return Ok(DrillResult {
                rto_seconds,
                checks,
            });
        }
        Err(e) => return Err(DrillError::from(e).into()),
    };
    let rto_seconds = laid.started.elapsed().as_secs_f64();
    checks.extend(validate(pg, server, &client, laid.last_segment(), reporter).await?);
    Ok(DrillResult {
        rto_seconds,
        checks,
    })
}

/// A base backup laid into the drill's scratch data directory.
struct Laid {
    /// The drill's directory under `--drill-dir` (the data directory, the server's socket).
    root: PathBuf,
    /// Who the scratch server runs as.
    run_as: Option<(u32, u32)>,
    /// The restore as laid (its data directory, the agent binary the server fetches WAL with).
    req: PgdataRestore,
    /// What the restore found: the backup's details and its WAL window.
    restored: PgdataRestored,
    /// When the download started: the start of the RTO.
    started: Instant,
    /// Seconds the laying took.
    seconds: f64,
}

impl Laid {
    /// Replay must at least read into the last archived segment: a damaged or missing one before
    /// it ends recovery early (wal-fetch refuses a damaged file, and the server stops).
    fn last_segment(&self) -> Lsn {
        let seg_size = self.restored.details.wal_segment_size;
        Lsn(self.restored.window.latest_lsn.0.saturating_sub(1) / seg_size * seg_size)
            .max(self.restored.details.start_lsn)
    }
}

/// Creates the scratch data directory and lays the base backup into it, every checksum verified.
async fn lay_down(
    ctx: &Context,
    m: &Manifest,
    scratch: &Scratch,
    reporter: &Reporter,
) -> Result<Laid, OpError> {
    reporter.phase("preparing", "creating the scratch data directory");
    let run_as = run_as(&ctx.drill_dir).await?;
    let root = ctx.drill_dir.join(scratch.name("cluster"));
    make_root(&ctx.drill_dir, &root, run_as, scratch).await?;
    let pgdata = root.join("pgdata");
    let agent_binary = std::env::current_exe()
        .map_err(|e| OpError::Internal(format!("locating the soma-agent binary: {e}")))?;
    let req = PgdataRestore::new(
        m.id.to_string(),
        pgdata.clone(),
        RecoveryTarget::Latest,
        agent_binary,
    );
    reporter.phase(
        "restoring",
        format!(
            "{} → zstd → tar into scratch data directory {}",
            m.id,
            pgdata.display()
        ),
    );
    let started = Instant::now();
    let restored = restore_pgdata(&ctx.source, &req, reporter.counters()).await?;
    Ok(Laid {
        root,
        run_as,
        req,
        restored,
        started,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The checks on the promoted copy, every event trigger disabled first: replay reached
/// `last_segment`, amcheck, and every table's rows and checksum (recorded, not compared).
async fn validate(
    pg: &Postgres,
    server: &ScratchServer,
    client: &Postgres,
    last_segment: Lsn,
    reporter: &Reporter,
) -> Result<Vec<Check>, OpError> {
    let home = pg.default_database();
    reporter.phase("validating", "disabling every event trigger of the copy");
    let connectable = ScratchServer::disarm(client, &home).await?;
    reporter.phase("validating", "checking replay, amcheck, counting rows");
    let replayed = client
        .query(&home, "select pg_last_wal_replay_lsn()")
        .await?;
    let replayed_lsn = replayed.trim().parse::<Lsn>().ok();
    let mut checks = vec![Check::fact(
        "recovery",
        &format!("replays into the last archived segment (LSN ≥ {last_segment}) and promotes"),
        format!("replayed to LSN {}, promoted", replayed.trim()),
        replayed_lsn.is_some_and(|l| l >= last_segment),
    )];
    reporter.phase(
        "validating",
        "pg_amcheck: every heap and B-tree index of every database",
    );
    let installed = ScratchServer::install_amcheck(client, &connectable).await;
    let failed = |e: String| Check::fact("amcheck", AMCHECK_CLEAN, e, false);
    checks.push(match installed {
        Err(e) => Check::skipped(
            "amcheck",
            format!("not checked: the amcheck extension could not be created in the copy: {e}"),
        ),
        Ok(()) => match server.amcheck(pg, &home).await {
            Ok((clean, said)) => Check::fact("amcheck", AMCHECK_CLEAN, said, clean),
            Err(e) => failed(format!("could not check: {e}")),
        },
    });
    for db in ScratchServer::databases(client, &home).await? {
        reporter.phase(
            "validating",
            format!("counting rows and checksumming the tables of {db}"),
        );
        for t in client.table_stats(&db, None).await? {
            let name = t.name();
            let counted = |what: &str, found: String| {
                Check::fact(
                    format!("{db}: {what} of {name}"),
                    "counted on the restored copy",
                    found,
                    true,
                )
            };
            checks.push(counted("rows", t.rows.to_string()));
            checks.push(counted("checksum", t.checksum));
        }
    }
    Ok(checks)
}

/// What a clean amcheck is expected to say.
const AMCHECK_CLEAN: &str = "no corruption in any table or B-tree index";

/// Who the scratch server runs as: the agent's own user, unless that is root (PostgreSQL
/// refuses to run as root) — then the owner of the drill directory, else the `postgres` user.
pub(super) async fn run_as(drill_dir: &Path) -> Result<Option<(u32, u32)>, OpError> {
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
pub(super) async fn make_root(
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
pub async fn sweep(drill_dir: &Path) {
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
