//! `kubectl soma backup postgres [--database NAME | --all-databases | --physical]`, `qdrant`, `all`.

use soma_proto::v1;

use crate::{
    cli::{BackupArgs, BackupEngine, OutputFormat},
    connect::Agent,
    error::CliError,
    output, progress,
};

/// Starts a backup, follows it, prints the manifest (json/yaml) or a summary (table).
pub(crate) async fn run(agent: Agent, out: OutputFormat, args: BackupArgs) -> Result<(), CliError> {
    let info = take(agent, &args).await?;
    match out {
        format if format.is_table() => {
            print_summary(&info);
            Ok(())
        }
        format => output::print_structured(format, &output::manifest(&info.0)?),
    }
}

fn print_summary((info, result): &(v1::BackupInfo, v1::OperationResult)) {
    outln!("{}", result.summary);
    outln!("id: {}", info.id);
    outln!(
        "size: {} raw, {} stored ({:.1}x), {:.1}s",
        output::bytes(result.raw_bytes),
        output::bytes(result.stored_bytes),
        result.raw_bytes as f64 / result.stored_bytes.max(1) as f64,
        result.seconds
    );
}

/// Runs one backup to its end.
async fn take(
    mut agent: Agent,
    args: &BackupArgs,
) -> Result<(v1::BackupInfo, v1::OperationResult), CliError> {
    let request = match &args.engine {
        BackupEngine::Postgres {
            database,
            physical,
            all_databases,
        } => v1::BackupRequest {
            engine: v1::Engine::Postgres as i32,
            database: database.clone().unwrap_or_default(),
            physical: *physical,
            all_databases: *all_databases,
            ..Default::default()
        },
        BackupEngine::Qdrant {
            collections,
            stream_shards,
            full_storage,
        } => v1::BackupRequest {
            engine: v1::Engine::Qdrant as i32,
            collections: collections.clone(),
            qdrant_mode: if *stream_shards {
                v1::QdrantMode::ShardStream
            } else if *full_storage {
                v1::QdrantMode::FullStorage
            } else {
                v1::QdrantMode::Unspecified
            } as i32,
            ..Default::default()
        },
        BackupEngine::All { physical } => v1::BackupRequest {
            all: true,
            physical: *physical,
            ..Default::default()
        },
    };
    let stream = agent
        .client
        .backup(request)
        .await
        .map_err(|s| CliError::from_status(s, &agent.addr, "request"))?
        .into_inner();
    let result = progress::follow(stream, "backup", &agent.addr).await?;
    let info = result
        .backup
        .clone()
        .ok_or_else(|| CliError::Other("the agent reported no backup".into()))?;
    Ok((info, result))
}
