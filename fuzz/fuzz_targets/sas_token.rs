//! SAS token parsing and verification, on arbitrary text.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(t) = provisio_core::sas::SasToken::parse(s) {
            let _ = t.signed_with(&[7u8; 32]);
            let _ = t.is_expired(0, 0);
        }
    }
});
