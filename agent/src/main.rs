//! `soma-agent` binary: parse flags, set up logging, run.

use std::io::IsTerminal;

use clap::Parser;
use soma_agent::{
    WalFetchOutcome,
    config::{Command, Config, LogFormat},
};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // aws-sdk-s3 and reqwest pull in different rustls crypto backends; name one so a TLS
    // connection (S3 over https, Qdrant over https) never has to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::parse();
    // restore_command's output lands in the PostgreSQL log: only problems belong there.
    let default_level = match config.command {
        Some(Command::WalFetch(_) | Command::RecoveryEnd(_) | Command::DrillWalFetch(_)) => "warn",
        _ => "info",
    };
    let filter =
        EnvFilter::try_from_env("SOMA_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let result = match &config.command {
        None => soma_agent::run(config.clone()).await,
        Some(Command::RestorePgdata(args)) => soma_agent::restore_pgdata(&config, args).await,
        Some(Command::RecoveryEnd(args)) => soma_agent::recovery_end(args),
        Some(Command::WalFetch(args)) => {
            return match soma_agent::wal_fetch(&config, args).await {
                WalFetchOutcome::Restored => std::process::ExitCode::SUCCESS,
                WalFetchOutcome::NotFound => std::process::ExitCode::from(1),
                WalFetchOutcome::Fatal => std::process::ExitCode::from(255),
            };
        }
        Some(Command::DrillWalFetch(args)) => {
            return match soma_agent::drill_wal_fetch(&args.socket, &args.file, &args.destination)
                .await
            {
                WalFetchOutcome::Restored => std::process::ExitCode::SUCCESS,
                WalFetchOutcome::NotFound => std::process::ExitCode::from(1),
                WalFetchOutcome::Fatal => std::process::ExitCode::from(255),
            };
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soma-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
