//! The sidecar file `NAME.toml` beside `NAME.wasm`: the plugin's place in the chain, its
//! limits, its failure policies, the topics it sees and its own `[config]` table.

use crate::codec::filter_matches;
use serde::Deserialize;

/// What a plugin's sidecar says (every key optional).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sidecar {
    /// Place in the chain: lower runs first; ties are ordered by file name.
    pub priority: i32,
    /// Topic filters selecting the messages `authorize` (publish), `transform`,
    /// `deliver` and `sink` are called for. Default: every topic (`#`).
    pub topics: Vec<String>,
    /// Linear memory cap per instance, MiB (at most [`MAX_MEMORY_MB`]).
    pub memory_mb: u32,
    /// Time budget of one hook call, milliseconds.
    pub time_ms: u32,
    /// Time budget of instantiation plus `init`, milliseconds.
    pub init_ms: u32,
    /// Instances kept alive for this plugin (a call that finds none free makes a
    /// temporary one).
    pub instances: u32,
    /// What a failed call (trap, timeout, memory exhaustion, wrong answer) means.
    pub on_failure: FailurePolicies,
    /// Addresses (`ip:port` or `host:port`) the plugin may open TCP connections to through
    /// WASI sockets and send `wasi:http` requests to; empty: no network at all.
    pub network: Vec<String>,
    /// Batching, queueing and retries of the `sink` hook.
    pub sink: SinkSettings,
    /// The plugin's own configuration (`config` host import).
    pub config: toml::Table,
    /// Files whose text becomes a string key of `[config]` (key → path, relative to the
    /// plugins folder): how a plugin without file access reads a password file. A change
    /// of such a file reloads the plugin like a change of the sidecar.
    pub config_files: std::collections::BTreeMap<String, std::path::PathBuf>,
}

/// Largest file `config_files` may name.
pub const MAX_CONFIG_FILE: u64 = 4 * 1024 * 1024;

/// Largest `memory_mb` a sidecar may ask for (the pooling allocator reserves this much
/// address space per memory slot).
pub const MAX_MEMORY_MB: u32 = 1024;

impl Default for Sidecar {
    fn default() -> Sidecar {
        Sidecar {
            priority: 100,
            topics: vec!["#".to_owned()],
            memory_mb: 64,
            time_ms: 100,
            init_ms: 2000,
            instances: 2,
            on_failure: FailurePolicies::default(),
            network: Vec::new(),
            sink: SinkSettings::default(),
            config: toml::Table::new(),
            config_files: Default::default(),
        }
    }
}

/// The `[sink]` table.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkSettings {
    /// Most records per `write` call.
    pub batch: u32,
    /// How long a batch may wait to fill, milliseconds.
    pub linger_ms: u32,
    /// Most records queued for the sink; beyond, the oldest are dropped and counted.
    pub max_queue: u64,
    /// First retry delay after a failed batch, milliseconds (doubled per failure).
    pub retry_min_ms: u32,
    /// Longest retry delay, milliseconds.
    pub retry_max_ms: u32,
}

impl Default for SinkSettings {
    fn default() -> SinkSettings {
        SinkSettings {
            batch: 256,
            linger_ms: 100,
            max_queue: 1_000_000,
            retry_min_ms: 200,
            retry_max_ms: 30_000,
        }
    }
}

/// Failure policy per hook.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailurePolicies {
    /// authenticate: `deny` (default, fail closed) or `ignore` (ask the next plugin).
    pub authenticate: DecideFailure,
    /// authorize: `deny` (default, fail closed) or `ignore`.
    pub authorize: DecideFailure,
    /// transform: `keep` (default, fail open) or `drop`.
    pub transform: PassFailure,
    /// deliver: `keep` (default) or `drop`.
    pub deliver: PassFailure,
}

impl Default for FailurePolicies {
    fn default() -> FailurePolicies {
        FailurePolicies {
            authenticate: DecideFailure::Deny,
            authorize: DecideFailure::Deny,
            transform: PassFailure::Keep,
            deliver: PassFailure::Keep,
        }
    }
}

/// What a failed authenticate/authorize call decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecideFailure {
    /// Refuse (0x87 not authorized).
    Deny,
    /// As if the plugin had answered `ignore`.
    Ignore,
}

/// What a failed transform/deliver call does with the messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassFailure {
    /// Pass them on unchanged.
    Keep,
    /// Drop them.
    Drop,
}

/// Why a sidecar was refused.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Not TOML, or an unknown key or a wrong type.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A value out of range.
    #[error("{key}: {reason}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Why.
        reason: String,
    },
}

impl Sidecar {
    /// The sidecar of the component `wasm` (`NAME.toml` beside it; the defaults when there
    /// is none), with its `config_files` read into `[config]`. The error names the file.
    pub fn for_component(wasm: &std::path::Path) -> Result<Sidecar, String> {
        let side = wasm.with_extension("toml");
        let mut sidecar = match std::fs::read_to_string(&side) {
            Ok(t) => Sidecar::parse(&t).map_err(|e| format!("{}: {e}", side.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Sidecar::default(),
            Err(e) => return Err(format!("{}: {e}", side.display())),
        };
        let dir = wasm.parent().unwrap_or(std::path::Path::new("."));
        for (key, path) in sidecar.config_files.clone() {
            let path = dir.join(path);
            let size = std::fs::metadata(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
            if size > MAX_CONFIG_FILE {
                return Err(format!("{}: larger than 4 MiB", path.display()));
            }
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            sidecar.config.insert(key, toml::Value::String(text));
        }
        Ok(sidecar)
    }

    /// The files `config_files` names, for the watcher.
    pub fn config_file_paths(&self, dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        self.config_files.values().map(|p| dir.join(p)).collect()
    }

    /// Parses and validates sidecar text.
    pub fn parse(text: &str) -> Result<Sidecar, SidecarError> {
        let s: Sidecar = toml::from_str(text)?;
        let invalid = |key, reason: &str| {
            Err(SidecarError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if s.memory_mb == 0 || s.memory_mb > MAX_MEMORY_MB {
            return invalid("memory_mb", "must be between 1 and 1024");
        }
        if s.time_ms == 0 || s.time_ms > 60_000 {
            return invalid("time_ms", "must be between 1 and 60000");
        }
        if s.init_ms == 0 || s.init_ms > 600_000 {
            return invalid("init_ms", "must be between 1 and 600000");
        }
        if s.instances == 0 || s.instances > 64 {
            return invalid("instances", "must be between 1 and 64");
        }
        for a in &s.network {
            let port = a.rsplit_once(':').and_then(|(h, p)| {
                (!h.is_empty()).then_some(())?;
                p.parse::<u16>().ok()
            });
            if port.is_none() {
                return Err(SidecarError::Invalid {
                    key: "network",
                    reason: format!("{a:?} is not host:port"),
                });
            }
        }
        let k = &s.sink;
        if k.batch == 0 || k.batch > 65_536 {
            return invalid("sink.batch", "must be between 1 and 65536");
        }
        if k.max_queue == 0 {
            return invalid("sink.max_queue", "must be at least 1");
        }
        if k.retry_min_ms == 0 || k.retry_max_ms < k.retry_min_ms {
            return invalid(
                "sink.retry_min_ms",
                "must be at least 1 and at most retry_max_ms",
            );
        }
        for f in &s.topics {
            if crate::codec::TopicFilter::new(f).is_err() {
                return Err(SidecarError::Invalid {
                    key: "topics",
                    reason: format!("{f:?} is not a topic filter"),
                });
            }
        }
        Ok(s)
    }

    /// Whether `topic` is selected by the plugin's `topics` filters.
    pub fn selects(&self, topic: &str) -> bool {
        self.topics.iter().any(|f| filter_matches(f, topic))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
    use super::*;

    /// Every example sidecar shipped with a bundled plugin or an example plugin is a valid
    /// sidecar (a top-level key written after a table header would land in that table).
    #[test]
    fn shipped_example_sidecars_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut checked = 0;
        for folder in ["plugins", "examples/plugins"] {
            for plugin in std::fs::read_dir(root.join(folder)).unwrap().flatten() {
                for file in std::fs::read_dir(plugin.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = file.path();
                    if path.to_string_lossy().ends_with(".example.toml") {
                        let text = std::fs::read_to_string(&path).unwrap();
                        if let Err(e) = Sidecar::parse(&text) {
                            panic!("{}: {e}", path.display());
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked >= 10, "only {checked} example sidecars found");
        let pw = Sidecar::parse(include_str!(
            "../../../plugins/password-auth/password-auth.example.toml"
        ))
        .unwrap();
        assert_eq!(pw.time_ms, 1000);
        assert!(pw.config_files.contains_key("passwd"));
    }

    #[test]
    fn defaults_and_validation() {
        let s = Sidecar::parse("").unwrap();
        assert_eq!(s.priority, 100);
        assert_eq!(s.on_failure.authorize, DecideFailure::Deny);
        assert!(Sidecar::parse("memory_mb = 0").is_err());
        assert!(Sidecar::parse("nope = 1").is_err());
        assert!(Sidecar::parse("topics = [\"a/#/b\"]").is_err());
        let s = Sidecar::parse(
            "priority = 5\ntopics=[\"a/+\"]\n[on_failure]\nauthorize=\"ignore\"\n[config]\nx=1",
        )
        .unwrap();
        assert_eq!(s.on_failure.authorize, DecideFailure::Ignore);
        assert!(s.selects("a/b") && !s.selects("a/b/c"));
        assert_eq!(s.config.get("x").and_then(|v| v.as_integer()), Some(1));
    }

    #[test]
    fn matching() {
        assert!(filter_matches("#", "a/b"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_matches("$SYS/#", "$SYS/x"));
    }
}
