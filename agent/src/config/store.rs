//! Flags of the store: where backups live, how they are encrypted and locked, how requests are
//! retried, and whose uploads this agent owns.

use anyhow::Context as _;
use std::{path::PathBuf, sync::Arc};

use crate::{owner::OwnerId, store};

/// Where backups live and how the agent talks to it.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Store")]
pub struct StoreArgs {
    /// Where backups live: `s3://bucket/prefix` or `file:///absolute/path` (the embedded default).
    /// Give each PostgreSQL cluster its own prefix.
    #[arg(
        long,
        env = "SOMA_STORE",
        default_value = "file:///var/lib/soma-backup",
        global = true
    )]
    pub store: String,

    /// A second store to restore from, opened read-only: list, describe, verify and restore read
    /// it (and `restore-pgdata` / `wal-fetch` too), while new backups and the WAL stream still go
    /// to --store. For a disaster-recovery drill or a new cluster after a disaster, pointed at the
    /// old cluster's store: this agent never writes, deletes or aborts anything there.
    #[arg(long, env = "SOMA_RESTORE_FROM", global = true)]
    pub restore_from: Option<String>,

    /// Encrypt and authenticate every object written to the store (dumps, base backups, WAL,
    /// snapshots, manifests) with this key: a file of 32 random bytes, raw or as hex or base64
    /// (`head -c 32 /dev/urandom > key`). Repeatable, or comma-separated in the environment: the
    /// first key encrypts, every one decrypts (rotation). Every object read must then be encrypted
    /// with one of them and untouched, so a forged or altered backup is refused before it is
    /// restored. Lose the key and the backups are lost with it: keep a copy outside the cluster.
    #[arg(
        long = "encryption-key-file",
        env = "SOMA_ENCRYPTION_KEY_FILE",
        value_name = "PATH",
        value_delimiter = ',',
        global = true
    )]
    pub encryption_key_files: Vec<PathBuf>,

    /// With --encryption-key-file, still read unencrypted objects that the store says were
    /// written before this time (RFC 3339, e.g. 2026-12-01T00:00:00Z: when encryption was turned
    /// on): the backups taken before. The time is the store's own (S3 LastModified), which whoever
    /// can write to the bucket cannot set, so an unencrypted object planted later is refused.
    #[arg(long, env = "SOMA_ACCEPT_UNENCRYPTED", global = true, value_name = "TIME",
          value_parser = parse_cutoff)]
    pub accept_unencrypted: Option<std::time::SystemTime>,

    /// S3 Object Lock: every object written to --store is retained for this many days (the bucket
    /// must have Object Lock enabled, hence versioning). Until then nobody holding the agent's
    /// credentials can destroy a backup: a delete only hides the object behind a delete marker.
    /// Keep --retention's rules longer than this.
    #[arg(long, env = "SOMA_OBJECT_LOCK_DAYS", value_name = "DAYS",
          value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub object_lock_days: Option<u32>,

    /// With --object-lock-days: compliance mode (nobody, not even the bucket's owner, can shorten
    /// the retention) instead of governance mode (those allowed s3:BypassGovernanceRetention can).
    #[arg(
        long,
        env = "SOMA_OBJECT_LOCK_COMPLIANCE",
        requires = "object_lock_days"
    )]
    pub object_lock_compliance: bool,

    /// Attempts per S3 request, the first included: a request that fails with a network error, a
    /// timeout, 503 SlowDown or another 5xx is retried this many times in all, with exponential
    /// backoff (200 ms doubling to 20 s) and jitter. Each retry is logged and counted in status.
    #[arg(long, env = "SOMA_STORE_RETRIES", global = true, default_value_t = 8,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub store_retries: u32,

    /// Longest one S3 request attempt may take, or a download may go without a byte: past it
    /// the connection counts as frozen, is dropped, and the request is retried (a download
    /// resumes where it stopped). It must let one --part-size part travel at the slowest
    /// bandwidth you accept.
    #[arg(long, env = "SOMA_STORE_ATTEMPT_TIMEOUT", global = true, default_value = "2m",
          value_parser = super::parse_timeout)]
    pub store_attempt_timeout: std::time::Duration,

    /// Longest an S3 request or download may go without a byte moving (taken by the network
    /// or received, the answer included): past it the connection counts as frozen, is dropped
    /// and the request retried (a download resumes), so a frozen connection costs seconds, not
    /// the attempt timeout. A slow connection that still moves is never dropped by it.
    #[arg(long, env = "SOMA_STORE_STALL_TIMEOUT", global = true, default_value = "10s",
          value_parser = super::parse_timeout)]
    pub store_stall_timeout: std::time::Duration,

    /// Longest one S3 request may take over all its attempts and waits; then it fails, and the
    /// backup with it, with an error that says so.
    #[arg(long, env = "SOMA_STORE_OPERATION_TIMEOUT", global = true, default_value = "15m",
          value_parser = super::parse_timeout)]
    pub store_operation_timeout: std::time::Duration,

    /// Open --store read-only: backups and deletes are refused, no start-up sweep runs, and
    /// --wal-stream cannot be used. For an agent that must only read a store another agent owns.
    #[arg(long, env = "SOMA_STORE_READ_ONLY")]
    pub store_read_only: bool,

    /// Recorded with every backup this agent starts; at start-up the agent aborts only the
    /// incomplete uploads of its own owner id, never those of another agent writing to the same
    /// store. Keep it stable across restarts and unique per writing agent (1-253 bytes, no
    /// control characters). Default: the host name.
    #[arg(long, env = "SOMA_OWNER_ID", value_parser = crate::owner::parse_owner_id)]
    pub owner_id: Option<OwnerId>,
}

/// The stores the sidecar works with, opened.
pub struct Stores {
    /// --store: where new backups and the WAL archive go.
    pub store: Arc<dyn store::Store>,
    /// --restore-from, read-only, when given; else `None` and restores read --store.
    pub restore_from: Option<Arc<dyn store::Store>>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stores")
            .field("store", &self.store.location())
            .field(
                "restore_from",
                &self.restore_from.as_ref().map(|s| s.location()),
            )
            .finish()
    }
}

impl StoreArgs {
    /// Retries and deadlines of store requests (--store-retries, --store-attempt-timeout,
    /// --store-stall-timeout, --store-operation-timeout).
    pub fn retry_policy(&self) -> store::RetryPolicy {
        store::RetryPolicy {
            attempts: self.store_retries,
            attempt_timeout: self.store_attempt_timeout,
            stall_timeout: self.store_stall_timeout,
            operation_timeout: self.store_operation_timeout,
            ..Default::default()
        }
    }

    /// The keys of --encryption-key-file, read and checked.
    pub fn keyring(&self) -> anyhow::Result<Option<store::Keyring>> {
        store::Keyring::from_files(&self.encryption_key_files)
            .context("--encryption-key-file (SOMA_ENCRYPTION_KEY_FILE)")
    }

    /// --owner-id, or the host name when it is not given.
    pub fn owner(&self) -> anyhow::Result<OwnerId> {
        Ok(match &self.owner_id {
            Some(owner) => owner.clone(),
            None => OwnerId::from_host_name()?,
        })
    }

    /// Opens --store (read-only with --store-read-only) and --restore-from (always read-only)
    /// for the sidecar. The keys are read once and open both; `health` records what requests to
    /// either met, for status.
    pub async fn open_both(&self, health: &store::StoreHealth) -> anyhow::Result<Stores> {
        let keyring = self.keyring()?;
        let store = self
            .open(keyring.clone(), &self.store, self.store_read_only, health)
            .await
            .map_err(anyhow::Error::msg)
            .map_err(|e| e.context("--store / SOMA_STORE"))?;
        let restore_from = match &self.restore_from {
            Some(from) => Some(
                self.open(keyring, from, true, health)
                    .await
                    .map_err(anyhow::Error::msg)
                    .map_err(|e| e.context("--restore-from / SOMA_RESTORE_FROM"))?,
            ),
            None => None,
        };
        Ok(Stores {
            store,
            restore_from,
        })
    }

    /// The store a one-shot command reads backups and WAL from: `--restore-from` when given, else
    /// `--store`; read-only either way, since neither one-shot ever writes.
    pub async fn read_source(&self) -> Result<Arc<dyn store::Store>, String> {
        let (location, flags) = match &self.restore_from {
            Some(from) => (from.as_str(), "--restore-from / SOMA_RESTORE_FROM"),
            None => (self.store.as_str(), "--store / SOMA_STORE"),
        };
        let keyring = self.keyring().map_err(|e| format!("{e:#}"))?;
        self.open(keyring, location, true, &Default::default())
            .await
            .map_err(|e| format!("{flags}: {e}"))
    }

    /// Opens `location` through `keyring` (see [`store::Crypt`]), read-only or not.
    async fn open(
        &self,
        keyring: Option<store::Keyring>,
        location: &str,
        read_only: bool,
        health: &store::StoreHealth,
    ) -> Result<Arc<dyn store::Store>, String> {
        let options = store::Options {
            object_lock: self.object_lock_days.map(|days| store::s3::ObjectLock {
                days,
                compliance: self.object_lock_compliance,
            }),
            retry: self.retry_policy(),
            health: health.clone(),
        };
        let inner = if read_only {
            store::open_read_only(location, &options).await
        } else {
            store::open_with(location, &options).await
        }
        .map_err(|e| crate::error::render(&e))?;
        let keyed = keyring.is_some();
        let crypt = store::Crypt::new(inner, keyring, self.accept_unencrypted);
        if keyed && !read_only {
            // The repository id is made with the store, not with its first backup, so `status`
            // names it from the start. A store that cannot be reached yet gets it with the first
            // write.
            if let Err(e) = crypt.repository(true).await {
                tracing::warn!(error = %e, "the store's repository id is not settled yet; the first write settles it");
            }
        }
        Ok(Arc::new(crypt))
    }
}

/// The cut-off of --accept-unencrypted. A bare `true` (what it took before it took a time) is
/// refused rather than read as "no cut-off", which would accept anything planted since.
fn parse_cutoff(text: &str) -> Result<std::time::SystemTime, String> {
    chrono::DateTime::parse_from_rfc3339(text.trim())
        .map(std::time::SystemTime::from)
        .map_err(|_| {
            format!(
                "{text:?} is not a time: --accept-unencrypted (SOMA_ACCEPT_UNENCRYPTED) takes the time encryption was turned on, in RFC 3339 (e.g. 2026-12-01T00:00:00Z), and reads only unencrypted objects the store says were written before it"
            )
        })
}
