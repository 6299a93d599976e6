//! Deciding what an authenticated client may do with a topic (WIT interface `authorize`).

use crate::bindings::authorize::Guest;
pub use crate::bindings::authorize::{Action, Decision, Request};
use crate::types::Client;

/// Called with the requests of one client whose answers are not cached (the filters of
/// one SUBSCRIBE, the publishes of one read). The first `Allow`/`Deny` in the chain
/// decides; when every plugin ignores, the request is allowed. Decisions are cached per
/// client until it disconnects or the chain changes: decide from the request and the
/// client alone.
///
/// Exported by `export!(P with [authorize])`. Implement [`Authorize::authorize_one`];
/// override [`Authorize::authorize`] only to share work across a batch.
pub trait Authorize {
    /// Answers a batch, one decision per request in order. Default: `authorize_one` for
    /// each request.
    fn authorize(client: Client, requests: Vec<Request>) -> Vec<Decision> {
        requests
            .iter()
            .map(|r| Self::authorize_one(&client, r))
            .collect()
    }

    /// Answers one request. Default: [`Decision::Ignore`].
    fn authorize_one(client: &Client, request: &Request) -> Decision {
        let _ = (client, request);
        Decision::Ignore
    }
}

impl<T: Authorize> Guest for T {
    fn authorize(client: Client, requests: Vec<Request>) -> Vec<Decision> {
        <T as Authorize>::authorize(client, requests)
    }
}
