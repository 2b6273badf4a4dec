//! Matrix products in bf16 with f32 sums: `C = A·Bᵀ` with A and B rounded to bf16 (as torch's
//! `.to(torch.bfloat16)` does, [`to_bf16`]) while they are packed, multiplied by the AVX512-BF16
//! instruction `vdpbf16ps` and summed in f32. Twice the multiply-adds per instruction of the
//! f32 products, for about three significant digits in each operand.
//!
//! Only on x86-64 CPUs with AVX512-BF16 ([`available`]: AMD Zen 4+, Intel Cooper Lake and
//! Sapphire Rapids+). Used by [`crate::fused::linear`] when [`crate::Precision::Bf16`] is set,
//! and by [`crate::fused::linear_bf16`] on a [`PackedWeight`].
//!
//! A is packed once for all of k ([`pack::PackedA`], shared by the tiles of a parallel product);
//! B is packed by slices of [`KC_PAIRS`] k-pairs ([`pack::pack_b`]), and every 32-column panel
//! of a slice (16 KiB, in L1) meets every [`pack::MR`]-row block of A (from L2) in the
//! microkernel ([`kernel`]). A weight used for many products can be packed once instead
//! ([`PackedWeight`], [`matmul_bt_prepacked`]): the same words, so the same results bit for bit.

mod kernel;
mod pack;
mod round;

use std::cell::RefCell;

use candle_core::{bail, Result};

pub(crate) use pack::{PackedA, MR, NR};
pub use pack::PackedWeight;
pub use round::{from_bf16, to_bf16};

/// Fewest rows for which the f32 products of `linear` and the post-norm blocks switch to bf16 in
/// bf16 mode: one row block. Below it (measured: 4 rows) packing costs more than it saves.
pub(crate) const MIN_ROWS: usize = MR;

/// k-pairs per packed slice of B: a 32-column panel of a slice is 128 · 32 words = 16 KiB.
const KC_PAIRS: usize = 128;

/// Whether this CPU runs the bf16 products (x86-64 with AVX-512F and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a `[rows, cols]` matrix at strides `(rs, cs)` lies inside `len` values.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// Whether `c` holds `m` rows of `n` values `ldc` apart that do not overlap.
fn fits_c(c: &[f32], m: usize, n: usize, ldc: usize) -> bool {
    fits(c.len(), m, n, ldc, 1) && (m <= 1 || ldc >= n)
}

/// The k slices of a product with `kp` k-pairs: `(p0, pl)`, [`KC_PAIRS`] pairs each but the last.
/// Every product sums over them in this order, which fixes its rounding.
fn slices(kp: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..kp).step_by(KC_PAIRS).map(move |p0| (p0, KC_PAIRS.min(kp - p0)))
}

/// `c[i·ldc + j] = Σₜ bf16(a[i·lda + t])·bf16(b[j·b_rs + t·b_cs])` for `i < m`, `j < n`,
/// `t < k`, summed in f32 (bf16 subnormals count as zero, as in `vdpbf16ps`). Packs A with
/// rayon; the product runs on the calling thread.
///
/// # Shapes
/// - `a`: `[m, k]` row-major with row stride `lda` (the input rows of `nn.Linear`)
/// - `b`: `[n, k]` with strides `(b_rs, b_cs)` (the `nn.Linear` weight)
/// - `c`: `[m, n]` row-major with row stride `ldc`, overwritten
///
/// Errors when the CPU lacks AVX512-BF16 or an operand is too short for its sizes and strides.
#[allow(clippy::too_many_arguments)]
pub fn matmul_bt(m: usize, n: usize, k: usize, a: &[f32], lda: usize, b: &[f32], b_rs: usize, b_cs: usize, c: &mut [f32], ldc: usize) -> Result<()> {
    if !available() {
        bail!("bf16 matmul: this CPU lacks AVX512-BF16");
    }
    if !fits(a.len(), m, k, lda, 1) || !fits(b.len(), n, k, b_rs, b_cs) || !fits_c(c, m, n, ldc) {
        bail!("bf16 matmul: an operand is out of bounds (m {m}, n {n}, k {k}; a {} at lda {lda}, b {} at strides ({b_rs}, {b_cs}), c {} at ldc {ldc})", a.len(), b.len(), c.len());
    }
    // SAFETY: the CPU has the features (checked above); A was checked to hold its rows.
    let packed = unsafe { PackedA::new(a, m, k, lda) };
    // SAFETY: the CPU has the features (checked above); B and C were checked to hold the given
    // sizes at their strides, C's rows do not overlap, and `c` is borrowed mutably so it
    // aliases neither input.
    unsafe { matmul_packed(&packed, 0, m, n, b.as_ptr(), b_rs, b_cs, c.as_mut_ptr(), ldc, false) };
    Ok(())
}

/// [`matmul_bt`] with the weight packed beforehand ([`PackedWeight::new`]): `c[i·ldc + j] =
/// Σₜ bf16(a[i·lda + t])·bf16(w[j, t])`, bit for bit what [`matmul_bt`] gives on the weight the
/// packed one was made from. Packs A with rayon; the product runs on the calling thread.
///
/// # Shapes
/// - `a`: `[m, k]` row-major with row stride `lda`; `w`: `[n, k]`
/// - `c`: `[m, n]` row-major with row stride `ldc`, overwritten
///
/// Errors when an operand is too short for its sizes and strides.
pub fn matmul_bt_prepacked(m: usize, a: &[f32], lda: usize, w: &PackedWeight, c: &mut [f32], ldc: usize) -> Result<()> {
    let (n, k) = w.shape();
    if !fits(a.len(), m, k, lda, 1) || !fits_c(c, m, n, ldc) {
        bail!("bf16 matmul: an operand is out of bounds (m {m}, n {n}, k {k}; a {} at lda {lda}, c {} at ldc {ldc})", a.len(), c.len());
    }
    // SAFETY: a PackedWeight exists only on a CPU with the features (its constructor checked);
    // A was checked to hold its rows.
    let packed = unsafe { PackedA::new(a, m, k, lda) };
    // SAFETY: as above; A has k values per row like the weight; C was checked to hold m rows of n
    // values that do not overlap, and `c` is borrowed mutably so it aliases neither input.
    unsafe { matmul_prepacked(&packed, 0, m, w, 0, n, c.as_mut_ptr(), ldc, false) };
    Ok(())
}

thread_local! {
    /// The packed B slice of this thread's products.
    static PACKED_B: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// `C = A[row0..row0 + m]·Bᵀ` (or `C += …` when `accumulate`) on the calling thread, with A
/// packed, `B` `[n, k]` at strides `(b_rs, b_cs)` packed here slice by slice, and `c` pointing
/// at `C[row0, 0]`, `m` rows `ldc` apart.
///
/// # Safety
/// [`available`] must be true; `row0` must be a multiple of [`MR`] and `row0 + m` at most A's
/// rows; B must be valid for `b[j·b_rs + t·b_cs]` with `j < n`, `t < k`; C must be valid for `m`
/// rows of `n` values `ldc` apart (`ldc ≥ n` when `m > 1`), written by no one else during the
/// call and overlapping no input.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_packed(a: &PackedA, row0: usize, m: usize, n: usize, b: *const f32, b_rs: usize, b_cs: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    // SAFETY: C holds the m rows (caller's contract).
    if unsafe { without_sums(a.shape().1, m, n, c, ldc, accumulate) } {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    PACKED_B.with_borrow_mut(|packed_b| {
        let k = a.shape().1;
        let words = n.div_ceil(NR) * KC_PAIRS.min(a.kp()) * NR;
        if packed_b.len() < words {
            packed_b.resize(words, 0);
        }
        for (p0, pl) in slices(a.kp()) {
            // SAFETY: B holds n rows of k values (caller's contract), p0 < kp, the buffer was
            // sized above for `pl ≤ KC_PAIRS.min(kp)` pairs; the CPU has the features.
            unsafe { pack::pack_b(b, b_rs, b_cs, n, k, p0, pl, packed_b) };
            // SAFETY: the caller's contract on A's rows and C; the buffer holds the slice's
            // panels of all n columns.
            unsafe { slice_product(a, row0, m, n, p0, pl, packed_b, c, ldc, accumulate) };
        }
    });
}

/// [`matmul_packed`] with B = columns `col0..col0 + n` of a prepacked weight (`C[i, j]` takes
/// weight row `col0 + j`): the same sums in the same order, so the same bits.
///
/// # Safety
/// [`available`] must be true; `row0` must be a multiple of [`MR`] and `row0 + m` at most A's
/// rows; A and the weight must have the same k; `col0` must be a multiple of [`NR`] and
/// `col0 + n` at most the weight's rows; C as for [`matmul_packed`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul_prepacked(a: &PackedA, row0: usize, m: usize, w: &PackedWeight, col0: usize, n: usize, c: *mut f32, ldc: usize, accumulate: bool) {
    debug_assert!(a.shape().1 == w.shape().1 && col0.is_multiple_of(NR) && col0 + n <= w.shape().0);
    // SAFETY: C holds the m rows (caller's contract).
    if unsafe { without_sums(a.shape().1, m, n, c, ldc, accumulate) } {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    for (p0, pl) in slices(a.kp()) {
        // SAFETY: the caller's contract on A's rows and C; the weight's slice from panel
        // col0 / NR on holds `pl` pairs of the panels of columns col0..col0 + n (same k as A).
        unsafe { slice_product(a, row0, m, n, p0, pl, w.slice_from(p0, col0), c, ldc, accumulate) };
    }
}

/// The products with nothing to sum: none for no rows or columns, or for k = 0 when
/// accumulating; zeros in C for k = 0 otherwise. Returns whether the product was one of them.
///
/// # Safety
/// C must be valid for `m` rows of `n` values `ldc` apart, written by no one else.
unsafe fn without_sums(k: usize, m: usize, n: usize, c: *mut f32, ldc: usize, accumulate: bool) -> bool {
    if m == 0 || n == 0 || (k == 0 && accumulate) {
        return true;
    }
    if k == 0 {
        for i in 0..m {
            // SAFETY: row i of C (caller's contract).
            unsafe { std::slice::from_raw_parts_mut(c.add(i * ldc), n).fill(0.0) };
        }
        return true;
    }
    false
}

/// The k-pairs `p0..p0 + pl` of a product: every panel of the packed slice `panels` (the
/// `n.div_ceil(NR)` panels of `pl` pairs of B's columns `0..n`) against every row block of A's
/// rows `row0..row0 + m`, written to C (`c` at `C[row0, 0]`, rows `ldc` apart) for the first
/// slice of a product that does not accumulate, added to it otherwise.
///
/// # Safety
/// [`available`] must be true; `row0` a multiple of [`MR`], `row0 + m` at most A's rows,
/// `p0 + pl ≤ kp`; `panels` must hold the `n.div_ceil(NR)` panels; C as for [`matmul_packed`].
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn slice_product(a: &PackedA, row0: usize, m: usize, n: usize, p0: usize, pl: usize, panels: &[u32], c: *mut f32, ldc: usize, accumulate: bool) {
    for panel in 0..n.div_ceil(NR) {
        let cols = (n - panel * NR).min(NR);
        let bp = panels[panel * pl * NR..][..pl * NR].as_ptr();
        for i in (0..m).step_by(MR) {
            let ap = a.block((row0 + i) / MR)[p0 * MR..].as_ptr();
            // SAFETY: the block and the panel hold `pl` packed pairs from `p0`; the C tile lies
            // inside C (caller's contract); the CPU has the features.
            unsafe { rows_tile((m - i).min(MR), pl, ap, bp, c.add(i * ldc + panel * NR), ldc, cols, accumulate || p0 > 0) };
        }
    }
}

/// The first `rows ≤ MR` rows of a packed block against a panel: one full-height microkernel,
/// or for a last, shorter block a few shorter ones (4, 2, 1 rows).
///
/// # Safety
/// As [`kernel::tile`] for `rows` rows.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_tile(rows: usize, pl: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, cols: usize, acc: bool) {
    if rows == MR {
        return kernel::tile::<MR>(pl, a, b, c, ldc, cols, acc);
    }
    let mut r = 0;
    while r < rows {
        let (a, c) = (a.add(r), c.add(r * ldc));
        r += match rows - r {
            n if n >= 4 => {
                kernel::tile::<4>(pl, a, b, c, ldc, cols, acc);
                4
            }
            n if n >= 2 => {
                kernel::tile::<2>(pl, a, b, c, ldc, cols, acc);
                2
            }
            _ => {
                kernel::tile::<1>(pl, a, b, c, ldc, cols, acc);
                1
            }
        };
    }
}
