//! The training config file (`deris train --config run.json`): what to train, on what, how long.
//!
//! ```json
//! {
//!   "model": "configs/synth-tiny.json",
//!   "data": { "annotations": "synth/grefs/instances.json", "image_root": "synth/images" },
//!   "batch_size": 8, "epochs": 12, "optimizer": { "lr": 1e-3 }
//! }
//! ```
//! Every other field has the authors' default (gRefCOCO: NSC on, Adam-AMSGrad lr 1e-4, BEiT-3 at
//! lr/2, Swin frozen, clipping 0.15, the point-sampled loss with 12544 points). Relative paths are
//! relative to the directory the command runs in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::data::Augment;
use super::loss::LossConfig;
use super::optim::AdamConfig;
use super::schedule::Schedule;
use crate::config::DerisConfig;
use crate::error::{Error, Result};

/// The model to train: a config file or an inline config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSource {
    Path(PathBuf),
    Inline(Box<DerisConfig>),
}

/// The annotations to train and validate on (any layout `deris eval` reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    pub annotations: PathBuf,
    pub image_root: PathBuf,
    /// `seqtr_mixed_seg`, `deris_grefs`, `refer_pickle`, `rela_grefs` [default: detected].
    #[serde(default)]
    pub layout: Option<String>,
    /// COCO `instances.json` of the refer and ReLA layouts [default: beside the annotations].
    #[serde(default)]
    pub instances: Option<PathBuf>,
    /// COCO `instances.json` listing every object of the training images (COCO's own file for
    /// gRefCOCO; `deris synth` writes `coco/instances.json`): the targets of the perception loss
    /// (`loss.perception_weight`). Relative paths as `annotations`.
    #[serde(default)]
    pub objects: Option<PathBuf>,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    /// `null` to train without validation.
    #[serde(default = "default_val_split")]
    pub val_split: Option<String>,
    /// Validate on the first `n` sentences of the split only.
    #[serde(default)]
    pub val_limit: Option<usize>,
}

fn default_train_split() -> String {
    "train".into()
}

fn default_val_split() -> Option<String> {
    Some("val".into())
}

/// Non-referent sample conversion (TRAIN-EVAL-SPEC §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NscSettings {
    pub enabled: bool,
    pub rate: f64,
    pub threshold: f64,
    /// The bank (`train_dict.json`) [default: the training split's own sentences].
    pub bank: Option<PathBuf>,
}

impl Default for NscSettings {
    fn default() -> Self {
        Self { enabled: true, rate: 0.15, threshold: 0.6, bank: None }
    }
}

/// Where training starts from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InitConfig {
    /// A checkpoint to fine-tune (`.pth` / `.safetensors`, strict) [default: fresh weights].
    pub weights: Option<PathBuf>,
    /// Seed of the fresh weights.
    pub seed: u64,
}

/// A `deris train` run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSource,
    pub data: DataConfig,
    /// The sentencepiece model [default: a word-level model made from the training sentences,
    /// saved as `tokenizer.spm` in the output folder].
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    #[serde(default)]
    pub init: InitConfig,
    #[serde(default)]
    pub nsc: NscSettings,
    #[serde(default)]
    pub augment: Augment,
    /// Samples per optimisation step, over all replicas.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Data-parallel replicas, the authors' GPUs (TRAIN-EVAL-SPEC §5.9): each takes
    /// `batch_size / replicas` samples on its own thread, computes the loss with its own
    /// cross-entropy and existence means and the global mean target count, and the gradients
    /// are averaged.
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Each replica's samples run as this many equal chunks side by side (one thread each),
    /// scored with the replica's divisors ([`super::loss::Normalizers`]) and their gradients
    /// summed: the unchunked replica's objective (only the random loss points are drawn per
    /// chunk), computed on several cores at once. On CPU, `deris train` then runs candle's
    /// element-wise ops on one thread per chunk (measured on 2 cores: 0.15 s per step with 2
    /// chunks, 0.25 s with 1).
    #[serde(default = "default_chunks")]
    pub chunks: usize,
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Stop after this many steps in all (whatever `epochs` says).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Stop (with a checkpoint and a validation) after this many minutes of training.
    #[serde(default)]
    pub max_minutes: Option<f64>,
    #[serde(default)]
    pub optimizer: AdamConfig,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub loss: LossConfig,
    /// Substrings of parameter names that are not trained (the authors freeze Swin).
    #[serde(default = "default_freeze")]
    pub freeze: Vec<String>,
    /// Learning-rate multipliers by parameter group (`vis_enc`, `lan_enc`,
    /// `hier_vision_encoder`, `pixel_decoder`, `rest`) [default: the authors' 0.5, 0.1, 0.1, 1, 1].
    #[serde(default = "default_lr_scales")]
    pub lr_scales: BTreeMap<String, f64>,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Steps between checkpoints (and one at the end).
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Step checkpoints kept (the oldest are deleted).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Steps between validations [default: once per epoch].
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Steps between log lines.
    #[serde(default = "default_log_every")]
    pub log_every: u64,
}

fn default_batch_size() -> usize {
    1
}
fn default_replicas() -> usize {
    1
}
fn default_chunks() -> usize {
    1
}
fn default_epochs() -> usize {
    6
}
fn default_freeze() -> Vec<String> {
    vec!["hier_vision_encoder".into()]
}
fn default_lr_scales() -> BTreeMap<String, f64> {
    [("vis_enc", 0.5), ("lan_enc", 0.1), ("hier_vision_encoder", 0.1), ("pixel_decoder", 1.0), ("rest", 1.0)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}
fn default_seed() -> u64 {
    6666
}
fn default_checkpoint_every() -> u64 {
    1000
}
fn default_keep() -> usize {
    2
}
fn default_log_every() -> u64 {
    10
}

impl TrainConfig {
    /// Reads and checks a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::Config { field: path.display().to_string(), reason: format!("not a training config: {e}") })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The model config it names.
    pub fn model_config(&self) -> Result<DerisConfig> {
        match &self.model {
            ModelSource::Path(p) => DerisConfig::from_file(p),
            ModelSource::Inline(c) => {
                c.validate()?;
                Ok((**c).clone())
            }
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: &str| Err(Error::Config { field: field.into(), reason: reason.into() });
        if self.batch_size == 0 {
            return bad("batch_size", "must be at least 1");
        }
        if self.replicas == 0 || self.batch_size % self.replicas != 0 {
            return bad("replicas", "must be at least 1 and divide batch_size");
        }
        if self.chunks == 0 || self.batch_size % (self.replicas * self.chunks) != 0 {
            return bad("chunks", "must be at least 1 and divide each replica's samples (batch_size / replicas)");
        }
        if self.epochs == 0 && self.max_steps.is_none() {
            return bad("epochs", "must be at least 1");
        }
        if !(self.optimizer.lr > 0.0 && self.optimizer.lr.is_finite()) {
            return bad("optimizer.lr", "must be a positive number");
        }
        if !(0.0..=1.0).contains(&self.nsc.rate) {
            return bad("nsc.rate", "must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.augment.hflip) {
            return bad("augment.hflip", "must be in [0, 1]");
        }
        if self.loss.positive_iou.is_some_and(|t| !(t > 0.0 && t <= 1.0)) {
            return bad("loss.positive_iou", "must be in (0, 1]");
        }
        if !(self.loss.perception_weight >= 0.0 && self.loss.perception_weight.is_finite()) {
            return bad("loss.perception_weight", "must be a non-negative number");
        }
        for (field, w) in [("loss.category_weight", self.loss.category_weight), ("loss.word_weight", self.loss.word_weight), ("loss.box_weight", self.loss.box_weight)] {
            if !(w >= 0.0 && w.is_finite()) {
                return bad(field, "must be a non-negative number");
            }
        }
        if self.loss.category_weight > 0.0 && self.loss.perception_weight <= 0.0 {
            return bad("loss.category_weight", "needs loss.perception_weight > 0 (its queries are the perception loss's matches)");
        }
        if self.loss.box_weight > 0.0 && self.loss.perception_weight <= 0.0 {
            return bad("loss.box_weight", "needs loss.perception_weight > 0 (its queries are the perception loss's matches)");
        }
        if self.checkpoint_every == 0 || self.log_every == 0 || self.eval_every == Some(0) {
            return bad("checkpoint_every / log_every / eval_every", "must be at least 1");
        }
        for (k, v) in &self.lr_scales {
            if !["vis_enc", "lan_enc", "hier_vision_encoder", "pixel_decoder", "rest"].contains(&k.as_str()) {
                return bad(&format!("lr_scales.{k}"), "unknown group (vis_enc, lan_enc, hier_vision_encoder, pixel_decoder, rest)");
            }
            if !(*v >= 0.0 && v.is_finite()) {
                return bad(&format!("lr_scales.{k}"), "must be a non-negative number");
            }
        }
        Ok(())
    }
}
