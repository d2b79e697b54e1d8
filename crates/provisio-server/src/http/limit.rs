//! A token bucket: a steady rate with a burst allowance.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Limits requests to `rate` per second with bursts of `burst`; a rate of 0 disables it.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    /// A limiter allowing `per_second` requests per second, bursting to twice that.
    #[must_use]
    pub fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second);
        Self { rate, burst: rate * 2.0, state: Mutex::new((rate * 2.0, Instant::now())) }
    }

    /// Takes one token, or says how long until one is available.
    ///
    /// # Errors
    /// The wait, when the bucket is empty.
    pub fn acquire(&self) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        // A poisoned lock only means another thread panicked mid-update; the numbers are
        // still usable.
        let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * self.rate;
        st.0 = (st.0 + refill).min(self.burst);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - st.0) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refuses() {
        let l = RateLimiter::new(5);
        for _ in 0..10 {
            assert!(l.acquire().is_ok());
        }
        let wait = l.acquire().unwrap_err();
        assert!(wait <= Duration::from_millis(200), "{wait:?}");
        assert!(RateLimiter::new(0).acquire().is_ok());
    }
}
