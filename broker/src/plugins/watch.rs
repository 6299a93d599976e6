//! Live reload of the plugins folder: every 250 ms the folder's `*.wasm` files and their
//! sidecars `NAME.toml` are stat'ed; a new or changed pair is compiled and instantiated on
//! the watcher's own thread (off the hot path), a removed one is dropped, and the new
//! chain is swapped in whole. A version that fails to compile, link or `init` is logged
//! and refused, and the previous version of that plugin keeps serving; the same files are
//! not tried again until they change.
//!
//! An operator (the admin API) may also reload a plugin now, or disable it: a disabled
//! plugin is unloaded and its file left alone until it is enabled again; the set of
//! disabled plugins is kept in the store, so it lasts across restarts.

use std::collections::{BTreeMap, BTreeSet};
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
    /// Plugins an operator disabled: not loaded while their name is here.
    disabled: BTreeSet<String>,
    /// Why the current files of a plugin were refused, by name.
    errors: BTreeMap<String, String>,
}

/// What an operator asks of one plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Load its files again now.
    Reload,
    /// Unload it and leave it unloaded (across restarts) until enabled.
    Disable,
    /// Load it again after [`Control::Disable`].
    Enable,
}

/// Why a [`Control`] was not done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    /// No plugin of that name: no file, not disabled.
    Unknown,
    /// A required plugin (`[plugins] required`) cannot be disabled.
    Required,
    /// Its files could not be loaded (why).
    Refused(String),
}

/// A plugin's state, as the admin API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Serving.
    Loaded,
    /// Disabled by an operator.
    Disabled,
    /// Its file is there, but no version of it could be loaded.
    Failed,
}

/// Where the disabled set is kept: the store's key-value area, under a namespace no
/// plugin can have (a plugin's is its non-empty file name).
const DISABLED_NS: &str = "";
const DISABLED_KEY: &str = "plugins.disabled";

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

/// A change of the chain the watcher logs once it is in force: the plugin's name, its hooks
/// and priority (when loaded), and what happened.
type Said = (String, Option<(Vec<&'static str>, i32)>, &'static str);

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
                if self.disabled.contains(name) {
                    continue;
                }
                present.insert(name.to_owned(), path);
            }
        }
        let mut changed = false;
        // Said once the new chain is in force (after `install`), so that a line read in
        // the log means the change applies to the next message.
        let mut said: Vec<Said> = Vec::new();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !present.contains_key(*k))
            .cloned()
            .collect();
        for name in gone {
            self.errors.remove(&name);
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
                crate::metrics::reloaded(&name, "removed");
                said.push((name, None, "plugin removed"));
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
                    self.errors.remove(&name);
                    crate::metrics::reloaded(
                        &name,
                        if old.is_some() { "replaced" } else { "loaded" },
                    );
                    said.push((
                        name.clone(),
                        Some((p.hooks.names(), p.sidecar.priority)),
                        if old.is_some() {
                            "plugin replaced"
                        } else {
                            "plugin loaded"
                        },
                    ));
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
                    self.errors.insert(name.clone(), e);
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
        for (name, loaded, what) in said {
            match loaded {
                Some((hooks, priority)) => {
                    tracing::info!(plugin = %name, hooks = ?hooks, priority, "{what}");
                }
                None => tracing::info!(plugin = %name, "{what}"),
            }
        }
    }

    /// Reads the disabled set from the store (at start, before the first scan).
    pub fn load_disabled(&mut self, plugins: &Plugins) {
        let Some(store) = &plugins.store else { return };
        match store.kv_get(DISABLED_NS, DISABLED_KEY) {
            Ok(Some(bytes)) => {
                let text = String::from_utf8_lossy(&bytes);
                self.disabled = text
                    .lines()
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                if !self.disabled.is_empty() {
                    tracing::info!(plugins = ?self.disabled, "plugins disabled by an operator stay unloaded");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "cannot read which plugins are disabled"),
        }
    }

    fn save_disabled(&self, plugins: &Plugins) {
        if let Some(store) = &plugins.store {
            let text: Vec<&str> = self.disabled.iter().map(String::as_str).collect();
            store.kv_set(
                &std::sync::Arc::from(DISABLED_NS),
                DISABLED_KEY,
                text.join("\n").into_bytes(),
            );
        }
    }

    /// Does what an operator asks of plugin `name`, then looks at the folder.
    pub fn control(
        &mut self,
        plugins: &Plugins,
        name: &str,
        what: Control,
    ) -> Result<(), ControlError> {
        let file = plugins.dir.as_ref().map(|d| d.join(format!("{name}.wasm")));
        let has_file = file.as_ref().is_some_and(|f| f.is_file());
        match what {
            Control::Reload => {
                if self.disabled.contains(name) || !has_file {
                    return Err(ControlError::Unknown);
                }
                // Forget the stamp: the next scan loads the files whatever their times.
                if let Some(k) = self.known.get_mut(name) {
                    k.stamp = (None, None, Vec::new());
                }
                tracing::info!(plugin = %name, "plugin reload asked by an operator");
                self.scan(plugins);
                match self.errors.get(name) {
                    Some(e) => Err(ControlError::Refused(e.clone())),
                    None => Ok(()),
                }
            }
            Control::Disable => {
                if plugins.required.iter().any(|r| r == name) {
                    return Err(ControlError::Required);
                }
                if !has_file && !self.known.contains_key(name) && !self.disabled.contains(name) {
                    return Err(ControlError::Unknown);
                }
                if self.disabled.insert(name.to_owned()) {
                    self.save_disabled(plugins);
                    tracing::info!(plugin = %name, "plugin disabled by an operator");
                }
                self.errors.remove(name);
                if self.known.remove(name).is_some_and(|k| k.serving.is_some()) {
                    crate::metrics::reloaded(name, "removed");
                    plugins.install(
                        self.known
                            .values()
                            .filter_map(|k| k.serving.clone())
                            .collect(),
                    );
                }
                Ok(())
            }
            Control::Enable => {
                if !self.disabled.remove(name) {
                    return if has_file {
                        Ok(())
                    } else {
                        Err(ControlError::Unknown)
                    };
                }
                self.save_disabled(plugins);
                tracing::info!(plugin = %name, "plugin enabled by an operator");
                self.scan(plugins);
                match self.errors.get(name) {
                    Some(e) => Err(ControlError::Refused(e.clone())),
                    None => Ok(()),
                }
            }
        }
    }

    /// Every plugin the watcher knows of (loaded, refused or disabled) with its state and
    /// the last refusal of its files, if any.
    pub fn states(&self) -> Vec<(String, State, Option<String>)> {
        let mut out: Vec<(String, State, Option<String>)> = Vec::new();
        for (name, k) in &self.known {
            let state = if k.serving.is_some() {
                State::Loaded
            } else {
                State::Failed
            };
            out.push((name.clone(), state, self.errors.get(name).cloned()));
        }
        for name in &self.disabled {
            out.push((name.clone(), State::Disabled, None));
        }
        out.sort();
        out
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

impl Plugins {
    /// The folder's watcher, locked (a scan holds it while it loads).
    pub(super) fn watcher(&self) -> std::sync::MutexGuard<'_, Watcher> {
        // A scan that panicked left the watcher's maps as they were between two plugins.
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads, disables or enables plugin `name` (the admin API). Blocks while plugins
    /// load: call it off the async workers.
    pub fn control(&self, name: &str, what: Control) -> Result<(), ControlError> {
        if self.dir.is_none() {
            return Err(ControlError::Unknown);
        }
        self.watcher().control(self, name, what)
    }

    /// Every plugin known (loaded, refused or disabled): name, state, last refusal. Waits
    /// for a scan in progress.
    pub fn states(&self) -> Vec<(String, State, Option<String>)> {
        self.watcher().states()
    }
}

/// Polls the folder on a thread of its own until shutdown or until the host is dropped.
pub fn spawn(plugins: Weak<Plugins>, shutdown: tokio_util::sync::CancellationToken) {
    let r = std::thread::Builder::new()
        .name("plugin-watch".into())
        .spawn(move || {
            while !shutdown.is_cancelled() {
                std::thread::sleep(POLL);
                let Some(p) = plugins.upgrade() else { return };
                p.watcher().scan(&p);
            }
        });
    if let Err(e) = r {
        tracing::error!(error = %e, "plugin watcher failed to start: no live reload");
    }
}
