//! Prometheus metrics: what an alert needs to say that backups stopped, WAL fell behind, a drill
//! failed or the store went away, served as OpenMetrics text by [`http`] (`--metrics-listen`).
//!
//! Backup gauges are computed from the catalog (at start-up, after every operation that changes
//! it, and every [`CATALOG_REFRESH`]), not counted in memory: a restarted agent reports the age
//! of the newest backup at once, so "backup too old" alerts neither fire nor go quiet because the
//! agent restarted. Counters (failures, skipped runs) count since the agent started, as
//! Prometheus counters do. What needs the store or the server (is the store up, the archive lag,
//! WAL progress) is refreshed in the background every [`LIVE_REFRESH`]; scrapes and probes only
//! read memory.

pub(crate) mod http;
mod live;

use live::WalProgress;
pub(crate) use live::spawn_live_refresh;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    catalog::{Catalog, Kind, Manifest},
    jobs::About,
    lsn::Lsn,
    ops::{Context, physical::PhysicalDetails},
};

/// How often backup gauges are recomputed from the catalog even when nothing happened here (other
/// agents write to the same store; someone may delete backups by hand).
pub(crate) const CATALOG_REFRESH: Duration = Duration::from_secs(300);
/// Drill reports read per backup group at start-up for the drill gauges.
const MAX_REPORTS_READ: usize = 10;
/// How long the live refresh waits for the store probe and for the server's WAL position.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the store is probed and the server's WAL position read for the gauges and the
/// liveness probe: a stall is noticed this much late at worst.
pub(crate) const LIVE_REFRESH: Duration = Duration::from_secs(5);

type F64Gauge = Gauge<f64, AtomicU64>;

/// Labels of a backup group: what alerts are written per.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct BackupLabels {
    /// postgres, qdrant or set.
    pub engine: String,
    /// Database, collection(s), cluster or all.
    pub target: String,
    /// logical, logical-cluster, physical, collection-snapshots, ..., set.
    pub kind: String,
}

impl BackupLabels {
    fn of(m: &Manifest) -> Self {
        Self {
            engine: m.engine.as_str().into(),
            target: m.target.name.clone(),
            kind: m.kind.as_str().into(),
        }
    }

    fn about(a: &About) -> Self {
        Self {
            engine: a.engine.clone(),
            target: a.target.clone(),
            kind: a.kind.clone(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    engine: String,
    target: String,
    kind: String,
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
    engine: String,
    target: String,
    kind: String,
}

/// Labels of one schedule.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ScheduleLabels {
    /// The action, e.g. "backup".
    pub action: String,
    /// The cron expression as given.
    pub cron: String,
}

/// The agent's metrics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    backup_last_success: Family<BackupLabels, F64Gauge>,
    backup_last_duration: Family<BackupLabels, F64Gauge>,
    backup_last_bytes: Family<BytesLabels, Gauge>,
    backup_count: Family<BackupLabels, Gauge>,
    backup_failures: Family<BackupLabels, Counter>,
    operation_failures: Family<OperationLabels, Counter>,
    verify_last_success: Family<BackupLabels, F64Gauge>,
    drill_last_success: Family<BackupLabels, F64Gauge>,
    drill_last_rto: Family<BackupLabels, F64Gauge>,
    prune_last_success: F64Gauge,
    prune_deleted: Counter,
    wal_streaming: Gauge,
    wal_receiving: Gauge,
    wal_lag: Gauge,
    wal_last_shipped: F64Gauge,
    recovery_window_start: F64Gauge,
    recovery_unreplayed: Gauge,
    recovery_stopped_short: Gauge,
    qdrant_view_ok: Gauge,
    qdrant_peers: Gauge,
    qdrant_peers_unreachable: Gauge,
    qdrant_shards_unavailable: Gauge,
    qdrant_replicas_not_active: Gauge,
    store_up: Gauge,
    store_retries: Gauge,
    store_timeouts: Gauge,
    store_failed_requests: Gauge,
    store_condition: Gauge,
    schedule_next_run: Family<ScheduleLabels, F64Gauge>,
    schedule_skipped: Family<ScheduleLabels, Counter>,
    /// When the archive position last moved (or the stream was idle with nothing to ship), for
    /// the liveness probe.
    wal_progress: Mutex<WalProgress>,
}

fn ts(t: DateTime<Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, none with a sample until something happens.
    pub(crate) fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            backup_last_success: Family::default(),
            backup_last_duration: Family::default(),
            backup_last_bytes: Family::default(),
            backup_count: Family::default(),
            backup_failures: Family::default(),
            operation_failures: Family::default(),
            verify_last_success: Family::default(),
            drill_last_success: Family::default(),
            drill_last_rto: Family::default(),
            prune_last_success: Gauge::default(),
            prune_deleted: Counter::default(),
            wal_streaming: Gauge::default(),
            wal_receiving: Gauge::default(),
            wal_lag: Gauge::default(),
            wal_last_shipped: Gauge::default(),
            recovery_window_start: Gauge::default(),
            recovery_unreplayed: Gauge::default(),
            recovery_stopped_short: Gauge::default(),
            qdrant_view_ok: Gauge::default(),
            qdrant_peers: Gauge::default(),
            qdrant_peers_unreachable: Gauge::default(),
            qdrant_shards_unavailable: Gauge::default(),
            qdrant_replicas_not_active: Gauge::default(),
            store_up: Gauge::default(),
            store_retries: Gauge::default(),
            store_timeouts: Gauge::default(),
            store_failed_requests: Gauge::default(),
            store_condition: Gauge::default(),
            schedule_next_run: Family::default(),
            schedule_skipped: Family::default(),
            wal_progress: Mutex::new(WalProgress {
                archived: Lsn::default(),
                receiving: true,
                since: Instant::now(),
                server: None,
            }),
        };
        let mut registry = Registry::default();
        m.register_backups(&mut registry);
        m.register_wal(&mut registry);
        m.register_qdrant(&mut registry);
        m.register_store(&mut registry);
        m.register_schedules(&mut registry);
        Self { registry, ..m }
    }

    /// Backups, verifies, drills and prunes: what the catalog says and what failed here.
    fn register_backups(&self, r: &mut Registry) {
        r.register(
            "soma_backup_last_success_timestamp_seconds",
            "Completion time of the newest complete backup in the store, per engine, target and kind",
            self.backup_last_success.clone(),
        );
        r.register(
            "soma_backup_last_duration_seconds",
            "How long the newest complete backup took",
            self.backup_last_duration.clone(),
        );
        r.register(
            "soma_backup_last_bytes",
            "Size of the newest complete backup: stage=raw (uncompressed) or stored",
            self.backup_last_bytes.clone(),
        );
        r.register(
            "soma_backups",
            "Complete backups in the store",
            self.backup_count.clone(),
        );
        r.register(
            "soma_backup_failures",
            "Backups that failed or were interrupted since the agent started",
            self.backup_failures.clone(),
        );
        r.register(
            "soma_operation_failures",
            "Operations (backup, verify, drill, prune, restore) that failed since the agent started",
            self.operation_failures.clone(),
        );
        r.register(
            "soma_verify_last_success_timestamp_seconds",
            "When a verify of a backup of this group last succeeded",
            self.verify_last_success.clone(),
        );
        r.register(
            "soma_drill_last_success_timestamp_seconds",
            "When a restore drill of a backup of this group last passed",
            self.drill_last_success.clone(),
        );
        r.register(
            "soma_drill_last_rto_seconds",
            "Restore time measured by the last passing drill of this group",
            self.drill_last_rto.clone(),
        );
        r.register(
            "soma_prune_last_success_timestamp_seconds",
            "When retention last ran to the end",
            self.prune_last_success.clone(),
        );
        r.register(
            "soma_prune_deleted_objects",
            "Objects deleted by retention since the agent started",
            self.prune_deleted.clone(),
        );
    }

    /// The WAL stream and the recovery window it gives.
    fn register_wal(&self, r: &mut Registry) {
        r.register(
            "soma_wal_streaming",
            "1 when this agent streams WAL (--wal-stream)",
            self.wal_streaming.clone(),
        );
        r.register(
            "soma_wal_receiving",
            "1 while pg_receivewal is connected and streaming",
            self.wal_receiving.clone(),
        );
        r.register(
            "soma_wal_archive_lag_bytes",
            "WAL the server has written that is not in the store yet",
            self.wal_lag.clone(),
        );
        r.register(
            "soma_wal_last_shipped_timestamp_seconds",
            "When WAL was last shipped to the store",
            self.wal_last_shipped.clone(),
        );
        r.register(
            "soma_recovery_window_start_timestamp_seconds",
            "The earliest time a point-in-time restore can reach: the oldest base backup's consistent point",
            self.recovery_window_start.clone(),
        );
        r.register(
            "soma_recovery_unreplayed_wal_bytes",
            "WAL of the timeline the server's last recovery replayed that the archive holds after where replay ended (0: it reached the end, or the server never recovered from an archive)",
            self.recovery_unreplayed.clone(),
        );
        r.register(
            "soma_recovery_stopped_short",
            "1 when the server's last recovery had no target yet ended before the end of the archive: committed transactions are missing",
            self.recovery_stopped_short.clone(),
        );
    }

    /// The distributed Qdrant beside the agent.
    fn register_qdrant(&self, r: &mut Registry) {
        r.register(
            "soma_qdrant_cluster_view_ok",
            "1 when the agent read its Qdrant's cluster layout whole at the last refresh (0: the other soma_qdrant_* values are the last complete ones)",
            self.qdrant_view_ok.clone(),
        );
        r.register(
            "soma_qdrant_cluster_peers",
            "Peers of the distributed Qdrant beside the agent (0: a single node)",
            self.qdrant_peers.clone(),
        );
        r.register(
            "soma_qdrant_cluster_peers_unreachable",
            "Peers of the distributed Qdrant whose REST API did not answer the agent",
            self.qdrant_peers_unreachable.clone(),
        );
        r.register(
            "soma_qdrant_shards_unavailable",
            "Shards of the distributed Qdrant with no active replica: a backup of their collection fails",
            self.qdrant_shards_unavailable.clone(),
        );
        r.register(
            "soma_qdrant_replicas_not_active",
            "Shard replicas of the distributed Qdrant that are not active (dead, partial, recovering)",
            self.qdrant_replicas_not_active.clone(),
        );
    }

    /// The store and its requests.
    fn register_store(&self, r: &mut Registry) {
        r.register(
            "soma_store_up",
            "1 when the store answered the last probe",
            self.store_up.clone(),
        );
        r.register(
            "soma_store_retries",
            "Store request attempts that failed and were retried since the agent started",
            self.store_retries.clone(),
        );
        r.register(
            "soma_store_attempt_timeouts",
            "Store request attempts dropped since the agent started because the endpoint did not answer in time",
            self.store_timeouts.clone(),
        );
        r.register(
            "soma_store_failed_requests",
            "Store requests that failed after every attempt since the agent started",
            self.store_failed_requests.clone(),
        );
        r.register(
            "soma_store_condition",
            "0: store requests succeed at once; 1: slow (retries in the last 5 minutes); 2: failing (the last request gave up)",
            self.store_condition.clone(),
        );
    }

    /// The schedules.
    fn register_schedules(&self, r: &mut Registry) {
        r.register(
            "soma_schedule_next_run_timestamp_seconds",
            "Next run of each schedule (before jitter)",
            self.schedule_next_run.clone(),
        );
        r.register(
            "soma_schedule_skipped_runs",
            "Scheduled runs skipped because a job of the same target was running",
            self.schedule_skipped.clone(),
        );
    }

    /// Recomputes every backup gauge from the manifests in `catalog`.
    pub(crate) async fn refresh_catalog(&self, catalog: &Catalog) {
        let manifests = match catalog.list().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: could not list backups; backup gauges keep their last values");
                return;
            }
        };
        let mut newest: HashMap<BackupLabels, &Manifest> = HashMap::new();
        let mut counts: HashMap<BackupLabels, i64> = HashMap::new();
        let mut window_start: Option<DateTime<Utc>> = None;
        for m in &manifests {
            let labels = BackupLabels::of(m);
            *counts.entry(labels.clone()).or_default() += 1;
            let e = newest.entry(labels).or_insert(m);
            if m.completed_at > e.completed_at {
                *e = m;
            }
            if m.kind == Kind::Physical
                && let Ok(d) = PhysicalDetails::of(m)
            {
                window_start = Some(window_start.map_or(d.stop_time, |w| w.min(d.stop_time)));
            }
        }
        self.backup_last_success.clear();
        self.backup_last_duration.clear();
        self.backup_last_bytes.clear();
        self.backup_count.clear();
        for (labels, m) in &newest {
            self.backup_last_success
                .get_or_create(labels)
                .set(ts(m.completed_at));
            let secs = (m.completed_at - m.started_at).num_milliseconds().max(0) as f64 / 1000.0;
            self.backup_last_duration.get_or_create(labels).set(secs);
            for (stage, bytes) in [("raw", m.raw_bytes), ("stored", m.stored_bytes)] {
                self.backup_last_bytes
                    .get_or_create(&BytesLabels {
                        engine: labels.engine.clone(),
                        target: labels.target.clone(),
                        kind: labels.kind.clone(),
                        stage,
                    })
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
        for (labels, n) in counts {
            self.backup_count.get_or_create(&labels).set(n);
        }
        match window_start {
            Some(t) => self.recovery_window_start.set(ts(t)),
            None => self.recovery_window_start.set(0.0),
        };
    }

    /// Counts a failed operation.
    pub(crate) fn failed(&self, operation: &str, about: &About) {
        if operation == "backup" {
            self.backup_failures
                .get_or_create(&BackupLabels::about(about))
                .inc();
        }
        self.operation_failures
            .get_or_create(&OperationLabels {
                operation: operation.into(),
                engine: about.engine.clone(),
                target: about.target.clone(),
                kind: about.kind.clone(),
            })
            .inc();
    }

    /// A verify of `m` succeeded now.
    pub(crate) fn verified(&self, m: &Manifest) {
        self.verify_last_success
            .get_or_create(&BackupLabels::of(m))
            .set(ts(Utc::now()));
    }

    /// A drill of `m` passed, at `at`, restoring in `rto_seconds`.
    pub(crate) fn drill_passed(&self, m: &Manifest, at: DateTime<Utc>, rto_seconds: f64) {
        let labels = BackupLabels::of(m);
        self.drill_last_success.get_or_create(&labels).set(ts(at));
        self.drill_last_rto.get_or_create(&labels).set(rto_seconds);
    }

    /// Sets each backup group's drill gauges from the newest passing report stored beside its
    /// backups, so a restarted agent does not report "never drilled" (nor let a "drill too old"
    /// alert go quiet) until its next drill. Reads at most [`MAX_REPORTS_READ`] reports per
    /// group, newest backups first; never moves a gauge back past a drill that ran meanwhile.
    pub(crate) async fn restore_drill_gauges(&self, catalog: &Catalog) {
        let manifests = match catalog.list().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: could not list backups for their drill reports");
                return;
            }
        };
        let mut groups: HashMap<BackupLabels, Vec<&Manifest>> = HashMap::new();
        for m in &manifests {
            groups.entry(BackupLabels::of(m)).or_default().push(m);
        }
        for (labels, mut backups) in groups {
            backups.sort_by_key(|m| std::cmp::Reverse(m.completed_at));
            for m in backups.into_iter().take(MAX_REPORTS_READ) {
                match crate::ops::drill::read_report(catalog.store().as_ref(), &m.id).await {
                    Ok(Some(report)) if report.passed => {
                        let last = self.drill_last_success.get_or_create(&labels);
                        if last.get() < ts(report.drilled_at) {
                            last.set(ts(report.drilled_at));
                            self.drill_last_rto
                                .get_or_create(&labels)
                                .set(report.rto_seconds);
                        }
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(backup_id = %m.id, error = %e, "metrics: drill report unreadable");
                    }
                }
            }
        }
    }

    /// Retention ran to the end, deleting `objects`.
    pub(crate) fn pruned(&self, objects: u64) {
        self.prune_last_success.set(ts(Utc::now()));
        self.prune_deleted.inc_by(objects);
    }

    /// The next run of a schedule.
    pub(crate) fn schedule_next(&self, labels: &ScheduleLabels, at: DateTime<Utc>) {
        self.schedule_next_run.get_or_create(labels).set(ts(at));
    }

    /// A scheduled run was skipped.
    pub(crate) fn schedule_skipped(&self, labels: &ScheduleLabels) {
        self.schedule_skipped.get_or_create(labels).inc();
    }

    /// Encodes every metric as OpenMetrics text. Reads nothing but memory: the values that need
    /// the store or the server are kept current by [`spawn_live_refresh`], so a scrape answers at
    /// once whatever state the store or the server is in.
    pub(crate) fn scrape(&self, ctx: &Context) -> String {
        self.read_memory(ctx);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Keeps the backup gauges current: at once (with the drill gauges from the stored reports), then
/// every [`CATALOG_REFRESH`] until `shutdown`.
pub(crate) fn spawn_catalog_refresh(
    metrics: Arc<Metrics>,
    catalog: Catalog,
    shutdown: tokio_util::sync::CancellationToken,
) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CATALOG_REFRESH);
        every.tick().await;
        let first = async {
            metrics.refresh_catalog(&catalog).await;
            metrics.restore_drill_gauges(&catalog).await;
        };
        tokio::select! {
            () = first => {}
            () = shutdown.cancelled() => return,
        }
        loop {
            tokio::select! {
                _ = every.tick() => metrics.refresh_catalog(&catalog).await,
                () = shutdown.cancelled() => break,
            }
        }
    });
}
