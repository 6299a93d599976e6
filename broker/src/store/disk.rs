//! The redb side: the tables, opening (with the format check and migrations) and the
//! full read at start, and the reads of committed rows.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{FORMAT_VERSION, Recovered, Store, StoreError, record};

pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

pub(super) const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");

pub(super) const QUEUE: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("queue");

pub(super) const QOS2_IN: TableDefinition<(u64, u16), ()> = TableDefinition::new("qos2_in");

pub(super) const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");

pub(super) const KV: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("kv");

pub(super) const SINK: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("sink");

pub(super) const SUBS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("subscriptions");

pub(super) fn damaged(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Damaged {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

pub(super) fn open_database(path: &Path, cache_mb: usize) -> Result<Database, StoreError> {
    // redb's page cache is the store's main memory cost: it bounds what a large backlog
    // costs in memory.
    match Database::builder()
        .set_cache_size(cache_mb.saturating_mul(1024 * 1024))
        .create(path)
    {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::Storage(e)) => Err(damaged(path, e)),
        Err(e) => Err(StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        }),
    }
}

/// Moves the subscriptions of format-1 session rows into rows of their own.
pub(super) fn migrate_subscriptions(txn: &redb::WriteTransaction) -> Result<usize, redb::Error> {
    let mut sessions = txn.open_table(SESSIONS)?;
    let mut subs = txn.open_table(SUBS)?;
    let mut rewritten = Vec::new();
    for row in sessions.iter()? {
        let (k, v) = row?;
        let Ok((rec, old)) = record::decode_session(v.value()) else {
            continue;
        };
        for (filter, options, id) in old {
            subs.insert(
                (rec.key, filter.as_str()),
                record::encode_subscription(options, id).as_slice(),
            )?;
        }
        if let Ok(bytes) = record::encode_session(&rec) {
            rewritten.push((k.value().to_owned(), bytes));
        }
    }
    let n = rewritten.len();
    for (id, bytes) in rewritten {
        sessions.insert(id.as_str(), bytes.as_slice())?;
    }
    Ok(n)
}

impl Store {
    pub(super) fn check_and_load(db: &Database, path: &Path) -> Result<Recovered, StoreError> {
        let txn = db.begin_write().map_err(|e| damaged(path, e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| damaged(path, e))?;
            let found = meta
                .get("format")
                .map_err(|e| damaged(path, e))?
                .map(|v| v.value());
            // Create every table so readers never meet a missing one.
            txn.open_table(SESSIONS).map_err(|e| damaged(path, e))?;
            txn.open_table(QUEUE).map_err(|e| damaged(path, e))?;
            txn.open_table(QOS2_IN).map_err(|e| damaged(path, e))?;
            txn.open_table(RETAINED).map_err(|e| damaged(path, e))?;
            txn.open_table(KV).map_err(|e| damaged(path, e))?;
            txn.open_table(SINK).map_err(|e| damaged(path, e))?;
            txn.open_table(SUBS).map_err(|e| damaged(path, e))?;
            match found {
                None => {}
                Some(v) if v == FORMAT_VERSION => {}
                Some(1) => {
                    let n = migrate_subscriptions(&txn).map_err(|e| damaged(path, e))?;
                    tracing::info!(
                        sessions = n,
                        "store migrated from format 1 to 2 (one row per subscription)"
                    );
                }
                Some(found) => {
                    return Err(StoreError::Version {
                        path: path.display().to_string(),
                        found,
                    });
                }
            }
            meta.insert("format", FORMAT_VERSION)
                .map_err(|e| damaged(path, e))?;
        }
        txn.commit().map_err(|e| damaged(path, e))?;

        let read = db.begin_read().map_err(|e| damaged(path, e))?;
        let mut rec = Recovered::default();
        let sessions = read.open_table(SESSIONS).map_err(|e| damaged(path, e))?;
        for row in sessions.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = row.map_err(|e| damaged(path, e))?;
            rec.sessions
                .push((k.value().to_owned(), v.value().to_vec()));
        }
        let subs = read.open_table(SUBS).map_err(|e| damaged(path, e))?;
        for row in subs.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = row.map_err(|e| damaged(path, e))?;
            let (key, filter) = k.value();
            rec.subscriptions
                .entry(key)
                .or_default()
                .push((filter.to_owned(), v.value().to_vec()));
        }
        let queue = read.open_table(QUEUE).map_err(|e| damaged(path, e))?;
        for row in queue.iter().map_err(|e| damaged(path, e))? {
            let (k, v) = row.map_err(|e| damaged(path, e))?;
            let (key, id) = k.value();
            let bytes = v.value();
            let q = rec.queues.entry(key).or_default();
            q.max_id = q.max_id.max(id);
            if record::queued_in_flight(bytes).map_err(|e| damaged(path, e))? {
                q.inflight.push((id, bytes.to_vec()));
            } else {
                if q.queued == 0 {
                    q.after = id - 1;
                }
                q.queued += 1;
                q.bytes += bytes.len();
            }
        }
        let q2 = read.open_table(QOS2_IN).map_err(|e| damaged(path, e))?;
        for row in q2.iter().map_err(|e| damaged(path, e))? {
            let (k, _) = row.map_err(|e| damaged(path, e))?;
            let (key, id) = k.value();
            rec.qos2_in.entry(key).or_default().push(id);
        }
        let retained = read.open_table(RETAINED).map_err(|e| damaged(path, e))?;
        for row in retained.iter().map_err(|e| damaged(path, e))? {
            let (_, v) = row.map_err(|e| damaged(path, e))?;
            rec.retained.push(v.value().to_vec());
        }
        Ok(rec)
    }

    /// The database for a read.
    pub(super) fn database(&self) -> Result<Arc<Database>, StoreError> {
        let db = self.db.read().unwrap_or_else(|e| e.into_inner());
        db.clone().ok_or_else(|| StoreError::Reopening {
            path: self.path.display().to_string(),
        })
    }

    /// Reads a plugin key.
    pub fn kv_get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = self
            .database()?
            .begin_read()
            .map_err(|e| damaged(&self.path, e))?;
        let t = read.open_table(KV).map_err(|e| damaged(&self.path, e))?;
        let v = t
            .get((namespace, key))
            .map_err(|e| damaged(&self.path, e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }
}
