//! The retention policy and the pure selection it makes over a store's backups.
//!
//! Rules read as restic, borg and pgBackRest read them, applied per group of top-level backups
//! (same engine, target name and kind), newest first by start time:
//! - `keep-last=N`: the N newest;
//! - `keep-daily=N`: the newest backup of each of the N most recent UTC calendar days that have a
//!   backup (days without one do not count, so a gap never makes the policy keep fewer backups);
//! - `keep-weekly=N`: the same over ISO weeks, `keep-monthly=N` over calendar months;
//! - `max-age=DUR`: every backup younger than DUR.
//!
//! A backup is kept if any rule keeps it; the newest backup of every group is always kept, so no
//! policy, however strict, can empty a group. A backup set counts as one backup of its own group
//! and its members share its fate: a member is never judged on its own, since deleting half of a
//! set would leave a set that cannot be restored.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    str::FromStr,
    time::Duration,
};

use chrono::{DateTime, Datelike, Utc};
use soma_proto::v1;

use crate::catalog::{BackupId, Engine, Kind, Manifest};

/// The accepted form, quoted by every parse error.
pub(crate) const FORM: &str = "keep-last=N,keep-daily=N,keep-weekly=N,keep-monthly=N,max-age=DUR (N ≥ 1, DUR like 30d or 12h)";

/// A retention policy: at least one rule (see the module documentation for what each keeps).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Keep the N newest backups of each group.
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the N most recent days that have one.
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the N most recent ISO weeks that have one.
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the N most recent months that have one.
    pub keep_monthly: Option<u32>,
    /// Keep every backup younger than this.
    pub max_age: Option<Duration>,
}

/// A policy that cannot be used; each names the key and the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A key that is not a rule.
    #[error("unknown retention rule {key:?}; expected {FORM}")]
    UnknownKey {
        /// The key as given.
        key: String,
    },
    /// A rule given twice.
    #[error("retention rule {key} is given twice; give each rule once: {FORM}")]
    Duplicate {
        /// The rule.
        key: &'static str,
    },
    /// A rule without `=value`, a zero count or a value that is not a number/duration.
    #[error("retention rule {key} has an invalid value {value:?}: {why}; expected {FORM}")]
    BadValue {
        /// The rule.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// No rule at all: nothing says what to keep.
    #[error("a retention policy needs at least one rule: {FORM}")]
    Empty,
    /// Neither the agent nor the request has a policy.
    #[error(
        "no retention policy: set --retention on the agent (SOMA_RETENTION) or pass --keep-last/--keep-daily/--keep-weekly/--keep-monthly/--max-age"
    )]
    NoPolicy,
}

impl PolicyError {
    /// The gRPC code: the agent has no policy is a precondition, anything else a bad argument.
    pub fn code(&self) -> tonic::Code {
        match self {
            PolicyError::NoPolicy => tonic::Code::FailedPrecondition,
            _ => tonic::Code::InvalidArgument,
        }
    }

    /// The error as a gRPC status carrying the message.
    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }
}

const KEYS: [&str; 5] = [
    "keep-last",
    "keep-daily",
    "keep-weekly",
    "keep-monthly",
    "max-age",
];

fn count(key: &str, value: &str) -> Result<u32, PolicyError> {
    let bad = |why| PolicyError::BadValue {
        key: key.to_string(),
        value: value.to_string(),
        why,
    };
    match value.parse::<u32>() {
        Ok(0) => Err(bad(
            "a count must be at least 1 (leave the rule out to not use it)",
        )),
        Ok(n) => Ok(n),
        Err(_) => Err(bad("not a whole number")),
    }
}

impl FromStr for Policy {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut p = Policy::default();
        let mut seen = HashSet::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None => {
                    return Err(match KEYS.iter().find(|k| **k == part) {
                        Some(_) => PolicyError::BadValue {
                            key: part.to_string(),
                            value: String::new(),
                            why: "missing =value",
                        },
                        None => PolicyError::UnknownKey {
                            key: part.to_string(),
                        },
                    });
                }
            };
            let Some(&known) = KEYS.iter().find(|k| **k == key) else {
                return Err(PolicyError::UnknownKey {
                    key: key.to_string(),
                });
            };
            if !seen.insert(known) {
                return Err(PolicyError::Duplicate { key: known });
            }
            match known {
                "keep-last" => p.keep_last = Some(count(known, value)?),
                "keep-daily" => p.keep_daily = Some(count(known, value)?),
                "keep-weekly" => p.keep_weekly = Some(count(known, value)?),
                "keep-monthly" => p.keep_monthly = Some(count(known, value)?),
                _ => {
                    let d =
                        humantime::parse_duration(value).map_err(|_| PolicyError::BadValue {
                            key: known.to_string(),
                            value: value.to_string(),
                            why: "not a duration",
                        })?;
                    if d.is_zero() {
                        return Err(PolicyError::BadValue {
                            key: known.to_string(),
                            value: value.to_string(),
                            why: "a zero age keeps nothing (leave the rule out to not use it)",
                        });
                    }
                    p.max_age = Some(d);
                }
            }
        }
        if p.is_empty() {
            return Err(PolicyError::Empty);
        }
        Ok(p)
    }
}

/// `--retention`'s value parser: a bad value fails at start-up with clap naming the flag.
pub(crate) fn parse_policy(s: &str) -> Result<Policy, String> {
    s.parse().map_err(|e: PolicyError| e.to_string())
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (key, n) in [
            ("keep-last", self.keep_last),
            ("keep-daily", self.keep_daily),
            ("keep-weekly", self.keep_weekly),
            ("keep-monthly", self.keep_monthly),
        ] {
            if let Some(n) = n {
                parts.push(format!("{key}={n}"));
            }
        }
        if let Some(d) = self.max_age {
            parts.push(format!("max-age={}", humantime::format_duration(d)));
        }
        f.write_str(&parts.join(","))
    }
}

impl Policy {
    /// Whether no rule is set.
    pub fn is_empty(&self) -> bool {
        self.keep_last.is_none()
            && self.keep_daily.is_none()
            && self.keep_weekly.is_none()
            && self.keep_monthly.is_none()
            && self.max_age.is_none()
    }

    /// The policy for one run: `agent`'s rules with each rule `request` sets replacing the agent's
    /// (field by field). Zero counts and ages in the request are refused like in `--retention`.
    pub fn for_request(
        agent: Option<&Policy>,
        request: Option<&v1::RetentionPolicy>,
    ) -> Result<Policy, PolicyError> {
        let mut p = agent.cloned().unwrap_or_default();
        if let Some(r) = request {
            for (key, value, slot) in [
                ("keep-last", r.keep_last, &mut p.keep_last),
                ("keep-daily", r.keep_daily, &mut p.keep_daily),
                ("keep-weekly", r.keep_weekly, &mut p.keep_weekly),
                ("keep-monthly", r.keep_monthly, &mut p.keep_monthly),
            ] {
                if let Some(n) = value {
                    *slot = Some(count(key, &n.to_string())?);
                }
            }
            if let Some(secs) = r.max_age_seconds {
                if secs == 0 {
                    return Err(PolicyError::BadValue {
                        key: "max-age".into(),
                        value: "0s".into(),
                        why: "a zero age keeps nothing (leave the rule out to not use it)",
                    });
                }
                p.max_age = Some(Duration::from_secs(secs));
            }
        }
        if p.is_empty() {
            return Err(if agent.is_none() {
                PolicyError::NoPolicy
            } else {
                PolicyError::Empty
            });
        }
        Ok(p)
    }

    /// The age beyond which failure records go: max-age, or 90 days without one.
    pub fn failure_record_age(&self) -> Duration {
        self.max_age
            .unwrap_or(Duration::from_secs(90 * 24 * 60 * 60))
    }

    /// Decides, for every backup in `manifests` (complete backups, any order), whether it is kept
    /// and why. Pure: the same manifests and `now` always give the same answer. The result is in
    /// `manifests`' order.
    pub fn select(&self, manifests: &[Manifest], now: DateTime<Utc>) -> Vec<Decision> {
        let set_of = sets_in_store(manifests);
        let mut groups: HashMap<(Engine, &str, Kind), Vec<&Manifest>> = HashMap::new();
        for m in manifests.iter().filter(|m| !set_of.contains_key(&m.id)) {
            groups
                .entry((m.engine, m.target.name.as_str(), m.kind))
                .or_default()
                .push(m);
        }
        let mut reasons: HashMap<&BackupId, Vec<String>> = HashMap::new();
        for group in groups.values_mut() {
            group.sort_by(|a, b| (b.started_at, &b.id).cmp(&(a.started_at, &a.id)));
            let why = self.group_reasons(group, now);
            reasons.extend(group.iter().map(|m| &m.id).zip(why));
        }
        manifests
            .iter()
            .map(|m| match set_of.get(&m.id) {
                Some(set) => {
                    let keep = !reasons[set].is_empty();
                    Decision {
                        id: m.id.clone(),
                        keep,
                        reason: if keep {
                            format!("member of kept set {set}")
                        } else {
                            format!("member of set {set}, which goes")
                        },
                        set: Some((*set).clone()),
                    }
                }
                None => {
                    let why = &reasons[&m.id];
                    Decision {
                        id: m.id.clone(),
                        keep: !why.is_empty(),
                        reason: if why.is_empty() {
                            "not kept by any rule".into()
                        } else {
                            why.join(", ")
                        },
                        set: None,
                    }
                }
            })
            .collect()
    }

    /// Every rule that keeps each backup of one group (sorted newest first), in the group's order;
    /// an empty list means no rule keeps it.
    fn group_reasons(&self, group: &[&Manifest], now: DateTime<Utc>) -> Vec<Vec<String>> {
        let mut why: Vec<Vec<String>> = vec![Vec::new(); group.len()];
        if let Some(n) = self.keep_last {
            for (i, reasons) in why.iter_mut().take(n as usize).enumerate() {
                reasons.push(format!("keep-last ({} of {n})", i + 1));
            }
        }
        self.calendar_reasons(group, &mut why);
        if let Some(max_age) = self.max_age {
            let max = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
            for (m, reasons) in group.iter().zip(why.iter_mut()) {
                if now - m.started_at < max {
                    reasons.push(format!(
                        "max-age (younger than {})",
                        humantime::format_duration(max_age)
                    ));
                }
            }
        }
        if let Some(newest) = why.first_mut() {
            newest.push("newest of its group (engine, target, kind): always kept".into());
        }
        why
    }

    /// keep-daily, keep-weekly and keep-monthly: the newest backup of each of the last N periods
    /// that have one.
    fn calendar_reasons(&self, group: &[&Manifest], why: &mut [Vec<String>]) {
        let periods: [(&str, Option<u32>, PeriodOf); 3] = [
            ("keep-daily", self.keep_daily, |t| {
                t.format("%Y-%m-%d").to_string()
            }),
            ("keep-weekly", self.keep_weekly, |t| {
                let w = t.iso_week();
                format!("{}-W{:02}", w.year(), w.week())
            }),
            ("keep-monthly", self.keep_monthly, |t| {
                t.format("%Y-%m").to_string()
            }),
        ];
        for (rule, n, period_of) in periods {
            let Some(n) = n else { continue };
            let mut last: Option<String> = None;
            let mut taken = 0;
            for (m, reasons) in group.iter().zip(why.iter_mut()) {
                if taken == n {
                    break;
                }
                let period = period_of(m.started_at);
                // Newest first: the first backup seen in a period is its newest.
                if last.as_ref() != Some(&period) {
                    reasons.push(format!("{rule} ({period})"));
                    last = Some(period);
                    taken += 1;
                }
            }
        }
    }
}

/// Members of a set that is in the store, by member; a member whose set is gone is top-level
/// again.
fn sets_in_store(manifests: &[Manifest]) -> HashMap<&BackupId, &BackupId> {
    let present: HashSet<&BackupId> = manifests.iter().map(|m| &m.id).collect();
    let mut set_of: HashMap<&BackupId, &BackupId> = HashMap::new();
    for m in manifests.iter().filter(|m| m.kind == Kind::Set) {
        for member in &m.members {
            if present.contains(member) {
                set_of.insert(member, &m.id);
            }
        }
    }
    set_of
}

/// The calendar period (day, ISO week, month) a time falls in, as a reason shows it.
type PeriodOf = fn(DateTime<Utc>) -> String;

/// Whether one backup is kept, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The backup.
    pub id: BackupId,
    /// Kept (true) or to delete (false).
    pub keep: bool,
    /// Every rule that keeps it, or why it goes.
    pub reason: String,
    /// The set it is a member of, when it is one: it goes and stays with that set.
    pub set: Option<BackupId>,
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::catalog::{Target, Tool};

    fn at(y: i32, mo: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, 0, 0).unwrap()
    }

    fn backup(engine: Engine, kind: Kind, target: &str, t: DateTime<Utc>) -> Manifest {
        Manifest::completed(
            BackupId::new(t, engine.id_engine(), target),
            engine,
            kind,
            Target {
                name: target.into(),
                server: "localhost".into(),
                server_version: "15".into(),
            },
            Tool {
                name: "t".into(),
                version: "1".into(),
            },
            t,
        )
    }

    fn pg(t: DateTime<Utc>) -> Manifest {
        backup(Engine::Postgres, Kind::Logical, "app", t)
    }

    fn kept(p: &Policy, ms: &[Manifest], now: DateTime<Utc>) -> Vec<BackupId> {
        p.select(ms, now)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.id)
            .collect()
    }

    fn policy(s: &str) -> Policy {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_formats_every_rule() {
        let p = policy("keep-last=7, keep-daily=14,keep-weekly=4,keep-monthly=6,max-age=30d");
        assert_eq!(p.keep_last, Some(7));
        assert_eq!(p.keep_daily, Some(14));
        assert_eq!(p.keep_weekly, Some(4));
        assert_eq!(p.keep_monthly, Some(6));
        assert_eq!(p.max_age, Some(Duration::from_secs(30 * 86400)));
        assert_eq!(
            p.to_string(),
            "keep-last=7,keep-daily=14,keep-weekly=4,keep-monthly=6,max-age=30days"
        );
        assert_eq!(policy(&p.to_string()), p);
    }

    #[test]
    fn refuses_bad_policies_naming_the_key() {
        for (text, needle) in [
            ("keep-lots=3", "unknown retention rule \"keep-lots\""),
            ("keep-last=3,keep-last=4", "keep-last is given twice"),
            ("keep-last=0", "keep-last has an invalid value \"0\""),
            ("keep-daily=x", "keep-daily has an invalid value \"x\""),
            ("keep-weekly=-1", "keep-weekly has an invalid value"),
            ("max-age=soon", "max-age has an invalid value \"soon\""),
            ("max-age=0s", "max-age has an invalid value"),
            ("keep-monthly", "keep-monthly has an invalid value"),
            ("", "at least one rule"),
            (" , ", "at least one rule"),
        ] {
            let err = text.parse::<Policy>().unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(err.contains("keep-last=N"), "names the form: {err}");
        }
    }

    #[test]
    fn request_fields_override_the_agent_field_by_field() {
        let agent = policy("keep-last=7,keep-daily=14");
        let req = v1::RetentionPolicy {
            keep_last: Some(2),
            max_age_seconds: Some(3600),
            ..Default::default()
        };
        let p = Policy::for_request(Some(&agent), Some(&req)).unwrap();
        assert_eq!(p.to_string(), "keep-last=2,keep-daily=14,max-age=1h");
        assert_eq!(Policy::for_request(Some(&agent), None).unwrap(), agent);
        let none = Policy::for_request(None, Some(&v1::RetentionPolicy::default())).unwrap_err();
        assert_eq!(none, PolicyError::NoPolicy);
        assert_eq!(none.code(), tonic::Code::FailedPrecondition);
        assert!(none.to_string().contains("--retention"));
        let zero = v1::RetentionPolicy {
            keep_daily: Some(0),
            ..Default::default()
        };
        let err = Policy::for_request(Some(&agent), Some(&zero)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("keep-daily"), "{err}");
    }

    #[test]
    fn keep_last_keeps_the_n_newest() {
        let ms: Vec<_> = (1..=5).map(|d| pg(at(2026, 11, d, 12))).collect();
        let now = at(2026, 11, 30, 0);
        assert_eq!(
            kept(&policy("keep-last=2"), &ms, now),
            vec![ms[3].id.clone(), ms[4].id.clone()]
        );
        let d = policy("keep-last=2").select(&ms, now);
        assert_eq!(d[0].reason, "not kept by any rule");
        assert!(
            d[4].reason.contains("keep-last (1 of 2)"),
            "{}",
            d[4].reason
        );
        assert!(d[4].reason.contains("always kept"), "{}", d[4].reason);
    }

    #[test]
    fn keep_daily_takes_the_newest_of_each_day_with_a_backup_across_gaps() {
        // Three on Nov 10 (the newest at 18:00), none on 11-12, two on Nov 13, one on Nov 20.
        let ms = vec![
            pg(at(2026, 11, 10, 6)),
            pg(at(2026, 11, 10, 18)),
            pg(at(2026, 11, 10, 12)),
            pg(at(2026, 11, 13, 1)),
            pg(at(2026, 11, 13, 23)),
            pg(at(2026, 11, 20, 9)),
            pg(at(2026, 11, 9, 9)),
        ];
        let now = at(2026, 11, 30, 0);
        // Three days that have backups: Nov 20, 13 and 10 (the gap days do not count).
        let mut k = kept(&policy("keep-daily=3"), &ms, now);
        k.sort();
        let mut want = vec![ms[1].id.clone(), ms[4].id.clone(), ms[5].id.clone()];
        want.sort();
        assert_eq!(k, want);
        let d = policy("keep-daily=3").select(&ms, now);
        assert!(
            d[1].reason.contains("keep-daily (2026-11-10)"),
            "{}",
            d[1].reason
        );
        assert_eq!(d[2].reason, "not kept by any rule");
    }

    #[test]
    fn keep_weekly_uses_iso_weeks_and_monthly_calendar_months() {
        // 2026-11-29 is a Sunday (ISO week 48); 2026-11-30 a Monday (week 49).
        let sun = pg(at(2026, 11, 29, 10));
        let sun_early = pg(at(2026, 11, 29, 1));
        let mon = pg(at(2026, 11, 30, 10));
        let prev_week = pg(at(2026, 11, 20, 10));
        let oct = pg(at(2026, 10, 31, 23));
        let oct_early = pg(at(2026, 10, 2, 0));
        let ms = vec![
            sun.clone(),
            sun_early.clone(),
            mon.clone(),
            prev_week.clone(),
            oct.clone(),
            oct_early,
        ];
        let now = at(2026, 12, 1, 0);
        let mut k = kept(&policy("keep-weekly=2"), &ms, now);
        k.sort();
        let mut want = vec![mon.id.clone(), sun.id.clone()];
        want.sort();
        assert_eq!(
            k, want,
            "week 49's Monday and week 48's newest (Sunday 10:00)"
        );
        let d = policy("keep-weekly=2").select(&ms, now);
        assert!(
            d[0].reason.contains("keep-weekly (2026-W48)"),
            "{}",
            d[0].reason
        );
        let mut k = kept(&policy("keep-monthly=2"), &ms, now);
        k.sort();
        let mut want = vec![mon.id.clone(), oct.id.clone()];
        want.sort();
        assert_eq!(k, want, "November's newest and October's newest");
    }

    #[test]
    fn max_age_keeps_everything_younger_and_rules_combine() {
        let now = at(2026, 11, 30, 0);
        let young = pg(at(2026, 11, 29, 1));
        let young2 = pg(at(2026, 11, 28, 1));
        let old = pg(at(2026, 11, 20, 1));
        let older = pg(at(2026, 11, 1, 1));
        let ms = vec![young.clone(), young2.clone(), old.clone(), older.clone()];
        let mut k = kept(&policy("max-age=3d"), &ms, now);
        k.sort();
        let mut want = vec![young.id.clone(), young2.id.clone()];
        want.sort();
        assert_eq!(k, want);
        // Either rule keeps: max-age the young ones, keep-monthly the newest of November only.
        let mut k = kept(&policy("max-age=3d,keep-monthly=1"), &ms, now);
        k.sort();
        assert_eq!(k, want);
        let k = kept(&policy("max-age=3d,keep-last=3"), &ms, now);
        assert!(k.contains(&old.id) && !k.contains(&older.id));
    }

    #[test]
    fn groups_are_per_engine_target_and_kind_and_each_keeps_its_newest() {
        let now = at(2026, 11, 30, 0);
        let app1 = pg(at(2026, 11, 1, 0));
        let app2 = pg(at(2026, 11, 2, 0));
        let other = backup(
            Engine::Postgres,
            Kind::Logical,
            "billing",
            at(2026, 10, 1, 0),
        );
        let phys = backup(Engine::Postgres, Kind::Physical, "app", at(2026, 10, 2, 0));
        let q = backup(
            Engine::Qdrant,
            Kind::QdrantCollections,
            "app",
            at(2026, 9, 1, 0),
        );
        let ms = vec![
            app1.clone(),
            app2.clone(),
            other.clone(),
            phys.clone(),
            q.clone(),
        ];
        // max-age keeps none of them: each group's newest is kept all the same.
        let d = policy("max-age=1h").select(&ms, now);
        let keep: Vec<_> = d.iter().map(|d| d.keep).collect();
        assert_eq!(keep, vec![false, true, true, true, true]);
        assert_eq!(
            d[1].reason,
            "newest of its group (engine, target, kind): always kept"
        );
    }

    #[test]
    fn a_set_counts_once_and_its_members_follow_it() {
        let now = at(2026, 11, 30, 0);
        let mk_set = |t: DateTime<Utc>| {
            let p = pg(t + chrono::Duration::seconds(1));
            let q = backup(
                Engine::Qdrant,
                Kind::QdrantCollections,
                "all",
                t + chrono::Duration::seconds(2),
            );
            let s = backup(Engine::Set, Kind::Set, "all", t).with_members(&[p.clone(), q.clone()]);
            (s, p, q)
        };
        let (s1, p1, q1) = mk_set(at(2026, 11, 1, 0));
        let (s2, p2, q2) = mk_set(at(2026, 11, 2, 0));
        // A standalone logical backup of the same database, newer than both sets' members: in its
        // own group, so keep-last=1 of the sets is not affected by it, and it is not a member.
        let alone = pg(at(2026, 11, 3, 0));
        let ms = vec![
            alone.clone(),
            q2.clone(),
            p2.clone(),
            s2.clone(),
            q1.clone(),
            p1.clone(),
            s1.clone(),
        ];
        let d = policy("keep-last=1").select(&ms, now);
        let by_id: HashMap<_, _> = d.iter().map(|d| (d.id.clone(), d)).collect();
        assert!(by_id[&s2.id].keep && by_id[&p2.id].keep && by_id[&q2.id].keep);
        assert!(!by_id[&s1.id].keep && !by_id[&p1.id].keep && !by_id[&q1.id].keep);
        assert!(by_id[&alone.id].keep);
        assert_eq!(by_id[&p1.id].set.as_ref(), Some(&s1.id));
        assert_eq!(
            by_id[&p1.id].reason,
            format!("member of set {}, which goes", s1.id)
        );
        assert_eq!(
            by_id[&q2.id].reason,
            format!("member of kept set {}", s2.id)
        );
        // Members never count as their engine's backups: keep-last=1 of the logical group
        // is the standalone one, and only it.
        assert_eq!(by_id[&alone.id].reason.matches("keep-last").count(), 1);
    }

    #[test]
    fn a_member_whose_set_is_gone_is_judged_on_its_own() {
        let now = at(2026, 11, 30, 0);
        let p_old = pg(at(2026, 11, 1, 0));
        let p_new = pg(at(2026, 11, 2, 0));
        let orphan_set = backup(Engine::Set, Kind::Set, "all", at(2026, 10, 1, 0))
            .with_members(std::slice::from_ref(&p_old));
        // The set's manifest is not among the backups: p_old is top-level again.
        let d = policy("keep-last=1").select(&[p_new.clone(), p_old.clone()], now);
        assert!(d[0].keep && !d[1].keep && d[1].set.is_none());
        let _ = orphan_set;
    }
}
