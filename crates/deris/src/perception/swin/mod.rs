//! Swin Transformer backbone of the perception branch (`SwinTransformer`, `PatchEmbed`,
//! `BasicLayer` and `PatchMerging` of `deris/models/vis_encs/swin_trans.py`), MODEL-SPEC §4.
//!
//! Keys: `perception_branch.hier_vision_encoder.*`: `patch_embed.{proj, norm}`,
//! `layers.{s}.blocks.{j}.*` (see [`block`]), `layers.{s<3}.downsample.{reduction, norm}`,
//! `norm{0..3}`.
//!
//! Every stage pads its map to a multiple of the window after `norm1`, with unmasked zero tokens;
//! odd blocks shift by `ws/2` even when the map is no bigger than the window. The outputs are the
//! per-stage norms of each stage, taken before its downsampling.

pub mod block;
pub mod windows;

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use self::block::SwinTransformerBlock;
use self::windows::StageWindows;
use crate::config::DerisConfig;
use crate::nn::fused::{layer_norm, linear_no_bias, LayerNorm, Linear};
use crate::taps::Taps;

/// Number of stages (res2..res5).
const NUM_STAGES: usize = 4;
/// Image channels the patch projection expects (RGB).
const IN_CHANS: usize = 3;

/// `PatchEmbed`: a stride-`p` `p×p` convolution (computed as one matmul on the patches), then
/// LayerNorm over the tokens.
#[derive(Debug)]
pub struct PatchEmbed {
    /// `proj` conv weight `[C0, 3, p, p]` flattened to `[C0, 3·p·p]`, with its bias.
    proj: Linear,
    norm: LayerNorm,
    patch_size: usize,
}

impl PatchEmbed {
    pub fn new(patch_size: usize, embed_dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let p = patch_size;
        let weight = vb.pp("proj").get((embed_dim, IN_CHANS, p, p), "weight")?;
        let bias = vb.pp("proj").get(embed_dim, "bias")?;
        Ok(Self {
            proj: Linear::new(weight.reshape((embed_dim, IN_CHANS * p * p))?, Some(bias))?,
            norm: layer_norm(embed_dim, eps, vb.pp("norm"))?,
            patch_size,
        })
    }

    /// # Shapes
    /// - `img`: `[B, 3, H, W]`, zero-padded right/bottom to a multiple of the patch size `p`
    /// - returns tokens `[B, Hp·Wp, C0]` row-major and the grid `(Hp, Wp) = (⌈H/p⌉, ⌈W/p⌉)`
    pub fn forward(&self, img: &Tensor) -> Result<(Tensor, usize, usize)> {
        let p = self.patch_size;
        let (b, c, h, w) = img.dims4()?;
        if c != IN_CHANS {
            candle_core::bail!("swin patch_embed: expected an image [B, {IN_CHANS}, H, W], got {:?}", img.dims());
        }
        let img = if w % p != 0 { img.pad_with_zeros(3, 0, p - w % p)? } else { img.clone() };
        let img = if h % p != 0 { img.pad_with_zeros(2, 0, p - h % p)? } else { img };
        let (gh, gw) = (h.div_ceil(p), w.div_ceil(p));
        let patches = img
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))? // [B, gh, gw, 3, p, p]
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?; // [B, gh·gw, 3·p·p]
        let x = self.norm.forward(&self.proj.forward(&patches)?)?; // [B, gh·gw, C0]
        Ok((x, gh, gw))
    }
}

/// `PatchMerging`: concatenates the 2×2 neighbours (zero-padding odd sizes) in the order
/// `[0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2]`, then LayerNorm(4C) and a bias-free
/// Linear(4C→2C).
#[derive(Debug)]
pub struct PatchMerging {
    norm: LayerNorm,
    reduction: Linear,
}

impl PatchMerging {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm: layer_norm(4 * dim, eps, vb.pp("norm"))?,
            reduction: linear_no_bias(4 * dim, 2 * dim, vb.pp("reduction"))?,
        })
    }

    /// # Shapes
    /// - `x`: `[B, H·W, C]` row-major tokens of an `H×W` map
    /// - returns `[B, ⌈H/2⌉·⌈W/2⌉, 2C]`
    pub fn forward(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (b, _, c) = x.dims3()?;
        let x = x.reshape((b, h, w, c))?;
        let x = if h % 2 == 1 { x.pad_with_zeros(1, 0, 1)? } else { x };
        let x = if w % 2 == 1 { x.pad_with_zeros(2, 0, 1)? } else { x };
        let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
        let x = x
            .reshape((b, h2, 2, w2, 2, c))? // [B, H/2, dy, W/2, dx, C]
            .permute((0, 1, 3, 4, 2, 5))? // [B, H/2, W/2, dx, dy, C]: (0,0), (1,0), (0,1), (1,1)
            .contiguous()?
            .reshape((b, h2 * w2, 4 * c))?; // [B, H/2·W/2, 4C]
        self.reduction.forward(&self.norm.forward(&x)?)
    }
}

/// `BasicLayer`: one stage, `depth` blocks alternating regular and shifted windows, and the
/// `PatchMerging` of stages 0–2.
#[derive(Debug)]
pub struct BasicLayer {
    blocks: Vec<SwinTransformerBlock>,
    downsample: Option<PatchMerging>,
}

/// The per-stage windows of one patch-grid size `(H/4, W/4)`.
type WindowCache = ((usize, usize), Arc<Vec<StageWindows>>);

/// The Swin backbone (`SwinTransformer` with `ape=False`, `patch_norm=True`, `out_indices=(0,1,2,3)`).
#[derive(Debug)]
pub struct SwinTransformer {
    patch_embed: PatchEmbed,
    layers: Vec<BasicLayer>,
    /// `norm0..norm3`: the output norm of each stage.
    norms: Vec<LayerNorm>,
    window_size: usize,
    device: Device,
    dtype: DType,
    /// Window indices and masks of the four stages for the last patch-grid size seen.
    windows: Mutex<Option<WindowCache>>,
}

impl SwinTransformer {
    /// `vb` = `perception_branch.hier_vision_encoder`; sizes from `cfg.swin`.
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let s = &cfg.swin;
        if s.depths.len() != NUM_STAGES || s.num_heads.len() != NUM_STAGES {
            candle_core::bail!("swin: expected {NUM_STAGES} stages, got depths {:?} and heads {:?}", s.depths, s.num_heads);
        }
        let ws = s.window_size;
        let eps = s.layernorm_eps;
        let mut layers = Vec::with_capacity(NUM_STAGES);
        let mut norms = Vec::with_capacity(NUM_STAGES);
        for (i, (&depth, &heads)) in s.depths.iter().zip(&s.num_heads).enumerate() {
            let dim = s.embed_dim << i;
            if ws == 0 || heads == 0 || dim % heads != 0 {
                candle_core::bail!("swin stage {i}: width {dim} with {heads} heads and window {ws}");
            }
            let mlp_hidden = (dim as f64 * s.mlp_ratio) as usize;
            let vb_l = vb.pp("layers").pp(i);
            let blocks = (0..depth)
                .map(|j| SwinTransformerBlock::new(dim, heads, ws, mlp_hidden, j % 2 == 1, eps, vb_l.pp("blocks").pp(j)))
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < NUM_STAGES { Some(PatchMerging::new(dim, eps, vb_l.pp("downsample"))?) } else { None };
            layers.push(BasicLayer { blocks, downsample });
            norms.push(layer_norm(dim, eps, vb.pp(format!("norm{i}")))?);
        }
        Ok(Self {
            patch_embed: PatchEmbed::new(s.patch_size, s.embed_dim, eps, vb.pp("patch_embed"))?,
            layers,
            norms,
            window_size: ws,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            windows: Mutex::new(None),
        })
    }

    /// # Shapes
    /// - `img`: `[B, 3, H, W]` f32, normalised RGB (any H, W; padded to the patch size)
    /// - returns `[res2, res3, res4, res5]`, NCHW, res`k` = `[B, C0·2^i, ⌈H/4/2^i⌉, ⌈W/4/2^i⌉]`
    ///   with `i = k − 2` (strides 4, 8, 16, 32)
    pub fn forward(&self, img: &Tensor, taps: &mut Taps) -> Result<[Tensor; 4]> {
        let (mut x, mut h, mut w) = self.patch_embed.forward(img)?; // [B, H/4·W/4, C0]
        taps.record_with("swin.patch_embed", || tokens_to_nchw(&x, h, w))?;
        let windows = self.stage_windows(h, w)?;
        let mut outs = Vec::with_capacity(NUM_STAGES);
        for (i, ((layer, norm), stage_windows)) in self.layers.iter().zip(&self.norms).zip(windows.iter()).enumerate() {
            for blk in &layer.blocks {
                x = blk.forward(&x, stage_windows)?; // [B, H·W, C_i]
            }
            let out = tokens_to_nchw(&norm.forward(&x)?, h, w)?; // [B, C_i, H, W]
            taps.record(format!("swin.res{}", i + 2), &out);
            outs.push(out);
            if let Some(down) = &layer.downsample {
                x = down.forward(&x, h, w)?; // [B, ⌈H/2⌉·⌈W/2⌉, 2C_i]
                (h, w) = (h.div_ceil(2), w.div_ceil(2));
            }
        }
        <[Tensor; 4]>::try_from(outs).map_err(|v| candle_core::Error::Msg(format!("swin produced {} outputs, not 4", v.len())))
    }

    /// The window indices and masks of every stage for a patch grid of `h×w`, built on first use
    /// and kept for the next call at the same size.
    fn stage_windows(&self, h: usize, w: usize) -> Result<Arc<Vec<StageWindows>>> {
        // The cache holds a complete value or none, so a poisoned lock is still consistent.
        let mut cache = self.windows.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((size, windows)) = cache.as_ref() {
            if *size == (h, w) {
                return Ok(windows.clone());
            }
        }
        let mut stages = Vec::with_capacity(NUM_STAGES);
        let (mut sh, mut sw) = (h, w);
        for _ in 0..NUM_STAGES {
            stages.push(StageWindows::new(sh, sw, self.window_size, self.dtype, &self.device)?);
            (sh, sw) = (sh.div_ceil(2), sw.div_ceil(2));
        }
        let stages = Arc::new(stages);
        *cache = Some(((h, w), stages.clone()));
        Ok(stages)
    }
}

/// `[B, H·W, C]` row-major tokens → `[B, C, H, W]`.
fn tokens_to_nchw(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
}
