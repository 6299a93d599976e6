//! The start-up hook (WIT interface `lifecycle`).

use crate::bindings::lifecycle::Guest;

/// Runs once per instance, after instantiation and before any other hook (host imports
/// are available). An error refuses the plugin version being loaded: at start it is not
/// loaded, on a live reload the previous version keeps serving. A good place to
/// validate [`config()`](crate::config()).
///
/// Exported by `export!(P with [init])`.
pub trait Init {
    /// Default: `Ok(())`.
    fn init() -> Result<(), String> {
        Ok(())
    }
}

impl<T: Init> Guest for T {
    fn init() -> Result<(), String> {
        <T as Init>::init()
    }
}
