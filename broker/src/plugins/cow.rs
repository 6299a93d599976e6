//! The copy-on-write memory image of a plugin, prepared once per loaded version.
//!
//! On Linux wasmtime writes a module's initial memory into a memfd and seals it; the kernel
//! refuses the seal (EBUSY) while anything else holds a reference to one of its pages,
//! which page migration or compaction does for a moment on a busy machine. wasmtime makes
//! the image lazily, at the first instantiation; [`prepare`] makes it right after compiling
//! and retries that passing refusal, so that it never refuses a plugin. Instances made later
//! reuse the image.

use std::time::Duration;

use wasmtime::component::Component;

/// Makes `component`'s memory images, retrying a memfd error a few times.
pub(super) fn prepare(component: &Component) -> wasmtime::Result<()> {
    with_retries(ATTEMPTS, BACKOFF, is_memfd_error, || {
        component.initialize_copy_on_write_image()
    })
    .map_err(|e| e.context("preparing the plugin's memory image"))
}

/// How often, and how patiently, the image is made.
const ATTEMPTS: u32 = 6;
const BACKOFF: Duration = Duration::from_millis(25);

/// Whether `e` came from creating or sealing a memfd.
fn is_memfd_error(e: &wasmtime::Error) -> bool {
    e.chain().any(|c| c.to_string().contains("memfd"))
}

/// Runs `f` up to `attempts` times while it fails with an error `transient` accepts,
/// sleeping `backoff`, then twice that, between tries. Any other error returns at once.
fn with_retries<T>(
    attempts: u32,
    backoff: Duration,
    transient: impl Fn(&wasmtime::Error) -> bool,
    mut f: impl FnMut() -> wasmtime::Result<T>,
) -> wasmtime::Result<T> {
    let mut wait = backoff;
    let mut tried = 1;
    loop {
        match f() {
            Err(e) if tried < attempts && transient(&e) => {
                tracing::warn!(error = %e, attempt = tried, "retrying after a transient failure");
                std::thread::sleep(wait);
                wait = wait.saturating_mul(2);
                tried += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
    use super::*;

    #[test]
    fn transient_failures_are_retried_a_bounded_number_of_times() {
        let memfd = || wasmtime::format_err!("cannot add seals to the memfd");
        let mut calls = 0;
        let r = with_retries(4, Duration::ZERO, is_memfd_error, || {
            calls += 1;
            if calls < 3 { Err(memfd()) } else { Ok(calls) }
        });
        assert_eq!(r.unwrap(), 3, "succeeds on the third try");

        let mut calls = 0;
        let r: wasmtime::Result<()> = with_retries(4, Duration::ZERO, is_memfd_error, || {
            calls += 1;
            Err(memfd().context("preparing"))
        });
        assert!(r.is_err());
        assert_eq!(calls, 4, "gives up after the last attempt");

        let mut calls = 0;
        let r: wasmtime::Result<()> = with_retries(4, Duration::ZERO, is_memfd_error, || {
            calls += 1;
            Err(wasmtime::format_err!("invalid component"))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1, "other errors are not retried");
    }
}
