//! CPU ops with a hand-written backward, used by the fast entry points when an input tracks a
//! gradient (training): the matrix product of `nn.Linear` with its bias, LayerNorm, the softmax
//! of attention with its constant biases, trainable additive biases, and per-channel biases.
//!
//! candle's own backward over the primitive-op twins is correct but slow on the CPU: every
//! `broadcast_add`/`broadcast_mul` reduces its gradient over leading axes with a generic strided
//! loop, and every argument of an op gets a gradient, constants included. The ops here compute
//! each gradient directly (products with `gemm`, sums per channel in one pass) and skip the
//! arguments that track nothing ([`Tensor::track_op`]).
//!
//! They run on f32 and f64 CPU tensors ([`supported`]); the `_reference` twins stay the oracle
//! and the path for other devices.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, WithDType};
use rayon::prelude::*;

use crate::cpu_gemm::{self, MatRef};
use crate::storage::contiguous;

/// Float types of the ops here: [`WithDType`] plus the math the softmax and the norms need.
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Whether the ops here apply: every tensor is on the CPU, all share one dtype, f32 or f64.
pub(crate) fn supported(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else { return false };
    let dt = first.dtype();
    matches!(dt, DType::F32 | DType::F64) && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

/// Whether any of `ts` tracks a gradient.
pub(crate) fn any_tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Runs `f` on the elements of `t` in row-major order (copied first when `t` is strided).
pub(crate) fn read<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("autograd op: expected a CPU tensor, got one on {:?}", t.device().location());
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => f(&T::cpu_storage_as_slice(cpu)?[a..b]),
        None => bail!("autograd op: tensor {:?} is not contiguous", layout.dims()),
    }
}


/// A tensor from a vector built on the CPU.
fn tensor<T: WithDType>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// `Σ_o Σ_i x[o, c, i]` for each `c` of `x` viewed as `[outer, C, inner]`: partial sums over
/// blocks of `outer` in parallel, then added.
pub(crate) fn channel_sums<T: WithDType>(x: &[T], c: usize, inner: usize) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let per = c * inner;
    if per == 0 {
        return vec![zero; c];
    }
    let outer = x.len() / per;
    let block = (65_536 / per).clamp(1, outer.max(1));
    let partial = |chunk: &[T]| {
        let mut acc = vec![zero; c];
        for item in chunk.chunks_exact(per) {
            if inner == 1 {
                for (a, &v) in acc.iter_mut().zip(item) {
                    *a += v;
                }
            } else {
                for (a, plane) in acc.iter_mut().zip(item.chunks_exact(inner)) {
                    *a += plane.iter().fold(zero, |s, &v| s + v);
                }
            }
        }
        acc
    };
    x.par_chunks(block * per).map(partial).reduce(
        || vec![zero; c],
        |mut a, b| {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
            a
        },
    )
}

macro_rules! by_dtype {
    ($dt:expr, $name:literal, |$t:ident| $body:expr) => {
        match $dt {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            dt => bail!("{}: unsupported dtype {dt:?}", $name),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Linear

/// `x·weightᵀ + bias` with its backward: `dx = dy·W`, `dW = dyᵀ·x`, `db = Σ_rows dy`.
///
/// # Shapes
/// - `x`: `[.., K]`; `weight`: `[N, K]`; `bias`: `[N]`; returns `[.., N]`
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let (n, _) = weight.dims2()?;
    let m = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = n;
    }
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(n, x.dtype(), x.device())?,
    };
    let x2 = x.contiguous()?.reshape((m, k))?;
    x2.apply_op3(&weight.contiguous()?, &bias, LinearOp { m, k, n })?.reshape(dims)
}

struct LinearOp {
    m: usize,
    k: usize,
    n: usize,
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear-autograd"
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
        let LinearOp { m, k, n } = *self;
        let out = by_dtype!(sx.dtype(), "linear", |T| {
            let x = contiguous::<T>("linear", "input", sx, lx, m * k)?;
            let w = contiguous::<T>("linear", "weight", sw, lw, n * k)?;
            let b = contiguous::<T>("linear", "bias", sb, lb, n)?;
            let mut out = Vec::with_capacity(m * n);
            for _ in 0..m {
                out.extend_from_slice(b);
            }
            let lhs = MatRef { data: x, rows: m, cols: k, rs: k, cs: 1 };
            let rhs = MatRef { data: w, rows: k, cols: n, rs: 1, cs: k };
            cpu_gemm::matmul(&mut out, n, lhs, rhs, true)?;
            T::to_cpu_storage_owned(out)
        });
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let LinearOp { m, k, n } = *self;
        by_dtype!(x.dtype(), "linear backward", |T| read::<T, _>(g, |gd| {
            let dx = if x.track_op() {
                read::<T, _>(w, |wd| {
                    let mut dx = vec![T::from_f64(0.0); m * k];
                    let lhs = MatRef { data: gd, rows: m, cols: n, rs: n, cs: 1 };
                    let rhs = MatRef { data: wd, rows: n, cols: k, rs: k, cs: 1 };
                    cpu_gemm::matmul(&mut dx, k, lhs, rhs, false)?;
                    tensor(dx, &[m, k]).map(Some)
                })?
            } else {
                None
            };
            let dw = if w.track_op() {
                read::<T, _>(x, |xd| {
                    let mut dw = vec![T::from_f64(0.0); n * k];
                    let lhs = MatRef { data: gd, rows: n, cols: m, rs: 1, cs: n };
                    let rhs = MatRef { data: xd, rows: m, cols: k, rs: k, cs: 1 };
                    cpu_gemm::matmul(&mut dw, k, lhs, rhs, false)?;
                    tensor(dw, &[n, k]).map(Some)
                })?
            } else {
                None
            };
            let db = if b.track_op() { Some(tensor(channel_sums(gd, n, 1), &[n])?) } else { None };
            Ok((dx, dw, db))
        }))
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

/// LayerNorm over the last axis with its analytic backward (one pass over the rows for `dx`,
/// `dγ`, `dβ`).
///
/// # Shapes
/// - `x`: `[.., C]`; `weight`, `bias`: `[C]`; returns the shape of `x`
pub(crate) fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    let rows = x.elem_count() / c.max(1);
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { rows, c, eps })
}

struct LayerNormOp {
    rows: usize,
    c: usize,
    eps: f64,
}

/// Rows per parallel task of a `rows × c` row-wise kernel.
fn row_block(rows: usize, c: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    rows.div_ceil(8 * threads).max((16_384 / c.max(1)).max(1)).min(rows.max(1))
}

/// Mean and `1/√(var + eps)` of one row.
fn row_stats<T: Real>(x: &[T], eps: f64) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mean = x.iter().fold(T::from_f64(0.0), |s, &v| s + v) / n;
    let var = x.iter().fold(T::from_f64(0.0), |s, &v| s + (v - mean) * (v - mean)) / n;
    (mean, T::from_f64(1.0) / (var + T::from_f64(eps)).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-autograd"
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
        let (rows, c) = (self.rows, self.c);
        let out = by_dtype!(sx.dtype(), "layer_norm", |T| {
            let x = contiguous::<T>("layer_norm", "input", sx, lx, rows * c)?;
            let w = contiguous::<T>("layer_norm", "weight", sw, lw, c)?;
            let b = contiguous::<T>("layer_norm", "bias", sb, lb, c)?;
            let mut out = vec![T::from_f64(0.0); rows * c];
            let per = row_block(rows, c) * c;
            out.par_chunks_mut(per.max(1)).zip(x.par_chunks(per.max(1))).for_each(|(o, x)| {
                for (or, xr) in o.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                    let (mean, rstd) = row_stats(xr, self.eps);
                    for i in 0..c {
                        or[i] = (xr[i] - mean) * rstd * w[i] + b[i];
                    }
                }
            });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, c, eps) = (self.rows, self.c, self.eps);
        let dims = x.dims().to_vec();
        by_dtype!(x.dtype(), "layer_norm backward", |T| read::<T, _>(x, |xd| read::<T, _>(w, |wd| read::<T, _>(g, |gd| {
            let zero = T::from_f64(0.0);
            let inv_c = T::from_f64(1.0 / c as f64);
            let mut dx = vec![zero; rows * c];
            let per = row_block(rows, c) * c;
            // dx per row; dγ, dβ as partial sums per block of rows
            let (dw, db) = dx
                .par_chunks_mut(per.max(1))
                .zip(xd.par_chunks(per.max(1)).zip(gd.par_chunks(per.max(1))))
                .map(|(dxb, (xb, gb))| {
                    let (mut dw, mut db) = (vec![zero; c], vec![zero; c]);
                    for ((dxr, xr), gr) in dxb.chunks_exact_mut(c).zip(xb.chunks_exact(c)).zip(gb.chunks_exact(c)) {
                        let (mean, rstd) = row_stats(xr, eps);
                        let (mut s1, mut s2) = (zero, zero);
                        for i in 0..c {
                            let xhat = (xr[i] - mean) * rstd;
                            let gh = gr[i] * wd[i];
                            dw[i] += gr[i] * xhat;
                            db[i] += gr[i];
                            s1 += gh;
                            s2 += gh * xhat;
                        }
                        let (m1, m2) = (s1 * inv_c, s2 * inv_c);
                        for i in 0..c {
                            let xhat = (xr[i] - mean) * rstd;
                            dxr[i] = rstd * (gr[i] * wd[i] - m1 - xhat * m2);
                        }
                    }
                    (dw, db)
                })
                .reduce(
                    || (vec![zero; c], vec![zero; c]),
                    |(mut a, mut b), (c2, d2)| {
                        a.iter_mut().zip(c2).for_each(|(u, v)| *u += v);
                        b.iter_mut().zip(d2).for_each(|(u, v)| *u += v);
                        (a, b)
                    },
                );
            let dx = if x.track_op() { Some(tensor(dx, &dims)?) } else { None };
            let dw = if w.track_op() { Some(tensor(dw, &[c])?) } else { None };
            let db = if b.track_op() { Some(tensor(db, &[c])?) } else { None };
            Ok((dx, dw, db))
        }))))
    }
}

// ---------------------------------------------------------------------------------------------
// Attention scores

/// A rank-4 bias `[G, H or 1, Lq or 1, Lk or 1]` of `[B, H, Lq, Lk]` scores, batch `b` reading
/// group `b mod G`: the offset of `(b, h, i, j)` in its contiguous data.
#[derive(Clone, Copy)]
struct BiasIndex {
    groups: usize,
    strides: [usize; 4],
}

impl BiasIndex {
    fn new(dims: &[usize]) -> Self {
        let mut strides = [0; 4];
        let mut s = 1;
        for a in (0..4).rev() {
            strides[a] = if dims[a] == 1 { 0 } else { s };
            s *= dims[a];
        }
        Self { groups: dims[0], strides }
    }

    /// Offset of the first element of row `(b, h, i)`; the key axis has stride `strides[3]`.
    fn row(&self, b: usize, h: usize, i: usize) -> usize {
        (b % self.groups) * self.strides[0] + h * self.strides[1] + i * self.strides[2]
    }
}

/// `softmax(scores + Σ biases)` over the last axis, where the biases are constants (no
/// gradient reaches them).
///
/// # Shapes
/// - `scores`: `[B, H, Lq, Lk]`; each bias rank 4, `[G, H or 1, Lq or 1, Lk or 1]` with `G`
///   dividing `B` (see [`crate::fused::attention`])
pub(crate) fn biased_softmax(scores: &Tensor, biases: &[Tensor]) -> Result<Tensor> {
    let (b, h, lq, lk) = scores.dims4()?;
    let biases = biases.iter().map(|t| t.detach().contiguous()).collect::<Result<Vec<_>>>()?;
    scores.contiguous()?.apply_op1(BiasedSoftmax { b, h, lq, lk, biases })
}

struct BiasedSoftmax {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    biases: Vec<Tensor>,
}

impl BiasedSoftmax {
    fn forward<T: Real>(&self, s: &[T], biases: &[(&[T], BiasIndex)]) -> Vec<T> {
        let (h, lq, lk) = (self.h, self.lq, self.lk);
        let mut out = s.to_vec();
        let per = row_block(self.b * h * lq, lk) * lk;
        out.par_chunks_mut(per.max(1)).enumerate().for_each(|(blk, chunk)| {
            for (r, row) in chunk.chunks_exact_mut(lk).enumerate() {
                let r = blk * (per / lk) + r;
                let (bi, hi, i) = (r / (h * lq), (r / lq) % h, r % lq);
                for (data, ix) in biases {
                    let at = ix.row(bi, hi, i);
                    if ix.strides[3] == 0 {
                        row.iter_mut().for_each(|y| *y += data[at]);
                    } else {
                        row.iter_mut().zip(&data[at..at + lk]).for_each(|(y, &c)| *y += c);
                    }
                }
                let m = row.iter().fold(row[0], |m, &v| if v > m { v } else { m });
                let mut sum = T::from_f64(0.0);
                for y in row.iter_mut() {
                    *y = (*y - m).exp();
                    sum += *y;
                }
                let inv = T::from_f64(1.0) / sum;
                row.iter_mut().for_each(|y| *y *= inv);
            }
        });
        out
    }
}

impl CustomOp1 for BiasedSoftmax {
    fn name(&self) -> &'static str {
        "biased-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let len = self.b * self.h * self.lq * self.lk;
        let out = by_dtype!(s.dtype(), "softmax", |T| {
            let x = contiguous::<T>("softmax", "scores", s, l, len)?;
            let data = self.biases.iter().map(|t| t.flatten_all()?.to_vec1::<T>()).collect::<Result<Vec<_>>>()?;
            let views: Vec<(&[T], BiasIndex)> =
                data.iter().zip(&self.biases).map(|(d, t)| (d.as_slice(), BiasIndex::new(t.dims()))).collect();
            T::to_cpu_storage_owned(self.forward(x, &views))
        });
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let lk = self.lk;
        by_dtype!(res.dtype(), "softmax backward", |T| read::<T, _>(res, |p| read::<T, _>(g, |gd| {
            // dS = P ⊙ (dP − Σ_k dP_k·P_k), row by row
            let mut ds = vec![T::from_f64(0.0); p.len()];
            let per = row_block(p.len() / lk.max(1), lk) * lk;
            ds.par_chunks_mut(per.max(1)).zip(p.par_chunks(per.max(1)).zip(gd.par_chunks(per.max(1)))).for_each(
                |(d, (p, g))| {
                    for ((dr, pr), gr) in d.chunks_exact_mut(lk).zip(p.chunks_exact(lk)).zip(g.chunks_exact(lk)) {
                        let dot = pr.iter().zip(gr).fold(T::from_f64(0.0), |s, (&a, &b)| s + a * b);
                        for ((o, &pv), &gv) in dr.iter_mut().zip(pr).zip(gr) {
                            *o = pv * (gv - dot);
                        }
                    }
                },
            );
            tensor(ds, res.dims()).map(Some)
        })))
    }
}

/// `scores + bias` for a bias that tracks a gradient (Swin's relative positions): the bias
/// gradient is summed over the axes it is broadcast along in one pass.
///
/// # Shapes
/// - `scores`: `[B, H, Lq, Lk]`; `bias`: rank 4 as in [`biased_softmax`]
pub(crate) fn add_bias(scores: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, lq, lk) = scores.dims4()?;
    scores.contiguous()?.apply_op2(&bias.contiguous()?, AddBias { b, h, lq, lk })
}

struct AddBias {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let AddBias { b, h, lq, lk } = *self;
        let ix = BiasIndex::new(l2.dims());
        let out = by_dtype!(s1.dtype(), "add_bias", |T| {
            let x = contiguous::<T>("add_bias", "scores", s1, l1, b * h * lq * lk)?;
            let bias = contiguous::<T>("add_bias", "bias", s2, l2, l2.shape().elem_count())?;
            let mut out = x.to_vec();
            out.par_chunks_mut(lk.max(1)).enumerate().for_each(|(r, row)| {
                let at = ix.row(r / (h * lq), (r / lq) % h, r % lq);
                for (j, y) in row.iter_mut().enumerate() {
                    *y += bias[at + j * ix.strides[3]];
                }
            });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, scores: &Tensor, bias: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let AddBias { b, h, lq, lk } = *self;
        let ds = if scores.track_op() { Some(g.clone()) } else { None };
        if !bias.track_op() {
            return Ok((ds, None));
        }
        let ix = BiasIndex::new(bias.dims());
        let db = by_dtype!(g.dtype(), "add_bias backward", |T| read::<T, _>(g, |gd| {
            let mut db = vec![T::from_f64(0.0); bias.elem_count()];
            for (r, row) in gd.chunks_exact(lk.max(1)).enumerate().take(b * h * lq) {
                let at = ix.row(r / (h * lq), (r / lq) % h, r % lq);
                for (j, &v) in row.iter().enumerate() {
                    db[at + j * ix.strides[3]] += v;
                }
            }
            tensor(db, bias.dims())
        }))?;
        Ok((ds, Some(db)))
    }
}

// ---------------------------------------------------------------------------------------------
// Per-channel bias

/// `x + bias[c]` along axis 1 of `x` (`[B, C, ...]`), with the bias gradient summed per channel
/// in one pass (a convolution's bias).
pub(crate) fn add_channel_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || bias.dims() != [dims[1]] {
        bail!("add_channel_bias: bias {:?} does not match axis 1 of {dims:?}", bias.dims());
    }
    let inner = dims[2..].iter().product();
    x.contiguous()?.apply_op2(&bias.contiguous()?, ChannelBias { c: dims[1], inner })
}

struct ChannelBias {
    c: usize,
    inner: usize,
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "channel-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (c, inner) = (self.c, self.inner);
        let out = by_dtype!(s1.dtype(), "add_channel_bias", |T| {
            let x = contiguous::<T>("add_channel_bias", "input", s1, l1, l1.shape().elem_count())?;
            let bias = contiguous::<T>("add_channel_bias", "bias", s2, l2, c)?;
            let mut out = x.to_vec();
            out.par_chunks_mut(inner.max(1)).enumerate().for_each(|(p, plane)| {
                let v = bias[p % c];
                plane.iter_mut().for_each(|y| *y += v);
            });
            T::to_cpu_storage_owned(out)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, bias: &Tensor, _res: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = if x.track_op() { Some(g.clone()) } else { None };
        let db = if bias.track_op() {
            Some(by_dtype!(g.dtype(), "add_channel_bias backward", |T| read::<T, _>(g, |gd| {
                tensor(channel_sums(gd, self.c, self.inner), &[self.c])
            }))?)
        } else {
            None
        };
        Ok((dx, db))
    }
}
