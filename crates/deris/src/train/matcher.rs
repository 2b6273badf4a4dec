//! Hungarian matching of queries to targets, one image at a time (TRAIN-EVAL-SPEC §5.3; the
//! authors' `hungarian_matcher_HierVG.memory_efficient_forward` in
//! `perception_branch/mask_criterion/Mask_Criterion.py`).
//!
//! Cost of query `q` for target `t`, on `P` uniform points shared by all queries and targets of
//! the image: `match_mask_weight · BCE(x_q, y_t) + match_class_weight · (−softmax(l_q)[0]) +
//! match_dice_weight · dice(x_q, y_t)`, BCE averaged over the points. The authors' box costs have
//! weight 0 and are left out. Everything here is without gradient.
//!
//! No keys (no parameters).

use candle_core::{bail, DType, Result, Tensor, D};

use super::loss::{LossConfig, Target};
use super::points::{point_sample, uniform_points};
use crate::data::rng::SplitMix64;

/// `log(1 + eˣ)` without overflow.
fn softplus(x: f32) -> f64 {
    let x = x as f64;
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// The `[N·M]` row-major cost matrix of one image from the sampled logits `x` (`N × P`), the
/// sampled target values `y` (`M × P`) and each query's probability of class 0.
fn cost_matrix(x: &[Vec<f32>], y: &[Vec<f32>], p_refer: &[f32], cfg: &LossConfig) -> Vec<f64> {
    let mut cost = Vec::with_capacity(x.len() * y.len());
    let y_sums: Vec<f64> = y.iter().map(|yt| yt.iter().map(|&v| v as f64).sum()).collect();
    for (xq, &pq) in x.iter().zip(p_refer) {
        let p = xq.len().max(1) as f64;
        let pos: Vec<f64> = xq.iter().map(|&v| softplus(-v)).collect(); // BCE against 1
        let neg: Vec<f64> = xq.iter().map(|&v| softplus(v)).collect(); // BCE against 0
        let sig: Vec<f64> = xq.iter().map(|&v| 1.0 / (1.0 + (-(v as f64)).exp())).collect();
        let sig_sum: f64 = sig.iter().sum();
        for (yt, &y_sum) in y.iter().zip(&y_sums) {
            let (mut bce, mut inter) = (0.0, 0.0);
            for (i, &yv) in yt.iter().enumerate() {
                let yv = yv as f64;
                bce += pos[i] * yv + neg[i] * (1.0 - yv);
                inter += sig[i] * yv;
            }
            let dice = 1.0 - (2.0 * inter + 1.0) / (sig_sum + y_sum + 1.0);
            cost.push(
                cfg.match_mask_weight * bce / p - cfg.match_class_weight * pq as f64 + cfg.match_dice_weight * dice,
            );
        }
    }
    cost
}

/// Matches the queries of each image to its targets by minimum total cost (SciPy's
/// `linear_sum_assignment`, rectangular): `min(N, M)` pairs; none when the image has no target,
/// surplus targets unmatched when `M > N`. Draws one set of `cfg.num_points` uniform points per
/// image that has a target (none for the others).
///
/// # Shapes
/// - `masks`: `[B, N, H, W]` mask logits; `refer_logits`: `[B, N, 2]` (class 0 = referred)
/// - `targets[b].masks`: `[M_b, H', W']` 0/1 (any resolution: points are normalised)
/// - returns per image the `(query, target)` pairs, sorted by query
pub fn match_round(
    masks: &Tensor,
    refer_logits: &Tensor,
    targets: &[Target],
    cfg: &LossConfig,
    rng: &mut SplitMix64,
) -> Result<Vec<Vec<(usize, usize)>>> {
    let (b, n, _, _) = masks.dims4()?;
    if refer_logits.dims() != [b, n, 2] || targets.len() != b {
        bail!(
            "match_round: masks {:?} need refer logits [{b}, {n}, 2] and {b} targets, got {:?} and {}",
            masks.dims(),
            refer_logits.dims(),
            targets.len()
        );
    }
    let probs = candle_nn::ops::softmax(&refer_logits.detach().to_dtype(DType::F32)?, D::Minus1)?;
    let probs = probs.narrow(2, 0, 1)?.squeeze(2)?.to_vec2::<f32>()?; // B × N
    let p = cfg.num_points;
    let mut out = Vec::with_capacity(b);
    for (i, target) in targets.iter().enumerate() {
        let m = target.num_targets();
        if m == 0 {
            out.push(Vec::new());
            continue;
        }
        let points = uniform_points(1, p, rng)?; // [1, P, 2]
        let x = point_sample(&masks.get(i)?.detach(), &points.broadcast_as((n, p, 2))?)?.to_vec2::<f32>()?;
        let tgt = target.masks.to_device(masks.device())?;
        let y = point_sample(&tgt, &points.broadcast_as((m, p, 2))?)?.to_vec2::<f32>()?;
        let cost = cost_matrix(&x, &y, &probs[i], cfg);
        let (rows, cols) = lsap::solve(n, m, &cost, false)
            .map_err(|e| candle_core::Error::Msg(format!("match_round: image {i}: assignment failed ({e}); non-finite costs?")))?;
        let mut pairs: Vec<(usize, usize)> = rows.into_iter().zip(cols).collect();
        pairs.sort_unstable();
        out.push(pairs);
    }
    Ok(out)
}

/// Per image, the queries whose binary mask (logit > 0) overlaps some target (value > 0.5) with
/// IoU ≥ `min_iou`, in query order: the extra "referred" labels of
/// [`LossConfig::positive_iou`]. Exact on the whole grid, without gradient.
///
/// # Shapes
/// - `masks`: `[B, N, H, W]` mask logits; `targets[b].masks`: `[M_b, H, W]` (the same `H × W`)
pub fn overlap_positives(masks: &Tensor, targets: &[Target], min_iou: f64) -> Result<Vec<Vec<usize>>> {
    let (b, n, h, w) = masks.dims4()?;
    if targets.len() != b {
        bail!("overlap_positives: {} targets for a batch of {b}", targets.len());
    }
    let mut out = Vec::with_capacity(b);
    for (i, target) in targets.iter().enumerate() {
        if target.num_targets() == 0 {
            out.push(Vec::new());
            continue;
        }
        if target.masks.dims()[1..] != [h, w] {
            bail!("overlap_positives: target {i} masks are {:?}, the predicted masks {h}×{w}", target.masks.dims());
        }
        let pred: Vec<Vec<bool>> = masks.get(i)?.detach().to_dtype(DType::F32)?.flatten_from(1)?.to_vec2::<f32>()?.into_iter().map(|q| q.into_iter().map(|v| v > 0.0).collect()).collect();
        let tgt: Vec<Vec<bool>> = target.masks.to_dtype(DType::F32)?.flatten_from(1)?.to_vec2::<f32>()?.into_iter().map(|t| t.into_iter().map(|v| v > 0.5).collect()).collect();
        let iou = |a: &[bool], t: &[bool]| {
            let (inter, union) = a.iter().zip(t).fold((0usize, 0usize), |(i, u), (&x, &y)| (i + usize::from(x && y), u + usize::from(x || y)));
            if union == 0 { 0.0 } else { inter as f64 / union as f64 }
        };
        out.push((0..n).filter(|&q| tgt.iter().any(|t| iou(&pred[q], t) >= min_iou)).collect());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_matrix_combines_the_three_costs() {
        let cfg = LossConfig::default();
        // one query, one target, two points
        let x = vec![vec![0.0f32, 2.0]];
        let y = vec![vec![1.0f32, 0.0]];
        let c = cost_matrix(&x, &y, &[0.25], &cfg);
        let bce = (2f64.ln() + (1.0 + 2f64.exp()).ln()) / 2.0;
        let s = [0.5, 1.0 / (1.0 + (-2f64).exp())];
        let dice = 1.0 - (2.0 * s[0] + 1.0) / (s[0] + s[1] + 1.0 + 1.0);
        let want = 5.0 * bce - 2.0 * 0.25 + 5.0 * dice;
        assert!((c[0] - want).abs() < 1e-9, "{} vs {want}", c[0]);
    }
}
