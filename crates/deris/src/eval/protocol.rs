//! A whole split through a [`Segmenter`], scored as the authors evaluate (TRAIN-EVAL-SPEC §7):
//! what `deris eval` runs.
//!
//! [`evaluate`] takes the samples of a [`Split`] one sentence at a time
//! ([`Sample::per_sentence`]), in file order. A producer thread decodes the images, builds the
//! ground truth and tokenizes a batch at a time (the samples of a batch in parallel on rayon's
//! pool) while the calling thread runs the model on the previous batch; a bounded channel keeps at
//! most two batches waiting.
//!
//! Two protocols ([`Protocol`]):
//! - [`Protocol::Reference`], the authors' `rescale=False` evaluation (§7.2, §7.3): the prediction
//!   is the union mask at the model's resolution ([`Prediction::mask_model`], 384² for the
//!   released models) and the ground truth is the union of the target masks rasterised at the
//!   decoded image's size, then nearest-resized to the model's resolution
//!   ([`Rle::resize_nearest`]). Masks of every aspect ratio are scored squashed to a square.
//! - [`Protocol::Original`], the usual RIS protocol: the prediction rescaled to the original size
//!   ([`Prediction::mask`]) against the ground truth at the original size.
//!
//! Per-query scores go with every sample: under [`Task::Gres`] they decide the no-target
//! prediction (no score above the threshold), exactly as in [`GresMetrics`]. Each sample also
//! yields the [`PredictionRecord`] that `deris metrics` reads, so a saved run can be re-scored.
//!
//! Missing image files are found before anything runs: [`check_images`] fails naming the first
//! one, unless [`EvalOptions::skip_missing`] is set, in which case they are left out and listed in
//! [`EvalReport::skipped`].
//!
//! With [`EvalOptions::objects`] (every object of each image) the report also has a
//! [`DiagnosisReport`]: how well the queries' masks fit the objects and how well the scores pick
//! the referents, at the model's resolution whatever the protocol.
//!
//! [`Prediction::mask_model`]: crate::Prediction::mask_model
//! [`Prediction::mask`]: crate::Prediction::mask

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Instant;

use deris_coco::{CocoError, Rle};
use rayon::prelude::*;
use serde_json::{json, Value};

use super::diagnosis::{Diagnosis, DiagnosisReport, DiagnosisSample};
use super::metrics::{GresMetrics, GresReport, RisMetrics, RisReport};
use super::records::{PredictionRecord, RleJson};
use crate::data::{DataError, Layout, ObjectIndex, Sample, Split};
use crate::pipeline::{PreparedInput, Segmenter};
use crate::post::BinaryMask;
use crate::preprocess::image::load_image;

/// Which benchmark's metrics to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// RefCOCO/+/g: mIoU, oIoU, MaskACC@0.5…0.9 ([`RisMetrics`]).
    Ris,
    /// gRefCOCO: gIoU, cIoU, N-acc, T-acc, Pr@0.7…0.9 ([`GresMetrics`]).
    Gres,
}

impl Task {
    /// The task a layout is evaluated with: GRES for the gRefCOCO layouts, RIS for the others.
    pub fn for_layout(layout: Layout) -> Self {
        if layout.is_generalized() {
            Self::Gres
        } else {
            Self::Ris
        }
    }

    /// `ris` or `gres`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ris => "ris",
            Self::Gres => "gres",
        }
    }

    /// The headline metric shown while a run goes on: mIoU (RIS) or gIoU (GRES).
    pub fn running_metric_name(self) -> &'static str {
        match self {
            Self::Ris => "mIoU",
            Self::Gres => "gIoU",
        }
    }
}

/// At which resolution masks are compared (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// The authors' evaluation: model resolution, ground truth nearest-resized to it.
    #[default]
    Reference,
    /// The original image resolution.
    Original,
}

impl Protocol {
    /// `reference` or `original`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Reference => "reference",
            Self::Original => "original",
        }
    }
}

/// How to run an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalOptions {
    pub task: Task,
    pub protocol: Protocol,
    /// Samples per forward pass (at least 1). With the default per-image batch coupling the
    /// results do not depend on it.
    pub batch_size: usize,
    /// Leave out samples whose image file does not exist (they are listed in the report) instead
    /// of failing.
    pub skip_missing: bool,
    /// Evaluate only the first `n` sentences of the split.
    pub limit: Option<usize>,
    /// Every object of the images, for the [`DiagnosisReport`] (`None`: no diagnosis). The
    /// referents are found among them by annotation id; the segmenter must return its query
    /// masks ([`Segmenter::with_query_masks`]).
    pub objects: Option<Arc<ObjectIndex>>,
}

impl EvalOptions {
    /// `task` under the reference protocol, batches of 8, failing on missing images, no limit,
    /// no diagnosis.
    pub fn new(task: Task) -> Self {
        Self { task, protocol: Protocol::Reference, batch_size: 8, skip_missing: false, limit: None, objects: None }
    }
}

/// Why an evaluation stopped; every variant about one sample names it.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading the annotations or building a sample's ground truth failed.
    #[error(transparent)]
    Data(#[from] DataError),

    /// A sample's image file does not exist (and missing images are not skipped).
    #[error(
        "{sample}: image {} does not exist ({missing} of {total} samples have no image file; \
         check the image folder, or skip them with --skip-missing)",
        path.display()
    )]
    MissingImage { sample: String, path: PathBuf, missing: usize, total: usize },

    /// A sample's image cannot be decoded or its sentence cannot be tokenized.
    #[error("{sample}: {err}")]
    Sample { sample: String, err: Box<crate::Error> },

    /// A mask operation failed (the prediction and the ground truth disagree in size).
    #[error("{sample}: {err}")]
    Mask { sample: String, err: CocoError },

    /// A sample's referents cannot be found among its image's objects, or the segmenter gave
    /// no query masks, for the diagnosis.
    #[error("{sample}: {reason}")]
    Diagnosis { sample: String, reason: String },

    /// The model failed on a batch.
    #[error("model, batch starting at {sample}: {err}")]
    Model { sample: String, err: Box<crate::Error> },

    /// Invalid [`EvalOptions`].
    #[error("{0}")]
    Options(String),

    /// The progress callback asked to stop.
    #[error("{0}")]
    Callback(Box<dyn std::error::Error + Send + Sync>),
}

/// A sample left out because its image file does not exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedSample {
    pub label: String,
    pub image: PathBuf,
}

/// What the progress callback of [`evaluate`] gets after each sample.
#[derive(Debug)]
pub struct EvalProgress<'a> {
    /// Samples scored so far, this one included.
    pub done: usize,
    /// Samples to score in all (skipped ones excluded).
    pub total: usize,
    /// The sample (one sentence).
    pub sample: &'a Sample,
    /// Its prediction and ground truth as `deris metrics` reads them.
    pub record: &'a PredictionRecord,
    /// Its IoU (GRES: what it adds to the gIoU sum), 0–1.
    pub iou: f64,
    /// [`Task::running_metric_name`] over the samples so far, in percent.
    pub running: Option<f64>,
}

/// The metrics of the task that was run.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskReport {
    Ris(RisReport),
    Gres(GresReport),
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq)]
pub struct EvalReport {
    /// The split as named in the annotation file.
    pub split: String,
    /// The split as the authors' README names it ([`readme_split_name`]).
    pub readme_split: String,
    pub layout: Layout,
    pub annotations: PathBuf,
    pub task: Task,
    pub protocol: Protocol,
    /// The score threshold of the no-target decision and of the union mask.
    pub score_threshold: f64,
    /// Sentences considered (after [`EvalOptions::limit`]), skipped ones included.
    pub samples: usize,
    /// Sentences scored.
    pub evaluated: usize,
    /// Samples left out for a missing image, in split order.
    pub skipped: Vec<SkippedSample>,
    pub metrics: TaskReport,
    /// With [`EvalOptions::objects`]: where the errors come from.
    pub diagnosis: Option<DiagnosisReport>,
    /// Wall time of the loop (loading, model, scoring).
    pub seconds: f64,
}

impl EvalReport {
    /// The headline metrics as the JSON object `deris metrics` prints for the same records.
    pub fn summary_json(&self) -> Value {
        let v = match &self.metrics {
            TaskReport::Ris(r) => serde_json::to_value(r.summary()),
            TaskReport::Gres(r) => serde_json::to_value(r.summary()),
        };
        // Plain numbers and options always serialise.
        v.unwrap_or(Value::Null)
    }

    /// Everything: the run's settings, counts, the headline metrics (`metrics`, as
    /// [`EvalReport::summary_json`]) and the accumulator's full report (`details`).
    pub fn to_json(&self) -> Value {
        let details = match &self.metrics {
            TaskReport::Ris(r) => serde_json::to_value(r),
            TaskReport::Gres(r) => serde_json::to_value(r),
        };
        json!({
            "split": self.readme_split,
            "split_in_file": self.split,
            "annotations": self.annotations.display().to_string(),
            "layout": layout_name(self.layout),
            "task": self.task.name(),
            "protocol": self.protocol.name(),
            "score_threshold": self.score_threshold,
            "samples": self.samples,
            "evaluated": self.evaluated,
            "missing_images": self.skipped.len(),
            "metrics": self.summary_json(),
            "details": details.unwrap_or(Value::Null),
            "diagnosis": self.diagnosis.as_ref().and_then(|d| serde_json::to_value(d).ok()),
            "seconds": self.seconds,
            "samples_per_second": self.evaluated as f64 / self.seconds.max(1e-9),
        })
    }

    /// The result as a row of the authors' README table, with its header, two decimals and
    /// `n/a` for an undefined value. RIS: `| Split | mIoU | oIoU | MaskACC@0.5-0.9 |` (the five
    /// precisions comma-separated); GRES: `| Split | N-acc. | gIoU | cIoU | T-acc. |` (the
    /// README's columns, then T-acc).
    pub fn markdown(&self) -> String {
        let f = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |x| format!("{x:.2}"));
        let (header, row) = match &self.metrics {
            TaskReport::Ris(r) => {
                let pr: Vec<String> = r.pr.iter().map(|&p| f(p)).collect();
                (vec!["Split", "mIoU", "oIoU", "MaskACC@0.5-0.9"], vec![self.readme_split.clone(), f(r.miou), f(r.oiou), pr.join(", ")])
            }
            TaskReport::Gres(r) => (
                vec!["Split", "N-acc.", "gIoU", "cIoU", "T-acc."],
                vec![self.readme_split.clone(), f(Some(r.n_acc)), f(r.g_iou), f(r.c_iou), f(Some(r.t_acc))],
            ),
        };
        let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
        let mut out = line(header.iter().map(|s| s.to_string()).collect());
        out += &line(header.iter().map(|_| "---".to_string()).collect());
        out += &line(row);
        out
    }

    /// The running metric's final value ([`Task::running_metric_name`]).
    pub fn headline(&self) -> Option<f64> {
        match &self.metrics {
            TaskReport::Ris(r) => r.miou,
            TaskReport::Gres(r) => r.g_iou,
        }
    }
}

/// `seqtr-mixed-seg`, `deris-grefs`, `refer-pickle` or `rela-grefs`: the names `deris eval
/// --layout` takes.
pub fn layout_name(layout: Layout) -> &'static str {
    match layout {
        Layout::SeqtrMixedSeg => "seqtr-mixed-seg",
        Layout::DerisGrefs => "deris-grefs",
        Layout::ReferPickle => "refer-pickle",
        Layout::RelaGrefs => "rela-grefs",
    }
}

/// The split's name in the authors' README: the SeqTR and gRefCOCO files already use it
/// (`val_refcoco_unc`, `testA`); a refer pickle's `val` becomes `val_<dataset>_<splitBy>` from
/// its path (`refcoco+/refs(unc).p` → `val_refcocoplus_unc`, `refcocog/refs(umd).p` →
/// `val_refcocog_umd`); other paths keep the name as it is.
pub fn readme_split_name(split: &Split) -> String {
    if split.layout != Layout::ReferPickle {
        return split.name.clone();
    }
    let path = &split.annotations;
    let split_by = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("refs(")).and_then(|n| n.split_once(").")).map(|(by, _)| by);
    let dataset = path.parent().and_then(Path::file_name).and_then(|n| n.to_str()).and_then(|d| match d {
        "refcoco" => Some("refcoco"),
        "refcoco+" => Some("refcocoplus"),
        "refcocog" => Some("refcocog"),
        _ => None,
    });
    match (dataset, split_by) {
        (Some(d), Some(by)) if !by.is_empty() => format!("{}_{d}_{by}", split.name),
        _ => split.name.clone(),
    }
}

/// The split's samples as [`evaluate`] takes them: one per sentence, the first
/// [`EvalOptions::limit`].
pub fn sentences(split: &Split, limit: Option<usize>) -> Vec<Sample> {
    let all = split.samples.iter().flat_map(Sample::per_sentence);
    match limit {
        Some(n) => all.take(n).collect(),
        None => all.collect(),
    }
}

/// Checks that every image file exists. Fails on the first missing one unless `skip_missing`;
/// otherwise returns the missing ones. Cheap (one `stat` per sample): call it before loading a
/// model to fail early.
pub fn check_images(samples: &[Sample], skip_missing: bool) -> Result<Vec<SkippedSample>, EvalError> {
    partition_missing(samples, skip_missing).map(|(_, skipped)| skipped)
}

/// The samples whose image exists, and the others (an error unless `skip_missing`).
fn partition_missing(samples: &[Sample], skip_missing: bool) -> Result<(Vec<&Sample>, Vec<SkippedSample>), EvalError> {
    let (present, missing): (Vec<&Sample>, Vec<&Sample>) = samples.iter().partition(|s| s.image_path.is_file());
    match missing.first() {
        Some(first) if !skip_missing => Err(EvalError::MissingImage {
            sample: first.label.clone(),
            path: first.image_path.clone(),
            missing: missing.len(),
            total: samples.len(),
        }),
        _ => Ok((present, missing.iter().map(|s| SkippedSample { label: s.label.clone(), image: s.image_path.clone() }).collect())),
    }
}

/// One sample ready for the model: its prepared input and its ground truth at the protocol's
/// resolution.
struct Loaded<'s> {
    sample: &'s Sample,
    input: PreparedInput,
    gt: Rle,
    objects: Option<ModelObjects>,
}

/// A sample's objects at the model's resolution, for the diagnosis.
struct ModelObjects {
    /// Row-major 0/1 masks of every object of the image.
    masks: Vec<Vec<u8>>,
    /// Per object: a referent of the sentence.
    referent: Vec<bool>,
    /// The ground truth, row-major 0/1.
    gt: Vec<u8>,
}

/// Runs `segmenter` over `split` one sentence at a time and scores it with `options.task`'s
/// metrics under `options.protocol` (see the module docs). The score threshold is the
/// segmenter's ([`Segmenter::score_threshold`]).
///
/// `on_sample` is called after each sample, in split order; an error from it stops the run
/// ([`EvalError::Callback`]). Use it for progress and to save the records.
///
/// Errors: [`EvalError::MissingImage`] before anything runs (unless skipping); for the first
/// sample whose image cannot be decoded, whose sentence cannot be tokenized or whose ground truth
/// cannot be built, an error naming it; [`EvalError::Model`] if a forward fails.
pub fn evaluate<F, E>(segmenter: &Segmenter, split: &Split, options: &EvalOptions, mut on_sample: F) -> Result<EvalReport, EvalError>
where
    F: FnMut(&EvalProgress<'_>) -> Result<(), E>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    if options.batch_size == 0 {
        return Err(EvalError::Options("the batch size must be at least 1".into()));
    }
    let start = Instant::now();
    let samples = sentences(split, options.limit);
    let (present, skipped) = partition_missing(&samples, options.skip_missing)?;
    let total = present.len();
    let threshold = segmenter.score_threshold();
    let model_size = u32::try_from(segmenter.config().runtime.hier_img_size)
        .map_err(|_| EvalError::Options("runtime.hier_img_size does not fit a mask size".into()))?;

    let mut ris = RisMetrics::new();
    let mut gres = GresMetrics::new(threshold);
    let mut diagnosis = options.objects.as_ref().map(|_| Diagnosis::new());
    let mut done = 0usize;
    std::thread::scope(|scope| -> Result<(), EvalError> {
        let (tx, rx) = sync_channel::<Result<Vec<Loaded<'_>>, EvalError>>(2);
        let batches = present.chunks(options.batch_size);
        scope.spawn(move || {
            for chunk in batches {
                let each: Vec<Result<Loaded<'_>, EvalError>> =
                    chunk.par_iter().map(|s| load(segmenter, s, options, model_size)).collect();
                // The first failure in split order, whichever thread met it first.
                let loaded: Result<Vec<Loaded<'_>>, EvalError> = each.into_iter().collect();
                let failed = loaded.is_err();
                // A closed channel means the consumer stopped: so do we.
                if tx.send(loaded).is_err() || failed {
                    break;
                }
            }
        });
        for batch in rx {
            let batch = batch?;
            let Some(first) = batch.first() else { continue };
            let inputs: Vec<PreparedInput> = batch.iter().map(|l| l.input.clone()).collect();
            let predictions =
                segmenter.predict(&inputs).map_err(|err| EvalError::Model { sample: first.sample.label.clone(), err: Box::new(err) })?;
            for (l, p) in batch.iter().zip(predictions) {
                let mask = match options.protocol {
                    Protocol::Reference => &p.mask_model,
                    Protocol::Original => &p.mask,
                };
                let mask_error = |err| EvalError::Mask { sample: l.sample.label.clone(), err };
                let pred = mask_rle(mask).map_err(mask_error)?;
                let scores: Vec<f32> = p.queries.iter().map(|q| q.score).collect();
                let gt_no_target = l.sample.no_target();
                let (iou, running) = match options.task {
                    Task::Ris => {
                        let s = ris.add_masks(&pred, &l.gt).map_err(mask_error)?;
                        (s.iou_f64, ris.report().miou)
                    }
                    Task::Gres => {
                        let s = gres.add_masks(&pred, &l.gt, gt_no_target, &scores).map_err(mask_error)?;
                        (s.iou, gres.report().g_iou)
                    }
                };
                if let (Some(d), Some(o)) = (&mut diagnosis, &l.objects) {
                    let fail = |reason: String| EvalError::Diagnosis { sample: l.sample.label.clone(), reason };
                    let query_masks = p
                        .queries
                        .iter()
                        .map(|q| q.mask.clone())
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| fail("the diagnosis needs every query's mask (Segmenter::with_query_masks)".into()))?;
                    let selected: Vec<bool> = p.queries.iter().map(|q| q.selected).collect();
                    let s = DiagnosisSample { query_masks: &query_masks, scores: &scores, selected: &selected, objects: &o.masks, referent: &o.referent, gt: &o.gt };
                    d.add(&s).map_err(fail)?;
                }
                let record = PredictionRecord {
                    pred: RleJson::from_rle(&pred),
                    gt: RleJson::from_rle(&l.gt),
                    gt_no_target: Some(gt_no_target),
                    scores: Some(scores),
                };
                done += 1;
                let progress = EvalProgress { done, total, sample: l.sample, record: &record, iou, running };
                on_sample(&progress).map_err(|e| EvalError::Callback(e.into()))?;
            }
        }
        Ok(())
    })?;

    let metrics = match options.task {
        Task::Ris => TaskReport::Ris(ris.report()),
        Task::Gres => TaskReport::Gres(gres.report()),
    };
    Ok(EvalReport {
        split: split.name.clone(),
        readme_split: readme_split_name(split),
        layout: split.layout,
        annotations: split.annotations.clone(),
        task: options.task,
        protocol: options.protocol,
        score_threshold: threshold,
        samples: samples.len(),
        evaluated: done,
        skipped,
        metrics,
        diagnosis: diagnosis.map(|d| d.report()),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Decodes a sample's image, builds its ground truth at the protocol's resolution and prepares
/// the model input.
fn load<'s>(segmenter: &Segmenter, sample: &'s Sample, options: &EvalOptions, model_size: u32) -> Result<Loaded<'s>, EvalError> {
    let sample_error = |err| EvalError::Sample { sample: sample.label.clone(), err: Box::new(err) };
    let text = sample.expressions.first().ok_or_else(|| {
        sample_error(crate::Error::Text { reason: "the sample has no sentence".into() })
    })?;
    let image = load_image(&sample.image_path).map_err(sample_error)?;
    // Decoded images have at most MAX_PIXELS pixels: both sides fit.
    let (h, w) = (image.h as u32, image.w as u32);
    let to_model = |rle: &Rle| rle.resize_nearest(model_size, model_size).map_err(|err| EvalError::Mask { sample: sample.label.clone(), err });
    let gt = sample.gt_mask(h, w)?;
    // At the model's resolution only where the protocol or the diagnosis reads it.
    let gt_model = match (options.protocol, &options.objects) {
        (Protocol::Original, None) => None,
        _ => Some(to_model(&gt)?),
    };
    let objects = match (&options.objects, &gt_model) {
        (Some(index), Some(gt_model)) => Some(model_objects(sample, index, gt_model, h, w, &to_model)?),
        _ => None,
    };
    let gt = match (options.protocol, gt_model) {
        (Protocol::Reference, Some(gt_model)) => gt_model,
        _ => gt,
    };
    let input = segmenter.prepare(&image, text).map_err(sample_error)?;
    Ok(Loaded { sample, input, gt, objects })
}

/// The objects of `sample`'s image at the model's resolution (`to_model` of their masks at the
/// image's `h × w`), each referent found by its annotation id.
fn model_objects(
    sample: &Sample,
    index: &ObjectIndex,
    gt_model: &Rle,
    h: u32,
    w: u32,
    to_model: &dyn Fn(&Rle) -> Result<Rle, EvalError>,
) -> Result<ModelObjects, EvalError> {
    let objects = index.get(&sample.image_id).map_or(&[][..], Vec::as_slice);
    let ids: Vec<Option<i64>> = objects.iter().map(|o| o.target.ann_id).collect();
    for t in &sample.targets {
        if t.ann_id.is_none() || !ids.contains(&t.ann_id) {
            let id = t.ann_id.map_or_else(|| "without an annotation id".to_string(), |id| id.to_string());
            return Err(EvalError::Diagnosis {
                sample: sample.label.clone(),
                reason: format!("referent {id} is not among the {} objects of image {} in the objects file", objects.len(), sample.image_id),
            });
        }
    }
    let masks = sample.masks_of(objects.iter().map(|o| &o.target), h, w)?;
    Ok(ModelObjects {
        masks: masks.iter().map(|m| to_model(m).map(|r| r.to_rowmajor())).collect::<Result<_, _>>()?,
        referent: ids.iter().map(|id| sample.targets.iter().any(|t| t.ann_id == *id)).collect(),
        gt: gt_model.to_rowmajor(),
    })
}

/// A prediction mask (at most the model's or the decoded image's size) as an RLE.
fn mask_rle(mask: &BinaryMask) -> Result<Rle, CocoError> {
    Rle::from_rowmajor(&mask.data, mask.height as u32, mask.width as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(layout: Layout, annotations: &str, name: &str) -> Split {
        Split { layout, annotations: PathBuf::from(annotations), name: name.into(), samples: Vec::new() }
    }

    #[test]
    fn readme_split_names() {
        assert_eq!(readme_split_name(&split(Layout::ReferPickle, "/d/refcoco/refs(unc).p", "val")), "val_refcoco_unc");
        assert_eq!(readme_split_name(&split(Layout::ReferPickle, "refcoco+/refs(unc).p", "testB")), "testB_refcocoplus_unc");
        assert_eq!(readme_split_name(&split(Layout::ReferPickle, "x/refcocog/refs(umd).p", "test")), "test_refcocog_umd");
        assert_eq!(readme_split_name(&split(Layout::ReferPickle, "mine/refs.p", "val")), "val");
        assert_eq!(readme_split_name(&split(Layout::SeqtrMixedSeg, "a.json", "val_refcoco_unc")), "val_refcoco_unc");
        assert_eq!(readme_split_name(&split(Layout::RelaGrefs, "grefcoco/grefs(unc).json", "testA")), "testA");
    }

    #[test]
    fn task_follows_the_layout() {
        assert_eq!(Task::for_layout(Layout::DerisGrefs), Task::Gres);
        assert_eq!(Task::for_layout(Layout::RelaGrefs), Task::Gres);
        assert_eq!(Task::for_layout(Layout::SeqtrMixedSeg), Task::Ris);
        assert_eq!(Task::for_layout(Layout::ReferPickle), Task::Ris);
    }
}
