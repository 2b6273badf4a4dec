//! The fast MSDeformAttn op against its primitive-op reference: forward (random and border
//! locations, several level shapes, batch 2), the fast backward against the reference's
//! autograd, and both against central finite differences (f64).

use candle_core::{DType, Device, Result, Tensor, Var};
use deris_kernels::{ms_deform_attn, ms_deform_attn_reference};

/// A small deterministic generator (SplitMix64), so failures are reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[lo, hi)`.
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy)]
struct Sizes<'a> {
    b: usize,
    shapes: &'a [(usize, usize)],
    m: usize,
    dh: usize,
    lq: usize,
    p: usize,
}

impl Sizes<'_> {
    fn s(&self) -> usize {
        self.shapes.iter().map(|(h, w)| h * w).sum()
    }
    fn l(&self) -> usize {
        self.shapes.len()
    }
}

/// Which sampling locations to draw.
#[derive(Clone, Copy, PartialEq)]
enum Locs {
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
        _ => if rng.next_u64() % 2 == 0 { -3.0 } else { n + 2.0 },
    };
    (xi + 0.5) / n
}

fn inputs(sz: Sizes, locs: Locs, dtype: DType, seed: u64) -> Result<(Tensor, Tensor, Tensor)> {
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
                        Locs::Borders if rng.next_u64() % 4 != 0 => special(&mut rng, n),
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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()
}

const SHAPES_A: &[(usize, usize)] = &[(3, 4), (5, 2), (1, 1), (6, 7)];
const SHAPES_B: &[(usize, usize)] = &[(2, 2), (4, 4), (8, 8)];

#[test]
fn forward_matches_reference() -> Result<()> {
    let cases = [
        (Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 }, Locs::Random),
        (Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 }, Locs::Borders),
        (Sizes { b: 2, shapes: SHAPES_B, m: 4, dh: 8, lq: 84, p: 4 }, Locs::Random),
        (Sizes { b: 2, shapes: SHAPES_B, m: 4, dh: 8, lq: 84, p: 4 }, Locs::Borders),
        (Sizes { b: 1, shapes: &[(5, 3)], m: 1, dh: 1, lq: 16, p: 1 }, Locs::Borders),
    ];
    for (i, (sz, locs)) in cases.into_iter().enumerate() {
        for (dtype, tol) in [(DType::F32, 2e-6), (DType::F64, 1e-13)] {
            let (v, l, a) = inputs(sz, locs, dtype, 100 + i as u64)?;
            let fast = ms_deform_attn(&v, sz.shapes, &l, &a)?;
            let slow = ms_deform_attn_reference(&v, sz.shapes, &l, &a)?;
            assert_eq!(fast.dims(), &[sz.b, sz.lq, sz.m * sz.dh]);
            let d = max_abs_diff(&fast, &slow)?;
            let scale = slow.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            println!("forward case {i} {dtype:?}: max|fast - reference| = {d:.3e} (output scale {scale:.2})");
            assert!(scale > 0.1, "case {i}: degenerate output");
            assert!(d <= tol, "case {i} {dtype:?}: forward differs by {d:e}");
        }
    }
    Ok(())
}

#[test]
fn zero_outside_the_sampling_range() -> Result<()> {
    // One level 2×3 filled with ones; a single point per query.
    let dev = &Device::Cpu;
    let (h, w) = (2usize, 3usize);
    let value = Tensor::ones((1, h * w, 1, 1), DType::F64, dev)?;
    // (x, y) with expected output = sum of in-map bilinear weights
    let cases: [((f64, f64), f64); 7] = [
        ((0.5, 0.5), 1.0),                            // interior
        ((-0.5 / w as f64, 0.5), 0.0),                // xi = −1 exactly: outside
        (((w as f64 + 0.5) / w as f64, 0.5), 0.0),    // xi = W exactly: outside
        ((0.0, 0.5), 0.5),                            // xi = −0.5: half of the left neighbour
        ((1.0, 0.5), 0.5),                            // xi = W − 0.5
        ((0.0, 0.0), 0.25),                           // top-left image corner
        ((0.5 / w as f64, 0.5 / h as f64), 1.0),      // first pixel centre
    ];
    let loc: Vec<f64> = cases.iter().flat_map(|((x, y), _)| [*x, *y]).collect();
    let n = cases.len();
    let loc = Tensor::from_vec(loc, vec![1, n, 1, 1, 1, 2], dev)?;
    let attn = Tensor::ones(vec![1, n, 1, 1, 1], DType::F64, dev)?;
    for out in [
        ms_deform_attn(&value, &[(h, w)], &loc, &attn)?,
        ms_deform_attn_reference(&value, &[(h, w)], &loc, &attn)?,
    ] {
        let got = out.flatten_all()?.to_vec1::<f64>()?;
        for (g, (_, want)) in got.iter().zip(&cases) {
            assert!((g - want).abs() < 1e-12, "got {got:?}");
        }
    }
    Ok(())
}

#[test]
fn non_contiguous_inputs_are_made_contiguous() -> Result<()> {
    let sz = Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 };
    let (v, l, a) = inputs(sz, Locs::Random, DType::F32, 7)?;
    let v_t = v.transpose(1, 2)?.contiguous()?.transpose(1, 2)?; // same values, strided
    assert!(!v_t.is_contiguous());
    let a_t = a.transpose(0, 1)?.contiguous()?.transpose(0, 1)?;
    let want = ms_deform_attn(&v, sz.shapes, &l, &a)?;
    let got = ms_deform_attn(&v_t, sz.shapes, &l, &a_t)?;
    assert_eq!(max_abs_diff(&got, &want)?, 0.0);
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let sz = Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 };
    let (v, l, a) = inputs(sz, Locs::Random, DType::F32, 7)?;
    let e = ms_deform_attn(&v, &[(3, 4), (5, 2)], &l, &a).unwrap_err().to_string();
    assert!(e.contains("sampling_locations"), "{e}");
    let e = ms_deform_attn(&v, &[(3, 4), (5, 2), (1, 1), (6, 6)], &l, &a).unwrap_err().to_string();
    assert!(e.contains("rows"), "{e}");
    let e = ms_deform_attn(&v, sz.shapes, &l, &a.narrow(4, 0, 2)?).unwrap_err().to_string();
    assert!(e.contains("attention_weights"), "{e}");
    let e = ms_deform_attn(&v.to_dtype(DType::F64)?, sz.shapes, &l, &a).unwrap_err().to_string();
    assert!(e.contains("f32"), "{e}");
    Ok(())
}

/// Gradients of `Σ out ⊙ r` for (value, locations, weights), via candle autograd of `f`.
fn grads(
    f: fn(&Tensor, &[(usize, usize)], &Tensor, &Tensor) -> Result<Tensor>,
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

fn cotangent(sz: Sizes, dtype: DType, seed: u64) -> Result<Tensor> {
    let mut rng = Rng(seed);
    let n = sz.b * sz.lq * sz.m * sz.dh;
    let r: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
    Tensor::from_vec(r, (sz.b, sz.lq, sz.m * sz.dh), &Device::Cpu)?.to_dtype(dtype)
}

const NAMES: [&str; 3] = ["value", "sampling_locations", "attention_weights"];

#[test]
fn backward_matches_reference_autograd() -> Result<()> {
    let cases = [
        (Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 }, Locs::Random),
        (Sizes { b: 2, shapes: SHAPES_A, m: 3, dh: 5, lq: 7, p: 3 }, Locs::Borders),
        (Sizes { b: 2, shapes: SHAPES_B, m: 4, dh: 8, lq: 84, p: 4 }, Locs::Random),
    ];
    for (i, (sz, locs)) in cases.into_iter().enumerate() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 2e-5)] {
            let (v, l, a) = inputs(sz, locs, dtype, 200 + i as u64)?;
            let r = cotangent(sz, dtype, 300 + i as u64)?;
            let fast = grads(ms_deform_attn, sz.shapes, (&v, &l, &a), &r)?;
            let slow = grads(ms_deform_attn_reference, sz.shapes, (&v, &l, &a), &r)?;
            for k in 0..3 {
                let d = max_abs_diff(&fast[k], &slow[k])?;
                let scale = slow[k].abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?.to_scalar::<f64>()?.max(1.0);
                println!("backward case {i} {dtype:?} d/d{}: max|fast - autograd(reference)| = {d:.3e} (scale {scale:.2})", NAMES[k]);
                assert!(d <= tol * scale, "case {i} {dtype:?}: gradient for {} differs by {d:e}", NAMES[k]);
            }
        }
    }
    Ok(())
}

/// Central differences of `Σ f(...) ⊙ r` with respect to every element of input `k`.
fn finite_differences(
    f: fn(&Tensor, &[(usize, usize)], &Tensor, &Tensor) -> Result<Tensor>,
    shapes: &[(usize, usize)],
    inputs: [&Tensor; 3],
    r: &Tensor,
    k: usize,
    eps: f64,
) -> Result<Tensor> {
    let base = inputs[k].flatten_all()?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(base.len());
    let loss = |vals: Vec<f64>| -> Result<f64> {
        let t = Tensor::from_vec(vals, inputs[k].shape(), &Device::Cpu)?;
        let mut args = inputs.map(|x| x.clone());
        args[k] = t;
        (f(&args[0], shapes, &args[1], &args[2])? * r)?.sum_all()?.to_scalar::<f64>()
    };
    for j in 0..base.len() {
        let mut plus = base.clone();
        plus[j] += eps;
        let mut minus = base.clone();
        minus[j] -= eps;
        out.push((loss(plus)? - loss(minus)?) / (2.0 * eps));
    }
    Tensor::from_vec(out, inputs[k].shape(), &Device::Cpu)
}

#[test]
fn gradients_match_finite_differences() -> Result<()> {
    let sz = Sizes { b: 2, shapes: &[(2, 3), (3, 2), (1, 1)], m: 2, dh: 3, lq: 4, p: 2 };
    let (v, l, a) = inputs(sz, Locs::Smooth, DType::F64, 11)?;
    let r = cotangent(sz, DType::F64, 12)?;
    type Op = fn(&Tensor, &[(usize, usize)], &Tensor, &Tensor) -> Result<Tensor>;
    let ops: [(&str, Op); 2] = [("fast", ms_deform_attn), ("reference", ms_deform_attn_reference)];
    for (name, f) in ops {
        let analytic = grads(f, sz.shapes, (&v, &l, &a), &r)?;
        for k in 0..3 {
            let numeric = finite_differences(f, sz.shapes, [&v, &l, &a], &r, k, 1e-6)?;
            let d = max_abs_diff(&analytic[k], &numeric)?;
            let scale = numeric.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
            println!("{name} d/d{}: max|analytic - central difference| = {d:.3e} (scale {scale:.2})", NAMES[k]);
            assert!(scale > 1e-3, "degenerate gradient for {}", NAMES[k]);
            assert!(d <= 1e-7 * scale.max(1.0), "{name}: gradient for {} off by {d:e}", NAMES[k]);
        }
    }
    Ok(())
}
