//! Deciding who may join a shared subscription's group (WIT interface `share`, contract
//! 0.1.1): a SUBSCRIBE to `$share/{group}/{filter}` is asked here once `authorize` has
//! allowed the filter.

use crate::bindings::share::Guest;
pub use crate::bindings::share::{Decision, Request};
use crate::types::Client;

/// Called with the shared subscriptions of one SUBSCRIBE (and again whenever the
/// session's subscriptions are authorized again: at resume, and when the plugin chain
/// changes). The first `Allow`/`Deny` in the chain decides; when every plugin ignores,
/// the join is allowed. Not cached.
///
/// Exported by `export!(P with [share])`. Implement [`Share::join_one`]; override
/// [`Share::join`] only to share work across a batch.
pub trait Share {
    /// Answers a batch, one decision per request in order. Default: `join_one` for each.
    fn join(client: Client, requests: Vec<Request>) -> Vec<Decision> {
        requests
            .iter()
            .map(|r| Self::join_one(&client, r))
            .collect()
    }

    /// Answers one request. Default: [`Decision::Ignore`].
    fn join_one(client: &Client, request: &Request) -> Decision {
        let _ = (client, request);
        Decision::Ignore
    }
}

impl<T: Share> Guest for T {
    fn join(client: Client, requests: Vec<Request>) -> Vec<Decision> {
        <T as Share>::join(client, requests)
    }
}
