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
pub(crate) fn server_config(
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    // AES-128-GCM with SHA-256 first, and the server's order decides. Clients (OpenSSL,
    // rustls) list AES-256-GCM with SHA-384 first, whose handshake hashes with SHA-384: a
    // profile of `provisio-bench` put 18% of a bare handshake's server CPU in SHA-512
    // blocks (CPUs accelerate SHA-256, not SHA-512). Both are TLS 1.3's standard suites.
    provider.cipher_suites.sort_by_key(suite_rank);
    let provider = Arc::new(provider);
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("certificate: {e}")))?;
    if certs.is_empty() {
        return Err(ServerError::Tls("the certificate file holds no certificate".into()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| ServerError::Tls(format!("private key: {e}")))?;
    let verifier = Arc::new(AnyClientCert { algorithms: provider.signature_verification_algorithms });
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider.clone() as Arc<CryptoProvider>)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Tls(format!("certificate and key: {e}")))?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.ignore_client_order = true;
    // No session resumption. rustls's default keeps the last 256 sessions and sends every
    // TLS 1.3 client two tickets for them: a fleet's devices connect once each, so under
    // load the cache churns before anyone comes back, and the tickets cost every handshake
    // about a tenth of its server CPU (random ids, cache inserts, two more records;
    // measured with `provisio bench`, BENCHMARKS.md).
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(cfg))
}

/// The server's preference among cipher suites: AES-128-GCM, then AES-256-GCM, then the rest
/// (ChaCha20-Poly1305, for clients without AES).
fn suite_rank(s: &rustls::SupportedCipherSuite) -> u8 {
    use rustls::CipherSuite as C;
    match s.suite() {
        C::TLS13_AES_128_GCM_SHA256
        | C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 0,
        C::TLS13_AES_256_GCM_SHA384
        | C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
        | C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384 => 1,
        _ => 2,
    }
}

/// A TLS connection of the MQTT or AMQP listener, handshake done.
pub(crate) struct Accepted {
    /// The stream.
    pub stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    /// The client's certificate chain, leaf first (DER; empty without one).
    pub chain: Vec<Vec<u8>>,
}

/// Completes the TLS handshake of an accepted TCP connection by `deadline` and takes the
/// client's certificate chain; `None` (logged at debug, as `what`) when it fails or is late.
pub(crate) async fn accept_by(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Handshakes a client that offers `suites` (its order) with the server configuration.
    async fn negotiate(suites: Option<Vec<rustls::SupportedCipherSuite>>) -> rustls::CipherSuite {
        let ca = provisio_pki::generate_ca("suite test CA").unwrap();
        let leaf = provisio_pki::issue_server_cert(&ca, &["localhost".to_owned()]).unwrap();
        let server = server_config(&leaf.cert_pem, &leaf.key_pem, &[]).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap()).unwrap();
        let mut provider = rustls::crypto::aws_lc_rs::default_provider();
        if let Some(s) = suites {
            provider.cipher_suites = s;
        }
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio_rustls::TlsAcceptor::from(server).accept(b);
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, a);
        let (s, c) = tokio::join!(accept, connect);
        let (s, c) = (s.unwrap(), c.unwrap());
        let suite = s.get_ref().1.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(Some(suite), c.get_ref().1.negotiated_cipher_suite().map(|s| s.suite()));
        suite
    }

    #[tokio::test]
    async fn the_server_chooses_aes_128_gcm_and_still_speaks_what_a_client_has() {
        use rustls::crypto::aws_lc_rs::cipher_suite as cs;
        // A default client lists AES-256-GCM-SHA384 first; the server's order decides.
        assert_eq!(negotiate(None).await, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // A client with only AES-256 or only ChaCha20 gets it.
        assert_eq!(
            negotiate(Some(vec![cs::TLS13_AES_256_GCM_SHA384])).await,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        assert_eq!(
            negotiate(Some(vec![cs::TLS13_CHACHA20_POLY1305_SHA256])).await,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
    }
}
