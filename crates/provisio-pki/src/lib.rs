//! X.509 for Provisio: the instance's local CA and the TLS server certificates it issues
//! ([`generate_ca`], [`issue_server_cert`]), chain validation and proof of possession for
//! X.509 attestation ([`x509`]), and test chains for developers ([`testcerts`]).

pub mod attest;
pub mod cache;
pub mod issue;
pub mod testcerts;
pub mod x509;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// PKI failures.
#[derive(Debug, Error)]
pub enum PkiError {
    /// Certificate generation or parsing failed.
    #[error("certificate error: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A PEM or DER input could not be parsed.
    #[error("invalid certificate: {0}")]
    Parse(String),
    /// A host name cannot appear in a certificate.
    #[error("invalid host name '{0}'")]
    HostName(String),
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertAndKey {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// How long the local CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long issued server certificates are valid.
pub const SERVER_CERT_VALIDITY_DAYS: i64 = 825;

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // Back-date a little so that devices with slightly slow clocks accept it.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days);
}

/// The parameters of a Provisio CA named `common_name` (organisation "Provisio"), allowing
/// `path_len` CAs below it, valid (from an hour ago) for `days`.
pub(crate) fn ca_params(common_name: &str, path_len: u8, days: i64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "Provisio");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, days);
    params
}

/// Generates a self-signed ECDSA P-256 CA for this instance.
///
/// # Errors
/// If key generation fails.
pub fn generate_ca(common_name: &str) -> Result<CertAndKey, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = ca_params(common_name, 0, CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Issues a TLS server certificate for `hostnames` (DNS names or IP addresses) from `ca`.
///
/// The certificate is a leaf (`CA:FALSE`): webpki-based clients refuse a server
/// certificate that is also a CA.
///
/// # Errors
/// If the CA cannot be loaded or a host name is unusable.
pub fn issue_server_cert(ca: &CertAndKey, hostnames: &[String]) -> Result<CertAndKey, PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    for h in hostnames {
        params.subject_alt_names.push(match h.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) if is_dns_name(h) => {
                SanType::DnsName(h.clone().try_into().map_err(|_| PkiError::HostName(h.clone()))?)
            }
            Err(_) => return Err(PkiError::HostName(h.clone())),
        });
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, hostnames.first().map_or("provisio", String::as_str));
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, SERVER_CERT_VALIDITY_DAYS);
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Whether `h` is a syntactically valid DNS host name (LDH labels, at most 253 characters).
#[must_use]
pub fn is_dns_name(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Facts about a certificate that decide whether it can be reused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// DNS and IP subject alternative names, as text.
    pub names: Vec<String>,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Reads the names and expiry of a PEM certificate.
///
/// # Errors
/// If the PEM does not hold a certificate.
pub fn summarize(cert_pem: &str) -> Result<CertSummary, PkiError> {
    use x509_parser::{extensions::GeneralName, pem::parse_x509_pem};
    let (_, pem) = parse_x509_pem(cert_pem.as_bytes()).map_err(|e| PkiError::Parse(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| PkiError::Parse(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push((*d).to_owned()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).map(|a| std::net::IpAddr::from(a).to_string()).ok(),
                        16 => <[u8; 16]>::try_from(*b).map(|a| std::net::IpAddr::from(a).to_string()).ok(),
                        _ => None,
                    };
                    names.extend(ip);
                }
                _ => {}
            }
        }
    }
    Ok(CertSummary { names, not_after: cert.validity().not_after.to_datetime() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_leaf_for_names_and_ips() {
        let ca = generate_ca("Provisio test CA").unwrap();
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned(), "dps.example".to_owned()];
        let leaf = issue_server_cert(&ca, &names).unwrap();
        let s = summarize(&leaf.cert_pem).unwrap();
        assert_eq!(s.names, names);
        assert!(s.not_after > OffsetDateTime::now_utc() + Duration::days(800));
        assert!(issue_server_cert(&ca, &["bad name with spaces".to_owned()]).is_err());
    }
}
