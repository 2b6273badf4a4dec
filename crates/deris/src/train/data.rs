//! Training batches (TRAIN-EVAL-SPEC §3): per sample, NSC (§4), the sentence choice, the two
//! resized and normalised images, the tokens, and one ground-truth mask per target at the
//! perception size (pycocotools rasterisation at the decoded size, then OpenCV nearest); with
//! an object list (`data.objects`), also every object of the image at that size, the targets of
//! the optional perception loss.
//!
//! Every random choice is a pure function of `(seed, epoch, sample index)`, so a batch is the
//! same whichever thread builds it and whenever (a resumed run sees the same data). Samples of a
//! batch are built in parallel; [`Prefetcher`] builds the next batches on a background thread
//! while the current step runs.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::loss::Target;
use crate::config::DerisConfig;
use crate::data::nsc::{Nsc, NscDraw, NscOutcome, NscStats};
use crate::data::rng::SplitMix64;
use crate::data::{ObjectIndex, Sample};
use crate::error::{Error, Result};
use crate::model::ModelInputs;
use crate::preprocess::image::{load_image, preprocess, RgbImage};
use crate::preprocess::text::Tokenizer;

/// Separates the data streams from any other user of the seed.
const ORDER_STREAM: u64 = u64::from_le_bytes(*b"DeRISord");
const SAMPLE_STREAM: u64 = u64::from_le_bytes(*b"DeRISsmp");

/// Data augmentation (none in the authors' configs).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Probability of a horizontal flip of image and masks; the sentence's `left`/`right`
    /// words (and `leftmost`/`rightmost`) are swapped so that it still describes the targets.
    pub hflip: f64,
}

/// A training split ready to batch: its samples, the tokenizer, the model sizes and NSC.
pub struct TrainData {
    samples: Vec<Sample>,
    tokenizer: Tokenizer,
    hier_size: usize,
    mini_size: usize,
    max_token: usize,
    nsc: Option<Nsc>,
    augment: Augment,
    /// Every object of each image, by image id (perception targets), when given.
    objects: Option<Arc<ObjectIndex>>,
    device: Device,
}

/// One batch: model inputs, targets, and what NSC did.
pub struct Batch {
    pub inputs: ModelInputs,
    pub targets: Vec<Target>,
    /// Sample indices in the split.
    pub indices: Vec<usize>,
    pub nsc: NscStats,
}

/// One part of a batch: the samples one chunk of one replica runs.
pub struct Part<'a> {
    /// The replica whose divisors score it.
    pub replica: usize,
    pub inputs: ModelInputs,
    pub targets: &'a [Target],
}

impl Batch {
    /// The samples of each of `replicas` replicas: runs of consecutive samples whose lengths
    /// differ by at most one (equal for a full batch, whose size the config makes a multiple).
    pub fn replica_targets(&self, replicas: usize) -> Vec<&[Target]> {
        even_ranges(self.targets.len(), replicas).into_iter().map(|r| &self.targets[r]).collect()
    }

    /// The batch cut into `chunks` parts per replica ([`Batch::replica_targets`]'s runs, each cut
    /// the same way), replica by replica; empty parts (a short last batch) are left out.
    pub fn split(&self, replicas: usize, chunks: usize) -> Result<Vec<Part<'_>>> {
        if replicas == 0 || chunks == 0 {
            return Err(Error::Input { name: "batch".into(), reason: "needs at least one replica and one chunk".into() });
        }
        let x = &self.inputs;
        let mut parts = Vec::with_capacity(replicas * chunks);
        for (replica, r) in even_ranges(self.targets.len(), replicas).into_iter().enumerate() {
            for c in even_ranges(r.len(), chunks) {
                if c.is_empty() {
                    continue;
                }
                let (start, n) = (r.start + c.start, c.len());
                let inputs = ModelInputs {
                    img: x.img.narrow(0, start, n)?,
                    img_mini: x.img_mini.narrow(0, start, n)?,
                    ref_expr_inds: x.ref_expr_inds.narrow(0, start, n)?,
                    text_attention_mask: x.text_attention_mask.narrow(0, start, n)?,
                };
                parts.push(Part { replica, inputs, targets: &self.targets[start..start + n] });
            }
        }
        Ok(parts)
    }
}

/// `0..len` cut into `parts` consecutive ranges whose lengths differ by at most one (the longer
/// ones first; some are empty when `len < parts`; none when `parts` is 0).
fn even_ranges(len: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    if parts == 0 {
        return Vec::new();
    }
    let (base, extra) = (len / parts, len % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let n = base + usize::from(i < extra);
            start += n;
            start - n..start
        })
        .collect()
}

impl TrainData {
    pub fn new(samples: Vec<Sample>, tokenizer: Tokenizer, cfg: &DerisConfig, nsc: Option<Nsc>, augment: Augment, device: &Device) -> Result<Self> {
        if samples.is_empty() {
            return Err(Error::Input { name: "training split".into(), reason: "has no samples".into() });
        }
        let rt = &cfg.runtime;
        Ok(Self {
            samples,
            tokenizer,
            hier_size: rt.hier_img_size,
            mini_size: rt.img_mini_size,
            max_token: rt.max_token,
            nsc,
            augment,
            objects: None,
            device: device.clone(),
        })
    }

    /// Gives every sample's image its objects (perception targets, [`Target::objects`]); an
    /// image missing from `objects` has none.
    pub fn with_objects(mut self, objects: Arc<ObjectIndex>) -> Self {
        self.objects = Some(objects);
        self
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of batches in one epoch (the last may be short).
    pub fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.samples.len().div_ceil(batch_size.max(1))
    }

    /// The sample indices of one epoch in training order: a seeded permutation.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        let mut rng = SplitMix64::from_key(&[ORDER_STREAM, seed, epoch]);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        order
    }

    /// Builds the batch of `indices` (in parallel).
    pub fn batch(&self, indices: &[usize], seed: u64, epoch: u64) -> Result<Batch> {
        let items: Vec<(Item, NscOutcome)> = indices.par_iter().map(|&i| self.item(i, seed, epoch)).collect::<Result<_>>()?;
        let b = items.len();
        let l = self.max_token;
        let mut nsc = NscStats::default();
        let mut imgs = Vec::with_capacity(b);
        let mut minis = Vec::with_capacity(b);
        let mut ids = Vec::with_capacity(b * l);
        let mut pad = Vec::with_capacity(b * l);
        let mut targets = Vec::with_capacity(b);
        for (item, outcome) in items {
            nsc.record(&outcome);
            imgs.push(item.img);
            minis.push(item.img_mini);
            ids.extend(item.ids);
            pad.extend(item.padding);
            targets.push(item.target);
        }
        let inputs = ModelInputs {
            img: Tensor::stack(&imgs, 0)?,
            img_mini: Tensor::stack(&minis, 0)?,
            ref_expr_inds: Tensor::from_vec(ids, (b, l), &self.device)?,
            text_attention_mask: Tensor::from_vec(pad, (b, l), &self.device)?,
        };
        Ok(Batch { inputs, targets, indices: indices.to_vec(), nsc })
    }

    /// Sample `index` as epoch `epoch` sees it.
    fn item(&self, index: usize, seed: u64, epoch: u64) -> Result<(Item, NscOutcome)> {
        let original = self.samples.get(index).ok_or_else(|| Error::Input { name: "sample index".into(), reason: format!("{index} is out of range") })?;
        let (sample, outcome) = match &self.nsc {
            Some(nsc) => nsc.apply(original, NscDraw { seed, epoch, index: index as u64 }),
            None => (original.clone(), NscOutcome::Kept),
        };
        let in_sample = |e: Error| Error::Input { name: sample.label.clone(), reason: e.to_string() };
        let mut rng = SplitMix64::from_key(&[SAMPLE_STREAM, seed, epoch, index as u64]);
        let sentence = sample
            .expressions
            .get(rng.below(sample.expressions.len()))
            .ok_or_else(|| Error::Input { name: sample.label.clone(), reason: "has no sentence".into() })?;
        let mut image = load_image(&sample.image_path).map_err(in_sample)?;
        let (h, w) = (image.h, image.w);
        let in_data = |reason: String| Error::Input { name: sample.label.clone(), reason };
        let s = self.hier_size as u32;
        let resized = |rles: Vec<deris_coco::Rle>| -> Result<Vec<Vec<u8>>> {
            rles.iter().map(|rle| Ok(rle.resize_nearest(s, s).map_err(|e| in_data(e.to_string()))?.to_rowmajor())).collect()
        };
        let mut masks = resized(sample.target_masks(h as u32, w as u32).map_err(|e| in_data(e.to_string()))?)?;
        let listed = self.objects.as_ref().map(|by_image| by_image.get(&sample.image_id).map_or(&[][..], Vec::as_slice));
        let mut objects = match listed {
            Some(listed) => Some(resized(sample.masks_of(listed.iter().map(|o| &o.target), h as u32, w as u32).map_err(|e| in_data(e.to_string()))?)?),
            None => None,
        };
        // Category indices (COCO `category_id`; 0 where the file gives none).
        let object_categories = listed.map_or_else(Vec::new, |l| l.iter().map(|o| o.category_id.unwrap_or(0) as u32).collect());
        let mut text = sentence.clone();
        if rng.next_f64() < self.augment.hflip {
            image = flip_image(&image)?;
            for m in masks.iter_mut().chain(objects.iter_mut().flatten()) {
                flip_rows(m, self.hier_size, 1);
            }
            text = swap_left_right(&text);
        }
        let pre = preprocess(&image, self.hier_size, self.mini_size, &self.device).map_err(in_sample)?;
        let enc = self.tokenizer.encode(&text, self.max_token).map_err(in_sample)?;
        let s = self.hier_size;
        let stack = |masks: &[Vec<u8>]| {
            let data: Vec<f32> = masks.iter().flat_map(|m| m.iter().map(|&v| f32::from(v))).collect();
            Tensor::from_vec(data, (masks.len(), s, s), &self.device)
        };
        let target = Target { masks: stack(&masks)?, objects: objects.as_deref().map(stack).transpose()?, object_categories };
        Ok((Item { img: pre.img, img_mini: pre.img_mini, ids: enc.ids, padding: enc.attention_mask, target }, outcome))
    }
}

/// One prepared sample.
struct Item {
    img: Tensor,
    img_mini: Tensor,
    ids: Vec<i64>,
    padding: Vec<i64>,
    target: Target,
}

fn flip_image(image: &RgbImage) -> Result<RgbImage> {
    let mut data = image.data.clone();
    flip_rows(&mut data, image.w, 3);
    RgbImage::new(image.h, image.w, data)
}

/// Mirrors every row of an interleaved `[H, W, C]` buffer in place.
fn flip_rows(data: &mut [u8], w: usize, c: usize) {
    for row in data.chunks_mut(w * c) {
        for x in 0..w / 2 {
            for k in 0..c {
                row.swap(x * c + k, (w - 1 - x) * c + k);
            }
        }
    }
}

/// The sentence of the mirrored image: `left` ↔ `right` in every word that contains them.
fn swap_left_right(text: &str) -> String {
    text.split(' ')
        .map(|w| {
            let lower = w.to_lowercase();
            if lower.contains("left") {
                lower.replace("left", "right")
            } else if lower.contains("right") {
                lower.replace("right", "left")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Builds batches ahead of the training loop on a background thread.
pub struct Prefetcher {
    rx: Receiver<(usize, Result<Batch>)>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    /// Batches `first..last` of `epoch` (at most `depth` built ahead).
    pub fn start(data: Arc<TrainData>, seed: u64, epoch: u64, batch_size: usize, first: usize, last: usize, depth: usize) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::spawn(move || {
            let order = data.epoch_order(seed, epoch);
            for b in first..last {
                let start = (b * batch_size).min(order.len());
                let idx = &order[start..(start + batch_size).min(order.len())];
                if tx.send((b, data.batch(idx, seed, epoch))).is_err() {
                    return; // the loop stopped early
                }
            }
        });
        Self { rx, handle: Some(handle) }
    }

    /// The next batch and its number in the epoch; `None` at the end of the range.
    pub fn next_batch(&mut self) -> Option<(usize, Result<Batch>)> {
        self.rx.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Unblock the producer (its send fails once the receiver is gone), then wait for it.
        let (_, rx) = sync_channel(1);
        drop(std::mem::replace(&mut self.rx, rx));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_ranges_cover_the_batch_in_order() {
        assert_eq!(even_ranges(4, 2), [0..2, 2..4]);
        assert_eq!(even_ranges(5, 2), [0..3, 3..5]);
        assert_eq!(even_ranges(1, 2), [0..1, 1..1]);
        assert_eq!(even_ranges(7, 3), [0..3, 3..5, 5..7]);
        assert!(even_ranges(3, 0).is_empty());
    }

    #[test]
    fn flipping_swaps_sides_in_words() {
        assert_eq!(swap_left_right("the leftmost star left of the circle"), "the rightmost star right of the circle");
        assert_eq!(swap_left_right("the right square"), "the left square");
        let mut row = vec![1, 2, 3, 4, 5];
        flip_rows(&mut row, 5, 1);
        assert_eq!(row, [5, 4, 3, 2, 1]);
        let mut rgb = vec![1, 1, 1, 2, 2, 2];
        flip_rows(&mut rgb, 2, 3);
        assert_eq!(rgb, [2, 2, 2, 1, 1, 1]);
    }
}
