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
