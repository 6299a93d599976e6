//! `topic-rewrite`: rewrites the topic of published messages (the `transform` hook) by
//! ordered rules from the `[config]` table of its sidecar `topic-rewrite.toml`:
//!
//! ```toml
//! [[config.rules]]
//! from = "devices/+/data/#"                 # a topic filter
//! to = "tenants/%u/devices/{1}/{2}"         # {n}: the n-th wildcard's text; %u, %c
//! ```
//!
//! The first rule whose `from` matches decides (a rule whose `to` uses `%u` does not
//! apply to a publisher without a user name). A rewrite that yields an invalid topic name
//! keeps the original topic and logs a warning. Rules are checked by `init`: a bad rule
//! refuses the plugin (on a live reload, the previous version keeps serving).

use std::sync::OnceLock;

use sandpiper_plugin::log;
use sandpiper_plugin::prelude::*;

mod rules;

use rules::{Rewrite, Rule};

fn rules() -> &'static Result<Vec<Rule>, String> {
    static RULES: OnceLock<Result<Vec<Rule>, String>> = OnceLock::new();
    RULES.get_or_init(|| {
        let config: rules::Config = sandpiper_plugin::config().map_err(|e| e.to_string())?;
        rules::compile(&config)
    })
}

struct TopicRewrite;

impl Init for TopicRewrite {
    fn init() -> Result<(), String> {
        rules().as_ref().map(|_| ()).map_err(Clone::clone)
    }
}

impl Transform for TopicRewrite {
    fn transform_one(publisher: &Client, mut message: Message) -> Outcome {
        let Ok(rules) = rules() else {
            return Outcome::Keep;
        };
        let username = publisher.username.as_deref();
        match rules::rewrite(rules, &message.topic, username, &publisher.client_id) {
            Rewrite::Unchanged => Outcome::Keep,
            Rewrite::To(topic) => {
                message.topic = topic;
                Outcome::Replace(message)
            }
            Rewrite::Invalid { rule, topic, why } => {
                let why = why.to_string();
                log::log(
                    log::Level::Warn,
                    "rewrite yields an invalid topic name; original kept",
                    &[
                        ("rule", &rule),
                        ("topic", &message.topic),
                        ("rewritten", &topic),
                        ("why", &why),
                        ("client_id", &publisher.client_id),
                    ],
                );
                Outcome::Keep
            }
        }
    }
}

sandpiper_plugin::export!(TopicRewrite with [init, transform]);
