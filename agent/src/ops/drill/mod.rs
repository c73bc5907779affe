//! Restore drills: restore a backup into a scratch target (never the real one) — a scratch
//! PostgreSQL server of the drill's own, fresh ([`logical`]) or on a scratch data directory
//! ([`physical`]), or a scratch collection ([`qdrant`]) — check it against the validation data
//! recorded at backup time, measure how long the restore took until the data was usable (the
//! RTO), store a report beside the backup and always remove the scratch target.
//!
//! Scratch targets carry the drill's own random name (`soma_drill_<hex>`), chosen before the job
//! starts and registered before each is created, so cleanup — at the end of the drill, or by the
//! server when the agent shuts down mid-drill ([`Scratch::clean_up`]) — removes exactly what this
//! drill created. A drill that ran and found a mismatch ends in an [`Outcome`] whose report says
//! `passed: false`; one that could not run (damaged artifact, unreadable store) is an error.

mod drill_dir;
pub(crate) mod wal_feed;

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use soma_proto::v1;

use super::{
    Context, Outcome, method,
    plan::{OpFuture, resolve},
    set::members_of,
};
use crate::{
    catalog::{BackupId, BackupKeys, Engine, Manifest},
    engine::postgres::ScratchServer,
    error::OpError,
    jobs::{JobInfo, Operation, Reporter},
    store::{Store, StoreError},
};

/// Name of the report beside the backup's manifest.
pub(crate) const REPORT_NAME: &str = "drill.json";
/// Largest report `describe` reads back (a report lists a few checks per table).
pub(crate) const MAX_REPORT_BYTES: usize = 4 * 1024 * 1024;
/// Prefix of every scratch database and collection.
pub(crate) const SCRATCH_PREFIX: &str = "soma_drill_";

/// Why a drill could not run.
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// A backup kind drills do not cover.
    #[error("backup {id} is a {kind} backup, which restore drills do not cover: {why}")]
    Unsupported {
        /// The backup.
        id: BackupId,
        /// Its kind.
        kind: &'static str,
        /// What to do instead.
        why: &'static str,
    },
    /// The scratch server of a base backup's drill could not be prepared or started.
    #[error("{0}")]
    Scratch(#[from] crate::engine::postgres::ScratchError),
    /// The report beside a backup is unreadable.
    #[error("backup {id}: its drill report is unreadable: {reason}")]
    BadReport {
        /// The backup.
        id: BackupId,
        /// Why.
        reason: String,
    },
}

impl DrillError {
    /// The gRPC code clients act on.
    pub fn code(&self) -> tonic::Code {
        match self {
            DrillError::Unsupported { .. } | DrillError::Scratch(_) => {
                tonic::Code::FailedPrecondition
            }
            DrillError::BadReport { .. } => tonic::Code::DataLoss,
        }
    }
}

/// One thing a drill checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Check {
    /// What was checked, e.g. `appdb: rows of public.orders`.
    pub name: String,
    /// What the backup recorded.
    pub expected: String,
    /// What the restored copy holds.
    pub found: String,
    /// Whether they agree (a skipped check counts as passed: nothing contradicted the backup).
    pub passed: bool,
    /// Not compared, e.g. a backup written before validation data was recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

impl Check {
    /// A comparison of `expected` with `found`.
    pub(crate) fn compare(name: impl Into<String>, expected: String, found: String) -> Self {
        Self {
            passed: expected == found,
            name: name.into(),
            expected,
            found,
            skipped: false,
        }
    }

    /// A check that was not made, and why.
    pub(crate) fn skipped(name: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            expected: String::new(),
            found: why.into(),
            passed: true,
            skipped: true,
        }
    }

    /// Something that held (or did not), stated in words.
    pub(crate) fn fact(
        name: impl Into<String>,
        expected: &str,
        found: String,
        passed: bool,
    ) -> Self {
        Self {
            name: name.into(),
            expected: expected.into(),
            found,
            passed,
            skipped: false,
        }
    }
}

/// What a drill found: stored as `backups/<id>/drill.json`, returned with the operation's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct DrillReport {
    /// The backup drilled.
    pub backup_id: String,
    /// Its engine.
    pub engine: String,
    /// Its kind.
    pub kind: String,
    /// Every non-skipped check passed.
    pub passed: bool,
    /// Seconds from the start of the scratch restore until the restored data was usable.
    pub rto_seconds: f64,
    /// When the drill ran.
    pub drilled_at: DateTime<Utc>,
    /// Why it did not pass; empty when it passed.
    #[serde(default)]
    pub failure: String,
    /// The scratch targets restored into (all removed again).
    #[serde(default)]
    pub scratch: Vec<String>,
    /// Every check, in the order made.
    pub checks: Vec<Check>,
}

impl DrillReport {
    fn new(
        manifest: &Manifest,
        drilled_at: DateTime<Utc>,
        rto_seconds: f64,
        scratch: Vec<String>,
        checks: Vec<Check>,
    ) -> Self {
        let failed: Vec<&Check> = checks.iter().filter(|c| !c.passed).collect();
        let failure = match failed.as_slice() {
            [] => String::new(),
            failed => format!(
                "{} check(s) failed: {}",
                failed.len(),
                failed
                    .iter()
                    .take(5)
                    .map(|c| format!("{}: expected {}, found {}", c.name, c.expected, c.found))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        };
        Self {
            backup_id: manifest.id.to_string(),
            engine: manifest.engine.as_str().into(),
            kind: manifest.kind.as_str().into(),
            passed: failed.is_empty(),
            rto_seconds,
            drilled_at,
            failure,
            scratch,
            checks,
        }
    }

    /// The report in its wire form (`report_json` is the stored document).
    pub(crate) fn to_proto(&self) -> v1::DrillReport {
        v1::DrillReport {
            passed: self.passed,
            rto_seconds: self.rto_seconds,
            drilled_at: self.drilled_at.to_rfc3339(),
            failure: self.failure.clone(),
            report_json: serde_json::to_string_pretty(self).unwrap_or_default(),
        }
    }
}

/// What one drill created on the servers, shared between the running drill and the cleanup the
/// server runs when the agent stops mid-drill.
#[derive(Debug, Clone)]
pub(crate) struct Scratch {
    /// The drill's random tag: every scratch name starts with `soma_drill_<tag>`.
    tag: String,
    created: Arc<Mutex<Vec<ScratchItem>>>,
    /// A base backup's scratch server while it runs; held here rather than by the drill so the
    /// clean-up after an interruption can still stop it in order.
    pub(in crate::ops) server: Arc<tokio::sync::Mutex<Option<ScratchServer>>>,
}

/// One scratch target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::ops) enum ScratchItem {
    /// A Qdrant collection.
    Collection(String),
    /// A directory under `--drill-dir` (a base backup's scratch data directory and its server's
    /// socket and log).
    Directory(std::path::PathBuf),
}

impl Scratch {
    fn new() -> Self {
        Self {
            tag: format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff),
            created: Arc::default(),
            server: Arc::default(),
        }
    }

    /// A scratch name for `what` (a database index or a collection name): `soma_drill_<tag>_<what>`,
    /// cut to PostgreSQL's 63-byte identifier limit on a character boundary.
    pub(in crate::ops) fn name(&self, what: &str) -> String {
        let mut name = format!("{SCRATCH_PREFIX}{}_{what}", self.tag);
        while name.len() > 63 {
            name.pop();
        }
        name
    }

    /// Records a target before it is created, so an interruption at any point removes it.
    pub(in crate::ops) fn register(&self, item: ScratchItem) {
        self.created.lock().expect("scratch lock").push(item);
    }

    /// Forgets a target this drill turned out not to create.
    pub(in crate::ops) fn forget(&self, item: &ScratchItem) {
        self.created
            .lock()
            .expect("scratch lock")
            .retain(|i| i != item);
    }

    fn names(&self) -> Vec<String> {
        self.created
            .lock()
            .expect("scratch lock")
            .iter()
            .map(|i| match i {
                ScratchItem::Collection(c) => format!("collection {c}"),
                ScratchItem::Directory(d) => format!("directory {}", d.display()),
            })
            .collect()
    }

    /// Removes every scratch target this drill created; failures are logged (they name what to
    /// drop by hand) and do not hide the drill's own result.
    pub(crate) async fn clean_up(&self, ctx: &Context) {
        // The server first: its files go next.
        if let Some(server) = self.server.lock().await.take() {
            server.stop().await;
        }
        let items = std::mem::take(&mut *self.created.lock().expect("scratch lock"));
        for item in items {
            match &item {
                ScratchItem::Collection(c) => {
                    let Ok(q) = ctx.qdrant() else { continue };
                    if let Err(e) = q.delete_collection(c).await {
                        tracing::warn!(collection = %c, error = %e, "could not delete the drill's scratch collection; delete it by hand");
                    }
                }
                ScratchItem::Directory(dir) => {
                    if let Err(e) = tokio::fs::remove_dir_all(dir).await
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        tracing::warn!(dir = %dir.display(), error = %e, "could not remove the drill's scratch directory; remove it by hand");
                    }
                }
            }
        }
    }
}

pub(crate) use drill_dir::sweep as sweep_drill_dir;
pub(in crate::ops) use drill_dir::{make_root, run_as};

/// A drill about to run.
#[derive(Debug, Clone)]
pub(crate) struct DrillPlan {
    /// The backup.
    pub manifest: Manifest,
    /// Its members, for a set.
    members: Vec<Manifest>,
    /// What the drill creates.
    pub scratch: Scratch,
}

impl DrillPlan {
    /// Resolves the backup a drill request names and checks that this agent can drill it.
    pub(crate) async fn from_request(
        ctx: &Context,
        req: v1::DrillRequest,
    ) -> Result<Self, OpError> {
        let manifest = resolve(ctx, &req.backup_id, req.engine).await?;
        let members = if manifest.engine == Engine::Set {
            members_of(&ctx.source, &manifest).await?
        } else {
            Vec::new()
        };
        for m in std::iter::once(&manifest).chain(&members) {
            check_drillable(ctx, m)?;
        }
        Ok(Self {
            manifest,
            members,
            scratch: Scratch::new(),
        })
    }

    /// The job this drill runs as: it holds the backup, so delete and prune cannot remove it
    /// mid-drill.
    pub(crate) fn job(&self) -> JobInfo {
        super::plan::reading_job(&self.manifest, Operation::Drill)
    }

    /// The span its logs carry.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::info_span!("drill", backup_id = %self.manifest.id, engine = %self.manifest.engine)
    }

    /// Runs the drill; its scratch targets are removed whatever happens.
    pub(crate) fn run(self, ctx: Arc<Context>, reporter: Reporter) -> OpFuture {
        Box::pin(async move {
            let scratch = self.scratch.clone();
            let result = drill(&ctx, self.manifest, self.members, &scratch, &reporter).await;
            reporter.phase("cleaning up", "removing the scratch targets");
            scratch.clean_up(&ctx).await;
            result
        })
    }
}

/// Refuses, before the job starts, what this agent cannot drill (a set: what it cannot drill
/// of its members, checked with them).
fn check_drillable(ctx: &Context, m: &Manifest) -> Result<(), OpError> {
    match method::of(m.engine, m.kind) {
        Some(method) => method.check_drillable(ctx, m),
        None => Ok(()),
    }
}

/// Drills `manifest` (each member of a set in turn) and stores the report.
async fn drill(
    ctx: &Arc<Context>,
    manifest: Manifest,
    members: Vec<Manifest>,
    scratch: &Scratch,
    reporter: &Reporter,
) -> Result<Outcome, OpError> {
    reporter.set_operation_id(manifest.id.as_str());
    let drilled_at = Utc::now();
    let backups = if members.is_empty() {
        vec![manifest.clone()]
    } else {
        members
    };
    reporter.set_expected_raw(backups.iter().map(|b| b.raw_bytes).sum());
    let mut checks = Vec::new();
    let mut rto = 0.0;
    for b in &backups {
        let prefix = if b.id == manifest.id {
            String::new()
        } else {
            format!("{}: ", b.id)
        };
        let Some(method) = method::of(b.engine, b.kind) else {
            return Err(OpError::NestedSet {
                set: manifest.id.clone(),
                member: b.id.clone(),
            });
        };
        let found = method.drill(ctx, b, scratch, reporter).await?;
        rto += found.rto_seconds;
        checks.extend(found.checks.into_iter().map(|c| Check {
            name: format!("{prefix}{}", c.name),
            ..c
        }));
    }
    let report = DrillReport::new(&manifest, drilled_at, rto, scratch.names(), checks);
    store_report(ctx, &manifest.id, &report).await;
    let compared = report.checks.iter().filter(|c| !c.skipped).count();
    let summary = if report.passed {
        format!(
            "drill of backup {} passed: {compared} check(s) passed, restored and usable in {:.1} s",
            manifest.id, report.rto_seconds
        )
    } else {
        format!("drill of backup {} FAILED: {}", manifest.id, report.failure)
    };
    let mut outcome = Outcome::new(summary, manifest);
    outcome.drill = Some(report);
    Ok(outcome)
}

/// Stores the report beside the backup, in the store the backup lives in; a read-only store
/// (`--restore-from`) keeps none, and a failed write is logged: the drill's result stands.
async fn store_report(ctx: &Context, id: &BackupId, report: &DrillReport) {
    let store = ctx.source.store();
    if store.is_read_only() {
        tracing::info!(backup_id = %id, store = %store.location(), "the backup's store is read-only: the drill report is returned but not stored");
        return;
    }
    let json = match serde_json::to_vec_pretty(report) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(error = %e, "could not serialise the drill report");
            return;
        }
    };
    if let Err(e) = store.put(&id.key(REPORT_NAME), Bytes::from(json)).await {
        tracing::warn!(backup_id = %id, error = %e, "could not store the drill report");
    }
}

/// The last drill report stored beside backup `id`, if any. What the store holds is untrusted:
/// reading stops at [`MAX_REPORT_BYTES`] and a document that does not parse is an error naming
/// why.
pub(crate) async fn read_report(
    store: &dyn Store,
    id: &BackupId,
) -> Result<Option<DrillReport>, OpError> {
    let mut stream = match store.get(&id.key(REPORT_NAME)).await {
        Ok(s) => s,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut raw = Vec::new();
    while let Some(chunk) = stream.next().await {
        raw.extend_from_slice(&chunk?);
        if raw.len() > MAX_REPORT_BYTES {
            return Err(DrillError::BadReport {
                id: id.clone(),
                reason: format!("larger than {MAX_REPORT_BYTES} bytes"),
            }
            .into());
        }
    }
    serde_json::from_slice(&raw).map(Some).map_err(|e| {
        DrillError::BadReport {
            id: id.clone(),
            reason: e.to_string(),
        }
        .into()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_fit_postgres_identifiers() {
        let s = Scratch::new();
        let n = s.name("1");
        assert!(n.starts_with(SCRATCH_PREFIX) && n.ends_with("_1"), "{n}");
        assert!(s.name(&"é".repeat(80)).len() <= 63);
    }

    #[test]
    fn skipped_checks_do_not_fail_a_report() {
        let checks = [
            Check::skipped("counts", "no validation data recorded: counts not compared"),
            Check::compare("rows of public.t", "3".into(), "3".into()),
        ];
        assert!(checks.iter().all(|c| c.passed));
        let failed = Check::compare("rows of public.t", "3".into(), "2".into());
        assert!(!failed.passed);
    }
}
