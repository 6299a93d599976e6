//! Logging into the broker's log (every line carries the plugin's name; lines above the
//! broker's level are dropped by the host). Never log passwords or tokens.

pub use crate::bindings::imports::log::Level;

/// Writes `message` with structured `fields` (name, value) at `level`.
pub fn log(level: Level, message: &str, fields: &[(&str, &str)]) {
    let fields: Vec<(String, String)> = fields
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    crate::bindings::imports::log::log(level, message, &fields);
}

/// Writes `message` at level trace.
pub fn trace(message: &str) {
    log(Level::Trace, message, &[]);
}

/// Writes `message` at level debug.
pub fn debug(message: &str) {
    log(Level::Debug, message, &[]);
}

/// Writes `message` at level info.
pub fn info(message: &str) {
    log(Level::Info, message, &[]);
}

/// Writes `message` at level warn.
pub fn warn(message: &str) {
    log(Level::Warn, message, &[]);
}

/// Writes `message` at level error.
pub fn error(message: &str) {
    log(Level::Error, message, &[]);
}
