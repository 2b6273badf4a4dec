//! `nn.GroupNorm` (per-channel affine), optionally followed by a ReLU, in two passes over each
//! group's contiguous block: the statistics, then `y = x·scale_c + shift_c` with
//! `scale_c = γ_c/√(var + ε)` and `shift_c = β_c − mean·scale_c` (the form PyTorch's CPU kernel
//! evaluates). Sums run in f32 lanes per chunk and f64 across chunks; the variance is that of
//! the centred values.
//!
//! [`group_norm`] takes this path on the CPU for f32/f64 when no input tracks a gradient, and
//! otherwise [`group_norm_reference`] (primitive ops, candle's gradients, any device).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `F.group_norm(x, groups, weight, bias, eps)`, then `relu` if asked, fast on the CPU.
///
/// # Shapes
/// - `x`: `[B, C, ...]` (any number of trailing axes, at least one); `weight`, `bias`: `[C]`
/// - returns the shape of `x`
///
/// Differentiable: with a gradient-tracking input it runs [`group_norm_reference`].
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, relu: bool) -> Result<Tensor> {
    let (b, c, spatial) = check(x, groups, weight, bias)?;
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    let same_dtype = weight.dtype() == x.dtype() && bias.dtype() == x.dtype();
    if tracked || !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) || !same_dtype {
        return group_norm_reference(x, groups, weight, bias, eps, relu);
    }
    let op = GroupNormOp { b, c, spatial, groups, eps, relu };
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

/// The slow twin of [`group_norm`] from primitive ops (two-pass mean and variance in the
/// input dtype), with candle's gradients.
///
/// # Shapes
/// Same as [`group_norm`].
pub fn group_norm_reference(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, relu: bool) -> Result<Tensor> {
    let (b, c, _) = check(x, groups, weight, bias)?;
    let dims = x.dims().to_vec();
    let xg = x.reshape((b, groups, ()))?; // [B, G, C/G·HW]
    let centred = xg.broadcast_sub(&xg.mean_keepdim(2)?)?;
    let var = centred.sqr()?.mean_keepdim(2)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?.reshape(dims.as_slice())?;
    let mut affine_shape = vec![1, c];
    affine_shape.resize(dims.len(), 1);
    let y = normed
        .broadcast_mul(&weight.reshape(affine_shape.as_slice())?)?
        .broadcast_add(&bias.reshape(affine_shape.as_slice())?)?;
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// `(B, C, elements per channel)` after checking the shapes.
fn check(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor) -> Result<(usize, usize, usize)> {
    let dims = x.dims();
    if dims.len() < 3 {
        bail!("group_norm: input {dims:?} needs [B, C, spatial...]");
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        bail!("group_norm: {c} channels do not split into {groups} groups");
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        bail!("group_norm: weight {:?} and bias {:?} must be [{c}]", weight.dims(), bias.dims());
    }
    Ok((b, c, dims[2..].iter().product()))
}

struct GroupNormOp {
    b: usize,
    c: usize,
    spatial: usize,
    groups: usize,
    eps: f64,
    relu: bool,
}

fn slice<'a, T: WithDType>(what: &str, s: &'a CpuStorage, l: &Layout, len: usize) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b - a == len => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        _ => bail!("group_norm: {what} {:?} is not a contiguous block of {len} elements", l.dims()),
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = self.b * self.c * self.spatial;
        let out = match sx.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(
                slice("input", sx, lx, n)?,
                slice("weight", sw, lw, self.c)?,
                slice("bias", sb, lb, self.c)?,
            )),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                slice("input", sx, lx, n)?,
                slice("weight", sw, lw, self.c)?,
                slice("bias", sb, lb, self.c)?,
            )),
            dt => bail!("group_norm: unsupported dtype {dt:?}"),
        };
        Ok((out, lx.shape().clone()))
    }
}

/// Σ of `f(v)` over `xs`: 16 lanes in `T` within chunks of 1024, chunks added in f64.
#[inline]
fn sum_by<T: WithDType>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    let zero = T::from_f64(0.0);
    let mut total = 0f64;
    for chunk in xs.chunks(1024) {
        let mut acc = [zero; 16];
        let it = chunk.chunks_exact(16);
        let tail = it.remainder().iter().fold(zero, |s, &v| s + f(v));
        for block in it {
            for k in 0..16 {
                acc[k] += f(block[k]);
            }
        }
        total += acc.iter().fold(tail, |s, &v| s + v).to_f64();
    }
    total
}

impl GroupNormOp {
    fn forward<T: WithDType>(&self, x: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
        let cpg = self.c / self.groups;
        let block = cpg * self.spatial;
        let mut out = vec![T::from_f64(0.0); x.len()];
        out.par_chunks_mut(block).zip(x.par_chunks(block)).enumerate().for_each(|(bg, (dst, src))| {
            let g = bg % self.groups;
            let n = block as f64;
            let mean = sum_by(src, |v| v) / n;
            let mean_t = T::from_f64(mean);
            let var = sum_by(src, |v| (v - mean_t) * (v - mean_t)) / n;
            let rstd = 1.0 / (var + self.eps).sqrt();
            let zero = T::from_f64(0.0);
            for (ch, (d, s)) in dst.chunks_exact_mut(self.spatial).zip(src.chunks_exact(self.spatial)).enumerate() {
                let c = g * cpg + ch;
                let scale = rstd * weight[c].to_f64();
                let shift = T::from_f64(bias[c].to_f64() - mean * scale);
                let scale = T::from_f64(scale);
                if self.relu {
                    for (o, &v) in d.iter_mut().zip(s) {
                        let y = v * scale + shift;
                        *o = if y > zero { y } else { zero };
                    }
                } else {
                    for (o, &v) in d.iter_mut().zip(s) {
                        *o = v * scale + shift;
                    }
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
        for &(b, c, h, w, groups) in &[(2usize, 8usize, 5usize, 7usize, 4usize), (1, 32, 3, 3, 32), (1, 64, 20, 20, 32), (3, 6, 1, 2, 1)] {
            for dtype in [DType::F32, DType::F64] {
                // an offset larger than the spread, to exercise the centred variance
                let x = (Tensor::randn(0f32, 1., (b, c, h, w), &dev).unwrap() + 3.0).unwrap().to_dtype(dtype).unwrap();
                let wt = Tensor::randn(1f32, 0.5, c, &dev).unwrap().to_dtype(dtype).unwrap();
                let bias = Tensor::randn(0f32, 0.5, c, &dev).unwrap().to_dtype(dtype).unwrap();
                for relu in [false, true] {
                    let fast = group_norm(&x, groups, &wt, &bias, 1e-5, relu).unwrap();
                    let slow = group_norm_reference(&x, groups, &wt, &bias, 1e-5, relu).unwrap();
                    let d = (&fast - &slow).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                    let d = d.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
                    let tol = if dtype == DType::F32 { 2e-5 } else { 1e-12 };
                    assert!(d < tol, "({b}, {c}, {h}, {w}) / {groups} {dtype:?} relu {relu}: max |fast − reference| = {d:e}");
                }
            }
        }
    }
}
