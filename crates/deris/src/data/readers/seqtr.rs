//! The SeqTR/DeRIS mixed-seg JSON (`instances_nogoogle_withid.json`), read as DeRIS'
//! `LoadImageAnnotationsFromFile_TO` reads it (TRAIN-EVAL-SPEC §2.2):
//! `{split: [{image_id, expressions: [str], bbox: [x, y, w, h], mask, id, …}]}`, one referred
//! object per item, image `COCO_train2014_<image_id:012>.jpg`.
//!
//! An item without `id` (SeqTR's file without ids, on which DeRIS would crash) keeps its mask as
//! its one target; an `id` ≤ 0 is an error (DeRIS would then score against the mask of an object
//! it does not treat as a target).

use std::path::Path;

use serde::Deserialize;

use super::{annotation, parse_item, split_items, SegmentationJson};
use crate::data::{coco_train2014_name, Result, Sample, Target};

#[derive(Deserialize)]
struct Item {
    image_id: u64,
    expressions: Vec<String>,
    #[serde(default)]
    bbox: Option<[f64; 4]>,
    mask: SegmentationJson,
    #[serde(default)]
    id: Option<i64>,
    #[serde(default)]
    width: Option<u32>,
    #[serde(default)]
    height: Option<u32>,
}

/// The items of `split` as samples (one per item, all its sentences).
pub fn read_split(path: &Path, text: &str, split: &str, image_root: &Path) -> Result<Vec<Sample>> {
    let items = split_items(path, text, split)?;
    items
        .iter()
        .enumerate()
        .map(|(index, raw)| {
            let label = format!("{split} item {index}");
            let item: Item = parse_item(path, &label, raw)?;
            let label = match item.id {
                Some(id) => format!("{label} (image {}, ann {id})", item.image_id),
                None => format!("{label} (image {})", item.image_id),
            };
            if item.expressions.is_empty() {
                return Err(annotation(path, &label, "no expression"));
            }
            if let Some(id) = item.id.filter(|&id| id <= 0) {
                return Err(annotation(path, &label, format!("id {id} is not a COCO annotation id (must be > 0)")));
            }
            if item.mask.is_empty() {
                return Err(annotation(path, &label, "mask has no polygon"));
            }
            let segmentation = item.mask.to_segmentation().map_err(|e| annotation(path, &label, e))?;
            Ok(Sample {
                image_id: item.image_id,
                image_path: image_root.join(coco_train2014_name(item.image_id)),
                image_size: item.height.zip(item.width),
                expressions: item.expressions,
                sent_ids: Vec::new(),
                ref_id: None,
                targets: vec![Target { ann_id: item.id, bbox: item.bbox, segmentation }],
                label,
            })
        })
        .collect()
}
