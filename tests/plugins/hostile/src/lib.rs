//! A plugin that misbehaves on purpose, chosen by `[config] mode` in its sidecar:
//! `loop` (never returns), `alloc` (allocates without bound), `trap` (unreachable),
//! `slow-init` (init never returns), `fail-init` (init returns an error), `deny` (denies
//! everything, well-behaved), `allow` (allows everything). Misbehaviour applies to
//! `authorize` on topics starting with `bad/` and to every `authenticate` of a client id
//! starting with `bad`; other requests are allowed.

wit_bindgen::generate!({
    path: "../../../wit",
    inline: "
        package test:hostile;
        world hostile {
            include sandpiper:plugin/authorizer@0.1.0;
            include sandpiper:plugin/authenticator@0.1.0;
            include sandpiper:plugin/initializer@0.1.0;
        }
    ",
    world: "test:hostile/hostile",
    generate_all,
});

use exports::sandpiper::plugin::authenticate::{self as auth, ConnectInfo, Step};
use exports::sandpiper::plugin::authorize::{Decision, Request};
use exports::sandpiper::plugin::lifecycle;
use sandpiper::plugin::types::Client;

fn mode() -> String {
    sandpiper::plugin::config::get("mode").unwrap_or_default()
}

fn misbehave(m: &str) {
    match m {
        "loop" => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut v: Vec<Vec<u8>> = Vec::new();
            loop {
                v.push(vec![1u8; 1 << 20]);
            }
        }
        "trap" => std::process::abort(),
        _ => {}
    }
}

struct Hostile;

impl lifecycle::Guest for Hostile {
    fn init() -> Result<(), String> {
        match mode().as_str() {
            "slow-init" => misbehave("loop"),
            "fail-init" => return Err("refusing to start".into()),
            _ => {}
        }
        Ok(())
    }
}

impl exports::sandpiper::plugin::authorize::Guest for Hostile {
    fn authorize(_client: Client, requests: Vec<Request>) -> Vec<Decision> {
        let m = mode();
        if m == "deny" {
            return requests.iter().map(|_| Decision::Deny(0x87)).collect();
        }
        if requests.iter().any(|r| r.topic.starts_with("bad/")) {
            misbehave(&m);
        }
        requests.iter().map(|_| Decision::Allow).collect()
    }
}

impl auth::Guest for Hostile {
    fn authenticate(info: ConnectInfo) -> auth::Decision {
        let m = mode();
        if info.client_id.starts_with("bad") {
            misbehave(&m);
        }
        if m == "deny" {
            return auth::Decision::Deny(0x86);
        }
        auth::Decision::Allow(auth::Grant {
            username: info.username,
            attributes: Vec::new(),
            auth_data: None,
        })
    }

    fn auth_step(_step: Step) -> auth::Decision {
        auth::Decision::Deny(0x8c)
    }
}

export!(Hostile);
