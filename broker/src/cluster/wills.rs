//! The wills of connected clients, for when their node dies: the JetStream key-value
//! bucket `sandpiper_wills` holds one entry per connection with a will, under
//! `NODE.RUN.CLIENT.CONN` (the node's name, its run id in hex, the SHA-256 of the client
//! id in hex, the connection's number in hex), from its CONNECT until the connection ends; from then on the node that served it
//! owns the will as on one node (published now, or kept with its session for the will
//! delay, on disk for a persistent one). An entry whose node is gone (not heard from for
//! `node_timeout_ms`) or has restarted (another run id) is orphaned: every node that sees
//! it tries to take it (a purge expecting its revision, which only one can win) and the
//! one that does publishes the will, after its will delay, through its own pipeline.
//! Nodes look for orphans when they forget a node or see it restart, `node_timeout_ms`
//! after they start (by then they have heard every live node), and every 30 s.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::{Cluster, lock, read, wire};
use crate::message::{ClientId, Draft, Principal};
use crate::pipeline::{Origin, Pipeline};
use crate::plugins::ClientInfo;
use crate::session::PendingWill;

/// The bucket of connected clients' wills.
pub(super) const BUCKET: &str = "sandpiper_wills";
/// Between two looks for orphaned wills besides the ones a node's departure prompts.
const SCAN: Duration = Duration::from_secs(30);

/// Client ids remembered as connected lately, at most.
const RECENT: usize = 1_000_000;

/// When client ids last connected (Unix ms, by the connecting node's clock), for as long
/// as an orphaned will can be found after its node died.
#[derive(Debug, Default)]
pub(super) struct Recent {
    order: VecDeque<(u64, String)>,
    last: HashMap<String, u64>,
}

impl Recent {
    /// `client_id` connected at `at_ms`; what is older than `keep_ms` is forgotten.
    fn note(&mut self, client_id: &str, at_ms: u64, keep_ms: u64) {
        let now = crate::store::record::unix_ms_now();
        while let Some(&(t, _)) = self.order.front() {
            if now.saturating_sub(t) <= keep_ms && self.order.len() < RECENT {
                break;
            }
            if let Some((t, id)) = self.order.pop_front()
                && self.last.get(&id) == Some(&t)
            {
                self.last.remove(&id);
            }
        }
        self.order.push_back((at_ms, client_id.to_owned()));
        let last = self.last.entry(client_id.to_owned()).or_insert(0);
        *last = (*last).max(at_ms);
    }

    /// When `client_id` last connected, if lately.
    fn since(&self, client_id: &str) -> Option<u64> {
        self.last.get(client_id).copied()
    }
}

/// What the wills' task does.
#[derive(Debug)]
pub(super) enum Op {
    /// A connection with a will attached here: its entry.
    Set { key: String, value: Bytes },
    /// That connection ended: its entry goes.
    Clear { key: String },
    /// Look for orphaned wills now.
    Scan,
}

/// The key of the will of `client_id`'s connection `conn` on node `node` in run `run`.
pub(super) fn key(node: &str, run: u64, client_id: &str, conn: u64) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, client_id.as_bytes());
    let mut hex = String::with_capacity(64);
    for b in digest.as_ref() {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("{node}.{run:016x}.{hex}.{conn:x}")
}

/// The node and run of a key.
fn owner(key: &str) -> Option<(&str, u64)> {
    let mut parts = key.split('.');
    let node = parts.next()?;
    let run = u64::from_str_radix(parts.next()?, 16).ok()?;
    Some((node, run))
}

/// An entry: the client (id, user name, listener), the will delay, the will as a wire
/// record, and when the entry was made (Unix ms, this node's clock: its connection had
/// attached by then).
pub(super) fn encode(w: &PendingWill, at_ms: u64) -> Result<Bytes, wire::WireError> {
    let mut b = BytesMut::new();
    let text = |b: &mut BytesMut, s: &str| {
        b.put_u32(s.len() as u32);
        b.put_slice(s.as_bytes());
    };
    text(&mut b, w.client.client_id.as_str());
    match w.client.username() {
        Some(u) => {
            b.put_u8(1);
            text(&mut b, u);
        }
        None => b.put_u8(0),
    }
    text(&mut b, w.client.listener());
    b.put_u32(w.delay());
    let msg = Draft::from_will(w.will.clone()).into_message(None);
    let mut record = BytesMut::new();
    wire::put(&mut record, &msg)?;
    // With its length: a cut payload is told from a shorter one.
    b.put_slice(&record);
    b.put_u64(at_ms);
    Ok(b.freeze())
}

/// What [`encode`] wrote: the client, the will delay in seconds, the will, and when the
/// entry was made (none in an entry of a version before it was written).
fn decode(mut v: &[u8]) -> Option<(ClientInfo, u32, Draft, Option<u64>)> {
    fn text(v: &mut &[u8]) -> Option<String> {
        if v.len() < 4 {
            return None;
        }
        let n = v.get_u32() as usize;
        if v.len() < n {
            return None;
        }
        let s = std::str::from_utf8(&v[..n]).ok()?.to_owned();
        v.advance(n);
        Some(s)
    }
    let client_id = text(&mut v)?;
    if v.is_empty() {
        return None;
    }
    let username = match v.get_u8() {
        0 => None,
        _ => Some(text(&mut v)?),
    };
    let listener = text(&mut v)?;
    if v.len() < 4 {
        return None;
    }
    let delay = v.get_u32();
    let record = wire::next(&mut v)?;
    let at_ms = match v.len() {
        0 => None,
        8 => Some(v.get_u64()),
        _ => return None,
    };
    let msg = wire::read(record).ok()?;
    let client = ClientInfo {
        client_id: ClientId::new(&client_id),
        principal: Arc::new(Principal {
            user: username.map(Arc::from),
            listener: listener.into(),
        }),
        attributes: Box::default(),
    };
    let draft = Draft {
        topic: msg.topic,
        payload: msg.payload,
        qos: msg.qos,
        retain: msg.retain,
        properties: msg.properties,
    };
    Some((client, delay, draft, at_ms))
}

/// Removes every message of `key` from the bucket's stream. A key-value purge leaves a
/// marker behind (one per connection ever made with a will, listed at each look for
/// orphans); a key here is written once and removed once, so nothing needs the marker.
async fn forget(
    store: &async_nats::jetstream::kv::Store,
    key: &str,
) -> Result<(), async_nats::jetstream::stream::PurgeError> {
    store
        .stream
        .purge()
        .filter(format!("{}{key}", store.prefix))
        .await
        .map(drop)
}

impl Cluster {
    /// Keeps the wills of the connections attached here in the bucket, and publishes the
    /// orphaned wills this node wins.
    pub(super) async fn wills(
        &self,
        js: async_nats::jetstream::Context,
        mut ops: mpsc::Receiver<Op>,
        pipeline: Arc<Pipeline>,
    ) {
        use async_nats::jetstream::kv;
        let config = kv::Config {
            bucket: BUCKET.to_owned(),
            description: "Sandpiper: the wills of connected clients, per node".to_owned(),
            history: 1,
            num_replicas: self.config.replicas,
            ..Default::default()
        };
        let mut warned = false;
        let store = loop {
            match js.create_or_update_key_value(config.clone()).await {
                Ok(s) => break s,
                Err(e) => {
                    if !std::mem::replace(&mut warned, true) {
                        tracing::error!(error = %e, bucket = BUCKET,
                            "cluster: cannot open the wills' bucket (is JetStream on?); wills of clients connected here wait (up to 65,536), and no orphaned will is published; trying again every second");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let started = Instant::now();
        let timeout = Duration::from_millis(self.config.node_timeout_ms);
        let first = tokio::time::sleep(timeout);
        tokio::pin!(first);
        let mut first_done = false;
        let mut scan = tokio::time::interval(SCAN);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let look = tokio::select! {
                op = ops.recv() => match op {
                    Some(Op::Set { key, value }) => {
                        if let Err(e) = store.put(&key, value).await {
                            tracing::warn!(error = %e, "cluster: a will not kept in the wills' bucket (it is published from here only)");
                        }
                        false
                    }
                    Some(Op::Clear { key }) => {
                        if let Err(e) = forget(&store, &key).await {
                            tracing::warn!(error = %e, "cluster: a will left in the wills' bucket after its connection ended");
                        }
                        false
                    }
                    Some(Op::Scan) => true,
                    None => return,
                },
                () = &mut first, if !first_done => {
                    first_done = true;
                    true
                }
                _ = scan.tick() => first_done,
            };
            if look {
                self.take_orphans(&store, &pipeline, started.elapsed() >= timeout)
                    .await;
            }
        }
    }

    /// Takes and publishes the orphaned wills this node wins. `settled`: this node has
    /// been up long enough to have heard every live node (a node it does not know is gone).
    async fn take_orphans(
        &self,
        store: &async_nats::jetstream::kv::Store,
        pipeline: &Arc<Pipeline>,
        settled: bool,
    ) {
        let mut keys = match store.keys().await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot list the wills' bucket");
                return;
            }
        };
        let mut orphans = Vec::new();
        {
            // Which nodes run which run, as this node knows them now.
            let runs: HashMap<String, u64> = (read(&self.peers).iter())
                .map(|(n, p)| (n.to_string(), p.run))
                .collect();
            while let Some(k) = keys.next().await {
                let Ok(k) = k else {
                    break;
                };
                let Some((node, run)) = owner(&k) else {
                    continue;
                };
                let orphaned = if node == &*self.node {
                    run != self.run
                } else {
                    match runs.get(node) {
                        Some(live) => *live != run,
                        None => settled,
                    }
                };
                if orphaned {
                    orphans.push(k);
                }
            }
        }
        for k in orphans {
            let Ok(Some(entry)) = store.entry(k.clone()).await else {
                continue;
            };
            if entry.operation != async_nats::jetstream::kv::Operation::Put {
                continue;
            }
            // Only one node's purge with this revision succeeds: that node publishes it,
            // and removes the purge's marker.
            if store
                .purge_expect_revision(&k, Some(entry.revision))
                .await
                .is_err()
            {
                continue;
            }
            if let Err(e) = forget(store, &k).await {
                tracing::debug!(error = %e, key = %k, "cluster: a purged will's marker left in the wills' bucket");
            }
            let Some((client, delay, draft, at_ms)) = decode(&entry.value) else {
                tracing::warn!(key = %k, "cluster: unreadable will in the wills' bucket: dropped");
                continue;
            };
            let id = client.client_id.as_str().to_owned();
            if delay > 0 {
                // MQTT-3.1.3-9: a client connected again within its will delay does not
                // get its will published. Connected since the entry was made: again
                // (the will's node's clock against the connecting node's, as for claims;
                // NATS's time of the put for an entry without its own).
                let made = at_ms.map_or_else(
                    || entry.created.unix_timestamp_nanos() / 1_000_000,
                    i128::from,
                );
                if lock(&self.recent)
                    .since(&id)
                    .is_some_and(|t| i128::from(t) > made)
                {
                    tracing::info!(client_id = %id, "cluster: the client of a gone node's will connected again: its will is not published");
                    continue;
                }
            }
            tracing::info!(client_id = %client.client_id, node = %owner(&k).map_or("?", |o| o.0),
                delay, "cluster: publishing the will of a client whose node is gone");
            let pipeline = pipeline.clone();
            let publish = tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                // No session here set it: No Local spares nobody.
                let from = Origin::Will {
                    session: u64::MAX,
                    client: &client,
                };
                pipeline.publish(&from, draft);
            });
            if delay > 0 {
                let mut delayed = lock(&self.delayed_wills);
                delayed.retain(|_, h| !h.is_finished());
                delayed.insert(id, publish.abort_handle());
            }
        }
    }

    /// At a clean stop: this run's entries go (its connections end without their wills,
    /// as on one broker; left behind, the other nodes would publish them).
    pub(super) async fn drop_own_wills(&self, js: async_nats::jetstream::Context) {
        let Ok(store) = js.get_key_value(BUCKET).await else {
            return;
        };
        let Ok(mut keys) = store.keys().await else {
            return;
        };
        let mine = format!("{}.{:016x}.", self.node, self.run);
        while let Some(Ok(k)) = keys.next().await {
            if k.starts_with(&mine) {
                let _ = forget(&store, &k).await;
            }
        }
    }

    /// A connection of `client_id` attached here or on another node at `at_ms` (Unix ms):
    /// an orphaned will of its that waits for its will delay is not published.
    pub(super) fn reconnected(&self, client_id: &str, at_ms: u64) {
        let keep = self.config.node_timeout_ms + 2 * SCAN.as_millis() as u64;
        lock(&self.recent).note(client_id, at_ms, keep);
        if let Some(h) = lock(&self.delayed_wills).remove(client_id)
            && !h.is_finished()
        {
            h.abort();
            tracing::info!(
                client_id,
                "cluster: the client connected again within its will delay: its will is not published"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_node_and_run() {
        let k = key("node-1", 0xabc, "any client/id \u{e9}", 0x12);
        assert_eq!(owner(&k), Some(("node-1", 0xabc)));
        assert_eq!(k.len(), "node-1".len() + 1 + 16 + 1 + 64 + 1 + 2);
        assert!(
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        assert_ne!(key("n", 1, "a", 1), key("n", 1, "b", 1));
        assert_ne!(key("n", 1, "a", 1), key("n", 1, "a", 2));
        assert_eq!(owner("nonsense"), None);
    }

    #[test]
    fn recent_connections_are_remembered_for_a_while() {
        let now = crate::store::record::unix_ms_now();
        let mut r = Recent::default();
        r.note("a", now - 50_000, 10_000);
        r.note("b", now, 10_000);
        // "a" is older than what is kept: forgotten at the next note.
        r.note("c", now, 10_000);
        assert_eq!(r.since("a"), None);
        assert_eq!(r.since("b"), Some(now));
        // The latest connection counts; an older entry of the same id does not erase it.
        r.note("b", now + 5, 10_000);
        assert_eq!(r.since("b"), Some(now + 5));
        assert_eq!(r.since("nobody"), None);
    }

    #[test]
    fn an_entry_reads_back_and_damage_is_refused() {
        let will = crate::codec::Will {
            topic: crate::codec::TopicName::new("gone/a").unwrap(),
            payload: Bytes::from_static(b"bye"),
            qos: crate::codec::QoS::AtLeastOnce,
            retain: true,
            properties: Default::default(),
        };
        let w = PendingWill {
            will,
            origin: 7,
            client: ClientInfo {
                client_id: ClientId::new("c1"),
                principal: Arc::new(Principal {
                    user: Some("u".into()),
                    listener: "default".into(),
                }),
                attributes: Box::default(),
            },
        };
        let v = encode(&w, 1_700_000_000_123).unwrap();
        let (client, delay, draft, at_ms) = decode(&v).unwrap();
        assert_eq!(at_ms, Some(1_700_000_000_123));
        // An entry of the version before (no time) still reads.
        assert!(decode(&v[..v.len() - 8]).unwrap().3.is_none());
        assert_eq!(client.client_id.as_str(), "c1");
        assert_eq!(client.username(), Some("u"));
        assert_eq!(&**client.listener(), "default");
        assert_eq!(delay, 0);
        assert_eq!(draft.topic.as_str(), "gone/a");
        assert_eq!(&draft.payload[..], b"bye");
        assert!(draft.retain);
        for cut in (0..v.len()).filter(|&c| c != v.len() - 8) {
            assert!(decode(&v[..cut]).is_none(), "a cut at {cut} read back");
        }
    }
}
