//! Which document keys may exist: a Bloom filter that lets the embedded store answer "no such
//! document" without reading the database.
//!
//! Most lookups on the registration path are for documents that do not exist: a device of an
//! enrollment group has no individual enrollment, and a new device has no registration record
//! yet. Under a steady stream of commits SQLite drops a reader's page cache before every read
//! (the WAL changed since that connection's last transaction), so each such miss read its
//! B-tree pages again from the OS: the largest part of a registration's store read.
//!
//! The filter answers "absent" only for keys never added, so it is exact for absence as long
//! as every key that exists was added. The store guarantees that: the keys present at open are
//! added by a scan, and every write that can create a document adds its key in the writer
//! thread before the write commits. A false positive only costs the database read the filter
//! would have saved. Keys of deleted documents stay in the filter (a Bloom filter cannot forget
//! them); they are dropped at the next rebuild.
//!
//! It is only sound while no other process writes the database, which is why the store uses it
//! only while it holds the database's lock file (one server per embedded database).

use std::{
    hash::BuildHasher,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use crate::Collection;

/// Probes per key: about 1% false positives at 10 bits per key (when the filter is about to
/// be rebuilt), far fewer right after a build.
const PROBES: u64 = 7;
/// Bits per key a build allots (rounded up to a power of two): 2 MiB for a million keys. A
/// filter is rebuilt once it holds more than one key per 10 bits.
const BITS_PER_KEY: u64 = 16;
/// The smallest filter: 2^23 bits (1 MiB) takes 838,860 keys before it is rebuilt.
const MIN_BITS: u64 = 1 << 23;
/// The largest: 2^34 bits (2 GiB), for a billion documents; past that the filter only
/// fills up (more false positives, never a false negative).
const MAX_BITS: u64 = 1 << 34;

/// One fixed-size Bloom filter.
struct Bloom {
    words: Box<[AtomicU64]>,
    /// Number of bits minus one (a power of two minus one).
    mask: u64,
    /// Keys added (with repeats): decides when the filter is too full.
    added: AtomicU64,
}

impl Bloom {
    fn new(expected_keys: u64) -> Self {
        let bits = expected_keys.saturating_mul(BITS_PER_KEY).clamp(MIN_BITS, MAX_BITS).next_power_of_two();
        let words = usize::try_from(bits / 64).unwrap_or(usize::MAX / 8);
        Self { words: (0..words).map(|_| AtomicU64::new(0)).collect(), mask: bits - 1, added: AtomicU64::new(0) }
    }

    /// The bit positions of a key's hash (double hashing: `h1 + i * h2`).
    fn bits(&self, h: u64) -> impl Iterator<Item = u64> + '_ {
        let h2 = h.rotate_left(32) | 1;
        (0..PROBES).map(move |i| h.wrapping_add(i.wrapping_mul(h2)) & self.mask)
    }

    fn add(&self, h: u64) {
        for b in self.bits(h) {
            if let Some(w) = usize::try_from(b / 64).ok().and_then(|i| self.words.get(i)) {
                w.fetch_or(1 << (b % 64), Ordering::Relaxed);
            }
        }
        self.added.fetch_add(1, Ordering::Relaxed);
    }

    fn may_contain(&self, h: u64) -> bool {
        self.bits(h).all(|b| {
            usize::try_from(b / 64)
                .ok()
                .and_then(|i| self.words.get(i))
                .is_none_or(|w| w.load(Ordering::Relaxed) & (1 << (b % 64)) != 0)
        })
    }

    /// Full enough that false positives pass about 1%, and a rebuild could be larger.
    fn is_full(&self) -> bool {
        self.mask + 1 < MAX_BITS && self.added.load(Ordering::Relaxed) > (self.mask + 1) / 10
    }
}

struct State {
    /// The filter lookups use; `None` until the first build is done (every key "may exist").
    current: Option<Arc<Bloom>>,
    /// The filter a build is filling: keys added meanwhile go to both.
    building: Option<Arc<Bloom>>,
}

/// The set of document keys that may exist (see the module documentation).
pub(crate) struct KeyFilter {
    /// Seeded at random per process, so that nobody can choose registration ids whose hashes
    /// collide on purpose and turn the filter off for others.
    hasher: std::hash::RandomState,
    state: RwLock<State>,
    /// A rebuild has been asked for and not finished: nobody else is asked to start one.
    rebuild_asked: AtomicBool,
}

impl KeyFilter {
    /// A filter that is not built yet: it answers "may exist" for every key.
    pub(crate) fn new() -> Self {
        Self {
            hasher: std::hash::RandomState::new(),
            state: RwLock::new(State { current: None, building: None }),
            rebuild_asked: AtomicBool::new(false),
        }
    }

    /// A filter that is built and empty (for a database known to hold no documents).
    pub(crate) fn empty() -> Self {
        let f = Self::new();
        f.write_state().current = Some(Arc::new(Bloom::new(0)));
        f
    }

    fn hash(&self, collection: &str, id: &str) -> u64 {
        self.hasher.hash_one((collection, id))
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// False only if the document was never written (since the filter was built).
    pub(crate) fn may_contain(&self, c: Collection, id: &str) -> bool {
        let h = self.hash(c.as_str(), id);
        self.read_state().current.as_ref().is_none_or(|b| b.may_contain(h))
    }

    /// Records that a document may exist from now on. Called by the writer thread before the
    /// write that creates it commits. Returns whether the filter has grown too full and should
    /// be rebuilt larger: once, until that rebuild is finished or abandoned.
    pub(crate) fn add(&self, c: Collection, id: &str) -> bool {
        let h = self.hash(c.as_str(), id);
        let s = self.read_state();
        if let Some(b) = &s.building {
            b.add(h);
        }
        match &s.current {
            Some(b) => {
                b.add(h);
                s.building.is_none() && b.is_full() && !self.rebuild_asked.swap(true, Ordering::AcqRel)
            }
            None => false,
        }
    }

    /// Starts a build sized for `expected_keys`; `false` if one is already running. Keys
    /// added from now on go into the new filter too; the caller then makes sure every write
    /// queued before has committed, adds every key of the database with [`Self::add_built`]
    /// and calls [`Self::finish_build`] (or [`Self::abandon_build`]).
    pub(crate) fn begin_build(&self, expected_keys: u64) -> bool {
        let mut s = self.write_state();
        if s.building.is_some() {
            return false;
        }
        s.building = Some(Arc::new(Bloom::new(expected_keys)));
        true
    }

    /// Adds a key found by the build's scan (`collection` as stored).
    pub(crate) fn add_built(&self, collection: &str, id: &str) {
        let h = self.hash(collection, id);
        if let Some(b) = &self.read_state().building {
            b.add(h);
        }
    }

    /// The build is complete: lookups use its filter from now on.
    pub(crate) fn finish_build(&self) {
        let mut s = self.write_state();
        if let Some(b) = s.building.take() {
            s.current = Some(b);
        }
        self.rebuild_asked.store(false, Ordering::Release);
    }

    /// The build failed or could not start: lookups go on with the previous filter, or with
    /// none, and a later write may ask for a rebuild again.
    pub(crate) fn abandon_build(&self) {
        self.write_state().building = None;
        self.rebuild_asked.store(false, Ordering::Release);
    }

    /// Whether a build has completed (lookups can be answered without the database).
    pub(crate) fn is_built(&self) -> bool {
        self.read_state().current.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(f: &KeyFilter, keys: &[(Collection, String)]) {
        assert!(f.begin_build(keys.len() as u64));
        for (c, id) in keys {
            f.add_built(c.as_str(), id);
        }
        f.finish_build();
    }

    #[test]
    fn an_unbuilt_filter_says_every_key_may_exist() {
        let f = KeyFilter::new();
        assert!(!f.is_built());
        assert!(f.may_contain(Collection::Enrollments, "anything"));
        // Adding before the first build is harmless and asks for no rebuild.
        assert!(!f.add(Collection::Enrollments, "x"));
    }

    #[test]
    fn every_added_key_may_exist_and_most_others_do_not() {
        let f = KeyFilter::empty();
        let keys: Vec<String> = (0..50_000).map(|i| format!("device-{i}")).collect();
        for k in &keys {
            f.add(Collection::Registrations, k);
        }
        assert!(keys.iter().all(|k| f.may_contain(Collection::Registrations, k)), "no false negative");
        // The collection is part of the key.
        let other = keys.iter().filter(|k| f.may_contain(Collection::Enrollments, k)).count();
        let absent = (0..50_000).filter(|i| f.may_contain(Collection::Registrations, &format!("other-{i}"))).count();
        assert!(other < 50 && absent < 50, "false positives: {other} and {absent} of 50,000");
    }

    #[test]
    fn keys_added_during_a_build_survive_it() {
        let f = KeyFilter::empty();
        f.add(Collection::Enrollments, "before");
        assert!(f.begin_build(10));
        assert!(!f.begin_build(10), "one build at a time");
        // A write during the scan, and a key the scan finds.
        f.add(Collection::Enrollments, "during");
        f.add_built("enrollments", "scanned");
        // Until the build is done, lookups use the old filter.
        assert!(f.may_contain(Collection::Enrollments, "before"));
        f.finish_build();
        assert!(f.may_contain(Collection::Enrollments, "during"));
        assert!(f.may_contain(Collection::Enrollments, "scanned"));
        // "before" was not found by this (pretend) scan: the build replaced the old filter.
        assert!(!f.may_contain(Collection::Enrollments, "before"));
    }

    #[test]
    fn a_full_filter_asks_to_be_rebuilt_larger() {
        let f = KeyFilter::new();
        build(&f, &[]);
        let capacity = MIN_BITS / 10;
        let asked = (0..=capacity).filter(|i| f.add(Collection::Registrations, &i.to_string())).count();
        assert_eq!(asked, 1, "a rebuild is asked for once {capacity} keys are in, and only once");
        assert!(!f.add(Collection::Registrations, "more"), "asked already");
        // While a build runs, nobody else is asked to start one.
        assert!(f.begin_build(capacity * 2));
        assert!(!f.add(Collection::Registrations, "one more"));
        f.abandon_build();
        assert!(f.may_contain(Collection::Registrations, "one more"), "the old filter stays");
        // Abandoned: the next write asks again.
        assert!(f.add(Collection::Registrations, "and another"));
    }
}
