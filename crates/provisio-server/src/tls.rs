//! TLS for every listener: TLS 1.2 and 1.3 only, aws-lc-rs, a client certificate
//! requested but not required.

use std::sync::Arc;

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};

use crate::ServerError;

/// Accepts any client certificate at the TLS layer: devices choose their own, and the
/// engine decides per enrollment. The handshake signature is still verified, so a
/// client must hold the key of the certificate it presents.
#[derive(Debug)]
struct AnyClientCert {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Builds the server TLS configuration from PEM material.
///
/// # Errors
/// If the PEM does not hold a certificate chain and a private key rustls accepts.
pub fn server_config(cert_pem: &str, key_pem: &str, alpn: &[&[u8]]) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::invalid(format!("TLS certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ServerError::invalid("TLS certificate file holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| ServerError::invalid(format!("TLS private key: {e}")))?;
    let verifier = Arc::new(AnyClientCert { algorithms: provider.signature_verification_algorithms });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone() as Arc<CryptoProvider>)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServerError::Internal(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::invalid(format!("TLS certificate and key: {e}")))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A TLS connection of the MQTT or AMQP listener, handshake done.
pub struct Accepted {
    /// The stream.
    pub stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    /// The client's certificate chain, leaf first (DER; empty without one).
    pub chain: Vec<Vec<u8>>,
}

/// Completes the TLS handshake of an accepted TCP connection by `deadline` and takes the
/// client's certificate chain; `None` (logged at debug, as `what`) when it fails or is late.
pub async fn accept_by(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    deadline: tokio::time::Instant,
    peer: std::net::SocketAddr,
    what: &str,
) -> Option<Accepted> {
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "{what} TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "{what} TLS handshake timed out");
            return None;
        }
    };
    let chain = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default();
    Some(Accepted { stream, chain })
}
