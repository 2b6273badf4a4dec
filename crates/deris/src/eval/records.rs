//! The per-sample prediction record: one JSON line per sample, written by `deris eval
//! --save-predictions` and read by `deris metrics`.
//!
//! `{"pred": {"size": [h, w], "counts": "…"}, "gt": {…}, "gt_no_target": bool, "scores": [f32…]}`:
//! `pred` is the union of the masks of the queries scoring above the threshold, `gt` the ground
//! truth at the same resolution, `scores` the per-query referring scores (they decide the GRES
//! no-target prediction). Other keys are allowed and ignored.

use deris_coco::{CocoError, Rle};
use serde::{Deserialize, Serialize};

/// A COCO RLE in JSON: `{"size": [h, w], "counts": …}`, counts compressed (pycocotools' string)
/// or, on input, a plain list of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RleJson {
    pub size: [u32; 2],
    pub counts: RleCounts,
}

/// The `counts` of an [`RleJson`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RleCounts {
    Compressed(String),
    Runs(Vec<u32>),
}

impl RleJson {
    /// The compressed form of a mask.
    pub fn from_rle(rle: &Rle) -> Self {
        Self { size: [rle.h(), rle.w()], counts: RleCounts::Compressed(rle.to_counts_string()) }
    }

    /// Decodes and checks the mask.
    pub fn to_rle(&self) -> Result<Rle, CocoError> {
        let [h, w] = self.size;
        match &self.counts {
            RleCounts::Compressed(s) => Rle::from_counts_string(s, h, w),
            RleCounts::Runs(r) => Rle::from_counts(h, w, r.clone()),
        }
    }
}

/// One sample's prediction and ground truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRecord {
    pub pred: RleJson,
    pub gt: RleJson,
    /// The ground truth has no target (needed for GRES).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt_no_target: Option<bool>,
    /// Per-query referring scores (needed for GRES).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<Vec<f32>>,
}
