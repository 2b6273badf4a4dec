//! The loopback synergy decoder: `MultiScaleMaskedTransformerDecoderForOPTPreTrain`
//! (`Mask2Former_Simplify/modeling/transformer_decoder/mask2former_transformer_decoder.py`),
//! MODEL-SPEC §6.
//!
//! Keys: `perception_branch.predictor.*` — `transformer_{self,cross}_attention_layers`,
//! `transformer_ffn_layers`, `decoder_norm`, `query_embed`, `level_embed`, `mask_embed`,
//! `box_embed`, `cls_embed`, `SEG_proj` (unused), `query_SA`, `Q2TCA`, `SEG_cls`, `refer_proj`,
//! `channel_proj_conv`. `input_proj` is the identity (no keys).
//!
//! Data flow: the cognition branch's queries are read by the prediction heads (masks at stride 4,
//! boxes, classes), then refined by the loopback (mask-pooled `query_SA`, query-to-text `Q2TCA`,
//! referring logits); `dec_layers` masked-attention layers (cross-attention to the multi-scale
//! level `i % 3`, self-attention, FFN) each add one more heads + loopback round.

pub mod heads;
pub mod interaction;
pub mod layers;
pub mod q2tca;

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

pub use crate::config::BatchCoupling;
use crate::config::DerisConfig;
use crate::nn::{interpolate::resize_bilinear, mha, pos_embed};
use crate::taps::Taps;
use heads::{attention_block_mask, masked_attention_bias, repeat_heads, PredictionHeads};
use interaction::{LoopbackInteraction, TextContext};
use layers::{CrossAttentionLayer, FfnLayer, SelfAttentionLayer};

/// Predictions of one round (training targets the first `dec_layers` of them).
#[derive(Debug, Clone)]
pub struct RoundOutput {
    /// `[B, N, H4, W4]` mask logits at stride 4 (not upsampled).
    pub pred_masks_lowres: Tensor,
    /// `[B, N, 4]` `(cx, cy, w, h)` in `[0, 1]`.
    pub pred_boxes: Tensor,
    /// `[B, N, 2]` perception class logits.
    pub pred_logits: Tensor,
    /// `[B, N, 2]` referring logits (index 0 = referred).
    pub pred_refer_logits: Tensor,
    /// `[B, N, C]` the round's `decoder_norm(query)` (the heads' input).
    pub query_norm: Tensor,
}

/// What the predictor returns (the authors' dict keys).
#[derive(Debug, Clone)]
pub struct PredictorOutput {
    /// `[B, N, s·H4, s·W4]` mask logits of the last round, upsampled by `common_stride` `s`
    /// (bilinear, `align_corners=True`) to the Swin input size.
    pub pred_masks: Tensor,
    /// `[B, N, 4]` last-round boxes `(cx, cy, w, h)` in `[0, 1]`.
    pub pred_boxes: Tensor,
    /// `[B, N, 2]` last-round perception class logits (unused at test time).
    pub pred_logits: Tensor,
    /// `[B, N, 2]` last-round referring logits; `softmax(·)[..., 0]` is the referring score.
    pub pred_refer_logits: Tensor,
    /// `[B, N, C]` final queries (the input of the cognition post-pass).
    pub query_feat: Tensor,
    /// `[B, N, C]` last round's `decoder_norm(query)` (the heads' input).
    pub query_norm: Tensor,
    /// Rounds `0..dec_layers` (all but the last), for the auxiliary losses.
    pub aux: Vec<RoundOutput>,
}

/// One multi-scale level as the masked attention reads it.
struct Level {
    /// `[B, h·w, C]` flattened features + `level_embed[l]`.
    src: Tensor,
    /// `[1, h·w, C]` 2-D sine position.
    pos: Tensor,
    h: usize,
    w: usize,
}

/// `MultiScaleMaskedTransformerDecoderForOPTPreTrain`.
#[derive(Debug, Clone)]
pub struct MultiScaleMaskedTransformerDecoder {
    transformer_self_attention_layers: Vec<SelfAttentionLayer>,
    transformer_cross_attention_layers: Vec<CrossAttentionLayer>,
    transformer_ffn_layers: Vec<FfnLayer>,
    /// `[N, C]` positional query embedding (masked-attention layers only).
    query_embed: Tensor,
    /// `[levels, C]`.
    level_embed: Tensor,
    heads: PredictionHeads,
    loopback: LoopbackInteraction,
    /// `channel_proj_conv` (Conv1x1 `2C → C` on `cat(mask_features, upsampled image features)`),
    /// split along its input channels: `[C, C, 1, 1]` for the mask features, `[C, C, 1, 1]` for
    /// the image features, and the bias.
    channel_proj_mask: Tensor,
    channel_proj_img: Tensor,
    channel_proj_bias: Tensor,
    hidden_dim: usize,
    num_heads: usize,
    num_levels: usize,
    common_stride: usize,
}

impl MultiScaleMaskedTransformerDecoder {
    /// `vb = root.pp("perception_branch").pp("predictor")`.
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let p = &cfg.predictor;
        let (d, heads, layers) = (p.hidden_dim, p.num_heads, p.dec_layers);
        let num_levels = cfg.pixel_decoder.num_levels;
        let channel_proj = vb.pp("channel_proj_conv").get((d, 2 * d, 1, 1), "weight")?;
        Ok(Self {
            transformer_self_attention_layers: (0..layers)
                .map(|i| SelfAttentionLayer::new(d, heads, vb.pp("transformer_self_attention_layers").pp(i)))
                .collect::<Result<_>>()?,
            transformer_cross_attention_layers: (0..layers)
                .map(|i| CrossAttentionLayer::new(d, heads, vb.pp("transformer_cross_attention_layers").pp(i)))
                .collect::<Result<_>>()?,
            transformer_ffn_layers: (0..layers)
                .map(|i| FfnLayer::new(d, p.dim_feedforward, vb.pp("transformer_ffn_layers").pp(i)))
                .collect::<Result<_>>()?,
            query_embed: vb.get((p.num_queries, d), "query_embed.weight")?,
            level_embed: vb.get((num_levels, d), "level_embed.weight")?,
            heads: PredictionHeads::new(d, cfg.pixel_decoder.mask_dim, vb.clone())?,
            loopback: LoopbackInteraction::new(d, heads, p.q2tca_heads, p.dim_feedforward, layers + 1, vb.clone())?,
            channel_proj_mask: channel_proj.narrow(1, 0, d)?.contiguous()?,
            channel_proj_img: channel_proj.narrow(1, d, d)?.contiguous()?,
            channel_proj_bias: vb.pp("channel_proj_conv").get(d, "bias")?,
            hidden_dim: d,
            num_heads: heads,
            num_levels,
            common_stride: cfg.pixel_decoder.common_stride,
        })
    }

    /// The multi-scale memory: flattened features + level embedding, and their sine positions.
    fn levels(&self, multi_scale: &[Tensor]) -> Result<Vec<Level>> {
        if multi_scale.len() != self.num_levels {
            candle_core::bail!("predictor: expected {} multi-scale maps, got {}", self.num_levels, multi_scale.len());
        }
        multi_scale
            .iter()
            .enumerate()
            .map(|(l, x)| {
                let (b, c, h, w) = x.dims4()?;
                if c != self.hidden_dim {
                    candle_core::bail!("predictor: multi-scale map {l} has {c} channels, expected {}", self.hidden_dim);
                }
                let emb = self.level_embed.get(l)?.reshape((1, 1, c))?;
                let src = x.reshape((b, c, h * w))?.transpose(1, 2)?.broadcast_add(&emb)?; // [B, h·w, C]
                let pos = pos_embed::sine_2d(c / 2, h, w, x.device())?.reshape((c, h * w))?.t()?.unsqueeze(0)?; // [1, h·w, C]
                Ok(Level { src, pos, h, w })
            })
            .collect()
    }

    /// # Shapes
    /// - `multi_scale`: 3 maps `[B, C, h_l, w_l]` at strides 32, 16, 8 (pixel-decoder encoder outputs)
    /// - `mask_features`: `[B, C, H4, W4]` pixel-decoder mask features (stride 4)
    /// - `query`: `[B, N, C]` the cognition branch's initial queries
    /// - `text_feat`: `[B, L, C]`; `pad`: `[B, L]` integer, **1 = padding**
    /// - `img_feat`: `[B, C, g, g]` cognition (BEiT-3) image features
    /// - returns [`PredictorOutput`]: masks `[B, N, 4·H4, 4·W4]` logits, boxes `[B, N, 4]`
    ///   `(cx, cy, w, h)`, class and referring logits `[B, N, 2]`, queries `[B, N, C]`
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        multi_scale: &[Tensor],
        mask_features: &Tensor,
        query: &Tensor,
        text_feat: &Tensor,
        pad: &Tensor,
        img_feat: &Tensor,
        coupling: BatchCoupling,
        taps: &mut Taps,
    ) -> Result<PredictorOutput> {
        let (b, cm, h4, w4) = mask_features.dims4()?;
        let (qb, _, _) = query.dims3()?;
        let (tb, l, _) = text_feat.dims3()?;
        let (pb, pl) = pad.dims2()?;
        if qb != b || tb != b || pb != b || pl != l || img_feat.dim(0)? != b || cm != self.hidden_dim {
            candle_core::bail!(
                "predictor: batch/text sizes disagree: mask_features {:?}, query {:?}, text_feat {:?}, pad {:?}, img_feat {:?}",
                mask_features.dims(), query.dims(), text_feat.dims(), pad.dims(), img_feat.dims()
            );
        }
        let levels = self.levels(multi_scale)?;

        // Fused mask features: channel_proj_conv(cat(mask_features, resize(img_feat))). The 1×1
        // conv is linear per pixel and the resize linear per channel, so the image half is
        // projected at the BEiT-3 grid and resized after: W_img·resize(x) = resize(W_img·x).
        let img_proj = deris_kernels::conv2d(img_feat, &self.channel_proj_img, None, 0)?; // [B, C, g, g]
        let img_up = resize_bilinear(&img_proj, h4, w4, false)?; // [B, C, H4, W4]
        let fused = (deris_kernels::conv2d(mask_features, &self.channel_proj_mask, Some(&self.channel_proj_bias), 0)? + img_up)?; // [B, C, H4, W4]
        taps.record("predictor.fused_mask_features", &fused);
        let pooled = LoopbackInteraction::pool(&fused)?; // [B, C, H4/4, W4/4]

        let text = TextContext {
            feat: text_feat.clone(),
            pos: pos_embed::sine_1d_degenerate(l, self.hidden_dim, text_feat.device())?,
            pad_bias: mha::key_padding_bias(pad, -100.0)?,
        };
        let query_pos = self.query_embed.unsqueeze(0)?; // [1, N, C]

        let num_rounds = self.transformer_ffn_layers.len() + 1;
        let mut rounds = Vec::with_capacity(num_rounds);
        let mut q = query.clone();
        let mut blocked: Option<Tensor> = None;
        for r in 0..num_rounds {
            if r > 0 {
                let i = r - 1;
                let level = &levels[i % self.num_levels];
                // Round r−1's mask, with fully blocked rows unblocked.
                let bias = blocked.as_ref().map(masked_attention_bias).transpose()?;
                q = self.transformer_cross_attention_layers[i].forward(
                    &q,
                    &level.src,
                    bias.as_ref(),
                    Some(&level.pos),
                    Some(&query_pos),
                )?;
                q = self.transformer_self_attention_layers[i].forward(&q, Some(&query_pos))?;
                q = self.transformer_ffn_layers[i].forward(&q)?;
                taps.record(format!("predictor.layer{i}.ffn_out"), &q);
            }

            let out = self.heads.forward(&q, &fused)?;
            let target = &levels[r % self.num_levels];
            let m = attention_block_mask(&out.mask_logits, target.h, target.w)?; // [B, N, h·w]
            taps.record(format!("predictor.round{r}.mask_logits_lowres"), &out.mask_logits);
            taps.record(format!("predictor.round{r}.boxes"), &out.boxes);
            taps.record(format!("predictor.round{r}.perception_logits"), &out.cls);
            taps.record_with(format!("predictor.round{r}.attn_mask"), || repeat_heads(&m, self.num_heads))?;
            blocked = Some(m);

            let lb = self.loopback.forward(r, &q, &pooled, &out.mask_logits, &text, coupling)?;
            taps.record(format!("predictor.round{r}.refer_logits"), &lb.refer_logits);
            taps.record(format!("predictor.round{r}.query_out"), &lb.query);
            q = lb.query;
            rounds.push(RoundOutput {
                pred_masks_lowres: out.mask_logits,
                pred_boxes: out.boxes,
                pred_logits: out.cls,
                pred_refer_logits: lb.refer_logits,
                query_norm: out.query_norm,
            });
        }

        let Some(last) = rounds.pop() else {
            candle_core::bail!("predictor: no prediction round ran");
        };
        let s = self.common_stride;
        let pred_masks = resize_bilinear(&last.pred_masks_lowres, s * h4, s * w4, true)?; // [B, N, s·H4, s·W4]
        taps.record("out.pred_masks", &pred_masks);
        taps.record("out.pred_boxes", &last.pred_boxes);
        taps.record("out.pred_logits_perception", &last.pred_logits);
        taps.record("out.pred_refer_logits", &last.pred_refer_logits);
        taps.record("out.query_feat", &q);
        Ok(PredictorOutput {
            pred_masks,
            pred_boxes: last.pred_boxes,
            pred_logits: last.pred_logits,
            pred_refer_logits: last.pred_refer_logits,
            query_feat: q,
            query_norm: last.query_norm,
            aux: rounds,
        })
    }
}
