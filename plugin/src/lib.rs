//! `kubectl soma`: a kubectl plugin that drives Soma Backup agents over gRPC. It shows progress
//! and results; backup data never passes through it.

pub mod cli;
pub mod commands;
pub mod connect;
pub mod discovery;
pub mod error;
pub mod output;
pub mod progress;

use cli::{Cli, Command};
use error::CliError;

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    commands::validate(&cli.command)?;
    let out = cli.output;
    if let Command::Status = cli.command {
        return commands::status::run(cli.agent.as_deref(), &cli.kube, out).await;
    }
    if let Command::List = cli.command
        && cli.agent.is_none()
        && cli.kube.pod.is_none()
        && cli.kube.target.is_none()
    {
        // Every agent may keep its backups under its own prefix: list them all.
        let (client, namespace) = connect::kube(&cli.kube).await?;
        let found = discovery::agents(&client, &namespace).await?;
        let ready: Vec<_> = found.iter().filter(|p| p.ready).collect();
        if ready.is_empty() {
            // Let discovery explain why (none at all, or none ready).
            discovery::choose(&found, &namespace, None, None)?;
        }
        let mut agents = Vec::new();
        for pod in ready {
            agents.push(connect::port_forward(&client, pod).await?);
        }
        return commands::list::run_many(agents, out).await;
    }
    let engine = commands::engine_of(&cli.command);
    let agent = connect::connect(cli.agent.as_deref(), &cli.kube, engine).await?;
    match cli.command {
        Command::Backup(args) => commands::backup::run(agent, out, args).await,
        Command::Restore(args) => commands::restore::run(agent, out, args).await,
        Command::List => commands::list::run_many(vec![agent], out).await,
        Command::Describe(args) => commands::describe::run(agent, out, args).await,
        Command::Verify(args) => commands::verify::run(agent, out, args).await,
        Command::Delete(args) => commands::delete::run(agent, out, args).await,
        Command::Status => unreachable!("handled above"),
    }
}
