//! The training loop (TRAIN-EVAL-SPEC §6.6): per batch, build the model on the current weights,
//! forward, the DeRIS loss, backward, clip, Adam; validation, checkpoints, a JSONL log and the
//! curve picture around it.
//!
//! Every random draw (data order, NSC, sentence choice, flips, loss points) is keyed by the seed
//! and the step or sample, and checkpoints hold the weights, Adam's state and the history, so a
//! resumed run continues exactly as the uninterrupted run would have.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use candle_nn::VarBuilder;
use serde_json::{json, Value};

use super::config::TrainConfig;
use super::data::{Batch, Part, Prefetcher, TrainData};
use super::heads::{self, LinearHead};
use super::loss::{deris_loss_part, HeadOutputs, LossConfig, Normalizers, Target, WordLogits};
use super::optim::Adam;
use super::params::{Group, TrainableWeights};
use super::state::{load_checkpoint, prune_checkpoints, save_checkpoint, TrainerState};
use crate::config::{BatchCoupling, DerisConfig};
use crate::data::nsc::{Nsc, NscBank, NscConfig, NscStats};
use crate::data::rng::SplitMix64;
use crate::data::readers::coco::Instances;
use crate::data::{AnnotationSource, Layout, ObjectIndex, Split};
use crate::error::{Error, Result};
use crate::eval::protocol::{evaluate, EvalOptions, Task};
use crate::model::{Deris, ModelInputs};
use crate::pipeline::Segmenter;
use crate::preprocess::text::{Tokenizer, WordUnigramOptions};
use crate::taps::Taps;

/// Separates the loss's point draws from other users of the seed.
const LOSS_STREAM: u64 = u64::from_le_bytes(*b"DeRISlss");

/// What the loop reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// The run is set up: total steps, steps per epoch, the step it starts at (0 or resumed).
    Start { total_steps: u64, steps_per_epoch: u64, first_step: u64, trainable: usize },
    /// After each step.
    Step(&'a StepRecord),
    /// A validation started / finished.
    EvalStart { step: u64, samples: usize },
    Eval(&'a Value),
    /// A checkpoint was written.
    Checkpoint(&'a Path),
}

/// One step's numbers (a line of the JSONL log every `log_every` steps).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: u64,
    pub lr: f64,
    pub loss: f64,
    pub terms: std::collections::BTreeMap<String, f64>,
    pub grad_norm: f64,
    pub clipped: bool,
    pub samples: usize,
    pub nsc_converted: u64,
    pub nsc_eligible: u64,
    /// Wall time of the step, and of its phases.
    pub seconds: f64,
    pub timing: StepTiming,
}

/// Seconds per phase of one step.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StepTiming {
    /// Waiting for the batch (zero when loading keeps up).
    pub data: f64,
    pub forward: f64,
    /// Matching and the objective.
    pub loss: f64,
    pub backward: f64,
    /// Clipping and Adam.
    pub optimizer: f64,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: u64,
    pub last_eval: Option<Value>,
    pub nsc: NscStats,
    pub seconds: f64,
    /// The final model folder: `model.safetensors`, `config.json`, `tokenizer.spm`.
    pub model_dir: PathBuf,
}

/// A training run.
pub struct Trainer {
    cfg: TrainConfig,
    model_cfg: DerisConfig,
    out_dir: PathBuf,
    weights: TrainableWeights,
    /// The training-only heads (`loss.category_weight`, `loss.word_weight` > 0).
    heads: TrainingHeads,
    optim: Adam,
    data: Arc<TrainData>,
    val: Option<Split>,
    /// Every object of the images, when `data.objects` lists every referent of the val split:
    /// validation then also reports the [`crate::eval::DiagnosisReport`].
    val_objects: Option<Arc<ObjectIndex>>,
    tokenizer: Tokenizer,
    tokenizer_bytes: Vec<u8>,
    state: TrainerState,
    nsc_total: NscStats,
    device: Device,
}

impl Trainer {
    /// Sets up a run writing into `out_dir`; with `resume` (a checkpoint folder, or a run's
    /// `checkpoints` folder) it continues that run, whose config must be the same.
    pub fn new(cfg: TrainConfig, out_dir: &Path, resume: Option<&Path>, device: &Device) -> Result<Self> {
        cfg.validate()?;
        let model_cfg = cfg.model_config()?;
        std::fs::create_dir_all(out_dir).map_err(|err| Error::Io { path: out_dir.to_path_buf(), err })?;

        let source = data_source(&cfg)?;
        let train_split = source.read_split(&cfg.data.train_split).map_err(|e| data_error("data.train_split", e))?;
        let samples: Vec<_> = train_split.samples.iter().flat_map(|s| s.per_sentence()).collect();
        let val = match &cfg.data.val_split {
            Some(name) => Some(source.read_split(name).map_err(|e| data_error("data.val_split", e))?),
            None => None,
        };

        let (tokenizer, tokenizer_bytes) = match &cfg.tokenizer {
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|err| Error::Io { path: p.clone(), err })?;
                (Tokenizer::from_bytes(&bytes, p)?, bytes)
            }
            None => {
                let sentences: Vec<&str> = train_split.samples.iter().flat_map(|s| s.expressions.iter().map(String::as_str)).collect();
                Tokenizer::train_word_level(&sentences, WordUnigramOptions::default())?
            }
        };
        if tokenizer.xlmr_vocab_size() > model_cfg.beit3.vocab_size {
            return Err(Error::Config {
                field: "beit3.vocab_size".into(),
                reason: format!("the tokenizer has {} ids; the model embeds only {}", tokenizer.xlmr_vocab_size(), model_cfg.beit3.vocab_size),
            });
        }

        let nsc = if cfg.nsc.enabled {
            let bank = match &cfg.nsc.bank {
                Some(p) => NscBank::load(p).map_err(|e| data_error("nsc.bank", e))?,
                None => NscBank::from_samples(&train_split.samples),
            };
            Some(Nsc::new(NscConfig { rate: cfg.nsc.rate, threshold: cfg.nsc.threshold, ..NscConfig::default() }, bank))
        } else {
            None
        };
        let mut data = TrainData::new(samples, tokenizer.clone(), &model_cfg, nsc, cfg.augment, device)?;
        // Categories 0..=the largest category_id of the object list.
        let mut num_categories = 0;
        let mut val_objects = None;
        if let Some(path) = &cfg.data.objects {
            let instances = Instances::load(path).map_err(|e| data_error("data.objects", e))?;
            let objects = instances.objects_by_image().map_err(|e| data_error("data.objects", e))?;
            num_categories = objects.values().flatten().filter_map(|o| o.category_id).max().map_or(0, |m| m as usize + 1);
            let objects = Arc::new(objects);
            if val.as_ref().is_some_and(|v| lists_referents(&objects, v)) {
                val_objects = Some(objects.clone());
            }
            data = data.with_objects(objects);
        } else if cfg.loss.perception_weight > 0.0 {
            return Err(Error::Config { field: "loss.perception_weight".into(), reason: "needs data.objects (a COCO instances.json listing every object)".into() });
        }
        if cfg.loss.category_weight > 0.0 && num_categories == 0 {
            return Err(Error::Config { field: "loss.category_weight".into(), reason: "needs data.objects with category_id on its objects".into() });
        }
        let data = Arc::new(data);

        let freeze = cfg.freeze.clone();
        let frozen = frozen_rule(&freeze);
        let (mut tensors, state, optim_state) = match resume {
            Some(path) => {
                let ck = load_checkpoint(path, device)?;
                let saved: TrainConfig = serde_json::from_value(ck.state.config.clone())
                    .map_err(|e| Error::Config { field: "resume".into(), reason: format!("the checkpoint's training config is unreadable: {e}") })?;
                if !same_run(&saved, &cfg) {
                    return Err(Error::Config {
                        field: "resume".into(),
                        reason: format!("{} was written by a run with another config (only max_steps, max_minutes and epochs may change)", path.display()),
                    });
                }
                (ck.weights, ck.state, Some((ck.optim_tensors, ck.optim_steps)))
            }
            None => {
                let w = match &cfg.init.weights {
                    Some(p) => TrainableWeights::load(p, &model_cfg, device)?,
                    None => TrainableWeights::init(&model_cfg, cfg.init.seed, device)?,
                };
                let config = serde_json::to_value(&cfg).map_err(|e| Error::Config { field: "config".into(), reason: e.to_string() })?;
                (w.to_tensors(), TrainerState { step: 0, epoch: 0, batch_in_epoch: 0, seed: cfg.seed, config, history: Vec::new() }, None)
            }
        };
        let mut head = |prefix: &'static str, weight: f64, outputs: usize, dim: usize, what: &str| -> Result<Option<LinearHead>> {
            let saved = LinearHead::take_from(prefix, &mut tensors)?;
            if weight <= 0.0 {
                return Ok(None);
            }
            let head = match saved {
                Some(h) => h,
                None => LinearHead::init(prefix, outputs, dim, cfg.init.seed, device)?,
            };
            if head.outputs() != outputs {
                return Err(Error::Config {
                    field: "resume".into(),
                    reason: format!("the checkpoint's {prefix} head has {} outputs, {what} {outputs}", head.outputs()),
                });
            }
            Ok(Some(head))
        };
        let heads = TrainingHeads {
            categories: head(heads::CATEGORY, cfg.loss.category_weight, num_categories, model_cfg.predictor.hidden_dim, "data.objects")?,
            words: head(heads::WORD, cfg.loss.word_weight, model_cfg.beit3.vocab_size, model_cfg.understanding.hidden_channels, "the vocabulary")?,
        };
        let weights = TrainableWeights::from_tensors(tensors, &frozen)?;
        let head_vars = heads.vars().map(|(name, var)| (name, var.clone()));
        let params = weights
            .trainable()
            .iter()
            .map(|(name, var)| (name.clone(), var.clone()))
            .chain(head_vars)
            .map(|(name, var)| {
                let scale = lr_scale(&cfg, &name);
                (name, var, scale)
            })
            .collect();
        let mut optim = Adam::new(params, cfg.optimizer.clone())?;
        if let Some((tensors, steps)) = optim_state {
            optim.load_state(tensors, steps)?;
        }
        Ok(Self {
            cfg,
            model_cfg,
            out_dir: out_dir.to_path_buf(),
            weights,
            heads,
            optim,
            data,
            val,
            val_objects,
            tokenizer,
            tokenizer_bytes,
            state,
            nsc_total: NscStats::default(),
            device: device.clone(),
        })
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.data.batches_per_epoch(self.cfg.batch_size) as u64
    }

    /// Steps of the whole run.
    pub fn total_steps(&self) -> u64 {
        let by_epochs = self.steps_per_epoch() * self.cfg.epochs as u64;
        match self.cfg.max_steps {
            Some(m) if self.cfg.epochs == 0 => m,
            Some(m) => m.min(by_epochs),
            None => by_epochs,
        }
    }

    /// The history so far (step and eval records, as in the JSONL log).
    pub fn history(&self) -> &[Value] {
        &self.state.history
    }

    /// Trains to the end (or `max_minutes`), validating and checkpointing on the way.
    ///
    /// Errors: [`Error::Training`] for a non-finite loss or gradient norm (the last good weights
    /// are saved first, and the message names the step and the batch's samples); data, I/O and
    /// tensor errors as they come.
    pub fn run(&mut self, on_event: &mut dyn FnMut(Event<'_>)) -> Result<TrainSummary> {
        let start = Instant::now();
        let spe = self.steps_per_epoch();
        let total = self.total_steps();
        let eval_every = self.cfg.eval_every.unwrap_or(spe).max(1);
        let mut log = open_log(&self.out_dir.join("log.jsonl"))?;
        on_event(Event::Start { total_steps: total, steps_per_epoch: spe, first_step: self.state.step, trainable: self.weights.num_trainable() });
        let mut last_eval = None;
        let mut timed_out = false;
        while self.state.step < total && !timed_out {
            let epoch = self.state.step / spe;
            let first = (self.state.step % spe) as usize;
            let last = (spe.min(first as u64 + total - self.state.step)) as usize;
            let mut batches = Prefetcher::start(self.data.clone(), self.state.seed, epoch, self.cfg.batch_size, first, last, 2);
            let mut t0 = Instant::now();
            while let Some((b, batch)) = batches.next_batch() {
                let batch = batch?;
                let waited = t0.elapsed().as_secs_f64();
                let mut record = self.step(&batch, epoch, b)?;
                record.timing.data = waited;
                record.seconds = t0.elapsed().as_secs_f64();
                on_event(Event::Step(&record));
                if record.step % self.cfg.log_every == 0 || record.step == total {
                    let line = json!({"type": "step", "record": record});
                    writeln!(log, "{line}").map_err(|err| Error::Io { path: self.out_dir.join("log.jsonl"), err })?;
                    self.state.history.push(line);
                }
                let out_of_time = self.cfg.max_minutes.is_some_and(|m| start.elapsed().as_secs_f64() > m * 60.0);
                let end = record.step == total || out_of_time;
                if record.step % eval_every == 0 || end {
                    if let Some(v) = self.validate(on_event)? {
                        writeln!(log, "{v}").map_err(|err| Error::Io { path: self.out_dir.join("log.jsonl"), err })?;
                        self.state.history.push(v.clone());
                        last_eval = Some(v);
                    }
                }
                if record.step % self.cfg.checkpoint_every == 0 || end {
                    let path = self.checkpoint()?;
                    on_event(Event::Checkpoint(&path));
                }
                if out_of_time {
                    timed_out = true;
                    break;
                }
                t0 = Instant::now();
            }
        }
        let model_dir = self.export(&self.out_dir.join("model"))?;
        super::curve::write_curve(&self.state.history, &self.out_dir.join("curve.png"))?;
        Ok(TrainSummary { steps: self.state.step, last_eval, nsc: self.nsc_total, seconds: start.elapsed().as_secs_f64(), model_dir })
    }

    /// One optimisation step on `batch` (batch number `b` of `epoch`): each chunk of each replica
    /// runs forward, loss (with its replica's divisors) and backward on its part of the batch in
    /// parallel; the chunks' gradients are summed and the replicas' averaged.
    fn step(&mut self, batch: &Batch, epoch: u64, b: usize) -> Result<StepRecord> {
        let step = self.state.step + 1;
        let (replicas, chunks) = (self.cfg.replicas.max(1), self.cfg.chunks.max(1));
        let model = self.weights.build(&self.model_cfg)?;
        // One part per chunk of each replica, replica by replica (fewer in a short last batch).
        let parts = batch.split(replicas, chunks)?;
        // The replicas that have samples (all but in a last batch shorter than `replicas`).
        let replicas = parts.iter().map(|p| p.replica + 1).max().unwrap_or(1);
        // §5.4: `num_masks` is all-reduced (summed) and divided by the number of GPUs.
        let per_gpu = |count: fn(&Target) -> usize| (batch.targets.iter().map(count).sum::<usize>() as f64 / replicas as f64).max(1.0);
        let (num_masks, num_objects) = (per_gpu(Target::num_targets), per_gpu(Target::num_objects));
        let (queries, no_object) = (self.model_cfg.predictor.num_queries, self.cfg.loss.no_object_weight);
        let norms: Vec<Normalizers> = batch.replica_targets(replicas).iter().map(|t| Normalizers::new(t, queries, no_object, num_masks, num_objects)).collect();
        let (seed, coupling, loss_cfg, run_heads) = (self.state.seed, self.model_cfg.runtime.batch_coupling, &self.cfg.loss, &self.heads);
        let run = |(p, part): (usize, Part<'_>)| {
            let rng = SplitMix64::from_key(&[LOSS_STREAM, seed, step, p as u64]);
            replica_step(&model, run_heads, &part.inputs, part.targets, coupling, loss_cfg, &norms[part.replica], rng)
        };
        let results: Vec<std::result::Result<ReplicaResult, ReplicaError>> = parts.into_par_iter().enumerate().map(run).collect();
        let mut done = Vec::with_capacity(replicas * chunks);
        for result in results {
            match result {
                Ok(r) => done.push(r),
                Err(ReplicaError::Stop(what)) => return Err(self.stop(step, b, batch, &what)),
                Err(ReplicaError::Fail(e)) => return Err(*e),
            }
        }
        let mut timing = StepTiming::default();
        for r in &done {
            timing.forward = timing.forward.max(r.timing.forward);
            timing.loss = timing.loss.max(r.timing.loss);
            timing.backward = timing.backward.max(r.timing.backward);
        }
        let value = done.iter().map(|r| r.value).sum::<f64>() / replicas as f64;
        let mut terms = std::collections::BTreeMap::new();
        for r in &done {
            for (k, v) in &r.terms {
                *terms.entry(k.clone()).or_insert(0.0) += v / replicas as f64;
            }
        }
        let clock = Instant::now();
        let head_vars = self.heads.vars().map(|(_, v)| v.as_tensor().clone());
        let vars = self.weights.trainable().values().map(|v| v.as_tensor().clone()).chain(head_vars);
        let grads = average_gradients(done.into_iter().map(|r| r.grads).collect(), vars, replicas)?;
        let factor = self.cfg.schedule.factor(epoch as usize);
        // Adam checks the gradients (finite norm, shapes) before it updates anything.
        let stats = match self.optim.step(&grads, factor) {
            Ok(stats) => stats,
            Err(e) => return Err(self.stop(step, b, batch, &e.to_string())),
        };
        timing.optimizer = clock.elapsed().as_secs_f64();
        self.state.step = step;
        self.state.epoch = epoch as usize;
        self.state.batch_in_epoch = b + 1;
        self.nsc_total.converted += batch.nsc.converted;
        self.nsc_total.eligible += batch.nsc.eligible;
        self.nsc_total.gave_up += batch.nsc.gave_up;
        self.nsc_total.no_target += batch.nsc.no_target;
        Ok(StepRecord {
            step,
            epoch,
            lr: self.cfg.optimizer.lr * factor,
            loss: value,
            terms,
            grad_norm: stats.grad_norm,
            clipped: stats.clipped,
            samples: batch.indices.len(),
            nsc_converted: batch.nsc.converted,
            nsc_eligible: batch.nsc.eligible,
            seconds: 0.0,
            timing,
        })
    }

    /// The error of a stopped run, after saving the last good weights.
    fn stop(&self, step: u64, b: usize, batch: &Batch, what: &str) -> Error {
        let saved = match self.checkpoint() {
            Ok(p) => format!("the last good weights are in {}", p.display()),
            Err(e) => format!("saving the last good weights failed too: {e}"),
        };
        Error::Training { step, reason: format!("{what} on batch {b} of epoch {} (samples {:?}); {saved}", self.state.epoch, batch.indices) }
    }

    fn checkpoint(&self) -> Result<PathBuf> {
        let dir = self.out_dir.join("checkpoints");
        let mut tensors = self.weights.to_tensors();
        tensors.extend(self.heads.tensors());
        let path = save_checkpoint(&dir, &tensors, &self.optim, &self.state)?;
        prune_checkpoints(&dir, self.cfg.keep_checkpoints.max(1))?;
        Ok(path)
    }

    /// A model on detached copies of the current weights (no gradient bookkeeping).
    fn inference_model(&self) -> Result<Deris> {
        let tensors: std::collections::HashMap<String, Tensor> =
            self.weights.to_tensors().into_iter().map(|(k, v)| (k, v.detach())).collect();
        Ok(Deris::new(&self.model_cfg, VarBuilder::from_tensors(tensors, DType::F32, &self.device))?)
    }

    /// Validation on the val split (the config's score threshold, the reference protocol), with
    /// the diagnosis when `val_objects` are known.
    fn validate(&mut self, on_event: &mut dyn FnMut(Event<'_>)) -> Result<Option<Value>> {
        let Some(split) = &self.val else { return Ok(None) };
        let segmenter = Segmenter::new(self.inference_model()?, self.tokenizer.clone(), self.device.clone())?.with_query_masks(self.val_objects.is_some());
        let mut options = EvalOptions::new(Task::for_layout(split.layout));
        options.limit = self.cfg.data.val_limit;
        options.objects = self.val_objects.clone();
        options.batch_size = self.cfg.batch_size.max(8);
        on_event(Event::EvalStart { step: self.state.step, samples: options.limit.unwrap_or(usize::MAX).min(split.len()) });
        let report = evaluate(&segmenter, split, &options, |_| Ok::<(), Error>(()))
            .map_err(|e| Error::Training { step: self.state.step, reason: format!("validation: {e}") })?;
        let mut v = json!({"type": "eval", "step": self.state.step, "epoch": self.state.epoch, "split": report.split,
                           "samples": report.evaluated, "metrics": report.summary_json(), "seconds": report.seconds});
        if let (Some(d), Value::Object(m)) = (&report.diagnosis, &mut v) {
            m.insert("diagnosis".into(), serde_json::to_value(d).map_err(|e| Error::Training { step: self.state.step, reason: e.to_string() })?);
        }
        on_event(Event::Eval(&v));
        Ok(Some(v))
    }

    /// Writes a ready-to-use model folder: weights, model config, tokenizer.
    pub fn export(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|err| Error::Io { path: dir.to_path_buf(), err })?;
        crate::checkpoint::save_safetensors(&self.weights.to_tensors(), &dir.join("model.safetensors"))?;
        write_file(&dir.join("config.json"), self.model_cfg.to_json().as_bytes())?;
        write_file(&dir.join("tokenizer.spm"), &self.tokenizer_bytes)?;
        Ok(dir.to_path_buf())
    }
}

/// Every referent of `split` is among `objects` (by image and annotation id).
fn lists_referents(objects: &ObjectIndex, split: &Split) -> bool {
    split.samples.iter().all(|s| {
        let listed = objects.get(&s.image_id).map_or(&[][..], Vec::as_slice);
        s.targets.iter().all(|t| t.ann_id.is_some() && listed.iter().any(|o| o.target.ann_id == t.ann_id))
    })
}

/// What one replica hands back: its gradients, loss value and terms, and phase times.
struct ReplicaResult {
    grads: GradStore,
    value: f64,
    terms: std::collections::BTreeMap<String, f64>,
    timing: StepTiming,
}

enum ReplicaError {
    /// Non-finite predictions or loss: the run stops with this reason.
    Stop(String),
    Fail(Box<Error>),
}

impl From<candle_core::Error> for ReplicaError {
    fn from(e: candle_core::Error) -> Self {
        ReplicaError::Fail(Box::new(e.into()))
    }
}

/// Forward, loss and backward of one replica's samples.
fn replica_step(
    model: &Deris,
    heads: &TrainingHeads,
    inputs: &ModelInputs,
    targets: &[Target],
    coupling: BatchCoupling,
    cfg: &LossConfig,
    norm: &Normalizers,
    mut rng: SplitMix64,
) -> std::result::Result<ReplicaResult, ReplicaError> {
    let mut timing = StepTiming::default();
    let mut clock = Instant::now();
    let mut lap = |field: &mut f64| {
        *field = clock.elapsed().as_secs_f64();
        clock = Instant::now();
    };
    let out = model.forward(inputs, coupling, &mut Taps::off())?;
    lap(&mut timing.forward);
    // The matcher cannot work on non-finite predictions: name them before it fails.
    let mut scored = vec![("pred_masks", &out.pred_masks), ("pred_refer_logits", &out.pred_refer_logits), ("pred_existence", &out.pred_existence)];
    for r in &out.aux {
        scored.extend([("aux pred_masks", &r.pred_masks_lowres), ("aux pred_refer_logits", &r.pred_refer_logits)]);
    }
    for (name, t) in scored {
        if !t.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?.is_finite() {
            return Err(ReplicaError::Stop(format!("the model's {name} are not finite")));
        }
    }
    let head_outputs = HeadOutputs {
        categories: match &heads.categories {
            Some(head) => head.round_logits(&out)?,
            None => Vec::new(),
        },
        words: match &heads.words {
            Some(head) => Some(WordLogits {
                logits: head.forward(&out.text_feat)?,
                ids: inputs.ref_expr_inds.clone(),
                padding: inputs.text_attention_mask.clone(),
            }),
            None => None,
        },
    };
    let loss = deris_loss_part(&out, targets, cfg, norm, &head_outputs, &mut rng)?;
    let value = loss.total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    lap(&mut timing.loss);
    if !value.is_finite() {
        return Err(ReplicaError::Stop(format!("the loss is {value}")));
    }
    let grads = loss.total.backward()?;
    lap(&mut timing.backward);
    Ok(ReplicaResult { grads, value, terms: loss.terms, timing })
}

/// The training-only heads of a run ([`heads`]).
struct TrainingHeads {
    categories: Option<LinearHead>,
    words: Option<LinearHead>,
}

impl TrainingHeads {
    /// Every head's variables, by checkpoint key.
    fn vars(&self) -> impl Iterator<Item = (String, &candle_core::Var)> {
        self.categories.iter().chain(&self.words).flat_map(LinearHead::vars)
    }

    /// Every head's tensors, by checkpoint key.
    fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.categories.iter().chain(&self.words).flat_map(LinearHead::tensors).collect()
    }
}

/// Each trainable variable's gradient summed over the parts and divided by `replicas`: the
/// chunks of a replica add up to its gradient, and the replicas' gradients are averaged (DDP's
/// all-reduce). A variable without a gradient in some part counts zero there.
fn average_gradients(mut stores: Vec<GradStore>, vars: impl Iterator<Item = Tensor>, replicas: usize) -> Result<GradStore> {
    let mut first = stores.remove(0);
    if stores.is_empty() && replicas == 1 {
        return Ok(first);
    }
    for var in vars {
        let mut sum: Option<Tensor> = first.remove(&var);
        for s in &mut stores {
            if let Some(g) = s.remove(&var) {
                sum = Some(match sum {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        if let Some(g) = sum {
            first.insert(&var, (g / replicas as f64)?);
        }
    }
    Ok(first)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("part");
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path)).map_err(|err| Error::Io { path: path.to_path_buf(), err })
}

fn open_log(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|err| Error::Io { path: path.to_path_buf(), err })
}

/// A parameter is frozen when its name contains one of `freeze`.
fn frozen_rule(freeze: &[String]) -> impl Fn(&str) -> bool + '_ {
    move |name: &str| freeze.iter().any(|f| name.contains(f.as_str()))
}

fn lr_scale(cfg: &TrainConfig, name: &str) -> f64 {
    cfg.lr_scales.get(Group::of(name).name()).copied().unwrap_or(1.0)
}

/// Two configs describe the same run when only the stopping rules differ.
fn same_run(a: &TrainConfig, b: &TrainConfig) -> bool {
    let strip = |c: &TrainConfig| TrainConfig { max_steps: None, max_minutes: None, epochs: 0, ..c.clone() };
    strip(a) == strip(b)
}

fn data_source(cfg: &TrainConfig) -> Result<AnnotationSource> {
    let mut source = AnnotationSource::new(&cfg.data.annotations, &cfg.data.image_root);
    if let Some(name) = &cfg.data.layout {
        let layout = match name.as_str() {
            "seqtr_mixed_seg" => Layout::SeqtrMixedSeg,
            "deris_grefs" => Layout::DerisGrefs,
            "refer_pickle" => Layout::ReferPickle,
            "rela_grefs" => Layout::RelaGrefs,
            other => {
                return Err(Error::Config {
                    field: "data.layout".into(),
                    reason: format!("unknown layout {other:?} (seqtr_mixed_seg, deris_grefs, refer_pickle, rela_grefs)"),
                })
            }
        };
        source = source.with_layout(layout);
    }
    if let Some(i) = &cfg.data.instances {
        source = source.with_instances(i);
    }
    Ok(source)
}

fn data_error(field: &str, e: impl std::fmt::Display) -> Error {
    Error::Config { field: field.into(), reason: e.to_string() }
}
