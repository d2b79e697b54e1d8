//! Shared access signature tokens, device and service side.
//!
//! Clients disagree about how to encode `sr` (raw, `%2F`, `%2f`) and sign the text they
//! send, so verification runs over the `sr` exactly as received (`spec/device-api.md`
//! §2.1). Fields may come in any order and `skn` is optional.

use aws_lc_rs::constant_time::verify_slices_are_equal;
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

use crate::{CoreError, keys::hmac_sha256};

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Z a-z 0-9 - . _ ~`.
pub const PY_QUOTE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Longest token accepted; real tokens are under 300 bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// How a token builder encodes `sr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SrEncoding {
    /// Unencoded, as the Node SDK sends it.
    Raw,
    /// Upper-case percent-encoding (`%2F`), as Python, C# and the walkthrough's script do.
    Upper,
    /// Lower-case percent-encoding (`%2f`), as the Azure C SDK does.
    Lower,
}

/// A parsed SAS token. `sr_raw` and `se_raw` are kept byte-for-byte as sent, because
/// that is what the client signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` as it appeared in the token.
    pub sr_raw: String,
    /// `sr` percent-decoded.
    pub sr: String,
    /// The decoded signature bytes.
    pub sig: Vec<u8>,
    /// `se` as it appeared in the token.
    pub se_raw: String,
    /// Expiry, seconds since the Unix epoch.
    pub expiry: u64,
    /// `skn`, percent-decoded, if present.
    pub skn: Option<String>,
}

fn decode_field(v: &str) -> Result<String, CoreError> {
    // `+` stays `+`: base64 signatures contain it and clients send it raw.
    percent_decode_str(v)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| CoreError::MalformedSas("field is not valid UTF-8 after percent-decoding"))
}

impl SasToken {
    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`.
    ///
    /// # Errors
    /// If the scheme, a field or the signature encoding is wrong.
    pub fn parse(token: &str) -> Result<Self, CoreError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(CoreError::MalformedSas("token too long"));
        }
        let token = token.trim();
        let (scheme, rest) =
            token.split_once(' ').ok_or(CoreError::MalformedSas("expected 'SharedAccessSignature sr=…&sig=…&se=…'"))?;
        if !scheme.eq_ignore_ascii_case("SharedAccessSignature") {
            return Err(CoreError::MalformedSas("scheme must be SharedAccessSignature"));
        }
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for pair in rest.trim_start().split('&') {
            let (k, v) = pair.split_once('=').ok_or(CoreError::MalformedSas("field without '='"))?;
            let slot = match k {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                _ => continue, // tolerate extra fields
            };
            if slot.replace(v).is_some() {
                return Err(CoreError::MalformedSas("duplicate field"));
            }
        }
        let sr_raw = sr.ok_or(CoreError::MalformedSas("missing sr"))?;
        let sig_raw = sig.ok_or(CoreError::MalformedSas("missing sig"))?;
        let se_raw = se.ok_or(CoreError::MalformedSas("missing se"))?;
        let expiry =
            se_raw.parse::<u64>().map_err(|_| CoreError::MalformedSas("se is not a whole number of seconds"))?;
        let sig = B64.decode(decode_field(sig_raw)?).map_err(|_| CoreError::MalformedSas("sig is not base64"))?;
        if sig.len() != 32 {
            return Err(CoreError::MalformedSas("sig is not an HMAC-SHA256"));
        }
        Ok(Self {
            sr: decode_field(sr_raw)?,
            sr_raw: sr_raw.to_owned(),
            sig,
            se_raw: se_raw.to_owned(),
            expiry,
            skn: skn.map(decode_field).transpose()?,
        })
    }

    /// Whether the token is expired at `now` (Unix seconds), allowing `skew` seconds.
    #[must_use]
    pub fn is_expired(&self, now: u64, skew: u64) -> bool {
        self.expiry.saturating_add(skew) <= now
    }

    /// Whether the signature was made with `key` (raw key bytes).
    ///
    /// Tries `sr` as sent, then its canonical upper- and lower-case encodings (some
    /// clients sign a different encoding from the one they send). Each comparison is
    /// constant-time. The search stops at the first encoding that matches: which encoding
    /// a client signs is no secret, and a forged signature still costs every attempt.
    #[must_use]
    pub fn signed_with(&self, key: &[u8]) -> bool {
        let matches = |sr: &str| {
            let expected = hmac_sha256(key, string_to_sign(sr, &self.se_raw).as_bytes());
            verify_slices_are_equal(&expected, &self.sig).is_ok()
        };
        if matches(&self.sr_raw) {
            return true;
        }
        let upper = encode_sr(&self.sr, SrEncoding::Upper);
        if upper != self.sr_raw && matches(&upper) {
            return true;
        }
        let lower = encode_sr(&self.sr, SrEncoding::Lower);
        lower != self.sr_raw && lower != upper && matches(&lower)
    }
}

fn string_to_sign(sr: &str, se: &str) -> String {
    format!("{sr}\n{se}")
}

/// Encodes a resource for `sr`.
#[must_use]
pub fn encode_sr(resource: &str, enc: SrEncoding) -> String {
    match enc {
        SrEncoding::Raw => resource.to_owned(),
        SrEncoding::Upper => utf8_percent_encode(resource, PY_QUOTE).to_string(),
        SrEncoding::Lower => {
            let upper = utf8_percent_encode(resource, PY_QUOTE).to_string();
            // Lower-case only the two hex digits after each '%'.
            let mut out = String::with_capacity(upper.len());
            let mut hex_left = 0;
            for c in upper.chars() {
                if c == '%' {
                    hex_left = 2;
                    out.push(c);
                } else if hex_left > 0 {
                    hex_left -= 1;
                    out.push(c.to_ascii_lowercase());
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// Builds a SAS token for `resource`, signed with `key_b64`, valid until `expiry`.
///
/// With [`SrEncoding::Upper`] and `skn`, this is byte-for-byte what the walkthrough's
/// Python script (and the DPS docs' `generate_sas_token`) prints, in the field order
/// `sr, sig, se, skn`.
///
/// # Errors
/// If `key_b64` is not a valid key.
pub fn build_token(
    resource: &str,
    key_b64: &str,
    expiry: u64,
    skn: Option<&str>,
    enc: SrEncoding,
) -> Result<String, CoreError> {
    let key = crate::keys::decode_key(key_b64)?;
    build_token_signed(resource, expiry, skn, enc, |data| Ok::<_, CoreError>(hmac_sha256(&key, data).to_vec()))
}

/// [`build_token`] with the HMAC-SHA256 made by `sign` (a TPM holds the key of a TPM device).
///
/// # Errors
/// Whatever `sign` returns.
pub fn build_token_signed<E>(
    resource: &str,
    expiry: u64,
    skn: Option<&str>,
    enc: SrEncoding,
    sign: impl FnOnce(&[u8]) -> Result<Vec<u8>, E>,
) -> Result<String, E> {
    let sr = encode_sr(resource, enc);
    let se = expiry.to_string();
    let sig = B64.encode(sign(string_to_sign(&sr, &se).as_bytes())?);
    let sig = utf8_percent_encode(&sig, PY_QUOTE);
    let mut token = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}");
    if let Some(skn) = skn {
        token.push_str("&skn=");
        token.push_str(&utf8_percent_encode(skn, PY_QUOTE).to_string());
    }
    Ok(token)
}

/// The resource a device token must name: `{idScope}/registrations/{registrationId}`.
#[must_use]
pub fn device_resource(scope: &str, registration_id: &str) -> String {
    format!("{scope}/registrations/{registration_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "gPD2SOUYSOMXygVZA+pupNvWckqaS3Qnu+BUBbw7TbIZU7y2UZ5ksp4uMJfdV+nTIBayN+fZIZco4tS7oeVR/A==";
    const RES: &str = "0ne00057505/registrations/dps-sym-key-test01";
    const SE: u64 = 1_700_000_000;

    // Expected values computed independently with Python 3:
    //   sr = quote(res, safe="") (or raw, or lower-cased hex)
    //   b64encode(hmac.new(b64decode(KEY), f"{sr}\n{SE}".encode(), sha256).digest())
    const SIG_UPPER: &str = "CLQbuAorFNHf9DJGMSg0F/LkQxFKcBdm2n5UMrN9QAs=";
    const SIG_LOWER: &str = "EgnTzjrovGcgF1K8xzznzF9hCIodLR6Q6IwrQaXNpsk=";
    const SIG_RAW: &str = "j7Gb+jS+9SAEalWvyOxdcxMIkSxphiX6bX3kV3vGGH8=";

    fn key() -> Vec<u8> {
        crate::keys::decode_key(KEY).unwrap()
    }

    #[test]
    fn fixed_vectors_in_three_encodings() {
        for (enc, sr, sig) in [
            (SrEncoding::Upper, "0ne00057505%2Fregistrations%2Fdps-sym-key-test01", SIG_UPPER),
            (SrEncoding::Lower, "0ne00057505%2fregistrations%2fdps-sym-key-test01", SIG_LOWER),
            (SrEncoding::Raw, RES, SIG_RAW),
        ] {
            let t = build_token(RES, KEY, SE, Some("registration"), enc).unwrap();
            let sig_enc = utf8_percent_encode(sig, PY_QUOTE).to_string();
            assert_eq!(t, format!("SharedAccessSignature sr={sr}&sig={sig_enc}&se={SE}&skn=registration"));
            let p = SasToken::parse(&t).unwrap();
            assert_eq!(p.sr, RES);
            assert_eq!(p.sr_raw, sr);
            assert!(p.signed_with(&key()));
        }
    }

    #[test]
    fn any_field_order_and_optional_skn() {
        let sig = utf8_percent_encode(SIG_UPPER, PY_QUOTE);
        let t = format!("SharedAccessSignature se={SE}&sig={sig}&sr=0ne00057505%2Fregistrations%2Fdps-sym-key-test01");
        let p = SasToken::parse(&t).unwrap();
        assert_eq!(p.skn, None);
        assert!(p.signed_with(&key()));
        // Node sends the signature unencoded, with raw `+`, `/` and `=`.
        let t = format!("SharedAccessSignature sr={RES}&sig={SIG_RAW}&skn=registration&se={SE}");
        assert!(SasToken::parse(&t).unwrap().signed_with(&key()));
    }

    #[test]
    fn a_signature_over_another_encoding_than_the_one_sent_is_accepted() {
        for (sent, sig) in [
            (RES.to_owned(), SIG_UPPER),
            (RES.to_owned(), SIG_LOWER),
            (encode_sr(RES, SrEncoding::Upper), SIG_LOWER),
            (encode_sr(RES, SrEncoding::Lower), SIG_UPPER),
        ] {
            let sig = utf8_percent_encode(sig, PY_QUOTE);
            let t = format!("SharedAccessSignature sr={sent}&sig={sig}&se={SE}");
            assert!(SasToken::parse(&t).unwrap().signed_with(&key()), "sent {sent}");
        }
    }

    #[test]
    fn rejects_forgery_and_garbage() {
        let t = build_token(RES, KEY, SE, None, SrEncoding::Upper).unwrap();
        let other = crate::keys::generate_key();
        assert!(!SasToken::parse(&t).unwrap().signed_with(&crate::keys::decode_key(&other).unwrap()));
        // Changing se invalidates the signature.
        let tampered = t.replace(&SE.to_string(), &(SE + 1).to_string());
        assert!(!SasToken::parse(&tampered).unwrap().signed_with(&key()));
        for bad in [
            "",
            "Bearer abc",
            "SharedAccessSignature",
            "SharedAccessSignature sr=a&se=1",
            "SharedAccessSignature sr=a&sig=AAAA&se=1",
            "SharedAccessSignature sr=a&sig=%%%&se=1",
            "SharedAccessSignature sr=a&sig=CLQbuAorFNHf9DJGMSg0F/LkQxFKcBdm2n5UMrN9QAs=&se=soon",
            "SharedAccessSignature sr=a&sr=b&sig=CLQbuAorFNHf9DJGMSg0F/LkQxFKcBdm2n5UMrN9QAs=&se=1",
        ] {
            assert!(SasToken::parse(bad).is_err(), "{bad}");
        }
        assert!(SasToken::parse(&"x".repeat(MAX_TOKEN_LEN + 1)).is_err());
    }

    #[test]
    fn expiry() {
        let p = SasToken::parse(&build_token(RES, KEY, SE, None, SrEncoding::Raw).unwrap()).unwrap();
        assert!(!p.is_expired(SE - 1, 0));
        assert!(p.is_expired(SE, 0));
        assert!(!p.is_expired(SE + 10, 30));
    }
}
