//! `soma-agent`: the sidecar that streams database backups to object storage and back.
//!
//! Modules follow the data path: [`server`] (gRPC) starts [`jobs`] that run [`ops`]; operations
//! pull bytes from an [`engine`], push them through the [`pipeline`] (the only place bytes are
//! compressed and hashed) into a [`store`], and record them in the [`catalog`].

pub mod catalog;
pub mod config;
pub mod engine;
pub mod error;
pub mod jobs;
pub mod ops;
pub mod pipeline;
pub mod server;
pub mod store;

use std::time::Duration;

use anyhow::Context as _;
use soma_proto::v1::soma_agent_server::SomaAgentServer;
use tokio::io::AsyncWriteExt;
use tokio_stream::wrappers::TcpListenerStream;

use crate::{
    catalog::Catalog, config::Config, engine::postgres::Postgres, ops::Context, pipeline::Settings,
    server::AgentService,
};

/// How long the start-up sweep of crashed uploads may take before the agent starts anyway.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the agent until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let postgres = config
        .postgres_url
        .as_deref()
        .map(|url| Postgres::new(url, config.pg_bin_dir.clone()))
        .transpose()
        .context("--postgres-url / SOMA_POSTGRES_URL")?;
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
        })
        .transpose()
        .context("--qdrant-url / SOMA_QDRANT_URL")?;
    let store = store::open(&config.store, config.parts_in_flight as usize)
        .await
        .context("--store / SOMA_STORE")?;
    let catalog = Catalog::new(store.clone());
    tracing::info!(
        store = %store.location(),
        postgres = ?postgres.as_ref().map(|p| p.server()),
        qdrant = ?qdrant.as_ref().map(|q| q.url()),
        "starting"
    );

    // Only a crash of this agent leaves uploads of its engines behind; nothing of ours runs yet.
    let mut engines = Vec::new();
    if postgres.is_some() {
        engines.push("pg");
    }
    if qdrant.is_some() {
        engines.push("qd");
    }
    match tokio::time::timeout(SWEEP_TIMEOUT, catalog.sweep_incomplete(&engines)).await {
        Ok(Ok(aborted)) => {
            for u in &aborted {
                tracing::warn!(key = %u.key, "aborted an incomplete upload left by an interrupted backup");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "could not sweep incomplete uploads; continuing"),
        Err(_) => tracing::warn!("sweeping incomplete uploads timed out; continuing"),
    }

    let settings = Settings {
        compression_level: config.compression_level,
        compression_threads: config.compression_threads,
        part_size: config.part_size as usize,
        parts_in_flight: config.parts_in_flight as usize,
    };
    let service = AgentService::new(Context {
        catalog,
        postgres,
        qdrant,
        qdrant_mode: config.qdrant_mode,
        settings,
    });

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SomaAgentServer<AgentService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(soma_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding --listen {}", config.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    // A machine-readable readiness line: tests and scripts wait for it.
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("soma-agent listening on {addr}\n").as_bytes())
        .await?;
    stdout.flush().await?;

    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(SomaAgentServer::new(service))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown())
        .await
        .context("gRPC server")?;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}
