//! Comparing two databases the way a user would after a restore: same schema, same rows, same
//! sequence positions, same large objects.

use std::collections::BTreeMap;
use std::process::Command;

use crate::pg::{PgCluster, SYSTEM_SCHEMAS};

/// What a database holds, reduced to comparable values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbFingerprint {
    /// `pg_dump --schema-only`, with the database's own name replaced by `DBNAME`.
    pub schema: String,
    /// Every table and materialized view outside the system schemas: "ROWS md5" of its rows'
    /// text forms sorted in C order.
    pub relations: BTreeMap<String, String>,
    /// Every sequence's `last_value` (`null` when never advanced).
    pub sequences: BTreeMap<String, String>,
    /// Every large object's md5, by oid.
    pub large_objects: BTreeMap<String, String>,
}

impl DbFingerprint {
    /// Reads the fingerprint of database `db`.
    pub fn of(pg: &PgCluster, db: &str) -> DbFingerprint {
        let schema = replace_word(&pg.dump_schema(db), db, "DBNAME");
        let names = pg.psql(
            db,
            &format!(
                "select quote_ident(schemaname) || '.' || quote_ident(tablename) from pg_tables \
                   where schemaname not in {SYSTEM_SCHEMAS} \
                 union all \
                 select quote_ident(schemaname) || '.' || quote_ident(matviewname) from pg_matviews \
                   where schemaname not in {SYSTEM_SCHEMAS} \
                 order by 1"
            ),
        );
        let relations = names
            .lines()
            .map(|rel| {
                let sum = pg.psql(
                    db,
                    &format!(
                        "select count(*) || ' ' || \
                           md5(coalesce(string_agg(t::text, E'\\n' order by t::text collate \"C\"), '')) \
                         from {rel} t"
                    ),
                );
                (rel.to_owned(), sum)
            })
            .collect();
        let sequences = pairs(pg.psql(
            db,
            "select quote_ident(schemaname) || '.' || quote_ident(sequencename), \
               coalesce(last_value::text, 'null') from pg_sequences order by 1",
        ));
        let large_objects = pairs(pg.psql(
            db,
            "select oid, md5(lo_get(oid)) from pg_largeobject_metadata order by oid",
        ));
        DbFingerprint {
            schema,
            relations,
            sequences,
            large_objects,
        }
    }
}

/// Panics, showing exactly what differs, unless databases `a` and `b` of `pg` hold the same schema
/// (pg_dump --schema-only, identical but for the database name), rows, sequences and large objects.
pub fn assert_same_database(pg: &PgCluster, a: &str, b: &str) {
    let fa = DbFingerprint::of(pg, a);
    let fb = DbFingerprint::of(pg, b);
    assert_fingerprints_equal(&fa, &fb, a, b);
}

/// Panics, showing what differs, unless the two fingerprints are equal.
pub fn assert_fingerprints_equal(fa: &DbFingerprint, fb: &DbFingerprint, a: &str, b: &str) {
    if fa.schema != fb.schema {
        panic!(
            "pg_dump --schema-only differs between {a} and {b}:\n{}",
            text_diff(&fa.schema, &fb.schema)
        );
    }
    assert_eq!(
        fa.relations, fb.relations,
        "table contents (rows, md5) differ between {a} (left) and {b} (right)"
    );
    assert_eq!(
        fa.sequences, fb.sequences,
        "sequence last_value differs between {a} (left) and {b} (right)"
    );
    assert_eq!(
        fa.large_objects, fb.large_objects,
        "large objects (oid, md5) differ between {a} (left) and {b} (right)"
    );
}

/// `diff -u` of two texts.
pub fn text_diff(a: &str, b: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir for diff");
    let (pa, pb) = (dir.path().join("left"), dir.path().join("right"));
    std::fs::write(&pa, a).expect("write diff input");
    std::fs::write(&pb, b).expect("write diff input");
    match Command::new("diff").arg("-u").arg(&pa).arg(&pb).output() {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => format!("(cannot run diff: {e})\n--- left ---\n{a}\n--- right ---\n{b}"),
    }
}

/// Replaces whole-word occurrences of `word` (identifier characters around it do not count).
fn replace_word(text: &str, word: &str, with: &str) -> String {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find(word) {
        let before = rest[..pos]
            .chars()
            .next_back()
            .or_else(|| out.chars().next_back());
        let after = rest[pos + word.len()..].chars().next();
        out.push_str(&rest[..pos]);
        if before.is_some_and(is_ident) || after.is_some_and(is_ident) {
            out.push_str(word);
        } else {
            out.push_str(with);
        }
        rest = &rest[pos + word.len()..];
    }
    out.push_str(rest);
    out
}

fn pairs(rows: String) -> BTreeMap<String, String> {
    rows.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, v) = l.split_once('|').unwrap_or((l, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::replace_word;

    #[test]
    fn replaces_only_whole_words() {
        assert_eq!(
            replace_word("appdb appdb_restored x.appdb 'appdb'", "appdb", "DBNAME"),
            "DBNAME appdb_restored x.DBNAME 'DBNAME'"
        );
    }
}
