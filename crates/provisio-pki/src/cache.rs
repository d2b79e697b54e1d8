//! Certificate work a device's next registration would repeat: the validation of its chain
//! against an anchor (the signatures are most of an X.509 registration's CPU) and the
//! description of its certificate. Devices often register at every boot, and a fleet comes
//! back all at once after an outage; each would pay the same verification again.
//!
//! A validation is remembered under a SHA-256 of the exact chain and anchor, with the
//! window in which every certificate involved is valid; outside that window, or for any
//! other bytes, the chain is validated in full. A refusal is remembered too, for
//! [`REFUSAL_MEMORY`]: a client that sends the same refused chain again (every request of a
//! connection carries the handshake's chain) costs a lookup, not another search of every path
//! (a chain built for it can cost tens of milliseconds of CPU each time). Whether the
//! anchor may be used (a verified CA, the group enabled, the CN the registration id) is
//! decided outside, at every registration. The TLS handshake proves possession of the
//! device's key on every connection; nothing here replaces it.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use aws_lc_rs::digest::{Context, SHA256};
use provisio_core::model::CertInfo;
use time::OffsetDateTime;

use crate::x509::{self, ChainError, ChainMatch};

/// How long a refused chain stays refused without a new validation. Long enough that a
/// client repeating it gains nothing; short enough that a chain refused for a reason that
/// passes (a certificate not valid yet) is soon tried again. A change of anchor is other
/// bytes, so a group fixed by its operator takes effect at once.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(120);

/// Remembered chain validations, refusals and certificate descriptions, each map bounded.
#[derive(Debug)]
pub struct X509Cache {
    max_entries: usize,
    chains: Mutex<HashMap<[u8; 32], Validated>>,
    /// Refusals, with the time they were decided at.
    refused: Mutex<HashMap<[u8; 32], (ChainError, OffsetDateTime)>>,
    described: Mutex<HashMap<[u8; 32], Described>>,
}

/// A certificate's description and subject CN (see [`x509::describe`]).
type Described = (CertInfo, Option<String>);

#[derive(Debug, Clone)]
struct Validated {
    matched: ChainMatch,
    valid_from: OffsetDateTime,
    valid_until: OffsetDateTime,
}

/// Adds `v` to `map`, which holds at most `max` entries: when full, `map` starts over
/// rather than grow (a flood of distinct chains costs re-validations, never memory).
fn bounded_insert<V>(map: &Mutex<HashMap<[u8; 32], V>>, max: usize, key: [u8; 32], v: V) {
    let mut m = map.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if m.len() >= max {
        m.clear();
    }
    m.insert(key, v);
}

fn digest_of<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    for p in parts {
        // Length-prefixed, so that no two different lists hash the same bytes.
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(ctx.finish().as_ref());
    key
}

impl X509Cache {
    /// An empty cache of at most `max_entries` validations (and as many descriptions);
    /// zero turns it off.
    #[must_use]
    pub fn new(max_entries: usize) -> Self {
        Self {
            max_entries,
            chains: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            described: Mutex::new(HashMap::new()),
        }
    }

    /// [`x509::verify_chain`], answered from memory when these exact bytes were validated
    /// before and every certificate among them is valid at `now`.
    ///
    /// # Errors
    /// The first reason the chain fails, as [`x509::verify_chain`].
    pub fn verify_chain(
        &self,
        leaf: &[u8],
        intermediates: &[Vec<u8>],
        anchor: &[u8],
        now: OffsetDateTime,
    ) -> Result<ChainMatch, ChainError> {
        if self.max_entries == 0 {
            return x509::verify_chain(leaf, intermediates, anchor, now);
        }
        let parts = [b"chain".as_slice(), leaf].into_iter().chain(intermediates.iter().map(Vec::as_slice));
        let key = digest_of(parts.chain(std::iter::once(anchor)));
        if let Some(v) = self.chains.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key)
            && v.valid_from <= now
            && now <= v.valid_until
        {
            return Ok(v.matched.clone());
        }
        if let Some((e, at)) = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key)
            && *at <= now
            && now < *at + REFUSAL_MEMORY
        {
            return Err(e.clone());
        }
        let (matched, window) = match x509::verify_chain_within(leaf, intermediates, anchor, now) {
            Ok(v) => v,
            Err(e) => {
                bounded_insert(&self.refused, self.max_entries, key, (e.clone(), now));
                return Err(e);
            }
        };
        // The window of every certificate given, used in the path or not: narrower than
        // the path's at worst, which only costs a re-validation.
        if let Some((valid_from, valid_until)) = window {
            bounded_insert(
                &self.chains,
                self.max_entries,
                key,
                Validated { matched: matched.clone(), valid_from, valid_until },
            );
        }
        Ok(matched)
    }

    /// [`x509::describe`], from memory for a certificate described before.
    ///
    /// # Errors
    /// If `der` is not a certificate.
    pub fn describe(&self, der: &[u8]) -> Result<(CertInfo, Option<String>), ChainError> {
        if self.max_entries == 0 {
            return x509::describe(der);
        }
        let key = digest_of([b"describe".as_slice(), der]);
        if let Some(d) = self.described.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key) {
            return Ok(d.clone());
        }
        let d = x509::describe(der)?;
        bounded_insert(&self.described, self.max_entries, key, d.clone());
        Ok(d)
    }

    /// [`x509::cert_info`], from memory for a certificate described before.
    ///
    /// # Errors
    /// If `der` is not a certificate.
    pub fn cert_info(&self, der: &[u8]) -> Result<CertInfo, ChainError> {
        self.describe(der).map(|(info, _)| info)
    }

    /// Forgets everything.
    pub fn clear(&self) {
        self.chains.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.described.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }

    #[cfg(test)]
    fn validations(&self) -> usize {
        self.chains.lock().map_or(0, |m| m.len())
    }

    #[cfg(test)]
    fn refusals(&self) -> usize {
        self.refused.lock().map_or(0, |m| m.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcerts::{KeyKind, Role, issue};

    fn der(pem: &str) -> Vec<u8> {
        x509::decode_cert_text(pem).unwrap()
    }

    #[test]
    fn remembers_validations_of_exact_chains_within_their_validity() {
        let root = issue(Role::Root, "cache-root", None, KeyKind::EcdsaP256, 2).unwrap();
        let other_root = issue(Role::Root, "cache-root", None, KeyKind::EcdsaP256, 2).unwrap();
        let dev = issue(Role::Device, "cache-dev", Some(&root), KeyKind::EcdsaP256, 2).unwrap();
        let (leaf, anchor, other) = (der(&dev.cert_pem), der(&root.cert_pem), der(&other_root.cert_pem));
        let now = OffsetDateTime::now_utc();
        let c = X509Cache::new(4);
        assert_eq!(c.verify_chain(&leaf, &[], &anchor, now).unwrap().intermediates, 0);
        assert_eq!(c.validations(), 1);
        assert_eq!(c.verify_chain(&leaf, &[], &anchor, now).unwrap().intermediates, 0, "answered from memory");
        assert_eq!(c.validations(), 1);
        // The same device certificate against another anchor (same name, other key): validated
        // in full, and refused.
        assert!(matches!(
            c.verify_chain(&leaf, &[], &other, now),
            Err(ChainError::BadSignature | ChainError::UnknownIssuer { .. })
        ));
        assert_eq!(c.validations(), 1, "a refusal is not a validation");
        assert_eq!(c.refusals(), 1, "but it is remembered");
        assert_eq!(c.verify_chain(&leaf, &[], &other, now), x509::verify_chain(&leaf, &[], &other, now));
        // A remembered chain is still refused outside its validity.
        let later = now + time::Duration::days(365 * 3);
        assert!(matches!(c.verify_chain(&leaf, &[], &anchor, later), Err(ChainError::Expired { .. })));
        let earlier = now - time::Duration::days(30);
        assert!(matches!(c.verify_chain(&leaf, &[], &anchor, earlier), Err(ChainError::NotYetValid { .. })));
        // A tampered certificate (one byte of its signature) is other bytes: validated, refused.
        let mut forged = leaf.clone();
        if let Some(b) = forged.last_mut() {
            *b ^= 1;
        }
        assert!(c.verify_chain(&forged, &[], &anchor, now).is_err());
        // Bounded.
        for i in 0..10 {
            let d = issue(Role::Device, &format!("dev-{i}"), Some(&root), KeyKind::EcdsaP256, 2).unwrap();
            c.verify_chain(&der(&d.cert_pem), &[], &anchor, now).unwrap();
        }
        assert!(c.validations() <= 4);
        c.clear();
        assert_eq!(c.validations(), 0);
        // Off: nothing remembered, same answers.
        let off = X509Cache::new(0);
        assert!(off.verify_chain(&leaf, &[], &anchor, now).is_ok());
        assert_eq!(off.validations(), 0);
    }

    #[test]
    fn a_remembered_chain_lasts_only_as_long_as_its_shortest_lived_certificate() {
        let root = issue(Role::Root, "window-root", None, KeyKind::EcdsaP256, 30).unwrap();
        let inter = issue(Role::Intermediate, "window-inter", Some(&root), KeyKind::EcdsaP256, 2).unwrap();
        let dev = issue(Role::Device, "window-dev", Some(&inter), KeyKind::EcdsaP256, 10).unwrap();
        let (leaf, chain, anchor) = (der(&dev.cert_pem), vec![der(&inter.cert_pem)], der(&root.cert_pem));
        let now = OffsetDateTime::now_utc();
        let c = X509Cache::new(4);
        assert_eq!(c.verify_chain(&leaf, &chain, &anchor, now).unwrap().intermediates, 1);
        assert_eq!(c.validations(), 1);
        assert_eq!(c.verify_chain(&leaf, &chain, &anchor, now + time::Duration::days(1)).unwrap().intermediates, 1);
        // Past the intermediate's end (the leaf and root are still valid): validated again, refused.
        assert!(c.verify_chain(&leaf, &chain, &anchor, now + time::Duration::days(5)).is_err());
        // The same leaf and anchor without the intermediate are other bytes, and no path.
        assert!(c.verify_chain(&leaf, &[], &anchor, now).is_err());
    }

    #[test]
    fn describes_from_memory_with_the_same_result() {
        let root = issue(Role::Root, "describe-root", None, KeyKind::EcdsaP256, 2).unwrap();
        let d = der(&root.cert_pem);
        let c = X509Cache::new(4);
        let first = c.describe(&d).unwrap();
        assert_eq!(first, x509::describe(&d).unwrap());
        assert_eq!(c.describe(&d).unwrap(), first);
        assert_eq!(c.cert_info(&d).unwrap(), first.0);
        assert!(c.describe(b"not a certificate").is_err());
    }
}
