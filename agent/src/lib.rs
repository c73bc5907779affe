//! `soma-agent`: the sidecar that streams database backups to object storage and back.
//!
//! Modules follow the data path: [`server`] (gRPC) starts [`jobs`] that run [`ops`]; operations
//! pull bytes from an [`engine`], push them through the [`pipeline`] (the only place bytes are
//! compressed and hashed) into a [`store`], and record them in the [`catalog`].

pub mod catalog;
pub mod config;
pub mod engine;
pub mod error;
pub mod failures;
#[doc(hidden)]
pub mod fuzzing;
pub mod jobs;
pub mod lsn;
pub mod metrics;
pub mod ops;
pub mod owner;
pub mod pipeline;
pub mod retention;
pub mod runner;
pub mod schedule;
pub mod server;
pub mod store;
pub mod timeline_history;
pub mod wal;

use std::time::Duration;

use anyhow::Context as _;
use soma_proto::v1::soma_agent_server::SomaAgentServer;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{
    catalog::Catalog,
    config::{Config, RestorePgdataArgs, WalFetchArgs},
    engine::postgres::Postgres,
    ops::Context,
    pipeline::Settings,
    server::AgentService,
};

/// How long interrupted operations may take to clean up on shutdown.
/// Largest request the API decodes: requests name backups and targets, nothing bulky, so
/// anything larger is refused before it is read into memory.
const MAX_REQUEST_BYTES: usize = 1024 * 1024;
const JOBS_GRACE: Duration = Duration::from_secs(20);
/// How long the start-up sweep of crashed uploads may take before the agent starts anyway.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long requests in flight (e.g. a client following progress) may keep the gRPC server open
/// after a shutdown signal.
const SERVER_GRACE: Duration = Duration::from_secs(10);

fn settings(config: &Config) -> Settings {
    Settings {
        compression_level: config.compression_level,
        compression_threads: config.compression_threads,
        // Whole encryption chunks, so a sealed part is never shorter than the part it seals (S3
        // refuses a short part that is not the last).
        part_size: (config.part_size as usize).next_multiple_of(store::crypt::CHUNK),
        parts_in_flight: config.parts_in_flight as usize,
    }
}

/// Opens `location` through `keyring` (see [`store::Crypt`]), read-only or not.
async fn open_store(
    config: &Config,
    keyring: Option<store::Keyring>,
    location: &str,
    read_only: bool,
    health: &store::StoreHealth,
) -> Result<std::sync::Arc<dyn store::Store>, String> {
    let options = store::Options {
        object_lock: config.object_lock_days.map(|days| store::s3::ObjectLock {
            days,
            compliance: config.object_lock_compliance,
        }),
        retry: config.retry_policy(),
        health: health.clone(),
    };
    let inner = if read_only {
        store::open_read_only(location, &options).await
    } else {
        store::open_with(location, &options).await
    }
    .map_err(|e| error::render(&e))?;
    let keyed = keyring.is_some();
    let crypt = store::Crypt::new(inner, keyring, config.accept_unencrypted);
    if keyed && !read_only {
        // The repository id is made with the store, not with its first backup, so `status` names
        // it from the start. A store that cannot be reached yet gets it with the first write.
        if let Err(e) = crypt.repository(true).await {
            tracing::warn!(error = %e, "the store's repository id is not settled yet; the first write settles it");
        }
    }
    Ok(std::sync::Arc::new(crypt))
}

/// The store a one-shot command reads backups and WAL from: `--restore-from` when given, else
/// `--store`; read-only either way, since neither one-shot ever writes.
async fn read_source(config: &Config) -> Result<std::sync::Arc<dyn store::Store>, String> {
    let (location, flags) = match &config.restore_from {
        Some(from) => (from.as_str(), "--restore-from / SOMA_RESTORE_FROM"),
        None => (config.store.as_str(), "--store / SOMA_STORE"),
    };
    let keyring = config.keyring().map_err(|e| e.to_string())?;
    open_store(config, keyring, location, true, &Default::default())
        .await
        .map_err(|e| format!("{flags}: {e}"))
}

/// `soma-agent restore-pgdata`: lays a base backup into an empty data directory and configures
/// point-in-time recovery. Prints the summary on stdout.
pub async fn restore_pgdata(config: &Config, args: &RestorePgdataArgs) -> anyhow::Result<()> {
    let store = read_source(config).await.map_err(anyhow::Error::msg)?;
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
    let store = match read_source(config).await {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let archive = wal::WalArchive::new(store, &args.system_id);
    match archive.fetch(&file, &args.destination).await {
        Ok(wal::Fetched::Restored(_)) => WalFetchOutcome::Restored,
        Ok(wal::Fetched::NotFound) => WalFetchOutcome::NotFound,
        Err(e) => fail(e.to_string()),
    }
}

/// Runs the agent until SIGTERM or Ctrl-C, then stops in order: the gRPC server stops accepting
/// (requests in flight get [`SERVER_GRACE`]), and the WAL stream drains — what the server had
/// flushed when the signal came is shipped — before this returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Installed first, so a signal during start-up already counts.
    let shutdown = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                // A handler that cannot be installed must not count as a signal.
                Ok(()) = tokio::signal::ctrl_c() => tracing::info!("interrupted: shutting down"),
            }
            shutdown.cancel();
        });
    }
    let token = config
        .token_file
        .as_deref()
        .map(server::auth::load_token)
        .transpose()?;
    let tls_identity = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls::load_identity(cert, key)?),
        _ => None,
    };
    server::tls::check_exposure(config.listen, token.is_some(), tls_identity.is_some())?;
    let schedules = config.parsed_schedules().map_err(anyhow::Error::msg)?;
    let mut postgres = config
        .postgres_url
        .as_deref()
        .map(|url| Postgres::new(url, config.pg_bin_dir.clone()))
        .transpose()
        .context("--postgres-url / SOMA_POSTGRES_URL")?;
    if let Some(url) = &config.replication_url {
        let pg = postgres
            .take()
            .context("--replication-url needs --postgres-url (SOMA_POSTGRES_URL) as well")?;
        postgres = Some(
            pg.with_replication_url(url)
                .context("--replication-url / SOMA_REPLICATION_URL")?,
        );
    }
    // Read from the environment only, so it never shows in a process list.
    postgres = postgres
        .map(|pg| pg.with_replication_password(std::env::var("SOMA_REPLICATION_PASSWORD").ok()));
    if config.wal_stream {
        // Its error names the flag.
        engine::postgres::check_slot_name(&config.wal_slot)?;
    }
    if config.wal_stream && config.store_read_only {
        anyhow::bail!(
            "--wal-stream (SOMA_WAL_STREAM) writes the WAL archive to --store, which --store-read-only (SOMA_STORE_READ_ONLY) forbids; drop one of the two"
        );
    }
    if config.wal_stream && postgres.is_none() {
        anyhow::bail!(
            "--wal-stream (SOMA_WAL_STREAM) needs the PostgreSQL server: set --postgres-url"
        );
    }
    // Read from the environment only, so it never shows in a process list.
    let qdrant = config
        .qdrant_url
        .as_deref()
        .map(|url| {
            engine::qdrant::Qdrant::new(
                url,
                std::env::var("SOMA_QDRANT_API_KEY").ok(),
                config.qdrant_ca_cert.as_deref(),
            )
            .map(|q| {
                let q = q.with_timeouts(engine::qdrant::Timeouts {
                    stall: config.qdrant_stall_timeout,
                    snapshot: config.qdrant_snapshot_timeout,
                });
                match config.qdrant_peer_port {
                    Some(port) => q.with_peer_port(port),
                    None => q,
                }
            })
        })
        .transpose()
        .context("--qdrant-url / SOMA_QDRANT_URL")?;
    let owner = match &config.owner_id {
        Some(owner) => owner.clone(),
        None => owner::OwnerId::from_host_name()?,
    };
    // Read once: the same keys open --store and --restore-from.
    let keyring = config.keyring()?;
    // One record for --store and --restore-from: status reports what the agent's requests met.
    let health = store::StoreHealth::default();
    let store = open_store(
        &config,
        keyring.clone(),
        &config.store,
        config.store_read_only,
        &health,
    )
    .await
    .map_err(anyhow::Error::msg)
    .context("--store / SOMA_STORE")?;
    let catalog = Catalog::new(store.clone()).with_owner(owner.clone());
    // Restores read the --restore-from store when given; nothing in this agent can write there.
    let source = match &config.restore_from {
        Some(from) => Catalog::new(
            open_store(&config, keyring, from, true, &health)
                .await
                .map_err(anyhow::Error::msg)
                .context("--restore-from / SOMA_RESTORE_FROM")?,
        ),
        None => catalog.clone(),
    };
    tracing::info!(
        store = %store.location(),
        store_read_only = store.is_read_only(),
        encryption = %store.encryption(),
        restore_from = %source.store().location(),
        owner = %owner,
        postgres = ?postgres.as_ref().map(|p| p.server()),
        qdrant = ?qdrant.as_ref().map(|q| q.url()),
        "starting"
    );

    // Only a crash of this agent's owner leaves uploads of its engines and its owner id behind;
    // nothing of ours runs yet. Other owners' uploads may be in flight right now: left alone.
    let mut engines = Vec::new();
    if postgres.is_some() {
        engines.push(catalog::IdEngine::Postgres);
    }
    if qdrant.is_some() {
        engines.push(catalog::IdEngine::Qdrant);
    }
    if store.is_read_only() {
        tracing::info!("--store is read-only: no sweep of incomplete uploads");
    } else {
        let sweep = catalog.sweep_incomplete(&engines, &owner);
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

    let settings = settings(&config);
    let wal_stream = match (&postgres, config.wal_stream) {
        (Some(pg), true) => {
            let stream_config = wal::stream::StreamConfig {
                spool: config.wal_spool.clone(),
                slot: config.wal_slot.clone(),
                partial_interval: config.wal_partial_interval,
                max_unshipped: config.wal_spool_max_segments as usize,
                drain_timeout: config.wal_drain_timeout,
            };
            let handle = wal::stream::spawn(
                stream_config.clone(),
                pg.clone(),
                store.clone(),
                settings.clone(),
                shutdown.child_token(),
            );
            Some((stream_config, handle))
        }
        _ => None,
    };
    let wal_info = wal_stream
        .as_ref()
        .map(|(config, handle)| ops::WalStreamInfo {
            config: config.clone(),
            status: handle.status.clone(),
        });
    let ctx = std::sync::Arc::new(Context {
        source,
        catalog,
        postgres,
        qdrant,
        qdrant_mode: config.qdrant_mode,
        settings,
        wal_stream: wal_info,
        retention: config.retention.clone(),
        drill_dir: config.drill_dir.clone(),
        restore_root: config.restore_root.clone(),
        replay: Default::default(),
    });
    if let Some(pg) = &ctx.postgres {
        ops::physical::spawn_watch(
            pg.clone(),
            ctx.source.store().clone(),
            ctx.replay.clone(),
            shutdown.child_token(),
        );
    }
    schedule::run::validate(&schedules, &ctx).map_err(anyhow::Error::msg)?;
    // Before any drill can start: what a killed agent's drills left is removed first.
    ops::drill::sweep_drill_dir(&ctx.drill_dir).await;
    let metrics = std::sync::Arc::new(metrics::Metrics::new());
    let jobs = std::sync::Arc::new(
        jobs::Jobs::new(shutdown.child_token()).with_limit(config.max_operations),
    );
    let runner = runner::Runner::new(ctx.clone(), jobs.clone(), metrics.clone());
    metrics::spawn_catalog_refresh(metrics.clone(), ctx.catalog.clone(), shutdown.child_token());
    let mut stdout = tokio::io::stdout();
    if let Some(addr) = config.metrics_listen {
        let served = metrics::http::Served {
            metrics: metrics.clone(),
            ctx: ctx.clone(),
            wal_stuck_after: config.wal_stuck_after,
        };
        let bound = metrics::http::serve(addr, served, shutdown.child_token())
            .await
            .with_context(|| format!("binding --metrics-listen {addr}"))?;
        tracing::info!(addr = %bound, "serving metrics");
        stdout
            .write_all(format!("soma-agent metrics on {bound}\n").as_bytes())
            .await?;
    }
    let schedule_handles = schedule::spawn(
        schedules,
        runner.clone(),
        schedule::run::Options {
            timezone: config.schedule_timezone,
            jitter: config.schedule_jitter,
            owner: owner.clone(),
        },
        shutdown.child_token(),
    );
    for h in &schedule_handles {
        tracing::info!(schedule = %h.schedule.spec(), timezone = %h.timezone.name(), "schedule enabled");
    }
    let service = AgentService::new(runner, schedule_handles);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SomaAgentServer<AgentService>>()
        .await;
    let check = server::auth::TokenCheck::new(token.as_deref());
    let reflection = if config.reflection {
        let service = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(soma_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building gRPC reflection")?;
        Some(tonic::service::interceptor::InterceptedService::new(
            service,
            check.clone(),
        ))
    } else {
        None
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    // A machine-readable readiness line: tests and scripts wait for it.
    stdout
        .write_all(format!("soma-agent listening on {addr}\n").as_bytes())
        .await?;
    stdout.flush().await?;

    let mut builder = tonic::transport::Server::builder();
    if let Some(identity) = tls_identity {
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
    let served = tokio::select! {
        served = server => served.context("gRPC server"),
        _ = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SERVER_GRACE).await;
        } => {
            tracing::warn!(grace = ?SERVER_GRACE, "requests still in flight after the shutdown grace period; closing them");
            Ok(())
        }
    };
    // The server may also have stopped on an error: jobs and the WAL stream stop all the same.
    shutdown.cancel();
    // Interrupted jobs remove what they half-wrote; bounded, so a frozen store cannot hold the pod.
    if tokio::time::timeout(JOBS_GRACE, jobs.drain())
        .await
        .is_err()
    {
        tracing::warn!(grace = ?JOBS_GRACE, "interrupted operations did not finish cleaning up; the next start-up sweeps their uploads");
    }
    if let Some((stream_config, handle)) = wal_stream {
        let bound = stream_config.stop_bound();
        match tokio::time::timeout(bound, handle.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                served?;
                anyhow::bail!("the WAL stream task failed while stopping: {e}");
            }
            Err(_) => {
                served?;
                anyhow::bail!(
                    "the WAL stream did not stop within {bound:?}; WAL it had not shipped stays in the spool ({}) and the replication slot, and the next start ships it",
                    stream_config.spool.display()
                );
            }
        }
    }
    served?;
    tracing::info!("stopped");
    Ok(())
}
