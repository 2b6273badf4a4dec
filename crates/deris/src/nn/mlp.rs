//! `MLP` of the Mask2Former decoder (`mask_embed`, `box_embed`, `SEG_proj`): keys `layers.{i}`.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

/// `num_layers` Linears, ReLU between them (not after the last).
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// `input → hidden → … → hidden → output`, `num_layers` Linears in all.
    pub fn new(input: usize, hidden: usize, output: usize, num_layers: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("layers");
        let layers = (0..num_layers)
            .map(|i| {
                let i_dim = if i == 0 { input } else { hidden };
                let o_dim = if i + 1 == num_layers { output } else { hidden };
                candle_nn::linear(i_dim, o_dim, vb.pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if i + 1 < self.layers.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}
