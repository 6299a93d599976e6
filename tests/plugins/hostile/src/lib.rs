//! A plugin that misbehaves on purpose, chosen by `[config] mode` in its sidecar:
//! `loop` (never returns), `alloc` (allocates without bound), `trap` (unreachable),
//! `slow-init` (init never returns), `fail-init` (init returns an error), `deny` (denies
//! everything, well-behaved), `allow` (allows everything), and the WASI calls a hook may
//! make that block in the host: `print` (writes to stderr), `sleep` (1 ms), `panic` (a
//! Rust panic with a message, which is written to stderr before the trap), `socket` (a
//! TCP connect to the sidecar's `[config] address`), `http` (a GET to it over wasi:http),
//! `stall` (a connect to it and a read that waits for an answer that never comes) and
//! `lookup` (a name lookup of `[config] lookup`); after the call the hook answers as a
//! well-behaved one. Misbehaviour applies
//! to `authorize` on topics starting with `bad/`, to `transform` on `badt/`, to `deliver`
//! on `badd/`, and to every `authenticate` of a client id starting with `bad`; other
//! requests are allowed and messages kept.

#![allow(
    unsafe_code,
    reason = "the bindings wit_bindgen::generate! writes here export the hooks by symbol \
              name; this plugin makes its own to reach what the SDK keeps out of reach"
)]

wit_bindgen::generate!({
    path: "../../../wit",
    inline: "
        package test:hostile;
        world hostile {
            include sandpiper:plugin/authorizer@0.1.1;
            include sandpiper:plugin/authenticator@0.1.1;
            include sandpiper:plugin/initializer@0.1.1;
            include sandpiper:plugin/transformer@0.1.1;
            include sandpiper:plugin/deliverer@0.1.1;
        }
    ",
    world: "test:hostile/hostile",
    generate_all,
});

use exports::sandpiper::plugin::authenticate::{self as auth, ConnectInfo, Step};
use exports::sandpiper::plugin::authorize::{Decision, Request};
use exports::sandpiper::plugin::lifecycle;
use sandpiper::plugin::types::{Client, Message, Outcome};

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
        "print" => eprintln!("hostile plugin: a line on stderr"),
        "sleep" => std::thread::sleep(std::time::Duration::from_millis(1)),
        "panic" => panic!("hostile plugin panics on purpose"),
        "socket" => {
            let address = sandpiper::plugin::config::get("address").unwrap_or_default();
            let _ = std::net::TcpStream::connect(address.as_str());
        }
        "http" => http_get(),
        "stall" => {
            use std::io::Read;
            let address = sandpiper::plugin::config::get("address").unwrap_or_default();
            if let Ok(mut s) = std::net::TcpStream::connect(address.as_str()) {
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }
        }
        "lookup" => {
            use std::net::ToSocketAddrs;
            let name = sandpiper::plugin::config::get("lookup").unwrap_or_default();
            let _ = (name.as_str(), 80).to_socket_addrs();
        }
        _ => {}
    }
}

/// A GET to the sidecar's `address` over wasi:http, waiting for the answer (or the error).
fn http_get() {
    use wasip2::http::outgoing_handler;
    use wasip2::http::types::{Fields, OutgoingRequest, Scheme};
    let address = sandpiper::plugin::config::get("address").unwrap_or_default();
    let request = OutgoingRequest::new(Fields::new());
    let _ = request.set_scheme(Some(&Scheme::Http));
    let _ = request.set_authority(Some(&address));
    let _ = request.set_path_with_query(Some("/"));
    if let Ok(response) = outgoing_handler::handle(request, None) {
        response.subscribe().block();
        let _ = response.get();
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

impl exports::sandpiper::plugin::transform::Guest for Hostile {
    fn transform(_publisher: Client, messages: Vec<Message>) -> Vec<Outcome> {
        if messages.iter().any(|m| m.topic.starts_with("badt/")) {
            misbehave(&mode());
        }
        messages.iter().map(|_| Outcome::Keep).collect()
    }
}

impl exports::sandpiper::plugin::deliver::Guest for Hostile {
    fn deliver(_subscriber: Client, messages: Vec<Message>) -> Vec<Outcome> {
        if messages.iter().any(|m| m.topic.starts_with("badd/")) {
            misbehave(&mode());
        }
        messages.iter().map(|_| Outcome::Keep).collect()
    }
}

export!(Hostile);
