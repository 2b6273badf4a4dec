//! COCO `instances.json` (images and annotations), as the refer and ReLA layouts use it.
//!
//! Only the fields those layouts read are parsed: `images[].{id, file_name, height, width}` and
//! `annotations[].{id, image_id, segmentation, bbox, iscrowd}`. Segmentations are converted when a
//! sample uses them, so a broken annotation nobody refers to does not stop a split from loading.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{annotation, parse_item, parse_json, read_text, truthy, SegmentationJson};
use crate::data::{DataError, ImageObject, ObjectIndex, Result, Segmentation, Target};

/// An image entry.
#[derive(Debug, Clone, Deserialize)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub height: u32,
    pub width: u32,
}

/// An annotation entry.
#[derive(Debug, Clone, Deserialize)]
pub struct CocoAnnotation {
    pub id: i64,
    pub image_id: u64,
    segmentation: SegmentationJson,
    #[serde(default)]
    pub bbox: Option<[f64; 4]>,
    #[serde(default)]
    iscrowd: Option<serde_json::Value>,
    #[serde(default)]
    pub category_id: Option<u64>,
}

impl CocoAnnotation {
    pub fn is_crowd(&self) -> bool {
        self.iscrowd.as_ref().is_some_and(truthy)
    }

    /// The annotation as a target (its RLE decoded and checked).
    pub fn to_target(&self) -> std::result::Result<Target, String> {
        Ok(Target { ann_id: Some(self.id), bbox: self.bbox, segmentation: self.segmentation.to_segmentation()? })
    }

    /// The segmentation with ReLA's filter: polygons of fewer than 3 points or an odd number of
    /// coordinates dropped (`None` when none is left); RLEs kept.
    pub(crate) fn segmentation_rela(&self) -> std::result::Result<Option<Segmentation>, String> {
        match &self.segmentation {
            SegmentationJson::Polygons(p) => {
                let kept: Vec<Vec<f64>> = p.iter().filter(|poly| poly.len() % 2 == 0 && poly.len() >= 6).cloned().collect();
                Ok((!kept.is_empty()).then_some(Segmentation::Polygons(kept)))
            }
            rle => rle.to_segmentation().map(Some),
        }
    }
}

#[derive(Deserialize)]
struct InstancesJson<'a> {
    images: Vec<CocoImage>,
    #[serde(borrow)]
    annotations: Vec<&'a RawValue>,
}

/// Images and annotations by id.
#[derive(Debug, Clone)]
pub struct Instances {
    pub path: PathBuf,
    pub images: HashMap<u64, CocoImage>,
    pub annotations: HashMap<i64, CocoAnnotation>,
}

impl Instances {
    /// Reads `instances.json`; a malformed annotation is reported with its position.
    pub fn load(path: &Path) -> Result<Self> {
        let text = read_text(path)?;
        let json: InstancesJson = parse_json(path, &text, "COCO instances file")?;
        let images = json.images.into_iter().map(|im| (im.id, im)).collect();
        let mut annotations = HashMap::with_capacity(json.annotations.len());
        for (index, raw) in json.annotations.iter().enumerate() {
            let a: CocoAnnotation = parse_item(path, &format!("annotations[{index}]"), raw)?;
            if annotations.insert(a.id, a).is_some() {
                return Err(annotation(path, &format!("annotations[{index}]"), "duplicate annotation id"));
            }
        }
        Ok(Self { path: path.to_path_buf(), images, annotations })
    }

    /// Every non-crowd annotation with its category, grouped by image, in annotation-id order:
    /// the objects of each image (training's perception targets). An annotation whose
    /// segmentation cannot be read is an error naming it.
    pub fn objects_by_image(&self) -> Result<ObjectIndex> {
        let mut ids: Vec<&i64> = self.annotations.keys().collect();
        ids.sort_unstable();
        let mut out = ObjectIndex::new();
        for id in ids {
            let a = &self.annotations[id];
            if a.is_crowd() {
                continue;
            }
            let target = a.to_target().map_err(|reason| annotation(&self.path, &format!("annotation {id}"), &reason))?;
            out.entry(a.image_id).or_default().push(ImageObject { target, category_id: a.category_id });
        }
        Ok(out)
    }

    /// The image entry of a sample.
    pub fn image(&self, image_id: u64, sample: &str) -> Result<&CocoImage> {
        self.images.get(&image_id).ok_or_else(|| DataError::Annotation {
            path: self.path.clone(),
            sample: sample.to_string(),
            reason: format!("image {image_id} is not in the images list"),
        })
    }

    /// The annotation a sample refers to.
    pub fn annotation(&self, ann_id: i64, sample: &str) -> Result<&CocoAnnotation> {
        self.annotations.get(&ann_id).ok_or_else(|| DataError::Annotation {
            path: self.path.clone(),
            sample: sample.to_string(),
            reason: format!("annotation {ann_id} is not in the annotations list"),
        })
    }
}
