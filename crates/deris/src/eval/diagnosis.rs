//! Where a model's errors come from: the masks its queries draw (perception) or which queries it
//! selects for a sentence (cognition). DeRIS decouples the two; this splits an evaluation's
//! shortfall the same way. Not part of the authors' protocol.
//!
//! It needs every object of each image (a COCO `instances.json`, whose annotation ids are the
//! referents' ids) and every query's mask and score. Per sentence, at the model's resolution:
//! - a query **lies on** the object its binary mask overlaps most, if that IoU is at least 0.5;
//!   a referent's **best query** is the query whose mask overlaps it most;
//! - `best_query_iou`: per (sentence, object) the IoU of the object's best query: how well the
//!   masks could be drawn;
//! - `oracle_iou`: the IoU of the union of the referents' best queries with the ground truth (a
//!   sentence without referent scores 1): the gIoU a perfect selection of these queries gets;
//! - `ranking_auc`: how often a referent's best query scores above a query lying on another
//!   object (ties count half), averaged over the sentences that have both;
//! - `top1_on_referent`: how often the best-scoring query lies on a referent;
//! - `selected_on_other`, `selected_on_nothing`: selected queries (score above the threshold)
//!   lying on a non-referent object, and on no object, per sentence with a referent.

use serde::Serialize;

use crate::post::masks::BinaryMask;

/// A query lies on an object when their IoU is at least this.
pub const ON_OBJECT_IOU: f64 = 0.5;

/// One sentence's predictions and objects, all masks at the same size (the model's).
#[derive(Debug, Clone, Copy)]
pub struct DiagnosisSample<'a> {
    /// `N` binary query masks.
    pub query_masks: &'a [BinaryMask],
    /// `N` referring scores.
    pub scores: &'a [f32],
    /// `N` flags: the query is above the threshold.
    pub selected: &'a [bool],
    /// `K` row-major 0/1 masks of every object of the image.
    pub objects: &'a [Vec<u8>],
    /// `K` flags: the object is referred to by the sentence.
    pub referent: &'a [bool],
    /// The ground-truth mask (the union of the referents), row-major 0/1.
    pub gt: &'a [u8],
}

/// Sums over the sentences added so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnosis {
    sentences: usize,
    with_referent: usize,
    best_iou_sum: f64,
    objects: usize,
    oracle_sum: f64,
    auc_sum: f64,
    auc_sentences: usize,
    top1_hits: usize,
    selected_on_other: usize,
    selected_on_nothing: usize,
}

/// The diagnosis of an evaluation, in percent where a share.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiagnosisReport {
    pub sentences: usize,
    /// Mean IoU of each object's best query (%).
    pub best_query_iou: Option<f64>,
    /// Mean IoU with the referents' best queries selected (%, 100 for a sentence without referent).
    pub oracle_iou: Option<f64>,
    /// Referents' best queries outscoring queries on other objects (%).
    pub ranking_auc: Option<f64>,
    /// Sentences with a referent whose best-scoring query lies on one (%).
    pub top1_on_referent: Option<f64>,
    /// Selected queries lying on a non-referent object, per sentence with a referent.
    pub selected_on_other: Option<f64>,
    /// Selected queries lying on no object, per sentence with a referent.
    pub selected_on_nothing: Option<f64>,
}

/// `|a ∧ b| / |a ∨ b|` of two row-major 0/1 masks (0 when both are empty).
fn iou(a: &[u8], b: &[u8]) -> f64 {
    let (inter, union) = a.iter().zip(b).fold((0usize, 0usize), |(i, u), (&x, &y)| (i + usize::from(x != 0 && y != 0), u + usize::from(x != 0 || y != 0)));
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

/// The index and value of the largest entry (the first of equals); `None` when empty.
fn argmax(values: impl IntoIterator<Item = f64>) -> Option<(usize, f64)> {
    values.into_iter().enumerate().fold(None, |best, (i, v)| match best {
        Some((_, b)) if b >= v => best,
        _ => Some((i, v)),
    })
}

impl Diagnosis {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sentence. Errors when the lengths or mask sizes disagree.
    pub fn add(&mut self, s: &DiagnosisSample) -> Result<(), String> {
        let (n, k) = (s.query_masks.len(), s.objects.len());
        if s.scores.len() != n || s.selected.len() != n || s.referent.len() != k {
            return Err(format!("{n} query masks, {} scores, {} flags; {k} objects, {} referent flags", s.scores.len(), s.selected.len(), s.referent.len()));
        }
        let size = s.gt.len();
        if let Some(bad) = s.query_masks.iter().map(|m| m.data.len()).chain(s.objects.iter().map(Vec::len)).find(|&l| l != size) {
            return Err(format!("a mask has {bad} pixels, the ground truth {size}"));
        }
        // ious[o][q]
        let ious: Vec<Vec<f64>> = s.objects.iter().map(|o| s.query_masks.iter().map(|m| iou(&m.data, o)).collect()).collect();
        let best: Vec<Option<(usize, f64)>> = ious.iter().map(|row| argmax(row.iter().copied())).collect();
        let lies_on: Vec<Option<usize>> = (0..n).map(|q| argmax(ious.iter().map(|row| row[q])).filter(|&(_, v)| v >= ON_OBJECT_IOU).map(|(o, _)| o)).collect();

        self.sentences += 1;
        self.objects += k;
        self.best_iou_sum += best.iter().flatten().map(|&(_, v)| v).sum::<f64>();
        if !s.referent.contains(&true) {
            self.oracle_sum += 1.0;
            return Ok(());
        }
        self.with_referent += 1;
        let mut union = vec![0u8; size];
        for (o, b) in best.iter().enumerate() {
            if let (true, Some((q, _))) = (s.referent[o], b) {
                union.iter_mut().zip(&s.query_masks[*q].data).for_each(|(u, &m)| *u |= m);
            }
        }
        self.oracle_sum += iou(&union, s.gt);

        let on_other: Vec<usize> = (0..n).filter(|&q| lies_on[q].is_some_and(|o| !s.referent[o])).collect();
        let referent_best: Vec<usize> = best.iter().enumerate().filter(|(o, _)| s.referent[*o]).filter_map(|(_, b)| b.map(|(q, _)| q)).collect();
        if !on_other.is_empty() && !referent_best.is_empty() {
            let mut wins = 0.0;
            for &r in &referent_best {
                for &q in &on_other {
                    wins += match s.scores[r].partial_cmp(&s.scores[q]) {
                        Some(std::cmp::Ordering::Greater) => 1.0,
                        Some(std::cmp::Ordering::Equal) => 0.5,
                        _ => 0.0,
                    };
                }
            }
            self.auc_sum += wins / (referent_best.len() * on_other.len()) as f64;
            self.auc_sentences += 1;
        }
        if let Some((top, _)) = argmax(s.scores.iter().map(|&v| f64::from(v))) {
            self.top1_hits += usize::from(lies_on[top].is_some_and(|o| s.referent[o]));
        }
        for q in (0..n).filter(|&q| s.selected[q]) {
            match lies_on[q] {
                Some(o) if !s.referent[o] => self.selected_on_other += 1,
                None => self.selected_on_nothing += 1,
                Some(_) => {}
            }
        }
        Ok(())
    }

    pub fn report(&self) -> DiagnosisReport {
        let share = |x: f64, n: usize| (n > 0).then(|| 100.0 * x / n as f64);
        let per = |x: usize, n: usize| (n > 0).then(|| x as f64 / n as f64);
        DiagnosisReport {
            sentences: self.sentences,
            best_query_iou: share(self.best_iou_sum, self.objects),
            oracle_iou: share(self.oracle_sum, self.sentences),
            ranking_auc: share(self.auc_sum, self.auc_sentences),
            top1_on_referent: share(self.top1_hits as f64, self.with_referent),
            selected_on_other: per(self.selected_on_other, self.with_referent),
            selected_on_nothing: per(self.selected_on_nothing, self.with_referent),
        }
    }
}

impl DiagnosisReport {
    /// A two-column markdown table, two decimals, `n/a` where undefined.
    pub fn markdown(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.2}"));
        let rows = [
            ("best-query IoU of each object (%)", f(self.best_query_iou)),
            ("oracle selection IoU (%)", f(self.oracle_iou)),
            ("ranking AUC, referents vs other objects (%)", f(self.ranking_auc)),
            ("top-scoring query on a referent (%)", f(self.top1_on_referent)),
            ("selected queries on other objects, per sentence", f(self.selected_on_other)),
            ("selected queries on no object, per sentence", f(self.selected_on_nothing)),
        ];
        let mut out = format!("| Diagnosis ({} sentences) | |\n| --- | --- |\n", self.sentences);
        for (name, value) in rows {
            out += &format!("| {name} | {value} |\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(bits: &[u8]) -> BinaryMask {
        BinaryMask { height: 1, width: bits.len(), data: bits.to_vec() }
    }

    #[test]
    fn a_hand_made_sentence() {
        // Pixels 0..8; objects A = {0,1}, B = {4,5} (the referent), C = {6,7}.
        let objects = vec![vec![1, 1, 0, 0, 0, 0, 0, 0], vec![0, 0, 0, 0, 1, 1, 0, 0], vec![0, 0, 0, 0, 0, 0, 1, 1]];
        let queries = [
            mask(&[1, 1, 0, 0, 0, 0, 0, 0]), // on A, IoU 1
            mask(&[0, 0, 0, 0, 1, 0, 0, 0]), // on B, IoU 0.5 (B's best query)
            mask(&[0, 0, 1, 1, 0, 0, 0, 0]), // on nothing
            mask(&[0, 0, 0, 0, 0, 0, 1, 0]), // on C, IoU 0.5
        ];
        let scores = [0.9, 0.8, 0.95, 0.3];
        let selected = [true, true, true, false];
        let gt = [0, 0, 0, 0, 1, 1, 0, 0];
        let mut d = Diagnosis::new();
        d.add(&DiagnosisSample { query_masks: &queries, scores: &scores, selected: &selected, objects: &objects, referent: &[false, true, false], gt: &gt })
            .unwrap();
        // and a sentence without referent
        d.add(&DiagnosisSample { query_masks: &queries, scores: &scores, selected: &selected, objects: &objects, referent: &[false; 3], gt: &[0; 8] }).unwrap();
        let r = d.report();
        assert_eq!(r.sentences, 2);
        // best IoUs: A 1, B 0.5, C 0.5, twice
        assert!((r.best_query_iou.unwrap() - 100.0 * 2.0 / 3.0).abs() < 1e-9);
        // oracle: query 1 alone against B → 0.5; the no-referent sentence 1
        assert!((r.oracle_iou.unwrap() - 75.0).abs() < 1e-9);
        // B's best (0.8) vs the queries on A (0.9) and C (0.3): one win of two
        assert!((r.ranking_auc.unwrap() - 50.0).abs() < 1e-9);
        // the top query (0.95) lies on nothing
        assert_eq!(r.top1_on_referent, Some(0.0));
        assert_eq!((r.selected_on_other, r.selected_on_nothing), (Some(1.0), Some(1.0)));
        assert!(r.markdown().contains("| oracle selection IoU (%) | 75.00 |"));
    }

    #[test]
    fn mismatched_inputs_are_errors() {
        let q = [mask(&[1, 0])];
        let mut d = Diagnosis::new();
        let s = DiagnosisSample { query_masks: &q, scores: &[0.5], selected: &[true], objects: &[vec![1, 0, 0]], referent: &[true], gt: &[1, 0] };
        assert!(d.add(&s).unwrap_err().contains("3 pixels"));
        let s = DiagnosisSample { scores: &[], objects: &[vec![1, 0]], ..s };
        assert!(d.add(&s).is_err());
        assert_eq!(d.report().sentences, 0);
    }
}
