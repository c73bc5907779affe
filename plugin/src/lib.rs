//! `kubectl soma`: a kubectl plugin that drives Soma Backup agents over gRPC. It shows progress
//! and results; backup data never passes through it.

pub mod cli;
pub mod commands;
pub mod connect;
pub mod error;
pub mod output;
pub mod progress;

use cli::{Cli, Command};
use error::CliError;

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    commands::validate(&cli.command)?;
    let agent = connect::connect(cli.agent.as_deref()).await?;
    let out = cli.output;
    match cli.command {
        Command::Backup(args) => commands::backup::run(agent, out, args).await,
        Command::Restore(args) => commands::restore::run(agent, out, args).await,
        Command::List => commands::list::run(agent, out).await,
        Command::Describe(args) => commands::describe::run(agent, out, args).await,
        Command::Verify(args) => commands::verify::run(agent, out, args).await,
        Command::Delete(args) => commands::delete::run(agent, out, args).await,
        Command::Status => commands::status::run(agent, out).await,
    }
}
