//! Perception branch (`PerceptionBranchLoopBack`,
//! `deris/models/branchs/perception_branch/perception_branch_loopback.py`): Swin backbone →
//! MSDeformAttn pixel decoder → loopback decoder.
//!
//! Keys: `perception_branch.*` (`hier_vision_encoder`, `pixel_decoder`, `predictor`, and the
//! unused `nt_embed`, `perception_query_embed`).

pub mod msdeform;
pub mod pixel_decoder;
pub mod swin;

use candle_core::Result;
use candle_nn::VarBuilder;

use crate::config::DerisConfig;
use crate::loopback::MultiScaleMaskedTransformerDecoder;
use pixel_decoder::MSDeformAttnPixelDecoder;
use swin::SwinTransformer;

/// `PerceptionBranchLoopBack`. [`crate::model::Deris`] drives its three stages in turn.
#[derive(Debug)]
pub struct PerceptionBranch {
    pub(crate) hier_vision_encoder: SwinTransformer,
    pub(crate) pixel_decoder: MSDeformAttnPixelDecoder,
    pub(crate) predictor: MultiScaleMaskedTransformerDecoder,
}

impl PerceptionBranch {
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.predictor.hidden_dim;
        let n = cfg.predictor.num_queries;
        // Present in every checkpoint, never used by the forward pass (MODEL-SPEC §3.1).
        vb.pp("nt_embed").get((1, d), "weight")?;
        vb.pp("nt_embed").get(1, "bias")?;
        vb.pp("perception_query_embed").get((n, d), "weight")?;
        Ok(Self {
            hier_vision_encoder: SwinTransformer::new(cfg, vb.pp("hier_vision_encoder"))?,
            pixel_decoder: MSDeformAttnPixelDecoder::new(cfg, vb.pp("pixel_decoder"))?,
            predictor: MultiScaleMaskedTransformerDecoder::new(cfg, vb.pp("predictor"))?,
        })
    }
}
