//! A sink that publishes every record it receives back into the broker on
//! `sunk/<original topic>` (QoS 1, payload unchanged), so a test subscriber sees what the
//! sink got and in which order. With `[config] fail = "true"` every batch is answered
//! `retry`; with `connect = "ip:port"` each batch first opens a TCP connection there and
//! answers `retry` with the error if that fails (the network allow-list at work).

use sandpiper_plugin::config;
use sandpiper_plugin::publish::publish;
use sandpiper_plugin::sink::{Sink, SinkRecord, WriteResult};
use sandpiper_plugin::types::{Message, Qos};

struct Probe;

impl Sink for Probe {
    fn write(batch: Vec<SinkRecord>) -> WriteResult {
        if config::get("fail").as_deref() == Some("true") {
            return WriteResult::Retry("told to fail".into());
        }
        if let Some(addr) = config::get("connect")
            && let Err(e) = std::net::TcpStream::connect(addr.as_str())
        {
            return WriteResult::Retry(format!("connect {addr}: {e}"));
        }
        for r in batch {
            let mut m = Message::new(format!("sunk/{}", r.message.topic), r.message.payload);
            m.qos = Qos::AtLeastOnce;
            if let Err(e) = publish(&m) {
                return WriteResult::Retry(format!("publish: {e:?}"));
            }
        }
        WriteResult::Ok
    }
}

sandpiper_plugin::export!(Probe with [sink]);
