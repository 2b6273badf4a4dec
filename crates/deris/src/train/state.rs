//! Training checkpoints that resume exactly (TRAIN-EVAL-SPEC §6.9, our layout).
//!
//! `DIR/step-<8 digits>/` holds
//! - `model.safetensors`: every weight under its checkpoint key (what
//!   [`crate::checkpoint::Checkpoint::open`] and `deris segment --weights` read),
//! - `optimizer.safetensors`: Adam's moments ([`Adam::state`] names) and `optimizer.json`: the
//!   per-parameter step counts,
//! - `trainer.json`: [`TrainerState`],
//! - `training_heads.safetensors`, when the run has training-only parameters (keys under
//!   `train.`, [`super::heads`]): kept out of `model.safetensors` so that it stays a
//!   model checkpoint; read back into the weights on resume.
//!
//! A checkpoint is written into a hidden temporary directory inside `DIR` and renamed into place,
//! then `DIR/latest` (a text file with the directory's name) is replaced by a rename: a crash
//! leaves either the previous checkpoint or the new one, never half of one.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::optim::Adam;
use crate::checkpoint::{save_safetensors, Checkpoint};
use crate::error::{Error, Result};

const MODEL_FILE: &str = "model.safetensors";
const OPTIM_FILE: &str = "optimizer.safetensors";
const TRAINING_FILE: &str = "training_heads.safetensors";
/// Key prefix of the training-only parameters.
const TRAINING_PREFIX: &str = "train.";
const OPTIM_STEPS_FILE: &str = "optimizer.json";
const TRAINER_FILE: &str = "trainer.json";
const LATEST_FILE: &str = "latest";
const STEP_PREFIX: &str = "step-";

/// What the trainer remembers besides the weights and the optimizer.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done so far (names the checkpoint directory).
    pub step: u64,
    /// The current epoch, 0-indexed.
    pub epoch: usize,
    /// Batches of `epoch` already done (0 at an epoch boundary).
    pub batch_in_epoch: usize,
    /// The run's seed (data order and augmentation are derived from it).
    pub seed: u64,
    /// The training config, as JSON.
    pub config: serde_json::Value,
    /// Loss-curve records, one per logged step.
    pub history: Vec<serde_json::Value>,
}

/// Everything [`load_checkpoint`] reads back.
pub struct LoadedCheckpoint {
    /// The step directory it was read from.
    pub path: PathBuf,
    pub weights: BTreeMap<String, Tensor>,
    /// For [`Adam::load_state`].
    pub optim_tensors: BTreeMap<String, Tensor>,
    pub optim_steps: BTreeMap<String, u64>,
    pub state: TrainerState,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct OptimSteps {
    steps: BTreeMap<String, u64>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |err| Error::Io { path: path.to_path_buf(), err }
}

fn ckpt_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), reason: reason.into() }
}

/// The directory name of a checkpoint at `step`.
pub fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:08}")
}

fn parse_step_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(STEP_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Flushes a directory entry list to disk (best effort: not every platform can open directories).
fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io_err(path))
}

fn to_json<T: serde::Serialize>(value: &T, path: &Path) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| ckpt_err(path, format!("cannot serialise: {e}")))
}

/// Writes `DIR/step-<state.step>/` and points `DIR/latest` at it; returns the step directory.
/// An existing checkpoint of the same step is replaced.
pub fn save_checkpoint(
    dir: &Path,
    weights: &BTreeMap<String, Tensor>,
    optim: &Adam,
    state: &TrainerState,
) -> Result<PathBuf> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = step_dir_name(state.step);
    let pid = std::process::id();
    let tmp = dir.join(format!(".{name}.{pid}.tmp"));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let written = write_contents(&tmp, weights, optim, state);
    if written.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written?;
    sync_dir(&tmp);

    let target = dir.join(&name);
    if target.exists() {
        // A directory cannot be renamed over a non-empty one: move the old one aside first.
        let old = dir.join(format!(".{name}.{pid}.old"));
        fs::rename(&target, &old).map_err(io_err(&target))?;
        fs::rename(&tmp, &target).map_err(io_err(&target))?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        fs::rename(&tmp, &target).map_err(io_err(&target))?;
    }
    sync_dir(dir);

    let latest = dir.join(LATEST_FILE);
    let latest_tmp = dir.join(format!(".{LATEST_FILE}.{pid}.tmp"));
    write_synced(&latest_tmp, format!("{name}\n").as_bytes())?;
    fs::rename(&latest_tmp, &latest).map_err(io_err(&latest))?;
    sync_dir(dir);
    tracing::info!(path = %target.display(), step = state.step, epoch = state.epoch, "saved checkpoint");
    Ok(target)
}

fn write_contents(dir: &Path, weights: &BTreeMap<String, Tensor>, optim: &Adam, state: &TrainerState) -> Result<()> {
    // The model's weights alone in MODEL_FILE (loadable as a model); training-only ones beside.
    let (training, model): (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) =
        weights.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(k, _)| k.starts_with(TRAINING_PREFIX));
    save_safetensors(&model, &dir.join(MODEL_FILE))?;
    if !training.is_empty() {
        save_safetensors(&training, &dir.join(TRAINING_FILE))?;
    }
    let (tensors, steps) = optim.state();
    save_safetensors(&tensors, &dir.join(OPTIM_FILE))?;
    let steps_path = dir.join(OPTIM_STEPS_FILE);
    write_synced(&steps_path, &to_json(&OptimSteps { steps }, &steps_path)?)?;
    let trainer_path = dir.join(TRAINER_FILE);
    write_synced(&trainer_path, &to_json(state, &trainer_path)?)
}

/// The step directory `DIR/latest` names, or `None` when `DIR` has no `latest` file.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let latest = dir.join(LATEST_FILE);
    let text = match fs::read_to_string(&latest) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&latest)(e)),
    };
    let name = text.trim();
    if parse_step_dir_name(name).is_none() {
        return Err(ckpt_err(&latest, format!("'{name}' is not a checkpoint directory name (step-<digits>)")));
    }
    Ok(Some(dir.join(name)))
}

/// Reads a checkpoint. `path` is a step directory, or a checkpoint directory whose `latest` file
/// names one. Every error names the file or directory at fault.
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    if !meta.is_dir() {
        return Err(ckpt_err(
            path,
            "not a directory: expected a checkpoint directory or one of its step-* directories",
        ));
    }
    let step_dir = if path.join(TRAINER_FILE).exists() {
        path.to_path_buf()
    } else {
        latest_checkpoint(path)?.ok_or_else(|| {
            ckpt_err(
                path,
                format!(
                    "neither a step directory (no {TRAINER_FILE}) nor a checkpoint directory (no '{LATEST_FILE}' file)"
                ),
            )
        })?
    };
    if !step_dir.is_dir() {
        return Err(ckpt_err(&step_dir, "the checkpoint directory named by 'latest' does not exist"));
    }

    let mut weights = Checkpoint::open(&step_dir.join(MODEL_FILE))?.load_all(device)?;
    let training = step_dir.join(TRAINING_FILE);
    if training.exists() {
        weights.extend(Checkpoint::open(&training)?.load_all(device)?);
    }
    let optim_path = step_dir.join(OPTIM_FILE);
    let optim_tensors = candle_core::safetensors::load(&optim_path, device)
        .map_err(|e| ckpt_err(&optim_path, e.to_string()))?
        .into_iter()
        .collect();
    let steps_path = step_dir.join(OPTIM_STEPS_FILE);
    let OptimSteps { steps: optim_steps } = read_json(&steps_path)?;
    let state: TrainerState = read_json(&step_dir.join(TRAINER_FILE))?;
    tracing::info!(path = %step_dir.display(), step = state.step, epoch = state.epoch, "loaded checkpoint");
    Ok(LoadedCheckpoint { path: step_dir, weights, optim_tensors, optim_steps, state })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes).map_err(|e| ckpt_err(path, format!("invalid JSON: {e}")))
}

/// Deletes all but the newest `keep` step directories of `DIR` (never the one `latest` names);
/// returns the deleted paths.
pub fn prune_checkpoints(dir: &Path, keep: usize) -> Result<Vec<PathBuf>> {
    let latest = latest_checkpoint(dir)?;
    let mut steps = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let step = entry.file_name().to_str().and_then(parse_step_dir_name);
        if let (Some(step), true) = (step, entry.path().is_dir()) {
            steps.push((step, entry.path()));
        }
    }
    steps.sort();
    let n_old = steps.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, path) in steps.into_iter().take(n_old) {
        if latest.as_ref() == Some(&path) {
            continue;
        }
        fs::remove_dir_all(&path).map_err(io_err(&path))?;
        removed.push(path);
    }
    Ok(removed)
}
