//! Drills of base backups: the backup laid into a scratch data directory under `--drill-dir` (as a
//! real physical restore lays it), a scratch server ([`ScratchServer`]) with the drill's own
//! configuration replaying WAL to the end of its window — WAL the agent fetches, verifies and
//! hands over the drill's socket ([`crate::ops::drill::wal_feed`]), so the server holds no credential — and
//! promoting, then checks on the promoted copy: that replay reached the last archived segment,
//! `pg_amcheck` over every database, and every table's rows and checksum, recorded in the
//! report. Every event trigger of the copy is disabled before any of that runs.
//!
//! The counts are recorded, not compared: a base backup replayed to the end of its window holds
//! every write committed after the backup too, so nothing recorded at backup time can match it.
//! What fails a physical drill is what would fail a real restore — a damaged base backup or WAL
//! file, a gap, a server that cannot recover — and corruption that amcheck finds.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::ops::drill::{self as drills, Check, DrillError, Scratch, wal_feed};
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
    drills::make_root(&ctx.drill_dir, &staging, None, scratch).await?;
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
    let run_as = drills::run_as(&ctx.drill_dir).await?;
    let root = ctx.drill_dir.join(scratch.name("cluster"));
    drills::make_root(&ctx.drill_dir, &root, run_as, scratch).await?;
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
