//! OpenCV 4.10 `cv::resize` for 8-bit images, bit for bit: `INTER_LINEAR` (fixed point, with the
//! exact-2× switch to `INTER_AREA`) and `INTER_NEAREST`.
//!
//! The rules are the ones pinned by `fixtures/gold/README.md` §2–§3 (checked there against cv2 on
//! 314 random size pairs). They correct MODEL-SPEC §9.1 in two places: only the x axis clamps its
//! source position at the edges (the y axis clamps the source *rows* instead), and both axes derive
//! their scale as the reciprocal `1 / (dst / src)` in double, not `src / dst`.
//!
//! Images are interleaved `[h, w, c]` byte arrays; each channel is resized on its own, so channel
//! order (RGB or BGR) does not matter here.

use rayon::prelude::*;

/// Fixed-point scale of the interpolation weights (`INTER_RESIZE_COEF_SCALE`, 2^11).
const COEF_SCALE: f32 = 2048.0;

/// Where one destination index samples along one axis: first source index and its two weights.
#[derive(Debug, Clone, Copy)]
struct Tap {
    /// First source index; along y it may lie outside `0..src` (rows are clamped when read).
    s: isize,
    /// Weight of source `s`, `round_half_even((1 - f) * 2048)`.
    w0: i32,
    /// Weight of source `s + 1`, `round_half_even(f * 2048)`. `w0 + w1` may differ from 2048.
    w1: i32,
}

/// OpenCV's `scale = 1 / inv_scale` with `inv_scale = dst / src`, both in double.
fn reciprocal_scale(src: usize, dst: usize) -> f64 {
    1.0 / (dst as f64 / src as f64)
}

/// Linear taps for one axis. `clamp_edges` is OpenCV's x-axis rule: a position left of the first
/// pixel or at/after the last one snaps to that pixel with weight 2048 (the y axis does not do this).
fn linear_taps(src: usize, dst: usize, clamp_edges: bool) -> Vec<Tap> {
    let scale = reciprocal_scale(src, dst);
    let last = src as isize - 1;
    (0..dst)
        .map(|d| {
            let pos = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = pos.floor() as isize;
            let mut f = pos - s as f32;
            if clamp_edges {
                if s < 0 {
                    s = 0;
                    f = 0.0;
                }
                if s >= last {
                    s = last;
                    f = 0.0;
                }
            }
            Tap { s, w0: ((1.0 - f) * COEF_SCALE).round_ties_even() as i32, w1: (f * COEF_SCALE).round_ties_even() as i32 }
        })
        .collect()
}

/// `cv2.resize(src, (dst_w, dst_h), interpolation=cv2.INTER_LINEAR)` for a `[h, w, c]` u8 image.
///
/// Follows OpenCV 4.10 exactly: 11-bit fixed-point weights, a horizontal pass into i32, and the
/// vertical pass `(((r0 >> 4) * b0) >> 16) + (((r1 >> 4) * b1) >> 16) + 2) >> 2` (OpenCV's SIMD
/// formula, which its scalar tail repeats). When the source is exactly twice the destination on
/// both axes, OpenCV switches to `INTER_AREA`, a rounded 2×2 mean; so does this function. Equal
/// sizes return a copy.
///
/// # Shapes
/// - `src`: `[h, w, c]` interleaved bytes; returns `[dst_h, dst_w, c]`.
///
/// # Panics
/// If `src.len() != h * w * c` or any size is 0 (these are bugs in the caller, never user data:
/// decoded images are checked to be non-empty).
pub fn resize_linear_u8(src: &[u8], h: usize, w: usize, c: usize, dst_h: usize, dst_w: usize) -> Vec<u8> {
    check_args(src, h, w, c, dst_h, dst_w);
    if (h, w) == (dst_h, dst_w) {
        return src.to_vec();
    }
    if w == 2 * dst_w && h == 2 * dst_h {
        return area_half(src, w, c, dst_h, dst_w);
    }
    let xtaps = linear_taps(w, dst_w, true);
    let ytaps = linear_taps(h, dst_h, false);
    let clamp_row = |s: isize| s.clamp(0, h as isize - 1) as usize;

    // Horizontal pass, only for the source rows the vertical pass reads.
    let mut slot_of_row = vec![usize::MAX; h];
    let mut rows = Vec::new();
    for t in &ytaps {
        for r in [clamp_row(t.s), clamp_row(t.s + 1)] {
            if slot_of_row[r] == usize::MAX {
                slot_of_row[r] = rows.len();
                rows.push(r);
            }
        }
    }
    let row_len = dst_w * c;
    let mut hbuf = vec![0i32; rows.len() * row_len];
    hbuf.par_chunks_mut(row_len).zip(rows.par_iter()).for_each(|(out, &r)| {
        let line = &src[r * w * c..(r + 1) * w * c];
        for (dx, t) in xtaps.iter().enumerate() {
            let s0 = t.s as usize;
            let s1 = (s0 + 1).min(w - 1);
            for k in 0..c {
                out[dx * c + k] = i32::from(line[s0 * c + k]) * t.w0 + i32::from(line[s1 * c + k]) * t.w1;
            }
        }
    });

    // Vertical pass, in OpenCV's 16-bit SIMD arithmetic.
    let mut dst = vec![0u8; dst_h * row_len];
    dst.par_chunks_mut(row_len).zip(ytaps.par_iter()).for_each(|(out, t)| {
        let slot0 = slot_of_row[clamp_row(t.s)];
        let slot1 = slot_of_row[clamp_row(t.s + 1)];
        let r0 = &hbuf[slot0 * row_len..(slot0 + 1) * row_len];
        let r1 = &hbuf[slot1 * row_len..(slot1 + 1) * row_len];
        for ((o, &a), &b) in out.iter_mut().zip(r0).zip(r1) {
            // v_pack saturates (v >> 4) to i16, v_mul_hi keeps the high 16 bits of the product.
            let a = (a >> 4).clamp(i16::MIN.into(), i16::MAX.into());
            let b = (b >> 4).clamp(i16::MIN.into(), i16::MAX.into());
            let v = ((a * t.w0) >> 16) + ((b * t.w1) >> 16);
            *o = ((v + 2) >> 2).clamp(0, 255) as u8;
        }
    });
    dst
}

/// OpenCV's fast `INTER_AREA` for an exact 2× reduction: the mean of each 2×2 block. For 1, 3 and 4
/// channels OpenCV rounds as `(sum + 2) >> 2`; otherwise as `round_half_even(sum * 0.25f)`.
fn area_half(src: &[u8], w: usize, c: usize, dst_h: usize, dst_w: usize) -> Vec<u8> {
    let row_len = dst_w * c;
    let integer_rounding = matches!(c, 1 | 3 | 4);
    let mut dst = vec![0u8; dst_h * row_len];
    dst.par_chunks_mut(row_len).enumerate().for_each(|(dy, out)| {
        let top = &src[2 * dy * w * c..(2 * dy + 1) * w * c];
        let bottom = &src[(2 * dy + 1) * w * c..(2 * dy + 2) * w * c];
        for dx in 0..dst_w {
            for k in 0..c {
                let (i0, i1) = (2 * dx * c + k, (2 * dx + 1) * c + k);
                let sum = u32::from(top[i0]) + u32::from(top[i1]) + u32::from(bottom[i0]) + u32::from(bottom[i1]);
                out[dx * c + k] = if integer_rounding { ((sum + 2) >> 2) as u8 } else { (sum as f32 * 0.25).round_ties_even() as u8 };
            }
        }
    });
    dst
}

/// The source index OpenCV's `INTER_NEAREST` reads for destination index `d`:
/// `min(floor(d * (1.0 / (dst / src))), src - 1)` in double (gold README §2). It lives in
/// `deris-coco`, which resizes ground-truth masks with the same rule.
pub use deris_coco::nearest_index;

/// `cv2.resize(src, (dst_w, dst_h), interpolation=cv2.INTER_NEAREST)` for a `[h, w, c]` u8 image
/// (masks use `c = 1`).
///
/// # Shapes
/// - `src`: `[h, w, c]` interleaved bytes; returns `[dst_h, dst_w, c]`.
///
/// # Panics
/// If `src.len() != h * w * c` or any size is 0.
pub fn resize_nearest_u8(src: &[u8], h: usize, w: usize, c: usize, dst_h: usize, dst_w: usize) -> Vec<u8> {
    check_args(src, h, w, c, dst_h, dst_w);
    let xs: Vec<usize> = (0..dst_w).map(|d| nearest_index(d, w, dst_w)).collect();
    let row_len = dst_w * c;
    let mut dst = vec![0u8; dst_h * row_len];
    dst.par_chunks_mut(row_len).enumerate().for_each(|(dy, out)| {
        let sy = nearest_index(dy, h, dst_h);
        let line = &src[sy * w * c..(sy + 1) * w * c];
        for (dx, &sx) in xs.iter().enumerate() {
            out[dx * c..(dx + 1) * c].copy_from_slice(&line[sx * c..(sx + 1) * c]);
        }
    });
    dst
}

fn check_args(src: &[u8], h: usize, w: usize, c: usize, dst_h: usize, dst_w: usize) {
    assert!(h > 0 && w > 0 && c > 0 && dst_h > 0 && dst_w > 0, "resize: empty size (src {h}x{w}x{c}, dst {dst_h}x{dst_w})");
    assert_eq!(src.len(), h * w * c, "resize: buffer of {} bytes is not {h}x{w}x{c}", src.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant_images_are_preserved() {
        let src: Vec<u8> = (0..5 * 7 * 3).map(|i| (i * 37 % 256) as u8).collect();
        assert_eq!(resize_linear_u8(&src, 5, 7, 3, 5, 7), src);
        for (dh, dw) in [(1, 1), (13, 3), (384, 384), (2, 9)] {
            let flat = vec![200u8; 5 * 7 * 3];
            assert!(resize_linear_u8(&flat, 5, 7, 3, dh, dw).iter().all(|&v| v == 200), "{dh}x{dw}");
        }
    }

    #[test]
    fn exact_half_uses_the_rounded_block_mean() {
        // 2x2 -> 1x1: (1 + 2 + 3 + 4 + 2) >> 2 = 3; a bilinear sample at the centre would give 2.5.
        assert_eq!(resize_linear_u8(&[1, 2, 3, 4], 2, 2, 1, 1, 1), vec![3]);
    }

    #[test]
    fn nearest_uses_the_reciprocal_scale() {
        // src 68 -> 384: floor(d * 68 / 384) and the OpenCV rule disagree somewhere.
        let differs = (0..384).any(|d| nearest_index(d, 68, 384) != d * 68 / 384);
        assert!(differs);
        assert_eq!(resize_nearest_u8(&[1, 2, 3, 4], 2, 2, 1, 4, 4), vec![1, 1, 2, 2, 1, 1, 2, 2, 3, 3, 4, 4, 3, 3, 4, 4]);
    }
}
