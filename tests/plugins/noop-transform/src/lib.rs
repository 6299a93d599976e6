//! A `transform` hook that keeps every message: what the hook itself costs.

use sandpiper_plugin::transform::Transform;

struct Noop;

impl Transform for Noop {}

sandpiper_plugin::export!(Noop with [transform]);
