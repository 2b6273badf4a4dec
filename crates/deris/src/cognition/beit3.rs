//! BEiT-3 multiway encoder as torchscale 0.3.0 computes it for DeRIS (MODEL-SPEC §2.2):
//! `BEIT3` (`deris/models/vis_encs/beit/beit3.py`) wrapping torchscale's `BEiT3`, its
//! `VisionEmbedding`, `Encoder`, `EncoderLayer`, `MultiheadAttention` and `FeedForwardNetwork`.
//!
//! Keys: `understanding_branch.vis_enc.beit3.*`.
//!
//! The encoder sees `[CLS, g×g patches, L text tokens]`; the vision tokens use the `A` experts and
//! the text tokens the `B` experts (see [`crate::nn::multiway`]), and only the self-attention
//! mixes them. Layers are pre-LN with sub-LN (`inner_attn_ln` before `out_proj`,
//! `ffn_layernorm` after the GELU).

use candle_core::{bail, DType, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Embedding, VarBuilder};

use crate::config::DerisConfig;
use crate::nn::fused::{LayerNorm, Linear};
use crate::nn::mha::{attention, key_padding_bias, merge_heads, split_heads};
use crate::nn::multiway::{self, Multiway, Split};
use crate::taps::Taps;

/// fairseq's position offset: rows 0 and 1 of both position tables are never used.
const POSITION_OFFSET: usize = 2;

/// The encoder's outputs, split as `BEIT3.forward` splits `encoder_out`.
#[derive(Debug, Clone)]
pub struct Beit3Output {
    /// `x[:, 0]`, `[B, D]`.
    pub cls_feat: Tensor,
    /// `x[:, 1:1+g²]`, `[B, g², D]` (patch index `row·g + col`).
    pub img_feat: Tensor,
    /// `x[:, 1+g²:]`, `[B, L, D]`, padded positions included.
    pub text_feat: Tensor,
}

/// torchscale `VisionEmbedding`: a patch conv, then a prepended CLS token.
#[derive(Debug, Clone)]
struct VisionEmbedding {
    proj: Conv2d,
    cls_token: Tensor,
}

impl VisionEmbedding {
    fn new(in_chans: usize, dim: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let conv_cfg = Conv2dConfig { stride: patch, ..Default::default() };
        let proj = candle_nn::conv2d(in_chans, dim, patch, conv_cfg, vb.pp("proj"))?;
        let cls_token = vb.get((1, 1, dim), "cls_token")?;
        // Only used for masked-image pretraining; requested so strict loading sees it.
        vb.get((1, 1, dim), "mask_token")?;
        Ok(Self { proj, cls_token })
    }

    /// `[B, 3, S, S]` → `[B, 1 + g², D]`.
    fn forward(&self, img: &Tensor) -> Result<Tensor> {
        let x = self.proj.forward(img)?; // [B, D, g, g]
        let (b, d, _, _) = x.dims4()?;
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [B, g², D]
        let cls = self.cls_token.broadcast_as((b, 1, d))?;
        Tensor::cat(&[&cls, &x], 1) // [B, 1 + g², D]
    }
}

/// torchscale `MultiheadAttention` (self-attention, multiway, `subln=True`).
#[derive(Debug, Clone)]
struct MultiheadAttention {
    k_proj: Multiway<Linear>,
    v_proj: Multiway<Linear>,
    q_proj: Multiway<Linear>,
    out_proj: Multiway<Linear>,
    inner_attn_ln: Multiway<LayerNorm>,
    num_heads: usize,
    scaling: f64,
}

impl MultiheadAttention {
    fn new(dim: usize, num_heads: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            k_proj: multiway::linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: multiway::linear(dim, dim, vb.pp("v_proj"))?,
            q_proj: multiway::linear(dim, dim, vb.pp("q_proj"))?,
            out_proj: multiway::linear(dim, dim, vb.pp("out_proj"))?,
            inner_attn_ln: multiway::layer_norm(dim, eps, vb.pp("inner_attn_ln"))?,
            num_heads,
            scaling: ((dim / num_heads) as f64).powf(-0.5),
        })
    }

    /// Joint attention of every token over all `Ta + Tb` tokens; each part's queries run
    /// separately so the outputs come back already split for `inner_attn_ln` and `out_proj`.
    /// Returns `residual + attention(x)` (the residual addition is fused into `out_proj`).
    ///
    /// `key_bias`: `[B, 1, 1, Ta + Tb]`, −inf on padded text keys.
    fn forward_add(&self, x: &Split, key_bias: &Tensor, residual: &Split) -> Result<Split> {
        let k = split_heads(&self.k_proj.forward(x)?.cat()?, self.num_heads)?; // [B, H, T, hd]
        let v = split_heads(&self.v_proj.forward(x)?.cat()?, self.num_heads)?; // [B, H, T, hd]
        let q = self.q_proj.forward(x)?;
        let attend = |q: &Tensor| -> Result<Tensor> {
            let q = split_heads(q, self.num_heads)?; // [B, H, Tq, hd]
            merge_heads(&attention(&q, &k, &v, self.scaling, Some(key_bias))?) // [B, Tq, D]
        };
        let o = Split { a: attend(&q.a)?, b: attend(&q.b)? };
        self.out_proj.forward_add(&self.inner_attn_ln.forward(&o)?, residual)
    }
}

/// torchscale `FeedForwardNetwork` with sub-LN: `fc2(ffn_layernorm(gelu(fc1(x))))`.
#[derive(Debug, Clone)]
struct FeedForwardNetwork {
    fc1: Linear,
    fc2: Linear,
    ffn_layernorm: LayerNorm,
}

impl FeedForwardNetwork {
    fn new(dim: usize, ffn_dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: crate::nn::fused::linear(dim, ffn_dim, vb.pp("fc1"))?,
            fc2: crate::nn::fused::linear(ffn_dim, dim, vb.pp("fc2"))?,
            ffn_layernorm: crate::nn::fused::layer_norm(ffn_dim, eps, vb.pp("ffn_layernorm"))?,
        })
    }

    /// `residual + ffn(x)`, the addition fused into `fc2`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward_gelu(x)?;
        self.fc2.forward_add(&self.ffn_layernorm.forward(&h)?, residual)
    }
}

/// torchscale `EncoderLayer`, pre-LN: `h = x + attn(LN(x))`, `y = h + ffn(LN(h))`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: MultiheadAttention,
    self_attn_layer_norm: Multiway<LayerNorm>,
    ffn: Multiway<FeedForwardNetwork>,
    final_layer_norm: Multiway<LayerNorm>,
}

impl EncoderLayer {
    fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let b = &cfg.beit3;
        let (d, eps) = (b.embed_dim, b.layernorm_eps);
        Ok(Self {
            self_attn: MultiheadAttention::new(d, b.num_heads, eps, vb.pp("self_attn"))?,
            self_attn_layer_norm: multiway::layer_norm(d, eps, vb.pp("self_attn_layer_norm"))?,
            ffn: Multiway::new(vb.pp("ffn"), |vb| FeedForwardNetwork::new(d, b.ffn_dim, eps, vb))?,
            final_layer_norm: multiway::layer_norm(d, eps, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, x: &Split, key_bias: &Tensor) -> Result<Split> {
        let h = self.self_attn.forward_add(&self.self_attn_layer_norm.forward(x)?, key_bias, x)?;
        let y = self.final_layer_norm.forward(&h)?;
        Ok(Split { a: self.ffn.a.forward_add(&y.a, &h.a)?, b: self.ffn.b.forward_add(&y.b, &h.b)? })
    }
}

/// torchscale `BEiT3` (multiway, sub-LN, pre-norm, no output layer) as built by DeRIS's `BEIT3`.
#[derive(Debug, Clone)]
pub struct Beit3 {
    text_embed: Embedding,
    vision_embed: VisionEmbedding,
    /// `encoder.embed_positions.{A,B}.weight`: `[g² + 3, D]` and `[max_source_positions, D]`.
    embed_positions: Multiway<Tensor>,
    layers: Vec<EncoderLayer>,
    /// `encoder.layer_norm`.
    layer_norm: Multiway<LayerNorm>,
    img_size: usize,
    vocab_size: usize,
    max_text_len: usize,
}

impl Beit3 {
    /// `vb` = `understanding_branch.vis_enc.beit3`. The input side is `cfg.runtime.img_mini_size`.
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let b = &cfg.beit3;
        let d = b.embed_dim;
        let text_embed = Embedding::new(vb.pp("text_embed").get((b.vocab_size, d), "weight")?, d);
        let vision_embed = VisionEmbedding::new(3, d, b.patch_size, vb.pp("vision_embed"))?;
        let venc = vb.pp("encoder");
        let vpos = venc.pp("embed_positions");
        let embed_positions = Multiway {
            a: vpos.pp("A").get((cfg.beit_vision_positions(), d), "weight")?,
            b: vpos.pp("B").get((b.max_source_positions, d), "weight")?,
        };
        let layers =
            (0..b.num_layers).map(|i| EncoderLayer::new(cfg, venc.pp("layers").pp(i))).collect::<Result<Vec<_>>>()?;
        let layer_norm = multiway::layer_norm(d, b.layernorm_eps, venc.pp("layer_norm"))?;
        Ok(Self {
            text_embed,
            vision_embed,
            embed_positions,
            layers,
            layer_norm,
            img_size: cfg.runtime.img_mini_size,
            vocab_size: b.vocab_size,
            max_text_len: b.max_source_positions.saturating_sub(POSITION_OFFSET),
        })
    }

    /// Checks the inputs against the sizes the weights were built for.
    fn check_inputs(&self, img: &Tensor, ids: &Tensor, pad: &Tensor) -> Result<()> {
        let (b, c, h, w) = img.dims4()?;
        if c != 3 || h != self.img_size || w != self.img_size {
            bail!(
                "BEiT-3 input must be [B, 3, {s}, {s}] (runtime.img_mini_size = {s}), got {:?}",
                img.dims(),
                s = self.img_size
            );
        }
        let (bt, l) = ids.dims2()?;
        if bt != b || pad.dims() != ids.dims() {
            bail!("BEiT-3 text ids {:?} and padding mask {:?} must both be [B={b}, L]", ids.dims(), pad.dims());
        }
        if l == 0 || l > self.max_text_len {
            bail!(
                "BEiT-3 text length {l} must be in 1..={} (text position table minus the fairseq offset 2)",
                self.max_text_len
            );
        }
        let ids64 = ids.to_dtype(DType::I64)?.flatten_all()?;
        let (lo, hi) = (ids64.min(0)?.to_scalar::<i64>()?, ids64.max(0)?.to_scalar::<i64>()?);
        if lo < 0 || hi >= self.vocab_size as i64 {
            bail!("BEiT-3 token ids must lie in 0..{}, got ids in {lo}..={hi}", self.vocab_size);
        }
        Ok(())
    }

    /// # Shapes
    /// - `img`: `[B, 3, S, S]` f32 normalised, `S = runtime.img_mini_size`
    /// - `ids`: `[B, L]` integer token ids; `pad`: `[B, L]` integer, **1 = padding**
    /// - returns `cls_feat [B, D]`, `img_feat [B, g², D]`, `text_feat [B, L, D]`
    pub fn forward(&self, img: &Tensor, ids: &Tensor, pad: &Tensor, taps: &mut Taps) -> Result<Beit3Output> {
        self.check_inputs(img, ids, pad)?;
        let vision = self.vision_embed.forward(img)?; // [B, 1 + g², D]
        let text = self.text_embed.forward(ids)?; // [B, L, D]
        taps.record("beit.vision_embed", &vision);
        taps.record("beit.text_embed", &text);
        let (b, nv, _) = vision.dims3()?;
        let l = text.dim(1)?;

        let pos_a = self.embed_positions.a.narrow(0, POSITION_OFFSET, nv)?;
        let pos_b = self.embed_positions.b.narrow(0, POSITION_OFFSET, l)?;
        let keep = pad.eq(0f64)?.to_dtype(DType::F32)?.unsqueeze(2)?; // [B, L, 1]
        let mut x = Split { a: vision.broadcast_add(&pos_a)?, b: text.broadcast_add(&pos_b)?.broadcast_mul(&keep)? };
        let pad_full = Tensor::cat(&[&Tensor::zeros((b, nv), pad.dtype(), pad.device())?, pad], 1)?; // [B, T]
        let key_bias = key_padding_bias(&pad_full, f32::NEG_INFINITY)?; // [B, 1, 1, T]

        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, &key_bias)?;
            taps.record_with(format!("beit.layer{i}"), || x.cat())?;
        }
        let x = self.layer_norm.forward(&x)?;
        taps.record_with("beit.encoder_out", || x.cat())?;

        let out = Beit3Output {
            cls_feat: x.a.narrow(1, 0, 1)?.squeeze(1)?,
            img_feat: x.a.narrow(1, 1, nv - 1)?,
            text_feat: x.b,
        };
        taps.record("beit.img_feat", &out.img_feat);
        taps.record("beit.text_feat", &out.text_feat);
        taps.record("beit.cls_feat", &out.cls_feat);
        Ok(out)
    }
}
