//! Rewriting, filtering or enriching messages after they are authorized and before they
//! are routed (WIT interface `transform`).

use crate::bindings::transform::Guest;
use crate::types::{Client, Message, Outcome};

/// Called with everything decoded from one read of a publisher, for topics matching the
/// plugin's `topics` filters. Transforms compose: each plugin sees the previous one's
/// output.
///
/// Exported by `export!(P with [transform])`. Implement [`Transform::transform_one`];
/// override [`Transform::transform`] only to share work across a batch.
pub trait Transform {
    /// One outcome per message, in order. Default: `transform_one` for each message.
    fn transform(publisher: Client, messages: Vec<Message>) -> Vec<Outcome> {
        messages
            .into_iter()
            .map(|m| Self::transform_one(&publisher, m))
            .collect()
    }

    /// The outcome of one message: [`Outcome::Keep`], [`Outcome::Replace`] (a valid topic
    /// name, or the original is kept), [`Outcome::Drop`] (for every subscriber; the
    /// publisher is acknowledged) or [`Outcome::Reject`] (refused; see its codes).
    /// Default: keep.
    fn transform_one(publisher: &Client, message: Message) -> Outcome {
        let _ = (publisher, message);
        Outcome::Keep
    }
}

impl<T: Transform> Guest for T {
    fn transform(publisher: Client, messages: Vec<Message>) -> Vec<Outcome> {
        <T as Transform>::transform(publisher, messages)
    }
}
