//! The loopback synergy step (`forward_loopback_interaction_v2`): mask-pooled query positions,
//! `query_SA`, query-to-text `Q2TCA`, referring logits and the query fusion.
//!
//! Keys (relative to `perception_branch.predictor`): `query_SA.{r}.*`, `Q2TCA.{r}.*`, `SEG_cls.*`,
//! `refer_proj.{r}.*` for rounds `r = 0..=dec_layers`.

use candle_core::{Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use super::heads::masked_mean;
use super::layers::SelfAttentionLayer;
use super::q2tca::GlobalDecoderLayer;
use super::BatchCoupling;
use crate::nn::{self, interpolate::resize_bilinear};

/// The reference pools the stride-4 masks and features by a hard-coded 4 (`downsample4`,
/// `int(h / 4)`).
const POOL: usize = 4;

/// The text side of the loopback, shared by every round.
#[derive(Debug, Clone)]
pub struct TextContext {
    /// `[B, L, C]` text features.
    pub feat: Tensor,
    /// `[L, C]` the degenerate 1-D sine position (MODEL-SPEC §6.5), added to the keys.
    pub pos: Tensor,
    /// `[B, 1, 1, L]` additive −100 on padded tokens.
    pub pad_bias: Tensor,
}

/// One loopback round's results.
#[derive(Debug, Clone)]
pub struct LoopbackOutput {
    /// `[B, N, C]` `refer_proj[r](cat(query_SA out, Q2TCA out))`: the next round's queries.
    pub query: Tensor,
    /// `[B, N, 2]` `SEG_cls(Q2TCA out)`: referring logits, index 0 = referred.
    pub refer_logits: Tensor,
}

/// `query_SA`, `Q2TCA`, `SEG_cls` and `refer_proj` of the predictor.
#[derive(Debug, Clone)]
pub struct LoopbackInteraction {
    query_sa: Vec<SelfAttentionLayer>,
    q2tca: Vec<GlobalDecoderLayer>,
    seg_cls: Linear,
    refer_proj: Vec<Linear>,
}

impl LoopbackInteraction {
    /// `rounds = dec_layers + 1`; `vb` is the predictor root.
    pub fn new(
        hidden_dim: usize,
        num_heads: usize,
        q2tca_heads: usize,
        ffn_dim: usize,
        rounds: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = hidden_dim;
        let query_sa = (0..rounds)
            .map(|r| SelfAttentionLayer::new(d, num_heads, vb.pp("query_SA").pp(r)))
            .collect::<Result<Vec<_>>>()?;
        let q2tca = (0..rounds)
            .map(|r| GlobalDecoderLayer::new(d, ffn_dim, q2tca_heads, vb.pp("Q2TCA").pp(r)))
            .collect::<Result<Vec<_>>>()?;
        let refer_proj =
            (0..rounds).map(|r| nn::linear(2 * d, d, vb.pp("refer_proj").pp(r))).collect::<Result<Vec<_>>>()?;
        Ok(Self { query_sa, q2tca, seg_cls: nn::linear(d, 2, vb.pp("SEG_cls"))?, refer_proj })
    }

    /// The fused mask features average-pooled by the reference's hard-coded 4 (`downsample4`):
    /// the same for every round, so the decoder computes it once.
    ///
    /// # Shapes
    /// - `mask_features`: `[B, C, H4, W4]` → `[B, C, H4/4, W4/4]`
    pub fn pool(mask_features: &Tensor) -> Result<Tensor> {
        mask_features.avg_pool2d(POOL)
    }

    /// Round `round` of the loopback.
    ///
    /// # Shapes
    /// - `query`: `[B, N, C]` the queries the heads just read
    /// - `pooled_features`: `[B, C, H4/4, W4/4]` the fused mask features through [`Self::pool`]
    /// - `mask_logits`: `[B, N, H4, W4]` this round's stride-4 mask logits
    /// - returns queries `[B, N, C]` and referring logits `[B, N, 2]`
    pub fn forward(
        &self,
        round: usize,
        query: &Tensor,
        pooled_features: &Tensor,
        mask_logits: &Tensor,
        text: &TextContext,
        coupling: BatchCoupling,
    ) -> Result<LoopbackOutput> {
        let (Some(query_sa), Some(q2tca), Some(refer_proj)) =
            (self.query_sa.get(round), self.q2tca.get(round), self.refer_proj.get(round))
        else {
            candle_core::bail!("loopback round {round} out of range (the model has {} rounds)", self.query_sa.len());
        };
        let (b, n, d) = query.dims3()?;
        let (_, _, h4, w4) = mask_logits.dims4()?;
        let (ph, pw) = (h4 / POOL, w4 / POOL);

        // Mask embedding fs: the query position of query_SA.
        let m = candle_nn::ops::sigmoid(&resize_bilinear(mask_logits, ph, pw, false)?)?; // [B, N, ph, pw]
        let fs = masked_mean(&m, pooled_features)?; // [B, N, C]

        let q_sa = match coupling {
            // The authors feed [B, N, C] to a sequence-first MHA: sequence = batch, batch = query.
            BatchCoupling::Reference => {
                let q_t = query.transpose(0, 1)?.contiguous()?; // [N, B, C]
                let fs_t = fs.transpose(0, 1)?.contiguous()?; // [N, B, C]
                query_sa.forward(&q_t, Some(&fs_t))?.transpose(0, 1)?.contiguous()?
                // [B, N, C]
            }
            // Each image alone: a length-1 sequence per (image, query), as at batch 1.
            BatchCoupling::PerImage => {
                let q1 = query.reshape((b * n, 1, d))?; // [B·N, 1, C]
                let fs1 = fs.reshape((b * n, 1, d))?; // [B·N, 1, C]
                query_sa.forward(&q1, Some(&fs1))?.reshape((b, n, d))? // [B, N, C]
            }
        };

        let q_ref = q2tca.forward(&q_sa, &text.feat, &text.pos, Some(&text.pad_bias))?; // [B, N, C]
        let refer_logits = self.seg_cls.forward(&q_ref)?;
        let fused = Tensor::cat(&[&q_sa, &q_ref], 2)?; // [B, N, 2C]
        Ok(LoopbackOutput { query: refer_proj.forward(&fused)?, refer_logits })
    }
}
