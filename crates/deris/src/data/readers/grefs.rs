//! The DeRIS gRefCOCO JSON (`grefs/instances.json`), read as DeRIS'
//! `LoadImageAnnotationsFromFileGRES_TO` reads it (TRAIN-EVAL-SPEC §2.3):
//! `{split: [{image_id, expressions: {raw, sent_id?, ref_id?}, annotations: [{id, bbox,
//! segmentation, empty}], …}]}`, image `COCO_train2014_<image_id:012>.jpg`.
//!
//! Targets are the annotations with an `id` > 0, in order. A no-target item carries one
//! placeholder (`id` −1 or null, no segmentation, `empty: true`). Items that mix the two, or whose
//! placeholder has a mask, or whose target has none, are errors: DeRIS builds the union mask and
//! the target list by different rules, which only agree on consistent items.

use std::path::Path;

use serde::Deserialize;

use super::{annotation, parse_item, split_items, truthy, SegmentationJson};
use crate::data::{coco_train2014_name, Result, Sample, Target};

#[derive(Deserialize)]
struct Item {
    image_id: u64,
    expressions: Expressions,
    annotations: Vec<Annotation>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

#[derive(Deserialize)]
struct Expressions {
    raw: OneOrMany,
    #[serde(default)]
    sent_id: Option<serde_json::Value>,
    #[serde(default)]
    ref_id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Annotation {
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    bbox: Option<[f64; 4]>,
    #[serde(default)]
    segmentation: Option<SegmentationJson>,
    #[serde(default)]
    empty: Option<serde_json::Value>,
}

/// The items of `split` as samples (one per item; DeRIS items hold one sentence).
pub fn read_split(path: &Path, text: &str, split: &str, image_root: &Path) -> Result<Vec<Sample>> {
    let items = split_items(path, text, split)?;
    items
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            let label = format!("{split} item {index}");
            let item: Item = parse_item(path, &label, raw)?;
            let ref_id = item.expressions.ref_id.as_ref().and_then(serde_json::Value::as_i64);
            let label = match ref_id {
                Some(r) => format!("{label} (image {}, ref {r})", item.image_id),
                None => format!("{label} (image {})", item.image_id),
            };
            let expressions = match item.expressions.raw {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(v) => v,
            };
            if expressions.is_empty() {
                return Err(annotation(path, &label, "no expression"));
            }
            let targets = targets(path, &label, item.annotations)?;
            let sent_ids = item.expressions.sent_id.as_ref().and_then(serde_json::Value::as_i64);
            Ok(Sample {
                image_id: item.image_id,
                image_path: image_root.join(coco_train2014_name(item.image_id)),
                image_size: item.height.zip(item.width),
                sent_ids: if expressions.len() == 1 { sent_ids.into_iter().collect() } else { Vec::new() },
                expressions,
                ref_id,
                targets,
                label,
            })
        })
        .collect()
}

fn targets(path: &Path, label: &str, annotations: Vec<Annotation>) -> Result<Vec<Target>> {
    let n = annotations.len();
    let mut targets = Vec::new();
    for (k, a) in annotations.into_iter().enumerate() {
        let is_target = a.id.is_some_and(|id| id > 0);
        let placeholder = a.empty.as_ref().is_some_and(truthy);
        match (is_target, a.segmentation.filter(|s| !s.is_empty())) {
            (true, Some(_)) if placeholder => {
                return Err(annotation(path, label, format!("annotation {k} has id > 0 and a mask but is marked empty")));
            }
            (true, Some(seg)) => {
                let segmentation = seg.to_segmentation().map_err(|e| annotation(path, label, format!("annotation {k}: {e}")))?;
                targets.push(Target { ann_id: a.id, bbox: a.bbox, segmentation });
            }
            (true, None) => return Err(annotation(path, label, format!("annotation {k} (id {:?}) is a target without segmentation", a.id))),
            (false, Some(_)) => return Err(annotation(path, label, format!("annotation {k} has a mask but id {:?} (targets need id > 0)", a.id))),
            (false, None) if n > 1 => {
                return Err(annotation(path, label, format!("annotation {k} is a no-target placeholder among {n} annotations")));
            }
            (false, None) => {}
        }
    }
    Ok(targets)
}
