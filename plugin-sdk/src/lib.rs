//! The Rust guest SDK for Sandpiper plugins: WebAssembly components (WASI 0.2) that
//! implement hooks of the WIT contract `sandpiper:plugin@0.1.1` (the repository's `wit/`).
//!
//! A plugin is a `cdylib` crate with a unit type that implements one trait per hook it
//! wants — [`Init`], [`Authenticate`], [`Authorize`], [`Share`], [`Transform`], [`Deliver`],
//! [`Sink`], [`Events`], every method with a default — and one [`export!`] naming those
//! hooks. The component then exports exactly those interfaces: the broker calls only the
//! hooks a component exports, so an unnamed hook costs nothing and is never called.
//!
//! ```no_run
//! use sandpiper_plugin::authorize::{Action, Authorize, Decision, Request};
//! use sandpiper_plugin::types::Client;
//!
//! struct ReadOnly;
//!
//! impl Authorize for ReadOnly {
//!     fn authorize_one(_client: &Client, request: &Request) -> Decision {
//!         match request.action {
//!             Action::Publish => Decision::Deny(sandpiper_plugin::reason::NOT_AUTHORIZED),
//!             _ => Decision::Ignore,
//!         }
//!     }
//! }
//!
//! sandpiper_plugin::export!(ReadOnly with [authorize]);
//! ```
//!
//! Host imports: [`log`], [`kv`], [`publish`], [`metrics`], [`config`] (with
//! [`config()`], the sidecar's `[config]` table deserialized into a type of the plugin).
//!
//! Hooks are associated functions (no `self`): the broker keeps a few instances of a
//! plugin and may replace one at any time, so an instance's memory is a cache, not a
//! store. Keep what must survive in [`kv`].

#![deny(missing_docs)]

#[doc(hidden)]
pub mod bindings;

pub mod authenticate;
pub mod authorize;
pub mod config;
pub mod deliver;
pub mod events;
pub mod lifecycle;
pub mod log;
pub mod reason;
pub mod share;
pub mod sink;
pub mod topic;
pub mod transform;
pub mod types;

pub use authenticate::Authenticate;
pub use authorize::Authorize;
pub use config::config;
pub use deliver::Deliver;
pub use events::Events;
pub use lifecycle::Init;
pub use share::Share;
pub use sink::Sink;
pub use transform::Transform;

/// The persistent key-value store private to the plugin (kept in the broker's durable
/// store, so it survives restarts and upgrades). Writes are slow compared to a hook
/// call: do not write on every message.
pub mod kv {
    pub use crate::bindings::imports::kv::{Error, delete, get, set};
}

/// Publishing into the broker as if a client had published (the message is queued and
/// routed shortly after the call, never inside it). [`Message::new`](crate::types::Message::new)
/// builds one.
pub mod publish {
    pub use crate::bindings::imports::publish::{Error, publish};
}

/// Counters and gauges of the plugin (names `[a-z0-9_]`, at most 64 bytes, at most 64
/// names per plugin), kept in the broker's memory per plugin version; the broker does not
/// export them yet.
pub mod metrics {
    pub use crate::bindings::imports::metrics::{counter_add, gauge_set};
}

/// Everything a typical plugin names: the hook traits and the shared types.
pub mod prelude {
    pub use crate::types::{
        Attribute, Client, Message, MessageProperties, Outcome, ProtocolVersion, Qos, ReasonCode,
        UserProperty,
    };
    pub use crate::{Authenticate, Authorize, Deliver, Events, Init, Share, Sink, Transform};
}

/// Exports `$plugin` as the implementation of the hooks named in the brackets, and only
/// those: `sandpiper_plugin::export!(MyPlugin with [authorize, transform]);`.
///
/// Hook names and the trait each requires of `$plugin` (a type name in scope):
///
/// | name | trait | WIT interface |
/// |---|---|---|
/// | `init` (or `lifecycle`) | [`Init`] | `lifecycle` |
/// | `authenticate` | [`Authenticate`] | `authenticate` |
/// | `authorize` | [`Authorize`] | `authorize` |
/// | `share` | [`Share`] | `share` (contract 0.1.1) |
/// | `transform` | [`Transform`] | `transform` |
/// | `deliver` | [`Deliver`] | `deliver` |
/// | `sink` | [`Sink`] | `sink` |
/// | `events` | [`Events`] | `events` |
///
/// Use it once per crate; naming a hook twice is a duplicate-symbol error.
#[macro_export]
macro_rules! export {
    ($plugin:ident with [$($hook:ident),+ $(,)?]) => {
        $( $crate::__export_hook!($hook $plugin); )+
    };
}

/// One hook of [`export!`]: that hook world's generated export macro, which also emits
/// the component-type section declaring the export.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_hook {
    (init $p:ident) => {
        $crate::bindings::lifecycle::export_lifecycle!($p with_types_in $crate::bindings::lifecycle);
    };
    (lifecycle $p:ident) => {
        $crate::__export_hook!(init $p);
    };
    (authenticate $p:ident) => {
        $crate::bindings::authenticate::export_authenticate!($p with_types_in $crate::bindings::authenticate);
    };
    (authorize $p:ident) => {
        $crate::bindings::authorize::export_authorize!($p with_types_in $crate::bindings::authorize);
    };
    (share $p:ident) => {
        $crate::bindings::share::export_share!($p with_types_in $crate::bindings::share);
    };
    (transform $p:ident) => {
        $crate::bindings::transform::export_transform!($p with_types_in $crate::bindings::transform);
    };
    (deliver $p:ident) => {
        $crate::bindings::deliver::export_deliver!($p with_types_in $crate::bindings::deliver);
    };
    (sink $p:ident) => {
        $crate::bindings::sink::export_sink!($p with_types_in $crate::bindings::sink);
    };
    (events $p:ident) => {
        $crate::bindings::events::export_events!($p with_types_in $crate::bindings::events);
    };
    ($other:ident $p:ident) => {
        ::core::compile_error!(::core::concat!(
            "sandpiper_plugin::export!: unknown hook `",
            ::core::stringify!($other),
            "` (expected init, authenticate, authorize, share, transform, deliver, sink or events)"
        ));
    };
}
