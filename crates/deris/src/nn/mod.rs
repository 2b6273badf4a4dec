//! Building blocks shared by every branch: attention, norms, MLPs, position embeddings and
//! interpolation. Each is written once and tested against PyTorch's semantics.

pub mod fused;
pub mod interpolate;
pub mod mha;
pub mod mlp;
pub mod multiway;
pub mod pos_embed;

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use fused::LayerNorm;

/// `nn.Linear(i, o)` with bias: weight `[o, i]`, bias `[o]`.
pub fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear(i, o, vb)
}

/// `nn.Linear(i, o, bias=False)`.
pub fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    candle_nn::linear_no_bias(i, o, vb)
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias: [`fused::LayerNorm`], whose forward
/// has gradients (candle_nn's LayerNorm runs a fused op without a backward on contiguous inputs).
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    fused::layer_norm(dim, eps, vb)
}

/// Applies a Linear to a tensor of any rank ≥ 2 (the last axis is the feature axis).
pub fn linear_nd(l: &Linear, x: &Tensor) -> Result<Tensor> {
    l.forward(x)
}

/// A Linear's parameters as the fused kernels take them ([`deris_kernels::post_norm`]): see
/// [`fused::Linear::dense`].
pub fn dense(l: &fused::Linear) -> deris_kernels::post_norm::Dense<'_> {
    l.dense()
}

/// A LayerNorm's parameters as the fused kernels take them ([`deris_kernels::post_norm`]).
pub fn norm(n: &LayerNorm) -> deris_kernels::post_norm::Norm<'_> {
    deris_kernels::post_norm::Norm { weight: n.weight(), bias: Some(n.bias()), eps: n.eps() }
}
