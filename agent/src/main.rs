//! `soma-agent` binary: parse flags, set up logging, run.

use std::io::IsTerminal;

use clap::Parser;
use soma_agent::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // aws-sdk-s3 and reqwest pull in different rustls crypto backends; name one so a TLS
    // connection (S3 over https, Qdrant over https) never has to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = Config::parse();
    let filter = EnvFilter::try_from_env("SOMA_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match soma_agent::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("soma-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
