//! The bf16 microkernel: `R` rows × [`NR`] = 32 columns of C from packed bf16 pairs
//! ([`super::pack`]), `vdpbf16ps` accumulating in f32 (two multiply-adds per f32 lane per
//! instruction). Each k-pair broadcasts one 32-bit word of A per row against two 512-bit words
//! of B; the `2·R` sums stay in registers for the whole k slice.

#[cfg(target_arch = "x86_64")]
use super::pack::{MR, NR};

/// `C[r, c] (+)= Σₚ A[r, p]·B[p, c]` over `pl` k-pairs for `r < R`, `c < cols ≤ NR`: `a` points
/// at row 0 of a packed A block (rows [`MR`] words apart per pair), `b` at a packed B panel, `c`
/// at the tile's first value (rows `ldc` apart). `accumulate` adds to C, else C is overwritten.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; `a` must be valid for `pl·MR` words (rows past
/// `R` unread), `b` for `pl·NR` words, and C for `R` rows of `cols` values.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn tile<const R: usize>(pl: usize, a: *const u32, b: *const u32, c: *mut f32, ldc: usize, cols: usize, accumulate: bool) {
    use std::arch::x86_64::*;
    // The bf16 vector type is a bit-cast of the packed integer words.
    let bh = |v: __m512i| -> __m512bh {
        // SAFETY: both are 512-bit plain-data vectors; every bit pattern is valid for both.
        unsafe { std::mem::transmute(v) }
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for p in 0..pl {
        let b0 = bh(_mm512_loadu_si512(b.add(p * NR).cast()));
        let b1 = bh(_mm512_loadu_si512(b.add(p * NR + 16).cast()));
        for r in 0..R {
            let av = bh(_mm512_set1_epi32(*a.add(p * MR + r) as i32));
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], av, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], av, b1);
        }
    }
    let mask = |from: usize| -> __mmask16 {
        let n = cols.saturating_sub(from).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let masks = [mask(0), mask(16)];
    for r in 0..R {
        let row = c.add(r * ldc);
        for h in 0..2 {
            let dst = row.add(16 * h);
            let v = if accumulate { _mm512_add_ps(acc[r][h], _mm512_maskz_loadu_ps(masks[h], dst)) } else { acc[r][h] };
            _mm512_mask_storeu_ps(dst, masks[h], v);
        }
    }
}
