//! A throwaway PostgreSQL cluster for the native tests (`sandpiper_test_support::postgres`,
//! shared with the broker's end-to-end tests): SCRAM-SHA-256 for the superuser, plus one
//! role that logs in with a cleartext password and one with md5.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]

use sandpiper_test_support::postgres::Postgres;

/// The superuser's name and password.
pub const USER: &str = "sandpiper";
pub const PASSWORD: &str = "pw-Sandpiper-1";

/// A cluster of one test.
pub struct TestDb(Postgres);

impl std::ops::Deref for TestDb {
    type Target = Postgres;
    fn deref(&self) -> &Postgres {
        &self.0
    }
}

impl TestDb {
    /// Initialises and starts a cluster with the roles `plain` (cleartext password) and
    /// `md5user` (md5) besides the superuser.
    pub fn start() -> TestDb {
        let pg = Postgres::start_with(
            USER,
            PASSWORD,
            "host all plain 127.0.0.1/32 password\n\
             host all md5user 127.0.0.1/32 md5",
        );
        pg.psql_in(
            "postgres",
            "CREATE ROLE plain LOGIN SUPERUSER PASSWORD 'plain-pw'; \
             SET password_encryption = 'md5'; \
             CREATE ROLE md5user LOGIN SUPERUSER PASSWORD 'md5-pw';",
        );
        TestDb(pg)
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
