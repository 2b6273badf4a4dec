//! torchscale's `MultiwayNetwork` (BEiT-3): two copies of a module, `A` for the vision tokens and
//! `B` for the language tokens, each applied to its own slice of the token axis.
//!
//! Keys: `{prefix}.A.*` and `{prefix}.B.*`.
//!
//! The reference splits the `[B, T, D]` sequence at the vision length before every multiway module
//! and concatenates the two results again. Here the sequence is carried as its two parts
//! ([`Split`]) so each expert runs on its own tokens without slicing or copying; only the joint
//! self-attention (and the taps) see the concatenation.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::fused::{LayerNorm, Linear};

/// A token sequence cut at the multiway split position: `a` = vision tokens `[B, Ta, ..]`,
/// `b` = language tokens `[B, Tb, ..]`.
#[derive(Debug, Clone)]
pub struct Split {
    pub a: Tensor,
    pub b: Tensor,
}

impl Split {
    /// The whole sequence `[B, Ta + Tb, ..]` (token axis 1).
    pub fn cat(&self) -> Result<Tensor> {
        Tensor::cat(&[&self.a, &self.b], 1)
    }
}

/// `MultiwayNetwork(module)`: expert `a` (vision, key `A`) and expert `b` (language, key `B`).
#[derive(Debug, Clone)]
pub struct Multiway<M> {
    pub a: M,
    pub b: M,
}

impl<M> Multiway<M> {
    /// Builds both experts with `build`, under `vb.pp("A")` and `vb.pp("B")`.
    pub fn new(vb: VarBuilder, build: impl Fn(VarBuilder) -> Result<M>) -> Result<Self> {
        Ok(Self { a: build(vb.pp("A"))?, b: build(vb.pp("B"))? })
    }
}

impl<M: Module> Multiway<M> {
    /// Applies `A` to the vision part and `B` to the language part.
    ///
    /// # Shapes
    /// - `x`: parts `[B, Ta, ..]` and `[B, Tb, ..]`; returns the parts transformed by their expert
    pub fn forward(&self, x: &Split) -> Result<Split> {
        Ok(Split { a: self.a.forward(&x.a)?, b: self.b.forward(&x.b)? })
    }
}

impl Multiway<Linear> {
    /// `residual + linear(x)`, part by part, with the addition fused into the product.
    ///
    /// # Shapes
    /// - `x`: parts `[B, Ta, in]`, `[B, Tb, in]`; `residual`: parts `[B, Ta, out]`, `[B, Tb, out]`
    pub fn forward_add(&self, x: &Split, residual: &Split) -> Result<Split> {
        Ok(Split { a: self.a.forward_add(&x.a, &residual.a)?, b: self.b.forward_add(&x.b, &residual.b)? })
    }
}

/// Multiway `nn.Linear(i, o)` with bias.
pub fn linear(i: usize, o: usize, vb: VarBuilder) -> Result<Multiway<Linear>> {
    Multiway::new(vb, |vb| super::fused::linear(i, o, vb))
}

/// Multiway `nn.LayerNorm(dim, eps)`.
pub fn layer_norm(dim: usize, eps: f64, vb: VarBuilder) -> Result<Multiway<LayerNorm>> {
    Multiway::new(vb, |vb| super::fused::layer_norm(dim, eps, vb))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;

    /// Each expert sees exactly its slice of the sequence, as the reference's split/cat does.
    #[test]
    fn experts_apply_to_their_own_tokens() -> Result<()> {
        let dev = Device::Cpu;
        let mut ts = HashMap::new();
        ts.insert("A.weight".to_string(), Tensor::new(&[[2f32, 0.], [0., 2.]], &dev)?);
        ts.insert("A.bias".to_string(), Tensor::new(&[1f32, 1.], &dev)?);
        ts.insert("B.weight".to_string(), Tensor::new(&[[0f32, 1.], [1., 0.]], &dev)?);
        ts.insert("B.bias".to_string(), Tensor::new(&[0f32, -1.], &dev)?);
        let mw = linear(2, 2, VarBuilder::from_tensors(ts, DType::F32, &dev))?;
        let x = Tensor::arange(0f32, 12., &dev)?.reshape((2, 3, 2))?; // [B=2, T=3, 2]
        let parts = Split { a: x.narrow(1, 0, 2)?, b: x.narrow(1, 2, 1)? };
        let y = mw.forward(&parts)?.cat()?;
        let want = Tensor::cat(&[mw.a.forward(&x)?.narrow(1, 0, 2)?, mw.b.forward(&x)?.narrow(1, 2, 1)?], 1)?;
        assert_eq!(y.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        Ok(())
    }
}
