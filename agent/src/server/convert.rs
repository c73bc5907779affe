//! Domain values in their wire form: the only place the agent builds proto messages from
//! manifests, windows and the WAL stream's status.

use soma_proto::v1;

use crate::{
    catalog::Manifest,
    jobs::JobInfo,
    lsn::Lsn,
    ops::{self, Outcome, physical::BaseWindow},
};

/// A manifest as `list`, `describe` and operation results show it.
pub(crate) fn backup_info(m: &Manifest) -> v1::BackupInfo {
    v1::BackupInfo {
        id: m.id.to_string(),
        engine: m.engine.to_proto() as i32,
        target: m.target.name.clone(),
        started_at: m.started_at.to_rfc3339(),
        completed_at: m.completed_at.to_rfc3339(),
        raw_bytes: m.raw_bytes,
        stored_bytes: m.stored_bytes,
        manifest_json: serde_json::to_string_pretty(m).expect("manifest serialises"),
        members: m.members.iter().map(ToString::to_string).collect(),
        kind: m.kind.as_str().into(),
        recovery_window: None,
        last_drill: None,
    }
}

/// A finished operation's result (with a drill's report).
pub(crate) fn operation_result(outcome: Outcome, seconds: f64) -> v1::OperationResult {
    v1::OperationResult {
        drill: outcome
            .drill
            .as_ref()
            .map(ops::drill::DrillReport::to_proto),
        summary: outcome.summary,
        raw_bytes: outcome.manifest.raw_bytes,
        stored_bytes: outcome.manifest.stored_bytes,
        seconds,
        backup: Some(backup_info(&outcome.manifest)),
    }
}

/// The last drill of a backup as `describe` shows it: the stored report, or one that says why
/// the stored report could not be read (it is never trusted to parse).
pub(crate) fn last_drill(
    report: Result<Option<ops::drill::DrillReport>, crate::error::OpError>,
) -> Option<v1::DrillReport> {
    match report {
        Ok(r) => r.as_ref().map(ops::drill::DrillReport::to_proto),
        Err(e) => Some(v1::DrillReport {
            passed: false,
            failure: e.to_string(),
            ..Default::default()
        }),
    }
}

/// A base backup's recoverable window (or why it cannot be computed).
pub(crate) fn recovery_window(
    w: Result<BaseWindow, ops::physical::PhysicalError>,
) -> v1::RecoveryWindow {
    let BaseWindow { details, window } = match w {
        Ok(w) => w,
        Err(e) => {
            return v1::RecoveryWindow {
                error: e.to_string(),
                ..Default::default()
            };
        }
    };
    let mut out = v1::RecoveryWindow {
        system_id: details.system_id.clone(),
        earliest_time: details.stop_time.to_rfc3339(),
        earliest_lsn: details.stop_lsn.to_string(),
        timeline: details.timeline,
        ..Default::default()
    };
    match window {
        Ok(w) => {
            out.latest_lsn = w.latest_lsn.to_string();
            // Without archived WAL the backup restores to its own end only.
            out.latest_time = w
                .latest_time
                .unwrap_or(details.stop_time)
                .max(details.stop_time)
                .to_rfc3339();
            out.timeline = w.timeline;
            out.gaps = w.gaps;
            out.rejected = w.rejected;
        }
        Err(e) => out.error = e,
    }
    out
}

/// What the store's requests met, for `status`.
pub(crate) fn store_health(r: &crate::store::HealthReport) -> v1::StoreHealth {
    let (at, problem) = match &r.last_problem {
        Some((at, problem)) => (
            chrono::DateTime::<chrono::Utc>::from(*at).to_rfc3339(),
            problem.clone(),
        ),
        None => (String::new(), String::new()),
    };
    v1::StoreHealth {
        condition: r.condition.as_str().into(),
        retries: r.retries,
        timeouts: r.timeouts,
        failures: r.failures,
        resumed_downloads: r.resumed,
        last_problem: problem,
        last_problem_at: at,
    }
}

/// Where the server's last recovery ended, for `status`.
pub(crate) fn recovery_end(r: &ops::physical::ReplayEnd) -> v1::RecoveryEnd {
    v1::RecoveryEnd {
        timeline: r.timeline,
        parent_timeline: r.parent,
        switch_lsn: r.switch.to_string(),
        reason: r.reason.clone(),
        archive_end_lsn: r.archive_end.map(|l| l.to_string()).unwrap_or_default(),
        unreplayed_bytes: r.unreplayed_bytes,
        verdict: r.verdict.as_str().into(),
        summary: r.describe(),
        checked_at: r.checked_at.to_rfc3339(),
    }
}

/// The WAL stream's state for `status`, with the archive lag measured against `server_lsn`.
pub(crate) fn wal_archive_status(
    wal: &ops::WalStreamInfo,
    server_lsn: Option<Lsn>,
) -> v1::WalArchiveStatus {
    let s = wal.status.lock().expect("status lock").clone();
    let archived = s.archived_lsn;
    v1::WalArchiveStatus {
        receiving: s.receiving,
        system_id: s.system_id,
        timeline: s.timeline,
        slot: wal.config.slot.clone(),
        archived_lsn: if archived > Lsn(0) {
            archived.to_string()
        } else {
            String::new()
        },
        server_lsn: server_lsn.map(|l| l.to_string()).unwrap_or_default(),
        lag_bytes: server_lsn.map_or(0, |l| l.0.saturating_sub(archived.0)),
        last_shipped_at: s
            .last_shipped_at
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
        last_file: s.last_file,
        segments_shipped: s.segments_shipped,
        partials_shipped: s.partials_shipped,
        partial_interval_seconds: wal.config.partial_interval.as_secs_f64(),
        last_error: s.last_error.unwrap_or_default(),
        set_aside_files: s.set_aside_files,
        set_aside: s.set_aside,
    }
}

/// A running job as `status` shows it.
pub(crate) fn job_info(j: JobInfo) -> v1::JobInfo {
    v1::JobInfo {
        id: j.id,
        operation: j.operation.as_str().into(),
        target: j
            .targets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" + "),
        started_at: j.started_at.to_rfc3339(),
    }
}

/// A distributed Qdrant's view for `status`.
pub(crate) fn qdrant_cluster(
    v: crate::ops::qdrant::cluster_view::ClusterView,
) -> v1::QdrantCluster {
    v1::QdrantCluster {
        this_peer: v.this,
        peers: v
            .peers
            .into_iter()
            .map(|(peer_id, url, reachable)| v1::QdrantPeer {
                peer_id,
                url,
                reachable,
            })
            .collect(),
        collections: v
            .collections
            .into_iter()
            .map(|c| v1::QdrantCollectionShards {
                name: c.name,
                shards: c.shards,
                replicas: c.replicas,
                active_replicas: c.active,
                unavailable_shards: c.unavailable,
                not_active: c.not_active,
            })
            .collect(),
        error: v.error.unwrap_or_default(),
    }
}
