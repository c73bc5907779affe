//! Agent configuration: flags, each with a `SOMA_*` environment equivalent.
//!
//! S3 endpoint, region and credentials deliberately have no flags: they come from the AWS SDK's
//! standard environment and credential chain, so secrets never appear in process arguments.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// `soma-agent`: the Soma Backup sidecar.
///
/// Without a subcommand it serves the gRPC API (the sidecar). `restore-pgdata` and `wal-fetch` run
/// once and exit: a physical restore from an init container, and PostgreSQL's restore_command.
#[derive(Debug, Clone, Parser)]
#[command(name = "soma-agent", version, about, long_about = None)]
pub struct Config {
    /// One-shot commands; none runs the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address of the gRPC server. Inside a pod keep 127.0.0.1: `kubectl soma` reaches it through a
    /// port-forward.
    #[arg(long, env = "SOMA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// File holding the bearer token every RPC but health must carry (a Secret mounted in the
    /// sidecar): at least 16 printable ASCII characters. Without it the agent listens only on a
    /// loopback address.
    #[arg(long, env = "SOMA_AGENT_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Serve the API over TLS with this certificate chain (PEM), with --tls-key: for an agent
    /// reached over a network rather than through a port-forward, so the token and the replies
    /// cannot be read or altered on the way.
    #[arg(long, env = "SOMA_TLS_CERT", value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SOMA_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve gRPC server reflection (`grpcurl ADDR list`), behind the token like the API. Off by
    /// default: it tells whoever reaches the port every call there is.
    #[arg(long, env = "SOMA_REFLECTION")]
    pub reflection: bool,

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
          value_parser = parse_timeout)]
    pub store_attempt_timeout: std::time::Duration,

    /// Longest an S3 request or download may go without a byte moving (taken by the network
    /// or received, the answer included): past it the connection counts as frozen, is dropped
    /// and the request retried (a download resumes), so a frozen connection costs seconds, not
    /// the attempt timeout. A slow connection that still moves is never dropped by it.
    #[arg(long, env = "SOMA_STORE_STALL_TIMEOUT", global = true, default_value = "10s",
          value_parser = parse_timeout)]
    pub store_stall_timeout: std::time::Duration,

    /// Longest one S3 request may take over all its attempts and waits; then it fails, and the
    /// backup with it, with an error that says so.
    #[arg(long, env = "SOMA_STORE_OPERATION_TIMEOUT", global = true, default_value = "15m",
          value_parser = parse_timeout)]
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
    pub owner_id: Option<crate::owner::OwnerId>,

    /// libpq URL of the PostgreSQL server, e.g. `postgresql://soma@127.0.0.1:5432/appdb`. No
    /// password here: use PGPASSWORD or a passfile.
    #[arg(long, env = "SOMA_POSTGRES_URL")]
    pub postgres_url: Option<String>,

    /// URL of the Qdrant REST API, e.g. `http://127.0.0.1:6333`. The API key comes from
    /// SOMA_QDRANT_API_KEY (never a flag).
    #[arg(long, env = "SOMA_QDRANT_URL")]
    pub qdrant_url: Option<String>,

    /// PEM file with the CA that signed Qdrant's TLS certificate (for https:// with a private CA).
    #[arg(long, env = "SOMA_QDRANT_CA_CERT")]
    pub qdrant_ca_cert: Option<PathBuf>,

    /// REST port of the other nodes of a distributed Qdrant (default: the port of --qdrant-url).
    /// The agent finds the peers in Qdrant's `GET /cluster` and reaches each at its peer URI's
    /// host on this port, as pods behind a headless service are reached.
    #[arg(long, env = "SOMA_QDRANT_PEER_PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub qdrant_peer_port: Option<u16>,

    /// Longest a Qdrant snapshot download or shard stream may go without a byte; past it the
    /// backup fails, naming the snapshot, instead of waiting on a frozen node.
    #[arg(long, env = "SOMA_QDRANT_STALL_TIMEOUT", default_value = "5m",
          value_parser = parse_timeout)]
    pub qdrant_stall_timeout: std::time::Duration,

    /// Longest Qdrant may take to write a snapshot (`wait=true`), or to take an uploaded one and
    /// recover from it; past it the backup or restore fails, naming the collection.
    #[arg(long, env = "SOMA_QDRANT_SNAPSHOT_TIMEOUT", default_value = "2h",
          value_parser = parse_timeout)]
    pub qdrant_snapshot_timeout: std::time::Duration,

    /// Default Qdrant snapshot mode: `collection` (snapshot on the node, stream, delete),
    /// `shard-stream` (no file on the node; Qdrant ≥ 1.12) or `full-storage` (single node).
    #[arg(long, env = "SOMA_QDRANT_MODE", default_value = "collection",
          value_parser = crate::ops::qdrant::parse_mode)]
    pub qdrant_mode: soma_proto::v1::QdrantMode,

    /// Directory holding pg_dump, pg_restore and psql (default: found on PATH).
    #[arg(long, env = "SOMA_PG_BIN_DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// zstd compression level (1-22).
    #[arg(long, env = "SOMA_COMPRESSION_LEVEL", default_value_t = 3,
          value_parser = clap::value_parser!(i32).range(1..=22))]
    pub compression_level: i32,

    /// zstd worker threads; 0 compresses on the pipeline thread. Default: half the CPUs, at most 4.
    #[arg(long, env = "SOMA_COMPRESSION_THREADS", default_value_t = default_threads())]
    pub compression_threads: u32,

    /// Size of multipart upload parts (at least 5MiB). It doubles every 1000 parts, so any stream
    /// up to 5 TiB fits in S3's 10 000 parts. 8MiB (the AWS CLI's default) keeps the part buffers
    /// at 24 MiB with the default parts in flight: measured, every data path then peaks ≤ 64 MiB
    /// (bench/RESULTS.md) at the same speed as 16MiB parts.
    #[arg(long, env = "SOMA_PART_SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Parts uploaded concurrently. Part buffers on the data path: at most (this + 1) × part size.
    #[arg(long, env = "SOMA_PARTS_IN_FLIGHT", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parts_in_flight: u16,

    /// Log format.
    #[arg(long, env = "SOMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Stream WAL continuously to the store (point-in-time recovery): pg_receivewal through a
    /// physical replication slot, complete segments shipped at once, the segment in progress every
    /// --wal-partial-interval. Needs a user with REPLICATION (see --replication-url).
    #[arg(long, env = "SOMA_WAL_STREAM")]
    pub wal_stream: bool,

    /// Directory pg_receivewal writes into before segments are shipped. Keep it across container
    /// restarts (an emptyDir): the agent resumes from it.
    #[arg(
        long,
        env = "SOMA_WAL_SPOOL",
        default_value = "/var/lib/soma-backup/wal-spool"
    )]
    pub wal_spool: PathBuf,

    /// Physical replication slot holding WAL on the server until the agent has it. Bound what it
    /// may hold with the server's max_slot_wal_keep_size.
    #[arg(long, env = "SOMA_WAL_SLOT", default_value = "soma_wal_archive")]
    pub wal_slot: String,

    /// How often the WAL segment in progress is shipped: the recovery point objective.
    #[arg(long, env = "SOMA_WAL_PARTIAL_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    pub wal_partial_interval: std::time::Duration,

    /// Complete WAL segments that may wait in the spool while the store refuses them; then
    /// receiving pauses (the slot keeps the WAL on the server) so the spool cannot fill its volume.
    #[arg(long, env = "SOMA_WAL_SPOOL_MAX_SEGMENTS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub wal_spool_max_segments: u32,

    /// On SIGTERM, how long the WAL stream waits for pg_receivewal to receive the WAL the server
    /// had flushed at that moment, before it ships what it has and stops. Shipping afterwards
    /// takes up to 30 s more: keep the pod's terminationGracePeriodSeconds above both.
    #[arg(long, env = "SOMA_WAL_DRAIN_TIMEOUT", default_value = "10s",
          value_parser = humantime::parse_duration)]
    pub wal_drain_timeout: std::time::Duration,

    /// libpq URL for base backups and WAL streaming, as a user with the REPLICATION attribute
    /// (default: --postgres-url). No password here: the replication user's password comes from
    /// SOMA_REPLICATION_PASSWORD (environment only), else PGPASSWORD or a passfile.
    #[arg(long, env = "SOMA_REPLICATION_URL")]
    pub replication_url: Option<String>,

    /// Run ACTION on a cron schedule with no client: `"ACTION MIN HOUR DOM MON DOW"`, e.g.
    /// `"backup 0 2 * * *"`. ACTION: backup (every engine as a set), backup-postgres (every
    /// database with its roles), backup-physical, backup-qdrant, verify-latest, drill, prune.
    /// Repeatable; in SOMA_SCHEDULES one per line (blank lines and lines starting with # are
    /// ignored). A sixth leading field (seconds) is accepted.
    #[arg(
        long = "schedule",
        env = "SOMA_SCHEDULES",
        value_delimiter = '\n',
        value_name = "ACTION CRON"
    )]
    pub schedules: Vec<String>,

    /// Time zone the schedules' cron expressions are read in (IANA name).
    #[arg(long, env = "SOMA_SCHEDULE_TIMEZONE", default_value = "UTC",
          value_parser = crate::schedule::parse_timezone)]
    pub schedule_timezone: chrono_tz::Tz,

    /// Longest random delay added to each scheduled run (at most a tenth of the schedule's
    /// interval), so agents sharing a store and a schedule do not start in the same second.
    #[arg(long, env = "SOMA_SCHEDULE_JITTER", default_value = "60s",
          value_parser = humantime::parse_duration)]
    pub schedule_jitter: std::time::Duration,

    /// Serve Prometheus metrics (`/metrics`, OpenMetrics text) and the kubelet probes (`/livez`,
    /// `/readyz`) on this address. It serves nothing else, so it may bind the pod IP (0.0.0.0).
    #[arg(long, env = "SOMA_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// `/livez` fails once the WAL stream has not been receiving, or has had WAL waiting while the
    /// archive stood still, for this long; the restart it causes restarts pg_receivewal.
    #[arg(long, env = "SOMA_WAL_STUCK_AFTER", default_value = "10m",
          value_parser = humantime::parse_duration)]
    pub wal_stuck_after: std::time::Duration,

    /// Retention policy `prune` applies (and the `prune` schedule), e.g.
    /// `keep-last=7,keep-daily=14,keep-weekly=8,keep-monthly=12,max-age=30d`: per engine, target
    /// and kind; a backup set counts as one backup; the newest backup of each is always kept.
    #[arg(long, env = "SOMA_RETENTION", value_parser = crate::retention::parse_policy)]
    pub retention: Option<crate::retention::Policy>,

    /// Where a restore drill of a physical base backup lays its scratch data directory and runs
    /// its scratch server (removed after every drill). Put it on a volume with room for the
    /// cluster. An agent running as root runs that server as the directory's owner, else as
    /// `postgres`.
    #[arg(
        long,
        env = "SOMA_DRILL_DIR",
        default_value = "/var/lib/soma-backup/drill"
    )]
    pub drill_dir: PathBuf,

    /// Most operations (backups, restores, verifies, drills, deletes, prunes) running at once,
    /// whoever started them; one more is refused (a schedule's run is skipped). 0: no limit.
    #[arg(long, env = "SOMA_MAX_OPERATIONS", default_value_t = 4)]
    pub max_operations: usize,

    /// The only directory under which `kubectl soma restore --pgdata DIR` may lay a data
    /// directory (the volume meant for restores). Without it the API lays none: run
    /// `soma-agent restore-pgdata` where PostgreSQL's data lives (the chart's init container).
    #[arg(long, env = "SOMA_RESTORE_ROOT", value_name = "DIR")]
    pub restore_root: Option<PathBuf>,
}

impl Config {
    /// Retries and deadlines of store requests (--store-retries, --store-attempt-timeout,
    /// --store-stall-timeout, --store-operation-timeout).
    pub fn retry_policy(&self) -> crate::store::RetryPolicy {
        crate::store::RetryPolicy {
            attempts: self.store_retries,
            attempt_timeout: self.store_attempt_timeout,
            stall_timeout: self.store_stall_timeout,
            operation_timeout: self.store_operation_timeout,
            ..Default::default()
        }
    }

    /// The keys of --encryption-key-file, read and checked.
    pub fn keyring(&self) -> Result<Option<crate::store::Keyring>, crate::store::crypt::KeyError> {
        crate::store::Keyring::from_files(&self.encryption_key_files)
    }

    /// The `--schedule` values parsed; an error names the bad one.
    pub fn parsed_schedules(&self) -> Result<Vec<crate::schedule::Schedule>, String> {
        self.schedules
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty() && !s.starts_with('#'))
            .map(|s| {
                crate::schedule::Schedule::parse(s)
                    .map_err(|e| format!("--schedule / SOMA_SCHEDULES: {e}"))
            })
            .collect()
    }
}

/// One-shot subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Lay a physical base backup into an empty data directory and configure point-in-time
    /// recovery; PostgreSQL replays WAL from the store to the target when it starts there.
    RestorePgdata(RestorePgdataArgs),
    /// PostgreSQL's restore_command: fetch one WAL file from the store, checking its digest.
    /// Exits 1 when the archive has no such file (its end), and with status 255 — which stops
    /// recovery — when the file is corrupted, missing in the middle of the archive, or the store
    /// cannot be read.
    WalFetch(WalFetchArgs),
    /// PostgreSQL's recovery_end_command, written by restore-pgdata: removes that restore's
    /// recovery settings from postgresql.auto.conf in the current directory (the data
    /// directory) once recovery ended, so the promoted cluster and its base backups carry none.
    RecoveryEnd(RecoveryEndArgs),
    /// The restore_command of a restore drill's scratch server: asks the drill's agent for one
    /// WAL file over the drill's socket (it holds no store credential or key itself). Exits as
    /// `wal-fetch` does. Run by the scratch server, never by hand.
    #[command(hide = true)]
    DrillWalFetch(DrillWalFetchArgs),
}

/// Arguments of `recovery-end` (as written into recovery_end_command by restore-pgdata).
#[derive(Debug, Clone, clap::Args)]
pub struct RecoveryEndArgs {
    /// The block of settings to remove, as restore-pgdata named it.
    #[arg(long)]
    pub block: String,
    /// The data directory (default: the current directory, where PostgreSQL runs the command).
    #[arg(long)]
    pub pgdata: Option<PathBuf>,
}

/// Arguments of `restore-pgdata`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestorePgdataArgs {
    /// Base backup id, or `latest` for the newest base backup that can reach the target.
    #[arg(long, default_value = "latest")]
    pub backup: String,
    /// Data directory to create; it must be missing or empty.
    #[arg(long, env = "PGDATA")]
    pub pgdata: PathBuf,
    /// Recover every transaction committed at or before this time (RFC 3339, or as PostgreSQL
    /// prints it: `2026-11-29 14:35:01.8+00`).
    #[arg(long, conflicts_with_all = ["target_lsn", "target_name", "target"])]
    pub target_time: Option<String>,
    /// Recover up to this WAL position, e.g. 16/B374D848.
    #[arg(long, conflicts_with_all = ["target_name", "target"])]
    pub target_lsn: Option<String>,
    /// Recover up to the restore point of this name (`pg_create_restore_point`). Name the base
    /// backup taken before it: `latest` picks the newest, which may be after it.
    #[arg(long, conflicts_with = "target")]
    pub target_name: Option<String>,
    /// `latest`: recover everything in the archive (the default).
    #[arg(long, value_parser = ["latest"])]
    pub target: Option<String>,
    /// Path of soma-agent as the PostgreSQL server will run it in restore_command (default: this
    /// binary). In Kubernetes: where the init container copied it in a shared volume.
    #[arg(long)]
    pub agent_binary: Option<PathBuf>,
}

/// `--system-id`: a PostgreSQL system identifier, nothing else (it names a store folder).
fn parse_system_id(s: &str) -> Result<String, String> {
    if crate::wal::valid_system_id(s) {
        Ok(s.to_string())
    } else {
        Err("expected a PostgreSQL system identifier: a decimal number, as pg_controldata prints it".into())
    }
}

/// Arguments of `wal-fetch` (as written into restore_command by restore-pgdata).
#[derive(Debug, Clone, clap::Args)]
pub struct WalFetchArgs {
    /// System identifier of the cluster whose archive to read.
    #[arg(long, value_parser = parse_system_id)]
    pub system_id: String,
    /// WAL file name PostgreSQL asks for (%f).
    pub file: String,
    /// Where PostgreSQL wants it (%p).
    pub destination: PathBuf,
}

/// Arguments of `drill-wal-fetch` (as written into a drill's restore_command).
#[derive(Debug, Clone, clap::Args)]
pub struct DrillWalFetchArgs {
    /// The drill's socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// WAL file name PostgreSQL asks for (%f).
    pub file: String,
    /// Where PostgreSQL wants it (%p).
    pub destination: PathBuf,
}

fn default_threads() -> u32 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    (cpus / 2).clamp(1, 4)
}

/// Parses sizes such as `16MiB`, `5MB`, `1GiB` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; use e.g. 16MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?}; use KiB, MiB or GiB")),
    };
    let bytes = n.checked_mul(mult).ok_or("size too large")?;
    if bytes < crate::store::MIN_PART_SIZE as u64 {
        return Err("parts must be at least 5MiB (the S3 minimum)".into());
    }
    if bytes > crate::store::MAX_PART_SIZE as u64 {
        return Err("parts must be at most 5GiB (the S3 maximum)".into());
    }
    Ok(bytes)
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

/// A duration that bounds a wait: zero would fail every request at once, with a message about a
/// frozen store or node that is not true.
fn parse_timeout(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if d.is_zero() => Err(
            "a timeout of zero would fail every request; give a duration such as 30s or 5m".into(),
        ),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Config::command().debug_assert();
    }

    #[test]
    fn read_only_restore_source_and_owner_flags() {
        let c = Config::try_parse_from([
            "soma-agent",
            "--owner-id",
            "uid/ns/release",
            "--store-read-only",
            "--restore-from",
            "s3://old/prod",
        ])
        .unwrap();
        assert_eq!(c.owner_id.unwrap().as_str(), "uid/ns/release");
        assert!(c.store_read_only);
        assert_eq!(c.restore_from.as_deref(), Some("s3://old/prod"));
        for bad in ["", "a\nb", "x".repeat(254).as_str()] {
            let err = Config::try_parse_from(["soma-agent", "--owner-id", bad]).unwrap_err();
            assert!(err.to_string().contains("--owner-id"), "{err}");
        }
        // The one-shots take it after the subcommand too.
        let c = Config::try_parse_from([
            "soma-agent",
            "wal-fetch",
            "--restore-from",
            "s3://old/prod",
            "--system-id",
            "1",
            "000000010000000000000001",
            "pg_wal/RECOVERYXLOG",
        ])
        .unwrap();
        assert_eq!(c.restore_from.as_deref(), Some("s3://old/prod"));
    }

    #[test]
    fn schedules_from_flags_and_environment_lines() {
        let c = Config::try_parse_from([
            "soma-agent",
            "--schedule",
            "backup 0 2 * * *",
            "--schedule",
            "verify-latest 30 3 * * *",
            "--schedule-timezone",
            "Europe/Berlin",
        ])
        .unwrap();
        let parsed = c.parsed_schedules().unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].spec(), "verify-latest 30 3 * * *");
        assert_eq!(c.schedule_timezone.name(), "Europe/Berlin");
        let bad = Config::try_parse_from(["soma-agent", "--schedule", "backup soon"]).unwrap();
        let err = bad.parsed_schedules().unwrap_err();
        assert!(err.starts_with("--schedule / SOMA_SCHEDULES: "), "{err}");
    }

    #[test]
    fn retention_flag_is_parsed_at_start_up() {
        let c = Config::try_parse_from(["soma-agent", "--retention", "keep-last=3,max-age=7d"])
            .unwrap();
        assert_eq!(
            c.retention.unwrap().to_string(),
            "keep-last=3,max-age=7days"
        );
        let err = Config::try_parse_from(["soma-agent", "--retention", "keep-last=0"]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("--retention") && msg.contains("keep-last"),
            "{msg}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("5242880"), Ok(5 << 20));
        assert!(parse_size("1MiB").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn timeouts_are_never_zero() {
        let c = Config::try_parse_from(["soma-agent", "--qdrant-stall-timeout", "90s"]).unwrap();
        assert_eq!(c.qdrant_stall_timeout, std::time::Duration::from_secs(90));
        for flag in [
            "--store-attempt-timeout",
            "--store-stall-timeout",
            "--store-operation-timeout",
            "--qdrant-stall-timeout",
            "--qdrant-snapshot-timeout",
        ] {
            let err = Config::try_parse_from(["soma-agent", flag, "0s"]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(flag) && msg.contains("zero"), "{msg}");
        }
    }
}
