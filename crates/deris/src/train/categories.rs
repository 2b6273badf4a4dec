//! A training-only category head: Mask2Former's class head for a perception branch trained from
//! scratch (`loss.category_weight`).
//!
//! The authors' perception branch comes pretrained as a Mask2Former instance segmenter, whose
//! class head made each query carry *what* its object is; DeRIS's own `cls_embed` only tells an
//! object from none. Without that pretraining the queries learn *where* their object is and
//! little of its kind, and the referring head has nothing to match the words against. This head,
//! `Linear(d → C)` on every round's `decoder_norm(query)` ([`crate::DerisOutput::query_norm`]),
//! is trained to name the category (COCO `category_id`) of the object each query is matched to
//! by the perception loss. It is not part of the model: checkpoints keep it (keys
//! `train.category_embed.*`, in their `training_heads.safetensors`) so that runs resume exactly;
//! model files leave it out.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor, Var};

use super::params::init_tensor;
use crate::DerisOutput;

/// The checkpoint keys of the head.
pub const WEIGHT: &str = "train.category_embed.weight";
pub const BIAS: &str = "train.category_embed.bias";

/// `Linear(d → C)` from the queries to the category logits.
#[derive(Debug, Clone)]
pub struct CategoryHead {
    /// `[C, d]`
    weight: Var,
    /// `[C]`
    bias: Var,
}

impl CategoryHead {
    /// A fresh head for categories `0..num_categories` on `dim`-wide queries: Xavier-uniform
    /// weight, zero bias, drawn from `seed` as the model's own weights are.
    pub fn init(num_categories: usize, dim: usize, seed: u64, device: &Device) -> crate::Result<Self> {
        let weight = init_tensor(WEIGHT, &[num_categories, dim], candle_core::DType::F32, seed, device)?;
        let bias = init_tensor(BIAS, &[num_categories], candle_core::DType::F32, seed, device)?;
        Ok(Self { weight: Var::from_tensor(&weight)?, bias: Var::from_tensor(&bias)? })
    }

    /// Takes the head's tensors out of a checkpoint's weights (`None` when it has none).
    pub fn take_from(tensors: &mut BTreeMap<String, Tensor>) -> Result<Option<Self>> {
        match (tensors.remove(WEIGHT), tensors.remove(BIAS)) {
            (Some(w), Some(b)) => Ok(Some(Self { weight: Var::from_tensor(&w)?, bias: Var::from_tensor(&b)? })),
            (None, None) => Ok(None),
            _ => candle_core::bail!("checkpoint: {WEIGHT} and {BIAS} must come together"),
        }
    }

    /// Number of categories `C`.
    pub fn num_categories(&self) -> usize {
        self.bias.dims()[0]
    }

    /// The trainable variables, by checkpoint key.
    pub fn vars(&self) -> [(&'static str, &Var); 2] {
        [(WEIGHT, &self.weight), (BIAS, &self.bias)]
    }

    /// The tensors to checkpoint, by key.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars().into_iter().map(|(k, v)| (k.to_string(), v.as_tensor().clone())).collect()
    }

    /// Category logits of every round, the final round first, then the auxiliary rounds in order
    /// (the loss's round order): `[B, N, C]` each.
    pub fn logits(&self, out: &DerisOutput) -> Result<Vec<Tensor>> {
        std::iter::once(&out.query_norm).chain(out.aux.iter().map(|r| &r.query_norm)).map(|z| self.forward(z)).collect()
    }

    /// `[B, N, d]` → `[B, N, C]`.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())
    }
}
