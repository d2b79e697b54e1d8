//! Identifiers with DPS's rules built in.

use std::fmt;

use crate::{CoreError, text::shorten};

/// An ID scope: the tenant selector, first path segment of every device request.
///
/// Treated as an opaque, case-insensitive token of ASCII letters and digits. New
/// instances get `0ne` followed by eight upper-case hex digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdScope(String);

impl IdScope {
    /// Validates a scope given by a client or by configuration.
    ///
    /// # Errors
    /// If it is empty, longer than 64 characters or not alphanumeric.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        let bad = |reason| CoreError::InvalidId { kind: "ID scope", value: shorten(s), reason };
        if s.is_empty() || s.len() > 64 {
            return Err(bad("must be 1 to 64 characters"));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(bad("must contain only letters and digits"));
        }
        Ok(Self(s.to_owned()))
    }

    /// A fresh scope: `0ne` + 8 upper-case hex digits from `random`.
    #[must_use]
    pub fn generate(random: [u8; 4]) -> Self {
        Self(format!("0ne{:02X}{:02X}{:02X}{:02X}", random[0], random[1], random[2], random[3]))
    }

    /// The scope as configured.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Case-insensitive comparison with a scope a client sent.
    #[must_use]
    pub fn matches(&self, other: &str) -> bool {
        self.0.eq_ignore_ascii_case(other)
    }
}

impl fmt::Display for IdScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Validates the shared rules of registration ids and enrollment group ids:
/// 1–`max` characters of `A-Z a-z 0-9 - . _ :`, ending in a letter, digit or `-`.
fn check_dps_id(kind: &'static str, s: &str, max: usize) -> Result<(), CoreError> {
    let bad = |reason| CoreError::InvalidId { kind, value: shorten(s), reason };
    if s.is_empty() {
        return Err(bad("must not be empty"));
    }
    if s.len() > max {
        return Err(bad(if max == 128 { "must be at most 128 characters" } else { "too long" }));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':')) {
        return Err(bad("may contain only letters, digits and - . _ :"));
    }
    if !s.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(bad("must end with a letter, a digit or '-'"));
    }
    Ok(())
}

/// A device's registration id. Case-insensitive: [`RegistrationId::key`] is the lookup
/// key, [`RegistrationId::as_str`] the device's own spelling, which is echoed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationId {
    original: String,
    key: String,
}

impl RegistrationId {
    /// Maximum length (DPS docs).
    pub const MAX_LEN: usize = 128;

    /// Validates a registration id.
    ///
    /// # Errors
    /// If it breaks DPS's rules.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        check_dps_id("registration id", s, Self::MAX_LEN)?;
        Ok(Self { original: s.to_owned(), key: s.to_ascii_lowercase() })
    }

    /// The id as the device or operator spelled it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The case-folded lookup key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

/// An enrollment group id: same rules as a registration id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentGroupId {
    original: String,
    key: String,
}

impl EnrollmentGroupId {
    /// Validates an enrollment group id.
    ///
    /// # Errors
    /// If it breaks DPS's rules.
    pub fn parse(s: &str) -> Result<Self, CoreError> {
        check_dps_id("enrollment group id", s, 128)?;
        Ok(Self { original: s.to_owned(), key: s.to_ascii_lowercase() })
    }

    /// The id as the operator spelled it.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// The case-folded lookup key.
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// An IoT hub device id: at most 128 characters of the IoT Hub device-id alphabet.
///
/// # Errors
/// If `s` is empty, too long or holds a character IoT Hub refuses.
pub fn check_device_id(s: &str) -> Result<(), CoreError> {
    let bad = |reason| CoreError::InvalidId { kind: "device id", value: shorten(s), reason };
    if s.is_empty() || s.len() > 128 {
        return Err(bad("must be 1 to 128 characters"));
    }
    let ok = s.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'+'
                    | b'%'
                    | b'_'
                    | b'#'
                    | b'*'
                    | b'?'
                    | b'!'
                    | b'('
                    | b')'
                    | b','
                    | b'='
                    | b'@'
                    | b'$'
                    | b'\''
                    | b':'
            )
    });
    if ok { Ok(()) } else { Err(bad("contains a character IoT Hub does not allow")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_id_rules() {
        for ok in ["dev1", "a", "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6", "A.b_c:d-", &"x".repeat(128)] {
            assert!(RegistrationId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "dev.", "dev_", "dev:", "has space", "slash/", "ümlaut", &"x".repeat(129)] {
            assert!(RegistrationId::parse(bad).is_err(), "{bad}");
        }
        let id = RegistrationId::parse("MyDevice").unwrap();
        assert_eq!(id.as_str(), "MyDevice");
        assert_eq!(id.key(), "mydevice");
    }

    #[test]
    fn scope_generation_and_matching() {
        let s = IdScope::generate([0xde, 0xad, 0x0b, 0xef]);
        assert_eq!(s.as_str(), "0neDEAD0BEF");
        assert!(s.matches("0nedead0bef"));
        assert!(IdScope::parse("0ne/../x").is_err());
    }
}
