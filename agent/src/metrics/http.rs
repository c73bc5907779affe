//! The metrics listener (`--metrics-listen`): `GET /metrics` (OpenMetrics text), `/livez` and
//! `/readyz` for the kubelet, and nothing else. It exposes no operation of the agent, so unlike
//! the gRPC API it may bind the pod IP for Prometheus and the kubelet to reach.
//!
//! Liveness reflects a stuck WAL stream (not receiving, or WAL waiting while the archive stands
//! still, for longer than `--wal-stuck-after`): restarting the sidecar restarts pg_receivewal,
//! which is what clears a wedged stream. Readiness only says the agent serves: a failing
//! readiness probe on a sidecar takes the whole pod — the database — out of its Service, which a
//! backup problem must never do.

use std::{
    collections::VecDeque,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

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
/// A client that has not sent its whole request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a connection lives, request and answer: a client that reads its answer a byte at a
/// time is dropped too.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once (about 20 KiB each at most). The next one is still accepted at
/// once and the oldest open one is dropped for it: whoever reaches the pod IP can neither make
/// the agent hold unbounded connections nor, by holding slow ones, keep the kubelet's probes and
/// Prometheus waiting (a new connection's request is answered from memory within milliseconds,
/// and slow ones are dropped after [`HEADER_TIMEOUT`]).
const MAX_CONNECTIONS: usize = 512;
/// Largest request head read (hyper's smallest buffer): bounds each connection's memory.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// What the listener serves from.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// The agent's context (store, WAL stream, servers).
    pub ctx: Arc<Context>,
    /// How long the WAL stream may stall before liveness fails.
    pub wal_stuck_after: Duration,
}

/// The connections being served, oldest first, each with the token that drops it.
#[derive(Debug, Default)]
struct Open {
    next: u64,
    connections: VecDeque<(u64, CancellationToken)>,
}

impl Open {
    /// Registers a new connection, dropping the oldest when [`MAX_CONNECTIONS`] are open.
    fn admit(&mut self) -> (u64, CancellationToken) {
        if self.connections.len() >= MAX_CONNECTIONS
            && let Some((_, oldest)) = self.connections.pop_front()
        {
            oldest.cancel();
        }
        let id = self.next;
        self.next += 1;
        let token = CancellationToken::new();
        self.connections.push_back((id, token.clone()));
        (id, token)
    }

    fn close(&mut self, id: u64) {
        self.connections.retain(|(open, _)| *open != id);
    }
}

/// Binds `addr` and serves until `shutdown`; returns the bound address once listening. Starts
/// the background refresh of what scrapes and probes report ([`super::spawn_live_refresh`]).
pub(crate) async fn serve(
    addr: SocketAddr,
    served: Served,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    super::spawn_live_refresh(
        served.metrics.clone(),
        served.ctx.clone(),
        shutdown.child_token(),
    );
    let open = Arc::new(Mutex::new(Open::default()));
    tokio::spawn(async move {
        loop {
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
            let (id, dropped) = open.lock().unwrap_or_else(|e| e.into_inner()).admit();
            let (served, open) = (served.clone(), open.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let served = served.clone();
                    async move { Ok::<_, Infallible>(respond(&served, req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_REQUEST_HEAD)
                    // One request per connection: an idle client holds nothing.
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    ended = tokio::time::timeout(CONNECTION_DEADLINE, conn) => match ended {
                        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection ended with an error"),
                        Err(_) => tracing::debug!("metrics connection dropped at its deadline"),
                        Ok(Ok(())) => {}
                    },
                    () = dropped.cancelled() => {
                        tracing::debug!("metrics connection dropped for a newer one");
                    }
                }
                open.lock().unwrap_or_else(|e| e.into_inner()).close(id);
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

/// Answers from memory only: no store, server or lock held by a job is waited on, so probes
/// answer within the kubelet's timeout whatever the agent is doing.
fn respond(served: &Served, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
            served.metrics.scrape(&served.ctx),
        ),
        "/livez" => match served
            .metrics
            .wal_stuck(&served.ctx, served.wal_stuck_after)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_the_bound_the_oldest_connection_is_dropped_for_the_new_one() {
        let mut open = Open::default();
        let first: Vec<_> = (0..MAX_CONNECTIONS).map(|_| open.admit()).collect();
        assert!(first.iter().all(|(_, t)| !t.is_cancelled()));
        let (newest, token) = open.admit();
        assert!(first[0].1.is_cancelled(), "the oldest is dropped");
        assert!(first[1..].iter().all(|(_, t)| !t.is_cancelled()));
        assert!(!token.is_cancelled());
        assert_eq!(open.connections.len(), MAX_CONNECTIONS);
        // A connection that ended frees its place: the next one drops nobody.
        open.close(newest);
        open.close(first[0].0);
        let _ = open.admit();
        assert!(!first[1].1.is_cancelled());
        assert_eq!(open.connections.len(), MAX_CONNECTIONS);
    }
}
