//! TPM attestation's parsers on arbitrary bytes: a `TPM2B_PUBLIC` as a device or an operator
//! sends it (`provisio_core::tpm::StorageKey`), and the init of AMQP's SASL mechanism `TPM`.
//!
//! The first byte chooses (its value modulo 2; the corpus uses ASCII digits): `0` the rest is
//! a key: parsed, and when it parses, used as EK and SRK for a blob, which must be the six
//! size-prefixed parts the SDKs read; `1` the rest is a SASL `TPM` init, whose EK then goes
//! the same way. Invariant: no panic.
#![no_main]

use provisio_core::tpm::{StorageKey, authentication_key};
use provisio_server::fuzzing::{tpm_sasl_init, tpm_sasl_segments};

fn key(bytes: &[u8]) {
    let Ok(k) = StorageKey::parse(bytes, "endorsementKey") else { return };
    assert_eq!(k.name().len(), 34);
    let blob = authentication_key(&k, &k, &[0x42; 32]).expect("a parsed key makes a blob");
    let mut rest = blob.as_slice();
    let mut parts = 0;
    while let Some((size, tail)) = rest.split_first_chunk::<2>() {
        rest = &tail[usize::from(u16::from_be_bytes(*size))..];
        parts += 1;
    }
    assert!(rest.is_empty() && parts == 6);
    // Every blob of an RSA key up to 4096 bits fits the SASL challenges.
    tpm_sasl_segments(&blob).expect("fits four challenges");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    if which % 2 == 0 {
        key(body);
    } else if let Ok((_, ek)) = tpm_sasl_init(Some(body)) {
        key(&ek);
    }
});
