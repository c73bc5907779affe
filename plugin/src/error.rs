//! What the user sees when something fails, and the exit code that goes with it.

use tonic::Code;

/// Exit code for a failed operation.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for a usage error (bad arguments, invalid id).
pub const EXIT_USAGE: u8 = 2;

/// A failure, rendered for humans.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {addr}: {detail}")]
    Unreachable {
        /// Address tried.
        addr: String,
        /// Why.
        detail: String,
    },
    /// The agent answered with an error.
    #[error("{message}")]
    Agent {
        /// gRPC code.
        code: Code,
        /// The agent's message.
        message: String,
    },
    /// The connection broke while an operation was running.
    #[error(
        "lost the connection to the agent during the {operation}: {detail}. The operation may have been interrupted; check `kubectl soma list` and the agent's logs"
    )]
    Lost {
        /// Operation name.
        operation: &'static str,
        /// What the transport said.
        detail: String,
    },
    /// The agent answered Unimplemented: it is older than this plugin.
    #[error("this agent (version {version}) does not support {what}; upgrade the agent")]
    Unsupported {
        /// The agent's version, as GetInfo reports it (`unknown` when it does not say).
        version: String,
        /// What was asked, e.g. "listing failures (list --failed)".
        what: String,
    },
    /// Kubernetes configuration, discovery or API errors (the message says what to do).
    #[error("{0}")]
    Kubernetes(String),
    /// Bad command-line input.
    #[error("{0}")]
    Usage(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit code: 2 for usage errors, 1 for failed operations.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Agent {
                code: Code::InvalidArgument,
                ..
            } => EXIT_USAGE,
            _ => EXIT_FAILED,
        }
    }

    /// The message printed on stderr.
    pub fn render(&self) -> String {
        let hint = match self {
            CliError::Unreachable { .. } => Some(
                "check that soma-agent is running and listening on that address (its --listen), or that the port-forward is up",
            ),
            CliError::Agent { code, .. } => match code {
                Code::PermissionDenied => Some("the agent's store credentials were refused"),
                Code::DataLoss => Some("the backup failed its integrity check"),
                _ => None,
            },
            _ => None,
        };
        match hint {
            Some(h) => format!("error: {self}\nhint: {h}"),
            None => format!("error: {self}"),
        }
    }

    /// Classifies a status from a unary call or a stream's end.
    ///
    /// A status the agent sent is decoded from the response and carries no source error; one made
    /// by this client's own transport (connection refused, reset, an HTTP/2 failure) carries the
    /// transport error as its source. That, not the message text, tells "the agent said so" from
    /// "the agent could not be reached".
    pub fn from_status(status: tonic::Status, addr: &str, operation: &'static str) -> Self {
        let message = status.message().to_string();
        let transport = std::error::Error::source(&status).is_some();
        match status.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled if transport => {
                if operation == "request" {
                    CliError::Unreachable {
                        addr: addr.to_string(),
                        detail: message,
                    }
                } else {
                    CliError::Lost {
                        operation,
                        detail: message,
                    }
                }
            }
            code => CliError::Agent { code, message },
        }
    }
}
