//! OpenCV 4.10's `INTER_NEAREST` index rule (fixtures/gold/README.md §2).

/// The source index OpenCV's `INTER_NEAREST` reads for destination index `d` when resizing `src`
/// pixels to `dst`: `min(floor(d * (1.0 / (dst / src))), src - 1)` in double. The reciprocal of
/// `dst / src` matters: `floor(d * src / dst)` picks other pixels for e.g. src = 68, 118, 136, 148,
/// 194 → 384.
///
/// `src` and `dst` must be at least 1.
pub fn nearest_index(d: usize, src: usize, dst: usize) -> usize {
    let scale = 1.0 / (dst as f64 / src as f64);
    ((d as f64 * scale).floor() as usize).min(src.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rle;

    #[test]
    fn reciprocal_rule_differs_from_the_naive_one() {
        assert!((0..384).any(|d| nearest_index(d, 68, 384) != d * 68 / 384));
        assert_eq!((0..4).map(|d| nearest_index(d, 2, 4)).collect::<Vec<_>>(), vec![0, 0, 1, 1]);
    }

    #[test]
    fn resize_upsamples_blocks() {
        let r = Rle::from_rowmajor(&[1, 0, 0, 1], 2, 2).unwrap();
        let up = r.resize_nearest(4, 4).unwrap();
        assert_eq!(up.to_rowmajor(), vec![1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1]);
        assert!(r.resize_nearest(0, 4).is_err());
    }
}
