//! The epoch-level learning-rate factor (TRAIN-EVAL-SPEC §6.5, the authors' `MultiStepLRWarmUp`
//! in `deris/core/scheduler.py`): linear warm-up over whole epochs, then step decay. The factor
//! multiplies every group's base lr and is constant within an epoch.

/// Warm-up epochs and decay milestones (1-indexed epoch counts, ascending).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Schedule {
    pub warmup_epochs: usize,
    /// Epoch counts after which the factor is multiplied by `decay_ratio`: epoch `e` (0-indexed)
    /// is decayed once for each milestone `s` with `e + 1 ≥ s`, scanning in order and stopping
    /// at the first milestone not reached (the reference's loop; the same for ascending lists).
    pub decay_steps: Vec<usize>,
    pub decay_ratio: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::grefcoco()
    }
}

impl Schedule {
    /// RefCOCO/+/g (MixedSeg) B and L: 1 warm-up epoch, ×0.1 after epochs 15 and 19 (20 epochs).
    pub fn refcoco() -> Self {
        Schedule { warmup_epochs: 1, decay_steps: vec![15, 19], decay_ratio: 0.1 }
    }

    /// gRefCOCO B and L: no warm-up, ×0.1 after epoch 6 (6 epochs).
    pub fn grefcoco() -> Self {
        Schedule { warmup_epochs: 0, decay_steps: vec![6], decay_ratio: 0.1 }
    }

    /// The lr factor of 0-indexed `epoch`.
    pub fn factor(&self, epoch: usize) -> f64 {
        if epoch < self.warmup_epochs {
            return (epoch + 1) as f64 / (self.warmup_epochs + 1) as f64;
        }
        self.decay_steps.iter().take_while(|&&s| epoch + 1 >= s).fold(1.0, |f, _| f * self.decay_ratio)
    }
}
