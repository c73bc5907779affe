//! Throwaway certificates for servers the tests start on 127.0.0.1: a CA (what a client is told
//! to trust) and a serving certificate for `127.0.0.1` and `localhost` signed by it, as a private
//! PKI (cert-manager, kubeadm) issues them.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA and a serving certificate signed by it, in PEM and DER.
#[derive(Debug)]
pub struct ServingCert {
    /// The CA certificate, PEM.
    pub ca_pem: String,
    /// The serving certificate followed by the CA's (the chain a server sends), PEM.
    pub chain_pem: String,
    /// The serving certificate's private key, PKCS#8 PEM.
    pub key_pem: String,
    /// The serving certificate and the CA's, DER, in chain order.
    pub chain_der: Vec<Vec<u8>>,
    /// The serving certificate's private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
}

/// Issues a fresh CA and a serving certificate named `common_name`.
pub fn serving_cert(common_name: &str) -> ServingCert {
    let ca_key = KeyPair::generate().expect("generate the CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{common_name}-ca"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::CrlSign,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign the CA");

    let leaf_key = KeyPair::generate().expect("generate the serving key");
    let mut leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("serving certificate parameters");
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca)
        .expect("sign the serving certificate");
    ServingCert {
        ca_pem: ca.pem(),
        chain_pem: format!("{}{}", leaf.pem(), ca.pem()),
        key_pem: leaf_key.serialize_pem(),
        chain_der: vec![leaf.der().to_vec(), ca.der().to_vec()],
        key_der: leaf_key.serialize_der(),
    }
}
