//! `MultiGrainAligner` (`deris/models/branchs/understanding_branch/understanding_branch_loopback.py`):
//! a `DetrTransformerDecoder` of `BaseTransformerLayer`s (`deris/models/heads/transformers/`)
//! in which the perception queries attend to the text features (MODEL-SPEC §7).
//!
//! Keys: `understanding_branch.roialigner.TextCorrelation.*`.
//!
//! Every layer is post-norm with the order `self_attn, norm, cross_attn, norm, ffn, norm`, no
//! position embeddings, −inf on padded text keys; a final `post_norm_layer` closes the stack.
//! The attentions are `nn.MultiheadAttention(batch_first=True)`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::nn::fused::LayerNorm;
use crate::config::DerisConfig;
use crate::nn::mha::{key_padding_bias, MultiheadAttention};
use crate::taps::Taps;

/// `nn.LayerNorm`'s default epsilon, which the aligner keeps.
const LN_EPS: f64 = 1e-5;

/// The mmcv-style `FFN`: `Linear → ReLU → Linear` (keys `layers.0.0`, `layers.1`); the residual
/// is added by the caller.
#[derive(Debug, Clone)]
struct Ffn {
    fc1: Linear,
    fc2: Linear,
}

impl Ffn {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        Ok(Self {
            fc1: crate::nn::linear(dim, hidden, vb.pp(0).pp(0))?,
            fc2: crate::nn::linear(hidden, dim, vb.pp(1))?,
        })
    }
}

impl Module for Ffn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.relu()?)
    }
}

/// `BaseTransformerLayer` with `operation_order = (self_attn, norm, cross_attn, norm, ffn, norm)`.
#[derive(Debug, Clone)]
struct BaseTransformerLayer {
    self_attn: MultiheadAttention,
    cross_attn: MultiheadAttention,
    ffn: Ffn,
    norms: [LayerNorm; 3],
}

impl BaseTransformerLayer {
    fn new(dim: usize, heads: usize, ffn_dim: usize, vb: VarBuilder) -> Result<Self> {
        let att = vb.pp("attentions");
        let norm = |i: usize| crate::nn::layer_norm(dim, LN_EPS, vb.pp("norms").pp(i));
        Ok(Self {
            self_attn: MultiheadAttention::new(dim, heads, att.pp(0).pp("attn"))?,
            cross_attn: MultiheadAttention::new(dim, heads, att.pp(1).pp("attn"))?,
            ffn: Ffn::new(dim, ffn_dim, vb.pp("ffns").pp(0))?,
            norms: [norm(0)?, norm(1)?, norm(2)?],
        })
    }

    fn forward(&self, q: &Tensor, text: &Tensor, key_bias: &Tensor) -> Result<Tensor> {
        let q = self.norms[0].forward(&(q + self.self_attn.forward(q, q, q, None)?)?)?;
        let q = self.norms[1].forward(&(&q + self.cross_attn.forward(&q, text, text, Some(key_bias))?)?)?;
        self.norms[2].forward(&(&q + self.ffn.forward(&q)?)?)
    }
}

/// `MultiGrainAligner`, i.e. its `TextCorrelation` decoder (`DetrTransformerDecoder`,
/// `return_intermediate=False`, `post_norm=True`).
#[derive(Debug, Clone)]
pub struct MultiGrainAligner {
    layers: Vec<BaseTransformerLayer>,
    post_norm_layer: LayerNorm,
}

impl MultiGrainAligner {
    /// `vb` = `understanding_branch.roialigner`. Width `understanding.hidden_channels`, heads,
    /// FFN width and depth from `understanding.aligner_*` (hard-coded 8, 512, 3 by the authors).
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let u = &cfg.understanding;
        let vb = vb.pp("TextCorrelation");
        let layers = (0..u.aligner_layers)
            .map(|i| {
                BaseTransformerLayer::new(u.hidden_channels, u.aligner_heads, u.aligner_ffn_dim, vb.pp("layers").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let post_norm_layer = crate::nn::layer_norm(u.hidden_channels, LN_EPS, vb.pp("post_norm_layer"))?;
        Ok(Self { layers, post_norm_layer })
    }

    /// Records `understanding.aligner.layer{i}` (each layer's output, before `post_norm_layer`).
    ///
    /// # Shapes
    /// - `query`: `[B, N, d]` perception queries; `text`: `[B, L, d]` text features
    /// - `pad`: `[B, L]` integer, **1 = padding** (the `key_padding_mask`)
    /// - returns the aligned queries `[B, N, d]` (after `post_norm_layer`)
    pub fn forward(&self, query: &Tensor, text: &Tensor, pad: &Tensor, taps: &mut Taps) -> Result<Tensor> {
        let key_bias = key_padding_bias(pad, f32::NEG_INFINITY)?; // [B, 1, 1, L]
        let mut q = query.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            q = layer.forward(&q, text, &key_bias)?;
            taps.record(format!("understanding.aligner.layer{i}"), &q);
        }
        self.post_norm_layer.forward(&q)
    }
}
