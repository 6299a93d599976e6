//! Puts the packs of QoS 1/2 messages a node receives back in the order their senders
//! made them. JetStream keeps packs in the order they reach the stream, and a pack lost on
//! its way (a nats-server dying with it in a socket) reaches it later, when its sender
//! publishes it again, or reaches the receiving node later, when its consumer hands it out
//! again: the packs after it would overtake it. Each sender numbers its packs per
//! receiving node and run (`line`), one after the other; a pack that comes before its
//! predecessor is held until the predecessor comes, at most [`HOLD_WAIT`] and
//! [`HOLD_MAX`] packs per line (then the gap is skipped: a sender that died with the pack
//! never acknowledged its messages to their publishers). A pack older than what a line
//! has passed (a late one after a skipped gap, or one given again) goes on at once: never
//! dropped.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// Longest a pack waits for its predecessor.
pub(super) const HOLD_WAIT: Duration = Duration::from_secs(10);
/// Most packs held per line: as many as a sender keeps awaiting JetStream (a lost pack
/// can be overtaken by all the others).
pub(super) const HOLD_MAX: usize = super::queue::INFLIGHT;
/// Lines kept before idle ones (nothing held, nothing for [`IDLE`]) are forgotten.
const LINES: usize = 256;
const IDLE: Duration = Duration::from_secs(600);

#[derive(Debug)]
struct Line<T> {
    /// The number of the pack that goes on next.
    next: u64,
    held: BTreeMap<u64, T>,
    /// Since when the line waits for `next` (something is held).
    waiting: Option<Instant>,
    seen: Instant,
}

impl<T> Line<T> {
    /// Releases what follows `next` without a gap.
    fn drain(&mut self, out: &mut Vec<T>, now: Instant) {
        let from = self.next;
        while let Some(item) = self.held.remove(&self.next) {
            out.push(item);
            self.next += 1;
        }
        self.waiting = if self.held.is_empty() {
            None
        } else if self.next != from {
            // Another gap: its own wait.
            Some(now)
        } else {
            Some(self.waiting.unwrap_or(now))
        };
    }

    /// Gives up waiting: the first held pack goes on, and what follows it.
    fn skip(&mut self, out: &mut Vec<T>, now: Instant) {
        if let Some(first) = self.held.keys().next().copied() {
            self.next = first;
            self.waiting = None;
            self.drain(out, now);
            if !self.held.is_empty() {
                self.waiting = Some(now);
            }
        }
    }
}

/// The lines of packs a node receives, by sender's run.
#[derive(Debug)]
pub(super) struct Order<T> {
    lines: HashMap<String, Line<T>>,
}

impl<T> Default for Order<T> {
    fn default() -> Self {
        Order {
            lines: HashMap::new(),
        }
    }
}

impl<T> Order<T> {
    /// Pack number `seq` of `line` came: what goes on now, in order.
    pub(super) fn arrive(&mut self, line: &str, seq: u64, item: T, now: Instant) -> Vec<T> {
        if self.lines.len() >= LINES && !self.lines.contains_key(line) {
            self.lines
                .retain(|_, l| !l.held.is_empty() || now.duration_since(l.seen) < IDLE);
        }
        let l = self.lines.entry(line.to_owned()).or_insert_with(|| Line {
            // The first pack of a line seen here starts it (a node that starts does not
            // know what came before).
            next: seq,
            held: BTreeMap::new(),
            waiting: None,
            seen: now,
        });
        l.seen = now;
        let mut out = Vec::new();
        if seq < l.next {
            out.push(item);
            return out;
        }
        if let Some(again) = l.held.insert(seq, item) {
            // The same pack a second time (given again): both go on when it is due.
            out.push(again);
        }
        l.drain(&mut out, now);
        if l.held.len() > HOLD_MAX {
            tracing::warn!(
                line,
                missing = l.next,
                "cluster: more QoS 1/2 packs from another node came after a missing one than are held; they go on (their order may differ)"
            );
            l.skip(&mut out, now);
        }
        out
    }

    /// When the longest wait ends, if anything is held.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.lines
            .values()
            .filter_map(|l| l.waiting)
            .min()
            .map(|t| t + HOLD_WAIT)
    }

    /// What has waited [`HOLD_WAIT`] for its predecessor goes on (with what follows it).
    pub(super) fn overdue(&mut self, now: Instant) -> Vec<T> {
        let mut out = Vec::new();
        for l in self.lines.values_mut() {
            if l.waiting
                .is_some_and(|t| now.duration_since(t) >= HOLD_WAIT)
            {
                l.skip(&mut out, now);
            }
        }
        out
    }

    /// Forgets what is held (it will be handed out again); lines keep their place.
    pub(super) fn drop_held(&mut self) {
        for l in self.lines.values_mut() {
            l.held.clear();
            l.waiting = None;
        }
    }

    /// Packs held, in all lines.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lines.values().map(|l| l.held.len()).sum()
    }
}

/// A pack's id: `SENDER.RUN.RECEIVER.SEQ` (names without dots; run in hex).
pub(super) fn pack_id(sender: &str, run: u64, receiver: &str, seq: u64) -> String {
    format!("{sender}.{run:x}.{receiver}.{seq}")
}

/// The line (`SENDER.RUN.RECEIVER`) and number of a pack's id.
pub(super) fn parse_pack_id(id: &str) -> Option<(&str, u64)> {
    let (line, seq) = id.rsplit_once('.')?;
    let seq: u64 = seq.parse().ok()?;
    // The line counts on from it: the last number is no pack's.
    (line.split('.').count() == 3 && seq < u64::MAX).then_some((line, seq))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_pack_that_overtook_its_predecessor_waits_for_it() {
        let t = Instant::now();
        let mut o = Order::default();
        assert_eq!(o.arrive("a", 1, 1, t), vec![1]);
        assert_eq!(o.arrive("a", 3, 3, t), Vec::<u64>::new());
        assert_eq!(o.arrive("b", 7, 7, t), vec![7], "another line goes on");
        assert_eq!(o.deadline(), Some(t + HOLD_WAIT));
        assert_eq!(o.arrive("a", 2, 2, t), vec![2, 3]);
        assert_eq!(o.deadline(), None);
        // A gap after a filled one waits its own time.
        assert!(o.arrive("a", 6, 6, t).is_empty());
        let later = t + HOLD_WAIT / 2;
        assert_eq!(o.arrive("a", 4, 4, later), vec![4]);
        assert_eq!(o.deadline(), Some(later + HOLD_WAIT));
        // Late or given again: at once.
        assert_eq!(o.arrive("a", 2, 2, t), vec![2]);
    }

    #[test]
    fn a_gap_is_skipped_after_the_wait_and_a_late_pack_still_goes_on() {
        let t = Instant::now();
        let mut o = Order::default();
        o.arrive("a", 10, 10, t);
        assert!(o.arrive("a", 12, 12, t).is_empty());
        assert!(o.arrive("a", 13, 13, t).is_empty());
        assert!(o.overdue(t + HOLD_WAIT / 2).is_empty());
        assert_eq!(o.overdue(t + HOLD_WAIT), vec![12, 13]);
        assert_eq!(o.arrive("a", 11, 11, t + HOLD_WAIT), vec![11]);
        assert_eq!(o.arrive("a", 14, 14, t + HOLD_WAIT), vec![14]);
    }

    #[test]
    fn at_most_hold_max_packs_wait_per_line() {
        let t = Instant::now();
        let mut o = Order::default();
        o.arrive("a", 0, 0, t);
        let mut out = Vec::new();
        for s in 2..2 + HOLD_MAX as u64 + 1 {
            out.extend(o.arrive("a", s, s, t));
        }
        assert_eq!(out, (2..2 + HOLD_MAX as u64 + 1).collect::<Vec<_>>());
        assert_eq!(o.held(), 0);
    }

    #[test]
    fn held_packs_are_dropped_when_they_will_come_again() {
        let t = Instant::now();
        let mut o = Order::default();
        o.arrive("a", 0, 0, t);
        o.arrive("a", 2, 2, t);
        o.drop_held();
        assert_eq!(o.deadline(), None);
        assert!(o.arrive("a", 2, 2, t).is_empty());
        assert_eq!(o.arrive("a", 1, 1, t), vec![1, 2]);
    }

    #[test]
    fn ids_name_their_line() {
        let id = pack_id("node-a", 0xbeef, "b_2", 17);
        assert_eq!(parse_pack_id(&id), Some(("node-a.beef.b_2", 17)));
        assert_eq!(parse_pack_id("a.1.5"), None);
        assert_eq!(parse_pack_id("a.1.b.x"), None);
        assert_eq!(parse_pack_id(""), None);
        assert_eq!(parse_pack_id(&pack_id("a", 1, "b", u64::MAX)), None);
    }

    proptest! {
        /// Packs that arrive shuffled within a window smaller than what is held come out
        /// in order, each once.
        #[test]
        fn shuffled_packs_come_out_in_order(
            keys in proptest::collection::vec(any::<u32>(), 1..300),
        ) {
            let n = keys.len();
            // Shuffled within blocks of 8 (after the first, which starts the line).
            let mut seqs: Vec<u64> = (0..n as u64).collect();
            for block in seqs[1..].chunks_mut(8) {
                block.sort_by_key(|&s| keys[s as usize]);
            }
            let t = Instant::now();
            let mut o = Order::default();
            let mut out = Vec::new();
            for s in seqs {
                out.extend(o.arrive("x", s, s, t));
            }
            prop_assert_eq!(out, (0..n as u64).collect::<Vec<_>>());
        }
    }
}
