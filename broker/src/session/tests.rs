//! The session's answers, transition by transition, without sockets.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

use std::cell::Cell;
use std::sync::Arc;

use crate::codec::{Ack, Packet, PacketId, QoS, ReasonCode};
use crate::mailbox::{Mailbox, QueueLimits};
use crate::message::{ClientId, Delivery};
use crate::store::Scratch;

use super::{Flows, SessionState};

pub(super) const LIMITS_Q: QueueLimits = QueueLimits {
    max_messages: 1000,
    max_bytes: 1 << 20,
    backpressure: false,
};

/// A session of client `c` over `mailbox`, for tests here and in the sibling modules.
pub(super) fn state(mailbox: Mailbox) -> SessionState {
    SessionState {
        client_id: ClientId::new("c"),
        key: 1,
        mailbox: Arc::new(mailbox),
        subscriptions: Default::default(),
        flows: Flows::default(),
        expiry: 0,
        principal: None,
    }
}

/// A session without a store.
pub(super) fn fresh() -> SessionState {
    state(Mailbox::new(LIMITS_Q))
}

fn id(n: u16) -> PacketId {
    PacketId::new(n).unwrap()
}

fn ack(p: fn(Ack) -> Packet, n: u16) -> Packet {
    p(Ack::success(id(n)))
}

#[test]
fn an_exactly_once_message_is_routed_once_until_released() {
    let mut s = fresh();
    let routed = Cell::new(0);
    let route = || {
        routed.set(routed.get() + 1);
        None
    };
    assert_eq!(s.receive_exactly_once(id(5), 10, route), Ok(None));
    assert_eq!(s.receive_exactly_once(id(5), 10, route), Ok(None));
    assert_eq!(
        routed.get(),
        1,
        "a resend before PUBREL is not routed again"
    );
    let r = s.acknowledged(&ack(Packet::PubRel, 5), true).unwrap();
    assert_eq!(r.packet, Some(ack(Packet::PubComp, 5)));
    assert_eq!(s.receive_exactly_once(id(5), 10, route), Ok(None));
    assert_eq!(routed.get(), 2, "after PUBREL the id carries a new message");
}

#[test]
fn more_unreleased_messages_than_the_receive_maximum_are_refused() {
    let mut s = fresh();
    assert_eq!(s.receive_exactly_once(id(1), 2, || None), Ok(None));
    assert_eq!(s.receive_exactly_once(id(2), 2, || None), Ok(None));
    let routed = Cell::new(false);
    let third = s.receive_exactly_once(id(3), 2, || {
        routed.set(true);
        None
    });
    assert_eq!(third, Err(ReasonCode::ReceiveMaximumExceeded));
    assert!(!routed.get());
    // A resend of one held is still answered.
    assert_eq!(s.receive_exactly_once(id(2), 2, || None), Ok(None));
}

#[test]
fn a_persistent_session_keeps_the_id_with_the_message() {
    let scratch = Scratch::open("session-qos2-in");
    let mailbox = Mailbox::with_store(LIMITS_Q, scratch.store.clone(), 1);
    mailbox.set_persistent(true);
    let mut s = state(mailbox);
    let ticket = s.receive_exactly_once(id(9), 10, || None).unwrap();
    assert!(
        ticket.is_some(),
        "the PUBREC waits for the id to be durable"
    );
    let r = s.acknowledged(&ack(Packet::PubRel, 9), false).unwrap();
    assert!(
        r.after > ticket,
        "the PUBCOMP waits for the id to be forgotten"
    );
}

#[test]
fn release_and_acknowledgements_of_unknown_ids() {
    let mut s = fresh();
    let v5 = s.acknowledged(&ack(Packet::PubRel, 4), true).unwrap();
    let mut not_found = Ack::success(id(4));
    not_found.reason = ReasonCode::PacketIdentifierNotFound;
    assert_eq!(v5.packet, Some(Packet::PubComp(not_found)));
    let v3 = s.acknowledged(&ack(Packet::PubRel, 4), false).unwrap();
    assert_eq!(
        v3.packet,
        Some(ack(Packet::PubComp, 4)),
        "3.x has no reason code"
    );
    for p in [Packet::PubAck, Packet::PubComp] {
        let r = s.acknowledged(&ack(p, 4), true).unwrap();
        assert_eq!(r.packet, None);
    }
    assert!(s.acknowledged(&Packet::PingReq, true).is_none());
}

#[test]
fn outbound_qos1_and_qos2_flows() {
    let mut s = fresh();
    let one = s.flows.allocate_id().unwrap();
    assert_eq!(
        s.sent(one, Delivery::for_test(QoS::AtLeastOnce, b"1")),
        None
    );
    let two = s.flows.allocate_id().unwrap();
    assert_eq!(
        s.sent(two, Delivery::for_test(QoS::ExactlyOnce, b"2")),
        None
    );
    assert_eq!(s.flows.in_flight(), 2);
    let r = s
        .acknowledged(&Packet::PubAck(Ack::success(one)), true)
        .unwrap();
    assert_eq!(r.packet, None);
    assert_eq!(s.flows.in_flight(), 1);
    // A PUBACK for the QoS 2 message does not end it.
    s.acknowledged(&Packet::PubAck(Ack::success(two)), true);
    assert_eq!(s.flows.in_flight(), 1);
    let r = s
        .acknowledged(&Packet::PubRec(Ack::success(two)), true)
        .unwrap();
    assert_eq!(r.packet, Some(Packet::PubRel(Ack::success(two))));
    let r = s
        .acknowledged(&Packet::PubComp(Ack::success(two)), true)
        .unwrap();
    assert_eq!(r.packet, None);
    assert_eq!(s.flows.in_flight(), 0);
}

#[test]
fn a_refused_pubrec_ends_the_flow() {
    let mut s = fresh();
    let two = s.flows.allocate_id().unwrap();
    s.sent(two, Delivery::for_test(QoS::ExactlyOnce, b"2"));
    let mut refused = Ack::success(two);
    refused.reason = ReasonCode::QuotaExceeded;
    let r = s.acknowledged(&Packet::PubRec(refused), true).unwrap();
    assert_eq!(r.packet, None);
    assert_eq!(s.flows.in_flight(), 0);
}
