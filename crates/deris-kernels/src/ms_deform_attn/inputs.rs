//! The two inputs of the op as `MSDeformAttn` derives them from its projections, in one pass:
//! `loc = reference_point + offset / (W_l, H_l)` (the offsets are in pixels of each level) and
//! the attention weights softmaxed over the `L·P` points of each head.
//!
//! [`sampling_inputs`] takes this path on the CPU for f32/f64 when no input tracks a gradient,
//! and otherwise [`sampling_inputs_reference`] (primitive ops, candle's gradients, any device).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::storage::contiguous;

/// Sizes of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InputsGeometry {
    /// `B·Lq`.
    queries: usize,
    m: usize,
    p: usize,
    /// `(W_l, H_l)` per level.
    normalizer: Vec<(usize, usize)>,
}

fn geometry(
    reference_points: &Tensor,
    offsets: &Tensor,
    logits: &Tensor,
    spatial_shapes: &[(usize, usize)],
) -> Result<InputsGeometry> {
    let od = offsets.dims();
    let nl = spatial_shapes.len();
    if od.len() != 6 || od[3] != nl || od[5] != 2 {
        bail!("sampling_inputs: offsets {od:?} must be [B, Lq, M, L={nl}, P, 2]");
    }
    let (b, lq, m, p) = (od[0], od[1], od[2], od[4]);
    if reference_points.dims() != [b, lq, nl, 2] {
        bail!("sampling_inputs: reference_points {:?} must be [{b}, {lq}, {nl}, 2]", reference_points.dims());
    }
    if logits.dims() != [b, lq, m, nl, p] {
        bail!("sampling_inputs: attention logits {:?} must be [{b}, {lq}, {m}, {nl}, {p}]", logits.dims());
    }
    let dt = offsets.dtype();
    if reference_points.dtype() != dt || logits.dtype() != dt {
        bail!("sampling_inputs: dtypes differ ({:?}, {dt:?}, {:?})", reference_points.dtype(), logits.dtype());
    }
    Ok(InputsGeometry { queries: b * lq, m, p, normalizer: spatial_shapes.iter().map(|&(h, w)| (w, h)).collect() })
}

/// The sampling locations and attention weights of [`super::ms_deform_attn`], fast on the CPU.
///
/// # Shapes
/// - `reference_points`: `[B, Lq, L, 2]`, normalised `(x, y)` per level
/// - `offsets`: `[B, Lq, M, L, P, 2]`, `(x, y)` in pixels of level `l` (`spatial_shapes[l]`)
/// - `logits`: `[B, Lq, M, L, P]`
/// - returns `sampling_locations` `[B, Lq, M, L, P, 2]` and `attention_weights`
///   `[B, Lq, M, L, P]` (softmax over the `L·P` points of each head)
///
/// Differentiable: with a gradient-tracking input it runs [`sampling_inputs_reference`].
pub fn sampling_inputs(
    reference_points: &Tensor,
    offsets: &Tensor,
    logits: &Tensor,
    spatial_shapes: &[(usize, usize)],
) -> Result<(Tensor, Tensor)> {
    let g = geometry(reference_points, offsets, logits, spatial_shapes)?;
    let tracked = reference_points.track_op() || offsets.track_op() || logits.track_op();
    if tracked || !offsets.device().is_cpu() || !matches!(offsets.dtype(), DType::F32 | DType::F64) {
        return sampling_inputs_reference(reference_points, offsets, logits, spatial_shapes);
    }
    let points = logits.elem_count();
    let both = reference_points.contiguous()?.apply_op3_no_bwd(&offsets.contiguous()?, &logits.contiguous()?, &SamplingInputs { g })?;
    // both = [all locations (x, y), all weights], flat: two contiguous views
    let loc = both.narrow(0, 0, 2 * points)?.reshape(offsets.dims())?;
    let attn = both.narrow(0, 2 * points, points)?.reshape(logits.dims())?;
    Ok((loc, attn))
}

/// The slow twin of [`sampling_inputs`] from primitive ops: the authors' broadcast division and
/// addition, and candle's last-axis softmax.
///
/// # Shapes
/// Same as [`sampling_inputs`].
pub fn sampling_inputs_reference(
    reference_points: &Tensor,
    offsets: &Tensor,
    logits: &Tensor,
    spatial_shapes: &[(usize, usize)],
) -> Result<(Tensor, Tensor)> {
    geometry(reference_points, offsets, logits, spatial_shapes)?;
    let (b, lq, m, l, p) = logits.dims5()?;
    let normalizer: Vec<f64> = spatial_shapes.iter().flat_map(|&(h, w)| [w as f64, h as f64]).collect();
    let normalizer = Tensor::from_vec(normalizer, vec![1, 1, 1, l, 1, 2], offsets.device())?.to_dtype(offsets.dtype())?;
    let loc = reference_points.reshape(vec![b, lq, 1, l, 1, 2])?.broadcast_add(&offsets.broadcast_div(&normalizer)?)?;
    let logits = logits.reshape((b, lq, m, l * p))?;
    let attn = softmax_last_dim(&logits)?.reshape((b, lq, m, l, p))?;
    Ok((loc, attn))
}

/// `softmax(x, -1)` as `exp(x − max) / Σ exp(x − max)`.
fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(candle_core::D::Minus1)?)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(candle_core::D::Minus1)?)
}

struct SamplingInputs {
    g: InputsGeometry,
}

impl CustomOp3 for SamplingInputs {
    fn name(&self) -> &'static str {
        "ms-deform-attn-sampling-inputs"
    }

    fn cpu_fwd(
        &self,
        sr: &CpuStorage,
        lr: &Layout,
        so: &CpuStorage,
        lo: &Layout,
        sl: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        let nl = g.normalizer.len();
        let points = g.queries * g.m * nl * g.p;
        let out = match so.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(
                contiguous("sampling_inputs", "reference_points", sr, lr, g.queries * nl * 2)?,
                contiguous("sampling_inputs", "offsets", so, lo, points * 2)?,
                contiguous("sampling_inputs", "logits", sl, ll, points)?,
            )),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                contiguous("sampling_inputs", "reference_points", sr, lr, g.queries * nl * 2)?,
                contiguous("sampling_inputs", "offsets", so, lo, points * 2)?,
                contiguous("sampling_inputs", "logits", sl, ll, points)?,
            )),
            dt => bail!("sampling_inputs: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from(3 * points)))
    }
}

impl SamplingInputs {
    /// `[locations [B·Lq, M, L, P, 2], weights [B·Lq, M, L, P]]`, flat.
    fn forward<T: WithDType>(&self, refs: &[T], offsets: &[T], logits: &[T]) -> Vec<T> {
        let g = &self.g;
        let nl = g.normalizer.len();
        let per_head = nl * g.p;
        let per_query = g.m * per_head;
        let norm: Vec<(T, T)> = g.normalizer.iter().map(|&(w, h)| (T::from_f64(w as f64), T::from_f64(h as f64))).collect();
        let mut out = vec![T::from_f64(0.0); g.queries * per_query * 3];
        let (locs, weights) = out.split_at_mut(g.queries * per_query * 2);
        locs.par_chunks_mut(per_query * 2).zip(weights.par_chunks_mut(per_query)).enumerate().for_each(|(q, (loc, wts))| {
            let refs = &refs[q * nl * 2..][..nl * 2];
            for (i, (d, o)) in loc.chunks_exact_mut(2).zip(offsets[q * per_query * 2..][..per_query * 2].chunks_exact(2)).enumerate() {
                let l = i % per_head / g.p;
                d[0] = refs[2 * l] + o[0] / norm[l].0;
                d[1] = refs[2 * l + 1] + o[1] / norm[l].1;
            }
            for (w, x) in wts.chunks_exact_mut(per_head).zip(logits[q * per_query..][..per_query].chunks_exact(per_head)) {
                let max = x.iter().fold(T::from_f64(f64::NEG_INFINITY), |a, &v| if v > a { v } else { a });
                let mut sum = T::from_f64(0.0);
                for (d, &v) in w.iter_mut().zip(x) {
                    *d = T::from_f64((v - max).to_f64().exp());
                    sum += *d;
                }
                for d in w.iter_mut() {
                    *d /= sum;
                }
            }
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        let shapes = [(3usize, 5usize), (2, 2), (6, 1)];
        let (b, lq, m, l, p) = (2usize, 7usize, 3usize, shapes.len(), 4usize);
        for dtype in [DType::F32, DType::F64] {
            let refs = Tensor::rand(0f32, 1., (b, lq, l, 2), &dev).unwrap().to_dtype(dtype).unwrap();
            let offsets = Tensor::randn(0f32, 2., vec![b, lq, m, l, p, 2], &dev).unwrap().to_dtype(dtype).unwrap();
            let logits = Tensor::randn(0f32, 3., (b, lq, m, l, p), &dev).unwrap().to_dtype(dtype).unwrap();
            let (loc, attn) = sampling_inputs(&refs, &offsets, &logits, &shapes).unwrap();
            let (loc_r, attn_r) = sampling_inputs_reference(&refs, &offsets, &logits, &shapes).unwrap();
            assert_eq!(loc.dims(), loc_r.dims());
            assert_eq!(attn.dims(), attn_r.dims());
            for (name, x, y) in [("locations", &loc, &loc_r), ("weights", &attn, &attn_r)] {
                let d = (x - y).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let d = d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-14 };
                assert!(d <= tol, "{name} {dtype:?}: max |fast − reference| = {d:e}");
            }
        }
    }
}
