//! The types every hook and host import shares (WIT interface `types`), with small
//! constructors.

pub use crate::bindings::imports::types::{
    Attribute, Client, Message, MessageProperties, Outcome, ProtocolVersion, Qos, ReasonCode,
    UserProperty,
};

impl Message {
    /// A QoS 0, non-retained message without properties.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: Qos::AtMostOnce,
            retain: false,
            properties: MessageProperties::default(),
        }
    }
}

impl Default for MessageProperties {
    /// Every property absent (what an MQTT 3.x publisher's messages carry).
    fn default() -> Self {
        MessageProperties {
            payload_utf8: false,
            expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }
    }
}

impl Client {
    /// The value of the first attribute named `name` (set by the authenticate hook that
    /// let the client in).
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.as_str())
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
mod tests {
    use super::*;

    #[test]
    fn message_new_has_no_properties() {
        let m = Message::new("a/b", b"x".to_vec());
        assert_eq!(m.topic, "a/b");
        assert_eq!(m.qos, Qos::AtMostOnce);
        assert_eq!(m.properties, MessageProperties::default());
    }

    #[test]
    fn first_attribute_wins() {
        let c = Client {
            client_id: "c".into(),
            username: None,
            listener: "default".into(),
            attributes: vec![
                Attribute {
                    name: "tenant".into(),
                    value: "a".into(),
                },
                Attribute {
                    name: "tenant".into(),
                    value: "b".into(),
                },
            ],
        };
        assert_eq!(c.attribute("tenant"), Some("a"));
        assert_eq!(c.attribute("role"), None);
    }
}
