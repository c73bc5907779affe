//! The live values: what the store, the server and the WAL stream say now. A background task
//! ([`spawn_live_refresh`]) asks the store and the server; scrapes and probes read only memory.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use super::{LIVE_REFRESH, Metrics, PROBE_TIMEOUT, ts};
use crate::{lsn::Lsn, ops::Context};

/// Whether the server sits at the start of a segment right after the one the archive ends in:
/// after a segment switch (`pg_switch_wal`, the end of a base backup) the rest of that segment is
/// padding that is never "archived" byte by byte, so the archive stops short of the server's
/// position with nothing left to ship.
pub(super) fn after_switch(server: Lsn, status: &crate::wal::stream::StreamStatus) -> bool {
    let seg = status.seg_size;
    seg > 0
        && server.0.is_multiple_of(seg)
        && status.archived_lsn.0 < server.0
        && server.0 - status.archived_lsn.0 < seg
}

#[derive(Debug)]
pub(super) struct WalProgress {
    pub(super) archived: Lsn,
    pub(super) receiving: bool,
    pub(super) since: Instant,
    /// The server's WAL position at the last refresh, if it answered.
    pub(super) server: Option<Lsn>,
}

impl WalProgress {
    /// Takes in the stream's state now. Healthy: receiving, and either the archive moved or
    /// there is nothing to ship (judged against the server's position of the last refresh). A
    /// stall is timed from the last healthy moment, or from when receiving started or stopped.
    pub(super) fn observe(&mut self, status: &crate::wal::stream::StreamStatus) {
        let idle = self
            .server
            .is_some_and(|s| s <= status.archived_lsn || after_switch(s, status));
        let moved = status.archived_lsn != self.archived;
        if (status.receiving && (moved || idle)) || status.receiving != self.receiving {
            self.since = Instant::now();
        }
        self.archived = status.archived_lsn;
        self.receiving = status.receiving;
    }
}

impl Metrics {
    /// The live values kept in memory by the store's and the WAL stream's own tasks, and the
    /// replay watch's last answer.
    pub(super) fn read_memory(&self, ctx: &Context) {
        let replay = ctx.replay.get();
        self.recovery_unreplayed.set(
            replay
                .as_ref()
                .map_or(0, |r| i64::try_from(r.unreplayed_bytes).unwrap_or(i64::MAX)),
        );
        self.recovery_stopped_short.set(i64::from(
            replay.is_some_and(|r| r.verdict == crate::ops::physical::Verdict::StoppedShort),
        ));
        if let Some(health) = ctx.catalog.store().health() {
            let r = health.report();
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.store_retries.set(gauge(r.retries));
            self.store_timeouts.set(gauge(r.timeouts));
            self.store_failed_requests.set(gauge(r.failures));
            self.store_condition.set(match r.condition {
                crate::store::Condition::Ok => 0,
                crate::store::Condition::Slow => 1,
                crate::store::Condition::Failing => 2,
            });
        }
        let Some(wal) = &ctx.wal_stream else {
            self.wal_streaming.set(0);
            return;
        };
        self.wal_streaming.set(1);
        let status = wal.status.lock().map(|s| s.clone()).unwrap_or_default();
        self.wal_receiving.set(i64::from(status.receiving));
        if let Some(t) = status.last_shipped_at {
            self.wal_last_shipped.set(ts(t));
        }
    }

    /// Asks the store and the server (each bounded by [`PROBE_TIMEOUT`]) for what scrapes and
    /// the liveness probe report: whether the store answers, the server's WAL position (the
    /// archive lag), and whether the WAL stream made progress since the last time.
    pub(crate) async fn refresh_live(&self, ctx: &Context) {
        let probe = tokio::time::timeout(PROBE_TIMEOUT, ctx.catalog.store().head("soma-probe"));
        self.store_up
            .set(matches!(probe.await, Ok(Ok(_))).then_some(1).unwrap_or(0));
        if let Some(q) = &ctx.qdrant {
            self.refresh_qdrant(q).await;
        }
        let Some(wal) = &ctx.wal_stream else {
            return;
        };
        let server = match &ctx.postgres {
            Some(pg) => tokio::time::timeout(PROBE_TIMEOUT, pg.current_wal_lsn())
                .await
                .ok()
                .and_then(Result::ok),
            None => None,
        };
        // Read after the server's position, so WAL shipped meanwhile does not count as lag.
        let status = wal.status.lock().map(|s| s.clone()).unwrap_or_default();
        if let Some(server) = server {
            let lag = server.0.saturating_sub(status.archived_lsn.0);
            self.wal_lag.set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
        let mut p = self.wal_progress.lock().unwrap_or_else(|e| e.into_inner());
        if server.is_some() {
            p.server = server;
        }
        p.observe(&status);
    }

    /// The distributed Qdrant's peers and replicas (all 0 for a single node). A view that
    /// could not be read whole keeps the last values and says so in
    /// `soma_qdrant_cluster_view_ok`, so the shard alert never goes quiet for lack of an answer.
    async fn refresh_qdrant(&self, q: &crate::engine::qdrant::Qdrant) {
        let Some(view) = crate::ops::qdrant::cluster_view::ClusterView::read(q).await else {
            self.qdrant_view_ok.set(1);
            for g in [
                &self.qdrant_peers,
                &self.qdrant_peers_unreachable,
                &self.qdrant_shards_unavailable,
                &self.qdrant_replicas_not_active,
            ] {
                g.set(0);
            }
            return;
        };
        self.qdrant_view_ok.set(i64::from(view.error.is_none()));
        if view.error.is_some() {
            return;
        }
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.qdrant_peers.set(gauge(view.peers.len()));
        self.qdrant_peers_unreachable
            .set(gauge(view.unreachable_peers()));
        self.qdrant_shards_unavailable
            .set(gauge(view.unavailable_shards()));
        self.qdrant_replicas_not_active.set(gauge(
            view.collections
                .iter()
                .map(|c| (c.replicas - c.active.min(c.replicas)) as usize)
                .sum(),
        ));
    }

    /// Why the WAL stream counts as stuck, if it does: not receiving, or WAL waiting to be
    /// shipped while the archive position has not moved, for longer than `after`. Judged from
    /// memory (the server's position of the last [`Metrics::refresh_live`]), never by asking
    /// anyone: the kubelet's probe must answer within its timeout even when the store or the
    /// server does not.
    pub(crate) fn wal_stuck(&self, ctx: &Context, after: Duration) -> Option<String> {
        let wal = ctx.wal_stream.as_ref()?;
        // The stream's own state is in memory: only the server's position comes from the refresh.
        let status = wal.status.lock().map(|s| s.clone()).unwrap_or_default();
        let mut p = self.wal_progress.lock().unwrap_or_else(|e| e.into_inner());
        p.observe(&status);
        let stalled = p.since.elapsed();
        if stalled < after {
            return None;
        }
        Some(if !p.receiving {
            format!(
                "the WAL stream has not been receiving for {}s (limit {}s)",
                stalled.as_secs(),
                after.as_secs()
            )
        } else {
            format!(
                "WAL is waiting to be shipped (the server is at {}) but the archive has stayed at {} for {}s (limit {}s)",
                p.server
                    .map_or_else(|| "an unknown position".to_string(), |s| s.to_string()),
                p.archived,
                stalled.as_secs(),
                after.as_secs()
            )
        })
    }
}

/// Keeps the store and WAL values of [`Metrics::refresh_live`] current: at once, then every
/// [`LIVE_REFRESH`] until `shutdown`. A frozen store or server delays this task, never a scrape
/// or a probe.
pub(crate) fn spawn_live_refresh(
    metrics: Arc<Metrics>,
    ctx: Arc<Context>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(LIVE_REFRESH);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => metrics.refresh_live(&ctx).await,
                () = shutdown.cancelled() => break,
            }
        }
    });
}
