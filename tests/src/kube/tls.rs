//! The double's serving certificate: a throwaway CA (what a kubeconfig's
//! `certificate-authority-data` carries) and a leaf for `127.0.0.1` and `localhost` signed by it,
//! as kubeadm sets up `kube-apiserver`. TLS matters for fidelity: kubectl (client-go
//! `clientcmd`) sends a kubeconfig user's credentials only over TLS.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

/// What the server needs to accept TLS, and what a client needs to trust it.
pub(crate) struct Tls {
    pub acceptor: TlsAcceptor,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

pub(crate) fn generate() -> Tls {
    let cert = crate::tls::serving_cert("kube-apiserver");
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("rustls supports its default versions")
        .with_no_client_auth()
        .with_single_cert(
            cert.chain_der.into_iter().map(Into::into).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der)),
        )
        .expect("the serving certificate matches its key");
    // Upgrades (port-forward) need HTTP/1.1; the double serves nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_pem: cert.ca_pem,
    }
}
