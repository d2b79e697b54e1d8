//! What a device presents in its TLS handshake, as the engine receives it: DER certificates
//! separated by `SEP`, the device certificate first (the corpus holds real chains). Checks,
//! on arbitrary bytes, that the cap and the reduction of a presented chain
//! (`provisio_pki::x509::Presented`) never panic and keep their promises: more than
//! `MAX_PRESENTED_INTERMEDIATES` are refused; what is kept is a subset of what was sent, in
//! order, each once; an anchor that no name leads to is never reached by a validation; and
//! attestation against groups anchored at each presented certificate does not panic.
#![no_main]

use provisio_core::model::{Attestation, EnrollmentGroup, EnrollmentSettings, PrimarySecondary, X509Attestation};
use provisio_pki::{attest, cache::X509Cache, x509};
use time::OffsetDateTime;

/// Separates the certificates.
const SEP: &[u8] = b"\n--8<--\n";

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
    let certs = split(data);
    let Some((leaf, rest)) = certs.split_first() else { return };
    // Fixed, so that a crash reproduces: 2030-03-17. The corpus's certificates cover it.
    let now = OffsetDateTime::from_unix_timestamp(1_900_000_000).expect("in range");
    match x509::Presented::reduce(leaf, rest) {
        Err(x509::ChainError::TooMany(n)) => {
            assert!(rest.len() > x509::MAX_PRESENTED_INTERMEDIATES && n == rest.len());
        }
        Err(_) => assert!(x509::common_name(leaf).is_err(), "only an unreadable leaf fails otherwise"),
        Ok(p) => {
            assert!(rest.len() <= x509::MAX_PRESENTED_INTERMEDIATES);
            let mut from = 0;
            for kept in &p.intermediates {
                let at = rest[from..].iter().position(|c| c == kept).expect("kept certificates were sent, in order");
                from += at + 1;
            }
            for (i, a) in p.intermediates.iter().enumerate() {
                assert!(!p.intermediates[..i].contains(a), "each kept once");
            }
            for anchor in &certs {
                if !p.may_end_at(anchor) {
                    assert!(x509::verify_chain(leaf, &p.intermediates, anchor, now).is_err());
                }
            }
        }
    }
    let id = x509::common_name(leaf).ok().flatten().unwrap_or_else(|| "device-01".into());
    let group = EnrollmentGroup {
        enrollment_group_id: "group".into(),
        attestation: Attestation::X509(X509Attestation::CaReferences(PrimarySecondary {
            primary: Some("ca".into()),
            secondary: None,
        })),
        settings: EnrollmentSettings { enabled: true, ..Default::default() },
        created: String::new(),
        updated: String::new(),
    };
    let anchors: Vec<attest::Anchor> = certs
        .iter()
        .map(|d| attest::Anchor { label: "anchor".into(), der: Some(d.clone()), usable: Ok(()) })
        .collect();
    let cache = X509Cache::new(4);
    for _ in 0..2 {
        let _ = attest::attest(&id, &certs, None, vec![(group.clone(), anchors.clone())], now, &cache);
    }
});
