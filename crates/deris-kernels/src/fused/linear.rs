//! `nn.Linear` with its epilogue fused: `y = act(x·Wᵀ + b) + residual`, and the exact GELU.
//!
//! The product is cut into output tiles that rayon runs in parallel, each a single-threaded
//! `gemm` call followed by the bias, activation and residual on the tile while it is still in
//! cache: one pass over the output instead of the three of `matmul`, `broadcast_add`, `gelu`.

use candle_core::{bail, Result, Tensor, D};
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
    let k = x.dim(D::Minus1)?;
    let (n, wk) = weight.dims2()?;
    let mut out_dims = x.dims().to_vec();
    if let Some(last) = out_dims.last_mut() {
        *last = n;
    }
    if wk != k {
        bail!("linear: weight {:?} does not take inputs {:?}", weight.dims(), x.dims());
    }
    if let Some(b) = bias {
        if b.dims() != [n] {
            bail!("linear: bias {:?} must be [{n}] for weight {:?}", b.dims(), weight.dims());
        }
    }
    if let Some(r) = residual {
        if r.dims() != out_dims.as_slice() {
            bail!("linear: residual {:?} must have the output shape {out_dims:?}", r.dims());
        }
    }
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
    let x = x.contiguous()?;
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let xs = cpu_f32(&x)?;
    let ws = cpu_f32(weight)?;
    let bs = bias.as_ref().map(cpu_f32).transpose()?;
    let rs = residual.as_ref().map(cpu_f32).transpose()?;
    let xd = xs.contiguous()?;
    let bd = bs.as_ref().map(|b| b.contiguous()).transpose()?;
    let rd = rs.as_ref().map(|r| r.contiguous()).transpose()?;
    let (w_rs, w_cs) = (weight.stride()[0], weight.stride()[1]);
    let wd = &ws.data()[ws.layout.start_offset()..];

    let mut out = Output::new(m * n);
    // Few rows: dot products on the weight in place (no packing); otherwise gemm tiles, or in
    // bf16 mode tiles of the bf16 product over the input packed once (from one full row block,
    // 8 rows, on: below that the dot products on the f32 weight in place are faster).
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
    let (mc, nc) = match kernel {
        Kernel::Skinny => (m, skinny_cols(n, k)),
        _ => tile_sizes(m, n, k),
    };
    let (tm, tn) = (m.div_ceil(mc), n.div_ceil(nc));
    let dst = out.ptr();
    let task = |t: usize| {
        let (m0, n0) = ((t / tn) * mc, (t % tn) * nc);
        let (mm, nn) = (mc.min(m - m0), nc.min(n - n0));
        // SAFETY: tile (m0.., n0..) of the m×n output is written by this task only (the product
        // writes all of it before the epilogue reads it); the operands are read inside their
        // bounds (x is m×k contiguous, weight n×k with its strides). Each kernel runs only where
        // its CPU check passed (skinny: `available`; bf16: `set_precision` checked the CPU);
        // m0 is a multiple of 16, so of the bf16 row block.
        unsafe {
            let tile = dst.get().add(m0 * n + n0);
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
            for r in 0..mm {
                let row = std::slice::from_raw_parts_mut(tile.add(r * n), nn);
                let res = rd.map(|rd| &rd[(m0 + r) * n + n0..][..nn]);
                epilogue(row, bd.map(|b| &b[n0..n0 + nn]), act == Activation::GeluErf, res);
            }
        }
    };
    if tm * tn == 1 {
        task(0);
    } else {
        (0..tm * tn).into_par_iter().for_each(task);
    }
    drop((xs, ws, bs, rs));
    // SAFETY: the tiles cover the output.
    let out = unsafe { out.assume_init() };
    Tensor::from_vec(out, out_dims, x.device())
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

/// The product of a tile.
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
/// peak, small enough for about four tiles per thread.
fn tile_sizes(m: usize, n: usize, k: usize) -> (usize, usize) {
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
    let round = |v: usize, full: usize| if v >= full { full } else { v.div_ceil(16) * 16 };
    (round(mc, m), round(nc, n))
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
