//! Prune: applies a [`Policy`] to the store — deletes the backups it drops (a set with its
//! members), the WAL no kept base backup needs, and what interrupted writers left behind — or, in
//! a dry run, says exactly that without deleting anything.
//!
//! Everything is decided from one look at the store before anything is deleted, and a dry run
//! returns that decision as it stands, so it lists exactly what a real run deletes. The one
//! exception is deliberate: WAL is decided after the backups were deleted, from the base backups
//! actually left, so a backup a running restore kept alive keeps its WAL too.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use chrono::{DateTime, Utc};
use soma_proto::v1;

use super::{
    leftovers::{folder_of, held_stamps, plan_failures, plan_orphans, plan_uploads},
    policy::{Decision, Policy},
};
use crate::{
    catalog::{BackupId, BackupKeys, CatalogError, MANIFEST, Manifest},
    error::OpError,
    jobs::Jobs,
    ops::{
        Context,
        delete::{WalAfterDelete, delete_manifest},
        physical::{PhysicalDetails, oldest_base, wal_before},
    },
    store::{PendingUpload, Store, StoreError},
    wal::{WAL_DIR, WalFile},
};

/// How old an incomplete upload or a folder without a manifest must be before prune removes it:
/// a backup in progress has no manifest yet, and a day is far beyond any upload's pauses.
pub(crate) const ORPHAN_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Folder of failure records, relative to the store prefix (small JSON objects).
pub(crate) const FAILURES_DIR: &str = "failures";

/// What a [`PruneItem`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum What {
    /// A backup (a set, or a member going and staying with its set).
    Backup,
    /// A WAL archive object, or (kept) a whole cluster's archive.
    Wal,
    /// A multipart upload never completed.
    IncompleteUpload,
    /// A backup folder without a manifest.
    Orphan,
    /// A failure record under `failures/`.
    Failure,
}

impl What {
    /// The word in `PruneItem.what`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            What::Backup => "backup",
            What::Wal => "wal",
            What::IncompleteUpload => "incomplete-upload",
            What::Orphan => "orphan",
            What::Failure => "failure",
        }
    }
}

/// One thing prune looked at, and what it did (or would do) with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PruneItem {
    /// What it is.
    pub what: What,
    /// Backup id, or store key (a folder ends in `/`).
    pub name: String,
    /// Deleted (or, in a dry run, would be).
    pub delete: bool,
    /// Why.
    pub reason: String,
    /// Stored bytes.
    pub bytes: u64,
    /// For backups: engine, kind and target name.
    pub backup: Option<(String, String, String)>,
}

impl PruneItem {
    pub(super) fn new(
        what: What,
        name: impl Into<String>,
        delete: bool,
        reason: String,
        bytes: u64,
    ) -> Self {
        Self {
            what,
            name: name.into(),
            delete,
            reason,
            bytes,
            backup: None,
        }
    }
}

/// What a prune did (or, in a dry run, would do).
#[derive(Debug, Clone, Default)]
pub(crate) struct PruneReport {
    /// Nothing was deleted.
    pub dry_run: bool,
    /// The rules applied.
    pub policy: String,
    /// Backups kept and deleted, then WAL, incomplete uploads, orphans and failure records.
    pub items: Vec<PruneItem>,
    /// Objects deleted (0 in a dry run).
    pub objects_deleted: u64,
    /// What could not be looked at or deleted, each naming the object; prune goes on past them.
    pub errors: Vec<String>,
}

impl PruneReport {
    /// The report on the wire.
    pub(crate) fn to_proto(&self) -> v1::PruneResponse {
        v1::PruneResponse {
            dry_run: self.dry_run,
            policy: self.policy.clone(),
            items: self
                .items
                .iter()
                .map(|i| {
                    let (engine, kind, target) = i.backup.clone().unwrap_or_default();
                    v1::PruneItem {
                        what: i.what.as_str().into(),
                        name: i.name.clone(),
                        delete: i.delete,
                        reason: i.reason.clone(),
                        bytes: i.bytes,
                        engine,
                        kind,
                        target,
                    }
                })
                .collect(),
            objects_deleted: self.objects_deleted,
            errors: self.errors.clone(),
        }
    }
}

/// Applies `policy` to this agent's store at `now` (see the module documentation). With `dry_run`
/// nothing is deleted and the report lists what would go, each with why. A read-only store is
/// refused unless `dry_run`, which only reads.
pub(crate) async fn prune(
    ctx: &Context,
    jobs: &Arc<Jobs>,
    policy: &Policy,
    dry_run: bool,
    now: DateTime<Utc>,
) -> Result<PruneReport, OpError> {
    let store = ctx.catalog.store().clone();
    if !dry_run && store.is_read_only() {
        return Err(StoreError::ReadOnly {
            location: store.location(),
        }
        .into());
    }
    let mut report = PruneReport {
        dry_run,
        policy: policy.to_string(),
        ..Default::default()
    };
    // Strict: nothing is deleted while a manifest cannot be read (its WAL may still be needed).
    let manifests = ctx.catalog.list_strict().await?;
    let decisions = policy.select(&manifests, now);
    // Everything else is decided from the same look at the store, before any delete.
    let leftovers = Leftovers::plan(ctx, jobs, policy, now, &mut report).await;

    backups(ctx, jobs, &manifests, &decisions, dry_run, &mut report).await;

    // WAL: from the base backups that are left (in a dry run, those the policy keeps).
    let remaining = if dry_run {
        let gone: HashSet<&BackupId> = decisions
            .iter()
            .filter(|d| !d.keep)
            .map(|d| &d.id)
            .collect();
        manifests
            .iter()
            .filter(|m| !gone.contains(&m.id))
            .cloned()
            .collect()
    } else {
        ctx.catalog.list_strict().await?
    };
    wal(ctx, &manifests, &remaining, dry_run, &mut report).await;

    leftovers.apply(&store, dry_run, &mut report).await;
    tracing::info!(
        dry_run,
        objects_deleted = report.objects_deleted,
        errors = report.errors.len(),
        "prune finished"
    );
    Ok(report)
}

/// What interrupted writers and old failures left, decided before any backup is deleted.
struct Leftovers {
    uploads: Vec<(PruneItem, PendingUpload)>,
    orphans: Vec<(PruneItem, Vec<String>)>,
    failures: Vec<PruneItem>,
}

impl Leftovers {
    async fn plan(
        ctx: &Context,
        jobs: &Jobs,
        policy: &Policy,
        now: DateTime<Utc>,
        report: &mut PruneReport,
    ) -> Self {
        let held = held_stamps(jobs);
        let uploads = match ctx.catalog.store().list_uploads("").await {
            Ok(u) => u,
            Err(e) => {
                report.errors.push(format!(
                    "listing incomplete uploads: {e}; none were looked at"
                ));
                Vec::new()
            }
        };
        Leftovers {
            uploads: plan_uploads(&uploads, &held, now),
            orphans: plan_orphans(ctx, &uploads, &held, now, &mut report.errors).await,
            failures: plan_failures(ctx, policy, now, &mut report.errors).await,
        }
    }

    async fn apply(self, store: &Arc<dyn Store>, dry_run: bool, report: &mut PruneReport) {
        for (item, upload) in self.uploads {
            apply(report, item, dry_run, || async {
                store.abort_upload(&upload).await.map(|()| 0)
            })
            .await;
        }
        for (item, keys) in self.orphans {
            apply(report, item, dry_run, || delete_orphan(store, keys)).await;
        }
        for item in self.failures {
            let key = item.name.clone();
            apply(report, item, dry_run, || async {
                store.delete(&key).await.map(|()| 1)
            })
            .await;
        }
    }
}

/// Deletes an orphaned folder's objects, unless its backup completed since the listing.
async fn delete_orphan(store: &Arc<dyn Store>, keys: Vec<String>) -> Result<u64, StoreError> {
    // A backup that completed since the listing is no orphan.
    if let Some(id) = keys
        .first()
        .and_then(|k| folder_of(k))
        .and_then(|f| BackupId::parse(f).ok())
        && store.head(&id.key(MANIFEST)).await?.is_some()
    {
        return Err(StoreError::Request {
            key: id.to_string(),
            message: "its manifest appeared since prune looked: left in place".into(),
            retryable: false,
            remedy: None,
            source: None,
        });
    }
    let mut n = 0;
    for key in &keys {
        store.delete(key).await?;
        n += 1;
    }
    Ok(n)
}

/// Runs `delete` for an item that goes (not in a dry run), counting objects; a failure keeps the
/// item, says why, and is listed in the report's errors.
async fn apply<F, Fut>(report: &mut PruneReport, mut item: PruneItem, dry_run: bool, delete: F)
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    if item.delete && !dry_run {
        match delete().await {
            Ok(n) => report.objects_deleted += n,
            Err(e) => {
                report.errors.push(format!("{}: {e}", item.name));
                item.delete = false;
                item.reason = format!("could not delete: {e} (was: {})", item.reason);
            }
        }
    }
    report.items.push(item);
}

/// Backups: one item per backup, in the catalog's order (newest first); the ones the policy drops
/// are deleted set by set through [`delete_manifest`], which refuses a backup a running job reads.
async fn backups(
    ctx: &Context,
    jobs: &Arc<Jobs>,
    manifests: &[Manifest],
    decisions: &[Decision],
    dry_run: bool,
    report: &mut PruneReport,
) {
    let mut outcome: HashMap<BackupId, Result<(), String>> = HashMap::new();
    if !dry_run {
        for (m, d) in manifests.iter().zip(decisions) {
            if d.keep || d.set.is_some() {
                continue;
            }
            let result = match delete_manifest(ctx, jobs, m, WalAfterDelete::Leave).await {
                Ok(deleted) => {
                    report.objects_deleted += deleted.objects;
                    Ok(())
                }
                // Deleted by someone else since prune listed it: gone all the same.
                Err(OpError::Catalog(CatalogError::NotFound(_))) => Ok(()),
                Err(OpError::Busy(busy)) => Err(format!("skipped: {busy}")),
                Err(e) => {
                    report.errors.push(format!("backup {}: {e}", m.id));
                    Err(format!("could not delete: {e}"))
                }
            };
            outcome.insert(m.id.clone(), result);
        }
    }
    for (m, d) in manifests.iter().zip(decisions) {
        let mut item = PruneItem::new(
            What::Backup,
            m.id.as_str(),
            !d.keep,
            d.reason.clone(),
            m.stored_bytes,
        );
        item.backup = Some((
            m.engine.as_str().into(),
            m.kind.as_str().into(),
            m.target.name.clone(),
        ));
        let decided_by = d.set.as_ref().unwrap_or(&m.id);
        if let Some(Err(why)) = outcome.get(decided_by) {
            item.delete = false;
            item.reason = format!("{why} (was: {})", item.reason);
        }
        report.items.push(item);
    }
}

/// WAL of every cluster the store has an archive or a base backup of: what comes before the
/// oldest remaining base backup's start goes; a cluster without a remaining base backup keeps
/// its archive whole.
async fn wal(
    ctx: &Context,
    all: &[Manifest],
    remaining: &[Manifest],
    dry_run: bool,
    report: &mut PruneReport,
) {
    let store = ctx.catalog.store();
    let listing = match store.list(&format!("{WAL_DIR}/")).await {
        Ok(l) => l,
        Err(e) => {
            report.errors.push(format!(
                "listing the WAL archive: {e}; no WAL was looked at"
            ));
            return;
        }
    };
    let mut clusters: BTreeMap<String, (u64, HashMap<String, u64>)> = BTreeMap::new();
    for o in &listing {
        if let Some(sid) = o
            .key
            .strip_prefix(&format!("{WAL_DIR}/"))
            .and_then(|r| r.split_once('/'))
            .map(|(sid, _)| sid)
        {
            let entry = clusters.entry(sid.to_string()).or_default();
            entry.0 += o.size;
            entry.1.insert(o.key.clone(), o.size);
        }
    }
    for m in all {
        if let Ok(d) = PhysicalDetails::of(m) {
            clusters.entry(d.system_id).or_default();
        }
    }
    for (sid, (total, sizes)) in clusters {
        let folder = format!("{WAL_DIR}/{sid}/");
        let Some((base, details)) = oldest_base(remaining, &sid) else {
            report.items.push(PruneItem::new(
                What::Wal,
                folder,
                false,
                format!(
                    "no base backup of system id {sid} is kept: its WAL is kept whole (a whole archive is never deleted as a side effect; delete wal/{sid}/ by hand if that cluster is gone)"
                ),
                total,
            ));
            continue;
        };
        let cluster = WalCluster {
            sid: &sid,
            folder,
            total,
            sizes: &sizes,
        };
        cluster.prune(ctx, &base, &details, dry_run, report).await;
    }
}

/// One cluster's WAL archive in the store, with a kept base backup.
struct WalCluster<'a> {
    sid: &'a str,
    /// `wal/SYSTEM_ID/`.
    folder: String,
    /// Stored bytes of the whole archive.
    total: u64,
    /// Each object's size, by key.
    sizes: &'a HashMap<String, u64>,
}

impl WalCluster<'_> {
    /// Deletes what comes before the oldest kept base backup's first segment; the rest stays.
    async fn prune(
        self,
        ctx: &Context,
        base: &Manifest,
        details: &PhysicalDetails,
        dry_run: bool,
        report: &mut PruneReport,
    ) {
        let Some(start) = details.start_lsn.segno(details.wal_segment_size) else {
            return;
        };
        let first = WalFile::from_segno(details.timeline, start, details.wal_segment_size).name();
        let objects = match wal_before(&ctx.catalog, details, start).await {
            Ok(o) => o,
            Err(e) => {
                report.errors.push(format!(
                    "listing WAL of system id {}: {e}; none of it was deleted",
                    self.sid
                ));
                return;
            }
        };
        let store = ctx.catalog.store();
        let mut freed = 0;
        for o in objects {
            let bytes = self.sizes.get(&o.key).copied().unwrap_or(0);
            freed += bytes;
            let item = PruneItem::new(
                What::Wal,
                o.key.clone(),
                true,
                format!(
                    "before segment {first}, where the oldest kept base backup {} starts: no kept base backup needs it",
                    base.id
                ),
                bytes,
            );
            apply(report, item, dry_run, || async {
                store.delete(&o.key).await.map(|()| 1)
            })
            .await;
        }
        report.items.push(PruneItem::new(
            What::Wal,
            self.folder,
            false,
            format!(
                "from segment {first} on: needed by the oldest kept base backup {} and every newer one",
                base.id
            ),
            self.total.saturating_sub(freed),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{retention::leftovers::is_held, store::PendingUpload};
    use std::time::SystemTime;

    #[test]
    fn folders_and_stamps() {
        assert_eq!(
            folder_of("backups/20261129T140000Z-pg-app-0a1b/dump.zst"),
            Some("20261129T140000Z-pg-app-0a1b")
        );
        assert_eq!(folder_of("backups/"), None);
        assert_eq!(folder_of("wal/1/x"), None);
        let held: HashSet<String> = ["20261129T140000Z".to_string()].into();
        assert!(is_held("20261129T140000Z-qd-all-ffff", &held));
        assert!(!is_held("20261129T140001Z-qd-all-ffff", &held));
        assert!(!is_held("short", &held));
    }

    /// A context over a fresh local store with no engine: what prune needs.
    async fn local_context() -> (tempfile::TempDir, Context) {
        crate::ops::test_context(None, None).await
    }

    async fn commit(ctx: &Context, days_ago: i64) -> BackupId {
        let at = Utc::now() - chrono::Duration::days(days_ago);
        let id = BackupId::new(at, crate::catalog::IdEngine::Postgres, "app");
        let m = Manifest::completed(
            id.clone(),
            crate::catalog::Engine::Postgres,
            crate::catalog::Kind::Logical,
            crate::catalog::Target {
                name: "app".into(),
                server: "localhost".into(),
                server_version: "15".into(),
            },
            crate::catalog::Tool {
                name: "pg_dump".into(),
                version: "15".into(),
            },
            at,
        );
        ctx.catalog.commit(&m).await.unwrap();
        id
    }

    #[tokio::test]
    async fn a_backup_a_running_restore_reads_is_skipped_with_the_reason_then_pruned() {
        let (_dir, ctx) = local_context().await;
        let jobs = Arc::new(Jobs::new(tokio_util::sync::CancellationToken::new()));
        let old = commit(&ctx, 3).await;
        let new = commit(&ctx, 1).await;
        let policy: Policy = "keep-last=1".parse().unwrap();
        let dry = prune(&ctx, &jobs, &policy, true, Utc::now()).await.unwrap();
        let going: Vec<_> = dry.items.iter().filter(|i| i.delete).collect();
        assert_eq!(going.len(), 1);
        assert_eq!(going[0].name, old.as_str());
        assert_eq!(dry.objects_deleted, 0);
        assert_eq!(
            ctx.catalog.list().await.unwrap().len(),
            2,
            "a dry run deletes nothing"
        );

        let restore = jobs
            .begin(crate::jobs::JobInfo::new(
                old.as_str(),
                crate::jobs::Operation::Restore,
                vec![crate::jobs::JobTarget::Database("x".into())],
                vec![old.clone()],
            ))
            .unwrap();
        let run = prune(&ctx, &jobs, &policy, false, Utc::now())
            .await
            .unwrap();
        let item = run.items.iter().find(|i| i.name == old.as_str()).unwrap();
        assert!(!item.delete, "{item:?}");
        assert!(
            item.reason.contains("skipped") && item.reason.contains("a restore is already running"),
            "{}",
            item.reason
        );
        assert!(run.errors.is_empty(), "{:?}", run.errors);
        assert_eq!(ctx.catalog.list().await.unwrap().len(), 2);

        drop(restore);
        let run = prune(&ctx, &jobs, &policy, false, Utc::now())
            .await
            .unwrap();
        let gone: Vec<_> = run
            .items
            .iter()
            .filter(|i| i.delete)
            .map(|i| &i.name)
            .collect();
        assert_eq!(gone, vec![old.as_str()]);
        assert!(run.objects_deleted >= 1);
        let left: Vec<_> = ctx
            .catalog
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(left, vec![new]);
    }

    #[tokio::test]
    async fn a_read_only_store_is_refused_except_for_a_dry_run() {
        let (dir, _) = local_context().await;
        let store = crate::store::open_read_only(
            &format!("file://{}", dir.path().display()),
            &Default::default(),
        )
        .await
        .unwrap();
        let (_other, mut ctx) = local_context().await;
        ctx.catalog = crate::catalog::Catalog::new(store);
        let jobs = Arc::new(Jobs::new(tokio_util::sync::CancellationToken::new()));
        let policy: Policy = "keep-last=1".parse().unwrap();
        let err = prune(&ctx, &jobs, &policy, false, Utc::now())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("read-only"), "{err}");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(prune(&ctx, &jobs, &policy, true, Utc::now()).await.is_ok());
    }

    #[test]
    fn uploads_older_than_a_day_go_younger_and_unknown_stay() {
        let now = Utc::now();
        let up = |key: &str, ago: Option<u64>| PendingUpload {
            key: key.into(),
            upload_id: "u".into(),
            initiated: ago.map(|s| SystemTime::from(now) - Duration::from_secs(s)),
        };
        let uploads = vec![
            up("backups/20200101T000000Z-pg-a-0000/dump", Some(2 * 86400)),
            up("backups/20200101T000000Z-pg-b-0000/dump", Some(3600)),
            up("backups/20200101T000000Z-pg-c-0000/dump", None),
            up("backups/20261129T140000Z-pg-d-0000/dump", Some(2 * 86400)),
        ];
        let held: HashSet<String> = ["20261129T140000Z".to_string()].into();
        let items = plan_uploads(&uploads, &held, now);
        let deletes: Vec<bool> = items.iter().map(|(i, _)| i.delete).collect();
        assert_eq!(deletes, vec![true, false, false, false]);
        assert!(items[2].0.reason.contains("does not say when"));
        assert!(items[3].0.reason.contains("running job"));
    }
}
