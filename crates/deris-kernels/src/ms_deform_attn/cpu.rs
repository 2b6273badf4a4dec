//! CPU kernels: rayon over independent output blocks, the `Dh` channels of a head innermost
//! (contiguous in the value rows, the output and the gradient).

use candle_core::WithDType;
use rayon::prelude::*;

use super::{Geometry, Level};

/// A sampling point inside the sampling range of one level: the top-left neighbour
/// `(y0, x0)` and the fractional offsets.
#[derive(Debug, Clone, Copy)]
struct Point<T> {
    y0: isize,
    x0: isize,
    ly: T,
    lx: T,
}

/// Maps a normalised `(x, y)` to pixel coordinates `(x·W − 0.5, y·H − 0.5)`; `None` when the
/// point samples zero (`xi ≤ −1`, `yi ≤ −1`, `xi ≥ W`, `yi ≥ H`, or NaN).
#[inline(always)]
fn locate<T: WithDType>(lv: &Level, x: T, y: T) -> Option<Point<T>> {
    let (w, h) = (T::from_f64(lv.w as f64), T::from_f64(lv.h as f64));
    let half = T::from_f64(0.5);
    let minus_one = T::from_f64(-1.0);
    let xi = x * w - half;
    let yi = y * h - half;
    if !(xi > minus_one && yi > minus_one && xi < w && yi < h) {
        return None;
    }
    let x0 = xi.to_f64().floor();
    let y0 = yi.to_f64().floor();
    Some(Point { y0: y0 as isize, x0: x0 as isize, ly: yi - T::from_f64(y0), lx: xi - T::from_f64(x0) })
}

impl<T: WithDType> Point<T> {
    /// Calls `f(row, weight, ∂weight/∂lx, ∂weight/∂ly)` for each of the four neighbours that lies
    /// inside the map; `row` indexes the flattened `S` axis.
    #[inline(always)]
    fn for_each_corner(&self, lv: &Level, mut f: impl FnMut(usize, T, T, T)) {
        let one = T::from_f64(1.0);
        let zero = T::from_f64(0.0);
        let (hy, hx) = (one - self.ly, one - self.lx);
        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let (yy, xx) = (self.y0 + dy, self.x0 + dx);
            if yy < 0 || xx < 0 || yy >= lv.h as isize || xx >= lv.w as isize {
                continue;
            }
            let wy = if dy == 1 { self.ly } else { hy };
            let wx = if dx == 1 { self.lx } else { hx };
            let d_lx = if dx == 1 { wy } else { zero - wy };
            let d_ly = if dy == 1 { wx } else { zero - wx };
            f(lv.start + yy as usize * lv.w + xx as usize, wy * wx, d_lx, d_ly);
        }
    }
}

#[inline(always)]
fn axpy<T: WithDType>(dst: &mut [T], a: T, x: &[T]) {
    for (d, &v) in dst.iter_mut().zip(x) {
        *d += a * v;
    }
}

/// `x·y` with eight independent partial sums, so the loop vectorises.
#[inline]
fn dot<T: WithDType>(x: &[T], y: &[T]) -> T {
    let zero = T::from_f64(0.0);
    let mut acc = [zero; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail = xc.remainder().iter().zip(yc.remainder()).fold(zero, |s, (&a, &b)| s + a * b);
    for (a, b) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += a[k] * b[k];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

/// Queries per rayon item of the forward: enough work to amortise the scheduling.
const FORWARD_QUERY_BLOCK: usize = 64;

/// Forward: `[B, Lq, M·Dh]`, one rayon item per block of queries of one image.
pub(crate) fn forward<T: WithDType>(g: &Geometry, value: &[T], loc: &[T], attn: &[T]) -> Vec<T> {
    let row = g.m * g.dh;
    let mut out = vec![T::from_f64(0.0); g.b * g.lq * row];
    let blocks = g.lq.div_ceil(FORWARD_QUERY_BLOCK);
    let mut items: Vec<(usize, usize, &mut [T])> = Vec::with_capacity(g.b * blocks);
    for (b, image) in out.chunks_mut(g.lq * row).enumerate() {
        for (blk, part) in image.chunks_mut(FORWARD_QUERY_BLOCK * row).enumerate() {
            items.push((b, blk * FORWARD_QUERY_BLOCK, part));
        }
    }
    items.into_par_iter().for_each(|(b, q0, part)| {
        sample_block(g, &value[b * g.s * row..(b + 1) * g.s * row], loc, attn, b * g.lq + q0, part)
    });
    out
}

crate::with_avx2!(fn sample_block<T: WithDType>(g: &Geometry, value: &[T], loc: &[T], attn: &[T], bq0: usize, part: &mut [T]) => sample_block_body);

/// Queries `bq0..` (flattened over the batch) into `part` (`[queries, M·Dh]`), sampling
/// `value`, that image's `[S, M, Dh]` values. A head of 32 channels (DeRIS: 256 / 8) is
/// accumulated in a fixed-size array, which stays in vector registers.
#[inline(always)]
fn sample_block_body<T: WithDType>(g: &Geometry, value: &[T], loc: &[T], attn: &[T], bq0: usize, part: &mut [T]) {
    let row = g.m * g.dh;
    for (dq, out_q) in part.chunks_exact_mut(row).enumerate() {
        for (m, out) in out_q.chunks_exact_mut(g.dh).enumerate() {
            let head = (bq0 + dq) * g.m + m;
            if g.dh == 32 {
                let mut acc = [T::from_f64(0.0); 32];
                sample_head(g, value, loc, attn, head, &mut acc);
                out.copy_from_slice(&acc);
            } else {
                sample_head(g, value, loc, attn, head, out);
            }
        }
    }
}

/// Adds the weighted samples of head `head = bq·M + m` (all levels and points) to `acc` (`Dh`).
#[inline(always)]
fn sample_head<T: WithDType>(g: &Geometry, value: &[T], loc: &[T], attn: &[T], head: usize, acc: &mut [T]) {
    let (dh, nl) = (acc.len(), g.l());
    let row = g.m * dh;
    let m = head % g.m;
    for (li, lv) in g.levels.iter().enumerate() {
        for p in 0..g.p {
            let i = (head * nl + li) * g.p + p;
            let Some(pt) = locate(lv, loc[2 * i], loc[2 * i + 1]) else { continue };
            let a = attn[i];
            pt.for_each_corner(lv, |s, w, _, _| axpy(acc, a * w, &value[s * row + m * dh..][..dh]));
        }
    }
}

/// Gradient for `value`, `[B, S, M, Dh]`. Accumulates head-major (`[B, M, S, Dh]`) so that every
/// (b, m, level) block is owned by one rayon item (deterministic, no atomics), then permutes.
pub(crate) fn grad_value<T: WithDType>(g: &Geometry, loc: &[T], attn: &[T], grad: &[T]) -> Vec<T> {
    let (dh, nl) = (g.dh, g.l());
    let row = g.m * dh;
    let zero = T::from_f64(0.0);
    let mut head_major = vec![zero; g.b * g.m * g.s * dh];
    head_major.par_chunks_mut(g.s * dh).enumerate().for_each(|(bm, head)| {
        let (b, m) = (bm / g.m, bm % g.m);
        let mut parts = Vec::with_capacity(nl);
        let mut rest = head;
        for lv in &g.levels {
            let (part, tail) = rest.split_at_mut(lv.h * lv.w * dh);
            parts.push(part);
            rest = tail;
        }
        parts.into_par_iter().enumerate().for_each(|(li, part)| {
            let lv = &g.levels[li];
            for q in 0..g.lq {
                let bq = b * g.lq + q;
                let gq = &grad[bq * row + m * dh..][..dh];
                for p in 0..g.p {
                    let i = ((bq * g.m + m) * nl + li) * g.p + p;
                    let Some(pt) = locate(lv, loc[2 * i], loc[2 * i + 1]) else { continue };
                    let a = attn[i];
                    pt.for_each_corner(lv, |s, w, _, _| axpy(&mut part[(s - lv.start) * dh..][..dh], a * w, gq));
                }
            }
        });
    });
    let mut out = vec![zero; g.b * g.s * row];
    out.par_chunks_mut(row).enumerate().for_each(|(bs, dst)| {
        let (b, s) = (bs / g.s, bs % g.s);
        for (m, d) in dst.chunks_exact_mut(dh).enumerate() {
            d.copy_from_slice(&head_major[((b * g.m + m) * g.s + s) * dh..][..dh]);
        }
    });
    out
}

/// The sampler's vector-Jacobian product, `[B, Lq, M, L, P, 3]` = (∂(g·s)/∂x, ∂(g·s)/∂y, g·s),
/// one rayon item per (b, q).
pub(crate) fn grad_sampling<T: WithDType>(g: &Geometry, value: &[T], loc: &[T], grad: &[T]) -> Vec<T> {
    let (dh, nl) = (g.dh, g.l());
    let row = g.m * dh;
    let per_q = g.m * nl * g.p;
    let zero = T::from_f64(0.0);
    let mut out = vec![zero; g.b * g.lq * per_q * 3];
    out.par_chunks_mut(per_q * 3).enumerate().for_each(|(bq, out_q)| {
        let b = bq / g.lq;
        let vb = &value[b * g.s * row..(b + 1) * g.s * row];
        for m in 0..g.m {
            let gq = &grad[bq * row + m * dh..][..dh];
            for (li, lv) in g.levels.iter().enumerate() {
                for p in 0..g.p {
                    let j = (m * nl + li) * g.p + p;
                    let i = bq * per_q + j;
                    let Some(pt) = locate(lv, loc[2 * i], loc[2 * i + 1]) else { continue };
                    let (mut d_lx, mut d_ly, mut gs) = (zero, zero, zero);
                    pt.for_each_corner(lv, |s, w, dw_lx, dw_ly| {
                        let gv = dot(gq, &vb[s * row + m * dh..][..dh]);
                        gs += w * gv;
                        d_lx += dw_lx * gv;
                        d_ly += dw_ly * gv;
                    });
                    // lx = x·W − 0.5 − x0, so ∂/∂x = W·∂/∂lx (likewise for y)
                    out_q[3 * j] = d_lx * T::from_f64(lv.w as f64);
                    out_q[3 * j + 1] = d_ly * T::from_f64(lv.h as f64);
                    out_q[3 * j + 2] = gs;
                }
            }
        }
    });
    out
}
