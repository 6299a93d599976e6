//! A throwaway PostgreSQL cluster: Debian's `postgresql` binaries (installed with apt when
//! missing, with sudo when not root, as `tests/install` does), `initdb` into a temporary
//! folder, a free port on 127.0.0.1, a database `mqtt`, SCRAM-SHA-256 password
//! authentication over TCP and trust over the cluster's own Unix socket. Run as root, the
//! server runs as the `postgres` user (PostgreSQL refuses root). Stopped and deleted on
//! drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// One cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    user: String,
    as_postgres: bool,
}

/// The folder with `initdb` and `pg_ctl`: `$PG_BIN`, else the newest
/// `/usr/lib/postgresql/N/bin`, else one on `PATH`; Debian's `postgresql` is installed
/// first when none has them.
pub fn bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = find_bin() {
            return bin;
        }
        let apt = |args: &[&str]| {
            let mut c = if crate::is_root() {
                Command::new("apt-get")
            } else {
                let mut c = Command::new("sudo");
                c.arg("apt-get");
                c
            };
            c.args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(apt(&["update", "-qq"]), "apt-get update failed");
        assert!(
            apt(&["install", "-y", "-qq", "postgresql"]),
            "apt-get install postgresql failed"
        );
        find_bin().unwrap_or_else(|| panic!("no initdb after installing postgresql"))
    })
}

fn find_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Some(dir.into());
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
        return Some(bin);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|d| d.join("initdb").exists())
}

impl Postgres {
    /// Initialises and starts a cluster whose superuser is `user` with `password`.
    pub fn start(user: &str, password: &str) -> Postgres {
        Postgres::start_with(user, password, "")
    }

    /// [`Postgres::start`], with `hba` (pg_hba.conf lines) checked before the rule that
    /// asks every TCP client for SCRAM-SHA-256: roles that log in another way.
    pub fn start_with(user: &str, password: &str, hba: &str) -> Postgres {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sandpiper-postgres-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("create {}: {e}", dir.display());
        }
        let pg = Postgres {
            dir,
            port: crate::free_port(),
            user: user.to_owned(),
            as_postgres: crate::is_root(),
        };
        let pwfile = pg.dir.join("pwfile");
        if let Err(e) = std::fs::write(&pwfile, password) {
            panic!("write {}: {e}", pwfile.display());
        }
        pg.chown();
        let data = pg.data();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                user,
                "--pwfile",
                &pwfile.to_string_lossy(),
                "--auth-local",
                "trust",
                "--auth-host",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-locale",
                "-N",
            ],
        );
        if !hba.is_empty() {
            let conf = Path::new(&data).join("pg_hba.conf");
            let text =
                format!("local all all trust\n{hba}\nhost all all 127.0.0.1/32 scram-sha-256\n");
            if let Err(e) = std::fs::write(&conf, text) {
                panic!("write {}: {e}", conf.display());
            }
            pg.chown();
        }
        pg.resume();
        pg.psql_in("postgres", "CREATE DATABASE mqtt");
        pg
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
                .is_ok_and(|s| s.success());
            assert!(ok, "chown to postgres failed");
        }
    }

    /// Runs a program of the server's bin folder, as `postgres` when root.
    fn run(&self, program: &str, args: &[&str]) {
        let exe = bin().join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = match cmd.args(args).stdin(Stdio::null()).output() {
            Ok(out) => out,
            Err(e) => panic!("run {}: {e}", exe.display()),
        };
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the (initialised, stopped) server on its port; returns once it accepts
    /// connections.
    pub fn resume(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c password_encryption=scram-sha-256 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").to_string_lossy().into_owned();
        let data = self.data();
        self.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-o", &opts, "-w", "-t", "30", "start",
            ],
        );
    }

    /// Stops the server: clients are disconnected, transactions in flight rolled back.
    pub fn stop(&self) {
        let data = self.data();
        self.run(
            "pg_ctl",
            &["-D", &data, "-m", "fast", "-w", "-t", "30", "stop"],
        );
    }

    /// Runs `sql` as the superuser in database `mqtt`; psql's unaligned, tuples-only
    /// output.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in("mqtt", sql)
    }

    /// Runs `sql` as the superuser over the cluster's Unix socket (trust) in database
    /// `db`.
    pub fn psql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", &self.user])
            .args(["-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output();
        let out = match out {
            Ok(out) => out,
            Err(e) => panic!("run psql: {e}"),
        };
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pg_ctl = bin().join("pg_ctl");
        let data = self.data();
        let args = ["-D", &data, "-m", "immediate", "-w", "-t", "30", "stop"];
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&pg_ctl);
            c
        } else {
            Command::new(&pg_ctl)
        };
        let _ = cmd
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
