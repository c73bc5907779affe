//! The command line: `kubectl soma <command>`.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Output format of results, as kubectl spells them (`-o table|wide|name|json|yaml|jsonpath=…`).
///
/// `Copy`, because every command receives it by value; the JSONPath template it may carry is
/// parsed once from the command line and lives as long as the process (see [`OutputFormat::parse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Human-readable table (default).
    Table,
    /// The table with more columns (kubectl's `-o wide`).
    Wide,
    /// One `resource/name` per line, e.g. `backup/20261129T143501Z-pg-app-3c4d`.
    Name,
    /// JSON, for scripts (`backup`, `list` and `describe` print manifests).
    Json,
    /// YAML.
    Yaml,
    /// A kubectl JSONPath template evaluated over the document `-o json` prints.
    JsonPath(&'static crate::output::jsonpath::Template),
}

impl OutputFormat {
    /// The values `-o` accepts, for help and completion.
    pub const NAMES: [&'static str; 6] = ["table", "wide", "name", "json", "yaml", "jsonpath="];

    /// Parses `-o VALUE`. A JSONPath template is compiled here, so a bad template is a usage error
    /// before any agent is asked; it is leaked on purpose: one per process, needed until exit.
    pub fn parse(value: &str) -> Result<OutputFormat, String> {
        Ok(match value {
            "table" => OutputFormat::Table,
            "wide" => OutputFormat::Wide,
            "name" => OutputFormat::Name,
            "json" => OutputFormat::Json,
            "yaml" => OutputFormat::Yaml,
            other => {
                let template = other
                    .strip_prefix("jsonpath=")
                    .or_else(|| other.strip_prefix("jsonpath-as-json="))
                    .ok_or_else(|| {
                        format!(
                            "unknown output format {other:?}: use table, wide, name, json, yaml or jsonpath=TEMPLATE"
                        )
                    })?;
                let parsed = crate::output::jsonpath::Template::parse(template)
                    .map_err(|e| format!("jsonpath template {template:?}: {e}"))?;
                OutputFormat::JsonPath(Box::leak(Box::new(parsed)))
            }
        })
    }

    /// Whether this is one of the human-readable tables (`table`, `wide`).
    pub fn is_table(self) -> bool {
        matches!(self, OutputFormat::Table | OutputFormat::Wide)
    }
}

/// Back up and restore the databases of a Soma platform through its soma-agent sidecars.
#[derive(Debug, Parser)]
#[command(name = "kubectl-soma", bin_name = "kubectl soma", version, about, long_about = None)]
pub struct Cli {
    /// Talk to an agent directly at HOST:PORT (e.g. 127.0.0.1:50051) instead of finding it
    /// through the Kubernetes API.
    #[arg(long, global = true, env = "SOMA_AGENT", value_name = "HOST:PORT")]
    pub agent: Option<String>,

    /// Kubernetes connection and agent selection.
    #[command(flatten)]
    pub kube: KubeArgs,

    /// Output format: table, wide, name, json, yaml, or jsonpath=TEMPLATE (kubectl's JSONPath,
    /// evaluated over the document `-o json` prints; a list's elements are `.items`).
    #[arg(
        short = 'o',
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "table",
        value_parser = OutputFormat::parse
    )]
    pub output: OutputFormat,

    /// Print tables without their header line.
    #[arg(long, global = true)]
    pub no_headers: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach agents through Kubernetes, as kubectl does it.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeArgs {
    /// Path to the kubeconfig file (default: KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,

    /// Namespace of the agents (default: the context's namespace).
    #[arg(short = 'n', long, global = true, value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// File holding the agents' bearer token (else SOMA_AGENT_TOKEN, else the Secret the agent
    /// pod's soma.dev/token-secret annotation names).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "SOMA_AGENT_TOKEN_FILE"
    )]
    pub token_file: Option<std::path::PathBuf>,

    /// Reach the agents over TLS, trusting this CA certificate (PEM): for agents serving
    /// `--tls-cert` (reached over a network rather than through a port-forward).
    #[arg(long, global = true, value_name = "PATH", env = "SOMA_AGENT_CA")]
    pub agent_ca: Option<std::path::PathBuf>,

    /// With --agent-ca: the name the agent's certificate must carry (default: the host of
    /// --agent, or "localhost" through a port-forward).
    #[arg(long, global = true, value_name = "NAME", requires = "agent_ca")]
    pub agent_tls_name: Option<String>,

    /// Use this agent pod when several match.
    #[arg(long, global = true, value_name = "NAME")]
    pub pod: Option<String>,

    /// The engine: use the agent serving it when several match, and with `latest` take the
    /// newest backup of this engine (a set's member included).
    #[arg(long, global = true, value_enum, value_name = "ENGINE")]
    pub engine: Option<TargetEngine>,

    /// Deprecated spelling of `--engine` (hidden). It shares its id with `restore --target`, the
    /// recovery target, so clap keeps restore's own flag there: see [`Cli::normalize`].
    #[arg(id = "target", long = "target", global = true, hide = true, value_name = "ENGINE",
          value_parser = ["postgres", "qdrant"])]
    pub legacy_target: Option<String>,
}

/// Engines an agent pod can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetEngine {
    /// The PostgreSQL sidecar.
    Postgres,
    /// The Qdrant sidecar.
    Qdrant,
}

impl TargetEngine {
    /// The engine in the gRPC contract.
    pub fn to_proto(self) -> soma_proto::v1::Engine {
        match self {
            TargetEngine::Postgres => soma_proto::v1::Engine::Postgres,
            TargetEngine::Qdrant => soma_proto::v1::Engine::Qdrant,
        }
    }

    /// The value of the `soma.dev/engine` label.
    pub fn label(self) -> &'static str {
        match self {
            TargetEngine::Postgres => "postgres",
            TargetEngine::Qdrant => "qdrant",
        }
    }
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Take a backup now.
    Backup(BackupArgs),
    /// Restore a backup.
    Restore(RestoreArgs),
    /// List complete backups, newest first (with --failed: the failed operations recorded).
    List(ListArgs),
    /// Show one backup's manifest.
    Describe(IdArg),
    /// Re-read a backup from the store and check every size and sha256 digest.
    Verify(IdArg),
    /// Delete a backup from the store.
    Delete(DeleteArgs),
    /// Show the agents: pod, engine, version, store, last backup and its age, health, schedules,
    /// retention and recent failures.
    Status,
    /// Print a shell completion script for `kubectl-soma` (bash, zsh or fish); `kubectl soma`
    /// completes through the `kubectl_complete-soma` helper instead (see the README's Install).
    Completion(CompletionArgs),
    /// Apply the retention policy: delete the backups it drops (a set with its members), WAL no
    /// kept base backup needs, and leftovers of interrupted backups older than a day.
    Prune(PruneArgs),
    /// Restore a backup into a scratch target, check it against what was recorded at backup
    /// time, report the restore time (RTO) and remove the scratch target; exit 1 unless it passed.
    Drill(DrillArgs),
}

/// `list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// List the failed or interrupted operations the agents recorded instead, newest first.
    #[arg(long)]
    pub failed: bool,
}

/// `completion`.
#[derive(Debug, Args)]
pub struct CompletionArgs {
    /// The shell to print the script for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `prune`: each flag overrides that rule of the agent's --retention for this run.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Only show what would be deleted and why.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep the N newest backups of each engine, target and kind.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_last: Option<u32>,
    /// Keep the newest backup of each of the N most recent days that have one (UTC).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_daily: Option<u32>,
    /// Keep the newest backup of each of the N most recent ISO weeks that have one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_weekly: Option<u32>,
    /// Keep the newest backup of each of the N most recent months that have one.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_monthly: Option<u32>,
    /// Keep every backup younger than this (e.g. 30d, 12h).
    #[arg(long, value_name = "DUR", value_parser = crate::commands::prune::parse_age)]
    pub max_age: Option<u64>,
    /// Delete without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `drill`.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Backup id, or `latest` (the newest complete top-level backup).
    #[arg(default_value = "latest")]
    pub id: String,
    /// With `latest`: the newest backup of this engine, a set's member included (the global
    /// `--engine`, filled in by [`Cli::normalize`]).
    #[arg(skip)]
    pub engine: Option<TargetEngine>,
}

/// `backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// What to back up.
    #[command(subcommand)]
    pub engine: BackupEngine,
}

/// Engines that can be backed up.
#[derive(Debug, Subcommand)]
pub enum BackupEngine {
    /// A logical backup (pg_dump) of one PostgreSQL database with the roles it needs, with
    /// --all-databases of every database plus the cluster's roles, or with --physical a base
    /// backup of the whole cluster for point-in-time recovery.
    Postgres {
        /// Database to back up (default: the one in the agent's --postgres-url).
        #[arg(long, short = 'd', conflicts_with = "physical")]
        database: Option<String>,
        /// A physical base backup of the whole cluster (pg_basebackup): with the agent's WAL
        /// archive (--wal-stream) it restores to any point in time after it.
        #[arg(long)]
        physical: bool,
        /// A logical backup of every database (one pg_dump each) plus the cluster's roles,
        /// memberships and tablespaces, restorable into a fresh cluster.
        #[arg(long, conflicts_with_all = ["database", "physical"])]
        all_databases: bool,
    },
    /// Snapshots of Qdrant collections, streamed to the store (default: every collection).
    Qdrant {
        /// Collection to back up (repeat for several).
        #[arg(long = "collection", short = 'c', value_name = "NAME")]
        collections: Vec<String>,
        /// Stream shard snapshots without writing a file on the Qdrant node (Qdrant ≥ 1.12).
        #[arg(long, conflicts_with = "full_storage")]
        stream_shards: bool,
        /// One snapshot of the whole Qdrant storage (single-node deployments).
        #[arg(long, conflicts_with = "collections")]
        full_storage: bool,
    },
    /// Every engine the agent serves, as one backup set.
    All {
        /// Take the PostgreSQL member as a physical base backup.
        #[arg(long)]
        physical: bool,
    },
}

/// `restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Backup id, or `latest` (the newest complete top-level backup: a set, or a backup in no set).
    /// A set is restored member by member through the agents serving them, PostgreSQL first.
    pub id: String,
    /// With `latest`: the newest backup of this engine, a set's member included. Set from the
    /// global `--engine` by [`Cli::normalize`].
    #[arg(skip)]
    pub engine: Option<TargetEngine>,
    /// Database to restore into (created when missing; default: the backup's own database).
    #[arg(long, short = 'd')]
    pub database: Option<String>,
    /// Replace the objects of a non-empty target (dropped and recreated in the restore transaction).
    #[arg(long)]
    pub clean: bool,
    /// Qdrant: restore only this collection (repeat for several; default: all in the backup).
    #[arg(long = "collection", short = 'c', value_name = "NAME")]
    pub collections: Vec<String>,
    /// Qdrant: restore the chosen collection under this name (its aliases stay where they are).
    #[arg(long = "as", value_name = "NEW_NAME", requires = "collections")]
    pub rename_to: Option<String>,
    /// Qdrant: overwrite existing collections and repoint existing aliases.
    #[arg(long)]
    pub force: bool,
    /// PostgreSQL: also bring roles that already exist on the target to the backup's
    /// attributes, password and memberships (by default existing roles are left as they are).
    #[arg(long)]
    pub update_roles: bool,
    /// PostgreSQL point-in-time restore: lay the base backup (`latest`: the newest that reaches
    /// the target) into this empty data directory on the agent's host, configured to replay WAL to
    /// the target when PostgreSQL starts there. In Kubernetes use the chart's init container
    /// (`soma-agent restore-pgdata`) instead.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["database", "clean", "collections", "force"])]
    pub pgdata: Option<String>,
    /// With --pgdata: recover every transaction committed at or before this time (RFC 3339, or as
    /// PostgreSQL prints it: `2026-11-29 14:35:01.8+00`). For a backup set: the PostgreSQL member
    /// is restored to this time and each Qdrant member is the newest Qdrant backup taken at or
    /// before it.
    #[arg(long, conflicts_with_all = ["target_lsn", "target_name", "target"])]
    pub target_time: Option<String>,
    /// With --pgdata: recover up to this WAL position, e.g. 16/B374D848.
    #[arg(long, requires = "pgdata", conflicts_with_all = ["target_name", "target"])]
    pub target_lsn: Option<String>,
    /// With --pgdata: recover up to the restore point of this name (`pg_create_restore_point`).
    /// Name the base backup taken before it: `latest` picks the newest, which may be after it.
    #[arg(long, requires = "pgdata", conflicts_with = "target")]
    pub target_name: Option<String>,
    /// With --pgdata: `latest`, everything in the archive (the default). The agent is chosen with
    /// `--engine`, never with `--target`.
    #[arg(long, requires = "pgdata", value_name = "latest", value_parser = recovery_target)]
    pub target: Option<String>,
}

/// Commands that take one backup id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Backup id, or `latest` (the newest complete top-level backup: a set, or a backup in no set).
    pub id: String,
    /// With `latest`: the newest backup of this engine, a set's member included. Set from the
    /// global `--engine` by [`Cli::normalize`].
    #[arg(skip)]
    pub engine: Option<TargetEngine>,
}

/// `delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// Backup id (an explicit id; `latest` is refused).
    pub id: String,
    /// Delete without asking.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `restore --target`: the recovery target. An engine name here is the old global selector, which
/// is `--engine` now; say so rather than "invalid value".
fn recovery_target(value: &str) -> Result<String, String> {
    match value {
        "latest" => Ok(value.to_string()),
        "postgres" | "qdrant" => Err(format!(
            "restore's --target is the recovery target (`latest`); to choose the {value} agent use --engine {value}"
        )),
        _ => Err("expected `latest` (or use --target-time / --target-lsn)".into()),
    }
}

impl Cli {
    /// Settles the engine selection after parsing: the deprecated global `--target ENGINE`
    /// becomes `--engine` (with a warning on stderr), except for `restore`, whose `--target` is
    /// the recovery target; `--engine` narrows `latest` for the commands that take an id, and must
    /// agree with an explicit id's engine and with `backup ENGINE`.
    pub fn normalize(&mut self) -> Result<(), crate::error::CliError> {
        use crate::error::CliError;
        let legacy = self.kube.legacy_target.take();
        if let Command::Restore(a) = &mut self.command {
            // clap shares one value between the global alias and restore's own `--target` (same
            // id): a value restore's parser would refuse can only come from before `restore`.
            if let Some(t) = a.target.as_deref().filter(|t| *t != "latest") {
                return Err(CliError::Usage(format!(
                    "--target {t}: restore's --target is the recovery target (`latest`); to choose the {t} agent use --engine {t}"
                )));
            }
        } else if let Some(t) = legacy {
            let engine = match t.as_str() {
                "qdrant" => TargetEngine::Qdrant,
                _ => TargetEngine::Postgres,
            };
            if self.kube.engine.is_some_and(|e| e != engine) {
                return Err(CliError::Usage(format!(
                    "--target {t} and --engine {} disagree; drop the deprecated --target",
                    self.kube.engine.map_or("", |e| e.label())
                )));
            }
            eprintln!("warning: --target {t} is deprecated; use --engine {t}");
            self.kube.engine = Some(engine);
        }
        let engine = self.kube.engine;
        let narrow = |id: &str, slot: &mut Option<TargetEngine>| -> Result<(), CliError> {
            let Some(engine) = engine else { return Ok(()) };
            if id == "latest" {
                *slot = Some(engine);
                return Ok(());
            }
            let of_id = soma_proto::BackupId::parse(id)
                .ok()
                .and_then(|b| b.engine());
            let (matches, name) = match of_id {
                Some(soma_proto::IdEngine::Postgres) => {
                    (engine == TargetEngine::Postgres, "postgres")
                }
                Some(soma_proto::IdEngine::Qdrant) => (engine == TargetEngine::Qdrant, "qdrant"),
                // A set, or an id the command refuses anyway: --engine only picks the agent.
                _ => (true, ""),
            };
            if matches {
                Ok(())
            } else {
                Err(CliError::Usage(format!(
                    "{id} is a {name} backup but --engine {} was given; drop --engine or name a {} backup",
                    engine.label(),
                    engine.label()
                )))
            }
        };
        match &mut self.command {
            Command::Restore(a) => narrow(&a.id.clone(), &mut a.engine),
            Command::Describe(a) | Command::Verify(a) => narrow(&a.id.clone(), &mut a.engine),
            Command::Delete(a) => narrow(&a.id, &mut None),
            Command::Drill(a) => narrow(&a.id.clone(), &mut a.engine),
            Command::Backup(b) => {
                let wanted = match b.engine {
                    BackupEngine::Postgres { .. } => Some(TargetEngine::Postgres),
                    BackupEngine::Qdrant { .. } => Some(TargetEngine::Qdrant),
                    BackupEngine::All { .. } => None,
                };
                match (wanted, engine) {
                    (Some(w), Some(e)) if w != e => Err(CliError::Usage(format!(
                        "`backup {}` with --engine {}: the engine is named twice and differently; drop --engine",
                        w.label(),
                        e.label()
                    ))),
                    _ => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, String> {
        let mut cli =
            Cli::try_parse_from(std::iter::once("kubectl-soma").chain(args.iter().copied()))
                .map_err(|e| e.to_string())?;
        cli.normalize().map_err(|e| e.to_string())?;
        Ok(cli)
    }

    /// `restore --target latest` is the recovery target; the agent is chosen with `--engine`,
    /// and the old global `--target ENGINE` still works everywhere else.
    #[test]
    fn engine_selection_and_recovery_target_do_not_collide() {
        let cli = parse(&[
            "--engine", "postgres", "restore", "latest", "--pgdata", "/d", "--target", "latest",
        ])
        .unwrap();
        assert_eq!(cli.kube.engine, Some(TargetEngine::Postgres));
        let Command::Restore(a) = &cli.command else {
            panic!()
        };
        assert_eq!(a.target.as_deref(), Some("latest"));
        assert_eq!(
            a.engine,
            Some(TargetEngine::Postgres),
            "--engine narrows latest"
        );

        let cli = parse(&[
            "restore", "latest", "--pgdata", "/d", "--target", "latest", "--engine", "postgres",
        ])
        .unwrap();
        assert_eq!(cli.kube.engine, Some(TargetEngine::Postgres));

        let err = parse(&["restore", "latest", "--target", "postgres"]).unwrap_err();
        assert!(err.contains("--engine postgres"), "{err}");
        let err = parse(&["--target", "qdrant", "restore", "latest"]).unwrap_err();
        assert!(err.contains("--engine qdrant"), "{err}");

        for args in [
            &["--target", "qdrant", "list"][..],
            &["list", "--target", "qdrant"],
            &["status", "--target=qdrant"],
        ] {
            let cli = parse(args).unwrap();
            assert_eq!(cli.kube.engine, Some(TargetEngine::Qdrant), "{args:?}");
        }
        let cli = parse(&["describe", "latest", "--target", "qdrant"]).unwrap();
        let Command::Describe(a) = &cli.command else {
            panic!()
        };
        assert_eq!(a.engine, Some(TargetEngine::Qdrant));

        // An explicit id keeps its own engine; --engine may only agree with it.
        let cli = parse(&[
            "describe",
            "20261129T143502Z-pg-app-3c4d",
            "--engine",
            "postgres",
        ])
        .unwrap();
        let Command::Describe(a) = &cli.command else {
            panic!()
        };
        assert_eq!(a.engine, None);
        let err = parse(&[
            "verify",
            "20261129T143502Z-pg-app-3c4d",
            "--engine",
            "qdrant",
        ])
        .unwrap_err();
        assert!(err.contains("is a postgres backup"), "{err}");
        let err = parse(&["backup", "postgres", "--engine", "qdrant"]).unwrap_err();
        assert!(err.contains("drop --engine"), "{err}");
        let err = parse(&["--target", "qdrant", "--engine", "postgres", "list"]).unwrap_err();
        assert!(err.contains("disagree"), "{err}");
    }

    #[test]
    fn output_formats_parse_as_kubectl_spells_them() {
        let cli = parse(&["list", "-o", "wide", "--no-headers"]).unwrap();
        assert_eq!(cli.output, OutputFormat::Wide);
        assert!(cli.no_headers);
        let cli = parse(&["-o", "jsonpath={.items[*].id}", "list"]).unwrap();
        assert!(matches!(cli.output, OutputFormat::JsonPath(_)));
        let err = parse(&["list", "-o", "jsonpath={.items[?(@.id)]}"]).unwrap_err();
        assert!(err.contains("filter"), "{err}");
        let err = parse(&["list", "-o", "xml"]).unwrap_err();
        assert!(
            err.contains("table, wide, name, json, yaml or jsonpath="),
            "{err}"
        );
    }
}
