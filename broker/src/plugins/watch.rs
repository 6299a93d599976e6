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

/// (mtime, length) of the `.wasm` and of the sidecar (if any).
type Stamp = (Option<(SystemTime, u64)>, Option<(SystemTime, u64)>);

/// What the watcher knows of the folder.
#[derive(Default)]
pub struct Watcher {
    /// By plugin name: the files' stamps when last looked at, and the version serving.
    known: BTreeMap<String, (Stamp, Option<Arc<Plugin>>)>,
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
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
                let side = path.with_extension("toml");
                present.insert(name.to_owned(), (stamp(&path), stamp(&side)));
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
            if let Some((_, Some(_))) = self.known.remove(&name) {
                tracing::info!(plugin = %name, "plugin removed");
                changed = true;
            }
        }
        for (name, st) in present {
            if self.known.get(&name).is_some_and(|(old, _)| *old == st) {
                continue;
            }
            let old = self.known.get(&name).and_then(|(_, p)| p.clone());
            match load(plugins, dir, &name) {
                Ok(p) => {
                    tracing::info!(plugin = %name, hooks = ?p.hooks.names(), priority = p.sidecar.priority,
                        "plugin {}", if old.is_some() { "replaced" } else { "loaded" });
                    self.known.insert(name, (st, Some(Arc::new(p))));
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(plugin = %name, error = %e,
                        "plugin refused{}", if old.is_some() { "; the previous version keeps serving" } else { "" });
                    self.known.insert(name, (st, old));
                }
            }
        }
        if changed {
            plugins.install(self.known.values().filter_map(|(_, p)| p.clone()).collect());
        }
    }
}

fn load(plugins: &Plugins, dir: &Path, name: &str) -> Result<Plugin, String> {
    let wasm = dir.join(format!("{name}.wasm"));
    let side = dir.join(format!("{name}.toml"));
    let bytes = std::fs::read(&wasm).map_err(|e| format!("{}: {e}", wasm.display()))?;
    let sidecar = match std::fs::read_to_string(&side) {
        Ok(t) => Sidecar::parse(&t).map_err(|e| format!("{}: {e}", side.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Sidecar::default(),
        Err(e) => return Err(format!("{}: {e}", side.display())),
    };
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
