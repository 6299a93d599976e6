//! Deciding whether a client may connect (WIT interface `authenticate`), including MQTT 5
//! enhanced authentication.

use crate::bindings::authenticate::Guest;
pub use crate::bindings::authenticate::{Challenge, ConnectInfo, Decision, Grant, Step};

/// Called for every CONNECT; plugins are asked in chain order, the first `Allow` or
/// `Deny` decides, `Ignore` asks the next one (all ignore: the listener's own rule).
///
/// Exported by `export!(P with [authenticate])`.
pub trait Authenticate {
    /// Decides one CONNECT. Default: [`Decision::Ignore`].
    fn authenticate(info: ConnectInfo) -> Decision {
        let _ = info;
        Decision::Ignore
    }

    /// One step of an MQTT 5 enhanced authentication this plugin started by answering
    /// [`Decision::Continue`]. Default: deny with 0x8C (bad authentication method), as a
    /// plugin that never continues is never asked.
    fn auth_step(step: Step) -> Decision {
        let _ = step;
        Decision::Deny(crate::reason::BAD_AUTHENTICATION_METHOD)
    }
}

impl<T: Authenticate> Guest for T {
    fn authenticate(info: ConnectInfo) -> Decision {
        <T as Authenticate>::authenticate(info)
    }

    fn auth_step(step: Step) -> Decision {
        <T as Authenticate>::auth_step(step)
    }
}

impl Default for Grant {
    /// Keeps the CONNECT's user name, no attributes, no authentication data.
    fn default() -> Self {
        Grant {
            username: None,
            attributes: Vec::new(),
            auth_data: None,
        }
    }
}

impl Decision {
    /// `Allow` with the default [`Grant`] (the CONNECT's user name, no attributes).
    pub fn allow() -> Self {
        Decision::Allow(Grant::default())
    }
}
