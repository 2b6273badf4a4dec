//! f32 → bf16 rounding, round to nearest with ties to even: the bits of torch's
//! `x.to(torch.bfloat16)` on the CPU (c10's `round_to_nearest_even`). Subnormals keep their
//! rounded value (no flush to zero), infinities stay infinite, finite values past the largest
//! bf16 round to infinity, and every NaN becomes the quiet NaN `0x7FC0`.

/// The bf16 quiet NaN every NaN rounds to.
pub const NAN: u16 = 0x7FC0;

/// The bits of `x` rounded to bf16 (see the module docs).
pub fn to_bf16(x: f32) -> u16 {
    if x.is_nan() {
        return NAN;
    }
    let u = x.to_bits();
    // Adding 0x7FFF plus the lowest kept bit rounds the 16 dropped bits to nearest, ties to the
    // even result; the carry may run into the exponent, which is exactly the rounding up to the
    // next binade (or to infinity). No overflow: the largest non-NaN pattern is 0xFF80_0000.
    ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits `b` (exact).
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// [`to_bf16`] of 16 lanes, each result in the low half of its 32-bit lane.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn round16(v: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let u = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(u), _mm512_set1_epi32(1));
    let r = _mm512_srli_epi32::<16>(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)));
    let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_blend_epi32(is_nan, r, _mm512_set1_epi32(NAN as i32))
}

/// 32 consecutive values (`lo` then `hi`) rounded to bf16 and paired along k: lane `p` holds
/// values `2p` (low half) and `2p + 1` (high half).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn pairs32(lo: std::arch::x86_64::__m512, hi: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lo = _mm512_cvtepi32_epi16(round16(lo));
    let hi = _mm512_cvtepi32_epi16(round16(hi));
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}
