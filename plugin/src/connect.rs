//! Reaching an agent. Today: directly at `--agent HOST:PORT`; port-forward through the Kubernetes
//! API comes with discovery.

use std::time::Duration;

use soma_proto::v1::soma_agent_client::SomaAgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::error::CliError;

/// How long to wait for the TCP/HTTP2 connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected client plus the address, for messages.
#[derive(Debug, Clone)]
pub struct Agent {
    /// gRPC client.
    pub client: SomaAgentClient<Channel>,
    /// Where it is, for messages.
    pub addr: String,
}

/// Connects to the agent at `addr` (HOST:PORT).
pub async fn direct(addr: &str) -> Result<Agent, CliError> {
    if addr.contains("://") || !addr.contains(':') {
        return Err(CliError::Usage(format!(
            "--agent {addr:?}: expected HOST:PORT, e.g. 127.0.0.1:50051"
        )));
    }
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| CliError::Usage(format!("--agent {addr:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let channel = endpoint.connect().await.map_err(|e| {
        let mut detail = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail = format!("{detail}: {s}");
            source = s.source();
        }
        CliError::Unreachable {
            addr: addr.to_string(),
            detail,
        }
    })?;
    Ok(Agent {
        client: SomaAgentClient::new(channel),
        addr: addr.to_string(),
    })
}

/// Resolves how to reach the agent from the command line.
pub async fn connect(agent: Option<&str>) -> Result<Agent, CliError> {
    match agent {
        Some(addr) => direct(addr).await,
        None => Err(CliError::Usage(
            "no agent given: pass --agent HOST:PORT (or set SOMA_AGENT)".into(),
        )),
    }
}
