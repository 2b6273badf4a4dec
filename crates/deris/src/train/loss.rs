//! The DeRIS training objective (TRAIN-EVAL-SPEC §5; the authors' `HierVG_criterion` in
//! `perception_branch/mask_criterion/Mask_Criterion.py` and its use in
//! `heads/simplehead_Independent_matching.py`, `SimpleHead_Independent_match.forward_train`).
//!
//! Per prediction round (the final one, then each auxiliary round in order), the queries are
//! matched to the targets ([`match_round`]) and three terms are computed:
//! - `cls`: two-class cross entropy of the referring logits, label 0 for matched queries and 1
//!   for the rest, class weights `[1, no_object_weight]`, PyTorch's weighted mean over all `B·N`
//!   queries;
//! - `bce` and `dice`: per matched pair on importance-sampled points ([`uncertain_points`]), the
//!   point-averaged BCE with logits and the dice loss (`+1` smoothing), summed over the pairs
//!   of the batch and divided by `num_masks = max(total targets, 1)`.
//!
//! The auxiliary rounds' stride-4 masks are upsampled to the final masks' size (bilinear,
//! `align_corners=True`) first, as the authors' predictor does for every round before building
//! its aux dicts. Round weights: 1 for the final round, `aux_weight` for the others; within a
//! round `class_weight·cls + mask_weight·bce + dice_weight·dice`. The existence term (final
//! round only) is `binary_cross_entropy(sigmoid(z), exists)` with PyTorch's log clamp at −100.
//!
//! The authors' box terms (L1, GIoU) have weight 0 in the released configs and are left out;
//! so are the perception-branch logits, which no loss uses.
//!
//! No keys (no parameters).

use std::collections::BTreeMap;

use candle_core::{bail, DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::matcher::match_round;
use super::points::{point_sample, uncertain_points};
use crate::data::rng::SplitMix64;
use crate::nn::interpolate::resize_bilinear;
use crate::DerisOutput;

/// Ground truth of one sample.
#[derive(Debug, Clone)]
pub struct Target {
    /// `[M, H, W]` f32 0/1 per-target masks at the perception input size; `M = 0` for no target.
    pub masks: Tensor,
}

impl Target {
    /// The number of targets `M`.
    pub fn num_targets(&self) -> usize {
        self.masks.dims().first().copied().unwrap_or(0)
    }

    /// Whether the sample has a target (the existence label).
    pub fn exists(&self) -> bool {
        self.num_targets() > 0
    }
}

/// Weights and sampling of the objective; `Default` = the authors' values (TRAIN-EVAL-SPEC
/// §5.3–§5.6: Mask2Former's `TRAIN_NUM_POINTS`, `OVERSAMPLE_RATIO`, `IMPORTANCE_SAMPLE_RATIO`,
/// `CLASS_WEIGHT`, `MASK_WEIGHT`, `DICE_WEIGHT`, `NO_OBJECT_WEIGHT`, and the head's
/// `loss_weight.aux` / `loss_weight.existence`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LossConfig {
    /// Points per mask, for matching and for the loss (12544).
    pub num_points: usize,
    /// Candidates per kept point in importance sampling (3).
    pub oversample_ratio: f64,
    /// Share of the points chosen by uncertainty; the rest are uniform (0.75).
    pub importance_sample_ratio: f64,
    /// Weight of the referring cross entropy (2).
    pub class_weight: f64,
    /// Weight of the point BCE (5).
    pub mask_weight: f64,
    /// Weight of the point dice (5).
    pub dice_weight: f64,
    /// Cross-entropy weight of the "not referred" class (0.1).
    pub no_object_weight: f64,
    /// Multiplier of every auxiliary round (0.2).
    pub aux_weight: f64,
    /// Weight of the existence BCE (1).
    pub existence_weight: f64,
    /// Matching cost weight of `−p(referred)` (2).
    pub match_class_weight: f64,
    /// Matching cost weight of the point BCE (5).
    pub match_mask_weight: f64,
    /// Matching cost weight of the point dice (5).
    pub match_dice_weight: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            num_points: 12544,
            oversample_ratio: 3.0,
            importance_sample_ratio: 0.75,
            class_weight: 2.0,
            mask_weight: 5.0,
            dice_weight: 5.0,
            no_object_weight: 0.1,
            aux_weight: 0.2,
            existence_weight: 1.0,
            match_class_weight: 2.0,
            match_mask_weight: 5.0,
            match_dice_weight: 5.0,
        }
    }
}

/// The total loss (scalar tensor with its graph) and every term's value (for logs).
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Scalar f32, differentiable.
    pub total: Tensor,
    /// Unweighted per-round terms `loss_cls`, `loss_bce`, `loss_dice` (final round) and
    /// `loss_cls_{r}`, `loss_bce_{r}`, `loss_dice_{r}` (auxiliary round `r`), `loss_exist`, and
    /// `total`.
    pub terms: BTreeMap<String, f64>,
    /// `max(total targets of the batch, 1)`, the divisor of the mask terms.
    pub num_masks: f64,
}

/// `log(1 + eˣ)` from ops that have gradients: `max(x, 0) + log(1 + e^{−|x|})`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// BCE with logits per element, `softplus(x) − x·y` (= `max(x,0) − x·y + log1p(e^{−|x|})`).
fn bce_with_logits(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    softplus(x)? - (x * y)?
}

/// One round's unweighted terms.
struct RoundLosses {
    cls: Tensor,
    bce: Tensor,
    dice: Tensor,
}

/// The referring cross entropy with class weights `[1, no_object_weight]`: `Σ w_y·(−log p_y)`
/// over these queries divided by `norm` (PyTorch's weighted mean when `norm` is `Σ w_y` over
/// the batch, [`Normalizers::class_weight_sum`]).
fn refer_ce(refer_logits: &Tensor, pairs: &[Vec<(usize, usize)>], no_object_weight: f64, norm: f64) -> Result<Tensor> {
    let (b, n, c) = refer_logits.dims3()?;
    let mut weights = vec![0f32; b * n * c];
    for (i, image_pairs) in pairs.iter().enumerate() {
        for q in 0..n {
            let matched = image_pairs.iter().any(|&(mq, _)| mq == q);
            let (label, w) = if matched { (0, 1.0) } else { (1, no_object_weight) };
            weights[(i * n + q) * c + label] = w as f32;
        }
    }
    if norm <= 0.0 {
        bail!("refer_ce: the class weights sum to {norm}; no_object_weight must be > 0 when nothing is matched");
    }
    let weights = (Tensor::from_vec(weights, (b, n, c), refer_logits.device())? / norm)?;
    let logp = candle_nn::ops::log_softmax(&refer_logits.to_dtype(DType::F32)?, D::Minus1)?;
    (logp * weights)?.sum_all()?.neg()
}

/// Point BCE and dice of the matched pairs, each summed over pairs and divided by `num_masks`.
fn mask_losses(
    masks: &Tensor,
    targets: &[Target],
    pairs: &[Vec<(usize, usize)>],
    cfg: &LossConfig,
    num_masks: f64,
    rng: &mut SplitMix64,
) -> Result<(Tensor, Tensor)> {
    let (b, n, h, w) = masks.dims4()?;
    let dev = masks.device();
    let mut src_idx = Vec::new();
    let mut tgt = Vec::new();
    for (i, (image_pairs, target)) in pairs.iter().zip(targets).enumerate() {
        for &(q, t) in image_pairs {
            src_idx.push((i * n + q) as u32);
            tgt.push(target.masks.get(t)?);
        }
    }
    if src_idx.is_empty() {
        let zero = Tensor::zeros((), DType::F32, dev)?;
        return Ok((zero.clone(), zero));
    }
    let k = src_idx.len();
    let src_idx = Tensor::from_vec(src_idx, k, dev)?;
    let src = masks.reshape((b * n, h, w))?.index_select(&src_idx, 0)?.to_dtype(DType::F32)?; // [K, H, W]
    let tgt = Tensor::stack(&tgt, 0)?.to_device(dev)?.to_dtype(DType::F32)?; // [K, H', W']

    let points = uncertain_points(&src, cfg.num_points, cfg.oversample_ratio, cfg.importance_sample_ratio, rng)?;
    let labels = point_sample(&tgt, &points)?; // [K, P]
    let logits = point_sample(&src, &points)?; // [K, P]

    let bce = (bce_with_logits(&logits, &labels)?.mean(1)?.sum_all()? / num_masks)?;
    let s = candle_nn::ops::sigmoid(&logits)?;
    let numer = (((&s * &labels)?.sum(1)? * 2.0)? + 1.0)?; // [K]
    let denom = ((s.sum(1)? + labels.sum(1)?)? + 1.0)?; // [K]
    let dice = ((numer / denom)?.affine(-1.0, 1.0)?.sum_all()? / num_masks)?;
    Ok((bce, dice))
}

/// Matching and the three terms of one round.
fn round_losses(
    masks: &Tensor,
    refer_logits: &Tensor,
    targets: &[Target],
    cfg: &LossConfig,
    norm: &Normalizers,
    rng: &mut SplitMix64,
) -> Result<RoundLosses> {
    let pairs = match_round(masks, refer_logits, targets, cfg, rng)?;
    let cls = refer_ce(refer_logits, &pairs, cfg.no_object_weight, norm.class_weight_sum)?;
    let (bce, dice) = mask_losses(masks, targets, &pairs, cfg, norm.num_masks, rng)?;
    Ok(RoundLosses { cls, bce, dice })
}

/// `Σ_b BCE(sigmoid(z_b), exists_b) / samples` (the batch mean when `samples` is the batch
/// size) with PyTorch's `binary_cross_entropy` log clamp:
/// `−[y·max(log σ(z), −100) + (1−y)·max(log(1−σ(z)), −100)]`, the logs taken in log space
/// (`log σ(z) = −softplus(−z)`). PyTorch forms `σ(z)` in float32 first, so for `z ≳ 17` its
/// `1 − σ(z)` is 0 and the wrong-class term already sits at the clamp (100); here it is `≈ z`
/// up to `z = 100`.
fn existence_loss(pred_existence: &Tensor, targets: &[Target], samples: f64) -> Result<Tensor> {
    let z = pred_existence.to_dtype(DType::F32)?.flatten_all()?; // [B]
    if z.dim(0)? != targets.len() {
        bail!("existence_loss: {} existence logits for {} targets", z.dim(0)?, targets.len());
    }
    let y: Vec<f32> = targets.iter().map(|t| if t.exists() { 1.0 } else { 0.0 }).collect();
    let y = Tensor::from_vec(y, targets.len(), z.device())?;
    let neg_log_p = softplus(&z.neg()?)?.minimum(100.0)?; // −log σ(z)
    let neg_log_q = softplus(&z)?.minimum(100.0)?; // −log(1 − σ(z))
    let per_sample = ((&y * neg_log_p)? + (y.affine(-1.0, 1.0)? * neg_log_q)?)?;
    per_sample.sum_all()? / samples
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// The divisors of the loss terms, over the samples that share one loss: the whole batch, or
/// one replica's share of it. A part of those samples scored with their divisors
/// ([`deris_loss_part`]) gets its share of their loss, so the parts' losses, and gradients, add
/// up to theirs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalizers {
    /// Divisor of the summed point BCE and dice: the samples' targets, at least 1; with
    /// data-parallel replicas the mean per replica (the authors' all-reduce, TRAIN-EVAL-SPEC
    /// §5.4 / §5.9).
    pub num_masks: f64,
    /// Divisor of the weighted cross-entropy sum, PyTorch's weighted mean: the class weights
    /// of all the samples' queries, 1 for the matched ones (`min(targets, N)` per sample) and
    /// `no_object_weight` for the rest.
    pub class_weight_sum: f64,
    /// Divisor of the summed existence BCE: the number of samples.
    pub samples: f64,
}

impl Normalizers {
    /// The divisors of `targets` scored with `num_queries` queries per sample, the mask terms
    /// divided by `num_masks`.
    pub fn new(targets: &[Target], num_queries: usize, no_object_weight: f64, num_masks: f64) -> Self {
        let matched: usize = targets.iter().map(|t| t.num_targets().min(num_queries)).sum();
        let queries = targets.len() * num_queries;
        Self { num_masks, class_weight_sum: matched as f64 + (queries - matched) as f64 * no_object_weight, samples: targets.len() as f64 }
    }

    /// The divisors of a batch scored on its own: `num_masks = max(total targets, 1)`.
    pub fn of_batch(targets: &[Target], num_queries: usize, no_object_weight: f64) -> Self {
        let num_masks = targets.iter().map(Target::num_targets).sum::<usize>().max(1) as f64;
        Self::new(targets, num_queries, no_object_weight, num_masks)
    }
}

/// TRAIN-EVAL-SPEC §5: per-round matching and losses, aux rounds ×`aux_weight`, existence BCE
/// on the final round. Rounds run final first, then aux 0, 1, …; each matches (one uniform point
/// draw per image with a target) and then importance-samples the matched masks, all from `rng`.
///
/// # Shapes
/// - `out.pred_masks`: `[B, N, H, W]`; `out.aux[r].pred_masks_lowres`: `[B, N, H/s, W/s]`
///   (upsampled to `H × W` here); refer logits `[B, N, 2]`; `out.pred_existence`: `[B, 1]`
/// - `targets`: `B` samples, masks `[M_b, H', W']`
pub fn deris_loss(out: &DerisOutput, targets: &[Target], cfg: &LossConfig, rng: &mut SplitMix64) -> Result<LossOutput> {
    let norm = Normalizers::of_batch(targets, out.pred_refer_logits.dim(1)?, cfg.no_object_weight);
    deris_loss_part(out, targets, cfg, &norm, rng)
}

/// [`deris_loss`] of some of the samples that share the divisors `norm` (a chunk of a batch, or
/// a data-parallel replica): every term is summed over these samples and divided by `norm`.
pub fn deris_loss_part(out: &DerisOutput, targets: &[Target], cfg: &LossConfig, norm: &Normalizers, rng: &mut SplitMix64) -> Result<LossOutput> {
    let (b, _, h, w) = out.pred_masks.dims4()?;
    if targets.len() != b {
        bail!("deris_loss: {} targets for a batch of {b}", targets.len());
    }
    for (i, t) in targets.iter().enumerate() {
        if t.masks.rank() != 3 {
            bail!("deris_loss: target {i} masks must be [M, H, W], got {:?}", t.masks.dims());
        }
    }
    let mut terms = BTreeMap::new();

    let weighted = |r: &RoundLosses| -> Result<Tensor> {
        ((&r.cls * cfg.class_weight)? + (&r.bce * cfg.mask_weight)?)? + (&r.dice * cfg.dice_weight)?
    };
    let mut record = |r: &RoundLosses, suffix: &str| -> Result<()> {
        terms.insert(format!("loss_cls{suffix}"), scalar(&r.cls)?);
        terms.insert(format!("loss_bce{suffix}"), scalar(&r.bce)?);
        terms.insert(format!("loss_dice{suffix}"), scalar(&r.dice)?);
        Ok(())
    };

    let last = round_losses(&out.pred_masks, &out.pred_refer_logits, targets, cfg, norm, rng)?;
    record(&last, "")?;
    let mut total = weighted(&last)?;
    for (r, aux) in out.aux.iter().enumerate() {
        let masks = resize_bilinear(&aux.pred_masks_lowres, h, w, true)?; // [B, N, H, W]
        let round = round_losses(&masks, &aux.pred_refer_logits, targets, cfg, norm, rng)?;
        record(&round, &format!("_{r}"))?;
        total = (total + (weighted(&round)? * cfg.aux_weight)?)?;
    }
    let exist = existence_loss(&out.pred_existence, targets, norm.samples)?;
    terms.insert("loss_exist".to_string(), scalar(&exist)?);
    let total = (total + (exist * cfg.existence_weight)?)?;
    terms.insert("total".to_string(), scalar(&total)?);
    Ok(LossOutput { total, terms, num_masks: norm.num_masks })
}
