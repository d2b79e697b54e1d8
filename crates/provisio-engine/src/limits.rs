//! Limits: a token bucket (a steady rate with a burst allowance) for requests, a sliding
//! window per key (a device's polls), and the admission counters of new connections that
//! every listener (HTTPS, MQTT, AMQP) shares.

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

/// Caps simultaneous connections per client IP address, across listeners.
#[derive(Debug)]
pub struct PerIpLimiter {
    max: usize,
    counts: Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
}

/// Held for the life of a connection; frees its slot when dropped.
#[derive(Debug)]
pub struct IpPermit {
    limiter: std::sync::Arc<PerIpLimiter>,
    ip: std::net::IpAddr,
}

impl PerIpLimiter {
    /// At most `max` connections per IP (0: no limit).
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self { max, counts: Mutex::new(std::collections::HashMap::new()) }
    }

    /// A slot for `ip`, or `None` when it already has `max` connections.
    pub fn try_acquire(self: &std::sync::Arc<Self>, ip: std::net::IpAddr) -> Option<IpPermit> {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = counts.entry(ip).or_insert(0);
        if self.max > 0 && *n >= self.max {
            return None;
        }
        *n += 1;
        Some(IpPermit { limiter: self.clone(), ip })
    }
}

impl Drop for IpPermit {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Counts events per key in a sliding window: a device's polls (DPS allows 5 per 10 s),
/// refusals per client address.
///
/// Keys live in two generations, swapped every window (or sooner when the current one holds
/// `max_keys`): a key seen within the last window is in one of them, older ones are dropped
/// with the generation that holds them. No call scans the map, and it holds at most twice
/// `max_keys` keys, whoever chooses them.
#[derive(Debug)]
pub struct KeyedWindow {
    max: usize,
    window: Duration,
    max_keys: usize,
    state: Mutex<Generations>,
}

#[derive(Debug)]
struct Generations {
    current: std::collections::HashMap<String, std::collections::VecDeque<Instant>>,
    previous: std::collections::HashMap<String, std::collections::VecDeque<Instant>>,
    since: Instant,
}

/// Keys a [`KeyedWindow`] tracks per generation unless told otherwise.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

impl KeyedWindow {
    /// At most `max` events per `window` per key (0: no limit).
    #[must_use]
    pub fn new(max: usize, window: Duration) -> Self {
        Self::with_max_keys(max, window, DEFAULT_MAX_KEYS)
    }

    /// [`KeyedWindow::new`], tracking at most `max_keys` keys per generation. When more are
    /// seen within one window, the older generation is forgotten early: its keys start
    /// afresh, which errs towards letting events through.
    #[must_use]
    pub fn with_max_keys(max: usize, window: Duration, max_keys: usize) -> Self {
        let state = Generations {
            current: std::collections::HashMap::new(),
            previous: std::collections::HashMap::new(),
            since: Instant::now(),
        };
        Self { max, window, max_keys: max_keys.max(1), state: Mutex::new(state) }
    }

    /// Records an event for `key`, or says how long until the next one is allowed.
    ///
    /// # Errors
    /// The wait, when `key` is over its limit.
    pub fn hit(&self, key: &str) -> Result<(), Duration> {
        self.with_events(key, true)
    }

    /// Whether an event for `key` would be allowed now, without recording one.
    ///
    /// # Errors
    /// The wait, when `key` is at its limit.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        self.with_events(key, false)
    }

    fn with_events(&self, key: &str, record: bool) -> Result<(), Duration> {
        if self.max == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut dropped = None;
        let result = {
            let mut st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if now.duration_since(st.since) >= self.window
                || (st.current.len() >= self.max_keys && !st.current.contains_key(key))
            {
                let old = std::mem::take(&mut st.current);
                dropped = Some(std::mem::replace(&mut st.previous, old));
                st.since = now;
            }
            let q = match st.current.get_mut(key) {
                Some(q) => q,
                None => {
                    let moved = st.previous.remove(key).unwrap_or_default();
                    if moved.is_empty() && !record {
                        return Ok(());
                    }
                    st.current.entry(key.to_owned()).or_insert(moved)
                }
            };
            while q.front().is_some_and(|t| now.duration_since(*t) >= self.window) {
                q.pop_front();
            }
            if q.len() >= self.max {
                let oldest = q.front().copied().unwrap_or(now);
                Err(self.window.saturating_sub(now.duration_since(oldest)))
            } else {
                if record {
                    q.push_back(now);
                }
                Ok(())
            }
        };
        // A generation's map is freed outside the lock.
        drop(dropped);
        result
    }

    /// Keys tracked now (both generations).
    #[must_use]
    pub fn tracked(&self) -> usize {
        let st = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        st.current.len() + st.previous.len()
    }
}

/// The key a client address is limited under: an IPv4 address, or the /64 network of an IPv6
/// one (one subscriber usually holds a whole /64, and could otherwise pick a fresh address for
/// every attempt).
#[must_use]
pub fn address_key(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Which connections a listener lets in: at most `max` at once on this listener, and no
/// more per client IP address than the limit every listener shares.
#[derive(Debug)]
pub struct Admission {
    /// The listener's name in the log ("HTTPS", "MQTT", "AMQP").
    listener: &'static str,
    max: usize,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    per_ip: std::sync::Arc<PerIpLimiter>,
}

/// Held for the life of an admitted connection; frees both slots when dropped.
#[derive(Debug)]
pub struct Admitted {
    _total: tokio::sync::OwnedSemaphorePermit,
    _ip: IpPermit,
}

impl Admission {
    /// At most `max` simultaneous connections on `listener`, and `per_ip`'s limit.
    #[must_use]
    pub fn new(listener: &'static str, max: usize, per_ip: std::sync::Arc<PerIpLimiter>) -> Self {
        Self { listener, max, permits: std::sync::Arc::new(tokio::sync::Semaphore::new(max)), per_ip }
    }

    /// Slots for a connection from `peer`, or `None` (logged) when a limit is reached: the
    /// caller closes the connection.
    pub fn admit(&self, peer: std::net::SocketAddr) -> Option<Admitted> {
        let Ok(total) = self.permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = self.max, listener = self.listener, "connection limit reached; closing connection");
            return None;
        };
        let Some(ip) = self.per_ip.try_acquire(peer.ip()) else {
            tracing::warn!(%peer, listener = self.listener, "per-IP connection limit reached; closing connection");
            return None;
        };
        Some(Admitted { _total: total, _ip: ip })
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn per_ip_slots_are_freed() {
        let l = std::sync::Arc::new(PerIpLimiter::new(2));
        let ip: std::net::IpAddr = [127, 0, 0, 1].into();
        let a = l.try_acquire(ip).unwrap();
        let _b = l.try_acquire(ip).unwrap();
        assert!(l.try_acquire(ip).is_none());
        assert!(l.try_acquire([10, 0, 0, 1].into()).is_some());
        drop(a);
        assert!(l.try_acquire(ip).is_some());
    }

    #[test]
    fn keyed_window() {
        let w = KeyedWindow::new(5, Duration::from_secs(10));
        for _ in 0..5 {
            assert!(w.hit("dev").is_ok());
        }
        let wait = w.hit("dev").unwrap_err();
        assert!(wait > Duration::from_secs(9));
        assert!(w.hit("other").is_ok());
        assert!(KeyedWindow::new(0, Duration::from_secs(1)).hit("x").is_ok());
        // A check records nothing.
        for _ in 0..10 {
            assert!(w.check("fresh").is_ok());
        }
        assert!(w.check("dev").is_err());
        assert!(w.hit("fresh").is_ok());
    }

    /// Finding 4 of issue #24: the map grew with every key and was scanned under its lock
    /// once it held 100,000; now it holds at most two generations of `max_keys`.
    #[test]
    fn a_keyed_window_holds_a_bounded_number_of_keys() {
        let w = KeyedWindow::with_max_keys(1, Duration::from_secs(3600), 1000);
        for i in 0..50_000 {
            assert!(w.hit(&format!("key-{i}")).is_ok());
            assert!(w.tracked() <= 2000, "{} keys after {i}", w.tracked());
        }
        // A key still within the last generations keeps its count.
        assert!(w.hit("key-49999").is_err());
    }

    #[test]
    fn keys_move_between_generations_and_expire_with_them() {
        let w = KeyedWindow::new(2, Duration::from_millis(200));
        assert!(w.hit("a").is_ok());
        assert!(w.hit("a").is_ok());
        assert!(w.hit("a").is_err());
        std::thread::sleep(Duration::from_millis(250));
        assert!(w.hit("a").is_ok(), "the window has passed");
        std::thread::sleep(Duration::from_millis(500));
        assert!(w.hit("b").is_ok());
        assert!(w.tracked() <= 2);
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        assert_eq!(address_key("::ffff:10.0.0.1".parse().unwrap()), "10.0.0.1");
        assert_eq!(address_key("10.0.0.1".parse().unwrap()), "10.0.0.1");
    }

    #[tokio::test]
    async fn admission_caps_the_listener_and_each_address() {
        let ip = |n: u8| std::net::SocketAddr::from(([10, 0, 0, n], 1000));
        let a = Admission::new("test", 2, std::sync::Arc::new(PerIpLimiter::new(1)));
        let first = a.admit(ip(1)).expect("first");
        assert!(a.admit(ip(1)).is_none(), "one per address");
        let second = a.admit(ip(2)).expect("another address");
        assert!(a.admit(ip(3)).is_none(), "two in all");
        drop(first);
        let third = a.admit(ip(3)).expect("a slot was freed");
        // A refusal by address gives back the listener's slot it took.
        drop(second);
        assert!(a.admit(ip(3)).is_none());
        assert!(a.admit(ip(2)).is_some());
        drop(third);
    }
}
