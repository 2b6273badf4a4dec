//! Each fused CPU kernel against its primitive-op twin (`_reference`), on odd sizes, strided
//! inputs and every epilogue; and the gradient fallback when an input is a variable.

use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use deris_kernels::fused::{self, Activation};

mod common;
use common::rand;


fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn layer_norm_matches_reference() -> Result<()> {
    for (shape, c) in [(vec![3, 7, 130], 130), (vec![5, 768], 768), (vec![1, 9], 9)] {
        let x = (rand(&shape, 1, 3.0)? + 0.7)?;
        let w = rand(&[c], 2, 1.0)?;
        let b = rand(&[c], 3, 1.0)?;
        let got = fused::layer_norm(&x, &w, &b, 1e-5)?;
        let want = fused::layer_norm_reference(&x, &w, &b, 1e-5)?;
        let d = max_abs_diff(&got, &want)?;
        assert!(d < 1e-5, "layer_norm {shape:?}: max |Δ| {d:e}");
    }
    Ok(())
}

#[test]
fn gelu_matches_candle() -> Result<()> {
    let x = rand(&[4, 1001], 4, 8.0)?;
    let d = max_abs_diff(&fused::gelu_erf(&x)?, &fused::gelu_erf_reference(&x)?)?;
    assert!(d < 2e-6, "gelu max |Δ| {d:e}");
    Ok(())
}

#[test]
fn linear_matches_reference() -> Result<()> {
    // (M, K, N): tiny (one task), tiled in both directions, one row, and few-row (skinny) products
    // with odd widths and depths.
    for (m, k, n) in
        [(5, 7, 3), (300, 96, 200), (197, 64, 700), (1, 33, 70), (20, 100, 301), (32, 768, 96), (13, 768, 3072)]
    {
        let x = rand(&[m, k], 5, 1.0)?.reshape((1, m, k))?;
        let w = rand(&[n, k], 6, 0.3)?;
        let b = rand(&[n], 7, 0.5)?;
        let r = rand(&[1, m, n], 8, 1.0)?;
        for (bias, act, res) in [
            (None, Activation::Identity, None),
            (Some(&b), Activation::Identity, None),
            (Some(&b), Activation::GeluErf, None),
            (Some(&b), Activation::Identity, Some(&r)),
            (None, Activation::GeluErf, Some(&r)),
        ] {
            let got = fused::linear(&x, &w, bias, act, res)?;
            let want = fused::linear_reference(&x, &w, bias, act, res)?;
            let d = max_abs_diff(&got, &want)?;
            assert!(
                d < 2e-5,
                "linear {m}x{k}x{n} bias {} {act:?} res {}: max |Δ| {d:e}",
                bias.is_some(),
                res.is_some()
            );
        }
    }
    // Empty inputs.
    let empty = Tensor::zeros((0, 8), DType::F32, &Device::Cpu)?;
    let w = rand(&[3, 8], 6, 0.3)?;
    assert_eq!(fused::linear(&empty, &w, None, Activation::Identity, None)?.dims(), [0, 3]);
    // A weight read through strides: rows of a bigger matrix, and a transposed one.
    let x = rand(&[2, 40, 48], 9, 1.0)?;
    let big = rand(&[3 * 64, 48], 10, 0.3)?;
    let w = big.narrow(0, 64, 64)?;
    let wt = rand(&[48, 64], 11, 0.3)?.t()?;
    for w in [&w, &wt] {
        let d = max_abs_diff(
            &fused::linear(&x, w, None, Activation::Identity, None)?,
            &fused::linear_reference(&x, w, None, Activation::Identity, None)?,
        )?;
        assert!(d < 2e-5, "strided weight: max |Δ| {d:e}");
    }
    Ok(())
}

#[test]
fn attention_matches_reference() -> Result<()> {
    // Heads read out of a fused qkv projection [B, L, 3, H, hd] (Swin's layout).
    let (b, l, h, hd) = (6, 49, 3, 32);
    let qkv = rand(&[b, l, 3, h, hd], 12, 1.0)?;
    let part = |i: usize| qkv.i((.., .., i)).and_then(|t| t.transpose(1, 2)); // [B, H, L, hd]
    let (q, k, v) = (part(0)?, part(1)?, part(2)?);
    let rel = rand(&[h, l, l], 13, 2.0)?.unsqueeze(0)?; // [1, H, L, L]
                                                        // Per-window mask, G = 3 windows per image, 2 images.
    let mask = rand(&[3, 1, l, l], 14, 1.0)?.ge(0.5)?.to_dtype(DType::F32)?.affine(-100.0, 0.0)?;
    // Key padding with −inf, [B, 1, 1, L].
    let pad: Vec<f32> = (0..b * l).map(|i| if i % l >= 40 + i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
    let pad = Tensor::from_vec(pad, (b, 1, 1, l), &Device::Cpu)?;
    let scale = (hd as f64).powf(-0.5);
    for biases in [vec![], vec![&rel], vec![&rel, &mask], vec![&pad], vec![&mask, &pad]] {
        let got = fused::attention(&q, &k, &v, scale, &biases)?;
        let want = fused::attention_reference(&q, &k, &v, scale, &biases)?;
        let d = max_abs_diff(&got, &want)?;
        assert!(d < 1e-5, "attention with {} biases: max |Δ| {d:e}", biases.len());
        // The heads merge without a copy.
        assert!(got.transpose(1, 2)?.is_contiguous());
    }
    // Cross-attention with Lq ≠ Lk and long rows split into query blocks.
    let q = rand(&[2, 4, 300, 16], 15, 1.0)?;
    let k = rand(&[2, 4, 77, 16], 16, 1.0)?;
    let v = rand(&[2, 4, 77, 16], 17, 1.0)?;
    let bias = rand(&[2, 1, 300, 77], 18, 1.0)?;
    let d = max_abs_diff(
        &fused::attention(&q, &k, &v, 0.25, &[&bias])?,
        &fused::attention_reference(&q, &k, &v, 0.25, &[&bias])?,
    )?;
    assert!(d < 1e-5, "cross attention: max |Δ| {d:e}");
    Ok(())
}

/// With a variable among the inputs the ops return the reference, so gradients flow.
#[test]
fn gradients_fall_back_to_the_reference() -> Result<()> {
    let x = rand(&[4, 24], 19, 1.0)?;
    let w = Var::from_tensor(&rand(&[16, 24], 20, 0.3)?)?;
    let b = Var::from_tensor(&rand(&[16], 21, 0.3)?)?;
    let g = Var::from_tensor(&rand(&[16], 22, 1.0)?)?;
    let y = fused::linear(&x, w.as_tensor(), Some(b.as_tensor()), Activation::GeluErf, None)?;
    let y = fused::layer_norm(&y, g.as_tensor(), b.as_tensor(), 1e-5)?;
    let q = y.reshape((1, 4, 4, 4))?.transpose(1, 2)?;
    let o = fused::attention(&q, &q, &q, 0.5, &[])?;
    let grads = o.sqr()?.sum_all()?.backward()?;
    for (name, var) in [("weight", &w), ("bias", &b), ("gain", &g)] {
        let gr = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert!(gr.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0, "zero gradient for {name}");
    }
    Ok(())
}

#[test]
fn window_attention_matches_reference() -> Result<()> {
    use deris_kernels::fused::window::PAD;
    // 40 image tokens shuffled into 3 windows of 16 with 8 padding slots.
    let (b, l, nw, n, h, hd) = (2, 40, 3, 16, 2, 8);
    let mut slots: Vec<u32> = (0..l as u32).chain(std::iter::repeat_n(PAD, nw * n - l)).collect();
    let mut state = 7u64;
    for i in (1..slots.len()).rev() {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        slots.swap(i, (state >> 33) as usize % (i + 1));
    }
    let qkv = rand(&[b, l, 3 * h * hd], 23, 1.0)?;
    let qkv_bias = rand(&[3 * h * hd], 24, 1.0)?;
    let rel = rand(&[1, h, n, n], 25, 1.0)?;
    let mask = rand(&[nw, 1, n, n], 26, 1.0)?.ge(0.3)?.to_dtype(DType::F32)?.affine(-100.0, 0.0)?;
    for (bias, biases) in [(None, vec![]), (Some(&qkv_bias), vec![&rel]), (Some(&qkv_bias), vec![&rel, &mask])] {
        let got = fused::window_attention(&qkv, bias, &slots, nw, h, 0.3, &biases)?;
        let want = fused::window_attention_reference(&qkv, bias, &slots, nw, h, 0.3, &biases)?;
        let d = max_abs_diff(&got, &want)?;
        assert!(d < 1e-5, "window attention with {} biases: max |Δ| {d:e}", biases.len());
    }
    // A token missing from the windows is an error.
    let mut broken = slots.clone();
    let i = broken.iter().position(|&s| s != PAD).unwrap_or(0);
    broken[i] = PAD;
    assert!(fused::window_attention(&qkv, None, &broken, nw, h, 0.3, &[]).is_err());
    Ok(())
}
