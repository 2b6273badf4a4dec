//! LayerNorm over the last axis: `y = (x − mean)/√(var + eps)·w + b`, biased variance, as
//! `torch.nn.LayerNorm`.

use std::mem::MaybeUninit;

use candle_core::{bail, Result, Tensor, D};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use crate::autograd;
use super::{cpu_f32, fast_path, rows_per_task, Output};

/// LayerNorm over the last axis of `x` (any rank ≥ 1) with affine `weight` and `bias` (`[C]`).
///
/// Runs the fused multithreaded kernel on contiguous f32 CPU tensors that need no gradient,
/// [`layer_norm_reference`] otherwise.
///
/// # Shapes
/// - `x`: `[.., C]`; `weight`, `bias`: `[C]`; returns the shape of `x`
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(D::Minus1)?;
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!(
            "layer_norm: weight {:?} and bias {:?} must be [{c}] for input {:?}",
            weight.dims(),
            bias.dims(),
            x.dims()
        );
    }
    if !fast_path(&[x, weight, bias]) || !x.is_contiguous() || c == 0 {
        let all = [x, weight, bias];
        if c > 0 && autograd::supported(&all) && autograd::any_tracked(&all) {
            return autograd::layer_norm(x, weight, bias, eps);
        }
        return layer_norm_reference(x, weight, bias, eps);
    }
    let rows = x.elem_count() / c;
    let (weight, bias) = (weight.contiguous()?, bias.contiguous()?);
    let (xs, w, b) = (cpu_f32(x)?, cpu_f32(&weight)?, cpu_f32(&bias)?);
    let (xs, w, b) = (xs.contiguous()?, w.contiguous()?, b.contiguous()?);
    let mut out = Output::new(rows * c);
    let per_task = rows_per_task(rows, c) * c;
    out.0.par_chunks_mut(per_task).zip(xs.par_chunks(per_task)).for_each(|(o, x)| {
        layer_norm_rows(x, w, b, eps as f32, o);
    });
    // SAFETY: the chunks cover the output and every row is written.
    let out = unsafe { out.assume_init() };
    Tensor::from_vec(out, x.shape(), x.device())
}

/// [`layer_norm`] from primitive candle ops (differentiable; any device and dtype).
pub fn layer_norm_reference(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}

multiversion! {
    /// Normalises each row of `C = w.len()` values of `x` into `out`.
    fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [MaybeUninit<f32>]) {
        let c = w.len();
        for (xr, or) in x.chunks_exact(c).zip(out.chunks_exact_mut(c)) {
            let mean = simd::sum(xr) / c as f32;
            let var = simd::sum_sq_dev(xr, mean) / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for i in 0..c {
                or[i].write(((xr[i] - mean) * rstd).mul_add(w[i], b[i]));
            }
        }
    }
}
