//! A miniature dataset in each annotation layout, written to a folder: a few small PNG images and
//! the annotation files, all describing the same referring expressions. Tests (and `deris eval`
//! end to end) read it back without COCO.
//!
//! Content: three images and eight COCO annotations (polygons, a multi-polygon object, an RLE
//! object, a crowd object, polygons ReLA filters out). The RefCOCO-style layouts (SeqTR JSON,
//! refer pickle) hold four single-target refs; the gRefCOCO layouts (DeRIS JSON, ReLA JSON) hold
//! five refs with one, two and no targets. Splits: `train`, `val`, `testA` (the SeqTR file names
//! its evaluation splits `val_refcoco_unc` and `testA_refcoco_unc`, as the real one does).
//!
//! Images are PNG data under COCO's `COCO_train2014_<id:012>.jpg` names (decoders sniff the
//! format), so that pixels are exact.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use deris_coco::Rle;
use image::{ImageFormat, RgbImage};
use serde_json::{json, Value};

use super::{coco_train2014_name, io_error, AnnotationSource, DataError, Layout, Result};

/// `(image_id, h, w)`.
const IMAGES: [(u64, u32, u32); 3] = [(101, 48, 64), (202, 40, 40), (303, 36, 50)];

/// A COCO annotation of the mini dataset.
struct Ann {
    id: i64,
    image_id: u64,
    bbox: [f64; 4],
    shape: Shape,
    crowd: bool,
}

enum Shape {
    Polygons(&'static [&'static [f64]]),
    /// Half-open `[y0, x0, y1, x1]` rectangle, stored as an RLE (compressed, or plain counts for crowd).
    Rect([u32; 4]),
}

const ANNS: [Ann; 7] = [
    Ann { id: 1001, image_id: 101, bbox: [8.0, 8.0, 22.0, 22.0], shape: Shape::Polygons(&[&[8.0, 8.0, 30.0, 8.0, 30.0, 30.0, 8.0, 30.0]]), crowd: false },
    Ann {
        id: 1002,
        image_id: 101,
        bbox: [35.0, 10.0, 25.0, 35.0],
        shape: Shape::Polygons(&[&[40.0, 10.0, 60.0, 10.0, 50.0, 40.0], &[35.0, 35.0, 45.0, 35.0, 45.0, 45.0, 35.0, 45.0]]),
        crowd: false,
    },
    Ann { id: 2001, image_id: 202, bbox: [5.0, 5.0, 30.0, 15.0], shape: Shape::Polygons(&[&[5.0, 5.0, 35.0, 5.0, 35.0, 20.0, 5.0, 20.0]]), crowd: false },
    Ann { id: 2002, image_id: 202, bbox: [10.0, 25.0, 20.0, 10.0], shape: Shape::Rect([25, 10, 35, 30]), crowd: false },
    Ann { id: 2003, image_id: 202, bbox: [0.0, 36.0, 40.0, 4.0], shape: Shape::Rect([36, 0, 40, 40]), crowd: true },
    // The 4-coordinate polygon rasterises to nothing in pycocotools and is dropped by ReLA.
    Ann {
        id: 3001,
        image_id: 303,
        bbox: [2.0, 2.0, 43.0, 28.0],
        shape: Shape::Polygons(&[&[2.0, 2.0, 20.0, 2.0, 20.0, 30.0, 2.0, 30.0], &[25.0, 5.0, 45.0, 5.0, 45.0, 15.0], &[30.0, 20.0, 40.0, 30.0]]),
        crowd: false,
    },
    // An odd coordinate count: ReLA drops this polygon and so the whole object.
    Ann { id: 3002, image_id: 303, bbox: [30.0, 20.0, 10.0, 10.0], shape: Shape::Polygons(&[&[30.0, 20.0, 40.0, 20.0, 40.0, 30.0, 30.0]]), crowd: false },
];

/// A ref of the mini dataset: `(ref_id, image_id, ann_ids ([-1] = none), split, sentences)`.
type MiniRef = (i64, u64, &'static [i64], &'static str, &'static [&'static str]);

/// RefCOCO-style refs (one target each).
const RIS_REFS: [MiniRef; 4] = [
    (1, 101, &[1001], "train", &["the left square", "a square on the left"]),
    (2, 101, &[1002], "val", &["right triangle"]),
    (3, 202, &[2002], "val", &["bottom bar", "Lower bar!"]),
    (4, 303, &[3001], "testA", &["big box"]),
];

/// gRefCOCO-style refs (0..n targets).
const GRES_REFS: [MiniRef; 6] = [
    (11, 101, &[1001, 1002], "val", &["both shapes"]),
    (12, 202, &[-1], "val", &["the purple elephant", "a unicorn"]),
    (13, 202, &[2001, 2003], "val", &["top bar"]),
    (14, 303, &[3001], "train", &["the box"]),
    (15, 101, &[1001], "testA", &["square"]),
    (16, 303, &[3002], "testA", &["small thing"]),
];

/// One sentence of the mini dataset as every reader must return it after
/// [`super::Split::per_sentence`].
#[derive(Debug, Clone, PartialEq)]
pub struct ExpectedSample {
    pub image_id: u64,
    pub expression: String,
    /// Annotation ids of the targets, in order (empty = no target).
    pub ann_ids: Vec<i64>,
}

/// A written mini dataset.
#[derive(Debug, Clone)]
pub struct MiniDataset {
    pub layout: Layout,
    /// Where to read it (layout set).
    pub source: AnnotationSource,
    /// The split names as the layout spells them, in the order train, val, testA.
    pub splits: Vec<String>,
}

impl MiniDataset {
    /// The samples a reader must give for `split` (as the layout spells it), one per sentence.
    pub fn expected(&self, split: &str) -> Vec<ExpectedSample> {
        let generic = match self.layout {
            Layout::SeqtrMixedSeg => split.strip_suffix("_refcoco_unc").unwrap_or(split),
            _ => split,
        };
        let refs: &[MiniRef] = if self.layout.is_generalized() { &GRES_REFS } else { &RIS_REFS };
        refs.iter()
            .filter(|r| r.3 == generic)
            .flat_map(|&(_, image_id, ann_ids, _, sentences)| {
                let kept: Vec<i64> = ann_ids.iter().copied().filter(|&id| kept_target(self.layout, id)).collect();
                sentences.iter().map(move |s| ExpectedSample { image_id, expression: s.to_string(), ann_ids: kept.clone() })
            })
            .collect()
    }

    /// The polygons or RLE of an annotation of the dataset, at its image's size (for checks).
    pub fn annotation_mask(ann_id: i64) -> Option<Rle> {
        let ann = ANNS.iter().find(|a| a.id == ann_id)?;
        let (h, w) = image_size(ann.image_id);
        ann_rle(ann, h, w).ok()
    }
}

/// Whether a referred annotation stays a target in `layout` (ReLA's conversion drops crowd
/// objects and objects left without a valid polygon; `-1` is the no-target marker).
fn kept_target(layout: Layout, id: i64) -> bool {
    let Some(ann) = ANNS.iter().find(|a| a.id == id) else { return false };
    if !layout.is_generalized() {
        return true;
    }
    !ann.crowd && rela_polygons(ann).is_none_or(|p| !p.is_empty())
}

/// The polygons ReLA keeps (`None` for an RLE object).
fn rela_polygons(ann: &Ann) -> Option<Vec<&'static [f64]>> {
    match ann.shape {
        Shape::Polygons(p) => Some(p.iter().copied().filter(|poly| poly.len() % 2 == 0 && poly.len() >= 6).collect()),
        Shape::Rect(_) => None,
    }
}

fn image_size(image_id: u64) -> (u32, u32) {
    IMAGES.iter().find(|i| i.0 == image_id).map(|&(_, h, w)| (h, w)).unwrap_or((1, 1))
}

fn rect_mask(r: [u32; 4], h: u32, w: u32) -> Vec<u8> {
    let mut m = vec![0u8; (h * w) as usize];
    for y in r[0]..r[2].min(h) {
        for x in r[1]..r[3].min(w) {
            m[(y * w + x) as usize] = 1;
        }
    }
    m
}

fn ann_rle(ann: &Ann, h: u32, w: u32) -> std::result::Result<Rle, deris_coco::CocoError> {
    match ann.shape {
        Shape::Polygons(p) => Rle::merge(&deris_coco::fr_polygons(p, h, w)?),
        Shape::Rect(r) => Rle::from_rowmajor(&rect_mask(r, h, w), h, w),
    }
}

/// The COCO `segmentation` JSON of an annotation.
fn segmentation_json(ann: &Ann, h: u32, w: u32) -> Value {
    match ann.shape {
        Shape::Polygons(p) => json!(p),
        Shape::Rect(r) => {
            let rle = Rle::from_rowmajor(&rect_mask(r, h, w), h, w).ok();
            match (rle, ann.crowd) {
                (Some(rle), true) => json!({"size": [h, w], "counts": rle.counts()}),
                (Some(rle), false) => json!({"size": [h, w], "counts": rle.to_counts_string()}),
                (None, _) => Value::Null,
            }
        }
    }
}

/// Writes the mini dataset in `layout` under `dir` (created if needed): `images/` and the
/// annotation file(s).
pub fn write(dir: &Path, layout: Layout) -> Result<MiniDataset> {
    let images = dir.join("images");
    create_dir(&images)?;
    for &(id, h, w) in &IMAGES {
        write_file(&images.join(coco_train2014_name(id)), &png(id, h, w)?)?;
    }
    let (annotations, splits) = match layout {
        Layout::SeqtrMixedSeg => {
            let path = dir.join("mixed-seg").join("instances_nogoogle_withid.json");
            write_file(&path, seqtr_json().to_string().as_bytes())?;
            (path, vec!["train".into(), "val_refcoco_unc".into(), "testA_refcoco_unc".into()])
        }
        Layout::DerisGrefs => {
            let path = dir.join("grefs").join("instances.json");
            write_file(&path, deris_grefs_json().to_string().as_bytes())?;
            (path, vec!["train".into(), "val".into(), "testA".into()])
        }
        Layout::ReferPickle => {
            let folder = dir.join("refcoco");
            write_file(&folder.join("instances.json"), instances_json().to_string().as_bytes())?;
            let path = folder.join("refs(unc).p");
            write_file(&path, &refer_pickle())?;
            (path, vec!["train".into(), "val".into(), "testA".into()])
        }
        Layout::RelaGrefs => {
            let folder = dir.join("grefcoco");
            write_file(&folder.join("instances.json"), instances_json().to_string().as_bytes())?;
            let path = folder.join("grefs(unc).json");
            write_file(&path, rela_json().to_string().as_bytes())?;
            (path, vec!["train".into(), "val".into(), "testA".into()])
        }
    };
    Ok(MiniDataset { layout, source: AnnotationSource::new(annotations, images).with_layout(layout), splits })
}

fn create_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| io_error(p, e))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        create_dir(parent)?;
    }
    std::fs::write(path, bytes).map_err(|e| io_error(path, e))
}

/// A PNG of `h`×`w`: a gradient background with each annotation's mask painted in its own colour.
fn png(image_id: u64, h: u32, w: u32) -> Result<Vec<u8>> {
    let mut img = RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 96]));
    for (k, ann) in ANNS.iter().enumerate().filter(|(_, a)| a.image_id == image_id) {
        if let Ok(rle) = ann_rle(ann, h, w) {
            let k = k as u8;
            let colour = image::Rgb([k.wrapping_mul(40).wrapping_add(30), 200, k.wrapping_mul(70).wrapping_add(10)]);
            for (i, &v) in rle.to_rowmajor().iter().enumerate() {
                if v != 0 {
                    img.put_pixel(i as u32 % w, i as u32 / w, colour);
                }
            }
        }
    }
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
        .map_err(|e| DataError::Format { path: PathBuf::from(coco_train2014_name(image_id)), reason: format!("encoding PNG: {e}") })?;
    Ok(bytes)
}

fn find_ann(id: i64) -> Option<&'static Ann> {
    ANNS.iter().find(|a| a.id == id)
}

/// SeqTR's file: train items hold all sentences of a ref, evaluation items one sentence each.
fn seqtr_json() -> Value {
    let mut splits = serde_json::Map::new();
    for &(_, image_id, ann_ids, split, sentences) in &RIS_REFS {
        let Some(ann) = ann_ids.first().copied().and_then(find_ann) else { continue };
        let (h, w) = image_size(image_id);
        let item = |expressions: Vec<&str>| {
            json!({"image_id": image_id, "expressions": expressions, "bbox": ann.bbox, "mask": segmentation_json(ann, h, w),
                   "id": ann.id, "category_id": 1, "height": h, "width": w})
        };
        let (key, items) = if split == "train" {
            (split.to_string(), vec![item(sentences.to_vec())])
        } else {
            (format!("{split}_refcoco_unc"), sentences.iter().map(|s| item(vec![s])).collect())
        };
        if let Value::Array(list) = splits.entry(key).or_insert_with(|| json!([])) {
            list.extend(items);
        }
    }
    Value::Object(splits)
}

/// DeRIS' gRefCOCO file: ReLA's records (one per sentence), re-keyed, with the COCO id.
fn deris_grefs_json() -> Value {
    let mut splits = serde_json::Map::new();
    for &(ref_id, image_id, ann_ids, split, sentences) in &GRES_REFS {
        let (h, w) = image_size(image_id);
        let kept: Vec<&Ann> = ann_ids.iter().filter(|&&id| kept_target(Layout::DerisGrefs, id)).filter_map(|&id| find_ann(id)).collect();
        let annotations: Vec<Value> = if ann_ids == [-1] {
            vec![json!({"iscrowd": null, "bbox": null, "category_id": null, "id": -1, "bbox_mode": 1, "empty": true})]
        } else {
            kept.iter()
                .map(|a| {
                    let seg = rela_polygons(a).map_or_else(|| segmentation_json(a, h, w), |p| json!(p));
                    json!({"iscrowd": 0, "bbox": a.bbox, "category_id": 1, "bbox_mode": 1, "empty": false, "segmentation": seg, "id": a.id})
                })
                .collect()
        };
        let items = sentences.iter().enumerate().map(|(k, s)| {
            json!({"image_id": image_id, "height": h, "width": w, "source": "grefcoco",
                   "expressions": {"raw": s, "sent_id": ref_id * 10 + k as i64, "ref_id": ref_id}, "annotations": annotations})
        });
        if let Value::Array(list) = splits.entry(split.to_string()).or_insert_with(|| json!([])) {
            list.extend(items);
        }
    }
    Value::Object(splits)
}

/// COCO `instances.json` of the refer and ReLA layouts.
fn instances_json() -> Value {
    let images: Vec<Value> =
        IMAGES.iter().map(|&(id, h, w)| json!({"id": id, "file_name": coco_train2014_name(id), "height": h, "width": w})).collect();
    let annotations: Vec<Value> = ANNS
        .iter()
        .map(|a| {
            let (h, w) = image_size(a.image_id);
            json!({"id": a.id, "image_id": a.image_id, "category_id": 1, "iscrowd": u8::from(a.crowd), "area": 0.0,
                   "bbox": a.bbox, "segmentation": segmentation_json(a, h, w)})
        })
        .collect();
    json!({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "shape", "supercategory": "thing"}]})
}

fn sentences_json(ref_id: i64, sentences: &[&str]) -> Vec<Value> {
    sentences
        .iter()
        .enumerate()
        .map(|(k, s)| json!({"raw": s, "sent": s.to_lowercase(), "sent_id": ref_id * 10 + k as i64, "tokens": s.split_whitespace().collect::<Vec<_>>()}))
        .collect()
}

/// ReLA's `grefs(unc).json`.
fn rela_json() -> Value {
    let refs: Vec<Value> = GRES_REFS
        .iter()
        .map(|&(ref_id, image_id, ann_ids, split, sentences)| {
            json!({"ref_id": ref_id, "image_id": image_id, "ann_id": ann_ids, "split": split, "category_id": [1],
                   "file_name": format!("COCO_train2014_{image_id:012}_{ref_id}.jpg"),
                   "sent_ids": (0..sentences.len() as i64).map(|k| ref_id * 10 + k).collect::<Vec<_>>(),
                   "sentences": sentences_json(ref_id, sentences)})
        })
        .collect();
    Value::Array(refs)
}

/// refer's `refs(unc).p`, pickled as Python 2 does (protocol 2, `str` as byte strings).
fn refer_pickle() -> Vec<u8> {
    let refs: Vec<Py> = RIS_REFS
        .iter()
        .map(|&(ref_id, image_id, ann_ids, split, sentences)| {
            let sent_ids = (0..sentences.len() as i64).map(|k| Py::Int(ref_id * 10 + k)).collect();
            let sentences = sentences
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    Py::Dict(vec![
                        ("tokens", Py::List(s.split_whitespace().map(|t| Py::Str(t.to_string())).collect())),
                        ("raw", Py::Str(s.to_string())),
                        ("sent_id", Py::Int(ref_id * 10 + k as i64)),
                        ("sent", Py::Str(s.to_lowercase())),
                    ])
                })
                .collect();
            Py::Dict(vec![
                ("sent_ids", Py::List(sent_ids)),
                ("file_name", Py::Str(format!("COCO_train2014_{image_id:012}_{ref_id}.jpg"))),
                ("ann_id", Py::Int(ann_ids.first().copied().unwrap_or(-1))),
                ("ref_id", Py::Int(ref_id)),
                ("image_id", Py::Int(image_id as i64)),
                ("split", Py::Str(split.to_string())),
                ("sentences", Py::List(sentences)),
                ("category_id", Py::Int(1)),
            ])
        })
        .collect();
    let mut out = vec![0x80, 2];
    Py::List(refs).write(&mut out);
    out.push(b'.');
    out
}

/// The Python values a refer pickle holds.
enum Py {
    Int(i64),
    Str(String),
    List(Vec<Py>),
    Dict(Vec<(&'static str, Py)>),
}

impl Py {
    /// Protocol-2 opcodes: `K`/`J` ints, `U`/`T` byte strings (Python 2 `str`), `]`/`}` with
    /// `(` … `e`/`u` for containers.
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Py::Int(v) => match u8::try_from(*v) {
                Ok(b) => out.extend([b'K', b]),
                Err(_) => {
                    out.push(b'J');
                    out.extend((*v as i32).to_le_bytes());
                }
            },
            Py::Str(s) => write_str(s, out),
            Py::List(items) => {
                out.push(b']');
                if !items.is_empty() {
                    out.push(b'(');
                    items.iter().for_each(|i| i.write(out));
                    out.push(b'e');
                }
            }
            Py::Dict(entries) => {
                out.push(b'}');
                if !entries.is_empty() {
                    out.push(b'(');
                    for (k, v) in entries {
                        write_str(k, out);
                        v.write(out);
                    }
                    out.push(b'u');
                }
            }
        }
    }
}

fn write_str(s: &str, out: &mut Vec<u8>) {
    match u8::try_from(s.len()) {
        Ok(n) => out.extend([b'U', n]),
        Err(_) => {
            out.push(b'T');
            out.extend((s.len() as u32).to_le_bytes());
        }
    }
    out.extend(s.as_bytes());
}
