//! `Deris`: the whole network, `MIXGrefUniModel_HierVG_MRLoopback.forward_test` without the
//! post-processing (see [`crate::post`]).
//!
//! Data flow (MODEL-SPEC §1.3): cognition pre-pass (BEiT-3) → perception (Swin → deformable
//! pixel decoder → loopback decoder) → cognition post-pass (aligner, existence).
//!
//! Keys: `understanding_branch.*`, `perception_branch.*`, `head.criterion.empty_weight`.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::cognition::CognitionBranch;
use crate::config::{BatchCoupling, DerisConfig};
use crate::error::Error;
use crate::loopback::RoundOutput;
use crate::perception::PerceptionBranch;
use crate::taps::Taps;

/// The four model inputs of `forward_test`.
#[derive(Debug, Clone)]
pub struct ModelInputs {
    /// `[B, 3, H, W]` f32, the normalised perception (Swin) image.
    pub img: Tensor,
    /// `[B, 3, s, s]` f32, the normalised cognition (BEiT-3) image.
    pub img_mini: Tensor,
    /// `[B, L]` i64 token ids: BOS 0, pieces, EOS 2, PAD 1.
    pub ref_expr_inds: Tensor,
    /// `[B, L]` i64 padding mask: **1 = padding**, 0 = real token (BOS/EOS included).
    pub text_attention_mask: Tensor,
}

/// Raw network outputs (before thresholds).
#[derive(Debug, Clone)]
pub struct DerisOutput {
    /// `[B, N, H, W]` mask logits of the final round at the perception input size.
    pub pred_masks: Tensor,
    /// `[B, N, 4]` sigmoid boxes `(cx, cy, w, h)` in `[0, 1]` (from an untrained head, MODEL-SPEC §12.13).
    pub pred_boxes: Tensor,
    /// `[B, N, 2]` referring logits; softmax index 0 = "referred".
    pub pred_refer_logits: Tensor,
    /// `[B, N, 2]` perception class logits (training only).
    pub pred_logits_perception: Tensor,
    /// `[B, 1]` existence logit; `sigmoid` = P(a target exists).
    pub pred_existence: Tensor,
    /// `[B, N, d]` final decoder queries.
    pub query_feat: Tensor,
    /// `[B, N, d]` final round's `decoder_norm` of the decoder queries (the heads' input; training's
    /// category head reads it).
    pub query_norm: Tensor,
    /// `[B, L, d]` text features of the cognition pre-pass (`text_embed` of BEiT-3's text
    /// tokens; training's word head reads them).
    pub text_feat: Tensor,
    /// Rounds before the last (training's auxiliary outputs).
    pub aux: Vec<RoundOutput>,
}

/// DeRIS: cognition + perception + loopback.
#[derive(Debug)]
pub struct Deris {
    cfg: DerisConfig,
    understanding_branch: CognitionBranch,
    perception_branch: PerceptionBranch,
}

impl Deris {
    /// Builds the model from a VarBuilder rooted at the checkpoint's top level.
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let understanding_branch = CognitionBranch::new(cfg, vb.pp("understanding_branch"))?;
        let perception_branch = PerceptionBranch::new(cfg, vb.pp("perception_branch"))?;
        // `head` has no parameters; its one buffer (the class weights of the loss, [1, 0.1])
        // is part of every checkpoint, and training reads it from the config instead.
        vb.pp("head").pp("criterion").get(2, "empty_weight")?;
        Ok(Self { cfg: cfg.clone(), understanding_branch, perception_branch })
    }

    pub fn config(&self) -> &DerisConfig {
        &self.cfg
    }

    /// Checks the input tensors against the config and states the rules on failure.
    pub fn check_inputs(&self, x: &ModelInputs) -> std::result::Result<(), Error> {
        let bad = |name: &str, reason: String| Error::Input { name: name.into(), reason };
        let f32_nchw = |name: &str, t: &Tensor| -> std::result::Result<(usize, usize, usize), Error> {
            if t.dtype() != DType::F32 {
                return Err(bad(name, format!("dtype {:?}, expected f32", t.dtype())));
            }
            match t.dims() {
                &[b, 3, h, w] => Ok((b, h, w)),
                d => Err(bad(name, format!("shape {d:?}, expected [B, 3, H, W]"))),
            }
        };
        let (b, h, w) = f32_nchw("input.img", &x.img)?;
        let (b2, hm, wm) = f32_nchw("input.img_mini", &x.img_mini)?;
        if b == 0 || b2 != b {
            return Err(bad("input.img_mini", format!("batch {b2} differs from input.img's batch {b} (or is 0)")));
        }
        if h == 0 || w == 0 || h % 16 != 0 || w % 16 != 0 {
            return Err(bad("input.img", format!("size {h}×{w}: the perception image sides must be positive multiples of 16")));
        }
        let s = self.cfg.runtime.img_mini_size;
        if (hm, wm) != (s, s) {
            return Err(bad("input.img_mini", format!("size {hm}×{wm}: the BEiT-3 input must be {s}×{s} (runtime.img_mini_size)")));
        }
        for (name, t) in [("input.ref_expr_inds", &x.ref_expr_inds), ("input.text_attention_mask", &x.text_attention_mask)] {
            if t.dtype() != DType::I64 {
                return Err(bad(name, format!("dtype {:?}, expected i64", t.dtype())));
            }
            match t.dims() {
                &[tb, l] if tb == b => {
                    if l == 0 || l > self.cfg.runtime.max_token {
                        return Err(bad(name, format!("text length {l} must be in 1..={} (runtime.max_token)", self.cfg.runtime.max_token)));
                    }
                }
                d => return Err(bad(name, format!("shape {d:?}, expected [{b}, L]"))),
            }
        }
        if x.ref_expr_inds.dims() != x.text_attention_mask.dims() {
            return Err(bad("input.text_attention_mask", "shape differs from input.ref_expr_inds".into()));
        }
        let vocab = self.cfg.beit3.vocab_size as i64;
        let ids = x.ref_expr_inds.flatten_all()?.to_vec1::<i64>()?;
        if let Some(bad_id) = ids.iter().find(|&&i| i < 0 || i >= vocab) {
            return Err(bad("input.ref_expr_inds", format!("token id {bad_id} outside the vocabulary 0..{vocab}")));
        }
        Ok(())
    }

    /// Runs the network. Call [`Deris::check_inputs`] first on untrusted inputs.
    ///
    /// `coupling` chooses between per-image outputs (default) and the authors' batch-coupled
    /// `query_SA` ([`BatchCoupling::Reference`]).
    pub fn forward(&self, x: &ModelInputs, coupling: BatchCoupling, taps: &mut Taps) -> Result<DerisOutput> {
        self.forward_timed(x, coupling, taps, None)
    }

    /// [`Deris::forward`] that also measures each stage (the device is synchronised at every
    /// stage boundary when `times` is given, so use it for profiling only).
    pub fn forward_timed(
        &self,
        x: &ModelInputs,
        coupling: BatchCoupling,
        taps: &mut Taps,
        mut times: Option<&mut StageTimes>,
    ) -> Result<DerisOutput> {
        let device = x.img.device().clone();
        let mut clock = Stopwatch::start(&device, times.is_some())?;
        let pad = &x.text_attention_mask;
        let pre = self.understanding_branch.pre_forward(&x.img_mini, &x.ref_expr_inds, pad, taps)?;
        clock.lap(&mut times, |t| &mut t.beit3)?;
        let p = &self.perception_branch;
        let feats = p.hier_vision_encoder.forward(&x.img, taps)?;
        clock.lap(&mut times, |t| &mut t.swin)?;
        let pix = p.pixel_decoder.forward(&feats, taps)?;
        drop(feats);
        clock.lap(&mut times, |t| &mut t.pixel_decoder)?;
        let perc = p.predictor.forward(
            &pix.multi_scale_features,
            &pix.mask_features,
            &pre.query_feat,
            &pre.text_feat,
            pad,
            &pre.img_feat,
            coupling,
            taps,
        )?;
        drop(pix);
        clock.lap(&mut times, |t| &mut t.predictor)?;
        let post = self.understanding_branch.post_forward(&perc.query_feat, &pre.text_feat, pad, taps)?;
        clock.lap(&mut times, |t| &mut t.aligner)?;
        Ok(DerisOutput {
            pred_masks: perc.pred_masks,
            pred_boxes: perc.pred_boxes,
            pred_refer_logits: perc.pred_refer_logits,
            pred_logits_perception: perc.pred_logits,
            pred_existence: post.pred_existence,
            query_feat: perc.query_feat,
            query_norm: perc.query_norm,
            text_feat: pre.text_feat,
            aux: perc.aux,
        })
    }
}

/// Seconds spent in each stage of one forward (the stage split of the authors' timing table).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct StageTimes {
    /// BEiT-3 and the cognition pre-pass.
    pub beit3: f64,
    /// Swin backbone.
    pub swin: f64,
    /// Deformable pixel decoder (encoder + FPN + mask features).
    pub pixel_decoder: f64,
    /// Loopback decoder.
    pub predictor: f64,
    /// Multi-grain aligner and existence head.
    pub aligner: f64,
}

impl StageTimes {
    pub fn total(&self) -> f64 {
        self.beit3 + self.swin + self.pixel_decoder + self.predictor + self.aligner
    }
}

/// Stage timer that synchronises the device before reading the clock.
struct Stopwatch {
    device: candle_core::Device,
    last: Option<std::time::Instant>,
}

impl Stopwatch {
    fn start(device: &candle_core::Device, enabled: bool) -> Result<Self> {
        if enabled {
            device.synchronize()?;
        }
        Ok(Self { device: device.clone(), last: enabled.then(std::time::Instant::now) })
    }

    fn lap(&mut self, times: &mut Option<&mut StageTimes>, field: impl FnOnce(&mut StageTimes) -> &mut f64) -> Result<()> {
        if let (Some(last), Some(t)) = (self.last, times.as_deref_mut()) {
            self.device.synchronize()?;
            let now = std::time::Instant::now();
            *field(t) += (now - last).as_secs_f64();
            self.last = Some(now);
        }
        Ok(())
    }
}
