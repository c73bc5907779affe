//! The API's TLS identity (`--tls-cert`, `--tls-key`), checked at start-up: tonic only parses it
//! when the first client connects, so a key of another certificate would otherwise start an agent
//! that fails every handshake and looks healthy.

use std::{net::SocketAddr, path::Path, sync::Arc};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Why the agent refuses to listen where it was told to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExposureError {
    /// Beyond loopback without a token: anyone who reaches the address could call the API.
    #[error(
        "refusing to listen on {listen} without --token-file (SOMA_AGENT_TOKEN_FILE): anyone who reaches that address could delete every backup or restore over the live database. Give the agent a token file and a TLS certificate (--tls-cert/--tls-key), or keep --listen on 127.0.0.1 (kubectl soma reaches it through a port-forward)"
    )]
    NoToken {
        /// The address asked for.
        listen: SocketAddr,
    },
    /// Beyond loopback without TLS: the token every call carries would cross the network in
    /// clear, for anyone on the path to read and replay.
    #[error(
        "refusing to listen on {listen} without TLS: every call carries the API token, which would cross the network in clear for anyone on the path to read and replay. Give the agent --tls-cert and --tls-key (SOMA_TLS_CERT, SOMA_TLS_KEY), or keep --listen on 127.0.0.1 (kubectl soma reaches it through a port-forward)"
    )]
    NoTls {
        /// The address asked for.
        listen: SocketAddr,
    },
}

/// Whether the API may listen on `listen`: a loopback address as it is (only the pod's own
/// containers and port-forwards reach it); any other address only with a token and TLS.
pub(crate) fn check_exposure(
    listen: SocketAddr,
    has_token: bool,
    has_tls: bool,
) -> Result<(), ExposureError> {
    // `::ffff:127.0.0.1` is loopback too.
    if listen.ip().to_canonical().is_loopback() {
        return Ok(());
    }
    if !has_token {
        return Err(ExposureError::NoToken { listen });
    }
    if !has_tls {
        return Err(ExposureError::NoTls { listen });
    }
    Ok(())
}

/// Reads the certificate chain and its key, checks that they belong together, and returns them
/// as tonic's identity.
pub(crate) fn load_identity(cert: &Path, key: &Path) -> anyhow::Result<tonic::transport::Identity> {
    let cert_pem = std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow::anyhow!("--tls-cert {}: not PEM certificates ({e})", cert.display())
        })?;
    if chain.is_empty() {
        anyhow::bail!("--tls-cert {}: no certificate in the file", cert.display());
    }
    // Never echo the key's contents: only what kind of problem it has.
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        anyhow::anyhow!(
            "--tls-key {}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file",
            key.display()
        )
    })?;
    rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| {
            anyhow::anyhow!(
                "--tls-key {} does not fit --tls-cert {} ({e}); give the key the certificate was issued for",
                key.display(),
                cert.display()
            )
        })?;
    Ok(tonic::transport::Identity::from_pem(cert_pem, key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beyond_loopback_the_api_needs_a_token_and_tls() {
        let at = |a: &str| a.parse::<SocketAddr>().unwrap();
        for loopback in [
            "127.0.0.1:50051",
            "127.9.9.9:1",
            "[::1]:50051",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(
                check_exposure(at(loopback), false, false).is_ok(),
                "{loopback}"
            );
        }
        for exposed in [
            "0.0.0.0:50051",
            "[::]:50051",
            "10.0.0.7:50051",
            "[::ffff:10.0.0.7]:1",
        ] {
            assert!(matches!(
                check_exposure(at(exposed), false, true),
                Err(ExposureError::NoToken { .. })
            ));
            let err = check_exposure(at(exposed), true, false).unwrap_err();
            assert!(matches!(err, ExposureError::NoTls { .. }), "{exposed}");
            assert!(err.to_string().contains("--tls-cert"), "{err}");
            assert!(check_exposure(at(exposed), true, true).is_ok(), "{exposed}");
        }
    }
}
