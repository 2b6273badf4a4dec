//! A bounds-checked front to the `gemm` crate (the GEMM candle's CPU backend uses), for the ops
//! that fuse work around a matrix product: a bias pre-filled into the destination, the taps of
//! a convolution accumulated into one output, strided operands read in place; and, for the
//! products of `nn.Linear` layers, the bf16 product in bf16 mode ([`matmul_serial_linear`]).

use candle_core::{bail, DType, Result, WithDType};

use crate::bf16;
use crate::precision::{precision, Precision};

/// A read-only strided matrix view: element `(i, j)` is `data[i·rs + j·cs]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<T> MatRef<'_, T> {
    /// Whether every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// Threads for one product: candle's setting (`RAYON_NUM_THREADS` or the available cores).
fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst = dst + lhs · rhs` (`accumulate`) or `dst = lhs · rhs`, with `dst` row-major
/// `[lhs.rows, rhs.cols]` at row stride `dst_rs`. Only f32 and f64 are supported.
pub(crate) fn matmul<T: WithDType>(dst: &mut [T], dst_rs: usize, lhs: MatRef<T>, rhs: MatRef<T>, accumulate: bool) -> Result<()> {
    matmul_with(dst, dst_rs, lhs, rhs, accumulate, parallelism())
}

/// [`matmul`] on the calling thread only, for callers that parallelise over blocks themselves.
pub(crate) fn matmul_serial<T: WithDType>(dst: &mut [T], dst_rs: usize, lhs: MatRef<T>, rhs: MatRef<T>, accumulate: bool) -> Result<()> {
    matmul_with(dst, dst_rs, lhs, rhs, accumulate, gemm::Parallelism::None)
}

/// [`matmul_serial`] for the products of `nn.Linear` layers (`rhs` = a weight's transpose): in
/// bf16 mode ([`crate::Precision::Bf16`]) f32 products of at least [`bf16::MIN_ROWS`] rows with
/// a unit-stride `lhs` round both operands to bf16 and sum in f32 ([`bf16`]); f32 otherwise.
pub(crate) fn matmul_serial_linear<T: WithDType>(dst: &mut [T], dst_rs: usize, lhs: MatRef<T>, rhs: MatRef<T>, accumulate: bool) -> Result<()> {
    let bf16 = precision() == Precision::Bf16 && T::DTYPE == DType::F32 && lhs.rows >= bf16::MIN_ROWS && lhs.cs == 1;
    if !bf16 {
        return matmul_serial(dst, dst_rs, lhs, rhs, accumulate);
    }
    check(dst, dst_rs, &lhs, &rhs)?;
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    // SAFETY: T is f32 (checked above), so the slices are f32 slices of the same length.
    let (a, b, c) = unsafe {
        (
            std::slice::from_raw_parts(lhs.data.as_ptr().cast::<f32>(), lhs.data.len()),
            std::slice::from_raw_parts(rhs.data.as_ptr().cast::<f32>(), rhs.data.len()),
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
        )
    };
    // SAFETY: `set_precision` let Bf16 through only on a CPU with AVX512-BF16; `check` put the
    // rows of lhs (unit column stride), rhs and dst inside their slices, dst's rows apart; dst
    // is borrowed mutably, so it aliases no input. B = rhsᵀ: B[j, t] = rhs[t, j].
    unsafe {
        let packed = bf16::PackedA::new(a, m, k, lhs.rs);
        bf16::matmul_packed(&packed, 0, m, n, b.as_ptr(), rhs.cs, rhs.rs, c.as_mut_ptr(), dst_rs, accumulate);
    }
    Ok(())
}

/// [`matmul_serial_linear`] with the weight packed beforehand (`rhs` = `w`ᵀ, [`bf16::PackedWeight`]):
/// the bf16 product whatever the precision and the row count, bit for bit what
/// [`matmul_serial_linear`] gives in bf16 mode on the weight `w` was made from. f32 only, with a
/// unit-stride `lhs`; errors otherwise or when an operand is out of bounds.
pub(crate) fn matmul_serial_prepacked<T: WithDType>(dst: &mut [T], dst_rs: usize, lhs: MatRef<T>, w: &bf16::PackedWeight, accumulate: bool) -> Result<()> {
    let (n, k) = w.shape();
    if T::DTYPE != DType::F32 || lhs.cs != 1 {
        bail!("cpu gemm: a bf16 packed weight takes an f32 lhs with unit column stride, got {:?} at column stride {}", T::DTYPE, lhs.cs);
    }
    // The packed weight is `rhs` = `[k, n]`, inside its words by construction.
    check_shapes(dst, dst_rs, &lhs, (k, n), true)?;
    let m = lhs.rows;
    // SAFETY: T is f32 (checked above), so the slices are f32 slices of the same length.
    let (a, c) = unsafe {
        (
            std::slice::from_raw_parts(lhs.data.as_ptr().cast::<f32>(), lhs.data.len()),
            std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
        )
    };
    // SAFETY: a PackedWeight exists only on a CPU with AVX512-BF16 (its constructor checked);
    // the rows of lhs (unit column stride, k values as the weight) and of dst lie inside their
    // slices (checked above), dst's rows apart; dst is borrowed mutably, so it aliases no input.
    unsafe {
        let packed = bf16::PackedA::new(a, m, k, lhs.rs);
        bf16::matmul_prepacked(&packed, 0, m, w, 0, n, c.as_mut_ptr(), dst_rs, accumulate);
    }
    Ok(())
}

/// Errors unless `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` chains and every operand lies inside
/// its slice (`dst` rows `dst_rs` apart, not overlapping).
fn check<T>(dst: &[T], dst_rs: usize, lhs: &MatRef<T>, rhs: &MatRef<T>) -> Result<()> {
    check_shapes(dst, dst_rs, lhs, (rhs.rows, rhs.cols), rhs.in_bounds())
}

/// [`check`] for a `rhs` of shape `(rows, cols)` whose own bounds check gave `rhs_in_bounds`.
fn check_shapes<T>(dst: &[T], dst_rs: usize, lhs: &MatRef<T>, (rhs_rows, n): (usize, usize), rhs_in_bounds: bool) -> Result<()> {
    let (m, k) = (lhs.rows, lhs.cols);
    if rhs_rows != k {
        bail!("cpu gemm: [{m}, {k}] · [{rhs_rows}, {n}] do not chain");
    }
    let dst_ok = m == 0 || n == 0 || ((m - 1) * dst_rs + n <= dst.len() && (m == 1 || dst_rs >= n));
    if !lhs.in_bounds() || !rhs_in_bounds || !dst_ok {
        bail!("cpu gemm: operand out of bounds (m {m}, n {n}, k {k}, dst {} at row stride {dst_rs})", dst.len());
    }
    Ok(())
}

fn matmul_with<T: WithDType>(
    dst: &mut [T],
    dst_rs: usize,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    accumulate: bool,
    threads: gemm::Parallelism,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if !matches!(T::DTYPE, DType::F32 | DType::F64) {
        bail!("cpu gemm: unsupported dtype {:?}", T::DTYPE);
    }
    check(dst, dst_rs, &lhs, &rhs)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[i * dst_rs..i * dst_rs + n].fill(T::from_f64(0.0));
            }
        }
        return Ok(());
    }
    // SAFETY: all three operands were checked above to lie inside their slices for the given
    // sizes and strides; the destination rows do not overlap (dst_rs ≥ n) and `dst` is borrowed
    // mutably, so no operand aliases it. T is f32 or f64, which `gemm` supports.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            T::from_f64(1.0),
            T::from_f64(1.0),
            false,
            false,
            false,
            threads,
        );
    }
    Ok(())
}
