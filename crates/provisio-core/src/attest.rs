//! Attestation: deciding which enrollment, if any, a device's credential proves.
//!
//! The engine loads the candidates (the individual enrollment for the registration id,
//! then the groups) and these functions decide; nothing here does I/O. Every refusal
//! carries a precise reason for the server log; what the device is told is decided at
//! the edge, so that an unknown device and a forged token look the same to a caller.

use thiserror::Error;

use crate::{
    keys,
    model::{Attestation, Enrollment, EnrollmentGroup},
    sas::{SasToken, device_resource},
};

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AttestError {
    /// The token names another resource than the request.
    #[error("SAS token is for resource '{token}' but the request is for '{expected}'")]
    WrongResource {
        /// Decoded `sr` of the token.
        token: String,
        /// The resource of the request.
        expected: String,
    },
    /// `skn` is present and is not `registration`.
    #[error("SAS token key name '{0}' is not 'registration'")]
    WrongKeyName(String),
    /// The token is expired.
    #[error("SAS token expired at {expiry} (now {now})")]
    Expired {
        /// `se` of the token.
        expiry: u64,
        /// Server time.
        now: u64,
    },
    /// No enrollment or group exists for this device.
    #[error("no individual enrollment for '{0}' and no symmetric-key group whose derived key signed the token")]
    NoEnrollment(String),
    /// The individual enrollment exists but neither of its keys signed the token.
    #[error("SAS signature matches neither the primary nor the secondary key of the individual enrollment '{0}'")]
    KeyMismatch(String),
    /// The individual enrollment uses another attestation type.
    #[error("individual enrollment '{id}' uses {kind} attestation, not a symmetric key")]
    WrongAttestationType {
        /// Enrollment id.
        id: String,
        /// Its attestation type.
        kind: &'static str,
    },
}

/// Checks the parts of a device SAS token that do not need a key: resource, key name
/// and expiry. `skew` is the clock tolerance in seconds.
///
/// # Errors
/// With the precise reason.
pub fn check_device_token(
    token: &SasToken,
    scope: &str,
    registration_id: &str,
    now: u64,
    skew: u64,
) -> Result<(), AttestError> {
    let expected = device_resource(scope, registration_id);
    if !token.sr.eq_ignore_ascii_case(&expected) {
        return Err(AttestError::WrongResource { token: token.sr.clone(), expected });
    }
    if let Some(skn) = &token.skn
        && skn != "registration"
    {
        return Err(AttestError::WrongKeyName(skn.clone()));
    }
    if token.is_expired(now, skew) {
        return Err(AttestError::Expired { expiry: token.expiry, now });
    }
    Ok(())
}

/// Which enrollment a credential proved.
#[derive(Debug, Clone, PartialEq)]
pub enum Matched {
    /// The device's individual enrollment.
    Individual(Enrollment),
    /// An enrollment group.
    Group(EnrollmentGroup),
}

fn signed_by_key(token: &SasToken, key_b64: &str) -> bool {
    // Stored keys were validated on write; a key that no longer decodes matches nothing.
    keys::decode_key(key_b64).is_ok_and(|k| token.signed_with(&k))
}

/// Symmetric-key attestation.
///
/// An individual enrollment for the registration id takes precedence: if it exists,
/// only its primary or secondary key can sign the token, whatever the groups hold.
/// Otherwise each symmetric-key group is tried, in the order given, with the device key
/// derived from its primary and then its secondary key. Group keys themselves never
/// sign device tokens. Disabled enrollments still match (the caller reports `disabled`).
///
/// # Errors
/// If nothing matches.
pub fn symmetric_key(
    token: &SasToken,
    registration_id: &str,
    individual: Option<Enrollment>,
    groups: impl IntoIterator<Item = EnrollmentGroup>,
) -> Result<Matched, AttestError> {
    if let Some(e) = individual {
        let Attestation::SymmetricKey { primary_key, secondary_key } = &e.attestation else {
            return Err(AttestError::WrongAttestationType { id: e.registration_id, kind: e.attestation.kind() });
        };
        if !(signed_by_key(token, primary_key) || signed_by_key(token, secondary_key)) {
            return Err(AttestError::KeyMismatch(e.registration_id));
        }
        return Ok(Matched::Individual(e));
    }
    for g in groups {
        let Attestation::SymmetricKey { primary_key, secondary_key } = &g.attestation else {
            continue;
        };
        let matched = [primary_key, secondary_key].into_iter().any(|gk| {
            keys::decode_key(gk).is_ok_and(|gk| token.signed_with(&keys::derive_device_key_bytes(&gk, registration_id)))
        });
        if matched {
            return Ok(Matched::Group(g));
        }
    }
    Err(AttestError::NoEnrollment(registration_id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::EnrollmentSettings,
        sas::{SrEncoding, build_token},
    };

    const SCOPE: &str = "0ne00000001";

    fn enrollment(id: &str, p: &str, s: &str) -> Enrollment {
        Enrollment {
            registration_id: id.into(),
            device_id: None,
            attestation: Attestation::SymmetricKey { primary_key: p.into(), secondary_key: s.into() },
            settings: EnrollmentSettings { enabled: true, ..Default::default() },
            optional_device_information: None,
            created: String::new(),
            updated: String::new(),
        }
    }

    fn group(id: &str, p: &str, s: &str) -> EnrollmentGroup {
        EnrollmentGroup {
            enrollment_group_id: id.into(),
            attestation: Attestation::SymmetricKey { primary_key: p.into(), secondary_key: s.into() },
            settings: EnrollmentSettings { enabled: true, ..Default::default() },
            created: String::new(),
            updated: String::new(),
        }
    }

    fn token(id: &str, key: &str) -> SasToken {
        SasToken::parse(
            &build_token(&device_resource(SCOPE, id), key, 2_000_000_000, Some("registration"), SrEncoding::Upper)
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn individual_primary_and_secondary() {
        let (p, s) = (keys::generate_key(), keys::generate_key());
        for k in [&p, &s] {
            let m = symmetric_key(&token("d1", k), "d1", Some(enrollment("d1", &p, &s)), []).unwrap();
            assert!(matches!(m, Matched::Individual(_)));
        }
        let other = keys::generate_key();
        assert_eq!(
            symmetric_key(&token("d1", &other), "d1", Some(enrollment("d1", &p, &s)), []),
            Err(AttestError::KeyMismatch("d1".into()))
        );
    }

    #[test]
    fn group_derivation_and_precedence() {
        let (gp, gs) = (keys::generate_key(), keys::generate_key());
        let groups = vec![group("other", &keys::generate_key(), &keys::generate_key()), group("g", &gp, &gs)];
        for gk in [&gp, &gs] {
            let dk = keys::derive_device_key(gk, "dev-7").unwrap();
            match symmetric_key(&token("dev-7", &dk), "dev-7", None, groups.clone()).unwrap() {
                Matched::Group(g) => assert_eq!(g.enrollment_group_id, "g"),
                Matched::Individual(_) => panic!("expected group"),
            }
        }
        // The group key itself is not a device key.
        assert!(matches!(
            symmetric_key(&token("dev-7", &gp), "dev-7", None, groups.clone()),
            Err(AttestError::NoEnrollment(_))
        ));
        // A key derived for another id does not work.
        let dk_other = keys::derive_device_key(&gp, "dev-8").unwrap();
        assert!(symmetric_key(&token("dev-7", &dk_other), "dev-7", None, groups.clone()).is_err());
        // An individual enrollment wins over the group, even when the group key would match.
        let dk = keys::derive_device_key(&gp, "dev-7").unwrap();
        let ind = enrollment("dev-7", &keys::generate_key(), &keys::generate_key());
        assert!(matches!(
            symmetric_key(&token("dev-7", &dk), "dev-7", Some(ind), groups),
            Err(AttestError::KeyMismatch(_))
        ));
    }

    #[test]
    fn token_checks() {
        let k = keys::generate_key();
        let t = token("d1", &k);
        assert!(check_device_token(&t, SCOPE, "d1", 1_000, 0).is_ok());
        assert!(check_device_token(&t, "0NE00000001", "D1", 1_000, 0).is_ok());
        assert!(matches!(check_device_token(&t, SCOPE, "d2", 1_000, 0), Err(AttestError::WrongResource { .. })));
        assert!(matches!(
            check_device_token(&t, "0ne00000002", "d1", 1_000, 0),
            Err(AttestError::WrongResource { .. })
        ));
        assert!(matches!(check_device_token(&t, SCOPE, "d1", 2_000_000_000, 0), Err(AttestError::Expired { .. })));
        let t = SasToken::parse(
            &build_token(&device_resource(SCOPE, "d1"), &k, 2_000_000_000, Some("owner"), SrEncoding::Raw).unwrap(),
        )
        .unwrap();
        assert!(matches!(check_device_token(&t, SCOPE, "d1", 1_000, 0), Err(AttestError::WrongKeyName(_))));
    }
}
