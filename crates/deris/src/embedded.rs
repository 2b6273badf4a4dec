//! The default model built into the library (and so into the `deris` binary): a tiny DeRIS
//! (1.86 M parameters) trained from scratch for 30 minutes on two CPU cores with `deris train` on
//! `deris synth` scenes of coloured shapes (`scripts/learning-benchmark.sh`,
//! configs/train-synth.json; threshold 0.8, the best on separate calibration scenes). It understands sentences about those scenes
//! ("the red circle left of the blue square", "all triangles", "the green star" when there is
//! none), not photographs: for real images load the authors' checkpoints.
//!
//! Files: `assets/synth-tiny/{config.json, model.safetensors, tokenizer.spm}` (weights, model
//! config, and the word-level sentencepiece model made from the training sentences).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::config::DerisConfig;
use crate::error::{Error, Result};
use crate::model::Deris;
use crate::pipeline::Segmenter;
use crate::preprocess::text::Tokenizer;

/// The model config (JSON).
pub const CONFIG_JSON: &str = include_str!("../assets/synth-tiny/config.json");
/// The weights (safetensors, checkpoint key names).
pub const WEIGHTS: &[u8] = include_bytes!("../assets/synth-tiny/model.safetensors");
/// The sentencepiece model.
pub const TOKENIZER: &[u8] = include_bytes!("../assets/synth-tiny/tokenizer.spm");

/// Name under which errors and logs refer to the embedded files.
const NAME: &str = "<embedded synth-tiny model>";

/// The embedded model's config.
pub fn config() -> Result<DerisConfig> {
    let cfg: DerisConfig =
        serde_json::from_str(CONFIG_JSON).map_err(|e| Error::Config { field: NAME.into(), reason: e.to_string() })?;
    cfg.validate()?;
    Ok(cfg)
}

/// The embedded tokenizer.
pub fn tokenizer() -> Result<Tokenizer> {
    Tokenizer::from_bytes(TOKENIZER, std::path::Path::new(NAME))
}

/// The embedded model, ready to segment, on `device`.
pub fn segmenter(device: &Device) -> Result<Segmenter> {
    let cfg = config()?;
    let vb = VarBuilder::from_buffered_safetensors(WEIGHTS.to_vec(), DType::F32, device)
        .map_err(|e| Error::Checkpoint { path: NAME.into(), reason: e.to_string() })?;
    let model = Deris::new(&cfg, vb).map_err(|e| Error::Checkpoint { path: NAME.into(), reason: e.to_string() })?;
    Segmenter::new(model, tokenizer()?, device.clone())
}
