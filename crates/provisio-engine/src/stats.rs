//! Registrations per minute, by result (assigned, failed, refused), for the console's chart.
//!
//! Each node counts its own registrations in memory, a bucket per minute, and writes its
//! buckets to the store about once a minute (one small document per node and minute, never
//! one per registration), so that the chart on any node shows every node's traffic, the
//! other nodes' with up to a minute's delay. Buckets older than two hours are removed.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use provisio_store::{Collection, Precondition, Store};
use serde::{Deserialize, Serialize};

use crate::{Error, StoreResult};

/// Prefix of the stats documents' ids (`stats:{minute}:{node}`, in [`Collection::Meta`]).
const PREFIX: &str = "stats:";
/// Minutes a bucket is kept in the store.
const KEEP_MINUTES: i64 = 120;

/// What happened to registrations in one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinuteCounts {
    /// Assigned.
    pub assigned: u64,
    /// Recorded, but failed (allocation, webhook, hub) or disabled.
    pub failed: u64,
    /// Refused before anything was recorded (credential, body, limits).
    pub refused: u64,
}

impl MinuteCounts {
    fn add(&mut self, other: &Self) {
        self.assigned += other.assigned;
        self.failed += other.failed;
        self.refused += other.refused;
    }

    /// All registrations of the minute.
    #[must_use]
    pub fn total(&self) -> u64 {
        self.assigned + self.failed + self.refused
    }
}

/// The result of one registration, as the chart splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result {
    /// Assigned to a hub.
    Assigned,
    /// Recorded as failed or disabled.
    Failed,
    /// Refused.
    Refused,
}

/// This node's counts.
#[derive(Debug)]
pub(crate) struct Stats {
    node: String,
    minutes: Mutex<BTreeMap<i64, MinuteCounts>>,
}

fn minute_now() -> i64 {
    provisio_store::unix_now() / 60
}

fn doc_id(minute: i64, node: &str) -> String {
    format!("{PREFIX}{minute:012}:{node}")
}

/// The minute and node of a stats document's id.
fn parse_id(id: &str) -> Option<(i64, &str)> {
    let (minute, node) = id.strip_prefix(PREFIX)?.split_once(':')?;
    Some((minute.parse().ok()?, node))
}

impl Stats {
    pub(crate) fn new() -> Arc<Self> {
        let node: [u8; 6] = rand::random();
        Arc::new(Self { node: node.iter().map(|b| format!("{b:02x}")).collect(), minutes: Mutex::default() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<i64, MinuteCounts>> {
        self.minutes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one registration in the current minute.
    pub(crate) fn record(&self, result: Result) {
        let mut m = self.lock();
        let c = m.entry(minute_now()).or_default();
        match result {
            Result::Assigned => c.assigned += 1,
            Result::Failed => c.failed += 1,
            Result::Refused => c.refused += 1,
        }
    }

    /// Writes this node's buckets to the store; forgets the finished minutes once written,
    /// and removes buckets (of any node) older than two hours.
    pub(crate) async fn flush(&self, store: &dyn Store) -> std::result::Result<(), Error> {
        let now = minute_now();
        let buckets: Vec<(i64, MinuteCounts)> = self.lock().iter().map(|(m, c)| (*m, *c)).collect();
        for (minute, counts) in buckets {
            let body = serde_json::to_string(&counts).map_err(|e| Error::Internal(e.to_string()))?;
            store.put(Collection::Meta, &doc_id(minute, &self.node), &body, Precondition::Any).await.or_internal()?;
            if minute < now {
                // A finished minute is in the store for good; the current one goes on.
                let mut m = self.lock();
                if m.get(&minute) == Some(&counts) {
                    m.remove(&minute);
                }
            }
        }
        let cutoff = now - KEEP_MINUTES;
        for d in store.list_prefix(Collection::Meta, PREFIX, None, 1000).await.or_internal()? {
            match parse_id(&d.id) {
                Some((minute, _)) if minute < cutoff => {
                    // Another node may have removed it first.
                    let _ = store.delete(Collection::Meta, &d.id, None).await;
                }
                // Ids sort by minute: the rest are newer.
                _ => break,
            }
        }
        Ok(())
    }

    /// The last `minutes` minutes (oldest first, the current one last), summed over every
    /// node: what the store holds, with this node's unwritten counts in place of its own
    /// documents for the minutes it still holds.
    pub(crate) async fn last(
        &self,
        store: &dyn Store,
        minutes: i64,
    ) -> std::result::Result<Vec<(i64, MinuteCounts)>, Error> {
        let now = minute_now();
        let first = now - minutes + 1;
        let mine = self.lock().clone();
        let mut out: BTreeMap<i64, MinuteCounts> = (first..=now).map(|m| (m, MinuteCounts::default())).collect();
        let start = format!("{PREFIX}{:012}", first);
        let mut after: Option<String> = Some(start);
        loop {
            let page = store.list_prefix(Collection::Meta, PREFIX, after.as_deref(), 500).await.or_internal()?;
            for d in &page {
                let Some((minute, node)) = parse_id(&d.id) else { continue };
                if minute < first || (node == self.node && mine.contains_key(&minute)) {
                    continue;
                }
                if let (Some(slot), Ok(c)) = (out.get_mut(&minute), serde_json::from_str::<MinuteCounts>(&d.body)) {
                    slot.add(&c);
                }
            }
            match page.last() {
                Some(last) if page.len() == 500 => after = Some(last.id.clone()),
                _ => break,
            }
        }
        for (minute, c) in mine.range(first..) {
            if let Some(slot) = out.get_mut(minute) {
                slot.add(c);
            }
        }
        Ok(out.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use provisio_store::SqliteStore;

    use super::*;

    /// The sums over the last hour (a test may cross a minute's end).
    async fn hour(s: &Stats, store: &dyn Store) -> MinuteCounts {
        let mut sum = MinuteCounts::default();
        for (_, c) in s.last(store, 60).await.unwrap() {
            sum.add(&c);
        }
        sum
    }

    #[tokio::test]
    async fn nodes_sum_without_counting_twice() {
        let store = SqliteStore::in_memory().await.unwrap();
        let (a, b) = (Stats::new(), Stats::new());
        for _ in 0..3 {
            a.record(Result::Assigned);
        }
        a.record(Result::Refused);
        b.record(Result::Failed);
        // Before any flush, a node sees only itself.
        assert_eq!(a.last(&store, 60).await.unwrap().len(), 60);
        assert_eq!(hour(&a, &store).await, MinuteCounts { assigned: 3, failed: 0, refused: 1 });
        // Both flushed: each sees both, once; a's newer count shows on a at once, on b with
        // its next flush.
        a.flush(&store).await.unwrap();
        b.flush(&store).await.unwrap();
        a.record(Result::Assigned);
        assert_eq!(hour(&a, &store).await, MinuteCounts { assigned: 4, failed: 1, refused: 1 });
        assert_eq!(hour(&b, &store).await, MinuteCounts { assigned: 3, failed: 1, refused: 1 });
        a.flush(&store).await.unwrap();
        assert_eq!(hour(&b, &store).await, MinuteCounts { assigned: 4, failed: 1, refused: 1 });
        assert_eq!(hour(&a, &store).await.total(), 6);
        // Old buckets are removed by the next flush.
        let old = doc_id(minute_now() - KEEP_MINUTES - 5, "old");
        store.put(Collection::Meta, &old, "{}", Precondition::Any).await.unwrap();
        a.flush(&store).await.unwrap();
        assert!(store.get(Collection::Meta, &old).await.unwrap().is_none());
        assert_eq!(parse_id(&doc_id(42, "n1")), Some((42, "n1")));
    }
}
