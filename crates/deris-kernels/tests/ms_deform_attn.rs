//! The fast MSDeformAttn op against its primitive-op reference: forward (random and border
//! locations, several level shapes, batch 2), the fast backward against the reference's
//! autograd, and both against central finite differences (f64).

mod common;

use candle_core::{DType, Device, Result, Tensor};
use common::{cotangent, grads, inputs, max_abs_diff, Locs, Op, Sizes, NAMES, SHAPES_A, SHAPES_B};
use deris_kernels::{ms_deform_attn, ms_deform_attn_reference};

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
    f: Op,
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
