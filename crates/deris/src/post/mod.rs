//! Post-processing at the model's resolution: `get_predictions_parts` and `inference` of
//! `deris/models/det_seg/mix_gref_hiervg_mr_loopback.py` (MODEL-SPEC §1.4).
//!
//! Per image: referring scores, boxes in Swin-input pixels, the no-target probability from the
//! existence head, and the referent mask = OR of the binary masks of the queries whose score is
//! strictly above the threshold. Rescaling to the original image is the caller's job.
//!
//! No keys.

pub mod masks;
pub mod rescale;

use candle_core::{DType, Result, Tensor, D};

use crate::config::RuntimeConfig;
use crate::taps::Taps;
pub use masks::BinaryMask;

/// Post-processing thresholds (`post_params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostParams {
    /// A query is a referent when its score is **strictly** above this.
    pub score_threshold: f64,
    /// A pixel is set when `sigmoid(logit) >= mask_threshold`.
    pub mask_threshold: f64,
}

impl From<&RuntimeConfig> for PostParams {
    fn from(r: &RuntimeConfig) -> Self {
        Self { score_threshold: r.score_threshold, mask_threshold: r.mask_threshold }
    }
}

/// The prediction for one (image, text) pair at the model's resolution (the Swin input size).
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePrediction {
    /// `N` referring scores `softmax(refer_logits)[0]`.
    pub scores: Vec<f32>,
    /// `N` boxes `[x0, y0, x1, y1]` in Swin-input pixels, clipped to the image (all kept).
    pub boxes: Vec<[f32; 4]>,
    /// OR of the masks of the queries scoring above the threshold, `H × W` of the Swin input.
    pub mask: BinaryMask,
    /// `sigmoid(existence logit)`: the existence head's probability that a target exists.
    pub existence: f32,
    /// `1 − existence` as the reference computes it (`pred_nt`).
    pub pred_nt: f32,
    /// No query scored above the threshold (the gRefCOCO "no target" decision; the existence
    /// head does not take part in it).
    pub no_target: bool,
}

/// Scores, boxes, existence and the referent mask for every image of a batch.
///
/// `pred_masks` must be at the Swin input resolution; its size `(H, W)` scales the boxes.
/// Records `post.scores`, `post.boxes_xyxy`, `post.pred_nt`, `post.final_mask`.
///
/// # Shapes
/// - `refer_logits`: `[B, N, 2]` (index 0 = referred); `boxes`: `[B, N, 4]` `(cx, cy, w, h)` in `[0, 1]`
/// - `pred_masks`: `[B, N, H, W]` logits; `existence`: `[B, 1]` logit
/// - returns `B` predictions
pub fn get_predictions_parts(
    refer_logits: &Tensor,
    boxes: &Tensor,
    pred_masks: &Tensor,
    existence: &Tensor,
    params: &PostParams,
    taps: &mut Taps,
) -> Result<Vec<ImagePrediction>> {
    let (b, n, h, w) = pred_masks.dims4()?;
    if refer_logits.dims() != [b, n, 2] || boxes.dims() != [b, n, 4] || existence.dims() != [b, 1] {
        candle_core::bail!(
            "post: shapes disagree: refer_logits {:?} (want [{b}, {n}, 2]), boxes {:?} (want [{b}, {n}, 4]), existence {:?} (want [{b}, 1]) for masks {:?}",
            refer_logits.dims(), boxes.dims(), existence.dims(), pred_masks.dims()
        );
    }
    let scores = candle_nn::ops::softmax_last_dim(refer_logits)?.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?; // [B, N]
    let boxes_xyxy = cxcywh_to_xyxy_pixels(boxes, w, h)?; // [B, N, 4]
    let exist_prob = candle_nn::ops::sigmoid(existence)?; // [B, 1]
    let pred_nt = exist_prob.affine(-1.0, 1.0)?; // [B, 1]

    let binary = masks::binarize(pred_masks, params.mask_threshold)?; // [B, N, H, W]
    let selected = scores.gt(params.score_threshold as f32)?; // [B, N]
    let final_mask = masks::union_selected(&binary, &selected)?; // [B, H, W]

    taps.record("post.scores", &scores);
    taps.record("post.boxes_xyxy", &boxes_xyxy);
    taps.record("post.pred_nt", &pred_nt);
    taps.record("post.final_mask", &final_mask);

    let scores_v = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let boxes_v = boxes_xyxy.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let exist_v = exist_prob.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let nt_v = pred_nt.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let selected_v = selected.to_vec2::<u8>()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let data = final_mask.get(i)?.flatten_all()?.to_vec1::<u8>()?;
        out.push(ImagePrediction {
            scores: scores_v[i].clone(),
            boxes: boxes_v[i].iter().map(|v| [v[0], v[1], v[2], v[3]]).collect(),
            mask: BinaryMask { height: h, width: w, data },
            existence: exist_v[i][0],
            pred_nt: nt_v[i][0],
            no_target: selected_v[i].iter().all(|&s| s == 0),
        });
    }
    Ok(out)
}

/// `(cx, cy, w, h)` in `[0, 1]` → `(cx − w/2, cy − h/2, cx + w/2, cy + h/2)` scaled by
/// `(W, H, W, H)` and clipped to `[0, W] × [0, H]` (`box_cxcywh_to_xyxy`, `Boxes.scale`,
/// `Boxes.clip`). Degenerate boxes are kept (the reference would drop them and then crash).
///
/// # Shapes
/// - `boxes`: `[B, N, 4]` → `[B, N, 4]`
pub fn cxcywh_to_xyxy_pixels(boxes: &Tensor, width: usize, height: usize) -> Result<Tensor> {
    let c = |i: usize| boxes.narrow(D::Minus1, i, 1);
    let (cx, cy, bw, bh) = (c(0)?, c(1)?, c(2)?, c(3)?);
    let half_w = bw.affine(0.5, 0.0)?;
    let half_h = bh.affine(0.5, 0.0)?;
    let (wf, hf) = (width as f64, height as f64);
    let x0 = (&cx - &half_w)?.affine(wf, 0.0)?.clamp(0.0, wf)?;
    let y0 = (&cy - &half_h)?.affine(hf, 0.0)?.clamp(0.0, hf)?;
    let x1 = (&cx + &half_w)?.affine(wf, 0.0)?.clamp(0.0, wf)?;
    let y1 = (&cy + &half_h)?.affine(hf, 0.0)?.clamp(0.0, hf)?;
    Tensor::cat(&[x0, y0, x1, y1], D::Minus1) // [B, N, 4]
}
