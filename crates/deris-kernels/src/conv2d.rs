//! 2-D convolution (stride 1, no dilation, one group, zero padding) with its bias, as matrix
//! products on the NCHW layout, without im2col.
//!
//! A `1×1` convolution is one product per image, `out[Co, H·W] = W[Co, Ci] · x[Ci, H·W]`,
//! written into a destination pre-filled with the bias. A `kh×kw` convolution pads the image once
//! into planes of width `Wp = W + 2p` and accumulates one product per tap `(ky, kx)`: the tap's
//! input, for every output position `(y, x)` of a `Ho × Wp` grid, is the padded plane read from
//! offset `ky·Wp + kx` — a plain strided matrix, so no patch matrix is built. The `Wp − Wo`
//! extra columns of each output row are dropped at the end.
//!
//! A `3×3` convolution uses Winograd's minimal filtering `F(2×2, 3×3)` instead (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 output tile is
//! `Aᵀ·[Σ_ci (G·g·Gᵀ) ⊙ (Bᵀ·d·B)]·A` for the 4×4 input tile `d`, i.e. 16 products
//! `[Co, Ci]·[Ci, tiles]` (one per position of the 4×4 transformed tile) in place of 36
//! multiply-adds per output tile and channel pair: 2.25× fewer. The transforms only add,
//! subtract and halve; the filter transform runs in f64. The result differs from direct
//! summation by rounding only (about 1e-6 of the output scale in f32).
//!
//! [`conv2d`] takes these paths on the CPU for f32/f64 when no input tracks a gradient, and
//! otherwise [`conv2d_reference`] (candle's `conv2d` plus the bias), which has candle's
//! gradients and runs on every device.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::autograd;
use crate::cpu_gemm::{self, MatRef};

/// Sizes of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConvGeometry {
    b: usize,
    ci: usize,
    h: usize,
    w: usize,
    co: usize,
    kh: usize,
    kw: usize,
    padding: usize,
}

impl ConvGeometry {
    fn out_hw(&self) -> (usize, usize) {
        (self.h + 2 * self.padding + 1 - self.kh, self.w + 2 * self.padding + 1 - self.kw)
    }
}

fn geometry(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize) -> Result<ConvGeometry> {
    let (b, ci, h, w) = x.dims4()?;
    let (co, wci, kh, kw) = weight.dims4()?;
    if wci != ci {
        bail!("conv2d: input {:?} has {ci} channels, weight {:?} expects {wci}", x.dims(), weight.dims());
    }
    if h + 2 * padding < kh || w + 2 * padding < kw {
        bail!("conv2d: kernel {kh}×{kw} is larger than the padded input {:?} (padding {padding})", x.dims());
    }
    if let Some(bias) = bias {
        if bias.dims() != [co] {
            bail!("conv2d: bias {:?} must be [{co}]", bias.dims());
        }
    }
    Ok(ConvGeometry { b, ci, h, w, co, kh, kw, padding })
}

/// `F.conv2d(x, weight, bias, stride=1, padding=padding)`, fast on the CPU.
///
/// # Shapes
/// - `x`: `[B, Ci, H, W]`; `weight`: `[Co, Ci, kh, kw]`; `bias`: `[Co]`
/// - returns `[B, Co, H + 2p − kh + 1, W + 2p − kw + 1]`
///
/// Differentiable: with a gradient-tracking input it runs candle's `conv2d` and, on the CPU, adds
/// the bias with an op that sums its gradient per channel ([`conv2d_reference`] elsewhere).
pub fn conv2d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let g = geometry(x, weight, bias, padding)?;
    let tracked = x.track_op() || weight.track_op() || bias.is_some_and(|b| b.track_op());
    let fast_dtype = matches!(x.dtype(), DType::F32 | DType::F64) && weight.dtype() == x.dtype();
    if tracked || !x.device().is_cpu() || !fast_dtype || bias.is_some_and(|b| b.dtype() != x.dtype()) {
        if let Some(b) = bias.filter(|b| tracked && autograd::supported(&[x, weight, b])) {
            // Training on the CPU: the bias gradient summed per channel in one pass.
            return autograd::add_channel_bias(&x.conv2d(weight, padding, 1, 1, 1)?, b);
        }
        return conv2d_reference(x, weight, bias, padding);
    }
    let bias = match bias {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(g.co, x.dtype(), x.device())?,
    };
    x.contiguous()?.apply_op3_no_bwd(&weight.contiguous()?, &bias, &Conv2dOp { g })
}

/// The slow twin of [`conv2d`]: candle's `conv2d` followed by the broadcast bias (any device,
/// candle's gradients).
///
/// # Shapes
/// Same as [`conv2d`].
pub fn conv2d_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let y = x.conv2d(weight, padding, 1, 1, 1)?;
    match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
        None => Ok(y),
    }
}

struct Conv2dOp {
    g: ConvGeometry,
}

/// The data of a contiguous input with the expected shape, or an error naming it.
fn slice<'a, T: WithDType>(what: &str, s: &'a CpuStorage, l: &Layout, shape: &[usize]) -> Result<&'a [T]> {
    if l.dims() != shape {
        bail!("conv2d: {what} has shape {:?}, expected {shape:?}", l.dims());
    }
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => bail!("conv2d: {what} is not contiguous"),
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
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
        let g = self.g;
        let (ho, wo) = g.out_hw();
        let xs = [g.b, g.ci, g.h, g.w];
        let ws = [g.co, g.ci, g.kh, g.kw];
        let out = match sx.dtype() {
            DType::F32 => CpuStorage::F32(forward::<f32>(
                &g,
                slice("input", sx, lx, &xs)?,
                slice("weight", sw, lw, &ws)?,
                slice("bias", sb, lb, &[g.co])?,
            )?),
            DType::F64 => CpuStorage::F64(forward::<f64>(
                &g,
                slice("input", sx, lx, &xs)?,
                slice("weight", sw, lw, &ws)?,
                slice("bias", sb, lb, &[g.co])?,
            )?),
            dt => bail!("conv2d: unsupported dtype {dt:?}"),
        };
        Ok((out, Shape::from((g.b, g.co, ho, wo))))
    }
}

/// The CPU forward, `[B, Co, Ho, Wo]` row-major.
fn forward<T: WithDType>(g: &ConvGeometry, x: &[T], w: &[T], bias: &[T]) -> Result<Vec<T>> {
    let (ho, wo) = g.out_hw();
    let zero = T::from_f64(0.0);
    let taps = g.kh * g.kw;
    let mut out = vec![zero; g.b * g.co * ho * wo];
    // weight of tap t as a [Co, Ci] matrix: w[co, ci, t] at co·Ci·taps + ci·taps + t
    let tap_weight = |t: usize| MatRef { data: &w[t..], rows: g.co, cols: g.ci, rs: g.ci * taps, cs: taps };
    if taps == 1 && g.padding == 0 {
        let hw = g.h * g.w;
        for (xb, ob) in x.chunks_exact(g.ci * hw).zip(out.chunks_exact_mut(g.co * hw)) {
            fill_rows(ob, hw, bias);
            let rhs = MatRef { data: xb, rows: g.ci, cols: hw, rs: hw, cs: 1 };
            cpu_gemm::matmul(ob, hw, tap_weight(0), rhs, true)?;
        }
        return Ok(out);
    }
    if g.kh == 3 && g.kw == 3 {
        return winograd_3x3(g, x, w, bias, &mut out).map(|()| out);
    }
    let p = g.padding;
    let (hp, wp) = (g.h + 2 * p, g.w + 2 * p);
    // each padded plane has kw − 1 zeros of slack after it: the last tap reads that far
    let plane = hp * wp + g.kw - 1;
    let mut padded = vec![zero; g.ci * plane];
    let mut wide = vec![zero; g.co * ho * wp];
    for (xb, ob) in x.chunks_exact(g.ci * g.h * g.w).zip(out.chunks_exact_mut(g.co * ho * wo)) {
        padded.par_chunks_mut(plane).zip(xb.par_chunks(g.h * g.w)).for_each(|(dst, src)| {
            for (r, row) in src.chunks_exact(g.w).enumerate() {
                dst[(r + p) * wp + p..][..g.w].copy_from_slice(row);
            }
        });
        fill_rows(&mut wide, ho * wp, bias);
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let rhs = MatRef { data: &padded[ky * wp + kx..], rows: g.ci, cols: ho * wp, rs: plane, cs: 1 };
                cpu_gemm::matmul(&mut wide, ho * wp, tap_weight(ky * g.kw + kx), rhs, true)?;
            }
        }
        ob.par_chunks_mut(ho * wo).zip(wide.par_chunks(ho * wp)).for_each(|(dst, src)| {
            for (d, s) in dst.chunks_exact_mut(wo).zip(src.chunks_exact(wp)) {
                d.copy_from_slice(&s[..wo]);
            }
        });
    }
    Ok(out)
}

/// Output tiles per Winograd block: the transformed input and output of a block stay about
/// 12 MiB each at 256 channels (measured on DeRIS's 96×96 map: 96 to 2304 tiles per block are
/// within 20% of each other, 768 the fastest).
const WINOGRAD_TILES_PER_BLOCK: usize = 768;

/// `F(2×2, 3×3)` over all images, into `out` (`[B, Co, Ho, Wo]`). Per block of tile rows: the
/// input transform (parallel over channels), the 16 products (parallel over the tile positions,
/// each on one thread), the output transform (parallel over output channels).
fn winograd_3x3<T: WithDType>(g: &ConvGeometry, x: &[T], w: &[T], bias: &[T], out: &mut [T]) -> Result<()> {
    let (ho, wo) = g.out_hw();
    let (ci, co) = (g.ci, g.co);
    let (tiles_y, tiles_x) = (ho.div_ceil(2), wo.div_ceil(2));
    let zero = T::from_f64(0.0);
    let u = winograd_filters(w, co, ci); // [Co, 16, Ci]
    let rows_per_block = (WINOGRAD_TILES_PER_BLOCK / tiles_x).clamp(1, tiles_y);
    let block_tiles = rows_per_block * tiles_x;
    let mut v = vec![zero; ci * 16 * block_tiles]; // [Ci, 16, tiles]
    let mut m = vec![zero; 16 * co * block_tiles]; // [16, Co, tiles]
    let input = InputTiles { h: g.h, w: g.w, pad: g.padding, tiles_x };
    for (xb, ob) in x.chunks_exact(ci * g.h * g.w).zip(out.chunks_exact_mut(co * ho * wo)) {
        for ty0 in (0..tiles_y).step_by(rows_per_block) {
            let rows = rows_per_block.min(tiles_y - ty0);
            let nt = rows * tiles_x;
            v.par_chunks_mut(16 * block_tiles).zip(xb.par_chunks(g.h * g.w)).for_each(|(vc, plane)| {
                winograd_input(plane, &input, ty0, rows, block_tiles, vc)
            });
            m.par_chunks_mut(co * block_tiles).enumerate().try_for_each(|(xi, mx)| {
                let lhs = MatRef { data: &u[xi * ci..], rows: co, cols: ci, rs: 16 * ci, cs: 1 };
                let rhs = MatRef { data: &v[xi * block_tiles..], rows: ci, cols: nt, rs: 16 * block_tiles, cs: 1 };
                cpu_gemm::matmul_serial(mx, block_tiles, lhs, rhs, false)
            })?;
            let m = &m;
            ob.par_chunks_mut(ho * wo).zip(bias).enumerate().for_each(|(c, (plane, &b))| {
                let at = OutputTiles { plane_stride: co * block_tiles, offset: c * block_tiles, ho, wo, tiles_x };
                winograd_output(m, &at, b, ty0, rows, plane)
            });
        }
    }
    Ok(())
}

/// Where the 4×4 input tiles of one channel lie: tile `(ty, tx)` starts at
/// `(2·ty − pad, 2·tx − pad)` of the `h × w` plane; samples outside it are the zero padding.
struct InputTiles {
    h: usize,
    w: usize,
    pad: usize,
    tiles_x: usize,
}

/// Where the transformed outputs of one channel lie in `m` (`[16, Co, tiles]`): position `ξ`
/// of tile `t` is `m[ξ·plane_stride + offset + t]`.
struct OutputTiles {
    plane_stride: usize,
    offset: usize,
    ho: usize,
    wo: usize,
    tiles_x: usize,
}

/// `U = G·g·Gᵀ` of every filter, `[Co, 16, Ci]`, computed in f64:
/// `G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]`.
fn winograd_filters<T: WithDType>(w: &[T], co: usize, ci: usize) -> Vec<T> {
    let mut u = vec![T::from_f64(0.0); co * 16 * ci];
    let g_rows = |a: f64, b: f64, c: f64| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    u.par_chunks_mut(16 * ci).enumerate().for_each(|(o, uo)| {
        for i in 0..ci {
            let f = &w[(o * ci + i) * 9..][..9];
            let f = |k: usize| f[k].to_f64();
            // G·g: 4 rows of 3, one column of g at a time
            let cols = [g_rows(f(0), f(3), f(6)), g_rows(f(1), f(4), f(7)), g_rows(f(2), f(5), f(8))];
            for r in 0..4 {
                let row = g_rows(cols[0][r], cols[1][r], cols[2][r]);
                for c in 0..4 {
                    uo[(r * 4 + c) * ci + i] = T::from_f64(row[c]);
                }
            }
        }
    });
    u
}

crate::with_avx2!(fn winograd_input<T: WithDType>(plane: &[T], at: &InputTiles, ty0: usize, rows: usize, stride: usize, v: &mut [T]) => winograd_input_body);

/// `V = Bᵀ·d·B` of the 4×4 input tiles of tile rows `ty0..ty0 + rows` of one channel (`plane`,
/// unpadded), into `v[ξ·stride + tile]`;
/// `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn winograd_input_body<T: WithDType>(plane: &[T], at: &InputTiles, ty0: usize, rows: usize, stride: usize, v: &mut [T]) {
    let zero = T::from_f64(0.0);
    let (h, w, pad) = (at.h as isize, at.w as isize, at.pad as isize);
    for r in 0..rows {
        let y = 2 * (ty0 + r) as isize - pad;
        for tx in 0..at.tiles_x {
            let t = r * at.tiles_x + tx;
            let x = 2 * tx as isize - pad;
            let mut d = [[zero; 4]; 4];
            if y >= 0 && x >= 0 && y + 4 <= h && x + 4 <= w {
                for (i, di) in d.iter_mut().enumerate() {
                    di.copy_from_slice(&plane[(y as usize + i) * at.w + x as usize..][..4]);
                }
            } else {
                for (i, di) in d.iter_mut().enumerate() {
                    for (j, dij) in di.iter_mut().enumerate() {
                        let (yy, xx) = (y + i as isize, x + j as isize);
                        if yy >= 0 && xx >= 0 && yy < h && xx < w {
                            *dij = plane[yy as usize * at.w + xx as usize];
                        }
                    }
                }
            }
            // Bᵀ·d, one column at a time
            let mut bd = [[zero; 4]; 4];
            for j in 0..4 {
                bd[0][j] = d[0][j] - d[2][j];
                bd[1][j] = d[1][j] + d[2][j];
                bd[2][j] = d[2][j] - d[1][j];
                bd[3][j] = d[1][j] - d[3][j];
            }
            for (i, row) in bd.iter().enumerate() {
                v[(i * 4) * stride + t] = row[0] - row[2];
                v[(i * 4 + 1) * stride + t] = row[1] + row[2];
                v[(i * 4 + 2) * stride + t] = row[2] - row[1];
                v[(i * 4 + 3) * stride + t] = row[1] - row[3];
            }
        }
    }
}

crate::with_avx2!(fn winograd_output<T: WithDType>(m: &[T], at: &OutputTiles, bias: T, ty0: usize, rows: usize, plane: &mut [T]) => winograd_output_body);

/// `Y = Aᵀ·M·A + bias` of the tiles of one output channel, written where inside the map;
/// `Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn winograd_output_body<T: WithDType>(m: &[T], at: &OutputTiles, bias: T, ty0: usize, rows: usize, plane: &mut [T]) {
    let (ho, wo) = (at.ho, at.wo);
    for r in 0..rows {
        let y = 2 * (ty0 + r);
        for tx in 0..at.tiles_x {
            let t = at.offset + r * at.tiles_x + tx;
            let x = 2 * tx;
            let mv = |i: usize, j: usize| m[(i * 4 + j) * at.plane_stride + t];
            // Aᵀ·M
            let mut am = [[T::from_f64(0.0); 4]; 2];
            for j in 0..4 {
                am[0][j] = mv(0, j) + mv(1, j) + mv(2, j);
                am[1][j] = mv(1, j) - mv(2, j) - mv(3, j);
            }
            for (dy, row) in am.iter().enumerate() {
                if y + dy >= ho {
                    continue;
                }
                let o = &mut plane[(y + dy) * wo..][..wo];
                o[x] = row[0] + row[1] + row[2] + bias;
                if x + 1 < wo {
                    o[x + 1] = row[1] - row[2] - row[3] + bias;
                }
            }
        }
    }
}

/// Sets row `c` of a `[C, n]` matrix to `v[c]`.
fn fill_rows<T: WithDType>(dst: &mut [T], n: usize, v: &[T]) {
    for (row, &b) in dst.chunks_exact_mut(n).zip(v) {
        row.fill(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn fast_matches_reference() {
        let dev = Device::Cpu;
        // (b, ci, h, w, co, k, padding)
        for (i, &(b, ci, h, w, co, k, p)) in
            // 1×1, 3×3 (Winograd: odd and even maps, unpadded, several tile blocks with a short
            // last one, many channels), 5×5 and a padded 1×1 (shifted products)
            [
                (1, 3, 5, 7, 4, 1, 0),
                (2, 5, 6, 4, 3, 3, 1),
                (1, 8, 9, 9, 16, 3, 1),
                (2, 2, 4, 5, 3, 3, 0),
                (1, 3, 8, 200, 2, 3, 1),
                (1, 3, 5, 800, 2, 3, 1),
                (1, 64, 12, 12, 24, 3, 1),
                (1, 3, 6, 6, 2, 5, 2),
                (1, 2, 3, 3, 2, 1, 1),
            ]
                .iter()
                .enumerate()
        {
            for dtype in [DType::F32, DType::F64] {
                let x = Tensor::randn(0f32, 1., (b, ci, h, w), &dev).unwrap().to_dtype(dtype).unwrap();
                let wt = Tensor::randn(0f32, 1., (co, ci, k, k), &dev).unwrap().to_dtype(dtype).unwrap();
                let bias = Tensor::randn(0f32, 1., co, &dev).unwrap().to_dtype(dtype).unwrap();
                for bias in [Some(&bias), None] {
                    let fast = conv2d(&x, &wt, bias, p).unwrap();
                    let slow = conv2d_reference(&x, &wt, bias, p).unwrap();
                    assert_eq!(fast.dims(), slow.dims(), "case {i}");
                    let d = max_abs_diff(&fast, &slow);
                    let scale = max_abs_diff(&slow, &slow.zeros_like().unwrap()).max(1.0);
                    // relative to the output scale: the two sum the taps in different orders, and
                    // Winograd's transforms add a few roundings
                    println!("case {i} {dtype:?}: max |fast − reference| = {d:.2e} (scale {scale:.1})");
                    let tol = if dtype == DType::F32 { 2e-6 } else { 1e-14 };
                    assert!(d <= tol * scale, "case {i} {dtype:?}: max |fast − reference| = {d:e} (scale {scale:.1})");
                }
            }
        }
    }
}
