//! A `deliver` hook that keeps every message: what the hook itself costs.

use sandpiper_plugin::deliver::Deliver;

struct Noop;

impl Deliver for Noop {}

sandpiper_plugin::export!(Noop with [deliver]);
