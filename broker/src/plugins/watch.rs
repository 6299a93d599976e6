//! Live reload of the plugins folder: every 250 ms the folder's `*.wasm` files and their
//! sidecars `NAME.toml` are stat'ed; a new or changed pair is compiled and instantiated on
//! the watcher's own thread (off the hot path), a removed one is dropped, and the new
//! chain is swapped in whole. A version that fails to compile, link or `init` is logged
//! and refused, and the previous version of that plugin keeps serving; the same files are
//! not tried again until they change.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use super::Plugins;
use super::plugin::Plugin;
use super::sidecar::Sidecar;

/// How often the folder is looked at.
pub const POLL: Duration = Duration::from_millis(250);

/// (mtime, length) of the `.wasm`, of the sidecar (if any), and of the files its
/// `config_files` named when it was last loaded.
type Stamp = (
    Option<(SystemTime, u64)>,
    Option<(SystemTime, u64)>,
    Vec<Option<(SystemTime, u64)>>,
);

/// One plugin the watcher knows: its files' stamps when last looked at, the `config_files`
/// its sidecar named then, and the version serving.
struct Known {
    stamp: Stamp,
    files: Vec<std::path::PathBuf>,
    serving: Option<Arc<Plugin>>,
}

/// How often a missing required plugin is logged again.
const MISSING_LOG: Duration = Duration::from_secs(60);

/// What the watcher knows of the folder.
#[derive(Default)]
pub struct Watcher {
    /// By plugin name.
    known: BTreeMap<String, Known>,
    /// Required plugins whose file is gone (still serving), and when that was last logged.
    missing: BTreeMap<String, std::time::Instant>,
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn stamp_of(wasm: &Path, files: &[std::path::PathBuf]) -> Stamp {
    (
        stamp(wasm),
        stamp(&wasm.with_extension("toml")),
        files.iter().map(|f| stamp(f)).collect(),
    )
}

impl Watcher {
    /// Looks at the folder once and installs a new chain if anything changed.
    pub fn scan(&mut self, plugins: &Plugins) {
        let Some(dir) = &plugins.dir else { return };
        let mut present = BTreeMap::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let path = e.path();
                if path.extension().and_then(|x| x.to_str()) != Some("wasm") {
                    continue;
                }
                let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                    continue;
                };
                present.insert(name.to_owned(), path);
            }
        }
        let mut changed = false;
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !present.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            if plugins.required.contains(&name)
                && self.known.get(&name).is_some_and(|k| k.serving.is_some())
            {
                // A required plugin stays loaded while its file is away.
                let due = self
                    .missing
                    .get(&name)
                    .is_none_or(|t| t.elapsed() >= MISSING_LOG);
                if due {
                    tracing::error!(plugin = %name, "required plugin's file removed: the loaded version keeps serving until it is back");
                    self.missing.insert(name, std::time::Instant::now());
                }
                continue;
            }
            if let Some(Known {
                serving: Some(_), ..
            }) = self.known.remove(&name)
            {
                tracing::info!(plugin = %name, "plugin removed");
                crate::metrics::reloaded(&name, "removed");
                changed = true;
            }
        }
        for (name, wasm) in present {
            if self.missing.remove(&name).is_some() {
                tracing::info!(plugin = %name, "required plugin's file is back");
            }
            let files = self
                .known
                .get(&name)
                .map(|k| k.files.clone())
                .unwrap_or_default();
            let st = stamp_of(&wasm, &files);
            if self.known.get(&name).is_some_and(|k| k.stamp == st) {
                continue;
            }
            let old = self.known.get(&name).and_then(|k| k.serving.clone());
            // The files the sidecar names now (even when the load fails), stamped before
            // the load reads them: a file that changes while it is being loaded then
            // differs at the next scan and is loaded again, never skipped.
            let files = Sidecar::for_component(&wasm)
                .map(|s| s.config_file_paths(dir))
                .unwrap_or(files);
            let stamp = stamp_of(&wasm, &files);
            let loaded = load(plugins, &wasm, &name);
            match loaded {
                Ok(p) => {
                    crate::metrics::reloaded(
                        &name,
                        if old.is_some() { "replaced" } else { "loaded" },
                    );
                    tracing::info!(plugin = %name, hooks = ?p.hooks.names(), priority = p.sidecar.priority,
                        "plugin {}", if old.is_some() { "replaced" } else { "loaded" });
                    self.known.insert(
                        name,
                        Known {
                            stamp,
                            files,
                            serving: Some(Arc::new(p)),
                        },
                    );
                    changed = true;
                }
                Err(e) => {
                    crate::metrics::reloaded(&name, "refused");
                    tracing::error!(plugin = %name, error = %e,
                        "plugin refused{}", if old.is_some() { "; the previous version keeps serving" } else { "" });
                    self.known.insert(
                        name,
                        Known {
                            stamp,
                            files,
                            serving: old,
                        },
                    );
                }
            }
        }
        if changed {
            plugins.install(
                self.known
                    .values()
                    .filter_map(|k| k.serving.clone())
                    .collect(),
            );
        }
    }

    /// The required plugins that are not loaded.
    pub fn missing_required(&self, plugins: &Plugins) -> Vec<String> {
        (plugins.required.iter())
            .filter(|r| self.known.get(*r).is_none_or(|k| k.serving.is_none()))
            .cloned()
            .collect()
    }
}

fn load(plugins: &Plugins, wasm: &Path, name: &str) -> Result<Plugin, String> {
    let bytes = std::fs::read(wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
    let sidecar = Sidecar::for_component(wasm)?;
    let host = plugins.host().ok_or("plugin engine unavailable")?;
    Plugin::load(&host, name, &bytes, sidecar, plugins.services()).map_err(|e| format!("{e:#}"))
}

/// Polls the folder on a thread of its own until shutdown or until the host is dropped.
pub fn spawn(
    plugins: Weak<Plugins>,
    mut w: Watcher,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let r = std::thread::Builder::new()
        .name("plugin-watch".into())
        .spawn(move || {
            while !shutdown.is_cancelled() {
                std::thread::sleep(POLL);
                let Some(p) = plugins.upgrade() else { return };
                w.scan(&p);
            }
        });
    if let Err(e) = r {
        tracing::error!(error = %e, "plugin watcher failed to start: no live reload");
    }
}
