//! Packing f32 operands into the bf16 layout of the microkernel ([`super::kernel`]), rounding
//! each value once to nearest even by the AVX512-BF16 conversion: the bits of [`to_bf16`]
//! except for f32 subnormals, which it flushes to zero and which the products count as zero
//! anyway (strided B, rare, goes through [`to_bf16`]). Rows are loaded 16 at a time and
//! transposed in registers.
//!
//! `vdpbf16ps` multiplies pairs of bf16 along k, so both operands are stored as 32-bit words
//! `(x[2p], x[2p+1])` (low half, high half) for each k-pair `p`; an odd k gets a zero partner.
//! - A ([`PackedA`], all of k at once): blocks of [`MR`] rows, each `[kp][MR]` words (the rows
//!   of one pair side by side, read by broadcast); rows past `m` are zero.
//! - B (`[n, k]`, the `nn.Linear` weight layout; k-pairs `p0..p0 + pl` at a time, [`pack_b`]):
//!   panels of [`NR`] columns, each `[pl][NR]` words (one pair of 32 columns = two 512-bit
//!   registers); columns past `n` are zero.
//! - A weight packed once ([`PackedWeight`]): every slice of B as [`pack_b`] writes it, one
//!   after another.

use rayon::prelude::*;

use candle_core::{bail, Result};

use super::round::to_bf16;
use super::{available, fits, KC_PAIRS};

/// Rows of A per packed block: the microkernel's rows.
pub(crate) const MR: usize = 8;
/// Columns of B per packed panel: two AVX-512 registers of f32 sums.
pub(crate) const NR: usize = 32;

// `pack_a_blocks` fills two blocks from the 16 lanes of one transposed register.
const _: () = assert!(2 * MR == 16);

/// The word of k-pair `p` of a row: `row[2p]` and `row[2p + 1]` (zero past the row's end), for
/// strided operands.
fn pair_word(row: &[f32], p: usize) -> u32 {
    let lo = to_bf16(row[2 * p]) as u32;
    let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
    lo | hi << 16
}

/// A `[m, k]` matrix rounded to bf16 and packed for the microkernel (see the module docs).
pub(crate) struct PackedA {
    words: Vec<u32>,
    /// Rows and values per row of A.
    m: usize,
    k: usize,
    /// k-pairs, `k.div_ceil(2)`.
    kp: usize,
}

impl PackedA {
    /// Packs the `m` rows of `a` (row `i` is `a[i·lda..][..k]`), one task per two blocks of
    /// rows ([`pack_a_blocks`]).
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX512-BF16; `a` must hold the rows (`m = 0` or
    /// `(m - 1)·lda + k ≤ a.len()`).
    pub(crate) unsafe fn new(a: &[f32], m: usize, k: usize, lda: usize) -> Self {
        let kp = k.div_ceil(2);
        let mut words = vec![0u32; m.div_ceil(MR) * kp * MR];
        if kp > 0 {
            words.par_chunks_mut(2 * kp * MR).enumerate().for_each(|(t, blocks)| {
                let i0 = 2 * t * MR;
                // SAFETY: rows i0.. of A exist (caller's contract, i0 < m); the chunk holds one
                // or two blocks of kp pairs; the CPU has the features.
                unsafe { pack_a_blocks(a[i0 * lda..].as_ptr(), lda, (m - i0).min(2 * MR), k, blocks) };
            });
        }
        Self { words, m, k, kp }
    }

    /// `(m, k)`: the shape of A.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// k-pairs per row.
    pub(crate) fn kp(&self) -> usize {
        self.kp
    }

    /// Packed block `blk` (rows `blk·MR..`): `[kp][MR]` words.
    pub(crate) fn block(&self, blk: usize) -> &[u32] {
        &self.words[blk * self.kp * MR..][..self.kp * MR]
    }
}

/// A `[n, k]` weight (the `nn.Linear` layout) rounded to bf16 and packed once for every product
/// with it: the slices of [`KC_PAIRS`] k-pairs one after another (slice `s` from word
/// `s·KC_PAIRS·NR·n.div_ceil(NR)` on), each exactly as [`pack_b`] writes it for a product that
/// packs B on every call, so both give the same words. About 2 bytes per weight value (plus
/// the zero padding to 32 columns and to an even k).
pub struct PackedWeight {
    words: Vec<u32>,
    /// Rows (output features) and values per row (input features) of the weight.
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Rounds and packs the `n` rows of `w` (`w[j, t]` at `w[j·rs + t·cs]`, `k` values per row),
    /// one rayon task per k slice.
    ///
    /// Errors when the CPU lacks AVX512-BF16 or `w` is too short for its sizes and strides.
    pub fn new(w: &[f32], n: usize, k: usize, rs: usize, cs: usize) -> Result<Self> {
        if !available() {
            bail!("bf16 packed weight: this CPU lacks AVX512-BF16");
        }
        if !fits(w.len(), n, k, rs, cs) {
            bail!("bf16 packed weight: [{n}, {k}] at strides ({rs}, {cs}) is out of bounds of {} values", w.len());
        }
        // Words of one k-pair across all panels.
        let pair_words = n.div_ceil(NR) * NR;
        let mut words = vec![0u32; k.div_ceil(2) * pair_words];
        if !words.is_empty() {
            words.par_chunks_mut(KC_PAIRS * pair_words).enumerate().for_each(|(s, slice)| {
                // SAFETY: the CPU has the features and w holds the n rows at their strides
                // (both checked above); slice s starts at pair s·KC_PAIRS < kp and the chunk
                // holds its `pl = len / pair_words` pairs of every panel.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    pack_b(w.as_ptr(), rs, cs, n, k, s * KC_PAIRS, slice.len() / pair_words, slice)
                };
            });
        }
        Ok(Self { words, n, k })
    }

    /// `(n, k)`: the shape of the weight.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The packed slice of k-pairs `p0..` (a start of [`super::slices`]) from column `col0` (a multiple
    /// of [`NR`], below `n`) on: its panels `col0 / NR..`, `[pl][NR]` words each.
    pub(crate) fn slice_from(&self, p0: usize, col0: usize) -> &[u32] {
        let panels = self.n.div_ceil(NR);
        let pl = KC_PAIRS.min(self.k.div_ceil(2) - p0);
        debug_assert!(p0.is_multiple_of(KC_PAIRS) && col0.is_multiple_of(NR) && col0 < self.n);
        &self.words[panels * p0 * NR..][..panels * pl * NR][col0 / NR * pl * NR..]
    }
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight {{ n: {}, k: {}, bf16 }}", self.n, self.k)
    }
}

/// Packs `rows ≤ 2·MR` rows of A (`lda` apart, `k` values each) into one or two packed blocks
/// (`blocks`: `kp·MR` or `2·kp·MR` words); rows past `rows` are zero.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; the rows must be valid for `k` reads; `blocks`
/// must hold the second block if `rows > MR`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_a_blocks(a: *const f32, lda: usize, rows: usize, k: usize, blocks: &mut [u32]) {
    use std::arch::x86_64::*;
    let kp = k.div_ceil(2);
    let (first, second) = blocks.split_at_mut(kp * MR);
    for q0 in (0..kp).step_by(16) {
        let cols = load_pairs16(a, lda, rows, k, q0);
        // Pair q0 + q of the first block's rows is lanes 0..8, of the second block's 8..16.
        for (q, col) in cols.iter().enumerate().take(kp - q0) {
            _mm256_storeu_si256(first[(q0 + q) * MR..][..MR].as_mut_ptr().cast(), _mm512_castsi512_si256(*col));
            if !second.is_empty() {
                _mm256_storeu_si256(second[(q0 + q) * MR..][..MR].as_mut_ptr().cast(), _mm512_extracti64x4_epi64::<1>(*col));
            }
        }
    }
}

/// Packs k-pairs `p0..p0 + pl` of the `n` rows of `b` (`b[j, t]` at `b + j·b_rs + t·b_cs`, `k`
/// values per row) into `dst[..n.div_ceil(NR)·pl·NR]` (see the module docs).
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; B must hold those rows; `2·p0 < k`, `2·(p0 + pl) ≤ k + 1`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn pack_b(b: *const f32, b_rs: usize, b_cs: usize, n: usize, k: usize, p0: usize, pl: usize, dst: &mut [u32]) {
    let klen = (2 * pl).min(k - 2 * p0);
    for panel in 0..n.div_ceil(NR) {
        let words = &mut dst[panel * pl * NR..][..pl * NR];
        for g in (0..NR).step_by(16) {
            let j0 = panel * NR + g;
            let rows = n.saturating_sub(j0).min(16);
            let first = b.add(j0.min(n - 1) * b_rs + 2 * p0 * b_cs);
            if b_cs == 1 {
                // SAFETY: rows j0..j0 + rows and values 2·p0.. of `klen` lie inside B.
                unsafe { transpose_rows(first, b_rs, rows, klen, &mut words[g..]) };
                continue;
            }
            for c in 0..16 {
                let row: Vec<f32> = if c < rows { (0..klen).map(|t| *first.add(c * b_rs + t * b_cs)).collect() } else { Vec::new() };
                for (p, w) in words[g + c..].iter_mut().step_by(NR).enumerate() {
                    *w = if row.is_empty() { 0 } else { pair_word(&row, p) };
                }
            }
        }
    }
}

/// Writes the pair words of `rows ≤ 16` contiguous rows of `klen` values (`b_rs` apart) as 16
/// columns: pair `p` of row `c` goes to `dst[p·NR + c]`; missing rows give zero columns.
///
/// # Safety
/// As [`load_pairs16`] for every `q0 < klen.div_ceil(2)`;
/// `dst.len() ≥ (klen.div_ceil(2) - 1)·NR + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn transpose_rows(b: *const f32, b_rs: usize, rows: usize, klen: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let pl = klen.div_ceil(2);
    for q0 in (0..pl).step_by(16) {
        let cols = load_pairs16(b, b_rs, rows, klen, q0);
        for (q, col) in cols.iter().enumerate().take(pl - q0) {
            _mm512_storeu_si512(dst[(q0 + q) * NR..][..16].as_mut_ptr().cast(), *col);
        }
    }
}

/// Pairs `q0..q0 + 16` of `rows ≤ 16` rows of `len` values (`rs` apart) rounded to bf16, as
/// columns: lane `c` of `out[q]` is the word of pair `q0 + q` of row `c` (zero past a row's end
/// and for missing rows).
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16; rows `0..rows` at `src + c·rs` must be valid for
/// `len` reads; `2·q0 < len`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn load_pairs16(src: *const f32, rs: usize, rows: usize, len: usize, q0: usize) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    let mask = |from: usize| -> __mmask16 { ((1u32 << len.saturating_sub(from).min(16)) - 1) as __mmask16 };
    let (m0, m1) = (mask(2 * q0), mask(2 * q0 + 16));
    let mut r = [_mm512_setzero_si512(); 16];
    for (c, rc) in r.iter_mut().enumerate().take(rows) {
        let p = src.add(c * rs + 2 * q0);
        // Masked loads: values past the row's end read as zero (the odd-k partner too) and are
        // not accessed, so the second half may point past the row.
        let (lo, hi) = (_mm512_maskz_loadu_ps(m0, p), _mm512_maskz_loadu_ps(m1, p.wrapping_add(16)));
        // Round to nearest even, values 2p and 2p + 1 into word p (`lo` fills the low half).
        // Unlike `to_bf16` the instruction flushes f32 subnormals to zero, which changes no
        // product: `vdpbf16ps` counts bf16 subnormals as zero.
        *rc = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    transpose16(r)
}

/// Transposes 16 rows of 16 32-bit words: `out[j]` lane `i` = `r[i]` lane `j`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    // Within each 128-bit lane ℓ: interleave words, then word pairs, so that t[4i + c] lane ℓ
    // holds column 4ℓ + c of rows 4i..4i + 4.
    let mut a = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..4 {
        t[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        t[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        t[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        t[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    // Then gather lane ℓ of t[c], t[4 + c], t[8 + c], t[12 + c] into column 4ℓ + c.
    let mut out = [_mm512_setzero_si512(); 16];
    for c in 0..4 {
        let s0 = _mm512_shuffle_i32x4::<0x88>(t[c], t[4 + c]);
        let s1 = _mm512_shuffle_i32x4::<0xDD>(t[c], t[4 + c]);
        let s2 = _mm512_shuffle_i32x4::<0x88>(t[8 + c], t[12 + c]);
        let s3 = _mm512_shuffle_i32x4::<0xDD>(t[8 + c], t[12 + c]);
        out[c] = _mm512_shuffle_i32x4::<0x88>(s0, s2);
        out[4 + c] = _mm512_shuffle_i32x4::<0x88>(s1, s3);
        out[8 + c] = _mm512_shuffle_i32x4::<0xDD>(s0, s2);
        out[12 + c] = _mm512_shuffle_i32x4::<0xDD>(s1, s3);
    }
    out
}
