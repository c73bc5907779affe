//! The SQL a restore runs for the globals: every name through `quote_ident`, every value through
//! `quote_literal`, since all of it comes from the store; a NUL byte anywhere refuses the
//! statement ([`NulByte`]).

use super::{GlobalsPlan, Membership, PasswordHash, Role, RoleSetting, quote_ident, quote_literal};
use crate::engine::postgres::NulByte;

/// The attribute list of CREATE/ALTER ROLE.
pub(super) fn role_options(role: &Role, create: bool) -> Result<String, NulByte> {
    let flag = |on: bool, name: &str| {
        if on {
            format!(" {name}")
        } else {
            format!(" NO{name}")
        }
    };
    let mut sql = String::from(" WITH");
    sql.push_str(&flag(role.superuser, "SUPERUSER"));
    sql.push_str(&flag(role.createdb, "CREATEDB"));
    sql.push_str(&flag(role.createrole, "CREATEROLE"));
    sql.push_str(&flag(role.inherit, "INHERIT"));
    sql.push_str(&flag(role.login, "LOGIN"));
    sql.push_str(&flag(role.replication, "REPLICATION"));
    sql.push_str(&flag(role.bypassrls, "BYPASSRLS"));
    sql.push_str(&format!(" CONNECTION LIMIT {}", role.connection_limit));
    match &role.valid_until {
        Some(v) => sql.push_str(&format!(" VALID UNTIL {}", quote_literal(v)?)),
        None if !create => sql.push_str(" VALID UNTIL 'infinity'"),
        None => {}
    }
    if let Some(PasswordHash(hash)) = &role.password {
        sql.push_str(&format!(" PASSWORD {}", quote_literal(hash)?));
    }
    Ok(sql)
}

/// `CREATE ROLE` with every attribute and the password hash (a secret: the statement only ever
/// goes to psql's stdin).
pub(crate) fn create_role_sql(role: &Role) -> Result<String, NulByte> {
    Ok(format!(
        "CREATE ROLE {}{};",
        quote_ident(&role.name)?,
        role_options(role, true)?
    ))
}

/// `ALTER ROLE` to the backup's attributes and password (`update_roles`).
pub(crate) fn alter_role_sql(role: &Role) -> Result<String, NulByte> {
    Ok(format!(
        "ALTER ROLE {}{};",
        quote_ident(&role.name)?,
        role_options(role, false)?
    ))
}

/// `GRANT role TO member`.
pub(crate) fn grant_sql(m: &Membership) -> Result<String, NulByte> {
    Ok(format!(
        "GRANT {} TO {}{};",
        quote_ident(&m.role)?,
        quote_ident(&m.member)?,
        if m.admin_option {
            " WITH ADMIN OPTION"
        } else {
            ""
        }
    ))
}

/// Settings whose value is a list whose elements PostgreSQL stores quoted
/// (`GUC_LIST_QUOTE`), as pg_dumpall knows them.
const LIST_QUOTE_SETTINGS: &[&str] = &[
    "local_preload_libraries",
    "search_path",
    "session_preload_libraries",
    "shared_preload_libraries",
    "temp_tablespaces",
    "unix_socket_directories",
];

/// `name TO value` for one stored `name=value` entry; None when it has no `=`.
pub(super) fn setting_clause(entry: &str) -> Result<Option<String>, NulByte> {
    let Some((name, value)) = entry.split_once('=') else {
        return Ok(None);
    };
    let value = if LIST_QUOTE_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
        split_guc_list(value)
            .iter()
            .map(|v| quote_literal(v))
            .collect::<Result<Vec<_>, _>>()?
            .join(", ")
    } else {
        quote_literal(value)?
    };
    Ok(Some(format!("{} TO {value}", quote_ident(name)?)))
}

/// Splits a stored list setting (`"$user", public`) into its elements, undoing the identifier
/// quoting PostgreSQL applied.
pub(super) fn split_guc_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur).trim().to_string()),
            c => cur.push(c),
        }
    }
    let last = cur.trim().to_string();
    if !last.is_empty() || !out.is_empty() {
        out.push(last);
    }
    out
}

/// `ALTER ROLE ... [IN DATABASE ...] SET ...` statements for one settings row.
pub(crate) fn role_setting_sql(s: &RoleSetting) -> Result<Vec<String>, NulByte> {
    let scope = match &s.database {
        Some(db) => format!(
            "ALTER ROLE {} IN DATABASE {}",
            quote_ident(&s.role)?,
            quote_ident(db)?
        ),
        None => format!("ALTER ROLE {}", quote_ident(&s.role)?),
    };
    settings_sql(&s.settings, &scope)
}

/// `ALTER DATABASE ... SET ...` statements for a database's own settings.
pub(crate) fn database_setting_sql(
    database: &str,
    settings: &[String],
) -> Result<Vec<String>, NulByte> {
    settings_sql(
        settings,
        &format!("ALTER DATABASE {}", quote_ident(database)?),
    )
}

/// `{scope} SET …;` for each stored `name=value` entry (entries without `=` are skipped).
fn settings_sql(settings: &[String], scope: &str) -> Result<Vec<String>, NulByte> {
    let mut out = Vec::with_capacity(settings.len());
    for entry in settings {
        if let Some(clause) = setting_clause(entry)? {
            out.push(format!("{scope} SET {clause};"));
        }
    }
    Ok(out)
}

/// The script applying `plan`: roles first, then memberships, then settings.
pub(crate) fn plan_script(plan: &GlobalsPlan) -> Result<String, NulByte> {
    let mut sql = String::new();
    let mut line = |stmt: String| {
        sql.push_str(&stmt);
        sql.push('\n');
    };
    for r in &plan.create {
        line(create_role_sql(r)?);
    }
    for r in &plan.update {
        line(alter_role_sql(r)?);
    }
    for m in &plan.grants {
        line(grant_sql(m)?);
    }
    for s in &plan.settings {
        role_setting_sql(s)?.into_iter().for_each(&mut line);
    }
    Ok(sql)
}

/// `CREATE DATABASE` owned by `owner`, in `tablespace` when given.
pub(crate) fn create_database_sql(
    database: &str,
    owner: &str,
    tablespace: Option<&str>,
) -> Result<String, NulByte> {
    let mut sql = format!(
        "CREATE DATABASE {} OWNER {}",
        quote_ident(database)?,
        quote_ident(owner)?
    );
    if let Some(ts) = tablespace {
        sql.push_str(&format!(" TABLESPACE {}", quote_ident(ts)?));
    }
    Ok(sql)
}
