//! Point sampling for the mask terms of the objective (TRAIN-EVAL-SPEC §5.3 step 2–3, §5.4 step
//! 1–3, §5.8): PyTorch's `grid_sample(mode="bilinear", padding_mode="zeros",
//! align_corners=False)` at normalised points (Mask2Former's `point_sample`), uniform point
//! draws (`torch.rand`), and PointRend's importance sampling
//! (`get_uncertain_point_coords_with_randomness` with uncertainty `−|logit|`).
//!
//! Points are `(x, y)` pairs in `[0, 1)`, x along the width. They are plain data: only the
//! sampled maps carry gradients. Point tensors live on the CPU; [`point_sample`] moves its
//! indices and weights to the device of the maps.
//!
//! No keys (no parameters).

use candle_core::{bail, DType, Device, Result, Tensor};

use crate::data::rng::SplitMix64;

/// A uniform `f32` in `[0, 1)` with 24 random bits (what `torch.rand` gives for float32).
fn uniform_f32(rng: &mut SplitMix64) -> f32 {
    (rng.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// `k·p` uniform points, drawn point by point (`x` then `y`), like `torch.rand(k, p, 2)`.
///
/// # Shapes
/// - returns `[k, p, 2]` f32 on the CPU, `(x, y)` in `[0, 1)`
pub fn uniform_points(k: usize, p: usize, rng: &mut SplitMix64) -> Result<Tensor> {
    let data: Vec<f32> = (0..k * p * 2).map(|_| uniform_f32(rng)).collect();
    Tensor::from_vec(data, (k, p, 2), &Device::Cpu)
}

/// The flat source indices and weights of the 4 bilinear corners of every point, corner-major
/// per map (`[K, 4, P]`), with weight 0 (and index 0) for corners outside the `h × w` image.
/// The arithmetic follows PyTorch's float32 steps: `g = 2p − 1`, `ix = ((g + 1)·w − 1) / 2`.
fn corners(points: &[f32], k: usize, p: usize, h: usize, w: usize) -> (Vec<u32>, Vec<f32>) {
    let mut idx = vec![0u32; k * 4 * p];
    let mut wt = vec![0f32; k * 4 * p];
    let unnormalize = |coord: f32, size: usize| {
        let g = 2.0 * coord - 1.0;
        ((g + 1.0) * size as f32 - 1.0) / 2.0
    };
    for ki in 0..k {
        for pi in 0..p {
            let at = (ki * p + pi) * 2;
            let ix = unnormalize(points[at], w);
            let iy = unnormalize(points[at + 1], h);
            let (x0, y0) = (ix.floor(), iy.floor());
            let (x1, y1) = (x0 + 1.0, y0 + 1.0);
            // (column, row, weight) of the nw, ne, sw, se corners
            let quad = [
                (x0, y0, (x1 - ix) * (y1 - iy)),
                (x1, y0, (ix - x0) * (y1 - iy)),
                (x0, y1, (x1 - ix) * (iy - y0)),
                (x1, y1, (ix - x0) * (iy - y0)),
            ];
            for (c, (cx, cy, cw)) in quad.into_iter().enumerate() {
                let inside = cx >= 0.0 && cy >= 0.0 && cx < w as f32 && cy < h as f32;
                if inside {
                    let o = (ki * 4 + c) * p + pi;
                    idx[o] = (cy as usize * w + cx as usize) as u32;
                    wt[o] = cw;
                }
            }
        }
    }
    (idx, wt)
}

/// Samples each map at its points bilinearly, zero outside the image: PyTorch's
/// `grid_sample(maps[:, None], 2·points − 1, align_corners=False)` squeezed. Differentiable with
/// respect to `maps` (one `gather` of the 4 corners and a weighted sum); points get no gradient.
/// A point within half a pixel of the border blends with the zero padding, so it is attenuated.
///
/// # Shapes
/// - `maps`: `[K, H, W]` (any float dtype; sampled in f32)
/// - `points`: `[K, P, 2]`, `(x, y)` in `[0, 1]`
/// - returns `[K, P]` f32
pub fn point_sample(maps: &Tensor, points: &Tensor) -> Result<Tensor> {
    let (k, h, w) = maps.dims3()?;
    let (kp, p, two) = points.dims3()?;
    if kp != k || two != 2 {
        bail!("point_sample: maps {:?} need points [{k}, P, 2], got {:?}", maps.dims(), points.dims());
    }
    let coords = points.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let (idx, wt) = corners(&coords, k, p, h, w);
    let dev = maps.device();
    let idx = Tensor::from_vec(idx, (k, 4 * p), dev)?;
    let wt = Tensor::from_vec(wt, (k, 4, p), dev)?;
    let flat = maps.to_dtype(DType::F32)?.reshape((k, h * w))?; // [K, H·W]
    let vals = flat.contiguous()?.gather(&idx, 1)?.reshape((k, 4, p))?; // [K, 4, P]
    (vals * wt)?.sum(1) // [K, P]
}

/// PointRend's importance sampling without gradient: draw `⌊P·oversample_ratio⌋` uniform points
/// per map, score them by the uncertainty `−|logit|` sampled there, keep the
/// `⌊P·importance_sample_ratio⌋` most uncertain (ties: the earlier draw first) and append fresh
/// uniform points up to `P`. Draw order: all oversampled points of all maps, then all fresh ones.
///
/// # Shapes
/// - `logits_maps`: `[K, H, W]` mask logits (detached here)
/// - returns `[K, P, 2]` f32 on the CPU
pub fn uncertain_points(
    logits_maps: &Tensor,
    num_points: usize,
    oversample_ratio: f64,
    importance_sample_ratio: f64,
    rng: &mut SplitMix64,
) -> Result<Tensor> {
    if !(1.0..).contains(&oversample_ratio) || !(0.0..=1.0).contains(&importance_sample_ratio) {
        bail!(
            "uncertain_points: need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], \
             got {oversample_ratio} and {importance_sample_ratio}"
        );
    }
    let (k, _, _) = logits_maps.dims3()?;
    let num_sampled = (num_points as f64 * oversample_ratio) as usize;
    let num_uncertain = ((importance_sample_ratio * num_points as f64) as usize).min(num_sampled);
    let num_random = num_points - num_uncertain;

    let candidates = uniform_points(k, num_sampled, rng)?; // [K, S, 2]
    let logits = point_sample(&logits_maps.detach(), &candidates)?.to_vec2::<f32>()?; // K × S
    let cand = candidates.flatten_all()?.to_vec1::<f32>()?;
    let fresh = uniform_points(k, num_random, rng)?.flatten_all()?.to_vec1::<f32>()?;

    let mut out = Vec::with_capacity(k * num_points * 2);
    for (ki, row) in logits.iter().enumerate() {
        let mut order: Vec<usize> = (0..num_sampled).collect();
        // most uncertain first: ascending |logit|, stable
        order.sort_by(|&a, &b| row[a].abs().total_cmp(&row[b].abs()));
        for &s in &order[..num_uncertain] {
            let at = (ki * num_sampled + s) * 2;
            out.extend_from_slice(&cand[at..at + 2]);
        }
        out.extend_from_slice(&fresh[ki * num_random * 2..(ki + 1) * num_random * 2]);
    }
    Tensor::from_vec(out, (k, num_points, 2), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// `grid_sample` written out for one point, in f64: zero-padded bilinear blend at
    /// `u = x·W − 0.5`, `v = y·H − 0.5`.
    fn scalar_sample(map: &[f32], h: usize, w: usize, x: f32, y: f32) -> f64 {
        let u = x as f64 * w as f64 - 0.5;
        let v = y as f64 * h as f64 - 0.5;
        let (u0, v0) = (u.floor(), v.floor());
        let pixel = |c: f64, r: f64| {
            if c < 0.0 || r < 0.0 || c >= w as f64 || r >= h as f64 {
                0.0
            } else {
                map[r as usize * w + c as usize] as f64
            }
        };
        let (fu, fv) = (u - u0, v - v0);
        pixel(u0, v0) * (1.0 - fu) * (1.0 - fv)
            + pixel(u0 + 1.0, v0) * fu * (1.0 - fv)
            + pixel(u0, v0 + 1.0) * (1.0 - fu) * fv
            + pixel(u0 + 1.0, v0 + 1.0) * fu * fv
    }

    fn test_maps(k: usize, h: usize, w: usize) -> Vec<f32> {
        (0..k * h * w).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3).collect()
    }

    #[test]
    fn point_sample_matches_the_grid_sample_formula() {
        let (k, h, w, p) = (3, 5, 7, 200);
        let data = test_maps(k, h, w);
        let maps = Tensor::from_vec(data.clone(), (k, h, w), &Device::Cpu).unwrap();
        let mut rng = SplitMix64::new(3);
        let mut pts = uniform_points(k, p, &mut rng).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // exact borders, pixel centres and corners too
        let extra = [(0.0, 0.0), (1.0, 1.0), (0.5 / 7.0, 0.5 / 5.0), (0.999, 0.001), (1.0, 0.3)];
        for (i, (x, y)) in extra.into_iter().enumerate() {
            pts[i * 2] = x;
            pts[i * 2 + 1] = y;
        }
        let points = Tensor::from_vec(pts.clone(), (k, p, 2), &Device::Cpu).unwrap();
        let got = point_sample(&maps, &points).unwrap().to_vec2::<f32>().unwrap();
        for ki in 0..k {
            let map = &data[ki * h * w..(ki + 1) * h * w];
            for (pi, &g) in got[ki].iter().enumerate() {
                let at = (ki * p + pi) * 2;
                let want = scalar_sample(map, h, w, pts[at], pts[at + 1]);
                assert!((g as f64 - want).abs() < 1e-5, "k{ki} p{pi}: {g} vs {want}");
            }
        }
        // a constant map: 1 inside, ¼ at an image corner, ½ on an edge midpoint
        let ones = Tensor::ones((1, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let pts = Tensor::new(&[[[0.5f32, 0.5], [0.0, 0.0], [0.5, 1.0]]], &Device::Cpu).unwrap();
        let got = point_sample(&ones, &pts).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got[0], vec![1.0, 0.25, 0.5]);
    }

    #[test]
    fn point_sample_gradient_matches_finite_differences() {
        let (k, h, w, p) = (2, 4, 5, 30);
        let data = test_maps(k, h, w);
        let mut rng = SplitMix64::new(11);
        let points = uniform_points(k, p, &mut rng).unwrap();
        // a fixed non-uniform weighting of the samples, so every pixel's gradient differs
        let coef: Vec<f32> = (0..k * p).map(|i| 0.5 + (i % 7) as f32 * 0.25).collect();
        let coef = Tensor::from_vec(coef, (k, p), &Device::Cpu).unwrap();
        let f = |m: &Tensor| (point_sample(m, &points).unwrap() * &coef).unwrap().sum_all().unwrap();
        let var = Var::from_tensor(&Tensor::from_vec(data.clone(), (k, h, w), &Device::Cpu).unwrap()).unwrap();
        let grads = f(var.as_tensor()).backward().unwrap();
        let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        for i in 0..data.len() {
            let shifted = |d: f32| {
                let mut v = data.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, (k, h, w), &Device::Cpu).unwrap();
                f(&t).to_scalar::<f32>().unwrap() as f64
            };
            let fd = (shifted(eps) - shifted(-eps)) / (2.0 * eps as f64);
            assert!((g[i] as f64 - fd).abs() < 2e-3, "pixel {i}: grad {} vs fd {fd}", g[i]);
        }
    }

    #[test]
    fn uncertain_points_keep_the_logits_nearest_zero() {
        // logits grow with |x − 0.5|·8: the kept points must have the smallest |logit|
        let (h, w) = (8, 16);
        let row: Vec<f32> = (0..w).map(|c| ((c as f32 + 0.5) / w as f32 - 0.5) * 8.0).collect();
        let data: Vec<f32> = (0..h).flat_map(|_| row.iter().copied()).collect();
        let maps = Tensor::from_vec(data, (1, h, w), &Device::Cpu).unwrap();
        let (p, over, imp) = (40, 3.0, 0.75);
        let mut rng = SplitMix64::new(5);
        let pts = uncertain_points(&maps, p, over, imp, &mut rng).unwrap();
        assert_eq!(pts.dims(), &[1, p, 2]);

        // replay the draws: candidates, then fresh points
        let mut replay = SplitMix64::new(5);
        let cand = uniform_points(1, 120, &mut replay).unwrap();
        let fresh = uniform_points(1, 10, &mut replay).unwrap().to_vec3::<f32>().unwrap();
        let cand_logits = point_sample(&maps, &cand).unwrap().to_vec2::<f32>().unwrap();
        let mut mags: Vec<f32> = cand_logits[0].iter().map(|v| v.abs()).collect();
        mags.sort_by(f32::total_cmp);
        let kept = point_sample(&maps, &pts.narrow(1, 0, 30).unwrap()).unwrap().to_vec2::<f32>().unwrap();
        let mut kept: Vec<f32> = kept[0].iter().map(|v| v.abs()).collect();
        kept.sort_by(f32::total_cmp);
        assert_eq!(kept, mags[..30].to_vec());
        let tail = pts.narrow(1, 30, 10).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(tail, fresh);
    }
}
