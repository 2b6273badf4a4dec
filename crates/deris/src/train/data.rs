//! Training batches (TRAIN-EVAL-SPEC §3): per sample, NSC (§4), the sentence choice, the two
//! resized and normalised images, the tokens, and one ground-truth mask per target at the
//! perception size (pycocotools rasterisation at the decoded size, then OpenCV nearest).
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
use crate::data::Sample;
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

impl Batch {
    /// The batch cut into `parts` equal runs of consecutive samples (one per replica): the
    /// model inputs of each run and its targets.
    pub fn split(&self, parts: usize) -> Result<Vec<(ModelInputs, &[Target])>> {
        let b = self.targets.len();
        if parts == 0 || b % parts != 0 {
            return Err(Error::Input { name: "batch".into(), reason: format!("{b} samples do not split into {parts} equal parts") });
        }
        let n = b / parts;
        let cut = |t: &Tensor, i: usize| t.narrow(0, i * n, n);
        (0..parts)
            .map(|i| {
                let x = &self.inputs;
                let inputs = ModelInputs {
                    img: cut(&x.img, i)?,
                    img_mini: cut(&x.img_mini, i)?,
                    ref_expr_inds: cut(&x.ref_expr_inds, i)?,
                    text_attention_mask: cut(&x.text_attention_mask, i)?,
                };
                Ok((inputs, &self.targets[i * n..(i + 1) * n]))
            })
            .collect()
    }
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
            device: device.clone(),
        })
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
        let mut masks: Vec<Vec<u8>> = Vec::with_capacity(sample.targets.len());
        let in_data = |reason: String| Error::Input { name: sample.label.clone(), reason };
        let s = self.hier_size as u32;
        for rle in sample.target_masks(h as u32, w as u32).map_err(|e| in_data(e.to_string()))? {
            masks.push(rle.resize_nearest(s, s).map_err(|e| in_data(e.to_string()))?.to_rowmajor());
        }
        let mut text = sentence.clone();
        if rng.next_f64() < self.augment.hflip {
            image = flip_image(&image)?;
            for m in &mut masks {
                flip_rows(m, self.hier_size, 1);
            }
            text = swap_left_right(&text);
        }
        let pre = preprocess(&image, self.hier_size, self.mini_size, &self.device).map_err(in_sample)?;
        let enc = self.tokenizer.encode(&text, self.max_token).map_err(in_sample)?;
        let s = self.hier_size;
        let data: Vec<f32> = masks.iter().flat_map(|m| m.iter().map(|&v| f32::from(v))).collect();
        let target = Target { masks: Tensor::from_vec(data, (masks.len(), s, s), &self.device)? };
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
