//! The store through its API: reopen, groups, incarnations, migrations, bad files.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::Database;

use super::disk::{META, SESSIONS};
use super::*;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "sandpiper-store-{name}-{}-{}",
        std::process::id(),
        record::unix_ms_now()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        data_dir: dir.to_owned(),
        ..StoreConfig::default()
    }
}

fn session(key: ClientKey) -> Vec<u8> {
    record::encode_session(&record::SessionRecord {
        key,
        expiry: 60,
        disconnected_at: 0,
        next_id: 1,
        will: None,
        principal: None,
    })
    .unwrap()
}

#[test]
fn writes_survive_reopen_and_delete_session_purges_its_queue() {
    let dir = tmp("reopen");
    {
        let (store, rec) = Store::open(&config(&dir)).unwrap();
        assert!(rec.sessions.is_empty());
        let t = store
            .submit(vec![
                Op::PutSession(ClientId::new("a"), session(1)),
                Op::PutSession(ClientId::new("b"), session(2)),
                Op::PutSubscription(1, Arc::from("x/#"), vec![1, 0, 0, 0, 0]),
                Op::PutSubscription(2, Arc::from("y"), vec![0, 0, 0, 0, 0]),
                Op::Queue(QueueOp::Put(QueueKey::Session(1), 1, vec![1, 1, 0, 0, 10])),
                Op::Queue(QueueOp::Put(QueueKey::Session(1), 2, vec![1, 1, 0, 0, 11])),
                Op::Queue(QueueOp::Put(QueueKey::Session(2), 1, vec![1, 1, 0, 0, 20])),
                Op::PutQos2In(1, 5),
                Op::PutRetained(Arc::from("r"), vec![3]),
            ])
            .unwrap();
        store.submit_one(Op::DeleteSession(ClientId::new("a"), 1));
        store.close();
        assert!(*store.committed().borrow() >= t);
    }
    let (store, rec) = Store::open(&config(&dir)).unwrap();
    assert_eq!(rec.sessions, vec![("b".to_owned(), session(2))]);
    assert_eq!(
        rec.subscriptions,
        HashMap::from([(2, vec![("y".to_owned(), vec![0, 0, 0, 0, 0])])])
    );
    assert_eq!(rec.queues.len(), 1);
    let q = &rec.queues[&2];
    assert_eq!((q.queued, q.after, q.max_id), (1, 0, 1));
    assert!(q.inflight.is_empty());
    assert_eq!(
        store.queue_read(&QueueKey::Session(2), 0, 10).unwrap(),
        vec![(1, vec![1, 1, 0, 0, 20])]
    );
    assert!(rec.qos2_in.is_empty());
    assert_eq!(rec.retained, vec![vec![3]]);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Changes submitted while a group is open commit together: none of them while it is
/// open (changes submitted before it are not held back), all of them once it ends.
#[test]
fn a_group_commits_as_one() {
    let dir = tmp("group");
    let store = Arc::new(Store::open(&config(&dir)).unwrap().0);
    let wait_for = |t: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while *store.committed().borrow() < t && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        *store.committed().borrow() >= t
    };
    let before = store
        .submit_one(Op::PutRetained(Arc::from("r"), vec![1]))
        .unwrap();
    let group = store.group();
    let first = store.submit_one(Op::PutQos2In(1, 1)).unwrap();
    assert!(wait_for(before));
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        *store.committed().borrow() < first,
        "nothing of an open group is committed"
    );
    let second = store.submit_one(Op::PutQos2In(1, 2)).unwrap();
    drop(group);
    assert!(wait_for(second));
    store.close();
    drop(store);
    let (store, rec) = Store::open(&config(&dir)).unwrap();
    let mut ids = rec.qos2_in[&1].clone();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2]);
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A session row belongs to its incarnation: an older one never replaces a newer one,
/// and only its own incarnation deletes it (a late delete of an incarnation that was
/// taken over leaves its successor alone, but still purges its own rows).
#[test]
fn session_rows_check_their_incarnation() {
    let dir = tmp("incarnation");
    let (store, _) = Store::open(&config(&dir)).unwrap();
    store.submit(vec![
        Op::PutSession(ClientId::new("c"), session(5)),
        Op::PutSession(ClientId::new("c"), session(4)),
        Op::Queue(QueueOp::Put(QueueKey::Session(4), 1, vec![1, 1, 0, 0, 10])),
        Op::DeleteSession(ClientId::new("c"), 4),
        Op::PutSession(ClientId::new("d"), session(1)),
        Op::PutSession(ClientId::new("d"), session(2)),
    ]);
    store.close();
    drop(store);
    let (store, rec) = Store::open(&config(&dir)).unwrap();
    let mut sessions = rec.sessions.clone();
    sessions.sort();
    assert_eq!(
        sessions,
        vec![("c".to_owned(), session(5)), ("d".to_owned(), session(2))]
    );
    assert!(rec.queues.is_empty(), "the old incarnation's queue went");
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A store of format 1 (subscriptions inside the session rows) is migrated at open.
#[test]
fn format_1_is_migrated() {
    let dir = tmp("migrate");
    std::fs::create_dir_all(&dir).unwrap();
    {
        let db = Database::create(dir.join("sandpiper.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("format", 1).unwrap();
        let mut v1 = vec![1];
        v1.extend_from_slice(&7u64.to_be_bytes());
        v1.extend_from_slice(&60u32.to_be_bytes());
        v1.extend_from_slice(&0u64.to_be_bytes());
        v1.extend_from_slice(&3u16.to_be_bytes());
        v1.extend_from_slice(&1u32.to_be_bytes());
        v1.extend_from_slice(&[0, 3, b'a', b'/', b'b', 1, 0, 0, 0, 9, 0]);
        txn.open_table(SESSIONS)
            .unwrap()
            .insert("old", v1.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let (store, rec) = Store::open(&config(&dir)).unwrap();
    assert_eq!(rec.sessions.len(), 1);
    let (s, subs) = record::decode_session(&rec.sessions[0].1).unwrap();
    assert_eq!((s.key, s.expiry), (7, 60));
    assert!(subs.is_empty(), "rewritten as format 2");
    assert_eq!(
        rec.subscriptions,
        HashMap::from([(7, vec![("a/b".to_owned(), vec![1, 0, 0, 0, 9])])])
    );
    store.close();
    drop(store);
    let (store, _) = Store::open(&config(&dir)).unwrap();
    store.close();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_format_version_is_refused() {
    let dir = tmp("version");
    {
        let (store, _) = Store::open(&config(&dir)).unwrap();
        store.close();
    }
    {
        let db = Database::create(dir.join("sandpiper.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META).unwrap().insert("format", 99).unwrap();
        txn.commit().unwrap();
    }
    let err = Store::open(&config(&dir)).unwrap_err();
    assert!(
        matches!(err, StoreError::Version { found: 99, .. }),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn garbage_file_is_a_clear_error() {
    let dir = tmp("garbage");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("sandpiper.redb"), vec![0x5a; 10_000]).unwrap();
    let err = Store::open(&config(&dir)).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("sandpiper.redb"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
