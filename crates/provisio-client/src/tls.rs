//! One TLS client configuration for every transport: the given CA or the system's trust
//! store, TLS 1.2+, and the device certificate for X.509.

use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore, crypto::CryptoProvider};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use rustls_platform_verifier::BuilderVerifierExt;

use crate::{ClientError, Credential, Options};

/// Builds the configuration; `alpn` for HTTPS (`http/1.1`), none for MQTT.
pub fn client_config(opts: &Options, alpn: &[&[u8]]) -> Result<Arc<ClientConfig>, ClientError> {
    if let Some(prebuilt) = &opts.tls {
        let mut cfg = (**prebuilt).clone();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        return Ok(Arc::new(cfg));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone() as Arc<CryptoProvider>)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Config(e.to_string()))?;
    let builder = match &opts.ca_pem {
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let c = c.map_err(|e| ClientError::Config(format!("--ca: {e}")))?;
                roots.add(c).map_err(|e| ClientError::Config(format!("--ca: {e}")))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Config("--ca holds no certificate".into()));
            }
            builder.with_root_certificates(roots)
        }
        None => {
            builder.with_platform_verifier().map_err(|e| ClientError::Config(format!("system trust store: {e}")))?
        }
    };
    let mut cfg = match &opts.credential {
        Credential::X509 { chain_pem, key_pem } => {
            let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ClientError::Config(format!("--cert: {e}")))?;
            if chain.is_empty() {
                return Err(ClientError::Config("--cert holds no certificate".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                .map_err(|e| ClientError::Config(format!("--cert-key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| ClientError::Config(format!("the certificate and key do not go together: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A TLS connection of the client.
pub type Stream = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the endpoint of `opts` for its transport, with Nagle off (requests
/// are small and answered at once); `alpn` as for [`client_config`].
pub async fn connect(opts: &Options, alpn: &[&[u8]]) -> Result<Stream, ClientError> {
    let (host, port) = opts.host_port()?;
    let cfg = client_config(opts, alpn)?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| ClientError::Network(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .map_err(|e| ClientError::Config(format!("bad host name: {e}")))?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| ClientError::Network(format!("TLS with {host}:{port} failed: {e}")))
}
