//! ReLA's gRefCOCO layout: `grefs(unc).json`, a JSON list of refs `{ref_id, ann_id: [ids] (or one
//! id), image_id, split, sentences: [{raw, sent_id, …}], …}` with `ann_id: [-1]` for no target,
//! plus COCO `instances.json`.
//!
//! Converted as ReLA's `load_grefcoco_json` does (the loader the DeRIS gRefCOCO JSON was made
//! with): crowd annotations are skipped, polygons with fewer than 3 points or an odd number of
//! coordinates are dropped, and an annotation left without polygons is skipped. One sample per ref
//! with all its sentences (see [`crate::data::Split::per_sentence`]).

use std::path::Path;

use serde::Deserialize;

use super::coco::Instances;
use super::{annotation, names_in_order, parse_item, parse_json};
use crate::data::{DataError, Result, Sample, Target};

/// A ref of `grefs(unc).json`.
#[derive(Debug, Clone, Deserialize)]
pub struct GRef {
    pub ref_id: i64,
    ann_id: AnnIds,
    pub image_id: u64,
    pub split: String,
    pub sentences: Vec<Sentence>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum AnnIds {
    One(i64),
    Many(Vec<i64>),
}

impl GRef {
    /// The referred annotation ids (`[-1]` = no target).
    pub fn ann_ids(&self) -> Vec<i64> {
        match &self.ann_id {
            AnnIds::One(id) => vec![*id],
            AnnIds::Many(ids) => ids.clone(),
        }
    }
}

/// A sentence of a ref.
#[derive(Debug, Clone, Deserialize)]
pub struct Sentence {
    pub raw: String,
    #[serde(default)]
    pub sent_id: Option<i64>,
}

/// Parses the JSON list of refs; a malformed ref is reported with its position.
pub fn parse_refs(path: &Path, text: &str) -> Result<Vec<GRef>> {
    let items: Vec<&serde_json::value::RawValue> = parse_json(path, text, "JSON list of refs")?;
    items.iter().enumerate().map(|(index, raw)| parse_item(path, &format!("refs[{index}]"), raw)).collect()
}

/// The split names, in order of first appearance.
pub fn split_names(refs: &[GRef]) -> Vec<String> {
    names_in_order(refs.iter().map(|r| r.split.as_str()))
}

/// The refs of `split` as samples.
pub fn read_split(path: &Path, refs: &[GRef], instances: &Instances, split: &str, image_root: &Path) -> Result<Vec<Sample>> {
    let selected: Vec<&GRef> = refs.iter().filter(|r| r.split == split).collect();
    if selected.is_empty() {
        return Err(DataError::MissingSplit { path: path.to_path_buf(), split: split.to_string(), available: split_names(refs) });
    }
    selected
        .into_iter()
        .map(|r| {
            let label = format!("{split} ref {} (image {})", r.ref_id, r.image_id);
            if r.sentences.is_empty() {
                return Err(annotation(path, &label, "no sentence"));
            }
            let image = instances.image(r.image_id, &label)?;
            let ids = r.ann_ids();
            let mut targets = Vec::new();
            if ids.contains(&-1) {
                if ids != [-1] {
                    return Err(annotation(path, &label, format!("ann_id {ids:?} mixes -1 (no target) with targets")));
                }
            } else {
                for id in ids {
                    let ann = instances.annotation(id, &label)?;
                    if ann.image_id != r.image_id {
                        return Err(annotation(path, &label, format!("annotation {id} belongs to image {}", ann.image_id)));
                    }
                    if ann.is_crowd() {
                        continue;
                    }
                    let segmentation = ann.segmentation_rela().map_err(|e| annotation(&instances.path, &label, e))?;
                    if let Some(segmentation) = segmentation {
                        targets.push(Target { ann_id: Some(id), bbox: ann.bbox, segmentation });
                    }
                }
            }
            Ok(Sample {
                image_id: r.image_id,
                image_path: image_root.join(&image.file_name),
                image_size: Some((image.height, image.width)),
                expressions: r.sentences.iter().map(|s| s.raw.clone()).collect(),
                sent_ids: r.sentences.iter().map(|s| s.sent_id).collect::<Option<Vec<_>>>().unwrap_or_default(),
                ref_id: Some(r.ref_id),
                targets,
                label,
            })
        })
        .collect()
}
