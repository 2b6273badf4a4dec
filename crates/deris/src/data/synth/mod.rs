//! A synthetic GRES dataset (`deris synth`): scenes of coloured shapes ([`scene`]) with referring
//! expressions that need attributes and relations ([`expr`]), written in the DeRIS gRefCOCO layout
//! that [`crate::data::AnnotationSource`] reads:
//!
//! ```text
//! DIR/images/COCO_train2014_<image id:012>.jpg   PNG data under COCO's names (decoders sniff it)
//! DIR/grefs/instances.json                       {"train": [item], "val": [item]}
//! DIR/grefs/train_dict.json                      the NSC bank: train sentences by image id
//! DIR/coco/instances.json                        COCO instances: every object of every image
//! ```
//!
//! Each image gets `sentences_per_image` items (one sentence each, like the DeRIS file). An item's
//! kind is drawn before its scene is known: single target with probability 0.55, several 0.30, none
//! 0.15 (gRefCOCO-like); an image whose scene cannot give one of its drawn kinds is redrawn.
//! Targets carry their COCO polygon, which is exactly what the picture paints. Items also carry
//! `kind` and `family` (ignored by readers) for per-family analysis. The COCO file lists every
//! object (referred or not) under the same annotation ids, as COCO's `instances.json` does for
//! gRefCOCO: training's optional perception targets (`data.objects`). An object's category is
//! its kind, one of 48 (size, colour, shape): "big red circle" ([`scene::categories`]).
//!
//! Everything is a function of the seed: an image's scene and sentences come from its own random
//! stream `(seed, image id)`, so the same seed writes byte-identical files, and images are made in
//! parallel. Every file is written to a temporary name and renamed.

pub mod expr;
pub mod scene;

use std::path::{Path, PathBuf};

use image::ImageFormat;
use rayon::prelude::*;
use serde_json::{json, Value};

use self::expr::{refer, Kind, Referring};
use self::scene::Scene;
use super::rng::SplitMix64;
use super::{coco_train2014_name, io_error, DataError};

/// Errors of the generator: a bad option, or a file that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("synth option '{option}': {reason}")]
    Option { option: &'static str, reason: String },
    /// No scene in many tries allowed an image's drawn kinds (only with odd proportions or sizes).
    #[error("synthetic image {image_id}: {reason}")]
    Scene { image_id: u64, reason: String },
    #[error(transparent)]
    Data(#[from] DataError),
}

/// Probabilities of the three kinds of item (they need not sum to 1; they are normalised).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Proportions {
    pub single: f64,
    pub multi: f64,
    pub no_target: f64,
}

impl Default for Proportions {
    /// 55% single, 30% several, 15% no target: roughly gRefCOCO's train split.
    fn default() -> Self {
        Self { single: 0.55, multi: 0.30, no_target: 0.15 }
    }
}

impl Proportions {
    fn draw(&self, rng: &mut SplitMix64) -> Kind {
        let u = rng.next_f64() * (self.single + self.multi + self.no_target);
        if u < self.single {
            Kind::Single
        } else if u < self.single + self.multi {
            Kind::Multi
        } else {
            Kind::NoTarget
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub seed: u64,
    /// Images in the `train` split (ids 1..=train_images).
    pub train_images: usize,
    /// Images in the `val` split (the ids after train's).
    pub val_images: usize,
    /// Side of the square images in pixels (≥ 64).
    pub size: u32,
    /// Items (sentences) per image (≥ 1).
    pub sentences_per_image: usize,
    pub proportions: Proportions,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { seed: 0, train_images: 1000, val_images: 100, size: 128, sentences_per_image: 3, proportions: Proportions::default() }
    }
}

impl SynthConfig {
    fn validate(&self) -> Result<(), SynthError> {
        let bad = |option, reason: &str| Err(SynthError::Option { option, reason: reason.to_string() });
        let p = self.proportions;
        if !(64..=4096).contains(&self.size) {
            return bad("size", "must be 64..=4096 pixels");
        }
        if self.sentences_per_image == 0 {
            return bad("sentences_per_image", "must be at least 1");
        }
        if [p.single, p.multi, p.no_target].iter().any(|x| !x.is_finite() || *x < 0.0) || p.single + p.multi + p.no_target <= 0.0 {
            return bad("proportions", "must be finite, non-negative and not all zero");
        }
        Ok(())
    }
}

/// One generated image: its scene and its sentences.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthImage {
    pub image_id: u64,
    pub scene: Scene,
    pub sentences: Vec<Referring>,
}

/// Separates the generator's random streams from any other user of the same seed.
const SYNTH_STREAM: u64 = u64::from_le_bytes(*b"DeRISsyn");

/// Scenes tried for one image before giving up (a scene almost always allows every kind).
const MAX_SCENES: usize = 1000;

/// The scene and sentences of image `image_id`: a pure function of its arguments.
pub fn image(cfg: &SynthConfig, image_id: u64) -> Result<SynthImage, SynthError> {
    cfg.validate()?;
    let mut rng = SplitMix64::from_key(&[SYNTH_STREAM, cfg.seed, image_id]);
    let kinds: Vec<Kind> = (0..cfg.sentences_per_image).map(|_| cfg.proportions.draw(&mut rng)).collect();
    for _ in 0..MAX_SCENES {
        let scene = Scene::random(&mut rng, cfg.size);
        let mut sentences: Vec<Referring> = Vec::new();
        for &kind in &kinds {
            // A few tries for a sentence the image does not have yet.
            let mut fresh = None;
            for _ in 0..8 {
                fresh = refer(&scene, kind, &mut rng);
                if fresh.as_ref().is_none_or(|r| sentences.iter().all(|s| s.text != r.text)) {
                    break;
                }
            }
            match fresh {
                Some(r) => sentences.push(r),
                None => break,
            }
        }
        if sentences.len() == kinds.len() {
            return Ok(SynthImage { image_id, scene, sentences });
        }
    }
    Err(SynthError::Scene { image_id, reason: format!("no scene in {MAX_SCENES} tries allows the drawn kinds {kinds:?}") })
}

/// Counts of one written split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SplitCounts {
    pub images: usize,
    pub items: usize,
    pub single: usize,
    pub multi: usize,
    pub no_target: usize,
}

/// Where a written dataset is, and what it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthDataset {
    /// The DeRIS gRefCOCO JSON.
    pub annotations: PathBuf,
    pub image_root: PathBuf,
    /// The NSC bank.
    pub train_dict: PathBuf,
    /// COCO `instances.json` with every object of every image.
    pub objects: PathBuf,
    pub train: SplitCounts,
    pub val: SplitCounts,
}

impl SynthDataset {
    /// The source to read it with.
    pub fn source(&self) -> super::AnnotationSource {
        super::AnnotationSource::new(&self.annotations, &self.image_root).with_layout(super::Layout::DerisGrefs)
    }
}

/// Generates the dataset of `cfg` under `dir` (created if needed).
pub fn write(dir: &Path, cfg: &SynthConfig) -> Result<SynthDataset, SynthError> {
    cfg.validate()?;
    let image_root = dir.join("images");
    std::fs::create_dir_all(&image_root).map_err(|e| io_error(&image_root, e))?;
    let grefs = dir.join("grefs");
    std::fs::create_dir_all(&grefs).map_err(|e| io_error(&grefs, e))?;

    let ids: Vec<u64> = (1..=(cfg.train_images + cfg.val_images) as u64).collect();
    let images: Vec<SynthImage> = ids
        .par_iter()
        .map(|&id| {
            let img = image(cfg, id)?;
            let path = image_root.join(coco_train2014_name(id));
            write_atomic(&path, &png(&img.scene, &path)?)?;
            Ok(img)
        })
        .collect::<Result<_, SynthError>>()?;
    let (train, val) = images.split_at(cfg.train_images);

    let mut counter = Counter::default();
    let train_items = items(train, &mut counter);
    let val_items = items(val, &mut counter);
    let annotations = grefs.join("instances.json");
    write_atomic(&annotations, json!({"train": train_items.0, "val": val_items.0}).to_string().as_bytes())?;

    let bank: serde_json::Map<String, Value> = train
        .iter()
        .zip(&train_items.1)
        .map(|(img, sentences)| (img.image_id.to_string(), json!({"expressions": sentences})))
        .collect();
    let train_dict = grefs.join("train_dict.json");
    write_atomic(&train_dict, Value::Object(bank).to_string().as_bytes())?;

    let coco = dir.join("coco");
    std::fs::create_dir_all(&coco).map_err(|e| io_error(&coco, e))?;
    let objects = coco.join("instances.json");
    write_atomic(&objects, coco_instances(&images).to_string().as_bytes())?;

    Ok(SynthDataset { annotations, image_root, train_dict, objects, train: counts(train), val: counts(val) })
}

/// Running ids: annotation ids per object, ref and sentence ids per item (all from 1).
#[derive(Default)]
struct Counter {
    ann: i64,
    sentence: i64,
}

/// The items of a split and, per image, its sentence objects (for the bank).
fn items(images: &[SynthImage], counter: &mut Counter) -> (Vec<Value>, Vec<Vec<Value>>) {
    let mut items = Vec::new();
    let mut per_image = Vec::new();
    for img in images {
        let first_ann = counter.ann + 1;
        counter.ann += img.scene.objects.len() as i64;
        let mut sentences = Vec::new();
        for r in &img.sentences {
            counter.sentence += 1;
            let expression = json!({"raw": r.text, "sent_id": counter.sentence, "ref_id": counter.sentence});
            let annotations: Vec<Value> = if r.targets.is_empty() {
                vec![json!({"iscrowd": null, "bbox": null, "category_id": null, "id": -1, "bbox_mode": 1, "empty": true})]
            } else {
                r.targets
                    .iter()
                    .filter_map(|&t| img.scene.objects.get(t).map(|o| (t, o)))
                    .map(|(t, o)| {
                        json!({"id": first_ann + t as i64, "bbox": o.bbox(), "segmentation": [o.polygon], "iscrowd": 0,
                               "category_id": o.category_id(), "bbox_mode": 1, "empty": false})
                    })
                    .collect()
            };
            items.push(json!({"image_id": img.image_id, "height": img.scene.size, "width": img.scene.size, "source": "deris-synth",
                              "kind": r.kind.name(), "family": r.family, "expressions": expression, "annotations": annotations}));
            sentences.push(expression);
        }
        per_image.push(sentences);
    }
    (items, per_image)
}

/// COCO `instances.json` of all the images: `images`, every object as an annotation (the ids
/// [`items`] gives them: numbered from 1 in image order), `categories` (the shapes).
fn coco_instances(images: &[SynthImage]) -> Value {
    let mut ann = 0i64;
    let mut annotations = Vec::new();
    for img in images {
        for o in &img.scene.objects {
            ann += 1;
            annotations.push(json!({"id": ann, "image_id": img.image_id, "category_id": o.category_id(), "segmentation": [o.polygon],
                                    "area": o.polygon_area(), "bbox": o.bbox(), "iscrowd": 0}));
        }
    }
    let image_entries: Vec<Value> = images
        .iter()
        .map(|img| json!({"id": img.image_id, "file_name": coco_train2014_name(img.image_id), "height": img.scene.size, "width": img.scene.size}))
        .collect();
    let categories: Vec<Value> = scene::categories().into_iter().map(|(id, name)| json!({"id": id, "name": name, "supercategory": "shape"})).collect();
    json!({"images": image_entries, "annotations": annotations, "categories": categories})
}

fn counts(images: &[SynthImage]) -> SplitCounts {
    let mut c = SplitCounts { images: images.len(), ..Default::default() };
    for r in images.iter().flat_map(|i| &i.sentences) {
        c.items += 1;
        match r.kind {
            Kind::Single => c.single += 1,
            Kind::Multi => c.multi += 1,
            Kind::NoTarget => c.no_target += 1,
        }
    }
    c
}

fn png(scene: &Scene, path: &Path) -> Result<Vec<u8>, DataError> {
    let img = scene.render().map_err(|source| DataError::Mask { sample: path.display().to_string(), source })?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| DataError::Format { path: path.to_path_buf(), reason: format!("encoding PNG: {e}") })?;
    Ok(bytes)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.part-{}", std::process::id()));
    let written = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| io_error(path, e))
}
