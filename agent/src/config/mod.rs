//! Agent configuration: flags, each with a `SOMA_*` environment equivalent, in one group per
//! concern. Each group builds its own part of the agent (a store, an engine, the pipeline's
//! settings); rules between flags are clap's where clap can state them, so `--help` and the
//! error name both flags.
//!
//! S3 endpoint, region and credentials deliberately have no flags: they come from the AWS SDK's
//! standard environment and credential chain, so secrets never appear in process arguments.

mod commands;
mod metrics;
mod operations;
mod pipeline;
mod postgres;
mod qdrant;
mod schedule;
mod server;
mod store;
mod wal;

use clap::{Parser, ValueEnum};

pub use commands::{Command, DrillWalFetchArgs, RecoveryEndArgs, RestorePgdataArgs, WalFetchArgs};
pub use metrics::MetricsArgs;
pub use operations::OperationArgs;
pub use pipeline::{PipelineArgs, parse_size};
pub use postgres::PostgresArgs;
pub use qdrant::QdrantArgs;
pub use schedule::ScheduleArgs;
pub use server::{Security, ServerArgs};
pub use store::{StoreArgs, Stores};
pub use wal::WalArgs;

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
// The one-shots use only the store's flags: rules between the sidecar's flags (e.g. --wal-stream
// needs --postgres-url) hold for the sidecar alone, as they did when `run` checked them, so an
// init container that shares the sidecar's environment is not refused over a flag it ignores.
#[derive(Debug, Clone, Parser)]
#[command(name = "soma-agent", version, about, long_about = None, subcommand_negates_reqs = true)]
pub struct Config {
    /// One-shot commands; none runs the sidecar.
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub server: ServerArgs,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub postgres: PostgresArgs,

    #[command(flatten)]
    pub wal: WalArgs,

    #[command(flatten)]
    pub qdrant: QdrantArgs,

    #[command(flatten)]
    pub pipeline: PipelineArgs,

    #[command(flatten)]
    pub schedule: ScheduleArgs,

    #[command(flatten)]
    pub operations: OperationArgs,

    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// Log format.
    #[arg(long, env = "SOMA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text,
          global = true, help_heading = "Logging")]
    pub log_format: LogFormat,
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

    /// The flags, their environment variables, defaults and globality as they were before the
    /// flags were grouped: scripts and the Helm chart use them. `None`: a default computed at
    /// run time; `Some("")`: no default.
    const FLAGS: &[(&str, &str, Option<&str>, bool)] = &[
        ("listen", "SOMA_LISTEN", Some("127.0.0.1:50051"), false),
        ("token-file", "SOMA_AGENT_TOKEN_FILE", Some(""), false),
        ("tls-cert", "SOMA_TLS_CERT", Some(""), false),
        ("tls-key", "SOMA_TLS_KEY", Some(""), false),
        ("reflection", "SOMA_REFLECTION", Some("false"), false),
        (
            "store",
            "SOMA_STORE",
            Some("file:///var/lib/soma-backup"),
            true,
        ),
        ("restore-from", "SOMA_RESTORE_FROM", Some(""), true),
        (
            "encryption-key-file",
            "SOMA_ENCRYPTION_KEY_FILE",
            Some(""),
            true,
        ),
        (
            "accept-unencrypted",
            "SOMA_ACCEPT_UNENCRYPTED",
            Some(""),
            true,
        ),
        ("object-lock-days", "SOMA_OBJECT_LOCK_DAYS", Some(""), false),
        (
            "object-lock-compliance",
            "SOMA_OBJECT_LOCK_COMPLIANCE",
            Some("false"),
            false,
        ),
        ("store-retries", "SOMA_STORE_RETRIES", Some("8"), true),
        (
            "store-attempt-timeout",
            "SOMA_STORE_ATTEMPT_TIMEOUT",
            Some("2m"),
            true,
        ),
        (
            "store-stall-timeout",
            "SOMA_STORE_STALL_TIMEOUT",
            Some("10s"),
            true,
        ),
        (
            "store-operation-timeout",
            "SOMA_STORE_OPERATION_TIMEOUT",
            Some("15m"),
            true,
        ),
        (
            "store-read-only",
            "SOMA_STORE_READ_ONLY",
            Some("false"),
            false,
        ),
        ("owner-id", "SOMA_OWNER_ID", Some(""), false),
        ("postgres-url", "SOMA_POSTGRES_URL", Some(""), false),
        ("qdrant-url", "SOMA_QDRANT_URL", Some(""), false),
        ("qdrant-ca-cert", "SOMA_QDRANT_CA_CERT", Some(""), false),
        ("qdrant-peer-port", "SOMA_QDRANT_PEER_PORT", Some(""), false),
        (
            "qdrant-stall-timeout",
            "SOMA_QDRANT_STALL_TIMEOUT",
            Some("5m"),
            false,
        ),
        (
            "qdrant-snapshot-timeout",
            "SOMA_QDRANT_SNAPSHOT_TIMEOUT",
            Some("2h"),
            false,
        ),
        ("qdrant-mode", "SOMA_QDRANT_MODE", Some("collection"), false),
        ("pg-bin-dir", "SOMA_PG_BIN_DIR", Some(""), false),
        (
            "compression-level",
            "SOMA_COMPRESSION_LEVEL",
            Some("3"),
            false,
        ),
        (
            "compression-threads",
            "SOMA_COMPRESSION_THREADS",
            None,
            false,
        ),
        ("part-size", "SOMA_PART_SIZE", Some("8MiB"), false),
        ("parts-in-flight", "SOMA_PARTS_IN_FLIGHT", Some("2"), false),
        ("log-format", "SOMA_LOG_FORMAT", Some("text"), true),
        ("wal-stream", "SOMA_WAL_STREAM", Some("false"), false),
        (
            "wal-spool",
            "SOMA_WAL_SPOOL",
            Some("/var/lib/soma-backup/wal-spool"),
            false,
        ),
        ("wal-slot", "SOMA_WAL_SLOT", Some("soma_wal_archive"), false),
        (
            "wal-partial-interval",
            "SOMA_WAL_PARTIAL_INTERVAL",
            Some("5s"),
            false,
        ),
        (
            "wal-spool-max-segments",
            "SOMA_WAL_SPOOL_MAX_SEGMENTS",
            Some("64"),
            false,
        ),
        (
            "wal-drain-timeout",
            "SOMA_WAL_DRAIN_TIMEOUT",
            Some("10s"),
            false,
        ),
        ("replication-url", "SOMA_REPLICATION_URL", Some(""), false),
        ("schedule", "SOMA_SCHEDULES", Some(""), false),
        (
            "schedule-timezone",
            "SOMA_SCHEDULE_TIMEZONE",
            Some("UTC"),
            false,
        ),
        (
            "schedule-jitter",
            "SOMA_SCHEDULE_JITTER",
            Some("60s"),
            false,
        ),
        ("metrics-listen", "SOMA_METRICS_LISTEN", Some(""), false),
        (
            "wal-stuck-after",
            "SOMA_WAL_STUCK_AFTER",
            Some("10m"),
            false,
        ),
        ("retention", "SOMA_RETENTION", Some(""), false),
        (
            "drill-dir",
            "SOMA_DRILL_DIR",
            Some("/var/lib/soma-backup/drill"),
            false,
        ),
        ("max-operations", "SOMA_MAX_OPERATIONS", Some("4"), false),
        ("restore-root", "SOMA_RESTORE_ROOT", Some(""), false),
    ];

    #[test]
    fn every_flag_keeps_its_name_environment_and_default() {
        let mut cmd = Config::command();
        cmd.build();
        let args: Vec<_> = cmd
            .get_arguments()
            .filter(|a| a.get_long().is_some())
            .collect();
        let names: Vec<_> = args.iter().filter_map(|a| a.get_long()).collect();
        for (long, env, default, global) in FLAGS {
            let arg = args
                .iter()
                .find(|a| a.get_long() == Some(long))
                .unwrap_or_else(|| panic!("--{long} is gone; the flags are {names:?}"));
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(*env),
                "--{long}"
            );
            assert_eq!(arg.is_global_set(), *global, "--{long} global");
            if let Some(default) = default {
                let defaults: Vec<_> = arg
                    .get_default_values()
                    .iter()
                    .map(|v| v.to_string_lossy().into_owned())
                    .collect();
                assert_eq!(defaults.join(","), *default, "--{long} default");
            }
        }
        // --help and --version are clap's; nothing else was added.
        assert_eq!(names.len(), FLAGS.len() + 2, "{names:?}");
    }

    #[test]
    fn help_groups_the_flags_by_concern() {
        let help = Config::command().render_long_help().to_string();
        let mut at = 0;
        // In the order of the struct, each heading before its flags.
        for (heading, flag) in [
            ("Server:", "--listen"),
            ("Store:", "--restore-from"),
            ("PostgreSQL:", "--replication-url"),
            ("WAL stream:", "--wal-slot"),
            ("Qdrant:", "--qdrant-mode"),
            ("Compression and uploads:", "--part-size"),
            ("Schedules:", "--schedule-jitter"),
            ("Operations:", "--drill-dir"),
            ("Metrics and probes:", "--wal-stuck-after"),
            ("Logging:", "--log-format"),
        ] {
            let h = help[at..]
                .find(heading)
                .unwrap_or_else(|| panic!("no {heading} after byte {at} in:\n{help}"));
            let f = help[at + h..]
                .find(flag)
                .unwrap_or_else(|| panic!("no {flag} under {heading} in:\n{help}"));
            at += h + f;
        }
    }

    fn refusal(args: &[&str]) -> String {
        let mut argv = vec!["soma-agent"];
        argv.extend_from_slice(args);
        match Config::try_parse_from(argv) {
            Ok(c) => panic!("{args:?} was accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_flag_that_needs_another_is_refused_naming_both() {
        for (given, needed) in [
            ("--wal-stream", "--postgres-url"),
            ("--replication-url", "--postgres-url"),
            ("--tls-cert", "--tls-key"),
            ("--tls-key", "--tls-cert"),
            ("--object-lock-compliance", "--object-lock-days"),
        ] {
            let mut args = vec![given];
            if given != "--wal-stream" && given != "--object-lock-compliance" {
                args.push("value");
            }
            let msg = refusal(&args);
            assert!(
                msg.contains("required arguments were not provided")
                    && msg.contains(given)
                    && msg.contains(needed),
                "{given}: {msg}"
            );
        }
        let c = Config::try_parse_from([
            "soma-agent",
            "--wal-stream",
            "--postgres-url",
            "postgresql://soma@127.0.0.1/appdb",
            "--replication-url",
            "postgresql://replicator@127.0.0.1/appdb",
        ])
        .unwrap();
        assert!(c.wal.wal_stream);
    }

    #[test]
    fn the_sidecars_rules_do_not_bind_the_one_shots() {
        // A one-shot run with the sidecar's flags or environment: it uses only the store's.
        let c = Config::try_parse_from([
            "soma-agent",
            "--wal-stream",
            "--store-read-only",
            "wal-fetch",
            "--system-id",
            "1",
            "000000010000000000000001",
            "pg_wal/RECOVERYXLOG",
        ])
        .unwrap();
        assert!(matches!(c.command, Some(Command::WalFetch(_))));
        // A subcommand's own required arguments still are.
        let msg = refusal(&[
            "wal-fetch",
            "000000010000000000000001",
            "pg_wal/RECOVERYXLOG",
        ]);
        assert!(msg.contains("--system-id"), "{msg}");
    }

    #[test]
    fn wal_stream_and_a_read_only_store_are_refused_naming_both() {
        let c = Config::try_parse_from([
            "soma-agent",
            "--wal-stream",
            "--postgres-url",
            "postgresql://soma@127.0.0.1/appdb",
            "--store-read-only",
        ])
        .unwrap();
        let msg = c
            .wal
            .stream(c.store.store_read_only)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("--wal-stream") && msg.contains("--store-read-only"),
            "{msg}"
        );
        let stream = c.wal.stream(false).unwrap().expect("--wal-stream");
        assert_eq!(stream.slot, "soma_wal_archive");
        let bad_slot = Config::try_parse_from([
            "soma-agent",
            "--wal-stream",
            "--postgres-url",
            "postgresql://soma@127.0.0.1/appdb",
            "--wal-slot",
            "Bad-Slot",
        ])
        .unwrap();
        let msg = bad_slot.wal.stream(false).unwrap_err().to_string();
        assert!(msg.contains("--wal-slot"), "{msg}");
        // Without --wal-stream neither rule applies.
        let off = Config::try_parse_from(["soma-agent", "--store-read-only"]).unwrap();
        assert!(off.wal.stream(true).unwrap().is_none());
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
        assert_eq!(c.store.owner_id.unwrap().as_str(), "uid/ns/release");
        assert!(c.store.store_read_only);
        assert_eq!(c.store.restore_from.as_deref(), Some("s3://old/prod"));
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
        assert_eq!(c.store.restore_from.as_deref(), Some("s3://old/prod"));
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
        let parsed = c.schedule.parsed().unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1].spec(), "verify-latest 30 3 * * *");
        assert_eq!(c.schedule.schedule_timezone.name(), "Europe/Berlin");
        let bad = Config::try_parse_from(["soma-agent", "--schedule", "backup soon"]).unwrap();
        let err = bad.schedule.parsed().unwrap_err();
        assert!(err.starts_with("--schedule / SOMA_SCHEDULES: "), "{err}");
    }

    #[test]
    fn retention_flag_is_parsed_at_start_up() {
        let c = Config::try_parse_from(["soma-agent", "--retention", "keep-last=3,max-age=7d"])
            .unwrap();
        assert_eq!(
            c.operations.retention.unwrap().to_string(),
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
        assert_eq!(
            c.qdrant.qdrant_stall_timeout,
            std::time::Duration::from_secs(90)
        );
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
