//! Test certificate chains, as the walkthrough's `create_test_cert` tool makes them:
//! roots, intermediates, device certificates and proof-of-possession certificates.
//! **For testing only**: keys are written unencrypted.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, RsaKeySize,
};
use time::{Duration, OffsetDateTime};

use crate::{CertAndKey, PkiError};

/// Key algorithm of generated certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyKind {
    /// ECDSA P-256 with SHA-256 (default).
    #[default]
    EcdsaP256,
    /// RSA-2048 with SHA-256.
    Rsa2048,
}

/// What a test certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Self-signed root CA.
    Root,
    /// Intermediate CA.
    Intermediate,
    /// Device (leaf, client authentication); CN = registration id.
    Device,
    /// Proof-of-possession certificate (leaf, CN = verification code).
    Verification,
}

fn key(kind: KeyKind) -> Result<KeyPair, PkiError> {
    Ok(match kind {
        KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        KeyKind::Rsa2048 => KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048)?,
    })
}

/// Issues a test certificate with common name `cn`, valid for `days` (starting an hour
/// ago), signed by `issuer` (self-signed when `None`, which only a root may be).
///
/// # Errors
/// If key generation or signing fails, or a non-root has no issuer.
pub fn issue(
    role: Role,
    cn: &str,
    issuer: Option<&CertAndKey>,
    kind: KeyKind,
    days: i64,
) -> Result<CertAndKey, PkiError> {
    let now = OffsetDateTime::now_utc();
    issue_valid(role, cn, issuer, kind, now - Duration::hours(1), now + Duration::days(days))
}

/// Like [`issue`], with an explicit validity period (tests make expired certificates).
///
/// # Errors
/// If key generation or signing fails, or a non-root has no issuer.
pub fn issue_valid(
    role: Role,
    cn: &str,
    issuer: Option<&CertAndKey>,
    kind: KeyKind,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertAndKey, PkiError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.not_before = not_before;
    params.not_after = not_after;
    match role {
        Role::Root | Role::Intermediate => {
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages =
                vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        }
        Role::Device => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Role::Verification => {
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        }
    }
    params.use_authority_key_identifier_extension = issuer.is_some();
    let key = key(kind)?;
    let cert = match issuer {
        None if role == Role::Root => params.self_signed(&key)?,
        None => return Err(PkiError::Parse("this certificate needs an issuer (--ca)".into())),
        Some(i) => {
            let ikey = KeyPair::from_pem(&i.key_pem)?;
            let issuer = Issuer::from_ca_cert_pem(&i.cert_pem, ikey)?;
            params.signed_by(&key, &issuer)?
        }
    };
    Ok(CertAndKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x509::{ChainError, common_name, decode_pem_chain, verify_chain, verify_proof_of_possession};

    fn der(c: &CertAndKey) -> Vec<u8> {
        decode_pem_chain(&c.cert_pem).unwrap().remove(0)
    }

    /// Finding 9 of issue #24: a group root with `pathLen:0` accepted a device under an
    /// intermediate (webpki keeps only an anchor's name and key).
    #[test]
    fn an_anchors_path_length_constraint_is_kept() {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "strict root");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = key(KeyKind::EcdsaP256).unwrap();
        let root = CertAndKey { cert_pem: params.self_signed(&key).unwrap().pem(), key_pem: key.serialize_pem() };
        let inter = issue(Role::Intermediate, "inter", Some(&root), KeyKind::EcdsaP256, 30).unwrap();
        let under_inter = issue(Role::Device, "device-02", Some(&inter), KeyKind::EcdsaP256, 30).unwrap();
        let direct = issue(Role::Device, "device-03", Some(&root), KeyKind::EcdsaP256, 30).unwrap();
        assert_eq!(verify_chain(&der(&under_inter), &[der(&inter)], &der(&root), now), Err(ChainError::PathTooLong));
        // The intermediate as the anchor, and a device straight under the root, are fine.
        assert_eq!(verify_chain(&der(&under_inter), &[], &der(&inter), now).unwrap().intermediates, 0);
        assert_eq!(verify_chain(&der(&direct), &[], &der(&root), now).unwrap().intermediates, 0);
    }

    #[test]
    fn chains_validate_and_fail_for_the_right_reasons() {
        let now = OffsetDateTime::now_utc();
        for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
            let root = issue(Role::Root, "root", None, kind, 30).unwrap();
            let inter = issue(Role::Intermediate, "inter", Some(&root), kind, 30).unwrap();
            let dev = issue(Role::Device, "device-01", Some(&inter), kind, 30).unwrap();
            assert_eq!(common_name(&der(&dev)).unwrap().as_deref(), Some("device-01"));
            // Root anchor: needs the intermediate.
            assert_eq!(verify_chain(&der(&dev), &[der(&inter)], &der(&root), now).unwrap().intermediates, 1);
            assert!(matches!(verify_chain(&der(&dev), &[], &der(&root), now), Err(ChainError::UnknownIssuer { .. })));
            // Intermediate anchor.
            assert_eq!(verify_chain(&der(&dev), &[], &der(&inter), now).unwrap().intermediates, 0);
            // Unknown CA.
            let other = issue(Role::Root, "other", None, kind, 30).unwrap();
            assert!(matches!(
                verify_chain(&der(&dev), &[der(&inter)], &der(&other), now),
                Err(ChainError::UnknownIssuer { .. })
            ));
            // Expired leaf (checked a year from now).
            let later = now + Duration::days(365);
            assert!(matches!(
                verify_chain(&der(&dev), &[der(&inter)], &der(&root), later),
                Err(ChainError::Expired { .. })
            ));
            // A CA posing as a device.
            assert!(matches!(verify_chain(&der(&inter), &[], &der(&root), now), Err(ChainError::LeafIsCa(_))));
            // An "intermediate" that is not a CA.
            let fake = issue(Role::Device, "not-a-ca", Some(&root), kind, 30).unwrap();
            let dev2 = issue(Role::Device, "device-02", Some(&fake), kind, 30);
            // rcgen refuses nothing here; webpki must.
            let dev2 = dev2.unwrap();
            assert_eq!(verify_chain(&der(&dev2), &[der(&fake)], &der(&root), now), Err(ChainError::IssuerNotCa));
            // Proof of possession.
            let ver =
                issue(Role::Verification, "07F9332E108C7D24283FB6B8A05284E6B873D43686940ACE", Some(&root), kind, 1)
                    .unwrap();
            verify_proof_of_possession(
                &der(&root),
                &der(&ver),
                "07F9332E108C7D24283FB6B8A05284E6B873D43686940ACE",
                now,
            )
            .unwrap();
            assert!(verify_proof_of_possession(&der(&root), &der(&ver), "OTHERCODE", now).is_err());
            let wrong =
                issue(Role::Verification, "07F9332E108C7D24283FB6B8A05284E6B873D43686940ACE", Some(&other), kind, 1)
                    .unwrap();
            assert!(matches!(
                verify_proof_of_possession(
                    &der(&root),
                    &der(&wrong),
                    "07F9332E108C7D24283FB6B8A05284E6B873D43686940ACE",
                    now
                ),
                Err(crate::x509::PopError::WrongSigner { .. })
            ));
        }
    }
}
