//! What interrupted writers and old failures left in the store, and which of it prune removes:
//! incomplete uploads and manifest-less backup folders older than [`ORPHAN_AGE`], failure records
//! older than the policy's max-age. Pure decisions over listings; [`super::prune`] applies them.

use std::{
    collections::{BTreeMap, HashSet},
    time::{Duration, SystemTime},
};

use chrono::{DateTime, Utc};

use super::{
    policy::Policy,
    prune::{FAILURES_DIR, ORPHAN_AGE, PruneItem, What},
};
use crate::{
    catalog::{BACKUPS_DIR, BackupId, MANIFEST},
    jobs::Jobs,
    ops::Context,
    store::{PendingUpload, TimedObject},
};

pub(super) fn time_of(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

pub(super) fn older_than(t: DateTime<Utc>, now: DateTime<Utc>, age: Duration) -> bool {
    chrono::Duration::from_std(age).is_ok_and(|age| now - t > age)
}

pub(super) fn stamp(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The backup id a key under `backups/` belongs to (its folder name), as text.
pub(super) fn folder_of(key: &str) -> Option<&str> {
    key.strip_prefix(BACKUPS_DIR)?
        .strip_prefix('/')?
        .split('/')
        .next()
        .filter(|s| !s.is_empty())
}

/// Time stamps (`yyyymmddThhmmssZ`) of the ids running jobs hold. A backup set's members carry
/// its time stamp but are not named by its job, so a folder is treated as held when its stamp
/// matches: a few unrelated folders may wait for the next prune, no running backup loses one.
pub(super) fn held_stamps(jobs: &Jobs) -> HashSet<String> {
    let mut out = HashSet::new();
    for job in jobs.running() {
        for id in std::iter::once(job.id.as_str()).chain(job.uses.iter().map(BackupId::as_str)) {
            if let Some(stamp) = BackupId::parse(id)
                .ok()
                .and_then(|id| id.as_str().get(..STAMP_LEN).map(str::to_owned))
            {
                out.insert(stamp);
            }
        }
    }
    out
}

/// Length of a backup id's time stamp prefix (`yyyymmddThhmmssZ`).
const STAMP_LEN: usize = 16;

pub(super) fn is_held(folder: &str, held: &HashSet<String>) -> bool {
    folder.get(..STAMP_LEN).is_some_and(|s| held.contains(s))
}

/// Incomplete uploads of any owner: older than [`ORPHAN_AGE`] they go; younger, or of unknown
/// age, or of a backup a running job holds, they stay.
pub(super) fn plan_uploads(
    uploads: &[PendingUpload],
    held: &HashSet<String>,
    now: DateTime<Utc>,
) -> Vec<(PruneItem, PendingUpload)> {
    let mut out = Vec::new();
    for u in uploads {
        let name = if u.key.is_empty() {
            format!("(torn upload record {})", u.upload_id)
        } else {
            u.key.clone()
        };
        let (delete, reason) = match u.initiated.map(time_of) {
            _ if folder_of(&u.key).is_some_and(|f| is_held(f, held)) => {
                (false, "its backup is being written by a running job".to_string())
            }
            None => (
                false,
                "the store does not say when it started: left in place (abort it by hand once no agent writes it)".into(),
            ),
            Some(t) if older_than(t, now, ORPHAN_AGE) => (
                true,
                format!(
                    "started {}, more than a day ago, and never completed",
                    stamp(t)
                ),
            ),
            Some(t) => (
                false,
                format!(
                    "started {}, less than a day ago: a backup may still be writing it",
                    stamp(t)
                ),
            ),
        };
        out.push((
            PruneItem::new(What::IncompleteUpload, name, delete, reason, 0),
            u.clone(),
        ));
    }
    out
}

/// Folders under `backups/` without a manifest. Their age is that of their newest object, or of
/// their newest incomplete upload when that is newer: an interrupted backup's folder goes a day
/// after it last wrote; one of unknown age stays.
pub(super) async fn plan_orphans(
    ctx: &Context,
    uploads: &[PendingUpload],
    held: &HashSet<String>,
    now: DateTime<Utc>,
    errors: &mut Vec<String>,
) -> Vec<(PruneItem, Vec<String>)> {
    let listing = match ctx
        .catalog
        .store()
        .list_timed(&format!("{BACKUPS_DIR}/"))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            errors.push(format!(
                "listing backup folders: {e}; no orphaned objects were looked at"
            ));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (name, f) in folders(listing, uploads) {
        if f.manifest {
            continue;
        }
        let Some((delete, reason)) = orphan_verdict(&name, &f, held, now) else {
            continue;
        };
        out.push((
            PruneItem::new(
                What::Orphan,
                format!("{BACKUPS_DIR}/{name}/"),
                delete,
                reason,
                f.bytes,
            ),
            f.keys,
        ));
    }
    out
}

/// One folder under `backups/` as the listing shows it.
struct Folder {
    keys: Vec<String>,
    bytes: u64,
    /// When its newest object or incomplete upload was written.
    newest: Option<DateTime<Utc>>,
    /// Something in it has no time: the folder's age is not known.
    unknown_age: bool,
    manifest: bool,
}

impl Folder {
    fn written(&mut self, at: Option<SystemTime>) {
        match at.map(time_of) {
            Some(t) => self.newest = Some(self.newest.map_or(t, |n| n.max(t))),
            None => self.unknown_age = true,
        }
    }
}

/// The listing grouped by backup folder, each aged by its newest object or incomplete upload.
fn folders(listing: Vec<TimedObject>, uploads: &[PendingUpload]) -> BTreeMap<String, Folder> {
    let mut folders: BTreeMap<String, Folder> = BTreeMap::new();
    for o in listing {
        let Some(folder) = folder_of(&o.meta.key) else {
            continue;
        };
        let f = folders.entry(folder.to_string()).or_insert(Folder {
            keys: Vec::new(),
            bytes: 0,
            newest: None,
            unknown_age: false,
            manifest: false,
        });
        f.manifest |= o.meta.key == format!("{BACKUPS_DIR}/{folder}/{MANIFEST}");
        f.bytes += o.meta.size;
        f.written(o.modified);
        f.keys.push(o.meta.key);
    }
    for u in uploads {
        if let Some(f) = folder_of(&u.key).and_then(|f| folders.get_mut(f)) {
            f.written(u.initiated);
        }
    }
    folders
}

/// Whether a folder without a manifest goes, and why; `None` for one with neither a time nor
/// anything of unknown age (nothing to judge it by).
fn orphan_verdict(
    name: &str,
    f: &Folder,
    held: &HashSet<String>,
    now: DateTime<Utc>,
) -> Option<(bool, String)> {
    Some(match f.newest {
        _ if is_held(name, held) => (
            false,
            "no manifest yet: a running job is writing this backup".to_string(),
        ),
        _ if f.unknown_age => (
            false,
            "no manifest, and the store does not say when its objects were written: left in place"
                .into(),
        ),
        Some(t) if older_than(t, now, ORPHAN_AGE) => (
            true,
            format!(
                "no manifest (an interrupted backup) and nothing written since {}, more than a day ago",
                stamp(t)
            ),
        ),
        Some(t) => (
            false,
            format!(
                "no manifest yet, last written {}, less than a day ago: a backup may still be writing it",
                stamp(t)
            ),
        ),
        None => return None,
    })
}

/// Failure records older than the policy's max-age (90 days without one). Younger records are
/// not listed: they are what `status` shows.
pub(super) async fn plan_failures(
    ctx: &Context,
    policy: &Policy,
    now: DateTime<Utc>,
    errors: &mut Vec<String>,
) -> Vec<PruneItem> {
    let age = policy.failure_record_age();
    let listing = match ctx
        .catalog
        .store()
        .list_timed(&format!("{FAILURES_DIR}/"))
        .await
    {
        Ok(l) => l,
        Err(e) => {
            errors.push(format!("listing failure records: {e}; none were looked at"));
            return Vec::new();
        }
    };
    listing
        .into_iter()
        .filter_map(|o| {
            let t = time_of(o.modified?);
            older_than(t, now, age).then(|| {
                PruneItem::new(
                    What::Failure,
                    o.meta.key,
                    true,
                    format!(
                        "failure record written {}, older than {}",
                        stamp(t),
                        humantime::format_duration(age)
                    ),
                    o.meta.size,
                )
            })
        })
        .collect()
}
