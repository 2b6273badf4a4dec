//! The arithmetic of the CPU matrix products, chosen once for the whole process.
//!
//! [`Precision::F32`] (the default) computes in f32 throughout. [`Precision::Bf16`] rounds both
//! operands of the fused [`linear`](crate::fused::linear) products to bf16 and sums in f32
//! ([`crate::bf16`]), about twice as fast on CPUs with AVX512-BF16; every other op (attention
//! products, convolutions, norms) stays f32. Only the inference fast path reads the setting:
//! training, which runs the ops of `autograd` on tensors that track gradients, and non-CPU
//! devices always compute in f32. A weight packed to bf16 beforehand
//! ([`fused::pack_weight`](crate::fused::pack_weight), for
//! [`fused::linear_bf16`](crate::fused::linear_bf16)) computes in bf16 whatever the setting.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{bail, Result};

/// Arithmetic of the fused `linear` products on the CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 operands and sums: the reference results.
    #[default]
    F32,
    /// Operands rounded to bf16 (round to nearest even, as torch's `.to(torch.bfloat16)`), sums
    /// in f32. Needs AVX512-BF16.
    Bf16,
}

impl Precision {
    /// The name used in configs and on the command line: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => Err(format!("unknown precision '{s}' (expected 'f32' or 'bf16')")),
        }
    }
}

/// The process-wide setting: 0 = f32, 1 = bf16.
static PRECISION: AtomicU8 = AtomicU8::new(0);

/// Sets the precision of every later CPU `linear` on an f32 weight in this process (all models,
/// all threads).
///
/// Errors, leaving the setting unchanged, when `Bf16` is asked for on a CPU without
/// AVX512-BF16.
pub fn set_precision(p: Precision) -> Result<()> {
    if p == Precision::Bf16 && !crate::bf16::available() {
        bail!("bf16 precision needs a CPU with AVX512-BF16 (AMD Zen 4 or later, Intel Cooper Lake or Sapphire Rapids or later); this one lacks it, use f32");
    }
    PRECISION.store(p as u8, Ordering::Relaxed);
    Ok(())
}

/// The current process-wide precision ([`Precision::F32`] unless [`set_precision`] changed it).
pub fn precision() -> Precision {
    match PRECISION.load(Ordering::Relaxed) {
        1 => Precision::Bf16,
        _ => Precision::F32,
    }
}
