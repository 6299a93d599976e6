//! The plugin's configuration: the `[config]` table of its sidecar `NAME.toml` (empty
//! when there is none).

use std::fmt;

use serde::de::DeserializeOwned;

pub use crate::bindings::imports::config::{get, toml};

/// The sidecar's `[config]` table deserialized into `T` (a `serde::Deserialize` type of
/// the plugin; `#[serde(default)]` fields for optional keys). Parses on every call:
/// cache the result (for example in a `std::sync::OnceLock`) when a hook needs it.
pub fn config<T: DeserializeOwned>() -> Result<T, Error> {
    from_str(&toml())
}

/// `text`, the TOML of a `[config]` table's contents, deserialized into `T` (what
/// [`config()`] does with the host's table; usable in host-side unit tests).
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, Error> {
    ::toml::from_str(text).map_err(|e| Error(e.to_string()))
}

/// The `[config]` table of a whole sidecar file deserialized into `T` (an empty table
/// when the file has none), for unit tests that check an example sidecar.
pub fn from_sidecar<T: DeserializeOwned>(sidecar: &str) -> Result<T, Error> {
    let mut file: ::toml::Table = ::toml::from_str(sidecar).map_err(|e| Error(e.to_string()))?;
    let table = match file.remove("config") {
        Some(::toml::Value::Table(t)) => t,
        Some(_) => return Err(Error("`config` is not a table".to_owned())),
        None => ::toml::Table::new(),
    };
    ::toml::Value::Table(table)
        .try_into()
        .map_err(|e: ::toml::de::Error| Error(e.to_string()))
}

/// Why a configuration could not be read into the plugin's type: the TOML parser's or
/// serde's message (which key, what was expected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid [config]: {}", self.0)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on purpose"
)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Conf {
        rate: u32,
        #[serde(default)]
        name: Option<String>,
    }

    #[test]
    fn parses_a_table() {
        assert_eq!(
            from_str::<Conf>("rate = 3\n"),
            Ok(Conf {
                rate: 3,
                name: None
            })
        );
        assert!(from_str::<Conf>("rate = \"x\"\n").is_err());
    }

    #[test]
    fn takes_the_config_table_of_a_sidecar() {
        let c: Conf = from_sidecar("priority = 5\n[config]\nrate = 7\nname = \"n\"\n").unwrap();
        assert_eq!(c.rate, 7);
        assert_eq!(c.name.as_deref(), Some("n"));
        assert!(
            from_sidecar::<Conf>("priority = 5\n").is_err(),
            "rate missing"
        );
        assert!(from_sidecar::<Conf>("config = 1\n").is_err());
    }
}
