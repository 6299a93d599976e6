//! The QoS 1 and 2 flows of one session as a state machine without I/O (MQTT 5 §4.3,
//! §4.4, MQTT 3.1.1 §4.3): outbound packet identifiers and the stage of each message in
//! flight, and inbound QoS 2 identifiers received but not yet released. Each transition
//! says what happened; the connection sends the packets and makes the change durable.
//!
//! Outbound: QoS 1 `AwaitAck` → PUBACK ends it; QoS 2 `AwaitRec` → PUBREC → `AwaitComp`
//! (PUBREL sent) → PUBCOMP ends it; a PUBREC with an error code ends it too. An
//! acknowledgement for an identifier or a stage not in flight changes nothing. Inbound: a
//! QoS 2 PUBLISH records its identifier (a resend with the same identifier is not a new
//! message) until PUBREL releases it.

use std::collections::{HashSet, VecDeque};

use crate::codec::{PacketId, QoS};
use crate::message::{Delivery, Stage};

/// An outbound QoS 1/2 message not yet fully acknowledged.
#[derive(Debug, Clone)]
pub struct Inflight {
    /// Its packet identifier.
    pub id: PacketId,
    /// What was sent.
    pub delivery: Delivery,
    /// Where the handshake stands.
    pub stage: Stage,
}

/// What a PUBREC did.
#[derive(Debug)]
pub enum Received<'a> {
    /// The receiver refused the message (an error code): its flow ended.
    Refused(Inflight),
    /// Now `AwaitComp`: PUBREL is owed (again, for a repeated PUBREC).
    Release(&'a Inflight),
    /// No QoS 2 message with this identifier is in flight: PUBREL with 0x92.
    Unknown,
}

/// Why an inbound QoS 2 message was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveMaximumExceeded;

/// The QoS 1/2 state of one session.
#[derive(Debug)]
pub struct Flows {
    /// Made when the first QoS 1/2 message goes out: a session that never gets one
    /// (and every idle client's) keeps 8 bytes here instead of a queue header of 32.
    #[expect(
        clippy::box_collection,
        reason = "8 bytes inline instead of a queue header of 32 in every session"
    )]
    inflight: Option<Box<VecDeque<Inflight>>>,
    next_id: PacketId,
    /// Made at the first inbound QoS 2 message: most clients never send one, and every
    /// byte here is kept by every idle client.
    #[expect(
        clippy::box_collection,
        reason = "8 bytes inline instead of a set header of 32 in every session"
    )]
    inbound_qos2: Option<Box<HashSet<PacketId, crate::router::TreeHasher>>>,
}

impl Default for Flows {
    fn default() -> Self {
        Flows::new(PacketId::FIRST)
    }
}

impl Flows {
    /// Nothing in flight; identifiers are tried from `next_id` on.
    pub fn new(next_id: PacketId) -> Flows {
        Flows {
            inflight: None,
            next_id,
            inbound_qos2: None,
        }
    }

    /// The next identifier to try (kept with the session).
    pub fn next_id(&self) -> PacketId {
        self.next_id
    }

    /// Messages in flight, in the order they were sent.
    pub fn inflight(&self) -> &VecDeque<Inflight> {
        static NONE: VecDeque<Inflight> = VecDeque::new();
        self.inflight.as_deref().unwrap_or(&NONE)
    }

    /// The queue of messages in flight, made if it was not.
    fn inflight_mut(&mut self) -> &mut VecDeque<Inflight> {
        self.inflight.get_or_insert_with(Box::default)
    }

    /// How many messages are in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight().len()
    }

    /// Takes every message in flight (to move shared ones elsewhere; give back the rest
    /// with [`Flows::restore`]).
    pub fn take_inflight(&mut self) -> VecDeque<Inflight> {
        in_flight_gauge(-(self.in_flight() as i64));
        self.inflight.take().map(|q| *q).unwrap_or_default()
    }

    /// Puts messages in flight as they were (restored from the store, or given back).
    pub fn restore(&mut self, inflight: impl IntoIterator<Item = Inflight>) {
        let mut inflight = inflight.into_iter().peekable();
        if inflight.peek().is_none() {
            return;
        }
        let before = self.in_flight();
        self.inflight_mut().extend(inflight);
        in_flight_gauge((self.in_flight() - before) as i64);
    }

    /// An identifier no message in flight uses; `None` when all 65,535 are.
    pub fn allocate_id(&mut self) -> Option<PacketId> {
        if self.in_flight() >= usize::from(u16::MAX) {
            return None;
        }
        for _ in 0..u16::MAX {
            let id = self.next_id;
            self.next_id = id.next();
            if !self.inflight().iter().any(|f| f.id == id) {
                return Some(id);
            }
        }
        None
    }

    /// `delivery` was sent as a QoS 1/2 PUBLISH with `id` (from
    /// [`Flows::allocate_id`]): it is in flight at its first stage, which is returned.
    pub fn sent(&mut self, id: PacketId, delivery: Delivery) -> Stage {
        let stage = match delivery.qos {
            QoS::ExactlyOnce => Stage::AwaitRec,
            QoS::AtLeastOnce | QoS::AtMostOnce => Stage::AwaitAck,
        };
        self.inflight_mut().push_back(Inflight {
            id,
            delivery,
            stage,
        });
        in_flight_gauge(1);
        stage
    }

    /// Acknowledgements come mostly in order: the front is checked first.
    fn position(&self, id: PacketId) -> Option<usize> {
        self.inflight().iter().position(|f| f.id == id)
    }

    /// Ends the flow of `id` if it stands at `stage`; returns it.
    fn end(&mut self, id: PacketId, stage: Stage) -> Option<Inflight> {
        let i = self.position(id)?;
        if self.inflight().get(i)?.stage != stage {
            return None;
        }
        let f = self.inflight_mut().remove(i);
        in_flight_gauge(-i64::from(f.is_some()));
        f
    }

    /// PUBACK: a QoS 1 message is delivered.
    pub fn acked(&mut self, id: PacketId) -> Option<Inflight> {
        self.end(id, Stage::AwaitAck)
    }

    /// PUBREC (`refused`: with an error code).
    pub fn received(&mut self, id: PacketId, refused: bool) -> Received<'_> {
        let Some(i) = self.position(id) else {
            return Received::Unknown;
        };
        let stage = self.inflight().get(i).map(|f| f.stage);
        if !matches!(stage, Some(Stage::AwaitRec | Stage::AwaitComp)) {
            return Received::Unknown;
        }
        if refused {
            return match self.inflight_mut().remove(i) {
                Some(f) => {
                    in_flight_gauge(-1);
                    Received::Refused(f)
                }
                None => Received::Unknown,
            };
        }
        match self.inflight_mut().get_mut(i) {
            Some(f) => {
                f.stage = Stage::AwaitComp;
                Received::Release(f)
            }
            None => Received::Unknown,
        }
    }

    /// PUBCOMP: a QoS 2 message is delivered.
    pub fn completed(&mut self, id: PacketId) -> Option<Inflight> {
        self.end(id, Stage::AwaitComp)
    }

    /// Whether an inbound QoS 2 message with `id` was received and not yet released.
    pub fn holds(&self, id: PacketId) -> bool {
        self.inbound_qos2.as_ref().is_some_and(|s| s.contains(&id))
    }

    /// How many inbound QoS 2 messages await PUBREL.
    pub fn held(&self) -> usize {
        self.inbound_qos2.as_ref().map_or(0, |s| s.len())
    }

    /// The set of inbound QoS 2 identifiers, made if it was not.
    fn received_set(&mut self) -> &mut HashSet<PacketId, crate::router::TreeHasher> {
        self.inbound_qos2.get_or_insert_with(Box::default)
    }

    /// An inbound QoS 2 PUBLISH with `id`: true when it is new, false for a resend of one
    /// held; refused once `max` (our Receive Maximum) are held.
    pub fn receive(&mut self, id: PacketId, max: u16) -> Result<bool, ReceiveMaximumExceeded> {
        if self.holds(id) {
            return Ok(false);
        }
        if self.held() >= usize::from(max) {
            return Err(ReceiveMaximumExceeded);
        }
        self.received_set().insert(id);
        Ok(true)
    }

    /// Marks `id` received (restored from the store).
    pub fn restore_received(&mut self, id: PacketId) {
        self.received_set().insert(id);
    }

    /// Inbound QoS 2 identifiers received and not yet released.
    pub fn received_ids(&self) -> impl Iterator<Item = PacketId> + '_ {
        self.inbound_qos2.iter().flat_map(|s| s.iter().copied())
    }

    /// PUBREL: releases `id`; false when it was not held (PUBCOMP with 0x92).
    pub fn released(&mut self, id: PacketId) -> bool {
        self.inbound_qos2.as_mut().is_some_and(|s| s.remove(&id))
    }
}

impl Drop for Flows {
    fn drop(&mut self) {
        in_flight_gauge(-(self.in_flight() as i64));
    }
}

/// Adds `n` to the broker-wide gauge of messages in flight to clients.
fn in_flight_gauge(n: i64) {
    if n != 0 {
        crate::metrics::add(crate::metrics::C::InFlight, n as u64);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn delivery(qos: QoS) -> Delivery {
        Delivery::for_test(qos, b"")
    }

    fn id(n: u16) -> PacketId {
        PacketId::new(n).unwrap()
    }

    #[test]
    fn qos1_ends_at_puback_only() {
        let mut f = Flows::default();
        let a = f.allocate_id().unwrap();
        assert_eq!(f.sent(a, delivery(QoS::AtLeastOnce)), Stage::AwaitAck);
        assert!(
            f.completed(a).is_none(),
            "PUBCOMP does not end a QoS 1 flow"
        );
        assert!(matches!(f.received(a, false), Received::Unknown));
        assert!(f.acked(a).is_some());
        assert!(f.acked(a).is_none(), "a second PUBACK changes nothing");
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn qos2_goes_through_pubrec_then_pubcomp() {
        let mut f = Flows::default();
        let a = f.allocate_id().unwrap();
        assert_eq!(f.sent(a, delivery(QoS::ExactlyOnce)), Stage::AwaitRec);
        assert!(f.acked(a).is_none(), "PUBACK does not end a QoS 2 flow");
        assert!(
            f.completed(a).is_none(),
            "PUBCOMP before PUBREC changes nothing"
        );
        assert!(matches!(f.received(a, false), Received::Release(x) if x.id == a));
        // A repeated PUBREC asks for PUBREL again.
        assert!(matches!(f.received(a, false), Received::Release(_)));
        assert_eq!(f.inflight()[0].stage, Stage::AwaitComp);
        assert!(f.completed(a).is_some());
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn an_error_pubrec_ends_the_flow() {
        let mut f = Flows::default();
        let a = f.allocate_id().unwrap();
        f.sent(a, delivery(QoS::ExactlyOnce));
        assert!(matches!(f.received(a, true), Received::Refused(x) if x.id == a));
        assert!(matches!(f.received(id(9), false), Received::Unknown));
        assert_eq!(f.in_flight(), 0);
    }

    #[test]
    fn identifiers_wrap_and_skip_those_in_flight() {
        let mut f = Flows::new(id(u16::MAX - 1));
        for n in [u16::MAX, 1] {
            f.restore([Inflight {
                id: id(n),
                delivery: delivery(QoS::AtLeastOnce),
                stage: Stage::AwaitAck,
            }]);
        }
        assert_eq!(f.allocate_id(), Some(id(u16::MAX - 1)));
        f.sent(id(u16::MAX - 1), delivery(QoS::AtLeastOnce));
        assert_eq!(f.allocate_id(), Some(id(2)), "65,535 and 1 are in flight");
    }

    #[test]
    fn no_identifier_while_all_are_in_flight() {
        let mut f = Flows::default();
        f.restore((1..=u16::MAX).map(|n| Inflight {
            id: id(n),
            delivery: delivery(QoS::AtLeastOnce),
            stage: Stage::AwaitAck,
        }));
        assert!(f.allocate_id().is_none());
        assert!(f.acked(id(1)).is_some());
        assert_eq!(f.allocate_id(), Some(id(1)));
    }

    #[test]
    fn inbound_qos2_is_held_until_released_and_bounded() {
        let mut f = Flows::default();
        assert_eq!(f.receive(id(1), 2), Ok(true));
        assert_eq!(f.receive(id(1), 2), Ok(false), "a resend is not new");
        assert_eq!(f.receive(id(2), 2), Ok(true));
        assert_eq!(f.receive(id(3), 2), Err(ReceiveMaximumExceeded));
        assert_eq!(
            f.receive(id(1), 2),
            Ok(false),
            "held ones still answer at the limit"
        );
        assert!(f.released(id(1)));
        assert!(!f.released(id(1)), "a second PUBREL is unknown");
        assert_eq!(f.receive(id(1), 2), Ok(true), "released: a new message");
    }

    /// A step a client or the broker may take, in any order.
    #[derive(Debug, Clone)]
    enum Step {
        Send(bool),
        PubAck(u16),
        PubRec(u16, bool),
        PubComp(u16),
        Receive(u16),
        PubRel(u16),
    }

    fn step() -> impl Strategy<Value = Step> {
        // Small identifiers, so acknowledgements often hit what is in flight.
        let n = 1u16..12;
        prop_oneof![
            any::<bool>().prop_map(Step::Send),
            n.clone().prop_map(Step::PubAck),
            (n.clone(), any::<bool>()).prop_map(|(i, e)| Step::PubRec(i, e)),
            n.clone().prop_map(Step::PubComp),
            n.clone().prop_map(Step::Receive),
            n.prop_map(Step::PubRel),
        ]
    }

    proptest! {
        /// Against a model (identifier → stage, and a set of held inbound ids): every
        /// transition agrees with the spec's table, identifiers in flight stay unique, and
        /// inflight keeps the order messages were sent in.
        #[test]
        fn flows_follow_the_model(steps in proptest::collection::vec(step(), 0..200)) {
            let mut f = Flows::default();
            let mut model: HashMap<u16, Stage> = HashMap::new();
            let mut order: Vec<u16> = Vec::new();
            let mut held: HashSet<u16> = HashSet::new();
            for s in steps {
                match s {
                    Step::Send(qos2) => {
                        let a = f.allocate_id().unwrap();
                        prop_assert!(!model.contains_key(&a.get()));
                        let qos = if qos2 { QoS::ExactlyOnce } else { QoS::AtLeastOnce };
                        let stage = f.sent(a, delivery(qos));
                        prop_assert_eq!(stage, if qos2 { Stage::AwaitRec } else { Stage::AwaitAck });
                        model.insert(a.get(), stage);
                        order.push(a.get());
                    }
                    Step::PubAck(n) => {
                        let ends = model.get(&n) == Some(&Stage::AwaitAck);
                        prop_assert_eq!(f.acked(id(n)).is_some(), ends);
                        if ends { model.remove(&n); order.retain(|&x| x != n); }
                    }
                    Step::PubRec(n, refused) => {
                        let known = matches!(model.get(&n), Some(Stage::AwaitRec | Stage::AwaitComp));
                        match f.received(id(n), refused) {
                            Received::Unknown => prop_assert!(!known),
                            Received::Refused(x) => {
                                prop_assert!(known && refused);
                                prop_assert_eq!(x.id.get(), n);
                                model.remove(&n);
                                order.retain(|&x| x != n);
                            }
                            Received::Release(x) => {
                                prop_assert!(known && !refused);
                                prop_assert_eq!(x.stage, Stage::AwaitComp);
                                model.insert(n, Stage::AwaitComp);
                            }
                        }
                    }
                    Step::PubComp(n) => {
                        let ends = model.get(&n) == Some(&Stage::AwaitComp);
                        prop_assert_eq!(f.completed(id(n)).is_some(), ends);
                        if ends { model.remove(&n); order.retain(|&x| x != n); }
                    }
                    Step::Receive(n) => {
                        let new = held.insert(n);
                        prop_assert_eq!(f.receive(id(n), u16::MAX), Ok(new));
                    }
                    Step::PubRel(n) => {
                        prop_assert_eq!(f.released(id(n)), held.remove(&n));
                    }
                }
                let ids: Vec<u16> = f.inflight().iter().map(|x| x.id.get()).collect();
                prop_assert_eq!(&ids, &order);
                for x in f.inflight() {
                    prop_assert_eq!(Some(&x.stage), model.get(&x.id.get()));
                }
                prop_assert_eq!(f.held(), held.len());
            }
        }
    }
}
