//! The model flags that `segment` and `eval` share, and loading a [`Segmenter`] from them.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use deris::{BatchCoupling, DerisConfig, Precision, Segmenter, Weights};

/// The config of --weights when --config is not given.
const DEFAULT_CONFIG: &str = "deris-b-refcoco";

/// Which model to run, with which tokenizer, where. With no --weights and no --random-weights,
/// the embedded default model ([`deris::embedded`]: a tiny model trained on `deris synth` scenes).
#[derive(clap::Args, Debug)]
pub struct ModelArgs {
    /// Checkpoint (.pth or .safetensors) of the model named by --config [default: the embedded
    /// synth-tiny model].
    #[arg(long, conflicts_with = "random_weights")]
    pub weights: Option<PathBuf>,
    /// Demo and testing aid: build the model with random weights from this seed instead of a
    /// checkpoint. The masks mean nothing.
    #[arg(long, value_name = "SEED")]
    pub random_weights: Option<u64>,
    /// The BEiT-3 sentencepiece model (beit3.spm) of --weights; its vocabulary must fit the model's.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Built-in model name (deris-b-refcoco, deris-l-refcoco, deris-b-grefcoco,
    /// deris-l-grefcoco) or a JSON config file, for --weights / --random-weights
    /// [default: deris-b-refcoco].
    #[arg(long)]
    pub config: Option<String>,
    /// A query is a referent when its score is above this; without one the answer is "no target"
    /// [default: the model's, 0.7 for the released models except deris-l-grefcoco's 0.9].
    #[arg(long)]
    pub threshold: Option<f64>,
    /// Let the images of a batch interact as in the authors' code (their `query_SA` attends
    /// across the batch); by default results do not depend on --batch.
    #[arg(long)]
    pub reference_batch_coupling: bool,
    /// `cpu`, or `cuda` / `cuda:N` (needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: super::DeviceArg,
    /// CPU threads for the model and image decoding [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Arithmetic of the CPU `linear` products: f32, or bf16 (operands rounded to bf16, f32
    /// sums: about twice as fast, masks differ slightly; needs AVX512-BF16) [default: the
    /// config's runtime.precision, f32].
    #[arg(long)]
    pub precision: Option<Precision>,
}

impl ModelArgs {
    /// Caps the worker threads (before any pool starts), then loads config, tokenizer and weights
    /// and applies --threshold, the batch coupling and --precision (before the model is built:
    /// a model built in bf16 mode keeps its linear weights in bf16).
    pub fn load(&self) -> Result<Segmenter> {
        let device = self.device.open()?;
        if let Some(p) = self.precision {
            deris::set_precision(p).context("--precision")?;
        }
        let weights = match (&self.weights, self.random_weights) {
            (Some(w), _) => Some(Weights::File(w.clone())),
            (None, Some(seed)) => Some(Weights::Random { seed }),
            (None, None) => None,
        };
        let mut segmenter = match (weights, &self.tokenizer) {
            (None, _) => {
                ensure!(self.config.is_none(), "--config needs --weights (or --random-weights); without them the embedded model runs");
                deris::embedded::segmenter(&device).context("loading the embedded default model")?
            }
            (Some(_), None) => bail!("--weights and --random-weights need --tokenizer (the model's beit3.spm)"),
            (Some(weights), Some(tokenizer)) => {
                let name = self.config.as_deref().unwrap_or(DEFAULT_CONFIG);
                let mut cfg = DerisConfig::from_name_or_path(name).with_context(|| format!("loading config '{name}'"))?;
                // Segmenter::load sets the config's precision: --precision overrides it.
                cfg.runtime.precision = self.precision.unwrap_or(cfg.runtime.precision);
                let what = match &weights {
                    Weights::File(p) => format!("loading model '{}' from {}", cfg.name, p.display()),
                    Weights::Random { seed } => format!("building model '{}' with random weights (seed {seed})", cfg.name),
                };
                Segmenter::load(&cfg, &weights, tokenizer, &device).context(what)?
            }
        };
        if let Some(t) = self.threshold {
            segmenter = segmenter.with_score_threshold(t).context("--threshold")?;
        }
        if self.reference_batch_coupling {
            segmenter = segmenter.with_batch_coupling(BatchCoupling::Reference);
        }
        Ok(segmenter)
    }

    /// Applies --threads; call first, before anything starts a thread pool.
    pub fn apply_threads(&self) -> Result<()> {
        super::threads::configure(self.threads, None)
    }

    /// The files these flags read, so that no output replaces one of them.
    pub fn input_paths(&self) -> Vec<&Path> {
        [self.weights.as_deref(), self.tokenizer.as_deref(), self.config.as_deref().map(Path::new)].into_iter().flatten().collect()
    }
}
