//! A log-linear histogram of durations in nanoseconds: exact below 64 ns, then 64 buckets per
//! power of two (at most 1.6 % relative error), so a percentile costs a walk over a few
//! thousand counters and recording costs one increment, whatever the number of samples.

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 6;
/// Sub-buckets per power of two.
const SUB: u64 = 1 << SUB_BITS;
/// Buckets needed for every `u64`.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * (1 << SUB_BITS);

/// Counts of recorded values.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

/// The bucket of `v`: linear below `SUB`, then `SUB` buckets per power of two.
fn index(v: u64) -> usize {
    let i = if v < SUB {
        v
    } else {
        let msb = 63 - v.leading_zeros();
        let shift = msb - SUB_BITS;
        let mantissa = v >> shift;
        (u64::from(shift) + 1) * SUB + (mantissa - SUB)
    };
    usize::try_from(i).unwrap_or(BUCKETS - 1)
}

/// The smallest value of bucket `i`.
fn lower_bound(i: usize) -> u64 {
    let i = u64::try_from(i).unwrap_or(u64::MAX);
    if i < SUB {
        i
    } else {
        let shift = i / SUB - 1;
        let mantissa = i % SUB + SUB;
        mantissa << shift
    }
}

/// The middle of bucket `i`, what a percentile reports.
fn middle(i: usize) -> u64 {
    let lo = lower_bound(i);
    let hi = lower_bound(i + 1);
    lo + hi.saturating_sub(lo) / 2
}

impl Histogram {
    /// Records one value.
    pub fn record(&mut self, v: u64) {
        if let Some(c) = self.counts.get_mut(index(v)) {
            *c += 1;
        }
        self.total += 1;
        self.max = self.max.max(v);
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Largest recorded value (exact).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value below which a fraction `q` (0–1) of the samples lie; `None` when empty.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        // Rank of the sample, 1-based; `as` saturates for floats, and the rank is ≤ total.
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(middle(i).min(self.max));
            }
        }
        Some(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_tight() {
        let mut prev = 0;
        for v in [
            0,
            1,
            63,
            64,
            65,
            127,
            128,
            129,
            1000,
            123_456,
            9_876_543_210,
            u64::MAX,
        ] {
            let i = index(v);
            assert!(i >= prev, "index must not decrease");
            prev = i;
            let lo = lower_bound(i);
            assert!(lo <= v, "{v} below its bucket {lo}");
            if v < u64::MAX / 2 {
                assert!(lower_bound(i + 1) > v, "{v} beyond its bucket");
                assert!(
                    (v - lo) as f64 <= v as f64 / 64.0 + 1.0,
                    "bucket of {v} too wide"
                );
            }
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn percentiles() {
        let mut h = Histogram::default();
        for v in 1..=1000u64 {
            h.record(v * 1000);
        }
        let p50 = h.percentile(0.5).unwrap_or(0);
        assert!((495_000..=510_000).contains(&p50), "p50 = {p50}");
        let p99 = h.percentile(0.99).unwrap_or(0);
        assert!((980_000..=1_000_000).contains(&p99), "p99 = {p99}");
        assert_eq!(h.percentile(1.0), Some(1_000_000));
        assert_eq!(h.max(), 1_000_000);
        assert_eq!(Histogram::default().percentile(0.5), None);
    }
}
