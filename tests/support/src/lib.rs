//! What the tests of the broker (`tests/e2e`) and of the bundled plugins share, each
//! written once: a free loopback port, a throwaway PostgreSQL cluster, and the tansu
//! Kafka-protocol server. Test code: a failure panics with what went wrong.

pub mod postgres;
pub mod tansu;

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0");
    match l.and_then(|l| l.local_addr()) {
        Ok(a) => a.port(),
        Err(e) => panic!("no free port on 127.0.0.1: {e}"),
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
