//! The restore preflight: what the target cluster lacks for the backup's databases, found before
//! anything is written, and the plan of what the restore will create.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use super::{DatabaseNeeds, Globals, Membership, Role, RoleSetting};

/// What a restore found on the target cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub(crate) struct TargetState {
    /// Every role.
    pub roles: BTreeSet<String>,
    /// Every membership, as (role, member).
    pub memberships: BTreeSet<(String, String)>,
    /// Extensions the server can create (pg_available_extensions).
    pub extensions: BTreeSet<String>,
    /// Tablespaces.
    pub tablespaces: BTreeSet<String>,
}

/// What a restore cannot do on this target; found before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreflightError {
    /// A role the database names is neither in the backup nor on the target.
    #[error(
        "database {database} needs role {role:?}, which is neither in the backup's globals nor on the target server; create it on the target (CREATE ROLE) and restore again"
    )]
    MissingRole {
        /// The database.
        database: String,
        /// The role.
        role: String,
    },
    /// An extension the database uses cannot be created on the target.
    #[error(
        "database {database} uses extension {extension} (version {version}), which the target server cannot create (not in pg_available_extensions); install its package on the target's host and restore again"
    )]
    ExtensionUnavailable {
        /// The database.
        database: String,
        /// The extension.
        extension: String,
        /// Its version in the backup.
        version: String,
    },
    /// A tablespace the database uses is missing on the target.
    #[error(
        "database {database} uses tablespace {tablespace:?}, which does not exist on the target server; create the directory on the target's host and run CREATE TABLESPACE {tablespace:?} LOCATION {location:?} (its location on the source), then restore again"
    )]
    TablespaceMissing {
        /// The database.
        database: String,
        /// The tablespace.
        tablespace: String,
        /// Its location on the source (or "unknown" when the backup does not define it).
        location: String,
    },
    /// A string PostgreSQL cannot hold (a NUL byte): the backup was not written by an agent.
    #[error(
        "the backup's globals hold a name or value with a NUL byte ({what}); it was not written by this agent"
    )]
    Invalid {
        /// Where.
        what: String,
    },
}

impl From<crate::engine::postgres::NulByte> for PreflightError {
    /// A NUL byte found while building the globals' SQL: [`Globals::check`] refuses those in
    /// roles and their settings up front; this catches the rest (a database's own settings).
    fn from(_: crate::engine::postgres::NulByte) -> Self {
        PreflightError::Invalid {
            what: "a name or setting bound for SQL".into(),
        }
    }
}

/// What a restore will do to the target's globals, decided before anything is written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GlobalsPlan {
    /// Roles to create.
    pub create: Vec<Role>,
    /// Existing roles brought to the backup's attributes (`update_roles`).
    pub update: Vec<Role>,
    /// Existing roles left as they are.
    pub keep: Vec<String>,
    /// Memberships to grant.
    pub grants: Vec<Membership>,
    /// Per-role settings to apply (for created or updated roles only).
    pub settings: Vec<RoleSetting>,
}

impl Globals {
    /// Refuses strings no PostgreSQL catalog can hold, so nothing malformed reaches a script.
    pub(crate) fn check(&self) -> Result<(), PreflightError> {
        let bad = |what: &str, s: &str| {
            if s.contains('\0') {
                Err(PreflightError::Invalid {
                    what: what.to_string(),
                })
            } else {
                Ok(())
            }
        };
        for r in &self.roles {
            bad("role name", &r.name)?;
            bad("valid until", r.valid_until.as_deref().unwrap_or(""))?;
            bad("password", r.password.as_ref().map_or("", |p| p.0.as_str()))?;
        }
        for m in &self.memberships {
            bad("membership", &m.role)?;
            bad("membership", &m.member)?;
        }
        for s in &self.role_settings {
            bad("role setting", &s.role)?;
            bad("role setting", s.database.as_deref().unwrap_or(""))?;
            for v in &s.settings {
                bad("role setting", v)?;
            }
        }
        Ok(())
    }

    /// The part of these globals that `needed` roles make up: those roles, their memberships
    /// among themselves, their settings. Tablespaces are kept whole (a handful, and preflight
    /// needs their locations).
    pub(crate) fn only(&self, needed: &BTreeSet<String>) -> Globals {
        Globals {
            format: self.format,
            passwords: self.passwords,
            roles: self
                .roles
                .iter()
                .filter(|r| needed.contains(&r.name))
                .cloned()
                .collect(),
            memberships: self
                .memberships
                .iter()
                .filter(|m| needed.contains(&m.role) && needed.contains(&m.member))
                .cloned()
                .collect(),
            role_settings: self
                .role_settings
                .iter()
                .filter(|s| needed.contains(&s.role))
                .cloned()
                .collect(),
            tablespaces: self.tablespaces.clone(),
        }
    }
}

/// Decides what a restore of `databases` does to the target's globals, or why it cannot run.
///
/// `selected` names the backup roles the restore brings (all of the backup's for a whole-cluster
/// restore, those the chosen databases need otherwise). A database may need a role that is in the
/// backup or already on the target; extensions must be available on the target; tablespaces must
/// exist there (they cannot be created remotely). Roles already on the target are kept as they
/// are unless `update_roles`. A membership is granted when it is missing and one of its two roles
/// is created now (or `update_roles`), so an existing role's memberships change only on request.
pub(crate) fn preflight(
    globals: &Globals,
    databases: &[DatabaseNeeds],
    selected: &BTreeSet<String>,
    target: &TargetState,
    update_roles: bool,
) -> Result<GlobalsPlan, PreflightError> {
    globals.check()?;
    check_needs(globals, databases, target)?;
    let mut plan = GlobalsPlan::default();
    for role in globals.roles.iter().filter(|r| selected.contains(&r.name)) {
        if !target.roles.contains(&role.name) {
            plan.create.push(role.clone());
        } else if update_roles {
            plan.update.push(role.clone());
        } else {
            plan.keep.push(role.name.clone());
        }
    }
    let created: BTreeSet<&str> = plan.create.iter().map(|r| r.name.as_str()).collect();
    let changed = |name: &str| created.contains(name) || (update_roles && selected.contains(name));
    let exists_after = |name: &str| created.contains(name) || target.roles.contains(name);
    for m in &globals.memberships {
        let wanted = selected.contains(&m.member)
            && (selected.contains(&m.role) || target.roles.contains(&m.role));
        let missing = !target
            .memberships
            .contains(&(m.role.clone(), m.member.clone()));
        if wanted
            && missing
            && exists_after(&m.role)
            && exists_after(&m.member)
            && (changed(&m.role) || changed(&m.member))
        {
            plan.grants.push(m.clone());
        }
    }
    for s in &globals.role_settings {
        let db_ok = s
            .database
            .as_ref()
            .is_none_or(|d| target_or_restored(d, databases));
        if changed(&s.role) && db_ok {
            plan.settings.push(s.clone());
        }
    }
    Ok(plan)
}

/// Every database's roles must be in the backup or on the target, its extensions available and
/// its tablespaces present on the target: the first that is not is the error.
fn check_needs(
    globals: &Globals,
    databases: &[DatabaseNeeds],
    target: &TargetState,
) -> Result<(), PreflightError> {
    let in_backup: BTreeMap<&str, &Role> =
        globals.roles.iter().map(|r| (r.name.as_str(), r)).collect();
    let locations: BTreeMap<&str, &str> = globals
        .tablespaces
        .iter()
        .map(|t| (t.name.as_str(), t.location.as_str()))
        .collect();
    for db in databases {
        let roles = db.roles.iter().chain(std::iter::once(&db.owner));
        for role in roles {
            if !in_backup.contains_key(role.as_str()) && !target.roles.contains(role) {
                return Err(PreflightError::MissingRole {
                    database: db.name.clone(),
                    role: role.clone(),
                });
            }
        }
        for ext in &db.extensions {
            if !target.extensions.contains(&ext.name) {
                return Err(PreflightError::ExtensionUnavailable {
                    database: db.name.clone(),
                    extension: ext.name.clone(),
                    version: ext.version.clone(),
                });
            }
        }
        for ts in db.tablespaces.iter().chain(db.default_tablespace.iter()) {
            if !target.tablespaces.contains(ts) {
                return Err(PreflightError::TablespaceMissing {
                    database: db.name.clone(),
                    tablespace: ts.clone(),
                    location: locations
                        .get(ts.as_str())
                        .map_or_else(|| "unknown".to_string(), |l| (*l).to_string()),
                });
            }
        }
    }
    Ok(())
}

/// Role-in-database settings are applied only for databases the restore brings; the others may
/// not exist on the target.
fn target_or_restored(database: &str, databases: &[DatabaseNeeds]) -> bool {
    databases.iter().any(|d| d.name == database)
}
