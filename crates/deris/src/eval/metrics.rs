//! The authors' mask metrics as accumulators, sample by sample, in the order samples are added.
//!
//! - [`RisMetrics`]: `deris/apis/test.py::accuracy` (RefCOCO/+/g): mIoU, oIoU, Pr@0.5…0.9.
//! - [`GresMetrics`]: `deris/evaluations/grefcoco.py::gres_evaluate` (gIoU, cIoU, Pr@0.7/0.8/0.9 and
//!   its N-acc/T-acc) plus the N-acc/T-acc of `grec_evaluate_f1_nacc`, the values `tools/test.py`
//!   prints and the README reports.
//!
//! The rules are those of `fixtures/gold/README.md` §4, which the gold tests check: integer pixel
//! counts, sums in f64 in sample order, the operation order of the Python code, and `None` wherever
//! the reference divides by zero (oIoU or cIoU with ΣU = 0, gres T-acc with no target sample,
//! any mean over no sample). Percentages are in percent, as the authors report them.

use deris_coco::{CocoError, Rle};
use serde::Serialize;

/// IoU thresholds of RIS `MaskACC` (Pr@X).
pub const RIS_THRESHOLDS: [f64; 5] = [0.5, 0.6, 0.7, 0.8, 0.9];

/// IoU thresholds of GRES Pr@X.
pub const GRES_PR_THRESHOLDS: [f64; 3] = [0.7, 0.8, 0.9];

/// `100 * num / den` in the reference's order (multiply first), `None` when `den` is 0.
fn percent_of(num: f64, den: f64) -> Option<f64> {
    (den != 0.0).then(|| num * 100.0 / den)
}

// ---------------------------------------------------------------------------------------------
// RIS

/// One RIS sample as `mask_overlaps_withIU` scores it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RisSample {
    /// `#(pred AND gt)`.
    pub i: u64,
    /// `#pred + #gt − I`.
    pub u: u64,
    /// `(f32)I / (f32)U` (the torch division), 0 when `U = 0`; decides Pr@X.
    pub iou_f32: f32,
    /// `I / U` in double, 0 when `U = 0`; summed for mIoU.
    pub iou_f64: f64,
    /// `iou_f32 >= (f32)X` for X in [`RIS_THRESHOLDS`].
    pub iou_ge: [bool; 5],
}

impl RisSample {
    /// The sample from its pixel counts.
    pub fn from_counts(i: u64, u: u64) -> Self {
        let (iou_f32, iou_f64) = if u >= 1 { (i as f32 / u as f32, i as f64 / u as f64) } else { (0.0, 0.0) };
        Self { i, u, iou_f32, iou_f64, iou_ge: RIS_THRESHOLDS.map(|t| iou_f32 >= t as f32) }
    }
}

/// Accumulates RIS samples; [`RisMetrics::report`] gives the metrics so far.
#[derive(Debug, Clone, Default)]
pub struct RisMetrics {
    samples: Vec<RisSample>,
    sum_i: u64,
    sum_u: u64,
    sum_iou: f64,
    count_iou_ge: [u64; 5],
}

impl RisMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Scores a predicted mask against its ground truth (both at the evaluation resolution) and
    /// adds it. Fails when the sizes differ.
    pub fn add_masks(&mut self, pred: &Rle, gt: &Rle) -> Result<RisSample, CocoError> {
        let (i, u) = pred.intersection_union(gt)?;
        let sample = RisSample::from_counts(i, u);
        self.add(sample);
        Ok(sample)
    }

    /// Adds an already scored sample.
    pub fn add(&mut self, sample: RisSample) {
        self.sum_i += sample.i;
        self.sum_u += sample.u;
        self.sum_iou += sample.iou_f64;
        for (count, &ge) in self.count_iou_ge.iter_mut().zip(&sample.iou_ge) {
            *count += u64::from(ge);
        }
        self.samples.push(sample);
    }

    /// The samples in the order they were added.
    pub fn samples(&self) -> &[RisSample] {
        &self.samples
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The metrics over every sample added so far.
    pub fn report(&self) -> RisReport {
        let n = self.samples.len() as f64;
        RisReport {
            n: self.samples.len(),
            sum_i: self.sum_i,
            sum_u: self.sum_u,
            count_iou_ge: self.count_iou_ge,
            miou: (n > 0.0).then(|| 100.0 * (self.sum_iou / n)),
            oiou: percent_of(self.sum_i as f64, self.sum_u as f64),
            pr: self.count_iou_ge.map(|c| percent_of(c as f64, n)),
        }
    }
}

/// RIS metrics of a set of samples, in percent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RisReport {
    pub n: usize,
    pub sum_i: u64,
    pub sum_u: u64,
    /// Samples with `iou_f32 >= X`, for X in [`RIS_THRESHOLDS`].
    pub count_iou_ge: [u64; 5],
    /// `100 * (Σ IoU / n)`; `None` without samples.
    pub miou: Option<f64>,
    /// `100 * ΣI / ΣU` (= cIoU); `None` when ΣU = 0 (the reference raises `ZeroDivisionError`).
    pub oiou: Option<f64>,
    /// `MaskACC@X = 100 * count / n` for X in [`RIS_THRESHOLDS`]; `None` without samples.
    pub pr: [Option<f64>; 5],
}

impl RisReport {
    /// The headline numbers under the authors' names, as `deris metrics` prints them.
    pub fn summary(&self) -> RisSummary {
        let [pr50, pr60, pr70, pr80, pr90] = self.pr;
        RisSummary { miou: self.miou, oiou: self.oiou, pr50, pr60, pr70, pr80, pr90 }
    }
}

/// RIS headline metrics with the authors' names (`null` in JSON where undefined).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RisSummary {
    #[serde(rename = "mIoU")]
    pub miou: Option<f64>,
    #[serde(rename = "oIoU")]
    pub oiou: Option<f64>,
    #[serde(rename = "Pr@0.5")]
    pub pr50: Option<f64>,
    #[serde(rename = "Pr@0.6")]
    pub pr60: Option<f64>,
    #[serde(rename = "Pr@0.7")]
    pub pr70: Option<f64>,
    #[serde(rename = "Pr@0.8")]
    pub pr80: Option<f64>,
    #[serde(rename = "Pr@0.9")]
    pub pr90: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// GRES

/// The no-target confusion cell of a sample, named as in the authors' code, where "positive"
/// means **no target**.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NtCase {
    /// No-target sample predicted as no-target.
    #[serde(rename = "TP")]
    Tp,
    /// No-target sample predicted with a target.
    #[serde(rename = "FN")]
    Fn,
    /// Target sample predicted as no-target (its intersection is forced to 0).
    #[serde(rename = "FP")]
    Fp,
    /// Target sample predicted with a target.
    #[serde(rename = "TN")]
    Tn,
}

impl NtCase {
    fn of(gt_no_target: bool, pred_no_target: bool) -> Self {
        match (gt_no_target, pred_no_target) {
            (true, true) => Self::Tp,
            (true, false) => Self::Fn,
            (false, true) => Self::Fp,
            (false, false) => Self::Tn,
        }
    }
}

/// Counts of the four [`NtCase`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NtCounts {
    pub tp: u64,
    pub fn_: u64,
    pub fp: u64,
    pub tn: u64,
}

impl NtCounts {
    fn add(&mut self, case: NtCase) {
        match case {
            NtCase::Tp => self.tp += 1,
            NtCase::Fn => self.fn_ += 1,
            NtCase::Fp => self.fp += 1,
            NtCase::Tn => self.tn += 1,
        }
    }
}

/// Whether no score is strictly above the threshold, compared in float32 (`gres_evaluate`: a
/// float32 tensor against a Python float).
pub fn no_target_f32(scores: &[f32], threshold: f64) -> bool {
    let t = threshold as f32;
    !scores.iter().any(|&s| s > t)
}

/// Whether no score is strictly above the threshold, compared in double
/// (`grec_evaluate_f1_nacc`: the scores as Python floats).
pub fn no_target_f64(scores: &[f32], threshold: f64) -> bool {
    !scores.iter().any(|&s| f64::from(s) > threshold)
}

/// One GRES sample as `gres_evaluate` scores it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GresSample {
    pub gt_no_target: bool,
    /// No score above the threshold (float32 comparison): the decision `gres_evaluate` uses.
    pub pred_no_target: bool,
    /// The same decision in double, as `grec_evaluate_f1_nacc` takes it.
    pub pred_no_target_f64: bool,
    pub case: NtCase,
    /// Intersection added to ΣI: 0 for no-target samples and for [`NtCase::Fp`].
    pub i: u64,
    /// Union added to ΣU: 0 for [`NtCase::Tp`], else `#(pred OR gt)`.
    pub u: u64,
    /// Value added to the gIoU sum: 1 for TP, 0 for FN and FP, `I / U` (0 if `U = 0`) for TN.
    pub iou: f64,
}

impl GresSample {
    /// The sample from `#(pred AND gt)`, `#(pred OR gt)`, the ground-truth flag and the scores.
    pub fn from_counts(and: u64, or: u64, gt_no_target: bool, scores: &[f32], threshold: f64) -> Self {
        let pred_no_target = no_target_f32(scores, threshold);
        let case = NtCase::of(gt_no_target, pred_no_target);
        let (i, u, iou) = match case {
            NtCase::Tp => (0, 0, 1.0),
            NtCase::Fn => (0, or, 0.0),
            NtCase::Fp => (0, or, 0.0),
            NtCase::Tn => (and, or, if or == 0 { 0.0 } else { and as f64 / or as f64 }),
        };
        let pred_no_target_f64 = no_target_f64(scores, threshold);
        Self { gt_no_target, pred_no_target, pred_no_target_f64, case, i, u, iou }
    }
}

/// Accumulates GRES samples under one score threshold; [`GresMetrics::report`] gives the metrics.
#[derive(Debug, Clone)]
pub struct GresMetrics {
    threshold: f64,
    samples: Vec<GresSample>,
    counts: NtCounts,
    grec_counts: NtCounts,
    sum_i: u64,
    sum_u: u64,
    sum_iou: f64,
    not_empty: u64,
    empty: u64,
    pr_count: [u64; 3],
}

impl GresMetrics {
    /// An empty accumulator. A query is a referent when its score is strictly above `threshold`
    /// (0.7 for DeRIS-B, 0.9 for DeRIS-L in the README).
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            samples: Vec::new(),
            counts: NtCounts::default(),
            grec_counts: NtCounts::default(),
            sum_i: 0,
            sum_u: 0,
            sum_iou: 0.0,
            not_empty: 0,
            empty: 0,
            pr_count: [0; 3],
        }
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Scores one sample: `pred` is the union of the masks of the queries scoring above the
    /// threshold, `gt` the union ground truth (all zeros for a no-target sample), `scores` the
    /// per-query referring scores. Fails when the mask sizes differ.
    pub fn add_masks(&mut self, pred: &Rle, gt: &Rle, gt_no_target: bool, scores: &[f32]) -> Result<GresSample, CocoError> {
        let (and, or) = pred.intersection_union(gt)?;
        let sample = GresSample::from_counts(and, or, gt_no_target, scores, self.threshold);
        self.add(sample);
        Ok(sample)
    }

    /// Adds an already scored sample (scored under this accumulator's threshold).
    pub fn add(&mut self, s: GresSample) {
        self.counts.add(s.case);
        self.grec_counts.add(NtCase::of(s.gt_no_target, s.pred_no_target_f64));
        self.sum_i += s.i;
        self.sum_u += s.u;
        self.sum_iou += s.iou;
        if s.gt_no_target {
            self.empty += 1;
        } else {
            self.not_empty += 1;
            for (count, &t) in self.pr_count.iter_mut().zip(&GRES_PR_THRESHOLDS) {
                *count += u64::from(s.iou >= t);
            }
        }
        self.samples.push(s);
    }

    /// The samples in the order they were added.
    pub fn samples(&self) -> &[GresSample] {
        &self.samples
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The metrics over every sample added so far.
    pub fn report(&self) -> GresReport {
        let total = self.samples.len() as u64;
        let c = self.counts;
        let g = self.grec_counts;
        let ratio = |num: u64, den: u64| (den != 0).then(|| (num as f64 / den as f64) * 100.0);
        let (gres_t_acc, gres_n_acc) =
            if self.empty > 0 { (ratio(c.tn, c.tn + c.fp), ratio(c.tp, c.tp + c.fn_)) } else { (Some(0.0), Some(0.0)) };
        GresReport {
            threshold: self.threshold,
            g_iou: (total > 0).then(|| 100.0 * (self.sum_iou / total as f64)),
            c_iou: percent_of(self.sum_i as f64, self.sum_u as f64),
            n_acc: if g.tp == 0 { 0.0 } else { (g.tp as f64 / (g.tp + g.fn_) as f64) * 100.0 },
            t_acc: if g.tn == 0 { 0.0 } else { (g.tn as f64 / (g.tn + g.fp) as f64) * 100.0 },
            gres_n_acc,
            gres_t_acc,
            pr: self.pr_count.map(|n| percent_of(n as f64, self.not_empty as f64)),
            counts: c,
            grec_counts: g,
            sum_i: self.sum_i,
            sum_u: self.sum_u,
            sum_iou: self.sum_iou,
            total,
            not_empty: self.not_empty,
            empty: self.empty,
            pr_count: self.pr_count,
        }
    }
}

/// GRES metrics of a set of samples, in percent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GresReport {
    pub threshold: f64,
    /// `100 * (Σ iou / count)`; `None` without samples.
    pub g_iou: Option<f64>,
    /// `ΣI * 100 / ΣU`; `None` when ΣU = 0 (the reference raises `ZeroDivisionError`).
    pub c_iou: Option<f64>,
    /// N-acc as `grec_evaluate_f1_nacc` gives it (printed by `tools/test.py`, in the README):
    /// `TP / (TP + FN) * 100`, but 0 when TP = 0.
    pub n_acc: f64,
    /// T-acc as `grec_evaluate_f1_nacc` gives it: `TN / (TN + FP) * 100`, but 0 when TN = 0.
    pub t_acc: f64,
    /// N-acc of `gres_evaluate`: 0 without no-target samples.
    pub gres_n_acc: Option<f64>,
    /// T-acc of `gres_evaluate`: 0 without no-target samples, `None` when there are no-target
    /// samples but no target sample (the reference raises `ZeroDivisionError`).
    pub gres_t_acc: Option<f64>,
    /// `Pr@X = count * 100 / #target samples` for X in [`GRES_PR_THRESHOLDS`]; `None` without
    /// target samples.
    pub pr: [Option<f64>; 3],
    /// Confusion counts of `gres_evaluate` (float32 score comparison).
    pub counts: NtCounts,
    /// Confusion counts of `grec_evaluate_f1_nacc` (double score comparison).
    pub grec_counts: NtCounts,
    pub sum_i: u64,
    pub sum_u: u64,
    pub sum_iou: f64,
    pub total: u64,
    /// Target samples.
    pub not_empty: u64,
    /// No-target samples.
    pub empty: u64,
    pub pr_count: [u64; 3],
}

impl GresReport {
    /// The headline numbers under the authors' names, as `deris metrics` prints them.
    pub fn summary(&self) -> GresSummary {
        let [pr70, pr80, pr90] = self.pr;
        GresSummary { g_iou: self.g_iou, c_iou: self.c_iou, n_acc: self.n_acc, t_acc: self.t_acc, pr70, pr80, pr90 }
    }
}

/// GRES headline metrics with the authors' names (`null` in JSON where undefined).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GresSummary {
    #[serde(rename = "gIoU")]
    pub g_iou: Option<f64>,
    #[serde(rename = "cIoU")]
    pub c_iou: Option<f64>,
    #[serde(rename = "N-acc")]
    pub n_acc: f64,
    #[serde(rename = "T-acc")]
    pub t_acc: f64,
    #[serde(rename = "Pr@0.7")]
    pub pr70: Option<f64>,
    #[serde(rename = "Pr@0.8")]
    pub pr80: Option<f64>,
    #[serde(rename = "Pr@0.9")]
    pub pr90: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ris_threshold_is_inclusive_and_u0_is_zero() {
        let s = RisSample::from_counts(462, 660);
        assert_eq!(s.iou_ge, [true, true, true, false, false]);
        let z = RisSample::from_counts(0, 0);
        assert_eq!((z.iou_f32, z.iou_f64), (0.0, 0.0));
        let mut m = RisMetrics::new();
        assert_eq!(m.report().miou, None);
        m.add(z);
        let r = m.report();
        assert_eq!((r.miou, r.oiou), (Some(0.0), None));
    }

    #[test]
    fn gres_score_equal_to_threshold_is_not_above() {
        let t = 0.7f32;
        assert!(no_target_f32(&[t, 0.1], 0.7));
        assert!(!no_target_f32(&[f32::from_bits(t.to_bits() + 1)], 0.7));
        // The false positive forces I = 0 but keeps the union.
        let s = GresSample::from_counts(5, 10, false, &[0.2], 0.7);
        assert_eq!((s.case, s.i, s.u, s.iou), (NtCase::Fp, 0, 10, 0.0));
    }

    #[test]
    fn gres_without_no_target_samples_reports_like_the_reference() {
        let mut m = GresMetrics::new(0.7);
        m.add(GresSample::from_counts(5, 10, false, &[0.9], 0.7));
        m.add(GresSample::from_counts(5, 10, false, &[0.1], 0.7));
        let r = m.report();
        assert_eq!((r.gres_n_acc, r.gres_t_acc), (Some(0.0), Some(0.0)));
        assert_eq!((r.n_acc, r.t_acc), (0.0, 50.0));
        assert_eq!(r.g_iou, Some(25.0));
    }
}
