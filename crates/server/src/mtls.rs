//! Client-certificate subject pinning. The CA check alone admits every certificate the CA ever issued; XKS
//! (and the gRPC frontend) want only named clients, refused during the handshake, not after it.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// Wraps a CA-based verifier and additionally requires the leaf's SAN dNSName or subject CN to be one of the
/// allowed names (exact, case-insensitive). An empty list allows any certificate the CA verifies.
#[derive(Debug)]
pub struct SubjectVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl SubjectVerifier {
    pub fn wrap(inner: Arc<dyn ClientCertVerifier>, allowed: Vec<String>) -> Arc<dyn ClientCertVerifier> {
        if allowed.is_empty() {
            return inner;
        }
        let allowed = allowed.into_iter().map(|s| s.to_ascii_lowercase()).collect();
        Arc::new(SubjectVerifier { inner, allowed })
    }
}

/// The identities a certificate claims: its SAN dNSNames, then its subject CNs.
pub fn certificate_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_owned());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            names.push(s.to_owned());
        }
    }
    names
}

impl ClientCertVerifier for SubjectVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let names = certificate_names(end_entity);
        if names.iter().any(|n| self.allowed.contains(&n.to_ascii_lowercase())) {
            Ok(verified)
        } else {
            tracing::info!(presented = ?names, "client certificate subject is not allowed");
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
