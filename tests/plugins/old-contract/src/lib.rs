//! A plugin built against contract `sandpiper:plugin@0.1.0`, from that release's WIT kept
//! unchanged in `wit/`: an `authorize` hook that denies every request on
//! `old-contract/denied/...` (0x87) and has no opinion on anything else. A broker that
//! speaks a later 0.1.x must load it and call it as it is.

#![allow(
    unsafe_code,
    reason = "wit_bindgen::export! writes the exported hook's symbol for the component"
)]

wit_bindgen::generate!({
    path: "wit",
    world: "authorizer",
});

use exports::sandpiper::plugin::authorize::{Decision, Guest, Request};
use sandpiper::plugin::types::Client;

struct Old;

impl Guest for Old {
    fn authorize(_client: Client, requests: Vec<Request>) -> Vec<Decision> {
        requests
            .iter()
            .map(|r| {
                if r.topic.starts_with("old-contract/denied/") {
                    Decision::Deny(0x87)
                } else {
                    Decision::Ignore
                }
            })
            .collect()
    }
}

export!(Old);
