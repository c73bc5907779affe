//! Physical restores: choose the base backup for a target, check that the archive reaches it
//! without a gap, then lay it down and configure recovery (see [`super::pgdata`]).

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use chrono::{DateTime, FixedOffset};

use super::{BASE, PhysicalDetails, PhysicalError, pgdata};
use crate::{
    catalog::{Catalog, Engine, Kind, Manifest},
    error::OpError,
    jobs::Reporter,
    lsn::Lsn,
    ops::{Context, Outcome, artifact::artifact},
    pipeline::Counters,
    wal::{RecoveryWindow, WalArchive},
};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RecoveryTarget {
    /// The end of the archive.
    Latest,
    /// Every transaction committed at or before this time.
    Time(DateTime<FixedOffset>),
    /// Every record up to this LSN.
    Lsn(Lsn),
    /// Every record up to the restore point of this name (`pg_create_restore_point`); the
    /// archive alone cannot tell where it is, so recovery that never meets it fails there.
    Name(String),
}

/// The longest restore point name PostgreSQL keeps (`MAXFNAMELEN - 1`).
const MAX_RESTORE_POINT_NAME: usize = 63;

impl RecoveryTarget {
    /// Builds the target from the three mutually exclusive options (none given: latest).
    pub(crate) fn from_options(
        time: Option<&str>,
        lsn: Option<&str>,
        name: Option<&str>,
        latest: bool,
    ) -> Result<Self, PhysicalError> {
        match (time, lsn, name, latest) {
            (None, None, Some(n), false) => {
                let why = if n.is_empty() {
                    Some("empty")
                } else if n.len() > MAX_RESTORE_POINT_NAME {
                    Some("longer than PostgreSQL's 63 bytes")
                } else if n.chars().any(char::is_control) {
                    Some("holds control characters")
                } else {
                    None
                };
                match why {
                    Some(why) => Err(PhysicalError::BadName {
                        value: n.chars().take(80).collect(),
                        why,
                    }),
                    None => Ok(RecoveryTarget::Name(n.to_string())),
                }
            }
            (Some(t), None, None, false) => {
                parse_time(t)
                    .map(RecoveryTarget::Time)
                    .map_err(|e| PhysicalError::BadTime {
                        value: t.to_string(),
                        reason: e.to_string(),
                    })
            }
            (None, Some(l), None, false) => Ok(RecoveryTarget::Lsn(l.parse()?)),
            (None, None, None, _) => Ok(RecoveryTarget::Latest),
            _ => Err(PhysicalError::TwoTargets),
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            RecoveryTarget::Latest => "the end of the WAL archive".into(),
            RecoveryTarget::Time(t) => format!("time {}", t.to_rfc3339()),
            RecoveryTarget::Lsn(l) => format!("LSN {l}"),
            RecoveryTarget::Name(n) => format!("restore point {n:?}"),
        }
    }

    /// Whether a base backup consistent per `d` can be rolled forward to this target.
    fn reachable_from(&self, d: &PhysicalDetails) -> bool {
        match self {
            RecoveryTarget::Latest => true,
            RecoveryTarget::Time(t) => d.stop_time <= *t,
            RecoveryTarget::Lsn(l) => d.stop_lsn <= *l,
            // Where a restore point lies is known only to the WAL: any base backup may reach
            // it, and `latest` picks the newest (name an older backup for an older point).
            RecoveryTarget::Name(_) => true,
        }
    }
}

use soma_proto::time::parse_target_time as parse_time;

/// A physical restore request.
#[derive(Debug, Clone)]
pub(crate) struct PgdataRestore {
    /// Backup id, or "latest" (the newest base backup that can reach the target).
    pub backup: String,
    /// Data directory to create; must be missing or empty.
    pub pgdata: PathBuf,
    /// Where recovery stops.
    pub target: RecoveryTarget,
    /// The agent binary as the PostgreSQL server will find it (written into restore_command).
    pub agent_binary: PathBuf,
    /// Set once the directory was found empty (or created) by this restore: only then may an
    /// interrupted restore empty it again.
    pub prepared: Arc<AtomicBool>,
}

impl PgdataRestore {
    /// A restore of `backup` ("latest" or an id) into `pgdata`.
    pub(crate) fn new(
        backup: String,
        pgdata: PathBuf,
        target: RecoveryTarget,
        agent_binary: PathBuf,
    ) -> Self {
        Self {
            backup,
            pgdata,
            target,
            agent_binary,
            prepared: Arc::default(),
        }
    }
}

/// What a physical restore laid down.
#[derive(Debug, Clone)]
pub(crate) struct PgdataRestored {
    /// The base backup used.
    pub manifest: Manifest,
    /// Its details.
    pub details: PhysicalDetails,
    /// How far the archive reaches from it.
    pub window: RecoveryWindow,
    /// Human-readable summary with the next step.
    pub summary: String,
}

/// Picks the base backup for a target: the one named, or the newest that ends before the target.
async fn choose_backup(
    catalog: &Catalog,
    backup: &str,
    target: &RecoveryTarget,
) -> Result<(Manifest, PhysicalDetails), OpError> {
    if backup != "latest" {
        let mut manifest = catalog.resolve(backup).await?;
        // A platform set names its base backup among its members: restore that one.
        if manifest.engine == Engine::Set {
            manifest = physical_member(catalog, &manifest).await?;
        }
        let details = PhysicalDetails::of(&manifest)?;
        if !target.reachable_from(&details) {
            return Err(PhysicalError::AfterTarget {
                id: manifest.id,
                consistent_at: details.stop_time,
                stop_lsn: details.stop_lsn,
                target: target.describe(),
            }
            .into());
        }
        return Ok((manifest, details));
    }
    let mut physical = Vec::new();
    for m in catalog.list().await? {
        if m.kind == Kind::Physical {
            let d = PhysicalDetails::of(&m)?;
            physical.push((m, d));
        }
    }
    let Some(earliest) = physical.iter().map(|(_, d)| d.stop_time).min() else {
        return Err(PhysicalError::NoBaseBackup.into());
    };
    physical
        .into_iter()
        .find(|(_, d)| target.reachable_from(d))
        .ok_or_else(|| {
            PhysicalError::NothingBeforeTarget {
                target: target.describe(),
                earliest,
            }
            .into()
        })
}

/// The base backup among a set's members (a set holds at most one PostgreSQL member).
async fn physical_member(catalog: &Catalog, set: &Manifest) -> Result<Manifest, OpError> {
    for member in crate::ops::set::members_of(catalog, set).await? {
        if member.engine == Engine::Postgres && member.kind == Kind::Physical {
            return Ok(member);
        }
    }
    Err(PhysicalError::NotPhysical {
        id: set.id.clone(),
        engine: set.engine,
        kind: set.kind,
    }
    .into())
}

/// Checks that the archive reaches the target from the chosen backup, without a gap.
fn check_window(
    m: &Manifest,
    window: &RecoveryWindow,
    target: &RecoveryTarget,
    prefix: &str,
) -> Result<(), PhysicalError> {
    let gaps = if window.gaps.is_empty() {
        String::new()
    } else {
        format!(
            " The archive has a gap after it: {}.",
            window.gaps.join(", ")
        )
    };
    let latest_lsn = window.latest_lsn;
    let reach = format!(
        "WAL from base backup {} reaches LSN {latest_lsn} on timeline {}{} in {prefix}.{gaps}",
        m.id,
        window.timeline,
        window
            .latest_time
            .map(|t| format!(" (captured {})", t.to_rfc3339()))
            .unwrap_or_default(),
    );
    let beyond = match target {
        RecoveryTarget::Latest if !window.gaps.is_empty() => {
            return Err(PhysicalError::GapBeforeLatest { reach });
        }
        RecoveryTarget::Latest => false,
        RecoveryTarget::Time(t) => window.latest_time.is_none_or(|l| l < *t),
        RecoveryTarget::Lsn(l) => latest_lsn < *l,
        RecoveryTarget::Name(_) => false,
    };
    if beyond {
        return Err(PhysicalError::BeyondArchive {
            target: target.describe(),
            reach,
        });
    }
    Ok(())
}

/// Lays a base backup into an empty data directory and configures recovery to the target.
///
/// Nothing is left half-done: the directory is checked empty first, and if the download, a
/// checksum or the unpacking fails, everything written into it is removed again.
pub(crate) async fn restore_pgdata(
    catalog: &Catalog,
    req: &PgdataRestore,
    counters: Arc<Counters>,
) -> Result<PgdataRestored, OpError> {
    let (manifest, details) = choose_backup(catalog, &req.backup, &req.target).await?;
    let archive = WalArchive::new(catalog.store().clone(), &details.system_id);
    let index = archive
        .index(details.wal_segment_size)
        .await
        .map_err(PhysicalError::from)?;
    let window = index.window(details.timeline, details.stop_lsn);
    check_window(&manifest, &window, &req.target, &archive.prefix())?;
    pgdata::prepare(&req.pgdata).await?;
    req.prepared.store(true, Ordering::SeqCst);

    let art = artifact(&manifest, BASE.name)?.clone();
    let laid = pgdata::lay_down(catalog, &manifest, &art, &req.pgdata, counters).await;
    let configured = match laid {
        Ok(()) => pgdata::write_recovery_config(req, &manifest, &details, catalog)
            .await
            .map_err(OpError::from),
        Err(e) => Err(e),
    };
    if let Err(e) = configured {
        pgdata::clear(&req.pgdata).await;
        return Err(e);
    }
    pgdata::adopt_owner(&req.pgdata).await?;
    let summary = format!(
        "base backup {} laid down in {}; PostgreSQL will replay WAL from {} to {} and promote when it starts (the archive reaches LSN {} on timeline {}{})",
        manifest.id,
        req.pgdata.display(),
        archive.prefix(),
        req.target.describe(),
        window.latest_lsn,
        window.timeline,
        window
            .latest_time
            .map(|t| format!(", captured {}", t.to_rfc3339()))
            .unwrap_or_default()
    );
    Ok(PgdataRestored {
        manifest,
        details,
        window,
        summary,
    })
}

/// Runs a physical restore as an agent job (the plugin's `restore --pgdata`).
pub(crate) async fn restore_pgdata_job(
    ctx: Arc<Context>,
    req: PgdataRestore,
    reporter: Reporter,
) -> Result<Outcome, OpError> {
    reporter.phase(
        "restoring",
        format!("laying a base backup into {}", req.pgdata.display()),
    );
    let restored = restore_pgdata(&ctx.source, &req, reporter.counters()).await?;
    reporter.set_operation_id(restored.manifest.id.as_str());
    Ok(Outcome::new(restored.summary, restored.manifest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(
            RecoveryTarget::from_options(None, None, None, true).unwrap(),
            RecoveryTarget::Latest
        );
        assert!(RecoveryTarget::from_options(Some("yesterday"), None, None, false).is_err());
        assert!(
            RecoveryTarget::from_options(Some("2026-11-29 14:35:01"), None, None, false).is_err()
        );
        assert!(
            RecoveryTarget::from_options(Some("2026-11-25T10:00:00Z"), Some("0/1"), None, false)
                .is_err()
        );
        assert_eq!(
            RecoveryTarget::from_options(None, None, Some("before upgrade"), false).unwrap(),
            RecoveryTarget::Name("before upgrade".into())
        );
        assert!(RecoveryTarget::from_options(None, Some("0/1"), Some("p"), false).is_err());
        assert!(RecoveryTarget::from_options(None, None, Some("p"), true).is_err());
        for bad in [String::new(), "x".repeat(64), "a\nb".to_string()] {
            assert!(
                RecoveryTarget::from_options(None, None, Some(&bad), false).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            RecoveryTarget::from_options(None, Some("1/2"), None, false).unwrap(),
            RecoveryTarget::Lsn(Lsn((1 << 32) | 2))
        );
    }

    #[test]
    fn target_time_as_rfc3339_or_as_postgresql_prints_it() {
        let at = |s: &str| match RecoveryTarget::from_options(Some(s), None, None, false) {
            Ok(RecoveryTarget::Time(t)) => t,
            other => panic!("{s}: {other:?}"),
        };
        let utc = DateTime::parse_from_rfc3339("2026-11-29T14:35:01.800778Z").unwrap();
        assert_eq!(at("2026-11-29T14:35:01.800778Z"), utc);
        assert_eq!(at("2026-11-29 14:35:01.800778+00"), utc);
        assert_eq!(at("2026-11-29 20:05:01.800778+05:30"), utc);
        assert_eq!(
            at("2026-11-29 14:35:01+00"),
            DateTime::parse_from_rfc3339("2026-11-29T14:35:01Z").unwrap()
        );
        assert_eq!(
            at("2026-11-29 06:35:01-08"),
            DateTime::parse_from_rfc3339("2026-11-29T14:35:01Z").unwrap()
        );
        let err = RecoveryTarget::from_options(Some("2026-11-29 14:35"), None, None, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("2026-11-25 15:03:07.25+01"), "{err}");
    }
}
