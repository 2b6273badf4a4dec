//! `nn.Linear` and `nn.LayerNorm` on the fused CPU kernels of [`deris_kernels::fused`]: the
//! bias, the exact GELU and a residual addition run in the matrix product's own pass.
//!
//! Inference on CPU takes the fused kernels; when any input tracks a gradient (training) or the
//! tensors live on another device, the same calls run the primitive-op reference, so these
//! layers are safe everywhere `candle_nn::Linear` / `LayerNorm` are; except a [`Linear`] built
//! in bf16 mode, which keeps its weight in bf16 for CPU inference only.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};
use deris_kernels::bf16::PackedWeight;
use deris_kernels::fused::{self as kernels, Activation};
use deris_kernels::post_norm::{Dense, DenseWeight};
use deris_kernels::Precision;

/// `nn.Linear`: `weight [out, in]`, optional `bias [out]`.
///
/// A Linear built while the process-wide precision is bf16 ([`crate::set_precision`]) from an
/// f32 CPU weight that tracks no gradient (not a training variable) keeps only that weight
/// rounded to bf16 and packed for the bf16 product ([`kernels::pack_weight`]): half the memory,
/// no packing per call, the same results as packing per call. Such a Linear computes in bf16
/// even if the precision is switched back to f32 later, and takes f32 CPU inputs without
/// gradient only. Otherwise it keeps the f32 tensor and follows the precision of each call.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// A Linear's weight `[out, in]`: as loaded, or rounded to bf16 and packed.
#[derive(Debug, Clone)]
enum Weight {
    F32(Tensor),
    Bf16(Arc<PackedWeight>),
}

impl Linear {
    /// Keeps `weight` as it is, or packed to bf16 when the model is being built in bf16 mode
    /// (see [`Linear`]).
    ///
    /// Errors when a weight to pack is not 2-D.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let packs = deris_kernels::precision() == Precision::Bf16
            && weight.device().is_cpu()
            && weight.dtype() == DType::F32
            && !weight.track_op();
        let weight = if packs { Weight::Bf16(Arc::new(kernels::pack_weight(&weight)?)) } else { Weight::F32(weight) };
        Ok(Self { weight, bias })
    }

    /// `gelu(x·Wᵀ + b)` (exact erf GELU) in one pass.
    ///
    /// # Shapes
    /// - `x`: `[.., in]`; returns `[.., out]`
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, Activation::GeluErf, None)
    }

    /// `residual + x·Wᵀ + b` in one pass (a pre-norm block's shortcut).
    ///
    /// # Shapes
    /// - `x`: `[.., in]`; `residual`: `[.., out]`; returns `[.., out]`
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.fused(x, Activation::Identity, Some(residual))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The parameters as the post-norm blocks take them ([`deris_kernels::post_norm`]): the f32
    /// tensor, or the packed weight (bf16 product, f32 CPU inputs without gradient only).
    pub fn dense(&self) -> Dense<'_> {
        let weight = match &self.weight {
            Weight::F32(w) => DenseWeight::F32(w),
            Weight::Bf16(w) => DenseWeight::Bf16(w),
        };
        Dense { weight, bias: self.bias.as_ref() }
    }

    /// `act(x·Wᵀ + b) + residual` on the kernel of the weight's form.
    fn fused(&self, x: &Tensor, act: Activation, residual: Option<&Tensor>) -> Result<Tensor> {
        match &self.weight {
            Weight::F32(w) => kernels::linear(x, w, self.bias.as_ref(), act, residual),
            Weight::Bf16(w) => kernels::linear_bf16(x, w, self.bias.as_ref(), act, residual),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fused(x, Activation::Identity, None)
    }
}

/// `nn.Linear(i, o)` with bias: keys `weight [o, i]`, `bias [o]`.
pub fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((o, i), "weight")?, Some(vb.get(o, "bias")?))
}

/// `nn.Linear(i, o, bias=False)`: key `weight [o, i]`.
pub fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((o, i), "weight")?, None)
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias, over the last axis.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `nn.LayerNorm(dim, eps)`: keys `weight [dim]`, `bias [dim]`.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    Ok(LayerNorm::new(vb.get(dim, "weight")?, vb.get(dim, "bias")?, eps))
}
