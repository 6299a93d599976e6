//! Writing a batch: keeps one connection open across calls, opens it (and creates the
//! table when configured) on first use, inserts the whole batch in one transaction (a binary
//! COPY when the table's columns have exactly the six types, else a multi-row INSERT), and
//! reconnects after a failure. With `on_rejected = "drop"`, a batch refused for its data
//! is inserted again row by row, without the rows refused. No SDK calls, so it is tested
//! natively.

use std::time::Instant;

use crate::config::{Config, OnRejected};
use crate::row::{self, Encoded, Row};
use crate::wire::{Client, Error};

/// SQLSTATE `undefined_table`.
const UNDEFINED_TABLE: &str = "42P01";

/// Rows per round trip when inserting row by row.
const ROWS_PER_ROUND: usize = 1000;

/// The batch writer of one plugin instance.
pub struct Writer {
    config: Config,
    table: String,
    client: Option<Client>,
    /// Whether the table takes a binary COPY (its columns have exactly the six types),
    /// as found on the current connection; `None`: not known yet.
    copy: Option<bool>,
}

/// What a successful write did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Written {
    /// Rows the server reported inserted.
    pub rows: u64,
    /// A new connection was opened for it.
    pub connected: bool,
    /// Rows dropped because PostgreSQL refused them (`on_rejected = "drop"`).
    pub dropped: u64,
    /// Why the first dropped row was refused.
    pub rejected: Option<String>,
}

/// Whether `e` refuses the data itself, so that sending the same rows again cannot
/// succeed: SQLSTATE class 22 (data exception) or 23 (integrity constraint violation).
fn refuses_data(e: &Error) -> bool {
    e.connection_usable()
        && e.sqlstate()
            .is_some_and(|c| c.starts_with("22") || c.starts_with("23"))
}

impl Writer {
    /// A writer for `config` (already validated); connects on the first write.
    pub fn new(config: Config) -> Writer {
        let table = row::quote_table(&config.table);
        Writer {
            config,
            table,
            client: None,
            copy: None,
        }
    }

    /// The configuration it writes with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Inserts `rows` all or nothing, within `connect_timeout + io_timeout` in all. A
    /// kept connection that turns out broken (the server restarted since the last call)
    /// is replaced once within the call; a missing table is created once when
    /// `create_table` is set. Any other failure is returned, the connection dropped
    /// unless it is known to be usable, and the caller retries the same rows later.
    pub fn write(&mut self, rows: &[Row]) -> Result<Written, Error> {
        let io = self.config.io_timeout();
        let end = Instant::now() + self.config.connect_timeout() + io;
        // Each request gets `io_timeout`, but none may end after the call's bound.
        let request = || (Instant::now() + io).min(end);
        if rows.is_empty() {
            return Ok(Written::default());
        }
        let encoded: Vec<Encoded<'_>> = rows.iter().map(Encoded::new).collect();
        let plan = row::plan(&self.table, &encoded);
        let statements = row::statements(&plan, &encoded);

        let mut connected = false;
        let mut reconnected = false;
        let mut created = false;
        let mut copy_data = None;
        loop {
            let client = match self.client.as_mut() {
                Some(c) => c,
                None => {
                    let c = self.open(end)?;
                    connected = true;
                    self.client.insert(c)
                }
            };
            if self.copy.is_none() {
                match client.query_scalar(&row::copy_check_sql(&self.table), request()) {
                    Ok(n) => self.copy = Some(n.as_deref() == Some("6")),
                    // No table yet: the INSERT path creates it (or reports it missing).
                    Err(e) if e.sqlstate() == Some(UNDEFINED_TABLE) => {}
                    Err(Error::Io(_) | Error::Closed) if !connected && !reconnected => {
                        reconnected = true;
                        self.disconnect();
                        continue;
                    }
                    Err(e) => {
                        self.drop_unless_usable(&e);
                        return Err(e);
                    }
                }
            }
            let result = match self.copy {
                Some(true) => {
                    let data = copy_data.get_or_insert_with(|| row::copy_data(&encoded));
                    client.copy_in(&row::copy_sql(&self.table), data, request())
                }
                _ => client.execute_atomically(&statements, request()),
            };
            if let (Err(e), Some(true)) = (&result, self.copy) {
                if e.connection_usable()
                    && !refuses_data(e)
                    && e.sqlstate() != Some(UNDEFINED_TABLE)
                {
                    // Refused as a COPY for a reason the check did not foresee: this
                    // connection inserts from now on, starting with this batch.
                    self.copy = Some(false);
                    continue;
                }
                // The table may have changed under a failed COPY: look again next time.
                self.copy = None;
            }
            match result {
                Ok(n) => {
                    return Ok(Written {
                        rows: n,
                        connected,
                        ..Written::default()
                    });
                }
                Err(e) if self.config.on_rejected == OnRejected::Drop && refuses_data(&e) => {
                    let sql = row::insert_sql(&self.table, 1);
                    let each = row::one_per_row(&sql, &encoded);
                    let mut written = Written {
                        connected,
                        ..Written::default()
                    };
                    let by = request();
                    // In rounds: the server answers every row (~40 bytes), and answers
                    // left unread while the request is still being written would fill
                    // the socket buffers both ways and stall the pipeline.
                    for round in each.chunks(ROWS_PER_ROUND) {
                        let results = match client.execute_each(round, by) {
                            Ok(r) => r,
                            Err(e) => {
                                self.drop_unless_usable(&e);
                                return Err(e);
                            }
                        };
                        for r in results {
                            match r {
                                Ok(n) => written.rows += n,
                                Err(refused) => {
                                    written.dropped += 1;
                                    written.rejected.get_or_insert_with(|| refused.to_string());
                                }
                            }
                        }
                    }
                    return Ok(written);
                }
                Err(e)
                    if e.sqlstate() == Some(UNDEFINED_TABLE)
                        && self.config.create_table
                        && !created =>
                {
                    created = true;
                    self.copy = None;
                    if e.connection_usable() {
                        let sql = row::create_table_sql(&self.config.table);
                        if let Err(e) = client.simple_query(&sql, request()) {
                            self.drop_unless_usable(&e);
                            return Err(e);
                        }
                    } else {
                        self.disconnect();
                    }
                }
                // A kept connection that died in the meantime (restart, idle timeout):
                // one fresh try. A fresh connection's failure is the answer.
                Err(Error::Io(_) | Error::Closed) if !connected && !reconnected => {
                    reconnected = true;
                    self.disconnect();
                }
                Err(e) => {
                    self.drop_unless_usable(&e);
                    return Err(e);
                }
            }
        }
    }

    /// Connects, and creates the table when configured, before `end`.
    fn open(&mut self, end: Instant) -> Result<Client, Error> {
        let connected_by = (Instant::now() + self.config.connect_timeout()).min(end);
        let mut client = Client::connect(&self.config.params(), connected_by)?;
        if self.config.create_table {
            let by = (Instant::now() + self.config.io_timeout()).min(end);
            client.simple_query(&row::create_table_sql(&self.config.table), by)?;
        }
        Ok(client)
    }

    fn drop_unless_usable(&mut self, e: &Error) {
        if !e.connection_usable() {
            self.disconnect();
        }
    }

    /// Closes the connection, if any.
    pub fn disconnect(&mut self) {
        self.copy = None;
        if let Some(c) = self.client.take() {
            c.close();
        }
    }

    /// Whether batches go in by binary COPY (`None`: not known until the next write).
    pub fn uses_copy(&self) -> Option<bool> {
        self.copy
    }
}
