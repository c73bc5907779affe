//! The API's TLS identity (`--tls-cert`, `--tls-key`), checked at start-up: tonic only parses it
//! when the first client connects, so a key of another certificate would otherwise start an agent
//! that fails every handshake and looks healthy.

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// Reads the certificate chain and its key, checks that they belong together, and returns them
/// as tonic's identity.
pub fn load_identity(cert: &Path, key: &Path) -> anyhow::Result<tonic::transport::Identity> {
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
