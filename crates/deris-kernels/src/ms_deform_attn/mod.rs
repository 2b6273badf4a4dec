//! Multi-scale deformable attention (`MSDeformAttnFunction` of Deformable DETR, as used by
//! Mask2Former's pixel decoder), forward and backward.
//!
//! For every query `q`, head `m`, level `l` and point `p`, the op samples the level's value map
//! bilinearly at the normalised location `loc = (x, y)` and sums the samples weighted by the
//! attention weights:
//!
//! ```text
//! out[b, q, m·Dh + c] = Σ_l Σ_p  a[b,q,m,l,p] · Sample_l(value[b, ·, m, c], loc[b,q,m,l,p])
//! ```
//!
//! `Sample_l` is `grid_sample(mode=bilinear, padding_mode=zeros, align_corners=False)` on
//! `grid = 2·loc − 1`, written the way the authors' CUDA kernel evaluates it (MODEL-SPEC §5.4):
//! pixel coordinates `xi = x·W − 0.5`, `yi = y·H − 0.5`; a point with `xi ≤ −1`, `yi ≤ −1`,
//! `xi ≥ W` or `yi ≥ H` samples 0 (and gets no gradient); otherwise the four neighbours of
//! `(floor(yi), floor(xi))` are blended with weights `(1−ly)(1−lx)`, `(1−ly)lx`, `ly(1−lx)`,
//! `ly·lx`, and a neighbour outside the map counts as 0.
//!
//! The fast op is three custom ops: the forward, and its backward split into
//! `GradValue` (scatter of the output gradient into the value map) and `GradSampling` (the
//! sampler's vector-Jacobian product with respect to the location and the sample itself).
//! [`ms_deform_attn_reference`] computes the same forward from primitive ops (index_select and
//! masks) and is differentiable through candle's autograd: it is the oracle of the tests.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod inputs;
mod reference;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

pub use inputs::{sampling_inputs, sampling_inputs_reference};
pub use reference::ms_deform_attn_reference;

/// One feature level of the flattened value map: `h × w` pixels starting at row `start` of `S`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Level {
    pub h: usize,
    pub w: usize,
    pub start: usize,
}

/// Sizes of one call, checked once by [`Geometry::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Batch `B`.
    pub b: usize,
    /// Value rows `S = Σ H_l·W_l`.
    pub s: usize,
    /// Heads `M`.
    pub m: usize,
    /// Channels per head `Dh`.
    pub dh: usize,
    /// Queries `Lq`.
    pub lq: usize,
    /// Points per head and level `P`.
    pub p: usize,
    pub levels: Vec<Level>,
}

impl Geometry {
    /// Checks the shapes, dtypes and devices of the three inputs against each other and against
    /// `spatial_shapes`.
    fn new(value: &Tensor, spatial_shapes: &[(usize, usize)], loc: &Tensor, attn: &Tensor) -> Result<Self> {
        let (b, s, m, dh) = value.dims4()?;
        let ld = loc.dims();
        let ad = attn.dims();
        let nl = spatial_shapes.len();
        if nl == 0 {
            bail!("ms_deform_attn: spatial_shapes is empty");
        }
        if ld.len() != 6 || ld[0] != b || ld[2] != m || ld[3] != nl || ld[5] != 2 {
            bail!(
                "ms_deform_attn: sampling_locations {ld:?} must be [B={b}, Lq, M={m}, L={nl}, P, 2] (value {:?})",
                value.dims()
            );
        }
        let (lq, p) = (ld[1], ld[4]);
        if ad != [b, lq, m, nl, p] {
            bail!("ms_deform_attn: attention_weights {ad:?} must be [{b}, {lq}, {m}, {nl}, {p}] to match sampling_locations {ld:?}");
        }
        let mut levels = Vec::with_capacity(nl);
        let mut start = 0usize;
        for &(h, w) in spatial_shapes {
            if h == 0 || w == 0 {
                bail!("ms_deform_attn: empty level {h}×{w} in spatial_shapes {spatial_shapes:?}");
            }
            levels.push(Level { h, w, start });
            start += h * w;
        }
        if start != s {
            bail!("ms_deform_attn: value has {s} rows but spatial_shapes {spatial_shapes:?} cover {start}");
        }
        let dt = value.dtype();
        if !matches!(dt, DType::F32 | DType::F64) || loc.dtype() != dt || attn.dtype() != dt {
            bail!(
                "ms_deform_attn: value, sampling_locations and attention_weights must all be f32 or all f64, got {:?}, {:?}, {:?}",
                dt,
                loc.dtype(),
                attn.dtype()
            );
        }
        if !value.device().same_device(loc.device()) || !value.device().same_device(attn.device()) {
            bail!("ms_deform_attn: inputs are on different devices");
        }
        Ok(Self { b, s, m, dh, lq, p, levels })
    }

    /// Number of levels `L`.
    pub fn l(&self) -> usize {
        self.levels.len()
    }

    fn value_shape(&self) -> Shape {
        Shape::from((self.b, self.s, self.m, self.dh))
    }

    fn out_shape(&self) -> Shape {
        Shape::from((self.b, self.lq, self.m * self.dh))
    }

    fn point_shape(&self, last: usize) -> Shape {
        Shape::from(vec![self.b, self.lq, self.m, self.l(), self.p, last])
    }

    fn weight_shape(&self) -> Shape {
        Shape::from(vec![self.b, self.lq, self.m, self.l(), self.p])
    }
}

/// Multi-scale deformable attention (fast op, with gradients for all three inputs).
///
/// # Shapes
/// - `value`: `[B, S, M, Dh]`, `S = Σ H_l·W_l` with the levels concatenated, each row-major;
///   head `m` of the flattened `[B, S, M·Dh]` projection owns channels `m·Dh..(m+1)·Dh`
/// - `spatial_shapes`: `(H_l, W_l)` per level, in the order of the concatenation
/// - `sampling_locations`: `[B, Lq, M, L, P, 2]`, `(x, y)` normalised so that `[0, 1]` spans the
///   map (pixel centres at `(c+0.5)/W`); values outside sample zeros
/// - `attention_weights`: `[B, Lq, M, L, P]`, already softmaxed
/// - returns `[B, Lq, M·Dh]`
///
/// All three inputs are f32 (or all f64) on one device. Non-contiguous inputs are made
/// contiguous first.
pub fn ms_deform_attn(
    value: &Tensor,
    spatial_shapes: &[(usize, usize)],
    sampling_locations: &Tensor,
    attention_weights: &Tensor,
) -> Result<Tensor> {
    let geo = Geometry::new(value, spatial_shapes, sampling_locations, attention_weights)?;
    let value = value.contiguous()?;
    let loc = sampling_locations.contiguous()?;
    let attn = attention_weights.contiguous()?;
    value.apply_op3(&loc, &attn, MsDeformAttn { geo })
}

/// The contiguous data of one input, or an error naming the op (never guess strides).
fn contiguous_slice<'a, T: candle_core::WithDType>(
    op: &str,
    what: &str,
    s: &'a CpuStorage,
    l: &Layout,
    expected: &Shape,
) -> Result<&'a [T]> {
    if l.shape() != expected {
        bail!("{op}: {what} has shape {:?}, expected {:?}", l.shape(), expected);
    }
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => bail!("{op}: {what} is not contiguous (call .contiguous() first)"),
    }
}

/// The forward op; `bwd` applies `GradValue` and `GradSampling`.
struct MsDeformAttn {
    geo: Geometry,
}

impl CustomOp3 for MsDeformAttn {
    fn name(&self) -> &'static str {
        "ms-deform-attn"
    }

    fn cpu_fwd(
        &self,
        sv: &CpuStorage,
        lv: &Layout,
        sl: &CpuStorage,
        ll: &Layout,
        sa: &CpuStorage,
        la: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geo;
        let n = self.name();
        let out = match sv.dtype() {
            DType::F32 => CpuStorage::F32(cpu::forward::<f32>(
                g,
                contiguous_slice(n, "value", sv, lv, &g.value_shape())?,
                contiguous_slice(n, "sampling_locations", sl, ll, &g.point_shape(2))?,
                contiguous_slice(n, "attention_weights", sa, la, &g.weight_shape())?,
            )),
            DType::F64 => CpuStorage::F64(cpu::forward::<f64>(
                g,
                contiguous_slice(n, "value", sv, lv, &g.value_shape())?,
                contiguous_slice(n, "sampling_locations", sl, ll, &g.point_shape(2))?,
                contiguous_slice(n, "attention_weights", sa, la, &g.weight_shape())?,
            )),
            dt => bail!("{n}: unsupported dtype {dt:?}"),
        };
        Ok((out, g.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
        sl: &candle_core::CudaStorage,
        ll: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.geo;
        let out = cuda::forward(g, (sv, lv), (sl, ll), (sa, la))?;
        Ok((out, g.out_shape()))
    }

    fn bwd(
        &self,
        value: &Tensor,
        loc: &Tensor,
        attn: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geo = &self.geo;
        let grad = grad_res.contiguous()?;
        let grad_value = loc.apply_op3_no_bwd(attn, &grad, &GradValue { geo: geo.clone() })?;
        // [B, Lq, M, L, P, 3]: (∂/∂x, ∂/∂y) of g·sample, and g·sample itself
        let vjp = value.apply_op3_no_bwd(loc, &grad, &GradSampling { geo: geo.clone() })?;
        let grad_loc = vjp.narrow(D::Minus1, 0, 2)?.broadcast_mul(&attn.unsqueeze(D::Minus1)?)?;
        let grad_attn = vjp.narrow(D::Minus1, 2, 1)?.squeeze(D::Minus1)?;
        Ok((Some(grad_value), Some(grad_loc), Some(grad_attn)))
    }
}

/// Backward of [`ms_deform_attn`] with respect to `value`: scatters `a · corner weight · grad`
/// into the four neighbours of every sampling point.
///
/// Inputs `(sampling_locations, attention_weights, grad_output [B, Lq, M·Dh])`, output
/// `[B, S, M, Dh]`.
struct GradValue {
    geo: Geometry,
}

impl CustomOp3 for GradValue {
    fn name(&self) -> &'static str {
        "ms-deform-attn-grad-value"
    }

    fn cpu_fwd(
        &self,
        sl: &CpuStorage,
        ll: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geo;
        let n = self.name();
        let out = match sl.dtype() {
            DType::F32 => CpuStorage::F32(cpu::grad_value::<f32>(
                g,
                contiguous_slice(n, "sampling_locations", sl, ll, &g.point_shape(2))?,
                contiguous_slice(n, "attention_weights", sa, la, &g.weight_shape())?,
                contiguous_slice(n, "grad_output", sg, lg, &g.out_shape())?,
            )),
            DType::F64 => CpuStorage::F64(cpu::grad_value::<f64>(
                g,
                contiguous_slice(n, "sampling_locations", sl, ll, &g.point_shape(2))?,
                contiguous_slice(n, "attention_weights", sa, la, &g.weight_shape())?,
                contiguous_slice(n, "grad_output", sg, lg, &g.out_shape())?,
            )),
            dt => bail!("{n}: unsupported dtype {dt:?}"),
        };
        Ok((out, g.value_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sl: &candle_core::CudaStorage,
        ll: &Layout,
        sa: &candle_core::CudaStorage,
        la: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.geo;
        let out = cuda::grad_value(g, (sl, ll), (sa, la), (sg, lg))?;
        Ok((out, g.value_shape()))
    }
}

/// Backward of the bilinear sampler, independent of the attention weights: for every sampling
/// point and `s = Sample_l(value, loc)` (a `Dh` vector), it returns
/// `(∂(g·s)/∂x, ∂(g·s)/∂y, g·s)` where `g` is the point's head slice of `grad_output`.
/// The location gradient of [`ms_deform_attn`] is the first two times the attention weight; the
/// weight gradient is the third.
///
/// Inputs `(value, sampling_locations, grad_output [B, Lq, M·Dh])`, output `[B, Lq, M, L, P, 3]`.
struct GradSampling {
    geo: Geometry,
}

impl CustomOp3 for GradSampling {
    fn name(&self) -> &'static str {
        "ms-deform-attn-grad-sampling"
    }

    fn cpu_fwd(
        &self,
        sv: &CpuStorage,
        lv: &Layout,
        sl: &CpuStorage,
        ll: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.geo;
        let n = self.name();
        let out = match sv.dtype() {
            DType::F32 => CpuStorage::F32(cpu::grad_sampling::<f32>(
                g,
                contiguous_slice(n, "value", sv, lv, &g.value_shape())?,
                contiguous_slice(n, "sampling_locations", sl, ll, &g.point_shape(2))?,
                contiguous_slice(n, "grad_output", sg, lg, &g.out_shape())?,
            )),
            DType::F64 => CpuStorage::F64(cpu::grad_sampling::<f64>(
                g,
                contiguous_slice(n, "value", sv, lv, &g.value_shape())?,
                contiguous_slice(n, "sampling_locations", sl, ll, &g.point_shape(2))?,
                contiguous_slice(n, "grad_output", sg, lg, &g.out_shape())?,
            )),
            dt => bail!("{n}: unsupported dtype {dt:?}"),
        };
        Ok((out, g.point_shape(3)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
        sl: &candle_core::CudaStorage,
        ll: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.geo;
        let out = cuda::grad_sampling(g, (sv, lv), (sl, ll), (sg, lg))?;
        Ok((out, g.point_shape(3)))
    }
}
