//! Persistent sessions moving between nodes. A connection whose session is not on its node
//! asks the others on `sandpiper.session` (JSON: the asking node, the client id, Clean
//! Start, the connecting principal and the asker's `principal_policy`). Every other node
//! answers to the asker's inbox: `0` (not here), `1` (here, owned by another principal,
//! refused), or the session in pieces of up to 256 KiB (`2`, the piece's number (u32),
//! whether it is the last (u8), then its bytes: `session::Moved`), each with the giver's
//! own inbox as reply subject. The asker adopts the session, writes it to its store, and
//! once that is durable says so on the giver's inbox; the giver then forgets the session,
//! or keeps it if no word comes within 10 s. With Clean Start the holder ends the session
//! (publishing its will) and answers `0`.

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
/// How long a giver waits for the asker to hold the session.
const HELD_WAIT: Duration = Duration::from_secs(10);
/// Other nodes counted as answering: heard from within this.
const ALIVE: Duration = Duration::from_secs(3);

const NOTHING: u8 = 0;
const REFUSED: u8 = 1;
const PIECE_KIND: u8 = 2;

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
        let others = read(&self.peers)
            .values()
            .filter(|p| p.heard.elapsed() < ALIVE)
            .count();
        let ask = Ask {
            node: self.node.to_string(),
            client_id: wanted.client_id.as_str().to_owned(),
            clean: wanted.clean,
            user: wanted.principal.user.as_deref().map(str::to_owned),
            listener: wanted.principal.listener.to_string(),
            policy: policy_byte(wanted.policy),
        };
        Box::pin(async move {
            let Some(client) = client.filter(|_| others > 0) else {
                return Found::Nothing;
            };
            match ask_nodes(&client, &ask, others).await {
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

/// Asks the other nodes for a session and waits for `others` answers, or the session.
async fn ask_nodes(
    client: &async_nats::Client,
    ask: &Ask,
    others: usize,
) -> Result<Found, async_nats::Error> {
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(SUBJECT, inbox, serde_json::to_vec(ask)?.into())
        .await?;
    let mut answered = 0;
    // Pieces by giver (its reply subject): the bytes so far and the next number.
    let mut parts: std::collections::HashMap<String, (Vec<u8>, u32)> =
        std::collections::HashMap::new();
    let mut deadline = tokio::time::Instant::now() + ASK_WAIT;
    while answered < others {
        let Ok(Some(m)) = tokio::time::timeout_at(deadline, answers.next()).await else {
            tracing::debug!(client_id = %ask.client_id, answered, others,
                "cluster: not every node answered a session request");
            break;
        };
        match m.payload.first() {
            Some(&NOTHING) => answered += 1,
            Some(&REFUSED) => return Ok(Found::Refused),
            _ => {
                let (Some(reply), Some((seq, last, bytes))) = (m.reply, read_piece(&m.payload))
                else {
                    answered += 1;
                    continue;
                };
                deadline = tokio::time::Instant::now() + ASK_WAIT;
                let giver = reply.to_string();
                let (buf, next) = parts.entry(giver.clone()).or_default();
                if seq != *next {
                    tracing::warn!(client_id = %ask.client_id,
                        "cluster: a piece of a session from another node went missing; it stays there");
                    parts.remove(&giver);
                    answered += 1;
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
                        let held = move || {
                            tokio::spawn(async move {
                                let _ = client.publish(reply, Bytes::from_static(b"held")).await;
                                let _ = client.flush().await;
                            });
                        };
                        return Ok(Found::Session(moved, Box::new(held)));
                    }
                    Err(e) => {
                        tracing::warn!(client_id = %ask.client_id, error = %e,
                            "cluster: a session from another node could not be read; it stays there");
                        answered += 1;
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
        &self,
        client: async_nats::Client,
        mut asks: async_nats::Subscriber,
        sessions: Arc<Sessions>,
    ) {
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
            tokio::spawn(give(client.clone(), reply, ask, sessions.clone()));
        }
    }
}

/// Gives the session `ask` wants, if it is here, and settles it once the asker answers.
async fn give(
    client: async_nats::Client,
    reply: async_nats::Subject,
    ask: Ask,
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
    };
    let (bytes, back) = match sessions.give(wanted).await {
        Given::Nothing => {
            let _ = client.publish(reply, Bytes::from_static(&[NOTHING])).await;
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
            (client.publish_with_reply(reply.clone(), inbox.clone(), piece(seq, i + 1 == n, p)))
                .await
                .ok()?;
        }
        tokio::time::timeout(HELD_WAIT, word.next()).await.ok()?
    };
    let held = held.await.is_some();
    if !held {
        tracing::warn!(client_id = %ask.client_id, node = %ask.node,
            "cluster: node {} did not take the session; it stays here", ask.node);
    }
    sessions.settle(back, held);
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
