//! The cognition branch, `UnderstandingBranchLoopBack`
//! (`deris/models/branchs/understanding_branch/understanding_branch_loopback.py`, MODEL-SPEC §2, §7).
//!
//! Keys: `understanding_branch.*`.
//!
//! - [`CognitionBranch::pre_forward`]: BEiT-3 over image and text, then the projections to the
//!   common width `d` and the initial perception queries (a learned constant).
//! - [`CognitionBranch::post_forward`]: the [`aligner::MultiGrainAligner`] over the perception
//!   branch's final queries, then the existence head.

pub mod aligner;
pub mod beit3;

use candle_core::{bail, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::config::DerisConfig;
use crate::taps::Taps;
use aligner::MultiGrainAligner;
use beit3::Beit3;

/// What `pre_forward` hands to the perception branch.
#[derive(Debug, Clone)]
pub struct PreForward {
    /// `vis_embed(BEiT patches)`, `[B, d, g, g]`.
    pub img_feat: Tensor,
    /// `text_embed(BEiT text tokens)`, `[B, L, d]`, padded positions included.
    pub text_feat: Tensor,
    /// `perception_embed(init_query.weight)` repeated over the batch, `[B, N, d]`.
    pub query_feat: Tensor,
    /// Raw BEiT-3 CLS output, `[B, D]` (unused downstream).
    pub cls_feat: Tensor,
}

/// What `post_forward` returns.
#[derive(Debug, Clone)]
pub struct PostForward {
    /// `nt_embed(aligned queries)` averaged over the queries, `[B, 1]`: a logit, `sigmoid` = P(target exists).
    pub pred_existence: Tensor,
    /// `logit_embed(aligned queries)`, `[B, N, 2]` logits (computed by the authors, unused downstream).
    pub pred_logits: Tensor,
}

/// `UnderstandingBranchLoopBack`.
#[derive(Debug, Clone)]
pub struct CognitionBranch {
    /// `vis_enc.beit3`.
    vis_enc: Beit3,
    vis_embed: Linear,
    text_embed: Linear,
    roialigner: MultiGrainAligner,
    perception_embed: Linear,
    logit_embed: Linear,
    nt_embed: Linear,
    /// `init_query.weight`, `[N, D]`.
    init_query: Tensor,
    /// BEiT-3 patches per side.
    grid: usize,
}

impl CognitionBranch {
    /// `vb` = the root's `understanding_branch`.
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let (big, d) = (cfg.beit3.embed_dim, cfg.understanding.hidden_channels);
        Ok(Self {
            vis_enc: Beit3::new(cfg, vb.pp("vis_enc").pp("beit3"))?,
            vis_embed: crate::nn::linear(big, d, vb.pp("vis_embed"))?,
            text_embed: crate::nn::linear(big, d, vb.pp("text_embed"))?,
            roialigner: MultiGrainAligner::new(cfg, vb.pp("roialigner"))?,
            perception_embed: crate::nn::linear(big, d, vb.pp("perception_embed"))?,
            logit_embed: crate::nn::linear(d, 2, vb.pp("logit_embed"))?,
            nt_embed: crate::nn::linear(d, 1, vb.pp("nt_embed"))?,
            init_query: vb.pp("init_query").get((cfg.understanding.num_queries, big), "weight")?,
            grid: cfg.beit_grid(),
        })
    }

    /// Records the `beit.*` taps and `understanding.pre.{img_feat,text_feat,cls_feat,query_feat}`.
    ///
    /// # Shapes
    /// - `img_mini`: `[B, 3, S, S]` f32, normalised RGB, `S = runtime.img_mini_size`
    /// - `ids`: `[B, L]` i64 token ids; `pad`: `[B, L]` i64, **1 = padding**, 0 = real token
    /// - returns `img_feat [B, d, g, g]` (`g = S / patch`), `text_feat [B, L, d]`,
    ///   `query_feat [B, N, d]`, `cls_feat [B, D]`
    pub fn pre_forward(&self, img_mini: &Tensor, ids: &Tensor, pad: &Tensor, taps: &mut Taps) -> Result<PreForward> {
        let enc = self.vis_enc.forward(img_mini, ids, pad, taps)?;
        let (b, _, _) = enc.img_feat.dims3()?;
        let img_feat = self.vis_embed.forward(&enc.img_feat)?; // [B, g², d]
        let d = img_feat.dim(2)?;
        let img_feat = img_feat.transpose(1, 2)?.reshape((b, d, self.grid, self.grid))?; // [B, d, g, g]
        let text_feat = self.text_embed.forward(&enc.text_feat)?; // [B, L, d]
        let queries = self.perception_embed.forward(&self.init_query)?; // [N, d]
        let n = queries.dim(0)?;
        let query_feat = queries.unsqueeze(0)?.broadcast_as((b, n, d))?.contiguous()?; // [B, N, d]
        taps.record("understanding.pre.img_feat", &img_feat);
        taps.record("understanding.pre.text_feat", &text_feat);
        taps.record("understanding.pre.cls_feat", &enc.cls_feat);
        taps.record("understanding.pre.query_feat", &query_feat);
        Ok(PreForward { img_feat, text_feat, query_feat, cls_feat: enc.cls_feat })
    }

    /// Records `understanding.aligner.layer{i}`, `understanding.post.{query_feat,pred_logits}`
    /// and `out.pred_existence`.
    ///
    /// # Shapes
    /// - `query_feat`: `[B, N, d]`, the perception branch's final queries
    /// - `text_feat`: `[B, L, d]` (from [`PreForward`]); `pad`: `[B, L]` integer, **1 = padding**
    /// - returns `pred_existence [B, 1]` (logit) and `pred_logits [B, N, 2]`
    pub fn post_forward(
        &self,
        query_feat: &Tensor,
        text_feat: &Tensor,
        pad: &Tensor,
        taps: &mut Taps,
    ) -> Result<PostForward> {
        let (b, _, d) = query_feat.dims3()?;
        let (bt, l, dt) = text_feat.dims3()?;
        if bt != b || dt != d || pad.dims() != [b, l] {
            bail!(
                "post_forward needs query_feat [B, N, d], text_feat [B, L, d] and pad [B, L]; got {:?}, {:?}, {:?}",
                query_feat.dims(),
                text_feat.dims(),
                pad.dims()
            );
        }
        let q = self.roialigner.forward(query_feat, text_feat, pad, taps)?; // [B, N, d]
        let pred_logits = self.logit_embed.forward(&q)?; // [B, N, 2]
        let pred_existence = self.nt_embed.forward(&q)?.mean(1)?; // [B, 1]
        taps.record("understanding.post.query_feat", &q);
        taps.record("understanding.post.pred_logits", &pred_logits);
        taps.record("out.pred_existence", &pred_existence);
        Ok(PostForward { pred_existence, pred_logits })
    }
}
