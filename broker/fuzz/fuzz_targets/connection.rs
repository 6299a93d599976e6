//! Runs a whole client connection (`connection::run`) fed arbitrary bytes: CONNECT
//! handling, sessions, subscriptions, routing, retained messages, acknowledgements and the
//! close path, over an in-memory duplex stream. One broker (default configuration, a
//! temporary data folder) serves every input, in a current-thread runtime whose clock is
//! paused, so keep alive and other timers fire as soon as the connection idles instead of
//! in real time.
//!
//! The broker outlives single inputs, so sessions end with their connection
//! (`max_session_expiry = 0`) to keep state from piling up; retained messages do persist.

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
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
            std::env::temp_dir().join(format!("sandpiper-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&config.store.data_dir);
        config.store.durability = Durability::Periodic;
        config.store.fsync_interval_ms = 60_000;
        config.mqtt.max_session_expiry = 0;
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

fuzz_target!(|data: &[u8]| {
    let env = env();
    let peer = SocketAddr::from(([127, 0, 0, 1], 1));
    env.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let (rd, wr) = tokio::io::split(server);
        let conn = connection::run(env.broker.clone(), env.listener.clone(), peer, rd, wr);
        let feed = async move {
            // Write the input while reading everything the broker answers, then close our
            // side; the broker sees EOF and ends the connection.
            let (mut crd, mut cwr) = tokio::io::split(&mut client);
            let write = async {
                let _ = cwr.write_all(data).await;
                let _ = cwr.shutdown().await;
            };
            let read = async {
                let mut sink = [0u8; 4096];
                while let Ok(n) = crd.read(&mut sink).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(write, read);
        };
        // Virtual time: this bounds the timers a connection may wait on, not the CPU.
        let _ = tokio::time::timeout(Duration::from_secs(3600), async {
            tokio::join!(conn, feed);
        })
        .await;
    });
});
