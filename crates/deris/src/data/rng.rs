//! The one random generator of the data code: SplitMix64 (Steele, Lea & Flood 2014), seeded
//! explicitly and passed in. Its output is fixed by this file alone (no crate version can change
//! a dataset or an NSC draw), and [`SplitMix64::from_key`] gives an independent stream per
//! `(purpose, seed, epoch, index, …)` so that every draw is a pure function of its key.

/// SplitMix64's increment (2^64 / φ, odd).
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output function (a bijection of `u64`).
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A small, fast, seedable generator; not for cryptography.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for one key: each part is folded into the state through the mixer, so keys
    /// that differ in any part (or in length) give unrelated streams.
    pub fn from_key(parts: &[u64]) -> Self {
        let state = parts.iter().fold(mix(parts.len() as u64), |s, &p| mix(s.wrapping_add(GAMMA) ^ mix(p)));
        Self { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GAMMA);
        mix(self.state)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.next_f64()
    }

    /// Uniform in `0..n` without modulo bias (rejection on the top of the range); `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n.max(1) as u64;
        let zone = u64::MAX - (u64::MAX % n + 1) % n; // largest multiple of n, minus one
        loop {
            let x = self.next_u64();
            if x <= zone {
                return (x % n) as usize;
            }
        }
    }

    /// `true` with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.next_f64() < p
    }

    /// A uniformly chosen element, `None` for an empty slice.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.below(items.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_splitmix64_sequence() {
        // First outputs of splitmix64 seeded with 1234567 (Vigna's reference C code).
        let mut r = SplitMix64::new(1234567);
        let got: Vec<u64> = (0..3).map(|_| r.next_u64()).collect();
        assert_eq!(got, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn keys_give_distinct_streams_and_below_is_in_range() {
        let a = SplitMix64::from_key(&[1, 2, 3]).next_u64();
        let b = SplitMix64::from_key(&[1, 3, 2]).next_u64();
        let c = SplitMix64::from_key(&[1, 2, 3, 0]).next_u64();
        assert!(a != b && a != c && b != c);
        let mut r = SplitMix64::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[r.below(5)] += 1;
        }
        assert!(seen.iter().all(|&k| (900..1100).contains(&k)), "{seen:?}");
    }
}
