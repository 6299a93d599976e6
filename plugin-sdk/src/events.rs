//! Notifications of what happens in the broker (WIT interface `events`).

use crate::bindings::events::Guest;
pub use crate::bindings::events::{
    Connected, Disconnected, DropReason, Event, MessageDropped, Subscription,
};

/// Called with batches of events, oldest first, off the hot path (a slow plugin delays
/// only later events; on overflow events are dropped and counted).
///
/// Exported by `export!(P with [events])`.
pub trait Events {
    /// Handles a batch. Default: `on_event` for each event.
    fn on_events(events: Vec<Event>) {
        for event in events {
            Self::on_event(event);
        }
    }

    /// Handles one event. Default: nothing.
    fn on_event(event: Event) {
        let _ = event;
    }
}

impl<T: Events> Guest for T {
    fn on_events(events: Vec<Event>) {
        <T as Events>::on_events(events)
    }
}
