//! `kubectl-soma`: drives Soma Backup agents. Parse, run, turn the outcome into an exit code.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = kubectl_soma::cli::Cli::parse();
    match kubectl_soma::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", e.render());
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
