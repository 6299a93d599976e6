//! Persistent sessions moving between nodes. A connection whose session is not on its node
//! asks the others on `sandpiper.session` (JSON: the asking node, the client id, Clean
//! Start, the connecting principal, when it connected, and the asker's `principal_policy`).
//! Every other node answers to the asker's inbox: `0` and its name (not here, or here with
//! a newer connection, which keeps it), `1` (here, owned by another principal, refused), `3`
//! and its name (here: wait, the session is being taken from its connection; a `0` may
//! follow if the connection turns out newer), then the session in pieces of up
//! to 256 KiB (`2`, the piece's number (u32), whether it is the last (u8), then its bytes:
//! `session::Moved`), each with the giver's own inbox as reply subject. The asker waits for
//! the nodes it heard from lately, by name (a node that joined a moment ago and answers is
//! not taken for one of them), and for every node that said wait; a node connected to
//! NATS for less than 1.5 s (it may not have heard every heartbeat yet) also waits until
//! then for a node it does not know to say wait. It adopts
//! the session, writes it to its store, and once that is durable says so on the giver's
//! inbox (its node's name); the giver keeps the session if no word comes within 10 s.
//! Otherwise the session leaves: what reached it on the giver meanwhile, and for 2 s more
//! (messages on their way to the giver's subscriptions while the other nodes learn where
//! it is now), goes after it through JetStream as deliveries for that session (`wire` kind
//! 3); then the giver forgets it. With Clean Start the holder ends the session (publishing
//! its will) and answers `0`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{Cluster, PIECE, read};
use crate::config::PrincipalPolicy;
use crate::message::ClientId;
use crate::session::{Elsewhere, Found, Given, Moved, Principal, Sessions, Wanted};

/// Where nodes ask for sessions.
pub(super) const SUBJECT: &str = "sandpiper.session";
/// How long an asker waits for the other nodes' first answers (and between pieces).
const ASK_WAIT: Duration = Duration::from_secs(2);
/// How long an asker waits for a node that said it has the session (it takes it from its
/// connection, at most 5 s, and reads its queue).
const GIVER_WAIT: Duration = Duration::from_secs(10);
/// Most bytes of one session taken from another node.
const MAX_MOVED: usize = 1 << 30;
/// Sessions given at once; more asks wait.
const GIVING: usize = 8;
/// How long a session that left still takes what is routed to it here, for the node it
/// moved to.
const LINGER: Duration = Duration::from_secs(2);
/// How long a giver waits for the asker to hold the session.
const HELD_WAIT: Duration = Duration::from_secs(10);
/// Other nodes counted as answering: heard from within this.
const ALIVE: Duration = Duration::from_secs(3);
/// A node connected to NATS for less than this may not have heard every other node's
/// heartbeat (one a second) yet: its requests wait this long after the connection for a
/// node that has the session, whether it knows that node or not.
const YOUNG: Duration = Duration::from_millis(1500);

const NOTHING: u8 = 0;
const REFUSED: u8 = 1;
const PIECE_KIND: u8 = 2;
const WAIT: u8 = 3;

/// A request for a session.
#[derive(Debug, Serialize, Deserialize)]
struct Ask {
    node: String,
    client_id: String,
    clean: bool,
    user: Option<String>,
    listener: String,
    /// 0 refuse, 1 allow, 2 fresh.
    policy: u8,
    /// When the asking connection connected, Unix ms.
    since_ms: u64,
}

fn policy_byte(p: PrincipalPolicy) -> u8 {
    match p {
        PrincipalPolicy::Refuse => 0,
        PrincipalPolicy::Allow => 1,
        PrincipalPolicy::Fresh => 2,
    }
}

fn policy_from(b: u8) -> PrincipalPolicy {
    match b {
        1 => PrincipalPolicy::Allow,
        2 => PrincipalPolicy::Fresh,
        _ => PrincipalPolicy::Refuse,
    }
}

/// A piece of a session being given.
fn piece(seq: u32, last: bool, bytes: &[u8]) -> Bytes {
    let mut p = BytesMut::with_capacity(6 + bytes.len());
    p.put_u8(PIECE_KIND);
    p.put_u32(seq);
    p.put_u8(u8::from(last));
    p.put_slice(bytes);
    p.freeze()
}

/// Reads a piece: its number, whether it is the last, its bytes.
fn read_piece(m: &[u8]) -> Option<(u32, bool, &[u8])> {
    let (&kind, rest) = m.split_first()?;
    if kind != PIECE_KIND {
        return None;
    }
    let (seq, rest) = rest.split_first_chunk::<4>()?;
    let (&last, bytes) = rest.split_first()?;
    Some((u32::from_be_bytes(*seq), last != 0, bytes))
}

impl Elsewhere for Cluster {
    fn take(&self, wanted: Wanted) -> Pin<Box<dyn Future<Output = Found> + Send + 'static>> {
        let client = self.client.get().cloned().filter(|_| self.is_connected());
        let others: HashSet<Arc<str>> = read(&self.peers)
            .iter()
            .filter(|(_, p)| p.heard.elapsed() < ALIVE)
            .map(|(name, _)| name.clone())
            .collect();
        let ask = Ask {
            node: self.node.to_string(),
            client_id: wanted.client_id.as_str().to_owned(),
            clean: wanted.clean,
            user: wanted.principal.user.as_deref().map(str::to_owned),
            listener: wanted.principal.listener.to_string(),
            policy: policy_byte(wanted.policy),
            since_ms: wanted.since_ms,
        };
        let young = (self.connected_at())
            .map(|t| tokio::time::Instant::from_std(t + YOUNG))
            .filter(|u| *u > tokio::time::Instant::now());
        Box::pin(async move {
            let Some(client) = client.filter(|_| !others.is_empty() || young.is_some()) else {
                return Found::Nothing;
            };
            match ask_nodes(&client, &ask, others, young).await {
                Ok(found) => found,
                Err(e) => {
                    tracing::warn!(client_id = %ask.client_id, error = %e,
                        "cluster: cannot ask the other nodes for a session; a new one starts here");
                    Found::Nothing
                }
            }
        })
    }
}

/// An answer naming its node: `kind`, then the name.
fn named(kind: u8, node: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(1 + node.len());
    b.put_u8(kind);
    b.put_slice(node.as_bytes());
    b.freeze()
}

/// Asks the other nodes for a session and waits for the answers of `others` and of every
/// node that said it has the session (and, on a node that has just connected, until
/// `young` for a node it does not know yet to say so), or the session.
async fn ask_nodes(
    client: &async_nats::Client,
    ask: &Ask,
    mut others: HashSet<Arc<str>>,
    young: Option<tokio::time::Instant>,
) -> Result<Found, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(SUBJECT, inbox, serde_json::to_vec(ask)?.into())
        .await?;
    // Nodes that said they have the session.
    let mut waiting: HashSet<Arc<str>> = HashSet::new();
    // Pieces by giver (its reply subject): the bytes so far and the next number.
    let mut parts: std::collections::HashMap<String, (Vec<u8>, u32)> =
        std::collections::HashMap::new();
    let mut deadline = tokio::time::Instant::now() + ASK_WAIT;
    loop {
        let settled = others.is_empty() && waiting.is_empty();
        let end = match young {
            _ if !settled => deadline,
            Some(y) if y > tokio::time::Instant::now() => y.min(deadline),
            _ => break,
        };
        let Ok(Some(m)) = tokio::time::timeout_at(end, answers.next()).await else {
            if !settled {
                tracing::debug!(client_id = %ask.client_id, silent = ?others, waiting = ?waiting,
                    "cluster: not every node answered a session request");
            }
            break;
        };
        let name = || std::str::from_utf8(m.payload.get(1..).unwrap_or_default()).ok();
        match m.payload.first() {
            Some(&NOTHING) => {
                if let Some(n) = name() {
                    others.remove(n);
                    waiting.remove(n);
                }
            }
            Some(&REFUSED) => return Ok(Found::Refused),
            Some(&WAIT) => {
                if let Some(n) = name() {
                    others.remove(n);
                    waiting.insert(Arc::from(n));
                }
                deadline = tokio::time::Instant::now() + GIVER_WAIT;
            }
            _ => {
                let (Some(reply), Some((seq, last, bytes))) = (m.reply, read_piece(&m.payload))
                else {
                    continue;
                };
                deadline = tokio::time::Instant::now() + ASK_WAIT;
                let giver = reply.to_string();
                let (buf, next) = parts.entry(giver.clone()).or_default();
                if seq != *next || buf.len() + bytes.len() > MAX_MOVED {
                    tracing::warn!(client_id = %ask.client_id,
                        "cluster: a piece of a session from another node went missing; it stays there");
                    parts.remove(&giver);
                    continue;
                }
                buf.extend_from_slice(bytes);
                *next += 1;
                if !last {
                    continue;
                }
                let Some((bytes, _)) = parts.remove(&giver) else {
                    continue;
                };
                match Moved::decode(&bytes) {
                    Ok(moved) => {
                        let client = client.clone();
                        let node = Bytes::from(ask.node.clone());
                        let held = move || {
                            tokio::spawn(async move {
                                let _ = client.publish(reply, node).await;
                                let _ = client.flush().await;
                            });
                        };
                        return Ok(Found::Session(moved, Box::new(held)));
                    }
                    Err(e) => {
                        tracing::warn!(client_id = %ask.client_id, error = %e,
                            "cluster: a session from another node could not be read; it stays there");
                    }
                }
            }
        }
    }
    Ok(Found::Nothing)
}

impl Cluster {
    /// Answers other nodes' requests for sessions held here.
    pub(super) async fn give_sessions(
        self: &Arc<Self>,
        client: async_nats::Client,
        mut asks: async_nats::Subscriber,
        sessions: Arc<Sessions>,
    ) {
        let giving = Arc::new(tokio::sync::Semaphore::new(GIVING));
        while let Some(m) = asks.next().await {
            let Some(reply) = m.reply else {
                continue;
            };
            let ask: Ask = match serde_json::from_slice(&m.payload) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: unreadable session request");
                    continue;
                }
            };
            if ask.node == *self.node {
                continue;
            }
            // Most asks are for sessions that are not here: answered at once.
            if !sessions.holds(&ClientId::new(&ask.client_id)) {
                let _ = client.publish(reply, named(NOTHING, &self.node)).await;
                continue;
            }
            let _ = client.publish(reply.clone(), named(WAIT, &self.node)).await;
            let ties = *self.node < *ask.node;
            let giving = giving.clone();
            let (me, client, sessions) = (self.clone(), client.clone(), sessions.clone());
            tokio::spawn(async move {
                let Ok(_permit) = giving.acquire().await else {
                    return;
                };
                me.give(client, reply, ask, ties, sessions).await;
            });
        }
    }
}

impl Cluster {
    /// Gives the session `ask` wants, if it is here; once the asker holds it, sends after
    /// it what still reaches it here, then forgets it.
    async fn give(
        &self,
        client: async_nats::Client,
        reply: async_nats::Subject,
        ask: Ask,
        ties: bool,
        sessions: Arc<Sessions>,
    ) {
        let wanted = Wanted {
            client_id: ClientId::new(&ask.client_id),
            clean: ask.clean,
            principal: Principal {
                user: ask.user.as_deref().map(Arc::from),
                listener: Arc::from(ask.listener.as_str()),
            },
            policy: policy_from(ask.policy),
            since_ms: ask.since_ms,
            ties,
        };
        let (bytes, back) = match sessions.give(wanted).await {
            Given::Nothing => {
                let _ = client.publish(reply, named(NOTHING, &self.node)).await;
                return;
            }
            Given::Refused => {
                tracing::info!(client_id = %ask.client_id, node = %ask.node,
                    "cluster: session asked for by a connection of another principal: refused");
                let _ = client.publish(reply, Bytes::from_static(&[REFUSED])).await;
                return;
            }
            Given::Session(bytes, back) => (bytes, back),
        };
        let held = async {
            let inbox = client.new_inbox();
            let mut word = client.subscribe(inbox.clone()).await.ok()?;
            let pieces: Vec<&[u8]> = bytes.chunks(PIECE).collect();
            let n = pieces.len();
            for (i, p) in pieces.into_iter().enumerate() {
                let seq = u32::try_from(i).ok()?;
                let p = piece(seq, i + 1 == n, p);
                (client.publish_with_reply(reply.clone(), inbox.clone(), p))
                    .await
                    .ok()?;
            }
            tokio::time::timeout(HELD_WAIT, word.next()).await.ok()?
        };
        let node = held
            .await
            .and_then(|m| std::str::from_utf8(&m.payload).ok().map(Arc::<str>::from));
        let Some(node) = node.filter(|n| **n == *ask.node) else {
            tracing::warn!(client_id = %ask.client_id, node = %ask.node,
                "cluster: node {} did not take the session; it stays here", ask.node);
            sessions.keep(back);
            return;
        };
        let leaving = sessions.leave(back);
        let mut last = self.follow(&node, &leaving, leaving.take_queued().await);
        tokio::time::sleep(LINGER).await;
        leaving.stop_routing();
        last = last.max(self.follow(&node, &leaving, leaving.take_queued().await));
        if let Some(t) = last {
            let mut replicated = self.queue.replicated();
            let sent = replicated.wait_for(|r| *r >= t);
            if !matches!(tokio::time::timeout(HELD_WAIT, sent).await, Ok(Ok(_))) {
                tracing::warn!(client_id = %ask.client_id, node = %node,
                    "cluster: messages for a session that moved are not in JetStream yet");
            }
        }
        leaving.forget();
    }

    /// Sends `deliveries` after a session that moved to `node`: the last ticket.
    fn follow(
        &self,
        node: &Arc<str>,
        leaving: &crate::session::Leaving,
        deliveries: Vec<crate::message::Delivery>,
    ) -> Option<u64> {
        if deliveries.is_empty() {
            return None;
        }
        let n = deliveries.len();
        let client_id = leaving.client_id().as_str();
        let last = (self.queue).offer_to_session(node, client_id, deliveries);
        match last {
            Some(_) => tracing::debug!(client_id, node = %node, n,
                "cluster: messages that reached a session here sent after it"),
            None => tracing::warn!(client_id, node = %node, n,
                "cluster: messages that reached a session here are dropped: the queue to JetStream is full"),
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_read_back_and_bad_ones_are_none() {
        let p = piece(7, true, b"abc");
        assert_eq!(read_piece(&p), Some((7, true, &b"abc"[..])));
        for n in 0..6 {
            assert_eq!(read_piece(&p[..n]), None);
        }
        assert_eq!(read_piece(&[NOTHING]), None);
        for b in [
            PrincipalPolicy::Refuse,
            PrincipalPolicy::Allow,
            PrincipalPolicy::Fresh,
        ] {
            assert_eq!(policy_from(policy_byte(b)), b);
        }
    }
}
