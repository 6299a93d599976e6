//! The socket loop: reads, decodes and dispatches packets, fills the write buffer from
//! the mailbox, holds acknowledgements until the store has made them durable, and closes.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::Rejection;
use crate::codec::{self, Disconnect, Packet, PublishQoS, QoS, ReasonCode};
use crate::message::Delivery;
use crate::message::Draft;
use crate::plugins::events::{DropReason, Event};
use crate::plugins::flow::Fate;
use crate::session::Kick;

use super::{CLOSE_FLUSH, Close, Conn, MAX_READ, MIN_READ, OUT_HIGH_WATER, Ticket, arm};

/// Waits until the congested queue has room (true) or the deadline passes (false).
pub(super) async fn wait_for_room(paused: &Option<super::Pause>) -> bool {
    match paused {
        Some(p) => tokio::time::timeout_at(p.1, p.0.wait_for_room())
            .await
            .is_ok(),
        None => std::future::pending().await,
    }
}

/// How long a connection with nothing to do keeps the main loop's state before it drops
/// it and waits in [`Conn::idle`], which holds a few hundred bytes less: most of a fleet's
/// connections are idle most of the time, and their memory is what bounds how many a
/// broker holds.
const IDLE_AFTER: Duration = Duration::from_millis(500);

/// How the main loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Served {
    /// The connection ends.
    Closed(Close),
    /// Nothing to do: no input, output, held acknowledgement or pause pending.
    Idle,
}

/// Stop reading from the client while this much is waiting to be written to it.
const OUT_READ_LIMIT: usize = 1024 * 1024;

/// Most store tickets a connection's held acknowledgements may wait for: beyond, it stops
/// handling and reading packets until the store has caught up, so a client cannot queue
/// unbounded work for the store (each ticket is one submission).
const MAX_HELD: usize = 1024;

/// The next change of a watch, or never without one.
async fn changed(
    w: &mut Option<tokio::sync::watch::Receiver<u64>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match w {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

impl Conn {
    /// The main loop, until the client goes, breaks the protocol, is taken over or kicked,
    /// `shutdown` (the listener's stop) is cancelled, or the connection has nothing to do
    /// when its timer fires ([`Served::Idle`]: the caller drops this loop's state and
    /// waits in [`Conn::idle`]).
    pub(super) async fn serve<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        inbuf: &mut BytesMut,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Served
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mailbox = self.state.mailbox.clone();
        let ka =
            (self.keep_alive_ms > 0).then(|| Duration::from_millis(u64::from(self.keep_alive_ms)));
        let mut read_hint = MIN_READ;
        // A packet started but not finished must be within `packet_timeout` (a client that
        // sends half a packet and stalls is dropped, not kept by its keep alive).
        let packet_timeout = Duration::from_secs(self.config.mqtt.packet_timeout);
        let mut partial_since: Option<tokio::time::Instant> = None;
        // One timer serves every deadline (keep alive, partial packet, the idle check): it
        // fires at the earliest one or before, and its branch works out which has passed.
        let start = tokio::time::Instant::now();
        let first = ka.map_or(start + IDLE_AFTER, |k| {
            (self.last_rx + k).min(start + IDLE_AFTER)
        });
        let timer = tokio::time::sleep_until(first);
        tokio::pin!(timer);
        // A kick or something the admin API asked while the connection was idle.
        if let Some(close) = self.kicked() {
            return Served::Closed(close);
        }
        self.answer_questions();

        // Packets already read: with CONNECT, or by the idle wait.
        if let Some(close) = self.handle_input(inbuf) {
            return Served::Closed(close);
        }
        if !inbuf.is_empty() {
            partial_since = Some(start);
            arm(timer.as_mut(), start + packet_timeout);
        }
        loop {
            self.fill();
            if !self.held.is_empty() {
                self.release_held();
            }
            // Packets read before the held acknowledgements filled up wait in `inbuf`:
            // handled as soon as there is room, whichever branch made it (the client may
            // be sending nothing more until they are answered).
            if self.input_stopped && self.held.len() < MAX_HELD && self.paused.is_none() {
                let before = inbuf.len();
                if let Some(close) = self.handle_input(inbuf) {
                    return Served::Closed(close);
                }
                if inbuf.is_empty() {
                    partial_since = None;
                } else if inbuf.len() < before {
                    let now = tokio::time::Instant::now();
                    partial_since = Some(now);
                    arm(timer.as_mut(), now + packet_timeout);
                }
            }
            let want_read = self.out.len() < OUT_READ_LIMIT
                && self.paused.is_none()
                && self.held.len() < MAX_HELD;
            if !want_read && partial_since.is_some() {
                // Not reading is our doing: the client's time to finish its packet starts
                // again when we read again.
                partial_since = Some(tokio::time::Instant::now());
            }
            if want_read && inbuf.capacity() - inbuf.len() < read_hint {
                if inbuf.is_empty() && inbuf.capacity() > 4 * read_hint {
                    // Give back what a burst grew.
                    *inbuf = BytesMut::with_capacity(read_hint);
                } else {
                    // A packet larger than what is here: room for all of it at once (within
                    // the size limit), so what has come is copied once, not at every read.
                    let max = usize::try_from(self.config.mqtt.max_packet_size).unwrap_or(0);
                    let rest = (codec::packet_len(inbuf))
                        .filter(|len| *len <= max)
                        .map_or(0, |len| len.saturating_sub(inbuf.len()));
                    inbuf.reserve(read_hint.max(rest));
                }
            }
            self.out.shrink(OUT_HIGH_WATER * 4);
            let spare = inbuf.capacity() - inbuf.len();
            // The timer is polled only when one of its deadlines can matter: a keep alive,
            // a partial packet, or the idle check of a connection with nothing pending (a
            // busy connection without a keep alive does not spend the task's budget on it
            // at every turn; once quiet it finds an elapsed timer and goes idle at once).
            let timer_matters = ka.is_some() || partial_since.is_some() || self.quiet(inbuf);
            let paused = self.paused.as_deref().cloned();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Served::Closed(Close::Shutdown),
                r = super::out::write(wr, &mut self.out), if !self.out.is_empty() => {
                    match r {
                        Ok(0) | Err(_) => return Served::Closed(Close::Lost),
                        Ok(_) => {}
                    }
                }
                r = rd.read_buf(inbuf), if want_read => {
                    match r {
                        Ok(0) | Err(_) => return Served::Closed(Close::Lost),
                        Ok(n) => {
                            read_hint = if n >= spare {
                                (read_hint * 2).min(MAX_READ)
                            } else if n < read_hint / 4 {
                                (read_hint / 2).max(MIN_READ)
                            } else {
                                read_hint
                            };
                            self.last_rx = tokio::time::Instant::now();
                            let before = inbuf.len();
                            if let Some(close) = self.handle_input(inbuf) {
                                return Served::Closed(close);
                            }
                            if std::mem::take(&mut self.handed_on) && self.broker.one_worker {
                                // On one worker the subscribers' connections run only
                                // when this one yields: let them write what we handed
                                // on before our acknowledgements go out (a publisher
                                // waiting for its PUBACK is not slower for it; the
                                // subscriber gets the message one write earlier).
                                tokio::task::yield_now().await;
                            }
                            if inbuf.is_empty() {
                                partial_since = None;
                            } else if partial_since.is_none() || inbuf.len() < before {
                                // A new packet started (or one completed and the next began).
                                partial_since = Some(self.last_rx);
                                arm(timer.as_mut(), self.last_rx + packet_timeout);
                            }
                        }
                    }
                }
                _ = mailbox.notified() => {
                    // A kick wakes the mailbox.
                    if let Some(close) = self.kicked() {
                        return Served::Closed(close);
                    }
                    self.answer_questions();
                }
                room = wait_for_room(&paused), if paused.is_some() => {
                    if !room && let Some((mb, _)) = &paused {
                        mb.mark_stalled();
                    }
                    self.paused = None;
                    // Packets read before the pause, not handled yet.
                    if let Some(close) = self.handle_input(inbuf) {
                        return Served::Closed(close);
                    }
                    if inbuf.is_empty() {
                        partial_since = None;
                    }
                }
                r = self.committed.changed(), if !self.held.is_empty() || self.waiting_for_store => {
                    if r.is_err() {
                        // The store is gone (shutting down): nothing more becomes durable.
                        return Served::Closed(Close::Shutdown);
                    }
                    self.release_held();
                }
                r = changed(&mut self.replicated), if !self.held.is_empty() => {
                    if r.is_err() {
                        // The cluster's link is gone (shutting down).
                        return Served::Closed(Close::Shutdown);
                    }
                    self.release_held();
                }
                _ = &mut timer, if timer_matters => {
                    let now = tokio::time::Instant::now();
                    // A paused connection is not reading: its partial packet cannot progress.
                    let partial_due = partial_since.filter(|_| want_read).map(|t| t + packet_timeout);
                    if partial_due.is_some_and(|due| due <= now) {
                        tracing::info!("partial packet not completed within {}s: closing", packet_timeout.as_secs());
                        return Served::Closed(Close::Lost);
                    }
                    if self.paused.is_some() || self.held.len() >= MAX_HELD {
                        // Not reading because of the broker (acknowledgements held for a
                        // slow store, a congested subscriber): what the client sent waits
                        // unread, so its silence is ours. The keep alive counts again from
                        // when reading resumes. (A client that does not read what we send
                        // gets no such grace.)
                        self.last_rx = self.last_rx.max(now);
                    }
                    let ka_due = ka.map(|limit| self.last_rx + limit);
                    if ka_due.is_some_and(|due| due <= now) {
                        tracing::info!("keep alive timeout");
                        return Served::Closed(Close::KeepAlive);
                    }
                    if self.quiet(inbuf) {
                        return Served::Idle;
                    }
                    // Busy: look again later (a partial packet or a keep alive may be due
                    // before).
                    let mut next = now + IDLE_AFTER;
                    for due in [partial_due, ka_due].into_iter().flatten() {
                        next = next.min(due);
                    }
                    timer.as_mut().reset(next);
                }
            }
        }
    }

    /// Waits for something to do, holding as little state as a connection with a task can
    /// (a plain TCP connection parks instead, see [`super::park`]): the next bytes from the
    /// client (into the read buffer, empty on entry), a delivery, question or kick through
    /// the mailbox, or the listener's stop. The keep alive has no timer here: the
    /// broker's watch ([`super::keepalive`]) wakes the mailbox at its deadline. `None`:
    /// serve again.
    pub(super) async fn idle<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut R,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Option<Close> {
        if let Some(close) = self.watch_keep_alive() {
            return Some(close);
        }
        // A few bytes are enough to learn that the client speaks; the main loop reads the
        // rest with its own buffer.
        let mut first = [0u8; 8];
        let woken = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Some(Close::Shutdown),
            r = rd.read(&mut first) => match r {
                Ok(0) | Err(_) => return Some(Close::Lost),
                Ok(n) => {
                    self.last_rx = tokio::time::Instant::now();
                    self.inbuf.extend_from_slice(&first[..n]);
                    return None;
                }
            },
            _ = self.state.mailbox.notified() => true,
        };
        // A delivery, a question, a kick, or the keep alive's watch.
        if woken && let Some(close) = self.kicked().or_else(|| self.watch_keep_alive()) {
            return Some(close);
        }
        None
    }

    /// Runs the main loop over the connection's read buffer; when it finds nothing to do,
    /// drops the buffers' allocations (both are empty) before the idle wait.
    pub(super) async fn serve_boxed<R, W>(
        &mut self,
        rd: &mut R,
        wr: &mut W,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> Served
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut inbuf = std::mem::take(&mut self.inbuf);
        let served = self.serve(rd, wr, &mut inbuf, shutdown).await;
        if served == Served::Idle {
            self.out = super::out::Out::default();
        } else {
            self.inbuf = inbuf;
        }
        served
    }

    /// Closes the connection if the client has been silent for 1.5 × its keep alive;
    /// otherwise makes sure the broker's watch wakes it at that deadline.
    pub(super) fn watch_keep_alive(&mut self) -> Option<Close> {
        if self.keep_alive_ms == 0 {
            return None;
        }
        let now = tokio::time::Instant::now();
        let due = self.last_rx + Duration::from_millis(u64::from(self.keep_alive_ms));
        if due <= now {
            tracing::info!("keep alive timeout");
            return Some(Close::KeepAlive);
        }
        let watch = &self.broker.keep_alives;
        if self.ka_watch != 0 && watch.tick_of(now, false) >= self.ka_watch {
            // That wake-up has come (or is coming now).
            self.ka_watch = 0;
        }
        if self.ka_watch == 0 {
            // A pending earlier wake-up is enough: the deadline only moves later, and it
            // brings the connection back here to ask for the next one.
            let at = due.min(now + super::keepalive::HORIZON);
            self.ka_watch = watch.tick_of(at, true);
            watch.watch(self.ka_watch, &self.state.mailbox);
        }
        None
    }

    /// Whether the connection has nothing to do until something happens: nothing read
    /// and not handled, to write, held for the store or taken from the mailbox, and no
    /// pause.
    fn quiet(&self, inbuf: &BytesMut) -> bool {
        inbuf.is_empty()
            && self.out.is_empty()
            && self.held.is_empty()
            && self.batch.is_empty()
            && self.pending.is_empty()
            && self.paused.is_none()
            && !self.waiting_for_store
            && !self.input_stopped
    }

    /// Whether the registry kicked this connection: `Some` closes it. A kick wakes the
    /// mailbox and is read from it.
    pub(super) fn kicked(&self) -> Option<Close> {
        match self.state.mailbox.kicked()? {
            Kick::TakenOver => Some(Close::TakenOver),
            Kick::Admin => {
                tracing::info!("disconnected by an operator (admin API)");
                Some(Close::Admin)
            }
        }
    }

    /// Decodes and handles every complete packet in `inbuf`.
    /// Stops early while a subscriber we published to is congested: the rest waits in
    /// `inbuf` until it has room, so one read cannot overrun a queue.
    pub(super) fn handle_input(&mut self, inbuf: &mut BytesMut) -> Option<Close> {
        let close = self.decode_input(inbuf);
        // Publishes before the packet that closes were accepted: they are answered first.
        self.flush_pending().or(close)
    }

    pub(super) fn decode_input(&mut self, inbuf: &mut BytesMut) -> Option<Close> {
        let limits = self.config.mqtt.decode_limits();
        loop {
            self.input_stopped = self.paused.is_some() || self.held.len() >= MAX_HELD;
            if self.input_stopped {
                return None;
            }
            match codec::decode_packet_limited(inbuf, self.version, &limits) {
                Ok(Some(p)) => {
                    // Answers keep the order of the packets they answer.
                    if !matches!(p, Packet::Publish(_))
                        && let Some(close) = self.flush_pending()
                    {
                        return Some(close);
                    }
                    if let Some(close) = self.handle(p) {
                        return Some(close);
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    tracing::info!(error = %e, "bad packet: closing");
                    return Some(Close::Error(e.reason_code()));
                }
            }
        }
    }

    /// Runs the transform hook over the publishes waiting for it, then routes and answers
    /// each in order.
    pub(super) fn flush_pending(&mut self) -> Option<Close> {
        if self.pending.is_empty() {
            return None;
        }
        let (mut drafts, flows): (Vec<Draft>, Vec<PublishQoS>) =
            std::mem::take(&mut self.pending).into_iter().unzip();
        let mut fates = vec![Fate::Route; drafts.len()];
        let pipeline = self.broker.pipeline.clone();
        pipeline.transform(&self.origin(), &mut drafts, &mut fates);
        for ((d, flow), fate) in drafts.into_iter().zip(flows).zip(fates) {
            let r = match fate {
                Fate::Route => {
                    let msg = self.message(d);
                    self.accept_publish(Some(&msg), flow)
                }
                Fate::Drop => {
                    tracing::debug!(topic = %d.topic.as_str(), "PUBLISH dropped by a transform plugin");
                    self.dropped(String::new(), d.topic.as_str(), DropReason::Plugin);
                    crate::metrics::inc(crate::metrics::C::DroppedPlugin);
                    self.accept_publish(None, flow)
                }
                Fate::Reject(rejection) => {
                    tracing::debug!(topic = %d.topic.as_str(), ?rejection, "PUBLISH rejected by a transform plugin");
                    match rejection {
                        _ if !self.version.is_v5() => self.accept_publish(None, flow),
                        Rejection::Ack(reason) => self.refuse_publish(flow, reason),
                        Rejection::Disconnect(reason) => Err(reason),
                    }
                }
            };
            if let Err(reason) = r {
                return Some(Close::Error(reason));
            }
        }
        None
    }

    /// Sends the connection's last words, publishes or keeps the will, and gives the session
    /// back to the registry.
    pub(super) async fn finish<W: AsyncWrite + Unpin>(mut self, close: Close, wr: &mut W) {
        tracing::debug!(?close, "closing");
        if self.broker.plugins.wants_events() {
            let reason = match close {
                Close::Normal => Some(0),
                Close::ClientWithWill => Some(ReasonCode::DisconnectWithWill.code()),
                other => other.reason().map(ReasonCode::code),
            };
            self.broker.plugins.emit(Event::Disconnected {
                client: self.gate.client().clone(),
                reason,
            });
        }
        // From here on the session is offline: QoS 0 messages are no longer accepted for it
        // and those still queued are dropped (MQTT-3.1.2-5 makes keeping them optional).
        self.state.mailbox.set_online(false);
        self.state.mailbox.extract(|d| d.qos == QoS::AtMostOnce);
        if let Some(&(last, _)) = self.held.back() {
            // Acknowledgements promised on durability go out only once durable.
            let mut committed = self.committed.clone();
            let mut replicated = self.replicated.clone();
            let _ = tokio::time::timeout(CLOSE_FLUSH, async move {
                let _ = committed.wait_for(|c| *c >= last.store).await;
                if let Some(r) = &mut replicated {
                    let _ = r.wait_for(|c| *c >= last.replicated).await;
                }
            })
            .await;
            self.release_held();
            self.held.clear();
        }
        if self.version.is_v5()
            && let Some(reason) = close.reason()
        {
            self.send(&Packet::Disconnect(Disconnect::new(reason)));
        }
        if !self.out.is_empty() {
            let _ =
                tokio::time::timeout(CLOSE_FLUSH, super::out::write_all(wr, &mut self.out)).await;
        }
        let _ = tokio::time::timeout(CLOSE_FLUSH, wr.shutdown()).await;
        // Deliveries taken from the mailbox but not sent go back to it, in order.
        let unsent = std::mem::take(&mut self.batch);
        if !unsent.is_empty() {
            let kept: Vec<Delivery> = unsent
                .into_iter()
                .filter(|d| d.qos != QoS::AtMostOnce)
                .collect();
            self.state.mailbox.unshift(kept.into_iter());
        }
        if self.will.is_some()
            && let Some(cluster) = &self.broker.cluster
        {
            cluster.will_cleared(self.conn_id, &self.state.client_id);
        }
        let will = match close {
            Close::Normal | Close::Shutdown => None,
            _ => self.will.take().map(|w| *w),
        };
        self.broker.sessions.detach(self.conn_id, self.state, will);
    }

    /// Encodes a packet into the write buffer, behind any packet still held for the store.
    pub(super) fn send(&mut self, p: &Packet) {
        self.send_after(None, p);
    }

    /// Encodes a packet to be written once store ticket `ticket` is durable (a PUBACK,
    /// PUBREC or SUBACK that promises what is on disk). Output keeps its order: anything
    /// sent after a held packet waits for it.
    pub(super) fn send_after(&mut self, ticket: Option<u64>, p: &Packet) {
        self.send_when(Ticket::store(ticket), p);
    }

    /// Encodes a packet to be written once `ticket` is durable: in the store and, for a
    /// message other nodes of a cluster take, in JetStream.
    pub(super) fn send_when(&mut self, ticket: Ticket, p: &Packet) {
        let last = self.held.back().map(|(t, _)| *t);
        let ticket = last.map_or(ticket, |l| l.max(ticket));
        if last.is_none() && self.durable(ticket) {
            if let Err(e) = self.out.encode(p, self.version) {
                tracing::warn!(error = %e, packet = p.name(), "cannot encode packet");
            }
            return;
        }
        let mut buf = match self.held.pop_back() {
            Some((t, buf)) if t == ticket => buf,
            Some(other) => {
                self.held.push_back(other);
                BytesMut::new()
            }
            None => BytesMut::new(),
        };
        if let Err(e) = codec::encode_packet(p, self.version, &mut buf) {
            tracing::warn!(error = %e, packet = p.name(), "cannot encode packet");
        }
        self.held.push_back((ticket, buf));
    }

    /// Whether what `t` waits for is durable.
    fn durable(&self, t: Ticket) -> bool {
        t.store <= *self.committed.borrow()
            && (t.replicated == 0
                || (self.replicated.as_ref()).is_some_and(|r| t.replicated <= *r.borrow()))
    }

    /// Moves held packets whose tickets are durable to the write buffer.
    pub(super) fn release_held(&mut self) {
        while let Some(&(t, _)) = self.held.front()
            && self.durable(t)
        {
            if let Some((_, buf)) = self.held.pop_front() {
                self.out.extend_from_slice(&buf);
            }
        }
    }

    /// Stops reading from this publisher until `congested` (a subscriber's queue, a
    /// bridge's) has room.
    pub(super) fn pause_for(&mut self, congested: Option<Arc<dyn crate::mailbox::Room>>) {
        if let Some(mb) = congested
            && self.paused.is_none()
        {
            crate::metrics::inc(crate::metrics::C::BackpressureWaits);
            let timeout = Duration::from_millis(self.config.mqtt.backpressure_timeout_ms);
            self.paused = Some(Box::new((mb, tokio::time::Instant::now() + timeout)));
        }
    }
}
