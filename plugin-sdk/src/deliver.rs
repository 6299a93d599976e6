//! Rewriting or filtering messages per subscriber, just before they are written to it
//! (WIT interface `deliver`).

use crate::bindings::deliver::Guest;
use crate::types::{Client, Message, Outcome};

/// Called with the messages of one write to `subscriber`, for topics matching the
/// plugin's `topics` filters.
///
/// Exported by `export!(P with [deliver])`. Implement [`Deliver::deliver_one`];
/// override [`Deliver::deliver`] only to share work across a batch.
pub trait Deliver {
    /// One outcome per message, in order. Default: `deliver_one` for each message.
    fn deliver(subscriber: Client, messages: Vec<Message>) -> Vec<Outcome> {
        messages
            .into_iter()
            .map(|m| Self::deliver_one(&subscriber, m))
            .collect()
    }

    /// The outcome of one message for this subscriber ([`Outcome::Drop`] and
    /// [`Outcome::Reject`] both drop it for this subscriber only). Default: keep.
    fn deliver_one(subscriber: &Client, message: Message) -> Outcome {
        let _ = (subscriber, message);
        Outcome::Keep
    }
}

impl<T: Deliver> Guest for T {
    fn deliver(subscriber: Client, messages: Vec<Message>) -> Vec<Outcome> {
        <T as Deliver>::deliver(subscriber, messages)
    }
}
