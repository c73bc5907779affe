//! `soma-agent`: the sidecar that streams database backups to object storage and back.
//!
//! Modules follow the data path: [`server`] (gRPC) starts [`jobs`] that run [`ops`]; operations
//! pull bytes from an [`engine`], push them through the [`pipeline`] (the only place bytes are
//! compressed and hashed) into a [`store`], and record them in the [`catalog`].

// The public surface is what the binary, the integration and property tests and the fuzz
// targets use: the configuration the binary parses, the store seam the conformance suite runs
// against every backend, and the store's formats (catalog, digests, LSNs) the property tests pin
// down. Everything else is the crate's own (`unreachable_pub` keeps it so).
pub mod catalog;
pub mod config;
pub mod digest;
pub(crate) mod engine;
pub(crate) mod error;
pub(crate) mod failures;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod jobs;
pub mod lsn;
pub(crate) mod metrics;
pub(crate) mod ops;
pub(crate) mod owner;
pub(crate) mod pipeline;
pub(crate) mod retention;
pub(crate) mod runner;
pub(crate) mod schedule;
pub(crate) mod server;
pub mod store;
pub(crate) mod timeline_history;
pub(crate) mod wal;

pub use ops::drill::wal_feed::fetch as drill_wal_fetch;

/// Parts the integration and property tests reach below the public modules: the dump's
/// validation data (computed by the tests on a real pg_dump stream), the base backup
/// untarring, and the WAL archive's names and index. Not an API.
#[doc(hidden)]
pub mod testing {
    pub use crate::engine::postgres::Postgres;
    pub use crate::engine::postgres::dump_stats::{DumpStats, dump_stats};
    pub use crate::engine::postgres::validation::{DumpTee, TableStats};
    pub use crate::ops::physical::untar;
    pub use crate::wal::history::parse_history;
    pub use crate::wal::index::WalIndex;
    pub use crate::wal::naming::{Kind as WalKind, WalFile, WalObject};
}

use std::time::Duration;

use anyhow::Context as _;
use soma_proto::v1::soma_agent_server::SomaAgentServer;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    catalog::Catalog,
    config::{Config, RestorePgdataArgs, Security, WalFetchArgs},
    engine::{postgres::Postgres, qdrant::Qdrant},
    jobs::Jobs,
    metrics::Metrics,
    ops::Context,
    owner::OwnerId,
    runner::Runner,
    server::AgentService,
    wal::stream::{StreamConfig, StreamHandle},
};

/// Largest request the API decodes: requests name backups and targets, nothing bulky, so
/// anything larger is refused before it is read into memory.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// How long interrupted operations may take to clean up on shutdown.
const JOBS_GRACE: Duration = Duration::from_secs(20);
/// How long the start-up sweep of crashed uploads may take before the agent starts anyway.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long requests in flight (e.g. a client following progress) may keep the gRPC server open
/// after a shutdown signal.
const SERVER_GRACE: Duration = Duration::from_secs(10);

/// `soma-agent restore-pgdata`: lays a base backup into an empty data directory and configures
/// point-in-time recovery. Prints the summary on stdout.
pub async fn restore_pgdata(config: &Config, args: &RestorePgdataArgs) -> anyhow::Result<()> {
    let store = config
        .store
        .read_source()
        .await
        .map_err(anyhow::Error::msg)?;
    let catalog = Catalog::new(store);
    let target = ops::physical::RecoveryTarget::from_options(
        args.target_time.as_deref(),
        args.target_lsn.as_deref(),
        args.target_name.as_deref(),
        args.target.is_some(),
    )?;
    let agent_binary = match &args.agent_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating the soma-agent binary")?,
    };
    let req = ops::physical::PgdataRestore::new(
        args.backup.clone(),
        args.pgdata.clone(),
        target,
        agent_binary,
    );
    let span =
        tracing::info_span!("restore_pgdata", backup = %req.backup, pgdata = %req.pgdata.display());
    let restored = ops::physical::restore_pgdata(&catalog, &req, Default::default())
        .instrument(span)
        .await?;
    println!("{}", restored.summary);
    Ok(())
}

/// `soma-agent recovery-end`: PostgreSQL's recovery_end_command. Removes the restore's block of
/// recovery settings; when it cannot, says so in the server log (PostgreSQL goes on with a
/// warning) and the next restore of a base backup that carries them neutralises them anyway.
pub fn recovery_end(args: &config::RecoveryEndArgs) -> anyhow::Result<()> {
    let dir = match &args.pgdata {
        Some(dir) => dir.clone(),
        None => std::env::current_dir().context("finding the data directory")?,
    };
    ops::physical::recovery_end(&dir, &args.block)?;
    tracing::info!(block = %args.block, "removed the restore's recovery settings from postgresql.auto.conf");
    Ok(())
}

/// What `wal-fetch` tells PostgreSQL through its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalFetchOutcome {
    /// The file is in place.
    Restored,
    /// The archive has no such file: the end of the archive (exit 1).
    NotFound,
    /// Recovery must stop: an exit status above 125, which PostgreSQL treats as fatal rather than
    /// as the end of the archive.
    Fatal,
}

/// `soma-agent wal-fetch`: PostgreSQL's restore_command.
pub async fn wal_fetch(config: &Config, args: &WalFetchArgs) -> WalFetchOutcome {
    let fail = |what: String| {
        eprintln!("soma-agent wal-fetch: FATAL: {what}; recovery stops here rather than end early");
        WalFetchOutcome::Fatal
    };
    let Some(file) = wal::WalFile::parse(&args.file) else {
        // PostgreSQL also asks for files we never archive (e.g. backup history); not ours.
        return WalFetchOutcome::NotFound;
    };
    let store = match config.store.read_source().await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let archive = wal::WalArchive::new(store, &args.system_id);
    match archive.fetch(&file, &args.destination).await {
        Ok(wal::Fetched::Restored(_)) => WalFetchOutcome::Restored,
        Ok(wal::Fetched::NotFound) => WalFetchOutcome::NotFound,
        Err(e) => fail(error::render(&e)),
    }
}

/// Runs the agent until SIGTERM or Ctrl-C, then stops in order: the gRPC server stops accepting
/// (requests in flight get [`SERVER_GRACE`]), and the WAL stream drains — what the server had
/// flushed when the signal came is shipped — before this returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Installed first, so a signal during start-up already counts.
    let shutdown = cancel_on_signal()?;
    let security = config.server.security()?;
    let schedules = config.schedule.parsed().map_err(anyhow::Error::msg)?;
    let engines = Engines::from_config(&config)?;
    let owner = config.store.owner()?;
    let (catalog, source) = open_catalogs(&config, &engines, &owner).await?;
    let settings = config.pipeline.settings();
    let wal_stream = engines.start_wal_stream(&catalog, &settings, &shutdown);
    let ctx = std::sync::Arc::new(Context {
        source,
        catalog,
        postgres: engines.postgres,
        qdrant: engines.qdrant,
        qdrant_mode: config.qdrant.qdrant_mode,
        settings,
        wal_stream: wal_stream.as_ref().map(WalStream::info),
        retention: config.operations.retention.clone(),
        drill_dir: config.operations.drill_dir.clone(),
        restore_root: config.operations.restore_root.clone(),
        replay: Default::default(),
    });
    let (service, jobs) = start_services(&config, &ctx, schedules, owner, &shutdown).await?;
    let served = serve_api(&config, security, service, &shutdown).await;
    stop(&shutdown, &jobs, wal_stream, served).await
}

/// A token cancelled on SIGTERM or Ctrl-C.
fn cancel_on_signal() -> anyhow::Result<CancellationToken> {
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let cancel = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            // A handler that cannot be installed must not count as a signal.
            Ok(()) = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
        }
        cancel.cancel();
    });
    Ok(shutdown)
}

/// The engines the flags name, built and checked before any store is opened.
struct Engines {
    postgres: Option<Postgres>,
    qdrant: Option<Qdrant>,
    /// The WAL stream's settings with --wal-stream (clap makes it require --postgres-url).
    wal_stream: Option<StreamConfig>,
}

impl Engines {
    fn from_config(config: &Config) -> anyhow::Result<Self> {
        let postgres = config.postgres.engine()?;
        let wal_stream = config.wal.stream(config.store.store_read_only)?;
        if wal_stream.is_some() && postgres.is_none() {
            // clap refuses this first; kept so that no change there can leave --wal-stream
            // silently not streaming.
            anyhow::bail!(
                "--wal-stream (SOMA_WAL_STREAM) needs the PostgreSQL server: set --postgres-url"
            );
        }
        let qdrant = config.qdrant.engine()?;
        Ok(Self {
            postgres,
            qdrant,
            wal_stream,
        })
    }

    /// The engines whose uploads a crash of this agent's owner can leave behind.
    fn ids(&self) -> Vec<catalog::IdEngine> {
        let mut engines = Vec::new();
        if self.postgres.is_some() {
            engines.push(catalog::IdEngine::Postgres);
        }
        if self.qdrant.is_some() {
            engines.push(catalog::IdEngine::Qdrant);
        }
        engines
    }

    /// Starts streaming WAL into `catalog`'s store with --wal-stream.
    fn start_wal_stream(
        &self,
        catalog: &Catalog,
        settings: &pipeline::Settings,
        shutdown: &CancellationToken,
    ) -> Option<WalStream> {
        let (Some(pg), Some(config)) = (&self.postgres, &self.wal_stream) else {
            return None;
        };
        let handle = wal::stream::spawn(
            config.clone(),
            pg.clone(),
            catalog.store().clone(),
            settings.clone(),
            shutdown.child_token(),
        );
        Some(WalStream {
            config: config.clone(),
            handle,
        })
    }
}

/// The running WAL stream and the settings it was started with.
struct WalStream {
    config: StreamConfig,
    handle: StreamHandle,
}

impl WalStream {
    fn info(&self) -> ops::WalStreamInfo {
        ops::WalStreamInfo {
            config: self.config.clone(),
            status: self.handle.status.clone(),
        }
    }

    /// Waits, bounded, for the stream to drain once the shutdown token is cancelled.
    async fn stop(self) -> anyhow::Result<()> {
        let bound = self.config.stop_bound();
        match tokio::time::timeout(bound, self.handle.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => anyhow::bail!("the WAL stream task failed while stopping: {e}"),
            Err(_) => anyhow::bail!(
                "the WAL stream did not stop within {bound:?}; WAL it had not shipped stays in the spool ({}) and the replication slot, and the next start ships it",
                self.config.spool.display()
            ),
        }
    }
}

/// Opens --store and --restore-from and sweeps what a crash of this owner left in --store.
/// Returns the catalog backups go to and the one restores read.
async fn open_catalogs(
    config: &Config,
    engines: &Engines,
    owner: &OwnerId,
) -> anyhow::Result<(Catalog, Catalog)> {
    // One record for --store and --restore-from: status reports what the agent's requests met.
    let health = store::StoreHealth::default();
    let stores = config.store.open_both(&health).await?;
    let store = stores.store;
    let catalog = Catalog::new(store.clone()).with_owner(owner.clone());
    // Restores read the --restore-from store when given; nothing in this agent can write there.
    let source = stores
        .restore_from
        .map_or_else(|| catalog.clone(), Catalog::new);
    tracing::info!(
        store = %store.location(),
        store_read_only = store.is_read_only(),
        encryption = %store.encryption(),
        restore_from = %source.store().location(),
        owner = %owner,
        postgres = ?engines.postgres.as_ref().map(|p| p.server()),
        qdrant = ?engines.qdrant.as_ref().map(|q| q.url()),
        "starting"
    );
    if store.is_read_only() {
        tracing::info!("--store is read-only: no sweep of incomplete uploads");
    } else {
        sweep_incomplete(&catalog, &engines.ids(), owner).await;
    }
    Ok((catalog, source))
}

/// Aborts the incomplete uploads of this owner's engines. Only a crash of this agent's owner
/// leaves them behind, and nothing of ours runs yet; other owners' uploads may be in flight right
/// now and are left alone. Bounded: a store that does not answer delays the start by
/// [`SWEEP_TIMEOUT`] at most.
async fn sweep_incomplete(catalog: &Catalog, engines: &[catalog::IdEngine], owner: &OwnerId) {
    let sweep = catalog.sweep_incomplete(engines, owner);
    match tokio::time::timeout(SWEEP_TIMEOUT, sweep).await {
        Ok(Ok(aborted)) => {
            for u in &aborted {
                tracing::warn!(key = %u.key, "aborted an incomplete upload left by an interrupted backup of this owner");
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not sweep incomplete uploads; continuing")
        }
        Err(_) => tracing::warn!("sweeping incomplete uploads timed out; continuing"),
    }
}

/// Starts what runs beside the API: the replay watch, the metrics endpoint, the schedules; and
/// returns the API's service with the jobs it starts.
async fn start_services(
    config: &Config,
    ctx: &std::sync::Arc<Context>,
    schedules: Vec<schedule::Schedule>,
    owner: OwnerId,
    shutdown: &CancellationToken,
) -> anyhow::Result<(AgentService, std::sync::Arc<Jobs>)> {
    if let Some(pg) = &ctx.postgres {
        ops::physical::spawn_watch(
            pg.clone(),
            ctx.source.store().clone(),
            ctx.replay.clone(),
            shutdown.child_token(),
        );
    }
    schedule::run::validate(&schedules, ctx).map_err(anyhow::Error::msg)?;
    // Before any drill can start: what a killed agent's drills left is removed first.
    ops::drill::sweep_drill_dir(&ctx.drill_dir).await;
    let metrics = std::sync::Arc::new(Metrics::new());
    let jobs = std::sync::Arc::new(
        Jobs::new(shutdown.child_token()).with_limit(config.operations.max_operations),
    );
    let runner = Runner::new(ctx.clone(), jobs.clone(), metrics.clone());
    metrics::spawn_catalog_refresh(metrics.clone(), ctx.catalog.clone(), shutdown.child_token());
    if let Some(addr) = config.metrics.metrics_listen {
        let served = metrics::http::Served {
            metrics,
            ctx: ctx.clone(),
            wal_stuck_after: config.metrics.wal_stuck_after,
        };
        serve_metrics(addr, served, shutdown).await?;
    }
    let schedule_handles = schedule::spawn(
        schedules,
        runner.clone(),
        config.schedule.options(owner),
        shutdown.child_token(),
    );
    for h in &schedule_handles {
        tracing::info!(schedule = %h.schedule.spec(), timezone = %h.timezone.name(), "schedule enabled");
    }
    Ok((AgentService::new(runner, schedule_handles), jobs))
}

/// Serves --metrics-listen and says where on stdout.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    served: metrics::http::Served,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let bound = metrics::http::serve(addr, served, shutdown.child_token())
        .await
        .with_context(|| format!("binding --metrics-listen {addr}"))?;
    tracing::info!(addr = %bound, "serving metrics");
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("soma-agent metrics on {bound}\n").as_bytes())
        .await?;
    stdout.flush().await?;
    Ok(())
}

/// Serves the API on --listen until the shutdown token is cancelled, then gives requests in
/// flight [`SERVER_GRACE`].
async fn serve_api(
    config: &Config,
    security: Security,
    service: AgentService,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SomaAgentServer<AgentService>>()
        .await;
    let check = server::auth::TokenCheck::new(security.token.as_deref());
    let reflection = if config.server.reflection {
        Some(tonic::service::interceptor::InterceptedService::new(
            reflection_service()?,
            check.clone(),
        ))
    } else {
        None
    };
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding --listen {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    // A machine-readable readiness line: tests and scripts wait for it.
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("soma-agent listening on {addr}\n").as_bytes())
        .await?;
    stdout.flush().await?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = security.tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .context("--tls-cert / --tls-key")?;
    }
    // Health stays open: the kubelet's gRPC probes carry no token.
    let server = builder
        .add_service(health)
        .add_optional_service(reflection)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            SomaAgentServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
            check,
        ))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            shutdown.clone().cancelled_owned(),
        );
    tokio::select! {
        served = server => served.context("gRPC server"),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SERVER_GRACE).await;
        } => {
            tracing::warn!(grace = ?SERVER_GRACE, "requests still in flight after the shutdown grace period; closing them");
            Ok(())
        }
    }
}

/// gRPC server reflection (--reflection) of the API and of health.
fn reflection_service() -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(soma_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")
}

/// Stops what runs once the server has: jobs clean up, then the WAL stream drains. The server's
/// own error comes first, the WAL stream's otherwise.
async fn stop(
    shutdown: &CancellationToken,
    jobs: &Jobs,
    wal_stream: Option<WalStream>,
    served: anyhow::Result<()>,
) -> anyhow::Result<()> {
    // The server may also have stopped on an error: jobs and the WAL stream stop all the same.
    shutdown.cancel();
    // Interrupted jobs remove what they half-wrote; bounded, so a frozen store cannot hold the pod.
    if tokio::time::timeout(JOBS_GRACE, jobs.drain())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?JOBS_GRACE, "interrupted operations did not finish cleaning up; the next start-up sweeps their uploads");
    }
    let stopped = match wal_stream {
        Some(stream) => stream.stop().await,
        None => Ok(()),
    };
    served?;
    stopped?;
    tracing::info!("stopped");
    Ok(())
}
