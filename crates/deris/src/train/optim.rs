//! Adam with AMSGrad and global gradient-norm clipping (TRAIN-EVAL-SPEC §6.1, §6.6).
//!
//! [`Adam`] follows `torch.optim.Adam` (L2 weight decay, AMSGrad on the *uncorrected* second
//! moment, one step counter per parameter) preceded by `torch.nn.utils.clip_grad_norm_` over every
//! gradient present. Each parameter carries its group's learning-rate multiplier (§6.2: BEiT-3 ½,
//! the rest 1); the epoch schedule's factor (§6.5) is passed to every [`Adam::step`].
//!
//! The arithmetic runs in f32 candle ops on the parameters' device and is never recorded for
//! backprop (the update is written with `Var::set`).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// Hyper-parameters; the defaults are the released configs' (§6.1, §6.6).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct AdamConfig {
    /// Base learning rate (group multipliers and the schedule factor scale it).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Normalise by the running maximum of the second moment (torch's `amsgrad`).
    pub amsgrad: bool,
    /// L2 penalty added to the gradient (torch Adam's `weight_decay`, not AdamW's).
    pub weight_decay: f64,
    /// Global L2 norm the gradients are clipped to; `None` disables clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-9,
            amsgrad: true,
            weight_decay: 0.0,
            max_grad_norm: Some(0.15),
        }
    }
}

/// What one [`Adam::step`] did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping (accumulated in f64).
    pub grad_norm: f64,
    /// True when the gradients were scaled down.
    pub clipped: bool,
    /// Number of parameters that had a gradient and were updated.
    pub updated: usize,
}

/// One parameter and its moments (f32, zeros until its first step, as torch's lazy state).
struct Slot {
    name: String,
    var: Var,
    lr_scale: f64,
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    /// Present iff `amsgrad`.
    max_exp_avg_sq: Option<Tensor>,
}

/// `torch.optim.Adam` over named parameters, each with its group's lr multiplier.
///
/// The update is written into each `Var`'s storage in place: tensors cloned from the variables
/// (for example a weights map for [`super::state::save_checkpoint`]) see later steps.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const MAX_EXP_AVG_SQ: &str = "max_exp_avg_sq";

fn state_err(reason: String) -> Error {
    Error::Input { name: "optimizer state".into(), reason }
}

impl Adam {
    /// `params`: `(name, variable, lr multiplier)`; names must be unique (they key the state).
    pub fn new(params: Vec<(String, Var, f64)>, cfg: AdamConfig) -> Result<Self> {
        let mut seen = std::collections::BTreeSet::new();
        let mut slots = Vec::with_capacity(params.len());
        for (name, var, lr_scale) in params {
            if !seen.insert(name.clone()) {
                return Err(state_err(format!("parameter '{name}' is listed twice")));
            }
            let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
            let max_exp_avg_sq = if cfg.amsgrad { Some(zeros()?) } else { None };
            slots.push(Slot { exp_avg: zeros()?, exp_avg_sq: zeros()?, max_exp_avg_sq, name, var, lr_scale, step: 0 });
        }
        Ok(Adam { cfg, slots })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// Number of parameters handled.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The step counter of a parameter (0 before its first update), `None` for an unknown name.
    pub fn param_step(&self, name: &str) -> Option<u64> {
        self.slots.iter().find(|s| s.name == name).map(|s| s.step)
    }

    /// Clips, then updates every parameter that has a gradient in `grads` with
    /// lr = `cfg.lr · lr_factor · lr_scale`. Parameters without a gradient are left alone and their
    /// step counter does not advance (torch's `grad is None`).
    ///
    /// Clipping is torch's `clip_grad_norm_`: total = ‖(‖g₁‖, ‖g₂‖, …)‖₂; coefficient
    /// `max_norm / (total + 1e-6)`, applied only when below 1. A non-finite norm is an error and
    /// nothing is updated (torch would silently write NaN into every parameter).
    pub fn step(&mut self, grads: &GradStore, lr_factor: f64) -> candle_core::Result<StepStats> {
        let present: Vec<(usize, &Tensor)> =
            self.slots.iter().enumerate().filter_map(|(i, s)| grads.get(s.var.as_tensor()).map(|g| (i, g))).collect();
        for &(i, grad) in &present {
            let s = &self.slots[i];
            if grad.shape() != s.var.shape() {
                candle_core::bail!(
                    "Adam step: the gradient of '{}' has shape {:?}, the parameter {:?}; no parameter was updated",
                    s.name,
                    grad.dims(),
                    s.var.dims()
                );
            }
        }
        let grad_norm = global_norm(present.iter().map(|(_, g)| *g))?;
        if !grad_norm.is_finite() {
            candle_core::bail!("Adam step: the gradient norm is {grad_norm}; no parameter was updated");
        }
        let clip_coef = match self.cfg.max_grad_norm {
            Some(max_norm) => max_norm / (grad_norm + 1e-6),
            None => 1.0,
        };
        let clipped = clip_coef < 1.0;
        let updated = present.len();
        let cfg = self.cfg.clone();
        for (i, grad) in present {
            let slot = &mut self.slots[i];
            let mut g = grad.detach().to_dtype(DType::F32)?;
            if clipped {
                g = (g * clip_coef)?;
            }
            update(slot, g, &cfg, cfg.lr * lr_factor * slot.lr_scale)?;
        }
        Ok(StepStats { grad_norm, clipped, updated })
    }

    /// The moments as tensors named `exp_avg.<param>`, `exp_avg_sq.<param>` and (AMSGrad)
    /// `max_exp_avg_sq.<param>`, and each parameter's step counter.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, BTreeMap<String, u64>) {
        let mut tensors = BTreeMap::new();
        let mut steps = BTreeMap::new();
        for s in &self.slots {
            tensors.insert(format!("{EXP_AVG}.{}", s.name), s.exp_avg.clone());
            tensors.insert(format!("{EXP_AVG_SQ}.{}", s.name), s.exp_avg_sq.clone());
            if let Some(m) = &s.max_exp_avg_sq {
                tensors.insert(format!("{MAX_EXP_AVG_SQ}.{}", s.name), m.clone());
            }
            steps.insert(s.name.clone(), s.step);
        }
        (tensors, steps)
    }

    /// Restores [`Adam::state`]'s output. The entries must match the parameters exactly: every
    /// missing, unexpected or wrongly shaped entry is listed in one error and nothing is changed.
    /// Tensors are moved to each parameter's device as f32.
    pub fn load_state(
        &mut self,
        mut tensors: BTreeMap<String, Tensor>,
        mut steps: BTreeMap<String, u64>,
    ) -> Result<()> {
        let mut problems = Vec::new();
        let mut restored = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let mut take = |kind: &str| -> Option<Tensor> {
                let key = format!("{kind}.{}", s.name);
                match tensors.remove(&key) {
                    None => {
                        problems.push(format!("missing '{key}'"));
                        None
                    }
                    Some(t) if t.shape() != s.var.shape() => {
                        problems.push(format!("'{key}' has shape {:?}, the parameter {:?}", t.dims(), s.var.dims()));
                        None
                    }
                    Some(t) => Some(t),
                }
            };
            let m = take(EXP_AVG);
            let v = take(EXP_AVG_SQ);
            let vmax = if self.cfg.amsgrad { take(MAX_EXP_AVG_SQ).map(Some) } else { Some(None) };
            let step = steps.remove(&s.name);
            if step.is_none() {
                problems.push(format!("missing the step count of '{}'", s.name));
            }
            if let (Some(m), Some(v), Some(vmax), Some(step)) = (m, v, vmax, step) {
                restored.push((m, v, vmax, step));
            }
        }
        problems.extend(tensors.keys().map(|k| format!("unexpected '{k}'")));
        problems.extend(steps.keys().map(|k| format!("unexpected step count for '{k}'")));
        if !problems.is_empty() {
            let n = problems.len();
            let mut reason = format!("{n} problem(s) restoring Adam's state:");
            for p in problems.iter().take(20) {
                reason.push_str(&format!("\n  {p}"));
            }
            if n > 20 {
                reason.push_str(&format!("\n  … and {} more", n - 20));
            }
            return Err(state_err(reason));
        }
        let mut converted = Vec::with_capacity(restored.len());
        for (s, (m, v, vmax, step)) in self.slots.iter().zip(restored) {
            let to = |t: Tensor| t.to_device(s.var.device())?.to_dtype(DType::F32);
            converted.push((to(m)?, to(v)?, vmax.map(to).transpose()?, step));
        }
        for (s, (m, v, vmax, step)) in self.slots.iter_mut().zip(converted) {
            s.exp_avg = m;
            s.exp_avg_sq = v;
            s.max_exp_avg_sq = vmax;
            s.step = step;
        }
        Ok(())
    }
}

/// L2 norm over all tensors, each squared and summed in f64 on its device, one transfer per device.
fn global_norm<'a>(grads: impl Iterator<Item = &'a Tensor>) -> candle_core::Result<f64> {
    let mut per_device: Vec<Tensor> = Vec::new();
    let mut total = 0f64;
    let mut flush = |sums: &mut Vec<Tensor>| -> candle_core::Result<()> {
        if !sums.is_empty() {
            total += Tensor::stack(sums, 0)?.sum_all()?.to_scalar::<f64>()?;
            sums.clear();
        }
        Ok(())
    };
    for g in grads {
        if per_device.first().is_some_and(|t| !t.device().same_device(g.device())) {
            flush(&mut per_device)?;
        }
        per_device.push(g.detach().to_dtype(DType::F64)?.sqr()?.sum_all()?);
    }
    flush(&mut per_device)?;
    Ok(total.sqrt())
}

/// torch's single-tensor Adam update of one parameter with (already clipped) f32 gradient `g`.
fn update(s: &mut Slot, mut g: Tensor, cfg: &AdamConfig, lr: f64) -> candle_core::Result<()> {
    let p = s.var.as_tensor().detach();
    let p32 = p.to_dtype(DType::F32)?;
    if cfg.weight_decay != 0.0 {
        g = (g + (&p32 * cfg.weight_decay)?)?;
    }
    s.step += 1;
    let t = s.step as f64;
    s.exp_avg = ((&s.exp_avg * cfg.beta1)? + (&g * (1.0 - cfg.beta1))?)?;
    s.exp_avg_sq = ((&s.exp_avg_sq * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
    let second = match &mut s.max_exp_avg_sq {
        Some(vmax) => {
            *vmax = vmax.maximum(&s.exp_avg_sq)?;
            &*vmax
        }
        None => &s.exp_avg_sq,
    };
    let step_size = lr / (1.0 - cfg.beta1.powf(t));
    let bias_correction2_sqrt = (1.0 - cfg.beta2.powf(t)).sqrt();
    let denom = ((second.sqrt()? / bias_correction2_sqrt)? + cfg.eps)?;
    let new = (p32 - (s.exp_avg.div(&denom)? * step_size)?)?;
    s.var.set(&new.to_dtype(p.dtype())?)
}
