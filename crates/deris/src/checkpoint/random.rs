//! Random weights for any config: deterministic per key name and seed, no file needed. Used by
//! `deris bench` and tests that build the full-size models in memory.

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// Weights drawn like the fixtures' re-initialisation: norm weights `1 + 0.1·N`, other 1-D
/// tensors `0.1·N`, k-D tensors `N(0, s²)` with `s = clamp(1/√fan_in, 0.02, 0.2)`; integer
/// buffers (Swin's `relative_position_index`) are zeros. Each tensor depends only on
/// `(seed, name)`, so the same model is built whatever the construction order.
struct RandomBackend {
    seed: u64,
}

/// SplitMix64: a small, good-enough generator for test weights (and [`crate::train::params`]'s
/// initialisation).
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform in (0, 1].
    pub(crate) fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 + 1.0) / (1u64 << 24) as f32
    }

    /// A standard normal (Box–Muller).
    pub(crate) fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }
}

/// FNV-1a hash of a key name: the per-key part of a seed.
pub(crate) fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl SimpleBackend for RandomBackend {
    fn get(&self, s: Shape, name: &str, _h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if dtype.is_int() {
            return Tensor::zeros(s, dtype, dev);
        }
        let dims = s.dims().to_vec();
        let n = s.elem_count();
        let mut rng = SplitMix(self.seed ^ fnv1a(name));
        let (mean, std) = if dims.len() == 1 {
            let is_norm_weight = name.ends_with("weight");
            (if is_norm_weight { 1.0 } else { 0.0 }, 0.1)
        } else {
            let fan_in: usize = dims[1..].iter().product();
            (0.0, (1.0 / (fan_in.max(1) as f32).sqrt()).clamp(0.02, 0.2))
        };
        let data: Vec<f32> = (0..n).map(|_| mean + std * rng.normal()).collect();
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for '{name}'")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// A VarBuilder that hands out deterministic random weights of whatever shape is requested.
pub fn random_var_builder(seed: u64, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomBackend { seed }), dtype, device.clone())
}
