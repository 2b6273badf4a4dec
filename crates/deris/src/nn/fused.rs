//! `nn.Linear` and `nn.LayerNorm` on the fused CPU kernels of [`deris_kernels::fused`]: the
//! bias, the exact GELU and a residual addition run in the matrix product's own pass.
//!
//! Inference on CPU takes the fused kernels; when any input tracks a gradient (training) or the
//! tensors live on another device, the same calls run the primitive-op reference, so these
//! layers are safe everywhere `candle_nn::Linear` / `LayerNorm` are.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};
use deris_kernels::fused::{self as kernels, Activation};

/// `nn.Linear`: `weight [out, in]`, optional `bias [out]`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// `gelu(x·Wᵀ + b)` (exact erf GELU) in one pass.
    ///
    /// # Shapes
    /// - `x`: `[.., in]`; returns `[.., out]`
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        kernels::linear(x, &self.weight, self.bias.as_ref(), Activation::GeluErf, None)
    }

    /// `residual + x·Wᵀ + b` in one pass (a pre-norm block's shortcut).
    ///
    /// # Shapes
    /// - `x`: `[.., in]`; `residual`: `[.., out]`; returns `[.., out]`
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        kernels::linear(x, &self.weight, self.bias.as_ref(), Activation::Identity, Some(residual))
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::linear(x, &self.weight, self.bias.as_ref(), Activation::Identity, None)
    }
}

/// `nn.Linear(i, o)` with bias: keys `weight [o, i]`, `bias [o]`.
pub fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((o, i), "weight")?, Some(vb.get(o, "bias")?)))
}

/// `nn.Linear(i, o, bias=False)`: key `weight [o, i]`.
pub fn linear_no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear::new(vb.get((o, i), "weight")?, None))
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
