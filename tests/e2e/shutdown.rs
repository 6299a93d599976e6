//! SIGTERM: orderly shutdown with clients connected.

use std::time::Duration;

use crate::harness::{Broker, WAIT, raw, v3, v5};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_disconnects_clients_and_exits_zero() {
    let mut broker = Broker::start();
    let mut c3 = v3::Client::connect(v3::options(&broker, "stay-3")).await;
    c3.subscribe_ok("down/#", v3::QoS::AtLeastOnce).await;
    let mut c5 = v5::Client::connect(v5::options(&broker, "stay-5")).await;
    c5.subscribe_ok("down/#", v5::QoS::AtLeastOnce).await;
    // Raw MQTT 5 connection to read the DISCONNECT reason (see `raw::connect_v5`).
    let mut r5 = raw::connect_v5(&broker, "stay-raw").await;

    broker.terminate();

    // The contract: MQTT 5 clients get DISCONNECT 0x8B (server shutting down)...
    assert_eq!(raw::disconnect_codes(&mut r5).await, vec![0x8B]);
    assert!(
        c5.inbox.closed_within(WAIT).await.is_some(),
        "MQTT 5 connection still open after SIGTERM"
    );
    // ...3.x clients are closed...
    assert!(
        c3.inbox.closed_within(WAIT).await.is_some(),
        "3.1.1 connection still open after SIGTERM"
    );
    // ...and the process exits 0 within 5 s.
    let status = broker
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("broker still running 5 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_idle_broker_exits_zero() {
    let mut broker = Broker::start();
    broker.terminate();
    let status = broker
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("broker still running 5 s after SIGTERM");
    assert!(status.success(), "exit status {status}");
    // No longer accepting connections.
    assert!(tokio::net::TcpStream::connect(broker.addr()).await.is_err());
}
