//! The per-round prediction heads (`forward_prediction_heads` of
//! `MultiScaleMaskedTransformerDecoderForOPTPreTrain`) and the masked-attention mask they produce.
//!
//! Keys (relative to `perception_branch.predictor`): `decoder_norm.*`, `mask_embed.layers.{0,1,2}.*`,
//! `box_embed.layers.{0,1,2}.*`, `cls_embed.*`, and the unused `SEG_proj.layers.{0,1}.*`.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::layers::LN_EPS;
use crate::nn::fused::LayerNorm;
use crate::nn::{self, interpolate::resize_bilinear, mlp::Mlp};

/// What the heads predict from one round's queries.
#[derive(Debug, Clone)]
pub struct HeadsOutput {
    /// `[B, N, H4, W4]` mask logits at the mask-feature stride (4).
    pub mask_logits: Tensor,
    /// `[B, N, 4]` `sigmoid(box_embed)`: `(cx, cy, w, h)` in `[0, 1]` (an untrained head).
    pub boxes: Tensor,
    /// `[B, N, 2]` `cls_embed` logits (perception classes, training only).
    pub cls: Tensor,
    /// `[B, N, C]` `decoder_norm(query)`, the heads' input (training's category head reads it).
    pub query_norm: Tensor,
}

/// `decoder_norm` followed by the mask, box and class heads.
#[derive(Debug, Clone)]
pub struct PredictionHeads {
    decoder_norm: LayerNorm,
    mask_embed: Mlp,
    box_embed: Mlp,
    cls_embed: Linear,
}

impl PredictionHeads {
    /// `vb` is the predictor root. `mask_dim` is the channel count of the mask features.
    pub fn new(hidden_dim: usize, mask_dim: usize, vb: VarBuilder) -> Result<Self> {
        // `SEG_proj` only serves a `SEG_embedding` path the model never takes (MODEL-SPEC §12.3):
        // requested so strict loading accepts the checkpoint, then dropped.
        Mlp::new(hidden_dim, hidden_dim, hidden_dim, 2, vb.pp("SEG_proj"))?;
        Ok(Self {
            decoder_norm: nn::layer_norm(hidden_dim, LN_EPS, vb.pp("decoder_norm"))?,
            mask_embed: Mlp::new(hidden_dim, hidden_dim, mask_dim, 3, vb.pp("mask_embed"))?,
            box_embed: Mlp::new(hidden_dim, hidden_dim, 4, 3, vb.pp("box_embed"))?,
            cls_embed: nn::linear(hidden_dim, 2, vb.pp("cls_embed"))?,
        })
    }

    /// # Shapes
    /// - `query`: `[B, N, C]`
    /// - `mask_features`: `[B, C_mask, H4, W4]` (the fused mask features)
    /// - returns mask logits `[B, N, H4, W4]`, boxes `[B, N, 4]`, class logits `[B, N, 2]`
    pub fn forward(&self, query: &Tensor, mask_features: &Tensor) -> Result<HeadsOutput> {
        let (b, n, _) = query.dims3()?;
        let (_, cm, h4, w4) = mask_features.dims4()?;
        let z = self.decoder_norm.forward(query)?;
        let cls = self.cls_embed.forward(&z)?;
        let emb = self.mask_embed.forward(&z)?; // [B, N, C_mask]
        let feats = mask_features.reshape((b, cm, h4 * w4))?; // [B, C_mask, H4·W4]
        let mask_logits = emb.matmul(&feats)?.reshape((b, n, h4, w4))?; // [B, N, H4, W4]
        let boxes = candle_nn::ops::sigmoid(&self.box_embed.forward(&z)?)?;
        Ok(HeadsOutput { mask_logits, boxes, cls, query_norm: z })
    }
}

/// The masked-attention mask of a round: `sigmoid(bilinear(M → h×w)) < 0.5`, 1 = blocked.
///
/// The sigmoid is the f32 `1/(1+exp(−x))` PyTorch evaluates, so tiny negative logits that round
/// to exactly 0.5 stay unblocked as in the reference. The reference repeats this mask for every
/// head; it is the same for all heads, so it is kept per image here (see [`repeat_heads`]).
///
/// # Shapes
/// - `mask_logits`: `[B, N, H4, W4]` → `[B, N, h·w]` u8
pub fn attention_block_mask(mask_logits: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, n, _, _) = mask_logits.dims4()?;
    let small = resize_bilinear(mask_logits, h, w, false)?; // [B, N, h, w]
    candle_nn::ops::sigmoid(&small)?.lt(0.5f32)?.reshape((b, n, h * w)) // [B, N, h·w]
}

/// The reference layout of an attention mask: repeated over heads, `[B·H, N, S]` with index
/// `b·H + head`.
///
/// # Shapes
/// - `blocked`: `[B, N, S]` → `[B·H, N, S]`
pub fn repeat_heads(blocked: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, n, s) = blocked.dims3()?;
    blocked.unsqueeze(1)?.broadcast_as((b, num_heads, n, s))?.contiguous()?.reshape((b * num_heads, n, s))
    // [B·H, N, S]
}

/// The in-loop fix before each masked cross-attention: a query row whose mask blocks every
/// key is fully unblocked. Returns the additive bias (−inf on blocked keys).
///
/// # Shapes
/// - `blocked`: `[B, N, S]` u8 → bias `[B, 1, N, S]` f32 (broadcast over heads)
pub fn masked_attention_bias(blocked: &Tensor) -> Result<Tensor> {
    let all_blocked = blocked.min_keepdim(2)?; // [B, N, 1], 1 iff the whole row is blocked
    let keep = all_blocked.eq(0u8)?; // [B, N, 1]
    let fixed = blocked.broadcast_mul(&keep)?; // [B, N, S]
    nn::mha::block_mask_bias(&fixed)?.unsqueeze(1) // [B, 1, N, S]
}

/// Mean over the spatial grid of `sigmoid(mask) · pooled features`, per query and channel:
/// the loopback's "mask embedding" `fs` (an `AdaptiveAvgPool2d(1)` over
/// `sigmoid(M)[:, :, None] · F[:, None]`), written as one matrix product.
///
/// # Shapes
/// - `mask_probs`: `[B, N, h, w]`; `features`: `[B, C, h, w]` → `[B, N, C]`
pub fn masked_mean(mask_probs: &Tensor, features: &Tensor) -> Result<Tensor> {
    let (b, n, h, w) = mask_probs.dims4()?;
    let (_, c, _, _) = features.dims4()?;
    let m = mask_probs.reshape((b, n, h * w))?; // [B, N, h·w]
    let f = features.reshape((b, c, h * w))?.t()?; // [B, h·w, C]
    m.matmul(&f)?.affine(1.0 / (h * w) as f64, 0.0) // [B, N, C]
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fully_blocked_rows_are_unblocked() {
        // Row 0 fully blocked, row 1 partly blocked.
        let m = Tensor::new(&[[[1u8, 1, 1], [1, 0, 1]]], &Device::Cpu).unwrap(); // [1, 2, 3]
        let bias = masked_attention_bias(&m).unwrap();
        assert_eq!(bias.dims(), &[1, 1, 2, 3]);
        let v = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&v[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(v[3], f32::NEG_INFINITY);
        assert_eq!(v[4], 0.0);
        assert_eq!(v[5], f32::NEG_INFINITY);
    }

    #[test]
    fn heads_repeat_image_major() {
        let m = Tensor::new(&[[[1u8, 0]], [[0, 1]]], &Device::Cpu).unwrap(); // [2, 1, 2]
        let r = repeat_heads(&m, 3).unwrap().to_vec3::<u8>().unwrap();
        assert_eq!(r.len(), 6);
        assert!(r[..3].iter().all(|x| x[0] == vec![1, 0]));
        assert!(r[3..].iter().all(|x| x[0] == vec![0, 1]));
    }

    #[test]
    fn tiny_negative_logits_stay_unblocked() {
        // f32 sigmoid(−1e−8) rounds to exactly 0.5, which is not < 0.5.
        let x = Tensor::new(&[[[[-1e-8f32, -1e-3]]]], &Device::Cpu).unwrap(); // [1, 1, 1, 2]
        let m = attention_block_mask(&x, 1, 2).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
        assert_eq!(m, vec![0, 1]);
    }
}
