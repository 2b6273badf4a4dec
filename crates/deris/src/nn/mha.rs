//! `nn.MultiheadAttention` (PyTorch semantics) and the scaled-dot-product core shared by every
//! attention in the model (BEiT-3, Swin windows, Q2TCA's `GlobalCrossAttention`).
//!
//! Layout is always batch-first here (`[B, L, E]`). Callers whose PyTorch module is
//! `batch_first=False` transpose at the call site, which is where the axis quirks of the authors'
//! code (e.g. `query_SA` attending over the batch) are made explicit.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::fused::Linear;

/// Splits `[B, L, H·hd]` into heads `[B, H, L, hd]` (head h owns channels `h·hd..(h+1)·hd`).
/// The result is a strided view: [`attention`] reads the heads in place.
pub fn split_heads(x: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, l, e) = x.dims3()?;
    x.reshape((b, l, num_heads, e / num_heads))?.transpose(1, 2)
}

/// Inverse of [`split_heads`]: `[B, H, L, hd]` → `[B, L, H·hd]` (free on [`attention`]'s
/// output, which is laid out `[B, L, H, hd]`).
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, hd) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, l, h * hd))
}

/// `softmax(q·kᵀ·scale + bias)·v` over the last axis of the scores.
///
/// # Shapes
/// - `q`: `[B, H, Lq, hd]`, `k`, `v`: `[B, H, Lk, hd]` (any strides)
/// - `bias`: additive, broadcastable to `[B, H, Lq, Lk]` (−inf or −100 on blocked keys)
/// - returns `[B, H, Lq, hd]`
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    let biases: Vec<&Tensor> = bias.into_iter().collect();
    attention_with_biases(q, k, v, scale, &biases)
}

/// [`attention`] with several additive biases (e.g. Swin's relative-position bias and region
/// mask), summed into the scores. A bias may also be `[G, ..]` with `G` dividing `B`, batch `b`
/// using bias `b mod G` (see [`deris_kernels::fused::attention`]).
///
/// On CPU without gradients this is one fused kernel (no copies of the heads, softmax in
/// cache); otherwise [`deris_kernels::fused::attention_reference`] (primitive ops).
pub fn attention_with_biases(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, biases: &[&Tensor]) -> Result<Tensor> {
    deris_kernels::fused::attention(q, k, v, scale, biases)
}

/// Turns a padding mask (`[B, L]`, any integer dtype, **1 = padding**) into an additive bias
/// `[B, 1, 1, L]` holding `fill` on padded keys and 0 elsewhere.
pub fn key_padding_bias(pad: &Tensor, fill: f32) -> Result<Tensor> {
    let (b, l) = pad.dims2()?;
    let is_pad = pad.to_dtype(DType::F32)?.ne(0f32)?; // u8
    let fill_t = Tensor::full(fill, (b, l), pad.device())?;
    let zeros = Tensor::zeros((b, l), DType::F32, pad.device())?;
    is_pad.where_cond(&fill_t, &zeros)?.reshape((b, 1, 1, l))
}

/// Turns a boolean block mask (`u8`, 1 = blocked) of any shape into an additive −inf bias.
pub fn block_mask_bias(blocked: &Tensor) -> Result<Tensor> {
    let neg = Tensor::full(f32::NEG_INFINITY, blocked.shape(), blocked.device())?;
    let zeros = Tensor::zeros(blocked.shape(), DType::F32, blocked.device())?;
    blocked.where_cond(&neg, &zeros)
}

/// `torch.nn.MultiheadAttention(E, H)` with `in_proj_weight`/`in_proj_bias` and `out_proj`.
#[derive(Debug, Clone)]
pub struct MultiheadAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl MultiheadAttention {
    /// Keys: `in_proj_weight [3E, E]` (rows q | k | v), `in_proj_bias [3E]`, `out_proj.{weight,bias}`.
    pub fn new(embed_dim: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((3 * embed_dim, embed_dim), "in_proj_weight")?;
        let b = vb.get(3 * embed_dim, "in_proj_bias")?;
        let part = |i: usize| -> Result<Linear> {
            Linear::new(w.narrow(0, i * embed_dim, embed_dim)?, Some(b.narrow(0, i * embed_dim, embed_dim)?))
        };
        Ok(Self {
            q_proj: part(0)?,
            k_proj: part(1)?,
            v_proj: part(2)?,
            out_proj: super::fused::linear(embed_dim, embed_dim, vb.pp("out_proj"))?,
            num_heads,
            head_dim: embed_dim / num_heads,
        })
    }

    /// # Shapes
    /// - `query`: `[B, Lq, E]`; `key`, `value`: `[B, Lk, E]` (batch-first)
    /// - `bias`: additive, broadcastable to `[B, H, Lq, Lk]` (see [`key_padding_bias`],
    ///   [`block_mask_bias`])
    /// - returns `[B, Lq, E]` after `out_proj`
    pub fn forward(&self, query: &Tensor, key: &Tensor, value: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let q = split_heads(&self.q_proj.forward(query)?, self.num_heads)?;
        let k = split_heads(&self.k_proj.forward(key)?, self.num_heads)?;
        let v = split_heads(&self.v_proj.forward(value)?, self.num_heads)?;
        let o = attention(&q, &k, &v, (self.head_dim as f64).powf(-0.5), bias)?;
        self.out_proj.forward(&merge_heads(&o)?)
    }

    pub fn num_heads(&self) -> usize {
        self.num_heads
    }
}
