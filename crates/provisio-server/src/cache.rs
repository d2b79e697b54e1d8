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
