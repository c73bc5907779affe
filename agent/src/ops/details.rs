//! A manifest's engine details, typed: one variant per method, chosen by the manifest's engine
//! and kind. The manifest keeps them as the JSON it stores (read back from the store, so
//! untrusted), which lets list, describe and delete handle a backup whose details are damaged;
//! whatever restores, drills or verifies one reads them through [`Details::of`], which refuses
//! details that do not match the kind with an error naming the backup.

use serde_json::Value;

use super::{method, physical::PhysicalDetails, postgres::LogicalDetails, qdrant::QdrantDetails};
use crate::{catalog::Manifest, error::OpError};

/// What a backup records beyond its artifacts, as its method reads it.
#[derive(Debug, Clone)]
pub(crate) enum Details {
    /// A logical backup (one database or the whole cluster); `None`: a single-database backup
    /// written before details were recorded.
    Logical(Option<LogicalDetails>),
    /// A base backup.
    Physical(PhysicalDetails),
    /// Qdrant snapshots.
    Qdrant(QdrantDetails),
    /// A set, which records none (its members do).
    Set,
}

impl Details {
    /// The details of `m`, read as its engine and kind say.
    pub(crate) fn of(m: &Manifest) -> Result<Self, OpError> {
        match method::of(m.engine, m.kind) {
            Some(method) => method.details(m),
            None => Ok(Details::Set),
        }
    }

    /// The JSON a manifest stores: exactly what agents have always written (nothing for a set
    /// or a logical backup without details).
    pub(crate) fn to_value(&self) -> Result<Value, OpError> {
        let value = match self {
            Details::Logical(None) | Details::Set => Ok(Value::Null),
            Details::Logical(Some(d)) => serde_json::to_value(d),
            Details::Physical(d) => serde_json::to_value(d),
            Details::Qdrant(d) => serde_json::to_value(d),
        };
        value.map_err(|e| OpError::Internal(format!("serialising the manifest details: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as an agent writes it, with `details` (JSON text) for `engine` and `kind`.
    fn written(id: &str, engine: &str, kind: &str, details: &str) -> String {
        format!(
            r#"{{"manifest_version":1,"id":"{id}","engine":"{engine}","kind":"{kind}",
            "target":{{"name":"t","server":"db:5432","server_version":"15.8"}},
            "tool":{{"name":"tool","version":"15.8"}},"agent_version":"0.1.0",
            "started_at":"2026-11-24T12:00:00.123456789Z","completed_at":"2026-11-24T12:00:05Z",
            "raw_bytes":0,"stored_bytes":0,"artifacts":[]{details}}}"#
        )
    }

    const LOGICAL: &str = r#"{"globals":{"artifact":"globals.json.zst","passwords":false,"roles":["app"]},
        "databases":[{"artifact":"dump.pgdump.zst","name":"appdb","owner":"app","roles":["app"],
        "extensions":[],"tablespaces":[],"default_tablespace":null,"settings":["TimeZone=UTC"],
        "tables":[{"schema":"public","table":"t","rows":3,"checksum":"123"}],
        "checksum":"copy-text-word64-sum","encoding":"UTF8"}]}"#;
    const PHYSICAL: &str = r#"{"system_id":"7312345678901234567","timeline":2,
        "start_lsn":"0/2000028","stop_lsn":"0/2000100","stop_time":"2026-11-24T13:00:09Z",
        "wal_segment_size":16777216,"recovery_settings":["primary_conninfo"],"tablespaces":[]}"#;
    const QDRANT: &str = r#"{"qdrant_version":"1.12.4","mode":"shard-stream",
        "aliases":[{"alias_name":"current","collection_name":"docs"}],
        "collections":{"docs":{"points_count":300,
          "config":{"params":{"vectors":{"size":4,"distance":"Cosine"},"shard_number":1}},
          "layout":{"shard_number":1,"replication_factor":1,"write_consistency_factor":1,
            "sharding_method":"auto","exact_count":300,"payload_schema":{},
            "shards":[{"id":0,"points_count":300,"taken_from":1,"replicas":[1]}]},
          "sample":{"id":7,"vector":[0.1,0.2,0.3,1.5471947613644907e-302],"nearest":7}}},
        "cluster":{"node":1,"peers":[1,2]}}"#;

    /// Each kind's manifest, as agents write it today: (id, engine, kind, details field).
    fn each_kind() -> Vec<String> {
        let details = |d: &str| format!(r#","details":{d}"#);
        vec![
            written(
                "20261124T120000Z-pg-appdb-7f3a",
                "postgres",
                "logical",
                &details(LOGICAL),
            ),
            written(
                "20261124T120000Z-pg-all-databases-7f3a",
                "postgres",
                "logical-cluster",
                &details(LOGICAL),
            ),
            // A single-database backup written before details were recorded.
            written("20261124T120000Z-pg-appdb-7f3b", "postgres", "logical", ""),
            written(
                "20261124T130000Z-pg-cluster-0a0b",
                "postgres",
                "physical",
                &details(PHYSICAL),
            ),
            written(
                "20261124T140000Z-qd-docs-0c0d",
                "qdrant",
                "shard-stream-snapshots",
                &details(QDRANT),
            ),
            written(
                "20261124T140000Z-qd-docs-0c0e",
                "qdrant",
                "collection-snapshots",
                &details(&QDRANT.replace("shard-stream", "collection")),
            ),
            written("20261124T150000Z-set-all-0e0f", "set", "set", ""),
        ]
    }

    #[test]
    fn every_kind_reads_typed_and_writes_back_the_same_json() {
        for json in each_kind() {
            let m: Manifest = serde_json::from_str(&json).expect("a manifest an agent wrote");
            let details = Details::of(&m).unwrap_or_else(|e| panic!("{json}: {e}"));
            let expected_variant = match m.kind.as_str() {
                "logical" | "logical-cluster" => matches!(details, Details::Logical(_)),
                "physical" => matches!(details, Details::Physical(_)),
                "set" => matches!(details, Details::Set),
                _ => matches!(details, Details::Qdrant(_)),
            };
            assert!(expected_variant, "{}: {details:?}", m.kind);
            let again = m.clone().with_details(details.to_value().unwrap());
            let original: Value = serde_json::from_str(&json).unwrap();
            assert_eq!(serde_json::to_value(&again).unwrap(), original, "{json}");
        }
    }

    #[test]
    fn details_that_do_not_match_the_kind_are_an_error_naming_the_backup() {
        let cases = [
            (
                "20261124T120000Z-pg-appdb-7f3a",
                "postgres",
                "logical",
                QDRANT,
            ),
            (
                "20261124T120000Z-pg-all-databases-7f3a",
                "postgres",
                "logical-cluster",
                PHYSICAL,
            ),
            (
                "20261124T130000Z-pg-cluster-0a0b",
                "postgres",
                "physical",
                LOGICAL,
            ),
            (
                "20261124T140000Z-qd-docs-0c0d",
                "qdrant",
                "collection-snapshots",
                PHYSICAL,
            ),
            (
                "20261124T140000Z-qd-docs-0c0d",
                "qdrant",
                "shard-stream-snapshots",
                "[1,2]",
            ),
            (
                "20261124T130000Z-pg-cluster-0a0b",
                "postgres",
                "physical",
                "\"x\"",
            ),
            ("20261124T120000Z-pg-appdb-7f3a", "postgres", "logical", "5"),
        ];
        for (id, engine, kind, details) in cases {
            let json = written(id, engine, kind, &format!(r#","details":{details}"#));
            let m: Manifest = serde_json::from_str(&json).unwrap();
            let e = Details::of(&m).expect_err(&json).to_string();
            assert!(e.contains(id) && e.contains("details"), "{kind}: {e}");
        }
        // A whole-cluster backup always records its databases.
        let m: Manifest = serde_json::from_str(&written(
            "20261124T120000Z-pg-all-databases-7f3a",
            "postgres",
            "logical-cluster",
            "",
        ))
        .unwrap();
        assert!(Details::of(&m).is_err());
    }
}
