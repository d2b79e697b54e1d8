//! Certificate parsing and chain checks (`provisio_pki::x509`) and X.509 attestation
//! (`provisio_pki::attest`), on arbitrary bytes.
//!
//! The first byte chooses how the rest is read (its value modulo 3; the corpus uses ASCII
//! digits): `0` one DER certificate; `1` text, as an enrollment or certificate upload
//! gives it (PEM or base64 DER) and as a PEM bundle; `2` DER certificates separated by
//! `SEP`, leaf first and anchor last, as a device chain. Invariants: no panic, and the
//! validated-chain cache answers exactly as a fresh validation.
#![no_main]

use provisio_core::model::{
    Attestation, Enrollment, EnrollmentGroup, EnrollmentSettings, PrimarySecondary, StoredCert, X509Attestation,
};
use provisio_pki::{attest, cache::X509Cache, x509};
use time::OffsetDateTime;

/// Separates the certificates of mode `2`.
const SEP: &[u8] = b"\n--8<--\n";
/// The verification code the proof-of-possession checks expect (the corpus's
/// verification certificate carries it as CN).
const CODE: &str = "07F9332E108C7D24283FB6B8A05284E6B873D43686940ACE";

fn now() -> OffsetDateTime {
    // Fixed, so that a crash reproduces: 2030-03-17. The corpus's certificates cover it.
    OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("in range")
}

/// Everything a single certificate goes through.
fn one(der: &[u8]) {
    let _ = x509::sha256_thumbprint(der);
    let _ = x509::common_name(der);
    let _ = x509::is_ca(der);
    let _ = x509::check_validity(der, now());
    let _ = x509::is_or_signed_by_any(der, &[der.to_vec()]);
    let _ = x509::verify_proof_of_possession(der, der, CODE, now());
    if let Ok(info) = x509::cert_info(der) {
        assert_eq!(info.sha256_thumbprint, x509::sha256_thumbprint(der));
    }
}

/// A device chain (leaf first), attested against an individual enrollment holding the
/// leaf and against a group anchored at each certificate of the chain.
fn chain(certs: &[Vec<u8>]) {
    let Some((leaf, rest)) = certs.split_first() else { return };
    let cache = X509Cache::new(4);
    for anchor in certs {
        let fresh = x509::verify_chain(leaf, rest, anchor, now());
        // The cache answers as a fresh validation would, the first time and from memory.
        for _ in 0..2 {
            assert_eq!(cache.verify_chain(leaf, rest, anchor, now()), fresh);
        }
        let _ = x509::verify_proof_of_possession(anchor, leaf, CODE, now());
    }
    let id = x509::common_name(leaf).ok().flatten().unwrap_or_else(|| "device-01".into());
    let settings = EnrollmentSettings { enabled: true, ..Default::default() };
    let individual = x509::cert_info(leaf).ok().map(|info| Enrollment {
        registration_id: id.clone(),
        device_id: None,
        attestation: Attestation::X509(X509Attestation::ClientCertificates(PrimarySecondary {
            primary: Some(StoredCert { der_base64: String::new(), info }),
            secondary: None,
        })),
        settings: settings.clone(),
        optional_device_information: None,
        created: String::new(),
        updated: String::new(),
    });
    let group = EnrollmentGroup {
        enrollment_group_id: "group".into(),
        attestation: Attestation::X509(X509Attestation::CaReferences(PrimarySecondary {
            primary: Some("ca".into()),
            secondary: None,
        })),
        settings,
        created: String::new(),
        updated: String::new(),
    };
    let anchors = certs
        .iter()
        .enumerate()
        .map(|(i, d)| attest::Anchor {
            label: format!("anchor {i}"),
            der: Some(d.clone()),
            usable: if i % 2 == 0 { Ok(()) } else { Err("not verified".into()) },
        })
        .chain(std::iter::once(attest::Anchor { label: "missing".into(), der: None, usable: Err("absent".into()) }))
        .collect();
    let _ = attest::attest(&id, certs, individual, vec![(group.clone(), anchors)], now(), &cache);
    let _ = attest::attest(&id, certs, None, vec![(group, Vec::new())], now(), &cache);
}

fn split(data: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(i) = rest.windows(SEP.len()).position(|w| w == SEP) {
        out.push(rest[..i].to_vec());
        rest = &rest[i + SEP.len()..];
    }
    out.push(rest.to_vec());
    out
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    match which % 3 {
        0 => {
            one(body);
            chain(&[body.to_vec()]);
        }
        1 => {
            let text = String::from_utf8_lossy(body);
            if let Ok(der) = x509::decode_cert_text(&text) {
                one(&der);
            }
            if let Ok(certs) = x509::decode_pem_chain(&text) {
                for c in &certs {
                    one(c);
                }
                chain(&certs);
            }
        }
        _ => {
            let certs = split(body);
            if certs.len() <= 8 {
                chain(&certs);
            }
        }
    }
});
