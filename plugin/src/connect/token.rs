//! The bearer token a command sends to an agent: given (`--token-file`, `SOMA_AGENT_TOKEN`) or read
//! from the Secret an agent pod names, and where a token may travel in clear.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
};

use crate::{
    cli::KubeArgs,
    discovery::{self, AgentPod},
    error::CliError,
};

/// Largest token file read.
const MAX_TOKEN_BYTES: u64 = 4096;
/// Environment variable holding the token itself.
const TOKEN_ENV: &str = "SOMA_AGENT_TOKEN";

/// Adds `authorization: Bearer <token>` to every call (marked sensitive, so it is never logged).
#[derive(Clone, Default)]
pub(crate) struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(..)"
        } else {
            "Bearer(none)"
        })
    }
}

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Bearer {
    /// The header for `token`, from `source` (named in errors; the token never is).
    fn new(token: &str, source: &str) -> Result<Self, CliError> {
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(CliError::Usage(format!(
                "the agent token from {source} is empty or holds spaces or non-ASCII characters"
            )));
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            CliError::Usage(format!(
                "the agent token from {source} is not a valid header value"
            ))
        })?;
        value.set_sensitive(true);
        Ok(Self(Some(value)))
    }
}

/// The token given to this command: `--token-file`, else `SOMA_AGENT_TOKEN`.
pub(super) fn given_token(args: &KubeArgs) -> Result<Option<Bearer>, CliError> {
    use std::io::Read;
    if let Some(path) = &args.token_file {
        let mut raw = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_TOKEN_BYTES + 1).read_to_end(&mut raw))
            .map_err(|e| CliError::Usage(format!("--token-file {}: {e}", path.display())))?;
        if raw.len() as u64 > MAX_TOKEN_BYTES {
            return Err(CliError::Usage(format!(
                "--token-file {}: larger than {MAX_TOKEN_BYTES} bytes; it should hold just the token",
                path.display()
            )));
        }
        let text = String::from_utf8(raw)
            .map_err(|_| CliError::Usage(format!("--token-file {}: not text", path.display())))?;
        return Bearer::new(&text, &format!("--token-file {}", path.display())).map(Some);
    }
    match std::env::var(TOKEN_ENV) {
        Ok(token) if !token.trim().is_empty() => Bearer::new(&token, TOKEN_ENV).map(Some),
        _ => Ok(None),
    }
}

/// The token for `pod`: the one given to this command, else the one in the Secret its
/// `soma.dev/token-secret` annotation names (key `token`), else none.
///
/// Whoever can create a pod in the namespace writes that annotation. A Secret is therefore used
/// only when it is labelled as a soma-backup agent token ([`discovery::TOKEN_SECRET_LABELS`]):
/// otherwise a pod posing as an agent could name any Secret the user may read (a database
/// password, a cloud key) and have the plugin send it to the pod as a bearer token.
pub(super) async fn pod_token(
    client: &Client,
    pod: &AgentPod,
    args: &KubeArgs,
) -> Result<Bearer, CliError> {
    if let Some(given) = given_token(args)? {
        return Ok(given);
    }
    let Some(name) = &pod.token_secret else {
        return Ok(Bearer::default());
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &pod.namespace);
    let secret = secrets.get(name).await.map_err(|e| {
        discovery::api_error(e, &pod.namespace, &format!("get secret {name} (the agent token named by pod {}'s soma.dev/token-secret annotation)", pod.name))
    })?;
    let labels = secret.metadata.labels.as_ref();
    let labelled = discovery::TOKEN_SECRET_LABELS
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(*k)).is_some_and(|x| x == v));
    if !labelled {
        let wanted = discovery::TOKEN_SECRET_LABELS
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>();
        return Err(CliError::Kubernetes(format!(
            "pod {}'s soma.dev/token-secret annotation names Secret {}/{name}, which is not labelled as a soma-backup agent token ({}): no token is read from it, since whoever controls a pod could otherwise have any Secret of the namespace sent to it. The chart labels the token Secret it creates; label a Secret you brought yourself (kubectl label secret {name} {}), or give the token with --token-file",
            pod.name,
            pod.namespace,
            wanted.join(", "),
            wanted.join(" ")
        )));
    }
    let source = format!("Secret {}/{name} key \"token\"", pod.namespace);
    let token = secret
        .data
        .as_ref()
        .and_then(|d| d.get("token"))
        .ok_or_else(|| {
            CliError::Kubernetes(format!(
                "{source} is missing (named by pod {}'s soma.dev/token-secret annotation)",
                pod.name
            ))
        })?;
    let text = std::str::from_utf8(&token.0)
        .map_err(|_| CliError::Kubernetes(format!("{source} is not text")))?;
    Bearer::new(text, &source)
}

/// Whether `host` (as `--agent` or a kubeconfig names it) is this machine's loopback, where a
/// token in clear crosses no network.
pub(super) fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_matches(['[', ']']);
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}
