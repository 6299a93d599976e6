//! `write-wasi-adapter OUT`: writes the reactor flavour of the WASI preview1 adapter (a
//! plugin has no `main`) to `OUT`.

use std::process::ExitCode;

use wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER as ADAPTER;

fn main() -> ExitCode {
    let Some(out) = std::env::args_os().nth(1) else {
        eprintln!("usage: write-wasi-adapter OUT");
        return ExitCode::from(2);
    };
    match std::fs::write(&out, ADAPTER) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("write {}: {e}", out.to_string_lossy());
            ExitCode::FAILURE
        }
    }
}
