//! `MSDeformAttnPixelDecoder` (`Mask2Former_Simplify/modeling/pixel_decoder/msdeformattn.py`),
//! MODEL-SPEC §5: input projections of res5/res4/res3, a deformable transformer encoder over
//! the three levels, and one FPN step that brings res2 in for the stride-4 mask features.
//!
//! Keys: `perception_branch.pixel_decoder.*` —
//! `input_proj.{l}.{0: Conv1x1, 1: GroupNorm}`, `transformer.level_embed` (a Parameter
//! `[L, d]`), `transformer.encoder.layers.{i}.{self_attn.*, norm1, linear1, linear2, norm2}`,
//! `mask_features` (Conv1x1), `adapter_1.{0: Conv1x1 with bias, 1: GroupNorm}`,
//! `layer_1.{0: Conv3x3, 1: GroupNorm}`.

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use deris_kernels::post_norm;

use crate::nn::fused::{linear, LayerNorm, Linear};
use crate::config::DerisConfig;
use crate::nn::{dense, interpolate::resize_bilinear, layer_norm, norm, pos_embed};
use crate::perception::msdeform::MSDeformAttn;
use crate::taps::Taps;

/// `nn.Sequential(Conv2d, GroupNorm[, ReLU])`: keys `0` (conv, with bias) and `1` (norm, eps
/// 1e-5, per-channel affine). Runs on [`deris_kernels::conv2d`] and
/// [`deris_kernels::group_norm`] (fast on the CPU; candle's primitives, with gradients, when an
/// input tracks them).
#[derive(Debug, Clone)]
struct ConvGroupNorm {
    /// `[c_out, c_in, k, k]`.
    conv_weight: Tensor,
    conv_bias: Tensor,
    padding: usize,
    norm_weight: Tensor,
    norm_bias: Tensor,
    groups: usize,
    relu: bool,
}

impl ConvGroupNorm {
    fn new(c_in: usize, c_out: usize, kernel: usize, groups: usize, relu: bool, vb: VarBuilder) -> Result<Self> {
        let (conv, norm) = (vb.pp("0"), vb.pp("1"));
        Ok(Self {
            conv_weight: conv.get((c_out, c_in, kernel, kernel), "weight")?,
            conv_bias: conv.get(c_out, "bias")?,
            padding: kernel / 2,
            norm_weight: norm.get(c_out, "weight")?,
            norm_bias: norm.get(c_out, "bias")?,
            groups,
            relu,
        })
    }

    /// # Shapes
    /// - `x`: `[B, c_in, H, W]` → `[B, c_out, H, W]`
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = deris_kernels::conv2d(x, &self.conv_weight, Some(&self.conv_bias), self.padding)?;
        deris_kernels::group_norm(&y, self.groups, &self.norm_weight, &self.norm_bias, GROUP_NORM_EPS, self.relu)
    }
}

/// `nn.GroupNorm`'s default epsilon.
const GROUP_NORM_EPS: f64 = 1e-5;

/// `MSDeformAttnTransformerEncoderLayer`: post-norm deformable self-attention + ReLU FFN.
#[derive(Debug, Clone)]
pub struct MSDeformAttnTransformerEncoderLayer {
    self_attn: MSDeformAttn,
    norm1: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    norm2: LayerNorm,
}

impl MSDeformAttnTransformerEncoderLayer {
    /// `vb` at `transformer.encoder.layers.{i}`.
    pub fn new(d: usize, ffn: usize, n_levels: usize, n_heads: usize, n_points: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: MSDeformAttn::new(d, n_levels, n_heads, n_points, vb.pp("self_attn"))?,
            norm1: layer_norm(d, 1e-5, vb.pp("norm1"))?,
            linear1: linear(d, ffn, vb.pp("linear1"))?,
            linear2: linear(ffn, d, vb.pp("linear2"))?,
            norm2: layer_norm(d, 1e-5, vb.pp("norm2"))?,
        })
    }

    /// `src = norm1(src + MSDeformAttn(src + pos, ref, src))`, then
    /// `src = norm2(src + linear2(relu(linear1(src))))`: the attention's output projection and
    /// both post-norm steps run as the fused row-block ops of [`deris_kernels::post_norm`].
    /// With `attn_tap = Some(prefix)` the attention's `query` and `out` are recorded under
    /// `{prefix}.query` / `{prefix}.out`.
    ///
    /// # Shapes
    /// - `src`: `[B, S, d]`; `pos`: `[1, S, d]` (position + level embedding)
    /// - `reference_points`: `[B, S, L, 2]`; returns `[B, S, d]`
    pub fn forward(
        &self,
        src: &Tensor,
        pos: &Tensor,
        reference_points: &Tensor,
        spatial_shapes: &[(usize, usize)],
        taps: &mut Taps,
        attn_tap: Option<&str>,
    ) -> Result<Tensor> {
        let query = src.broadcast_add(pos)?;
        let sampled = self.self_attn.sample(&query, reference_points, src, spatial_shapes)?;
        let out_proj = self.self_attn.output_proj();
        if let (Some(prefix), true) = (attn_tap, taps.enabled()) {
            taps.record(format!("{prefix}.query"), &query);
            taps.record(format!("{prefix}.out"), &out_proj.forward(&sampled)?);
        }
        let src = post_norm::linear_residual_norm(&sampled, dense(out_proj), src, norm(&self.norm1))?;
        post_norm::ffn_residual_norm(&src, dense(&self.linear1), dense(&self.linear2), norm(&self.norm2))
    }
}

/// What the pixel decoder hands to the predictor.
#[derive(Debug, Clone)]
pub struct PixelDecoderOutput {
    /// `[B, d, H/4, W/4]`: `mask_features` conv of the stride-4 FPN map.
    pub mask_features: Tensor,
    /// The encoder outputs `[B, d, h_l, w_l]` at strides 32, 16, 8 (low to high resolution).
    pub multi_scale_features: Vec<Tensor>,
}

/// `MSDeformAttnPixelDecoder` with its `MSDeformAttnTransformerEncoderOnly`.
#[derive(Debug, Clone)]
pub struct MSDeformAttnPixelDecoder {
    /// Level `l` projects `res{5-l}` (low to high resolution).
    input_proj: Vec<ConvGroupNorm>,
    /// `transformer.level_embed`, `[L, d]`.
    level_embed: Tensor,
    /// `transformer.encoder.layers`.
    encoder_layers: Vec<MSDeformAttnTransformerEncoderLayer>,
    /// `mask_features` Conv1x1: weight `[mask_dim, d, 1, 1]` and bias.
    mask_features: (Tensor, Tensor),
    /// Lateral conv of res2: Conv1x1 → GroupNorm → ReLU.
    adapter_1: ConvGroupNorm,
    /// Output conv of the FPN level: Conv3x3 → GroupNorm → ReLU.
    layer_1: ConvGroupNorm,
    /// Channels of res2..res5.
    in_channels: [usize; 4],
    conv_dim: usize,
    span: tracing::Span,
}

impl MSDeformAttnPixelDecoder {
    /// `vb = root.pp("perception_branch").pp("pixel_decoder")`.
    pub fn new(cfg: &DerisConfig, vb: VarBuilder) -> Result<Self> {
        let p = &cfg.pixel_decoder;
        let d = p.conv_dim;
        let in_channels = [0, 1, 2, 3].map(|i| cfg.swin_channels(i));
        // The transformer reads res3..res5, so one FPN level (res2) reaches stride 4.
        if p.num_levels != 3 || p.common_stride != 4 {
            candle_core::bail!(
                "pixel decoder: the authors' layout needs 3 levels and common_stride 4, got {} and {}",
                p.num_levels,
                p.common_stride
            );
        }
        let groups = p.groupnorm_groups;
        let input_proj = (0..p.num_levels)
            .map(|l| ConvGroupNorm::new(in_channels[3 - l], d, 1, groups, false, vb.pp("input_proj").pp(l)))
            .collect::<Result<Vec<_>>>()?;
        let tr = vb.pp("transformer");
        let encoder_layers = (0..p.num_encoder_layers)
            .map(|i| {
                MSDeformAttnTransformerEncoderLayer::new(
                    d,
                    p.ffn_dim,
                    p.num_levels,
                    p.num_heads,
                    p.num_points,
                    tr.pp("encoder").pp("layers").pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            input_proj,
            level_embed: tr.get((p.num_levels, d), "level_embed")?,
            encoder_layers,
            mask_features: (
                vb.pp("mask_features").get((p.mask_dim, d, 1, 1), "weight")?,
                vb.pp("mask_features").get(p.mask_dim, "bias")?,
            ),
            adapter_1: ConvGroupNorm::new(in_channels[0], d, 1, groups, true, vb.pp("adapter_1"))?,
            layer_1: ConvGroupNorm::new(d, d, 3, groups, true, vb.pp("layer_1"))?,
            in_channels,
            conv_dim: d,
            span: tracing::span!(tracing::Level::TRACE, "pixel_decoder"),
        })
    }

    /// `forward_features`: the deformable encoder over res5/res4/res3 and the res2 FPN step.
    ///
    /// # Shapes
    /// - `feats`: `[res2, res3, res4, res5]`, NCHW with `C0·2^i` channels at strides 4..32
    /// - returns `mask_features` `[B, d, H2, W2]` (res2's size) and three
    ///   `multi_scale_features` `[B, d, h_l, w_l]` (res5's, res4's, res3's sizes)
    pub fn forward(&self, feats: &[Tensor; 4], taps: &mut Taps) -> Result<PixelDecoderOutput> {
        let _enter = self.span.enter();
        let d = self.conv_dim;
        let b = feats[0].dim(0)?;
        for (i, f) in feats.iter().enumerate() {
            let (fb, c, _, _) = f.dims4()?;
            if fb != b || c != self.in_channels[i] {
                candle_core::bail!(
                    "pixel decoder: res{} is {:?}, expected [{b}, {}, H, W]",
                    i + 2,
                    f.dims(),
                    self.in_channels[i]
                );
            }
        }
        let (dev, dtype) = (feats[0].device(), feats[0].dtype());

        // Levels low to high resolution: res5, res4, res3.
        let n_levels = self.input_proj.len();
        let mut srcs = Vec::with_capacity(n_levels);
        let mut pos = Vec::with_capacity(n_levels);
        let mut shapes = Vec::with_capacity(n_levels);
        for (l, proj) in self.input_proj.iter().enumerate() {
            let x = proj.forward(&feats[3 - l])?; // [B, d, h, w]
            taps.record(format!("pixel_decoder.input_proj{l}"), &x);
            let (_, _, h, w) = x.dims4()?;
            shapes.push((h, w));
            srcs.push(x.flatten_from(2)?.transpose(1, 2)?); // [B, h·w, d]
            let pe = pos_embed::sine_2d(d / 2, h, w, dev)?.to_dtype(dtype)?.reshape((d, h * w))?.t()?; // [h·w, d]
            pos.push(pe.broadcast_add(&self.level_embed.get(l)?)?);
        }
        // `cat` of transposed views returns a token-major view (strides [d, B·d, 1]), which CUDA's
        // matmul refuses for B > 1: make it row-major once here.
        let src = Tensor::cat(&srcs, 1)?.contiguous()?; // [B, S, d]
        let pos = Tensor::cat(&pos, 0)?.unsqueeze(0)?; // [1, S, d]
        let s = src.dim(1)?;
        let reference_points = reference_points(&shapes, dev)?
            .to_dtype(dtype)?
            .broadcast_as((b, s, n_levels, 2))?
            .contiguous()?; // [B, S, L, 2]
        if taps.enabled() {
            let prefix = "pixel_decoder.enc0.self_attn";
            taps.record(format!("{prefix}.reference_points"), &reference_points);
            let flat: Vec<i64> = shapes.iter().flat_map(|&(h, w)| [h as i64, w as i64]).collect();
            taps.record(format!("{prefix}.spatial_shapes"), &Tensor::from_vec(flat, (n_levels, 2), &Device::Cpu)?);
            let starts: Vec<i64> = level_starts(&shapes).into_iter().map(|v| v as i64).collect();
            taps.record(format!("{prefix}.level_start_index"), &Tensor::from_vec(starts, n_levels, &Device::Cpu)?);
        }

        let mut src = src;
        for (i, layer) in self.encoder_layers.iter().enumerate() {
            // the fixture records the attention inputs and output of the first layer only
            let attn_tap = (i == 0).then_some("pixel_decoder.enc0.self_attn");
            src = layer.forward(&src, &pos, &reference_points, &shapes, taps, attn_tap)?;
            taps.record(format!("pixel_decoder.enc_layer{i}"), &src);
        }

        // Split the encoder output back into maps.
        let mut multi_scale_features = Vec::with_capacity(n_levels);
        for (l, (&(h, w), start)) in shapes.iter().zip(level_starts(&shapes)).enumerate() {
            let map = src.narrow(1, start, h * w)?.transpose(1, 2)?.reshape((b, d, h, w))?; // [B, d, h, w]
            taps.record(format!("pixel_decoder.multi_scale_features.{l}"), &map);
            multi_scale_features.push(map);
        }

        // FPN: res2's lateral + the stride-8 map upsampled (bilinear, align_corners=False).
        let lateral = self.adapter_1.forward(&feats[0])?; // [B, d, H2, W2]
        let (_, _, h2, w2) = lateral.dims4()?;
        let top_down = match multi_scale_features.last() {
            Some(m) => resize_bilinear(m, h2, w2, false)?,
            None => candle_core::bail!("pixel decoder: no encoder levels"),
        };
        let fpn = self.layer_1.forward(&(lateral + top_down)?)?;
        let (mask_w, mask_b) = &self.mask_features;
        let mask_features = deris_kernels::conv2d(&fpn, mask_w, Some(mask_b), 0)?; // [B, mask_dim, H2, W2]
        taps.record("pixel_decoder.mask_features", &mask_features);
        Ok(PixelDecoderOutput { mask_features, multi_scale_features })
    }
}

/// First token of each level in the concatenation.
fn level_starts(shapes: &[(usize, usize)]) -> Vec<usize> {
    shapes
        .iter()
        .scan(0, |acc, &(h, w)| {
            let start = *acc;
            *acc += h * w;
            Some(start)
        })
        .collect()
}

/// Pixel-centre reference points `((c+0.5)/W_l, (r+0.5)/H_l)` of every token, `[1, S, 1, 2]`
/// f32 (valid ratios are 1: there is no padding mask).
fn reference_points(shapes: &[(usize, usize)], dev: &Device) -> Result<Tensor> {
    let mut v = Vec::new();
    for &(h, w) in shapes {
        for r in 0..h {
            for c in 0..w {
                v.push((c as f32 + 0.5) / w as f32);
                v.push((r as f32 + 0.5) / h as f32);
            }
        }
    }
    let s = v.len() / 2;
    Tensor::from_vec(v, (1, s, 1, 2), dev)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// `F.group_norm` by hand, in f64: statistics over (channels of the group × H × W).
    fn group_norm_by_hand(x: &[f32], (b, c, hw): (usize, usize, usize), groups: usize, w: &[f32], bias: &[f32]) -> Vec<f32> {
        let cpg = c / groups;
        let mut out = vec![0f32; x.len()];
        for bi in 0..b {
            for g in 0..groups {
                let idx = |ch: usize, i: usize| (bi * c + g * cpg + ch) * hw + i;
                let n = (cpg * hw) as f64;
                let mean = (0..cpg).flat_map(|ch| (0..hw).map(move |i| (ch, i))).map(|(ch, i)| x[idx(ch, i)] as f64).sum::<f64>() / n;
                let var = (0..cpg)
                    .flat_map(|ch| (0..hw).map(move |i| (ch, i)))
                    .map(|(ch, i)| (x[idx(ch, i)] as f64 - mean).powi(2))
                    .sum::<f64>()
                    / n;
                for ch in 0..cpg {
                    let cc = g * cpg + ch;
                    for i in 0..hw {
                        let y = (x[idx(ch, i)] as f64 - mean) / (var + 1e-5).sqrt();
                        out[idx(ch, i)] = (y * w[cc] as f64 + bias[cc] as f64) as f32;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn group_norm_with_several_channels_per_group() {
        let dev = Device::Cpu;
        for (channels, groups) in [(64usize, 32usize), (256, 32), (32, 32)] {
            let (b, h, w) = (2usize, 3usize, 5usize);
            let n = b * channels * h * w;
            // deterministic, uneven values with a per-channel offset so groups differ
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1013) as f32 / 101.0 - 5.0) + (i / (h * w) % channels) as f32 * 0.02).collect();
            let weight: Vec<f32> = (0..channels).map(|i| 1.0 + 0.01 * i as f32).collect();
            let bias: Vec<f32> = (0..channels).map(|i| 0.05 * i as f32 - 0.5).collect();
            let mut map = HashMap::new();
            map.insert("weight".to_string(), Tensor::from_vec(weight.clone(), channels, &dev).unwrap());
            map.insert("bias".to_string(), Tensor::from_vec(bias.clone(), channels, &dev).unwrap());
            let xt = Tensor::from_vec(x.clone(), (b, channels, h, w), &dev).unwrap();
            let (wt, bt) = (&map["weight"], &map["bias"]);
            let got = deris_kernels::group_norm(&xt, groups, wt, bt, GROUP_NORM_EPS, false).unwrap();
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = group_norm_by_hand(&x, (b, channels, h * w), groups, &weight, &bias);
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
            println!("GroupNorm({groups}, {channels}), {} channels per group: max |Δ| = {worst:.2e} (scale {scale:.2})", channels / groups);
            assert!(worst <= 1e-6 * scale, "{} channels per group: max |Δ| = {worst} (scale {scale})", channels / groups);
        }
    }

    #[test]
    fn reference_points_are_pixel_centres_per_level() {
        let t = reference_points(&[(1, 2), (2, 1)], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 4, 1, 2]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0.25, 0.5, 0.75, 0.5, 0.5, 0.25, 0.5, 0.75]);
        assert_eq!(level_starts(&[(12, 12), (24, 24), (48, 48)]), vec![0, 144, 720]);
    }
}
