//! What a subscriber remembers about the messages it received: one bit per sequence number
//! per publisher (never the messages themselves), so duplicates, reordering and — against
//! the publisher's acknowledgements — loss can be counted after the run.

/// Bytes at the front of every payload: publisher id (u32), sequence number (u64) and send
/// time in nanoseconds since the load generator started (u64), all little-endian.
pub const HEADER_LEN: usize = 20;

/// Sequence numbers above this are treated as garbage rather than grown into (a corrupt
/// payload must not make us allocate without bound).
const MAX_SEQ: u64 = 1 << 34;

/// The header of one payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Which publisher sent it.
    pub publisher: u32,
    /// Its sequence number at that publisher, from 0.
    pub seq: u64,
    /// When it was written, in nanoseconds since the load generator started.
    pub sent_ns: u64,
}

impl Stamp {
    /// Writes the header into the front of `payload` (which is at least `HEADER_LEN` long).
    pub fn write(self, payload: &mut [u8]) {
        if let Some(h) = payload.get_mut(..HEADER_LEN) {
            let (id, rest) = h.split_at_mut(4);
            let (seq, ts) = rest.split_at_mut(8);
            id.copy_from_slice(&self.publisher.to_le_bytes());
            seq.copy_from_slice(&self.seq.to_le_bytes());
            ts.copy_from_slice(&self.sent_ns.to_le_bytes());
        }
    }

    /// Reads the header of a received payload; `None` if it is too short.
    pub fn read(payload: &[u8]) -> Option<Stamp> {
        let id: [u8; 4] = payload.get(0..4)?.try_into().ok()?;
        let seq: [u8; 8] = payload.get(4..12)?.try_into().ok()?;
        let ts: [u8; 8] = payload.get(12..20)?.try_into().ok()?;
        Some(Stamp {
            publisher: u32::from_le_bytes(id),
            seq: u64::from_le_bytes(seq),
            sent_ns: u64::from_le_bytes(ts),
        })
    }
}

/// A set of sequence numbers as a bitmap.
#[derive(Debug, Default, Clone)]
pub struct SeqSet {
    words: Vec<u64>,
}

fn word_bit(seq: u64) -> (usize, u64) {
    (
        usize::try_from(seq / 64).unwrap_or(usize::MAX),
        1 << (seq % 64),
    )
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        let (w, bit) = word_bit(seq);
        if w >= self.words.len() {
            // Grow by doubling so a long run costs few reallocations.
            let want = (w + 1).max(self.words.len() * 2);
            self.words.resize(want, 0);
        }
        match self.words.get_mut(w) {
            Some(word) if *word & bit == 0 => {
                *word |= bit;
                true
            }
            _ => false,
        }
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        let (w, bit) = word_bit(seq);
        self.words.get(w).is_some_and(|word| word & bit != 0)
    }

    /// How many of `0..end` are in the set.
    pub fn count_below(&self, end: u64) -> u64 {
        let (full, _) = word_bit(end);
        let mut n: u64 = self
            .words
            .iter()
            .take(full)
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rest = end % 64;
        if rest > 0
            && let Some(w) = self.words.get(full)
        {
            n += u64::from((w & ((1u64 << rest) - 1)).count_ones());
        }
        n
    }
}

/// What one subscriber saw of one publisher.
#[derive(Debug, Default, Clone)]
pub struct PairTrack {
    /// Sequence numbers received.
    pub seen: SeqSet,
    /// Highest sequence number received so far.
    pub last: Option<u64>,
    /// Messages received more than once.
    pub dup: u64,
    /// Messages that arrived after a higher sequence number of the same publisher.
    pub reordered: u64,
}

/// What one subscriber saw of every publisher it expects.
#[derive(Debug, Clone)]
pub struct Tracker {
    /// Indexed by publisher id; `None` for publishers this subscriber does not expect.
    pairs: Vec<Option<PairTrack>>,
    /// Messages whose payload was not ours, or from a publisher not expected here.
    pub unexpected: u64,
}

impl Tracker {
    /// A tracker expecting messages from `expected` among `publishers` publishers.
    pub fn new(publishers: usize, expected: &[u32]) -> Tracker {
        let mut pairs = vec![None; publishers];
        for &p in expected {
            if let Some(slot) = usize::try_from(p).ok().and_then(|i| pairs.get_mut(i)) {
                *slot = Some(PairTrack::default());
            }
        }
        Tracker {
            pairs,
            unexpected: 0,
        }
    }

    /// Records one received message.
    pub fn record(&mut self, stamp: Stamp) {
        let pair = usize::try_from(stamp.publisher)
            .ok()
            .and_then(|i| self.pairs.get_mut(i))
            .and_then(Option::as_mut);
        let Some(pair) = pair.filter(|_| stamp.seq <= MAX_SEQ) else {
            self.unexpected += 1;
            return;
        };
        if !pair.seen.insert(stamp.seq) {
            pair.dup += 1;
            return;
        }
        match pair.last {
            Some(last) if stamp.seq < last => pair.reordered += 1,
            _ => pair.last = Some(stamp.seq),
        }
    }

    /// What this subscriber saw of publisher `p`, if it expects it.
    pub fn pair(&self, p: usize) -> Option<&PairTrack> {
        self.pairs.get(p).and_then(Option::as_ref)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trip() {
        let s = Stamp {
            publisher: 7,
            seq: 1 << 40,
            sent_ns: 123_456_789,
        };
        let mut buf = [0u8; 64];
        s.write(&mut buf);
        assert_eq!(Stamp::read(&buf), Some(s));
        assert_eq!(Stamp::read(&buf[..19]), None);
    }

    #[test]
    fn seqset_counts() {
        let mut s = SeqSet::default();
        for i in (0..1000).step_by(3) {
            assert!(s.insert(i));
        }
        assert!(!s.insert(3));
        assert!(s.contains(999) && !s.contains(998));
        assert_eq!(s.count_below(1000), 334);
        assert_eq!(s.count_below(64), 22);
        assert_eq!(s.count_below(0), 0);
        assert_eq!(s.count_below(1 << 20), 334);
    }

    #[test]
    fn tracker_counts_dups_and_reorders() {
        let mut t = Tracker::new(2, &[1]);
        let at = |seq| Stamp {
            publisher: 1,
            seq,
            sent_ns: 0,
        };
        for seq in [0, 1, 3, 2, 3] {
            t.record(at(seq));
        }
        t.record(Stamp {
            publisher: 0,
            seq: 0,
            sent_ns: 0,
        });
        let p = t
            .pair(1)
            .map(|p| (p.dup, p.reordered, p.seen.count_below(4)));
        assert_eq!(p, Some((1, 1, 4)));
        assert_eq!(t.unexpected, 1);
    }
}
