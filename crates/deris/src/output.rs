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

use crate::post::BinaryMask;

/// One decoder query of a [`Prediction`].
#[derive(Debug, Clone, PartialEq)]
pub struct QueryPrediction {
    /// Referring score `softmax(pred_refer_logits)[0]`.
    pub score: f32,
    /// `score > score_threshold` (strictly): the query's mask is part of the final mask.
    pub selected: bool,
    /// Box `[x0, y0, x1, y1]` in original-image pixels (the model-resolution box divided by
    /// mmcv's `scale_factor`, as the authors' demo does).
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

    /// The JSON form: sizes, decision, scores, boxes, timings and the final mask as a COCO RLE
    /// `{"size": [h, w], "counts": "…"}` (pycocotools' compressed string; per-query masks, when
    /// present, are RLEs at model resolution).
    pub fn to_json_value(&self) -> Value {
        let queries: Vec<Value> = self
            .queries
            .iter()
            .map(|q| {
                let mut v = json!({
                    "score": q.score,
                    "selected": q.selected,
                    "bbox_xyxy": q.bbox,
                    "bbox_xyxy_model": q.bbox_model,
                });
                if let (Some(m), Value::Object(o)) = (&q.mask, &mut v) {
                    o.insert("mask".into(), rle_json(m));
                }
                v
            })
            .collect();
        json!({
            "text": self.text,
            "image_size": { "height": self.mask.height, "width": self.mask.width },
            "model_size": { "height": self.mask_model.height, "width": self.mask_model.width },
            "no_target": self.no_target,
            "score_threshold": self.score_threshold,
            "best_score": self.best_score(),
            "existence": self.existence,
            "pred_nt": self.pred_nt,
            "mask": rle_json(&self.mask),
            "mask_area": self.mask.area(),
            "mask_model_area": self.mask_model.area(),
            "queries": queries,
            "timings": self.timings,
        })
    }

    /// [`Prediction::to_json_value`] as pretty-printed text.
    pub fn to_json(&self) -> String {
        // A tree of plain numbers, strings and arrays always serialises.
        serde_json::to_string_pretty(&self.to_json_value()).unwrap_or_default()
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

fn rle_json(mask: &BinaryMask) -> Value {
    json!({ "size": [mask.height, mask.width], "counts": coco_rle_counts(mask) })
}

/// The COCO RLE of a binary mask as pycocotools' compressed `counts` string (`encode` followed
/// by `rleToString`): runs counted down the columns (column-major), starting with a run of zeros
/// that may be empty; from the third run on, each run is stored as its difference to the run two
/// before; each value is written in 5-bit groups, least significant first, as `group + 48`, with
/// `0x20` meaning "more groups follow" and `0x10` of the last group the sign.
pub fn coco_rle_counts(mask: &BinaryMask) -> String {
    let (h, w) = (mask.height, mask.width);
    let mut runs: Vec<i64> = Vec::new();
    let (mut current, mut len) = (false, 0i64);
    for x in 0..w {
        for y in 0..h {
            let v = mask.data.get(y * w + x).is_some_and(|&p| p != 0);
            if v != current {
                runs.push(len);
                (current, len) = (v, 0);
            }
            len += 1;
        }
    }
    runs.push(len);

    let mut s = String::new();
    for (i, &run) in runs.iter().enumerate() {
        let mut x = if i > 2 { run - runs[i - 2] } else { run };
        loop {
            let mut c = (x & 0x1f) as u8;
            x >>= 5; // arithmetic shift, as on C's `long`
            let more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
            if more {
                c |= 0x20;
            }
            s.push(char::from(c + 48));
            if !more {
                break;
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(h: usize, w: usize, rows: &str) -> BinaryMask {
        BinaryMask { height: h, width: w, data: rows.bytes().map(|b| b - b'0').collect() }
    }

    #[test]
    fn rle_of_simple_masks() {
        // All zeros: one run of 6 → "6" (6 + 48 = '6').
        assert_eq!(coco_rle_counts(&mask(2, 3, "000000")), "6");
        // All ones: an empty zero run, then 4 → "04".
        assert_eq!(coco_rle_counts(&mask(2, 2, "1111")), "04");
        // 2x2 [[0, 1], [0, 1]]: column 0 zeros (2), column 1 ones (2) → "22".
        assert_eq!(coco_rle_counts(&mask(2, 2, "0101")), "22");
        // Runs 1, 1, 1, 1 (column-major 0 1 0 1 in a 2x2 [[0, 0], [1, 1]]): diffs from run i-2
        // make the 4th value 0.
        assert_eq!(coco_rle_counts(&mask(2, 2, "0011")), "1110");
    }

    #[test]
    fn rle_of_long_and_negative_values() {
        // 1 zero then 40 ones: 40 = 0b01000_01000 → groups 8|0x20 and 1 → 'X' '1'.
        let mut rows = [b'1'; 41];
        rows[0] = b'0';
        let m = BinaryMask { height: 41, width: 1, data: rows.iter().map(|b| b - b'0').collect() };
        assert_eq!(coco_rle_counts(&m), "1X1");
        // Runs 1, 40, 1, 1: the fourth run is stored as 1 - 40 = -39. -39 & 31 = 25 (sign bit
        // 0x10 set) and -39 >> 5 = -2 ≠ -1, so more follows: 25 | 32 → 'i'; then -2 & 31 = 30
        // and -2 >> 5 = -1: last group → 'N'.
        let mut d = vec![1u8; 43];
        (d[0], d[41]) = (0, 0);
        let m = BinaryMask { height: 43, width: 1, data: d };
        assert_eq!(coco_rle_counts(&m), "1X11iN");
    }
}
