//! What each loaded plugin costs: calls and their duration per hook, failures by kind.
//! Kept per plugin version, read by `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Hooks;
use crate::metrics::Histogram;

/// The hook names [`super::plugin::Plugin::call`] is called with.
pub const HOOKS: [&str; 8] = [
    "authenticate",
    "auth-step",
    "authorize",
    "share",
    "transform",
    "deliver",
    "sink",
    "events",
];

/// The export each name of [`HOOKS`] belongs to (0: shown once called).
const HOOK_BITS: [u32; 8] = [
    Hooks::AUTHENTICATE,
    0,
    Hooks::AUTHORIZE,
    Hooks::SHARE,
    Hooks::TRANSFORM,
    Hooks::DELIVER,
    Hooks::SINK,
    Hooks::EVENTS,
];

/// Why a call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The time budget ran out.
    Timeout,
    /// The guest trapped (other than for the budget or memory).
    Trap,
    /// The guest asked for more memory than its cap.
    Memory,
    /// A panic inside the call.
    Panic,
    /// An answer the broker cannot use (wrong length, invalid value).
    Answer,
}

/// The failure kinds with their `reason` label.
pub const FAILURES: [(Failure, &str); 5] = [
    (Failure::Timeout, "timeout"),
    (Failure::Trap, "trap"),
    (Failure::Memory, "memory"),
    (Failure::Panic, "panic"),
    (Failure::Answer, "answer"),
];

/// Calls of one hook.
#[derive(Debug, Default)]
pub struct HookStats {
    /// Calls made.
    pub calls: AtomicU64,
    /// How long each took.
    pub duration: Histogram,
}

/// The counters of one plugin version.
#[derive(Debug, Default)]
pub struct PluginStats {
    hooks: [HookStats; HOOKS.len()],
    failures: [AtomicU64; FAILURES.len()],
}

impl PluginStats {
    /// Counts one call of `hook` that took `took`.
    pub fn called(&self, hook: &str, took: Duration) {
        if let Some(h) = HOOKS
            .iter()
            .position(|n| *n == hook)
            .and_then(|i| self.hooks.get(i))
        {
            h.calls.fetch_add(1, Ordering::Relaxed);
            h.duration.observe(took);
        }
    }

    /// Counts one failure.
    pub fn failed(&self, kind: Failure) {
        if let Some(c) =
            (FAILURES.iter().position(|(f, _)| *f == kind)).and_then(|i| self.failures.get(i))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The hooks the plugin exports (`exported`, a [`Hooks`] mask), and any other called
    /// at least once: (name, stats).
    pub fn hooks(&self, exported: Hooks) -> impl Iterator<Item = (&'static str, &HookStats)> {
        HOOKS
            .iter()
            .zip(HOOK_BITS)
            .zip(self.hooks.iter())
            .filter(move |((_, bit), h)| {
                (*bit != 0 && exported.has(*bit)) || h.calls.load(Ordering::Relaxed) > 0
            })
            .map(|((n, _), h)| (*n, h))
    }

    /// Failures by `reason` label.
    pub fn failures(&self) -> impl Iterator<Item = (&'static str, u64)> {
        FAILURES
            .iter()
            .zip(self.failures.iter())
            .map(|((_, n), c)| (*n, c.load(Ordering::Relaxed)))
    }
}

/// The kind of a failed call's error.
pub fn classify(e: &wasmtime::Error) -> Failure {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(wasmtime::Trap::Interrupt) => Failure::Timeout,
        Some(wasmtime::Trap::AllocationTooLarge) => Failure::Memory,
        Some(_) => Failure::Trap,
        None => {
            let text = format!("{e:#}");
            if text.starts_with("panic in the call") {
                Failure::Panic
            } else if text.contains("memory") {
                Failure::Memory
            } else {
                Failure::Trap
            }
        }
    }
}
