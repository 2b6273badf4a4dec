//! [`Prediction`]: the crate's one output type, one per (image, sentence) pair, and its JSON form
//! with the COCO RLE of the final mask.
//!
//! Everything a caller may want from one segmentation is here: the final mask at the original
//! image size (what the authors' demo returns with `rescale=True`) and at the model's resolution
//! (what their evaluation scores), the no-target decision, per-query scores, boxes and optional
//! masks, the existence probability, and the time each step took. Drawing is [`crate::viz`]'s
//! job; this module never runs a model.

use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::post::BinaryMask;

/// One decoder query of a [`Prediction`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPrediction {
    /// Referring score `softmax(pred_refer_logits)[0]`.
    pub score: f32,
    /// `score > score_threshold` (strictly): the query's mask is part of the final mask.
    pub selected: bool,
    /// The box head's box `[x0, y0, x1, y1]` in original-image pixels (the model-resolution box
    /// divided by mmcv's `scale_factor`, as the authors' demo does). The authors' objective gives
    /// the box head a zero weight, so in their released checkpoints (and in the embedded model)
    /// it keeps its random initialisation and these boxes say nothing about the object
    /// (TRAIN-EVAL-SPEC §5.6); [`Prediction::mask_bbox`] is the box of what was found.
    pub bbox: [f32; 4],
    /// Box `[x0, y0, x1, y1]` in model-input pixels, clipped to the model input.
    pub bbox_model: [f32; 4],
    /// The query's binary mask at model resolution (`sigmoid(logit) >= mask_threshold`), when
    /// the segmenter was asked for per-query masks.
    pub mask: Option<BinaryMask>,
}

/// Seconds spent on one prediction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Timings {
    /// Resizing, normalising and tokenizing this input (not decoding the file).
    pub preprocess_s: f64,
    /// The network forward of the whole batch this input was part of.
    pub forward_s: f64,
    /// Post-processing of the whole batch: scores, masks, rescaling.
    pub post_s: f64,
    /// How many inputs shared that forward.
    pub batch_size: usize,
}

/// The result for one (image, sentence) pair.
#[derive(Clone, PartialEq)]
pub struct Prediction {
    /// The sentence as given (before cleaning).
    pub text: String,
    /// Final mask at the **original** image size: [`Prediction::mask_model`] resized with OpenCV's
    /// `INTER_NEAREST` (MODEL-SPEC §1.4, `rescale=True`).
    pub mask: BinaryMask,
    /// Final mask at the model's resolution (`runtime.hier_img_size`²): the OR of the binary masks
    /// of the selected queries.
    pub mask_model: BinaryMask,
    /// No query scored above the threshold (the gRefCOCO no-target decision); the mask is empty.
    pub no_target: bool,
    /// The score threshold used for the decision.
    pub score_threshold: f64,
    /// One entry per decoder query, in query order.
    pub queries: Vec<QueryPrediction>,
    /// `sigmoid(existence logit)`: the existence head's probability that a target exists. It
    /// does not take part in the mask or the no-target decision (as in the reference).
    pub existence: f32,
    /// `1 − existence` computed as the reference does (`pred_nt`).
    pub pred_nt: f32,
    pub timings: Timings,
}

impl Prediction {
    /// Original image height in pixels.
    pub fn height(&self) -> usize {
        self.mask.height
    }

    /// Original image width in pixels.
    pub fn width(&self) -> usize {
        self.mask.width
    }

    /// The highest query score, `None` without queries.
    pub fn best_score(&self) -> Option<f32> {
        self.queries.iter().map(|q| q.score).reduce(f32::max)
    }

    /// The tight box `[x, y, w, h]` of the final mask in original-image pixels (COCO's `bbox`
    /// convention), `None` when the mask is empty: the box of the referred objects.
    pub fn mask_bbox(&self) -> Option<[usize; 4]> {
        self.mask.bbox_xywh()
    }

    /// The JSON form: sizes, decision, scores, boxes, timings and the final mask as a COCO RLE
    /// `{"size": [h, w], "counts": "…"}` (pycocotools' compressed string; per-query masks, when
    /// present, are RLEs at model resolution).
    pub fn to_json_value(&self) -> Result<Value> {
        let queries: Vec<Value> = self
            .queries
            .iter()
            .map(|q| -> Result<Value> {
                let mut v = json!({
                    "score": q.score,
                    "selected": q.selected,
                    "bbox_xyxy": q.bbox,
                    "bbox_xyxy_model": q.bbox_model,
                });
                if let (Some(m), Value::Object(o)) = (&q.mask, &mut v) {
                    o.insert("mask".into(), rle_json(m)?);
                }
                Ok(v)
            })
            .collect::<Result<_>>()?;
        Ok(json!({
            "text": self.text,
            "image_size": { "height": self.mask.height, "width": self.mask.width },
            "model_size": { "height": self.mask_model.height, "width": self.mask_model.width },
            "no_target": self.no_target,
            "score_threshold": self.score_threshold,
            "best_score": self.best_score(),
            "existence": self.existence,
            "pred_nt": self.pred_nt,
            "mask": rle_json(&self.mask)?,
            "mask_area": self.mask.area(),
            "mask_bbox_xywh": self.mask_bbox(),
            "mask_model_area": self.mask_model.area(),
            "queries": queries,
            "timings": self.timings,
        }))
    }

    /// [`Prediction::to_json_value`] as pretty-printed text.
    pub fn to_json(&self) -> Result<String> {
        // A tree of plain numbers, strings and arrays always serialises.
        Ok(serde_json::to_string_pretty(&self.to_json_value()?).unwrap_or_default())
    }
}

/// Prints the decision, sizes and scores, not the pixels.
impl std::fmt::Debug for Prediction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prediction")
            .field("text", &self.text)
            .field("size", &(self.mask.height, self.mask.width))
            .field("no_target", &self.no_target)
            .field("mask_area", &self.mask.area())
            .field("scores", &self.queries.iter().map(|q| q.score).collect::<Vec<_>>())
            .field("score_threshold", &self.score_threshold)
            .field("existence", &self.existence)
            .field("timings", &self.timings)
            .finish()
    }
}

fn rle_json(mask: &BinaryMask) -> Result<Value> {
    Ok(json!({ "size": [mask.height, mask.width], "counts": coco_rle_counts(mask)? }))
}

/// The COCO RLE of a binary mask as pycocotools' compressed `counts` string (`encode` followed
/// by `rleToString`), computed by [`deris_coco`].
pub fn coco_rle_counts(mask: &BinaryMask) -> Result<String> {
    let (h, w) = (mask.height as u32, mask.width as u32);
    let rle = deris_coco::Rle::from_rowmajor(&mask.data, h, w).map_err(|e| Error::Input {
        name: "mask".into(),
        reason: format!("cannot encode a {}×{} mask as COCO RLE: {e}", mask.height, mask.width),
    })?;
    Ok(rle.to_counts_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rle_counts_and_inconsistent_masks() {
        // 2x2 [[0, 0], [1, 1]]: column-major runs 1, 1, 1, 1 (the 4th stored as a difference).
        let m = BinaryMask { height: 2, width: 2, data: vec![0, 0, 1, 1] };
        assert_eq!(coco_rle_counts(&m).unwrap(), "1110");
        let bad = BinaryMask { height: 2, width: 3, data: vec![0; 5] };
        assert!(coco_rle_counts(&bad).unwrap_err().to_string().contains("2×3"));
    }
}
