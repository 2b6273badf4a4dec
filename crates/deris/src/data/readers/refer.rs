//! The original refer layout (RefCOCO, RefCOCO+, RefCOCOg): `refs(unc).p`, a Python pickle (as
//! written by Python 2 or 3) of a list of refs `{ref_id, ann_id, image_id, split, sentences:
//! [{raw, sent_id, …}], …}`, plus COCO `instances.json` for the images and the referred objects.
//!
//! One sample per ref with all its sentences (see [`crate::data::Split::per_sentence`]); the image
//! is `images[image_id].file_name` under the image root; the target is `annotations[ann_id]`.

use std::path::Path;

use serde::Deserialize;
use serde_pickle::{DeOptions, Value};

use super::coco::Instances;
use super::{annotation, names_in_order};
use crate::data::{DataError, Result, Sample};

/// A ref of the pickle.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferRef {
    pub ref_id: i64,
    pub ann_id: i64,
    pub image_id: u64,
    pub split: String,
    pub sentences: Vec<Sentence>,
}

/// A sentence of a ref.
#[derive(Debug, Clone, Deserialize)]
pub struct Sentence {
    pub raw: String,
    #[serde(default)]
    pub sent_id: Option<i64>,
}

/// Parses the pickle: a list of refs; a malformed ref is reported with its position.
pub fn parse_refs(path: &Path, bytes: &[u8]) -> Result<Vec<ReferRef>> {
    let value = serde_pickle::value_from_slice(bytes, DeOptions::new().decode_strings())
        .map_err(|e| DataError::Format { path: path.to_path_buf(), reason: format!("invalid pickle: {e}") })?;
    let Value::List(items) = value else {
        return Err(DataError::Format { path: path.to_path_buf(), reason: "the pickle does not hold a list of refs".into() });
    };
    items
        .into_iter()
        .enumerate()
        .map(|(index, v)| serde_pickle::from_value(v).map_err(|e| annotation(path, &format!("refs[{index}]"), e.to_string())))
        .collect()
}

/// The split names, in order of first appearance.
pub fn split_names(refs: &[ReferRef]) -> Vec<String> {
    names_in_order(refs.iter().map(|r| r.split.as_str()))
}

/// The refs of `split` as samples.
pub fn read_split(path: &Path, refs: &[ReferRef], instances: &Instances, split: &str, image_root: &Path) -> Result<Vec<Sample>> {
    let selected: Vec<&ReferRef> = refs.iter().filter(|r| r.split == split).collect();
    if selected.is_empty() {
        return Err(DataError::MissingSplit { path: path.to_path_buf(), split: split.to_string(), available: split_names(refs) });
    }
    selected
        .into_iter()
        .map(|r| {
            let label = format!("{split} ref {} (image {}, ann {})", r.ref_id, r.image_id, r.ann_id);
            if r.sentences.is_empty() {
                return Err(annotation(path, &label, "no sentence"));
            }
            let image = instances.image(r.image_id, &label)?;
            let ann = instances.annotation(r.ann_id, &label)?;
            if ann.image_id != r.image_id {
                return Err(annotation(path, &label, format!("annotation {} belongs to image {}", ann.id, ann.image_id)));
            }
            let target = ann.to_target().map_err(|e| annotation(&instances.path, &label, e))?;
            Ok(Sample {
                image_id: r.image_id,
                image_path: image_root.join(&image.file_name),
                image_size: Some((image.height, image.width)),
                expressions: r.sentences.iter().map(|s| s.raw.clone()).collect(),
                sent_ids: r.sentences.iter().map(|s| s.sent_id).collect::<Option<Vec<_>>>().unwrap_or_default(),
                ref_id: Some(r.ref_id),
                targets: vec![target],
                label,
            })
        })
        .collect()
}
