//! The compressed `counts` string of COCO JSON (`rleToString` / `rleFrString`).
//!
//! Each run is first replaced by its difference to the run two places earlier (from the fourth run
//! on), then written as 5-bit groups, least significant first, one character (`group + 48`) each:
//! bit `0x20` says another group follows, bit `0x10` of the last group is the sign.

use crate::error::{CocoError, Result};
use crate::rle::Rle;

/// A value needs at most 7 groups (|x| < 2^33); more than this cannot be a pixel count.
const MAX_GROUPS: u32 = 12;

impl Rle {
    /// pycocotools' compressed `counts` string (ASCII, characters `'0'..='o'`).
    pub fn to_counts_string(&self) -> String {
        let counts = self.counts();
        let mut s = String::with_capacity(counts.len() * 2);
        for (i, &c) in counts.iter().enumerate() {
            let mut x = i64::from(c);
            if i > 2 {
                x -= i64::from(counts[i - 2]);
            }
            loop {
                let mut group = (x & 0x1f) as u8;
                x >>= 5;
                let more = if group & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    group |= 0x20;
                }
                s.push(char::from(group + 48));
                if !more {
                    break;
                }
            }
        }
        s
    }

    /// Parses a compressed `counts` string of an `h`×`w` mask. Fails on characters outside the
    /// alphabet, an unfinished last value, runs that are negative or too large, and runs that do
    /// not add up to `h * w`.
    pub fn from_counts_string(s: &str, h: u32, w: u32) -> Result<Rle> {
        let bytes = s.as_bytes();
        let mut counts: Vec<u32> = Vec::new();
        let mut p = 0usize;
        while p < bytes.len() {
            let start = p;
            let (mut x, mut k) = (0i64, 0u32);
            loop {
                let Some(&byte) = bytes.get(p) else {
                    return Err(CocoError::BadCountsValue { pos: start, reason: "unfinished at the end of the string" });
                };
                if !(48..=111).contains(&byte) {
                    return Err(CocoError::BadCountsChar { pos: p, byte });
                }
                if k == MAX_GROUPS {
                    return Err(CocoError::BadCountsValue { pos: start, reason: "too long for a pixel count" });
                }
                let group = byte - 48;
                x |= i64::from(group & 0x1f) << (5 * k);
                p += 1;
                k += 1;
                if group & 0x20 == 0 {
                    if group & 0x10 != 0 {
                        x |= -1i64 << (5 * k);
                    }
                    break;
                }
            }
            let m = counts.len();
            if m > 2 {
                x += i64::from(counts[m - 2]);
            }
            let run = u32::try_from(x).map_err(|_| CocoError::BadRun { index: m, value: x })?;
            counts.push(run);
        }
        Rle::from_counts(h, w, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_strings() {
        // From fixtures/gold/masks: an empty 1x1 mask and a full 40x60 one.
        assert_eq!(Rle::zeros(1, 1).unwrap().to_counts_string(), "1");
        let full = Rle::from_counts(40, 60, vec![0, 2400]).unwrap();
        assert_eq!(full.to_counts_string(), "0P[2");
        assert_eq!(Rle::from_counts_string("0P[2", 40, 60).unwrap(), full);
    }

    #[test]
    fn roundtrip_large_and_negative_differences() {
        let counts = vec![0, 1, 1_000_000, 3, 5, 999_990, 1];
        let r = Rle::from_counts(1, counts.iter().sum(), counts).unwrap();
        let s = r.to_counts_string();
        assert_eq!(Rle::from_counts_string(&s, r.h(), r.w()).unwrap(), r);
    }

    #[test]
    fn malformed_strings_are_errors() {
        assert!(matches!(Rle::from_counts_string("1 ", 1, 1), Err(CocoError::BadCountsChar { pos: 1, byte: b' ' })));
        assert!(matches!(Rle::from_counts_string("1p", 1, 1), Err(CocoError::BadCountsChar { pos: 1, .. })));
        // 'P' = 48 + 0x20: a continuation with nothing after it.
        assert!(matches!(Rle::from_counts_string("P", 1, 1), Err(CocoError::BadCountsValue { .. })));
        assert!(matches!(Rle::from_counts_string("PPPPPPPPPPPPPPPPP0", 1, 1), Err(CocoError::BadCountsValue { .. })));
        // '?' = 48 + 15 (positive 15) then '@' = 48 + 16 (sign bit: -16): a negative run.
        assert!(matches!(Rle::from_counts_string("1@", 1, 1), Err(CocoError::BadRun { index: 1, value: -16 })));
        assert!(matches!(Rle::from_counts_string("2", 1, 1), Err(CocoError::CountsSum { sum: 2, .. })));
        assert!(matches!(Rle::from_counts_string("", 1, 1), Err(CocoError::CountsSum { sum: 0, .. })));
        assert!(matches!(Rle::from_counts_string("é", 1, 1), Err(CocoError::BadCountsChar { pos: 0, .. })));
    }
}
