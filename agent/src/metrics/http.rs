//! The metrics listener (`--metrics-listen`): `GET /metrics` (OpenMetrics text), `/livez` and
//! `/readyz` for the kubelet, and nothing else. It exposes no operation of the agent, so unlike
//! the gRPC API it may bind the pod IP for Prometheus and the kubelet to reach.
//!
//! Liveness reflects a stuck WAL stream (not receiving, or WAL waiting while the archive stands
//! still, for longer than `--wal-stuck-after`): restarting the sidecar restarts pg_receivewal,
//! which is what clears a wedged stream. Readiness only says the agent serves: a failing
//! readiness probe on a sidecar takes the whole pod — the database — out of its Service, which a
//! backup problem must never do.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Metrics;
use crate::ops::Context;

/// OpenMetrics' content type, which Prometheus negotiates for.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// A scrape or probe that has not sent its request by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait to be accepted. Prometheus and the kubelet need a few;
/// anything reaching the pod IP must not make the agent start unbounded work.
const MAX_CONNECTIONS: usize = 16;

/// What the listener serves from.
#[derive(Debug, Clone)]
pub struct Served {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The agent's context (store, WAL stream, servers).
    pub ctx: Arc<Context>,
    /// How long the WAL stream may stall before liveness fails.
    pub wal_stuck_after: Duration,
}

/// Binds `addr` and serves until `shutdown`; returns the bound address once listening.
pub async fn serve(
    addr: SocketAddr,
    served: Served,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                () = shutdown.cancelled() => break,
            };
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics listener: accept failed");
                        // E.g. out of file descriptors: do not spin.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = shutdown.cancelled() => break,
            };
            let served = served.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let served = served.clone();
                    async move { Ok::<_, Infallible>(respond(&served, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    // One request per connection: an idle client cannot hold a permit.
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
                drop(permit);
            });
        }
    });
    Ok(bound)
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("a static response builds")
}

async fn respond(served: &Served, req: Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN,
            "only GET is served here\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            OPENMETRICS,
            served.metrics.scrape(&served.ctx).await,
        ),
        "/livez" => match served
            .metrics
            .wal_stuck(&served.ctx, served.wal_stuck_after)
            .await
        {
            None => text(StatusCode::OK, PLAIN, "ok\n".into()),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        "/readyz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: this listener serves /metrics, /livez and /readyz\n".into(),
        ),
    }
}
