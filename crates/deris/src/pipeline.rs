//! [`Segmenter`]: image + sentence in, [`Prediction`] out. Loads the config, the weights and the
//! tokenizer once; then any number of threads may call it (it is `Send + Sync`: share it with an
//! `Arc`).
//!
//! The steps are those of the authors' `tools/demo.py`: decode, `HierResize` + normalise
//! ([`crate::preprocess::image`]), clean + tokenize ([`crate::preprocess::text`]), the network
//! ([`Deris`]), `get_predictions_parts` ([`crate::post`]) and the rescale of the mask and boxes to
//! the original image ([`crate::post::rescale`]).
//!
//! ```no_run
//! use std::path::Path;
//! use deris::{DerisConfig, Segmenter, Weights};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Once, at start-up (DeRIS-B RefCOCO: Swin-S + BEiT-3 base, threshold 0.7).
//! let segmenter = Segmenter::load(
//!     &DerisConfig::deris_b_refcoco(),
//!     &Weights::File("weights/DERIS-B-refcoco.pth".into()),
//!     Path::new("weights/beit3.spm"),
//!     &candle_core::Device::Cpu,
//! )?;
//!
//! // Per request, from any thread.
//! let p = segmenter.segment_path(Path::new("dog.jpg"), "the dog on the left")?;
//! if p.no_target {
//!     println!("no target (best score {:?})", p.best_score());
//! } else {
//!     println!("{} of {}x{} pixels", p.mask.area(), p.width(), p.height());
//! }
//! std::fs::write("result.json", p.to_json()?)?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{BatchCoupling, DerisConfig};
use crate::error::{Error, Result};
use crate::model::{Deris, ModelInputs};
use crate::output::{Prediction, QueryPrediction, Timings};
use crate::post::rescale::{rescale_box, rescale_mask};
use crate::post::{self, masks, BinaryMask, PostParams};
use crate::preprocess::image::{load_image, preprocess, Preprocessed, RgbImage};
use crate::preprocess::text::Tokenizer;
use crate::taps::Taps;

/// Where the network's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weights {
    /// A checkpoint file (`.pth` or `.safetensors`), loaded strictly: every key must match.
    File(PathBuf),
    /// Deterministic random weights ([`checkpoint::random_var_builder`]): a demo and testing aid
    /// whose masks mean nothing.
    Random { seed: u64 },
}

/// A loaded DeRIS model with its tokenizer and post-processing settings.
#[derive(Debug)]
pub struct Segmenter {
    model: Deris,
    tokenizer: Tokenizer,
    device: Device,
    params: PostParams,
    coupling: BatchCoupling,
    query_masks: bool,
}

/// One input after decoding, resizing, normalising and tokenizing: what [`Segmenter::predict`]
/// batches. Built by [`Segmenter::prepare`].
#[derive(Debug, Clone)]
pub struct PreparedInput {
    pre: Preprocessed,
    text: String,
    ids: Vec<i64>,
    padding: Vec<i64>,
    preprocess_s: f64,
}

impl PreparedInput {
    /// The sentence as given.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `(height, width)` of the original image.
    pub fn image_size(&self) -> (usize, usize) {
        (self.pre.orig_h, self.pre.orig_w)
    }
}

// Sharing one segmenter across request threads is the point of loading it once.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Segmenter>();
};

impl Segmenter {
    /// Loads the tokenizer, checks it against the model's vocabulary, then builds the model from
    /// `weights` on `device`. Post-processing uses `cfg.runtime` (the authors' per-model score
    /// threshold; see [`Segmenter::with_score_threshold`]). Sets the process-wide precision of
    /// the CPU `linear` products to `cfg.runtime.precision` ([`crate::set_precision`]), which
    /// then holds for every model in the process, before building the model: in bf16 mode the
    /// model keeps its linear weights in bf16 ([`crate::nn::fused::Linear`]).
    ///
    /// Errors: [`Error::Config`] for an invalid config (`bf16` on a CPU without AVX512-BF16
    /// included) or a tokenizer whose ids do not fit the model's text embedding; [`Error::Io`]/[`Error::Tokenizer`] for the tokenizer file;
    /// [`Error::Checkpoint`]/[`Error::KeyMismatch`] for the weights.
    pub fn load(cfg: &DerisConfig, weights: &Weights, tokenizer: &Path, device: &Device) -> Result<Self> {
        cfg.validate()?;
        crate::set_precision(cfg.runtime.precision)?;
        let tok = Tokenizer::from_file(tokenizer)?;
        check_vocab(cfg, &tok, Some(tokenizer))?;
        let model = match weights {
            Weights::File(path) => {
                let ckpt = Checkpoint::open(path)?;
                checkpoint::load_strict(&ckpt, DType::F32, device, &cfg.name, |vb| Deris::new(cfg, vb))?
            }
            Weights::Random { seed } => Deris::new(cfg, checkpoint::random_var_builder(*seed, DType::F32, device))?,
        };
        tracing::info!(model = %cfg.name, device = ?device, "segmenter ready");
        Self::new(model, tok, device.clone())
    }

    /// Wraps an already built model (on `device`) and tokenizer.
    ///
    /// Errors: [`Error::Config`] when the tokenizer can produce ids outside the model's
    /// `beit3.vocab_size`.
    pub fn new(model: Deris, tokenizer: Tokenizer, device: Device) -> Result<Self> {
        check_vocab(model.config(), &tokenizer, None)?;
        let params = PostParams::from(&model.config().runtime);
        let coupling = model.config().runtime.batch_coupling;
        Ok(Self { model, tokenizer, device, params, coupling, query_masks: false })
    }

    /// Overrides the config's score threshold: a query is selected when its score is strictly
    /// above `t`, so `1.0` always gives "no target".
    ///
    /// Errors: [`Error::Config`] unless `0 ≤ t ≤ 1`.
    pub fn with_score_threshold(mut self, t: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&t) {
            return Err(Error::Config { field: "runtime.score_threshold".into(), reason: format!("{t} is not in [0, 1]") });
        }
        self.params.score_threshold = t;
        Ok(self)
    }

    /// Chooses how batched inputs interact; the default ([`BatchCoupling::PerImage`], unless the
    /// config says otherwise) makes a batch give the same results as one-by-one calls.
    pub fn with_batch_coupling(mut self, coupling: BatchCoupling) -> Self {
        self.coupling = coupling;
        self
    }

    /// Also return every query's binary mask at model resolution ([`QueryPrediction::mask`]).
    pub fn with_query_masks(mut self, on: bool) -> Self {
        self.query_masks = on;
        self
    }

    pub fn config(&self) -> &DerisConfig {
        self.model.config()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn score_threshold(&self) -> f64 {
        self.params.score_threshold
    }

    /// Segments the referent of `text` in `image`.
    pub fn segment(&self, image: &RgbImage, text: &str) -> Result<Prediction> {
        let input = self.prepare(image, text)?;
        let mut out = self.predict(std::slice::from_ref(&input))?;
        out.pop().ok_or_else(|| Error::Input { name: "batch".into(), reason: "the model returned no prediction".into() })
    }

    /// Decodes a JPEG or PNG file (see [`crate::preprocess::image::decode_image_bytes`] for the
    /// accepted layouts and the size limit) and segments it.
    pub fn segment_path(&self, path: &Path, text: &str) -> Result<Prediction> {
        self.segment(&load_image(path)?, text)
    }

    /// Segments several (image, sentence) pairs in one batched forward. With the default
    /// per-image coupling each result equals the one [`Segmenter::segment`] gives.
    ///
    /// Errors: the first input that cannot be prepared fails the batch, as
    /// [`Error::Input`] naming its index; use [`Segmenter::prepare`] and
    /// [`Segmenter::predict`] to handle inputs one by one.
    pub fn segment_batch(&self, items: &[(&RgbImage, &str)]) -> Result<Vec<Prediction>> {
        let inputs = items
            .iter()
            .enumerate()
            .map(|(i, (image, text))| {
                self.prepare(image, text).map_err(|e| Error::Input { name: format!("batch item {i}"), reason: e.to_string() })
            })
            .collect::<Result<Vec<_>>>()?;
        self.predict(&inputs)
    }

    /// Resizes and normalises the image for both branches and tokenizes the sentence.
    ///
    /// Errors: [`Error::Input`] for an empty image; [`Error::Text`] for a sentence that is empty
    /// or has no token left after the authors' cleaning (e.g. only punctuation).
    pub fn prepare(&self, image: &RgbImage, text: &str) -> Result<PreparedInput> {
        let start = Instant::now();
        let rt = &self.config().runtime;
        let text_error = |reason: &str| Error::Text { reason: format!("{reason}: {}", quoted(text)) };
        if text.trim().is_empty() {
            return Err(text_error("the sentence is empty"));
        }
        let encoded = self.tokenizer.encode(text, rt.max_token).map_err(|e| match e {
            Error::Text { reason } => text_error(&reason),
            other => other,
        })?;
        let pre = preprocess(image, rt.hier_img_size, rt.img_mini_size, &self.device)?;
        Ok(PreparedInput {
            pre,
            text: text.to_string(),
            ids: encoded.ids,
            padding: encoded.attention_mask,
            preprocess_s: start.elapsed().as_secs_f64(),
        })
    }

    /// Runs the network once on a batch of prepared inputs and post-processes every result.
    ///
    /// Errors: [`Error::Input`] for an empty batch; [`Error::Tensor`] if the forward fails.
    pub fn predict(&self, batch: &[PreparedInput]) -> Result<Vec<Prediction>> {
        let b = batch.len();
        if b == 0 {
            return Err(Error::Input { name: "batch".into(), reason: "no inputs".into() });
        }
        let l = self.config().runtime.max_token;
        let imgs: Vec<&Tensor> = batch.iter().map(|p| &p.pre.img).collect();
        let minis: Vec<&Tensor> = batch.iter().map(|p| &p.pre.img_mini).collect();
        let ids: Vec<i64> = batch.iter().flat_map(|p| p.ids.iter().copied()).collect();
        let padding: Vec<i64> = batch.iter().flat_map(|p| p.padding.iter().copied()).collect();
        let inputs = ModelInputs {
            img: Tensor::stack(&imgs, 0)?,       // [B, 3, S, S]
            img_mini: Tensor::stack(&minis, 0)?, // [B, 3, s, s]
            ref_expr_inds: Tensor::from_vec(ids, (b, l), &self.device)?,
            text_attention_mask: Tensor::from_vec(padding, (b, l), &self.device)?,
        };
        self.model.check_inputs(&inputs)?;

        let start = Instant::now();
        let y = self.model.forward(&inputs, self.coupling, &mut Taps::off())?;
        self.device.synchronize()?;
        let forward_s = start.elapsed().as_secs_f64();

        let start = Instant::now();
        let parts = post::get_predictions_parts(
            &y.pred_refer_logits,
            &y.pred_boxes,
            &y.pred_masks,
            &y.pred_existence,
            &self.params,
            &mut Taps::off(),
        )?;
        let query_masks = if self.query_masks { Some(masks::binarize(&y.pred_masks, self.params.mask_threshold)?) } else { None };
        let mut out = Vec::with_capacity(b);
        for (i, (input, part)) in batch.iter().zip(parts).enumerate() {
            let (oh, ow) = input.image_size();
            let (mh, mw) = (part.mask.height, part.mask.width);
            let mut queries = Vec::with_capacity(part.scores.len());
            for (q, (&score, &bbox_model)) in part.scores.iter().zip(&part.boxes).enumerate() {
                let mask = match &query_masks {
                    Some(t) => Some(BinaryMask { height: mh, width: mw, data: t.get(i)?.get(q)?.flatten_all()?.to_vec1::<u8>()? }),
                    None => None,
                };
                queries.push(QueryPrediction {
                    score,
                    // The same float32 comparison that selected the masks.
                    selected: score > self.params.score_threshold as f32,
                    bbox: rescale_box(bbox_model, mh, mw, oh, ow),
                    bbox_model,
                    mask,
                });
            }
            out.push(Prediction {
                text: input.text.clone(),
                mask: rescale_mask(&part.mask, oh, ow)?,
                mask_model: part.mask,
                no_target: part.no_target,
                score_threshold: self.params.score_threshold,
                queries,
                existence: part.existence,
                pred_nt: part.pred_nt,
                timings: Timings { preprocess_s: input.preprocess_s, forward_s, post_s: 0.0, batch_size: b },
            });
        }
        let post_s = start.elapsed().as_secs_f64();
        for p in &mut out {
            p.timings.post_s = post_s;
        }
        Ok(out)
    }
}

/// The tokenizer's ids run from 0 to `xlmr_vocab_size − 1`; all must index the model's text
/// embedding (`beit3.vocab_size` rows; BEiT-3's 64010 rows exceed its tokenizer's 64002 ids).
fn check_vocab(cfg: &DerisConfig, tokenizer: &Tokenizer, path: Option<&Path>) -> Result<()> {
    let (ids, rows) = (tokenizer.xlmr_vocab_size(), cfg.beit3.vocab_size);
    if ids > rows {
        let which = path.map_or_else(|| "the tokenizer".to_string(), |p| format!("tokenizer {}", p.display()));
        return Err(Error::Config {
            field: "beit3.vocab_size".into(),
            reason: format!(
                "{which} has {ids} ids but model '{}' embeds only {rows}: the tokenizer does not belong to this model",
                cfg.name
            ),
        });
    }
    Ok(())
}

/// The sentence in quotes for error messages, shortened to 80 characters.
fn quoted(text: &str) -> String {
    let short: String = text.chars().take(80).collect();
    let ellipsis = if text.chars().count() > 80 { "…" } else { "" };
    format!("{short:?}{ellipsis}")
}
