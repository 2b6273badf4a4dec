//! Inputs and helpers shared by the kernel tests (MSDeformAttn on CPU and CUDA, fused ops, bf16).
#![allow(dead_code)]

use candle_core::{DType, Device, Result, Tensor, Var};

/// A small deterministic generator (SplitMix64), so failures are reproducible.
pub struct Rng(u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
pub struct Sizes<'a> {
    pub b: usize,
    pub shapes: &'a [(usize, usize)],
    pub m: usize,
    pub dh: usize,
    pub lq: usize,
    pub p: usize,
}

impl Sizes<'_> {
    pub fn s(&self) -> usize {
        self.shapes.iter().map(|(h, w)| h * w).sum()
    }
    pub fn l(&self) -> usize {
        self.shapes.len()
    }
}

/// Which sampling locations to draw.
#[derive(Clone, Copy, PartialEq)]
pub enum Locs {
    /// Uniform in [-0.3, 1.3]: about a third sample (partly) outside the map.
    Random,
    /// Mostly exact special positions: pixel centres and edges, the `xi = −1` / `xi = W`
    /// sampling-range limits, just inside them, and far outside.
    Borders,
    /// Random, but at least `1e-3` pixels away from any integer pixel coordinate and from the
    /// sampling-range limits, so that central differences never straddle a kink.
    Smooth,
}

fn special(rng: &mut Rng, n: usize) -> f64 {
    let n = n as f64;
    // pixel coordinate xi = x·n − 0.5  ⇔  x = (xi + 0.5) / n
    let xi = match rng.next_u64() % 9 {
        0 => -1.0,
        1 => -1.0 + 1e-4,
        2 => n,
        3 => n - 1e-4,
        4 => 0.0,
        5 => n - 1.0,
        6 => (rng.next_u64() % (n as u64)) as f64,
        7 => -0.5,
        _ => if rng.next_u64().is_multiple_of(2) { -3.0 } else { n + 2.0 },
    };
    (xi + 0.5) / n
}

pub fn inputs(sz: Sizes, locs: Locs, dtype: DType, seed: u64) -> Result<(Tensor, Tensor, Tensor)> {
    let mut rng = Rng(seed);
    let dev = &Device::Cpu;
    let value: Vec<f64> = (0..sz.b * sz.s() * sz.m * sz.dh).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut loc = Vec::with_capacity(sz.b * sz.lq * sz.m * sz.l() * sz.p * 2);
    for _ in 0..sz.b * sz.lq * sz.m {
        for &(h, w) in sz.shapes {
            for _ in 0..sz.p {
                for n in [w, h] {
                    let v = match locs {
                        Locs::Random => rng.uniform(-0.3, 1.3),
                        Locs::Borders if !rng.next_u64().is_multiple_of(4) => special(&mut rng, n),
                        Locs::Borders => rng.uniform(-0.3, 1.3),
                        Locs::Smooth => loop {
                            let v = rng.uniform(-0.3, 1.3);
                            let xi = v * n as f64 - 0.5;
                            let near_int = (xi - xi.round()).abs() < 1e-3;
                            let near_limit = (xi + 1.0).abs() < 1e-3 || (xi - n as f64).abs() < 1e-3;
                            if !near_int && !near_limit {
                                break v;
                            }
                        },
                    };
                    loc.push(v);
                }
            }
        }
    }
    // attention weights: a softmax over the L·P points of each (b, q, m)
    let lp = sz.l() * sz.p;
    let mut attn = Vec::with_capacity(sz.b * sz.lq * sz.m * lp);
    for _ in 0..sz.b * sz.lq * sz.m {
        let e: Vec<f64> = (0..lp).map(|_| rng.uniform(-2.0, 2.0).exp()).collect();
        let total: f64 = e.iter().sum();
        attn.extend(e.iter().map(|v| v / total));
    }
    let value = Tensor::from_vec(value, (sz.b, sz.s(), sz.m, sz.dh), dev)?.to_dtype(dtype)?;
    let loc = Tensor::from_vec(loc, vec![sz.b, sz.lq, sz.m, sz.l(), sz.p, 2], dev)?.to_dtype(dtype)?;
    let attn = Tensor::from_vec(attn, vec![sz.b, sz.lq, sz.m, sz.l(), sz.p], dev)?.to_dtype(dtype)?;
    Ok((value, loc, attn))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

pub const SHAPES_A: &[(usize, usize)] = &[(3, 4), (5, 2), (1, 1), (6, 7)];
pub const SHAPES_B: &[(usize, usize)] = &[(2, 2), (4, 4), (8, 8)];

/// The signature shared by the fast op and the reference.
pub type Op = fn(&Tensor, &[(usize, usize)], &Tensor, &Tensor) -> Result<Tensor>;

/// Gradients of `Σ out ⊙ r` for (value, locations, weights), via candle autograd of `f`.
pub fn grads(
    f: Op,
    shapes: &[(usize, usize)],
    (v, l, a): (&Tensor, &Tensor, &Tensor),
    r: &Tensor,
) -> Result<[Tensor; 3]> {
    let (vv, lv, av) = (Var::from_tensor(v)?, Var::from_tensor(l)?, Var::from_tensor(a)?);
    let out = f(vv.as_tensor(), shapes, lv.as_tensor(), av.as_tensor())?;
    let loss = (out * r)?.sum_all()?;
    let g = loss.backward()?;
    let get = |t: &Var| g.get(t.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()));
    Ok([get(&vv)?, get(&lv)?, get(&av)?])
}

pub fn cotangent(sz: Sizes, dtype: DType, seed: u64) -> Result<Tensor> {
    let mut rng = Rng(seed);
    let n = sz.b * sz.lq * sz.m * sz.dh;
    let r: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    Tensor::from_vec(r, (sz.b, sz.lq, sz.m * sz.dh), &Device::Cpu)?.to_dtype(dtype)
}

pub const NAMES: [&str; 3] = ["value", "sampling_locations", "attention_weights"];

/// Deterministic uniform values in `[-s, s)` (xorshift), as an f32 CPU tensor of `shape`.
pub fn rand(shape: &[usize], seed: u64, s: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * s
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
}
