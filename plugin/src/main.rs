//! `kubectl-soma`: drives Soma Backup agents. Parse, run, turn the outcome into an exit code.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // The workspace links two rustls crypto backends; name one so TLS never has to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Cobra's completion entry point, answered before clap so that the words being completed
    // (flags included) are never parsed as this invocation's own flags.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__complete") {
        kubectl_soma::output::print_block(&kubectl_soma::complete::candidates(&args[2..]).await);
        return std::process::ExitCode::SUCCESS;
    }
    let cli = kubectl_soma::cli::Cli::parse();
    match kubectl_soma::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The message may quote the agent, the store or the cluster: shown inert.
            eprintln!(
                "{}",
                kubectl_soma::output::terminal_safe(
                    &e.render(),
                    kubectl_soma::output::Layout::Block
                )
            );
            std::process::ExitCode::from(e.exit_code())
        }
    }
}
