//! One reader per annotation layout, plus what they share: the COCO segmentation JSON, the
//! `{split: [item]}` files and the COCO `instances.json` of the refer and ReLA layouts.
//!
//! Every error names the file and the item (split and position, or ref id).

pub mod coco;
pub mod grefs;
pub mod refer;
pub mod rela;
pub mod seqtr;

use std::collections::BTreeMap;
use std::path::Path;

use deris_coco::Rle;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{io_error, AnnotationSource, DataError, Layout, Result, Sample, Segmentation};

/// A COCO `segmentation`: polygons, or an RLE with compressed or plain counts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum SegmentationJson {
    Polygons(Vec<Vec<f64>>),
    Rle { size: [u32; 2], counts: CountsJson },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum CountsJson {
    Compressed(String),
    Runs(Vec<u32>),
}

impl SegmentationJson {
    /// Polygons as they are; an RLE decoded and checked (plain counts are pycocotools'
    /// `frUncompressedRLE`).
    pub(crate) fn to_segmentation(&self) -> std::result::Result<Segmentation, String> {
        match self {
            Self::Polygons(p) => Ok(Segmentation::Polygons(p.clone())),
            Self::Rle { size: [h, w], counts } => {
                let rle = match counts {
                    CountsJson::Compressed(s) => Rle::from_counts_string(s, *h, *w),
                    CountsJson::Runs(r) => Rle::from_counts(*h, *w, r.clone()),
                };
                rle.map(Segmentation::Rle).map_err(|e| format!("RLE segmentation: {e}"))
            }
        }
    }

    /// No polygon at all (an empty list).
    pub(crate) fn is_empty(&self) -> bool {
        matches!(self, Self::Polygons(p) if p.is_empty())
    }
}

/// Reads a whole file.
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io_error(path, e))
}

/// Reads a whole file as UTF-8 text.
pub(crate) fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?).map_err(|e| DataError::Format { path: path.to_path_buf(), reason: format!("not UTF-8 text: {e}") })
}

/// Parses JSON text, naming the file on failure.
pub(crate) fn parse_json<'a, T: Deserialize<'a>>(path: &Path, text: &'a str, what: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| DataError::Format { path: path.to_path_buf(), reason: format!("invalid {what}: {e}") })
}

/// Parses one item of a list, naming the item on failure.
pub(crate) fn parse_item<T: DeserializeOwned>(path: &Path, label: &str, raw: &RawValue) -> Result<T> {
    serde_json::from_str(raw.get()).map_err(|e| annotation(path, label, e.to_string()))
}

pub(crate) fn annotation(path: &Path, sample: &str, reason: impl Into<String>) -> DataError {
    DataError::Annotation { path: path.to_path_buf(), sample: sample.to_string(), reason: reason.into() }
}

/// The items of `split` in a `{split: [item]}` file.
pub(crate) fn split_items<'a>(path: &Path, text: &'a str, split: &str) -> Result<Vec<&'a RawValue>> {
    let splits: BTreeMap<String, &'a RawValue> = parse_json(path, text, "JSON object of splits")?;
    let raw = splits.get(split).ok_or_else(|| DataError::MissingSplit {
        path: path.to_path_buf(),
        split: split.to_string(),
        available: splits.keys().cloned().collect(),
    })?;
    parse_json(path, raw.get(), &format!("split '{split}' (not a list of items)"))
}

/// A JSON value that Python would take as true (`iscrowd`, `empty`).
pub(crate) fn truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        serde_json::Value::String(s) => !s.is_empty(),
        serde_json::Value::Array(a) => !a.is_empty(),
        serde_json::Value::Object(o) => !o.is_empty(),
        serde_json::Value::Null => false,
    }
}

/// The layout of an annotation file, from its name or its content.
fn detect(path: &Path, bytes: &[u8]) -> Result<Layout> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if matches!(ext, "p" | "pkl" | "pickle") {
        return Ok(Layout::ReferPickle);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DataError::Format { path: path.to_path_buf(), reason: format!("not UTF-8 JSON: {e}") })?;
    match text.trim_start().as_bytes().first() {
        Some(b'[') => Ok(Layout::RelaGrefs),
        Some(b'{') => {
            // DeRIS gRefCOCO items carry `annotations`; SeqTR items carry `mask`.
            let splits: BTreeMap<String, &RawValue> = parse_json(path, text, "JSON object of splits")?;
            for raw in splits.values() {
                let items: Vec<BTreeMap<String, &RawValue>> = parse_json(path, raw.get(), "split (not a list of objects)")?;
                if let Some(first) = items.first() {
                    return Ok(if first.contains_key("annotations") { Layout::DerisGrefs } else { Layout::SeqtrMixedSeg });
                }
            }
            Ok(Layout::SeqtrMixedSeg)
        }
        _ => Err(DataError::Format { path: path.to_path_buf(), reason: "neither a pickle (.p) nor JSON; cannot tell its layout".into() }),
    }
}

/// A read annotation file: its layout and content, ready to give splits.
pub(crate) struct AnnotationFile<'s> {
    source: &'s AnnotationSource,
    layout: Layout,
    bytes: Vec<u8>,
}

impl<'s> AnnotationFile<'s> {
    pub(crate) fn open(source: &'s AnnotationSource) -> Result<Self> {
        let bytes = read_file(&source.annotations)?;
        let layout = match source.layout {
            Some(l) => l,
            None => detect(&source.annotations, &bytes)?,
        };
        Ok(Self { source, layout, bytes })
    }

    pub(crate) fn layout(&self) -> Layout {
        self.layout
    }

    fn text(&self) -> Result<&str> {
        std::str::from_utf8(&self.bytes).map_err(|e| DataError::Format { path: self.source.annotations.clone(), reason: format!("not UTF-8 JSON: {e}") })
    }

    pub(crate) fn read_split(&self, split: &str) -> Result<Vec<Sample>> {
        let s = self.source;
        match self.layout {
            Layout::SeqtrMixedSeg => seqtr::read_split(&s.annotations, self.text()?, split, &s.image_root),
            Layout::DerisGrefs => grefs::read_split(&s.annotations, self.text()?, split, &s.image_root),
            Layout::ReferPickle => {
                let refs = refer::parse_refs(&s.annotations, &self.bytes)?;
                let instances = coco::Instances::load(&s.instances_path())?;
                refer::read_split(&s.annotations, &refs, &instances, split, &s.image_root)
            }
            Layout::RelaGrefs => {
                let refs = rela::parse_refs(&s.annotations, self.text()?)?;
                let instances = coco::Instances::load(&s.instances_path())?;
                rela::read_split(&s.annotations, &refs, &instances, split, &s.image_root)
            }
        }
    }

    pub(crate) fn splits(&self) -> Result<Vec<String>> {
        let path = &self.source.annotations;
        match self.layout {
            Layout::SeqtrMixedSeg | Layout::DerisGrefs => {
                let splits: BTreeMap<String, &RawValue> = parse_json(path, self.text()?, "JSON object of splits")?;
                Ok(splits.into_keys().collect())
            }
            Layout::ReferPickle => Ok(refer::split_names(&refer::parse_refs(path, &self.bytes)?)),
            Layout::RelaGrefs => Ok(rela::split_names(&rela::parse_refs(path, self.text()?)?)),
        }
    }
}

/// Split names in order of first appearance.
pub(crate) fn names_in_order<'a>(names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in names {
        if !out.iter().any(|o| o == n) {
            out.push(n.to_string());
        }
    }
    out
}
