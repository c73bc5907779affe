//! Failure records: a small JSON object under `failures/` for every backup, verify, drill, prune
//! or restore that failed or was interrupted, so a failure nobody watched is still found later by
//! `kubectl soma status`, `kubectl soma list --failed` and the metrics.
//!
//! Records live outside `backups/`, so nothing a failure leaves can be mistaken for a backup. They
//! are read back as untrusted input: size-bounded, and a record that does not parse is skipped.

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use serde::{Deserialize, Serialize};
use soma_proto::v1;

use crate::store::{Store, StoreError};

/// Where records live in the store.
pub(crate) const PREFIX: &str = "failures/";
/// How many records `list` returns when the caller does not say.
pub(crate) const DEFAULT_LIMIT: usize = 100;
/// At most this many records are read per listing, whatever the caller asks.
const MAX_LIMIT: usize = 1000;
/// Records larger than this are not read (ours are well under 8 KiB).
const MAX_RECORD_BYTES: usize = 64 << 10;
/// Error messages are cut to this many characters in a record.
const MAX_ERROR_CHARS: usize = 4000;

/// Who started an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// A client (`kubectl soma`) over gRPC.
    Client,
    /// One of the agent's own schedules, named as given: `ACTION CRON`.
    Schedule(String),
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Client => f.write_str("client"),
            Trigger::Schedule(s) => write!(f, "schedule: {s}"),
        }
    }
}

/// One failed or interrupted operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FailureRecord {
    /// The record's id: its key under [`PREFIX`] without `.json`; sorts by time.
    pub id: String,
    /// "backup", "verify", "drill", "prune", "restore".
    pub operation: String,
    /// The backup written or read, when there was one.
    #[serde(default)]
    pub backup_id: String,
    /// Engine, target and kind, as metric labels name them.
    #[serde(default)]
    pub engine: String,
    /// The database, collection(s) or "all".
    #[serde(default)]
    pub target: String,
    /// The backup kind.
    #[serde(default)]
    pub kind: String,
    /// When the operation started.
    pub started_at: DateTime<Utc>,
    /// When it failed.
    pub failed_at: DateTime<Utc>,
    /// What the client would have been told.
    pub error: String,
    /// "client" or "schedule: ACTION CRON".
    pub trigger: String,
}

impl FailureRecord {
    /// A record of a failure now. The error is cut to a bounded length.
    pub(crate) fn new(
        operation: &str,
        backup_id: &str,
        about: &crate::jobs::About,
        started_at: DateTime<Utc>,
        error: &str,
        trigger: &Trigger,
    ) -> Self {
        let failed_at = Utc::now();
        let error: String = if error.chars().count() > MAX_ERROR_CHARS {
            error
                .chars()
                .take(MAX_ERROR_CHARS)
                .chain("…".chars())
                .collect()
        } else {
            error.to_string()
        };
        Self {
            id: format!(
                "{}-{}-{:04x}",
                failed_at.format("%Y%m%dT%H%M%S%.3fZ"),
                operation,
                rand::random::<u16>()
            ),
            operation: operation.into(),
            backup_id: backup_id.into(),
            engine: about.engine.clone(),
            target: about.target.clone(),
            kind: about.kind.clone(),
            started_at,
            failed_at,
            error,
            trigger: trigger.to_string(),
        }
    }

    /// The record on the wire.
    pub(crate) fn to_proto(&self) -> v1::FailureRecord {
        v1::FailureRecord {
            id: self.id.clone(),
            operation: self.operation.clone(),
            backup_id: self.backup_id.clone(),
            engine: self.engine.clone(),
            kind: self.kind.clone(),
            target: self.target.clone(),
            started_at: self.started_at.to_rfc3339(),
            failed_at: self.failed_at.to_rfc3339(),
            error: self.error.clone(),
            trigger: self.trigger.clone(),
        }
    }
}

/// Reads and writes failure records in one store.
#[derive(Debug, Clone)]
pub(crate) struct Failures {
    store: Arc<dyn Store>,
}

impl Failures {
    /// Records in `store`.
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// Writes a record. A read-only store keeps none (the log has the failure).
    pub(crate) async fn record(&self, record: &FailureRecord) -> Result<(), StoreError> {
        if self.store.is_read_only() {
            return Ok(());
        }
        let body = serde_json::to_vec_pretty(record).expect("a failure record serialises");
        self.store
            .put(&format!("{PREFIX}{}.json", record.id), Bytes::from(body))
            .await
    }

    /// The newest `limit` records (0: [`DEFAULT_LIMIT`]), newest first. Records that cannot be
    /// read or parsed are skipped with a warning: one bad object must not hide the others.
    pub(crate) async fn list(&self, limit: usize) -> Result<Vec<FailureRecord>, StoreError> {
        let limit = match limit {
            0 => DEFAULT_LIMIT,
            n => n.min(MAX_LIMIT),
        };
        let mut keys: Vec<_> = self
            .store
            .list(PREFIX)
            .await?
            .into_iter()
            .filter(|o| o.key.ends_with(".json"))
            .collect();
        // Ids start with the time, so key order is time order.
        keys.sort_by(|a, b| b.key.cmp(&a.key));
        let mut out = Vec::new();
        // Bad objects do not count towards the limit, but no more than MAX_LIMIT are read.
        for object in keys.into_iter().take(MAX_LIMIT) {
            if out.len() == limit {
                break;
            }
            match self.read(&object.key).await {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::warn!(key = %object.key, error = %e, "skipping a failure record that cannot be read")
                }
            }
        }
        Ok(out)
    }

    async fn read(&self, key: &str) -> Result<FailureRecord, String> {
        let mut stream = self.store.get(key).await.map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        while let Some(chunk) = stream.try_next().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_RECORD_BYTES {
                return Err(format!("larger than {MAX_RECORD_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| format!("not a failure record: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::About;

    #[tokio::test]
    async fn records_round_trip_newest_first_and_bad_objects_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("file://{}", dir.path().display()))
            .await
            .unwrap();
        let failures = Failures::new(store.clone());
        let about = About {
            engine: "postgres".into(),
            target: "appdb".into(),
            kind: "logical".into(),
        };
        let first = FailureRecord::new(
            "backup",
            "b1",
            &about,
            Utc::now(),
            &"x".repeat(10_000),
            &Trigger::Client,
        );
        failures.record(&first).await.unwrap();
        // A later record (ids sort by time to the millisecond).
        let mut second = FailureRecord::new(
            "verify",
            "b2",
            &about,
            Utc::now(),
            "boom",
            &Trigger::Schedule("verify-latest 0 * * * *".into()),
        );
        second.id = format!("99999999T{}", second.id);
        failures.record(&second).await.unwrap();
        store
            .put(
                "failures/zzz-garbage.json",
                Bytes::from_static(b"{not json"),
            )
            .await
            .unwrap();
        let listed = failures.list(0).await.unwrap();
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert_eq!(listed[0], second);
        assert_eq!(listed[0].trigger, "schedule: verify-latest 0 * * * *");
        assert_eq!(listed[1].operation, "backup");
        assert!(listed[1].error.chars().count() <= MAX_ERROR_CHARS + 1);
        assert_eq!(failures.list(1).await.unwrap(), vec![second]);
    }
}
