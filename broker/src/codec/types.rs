//! Validated value types shared by every packet: QoS, packet identifiers, protocol versions,
//! topic names and filters, reason codes. Constructors validate; fields stay private so an
//! invalid value cannot be built outside this module.

use std::fmt;
use std::num::NonZeroU16;
use std::sync::Arc;

/// Quality of service of a message or a subscription (MQTT 3.1.1 §4.3, MQTT 5 §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QoS {
    /// QoS 0: at most once.
    AtMostOnce = 0,
    /// QoS 1: at least once.
    AtLeastOnce = 1,
    /// QoS 2: exactly once.
    ExactlyOnce = 2,
}

impl QoS {
    /// Parses the two-bit QoS field; 3 is not a QoS.
    pub fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }

    /// The numeric value on the wire.
    pub fn bits(self) -> u8 {
        self as u8
    }
}

/// A non-zero packet identifier (MQTT 3.1.1 §2.3.1, MQTT 5 §2.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PacketId(NonZeroU16);

impl PacketId {
    /// `None` for 0, which is never a valid packet identifier.
    pub fn new(value: u16) -> Option<PacketId> {
        NonZeroU16::new(value).map(PacketId)
    }

    /// The numeric value on the wire.
    pub fn get(self) -> u16 {
        self.0.get()
    }

    /// The identifier after this one, wrapping from 65535 to 1.
    pub fn next(self) -> PacketId {
        match NonZeroU16::new(self.0.get().wrapping_add(1)) {
            Some(v) => PacketId(v),
            None => PacketId(NonZeroU16::MIN),
        }
    }

    /// The first identifier, 1.
    pub const FIRST: PacketId = PacketId(NonZeroU16::MIN);
}

impl fmt::Display for PacketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The protocol version a client connected with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// MQTT 3.1: protocol name "MQIsdp", level 3.
    V3_1,
    /// MQTT 3.1.1: protocol name "MQTT", level 4.
    V3_1_1,
    /// MQTT 5.0: protocol name "MQTT", level 5.
    V5,
}

impl ProtocolVersion {
    /// True for MQTT 5.
    pub fn is_v5(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// The protocol level byte of CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// The protocol name of CONNECT.
    pub fn name(self) -> &'static str {
        match self {
            ProtocolVersion::V3_1 => "MQIsdp",
            _ => "MQTT",
        }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolVersion::V3_1 => "3.1",
            ProtocolVersion::V3_1_1 => "3.1.1",
            ProtocolVersion::V5 => "5.0",
        })
    }
}

/// Why a string from the wire or from configuration is not a valid topic name or filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Zero-length topic names and filters are not allowed (MQTT-4.7.3-1).
    #[error("topic is empty")]
    Empty,
    /// A topic name contains `+` or `#` (MQTT-3.3.2-2).
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level (MQTT-4.7.1-2/3).
    #[error("wildcard not alone in its level, or '#' not last")]
    MisplacedWildcard,
    /// U+0000 in a topic (MQTT-4.7.3-2).
    #[error("topic contains U+0000")]
    NullCharacter,
    /// Longer than 65535 bytes.
    #[error("topic longer than 65535 bytes")]
    TooLong,
    /// `$share/` without a valid share name and filter (MQTT 5 §4.8.2).
    #[error("invalid shared subscription")]
    InvalidShare,
}

/// A topic name: what a PUBLISH is addressed to. No wildcards, not empty, no U+0000.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// Validates `s` as a topic name.
    pub fn new(s: &str) -> Result<TopicName, TopicError> {
        validate_common(s)?;
        if s.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(TopicError::WildcardInName);
        }
        Ok(TopicName(Arc::from(s)))
    }

    /// Whether the topic is in the broker's `$SYS` tree, where only the broker publishes
    /// (as Mosquitto: clients, wills and plugins are refused there).
    pub fn is_sys(&self) -> bool {
        &*self.0 == "$SYS" || self.0.starts_with("$SYS/")
    }

    /// The topic as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for topics beginning with `$`, which a leading wildcard never matches
    /// (MQTT-4.7.2-1).
    pub fn is_dollar(&self) -> bool {
        self.0.starts_with('$')
    }
}

impl fmt::Debug for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A topic filter of a SUBSCRIBE or UNSUBSCRIBE: may hold `+` and `#` and may be a shared
/// subscription `$share/{group}/{filter}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter {
    full: Arc<str>,
    /// Byte offset where the matching filter starts (0, or after `$share/{group}/`).
    filter_start: usize,
}

impl TopicFilter {
    /// Validates `s` as a topic filter, including the shared-subscription form.
    pub fn new(s: &str) -> Result<TopicFilter, TopicError> {
        validate_common(s)?;
        let filter_start = if let Some(rest) = s.strip_prefix("$share/") {
            let slash = rest.find('/').ok_or(TopicError::InvalidShare)?;
            let group = &rest[..slash];
            if group.is_empty() || group.contains(['+', '#']) {
                return Err(TopicError::InvalidShare);
            }
            let filter = &rest[slash + 1..];
            if filter.is_empty() {
                return Err(TopicError::InvalidShare);
            }
            "$share/".len() + slash + 1
        } else {
            0
        };
        validate_filter_levels(&s[filter_start..])?;
        Ok(TopicFilter {
            full: Arc::from(s),
            filter_start,
        })
    }

    /// The filter exactly as the client sent it (with any `$share/{group}/` prefix).
    pub fn as_str(&self) -> &str {
        &self.full
    }

    /// The part that is matched against topic names (without the share prefix).
    pub fn filter(&self) -> &str {
        self.full.get(self.filter_start..).unwrap_or_default()
    }

    /// The share name of a shared subscription.
    pub fn share_group(&self) -> Option<&str> {
        if self.filter_start == 0 {
            return None;
        }
        self.full.get("$share/".len()..self.filter_start - 1)
    }

    /// True when the filter contains `+` or `#`.
    pub fn has_wildcard(&self) -> bool {
        self.filter().contains(['+', '#'])
    }
}

impl fmt::Debug for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.full, f)
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

fn validate_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > usize::from(u16::MAX) {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

fn validate_filter_levels(s: &str) -> Result<(), TopicError> {
    let mut levels = s.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        if level.contains('#') && (level != "#" || !last) {
            return Err(TopicError::MisplacedWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

/// Does `filter` (without share prefix) match `topic`? `$`-topics are never matched by a
/// filter starting with a wildcard (MQTT-4.7.2-1).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    // Byte by byte, both at the start of a level on each turn (`/` is one byte in UTF-8
    // and never part of another character): no level iterators on the way of every
    // message a sink or a bridge selects.
    let (f, t) = (filter.as_bytes(), topic.as_bytes());
    if t.first() == Some(&b'$') && matches!(f.first(), Some(b'+' | b'#')) {
        return false;
    }
    let (mut i, mut j) = (0, 0);
    loop {
        let level_end = f.get(i + 1).is_none_or(|&c| c == b'/');
        match f.get(i) {
            Some(b'#') if level_end => return true,
            Some(b'+') if level_end => {
                i += 1;
                while t.get(j).is_some_and(|&c| c != b'/') {
                    j += 1;
                }
            }
            _ => {
                while let Some(&c) = f.get(i).filter(|&&c| c != b'/') {
                    if t.get(j) != Some(&c) {
                        return false;
                    }
                    i += 1;
                    j += 1;
                }
                if t.get(j).is_some_and(|&c| c != b'/') {
                    return false;
                }
            }
        }
        // Both at a `/` or at their end.
        match (i < f.len(), j < t.len()) {
            (false, false) => return true,
            (true, true) => {
                i += 1;
                j += 1;
            }
            // "a/#" matches "a" as well.
            (true, false) => {
                return f.get(i + 1) == Some(&b'#') && f.get(i + 2).is_none_or(|&c| c == b'/');
            }
            (false, true) => return false,
        }
    }
}

/// MQTT 5 reason codes (§2.4). MQTT 3.1.1 return codes are mapped onto these by the codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ReasonCode {
    /// 0x00: Success / Normal disconnection / Granted QoS 0.
    Success = 0x00,
    /// 0x01: Granted QoS 1.
    GrantedQoS1 = 0x01,
    /// 0x02: Granted QoS 2.
    GrantedQoS2 = 0x02,
    /// 0x04: Disconnect with Will Message.
    DisconnectWithWill = 0x04,
    /// 0x10: No matching subscribers.
    NoMatchingSubscribers = 0x10,
    /// 0x11: No subscription existed.
    NoSubscriptionExisted = 0x11,
    /// 0x18: Continue authentication.
    ContinueAuthentication = 0x18,
    /// 0x19: Re-authenticate.
    ReAuthenticate = 0x19,
    /// 0x80: Unspecified error.
    UnspecifiedError = 0x80,
    /// 0x81: Malformed Packet.
    MalformedPacket = 0x81,
    /// 0x82: Protocol Error.
    ProtocolError = 0x82,
    /// 0x83: Implementation specific error.
    ImplementationSpecificError = 0x83,
    /// 0x84: Unsupported Protocol Version.
    UnsupportedProtocolVersion = 0x84,
    /// 0x85: Client Identifier not valid.
    ClientIdentifierNotValid = 0x85,
    /// 0x86: Bad User Name or Password.
    BadUserNameOrPassword = 0x86,
    /// 0x87: Not authorized.
    NotAuthorized = 0x87,
    /// 0x88: Server unavailable.
    ServerUnavailable = 0x88,
    /// 0x89: Server busy.
    ServerBusy = 0x89,
    /// 0x8A: Banned.
    Banned = 0x8A,
    /// 0x8B: Server shutting down.
    ServerShuttingDown = 0x8B,
    /// 0x8C: Bad authentication method.
    BadAuthenticationMethod = 0x8C,
    /// 0x8D: Keep Alive timeout.
    KeepAliveTimeout = 0x8D,
    /// 0x8E: Session taken over.
    SessionTakenOver = 0x8E,
    /// 0x8F: Topic Filter invalid.
    TopicFilterInvalid = 0x8F,
    /// 0x90: Topic Name invalid.
    TopicNameInvalid = 0x90,
    /// 0x91: Packet Identifier in use.
    PacketIdentifierInUse = 0x91,
    /// 0x92: Packet Identifier not found.
    PacketIdentifierNotFound = 0x92,
    /// 0x93: Receive Maximum exceeded.
    ReceiveMaximumExceeded = 0x93,
    /// 0x94: Topic Alias invalid.
    TopicAliasInvalid = 0x94,
    /// 0x95: Packet too large.
    PacketTooLarge = 0x95,
    /// 0x96: Message rate too high.
    MessageRateTooHigh = 0x96,
    /// 0x97: Quota exceeded.
    QuotaExceeded = 0x97,
    /// 0x98: Administrative action.
    AdministrativeAction = 0x98,
    /// 0x99: Payload format invalid.
    PayloadFormatInvalid = 0x99,
    /// 0x9A: Retain not supported.
    RetainNotSupported = 0x9A,
    /// 0x9B: QoS not supported.
    QoSNotSupported = 0x9B,
    /// 0x9C: Use another server.
    UseAnotherServer = 0x9C,
    /// 0x9D: Server moved.
    ServerMoved = 0x9D,
    /// 0x9E: Shared Subscriptions not supported.
    SharedSubscriptionsNotSupported = 0x9E,
    /// 0x9F: Connection rate exceeded.
    ConnectionRateExceeded = 0x9F,
    /// 0xA0: Maximum connect time.
    MaximumConnectTime = 0xA0,
    /// 0xA1: Subscription Identifiers not supported.
    SubscriptionIdentifiersNotSupported = 0xA1,
    /// 0xA2: Wildcard Subscriptions not supported.
    WildcardSubscriptionsNotSupported = 0xA2,
}

impl ReasonCode {
    /// The byte on the wire.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// True for codes ≥ 0x80, which mean failure.
    pub fn is_error(self) -> bool {
        self.code() >= 0x80
    }

    /// The granted-QoS reason code of a SUBACK.
    pub fn granted(qos: QoS) -> ReasonCode {
        match qos {
            QoS::AtMostOnce => ReasonCode::Success,
            QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
            QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
        }
    }

    /// Parses any defined reason code; which codes a given packet may carry is checked by
    /// the decoder.
    pub fn from_u8(b: u8) -> Option<ReasonCode> {
        use ReasonCode::*;
        Some(match b {
            0x00 => Success,
            0x01 => GrantedQoS1,
            0x02 => GrantedQoS2,
            0x04 => DisconnectWithWill,
            0x10 => NoMatchingSubscribers,
            0x11 => NoSubscriptionExisted,
            0x18 => ContinueAuthentication,
            0x19 => ReAuthenticate,
            0x80 => UnspecifiedError,
            0x81 => MalformedPacket,
            0x82 => ProtocolError,
            0x83 => ImplementationSpecificError,
            0x84 => UnsupportedProtocolVersion,
            0x85 => ClientIdentifierNotValid,
            0x86 => BadUserNameOrPassword,
            0x87 => NotAuthorized,
            0x88 => ServerUnavailable,
            0x89 => ServerBusy,
            0x8A => Banned,
            0x8B => ServerShuttingDown,
            0x8C => BadAuthenticationMethod,
            0x8D => KeepAliveTimeout,
            0x8E => SessionTakenOver,
            0x8F => TopicFilterInvalid,
            0x90 => TopicNameInvalid,
            0x91 => PacketIdentifierInUse,
            0x92 => PacketIdentifierNotFound,
            0x93 => ReceiveMaximumExceeded,
            0x94 => TopicAliasInvalid,
            0x95 => PacketTooLarge,
            0x96 => MessageRateTooHigh,
            0x97 => QuotaExceeded,
            0x98 => AdministrativeAction,
            0x99 => PayloadFormatInvalid,
            0x9A => RetainNotSupported,
            0x9B => QoSNotSupported,
            0x9C => UseAnotherServer,
            0x9D => ServerMoved,
            0x9E => SharedSubscriptionsNotSupported,
            0x9F => ConnectionRateExceeded,
            0xA0 => MaximumConnectTime,
            0xA1 => SubscriptionIdentifiersNotSupported,
            0xA2 => WildcardSubscriptionsNotSupported,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]

    use proptest::collection::vec;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_sys_tree_is_its_first_level() {
        for (t, sys) in [
            ("$SYS", true),
            ("$SYS/broker/version", true),
            ("$SYS/", true),
            ("$SYSTEM/x", false),
            ("a/$SYS", false),
            ("$sys/x", false),
        ] {
            assert_eq!(TopicName::new(t).unwrap().is_sys(), sys, "{t}");
        }
    }

    /// Topic levels from a small alphabet, so that filters and topics often match.
    fn topic() -> impl Strategy<Value = String> {
        vec(prop_oneof!["a", "b", "", "\\$SYS", "é"], 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("empty", |t| !t.is_empty())
    }

    fn filter() -> impl Strategy<Value = String> {
        (
            vec(prop_oneof!["a", "b", "", "\\$SYS", "\\+"], 1..5),
            any::<bool>(),
        )
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#".to_owned());
                }
                levels.join("/")
            })
            .prop_filter("empty", |f| !f.is_empty())
    }

    /// Level-by-level matching written independently of `filter_matches`.
    fn reference(filter: &[&str], topic: &[&str]) -> bool {
        match (filter.split_first(), topic.split_first()) {
            (Some((&"#", _)), _) => true,
            (Some((&"+", f)), Some((_, t))) => reference(f, t),
            (Some((fl, f)), Some((tl, t))) => fl == tl && reference(f, t),
            (None, None) => true,
            _ => false,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn a_topic_matches_itself(t in topic()) {
            prop_assert!(filter_matches(&t, &t));
        }

        #[test]
        fn hash_matches_every_topic_but_dollar_topics(t in topic()) {
            prop_assert_eq!(filter_matches("#", &t), !t.starts_with('$'));
        }

        #[test]
        fn plus_matches_exactly_one_level(t in topic()) {
            let one_level = !t.contains('/');
            prop_assert_eq!(filter_matches("+", &t), one_level && !t.starts_with('$'));
        }

        #[test]
        fn any_level_replaced_by_plus_matches(t in topic(), at in any::<prop::sample::Index>()) {
            let mut levels: Vec<&str> = t.split('/').collect();
            let i = at.index(levels.len());
            levels[i] = "+";
            let f = levels.join("/");
            prop_assert_eq!(filter_matches(&f, &t), !(i == 0 && t.starts_with('$')));
            prop_assert!(TopicFilter::new(&f).is_ok());
        }

        #[test]
        fn a_prefix_then_hash_matches(t in topic(), at in any::<prop::sample::Index>()) {
            let levels: Vec<&str> = t.split('/').collect();
            let keep = at.index(levels.len() + 1);
            let mut f: Vec<&str> = levels[..keep].to_vec();
            f.push("#");
            let f = f.join("/");
            prop_assert_eq!(filter_matches(&f, &t), !(keep == 0 && t.starts_with('$')));
        }

        #[test]
        fn more_levels_than_the_topic_never_match(t in topic()) {
            let f = format!("{t}/+");
            prop_assert!(!filter_matches(&f, &t));
        }

        #[test]
        fn matches_like_the_reference(f in filter(), t in topic()) {
            let fl: Vec<&str> = f.split('/').collect();
            let tl: Vec<&str> = t.split('/').collect();
            let dollar_guard = t.starts_with('$') && (f.starts_with('+') || f.starts_with('#'));
            prop_assert_eq!(filter_matches(&f, &t), reference(&fl, &tl) && !dollar_guard);
        }

        /// Any text as filter and topic, valid or not: the byte-wise matcher agrees with
        /// matching level by level on split strings.
        #[test]
        fn matches_like_the_reference_on_any_text(f in "[ab/+#$é]{0,8}", t in "[ab/+#$é]{0,8}") {
            let fl: Vec<&str> = f.split('/').collect();
            let tl: Vec<&str> = t.split('/').collect();
            let dollar_guard = t.starts_with('$') && (f.starts_with('+') || f.starts_with('#'));
            prop_assert_eq!(filter_matches(&f, &t), reference(&fl, &tl) && !dollar_guard);
        }

        #[test]
        fn generated_filters_are_valid(f in filter()) {
            let parsed = TopicFilter::new(&f).unwrap();
            prop_assert_eq!(parsed.as_str(), f.as_str());
            prop_assert_eq!(parsed.filter(), f.as_str());
            prop_assert_eq!(parsed.share_group(), None);
            prop_assert_eq!(parsed.has_wildcard(), f.contains(['+', '#']));
        }

        #[test]
        fn topic_names_reject_wildcards_and_nul(t in topic(), at in any::<prop::sample::Index>(), c in prop_oneof![Just('+'), Just('#'), Just('\0')]) {
            prop_assert!(TopicName::new(&t).is_ok());
            let mut bad: Vec<char> = t.chars().collect();
            let i = at.index(bad.len() + 1);
            bad.insert(i, c);
            let bad: String = bad.into_iter().collect();
            prop_assert!(TopicName::new(&bad).is_err());
        }

        #[test]
        fn shared_filters_split_group_and_filter(g in "[a-z]{1,5}", f in filter()) {
            let full = format!("$share/{g}/{f}");
            let parsed = TopicFilter::new(&full).unwrap();
            prop_assert_eq!(parsed.share_group(), Some(g.as_str()));
            prop_assert_eq!(parsed.filter(), f.as_str());
            prop_assert_eq!(parsed.as_str(), full.as_str());
        }

        #[test]
        fn hash_not_last_is_rejected(f in filter(), rest in "[a-z]{0,3}") {
            let bad = format!("{f}/#/{rest}");
            prop_assert_eq!(TopicFilter::new(&bad).unwrap_err(), TopicError::MisplacedWildcard);
        }
    }

    #[test]
    fn partial_level_wildcards_are_rejected() {
        for bad in ["a+", "+a", "a/b#", "#/a", "a/#b", "sport+/x"] {
            assert_eq!(
                TopicFilter::new(bad).unwrap_err(),
                TopicError::MisplacedWildcard,
                "{bad}"
            );
        }
    }

    #[test]
    fn invalid_shares_are_rejected() {
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g/",
            "$share/+/a",
            "$share/#/a",
        ] {
            assert_eq!(
                TopicFilter::new(bad).unwrap_err(),
                TopicError::InvalidShare,
                "{bad}"
            );
        }
    }

    #[test]
    fn empty_topics_are_rejected() {
        assert_eq!(TopicName::new("").unwrap_err(), TopicError::Empty);
        assert_eq!(TopicFilter::new("").unwrap_err(), TopicError::Empty);
    }

    #[test]
    fn spec_examples_match() {
        // MQTT 3.1.1 §4.7.1.2 and §4.7.1.3.
        assert!(filter_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1"
        ));
        assert!(filter_matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(filter_matches("sport/#", "sport"));
        assert!(filter_matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!filter_matches(
            "sport/tennis/+",
            "sport/tennis/player1/ranking"
        ));
        assert!(!filter_matches("sport/+", "sport"));
        assert!(filter_matches("sport/+", "sport/"));
        assert!(filter_matches("+/+", "/finance"));
        assert!(filter_matches("/+", "/finance"));
        assert!(!filter_matches("+", "/finance"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(filter_matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }
}
