//! A durable first-in first-out queue of records, named: a sink plugin's queue, kept in the
//! store's durable queue ([`QueueKey::Sink`]), and what any outbound queue that must survive
//! a crash can be. Appends are submitted under the
//! queue's lock, so commits follow sequence order and a reader always sees a committed
//! prefix; reads return only committed records. A full queue drops its oldest records.
//! Without a store (tests, benchmarks) the records are kept in memory.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{QueueKey, Store, StoreError};

/// Where the queue stands.
#[derive(Debug)]
struct Bounds {
    /// Oldest sequence number not yet consumed (== `next` when empty).
    first: u64,
    /// Next sequence number to assign.
    next: u64,
    /// The records, when there is no store.
    mem: VecDeque<(u64, Vec<u8>)>,
}

/// One named durable queue.
#[derive(Debug)]
pub struct Fifo {
    name: Arc<str>,
    store: Option<Arc<Store>>,
    bounds: Mutex<Bounds>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The store ticket that makes the record durable.
    pub ticket: Option<u64>,
    /// The queue was full: its oldest record was dropped.
    pub dropped_oldest: bool,
    /// Records waiting, this one included.
    pub waiting: u64,
}

impl Fifo {
    /// The queue `name` as the store holds it (records left from before a restart stay).
    pub fn open(store: Option<Arc<Store>>, name: Arc<str>) -> Result<Fifo, StoreError> {
        let (first, next) = match &store {
            Some(s) => match s.queue_bounds(&QueueKey::Sink(name.clone()))? {
                Some((first, last)) => (first, last + 1),
                None => (1, 1),
            },
            None => (1, 1),
        };
        Ok(Fifo {
            name,
            store,
            bounds: Mutex::new(Bounds {
                first,
                next,
                mem: VecDeque::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Bounds> {
        // Each critical section is a few field updates: a poisoned lock is still sound.
        self.bounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(&self) -> QueueKey {
        QueueKey::Sink(self.name.clone())
    }

    /// The queue's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Records waiting.
    pub fn len(&self) -> u64 {
        let b = self.lock();
        b.next - b.first
    }

    /// Whether no record waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `record`, dropping the oldest one first when `max` are waiting.
    pub fn push(&self, record: Vec<u8>, max: u64) -> Appended {
        let mut b = self.lock();
        let seq = b.next;
        b.next += 1;
        let mut drop_through = None;
        if b.next - b.first > max {
            let oldest = b.first;
            b.first += 1;
            b.mem.pop_front();
            drop_through = Some(oldest);
        }
        // Submitted under the lock: commits follow submission order.
        let ticket = match &self.store {
            Some(store) => store.queue_append(self.key(), seq, record, drop_through),
            None => {
                b.mem.push_back((seq, record));
                None
            }
        };
        Appended {
            ticket,
            dropped_oldest: drop_through.is_some(),
            waiting: b.next - b.first,
        }
    }

    /// Up to `limit` committed records from the oldest one: (sequence number, record).
    pub fn read(&self, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let first = self.lock().first;
        match &self.store {
            Some(store) => store.queue_read(&self.key(), first.saturating_sub(1), limit),
            None => Ok(self.lock().mem.iter().take(limit).cloned().collect()),
        }
    }

    /// Up to `limit` committed records with sequence numbers above `after` (and not yet
    /// consumed), in order: what a reader that keeps several records in flight reads next.
    pub fn read_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let after = after.max(self.lock().first.saturating_sub(1));
        match &self.store {
            Some(store) => store.queue_read(&self.key(), after, limit),
            None => Ok((self.lock().mem.iter())
                .filter(|(s, _)| *s > after)
                .take(limit)
                .cloned()
                .collect()),
        }
    }

    /// The sequence number of the newest record appended (0 before the first).
    pub fn last(&self) -> u64 {
        self.lock().next - 1
    }

    /// The oldest sequence number not consumed (`last() + 1` when empty).
    pub fn first(&self) -> u64 {
        self.lock().first
    }

    /// Replaces record `seq` (still waiting) with `record`; returns the store ticket.
    pub fn replace(&self, seq: u64, record: Vec<u8>) -> Option<u64> {
        let mut b = self.lock();
        if seq < b.first || seq >= b.next {
            return None;
        }
        match &self.store {
            Some(store) => store.queue_row_put(self.key(), seq, record),
            None => {
                if let Some(r) = b.mem.iter_mut().find(|(s, _)| *s == seq) {
                    r.1 = record;
                }
                None
            }
        }
    }

    /// Consumes every record up to and including `last`.
    pub fn consume_through(&self, last: u64) {
        let mut b = self.lock();
        if b.first <= last {
            b.first = last + 1;
        }
        while b.mem.front().is_some_and(|(s, _)| *s <= last) {
            b.mem.pop_front();
        }
        if let Some(store) = &self.store {
            store.queue_delete_through(self.key(), last);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn records(f: &Fifo) -> Vec<u8> {
        f.read(100)
            .unwrap()
            .into_iter()
            .map(|(_, r)| r[0])
            .collect()
    }

    #[test]
    fn keeps_order_drops_the_oldest_and_survives_a_reopen() {
        let dir = std::env::temp_dir().join(format!(
            "sandpiper-fifo-{}-{}",
            std::process::id(),
            crate::store::record::unix_ms_now()
        ));
        let config = StoreConfig {
            data_dir: dir.clone(),
            ..StoreConfig::default()
        };
        {
            let (store, _) = Store::open(&config).unwrap();
            let store = Arc::new(store);
            let f = Fifo::open(Some(store.clone()), "q".into()).unwrap();
            for n in 1..=5u8 {
                let a = f.push(vec![n], 4);
                assert_eq!(a.dropped_oldest, n == 5);
            }
            store.flush();
            assert_eq!(records(&f), [2, 3, 4, 5]);
            let first = f.read(1).unwrap()[0].0;
            f.consume_through(first);
            assert_eq!(f.len(), 3);
            store.flush();
            store.close();
        }
        let (store, _) = Store::open(&config).unwrap();
        let f = Fifo::open(Some(Arc::new(store)), "q".into()).unwrap();
        assert_eq!(records(&f), [3, 4, 5]);
        assert_eq!(f.len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn read_after_and_replace() {
        let f = Fifo::open(None, "r".into()).unwrap();
        for n in 1..=4u8 {
            f.push(vec![n], 10);
        }
        assert_eq!(f.last(), 4);
        let after: Vec<u64> = f.read_after(2, 10).unwrap().iter().map(|r| r.0).collect();
        assert_eq!(after, [3, 4]);
        f.replace(3, vec![9]);
        assert_eq!(f.read_after(2, 1).unwrap(), [(3, vec![9])]);
        f.consume_through(3);
        assert_eq!(f.first(), 4);
        assert_eq!(f.read_after(0, 10).unwrap(), [(4, vec![4])]);
        assert_eq!(f.replace(2, vec![0]), None);
    }

    #[test]
    fn without_a_store_it_lives_in_memory() {
        let f = Fifo::open(None, "m".into()).unwrap();
        assert!(f.is_empty());
        for n in 1..=3u8 {
            assert_eq!(f.push(vec![n], 2).ticket, None);
        }
        assert_eq!(records(&f), [2, 3]);
        f.consume_through(2);
        assert_eq!(records(&f), [3]);
    }
}
