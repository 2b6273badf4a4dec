//! `nn.Linear` with its epilogue fused: `y = act(x·Wᵀ + b) + residual`, and the exact GELU.
//!
//! The product is cut into output tiles that rayon runs in parallel, each a single-threaded
//! `gemm` call followed by the bias, activation and residual on the tile while it is still in
//! cache: one pass over the output instead of the three of `matmul`, `broadcast_add`, `gelu`.

use candle_core::{bail, DType, Result, Tensor, D};
use rayon::prelude::*;

use super::simd::{self, multiversion};
use crate::precision::{precision, Precision};
use crate::{autograd, bf16};
use super::{cpu_f32, fast_path, rows_per_task, skinny, Output};

/// Elementwise activation applied after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `torch.nn.GELU()` (exact erf form).
    GeluErf,
}

/// `act(x·weightᵀ + bias) + residual`.
///
/// Runs the fused kernel on f32 CPU tensors that need no gradient, [`linear_reference`]
/// otherwise. In [`Precision::Bf16`] mode the fused kernel's product (of 8 rows or more) rounds
/// `x` and `weight` to bf16 and sums in f32.
///
/// # Shapes
/// - `x`: `[.., K]`; `weight`: `[N, K]` (`nn.Linear` layout, any strides); `bias`: `[N]`
/// - `residual`: the output shape `[.., N]`; returns `[.., N]`
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, k) = weight.dims2()?;
    let out_dims = output_dims(x, (n, k), bias, residual)?;
    let mut all = vec![x, weight];
    all.extend(bias);
    all.extend(residual);
    if !fast_path(&all) || x.elem_count() == 0 || n == 0 {
        if x.elem_count() > 0 && n > 0 && autograd::supported(&all) && autograd::any_tracked(&all) {
            // Training on the CPU: the product and bias with their own backward, then candle's
            // GELU and sum.
            let y = autograd::linear(x, weight, bias)?;
            let y = if act == Activation::GeluErf { y.gelu_erf()? } else { y };
            return match residual {
                Some(r) => y + r,
                None => Ok(y),
            };
        }
        return linear_reference(x, weight, bias, act, residual);
    }
    let m = x.elem_count() / k;
    let ws = cpu_f32(weight)?;
    let (w_rs, w_cs) = (weight.stride()[0], weight.stride()[1]);
    let wd = &ws.data()[ws.layout.start_offset()..];
    let out = with_operands(x, bias, residual, act, |xd, ep| {
        // Few rows: dot products on the weight in place (no packing); otherwise gemm tiles, or in
        // bf16 mode tiles of the bf16 product over the input packed once (from one full row
        // block, 8 rows, on: below that the dot products on the f32 weight in place are faster).
        let bf16 = precision() == Precision::Bf16;
        let kernel = if m <= skinny::MAX_ROWS && w_cs == 1 && skinny::available() && !(bf16 && m >= bf16::MIN_ROWS) {
            Kernel::Skinny
        } else if bf16 {
            // SAFETY: `set_precision` let Bf16 through only on a CPU with AVX512-BF16; x holds m
            // rows of k values.
            Kernel::Bf16(unsafe { bf16::PackedA::new(xd, m, k, k) })
        } else {
            Kernel::Gemm
        };
        let tiles = match kernel {
            Kernel::Skinny => (m, skinny_cols(n, k)),
            _ => tile_sizes(m, n, k, 16),
        };
        let product = |m0: usize, mm: usize, n0: usize, nn: usize, tile: *mut f32| {
            // SAFETY: `tiled` hands each task its own tile (m0.., n0..) of the m×n output; the
            // operands are read inside their bounds (x is m×k contiguous, weight n×k with its
            // strides). Each kernel runs only where its CPU check passed (skinny: `available`;
            // bf16: `set_precision` checked the CPU); m0 is a multiple of 16, so of the bf16
            // row block.
            unsafe {
                let w = wd.as_ptr().add(n0 * w_rs);
                match &kernel {
                    #[cfg(target_arch = "x86_64")]
                    Kernel::Skinny => skinny::skinny_gemm(mm, nn, k, xd.as_ptr().add(m0 * k), k, w, w_rs, tile, n),
                    #[cfg(not(target_arch = "x86_64"))]
                    Kernel::Skinny => {}
                    Kernel::Bf16(packed) => bf16::matmul_packed(packed, m0, mm, nn, w, w_rs, w_cs, tile, n, false),
                    Kernel::Gemm => gemm::gemm(
                        mm,
                        nn,
                        k,
                        tile,
                        1,
                        n as isize,
                        false,
                        xd.as_ptr().add(m0 * k),
                        1,
                        k as isize,
                        w,
                        w_rs as isize,
                        w_cs as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    ),
                }
            }
        };
        // SAFETY: every kernel writes all of its tile, and only it (see `product`).
        Ok(unsafe { tiled((m, n), tiles, &ep, product) })
    })?;
    drop(ws);
    Tensor::from_vec(out, out_dims, x.device())
}

/// [`linear`] with a weight rounded to bf16 and packed beforehand ([`pack_weight`]): the bf16
/// product of [`linear`] in [`Precision::Bf16`] mode, bit for bit, whatever the process-wide
/// precision is now. Unlike [`linear`], it also runs the bf16 product for fewer than 8 rows
/// (where [`linear`] uses the f32 weight in place: there is none here).
///
/// `x`, `bias` and `residual` must be f32 CPU tensors that track no gradient (the packed weight
/// has no f32 values for the reference or the backward); errors otherwise.
///
/// # Shapes
/// - `x`: `[.., K]`; `weight`: `[N, K]`; `bias`: `[N]`
/// - `residual`: the output shape `[.., N]`; returns `[.., N]`
pub fn linear_bf16(
    x: &Tensor,
    weight: &bf16::PackedWeight,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, k) = weight.shape();
    let out_dims = output_dims(x, (n, k), bias, residual)?;
    let mut all = vec![x];
    all.extend(bias);
    all.extend(residual);
    if !fast_path(&all) {
        bail!("linear_bf16: a bf16 packed weight takes f32 CPU inputs that track no gradient, got x {:?} on {:?}", x.dtype(), x.device().location());
    }
    let m: usize = out_dims[..out_dims.len() - 1].iter().product();
    if m == 0 || n == 0 {
        return Tensor::zeros(out_dims, DType::F32, x.device());
    }
    let out = with_operands(x, bias, residual, act, |xd, ep| {
        // SAFETY: a PackedWeight exists only on a CPU with AVX512-BF16 (its constructor checked);
        // x holds m rows of k values.
        let packed = unsafe { bf16::PackedA::new(xd, m, k, k) };
        let product = |m0: usize, mm: usize, n0: usize, nn: usize, tile: *mut f32| {
            // SAFETY: `tiled` hands each task its own tile (m0.., n0..) of the m×n output; m0 is
            // a multiple of 16, so of the bf16 row block, and n0 of the weight's panels (the
            // tiles are NR-aligned); A and the weight have k values per row; the CPU has the
            // features (as above).
            unsafe { bf16::matmul_prepacked(&packed, m0, mm, weight, n0, nn, tile, n, false) }
        };
        // SAFETY: the product writes all of its tile, and only it.
        Ok(unsafe { tiled((m, n), tile_sizes(m, n, k, bf16::NR), &ep, product) })
    })?;
    Tensor::from_vec(out, out_dims, x.device())
}

/// `weight` (`[N, K]`, f32 on the CPU, any strides) rounded to bf16 and packed once for
/// [`linear_bf16`] (about half the memory of the f32 weight).
///
/// Errors for other dtypes or devices, or when the CPU lacks AVX512-BF16.
pub fn pack_weight(weight: &Tensor) -> Result<bf16::PackedWeight> {
    let (n, k) = weight.dims2()?;
    let ws = cpu_f32(weight)?;
    let data = &ws.data()[ws.layout.start_offset()..];
    bf16::PackedWeight::new(data, n, k, weight.stride()[0], weight.stride()[1])
}

/// The output shape `[.., N]` of a linear layer with a `[N, K]` weight on `x`, after checking
/// that `x` ends in `K` features and the bias and residual fit.
fn output_dims(x: &Tensor, (n, k): (usize, usize), bias: Option<&Tensor>, residual: Option<&Tensor>) -> Result<Vec<usize>> {
    let mut out_dims = x.dims().to_vec();
    if x.dim(D::Minus1)? != k {
        bail!("linear: weight [{n}, {k}] does not take inputs {:?}", x.dims());
    }
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    if let Some(b) = bias {
        if b.dims() != [n] {
            bail!("linear: bias {:?} must be [{n}] for weight [{n}, {k}]", b.dims());
        }
    }
    if let Some(r) = residual {
        if r.dims() != out_dims.as_slice() {
            bail!("linear: residual {:?} must have the output shape {out_dims:?}", r.dims());
        }
    }
    Ok(out_dims)
}

/// The fused epilogue's operands, contiguous: bias `[N]`, residual `[M, N]`, and whether the
/// exact GELU runs.
struct Epilogue<'a> {
    bias: Option<&'a [f32]>,
    residual: Option<&'a [f32]>,
    gelu: bool,
}

/// Runs `f` on the contiguous values of `x` (f32 CPU, `[M, K]` in row order) and the epilogue
/// of `bias`, `residual` and `act` (f32 CPU tensors).
fn with_operands<R>(
    x: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    act: Activation,
    f: impl FnOnce(&[f32], Epilogue<'_>) -> Result<R>,
) -> Result<R> {
    let x = x.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let xs = cpu_f32(&x)?;
    let bs = bias.as_ref().map(cpu_f32).transpose()?;
    let rs = residual.as_ref().map(cpu_f32).transpose()?;
    let ep = Epilogue {
        bias: bs.as_ref().map(|b| b.contiguous()).transpose()?,
        residual: rs.as_ref().map(|r| r.contiguous()).transpose()?,
        gelu: act == Activation::GeluErf,
    };
    f(xs.contiguous()?, ep)
}

/// The `[m, n]` output of a product cut into `(mc, nc)` tiles, run in parallel when there are
/// several: `product(m0, mm, n0, nn, tile)` writes the `mm×nn` tile at rows `m0..`, columns
/// `n0..`, whose first value is `tile` (rows `n` apart); the epilogue then runs on the tile
/// while it is in cache.
///
/// # Safety
/// `product` must write every value of its tile and nothing outside it.
unsafe fn tiled(
    (m, n): (usize, usize),
    (mc, nc): (usize, usize),
    ep: &Epilogue,
    product: impl Fn(usize, usize, usize, usize, *mut f32) + Sync,
) -> Vec<f32> {
    let mut out = Output::new(m * n);
    let (tm, tn) = (m.div_ceil(mc), n.div_ceil(nc));
    let dst = out.ptr();
    let task = |t: usize| {
        let (m0, n0) = ((t / tn) * mc, (t % tn) * nc);
        let (mm, nn) = (mc.min(m - m0), nc.min(n - n0));
        // SAFETY: tile (m0.., n0..) of the m×n output is this task's only; the product writes
        // all of it (caller's contract) before the epilogue reads it.
        unsafe {
            let tile = dst.get().add(m0 * n + n0);
            product(m0, mm, n0, nn, tile);
            for r in 0..mm {
                let row = std::slice::from_raw_parts_mut(tile.add(r * n), nn);
                let res = ep.residual.map(|rd| &rd[(m0 + r) * n + n0..][..nn]);
                epilogue(row, ep.bias.map(|b| &b[n0..n0 + nn]), ep.gelu, res);
            }
        }
    };
    if tm * tn == 1 {
        task(0);
    } else {
        (0..tm * tn).into_par_iter().for_each(task);
    }
    // SAFETY: the tiles cover the output.
    unsafe { out.assume_init() }
}

/// [`linear`] from primitive candle ops (differentiable; any device and dtype).
pub fn linear_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let lead = x.dims()[..x.rank() - 1].to_vec();
    let x2 = x.reshape(((), k))?;
    let mut y = x2.matmul(&weight.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    if act == Activation::GeluErf {
        y = y.gelu_erf()?;
    }
    let mut dims = lead;
    dims.push(weight.dim(0)?);
    let y = y.reshape(dims)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// The product of a tile of [`linear`].
enum Kernel {
    /// [`skinny::skinny_gemm`] on the operands in place.
    Skinny,
    /// `gemm`'s f32 product.
    Gemm,
    /// The bf16 product ([`crate::Precision::Bf16`]) over the input rounded and packed once.
    Bf16(bf16::PackedA),
}

// bf16 tiles must start on a packed row block: row tiles are multiples of 16 rows.
const _: () = assert!(16 % bf16::MR == 0);

/// Output columns per task of a skinny product: about four tasks per thread, at least 32 columns.
fn skinny_cols(n: usize, k: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    if n * k < 1 << 16 {
        return n;
    }
    n.div_ceil(4 * threads).max(32).div_ceil(2) * 2
}

/// Output tiles `(rows, cols)` for an `m×n×k` product: large enough for `gemm` to run near its
/// peak, small enough for about four tiles per thread. Row tiles are multiples of 16 rows, column
/// tiles of `col_align` columns (16; a prepacked bf16 weight's [`bf16::NR`], the columns of its
/// panels), except a tile that spans the whole axis.
fn tile_sizes(m: usize, n: usize, k: usize, col_align: usize) -> (usize, usize) {
    const MIN: usize = 64;
    let threads = rayon::current_num_threads().max(1);
    if m * n * k < 1 << 18 {
        return (m, n);
    }
    let (mut mc, mut nc) = (m.min(256), n.min(512));
    // Narrower column tiles first: splitting the rows would repack the weight in every tile.
    while m.div_ceil(mc) * n.div_ceil(nc) < 4 * threads && (mc > MIN || nc > MIN) {
        if nc > MIN {
            nc = nc.div_ceil(2).max(MIN);
        } else {
            mc = mc.div_ceil(2).max(MIN);
        }
    }
    let round = |v: usize, full: usize, align: usize| if v >= full { full } else { v.div_ceil(align) * align };
    (round(mc, m, 16), round(nc, n, col_align))
}

multiversion! {
    /// `row = act(row + bias) + res`, in place, in one pass.
    fn epilogue(row: &mut [f32], bias: Option<&[f32]>, gelu: bool, res: Option<&[f32]>) {
        let act = |y: f32| if gelu { simd::gelu_erf(y) } else { y };
        match (bias, res) {
            (Some(b), Some(r)) => {
                for ((y, b), r) in row.iter_mut().zip(b).zip(r) {
                    *y = act(*y + b) + r;
                }
            }
            (Some(b), None) => {
                for (y, b) in row.iter_mut().zip(b) {
                    *y = act(*y + b);
                }
            }
            (None, Some(r)) => {
                for (y, r) in row.iter_mut().zip(r) {
                    *y = act(*y) + r;
                }
            }
            (None, None) if gelu => {
                for y in row.iter_mut() {
                    *y = simd::gelu_erf(*y);
                }
            }
            (None, None) => {}
        }
    }
}

/// `torch.nn.GELU()` (exact erf form), elementwise.
///
/// Fused multithreaded kernel on f32 CPU tensors that need no gradient,
/// [`gelu_erf_reference`] otherwise.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !fast_path(&[x]) {
        return gelu_erf_reference(x);
    }
    let x = x.contiguous()?;
    let xs = cpu_f32(&x)?;
    let xd = xs.contiguous()?;
    let mut out = xd.to_vec();
    let per_task = rows_per_task(out.len(), 1);
    out.par_chunks_mut(per_task).for_each(|c| epilogue(c, None, true, None));
    drop(xs);
    Tensor::from_vec(out, x.shape(), x.device())
}

/// [`gelu_erf`] by candle's `gelu_erf` (differentiable).
pub fn gelu_erf_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

#[cfg(test)]
mod tests {
    use super::{bf16, tile_sizes};

    /// On 2 threads a 600×400 product gets column tiles of 112 (starting off the 32-column
    /// panels) unless they must start on a prepacked weight's panels.
    #[test]
    fn prepacked_tiles_start_on_panels() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            assert_eq!(tile_sizes(600, 400, 64, 16), (256, 112));
            assert_eq!(tile_sizes(600, 400, 64, bf16::NR), (256, 128));
        });
    }
}
