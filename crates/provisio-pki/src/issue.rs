//! Operational certificates issued from a device's PKCS#10 request at registration: the
//! request's checks ([`Csr::parse`]), issuing CAs ([`issuing_ca`]), the certificate
//! ([`issue`]) and the revocation list ([`crl`]).
//!
//! Only the request's subject and public key are used: what the certificate says (its
//! extensions, its validity) is the policy's to decide, so extensions a request asks for are
//! ignored. rcgen's own request reader refuses requests with extensions it does not know; the
//! request is read with x509-parser here instead.

use rcgen::{
    CertificateParams, CertificateRevocationListParams, CrlDistributionPoint, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SerialNumber, SubjectPublicKeyInfo,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use x509_parser::{certification_request::X509CertificationRequest, prelude::FromDer};

use crate::CertAndKey;

/// Why a certificate signing request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CsrError {
    /// Not base64, or not a DER PKCS#10 request.
    #[error("the csr is not a base64 DER PKCS#10 certificate signing request: {0}")]
    Malformed(String),
    /// The request's signature does not verify with its own key.
    #[error("the csr's signature does not verify with the key it carries")]
    BadSignature,
    /// The subject CN is not the registration id.
    #[error("the csr's subject CN '{found}' is not the registration id '{expected}'")]
    WrongCommonName {
        /// CN in the request (empty when it has none).
        found: String,
        /// The registration id.
        expected: String,
    },
    /// The key type or size is not one the policy allows.
    #[error("the csr's key ({found}) is not one the certificate policy allows ({allowed})")]
    KeyNotAllowed {
        /// The request's key.
        found: String,
        /// What the policy allows.
        allowed: String,
    },
}

/// A public key type a certificate policy may allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyType {
    /// ECDSA on P-256.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA with this many bits in its modulus.
    Rsa(u32),
}

impl std::fmt::Display for KeyType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EcdsaP256 => f.write_str("ECDSA P-256"),
            Self::EcdsaP384 => f.write_str("ECDSA P-384"),
            Self::Rsa(bits) => write!(f, "RSA {bits}"),
        }
    }
}

/// The key types a certificate policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedKeys {
    /// ECDSA P-256.
    pub ecdsa_p256: bool,
    /// ECDSA P-384.
    pub ecdsa_p384: bool,
    /// RSA moduli from `.0` to `.1` bits, when allowed.
    pub rsa_bits: Option<(u32, u32)>,
}

impl Default for AllowedKeys {
    /// ECDSA P-256 and P-384, RSA 2048 to 4096 bits.
    fn default() -> Self {
        Self { ecdsa_p256: true, ecdsa_p384: true, rsa_bits: Some((2048, 4096)) }
    }
}

impl AllowedKeys {
    /// Whether `k` is allowed.
    #[must_use]
    pub fn allows(&self, k: KeyType) -> bool {
        match k {
            KeyType::EcdsaP256 => self.ecdsa_p256,
            KeyType::EcdsaP384 => self.ecdsa_p384,
            KeyType::Rsa(bits) => self.rsa_bits.is_some_and(|(lo, hi)| (lo..=hi).contains(&bits)),
        }
    }

    /// The allowed types, as a person reads them.
    #[must_use]
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.ecdsa_p256 {
            parts.push("ECDSA P-256".to_owned());
        }
        if self.ecdsa_p384 {
            parts.push("ECDSA P-384".to_owned());
        }
        if let Some((lo, hi)) = self.rsa_bits {
            parts.push(format!("RSA {lo}-{hi}"));
        }
        if parts.is_empty() { "none".into() } else { parts.join(", ") }
    }
}

/// A checked certificate signing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Csr {
    /// The request's `SubjectPublicKeyInfo`, DER: the key the certificate will carry.
    pub public_key_info: Vec<u8>,
    /// Its key type.
    pub key: KeyType,
}

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_RSA_ENCRYPTION: &str = "1.2.840.113549.1.1.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

impl Csr {
    /// Reads `base64` (DER PKCS#10 without PEM armour, as the device API carries it) and
    /// checks it for `registration_id`: the key is one `allowed` lists, the signature verifies
    /// with it, and the subject CN equals the registration id (compared as registration ids
    /// are, without regard to ASCII case).
    ///
    /// # Errors
    /// The first check that fails.
    pub fn parse(base64: &str, registration_id: &str, allowed: &AllowedKeys) -> Result<Self, CsrError> {
        use base64::Engine as _;
        let der = base64::engine::general_purpose::STANDARD
            .decode(base64.trim())
            .map_err(|e| CsrError::Malformed(format!("not base64 ({e})")))?;
        let (rest, req) = X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed("trailing bytes after the request".into()));
        }
        let info = &req.certification_request_info;
        let spki = &info.subject_pki;
        let key = match spki.algorithm.algorithm.to_id_string().as_str() {
            OID_EC_PUBLIC_KEY => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|o| o.to_id_string())
                    .unwrap_or_default();
                match curve.as_str() {
                    OID_P256 => KeyType::EcdsaP256,
                    OID_P384 => KeyType::EcdsaP384,
                    other => {
                        return Err(CsrError::KeyNotAllowed {
                            found: format!("ECDSA on curve {other}"),
                            allowed: allowed.describe(),
                        });
                    }
                }
            }
            OID_RSA_ENCRYPTION => match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => {
                    KeyType::Rsa(u32::try_from(rsa.key_size()).unwrap_or(u32::MAX))
                }
                _ => return Err(CsrError::Malformed("an RSA key that does not parse".into())),
            },
            other => {
                return Err(CsrError::KeyNotAllowed {
                    found: format!("algorithm {other}"),
                    allowed: allowed.describe(),
                });
            }
        };
        // The key first: a key the verifier cannot use (RSA under 2048 bits) would otherwise be
        // reported as a bad signature.
        if !allowed.allows(key) {
            return Err(CsrError::KeyNotAllowed { found: key.to_string(), allowed: allowed.describe() });
        }
        req.verify_signature().map_err(|_| CsrError::BadSignature)?;
        let cn = info.subject.iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("").to_owned();
        if !cn.eq_ignore_ascii_case(registration_id) {
            return Err(CsrError::WrongCommonName { found: cn, expected: registration_id.to_owned() });
        }
        Ok(Self { public_key_info: spki.raw.to_vec(), key })
    }
}

/// A certificate issued to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its serial number, upper-case hex.
    pub serial: String,
    /// SHA-256 of its DER, upper-case hex.
    pub sha256_thumbprint: String,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// Makes an issuing CA (`CA:TRUE`, path length 0, `keyCertSign` and `cRLSign`) named
/// `common_name` under `parent`, with an ECDSA P-256 key, valid for `days`.
///
/// # Errors
/// If `parent` cannot be loaded or signing fails.
pub fn issuing_ca(parent: &CertAndKey, common_name: &str, days: i64) -> Result<CertAndKey, crate::PkiError> {
    let parent_key = KeyPair::from_pem(&parent.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&parent.cert_pem, parent_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = crate::ca_params(common_name, 0, days);
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, &issuer)?;
    Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Makes a self-signed root for issuing CAs (`CA:TRUE`, path length 1: one issuing CA below
/// it, then devices), ECDSA P-256, valid for ten years.
///
/// # Errors
/// If key generation or signing fails.
pub fn issuing_root(common_name: &str) -> Result<CertAndKey, crate::PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = crate::ca_params(common_name, 1, 3650);
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Checks an operator's CA for import: `cert_pem` is a CA certificate (`CA:TRUE`) that is
/// valid now, `key_pem` is its private key (it signs something the certificate's key
/// verifies), and `chain_pem` (the certificates above it; empty for a root) validates it.
///
/// # Errors
/// With the reason.
pub fn check_ca(cert_pem: &str, key_pem: &str, chain_pem: &str) -> Result<(), crate::PkiError> {
    let bad = |m: &str| crate::PkiError::Parse(m.to_owned());
    let der = crate::x509::decode_pem_chain(cert_pem)
        .map_err(|e| crate::PkiError::Parse(e.to_string()))?
        .into_iter()
        .next()
        .ok_or_else(|| bad("the certificate holds no certificate"))?;
    if !crate::x509::is_ca(&der).map_err(|e| crate::PkiError::Parse(e.to_string()))? {
        return Err(bad("the certificate is not a CA certificate (basic constraints lack CA:TRUE)"));
    }
    let now = OffsetDateTime::now_utc();
    crate::x509::check_validity(&der, now).map_err(|e| crate::PkiError::Parse(e.to_string()))?;
    let key = KeyPair::from_pem(key_pem).map_err(|e| crate::PkiError::Parse(format!("the private key: {e}")))?;
    // The key must be the certificate's: sign a probe certificate and verify it with the CA's key.
    let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| crate::PkiError::Parse(e.to_string()))?;
    let probe_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let probe = CertificateParams::default().signed_by(&probe_key, &issuer)?;
    if !crate::x509::is_or_signed_by_any(probe.der(), std::slice::from_ref(&der)) {
        return Err(bad("the private key is not the certificate's"));
    }
    let chain = crate::x509::decode_pem_chain(chain_pem).map_err(|e| crate::PkiError::Parse(e.to_string()))?;
    if let Some(first) = chain.first()
        && !crate::x509::is_or_signed_by_any(&der, std::slice::from_ref(first))
    {
        return Err(bad("the chain's first certificate did not sign the CA certificate"));
    }
    Ok(())
}

/// A random positive serial number of 128 bits (RFC 5280 allows up to 20 octets; CA/B rules ask
/// for at least 64 bits of randomness).
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    let rng = aws_lc_rs::rand::SystemRandom::new();
    // A failing system RNG is not recoverable; fall back to the clock would weaken serials, so
    // such a failure leaves zeros that the caller's uniqueness check refuses.
    let _ = aws_lc_rs::rand::SecureRandom::fill(&rng, &mut bytes);
    // Positive (top bit clear) and without a leading zero octet (top byte non-zero).
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// Issues the device certificate for `csr`: subject CN `registration_id`, the request's key,
/// extended key usage clientAuth, key usage digitalSignature, a random 128-bit serial,
/// authority and subject key identifiers, valid from an hour ago (clock skew) for `validity`,
/// and a CRL distribution point when `crl_url` is given.
///
/// # Errors
/// If the CA cannot be loaded or signing fails.
pub fn issue(
    ca: &CertAndKey,
    csr: &Csr,
    registration_id: &str,
    validity: Duration,
    crl_url: Option<&str>,
    now: OffsetDateTime,
) -> Result<Issued, crate::PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let public_key = SubjectPublicKeyInfo::from_der(&csr.public_key_info)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, registration_id);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.key_identifier_method = KeyIdMethod::Sha256;
    let serial = random_serial();
    params.serial_number = Some(serial.clone());
    params.not_before = now - Duration::hours(1);
    params.not_after = now + validity;
    if let Some(url) = crl_url {
        params.crl_distribution_points = vec![CrlDistributionPoint { uris: vec![url.to_owned()] }];
    }
    let cert = params.signed_by(&public_key, &issuer)?;
    let der = cert.der().to_vec();
    Ok(Issued {
        sha256_thumbprint: crate::x509::sha256_thumbprint(&der),
        serial: hex_upper(serial.as_ref()),
        der,
        not_after: params.not_after,
    })
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}

/// A revoked certificate, as a CRL lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Serial number, hex (as [`Issued::serial`]).
    pub serial: String,
    /// When it was revoked.
    pub at: OffsetDateTime,
}

/// The CRL of `ca` (DER, signed by it): every certificate of `revoked`, `thisUpdate` now and
/// `nextUpdate` after `next_update`, numbered `number` (which must grow with each CRL).
///
/// # Errors
/// If the CA cannot be loaded, a serial is not hex, or signing fails.
pub fn crl(
    ca: &CertAndKey,
    revoked: &[Revoked],
    number: u64,
    next_update: Duration,
    now: OffsetDateTime,
) -> Result<Vec<u8>, crate::PkiError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let mut revoked_certs = Vec::with_capacity(revoked.len());
    for r in revoked {
        let bytes = (0..r.serial.len())
            .step_by(2)
            .map(|i| r.serial.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| crate::PkiError::Parse(format!("serial '{}' is not hex", r.serial)))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: r.at,
            reason_code: Some(RevocationReason::CessationOfOperation),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + next_update,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.der().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use rcgen::BasicConstraints;

    fn csr_for(cn: &str, alg: &'static rcgen::SignatureAlgorithm) -> (KeyPair, String) {
        let key = KeyPair::generate_for(alg).unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        // An extension the policy ignores (rcgen's own reader would refuse some).
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        (key, base64::engine::general_purpose::STANDARD.encode(der))
    }

    #[test]
    fn a_request_is_checked_for_signature_common_name_and_key() {
        let allowed = AllowedKeys::default();
        let (_, p256) = csr_for("dev-1", &rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(Csr::parse(&p256, "Dev-1", &allowed).unwrap().key, KeyType::EcdsaP256);
        let (_, p384) = csr_for("dev-1", &rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(Csr::parse(&p384, "dev-1", &allowed).unwrap().key, KeyType::EcdsaP384);
        assert!(matches!(Csr::parse(&p256, "dev-2", &allowed), Err(CsrError::WrongCommonName { .. })));
        let only_rsa = AllowedKeys { ecdsa_p256: false, ecdsa_p384: false, rsa_bits: Some((2048, 4096)) };
        assert!(matches!(Csr::parse(&p256, "dev-1", &only_rsa), Err(CsrError::KeyNotAllowed { .. })));
        assert!(matches!(Csr::parse("not base64!", "dev-1", &allowed), Err(CsrError::Malformed(_))));
        assert!(matches!(Csr::parse("AAAA", "dev-1", &allowed), Err(CsrError::Malformed(_))));
        // One byte of the signature changed.
        let mut der = base64::engine::general_purpose::STANDARD.decode(&p256).unwrap();
        if let Some(b) = der.last_mut() {
            *b ^= 1;
        }
        let forged = base64::engine::general_purpose::STANDARD.encode(der);
        assert!(matches!(Csr::parse(&forged, "dev-1", &allowed), Err(CsrError::BadSignature | CsrError::Malformed(_))));
    }

    #[test]
    fn the_issued_certificate_says_what_the_policy_says_and_the_crl_lists_revocations() {
        let root = crate::generate_ca("root").unwrap();
        // The instance root allows no intermediate (pathLen 0); an issuing root for tests here.
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let rk = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let issuing_root = CertAndKey { cert_pem: p.self_signed(&rk).unwrap().pem(), key_pem: rk.serialize_pem() };
        drop(root);
        let ca = issuing_ca(&issuing_root, "Fleet Issuing CA", 365).unwrap();
        let (_, req) = csr_for("dev-9", &rcgen::PKCS_ECDSA_P256_SHA256);
        let csr = Csr::parse(&req, "dev-9", &AllowedKeys::default()).unwrap();
        let now = OffsetDateTime::now_utc();
        let issued = issue(&ca, &csr, "dev-9", Duration::days(30), Some("https://dps.example/crl/fleet"), now).unwrap();
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&issued.der).unwrap();
        assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), "dev-9");
        assert_eq!(cert.public_key().raw, csr.public_key_info.as_slice(), "the request's key");
        assert!(cert.extended_key_usage().unwrap().unwrap().value.client_auth);
        assert!(!cert.extended_key_usage().unwrap().unwrap().value.server_auth, "the request's extensions ignored");
        assert!(cert.key_usage().unwrap().unwrap().value.digital_signature());
        assert!(cert.raw_serial().len() >= 8);
        assert_eq!(issued.serial, hex_upper(cert.raw_serial()));
        assert!(
            cert.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
                .unwrap()
                .is_some()
        );
        assert!(
            cert.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_SUBJECT_KEY_IDENTIFIER)
                .unwrap()
                .is_some()
        );
        assert!(
            cert.get_extension_unique(&x509_parser::oid_registry::OID_X509_EXT_CRL_DISTRIBUTION_POINTS)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            cert.validity().not_after.to_datetime().unix_timestamp(),
            (now + Duration::days(30)).unix_timestamp()
        );
        // The chain validates to the root, as a client-auth leaf.
        let ca_der = crate::x509::decode_cert_text(&ca.cert_pem).unwrap();
        let root_der = crate::x509::decode_cert_text(&issuing_root.cert_pem).unwrap();
        assert_eq!(crate::x509::verify_chain(&issued.der, &[ca_der], &root_der, now).unwrap().intermediates, 1);
        // Two issuances never share a serial.
        let again = issue(&ca, &csr, "dev-9", Duration::days(30), None, now).unwrap();
        assert_ne!(again.serial, issued.serial);
        // The CRL, signed by the CA, lists the revoked serial.
        let der = crl(&ca, &[Revoked { serial: issued.serial.clone(), at: now }], 1, Duration::hours(1), now).unwrap();
        let (_, list) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der).unwrap();
        let serials: Vec<String> = list.iter_revoked_certificates().map(|r| hex_upper(r.raw_serial())).collect();
        assert_eq!(serials, vec![issued.serial]);
        assert!(list.next_update().is_some());
        let ca_der = crate::x509::decode_cert_text(&ca.cert_pem).unwrap();
        let (_, ca_cert) = x509_parser::certificate::X509Certificate::from_der(&ca_der).unwrap();
        assert!(list.verify_signature(ca_cert.public_key()).is_ok());
    }
}
