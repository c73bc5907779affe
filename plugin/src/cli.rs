//! The command line: `kubectl soma <command>`.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Output format of results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable table (default).
    Table,
    /// JSON, for scripts (`backup`, `list` and `describe` print manifests).
    Json,
    /// YAML.
    Yaml,
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

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

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

    /// Use this agent pod when several match.
    #[arg(long, global = true, value_name = "NAME")]
    pub pod: Option<String>,

    /// Use the agent of this engine when several match.
    #[arg(long, global = true, value_enum, value_name = "ENGINE")]
    pub target: Option<TargetEngine>,
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
    /// List complete backups, newest first.
    List,
    /// Show one backup's manifest.
    Describe(IdArg),
    /// Re-read a backup from the store and check every size and sha256 digest.
    Verify(IdArg),
    /// Delete a backup from the store.
    Delete(DeleteArgs),
    /// Show the agents: pod, engine, version, store, last backup and its age, health.
    Status,
    /// Restore a backup into a scratch target, check it against what was recorded at backup
    /// time, report the restore time (RTO) and remove the scratch target; exit 1 unless it passed.
    Drill(DrillArgs),
}

/// `drill`.
#[derive(Debug, Args)]
pub struct DrillArgs {
    /// Backup id, or `latest` (the newest complete top-level backup).
    #[arg(default_value = "latest")]
    pub id: String,
    /// With `latest`: the newest backup of this engine, a set's member included.
    #[arg(long, value_enum, value_name = "ENGINE")]
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
    /// With `latest`: the newest backup of this engine, a set's member included.
    #[arg(long, value_enum, value_name = "ENGINE")]
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
    #[arg(long, conflicts_with_all = ["target_lsn", "target"])]
    pub target_time: Option<String>,
    /// With --pgdata: recover up to this WAL position, e.g. 16/B374D848.
    #[arg(long, requires = "pgdata", conflicts_with = "target")]
    pub target_lsn: Option<String>,
    /// With --pgdata: `latest`, everything in the archive (the default).
    #[arg(long, requires = "pgdata", value_parser = ["latest"])]
    pub target: Option<String>,
}

/// Commands that take one backup id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// Backup id, or `latest` (the newest complete top-level backup: a set, or a backup in no set).
    pub id: String,
    /// With `latest`: the newest backup of this engine, a set's member included.
    #[arg(long, value_enum, value_name = "ENGINE")]
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
