//! Products with few rows (`x·Wᵀ` for `M ≤ 32` tokens, e.g. BEiT-3's text tokens). With so few
//! rows the weight is read from memory for little arithmetic, and `gemm` would also repack it;
//! here each output is a dot product of an input row and a weight row, both read in place, four
//! weight rows by five input rows at a time in AVX-512 registers, with the next weight rows
//! prefetched.

/// Most rows [`skinny_gemm`] takes.
pub const MAX_ROWS: usize = 32;

/// Input rows per register block.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 5;
/// Weight rows per register block (with [`ROWS`]: 20 accumulators).
#[cfg(target_arch = "x86_64")]
const WEIGHT_ROWS: usize = 4;

/// Whether [`skinny_gemm`] can run here (the CPU has AVX-512).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx512()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[i, j] = Σₖ x[i, k]·w[j, k]` for `i < m`, `j < n`: `x` rows `ldx` apart, `w` rows `ldw`
/// apart (unit stride along `k`), `out` rows `ldo` apart.
///
/// # Safety
/// The CPU must have AVX-512 ([`available`]); the three matrices must be valid for those sizes
/// and strides, and `out` must not overlap the inputs.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
pub unsafe fn skinny_gemm(
    m: usize,
    n: usize,
    k: usize,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    out: *mut f32,
    ldo: usize,
) {
    // Weight blocks outside, row blocks inside: the block's weight rows stay in L1.
    let mut j = 0;
    while j < n {
        let nb = (n - j).min(WEIGHT_ROWS);
        let wj = w.add(j * ldw);
        let next = (j + WEIGHT_ROWS < n).then(|| w.add((j + WEIGHT_ROWS) * ldw));
        let mut i = 0;
        while i < m {
            let mb = (m - i).min(ROWS);
            let (xi, oi) = (x.add(i * ldx), out.add(i * ldo + j));
            // The first row block prefetches the next weight block.
            let pf = if i == 0 { next } else { None };
            match mb {
                1 => block::<1>(nb, k, xi, ldx, wj, ldw, oi, ldo, pf),
                2 => block::<2>(nb, k, xi, ldx, wj, ldw, oi, ldo, pf),
                3 => block::<3>(nb, k, xi, ldx, wj, ldw, oi, ldo, pf),
                4 => block::<4>(nb, k, xi, ldx, wj, ldw, oi, ldo, pf),
                _ => block::<ROWS>(nb, k, xi, ldx, wj, ldw, oi, ldo, pf),
            }
            i += mb;
        }
        j += nb;
    }
}

/// `R` input rows against `nb ≤ WEIGHT_ROWS` weight rows.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn block<const R: usize>(
    nb: usize,
    k: usize,
    x: *const f32,
    ldx: usize,
    w: *const f32,
    ldw: usize,
    out: *mut f32,
    ldo: usize,
    prefetch: Option<*const f32>,
) {
    use std::arch::x86_64::*;
    let full = k / 16;
    let tail_mask = ((1u32 << (k % 16)) - 1) as __mmask16;
    // Missing weight rows repeat the last one; their sums are not stored.
    let wr: [*const f32; WEIGHT_ROWS] = std::array::from_fn(|q| w.add(q.min(nb - 1) * ldw));
    let mut acc = [[_mm512_setzero_ps(); R]; WEIGHT_ROWS];
    for c in 0..full {
        if let Some(p) = prefetch {
            for q in 0..WEIGHT_ROWS {
                _mm_prefetch::<_MM_HINT_T0>(p.add(q * ldw + c * 16) as *const i8);
            }
        }
        let wv: [__m512; WEIGHT_ROWS] = std::array::from_fn(|q| _mm512_loadu_ps(wr[q].add(c * 16)));
        for r in 0..R {
            let xv = _mm512_loadu_ps(x.add(r * ldx + c * 16));
            for q in 0..WEIGHT_ROWS {
                acc[q][r] = _mm512_fmadd_ps(xv, wv[q], acc[q][r]);
            }
        }
    }
    if tail_mask != 0 {
        let off = full * 16;
        let wv: [__m512; WEIGHT_ROWS] = std::array::from_fn(|q| _mm512_maskz_loadu_ps(tail_mask, wr[q].add(off)));
        for r in 0..R {
            let xv = _mm512_maskz_loadu_ps(tail_mask, x.add(r * ldx + off));
            for q in 0..WEIGHT_ROWS {
                acc[q][r] = _mm512_fmadd_ps(xv, wv[q], acc[q][r]);
            }
        }
    }
    for r in 0..R {
        for q in 0..nb {
            *out.add(r * ldo + q) = _mm512_reduce_add_ps(acc[q][r]);
        }
    }
}
