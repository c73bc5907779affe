//! The SQL a restore runs for the globals: every name through `quote_ident`, every value through
//! `quote_literal`, since all of it comes from the store.

use super::{GlobalsPlan, Membership, PasswordHash, Role, RoleSetting, quote_ident, quote_literal};

/// The attribute list of CREATE/ALTER ROLE.
pub(super) fn role_options(role: &Role, create: bool) -> String {
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
        Some(v) => sql.push_str(&format!(" VALID UNTIL {}", quote_literal(v))),
        None if !create => sql.push_str(" VALID UNTIL 'infinity'"),
        None => {}
    }
    if let Some(PasswordHash(hash)) = &role.password {
        sql.push_str(&format!(" PASSWORD {}", quote_literal(hash)));
    }
    sql
}

/// `CREATE ROLE` with every attribute and the password hash (a secret: the statement only ever
/// goes to psql's stdin).
pub fn create_role_sql(role: &Role) -> String {
    format!(
        "CREATE ROLE {}{};",
        quote_ident(&role.name),
        role_options(role, true)
    )
}

/// `ALTER ROLE` to the backup's attributes and password (`update_roles`).
pub fn alter_role_sql(role: &Role) -> String {
    format!(
        "ALTER ROLE {}{};",
        quote_ident(&role.name),
        role_options(role, false)
    )
}

/// `GRANT role TO member`.
pub fn grant_sql(m: &Membership) -> String {
    format!(
        "GRANT {} TO {}{};",
        quote_ident(&m.role),
        quote_ident(&m.member),
        if m.admin_option {
            " WITH ADMIN OPTION"
        } else {
            ""
        }
    )
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
pub(super) fn setting_clause(entry: &str) -> Option<String> {
    let (name, value) = entry.split_once('=')?;
    let value = if LIST_QUOTE_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
        split_guc_list(value)
            .iter()
            .map(|v| quote_literal(v))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        quote_literal(value)
    };
    Some(format!("{} TO {value}", quote_ident(name)))
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
pub fn role_setting_sql(s: &RoleSetting) -> Vec<String> {
    let scope = match &s.database {
        Some(db) => format!(
            "ALTER ROLE {} IN DATABASE {}",
            quote_ident(&s.role),
            quote_ident(db)
        ),
        None => format!("ALTER ROLE {}", quote_ident(&s.role)),
    };
    s.settings
        .iter()
        .filter_map(|e| setting_clause(e))
        .map(|c| format!("{scope} SET {c};"))
        .collect()
}

/// `ALTER DATABASE ... SET ...` statements for a database's own settings.
pub fn database_setting_sql(database: &str, settings: &[String]) -> Vec<String> {
    settings
        .iter()
        .filter_map(|e| setting_clause(e))
        .map(|c| format!("ALTER DATABASE {} SET {c};", quote_ident(database)))
        .collect()
}

/// The script applying `plan`: roles first, then memberships, then settings.
pub fn plan_script(plan: &GlobalsPlan) -> String {
    let mut sql = String::new();
    for r in &plan.create {
        sql.push_str(&create_role_sql(r));
        sql.push('\n');
    }
    for r in &plan.update {
        sql.push_str(&alter_role_sql(r));
        sql.push('\n');
    }
    for m in &plan.grants {
        sql.push_str(&grant_sql(m));
        sql.push('\n');
    }
    for s in &plan.settings {
        for stmt in role_setting_sql(s) {
            sql.push_str(&stmt);
            sql.push('\n');
        }
    }
    sql
}

/// `CREATE DATABASE` owned by `owner`, in `tablespace` when given.
pub fn create_database_sql(database: &str, owner: &str, tablespace: Option<&str>) -> String {
    let mut sql = format!(
        "CREATE DATABASE {} OWNER {}",
        quote_ident(database),
        quote_ident(owner)
    );
    if let Some(ts) = tablespace {
        sql.push_str(&format!(" TABLESPACE {}", quote_ident(ts)));
    }
    sql
}
