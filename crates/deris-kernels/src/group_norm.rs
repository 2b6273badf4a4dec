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

use crate::storage::contiguous;

/// `F.group_norm(x, groups, weight, bias, eps)`, then `relu` if asked, fast on the CPU.
///
/// # Shapes
/// - `x`: `[B, C, ...]` (any number of trailing axes, at least one); `weight`, `bias`: `[C]`
/// - returns the shape of `x`
///
/// Differentiable: with a gradient-tracking input on the CPU the same kernel runs with its
/// analytic backward; on other devices [`group_norm_reference`].
pub fn group_norm(x: &Tensor, groups: usize, weight: &Tensor, bias: &Tensor, eps: f64, relu: bool) -> Result<Tensor> {
    let (b, c, spatial) = check(x, groups, weight, bias)?;
    let tracked = x.track_op() || weight.track_op() || bias.track_op();
    let same_dtype = weight.dtype() == x.dtype() && bias.dtype() == x.dtype();
    let op = GroupNormOp { b, c, spatial, groups, eps, relu };
    if tracked && crate::autograd::supported(&[x, weight, bias]) {
        // Training on the CPU: the same kernel with its analytic backward.
        return x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op);
    }
    if tracked || !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) || !same_dtype {
        return group_norm_reference(x, groups, weight, bias, eps, relu);
    }
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
                contiguous("group_norm", "input", sx, lx, n)?,
                contiguous("group_norm", "weight", sw, lw, self.c)?,
                contiguous("group_norm", "bias", sb, lb, self.c)?,
            )),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(
                contiguous("group_norm", "input", sx, lx, n)?,
                contiguous("group_norm", "weight", sw, lw, self.c)?,
                contiguous("group_norm", "bias", sb, lb, self.c)?,
            )),
            dt => bail!("group_norm: unsupported dtype {dt:?}"),
        };
        Ok((out, lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use crate::autograd::read;
        let grads = match x.dtype() {
            DType::F32 => read::<f32, _>(x, |xd| read(w, |wd| read(b, |bd| read(g, |gd| self.backward(xd, wd, bd, gd))))),
            DType::F64 => read::<f64, _>(x, |xd| read(w, |wd| read(b, |bd| read(g, |gd| self.backward(xd, wd, bd, gd))))),
            dt => bail!("group_norm backward: unsupported dtype {dt:?}"),
        }?;
        let (dx, dw, db) = grads;
        let dx = if x.track_op() { Some(dx.reshape(x.shape())?) } else { None };
        Ok((dx, w.track_op().then_some(dw), b.track_op().then_some(db)))
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
    /// `(dx, dγ, dβ)` from the output gradient `g`: per group, with `x̂ = (x − mean)·rstd` and
    /// `d = g·γ_c` (zero where the ReLU cut), `dx = rstd·(d − mean(d) − x̂·mean(d·x̂))`.
    fn backward<T: WithDType>(&self, x: &[T], weight: &[T], bias: &[T], g: &[T]) -> Result<(Tensor, Tensor, Tensor)> {
        let cpg = self.c / self.groups;
        let block = cpg * self.spatial;
        let zero = T::from_f64(0.0);
        let mut dx = vec![zero; x.len()];
        let parts: Vec<(Vec<T>, Vec<T>)> = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(g.par_chunks(block)))
            .enumerate()
            .map(|(bg, (dst, (src, gb)))| {
                let grp = bg % self.groups;
                let n = block as f64;
                let mean = sum_by(src, |v| v) / n;
                let mean_t = T::from_f64(mean);
                let var = sum_by(src, |v| (v - mean_t) * (v - mean_t)) / n;
                let rstd = 1.0 / (var + self.eps).sqrt();
                let rstd_t = T::from_f64(rstd);
                let (mut dw, mut db) = (vec![zero; cpg], vec![zero; cpg]);
                let (mut s1, mut s2) = (0f64, 0f64);
                for ch in 0..cpg {
                    let c = grp * cpg + ch;
                    let scale = rstd * weight[c].to_f64();
                    let shift = T::from_f64(bias[c].to_f64() - mean * scale);
                    let (scale, w) = (T::from_f64(scale), weight[c]);
                    let range = ch * self.spatial..(ch + 1) * self.spatial;
                    let (mut a1, mut a2, mut sw, mut sb) = (zero, zero, zero, zero);
                    for (&v, &gv) in src[range.clone()].iter().zip(&gb[range]) {
                        // the ReLU passes the gradient where its input is ≥ 0, as candle's does
                        let gv = if self.relu && v * scale + shift < zero { zero } else { gv };
                        let xhat = (v - mean_t) * rstd_t;
                        sb += gv;
                        sw += gv * xhat;
                        a1 += gv * w;
                        a2 += gv * w * xhat;
                    }
                    dw[ch] = sw;
                    db[ch] = sb;
                    s1 += a1.to_f64();
                    s2 += a2.to_f64();
                }
                let (m1, m2) = (T::from_f64(s1 / n), T::from_f64(s2 / n));
                for ch in 0..cpg {
                    let c = grp * cpg + ch;
                    let scale = rstd * weight[c].to_f64();
                    let shift = T::from_f64(bias[c].to_f64() - mean * scale);
                    let (scale, w) = (T::from_f64(scale), weight[c]);
                    let range = ch * self.spatial..(ch + 1) * self.spatial;
                    for ((o, &v), &gv) in dst[range.clone()].iter_mut().zip(&src[range.clone()]).zip(&gb[range]) {
                        let gv = if self.relu && v * scale + shift < zero { zero } else { gv };
                        let xhat = (v - mean_t) * rstd_t;
                        *o = rstd_t * (gv * w - m1 - xhat * m2);
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![zero; self.c], vec![zero; self.c]);
        for (bg, (pw, pb)) in parts.into_iter().enumerate() {
            let c0 = (bg % self.groups) * cpg;
            for ch in 0..cpg {
                dw[c0 + ch] += pw[ch];
                db[c0 + ch] += pb[ch];
            }
        }
        let dev = candle_core::Device::Cpu;
        Ok((Tensor::from_vec(dx, x.len(), &dev)?, Tensor::from_vec(dw, self.c, &dev)?, Tensor::from_vec(db, self.c, &dev)?))
    }

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
