//! Model configuration: one typed struct for every size of DeRIS.
//!
//! The four released models are built in (`DerisConfig::deris_b_refcoco()` …), and any other size
//! (the tiny test fixtures, a fine-tuned variant) is a JSON file in the format of
//! [`DerisConfig`]'s serde representation; see `configs/tiny-a.json` and the README section
//! "Config files". Fields the authors hard-code (aligner width, Q2TCA heads, the pixel decoder's
//! FFN, GroupNorm groups, 4 sampling points, 3 feature levels) have defaults equal to the
//! hard-coded values, so a config file only states what varies.

use std::path::Path;

use deris_kernels::Precision;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Everything needed to build a DeRIS model and run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DerisConfig {
    /// Human-readable name, e.g. `deris-b-refcoco`.
    pub name: String,
    /// BEiT-3 cognition encoder (`understanding_branch.vis_enc.beit3.*`).
    pub beit3: Beit3Config,
    /// Swin perception backbone (`perception_branch.hier_vision_encoder.*`).
    pub swin: SwinConfig,
    /// Understanding (cognition) branch heads and aligner (`understanding_branch.*`).
    pub understanding: UnderstandingConfig,
    /// MSDeformAttn pixel decoder (`perception_branch.pixel_decoder.*`).
    pub pixel_decoder: PixelDecoderConfig,
    /// Loopback decoder (`perception_branch.predictor.*`).
    pub predictor: PredictorConfig,
    /// Input sizes, text length and post-processing thresholds.
    pub runtime: RuntimeConfig,
}

/// torchscale 0.3.0 `EncoderConfig` as DeRIS builds it (multiway, sub-LN, pre-norm).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Beit3Config {
    /// Width `D` (768 base, 1024 large).
    pub embed_dim: usize,
    pub num_heads: usize,
    /// FFN width (4·D).
    pub ffn_dim: usize,
    pub num_layers: usize,
    /// Rows of `text_embed` (64010 for BEiT-3's XLM-R vocabulary).
    pub vocab_size: usize,
    /// Rows of the text position table `embed_positions.B` (1024).
    pub max_source_positions: usize,
    #[serde(default = "d_patch16")]
    pub patch_size: usize,
    #[serde(default = "d_eps")]
    pub layernorm_eps: f64,
}

/// Swin Transformer as built by the authors' hard-coded `build_swin_*`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwinConfig {
    /// Stage-1 width `C0` (96 for Swin-S, 128 for Swin-B).
    pub embed_dim: usize,
    pub depths: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub window_size: usize,
    #[serde(default = "d_patch4")]
    pub patch_size: usize,
    #[serde(default = "d_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "d_eps")]
    pub layernorm_eps: f64,
}

/// `UnderstandingBranchLoopBack` sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnderstandingConfig {
    /// Common width `d` the BEiT-3 features are projected to (256).
    pub hidden_channels: usize,
    /// Rows of `init_query` (N).
    pub num_queries: usize,
    /// `MultiGrainAligner` layers (hard-coded 3).
    #[serde(default = "d_3")]
    pub aligner_layers: usize,
    /// `MultiGrainAligner` heads (hard-coded 8).
    #[serde(default = "d_8")]
    pub aligner_heads: usize,
    /// `MultiGrainAligner` FFN width (hard-coded 512).
    #[serde(default = "d_512")]
    pub aligner_ffn_dim: usize,
}

/// `MSDeformAttnPixelDecoder` sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PixelDecoderConfig {
    /// `SEM_SEG_HEAD.CONVS_DIM` (256).
    pub conv_dim: usize,
    /// `SEM_SEG_HEAD.MASK_DIM` (256).
    pub mask_dim: usize,
    /// `TRANSFORMER_ENC_LAYERS` (6).
    pub num_encoder_layers: usize,
    /// MSDeformAttn heads (`MASK_FORMER.NHEADS`, 8).
    pub num_heads: usize,
    /// Feature levels fed to the deformable encoder: res5, res4, res3 (hard-coded 3).
    #[serde(default = "d_3")]
    pub num_levels: usize,
    /// Sampling points per head and level (hard-coded 4).
    #[serde(default = "d_4")]
    pub num_points: usize,
    /// Deformable encoder FFN width (hard-coded 1024).
    #[serde(default = "d_1024")]
    pub ffn_dim: usize,
    /// GroupNorm groups (hard-coded 32).
    #[serde(default = "d_32")]
    pub groupnorm_groups: usize,
    /// Output stride of `mask_features` (4).
    #[serde(default = "d_4")]
    pub common_stride: usize,
}

/// `MultiScaleMaskedTransformerDecoderForOPTPreTrain` sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredictorConfig {
    /// `MASK_FORMER.HIDDEN_DIM` (256).
    pub hidden_dim: usize,
    /// `MASK_FORMER.NHEADS` (8).
    pub num_heads: usize,
    /// `DIM_FEEDFORWARD` (2048), for the decoder FFN and the Q2TCA FFN.
    pub dim_feedforward: usize,
    /// Masked-attention layers (3); the loopback runs `dec_layers + 1` rounds.
    pub dec_layers: usize,
    /// Queries N (10 RefCOCO, 20 gRefCOCO).
    pub num_queries: usize,
    /// Q2TCA `GlobalCrossAttention` heads (hard-coded 8).
    #[serde(default = "d_8")]
    pub q2tca_heads: usize,
}

/// Input sizes, text length and post-processing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Perception (Swin) input side, pixels (384).
    pub hier_img_size: usize,
    /// Cognition (BEiT-3) input side, pixels (224); must be a multiple of the BEiT-3 patch.
    pub img_mini_size: usize,
    /// Text length L including BOS/EOS (20 RefCOCO, 50 gRefCOCO).
    pub max_token: usize,
    /// A query counts as referred when its score is strictly above this.
    pub score_threshold: f64,
    /// Query-mask binarisation threshold on the sigmoid (0.5).
    #[serde(default = "d_half")]
    pub mask_threshold: f64,
    /// Whether images in a batch influence each other (the authors' `query_SA` quirk).
    #[serde(default)]
    pub batch_coupling: BatchCoupling,
    /// Arithmetic of the CPU `linear` products at inference: `"f32"` (the default, the
    /// reference results) or `"bf16"` (operands rounded to bf16, f32 sums: about twice as fast,
    /// needs a CPU with AVX512-BF16). Process-wide: [`crate::Segmenter::load`] applies it with
    /// [`set_precision`]. Training ignores it (its ops track gradients and always run in f32).
    #[serde(default, serialize_with = "precision_to_str", deserialize_with = "precision_from_str")]
    pub precision: Precision,
}

fn precision_to_str<S: Serializer>(p: &Precision, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(p.name())
}

fn precision_from_str<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Precision, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|e: String| serde::de::Error::custom(format!("runtime.precision: {e}")))
}

/// Makes `p` the precision of every later CPU `linear` product in this process (all models):
/// [`deris_kernels::set_precision`].
///
/// Errors: [`Error::Config`] (`runtime.precision`) for `bf16` on a CPU without AVX512-BF16.
pub fn set_precision(p: Precision) -> Result<()> {
    deris_kernels::set_precision(p).map_err(|e| Error::Config { field: "runtime.precision".into(), reason: e.to_string() })
}

/// How the loopback's `query_SA` treats the batch.
///
/// The authors' `query_SA` is a sequence-first `nn.MultiheadAttention` fed `[B, N, C]`, so it
/// attends across the **batch**: an image's outputs depend on its batch-mates (MODEL-SPEC §6.3).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchCoupling {
    /// Every image is computed as if alone: outputs equal batch-1 runs. The default.
    #[default]
    PerImage,
    /// The authors' coupled behaviour, to reproduce their batched numbers exactly.
    Reference,
}

fn d_patch16() -> usize {
    16
}
fn d_patch4() -> usize {
    4
}
fn d_eps() -> f64 {
    1e-5
}
fn d_mlp_ratio() -> f64 {
    4.0
}
fn d_3() -> usize {
    3
}
fn d_4() -> usize {
    4
}
fn d_8() -> usize {
    8
}
fn d_32() -> usize {
    32
}
fn d_512() -> usize {
    512
}
fn d_1024() -> usize {
    1024
}
fn d_half() -> f64 {
    0.5
}

/// The released model variants, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    DerisBRefcoco,
    DerisLRefcoco,
    DerisBGrefcoco,
    DerisLGrefcoco,
}

impl Preset {
    pub const ALL: [Preset; 4] =
        [Preset::DerisBRefcoco, Preset::DerisLRefcoco, Preset::DerisBGrefcoco, Preset::DerisLGrefcoco];

    pub fn name(self) -> &'static str {
        match self {
            Preset::DerisBRefcoco => "deris-b-refcoco",
            Preset::DerisLRefcoco => "deris-l-refcoco",
            Preset::DerisBGrefcoco => "deris-b-grefcoco",
            Preset::DerisLGrefcoco => "deris-l-grefcoco",
        }
    }

    pub fn config(self) -> DerisConfig {
        match self {
            Preset::DerisBRefcoco => DerisConfig::deris_b_refcoco(),
            Preset::DerisLRefcoco => DerisConfig::deris_l_refcoco(),
            Preset::DerisBGrefcoco => DerisConfig::deris_b_grefcoco(),
            Preset::DerisLGrefcoco => DerisConfig::deris_l_grefcoco(),
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.to_ascii_lowercase().replace('_', "-");
        Preset::ALL.into_iter().find(|p| p.name() == norm).ok_or_else(|| Error::Config {
            field: "name".into(),
            reason: format!(
                "unknown model '{s}'; built-in models are {}",
                Preset::ALL.map(|p| p.name()).join(", ")
            ),
        })
    }
}

impl DerisConfig {
    fn beit3_base() -> Beit3Config {
        Beit3Config {
            embed_dim: 768,
            num_heads: 12,
            ffn_dim: 3072,
            num_layers: 12,
            vocab_size: 64010,
            max_source_positions: 1024,
            patch_size: 16,
            layernorm_eps: 1e-5,
        }
    }

    fn beit3_large() -> Beit3Config {
        Beit3Config { embed_dim: 1024, num_heads: 16, ffn_dim: 4096, num_layers: 24, ..Self::beit3_base() }
    }

    /// `build_swin_s`: C0 96, depths 2-2-18-2, heads 3-6-12-24, window 7.
    fn swin_s() -> SwinConfig {
        SwinConfig {
            embed_dim: 96,
            depths: vec![2, 2, 18, 2],
            num_heads: vec![3, 6, 12, 24],
            window_size: 7,
            patch_size: 4,
            mlp_ratio: 4.0,
            layernorm_eps: 1e-5,
        }
    }

    /// `build_swin_b`: C0 128, depths 2-2-18-2, heads 4-8-16-32, window 12.
    fn swin_b() -> SwinConfig {
        SwinConfig { embed_dim: 128, num_heads: vec![4, 8, 16, 32], window_size: 12, ..Self::swin_s() }
    }

    /// Shared by the four releases: MODEL-SPEC §0 (the Mask2Former YAML values).
    fn released(
        name: &str,
        beit3: Beit3Config,
        swin: SwinConfig,
        num_queries: usize,
        max_token: usize,
        score_threshold: f64,
    ) -> Self {
        DerisConfig {
            name: name.into(),
            beit3,
            swin,
            understanding: UnderstandingConfig {
                hidden_channels: 256,
                num_queries,
                aligner_layers: 3,
                aligner_heads: 8,
                aligner_ffn_dim: 512,
            },
            pixel_decoder: PixelDecoderConfig {
                conv_dim: 256,
                mask_dim: 256,
                num_encoder_layers: 6,
                num_heads: 8,
                num_levels: 3,
                num_points: 4,
                ffn_dim: 1024,
                groupnorm_groups: 32,
                common_stride: 4,
            },
            predictor: PredictorConfig {
                hidden_dim: 256,
                num_heads: 8,
                dim_feedforward: 2048,
                dec_layers: 3,
                num_queries,
                q2tca_heads: 8,
            },
            runtime: RuntimeConfig {
                hier_img_size: 384,
                img_mini_size: 224,
                max_token,
                score_threshold,
                mask_threshold: 0.5,
                batch_coupling: BatchCoupling::PerImage,
                precision: Precision::F32,
            },
        }
    }

    /// `configs/refcoco/DERIS-B-refcoco.py`. Threshold 0.7: what the README's eval command uses
    /// (`tools/test.py` overrides the config's 0.9; MODEL-SPEC §0 note 2).
    pub fn deris_b_refcoco() -> Self {
        Self::released("deris-b-refcoco", Self::beit3_base(), Self::swin_s(), 10, 20, 0.7)
    }

    /// `configs/refcoco/DERIS-L-refcoco.py`, evaluated at 0.7.
    pub fn deris_l_refcoco() -> Self {
        Self::released("deris-l-refcoco", Self::beit3_large(), Self::swin_b(), 10, 20, 0.7)
    }

    /// `configs/grefcoco/DERIS-B-grefcoco.py`, evaluated at 0.7.
    pub fn deris_b_grefcoco() -> Self {
        Self::released("deris-b-grefcoco", Self::beit3_base(), Self::swin_s(), 20, 50, 0.7)
    }

    /// `configs/grefcoco/DERIS-L-grefcoco.py`, evaluated at 0.9.
    pub fn deris_l_grefcoco() -> Self {
        Self::released("deris-l-grefcoco", Self::beit3_large(), Self::swin_b(), 20, 50, 0.9)
    }

    /// A built-in name (`deris-b-refcoco`, …) or the path of a JSON config file.
    pub fn from_name_or_path(s: &str) -> Result<Self> {
        let p = Path::new(s);
        if p.extension().is_some_and(|e| e == "json") || p.exists() {
            return Self::from_file(p);
        }
        Ok(s.parse::<Preset>()?.config())
    }

    /// Reads a JSON config file and validates it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io { path: path.to_path_buf(), err: e })?;
        let cfg: DerisConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            field: format!("{} (line {}, column {})", path.display(), e.line(), e.column()),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes this config as pretty JSON.
    pub fn to_json(&self) -> String {
        // A struct of plain numbers, strings and vectors always serialises.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the constraints the authors' code relies on, so a bad config fails here and not
    /// deep inside a forward pass.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(Error::Config { field: field.into(), reason });
        let b = &self.beit3;
        if b.embed_dim == 0 || b.num_heads == 0 || b.embed_dim % b.num_heads != 0 {
            return bad("beit3.num_heads", format!("embed_dim {} must be a multiple of num_heads {}", b.embed_dim, b.num_heads));
        }
        let s = &self.swin;
        if s.depths.len() != 4 || s.num_heads.len() != 4 {
            return bad("swin.depths", "Swin needs exactly 4 stages (res2..res5)".into());
        }
        for (i, h) in s.num_heads.iter().enumerate() {
            let c = s.embed_dim << i;
            if *h == 0 || c % h != 0 {
                return bad("swin.num_heads", format!("stage {i} width {c} is not a multiple of {h} heads"));
            }
        }
        if s.window_size == 0 {
            return bad("swin.window_size", "must be positive".into());
        }
        let d = self.predictor.hidden_dim;
        if self.understanding.hidden_channels != d || self.pixel_decoder.mask_dim != d || self.pixel_decoder.conv_dim != d {
            return bad(
                "predictor.hidden_dim",
                format!(
                    "the authors' code needs understanding.hidden_channels ({}) == pixel_decoder.mask_dim ({}) == pixel_decoder.conv_dim ({}) == predictor.hidden_dim ({d})",
                    self.understanding.hidden_channels, self.pixel_decoder.mask_dim, self.pixel_decoder.conv_dim
                ),
            );
        }
        for (field, heads) in [
            ("predictor.num_heads", self.predictor.num_heads),
            ("predictor.q2tca_heads", self.predictor.q2tca_heads),
            ("understanding.aligner_heads", self.understanding.aligner_heads),
            ("pixel_decoder.num_heads", self.pixel_decoder.num_heads),
        ] {
            if heads == 0 || d % heads != 0 {
                return bad(field, format!("hidden_dim {d} is not a multiple of {heads} heads"));
            }
        }
        if d % self.pixel_decoder.groupnorm_groups != 0 {
            return bad("pixel_decoder.groupnorm_groups", format!("{d} channels are not divisible into {} groups", self.pixel_decoder.groupnorm_groups));
        }
        if self.pixel_decoder.num_levels != 3 {
            return bad("pixel_decoder.num_levels", "the authors' decoder uses exactly 3 levels (res5, res4, res3)".into());
        }
        if self.understanding.num_queries != self.predictor.num_queries {
            return bad("understanding.num_queries", "must equal predictor.num_queries".into());
        }
        let r = &self.runtime;
        if r.img_mini_size == 0 || r.img_mini_size % b.patch_size != 0 {
            return bad("runtime.img_mini_size", format!("{} is not a positive multiple of the BEiT-3 patch {}", r.img_mini_size, b.patch_size));
        }
        // The loopback pools the stride-4 mask features by 4 more (stride 16); odd Swin stages
        // below that are padded by PatchMerging exactly as in the reference.
        if r.hier_img_size == 0 || r.hier_img_size % 16 != 0 {
            return bad("runtime.hier_img_size", format!("{} is not a positive multiple of 16", r.hier_img_size));
        }
        if r.max_token < 3 || r.max_token > b.max_source_positions.saturating_sub(2) {
            return bad("runtime.max_token", format!("{} must be in 3..={} (BOS + at least one token + EOS, within the text position table)", r.max_token, b.max_source_positions.saturating_sub(2)));
        }
        Ok(())
    }

    /// Patches per side of the BEiT-3 input.
    pub fn beit_grid(&self) -> usize {
        self.runtime.img_mini_size / self.beit3.patch_size
    }

    /// Rows of the vision position table `embed_positions.A`: patches + CLS + fairseq offset 2.
    pub fn beit_vision_positions(&self) -> usize {
        self.beit_grid() * self.beit_grid() + 3
    }

    /// Channels of Swin stage `i` (`C0 · 2^i`).
    pub fn swin_channels(&self, i: usize) -> usize {
        self.swin.embed_dim << i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_roundtrip() {
        for p in Preset::ALL {
            let c = p.config();
            c.validate().unwrap();
            let back: DerisConfig = serde_json::from_str(&c.to_json()).unwrap();
            assert_eq!(back, c);
            assert_eq!(p.name().parse::<Preset>().unwrap(), p);
        }
        assert_eq!(DerisConfig::deris_b_refcoco().beit_vision_positions(), 199);
    }

    #[test]
    fn precision_defaults_to_f32_and_rejects_unknown_names() {
        let mut v: serde_json::Value = serde_json::from_str(&DerisConfig::deris_b_refcoco().to_json()).unwrap();
        assert_eq!(v["runtime"]["precision"], "f32");
        v["runtime"].as_object_mut().unwrap().remove("precision");
        let c: DerisConfig = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(c.runtime.precision, Precision::F32, "missing field: f32");
        v["runtime"]["precision"] = "bf16".into();
        let c: DerisConfig = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(c.runtime.precision, Precision::Bf16);
        v["runtime"]["precision"] = "fp16".into();
        let e = serde_json::from_value::<DerisConfig>(v).unwrap_err().to_string();
        assert!(e.contains("runtime.precision") && e.contains("fp16"), "{e}");
    }

    #[test]
    fn unknown_preset_lists_the_known_ones() {
        let e = "deris-x".parse::<Preset>().unwrap_err().to_string();
        assert!(e.contains("deris-b-refcoco"), "{e}");
    }
}
