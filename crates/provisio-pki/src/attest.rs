//! X.509 attestation: which enrollment a device's certificate chain proves.
//!
//! Order (DPS's): the individual enrollment for the registration id first, matched by
//! certificate thumbprint; otherwise the enrollment group whose anchor is nearest to the
//! device certificate in a valid chain. The registration id must be the leaf's subject CN.

use provisio_core::model::{Attestation, CertInfo, Enrollment, EnrollmentGroup, X509Attestation};
use time::OffsetDateTime;

use crate::x509::{self, ChainError};

/// A trust anchor of a group, resolved by the caller.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// Where it comes from, for messages: `signingCertificates.primary` or a CA
    /// certificate's name.
    pub label: String,
    /// DER of the anchor (absent when a referenced certificate does not exist).
    pub der: Option<Vec<u8>>,
    /// Whether it may anchor chains (a referenced CA certificate must be verified).
    pub usable: Result<(), String>,
}

/// What a chain proved.
#[derive(Debug, Clone)]
pub enum X509Match {
    /// The device's individual enrollment.
    Individual {
        /// The enrollment.
        enrollment: Box<Enrollment>,
        /// The device certificate.
        certificate: CertInfo,
    },
    /// A group.
    Group {
        /// The group.
        group: Box<EnrollmentGroup>,
        /// The device certificate.
        certificate: CertInfo,
        /// The anchor the chain ended at.
        signing_certificate: CertInfo,
    },
}

/// Why a chain was refused: `public` may be shown to the device; `detail` is for the log
/// and the audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Safe to show: says nothing about which ids are enrolled.
    pub public: String,
    /// Everything that was tried and why it failed.
    pub detail: String,
    /// The device certificate, when it could be read.
    pub certificate: Option<CertInfo>,
}

fn refuse(public: &str, detail: String, certificate: Option<CertInfo>) -> Box<Refusal> {
    Box::new(Refusal { public: public.to_owned(), detail, certificate })
}

/// Attests `chain` (leaf first, then what the device sent) for `registration_id`; `cache`
/// answers for chains validated before (see [`crate::cache`]).
///
/// # Errors
/// A boxed [`Refusal`] with the precise reason.
pub fn attest(
    registration_id: &str,
    chain: &[Vec<u8>],
    individual: Option<Enrollment>,
    groups: Vec<(EnrollmentGroup, Vec<Anchor>)>,
    now: OffsetDateTime,
    cache: &crate::cache::X509Cache,
) -> Result<X509Match, Box<Refusal>> {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(refuse(
            "Unauthorized: no client certificate was presented.",
            format!("registration '{registration_id}' presented neither a SAS token nor a client certificate"),
            None,
        ));
    };
    let (info, cn) = cache.describe(leaf).map_err(|e| refuse("Invalid certificate.", e.to_string(), None))?;
    let cn = cn.unwrap_or_default();
    if !cn.eq_ignore_ascii_case(registration_id) {
        return Err(refuse(
            "Invalid certificate: the certificate's subject CN is not the registration id.",
            format!("certificate CN '{cn}' does not match registration id '{registration_id}'"),
            Some(info),
        ));
    }
    if let Some(e) = individual {
        let Attestation::X509(X509Attestation::ClientCertificates(certs)) = &e.attestation else {
            return Err(refuse(
                "Invalid certificate.",
                format!(
                    "individual enrollment '{}' uses {} attestation, not X.509 client certificates",
                    e.registration_id,
                    e.attestation.kind()
                ),
                Some(info),
            ));
        };
        if !certs.iter().any(|c| c.info.sha256_thumbprint.eq_ignore_ascii_case(&info.sha256_thumbprint)) {
            return Err(refuse(
                "Invalid certificate.",
                format!(
                    "certificate (SHA-256 {}) is neither the primary nor the secondary certificate of individual enrollment '{}'",
                    info.sha256_thumbprint, e.registration_id
                ),
                Some(info),
            ));
        }
        x509::check_validity(leaf, now).map_err(|err| refuse(&public_of(&err), err.to_string(), Some(info.clone())))?;
        return Ok(X509Match::Individual { enrollment: Box::new(e), certificate: info });
    }
    if groups.is_empty() {
        return Err(refuse(
            "Invalid certificate.",
            format!("no individual enrollment for CN '{cn}' and no X.509 enrollment group"),
            Some(info),
        ));
    }
    let mut best: Option<(usize, EnrollmentGroup, CertInfo)> = None;
    let mut reasons = Vec::new();
    let mut publics = Vec::new();
    for (group, anchors) in groups {
        for a in anchors {
            let Some(der) = &a.der else {
                reasons.push(format!(
                    "group '{}': {}: {}",
                    group.enrollment_group_id,
                    a.label,
                    a.usable.clone().err().unwrap_or_default()
                ));
                continue;
            };
            match cache.verify_chain(leaf, intermediates, der, now) {
                Ok(m) => {
                    if let Err(why) = &a.usable {
                        reasons.push(format!(
                            "group '{}': the chain reaches {} but {why}",
                            group.enrollment_group_id, a.label
                        ));
                        publics.push(
                            "Invalid certificate: the chain does not reach a verified CA certificate.".to_owned(),
                        );
                        continue;
                    }
                    let closer = best.as_ref().is_none_or(|(n, g, _)| {
                        m.intermediates < *n
                            || (m.intermediates == *n && group.enrollment_group_id < g.enrollment_group_id)
                    });
                    if closer {
                        let anchor_info =
                            cache.cert_info(der).map_err(|e| refuse("Invalid certificate.", e.to_string(), None))?;
                        best = Some((m.intermediates, group.clone(), anchor_info));
                    }
                }
                Err(e) => {
                    if !matches!(e, ChainError::UnknownIssuer { .. }) {
                        publics.push(public_of(&e));
                    }
                    reasons.push(format!("group '{}' ({}): {e}", group.enrollment_group_id, a.label));
                }
            }
        }
    }
    match best {
        Some((_, group, signing)) => {
            Ok(X509Match::Group { group: Box::new(group), certificate: info, signing_certificate: signing })
        }
        None => Err(refuse(
            publics.first().map_or("Invalid certificate.", String::as_str),
            format!("no enrollment accepts the chain of CN '{cn}': {}", reasons.join("; ")),
            Some(info),
        )),
    }
}

/// What a device may be told about a chain failure (facts about its own certificates).
fn public_of(e: &ChainError) -> String {
    match e {
        ChainError::Expired { .. } | ChainError::NotYetValid { .. } => {
            format!("Invalid certificate: {e}.")
        }
        ChainError::LeafIsCa(_) | ChainError::IssuerNotCa | ChainError::KeyUsage(_) | ChainError::BadSignature => {
            format!("Invalid certificate: {e}.")
        }
        ChainError::UnknownIssuer { .. } | ChainError::Malformed(_) | ChainError::Other(_) => {
            "Invalid certificate.".into()
        }
    }
}
