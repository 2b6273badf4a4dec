//! One Swin Transformer block (`SwinTransformerBlock`, `WindowAttention` and `Mlp` of
//! `deris/models/vis_encs/swin_trans.py`).
//!
//! Keys, under `layers.{s}.blocks.{j}`: `norm1`, `attn.relative_position_bias_table`,
//! `attn.relative_position_index`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`.

use candle_core::{DType, Result, Tensor};
use candle_nn::{LayerNorm, Linear, Module, VarBuilder};

use super::windows::{relative_position_index, StageWindows, WindowPartition};
use crate::nn::mha::{attention, merge_heads};
use crate::nn::{layer_norm, linear};

/// `WindowAttention`: multi-head self-attention inside each window, with a learned relative
/// position bias and, in shifted blocks, the −100 region mask. Padding tokens are not masked.
#[derive(Debug)]
pub struct WindowAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    /// `relative_position_bias_table[relative_position_index]`, `[heads, ws², ws²]`.
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
            .contiguous()?;
        Ok(Self {
            qkv: linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: linear(dim, dim, vb.pp("proj"))?,
            num_heads,
            head_dim: dim / num_heads,
            relative_position_bias,
        })
    }

    /// # Shapes
    /// - `windows`: `[B, nW·ws², C]`, the window tokens as gathered by `part`
    /// - returns `[B, H·W, C]`, back in image order (after `proj`)
    pub fn forward(&self, windows: &Tensor, part: &WindowPartition) -> Result<Tensor> {
        let (b, len, c) = windows.dims3()?;
        let nw = part.num_windows;
        let n = len / nw;
        let (heads, hd) = (self.num_heads, self.head_dim);
        let qkv = self
            .qkv
            .forward(windows)? // [B, nW·N, 3C], channels [q | k | v], each head-major
            .reshape((b * nw, n, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))? // [3, B·nW, heads, N, hd]
            .contiguous()?;
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?); // [B·nW, heads, N, hd]
        let scale = (hd as f64).powf(-0.5);
        let o = match &part.region_mask {
            None => attention(&q, &k, &v, scale, Some(&self.relative_position_bias))?,
            Some(mask) => {
                // Windows join the head axis so that the per-window mask broadcasts over B.
                let bias = self
                    .relative_position_bias
                    .unsqueeze(0)?
                    .broadcast_add(mask)? // [nW, heads, N, N]
                    .reshape((nw * heads, n, n))?;
                let fold = |t: &Tensor| t.reshape((b, nw * heads, n, hd));
                attention(&fold(&q)?, &fold(&k)?, &fold(&v)?, scale, Some(&bias))?.reshape((b * nw, heads, n, hd))?
            }
        };
        let o = merge_heads(&o)?.reshape((b, nw * n, c))?; // [B, nW·N, C]
        // Undo the partition before `proj`: padding tokens are dropped and never projected.
        let o = o.index_select(&part.scatter, 1)?; // [B, H·W, C]
        self.proj.forward(&o)
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

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
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
    pub fn new(dim: usize, num_heads: usize, ws: usize, mlp_hidden: usize, shifted: bool, eps: f64, vb: VarBuilder) -> Result<Self> {
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
        let t = self.norm1.forward(x)?.index_select(&part.gather, 1)?; // [B, nW·ws², C]
        let x = (x + self.attn.forward(&t, part)?)?;
        let y = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + y
    }
}
