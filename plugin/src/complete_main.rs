//! `kubectl_complete-soma`: kubectl runs it for `kubectl soma <Tab>` with the words after `soma`
//! (the last one being completed) and reads candidates, then `:DIRECTIVE`. It never writes to
//! stderr (kubectl passes that through to the shell) and never reads stdin.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // The workspace links two rustls crypto backends; name one so TLS never has to guess.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let words: Vec<String> = std::env::args().skip(1).collect();
    kubectl_soma::output::print_block(&kubectl_soma::complete::candidates(&words).await);
}
