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
//! The authors' box terms (L1, GIoU) have weight 0 in the released configs and are left out.
//!
//! The perception branch's class logits (`cls_embed`) enter no loss in the authors' training
//! (their perception branch comes pretrained as a Mask2Former instance segmenter). With
//! `perception_weight > 0` (not the reference; 0 by default) each round also gets Mask2Former's
//! class-agnostic instance loss: the queries are matched to **every object** of the image
//! ([`Target::objects`]) with the perception logits in place of the referring ones, and the same
//! three terms (`loss_pcls`, `loss_pbce`, `loss_pdice`) are added with weight
//! `perception_weight` (times the round's weight): perception learned from scratch alongside
//! cognition. With `category_weight > 0` the queries matched to objects also name their object's
//! category (`loss_pcat`: cross entropy of a training-only head's logits,
//! [`super::heads`], summed over the matched queries and divided by the number of
//! objects), Mask2Former's class loss. With `word_weight > 0` the text features name the ids of
//! their tokens (`loss_word`: per sample the mean cross entropy of a training-only head's logits
//! over the real tokens, summed and divided by the number of samples), so that a BEiT-3 trained
//! from scratch keeps what its words were. With `box_weight > 0` the queries matched to objects
//! also regress their object's box (`loss_pbox`: DETR's L1 on `(cx, cy, w, h)` in `[0, 1]`, the
//! box of the object's mask, summed and divided by the number of objects), so that the queries
//! know where their object is, which relations ("left of") and extremes ("the leftmost") ask.
//!
//! No keys (no parameters).

use std::collections::BTreeMap;

use candle_core::{bail, DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::matcher::{match_round, overlap_positives};
use super::points::{point_sample, uncertain_points};
use crate::data::rng::SplitMix64;
use crate::nn::interpolate::resize_bilinear;
use crate::DerisOutput;

/// Ground truth of one sample.
#[derive(Debug, Clone)]
pub struct Target {
    /// `[M, H, W]` f32 0/1 per-target masks at the perception input size; `M = 0` for no target.
    pub masks: Tensor,
    /// `[K, H, W]` f32 0/1 masks of every object of the image (referred or not), for the
    /// perception loss; `None` when the data lists no objects.
    pub objects: Option<Tensor>,
    /// COCO `category_id` of each object (parallel to `objects`; empty without an object list),
    /// the labels of the category loss.
    pub object_categories: Vec<u32>,
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

    /// The number of objects `K` (0 without an object list).
    pub fn num_objects(&self) -> usize {
        self.objects.as_ref().and_then(|o| o.dims().first().copied()).unwrap_or(0)
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
    /// Also label "referred" in the cross entropy every query whose mask overlaps a target with
    /// at least this IoU, not only the Hungarian-matched one (`None`: the authors' one-to-one
    /// labels). Inference takes the union of the selected queries' masks, so a second query on
    /// a referent does no harm there; one-to-one labels instead teach two queries with the same
    /// object opposite answers. The extra positives weigh 1 in the sum; the divisor stays that
    /// of the one-to-one labels ([`Normalizers::class_weight_sum`]). Mask terms stay one-to-one.
    pub positive_iou: Option<f64>,
    /// Weight of the class-agnostic perception loss on every object (0: the authors' objective,
    /// which has none; needs the samples' objects).
    pub perception_weight: f64,
    /// Weight of the category loss of the queries matched to objects (0: none; needs the
    /// perception loss and a category head).
    pub category_weight: f64,
    /// Weight of the word loss of the text features (0: none; needs a word head).
    pub word_weight: f64,
    /// Weight of the box L1 of the queries matched to objects (0: none; needs the perception
    /// loss).
    pub box_weight: f64,
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
            positive_iou: None,
            perception_weight: 0.0,
            category_weight: 0.0,
            word_weight: 0.0,
            box_weight: 0.0,
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

/// One round's unweighted terms and its matching.
struct RoundLosses {
    cls: Tensor,
    bce: Tensor,
    dice: Tensor,
    pairs: Vec<Vec<(usize, usize)>>,
}

/// The referring cross entropy with class weights `[1, no_object_weight]`: `Σ w_y·(−log p_y)`
/// over these queries divided by `norm` (PyTorch's weighted mean when `norm` is `Σ w_y` over
/// the batch, [`Normalizers::class_weight_sum`]). Label 0 for the matched queries and, per
/// image, the queries in `extra` (may be empty), label 1 for the rest.
fn refer_ce(refer_logits: &Tensor, pairs: &[Vec<(usize, usize)>], extra: &[Vec<usize>], no_object_weight: f64, norm: f64) -> Result<Tensor> {
    let (b, n, c) = refer_logits.dims3()?;
    let mut weights = vec![0f32; b * n * c];
    for (i, image_pairs) in pairs.iter().enumerate() {
        let extra = extra.get(i).map_or(&[][..], Vec::as_slice);
        for q in 0..n {
            let referred = image_pairs.iter().any(|&(mq, _)| mq == q) || extra.contains(&q);
            let (label, w) = if referred { (0, 1.0) } else { (1, no_object_weight) };
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

/// Matching and the three terms of one round; `positive_iou` as [`LossConfig::positive_iou`].
fn round_losses(
    masks: &Tensor,
    logits: &Tensor,
    targets: &[Target],
    cfg: &LossConfig,
    norm: &Normalizers,
    positive_iou: Option<f64>,
    rng: &mut SplitMix64,
) -> Result<RoundLosses> {
    let pairs = match_round(masks, logits, targets, cfg, rng)?;
    let extra = match positive_iou {
        Some(min_iou) => overlap_positives(masks, targets, min_iou)?,
        None => Vec::new(),
    };
    let cls = refer_ce(logits, &pairs, &extra, cfg.no_object_weight, norm.class_weight_sum)?;
    let (bce, dice) = mask_losses(masks, targets, &pairs, cfg, norm.num_masks, rng)?;
    Ok(RoundLosses { cls, bce, dice, pairs })
}

/// Cross entropy of the category logits of the queries matched to objects, against their
/// objects' categories, summed and divided by `num_objects`.
///
/// # Shapes
/// - `logits`: `[B, N, C]`; `pairs[b]`: `(query, object)`; `categories[b][object]` in `0..C`
fn category_ce(logits: &Tensor, pairs: &[Vec<(usize, usize)>], categories: &[&[u32]], num_objects: f64) -> Result<Tensor> {
    let (b, n, c) = logits.dims3()?;
    let (mut rows, mut one_hot) = (Vec::new(), Vec::new());
    for (i, image_pairs) in pairs.iter().enumerate() {
        for &(q, k) in image_pairs {
            let Some(&label) = categories.get(i).and_then(|cats| cats.get(k)) else {
                bail!("category loss: sample {i} has no category for object {k}");
            };
            if label as usize >= c {
                bail!("category loss: sample {i} object {k} has category {label}, the head knows 0..{c}");
            }
            rows.push((i * n + q) as u32);
            one_hot.extend((0..c).map(|j| if j == label as usize { 1f32 } else { 0.0 }));
        }
    }
    let dev = logits.device();
    if rows.is_empty() {
        return Tensor::zeros((), DType::F32, dev);
    }
    let k = rows.len();
    let picked = logits.reshape((b * n, c))?.index_select(&Tensor::from_vec(rows, k, dev)?, 0)?; // [K, C]
    let logp = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, D::Minus1)?;
    (logp * Tensor::from_vec(one_hot, (k, c), dev)?)?.sum_all()?.neg()? / num_objects
}

/// The box `(cx, cy, w, h)` of each mask, in `[0, 1]` of the mask's width and height: the
/// smallest pixel rectangle holding its nonzero pixels (`None` for an empty mask).
///
/// # Shapes
/// - `masks`: `[K, H, W]`
fn mask_boxes(masks: &Tensor) -> Result<Vec<Option<[f32; 4]>>> {
    let (_, h, w) = masks.dims3()?;
    let data = masks.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    Ok(data
        .iter()
        .map(|m| {
            let rows: Vec<usize> = (0..h).filter(|&r| m[r].iter().any(|&v| v > 0.0)).collect();
            let cols: Vec<usize> = (0..w).filter(|&c| m.iter().any(|row| row[c] > 0.0)).collect();
            let (&y0, &y1, &x0, &x1) = (rows.first()?, rows.last()?, cols.first()?, cols.last()?);
            let (x1, y1) = (x1 + 1, y1 + 1);
            Some([(x0 + x1) as f32 / (2 * w) as f32, (y0 + y1) as f32 / (2 * h) as f32, (x1 - x0) as f32 / w as f32, (y1 - y0) as f32 / h as f32])
        })
        .collect())
}

/// DETR's box L1 of the queries matched to objects: `Σ |box_q − box_k|₁` over the pairs whose
/// object has a box, divided by `num_objects`.
///
/// # Shapes
/// - `boxes`: `[B, N, 4]` sigmoid `(cx, cy, w, h)`; `pairs[b]`: `(query, object)`;
///   `object_boxes[b][object]`
fn box_l1(boxes: &Tensor, pairs: &[Vec<(usize, usize)>], object_boxes: &[Vec<Option<[f32; 4]>>], num_objects: f64) -> Result<Tensor> {
    let (b, n, _) = boxes.dims3()?;
    let (mut rows, mut want) = (Vec::new(), Vec::new());
    for (i, image_pairs) in pairs.iter().enumerate() {
        for &(q, k) in image_pairs {
            if let Some(bx) = object_boxes.get(i).and_then(|o| o.get(k)).copied().flatten() {
                rows.push((i * n + q) as u32);
                want.extend(bx);
            }
        }
    }
    let dev = boxes.device();
    if rows.is_empty() {
        return Tensor::zeros((), DType::F32, dev);
    }
    let k = rows.len();
    let picked = boxes.reshape((b * n, 4))?.index_select(&Tensor::from_vec(rows, k, dev)?, 0)?.to_dtype(DType::F32)?; // [K, 4]
    (picked - Tensor::from_vec(want, (k, 4), dev)?)?.abs()?.sum_all()? / num_objects
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
    /// The perception loss's `num_masks`: the samples' objects, at least 1 (per replica, as
    /// `num_masks`).
    pub num_objects: f64,
    /// The perception loss's `class_weight_sum`, with objects in place of targets.
    pub object_weight_sum: f64,
}

impl Normalizers {
    /// The divisors of `targets` scored with `num_queries` queries per sample, the mask terms
    /// divided by `num_masks` (and the perception mask terms by `num_objects`).
    pub fn new(targets: &[Target], num_queries: usize, no_object_weight: f64, num_masks: f64, num_objects: f64) -> Self {
        let queries = targets.len() * num_queries;
        let weight_sum = |matched: usize| matched as f64 + (queries - matched) as f64 * no_object_weight;
        let matched: usize = targets.iter().map(|t| t.num_targets().min(num_queries)).sum();
        let objects: usize = targets.iter().map(|t| t.num_objects().min(num_queries)).sum();
        Self {
            num_masks,
            class_weight_sum: weight_sum(matched),
            samples: targets.len() as f64,
            num_objects,
            object_weight_sum: weight_sum(objects),
        }
    }

    /// The divisors of a batch scored on its own: `num_masks = max(total targets, 1)`,
    /// `num_objects = max(total objects, 1)`.
    pub fn of_batch(targets: &[Target], num_queries: usize, no_object_weight: f64) -> Self {
        let num_masks = targets.iter().map(Target::num_targets).sum::<usize>().max(1) as f64;
        let num_objects = targets.iter().map(Target::num_objects).sum::<usize>().max(1) as f64;
        Self::new(targets, num_queries, no_object_weight, num_masks, num_objects)
    }

    /// The divisors of the perception loss: objects in place of targets.
    fn perception(&self) -> Self {
        Self { num_masks: self.num_objects, class_weight_sum: self.object_weight_sum, ..*self }
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
    deris_loss_part(out, targets, cfg, &norm, &HeadOutputs::default(), rng)
}

/// What the training-only heads ([`super::heads`]) said about a forward pass.
#[derive(Debug, Clone, Default)]
pub struct HeadOutputs {
    /// The category head's logits per round, final first
    /// ([`super::heads::LinearHead::round_logits`]), `[B, N, C]` each; needed when
    /// `category_weight > 0`.
    pub categories: Vec<Tensor>,
    /// The word head's logits on the text features; needed when `word_weight > 0`.
    pub words: Option<WordLogits>,
}

/// The word head's logits with the tokens they should name.
#[derive(Debug, Clone)]
pub struct WordLogits {
    /// `[B, L, V]`
    pub logits: Tensor,
    /// `[B, L]` token ids (the model's `ref_expr_inds`).
    pub ids: Tensor,
    /// `[B, L]` padding mask, 1 = padding (the model's `text_attention_mask`).
    pub padding: Tensor,
}

/// `Σ_b mean_{real j} −log softmax(logits[b, j])[ids[b, j]] / samples`: each sample's mean cross
/// entropy over its real (unpadded) tokens, summed over the samples and divided by `samples`
/// (the batch mean when it is the batch size).
pub fn word_loss(words: &WordLogits, samples: f64) -> Result<Tensor> {
    let (b, l, v) = words.logits.dims3()?;
    if words.ids.dims() != [b, l] || words.padding.dims() != [b, l] {
        bail!("word loss: logits {:?} with ids {:?} and padding {:?}", words.logits.dims(), words.ids.dims(), words.padding.dims());
    }
    let ids = words.ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let padding = words.padding.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let (mut rows, mut labels, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for (i, (ids, pad)) in ids.iter().zip(&padding).enumerate() {
        let real: Vec<usize> = (0..l).filter(|&j| pad[j] == 0).collect();
        for &j in &real {
            if !(0..v as i64).contains(&ids[j]) {
                bail!("word loss: sample {i} token {j} has id {}, the head knows 0..{v}", ids[j]);
            }
            rows.push((i * l + j) as u32);
            labels.push(ids[j] as u32);
            weights.push(1.0 / real.len() as f32);
        }
    }
    let dev = words.logits.device();
    if rows.is_empty() {
        return Tensor::zeros((), DType::F32, dev);
    }
    let k = rows.len();
    let picked = words.logits.reshape((b * l, v))?.index_select(&Tensor::from_vec(rows, k, dev)?, 0)?; // [K, V]
    let logp = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, D::Minus1)?;
    let chosen = logp.gather(&Tensor::from_vec(labels, (k, 1), dev)?, 1)?.squeeze(1)?; // [K]
    (chosen * Tensor::from_vec(weights, k, dev)?)?.sum_all()?.neg()? / samples
}

/// [`deris_loss`] of some of the samples that share the divisors `norm` (a chunk of a batch, or
/// a data-parallel replica): every term is summed over these samples and divided by `norm`.
/// `heads`: the training-only heads' outputs, needed for the terms whose weight is not 0.
pub fn deris_loss_part(
    out: &DerisOutput,
    targets: &[Target],
    cfg: &LossConfig,
    norm: &Normalizers,
    heads: &HeadOutputs,
    rng: &mut SplitMix64,
) -> Result<LossOutput> {
    let (b, _, h, w) = out.pred_masks.dims4()?;
    if targets.len() != b {
        bail!("deris_loss: {} targets for a batch of {b}", targets.len());
    }
    for (i, t) in targets.iter().enumerate() {
        if t.masks.rank() != 3 {
            bail!("deris_loss: target {i} masks must be [M, H, W], got {:?}", t.masks.dims());
        }
    }
    let perception = if cfg.perception_weight > 0.0 {
        let objects = targets
            .iter()
            .enumerate()
            .map(|(i, t)| match &t.objects {
                Some(o) if o.rank() == 3 => Ok(Target { masks: o.clone(), objects: None, object_categories: Vec::new() }),
                Some(o) => bail!("deris_loss: target {i} objects must be [K, H, W], got {:?}", o.dims()),
                None => bail!("deris_loss: perception_weight > 0 needs every sample's objects (training data.objects); sample {i} has none"),
            })
            .collect::<Result<Vec<_>>>()?;
        Some((objects, norm.perception()))
    } else {
        None
    };
    let category_logits = &heads.categories;
    let categories = if cfg.category_weight > 0.0 {
        if perception.is_none() || category_logits.len() != out.aux.len() + 1 {
            bail!("deris_loss: category_weight > 0 needs perception_weight > 0 and category logits for all {} rounds", out.aux.len() + 1);
        }
        Some(targets.iter().map(|t| t.object_categories.as_slice()).collect::<Vec<_>>())
    } else {
        None
    };
    let mut terms = BTreeMap::new();

    let weighted = |r: &RoundLosses| -> Result<Tensor> {
        ((&r.cls * cfg.class_weight)? + (&r.bce * cfg.mask_weight)?)? + (&r.dice * cfg.dice_weight)?
    };
    let mut record = |r: &RoundLosses, prefix: &str, suffix: &str| -> Result<()> {
        terms.insert(format!("loss_{prefix}cls{suffix}"), scalar(&r.cls)?);
        terms.insert(format!("loss_{prefix}bce{suffix}"), scalar(&r.bce)?);
        terms.insert(format!("loss_{prefix}dice{suffix}"), scalar(&r.dice)?);
        Ok(())
    };

    // Rounds: the final one (weight 1), then the auxiliary ones (`aux_weight`); per round the
    // referring terms, then the perception terms.
    let mut rounds = vec![(out.pred_masks.clone(), &out.pred_refer_logits, &out.pred_logits_perception, &out.pred_boxes, String::new(), 1.0)];
    for (r, aux) in out.aux.iter().enumerate() {
        let masks = resize_bilinear(&aux.pred_masks_lowres, h, w, true)?; // [B, N, H, W]
        rounds.push((masks, &aux.pred_refer_logits, &aux.pred_logits, &aux.pred_boxes, format!("_{r}"), cfg.aux_weight));
    }
    // The objects' boxes, for the box term.
    let object_boxes = match &perception {
        _ if cfg.box_weight <= 0.0 => None,
        Some((objects, _)) => Some(objects.iter().map(|o| mask_boxes(&o.masks)).collect::<Result<Vec<_>>>()?),
        None => bail!("deris_loss: box_weight > 0 needs perception_weight > 0 (its queries are the perception matches)"),
    };
    let mut total = Tensor::zeros((), DType::F32, out.pred_masks.device())?;
    let mut object_terms = Vec::new();
    for (r, (masks, refer_logits, perception_logits, boxes, suffix, round_weight)) in rounds.iter().enumerate() {
        let refer = round_losses(masks, refer_logits, targets, cfg, norm, cfg.positive_iou, rng)?;
        record(&refer, "", suffix)?;
        total = (total + (weighted(&refer)? * *round_weight)?)?;
        if let Some((objects, pnorm)) = &perception {
            let p = round_losses(masks, perception_logits, objects, cfg, pnorm, None, rng)?;
            record(&p, "p", suffix)?;
            total = (total + (weighted(&p)? * (round_weight * cfg.perception_weight))?)?;
            if let Some(categories) = &categories {
                let cat = category_ce(&category_logits[r], &p.pairs, categories, pnorm.num_masks)?;
                object_terms.push((format!("loss_pcat{suffix}"), scalar(&cat)?));
                total = (total + (cat * (round_weight * cfg.category_weight))?)?;
            }
            if let Some(object_boxes) = &object_boxes {
                let l1 = box_l1(boxes, &p.pairs, object_boxes, pnorm.num_masks)?;
                object_terms.push((format!("loss_pbox{suffix}"), scalar(&l1)?));
                total = (total + (l1 * (round_weight * cfg.box_weight))?)?;
            }
        }
    }
    terms.extend(object_terms);
    if cfg.word_weight > 0.0 {
        let Some(words) = &heads.words else { bail!("deris_loss: word_weight > 0 needs the word head's logits") };
        let word = word_loss(words, norm.samples)?;
        terms.insert("loss_word".to_string(), scalar(&word)?);
        total = (total + (word * cfg.word_weight)?)?;
    }
    let exist = existence_loss(&out.pred_existence, targets, norm.samples)?;
    terms.insert("loss_exist".to_string(), scalar(&exist)?);
    let total = (total + (exist * cfg.existence_weight)?)?;
    terms.insert("total".to_string(), scalar(&total)?);
    Ok(LossOutput { total, terms, num_masks: norm.num_masks })
}
