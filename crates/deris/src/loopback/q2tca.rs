//! The loopback's query-to-text step: `GlobalDecoderLayer` and its `GlobalCrossAttention`
//! (`deris/models/heads/transformers/baselayer_transformer.py`), post-norm.
//!
//! Keys (relative to `perception_branch.predictor`): `Q2TCA.{r}.{self_attn.*, norm1, norm2, norm3,
//! linear1, linear2}` and `Q2TCA.{r}.cross_attn.{q, k, v, proj, mapmlp.0, mapmlp.2}`. The
//! `mapmlp` relative-position MLP is loaded but never applied: the authors always pass
//! `cross_attn_mask=None` (MODEL-SPEC §6.4).

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::layers::LN_EPS;
use crate::nn::fused::LayerNorm;
use crate::nn::{self, mha};

/// Hidden width of the unused `mapmlp` (the constructor's `rpe_hidden_dim=256` default, not `d`).
const RPE_HIDDEN_DIM: usize = 256;

/// `GlobalCrossAttention`: multi-head attention with separate `q`/`k`/`v`/`proj` Linears and an
/// **additive** key-padding bias (the authors add −100, not −inf).
#[derive(Debug, Clone)]
pub struct GlobalCrossAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    proj: Linear,
    num_heads: usize,
}

impl GlobalCrossAttention {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        // `mapmlp` = Sequential(Linear(1, 256), ReLU, Linear(256, heads, bias=False)): requested
        // so strict loading accepts the checkpoint, never used.
        let mapmlp = vb.pp("mapmlp");
        mapmlp.get((RPE_HIDDEN_DIM, 1), "0.weight")?;
        mapmlp.get(RPE_HIDDEN_DIM, "0.bias")?;
        mapmlp.get((num_heads, RPE_HIDDEN_DIM), "2.weight")?;
        Ok(Self {
            q: nn::linear(dim, dim, vb.pp("q"))?,
            k: nn::linear(dim, dim, vb.pp("k"))?,
            v: nn::linear(dim, dim, vb.pp("v"))?,
            proj: nn::linear(dim, dim, vb.pp("proj"))?,
            num_heads,
        })
    }

    /// # Shapes
    /// - `query`: `[B, N, C]`; `key`, `value`: `[B, L, C]`
    /// - `pad_bias`: additive, broadcastable to `[B, H, N, L]` (−100 on padded text keys)
    /// - returns `[B, N, C]`
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor, pad_bias: Option<&Tensor>) -> Result<Tensor> {
        let (_, _, c) = query.dims3()?;
        let q = mha::split_heads(&self.q.forward(query)?, self.num_heads)?; // [B, H, N, hd]
        let k = mha::split_heads(&self.k.forward(key)?, self.num_heads)?; // [B, H, L, hd]
        let v = mha::split_heads(&self.v.forward(value)?, self.num_heads)?; // [B, H, L, hd]
        let scale = ((c / self.num_heads) as f64).powf(-0.5);
        let o = mha::attention(&q, &k, &v, scale, pad_bias)?; // [B, H, N, hd]
        self.proj.forward(&mha::merge_heads(&o)?) // [B, N, C]
    }
}

/// `GlobalDecoderLayer` (post-norm): self-attention over the queries, cross-attention to the
/// text, ReLU FFN.
#[derive(Debug, Clone)]
pub struct GlobalDecoderLayer {
    cross_attn: GlobalCrossAttention,
    norm1: LayerNorm,
    self_attn: mha::MultiheadAttention,
    norm2: LayerNorm,
    linear1: nn::fused::Linear,
    linear2: nn::fused::Linear,
    norm3: LayerNorm,
}

impl GlobalDecoderLayer {
    /// `dim` = hidden width, `ffn_dim` = `DIM_FEEDFORWARD`, `num_heads` = the hard-coded 8
    /// (`predictor.q2tca_heads`) for both attentions.
    pub fn new(dim: usize, ffn_dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            cross_attn: GlobalCrossAttention::new(dim, num_heads, vb.pp("cross_attn"))?,
            norm1: nn::layer_norm(dim, LN_EPS, vb.pp("norm1"))?,
            self_attn: mha::MultiheadAttention::new(dim, num_heads, vb.pp("self_attn"))?,
            norm2: nn::layer_norm(dim, LN_EPS, vb.pp("norm2"))?,
            linear1: nn::fused::linear(dim, ffn_dim, vb.pp("linear1"))?,
            linear2: nn::fused::linear(ffn_dim, dim, vb.pp("linear2"))?,
            norm3: nn::layer_norm(dim, LN_EPS, vb.pp("norm3"))?,
        })
    }

    /// `forward_post` with `query_pos=None`, `self_attn_mask=None`, `cross_attn_mask=None`.
    ///
    /// # Shapes
    /// - `tgt`: `[B, N, C]` queries (the self-attention runs over `N`: the authors transpose to
    ///   sequence-first here, so there is no batch quirk)
    /// - `src`: `[B, L, C]` text features; `src_pos`: broadcastable to `[B, L, C]`, added to the keys
    /// - `pad_bias`: broadcastable to `[B, H, N, L]`, −100 on padded text
    /// - returns `[B, N, C]`
    pub fn forward(&self, tgt: &Tensor, src: &Tensor, src_pos: &Tensor, pad_bias: Option<&Tensor>) -> Result<Tensor> {
        let t = self.self_attn.forward(tgt, tgt, tgt, None)?;
        let t = self.norm2.forward(&(tgt + t)?)?;
        let keys = src.broadcast_add(src_pos)?;
        let c = self.cross_attn.forward(&t, &keys, src, pad_bias)?;
        let t = self.norm1.forward(&(t + c)?)?;
        deris_kernels::post_norm::ffn_residual_norm(&t, nn::dense(&self.linear1), nn::dense(&self.linear2), nn::norm(&self.norm3))
    }
}
