//! Vectorisable scalar math for the fused kernels, and the CPU-feature dispatch that compiles
//! each kernel body three times (AVX-512, AVX2 + FMA, baseline) and picks one at run time.
//!
//! The functions here are branch-free and written with `mul_add`, bit casts and selects only, so
//! LLVM vectorises the loops that call them. Reductions keep [`LANES`] independent partial sums
//! (an elementwise loop LLVM can vectorise without reassociating), so every instruction set adds
//! in the same order and gives the same result.

/// Width of the lane-wise partial sums of [`sum`] and [`max`].
pub const LANES: usize = 16;

/// Defines `$vis fn $name(args) -> ret` whose body is compiled for AVX-512, for AVX2 + FMA and
/// for the baseline target; the best one this CPU supports runs. The body must not be generic.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt,f16c")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::fused::simd::has_avx512() {
                    // SAFETY: the CPU supports every feature `v4` was compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if $crate::fused::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports every feature `v3` was compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Instruction-set level of this CPU: 0 unknown yet, 1 baseline, 2 AVX2 + FMA, 3 AVX-512.
#[cfg(target_arch = "x86_64")]
static LEVEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

#[cfg(target_arch = "x86_64")]
fn level() -> u8 {
    use std::arch::is_x86_feature_detected as has;
    use std::sync::atomic::Ordering;
    let l = LEVEL.load(Ordering::Relaxed);
    if l != 0 {
        return l;
    }
    let v3 =
        has!("avx2") && has!("fma") && has!("bmi1") && has!("bmi2") && has!("lzcnt") && has!("popcnt") && has!("f16c");
    let v4 = v3 && has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512dq");
    let l = if v4 {
        3
    } else if v3 {
        2
    } else {
        1
    };
    LEVEL.store(l, Ordering::Relaxed);
    l
}

/// Whether this CPU runs the AVX-512 bodies (F, VL, BW, DQ plus the AVX2 set).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    level() == 3
}

/// Whether this CPU runs the AVX2 + FMA bodies.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2_fma() -> bool {
    level() >= 2
}

/// `eˣ` in f32, within 2 ulp of the exact value for normal results. Results below the smallest
/// normal (`x < −87.3`) are flushed to 0, `−∞` gives 0, NaN gives NaN.
///
/// `x = n·ln2 + r` with `|r| ≤ ln2/2`; `eʳ = 1 + r + r²·P(r)` with a degree-4 minimax `P`
/// (relative error 3·10⁻⁹), and `2ⁿ` is built in the exponent bits.
#[inline(always)]
#[allow(clippy::excessive_precision)] // fitted coefficients, kept as printed by the fit
pub fn exp(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds to an integer, which then sits in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_375; // exact in 10 bits, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 5] = [0.499_999_934_5, 0.166_665_206_8, 0.041_668_387_49, 0.008_368_710_657, 0.001_381_460_862];
    // Clamp to the range where 2ⁿ is representable (n ∈ [−127, 127]); NaN passes through.
    let x = if x < -88.0 { -88.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let t = x.mul_add(std::f32::consts::LOG2_E, SHIFTER);
    let n = t - SHIFTER;
    let r = (-n).mul_add(LN2_HI, x);
    let r = (-n).mul_add(LN2_LO, r);
    let p = P[4].mul_add(r, P[3]).mul_add(r, P[2]).mul_add(r, P[1]).mul_add(r, P[0]);
    let y = (r * r).mul_add(p, r) + 1.0;
    // n + 127 in the exponent field; n = −127 gives the bit pattern of 0.0.
    let bits = t.to_bits().wrapping_sub(SHIFTER.to_bits()).wrapping_add(127) << 23;
    y * f32::from_bits(bits)
}

/// `GELU(x) = x·Φ(x)` with the exact normal CDF (`torch.nn.GELU()`, `approximate='none'`), within
/// about 2·10⁻⁷·|x| of the exact value.
///
/// `Φ(x) = 1 − ½·erfc(a)` for `x ≥ 0` and `½·erfc(a)` for `x < 0`, `a = |x|/√2`, with
/// `erfc(a) = t·P(t)·e^(−a²)`, `t = 1/(1 + a/2)`, `P` a degree-10 least-squares fit over all
/// `a ≥ 0` (error 5·10⁻⁹). The negative tail keeps its relative accuracy (no `1 + erf` cancellation).
#[inline(always)]
#[allow(clippy::excessive_precision)] // fitted coefficients, kept as printed by the fit
pub fn gelu_erf(x: f32) -> f32 {
    const P: [f32; 11] = [
        0.282_094_795_7,
        0.282_093_772_6,
        0.246_882_578,
        0.175_354_392,
        0.093_137_906_18,
        -0.057_732_175_89,
        0.128_218_023_7,
        -0.448_572_811_4,
        0.487_550_815_8,
        -0.231_513_394_3,
        0.042_486_087_22,
    ];
    let a = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 2.0 / (2.0 + a);
    let mut p = P[10];
    for &c in P[..10].iter().rev() {
        p = p.mul_add(t, c);
    }
    let e = 0.5 * t * p * exp(-(a * a)); // ½·erfc(a)
    let phi = if x >= 0.0 { 1.0 - e } else { e };
    x * phi
}

/// `Σ xᵢ` over [`LANES`] partial sums (same order on every instruction set).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] += x;
    }
    reduce_sum(acc)
}

/// `Σ (xᵢ − m)²` over [`LANES`] partial sums.
#[inline(always)]
pub fn sum_sq_dev(xs: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            let d = c[l] - m;
            acc[l] = d.mul_add(d, acc[l]);
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        let d = x - m;
        acc[l] = d.mul_add(d, acc[l]);
    }
    reduce_sum(acc)
}

/// `max xᵢ` (−∞ for an empty slice; NaNs are ignored unless every element is NaN).
#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    for (l, &x) in chunks.remainder().iter().enumerate() {
        acc[l] = if x > acc[l] { x } else { acc[l] };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Pairwise sum of the lanes.
#[inline(always)]
fn reduce_sum(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for l in 0..w {
            acc[l] += acc[l + w];
        }
        w /= 2;
    }
    acc[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series (|x| ≤ 3) or continued fraction, in f64.
    fn erf64(x: f64) -> f64 {
        if x.abs() < 3.0 {
            let (mut term, mut s, x2) = (x, x, x * x);
            for n in 1..200 {
                term *= -x2 / n as f64;
                s += term / (2 * n + 1) as f64;
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = e^(−a²)/(a√π) · 1/(1 + 1/(2a²)/(1 + 2/(2a²)/(1 + …)))
            let a = x.abs();
            let mut f = 0.0;
            for n in (1..60).rev() {
                f = (n as f64 / 2.0) / (a * a) / (1.0 + f);
            }
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt()) / (1.0 + f);
            (1.0 - erfc).copysign(x)
        }
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max((got / want - 1.0).abs());
        }
        assert!(worst < 2.5 * f32::EPSILON as f64, "max relative error {worst:e}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn gelu_matches_the_exact_cdf() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = -12.0 + 24.0 * i as f64 / 100_000.0;
            let want = x * 0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2));
            let got = gelu_erf(x as f32) as f64;
            worst = worst.max((got - want).abs() / x.abs().max(1.0));
        }
        assert!(worst < 3e-7, "max error {worst:e}");
        assert_eq!(gelu_erf(0.0), 0.0);
        assert!(gelu_erf(f32::NAN).is_nan());
    }

    #[test]
    fn reductions() {
        let xs: Vec<f32> = (0..37).map(|i| i as f32 - 10.0).collect();
        assert_eq!(sum(&xs), xs.iter().sum::<f32>());
        assert_eq!(max(&xs), 26.0);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        let m = sum(&xs) / 37.0;
        let want: f32 = xs.iter().map(|x| (x - m) * (x - m)).sum();
        assert!((sum_sq_dev(&xs, m) - want).abs() < 1e-3);
    }
}
