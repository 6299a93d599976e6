//! The outbound QoS 1/2 flows of a bridge, without I/O: which queued records are in flight
//! at the remote, at which step, and how far the durable queue may be consumed.
//!
//! A record's packet identifier is derived from its sequence number in the queue, so it
//! is the same after a reconnect and after a restart: a QoS 2 message sent again (DUP)
//! after a crash reaches the remote under the identifier the remote remembers, and is
//! not delivered twice. Records complete in any order; the queue is consumed through the
//! longest completed prefix.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::codec::PacketId;

/// The packet identifier of queue record `seq` (1..=65535, repeating every 65,535
/// records).
pub fn packet_id(seq: u64) -> PacketId {
    let n = u16::try_from(seq % 65_535).unwrap_or(0) + 1;
    PacketId::new(n).unwrap_or(PacketId::FIRST)
}

/// Where an outbound message stands at the remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// QoS 1, waiting for PUBACK.
    AwaitAck,
    /// QoS 2, waiting for PUBREC.
    AwaitRec,
    /// QoS 2, PUBREL sent (or to be sent), waiting for PUBCOMP.
    AwaitComp,
}

/// What an acknowledgement from the remote did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// Record `seq` is done (PUBACK, PUBCOMP, or a PUBREC with an error code).
    Done(u64),
    /// Record `seq` was received by the remote (PUBREC): mark it released, then PUBREL.
    Received(u64),
    /// Nothing of ours waits for it (a late or repeated acknowledgement).
    Unknown,
}

/// The in-flight state of one bridge's outbound queue.
#[derive(Debug)]
pub struct Outbox {
    inflight: BTreeMap<u64, Step>,
    ids: HashMap<u16, u64>,
    /// Completed records above `consumed`.
    done: BTreeSet<u64>,
    /// Every record up to here is done (and may be consumed from the queue).
    consumed: u64,
    /// The highest record read from the queue and sent (or skipped).
    pub sent_through: u64,
    /// A packet identifier in use by something else (a SUBSCRIBE awaiting SUBACK).
    reserved: Option<u16>,
}

impl Outbox {
    /// An outbox over a queue whose oldest waiting record is `first`.
    pub fn new(first: u64) -> Outbox {
        let consumed = first.saturating_sub(1);
        Outbox {
            inflight: BTreeMap::new(),
            ids: HashMap::new(),
            done: BTreeSet::new(),
            consumed,
            sent_through: consumed,
            reserved: None,
        }
    }

    /// Records in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// After a reconnect: everything in flight is sent again, from the oldest record not
    /// done. `first` is the queue's oldest record now (a full queue drops its oldest).
    /// Answers the QoS 2 records the queue dropped while they were in flight: the remote
    /// may hold their identifiers, so each is owed a PUBREL (sent again now, awaiting
    /// PUBCOMP) rather than abandoned.
    pub fn resume(&mut self, first: u64) -> Vec<u64> {
        self.skip_to(first);
        let owed: Vec<u64> = (self.inflight.iter())
            .filter(|(seq, step)| **seq < first && **step != Step::AwaitAck)
            .map(|(seq, _)| *seq)
            .collect();
        self.inflight.clear();
        self.ids.clear();
        self.reserved = None;
        self.sent_through = self.consumed;
        for &seq in &owed {
            self.inflight.insert(seq, Step::AwaitComp);
            self.ids.insert(packet_id(seq).get(), seq);
        }
        owed
    }

    /// Forgets records before `first` (dropped from the queue by drop-oldest). What is in
    /// flight stays in flight: its acknowledgement still comes, and a QoS 2 flow is still
    /// to be completed.
    pub fn skip_to(&mut self, first: u64) {
        if first.saturating_sub(1) > self.consumed {
            self.consumed = first - 1;
            self.done = self.done.split_off(&first);
            self.advance();
            self.sent_through = self.sent_through.max(self.consumed);
        }
    }

    /// A packet identifier for something other than a record (SUBSCRIBE), one that no
    /// record of the window can have: the last consumed record's, or below it the first
    /// not in use.
    pub fn reserve(&mut self) -> PacketId {
        let mut seq = self.consumed;
        let mut id = packet_id(seq);
        for _ in 0..u16::MAX {
            if !self.ids.contains_key(&id.get()) {
                break;
            }
            seq = seq.wrapping_sub(1);
            id = packet_id(seq);
        }
        self.reserved = Some(id.get());
        id
    }

    /// The reserved identifier is free again.
    pub fn unreserve(&mut self, id: PacketId) {
        if self.reserved == Some(id.get()) {
            self.reserved = None;
        }
    }

    /// Whether record `seq` was completed already (it is not sent again).
    pub fn is_done(&self, seq: u64) -> bool {
        seq <= self.consumed || self.done.contains(&seq)
    }

    /// Whether record `seq` can be sent now: its identifier is not in use.
    pub fn can_send(&self, seq: u64) -> bool {
        let id = packet_id(seq).get();
        !self.ids.contains_key(&id) && self.reserved != Some(id)
    }

    /// Record `seq` was sent and waits at `step`.
    pub fn sent(&mut self, seq: u64, step: Step) {
        self.sent_through = self.sent_through.max(seq);
        self.inflight.insert(seq, step);
        self.ids.insert(packet_id(seq).get(), seq);
    }

    /// Record `seq` needs nothing from the remote (sent at QoS 0, expired, no longer
    /// selected): done.
    pub fn skipped(&mut self, seq: u64) {
        self.sent_through = self.sent_through.max(seq);
        self.complete(seq);
    }

    /// PUBACK for `id`.
    pub fn puback(&mut self, id: PacketId) -> Acked {
        self.finish(id, Step::AwaitAck)
    }

    /// PUBCOMP for `id`.
    pub fn pubcomp(&mut self, id: PacketId) -> Acked {
        self.finish(id, Step::AwaitComp)
    }

    /// PUBREC for `id`; `refused` when it carries an error code (the flow ends there).
    pub fn pubrec(&mut self, id: PacketId, refused: bool) -> Acked {
        let Some(&seq) = self.ids.get(&id.get()) else {
            return Acked::Unknown;
        };
        match self.inflight.get_mut(&seq) {
            Some(step @ Step::AwaitRec) if !refused => {
                *step = Step::AwaitComp;
                Acked::Received(seq)
            }
            Some(Step::AwaitRec) => {
                self.complete(seq);
                Acked::Done(seq)
            }
            _ => Acked::Unknown,
        }
    }

    fn finish(&mut self, id: PacketId, at: Step) -> Acked {
        let Some(&seq) = self.ids.get(&id.get()) else {
            return Acked::Unknown;
        };
        if self.inflight.get(&seq) != Some(&at) {
            return Acked::Unknown;
        }
        self.complete(seq);
        Acked::Done(seq)
    }

    fn complete(&mut self, seq: u64) {
        if self.inflight.remove(&seq).is_some() {
            self.ids.remove(&packet_id(seq).get());
        }
        if seq > self.consumed {
            self.done.insert(seq);
        }
        self.advance();
    }

    fn advance(&mut self) {
        while self.done.first() == Some(&(self.consumed + 1)) {
            self.done.pop_first();
            self.consumed += 1;
        }
    }

    /// Every record up to here is done.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(seq: u64) -> PacketId {
        packet_id(seq)
    }

    #[test]
    fn identifiers_repeat_every_65535_records() {
        assert_eq!(packet_id(0).get(), 1);
        assert_eq!(packet_id(1).get(), 2);
        assert_eq!(packet_id(65_534).get(), 65_535);
        assert_eq!(packet_id(65_535).get(), 1);
    }

    #[test]
    fn qos1_and_qos2_flows_and_the_consumed_prefix() {
        let mut o = Outbox::new(1);
        o.sent(1, Step::AwaitAck);
        o.sent(2, Step::AwaitRec);
        o.sent(3, Step::AwaitAck);
        assert_eq!(o.in_flight(), 3);
        assert_eq!(o.puback(id(3)), Acked::Done(3));
        assert_eq!(o.consumed(), 0, "1 and 2 are not done");
        assert_eq!(o.pubcomp(id(2)), Acked::Unknown, "PUBCOMP before PUBREC");
        assert_eq!(o.pubrec(id(2), false), Acked::Received(2));
        assert_eq!(o.puback(id(2)), Acked::Unknown, "a PUBACK for a QoS 2 flow");
        assert_eq!(o.puback(id(1)), Acked::Done(1));
        assert_eq!(o.consumed(), 1);
        assert_eq!(o.pubcomp(id(2)), Acked::Done(2));
        assert_eq!(o.consumed(), 3);
        assert_eq!(o.in_flight(), 0);
        assert_eq!(o.puback(id(1)), Acked::Unknown, "repeated");
    }

    #[test]
    fn a_refused_pubrec_ends_the_flow() {
        let mut o = Outbox::new(5);
        o.sent(5, Step::AwaitRec);
        assert_eq!(o.pubrec(id(5), true), Acked::Done(5));
        assert_eq!(o.consumed(), 5);
    }

    #[test]
    fn resume_sends_again_what_is_not_done() {
        let mut o = Outbox::new(1);
        for s in 1..=4 {
            o.sent(s, Step::AwaitAck);
        }
        o.puback(id(2));
        assert!(o.resume(1).is_empty());
        assert_eq!(o.in_flight(), 0);
        assert_eq!(o.sent_through, 0);
        assert!(!o.is_done(1) && o.is_done(2) && !o.is_done(3));
        // The queue dropped its two oldest while disconnected.
        assert!(o.resume(3).is_empty());
        assert_eq!(o.consumed(), 2);
        assert_eq!(o.sent_through, 2);
        assert!(!o.is_done(3));
    }

    #[test]
    fn qos2_flows_the_queue_dropped_are_owed_a_pubrel() {
        let mut o = Outbox::new(1);
        o.sent(1, Step::AwaitRec);
        o.sent(2, Step::AwaitRec);
        o.sent(3, Step::AwaitAck);
        o.sent(4, Step::AwaitRec);
        assert_eq!(o.pubrec(id(2), false), Acked::Received(2));
        // While connected, records 1..=3 are dropped from the queue: they stay in flight.
        o.skip_to(4);
        assert_eq!(o.consumed(), 3);
        assert_eq!(o.in_flight(), 4);
        assert_eq!(o.puback(id(3)), Acked::Done(3));
        // Disconnected: 1 and 2 (QoS 2, dropped) are owed a PUBREL; 4 is sent again.
        assert_eq!(o.resume(4), [1, 2]);
        assert_eq!(o.in_flight(), 2);
        assert!(!o.can_send(65_536), "record 1's identifier is in use");
        assert_ne!(o.reserve(), id(1));
        assert_ne!(o.reserve(), id(2));
        assert_eq!(o.pubcomp(id(1)), Acked::Done(1));
        assert_eq!(o.pubcomp(id(2)), Acked::Done(2));
        assert_eq!(o.consumed(), 3);
        assert_eq!(o.sent_through, 3);
    }

    #[test]
    fn the_reserved_identifier_is_not_given_to_a_record() {
        let mut o = Outbox::new(1);
        let sub = o.reserve();
        assert_eq!(sub, packet_id(0));
        assert!(o.can_send(1));
        assert!(!o.can_send(65_535), "same identifier as record 0");
        o.unreserve(sub);
        assert!(o.can_send(65_535));
        o.sent(1, Step::AwaitAck);
        assert!(!o.can_send(65_536));
    }

    proptest! {
        /// Against a model: whatever the order of acknowledgements, the consumed prefix is
        /// the longest run of completed records, nothing completes twice, and the window
        /// empties once everything is acknowledged.
        #[test]
        fn consumed_is_the_completed_prefix(
            qos2 in prop::collection::vec(any::<bool>(), 1..40),
            order in Just(()).prop_perturb(|_, mut rng| {
                let mut v: Vec<usize> = (0..40).collect();
                for i in (1..v.len()).rev() {
                    let j = (rng.next_u32() as usize) % (i + 1);
                    v.swap(i, j);
                }
                v
            }),
        ) {
            let n = qos2.len() as u64;
            let mut o = Outbox::new(1);
            for (i, q2) in qos2.iter().enumerate() {
                o.sent(i as u64 + 1, if *q2 { Step::AwaitRec } else { Step::AwaitAck });
            }
            let mut completed = BTreeSet::new();
            for i in order.into_iter().filter(|i| (*i as u64) < n) {
                let seq = i as u64 + 1;
                if qos2[i] {
                    prop_assert_eq!(o.pubrec(id(seq), false), Acked::Received(seq));
                    prop_assert_eq!(o.pubcomp(id(seq)), Acked::Done(seq));
                } else {
                    prop_assert_eq!(o.puback(id(seq)), Acked::Done(seq));
                }
                prop_assert_eq!(o.puback(id(seq)), Acked::Unknown);
                completed.insert(seq);
                let prefix = (1..=n).take_while(|s| completed.contains(s)).count() as u64;
                prop_assert_eq!(o.consumed(), prefix);
            }
            prop_assert_eq!(o.in_flight(), 0);
            prop_assert_eq!(o.consumed(), n);
        }
    }
}
