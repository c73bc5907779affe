//! `kubectl-soma`: drives Soma Backup agents. Parse, run, turn the outcome into an exit code.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The workspace links two rustls crypto backends; name one so TLS never has to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = kubectl_soma::cli::Cli::parse();
    match kubectl_soma::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", e.render());
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
