//! A throwaway PostgreSQL cluster for the native tests: Debian's `postgresql` binaries,
//! `initdb` into a temporary folder, a free port on 127.0.0.1, SCRAM-SHA-256 password
//! authentication (and one md5 and one cleartext role), stopped and deleted on drop.
//! Run as root, the server runs as the `postgres` user (it refuses root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The superuser's name and password.
pub const USER: &str = "sandpiper";
pub const PASSWORD: &str = "pw-Sandpiper-1";

pub struct TestDb {
    dir: PathBuf,
    bin: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

/// The folder holding `initdb` and `pg_ctl`: `$PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin`, else whatever `PATH` has.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| d.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!("PostgreSQL's initdb not found: install Debian's `postgresql` (tests/run does)")
        })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

impl TestDb {
    /// Initialises and starts a cluster.
    pub fn start() -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "postgres-sink-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let db = TestDb {
            dir,
            bin: bin_dir(),
            port: free_port(),
            as_postgres: is_root(),
        };
        std::fs::write(db.dir.join("pwfile"), PASSWORD).unwrap();
        db.chown();
        let data = db.data();
        db.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                USER,
                "--pwfile",
                &db.dir.join("pwfile").to_string_lossy(),
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "-N",
            ],
        );
        // Cleartext and md5 for their own roles; SCRAM for everyone else.
        std::fs::write(
            Path::new(&data).join("pg_hba.conf"),
            "local all all trust\n\
             host all plain 127.0.0.1/32 password\n\
             host all md5user 127.0.0.1/32 md5\n\
             host all all 127.0.0.1/32 scram-sha-256\n",
        )
        .unwrap();
        db.chown();
        db.resume();
        db.psql_in(
            "postgres",
            "CREATE ROLE plain LOGIN SUPERUSER PASSWORD 'plain-pw'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE md5user LOGIN SUPERUSER PASSWORD 'md5-pw';",
        );
        db.psql_in("postgres", "CREATE DATABASE mqtt");
        db
    }

    fn data(&self) -> String {
        self.dir.join("data").to_string_lossy().into_owned()
    }

    fn chown(&self) {
        if self.as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown to postgres failed");
        }
    }

    /// Runs a PostgreSQL program from the server's bin folder, as `postgres` when root.
    fn run(&self, program: &str, args: &[&str]) {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the (initialised, stopped) server on its port and waits until it is ready.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c password_encryption=scram-sha-256 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-o",
                &opts,
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
    }

    /// Stops the server (fast: clients are disconnected).
    pub fn stop(&self) {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "30", "stop"],
        );
    }

    /// Runs `sql` as the superuser in database `mqtt` and returns psql's unaligned,
    /// tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("mqtt", sql)
    }

    /// Runs `sql` as the superuser through the Unix socket (trust) in database `db`.
    fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                USER,
                "-d",
                db,
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }

    /// A plugin configuration for this server, logging in as the SCRAM superuser.
    pub fn config(&self, table: &str) -> crate::config::Config {
        let text = format!(
            "host = \"127.0.0.1\"\nport = {}\nuser = \"{USER}\"\npassword = \"{PASSWORD}\"\n\
             database = \"mqtt\"\ntable = \"{table}\"\nconnect_timeout_ms = 5000\nio_timeout_ms = 5000\n",
            self.port
        );
        let c: crate::config::Config = sandpiper_plugin::config::from_str(&text).unwrap();
        c.validate().unwrap();
        c
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let data = self.data();
        let args = [
            "-D",
            data.as_str(),
            "-m",
            "immediate",
            "-w",
            "-t",
            "30",
            "stop",
        ];
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&pg_ctl)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        } else {
            Command::new(&pg_ctl)
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
