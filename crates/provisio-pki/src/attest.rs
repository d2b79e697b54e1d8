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
    if intermediates.len() > x509::MAX_PRESENTED_INTERMEDIATES {
        let e = ChainError::TooMany(intermediates.len());
        return Err(refuse(&public_of(&e), format!("registration '{registration_id}': {e}"), None));
    }
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
    // What the device certificate must be whatever the anchor, said precisely (an anchor that
    // no name leads to would otherwise only be "not the issuer").
    x509::check_leaf(leaf, now)
        .map_err(|e| refuse(&public_of(&e), format!("the device certificate of CN '{cn}': {e}"), Some(info.clone())))?;
    let presented = x509::Presented::reduce(leaf, intermediates)
        .map_err(|e| refuse(&public_of(&e), e.to_string(), Some(info.clone())))?;
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
            // An anchor whose name ends no path is not tried: with many groups, a chain
            // built to exhaust path building costs one validation per plausible anchor only.
            let verified = if presented.may_end_at(der) {
                cache.verify_chain(leaf, &presented.intermediates, der, now)
            } else {
                Err(ChainError::UnknownIssuer { anchor: a.label.clone() })
            };
            match verified {
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
        ChainError::TooMany(_) | ChainError::PathTooLong => format!("Invalid certificate: {e}."),
        ChainError::UnknownIssuer { .. } | ChainError::Malformed(_) | ChainError::Other(_) => {
            "Invalid certificate.".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cache::X509Cache,
        testcerts::{KeyKind, Role, issue},
    };
    use provisio_core::model::{EnrollmentSettings, PrimarySecondary};

    fn der(pem: &str) -> Vec<u8> {
        x509::decode_cert_text(pem).unwrap()
    }

    fn group(id: &str) -> EnrollmentGroup {
        EnrollmentGroup {
            enrollment_group_id: id.into(),
            attestation: Attestation::X509(X509Attestation::CaReferences(PrimarySecondary {
                primary: Some("ca".into()),
                secondary: None,
            })),
            settings: EnrollmentSettings { enabled: true, ..Default::default() },
            created: String::new(),
            updated: String::new(),
        }
    }

    fn anchor(der: Vec<u8>) -> Anchor {
        Anchor { label: "CA certificate 'ca'".into(), der: Some(der), usable: Ok(()) }
    }

    /// Finding 1 of issue #24: a device sent 150 self-made CAs, each named like its
    /// certificate's issuer, and every request searched paths through them to every anchor.
    #[test]
    fn a_chain_longer_than_the_cap_is_refused_before_any_path_is_searched() {
        let root = issue(Role::Root, "Fleet Root", None, KeyKind::EcdsaP256, 2).unwrap();
        let fake = issue(Role::Root, "Fleet Root", None, KeyKind::EcdsaP256, 2).unwrap();
        let dev = issue(Role::Device, "dev-1", Some(&fake), KeyKind::EcdsaP256, 2).unwrap();
        let leaf = der(&dev.cert_pem);
        let junk = der(&fake.cert_pem);
        let now = OffsetDateTime::now_utc();
        let cache = X509Cache::new(16);
        let mut chain = vec![leaf.clone()];
        chain.extend(std::iter::repeat_n(junk.clone(), x509::MAX_PRESENTED_INTERMEDIATES + 1));
        let groups = || vec![(group("g"), vec![anchor(der(&root.cert_pem))])];
        let refusal = attest("dev-1", &chain, None, groups(), now, &cache).unwrap_err();
        assert!(refusal.public.contains("at most 5"), "{}", refusal.public);
        assert!(refusal.detail.contains("6 certificates"), "{}", refusal.detail);
        // Within the cap, the same certificates are tried (and refused: another key).
        chain.truncate(1 + x509::MAX_PRESENTED_INTERMEDIATES);
        let refusal = attest("dev-1", &chain, None, groups(), now, &cache).unwrap_err();
        assert!(!refusal.detail.contains("certificates besides"), "{}", refusal.detail);
    }

    #[test]
    fn only_certificates_that_can_be_on_a_path_are_kept_and_only_anchors_that_can_end_one_are_tried() {
        let root = issue(Role::Root, "Path Root", None, KeyKind::EcdsaP256, 2).unwrap();
        let inter = issue(Role::Intermediate, "Path Inter", Some(&root), KeyKind::EcdsaP256, 2).unwrap();
        let dev = issue(Role::Device, "dev-2", Some(&inter), KeyKind::EcdsaP256, 2).unwrap();
        let stray = issue(Role::Root, "Unrelated CA", None, KeyKind::EcdsaP256, 2).unwrap();
        let other_root = issue(Role::Root, "Other Root", None, KeyKind::EcdsaP256, 2).unwrap();
        let (leaf, i, r, s) = (der(&dev.cert_pem), der(&inter.cert_pem), der(&root.cert_pem), der(&stray.cert_pem));
        // Sent: a stray CA, the intermediate twice, the root; kept: the intermediate once and
        // the root (named as the intermediate's issuer), in the order sent.
        let p = x509::Presented::reduce(&leaf, &[s.clone(), i.clone(), i.clone(), r.clone()]).unwrap();
        assert_eq!(p.intermediates, vec![i.clone(), r.clone()]);
        assert!(p.may_end_at(&r));
        assert!(p.may_end_at(&i), "a group on the intermediate");
        assert!(!p.may_end_at(&s));
        assert!(!p.may_end_at(&der(&other_root.cert_pem)));
        assert!(!p.may_end_at(b"not a certificate"));
        // The stray certificate does not stop the device registering.
        let cache = X509Cache::new(16);
        let now = OffsetDateTime::now_utc();
        let groups =
            vec![(group("other"), vec![anchor(der(&other_root.cert_pem))]), (group("fleet"), vec![anchor(r.clone())])];
        match attest("dev-2", &[leaf.clone(), s, i], None, groups, now, &cache).unwrap() {
            X509Match::Group { group, .. } => assert_eq!(group.enrollment_group_id, "fleet"),
            X509Match::Individual { .. } => panic!("matched an individual enrollment"),
        }
        // A group whose anchor no name leads to is refused as an unknown issuer, untried.
        let groups = vec![(group("other"), vec![anchor(der(&other_root.cert_pem))])];
        let refusal = attest("dev-2", &[leaf], None, groups, now, &cache).unwrap_err();
        assert!(refusal.detail.contains("does not lead to"), "{}", refusal.detail);
    }
}
