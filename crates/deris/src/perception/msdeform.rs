//! `MSDeformAttn`, Deformable DETR's multi-scale deformable attention module
//! (`Mask2Former_Simplify/modeling/pixel_decoder/ops/modules/ms_deform_attn.py`), MODEL-SPEC §5.4.
//!
//! Keys (under `…transformer.encoder.layers.{i}.self_attn`): `sampling_offsets`,
//! `attention_weights`, `value_proj`, `output_proj` (each `weight`, `bias`).
//!
//! The sampling itself is the [`deris_kernels::ms_deform_attn`](fn@deris_kernels::ms_deform_attn)
//! op (multithreaded CPU, CUDA with the `cuda` feature, gradients for all inputs); its inputs
//! come from [`deris_kernels::ms_deform_attn::sampling_inputs`] and the projections are
//! [`crate::nn::fused::Linear`]s (both fast on the CPU, primitive ops with gradients in
//! training; weights packed once in bf16 when the model is built in bf16 mode).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::fused::{linear, Linear};

/// `MSDeformAttn(d_model, n_levels, n_heads, n_points)`.
#[derive(Debug, Clone)]
pub struct MSDeformAttn {
    /// `Linear(d, M·L·P·2)`; output channel `((m·L + l)·P + p)·2 + {0: x, 1: y}`.
    sampling_offsets: Linear,
    /// `Linear(d, M·L·P)`; softmaxed over the `L·P` points of each head.
    attention_weights: Linear,
    value_proj: Linear,
    output_proj: Linear,
    d_model: usize,
    n_levels: usize,
    n_heads: usize,
    n_points: usize,
    span: tracing::Span,
}

impl MSDeformAttn {
    /// `vb` at the module (`…layers.{i}.self_attn`).
    pub fn new(d_model: usize, n_levels: usize, n_heads: usize, n_points: usize, vb: VarBuilder) -> Result<Self> {
        if n_heads == 0 || !d_model.is_multiple_of(n_heads) {
            candle_core::bail!("MSDeformAttn: d_model {d_model} is not a multiple of n_heads {n_heads}");
        }
        let points = n_heads * n_levels * n_points;
        Ok(Self {
            sampling_offsets: linear(d_model, points * 2, vb.pp("sampling_offsets"))?,
            attention_weights: linear(d_model, points, vb.pp("attention_weights"))?,
            value_proj: linear(d_model, d_model, vb.pp("value_proj"))?,
            output_proj: linear(d_model, d_model, vb.pp("output_proj"))?,
            d_model,
            n_levels,
            n_heads,
            n_points,
            span: tracing::span!(tracing::Level::TRACE, "ms_deform_attn"),
        })
    }

    /// Each query attends to `P` points per head and level around its reference point:
    /// `loc = ref + offset / (W_l, H_l)`, weights softmaxed over the `L·P` points of a head;
    /// the weighted samples go through `output_proj`.
    ///
    /// # Shapes
    /// Those of [`Self::sample`].
    pub fn forward(
        &self,
        query: &Tensor,
        reference_points: &Tensor,
        input_flatten: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let sampled = self.sample(query, reference_points, input_flatten, spatial_shapes)?;
        self.output_proj.forward(&sampled)
    }

    /// `output_proj`, for callers that fuse it with what follows (see [`Self::sample`]).
    pub fn output_proj(&self) -> &Linear {
        &self.output_proj
    }

    /// [`Self::forward`] without the final `output_proj`: the weighted samples of every head.
    ///
    /// # Shapes
    /// - `query`: `[B, Lq, d]` (in the encoder: features + position + level embedding)
    /// - `reference_points`: `[B, Lq, L, 2]`, normalised `(x, y)` per level
    /// - `input_flatten`: `[B, S, d]`, the levels' maps flattened row-major and concatenated
    /// - `spatial_shapes`: `(H_l, W_l)` per level, `Σ H_l·W_l = S`
    /// - returns `[B, Lq, d]` (before `output_proj`)
    pub fn sample(
        &self,
        query: &Tensor,
        reference_points: &Tensor,
        input_flatten: &Tensor,
        spatial_shapes: &[(usize, usize)],
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (b, lq, _) = query.dims3()?;
        let (b_in, s, _) = input_flatten.dims3()?;
        let (m, l, p) = (self.n_heads, self.n_levels, self.n_points);
        if b_in != b || spatial_shapes.len() != l || reference_points.dims() != [b, lq, l, 2] {
            candle_core::bail!(
                "MSDeformAttn: query {:?}, reference_points {:?} (want [{b}, {lq}, {l}, 2]), input {:?}, {} spatial shapes (want {l})",
                query.dims(),
                reference_points.dims(),
                input_flatten.dims(),
                spatial_shapes.len()
            );
        }
        let value = self.value_proj.forward(input_flatten)?.reshape((b, s, m, self.d_model / m))?; // [B, S, M, Dh]
        let offsets = self.sampling_offsets.forward(query)?.reshape(vec![b, lq, m, l, p, 2])?; // [B, Lq, M, L, P, 2]
        let logits = self.attention_weights.forward(query)?.reshape((b, lq, m, l, p))?; // [B, Lq, M, L, P]
        // loc = ref + offset / (W_l, H_l) (the offsets are in pixels of each level), weights
        // softmaxed over the L·P points of each head
        let (loc, weights) = deris_kernels::ms_deform_attn::sampling_inputs(reference_points, &offsets, &logits, spatial_shapes)?;
        // the authors sample in f32 when the model runs in half precision (`value.float()`)
        let dtype = value.dtype();
        let sample_dtype = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let out = deris_kernels::ms_deform_attn(
            &value.to_dtype(sample_dtype)?,
            spatial_shapes,
            &loc.to_dtype(sample_dtype)?,
            &weights.to_dtype(sample_dtype)?,
        )?
        .to_dtype(dtype)?; // [B, Lq, d]
        Ok(out)
    }
}
