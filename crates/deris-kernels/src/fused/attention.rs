//! Scaled dot-product attention, `softmax(q·kᵀ·scale + Σ biases)·v`, without copies of the heads.
//!
//! The heads are read in place through their strides (e.g. straight out of a fused `qkv`
//! projection), the scores of one (batch, head, query block) live in a per-thread scratch buffer
//! between the two `gemm` calls, and the result is written in `[B, Lq, H, hd]` order so that
//! merging the heads afterwards is free.

use std::cell::RefCell;

use candle_core::{bail, Result, Tensor, D};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use crate::autograd;
use super::{cpu_f32, fast_path, CpuF32, Output};

/// `softmax(q·kᵀ·scale + Σ biases)·v` over the key axis.
///
/// Runs the fused kernel on f32 CPU tensors that need no gradient, [`attention_reference`]
/// otherwise.
///
/// # Shapes
/// - `q`: `[B, H, Lq, hd]`; `k`, `v`: `[B, H, Lk, hd]`; any strides
/// - each bias: additive, `[G, H or 1, Lq or 1, Lk or 1]` (missing leading axes count as 1),
///   where `G` divides `B` and batch `b` uses bias `b mod G`: `G = 1` and `G = B` are ordinary
///   broadcasting, and `G = nW` with `B = images·nW` gives each window of every image its
///   own mask (Swin)
/// - returns `[B, H, Lq, hd]`; the fused kernel returns it as a transposed view of a contiguous
///   `[B, Lq, H, hd]` buffer, so `transpose(1, 2)` + `reshape` to `[B, Lq, H·hd]` copies nothing
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, biases: &[&Tensor]) -> Result<Tensor> {
    let g = Geometry::new(q, k, v, biases)?;
    let mut all = vec![q, k, v];
    all.extend(biases);
    let unit_last = [q, k, v].iter().all(|t| t.stride()[3] == 1 || t.dim(3).is_ok_and(|d| d == 1));
    if !fast_path(&all) || !unit_last || g.lk == 0 || g.hd == 0 || g.lq == 0 {
        if g.lk > 0 && g.lq > 0 && autograd::supported(&all) && autograd::any_tracked(&all) {
            return attention_autograd(q, k, v, scale, biases);
        }
        return attention_reference(q, k, v, scale, biases);
    }
    // Biases whose key axis is neither contiguous nor broadcast are made contiguous.
    let biases = biases
        .iter()
        .map(|b| {
            let b4 = to_rank4(b)?;
            if b4.dim(3)? > 1 && b4.stride()[3] != 1 {
                b4.contiguous()
            } else {
                Ok(b4)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let (qs, ks, vs) = (cpu_f32(q)?, cpu_f32(k)?, cpu_f32(v)?);
    let bs = biases.iter().map(cpu_f32).collect::<Result<Vec<_>>>()?;
    let bias_views: Vec<BiasView> = bs.iter().map(BiasView::new).collect();
    let (qd, kd, vd) = (qs.data(), ks.data(), vs.data());
    let (qo, ko, vo) = (qs.layout.start_offset(), ks.layout.start_offset(), vs.layout.start_offset());
    let (qst, kst, vst) = (q.stride(), k.stride(), v.stride());
    let Geometry { b, h, lq, lk, hd } = g;

    let mut out = Output::new(b * lq * h * hd);
    let dst = out.ptr();
    let qc = query_block(b * h, lq, lk);
    let nqb = lq.div_ceil(qc);
    let scale = scale as f32;
    let task = |t: usize| {
        let (bh, qb) = (t / nqb, t % nqb);
        let (bi, hi) = (bh / h, bh % h);
        let i0 = qb * qc;
        let qn = qc.min(lq - i0);
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < qn * lk {
                s.resize(qn * lk, 0.0);
            }
            let scores = &mut s[..qn * lk];
            // SAFETY: every pointer stays inside its tensor (offsets from the layouts and
            // indices below the checked dims); this task alone writes rows i0..i0+qn of head hi
            // of batch bi of the output.
            unsafe {
                let qp = qd.as_ptr().add(qo + bi * qst[0] + hi * qst[1] + i0 * qst[2]);
                let kp = kd.as_ptr().add(ko + bi * kst[0] + hi * kst[1]);
                let vp = vd.as_ptr().add(vo + bi * vst[0] + hi * vst[1]);
                // scores = scale·q·kᵀ   [qn, Lk]
                gemm::gemm(
                    qn,
                    lk,
                    hd,
                    scores.as_mut_ptr(),
                    1,
                    lk as isize,
                    false,
                    qp,
                    qst[3] as isize,
                    qst[2] as isize,
                    kp,
                    kst[2] as isize,
                    kst[3] as isize,
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                softmax_rows(scores, lk, &bias_views, bi, hi, i0);
                // out[bi, i0.., hi, :] = p·v   (rows H·hd apart)
                let op = dst.get().add(((bi * lq + i0) * h + hi) * hd);
                gemm::gemm(
                    qn,
                    hd,
                    lk,
                    op,
                    1,
                    (h * hd) as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    lk as isize,
                    vp,
                    vst[3] as isize,
                    vst[2] as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    };
    (0..b * h * nqb).into_par_iter().for_each(task);
    drop((qs, ks, vs, bs));
    // SAFETY: the tasks cover every (batch, head, query block) of the output.
    let out = unsafe { out.assume_init() };
    Tensor::from_vec(out, (b, lq, h, hd), q.device())?.transpose(1, 2)
}

/// [`attention`] from primitive candle ops (differentiable; any device and dtype).
pub fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, biases: &[&Tensor]) -> Result<Tensor> {
    let Geometry { b, h, lq, lk, .. } = Geometry::new(q, k, v, biases)?;
    let q = (q.contiguous()? * scale)?;
    let mut scores = q.matmul(&k.contiguous()?.t()?)?; // [B, H, Lq, Lk]
    for bias in biases {
        let bias = to_rank4(bias)?;
        let groups = bias.dim(0)?;
        scores = scores
            .reshape((b / groups, groups, h, lq, lk))?
            .broadcast_add(&bias.unsqueeze(0)?)? // [B/G, G, H, Lq, Lk]
            .reshape((b, h, lq, lk))?;
    }
    let max = scores.max_keepdim(D::Minus1)?;
    let e = scores.broadcast_sub(&max)?.exp()?;
    let probs = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?; // softmax over the keys
    probs.matmul(&v.contiguous()?)
}

/// [`attention`] for training on the CPU: candle's products around one softmax op that adds the
/// constant biases (masks, padding) and has its own backward; biases that track a gradient
/// (Swin's relative positions) are added by an op that sums their gradient in one pass.
pub(super) fn attention_autograd(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, biases: &[&Tensor]) -> Result<Tensor> {
    Geometry::new(q, k, v, biases)?;
    let q = (q.contiguous()? * scale)?;
    let mut scores = q.matmul(&k.contiguous()?.t()?)?; // [B, H, Lq, Lk]
    let mut constant = Vec::new();
    for bias in biases {
        let bias = to_rank4(bias)?;
        if bias.track_op() {
            scores = autograd::add_bias(&scores, &bias)?;
        } else {
            constant.push(bias);
        }
    }
    autograd::biased_softmax(&scores, &constant)?.matmul(&v.contiguous()?)
}

thread_local! {
    /// Per-thread scores of one (batch, head, query block).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    hd: usize,
}

impl Geometry {
    fn new(q: &Tensor, k: &Tensor, v: &Tensor, biases: &[&Tensor]) -> Result<Self> {
        let (b, h, lq, hd) = q.dims4()?;
        let lk = k.dim(2)?;
        if k.dims() != [b, h, lk, hd] || v.dims() != [b, h, lk, hd] {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} must be [B, H, Lq, hd], [B, H, Lk, hd] twice",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        for bias in biases {
            let d = bias.dims();
            let ok = d.len() <= 4 && {
                let d4: Vec<usize> = std::iter::repeat_n(1, 4 - d.len()).chain(d.iter().copied()).collect();
                d4[0] > 0
                    && b % d4[0] == 0
                    && (d4[1] == 1 || d4[1] == h)
                    && (d4[2] == 1 || d4[2] == lq)
                    && (d4[3] == 1 || d4[3] == lk)
            };
            if !ok {
                bail!(
                    "attention: bias {d:?} must be [G, {h} or 1, {lq} or 1, {lk} or 1] with G dividing the batch {b}"
                );
            }
        }
        Ok(Self { b, h, lq, lk, hd })
    }
}

/// A bias left-padded with unit axes to rank 4.
pub(super) fn to_rank4(t: &Tensor) -> Result<Tensor> {
    let mut t = t.clone();
    while t.rank() < 4 {
        t = t.unsqueeze(0)?;
    }
    Ok(t)
}

/// One bias as the kernel reads it: element `(b, h, i, j)` is at
/// `start + (b mod groups)·s₀ + h·s₁ + i·s₂ + j·s₃` (stride 0 on broadcast axes, `s₃ ∈ {0, 1}`).
pub(super) struct BiasView<'a> {
    data: &'a [f32],
    start: usize,
    groups: usize,
    strides: [usize; 4],
}

impl<'a> BiasView<'a> {
    /// The view of a rank-4 bias whose key axis is contiguous or broadcast.
    pub(super) fn new(t: &'a CpuF32<'a>) -> Self {
        let dims = t.layout.dims();
        let st = t.layout.stride();
        let s = |i: usize| if dims[i] == 1 { 0 } else { st[i] };
        BiasView { data: t.data(), start: t.layout.start_offset(), groups: dims[0], strides: [s(0), s(1), s(2), s(3)] }
    }
}

/// Query rows per task: the scores of a block stay within ~256 KiB, and blocks shrink (to 16
/// rows) until there are about four tasks per thread.
fn query_block(heads_total: usize, lq: usize, lk: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let mut qc = (65_536 / lk.max(1)).clamp(1, lq.max(1));
    while heads_total * lq.div_ceil(qc) < 4 * threads && qc > 16 {
        qc = qc.div_ceil(2);
    }
    qc
}

multiversion! {
    /// Adds the bias rows of `(b, h, i0..)` to the `lk`-wide rows of `scores` and turns each
    /// row into its softmax.
    pub(super) fn softmax_rows(scores: &mut [f32], lk: usize, biases: &[BiasView<'_>], b: usize, h: usize, i0: usize) {
        for (r, row) in scores.chunks_exact_mut(lk).enumerate() {
            for bias in biases {
                let [s0, s1, s2, s3] = bias.strides;
                let at = bias.start + (b % bias.groups) * s0 + h * s1 + (i0 + r) * s2;
                if s3 == 0 {
                    let c = bias.data[at];
                    for y in row.iter_mut() {
                        *y += c;
                    }
                } else {
                    for (y, c) in row.iter_mut().zip(&bias.data[at..at + lk]) {
                        *y += c;
                    }
                }
            }
            let m = simd::max(row);
            for y in row.iter_mut() {
                *y = simd::exp(*y - m);
            }
            let inv = 1.0 / simd::sum(row);
            for y in row.iter_mut() {
                *y *= inv;
            }
        }
    }
}
