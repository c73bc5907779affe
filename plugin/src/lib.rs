//! `kubectl soma`: a kubectl plugin that drives Soma Backup agents over gRPC. It shows progress
//! and results; backup data never passes through it.

/// `println!` for a line that may carry text from an agent, a store or the cluster: printed as
/// one line through [`output::terminal_safe`], so no value in it can clear the screen, move the
/// cursor or forge a line of its own. Defined before the modules, which use it.
macro_rules! outln {
    ($($arg:tt)*) => {
        ::std::println!(
            "{}",
            $crate::output::terminal_safe(&::std::format!($($arg)*), $crate::output::Layout::Line)
        )
    };
}

/// [`outln!`] on stderr.
macro_rules! errln {
    ($($arg:tt)*) => {
        ::std::eprintln!(
            "{}",
            $crate::output::terminal_safe(&::std::format!($($arg)*), $crate::output::Layout::Line)
        )
    };
}

pub mod cli;
pub(crate) mod commands;
pub mod complete;
pub(crate) mod connect;
pub(crate) mod discovery;
pub mod error;
pub mod output;
pub(crate) mod progress;

use cli::{Cli, Command};
use error::CliError;

/// Runs one command.
pub async fn run(mut cli: Cli) -> Result<(), CliError> {
    cli.normalize()?;
    commands::validate(&cli.command)?;
    output::set_no_headers(cli.no_headers);
    let out = cli.output;
    match &cli.command {
        Command::Status => {
            return commands::status::run(cli.agent.as_deref(), &cli.kube, out).await;
        }
        Command::Completion(args) => return complete::print_script(args.shell),
        _ => {}
    }
    let engine = commands::engine_of(&cli.command);
    let explicit = cli.agent.is_some() || cli.kube.pod.is_some() || cli.kube.engine.is_some();
    // A restore that is not a data-directory restore may name a set: every member goes to the
    // agent serving it, so it is planned here from what the agents say.
    if let Command::Restore(args) = cli.command {
        if args.pgdata.is_some() {
            let agent = connect::connect(cli.agent.as_deref(), &cli.kube, engine).await?;
            return commands::restore::run(agent, out, args).await;
        }
        let agents = if explicit {
            vec![connect::connect(cli.agent.as_deref(), &cli.kube, engine).await?]
        } else {
            connect::ready_agents(&cli.kube).await?
        };
        return commands::restore::run_any(agents, out, args).await;
    }
    if !explicit && engine.is_none() {
        // A command any agent could answer, or one that spans engines, with several agents in
        // the namespace: decide from what the agents themselves say.
        let agents = connect::ready_agents(&cli.kube).await?;
        if agents.len() > 1 {
            return match cli.command {
                Command::List(args) if args.failed => commands::list::run_failed(agents, out).await,
                Command::List(_) => commands::list::run_many(agents, out).await,
                // Each agent prunes its own store: the user says which.
                Command::Prune(_) => Err(error::CliError::Usage(format!(
                    "{} agents answer here and each prunes its own store: choose one with --engine or --pod",
                    agents.len()
                ))),
                // One platform set across the agents, committed once every member is complete.
                Command::Backup(args) => {
                    let served = commands::platform::survey(agents).await?;
                    if served.len() == 1 {
                        let agent = served.into_iter().next().expect("one").agent;
                        commands::backup::run(agent, out, args).await
                    } else {
                        commands::platform::backup_all(served, out, args).await
                    }
                }
                command => {
                    let id = commands::backup_id(&command).expect("the other commands name an id");
                    let narrowed = match &command {
                        Command::Describe(a) | Command::Verify(a) => {
                            a.engine.map_or(0, |e| e.to_proto() as i32)
                        }
                        Command::Drill(a) => a.engine.map_or(0, |e| e.to_proto() as i32),
                        _ => 0,
                    };
                    let agent = connect::agent_for_backup(agents, id, narrowed).await?;
                    dispatch(command, agent, out).await
                }
            };
        }
        let agent = agents
            .into_iter()
            .next()
            .expect("ready_agents returns at least one");
        return dispatch(cli.command, agent, out).await;
    }
    let agent = connect::connect(cli.agent.as_deref(), &cli.kube, engine).await?;
    dispatch(cli.command, agent, out).await
}

/// Runs a command against one agent.
async fn dispatch(
    command: Command,
    agent: connect::Agent,
    out: cli::OutputFormat,
) -> Result<(), CliError> {
    match command {
        Command::Backup(args) => commands::backup::run(agent, out, args).await,
        Command::Restore(args) => commands::restore::run(agent, out, args).await,
        Command::List(args) if args.failed => commands::list::run_failed(vec![agent], out).await,
        Command::List(_) => commands::list::run_many(vec![agent], out).await,
        Command::Describe(args) => commands::describe::run(agent, out, args).await,
        Command::Verify(args) => commands::verify::run(agent, out, args).await,
        Command::Delete(args) => commands::delete::run(agent, out, args).await,
        Command::Drill(args) => commands::drill::run(agent, out, args).await,
        Command::Prune(args) => commands::prune::run(agent, out, args).await,
        Command::Status | Command::Completion(_) => {
            unreachable!("handled above")
        }
    }
}
