//! The one loop every per-message hook runs over the chain (`authorize`, `share`,
//! `transform`, `deliver`): in chain order, each plugin with the hook gets, in one call,
//! the items still open to it that its `topics` select; an answer of the wrong length is
//! a failure; each answer is applied in order; a failure (trap, timeout, memory, wrong
//! length) applies the hook's failure policy to the items the plugin had.

use super::Chain;
use super::plugin::{CallError, Plugin};

/// One hook's pass over the chain: which items each plugin gets, the call, and what the
/// answers do.
pub(super) trait Pass {
    /// The hook's bit (`Hooks`).
    const HOOK: u32;
    /// The hook's name, for spans, logs and failure counts.
    const NAME: &'static str;
    /// What the plugin answers per item.
    type Answer;

    /// Whether plugin `p` takes part at all.
    fn takes(&self, _p: &Plugin) -> bool {
        true
    }

    /// Whether item `i` goes to plugin `p` (still open, selected by its topics).
    fn wants(&self, p: &Plugin, i: usize) -> bool;

    /// Calls `p` with the items `idx`.
    fn call(&mut self, p: &Plugin, idx: &[usize]) -> Result<Vec<Self::Answer>, CallError>;

    /// Applies `p`'s answer for item `i`.
    fn apply(&mut self, p: &Plugin, i: usize, answer: Self::Answer);

    /// `p` failed on the items `idx`: the hook's failure policy.
    fn failed(&mut self, p: &Plugin, idx: &[usize]);
}

/// Runs `pass` over `items` items through `chain`.
pub(super) fn run<P: Pass>(chain: &Chain, items: usize, pass: &mut P) {
    for p in &chain.plugins {
        if !p.hooks.has(P::HOOK) || !pass.takes(p) {
            continue;
        }
        let idx: Vec<usize> = (0..items).filter(|&i| pass.wants(p, i)).collect();
        if idx.is_empty() {
            continue;
        }
        let _span = tracing::debug_span!("plugin", plugin = %p.name, hook = P::NAME).entered();
        let answers = pass.call(p, &idx).and_then(|a| match a.len() == idx.len() {
            true => Ok(a),
            false => Err(p.arity(P::NAME, idx.len(), a.len())),
        });
        match answers {
            Ok(answers) => {
                for (&i, a) in idx.iter().zip(answers) {
                    pass.apply(p, i, a);
                }
            }
            Err(_) => pass.failed(p, &idx),
        }
    }
}
