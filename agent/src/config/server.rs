//! Flags of the gRPC server: where it listens and what a client must show to reach it.

use std::{net::SocketAddr, path::PathBuf};

use crate::server::{auth, tls};

/// The API's address, token and TLS.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Server")]
pub struct ServerArgs {
    /// Address of the gRPC server. Inside a pod keep 127.0.0.1: `kubectl soma` reaches it through a
    /// port-forward.
    #[arg(long, env = "SOMA_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// File holding the bearer token every RPC but health must carry (a Secret mounted in the
    /// sidecar): at least 16 printable ASCII characters. Without it the agent listens only on a
    /// loopback address.
    #[arg(long, env = "SOMA_AGENT_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Serve the API over TLS with this certificate chain (PEM), with --tls-key: for an agent
    /// reached over a network rather than through a port-forward, so the token and the replies
    /// cannot be read or altered on the way.
    #[arg(long, env = "SOMA_TLS_CERT", value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "SOMA_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Serve gRPC server reflection (`grpcurl ADDR list`), behind the token like the API. Off by
    /// default: it tells whoever reaches the port every call there is.
    #[arg(long, env = "SOMA_REFLECTION")]
    pub reflection: bool,
}

/// What guards the API, read and checked before anything else starts.
pub struct Security {
    /// The bearer token, when --token-file is given.
    pub token: Option<String>,
    /// The TLS certificate and key, when --tls-cert is given.
    pub tls: Option<tonic::transport::Identity>,
}

// By hand: the token must never reach a log line.
impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl ServerArgs {
    /// Reads the token and the TLS identity and refuses an address beyond loopback that either
    /// is missing for: whether the address is loopback is a rule about a parsed value, which
    /// clap cannot state.
    pub fn security(&self) -> anyhow::Result<Security> {
        let token = self
            .token_file
            .as_deref()
            .map(auth::load_token)
            .transpose()?;
        // clap makes each of --tls-cert and --tls-key require the other.
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(tls::load_identity(cert, key)?),
            _ => None,
        };
        tls::check_exposure(self.listen, token.is_some(), tls.is_some())?;
        Ok(Security { token, tls })
    }
}
