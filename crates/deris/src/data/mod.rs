//! Datasets: referring-segmentation annotations in the layouts people have, read into one
//! [`Sample`] type (TRAIN-EVAL-SPEC §1–§3).
//!
//! Four layouts ([`Layout`]), one reader each in [`readers`]:
//! - SeqTR/DeRIS mixed-seg JSON (`instances_nogoogle_withid.json`): split → items of one referred
//!   object (RefCOCO/+/g);
//! - DeRIS gRefCOCO JSON (`grefs/instances.json`): split → items with a list of annotations,
//!   no-target items carrying one placeholder annotation;
//! - the original refer layout: `refs(unc).p` (a Python pickle) + COCO `instances.json`;
//! - ReLA's gRefCOCO layout: `grefs(unc).json` + `instances.json`, `ann_id: [-1]` = no target.
//!
//! Readers keep the grouping of their file: a SeqTR train item or a refer/ReLA ref holds all its
//! sentences; [`Split::per_sentence`] gives one sample per sentence, which is what evaluation
//! iterates over (SeqTR and DeRIS evaluation items already hold one sentence each; ReLA's loader,
//! from which the DeRIS gRefCOCO file was made, emits one record per sentence in ref order).
//!
//! Ground truth is built on demand at the decoded image's size, as the reference does
//! ([`Sample::gt_mask`], [`Sample::target_masks`], [`Sample::gt_boxes_xyxy`]).
//! [`mini`] writes a tiny dataset in each layout, for tests and demos.

pub mod mini;
pub mod nsc;
pub mod readers;
pub mod rng;
pub mod synth;

use std::path::{Path, PathBuf};

use deris_coco::{CocoError, Rle};

/// Errors from reading annotations or building ground truth; each names the file and the sample.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read or written.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },

    /// A file that is not the JSON or pickle its layout needs.
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },

    /// The requested split is not in the file.
    #[error("{}: no split '{split}'; available: {}", path.display(), if available.is_empty() { "none".to_string() } else { available.join(", ") })]
    MissingSplit { path: PathBuf, split: String, available: Vec<String> },

    /// One sample (item, ref or annotation) is malformed or inconsistent.
    #[error("{}: {sample}: {reason}", path.display())]
    Annotation { path: PathBuf, sample: String, reason: String },

    /// A sample's masks cannot be built (pycocotools would fail too, or sizes disagree).
    #[error("{sample}: {source}")]
    Mask { sample: String, source: CocoError },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// The annotation layouts [`AnnotationSource`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// SeqTR/DeRIS mixed-seg JSON: `{split: [item]}`, one referred object per item.
    SeqtrMixedSeg,
    /// DeRIS gRefCOCO JSON: `{split: [item]}`, items with an `annotations` list.
    DerisGrefs,
    /// refer's `refs(unc).p` pickle + COCO `instances.json`.
    ReferPickle,
    /// ReLA's `grefs(unc).json` + COCO `instances.json`.
    RelaGrefs,
}

impl Layout {
    /// Layouts whose samples can have 0 or several targets (gRefCOCO).
    pub fn is_generalized(self) -> bool {
        matches!(self, Self::DerisGrefs | Self::RelaGrefs)
    }
}

/// A target's mask as the annotation gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Segmentation {
    /// COCO polygons `[[x1, y1, x2, y2, …], …]` in pixels of the original image.
    Polygons(Vec<Vec<f64>>),
    /// An RLE mask (its size must be the image's).
    Rle(Rle),
}

/// One referred object.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// COCO annotation id (`None` where the file has none: SeqTR items without `id`).
    pub ann_id: Option<i64>,
    /// `[x, y, w, h]` in pixels of the original image, when the file gives it.
    pub bbox: Option<[f64; 4]>,
    pub segmentation: Segmentation,
}

/// One object of an image as COCO's `instances.json` lists it (training's perception targets).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageObject {
    pub target: Target,
    /// COCO `category_id`, when the file gives one.
    pub category_id: Option<u64>,
}

/// Every object of each image, by image id
/// ([`readers::coco::Instances::objects_by_image`]): training's perception targets and the
/// evaluation's diagnosis.
pub type ObjectIndex = std::collections::HashMap<u64, Vec<ImageObject>>;

/// One sample: an image, its sentence(s) and 0..n targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Where it comes from, for messages: split, position and ids (`val item 12 (image 581857, ref 40)`).
    pub label: String,
    pub image_id: u64,
    /// Image file (image root joined with the layout's file name).
    pub image_path: PathBuf,
    /// `(h, w)` of the image as the annotation file states it, if it does. Ground truth is built
    /// at the decoded image's size, as in the reference.
    pub image_size: Option<(u32, u32)>,
    /// The raw (uncleaned) sentences; at least one.
    pub expressions: Vec<String>,
    /// Sentence ids, parallel to `expressions` when the file has them, else empty.
    pub sent_ids: Vec<i64>,
    pub ref_id: Option<i64>,
    /// The referred objects, in file order; empty for a no-target sample.
    pub targets: Vec<Target>,
}

impl Sample {
    /// No referred object (gRefCOCO no-target sample).
    pub fn no_target(&self) -> bool {
        self.targets.is_empty()
    }

    /// The union ground truth at `h`×`w` (the decoded image size), as DeRIS builds `gt_mask_rle`:
    /// the polygons of all targets, concatenated in order, go through one `frPyObjects` and are
    /// merged; RLE targets are merged in. A no-target sample gives an empty mask. Fails where
    /// pycocotools would (e.g. a first polygon of 4 coordinates) and when an RLE's size is not
    /// `h`×`w`.
    pub fn gt_mask(&self, h: u32, w: u32) -> Result<Rle> {
        let mut polygons: Vec<&[f64]> = Vec::new();
        let mut rles: Vec<Rle> = Vec::new();
        for t in &self.targets {
            match &t.segmentation {
                Segmentation::Polygons(p) => polygons.extend(p.iter().map(Vec::as_slice)),
                Segmentation::Rle(r) => rles.push(self.checked_rle(r, h, w)?),
            }
        }
        if !polygons.is_empty() {
            rles.extend(deris_coco::fr_polygons(&polygons, h, w).map_err(|e| self.mask_error(e))?);
        }
        if rles.is_empty() {
            return Rle::zeros(h, w).map_err(|e| self.mask_error(e));
        }
        Rle::merge(&rles).map_err(|e| self.mask_error(e))
    }

    /// One mask per target at `h`×`w` (DeRIS `gt_mask_parts_rle` before resizing), in target order.
    pub fn target_masks(&self, h: u32, w: u32) -> Result<Vec<Rle>> {
        self.masks_of(&self.targets, h, w)
    }

    /// One mask per object of `objects` (annotations of this sample's image, e.g. every object
    /// of it for training's perception targets) at `h`×`w`, errors naming this sample.
    pub fn masks_of<'a>(&self, objects: impl IntoIterator<Item = &'a Target>, h: u32, w: u32) -> Result<Vec<Rle>> {
        objects
            .into_iter()
            .map(|t| match &t.segmentation {
                Segmentation::Polygons(p) => deris_coco::fr_polygons(p, h, w).and_then(|r| Rle::merge(&r)).map_err(|e| self.mask_error(e)),
                Segmentation::Rle(r) => self.checked_rle(r, h, w),
            })
            .collect()
    }

    /// Target boxes as `[x1, y1, x2, y2] = [x, y, x + w, y + h]`, x clipped to `[0, w − 1]` and y
    /// to `[0, h − 1]` of the image (TRAIN-EVAL-SPEC §3.4), for targets that have a box.
    pub fn gt_boxes_xyxy(&self, h: u32, w: u32) -> Vec<[f64; 4]> {
        let (xmax, ymax) = (f64::from(w) - 1.0, f64::from(h) - 1.0);
        self.targets
            .iter()
            .filter_map(|t| t.bbox)
            .map(|[x, y, bw, bh]| [x.clamp(0.0, xmax), y.clamp(0.0, ymax), (x + bw).clamp(0.0, xmax), (y + bh).clamp(0.0, ymax)])
            .collect()
    }

    /// One sample per sentence (labels get ` sentence k` when there are several).
    pub fn per_sentence(&self) -> Vec<Sample> {
        if self.expressions.len() == 1 {
            return vec![self.clone()];
        }
        self.expressions
            .iter()
            .enumerate()
            .map(|(k, e)| Sample {
                label: format!("{} sentence {k}", self.label),
                expressions: vec![e.clone()],
                sent_ids: self.sent_ids.get(k).map(|&s| vec![s]).unwrap_or_default(),
                ..self.clone()
            })
            .collect()
    }

    fn checked_rle(&self, r: &Rle, h: u32, w: u32) -> Result<Rle> {
        if r.size() != (h, w) {
            return Err(self.mask_error(CocoError::SizeMismatch { a_h: r.h(), a_w: r.w(), b_h: h, b_w: w }));
        }
        Ok(r.clone())
    }

    fn mask_error(&self, source: CocoError) -> DataError {
        DataError::Mask { sample: self.label.clone(), source }
    }
}

/// The samples of one split of one annotation file.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub layout: Layout,
    pub annotations: PathBuf,
    pub name: String,
    pub samples: Vec<Sample>,
}

impl Split {
    /// One sample per sentence, in order (see the module docs).
    pub fn per_sentence(self) -> Split {
        let samples = self.samples.iter().flat_map(Sample::per_sentence).collect();
        Split { samples, ..self }
    }

    /// Indices of the samples whose image file does not exist.
    pub fn missing_images(&self) -> Vec<usize> {
        self.samples.iter().enumerate().filter(|(_, s)| !s.image_path.is_file()).map(|(i, _)| i).collect()
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// Where a dataset's annotations and images are.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnotationSource {
    /// The annotation file: the SeqTR or DeRIS JSON, `refs(unc).p` or `grefs(unc).json`.
    pub annotations: PathBuf,
    /// Folder of the image files.
    pub image_root: PathBuf,
    /// The layout; `None` detects it (`.p`/`.pkl` → refer pickle, a top-level JSON list → ReLA,
    /// else SeqTR or DeRIS by whether items carry `annotations`).
    pub layout: Option<Layout>,
    /// COCO `instances.json` for the refer and ReLA layouts; `None` = `instances.json` beside the
    /// annotation file.
    pub instances: Option<PathBuf>,
}

impl AnnotationSource {
    pub fn new(annotations: impl Into<PathBuf>, image_root: impl Into<PathBuf>) -> Self {
        Self { annotations: annotations.into(), image_root: image_root.into(), layout: None, instances: None }
    }

    pub fn with_layout(mut self, layout: Layout) -> Self {
        self.layout = Some(layout);
        self
    }

    pub fn with_instances(mut self, instances: impl Into<PathBuf>) -> Self {
        self.instances = Some(instances.into());
        self
    }

    /// The COCO instances file the refer/ReLA layouts use.
    pub fn instances_path(&self) -> PathBuf {
        self.instances.clone().unwrap_or_else(|| self.annotations.with_file_name("instances.json"))
    }

    /// Reads one split. A split that is not in the file fails listing those that are.
    pub fn read_split(&self, split: &str) -> Result<Split> {
        let file = readers::AnnotationFile::open(self)?;
        let samples = file.read_split(split)?;
        Ok(Split { layout: file.layout(), annotations: self.annotations.clone(), name: split.to_string(), samples })
    }

    /// The split names in the file (sorted for the JSON layouts, in order of appearance for refs).
    pub fn splits(&self) -> Result<Vec<String>> {
        readers::AnnotationFile::open(self)?.splits()
    }
}

/// `COCO_train2014_<id:012>.jpg`, the image name of the SeqTR and DeRIS layouts.
pub fn coco_train2014_name(image_id: u64) -> String {
    format!("COCO_train2014_{image_id:012}.jpg")
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io { path: path.to_path_buf(), err: source }
}
