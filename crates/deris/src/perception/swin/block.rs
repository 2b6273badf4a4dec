//! One Swin Transformer block (`SwinTransformerBlock`, `WindowAttention` and `Mlp` of
//! `deris/models/vis_encs/swin_trans.py`).
//!
//! Keys, under `layers.{s}.blocks.{j}`: `norm1`, `attn.relative_position_bias_table`,
//! `attn.relative_position_index`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use super::windows::{relative_position_index, StageWindows, WindowPartition};
use crate::nn::fused::{layer_norm, linear, LayerNorm, Linear};
use deris_kernels::fused::window_attention;

/// `WindowAttention`: multi-head self-attention inside each window, with a learned relative
/// position bias and, in shifted blocks, the −100 region mask. Padding tokens are not masked.
#[derive(Debug)]
pub struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    /// `relative_position_bias_table[relative_position_index]`, `[1, heads, ws², ws²]`.
    relative_position_bias: Tensor,
}

impl WindowAttention {
    pub fn new(dim: usize, num_heads: usize, ws: usize, vb: VarBuilder) -> Result<Self> {
        let n = ws * ws;
        let table = vb.get(((2 * ws - 1) * (2 * ws - 1), num_heads), "relative_position_bias_table")?;
        let stored = vb.get_with_hints_dtype((n, n), "relative_position_index", Default::default(), DType::I64)?;
        let index = relative_position_index(ws);
        // The buffer is requested so strict loading accepts the checkpoint, and must hold the
        // structural index; an all-zero buffer is a freshly initialised one (no checkpoint).
        let stored = stored.flatten_all()?.to_vec1::<i64>()?;
        let structural = stored.iter().zip(&index).all(|(s, i)| *s == i64::from(*i));
        if !structural && stored.iter().any(|s| *s != 0) {
            candle_core::bail!(
                "{}.relative_position_index is not the relative position index of window {ws}",
                vb.prefix()
            );
        }
        let index = Tensor::from_vec(index, n * n, table.device())?;
        let relative_position_bias = table
            .index_select(&index, 0)? // [ws²·ws², heads]
            .reshape((n, n, num_heads))?
            .permute((2, 0, 1))? // [heads, ws², ws²]
            .contiguous()?
            .unsqueeze(0)?; // [1, heads, ws², ws²]
        Ok(Self {
            qkv: linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: linear(dim, dim, vb.pp("proj"))?,
            num_heads,
            head_dim: dim / num_heads,
            relative_position_bias,
        })
    }

    /// `shortcut + proj(window attention(x))`.
    ///
    /// # Shapes
    /// - `x`: `[B, H·W, C]`, the normed tokens in image order, partitioned by `part`
    /// - `shortcut`: `[B, H·W, C]`; returns `[B, H·W, C]`
    pub fn forward_add(&self, x: &Tensor, part: &WindowPartition, shortcut: &Tensor) -> Result<Tensor> {
        // Only the real tokens are projected: a padding token is zero after the norm, so its
        // q, k, v are the qkv bias, which the kernel uses for it.
        let qkv = self.qkv.forward(x)?; // [B, H·W, 3C], channels [q | k | v], each head-major
        let scale = (self.head_dim as f64).powf(-0.5);
        let rel = &self.relative_position_bias; // [1, heads, N, N]
                                                // The region mask is per window ([nW, 1, N, N]): window w of every image takes mask w.
        let biases: Vec<&Tensor> = std::iter::once(rel).chain(&part.region_mask).collect();
        let o =
            window_attention(&qkv, self.qkv.bias(), &part.gather, part.num_windows, self.num_heads, scale, &biases)?;
        self.proj.forward_add(&o, shortcut) // [B, H·W, C]
    }
}

/// `Mlp`: `fc2(GELU(fc1(x)))` with the exact erf GELU.
#[derive(Debug)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self { fc1: linear(dim, hidden, vb.pp("fc1"))?, fc2: linear(hidden, dim, vb.pp("fc2"))? })
    }
}

impl Mlp {
    /// `shortcut + fc2(GELU(fc1(x)))`, the GELU fused into `fc1` and the addition into `fc2`.
    pub fn forward_add(&self, x: &Tensor, shortcut: &Tensor) -> Result<Tensor> {
        self.fc2.forward_add(&self.fc1.forward_gelu(x)?, shortcut)
    }
}

/// `SwinTransformerBlock`: pre-norm (shifted) window attention and MLP, each with a residual.
#[derive(Debug)]
pub struct SwinTransformerBlock {
    norm1: LayerNorm,
    attn: WindowAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    /// Odd blocks of a stage use windows shifted by `ws/2`.
    shifted: bool,
}

impl SwinTransformerBlock {
    pub fn new(
        dim: usize,
        num_heads: usize,
        ws: usize,
        mlp_hidden: usize,
        shifted: bool,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, eps, vb.pp("norm1"))?,
            attn: WindowAttention::new(dim, num_heads, ws, vb.pp("attn"))?,
            norm2: layer_norm(dim, eps, vb.pp("norm2"))?,
            mlp: Mlp::new(dim, mlp_hidden, vb.pp("mlp"))?,
            shifted,
        })
    }

    /// # Shapes
    /// - `x`: `[B, H·W, C]` row-major tokens of the `H×W` map that `windows` was built for
    /// - returns `[B, H·W, C]`
    pub fn forward(&self, x: &Tensor, windows: &StageWindows) -> Result<Tensor> {
        let part = if self.shifted { &windows.shifted } else { &windows.regular };
        // Padding comes after the norm: padded tokens are exact zeros, and attended to unmasked.
        let x = self.attn.forward_add(&self.norm1.forward(x)?, part, x)?;
        self.mlp.forward_add(&self.norm2.forward(&x)?, &x)
    }
}
