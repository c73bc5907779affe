//! A cluster's globals — roles, memberships, per-role settings, tablespaces — captured with SQL
//! rather than `pg_dumpall --globals-only`, so a restore can compare them with the target and
//! create only what is missing; and what each database needs of them to be restored.
//!
//! Everything here is read back from the store on restore, so it is untrusted: every name and
//! value goes into SQL through [`quote_ident`] / [`quote_literal`], and strings PostgreSQL could
//! never hold (NUL bytes) are refused by [`Globals::check`] before any SQL is built.

use serde::{Deserialize, Serialize};

use super::{quote_ident, quote_literal};

mod preflight;
mod sql;

pub(crate) use preflight::{GlobalsPlan, PreflightError, TargetState, preflight};
pub(crate) use sql::{create_database_sql, database_setting_sql, plan_script, role_setting_sql};

/// Format version of the globals document.
pub(crate) const GLOBALS_FORMAT: u32 = 1;

/// A role's password hash (SCRAM or md5, as pg_authid holds it). Never printed: `Debug` redacts it,
/// and it only ever reaches PostgreSQL through a script on psql's stdin.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct PasswordHash(String);

impl PasswordHash {
    /// Wraps a hash (the agent reads them from pg_authid through serde; tests make their own).
    #[cfg(test)]
    pub(crate) fn new(hash: String) -> Self {
        Self(hash)
    }
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

/// A role with every attribute `CREATE ROLE` takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Role {
    /// Role name.
    pub name: String,
    /// SUPERUSER.
    pub superuser: bool,
    /// INHERIT.
    pub inherit: bool,
    /// CREATEROLE.
    pub createrole: bool,
    /// CREATEDB.
    pub createdb: bool,
    /// LOGIN.
    pub login: bool,
    /// REPLICATION.
    pub replication: bool,
    /// BYPASSRLS.
    pub bypassrls: bool,
    /// CONNECTION LIMIT (-1: none).
    pub connection_limit: i32,
    /// VALID UNTIL, as PostgreSQL prints a timestamptz in JSON (or "infinity").
    #[serde(default)]
    pub valid_until: Option<String>,
    /// The password hash; absent when the role has none or the backup user could not read
    /// pg_authid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PasswordHash>,
}

/// `GRANT role TO member`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Membership {
    /// The role granted.
    pub role: String,
    /// The role it is granted to.
    pub member: String,
    /// WITH ADMIN OPTION.
    pub admin_option: bool,
}

/// `ALTER ROLE role [IN DATABASE database] SET ...` (pg_db_role_setting).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RoleSetting {
    /// The role.
    pub role: String,
    /// Only in this database, when set.
    #[serde(default)]
    pub database: Option<String>,
    /// `name=value` entries as PostgreSQL stores them.
    #[serde(default)]
    pub settings: Vec<String>,
}

/// A tablespace: restores cannot create it (its directory must exist on the target's host), only
/// tell the operator to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Tablespace {
    /// Name.
    pub name: String,
    /// Owner.
    pub owner: String,
    /// Directory on the source server's host.
    pub location: String,
    /// `name=value` options.
    #[serde(default)]
    pub options: Vec<String>,
}

/// The globals of a cluster, or the part of them one database needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Globals {
    /// [`GLOBALS_FORMAT`].
    pub format: u32,
    /// Whether password hashes were captured (false when the backup user could not read
    /// pg_authid: roles are then restored without passwords).
    pub passwords: bool,
    /// Roles, built-in `pg_*` roles excluded.
    pub roles: Vec<Role>,
    /// Role memberships.
    pub memberships: Vec<Membership>,
    /// Per-role settings.
    #[serde(default)]
    pub role_settings: Vec<RoleSetting>,
    /// Tablespaces besides pg_default and pg_global.
    #[serde(default)]
    pub tablespaces: Vec<Tablespace>,
}

/// An extension a database uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Extension {
    /// Extension name.
    pub name: String,
    /// Installed version.
    pub version: String,
}

/// What restoring one database needs from the target cluster, recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DatabaseNeeds {
    /// Database name on the source.
    pub name: String,
    /// Its owner.
    pub owner: String,
    /// Every role its objects name (owners, grantees, default privileges, role settings),
    /// the owner included.
    pub roles: Vec<String>,
    /// Extensions it uses.
    #[serde(default)]
    pub extensions: Vec<Extension>,
    /// Tablespaces its objects live in (its default tablespace included).
    #[serde(default)]
    pub tablespaces: Vec<String>,
    /// Its default tablespace when not pg_default.
    #[serde(default)]
    pub default_tablespace: Option<String>,
    /// `ALTER DATABASE ... SET` entries (`name=value`).
    #[serde(default)]
    pub settings: Vec<String>,
}

/// SQL that reads the globals of the cluster as one JSON document. With `passwords` it reads
/// pg_authid (superusers only); without, pg_roles, which hides the hashes.
pub(crate) fn globals_query(passwords: bool) -> String {
    let (table, password) = if passwords {
        ("pg_catalog.pg_authid", "rolpassword")
    } else {
        ("pg_catalog.pg_roles", "null::text")
    };
    format!(
        "select json_build_object(\
           'format', {GLOBALS_FORMAT}, \
           'passwords', {passwords}, \
           'roles', coalesce((select json_agg(json_build_object(\
               'name', rolname, 'superuser', rolsuper, 'inherit', rolinherit, \
               'createrole', rolcreaterole, 'createdb', rolcreatedb, 'login', rolcanlogin, \
               'replication', rolreplication, 'bypassrls', rolbypassrls, \
               'connection_limit', rolconnlimit, 'valid_until', rolvaliduntil, \
               'password', {password}) order by rolname) \
             from {table} where rolname !~ '^pg_'), '[]'::json), \
           'memberships', coalesce((select json_agg(json_build_object(\
               'role', r.rolname, 'member', m.rolname, 'admin_option', a.admin_option) \
               order by r.rolname, m.rolname) \
             from pg_catalog.pg_auth_members a \
             join pg_catalog.pg_roles r on r.oid = a.roleid \
             join pg_catalog.pg_roles m on m.oid = a.member \
             where m.rolname !~ '^pg_'), '[]'::json), \
           'role_settings', coalesce((select json_agg(json_build_object(\
               'role', r.rolname, 'database', d.datname, 'settings', s.setconfig) \
               order by r.rolname, d.datname) \
             from pg_catalog.pg_db_role_setting s \
             join pg_catalog.pg_roles r on r.oid = s.setrole \
             left join pg_catalog.pg_database d on d.oid = s.setdatabase \
             where r.rolname !~ '^pg_'), '[]'::json), \
           'tablespaces', coalesce((select json_agg(json_build_object(\
               'name', spcname, 'owner', pg_catalog.pg_get_userbyid(spcowner), \
               'location', pg_catalog.pg_tablespace_location(oid), \
               'options', coalesce(spcoptions, '{{}}'::text[])) order by spcname) \
             from pg_catalog.pg_tablespace \
             where spcname not in ('pg_default', 'pg_global')), '[]'::json))"
    )
}

/// SQL, run inside a database, that reads what restoring it needs as one JSON document.
pub(crate) const NEEDS_QUERY: &str = "with db as (\
       select oid, datdba, dattablespace from pg_catalog.pg_database \
       where datname = current_database()) \
     select json_build_object(\
       'name', current_database(), \
       'owner', (select pg_catalog.pg_get_userbyid(datdba) from db), \
       'roles', coalesce((select json_agg(r order by r) from (\
           select pg_catalog.pg_get_userbyid(datdba) as r from db \
           union select a.rolname from pg_catalog.pg_shdepend s \
             join pg_catalog.pg_roles a on a.oid = s.refobjid \
             where s.refclassid = 'pg_catalog.pg_authid'::regclass \
               and s.dbid = (select oid from db) \
           union select a.rolname from pg_catalog.pg_default_acl d \
             join pg_catalog.pg_roles a on a.oid = d.defaclrole \
           union select a.rolname from pg_catalog.pg_default_acl d \
             cross join lateral pg_catalog.aclexplode(d.defaclacl) x \
             join pg_catalog.pg_roles a on a.oid = x.grantee \
           union select a.rolname from pg_catalog.pg_db_role_setting s \
             join pg_catalog.pg_roles a on a.oid = s.setrole \
             where s.setdatabase = (select oid from db)) u), '[]'::json), \
       'extensions', coalesce((select json_agg(json_build_object(\
           'name', extname, 'version', extversion) order by extname) \
         from pg_catalog.pg_extension), '[]'::json), \
       'default_tablespace', (select nullif(t.spcname, 'pg_default') from db \
         join pg_catalog.pg_tablespace t on t.oid = db.dattablespace), \
       'tablespaces', coalesce((select json_agg(n order by n) from (\
           select t.spcname as n from pg_catalog.pg_class c \
             join pg_catalog.pg_tablespace t on t.oid = c.reltablespace \
             where t.spcname not in ('pg_default', 'pg_global') \
           union select t.spcname from db \
             join pg_catalog.pg_tablespace t on t.oid = db.dattablespace \
             where t.spcname not in ('pg_default', 'pg_global')) u), '[]'::json), \
       'settings', coalesce((select to_json(s.setconfig) from pg_catalog.pg_db_role_setting s \
         where s.setrole = 0 and s.setdatabase = (select oid from db)), '[]'::json))";

/// SQL listing the databases a whole-cluster backup covers, as a JSON array of names.
pub(crate) const DATABASES_QUERY: &str = "select coalesce(json_agg(datname order by datname), '[]'::json) \
     from pg_catalog.pg_database where datallowconn and not datistemplate";

/// SQL reading what a restore must know about the target cluster, as one JSON document.
pub(crate) const TARGET_QUERY: &str = "select json_build_object(\
       'roles', coalesce((select json_agg(rolname order by rolname) \
         from pg_catalog.pg_roles), '[]'::json), \
       'memberships', coalesce((select json_agg(json_build_array(r.rolname, m.rolname)) \
         from pg_catalog.pg_auth_members a \
         join pg_catalog.pg_roles r on r.oid = a.roleid \
         join pg_catalog.pg_roles m on m.oid = a.member), '[]'::json), \
       'extensions', coalesce((select json_agg(name order by name) \
         from pg_catalog.pg_available_extensions), '[]'::json), \
       'tablespaces', coalesce((select json_agg(spcname order by spcname) \
         from pg_catalog.pg_tablespace), '[]'::json))";

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{sql::*, *};

    fn role(name: &str) -> Role {
        Role {
            name: name.into(),
            superuser: false,
            inherit: true,
            createrole: false,
            createdb: false,
            login: true,
            replication: false,
            bypassrls: false,
            connection_limit: -1,
            valid_until: None,
            password: None,
        }
    }

    fn globals(roles: &[&str]) -> Globals {
        Globals {
            format: GLOBALS_FORMAT,
            passwords: true,
            roles: roles.iter().map(|r| role(r)).collect(),
            memberships: vec![],
            role_settings: vec![],
            tablespaces: vec![Tablespace {
                name: "fast".into(),
                owner: "postgres".into(),
                location: "/mnt/fast".into(),
                options: vec![],
            }],
        }
    }

    fn db(name: &str, roles: &[&str]) -> DatabaseNeeds {
        DatabaseNeeds {
            name: name.into(),
            owner: roles.first().copied().unwrap_or("postgres").into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            extensions: vec![],
            tablespaces: vec![],
            default_tablespace: None,
            settings: vec![],
        }
    }

    fn target(roles: &[&str]) -> TargetState {
        TargetState {
            roles: roles.iter().map(|r| r.to_string()).collect(),
            extensions: ["plpgsql", "btree_gin"].map(String::from).into(),
            tablespaces: ["pg_default", "pg_global"].map(String::from).into(),
            ..Default::default()
        }
    }

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn refuses_a_role_missing_from_backup_and_target() {
        let g = globals(&["app"]);
        let err = preflight(
            &g,
            &[db("appdb", &["app", "ghost"])],
            &set(&["app"]),
            &target(&["postgres"]),
            false,
        )
        .unwrap_err();
        assert_eq!(
            err,
            PreflightError::MissingRole {
                database: "appdb".into(),
                role: "ghost".into()
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("appdb") && msg.contains("ghost") && msg.contains("CREATE ROLE"));
        // The same role on the target is enough.
        preflight(
            &g,
            &[db("appdb", &["app", "ghost"])],
            &set(&["app"]),
            &target(&["postgres", "ghost"]),
            false,
        )
        .unwrap();
    }

    #[test]
    fn refuses_an_extension_the_target_cannot_create() {
        let mut d = db("temporal", &["temporal"]);
        d.extensions.push(Extension {
            name: "postgis".into(),
            version: "3.4.0".into(),
        });
        let err = preflight(
            &globals(&["temporal"]),
            &[d],
            &set(&["temporal"]),
            &target(&[]),
            false,
        )
        .unwrap_err();
        assert!(
            matches!(&err, PreflightError::ExtensionUnavailable { database, extension, .. }
            if database == "temporal" && extension == "postgis")
        );
        assert!(err.to_string().contains("install its package"));
    }

    #[test]
    fn refuses_a_missing_tablespace_naming_its_location() {
        let mut d = db("appdb", &["app"]);
        d.tablespaces.push("fast".into());
        let err = preflight(
            &globals(&["app"]),
            &[d],
            &set(&["app"]),
            &target(&[]),
            false,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("appdb") && msg.contains("\"fast\"") && msg.contains("/mnt/fast"),
            "{msg}"
        );
        let mut d = db("appdb", &["app"]);
        d.default_tablespace = Some("fast".into());
        let mut t = target(&[]);
        t.tablespaces.insert("fast".into());
        preflight(&globals(&["app"]), &[d], &set(&["app"]), &t, false).unwrap();
    }

    #[test]
    fn creates_missing_roles_and_keeps_existing_ones() {
        let mut g = globals(&["app_owner", "app_reader", "postgres"]);
        g.memberships = vec![
            Membership {
                role: "app_reader".into(),
                member: "app_owner".into(),
                admin_option: false,
            },
            Membership {
                role: "app_reader".into(),
                member: "postgres".into(),
                admin_option: false,
            },
        ];
        let sel = set(&["app_owner", "app_reader", "postgres"]);
        let t = target(&["postgres", "app_owner"]);
        let plan = preflight(&g, &[db("appdb", &["app_owner"])], &sel, &t, false).unwrap();
        let created: Vec<_> = plan.create.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(created, ["app_reader"]);
        assert_eq!(plan.keep, ["app_owner", "postgres"]);
        assert!(plan.update.is_empty());
        // app_reader is new, so both its memberships are granted.
        assert_eq!(plan.grants.len(), 2);

        // Everything already there: nothing changes, not even memberships of existing roles.
        let mut t = target(&["postgres", "app_owner", "app_reader"]);
        t.memberships
            .insert(("app_reader".into(), "app_owner".into()));
        let plan = preflight(&g, &[db("appdb", &["app_owner"])], &sel, &t, false).unwrap();
        assert!(plan.create.is_empty() && plan.grants.is_empty());
        // ... unless asked to.
        let plan = preflight(&g, &[db("appdb", &["app_owner"])], &sel, &t, true).unwrap();
        assert_eq!(plan.update.len(), 3);
        assert_eq!(plan.grants.len(), 1);
    }

    #[test]
    fn quotes_hostile_names_and_passwords() {
        let mut r = role("a\"b");
        r.password = Some(PasswordHash::new("SCRAM'; DROP ROLE x; --\\".into()));
        r.valid_until = Some("2030-01-01T00:00:00+00:00".into());
        r.connection_limit = 7;
        let sql = create_role_sql(&r).unwrap();
        assert_eq!(
            sql,
            "CREATE ROLE \"a\"\"b\" WITH NOSUPERUSER NOCREATEDB NOCREATEROLE INHERIT LOGIN \
             NOREPLICATION NOBYPASSRLS CONNECTION LIMIT 7 VALID UNTIL '2030-01-01T00:00:00+00:00' \
             PASSWORD E'SCRAM''; DROP ROLE x; --\\\\';"
        );
        assert!(
            !format!("{r:?}").contains("SCRAM"),
            "Debug must not show the hash"
        );
        assert_eq!(
            grant_sql(&Membership {
                role: "r\"".into(),
                member: "m'".into(),
                admin_option: true
            })
            .unwrap(),
            "GRANT \"r\"\"\" TO \"m'\" WITH ADMIN OPTION;"
        );
        assert_eq!(
            create_database_sql("d\"b", "o\"wn", Some("t")).unwrap(),
            "CREATE DATABASE \"d\"\"b\" OWNER \"o\"\"wn\" TABLESPACE \"t\""
        );
        assert!(
            alter_role_sql(&role("x"))
                .unwrap()
                .contains("VALID UNTIL 'infinity'"),
            "an update resets an expiry the backup does not have"
        );
    }

    #[test]
    fn builds_settings_like_pg_dumpall() {
        let s = RoleSetting {
            role: "app".into(),
            database: Some("appdb".into()),
            settings: vec![
                "search_path=\"$user\", public, \"we\"\"ird\"".into(),
                "work_mem=64MB".into(),
                "statement_timeout=it's".into(),
                "no equals sign".into(),
            ],
        };
        assert_eq!(
            role_setting_sql(&s).unwrap(),
            [
                "ALTER ROLE \"app\" IN DATABASE \"appdb\" SET \"search_path\" TO '$user', 'public', 'we\"ird';",
                "ALTER ROLE \"app\" IN DATABASE \"appdb\" SET \"work_mem\" TO '64MB';",
                "ALTER ROLE \"app\" IN DATABASE \"appdb\" SET \"statement_timeout\" TO 'it''s';",
            ]
        );
    }

    #[test]
    fn refuses_nul_bytes() {
        let g = globals(&["a\0b"]);
        assert!(matches!(g.check(), Err(PreflightError::Invalid { .. })));
        // What check() does not cover is refused where the SQL is built.
        let settings = ["work_mem=64MB".to_string(), "search_path=a\0b".to_string()];
        let err = database_setting_sql("appdb", &settings).unwrap_err();
        assert!(matches!(
            PreflightError::from(err),
            PreflightError::Invalid { .. }
        ));
        assert!(database_setting_sql("app\0db", &settings[..1]).is_err());
        assert!(create_database_sql("appdb", "o\0", None).is_err());
        let mut r = role("app");
        r.password = Some(PasswordHash::new("SCRAM\0".into()));
        assert!(create_role_sql(&r).is_err());
        let plan = GlobalsPlan {
            create: vec![r],
            ..Default::default()
        };
        assert!(plan_script(&plan).is_err());
    }

    #[test]
    fn narrows_globals_to_what_a_database_needs() {
        let mut g = globals(&["a", "b", "c"]);
        g.memberships = vec![
            Membership {
                role: "a".into(),
                member: "b".into(),
                admin_option: false,
            },
            Membership {
                role: "c".into(),
                member: "b".into(),
                admin_option: false,
            },
        ];
        let only = g.only(&set(&["a", "b"]));
        assert_eq!(only.roles.len(), 2);
        assert_eq!(only.memberships.len(), 1);
    }
}
