//! Parsing device and CA certificates, chain validation against enrollment anchors, and
//! proof-of-possession checks.

use aws_lc_rs::digest;
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use provisio_core::model::CertInfo;
use rustls_pki_types::{CertificateDer, UnixTime};
use thiserror::Error;
use time::OffsetDateTime;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

/// Why a certificate or chain was refused; every variant names the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ChainError {
    /// The bytes are not an X.509 certificate.
    #[error("not a valid X.509 certificate: {0}")]
    Malformed(String),
    /// A certificate is past its validity.
    #[error("certificate '{subject}' expired at {not_after}")]
    Expired {
        /// Subject DN.
        subject: String,
        /// End of validity.
        not_after: String,
    },
    /// A certificate is not valid yet.
    #[error("certificate '{subject}' is not valid before {not_before}")]
    NotYetValid {
        /// Subject DN.
        subject: String,
        /// Start of validity.
        not_before: String,
    },
    /// The chain does not lead to the anchor.
    #[error(
        "the chain does not lead to the CA '{anchor}' (no path from the device certificate through the intermediates it sent)"
    )]
    UnknownIssuer {
        /// The anchor tried.
        anchor: String,
    },
    /// A certificate in the issuer position lacks `CA:TRUE`.
    #[error("a certificate used as an issuer in the chain is not a CA (basic constraints lack CA:TRUE)")]
    IssuerNotCa,
    /// The device certificate is itself a CA.
    #[error("the device certificate '{0}' is a CA certificate (CA:TRUE) and cannot be a device certificate")]
    LeafIsCa(String),
    /// A key usage or extended key usage forbids the use.
    #[error("key usage refused: {0}")]
    KeyUsage(String),
    /// A signature does not verify.
    #[error("a signature in the chain does not verify")]
    BadSignature,
    /// A CA's `pathLenConstraint` allows fewer intermediates below it than the path has.
    #[error("the chain has more intermediate CAs below a CA than its pathLenConstraint allows")]
    PathTooLong,
    /// The device presented more certificates than a path may use.
    #[error(
        "the device presented {0} certificates besides its own; at most {MAX_PRESENTED_INTERMEDIATES} are accepted"
    )]
    TooMany(usize),
    /// Anything else webpki refused.
    #[error("chain refused: {0}")]
    Other(String),
}

/// Reads a certificate given as PEM or as base64 DER (the two forms DPS accepts).
///
/// # Errors
/// If neither form parses to a certificate.
pub fn decode_cert_text(text: &str) -> Result<Vec<u8>, ChainError> {
    let t = text.trim();
    let der = if t.starts_with("-----BEGIN") {
        let (_, pem) =
            x509_parser::pem::parse_x509_pem(t.as_bytes()).map_err(|e| ChainError::Malformed(e.to_string()))?;
        if pem.label != "CERTIFICATE" {
            return Err(ChainError::Malformed(format!("PEM block is '{}', not 'CERTIFICATE'", pem.label)));
        }
        pem.contents
    } else {
        let compact: String = t.chars().filter(|c| !c.is_whitespace()).collect();
        B64.decode(compact).map_err(|_| ChainError::Malformed("neither PEM nor base64 DER".into()))?
    };
    parse(&der)?;
    Ok(der)
}

/// Every certificate of a PEM bundle, in order.
///
/// # Errors
/// If a block is not a certificate.
pub fn decode_pem_chain(pem: &str) -> Result<Vec<Vec<u8>>, ChainError> {
    let mut out = Vec::new();
    for p in x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|e| ChainError::Malformed(e.to_string()))?;
        if p.label == "CERTIFICATE" {
            parse(&p.contents)?;
            out.push(p.contents);
        }
    }
    Ok(out)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, ChainError> {
    match X509Certificate::from_der(der) {
        // x509-parser takes any u32 as the version; X.509 has v1 (0) to v3 (2).
        Ok(([], c)) if c.version().0 > 2 => {
            Err(ChainError::Malformed(format!("unsupported X.509 version field {}", c.version().0)))
        }
        Ok(([], c)) => Ok(c),
        Ok(_) => Err(ChainError::Malformed("trailing bytes after the certificate".into())),
        Err(e) => Err(ChainError::Malformed(e.to_string())),
    }
}

fn hex_upper(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(b.len() * 2);
    for x in b {
        out.push(char::from(DIGITS[usize::from(x >> 4)]));
        out.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    out
}

fn fmt_time(t: OffsetDateTime) -> String {
    provisio_core::timefmt::format(t)
}

/// SHA-256 thumbprint, upper-case hex.
#[must_use]
pub fn sha256_thumbprint(der: &[u8]) -> String {
    hex_upper(digest::digest(&digest::SHA256, der).as_ref())
}

/// The facts DPS reports about a certificate.
///
/// # Errors
/// If `der` is not a certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, ChainError> {
    Ok(info_of(der, &parse(der)?))
}

/// The certificate's description and its subject common name, from one parse (a device's
/// registration needs both).
///
/// # Errors
/// If `der` is not a certificate.
pub fn describe(der: &[u8]) -> Result<(CertInfo, Option<String>), ChainError> {
    let c = parse(der)?;
    Ok((info_of(der, &c), cn_of(&c)))
}

fn cn_of(c: &X509Certificate<'_>) -> Option<String> {
    c.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_owned)
}

fn info_of(der: &[u8], c: &X509Certificate<'_>) -> CertInfo {
    CertInfo {
        subject_name: c.subject().to_string(),
        sha1_thumbprint: hex_upper(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der).as_ref()),
        sha256_thumbprint: sha256_thumbprint(der),
        issuer_name: c.issuer().to_string(),
        not_before_utc: fmt_time(c.validity().not_before.to_datetime()),
        not_after_utc: fmt_time(c.validity().not_after.to_datetime()),
        serial_number: hex_upper(c.raw_serial()),
        version: c.version().0 + 1,
    }
}

/// The subject common name, if any.
///
/// # Errors
/// If `der` is not a certificate.
pub fn common_name(der: &[u8]) -> Result<Option<String>, ChainError> {
    Ok(cn_of(&parse(der)?))
}

/// Whether the certificate says `CA:TRUE`.
///
/// # Errors
/// If `der` is not a certificate.
pub fn is_ca(der: &[u8]) -> Result<bool, ChainError> {
    Ok(parse(der)?.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca))
}

/// Checks the validity period at `now`.
///
/// # Errors
/// [`ChainError::Expired`] or [`ChainError::NotYetValid`].
pub fn check_validity(der: &[u8], now: OffsetDateTime) -> Result<(), ChainError> {
    validity_of(&parse(der)?, now)
}

fn validity_of(c: &X509Certificate<'_>, now: OffsetDateTime) -> Result<(), ChainError> {
    let v = c.validity();
    if now > v.not_after.to_datetime() {
        return Err(ChainError::Expired {
            subject: c.subject().to_string(),
            not_after: fmt_time(v.not_after.to_datetime()),
        });
    }
    if now < v.not_before.to_datetime() {
        return Err(ChainError::NotYetValid {
            subject: c.subject().to_string(),
            not_before: fmt_time(v.not_before.to_datetime()),
        });
    }
    Ok(())
}

fn check_issuer_key_usage(der: &[u8]) -> Result<(), ChainError> {
    issuer_key_usage_of(&parse(der)?)
}

fn issuer_key_usage_of(c: &X509Certificate<'_>) -> Result<(), ChainError> {
    if let Ok(Some(ku)) = c.key_usage()
        && !ku.value.key_cert_sign()
    {
        return Err(ChainError::KeyUsage(format!(
            "CA certificate '{}' has a key usage without keyCertSign",
            c.subject()
        )));
    }
    Ok(())
}

fn map_webpki(e: &webpki::Error, anchor: &X509Certificate<'_>) -> ChainError {
    use webpki::Error as W;
    match e {
        W::UnknownIssuer => ChainError::UnknownIssuer { anchor: anchor.subject().to_string() },
        W::EndEntityUsedAsCa => ChainError::IssuerNotCa,
        W::CertExpired { .. } => ChainError::Other("a certificate in the chain has expired".into()),
        W::CertNotValidYet { .. } => ChainError::Other("a certificate in the chain is not valid yet".into()),
        W::InvalidSignatureForPublicKey => ChainError::BadSignature,
        W::PathLenConstraintViolated => ChainError::PathTooLong,
        W::RequiredEkuNotFoundContext(_) => {
            ChainError::KeyUsage("the extended key usage does not allow TLS client authentication".into())
        }
        other => ChainError::Other(format!("{other:?}")),
    }
}

/// What a device certificate must be whatever the anchor: valid at `now`, not a CA, and
/// with `digitalSignature` when it has a key usage.
///
/// # Errors
/// The first that fails.
pub fn check_leaf(leaf: &[u8], now: OffsetDateTime) -> Result<(), ChainError> {
    leaf_checks(&parse(leaf)?, now)
}

fn leaf_checks(leaf_cert: &X509Certificate<'_>, now: OffsetDateTime) -> Result<(), ChainError> {
    validity_of(leaf_cert, now)?;
    if leaf_cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca) {
        return Err(ChainError::LeafIsCa(leaf_cert.subject().to_string()));
    }
    if let Ok(Some(ku)) = leaf_cert.key_usage()
        && !ku.value.digital_signature()
    {
        return Err(ChainError::KeyUsage("the device certificate's key usage lacks digitalSignature".into()));
    }
    Ok(())
}

/// A chain validated against one anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainMatch {
    /// Number of intermediates between the device certificate and the anchor.
    pub intermediates: usize,
}

/// Validates `leaf` (the device certificate), with the `intermediates` the device sent,
/// against `anchor` (a group's root or intermediate): signatures, validity periods of
/// every certificate including the anchor, basic constraints, key usage (`keyCertSign` on
/// issuers, `digitalSignature` on the leaf when present) and extended key usage
/// (client authentication when present).
///
/// # Errors
/// The first reason the chain fails.
pub fn verify_chain(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchor: &[u8],
    now: OffsetDateTime,
) -> Result<ChainMatch, ChainError> {
    verify_chain_within(leaf, intermediates, anchor, now).map(|(m, _)| m)
}

/// A validity window: the latest start and the earliest end of some certificates.
pub(crate) type Window = (OffsetDateTime, OffsetDateTime);

fn window_of(c: &X509Certificate<'_>) -> Window {
    (c.validity().not_before.to_datetime(), c.validity().not_after.to_datetime())
}

/// [`verify_chain`], and the window in which every certificate given (leaf, anchor and all
/// the intermediates, used in the path or not) is valid.
pub(crate) fn verify_chain_within(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchor: &[u8],
    now: OffsetDateTime,
) -> Result<(ChainMatch, Option<Window>), ChainError> {
    // Each certificate is parsed once here (webpki parses again for its own checks).
    let leaf_cert = parse(leaf)?;
    let anchor_cert = parse(anchor)?;
    let (mut from, mut until) = window_of(&leaf_cert);
    let mut narrow = |(f, u): Window| {
        from = from.max(f);
        until = until.min(u);
    };
    narrow(window_of(&anchor_cert));
    // An unparsable intermediate leaves the window unknown (webpki may still build a path).
    let mut known = true;
    leaf_checks(&leaf_cert, now)?;
    validity_of(&anchor_cert, now)?;
    issuer_key_usage_of(&anchor_cert)?;
    for i in intermediates {
        let Ok(c) = parse(i) else {
            known = false;
            continue;
        };
        narrow(window_of(&c));
        // An expired intermediate is named precisely rather than as a webpki failure.
        if c.subject() == leaf_cert.issuer() {
            validity_of(&c, now)?;
        }
    }
    let window = known.then_some((from, until));
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| ChainError::Malformed(format!("{e:?}")))?;
    let anchor_der = CertificateDer::from(anchor);
    let anchors = [webpki::anchor_from_trusted_cert(&anchor_der).map_err(|e| ChainError::Malformed(format!("{e:?}")))?];
    let inter: Vec<CertificateDer<'_>> = intermediates.iter().map(|d| CertificateDer::from(d.as_slice())).collect();
    let secs = u64::try_from(now.unix_timestamp()).unwrap_or(0);
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs));
    // webpki keeps only a trust anchor's name and key: its own pathLenConstraint (a root
    // that allows no intermediate under it) is checked here (issue #24, finding 9).
    let anchor_path_len = anchor_cert.basic_constraints().ok().flatten().and_then(|b| b.value.path_len_constraint);
    let key_usage_ok = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
        if let Some(max) = anchor_path_len
            && path.intermediate_certificates().count() > max as usize
        {
            return Err(webpki::Error::PathLenConstraintViolated);
        }
        for c in path.intermediate_certificates() {
            if check_issuer_key_usage(c.der().as_ref()).is_err() {
                return Err(webpki::Error::UnsupportedCertVersion); // marker, mapped below
            }
        }
        Ok(())
    };
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &inter,
            time,
            webpki::KeyUsage::client_auth(),
            None,
            Some(&key_usage_ok),
        )
        .map_err(|e| {
            if e == webpki::Error::UnsupportedCertVersion {
                ChainError::KeyUsage("an intermediate CA's key usage lacks keyCertSign".into())
            } else {
                map_webpki(&e, &anchor_cert)
            }
        })?;
    Ok((ChainMatch { intermediates: path.intermediate_certificates().count() }, window))
}

/// The most certificates a device may present besides its own. Chains in the field carry one
/// to three intermediates (and sometimes the root); each extra certificate multiplies the
/// paths a validation may try, so a longer chain is refused before anything is parsed.
pub const MAX_PRESENTED_INTERMEDIATES: usize = 5;

/// What a device presented, reduced to what can matter: the certificates that can be on a
/// path from the device certificate by name (each one's subject is the issuer of the device
/// certificate or of another kept one, exact DER names as path building compares them), once
/// each, in the order sent; and the issuer names along those paths, the only names an anchor
/// can have to end one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// Certificates that can be on a path, in the order sent.
    pub intermediates: Vec<Vec<u8>>,
    issuer_names: Vec<Vec<u8>>,
}

impl Presented {
    /// Reduces `intermediates` for `leaf` (see [`Presented`]); unparsable certificates are
    /// dropped (path building would skip them too).
    ///
    /// # Errors
    /// If `leaf` is not a certificate, or more than [`MAX_PRESENTED_INTERMEDIATES`] were sent.
    pub fn reduce(leaf: &[u8], intermediates: &[Vec<u8>]) -> Result<Self, ChainError> {
        if intermediates.len() > MAX_PRESENTED_INTERMEDIATES {
            return Err(ChainError::TooMany(intermediates.len()));
        }
        let leaf = parse(leaf)?;
        let mut issuer_names = vec![leaf.issuer().as_raw().to_vec()];
        let mut candidates: Vec<(&Vec<u8>, Vec<u8>, Vec<u8>)> = Vec::new();
        for der in intermediates {
            if candidates.iter().any(|(d, _, _)| *d == der) {
                continue;
            }
            if let Ok(c) = parse(der) {
                candidates.push((der, c.subject().as_raw().to_vec(), c.issuer().as_raw().to_vec()));
            }
        }
        let mut kept = vec![false; candidates.len()];
        // At most one pass per certificate: each pass keeps at least one more or stops.
        loop {
            let mut grew = false;
            for (i, (_, subject, issuer)) in candidates.iter().enumerate() {
                if !kept[i] && issuer_names.contains(subject) {
                    kept[i] = true;
                    grew = true;
                    if !issuer_names.contains(issuer) {
                        issuer_names.push(issuer.clone());
                    }
                }
            }
            if !grew {
                break;
            }
        }
        let intermediates =
            candidates.into_iter().zip(kept).filter(|(_, k)| *k).map(|((der, _, _), _)| der.clone()).collect();
        Ok(Self { intermediates, issuer_names })
    }

    /// Whether `anchor` can end a path: its subject is one of the issuer names. When not,
    /// no validation is needed to know the chain does not lead to it.
    #[must_use]
    pub fn may_end_at(&self, anchor: &[u8]) -> bool {
        parse(anchor).is_ok_and(|a| self.issuer_names.iter().any(|n| n.as_slice() == a.subject().as_raw()))
    }
}

/// Whether `cert` is one of `cas` (same DER) or carries a valid signature by one of them.
#[must_use]
pub fn is_or_signed_by_any(cert: &[u8], cas: &[Vec<u8>]) -> bool {
    let Ok(c) = parse(cert) else { return false };
    cas.iter().any(|ca| {
        ca.as_slice() == cert
            || parse(ca).is_ok_and(|ca| c.issuer() == ca.subject() && c.verify_signature(Some(ca.public_key())).is_ok())
    })
}

/// Why a verification certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PopError {
    /// Not a certificate.
    #[error("{0}")]
    Chain(#[from] ChainError),
    /// The CN is not the outstanding code.
    #[error("the verification certificate's subject CN '{found}' is not the verification code")]
    WrongCode {
        /// CN found.
        found: String,
    },
    /// Not signed by the CA's key.
    #[error("the verification certificate is not signed by the private key of '{ca}'")]
    WrongSigner {
        /// The CA's subject.
        ca: String,
    },
}

/// Proof of possession: `verification` must have CN = `code`, be currently valid, and be
/// signed by the key of `ca`.
///
/// # Errors
/// With the reason.
pub fn verify_proof_of_possession(
    ca: &[u8],
    verification: &[u8],
    code: &str,
    now: OffsetDateTime,
) -> Result<(), PopError> {
    let ca_cert = parse(ca)?;
    let v = parse(verification)?;
    let cn = v.subject().iter_common_name().next().and_then(|c| c.as_str().ok()).unwrap_or("").to_owned();
    if aws_lc_rs::constant_time::verify_slices_are_equal(
        cn.to_ascii_uppercase().as_bytes(),
        code.to_ascii_uppercase().as_bytes(),
    )
    .is_err()
    {
        return Err(PopError::WrongCode { found: cn });
    }
    check_validity(verification, now)?;
    v.verify_signature(Some(ca_cert.public_key()))
        .map_err(|_| PopError::WrongSigner { ca: ca_cert.subject().to_string() })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcerts::{KeyKind, Role, issue};

    #[test]
    fn describe_agrees_with_cert_info_and_common_name() {
        let root = issue(Role::Root, "root", None, KeyKind::EcdsaP256, 1).unwrap();
        let dev = issue(Role::Device, "Device-01", Some(&root), KeyKind::EcdsaP256, 1).unwrap();
        let der = decode_pem_chain(&dev.cert_pem).unwrap().remove(0);
        let (info, cn) = describe(&der).unwrap();
        assert_eq!(info, cert_info(&der).unwrap());
        assert_eq!(cn, common_name(&der).unwrap());
        assert_eq!(cn.as_deref(), Some("Device-01"));
        // Thumbprints as DPS shows them: upper-case hex of the digest.
        assert_eq!(info.sha256_thumbprint.len(), 64);
        assert!(info.sha256_thumbprint.chars().all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c)));
        assert_eq!(hex_upper(&[0x00, 0x0f, 0xa5, 0xff]), "000FA5FF");
        assert!(describe(b"not a certificate").is_err());
    }

    /// Found while writing the `certificate` fuzz target (and reproduced through it; the
    /// input is `fuzz/corpus/certificate/der-version-ffffffff`): a version field beyond v3,
    /// which x509-parser accepts as any u32, made `cert_info` overflow computing the
    /// version number (a panic in debug builds, version 0 in release).
    #[test]
    fn a_version_beyond_v3_is_refused_not_overflowed() {
        let root = issue(Role::Root, "root", None, KeyKind::EcdsaP256, 1).unwrap();
        let der = decode_pem_chain(&root.cert_pem).unwrap().remove(0);
        assert_eq!(cert_info(&der).unwrap().version, 3);
        // `[0] { INTEGER 2 }` becomes `[0] { INTEGER 0xFFFFFFFF }`: four more bytes, in
        // the certificate's and the TBS's (two-byte) lengths too.
        let at = der.windows(5).position(|w| w == [0xA0, 0x03, 0x02, 0x01, 0x02]).unwrap();
        assert_eq!((der[1], der[5]), (0x82, 0x82));
        let mut bad = der[..at].to_vec();
        bad.extend([0xA0, 0x07, 0x02, 0x05, 0x00, 0xFF, 0xFF, 0xFF, 0xFF]);
        bad.extend(&der[at + 5..]);
        for len_at in [2, 6] {
            let n = u16::from_be_bytes([bad[len_at], bad[len_at + 1]]) + 4;
            bad[len_at..len_at + 2].copy_from_slice(&n.to_be_bytes());
        }
        assert!(matches!(cert_info(&bad), Err(ChainError::Malformed(_))));
        assert!(matches!(is_ca(&bad), Err(ChainError::Malformed(_))));
        let b64 = base64::Engine::encode(&B64, &bad);
        assert!(decode_cert_text(&b64).is_err());
    }
}
