//! Training-only heads for a model trained from scratch: they give the loss something to say
//! about what the authors' pretrained parts already knew, and are not part of the model.
//!
//! - **category head** (`loss.category_weight`): the authors' perception branch comes pretrained
//!   as a Mask2Former instance segmenter, whose class head made each query carry *what* its
//!   object is; DeRIS's own `cls_embed` only tells an object from none. Without that pretraining
//!   the queries learn *where* their object is and little of its kind. This head, `Linear(d → C)`
//!   on every round's `decoder_norm(query)` ([`crate::DerisOutput::query_norm`]), names the
//!   category (COCO `category_id`) of the object each query is matched to by the perception loss.
//! - **word head** (`loss.word_weight`): the authors' BEiT-3 comes pretrained on text, so its
//!   text tokens keep the meaning of their words. Trained from scratch together with the
//!   perception terms, the tiny BEiT-3's text features lost it (the text feature of a colour word
//!   hardly changed with the colour: cosine 0.95 between "red" and "blue"), and the referring head
//!   had nothing to match the queries against. This head, `Linear(d → V)` on the text features
//!   ([`crate::DerisOutput::text_feat`]), names each real token's id.
//!
//! Checkpoints keep the heads (keys `train.category_embed.*`, `train.word_embed.*`, in their
//! `training_heads.safetensors`) so that runs resume exactly; model files leave them out.

use std::collections::BTreeMap;

use candle_core::{Device, Result, Tensor, Var};

use super::params::init_tensor;
use crate::DerisOutput;

/// Key prefix of the category head.
pub const CATEGORY: &str = "train.category_embed";
/// Key prefix of the word head.
pub const WORD: &str = "train.word_embed";

/// A training-only `Linear(d → K)`, its checkpoint keys `{prefix}.weight`, `{prefix}.bias`.
#[derive(Debug, Clone)]
pub struct LinearHead {
    prefix: &'static str,
    /// `[K, d]`
    weight: Var,
    /// `[K]`
    bias: Var,
}

impl LinearHead {
    /// A fresh head with `outputs` classes on `dim`-wide features: Xavier-uniform weight, zero
    /// bias, drawn from `seed` as the model's own weights are.
    pub fn init(prefix: &'static str, outputs: usize, dim: usize, seed: u64, device: &Device) -> crate::Result<Self> {
        let weight = init_tensor(&format!("{prefix}.weight"), &[outputs, dim], candle_core::DType::F32, seed, device)?;
        let bias = init_tensor(&format!("{prefix}.bias"), &[outputs], candle_core::DType::F32, seed, device)?;
        Ok(Self { prefix, weight: Var::from_tensor(&weight)?, bias: Var::from_tensor(&bias)? })
    }

    /// Takes the head `prefix` out of a checkpoint's weights (`None` when it has none).
    pub fn take_from(prefix: &'static str, tensors: &mut BTreeMap<String, Tensor>) -> Result<Option<Self>> {
        let (w, b) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        match (tensors.remove(&w), tensors.remove(&b)) {
            (Some(weight), Some(bias)) => Ok(Some(Self { prefix, weight: Var::from_tensor(&weight)?, bias: Var::from_tensor(&bias)? })),
            (None, None) => Ok(None),
            _ => candle_core::bail!("checkpoint: {w} and {b} must come together"),
        }
    }

    /// Number of classes `K`.
    pub fn outputs(&self) -> usize {
        self.bias.dims()[0]
    }

    /// The trainable variables, by checkpoint key.
    pub fn vars(&self) -> [(String, &Var); 2] {
        [(format!("{}.weight", self.prefix), &self.weight), (format!("{}.bias", self.prefix), &self.bias)]
    }

    /// The tensors to checkpoint, by key.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.vars().into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
    }

    /// `[…, d]` → `[…, K]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        z.broadcast_matmul(&self.weight.as_tensor().t()?)?.broadcast_add(self.bias.as_tensor())
    }

    /// The category head's logits of every round, the final round first, then the auxiliary
    /// rounds in order (the loss's round order): `[B, N, C]` each.
    pub fn round_logits(&self, out: &DerisOutput) -> Result<Vec<Tensor>> {
        std::iter::once(&out.query_norm).chain(out.aux.iter().map(|r| &r.query_norm)).map(|z| self.forward(z)).collect()
    }
}
