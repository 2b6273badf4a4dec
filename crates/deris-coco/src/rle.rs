//! [`Rle`]: pycocotools' run-length encoding and the operations on it (`rleEncode`, `rleDecode`,
//! `rleMerge`, `rleArea`, `rleToBbox`, the intersection/union walk of `rleIou`).

use crate::error::{CocoError, Result};

/// A binary `h`×`w` mask as pycocotools stores it: run lengths counted down the columns (column 0
/// top to bottom, then column 1, …), alternating zeros and ones, the first run counting **zeros**
/// (it may be 0 long).
///
/// The runs always add up to `h * w`, and `h * w` fits in 32 bits; every constructor checks it, so
/// every method can rely on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rle {
    h: u32,
    w: u32,
    counts: Vec<u32>,
}

/// Checks that `h`×`w` is a mask size pycocotools can count (≥ 1 pixel, `h * w` < 2^32).
pub(crate) fn check_size(h: u32, w: u32) -> Result<u32> {
    let n = u64::from(h) * u64::from(w);
    if n == 0 || n > u64::from(u32::MAX) {
        return Err(CocoError::InvalidSize { h: h.into(), w: w.into() });
    }
    Ok(n as u32)
}

impl Rle {
    /// An RLE from its runs (`counts_uncompressed`), checked to add up to `h * w`.
    pub fn from_counts(h: u32, w: u32, counts: Vec<u32>) -> Result<Self> {
        let n = check_size(h, w)?;
        let sum: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if sum != u64::from(n) {
            return Err(CocoError::CountsSum { h, w, sum });
        }
        Ok(Self { h, w, counts })
    }

    /// The empty (all background) mask.
    pub fn zeros(h: u32, w: u32) -> Result<Self> {
        let n = check_size(h, w)?;
        Ok(Self { h, w, counts: vec![n] })
    }

    /// Mask height (rows).
    pub fn h(&self) -> u32 {
        self.h
    }

    /// Mask width (columns).
    pub fn w(&self) -> u32 {
        self.w
    }

    /// `(h, w)`, the order of COCO's `size` field.
    pub fn size(&self) -> (u32, u32) {
        (self.h, self.w)
    }

    /// The runs: column-major, zeros first.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// `encode` of a column-major mask (`mask[x * h + y]`, as numpy's Fortran order). Any non-zero
    /// byte is foreground.
    pub fn from_colmajor(mask: &[u8], h: u32, w: u32) -> Result<Self> {
        let n = check_size(h, w)?;
        if mask.len() != n as usize {
            return Err(CocoError::MaskLength { len: mask.len(), h, w });
        }
        Ok(Self { h, w, counts: runs_of(mask.iter().map(|&b| b != 0)) })
    }

    /// `encode` of a row-major mask (`mask[y * w + x]`, an image's natural order). Any non-zero byte
    /// is foreground.
    pub fn from_rowmajor(mask: &[u8], h: u32, w: u32) -> Result<Self> {
        let n = check_size(h, w)?;
        if mask.len() != n as usize {
            return Err(CocoError::MaskLength { len: mask.len(), h, w });
        }
        let (h_, w_) = (h as usize, w as usize);
        let colmajor = (0..w_).flat_map(|x| (0..h_).map(move |y| mask[y * w_ + x] != 0));
        Ok(Self { h, w, counts: runs_of(colmajor) })
    }

    /// `decode` into a column-major 0/1 buffer of `h * w` bytes.
    pub fn to_colmajor(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.h as usize * self.w as usize);
        let mut v = 0u8;
        for &c in &self.counts {
            out.resize(out.len() + c as usize, v);
            v ^= 1;
        }
        out
    }

    /// `decode` into a row-major 0/1 buffer of `h * w` bytes.
    pub fn to_rowmajor(&self) -> Vec<u8> {
        let (h, w) = (self.h as usize, self.w as usize);
        let mut out = vec![0u8; h * w];
        self.for_each_foreground_run(|start, len| {
            for p in start..start + len {
                out[(p % h) * w + p / h] = 1;
            }
        });
        out
    }

    /// `area`: the number of foreground pixels.
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| u64::from(c)).sum()
    }

    /// `toBbox`: the tight `[x, y, w, h]` box of the foreground (`w = xmax - xmin + 1`), or
    /// `[0, 0, 0, 0]` for an empty mask.
    pub fn to_bbox(&self) -> [f64; 4] {
        let h = self.h as usize;
        let (mut xs, mut xe, mut ys, mut ye) = (usize::MAX, 0usize, usize::MAX, 0usize);
        self.for_each_foreground_run(|start, len| {
            let end = start + len - 1;
            let (x0, x1) = (start / h, end / h);
            xs = xs.min(x0);
            xe = xe.max(x1);
            if x0 < x1 {
                // The run wraps from the bottom of one column to the top of a later one.
                ys = 0;
                ye = h - 1;
            } else {
                ys = ys.min(start % h);
                ye = ye.max(end % h);
            }
        });
        if xs == usize::MAX {
            return [0.0; 4];
        }
        [xs as f64, ys as f64, (xe - xs + 1) as f64, (ye - ys + 1) as f64]
    }

    /// `merge(rles, intersect=False)`: the union, with pycocotools' exact run layout (a single mask
    /// comes back unchanged). Fails on an empty list or masks of different sizes.
    pub fn merge(rles: &[Rle]) -> Result<Rle> {
        let (first, rest) = rles.split_first().ok_or(CocoError::EmptyMerge)?;
        let mut counts = first.counts.clone();
        for r in rest {
            first.check_same_size(r)?;
            counts = union_runs(&counts, &r.counts);
        }
        Ok(Rle { h: first.h, w: first.w, counts })
    }

    /// `(#(self AND other), #(self OR other))`, walking both run lists.
    pub fn intersection_union(&self, other: &Rle) -> Result<(u64, u64)> {
        self.check_same_size(other)?;
        let (mut i, mut u) = (0u64, 0u64);
        walk_pair(&self.counts, &other.counts, |len, a, b| {
            if a || b {
                u += len;
                if a && b {
                    i += len;
                }
            }
        });
        Ok((i, u))
    }

    /// `iou([self], [other], [0])`: intersection over union, 0 when the masks do not intersect
    /// (so also when both are empty).
    pub fn iou(&self, other: &Rle) -> Result<f64> {
        let (i, u) = self.intersection_union(other)?;
        Ok(if i == 0 { 0.0 } else { i as f64 / u as f64 })
    }

    /// `cv2.resize(decode(self), (dst_w, dst_h), interpolation=cv2.INTER_NEAREST)`, re-encoded.
    pub fn resize_nearest(&self, dst_h: u32, dst_w: u32) -> Result<Rle> {
        check_size(dst_h, dst_w)?;
        let (h, w) = (self.h as usize, self.w as usize);
        let (dh, dw) = (dst_h as usize, dst_w as usize);
        let src = self.to_colmajor();
        let rows: Vec<usize> = (0..dh).map(|d| crate::nearest_index(d, h, dh)).collect();
        let colmajor = (0..dw).flat_map(|dx| {
            let column = &src[crate::nearest_index(dx, w, dw) * h..][..h];
            rows.iter().map(move |&sy| column[sy] != 0)
        });
        Ok(Rle { h: dst_h, w: dst_w, counts: runs_of(colmajor) })
    }

    fn check_same_size(&self, other: &Rle) -> Result<()> {
        if self.size() != other.size() {
            return Err(CocoError::SizeMismatch { a_h: self.h, a_w: self.w, b_h: other.h, b_w: other.w });
        }
        Ok(())
    }

    /// Calls `f(start, len)` for every non-empty foreground run (`start` is a column-major index).
    fn for_each_foreground_run(&self, mut f: impl FnMut(usize, usize)) {
        let mut start = 0usize;
        for (j, &c) in self.counts.iter().enumerate() {
            if j % 2 == 1 && c > 0 {
                f(start, c as usize);
            }
            start += c as usize;
        }
    }
}

/// `rleEncode` of a column-major sequence of pixels: runs, zeros first.
fn runs_of(pixels: impl Iterator<Item = bool>) -> Vec<u32> {
    let mut counts = Vec::new();
    let (mut current, mut run) = (false, 0u32);
    for p in pixels {
        if p != current {
            counts.push(run);
            run = 0;
            current = p;
        }
        run += 1;
    }
    counts.push(run);
    counts
}

/// Walks two run lists of the same total length in lockstep, calling `f(len, a_on, b_on)` for each
/// stretch where neither changes (stretches may be 0 long where a list has 0-long runs).
fn walk_pair(a: &[u32], b: &[u32], mut f: impl FnMut(u64, bool, bool)) {
    let (mut ia, mut ib) = (1usize, 1usize);
    let (mut ca, mut cb) = (a.first().copied().unwrap_or(0), b.first().copied().unwrap_or(0));
    let (mut va, mut vb) = (false, false);
    loop {
        let c = ca.min(cb);
        f(c.into(), va, vb);
        ca -= c;
        if ca == 0 && ia < a.len() {
            ca = a[ia];
            ia += 1;
            va = !va;
        }
        cb -= c;
        if cb == 0 && ib < b.len() {
            cb = b[ib];
            ib += 1;
            vb = !vb;
        }
        if ca == 0 && cb == 0 {
            break;
        }
    }
}

/// One step of `rleMerge` (union): pycocotools closes a run whenever the union's value changes,
/// and at the end.
fn union_runs(a: &[u32], b: &[u32]) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut ia, mut ib) = (1usize, 1usize);
    let (mut ca, mut cb) = (a.first().copied().unwrap_or(0), b.first().copied().unwrap_or(0));
    let (mut va, mut vb, mut v) = (false, false, false);
    let mut run = 0u32;
    loop {
        let c = ca.min(cb);
        run += c;
        ca -= c;
        if ca == 0 && ia < a.len() {
            ca = a[ia];
            ia += 1;
            va = !va;
        }
        cb -= c;
        if cb == 0 && ib < b.len() {
            cb = b[ib];
            ib += 1;
            vb = !vb;
        }
        let done = ca == 0 && cb == 0;
        let previous = v;
        v = va || vb;
        if v != previous || done {
            out.push(run);
            run = 0;
        }
        if done {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_decode_roundtrip_both_orders() {
        // 3x4 row-major: a diagonal plus the last column.
        let rowmajor = [1, 0, 0, 1, 0, 1, 0, 1, 0, 0, 1, 1];
        let r = Rle::from_rowmajor(&rowmajor, 3, 4).unwrap();
        assert_eq!(r.counts(), &[0, 1, 3, 1, 3, 4]);
        assert_eq!(r.to_rowmajor(), rowmajor);
        assert_eq!(Rle::from_colmajor(&r.to_colmajor(), 3, 4).unwrap(), r);
        assert_eq!(r.area(), 6);
        assert_eq!(r.to_bbox(), [0.0, 0.0, 4.0, 3.0]);
    }

    #[test]
    fn constructors_reject_bad_sizes() {
        assert!(matches!(Rle::from_counts(2, 2, vec![1, 2]), Err(CocoError::CountsSum { sum: 3, .. })));
        assert!(matches!(Rle::zeros(0, 5), Err(CocoError::InvalidSize { .. })));
        assert!(matches!(Rle::zeros(70_000, 70_000), Err(CocoError::InvalidSize { .. })));
        assert!(matches!(Rle::from_rowmajor(&[0; 5], 2, 3), Err(CocoError::MaskLength { len: 5, .. })));
    }

    #[test]
    fn merge_and_overlap() {
        let a = Rle::from_rowmajor(&[1, 1, 0, 0, 0, 0], 2, 3).unwrap();
        let b = Rle::from_rowmajor(&[0, 1, 1, 0, 0, 1], 2, 3).unwrap();
        let u = Rle::merge(&[a.clone(), b.clone()]).unwrap();
        assert_eq!(u.to_rowmajor(), vec![1, 1, 1, 0, 0, 1]);
        assert_eq!(a.intersection_union(&b).unwrap(), (1, 4));
        assert_eq!(a.iou(&b).unwrap(), 0.25);
        assert_eq!(Rle::merge(std::slice::from_ref(&a)).unwrap(), a);
        assert_eq!(Rle::merge(&[]), Err(CocoError::EmptyMerge));
        let other = Rle::zeros(3, 2).unwrap();
        assert!(matches!(Rle::merge(&[a.clone(), other.clone()]), Err(CocoError::SizeMismatch { .. })));
        assert!(a.intersection_union(&other).is_err());
    }

    #[test]
    fn merge_keeps_pycocotools_layout_for_zero_runs() {
        // pycocotools keeps a 0-long middle run that its walk passes through.
        let a = Rle::from_counts(5, 1, vec![2, 0, 3]).unwrap();
        let b = Rle::zeros(5, 1).unwrap();
        assert_eq!(Rle::merge(&[a, b]).unwrap().counts(), &[2, 0, 3]);
    }

    #[test]
    fn bbox_of_a_run_wrapping_columns_spans_all_rows() {
        // h = 4: pixels 3 (x0, y3) and 4 (x1, y0) are one run.
        let r = Rle::from_counts(4, 2, vec![3, 2, 3]).unwrap();
        assert_eq!(r.to_bbox(), [0.0, 0.0, 2.0, 4.0]);
        assert_eq!(Rle::zeros(4, 2).unwrap().to_bbox(), [0.0; 4]);
    }
}
