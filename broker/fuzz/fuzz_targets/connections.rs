//! Several connections to one broker at once, fed arbitrary bytes in interleaved steps:
//! takeovers of one client id, wills, retained messages, shared and persistent sessions
//! meet here, over in-memory streams, on a current-thread runtime whose clock is paused
//! (timers fire as soon as everything idles).
//!
//! The input is a sequence of steps. A step's first byte picks one of four connections
//! (its low two bits); with its top bit set it closes that connection (the next step on it
//! opens a new one), otherwise a two-byte length follows and that many bytes are written
//! to it. Everything the broker sends is read and discarded. One broker serves every
//! input: persistent sessions expire within seconds (of the paused clock) and retained
//! messages are bounded, so state cannot pile up without bound.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sandpiper::broker::Broker;
use sandpiper::codec::ProtocolVersion;
use sandpiper::config::{Config, Durability};
use sandpiper::connection::{self, ListenerInfo};
use sandpiper::message::Principal;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, WriteHalf};
use tokio::task::JoinHandle;

struct Env {
    rt: tokio::runtime::Runtime,
    broker: Arc<Broker>,
    listener: Arc<ListenerInfo>,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
        {
            Ok(rt) => rt,
            Err(e) => panic!("runtime: {e}"),
        };
        let mut config = Config::default();
        config.store.data_dir =
            std::env::temp_dir().join(format!("sandpiper-fuzz-many-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&config.store.data_dir);
        config.store.durability = Durability::Periodic;
        config.store.fsync_interval_ms = 60_000;
        config.mqtt.max_session_expiry = 5;
        // Topics as deep as a packet allows reach the router's walks.
        config.mqtt.max_topic_levels = 1 << 20;
        config.mqtt.max_retained_messages = 64;
        config.mqtt.max_retained_bytes = 1 << 20;
        let broker = match rt.block_on(async { Broker::new(config) }) {
            Ok(b) => b,
            Err(e) => panic!("broker: {e}"),
        };
        let name: Arc<str> = "fuzz".into();
        let listener = Arc::new(ListenerInfo {
            name: name.clone(),
            anonymous: Arc::new(Principal {
                user: None,
                listener: name,
            }),
            allow_anonymous: true,
            protocols: vec![
                ProtocolVersion::V3_1,
                ProtocolVersion::V3_1_1,
                ProtocolVersion::V5,
            ],
            username_from_cert: false,
            client_cert: None,
            stop: broker.shutdown.child_token(),
        });
        Env {
            rt,
            broker,
            listener,
        }
    })
}

/// One open connection: our writing half, and the tasks of the broker's side and of the
/// reader that discards what it sends.
struct Open {
    wr: WriteHalf<DuplexStream>,
    tasks: [JoinHandle<()>; 2],
}

fn open(env: &Env) -> Open {
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    let (client, server) = tokio::io::duplex(16 * 1024);
    let (rd, wr) = tokio::io::split(server);
    let conn = tokio::spawn(connection::run(
        env.broker.clone(),
        env.listener.clone(),
        peer,
        rd,
        wr,
    ));
    let (mut crd, cwr) = tokio::io::split(client);
    let drain = tokio::spawn(async move {
        let mut sink = [0u8; 4096];
        while let Ok(n) = crd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    Open {
        wr: cwr,
        tasks: [conn, drain],
    }
}

async fn close(mut c: Open) {
    let _ = c.wr.shutdown().await;
    drop(c.wr);
    for t in c.tasks {
        // Virtual time: this bounds the timers a connection may wait on, not the CPU.
        let _ = tokio::time::timeout(Duration::from_secs(3600), t).await;
    }
}

fuzz_target!(|data: &[u8]| {
    let env = env();
    env.rt.block_on(async {
        let mut conns: [Option<Open>; 4] = [None, None, None, None];
        let mut input = data;
        while let Some((&op, rest)) = input.split_first() {
            let slot = &mut conns[usize::from(op & 3)];
            if op & 0x80 != 0 {
                if let Some(c) = slot.take() {
                    close(c).await;
                }
                input = rest;
                continue;
            }
            let Some((len, rest)) = rest.split_first_chunk::<2>() else {
                break;
            };
            let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
            let (chunk, rest) = rest.split_at(len);
            input = rest;
            let c = slot.get_or_insert_with(|| open(env));
            let _ = tokio::time::timeout(Duration::from_secs(60), c.wr.write_all(chunk)).await;
            // Let the broker's tasks run before the next step.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for c in conns.into_iter().flatten() {
            close(c).await;
        }
        // Wills with a delay and sessions that expire: let their timers run.
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
});
