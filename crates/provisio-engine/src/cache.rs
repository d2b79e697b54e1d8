//! A small time-to-live cache for data every registration reads but operators rarely
//! change (linked hubs, enrollment groups). Entries live `ttl`, so on a shared database a
//! change made through any node applies everywhere within `ttl`.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// Caches one value for `ttl`.
#[derive(Debug)]
pub struct TtlCache<T> {
    ttl: Duration,
    slot: Mutex<Option<(Instant, Arc<T>)>>,
}

impl<T> TtlCache<T> {
    /// An empty cache.
    #[must_use]
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, slot: Mutex::new(None) }
    }

    /// The cached value, or a fresh one from `load` when it is older than the TTL.
    ///
    /// # Errors
    /// Whatever `load` returns.
    pub async fn get_or_load<E, F, Fut>(&self, load: F) -> Result<Arc<T>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        if self.ttl > Duration::ZERO {
            let slot = self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((at, v)) = slot.as_ref()
                && at.elapsed() < self.ttl
            {
                return Ok(v.clone());
            }
        }
        let v = Arc::new(load().await?);
        *self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), v.clone()));
        Ok(v)
    }

    /// Forgets the value (after a local change).
    pub fn invalidate(&self) {
        *self.slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
    }
}

/// Credentials recently proven for a registration id, so that a device's polls (which
/// only read its own operation) skip a second attestation: a store read and a key
/// derivation, or a certificate chain validation, per poll.
///
/// Entries are keyed by a SHA-256 of the registration id and the exact credential (the
/// whole SAS token, or the whole certificate chain: `Credential::fingerprint`), live at most `ttl` and never past a
/// token's expiry, and are all dropped on any local enrollment or group change. Register
/// requests always attest in full.
#[derive(Debug)]
pub struct AuthCache {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<std::collections::HashMap<[u8; 32], Instant>>,
    /// The fingerprints remembered for each registration id, to forget one device's.
    by_id: Mutex<std::collections::HashMap<String, Vec<[u8; 32]>>>,
}

impl AuthCache {
    /// An empty cache; `ttl` of zero disables it.
    #[must_use]
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            entries: Mutex::new(std::collections::HashMap::new()),
            by_id: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Remembers that the credential with this fingerprint (of the registration id and
    /// the exact credential, see `Credential::fingerprint`) was proven, until `ttl` from now
    /// or `expires_at` (a token's expiry), whichever comes first.
    pub fn remember(&self, fingerprint: [u8; 32], expires_at: Option<Instant>) {
        if self.ttl.is_zero() {
            return;
        }
        let k = fingerprint;
        let now = Instant::now();
        let until = expires_at.map_or(now + self.ttl, |e| e.min(now + self.ttl));
        let mut m = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= self.max_entries {
            m.retain(|_, at| *at > now);
            if m.len() >= self.max_entries {
                // Still full of live entries: start over rather than grow without bound.
                m.clear();
            }
        }
        m.insert(k, until);
    }

    /// Whether the credential with this fingerprint was proven and the entry is still live.
    #[must_use]
    pub fn recalls(&self, fingerprint: &[u8; 32]) -> bool {
        if self.ttl.is_zero() {
            return false;
        }
        let m = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(fingerprint).is_some_and(|until| *until > Instant::now())
    }

    /// Notes that `fingerprint` was remembered for `registration_key`, so that
    /// [`AuthCache::forget`] can drop it.
    pub fn index(&self, registration_key: &str, fingerprint: [u8; 32]) {
        if self.ttl.is_zero() {
            return;
        }
        let mut ids = self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if ids.len() >= self.max_entries {
            ids.clear();
        }
        let fps = ids.entry(registration_key.to_owned()).or_default();
        if !fps.contains(&fingerprint) {
            // A device proves a handful of credentials at most; an unbounded list would be
            // a client's choice.
            if fps.len() >= 16 {
                fps.remove(0);
            }
            fps.push(fingerprint);
        }
    }

    /// Forgets the credentials proven for one registration id (its TPM challenge key was
    /// dropped), and no other device's.
    pub fn forget(&self, registration_key: &str) {
        let fps = self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(registration_key);
        let mut m = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for fp in fps.unwrap_or_default() {
            m.remove(&fp);
        }
    }

    /// Forgets everything (after a local enrollment, group or key change).
    pub fn clear(&self) {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.by_id.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
    }
}

/// The operations this node created moments ago, so that the device's first polls (which
/// usually come to the node that took the registration) are answered without a store
/// read, nor the stored record's JSON parsed again. Operations are immutable snapshots, so
/// a cached one is never stale; a poll that misses (another node, expired, evicted) reads
/// the store.
#[derive(Debug)]
pub struct RecentOperations {
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<std::collections::HashMap<String, (Instant, Arc<RecentOperation>)>>,
}

/// What a poll of a recent operation answers with.
#[derive(Debug)]
pub struct RecentOperation {
    /// The device's registration key (the store's id for its record).
    pub registration_key: String,
    /// The registration state the device is told.
    pub state: provisio_proto::device::DeviceRegistrationResult,
}

impl RecentOperations {
    /// An empty cache; `ttl` of zero disables it.
    #[must_use]
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        Self { ttl, max_entries, entries: Mutex::new(std::collections::HashMap::new()) }
    }

    /// Keeps an operation just written, under its id.
    pub fn insert(&self, operation_id: String, op: RecentOperation) {
        if self.ttl.is_zero() || self.max_entries == 0 {
            return;
        }
        let now = Instant::now();
        let mut m = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.len() >= self.max_entries {
            m.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
            if m.len() >= self.max_entries {
                m.clear();
            }
        }
        m.insert(operation_id, (now, Arc::new(op)));
    }

    /// The operation, if this node wrote it within the TTL.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<Arc<RecentOperation>> {
        let m = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(id).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, op)| op.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_operations_are_bounded_and_expire() {
        let op = || RecentOperation {
            registration_key: "d".into(),
            state: provisio_proto::device::DeviceRegistrationResult::bare(
                "d",
                provisio_proto::device::RegistrationStatus::Assigned,
            ),
        };
        let c = RecentOperations::new(Duration::from_secs(60), 3);
        c.insert("a".into(), op());
        assert_eq!(c.get("a").unwrap().registration_key, "d");
        assert!(c.get("b").is_none());
        for i in 0..10 {
            c.insert(format!("x{i}"), op());
        }
        assert!(c.entries.lock().unwrap().len() <= 3);
        assert!(c.get("x9").is_some());
        let off = RecentOperations::new(Duration::ZERO, 3);
        off.insert("a".into(), op());
        assert!(off.get("a").is_none());
        let short = RecentOperations::new(Duration::from_millis(1), 3);
        short.insert("a".into(), op());
        std::thread::sleep(Duration::from_millis(5));
        assert!(short.get("a").is_none(), "expired");
    }

    #[test]
    fn auth_cache_recalls_live_fingerprints_only() {
        let c = AuthCache::new(Duration::from_secs(60), 4);
        let (a, b) = ([1u8; 32], [2u8; 32]);
        assert!(!c.recalls(&a));
        c.remember(a, None);
        assert!(c.recalls(&a) && !c.recalls(&b));
        // An expiry caps the entry.
        c.remember(b, Some(Instant::now()));
        assert!(!c.recalls(&b));
        // Bounded, and cleared on demand.
        for i in 0..10u8 {
            c.remember([i + 10; 32], None);
        }
        assert!(c.entries.lock().unwrap().len() <= 4);
        c.clear();
        assert!(!c.recalls(&[19; 32]));
        // Disabled with a zero TTL.
        let off = AuthCache::new(Duration::ZERO, 4);
        off.remember(a, None);
        assert!(!off.recalls(&a));
    }
}
