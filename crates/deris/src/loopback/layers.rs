//! The post-norm decoder layers of Mask2Former's masked-attention decoder
//! (`SelfAttentionLayer`, `CrossAttentionLayer`, `FFNLayer` in
//! `Mask2Former_Simplify/modeling/transformer_decoder/mask2former_transformer_decoder.py`).
//!
//! Keys (relative to `perception_branch.predictor`):
//! `transformer_self_attention_layers.{i}.{self_attn.*, norm.*}`,
//! `transformer_cross_attention_layers.{i}.{multihead_attn.*, norm.*}`,
//! `transformer_ffn_layers.{i}.{linear1, linear2, norm}.*` and `query_SA.{r}.{self_attn.*, norm.*}`.
//!
//! Every layer here is batch-first (`[B, L, C]`). The authors' modules are sequence-first
//! (`nn.MultiheadAttention(batch_first=False)`); the caller transposes where the reference feeds
//! them another layout, which is how the `query_SA` batch quirk is made explicit
//! (see [`super::BatchCoupling`]).

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::nn::fused::LayerNorm;
use crate::nn::{self, mha::MultiheadAttention};

/// `nn.LayerNorm`'s default epsilon, used by every norm of the predictor.
pub(crate) const LN_EPS: f64 = 1e-5;

/// `tensor + pos` when a position term is given (`with_pos_embed`), broadcasting `pos`.
fn with_pos(x: &Tensor, pos: Option<&Tensor>) -> Result<Tensor> {
    match pos {
        Some(p) => x.broadcast_add(p),
        None => Ok(x.clone()),
    }
}

/// `SelfAttentionLayer` (post-norm): `LN(x + MHA(x + pos, x + pos, x))`.
#[derive(Debug, Clone)]
pub struct SelfAttentionLayer {
    self_attn: MultiheadAttention,
    norm: LayerNorm,
}

impl SelfAttentionLayer {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: MultiheadAttention::new(dim, num_heads, vb.pp("self_attn"))?,
            norm: nn::layer_norm(dim, LN_EPS, vb.pp("norm"))?,
        })
    }

    /// # Shapes
    /// - `tgt`: `[B, L, C]`; attention runs over `L`, independently for each `B`
    /// - `query_pos`: broadcastable to `[B, L, C]`, added to queries and keys only
    /// - returns `[B, L, C]`
    pub fn forward(&self, tgt: &Tensor, query_pos: Option<&Tensor>) -> Result<Tensor> {
        let qk = with_pos(tgt, query_pos)?;
        let out = self.self_attn.forward(&qk, &qk, tgt, None)?;
        self.norm.forward(&(tgt + out)?)
    }
}

/// `CrossAttentionLayer` (post-norm): `LN(x + MHA(x + query_pos, memory + pos, memory, mask))`.
#[derive(Debug, Clone)]
pub struct CrossAttentionLayer {
    multihead_attn: MultiheadAttention,
    norm: LayerNorm,
}

impl CrossAttentionLayer {
    pub fn new(dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            multihead_attn: MultiheadAttention::new(dim, num_heads, vb.pp("multihead_attn"))?,
            norm: nn::layer_norm(dim, LN_EPS, vb.pp("norm"))?,
        })
    }

    /// # Shapes
    /// - `tgt`: `[B, N, C]` queries; `memory`: `[B, S, C]` keys/values
    /// - `bias`: additive attention bias broadcastable to `[B, H, N, S]` (−inf = blocked)
    /// - `pos`: broadcastable to `[B, S, C]`; `query_pos`: broadcastable to `[B, N, C]`
    /// - returns `[B, N, C]`
    pub fn forward(
        &self,
        tgt: &Tensor,
        memory: &Tensor,
        bias: Option<&Tensor>,
        pos: Option<&Tensor>,
        query_pos: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = with_pos(tgt, query_pos)?;
        let k = with_pos(memory, pos)?;
        let out = self.multihead_attn.forward(&q, &k, memory, bias)?;
        self.norm.forward(&(tgt + out)?)
    }
}

/// `FFNLayer` (post-norm, ReLU): `LN(x + linear2(relu(linear1(x))))`.
#[derive(Debug, Clone)]
pub struct FfnLayer {
    linear1: nn::fused::Linear,
    linear2: nn::fused::Linear,
    norm: LayerNorm,
}

impl FfnLayer {
    pub fn new(dim: usize, ffn_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear1: nn::fused::linear(dim, ffn_dim, vb.pp("linear1"))?,
            linear2: nn::fused::linear(ffn_dim, dim, vb.pp("linear2"))?,
            norm: nn::layer_norm(dim, LN_EPS, vb.pp("norm"))?,
        })
    }
}

impl Module for FfnLayer {
    /// # Shapes
    /// - `x`: `[..., C]` → `[..., C]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        deris_kernels::post_norm::ffn_residual_norm(x, nn::dense(&self.linear1), nn::dense(&self.linear2), nn::norm(&self.norm))
    }
}
