//! Gradients of the fast entry points (the functions the model calls) against central finite
//! differences.
//!
//! Each op is checked input by input, with **only that input** a `Var` and the others plain
//! tensors: a fast path that looked at some inputs only (e.g. `x` but not the weight) would take
//! the kernel without a backward, and the input would get no gradient at all. Per input:
//! - f64: autograd vs central differences of the same entry point (`eps = 1e-6`); where the
//!   fast path handles f64 (conv2d, group_norm, resize, post_norm, sampling_inputs) the
//!   differences go through the fast kernel and the gradient through the reference twin;
//! - f32 (the dtype of the fused kernels' fast path): autograd vs the f64 autograd.
//!
//! The ops with a hand-written backward on the CPU (linear, layer_norm, attention's softmax and
//! biases, window attention, conv2d's bias, group_norm, resize) are also compared with candle's
//! autograd of their primitive-op `_reference` twins, every input a `Var` at once
//! ([`check_reference`]).
//!
//! MSDeformAttn's own custom backward has its finite-difference tests in `ms_deform_attn.rs`.

use candle_core::{DType, Device, Result, Tensor, Var};
use deris_kernels::fused::{self, Activation};
use deris_kernels::post_norm::{self, Dense, Norm};

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        lo + (hi - lo) * (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// An f64 tensor uniform in `[lo, hi)`.
    fn tensor(&mut self, shape: &[usize], lo: f64, hi: f64) -> Tensor {
        let n = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.uniform(lo, hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }
}

type Op<'a> = &'a dyn Fn(&[Tensor]) -> Result<Tensor>;

fn max_abs(t: &Tensor) -> f64 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `Σ f(inputs) ⊙ r`.
fn loss(f: Op, inputs: &[Tensor], r: &Tensor) -> Result<Tensor> {
    (f(inputs)? * r.to_dtype(inputs[0].dtype())?)?.sum_all()
}

/// The gradient of `Σ f ⊙ r` with respect to input `k`, with only input `k` a Var.
fn autograd(f: Op, inputs: &[Tensor], r: &Tensor, k: usize) -> Result<Tensor> {
    let mut args = inputs.to_vec();
    let var = Var::from_tensor(&inputs[k])?;
    args[k] = var.as_tensor().clone();
    let grads = loss(f, &args, r)?.backward()?;
    match grads.get(var.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => candle_core::bail!("no gradient reached input {k}"),
    }
}

/// Central differences of `Σ f ⊙ r` with respect to every element of input `k` (f64).
fn finite_differences(f: Op, inputs: &[Tensor], r: &Tensor, k: usize, eps: f64) -> Result<Tensor> {
    let base = inputs[k].flatten_all()?.to_vec1::<f64>()?;
    let at = |j: usize, delta: f64| -> Result<f64> {
        let mut vals = base.clone();
        vals[j] += delta;
        let mut args = inputs.to_vec();
        args[k] = Tensor::from_vec(vals, inputs[k].shape(), &Device::Cpu)?;
        loss(f, &args, r)?.to_scalar::<f64>()
    };
    let out = (0..base.len()).map(|j| Ok((at(j, eps)? - at(j, -eps)?) / (2.0 * eps))).collect::<Result<Vec<_>>>()?;
    Tensor::from_vec(out, inputs[k].shape(), &Device::Cpu)
}

/// Checks every input's gradient of `f` (see the module docs). `inputs` are f64.
fn check(name: &str, f: Op, inputs: &[Tensor], seed: u64) {
    let out_shape = f(inputs).unwrap().dims().to_vec();
    let r = Rng(seed).tensor(&out_shape, -1.0, 1.0);
    let inputs32: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect();
    for k in 0..inputs.len() {
        let g64 = autograd(f, inputs, &r, k).unwrap_or_else(|e| panic!("{name} f64 input {k}: {e}"));
        let fd = finite_differences(f, inputs, &r, k, 1e-6).unwrap();
        let scale = max_abs(&fd).max(1.0);
        let d = max_abs(&(&g64 - &fd).unwrap());
        println!("{name:40} input {k}: max|autograd − central difference| = {d:.2e} (scale {scale:.2})");
        assert!(max_abs(&fd) > 1e-3, "{name} input {k}: degenerate gradient");
        assert!(d <= 1e-5 * scale, "{name} input {k}: autograd off by {d:e}");

        let g32 = autograd(f, &inputs32, &r, k).unwrap_or_else(|e| panic!("{name} f32 input {k}: {e}"));
        let d32 = max_abs(&(g32.to_dtype(DType::F64).unwrap() - &g64).unwrap());
        println!("{name:40} input {k}: max|f32 − f64 autograd| = {d32:.2e}");
        assert!(d32 <= 1e-4 * scale, "{name} input {k}: f32 gradient off by {d32:e}");
    }
}

#[test]
fn linear_gelu() {
    let mut rng = Rng(1);
    let inputs = [rng.tensor(&[2, 3, 5], -2.0, 2.0), rng.tensor(&[4, 5], -1.0, 1.0), rng.tensor(&[4], -1.0, 1.0)];
    check("linear + bias + gelu", &|t| fused::linear(&t[0], &t[1], Some(&t[2]), Activation::GeluErf, None), &inputs, 2);
}

#[test]
fn linear_residual() {
    let mut rng = Rng(3);
    let inputs = [
        rng.tensor(&[2, 3, 5], -2.0, 2.0),
        rng.tensor(&[4, 5], -1.0, 1.0),
        rng.tensor(&[4], -1.0, 1.0),
        rng.tensor(&[2, 3, 4], -1.0, 1.0),
    ];
    check(
        "linear + bias + residual",
        &|t| fused::linear(&t[0], &t[1], Some(&t[2]), Activation::Identity, Some(&t[3])),
        &inputs,
        4,
    );
    // No bias, transposed (strided) weight as `Linear::new(w.t())` callers may pass.
    let inputs = [rng.tensor(&[3, 5], -2.0, 2.0), rng.tensor(&[5, 4], -1.0, 1.0)];
    check("linear, strided weight", &|t| fused::linear(&t[0], &t[1].t()?, None, Activation::Identity, None), &inputs, 5);
}

#[test]
fn gelu_erf() {
    let inputs = [Rng(6).tensor(&[3, 7], -3.0, 3.0)];
    check("gelu_erf", &|t| fused::gelu_erf(&t[0]), &inputs, 7);
}

#[test]
fn layer_norm() {
    let mut rng = Rng(8);
    let inputs = [rng.tensor(&[2, 3, 6], -2.0, 2.0), rng.tensor(&[6], 0.5, 1.5), rng.tensor(&[6], -1.0, 1.0)];
    check("layer_norm", &|t| fused::layer_norm(&t[0], &t[1], &t[2], 1e-5), &inputs, 9);
}

#[test]
fn attention_with_biases() {
    let mut rng = Rng(10);
    let (b, h, lq, lk, hd) = (2, 2, 3, 4, 3);
    let inputs = [
        rng.tensor(&[b, h, lq, hd], -1.0, 1.0),
        rng.tensor(&[b, h, lk, hd], -1.0, 1.0),
        rng.tensor(&[b, h, lk, hd], -1.0, 1.0),
        // a per-head bias shared by the batch (Swin's relative positions) ...
        rng.tensor(&[1, h, lq, lk], -1.0, 1.0),
        // ... and a per-image key bias (padding), both summed into the scores
        rng.tensor(&[b, 1, 1, lk], -1.0, 1.0),
    ];
    check("attention (2 biases)", &|t| fused::attention(&t[0], &t[1], &t[2], 0.6, &[&t[3], &t[4]]), &inputs, 11);
    // Heads read in place from a [B, L, H·hd] projection, as `split_heads` hands them over.
    let inputs = [rng.tensor(&[b, lq, h * hd], -1.0, 1.0), rng.tensor(&[b, lk, h * hd], -1.0, 1.0)];
    let split = |t: &Tensor| -> Result<Tensor> {
        let (b, l, e) = t.dims3()?;
        t.reshape((b, l, h, e / h))?.transpose(1, 2)
    };
    check(
        "attention (strided heads)",
        &|t| fused::attention(&split(&t[0])?, &split(&t[1])?, &split(&t[1])?, 0.5, &[]),
        &inputs,
        12,
    );
}

#[test]
fn window_attention() {
    use deris_kernels::fused::window::PAD;
    let mut rng = Rng(13);
    // A 2×3 image in 2×2 windows: window 0 = tokens (0, 1, 3, 4), window 1 = (2, pad, 5, pad).
    let windows = [0, 1, 3, 4, 2, PAD, 5, PAD];
    let (b, l, h, hd, n) = (2, 6, 2, 2, 4);
    let inputs = [
        rng.tensor(&[b, l, 3 * h * hd], -1.0, 1.0),
        rng.tensor(&[3 * h * hd], -1.0, 1.0),
        rng.tensor(&[1, h, n, n], -1.0, 1.0), // relative-position bias, shared by all windows
        rng.tensor(&[2, 1, n, n], -1.0, 1.0), // one mask per window
    ];
    check(
        "window_attention",
        &|t| fused::window_attention(&t[0], Some(&t[1]), &windows, 2, h, 0.7, &[&t[2], &t[3]]),
        &inputs,
        14,
    );
}

#[test]
fn conv2d() {
    let mut rng = Rng(15);
    for (k, padding) in [(3, 1), (1, 0), (2, 0)] {
        let inputs = [rng.tensor(&[2, 3, 4, 5], -1.0, 1.0), rng.tensor(&[2, 3, k, k], -1.0, 1.0), rng.tensor(&[2], -1.0, 1.0)];
        check(&format!("conv2d {k}×{k} pad {padding}"), &|t| deris_kernels::conv2d(&t[0], &t[1], Some(&t[2]), padding), &inputs, 16);
    }
}

#[test]
fn group_norm() {
    let mut rng = Rng(17);
    for relu in [false, true] {
        let inputs = [rng.tensor(&[2, 4, 3, 3], -2.0, 2.0), rng.tensor(&[4], 0.5, 1.5), rng.tensor(&[4], -0.5, 0.5)];
        check(&format!("group_norm relu {relu}"), &|t| deris_kernels::group_norm(&t[0], 2, &t[1], &t[2], 1e-5, relu), &inputs, 18);
    }
}

#[test]
fn resize_bilinear() {
    let mut rng = Rng(19);
    for align_corners in [false, true] {
        for (h, w) in [(5, 7), (2, 3)] {
            let inputs = [rng.tensor(&[1, 2, 3, 4], -1.0, 1.0)];
            check(
                &format!("resize 3×4 → {h}×{w} align_corners {align_corners}"),
                &|t| deris_kernels::resize_bilinear(&t[0], h, w, align_corners),
                &inputs,
                20,
            );
        }
    }
}

#[test]
fn post_norm_sublayers() {
    fn norm(t: &[Tensor], i: usize) -> Norm<'_> {
        Norm { weight: &t[i], bias: Some(&t[i + 1]), eps: 1e-5 }
    }
    let mut rng = Rng(21);
    let inputs = [
        rng.tensor(&[2, 3, 5], -1.0, 1.0),
        rng.tensor(&[4, 5], -1.0, 1.0),
        rng.tensor(&[4], -1.0, 1.0),
        rng.tensor(&[2, 3, 4], -1.0, 1.0),
        rng.tensor(&[4], 0.5, 1.5),
        rng.tensor(&[4], -0.5, 0.5),
    ];
    check(
        "linear_residual_norm",
        &|t| post_norm::linear_residual_norm(&t[0], Dense { weight: (&t[1]).into(), bias: Some(&t[2]) }, &t[3], norm(t, 4)),
        &inputs,
        22,
    );
    let inputs = [
        rng.tensor(&[2, 3, 4], -1.0, 1.0),
        rng.tensor(&[6, 4], -1.0, 1.0),
        rng.tensor(&[6], -1.0, 1.0),
        rng.tensor(&[4, 6], -1.0, 1.0),
        rng.tensor(&[4], -1.0, 1.0),
        rng.tensor(&[4], 0.5, 1.5),
        rng.tensor(&[4], -0.5, 0.5),
    ];
    check(
        "ffn_residual_norm",
        &|t| {
            post_norm::ffn_residual_norm(
                &t[0],
                Dense { weight: (&t[1]).into(), bias: Some(&t[2]) },
                Dense { weight: (&t[3]).into(), bias: Some(&t[4]) },
                norm(t, 5),
            )
        },
        &inputs,
        23,
    );
}

#[test]
fn sampling_inputs() {
    let mut rng = Rng(24);
    let shapes = [(2, 3), (1, 2)];
    let (b, lq, m, l, p) = (1, 2, 2, 2, 2);
    let inputs = [
        rng.tensor(&[b, lq, l, 2], 0.0, 1.0),
        rng.tensor(&[b, lq, m, l, p, 2], -2.0, 2.0),
        rng.tensor(&[b, lq, m, l, p], -2.0, 2.0),
    ];
    check(
        "ms_deform_attn::sampling_inputs",
        &|t| {
            let (loc, attn) = deris_kernels::ms_deform_attn::sampling_inputs(&t[0], &t[1], &t[2], &shapes)?;
            Tensor::cat(&[loc.flatten_all()?, attn.flatten_all()?], 0)
        },
        &inputs,
        25,
    );
}

/// The gradients of every input of the fast entry point `fast` (hand-written backward ops on the
/// CPU) against candle's autograd of the primitive-op twin `reference`, all inputs `Var`s at
/// once, in f64 and f32. `inputs` are f64.
fn check_reference(name: &str, fast: Op, reference: Op, inputs: &[Tensor], seed: u64) {
    let out_shape = reference(inputs).unwrap().dims().to_vec();
    let r = Rng(seed).tensor(&out_shape, -1.0, 1.0);
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 2e-5)] {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()).collect();
        let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let got = loss(fast, &args, &r).unwrap().backward().unwrap();
        let want = loss(reference, &args, &r).unwrap().backward().unwrap();
        for (k, v) in vars.iter().enumerate() {
            let (g, w) = (got.get(v.as_tensor()).unwrap(), want.get(v.as_tensor()).unwrap());
            let scale = max_abs(w).max(1.0);
            let d = max_abs(&(g - w).unwrap());
            println!("{name:40} input {k} {dtype:?}: max|custom − reference autograd| = {d:.2e} (scale {scale:.2})");
            assert!(d <= tol * scale, "{name} input {k} {dtype:?}: gradient off the reference's by {d:e}");
        }
    }
}

#[test]
fn custom_backward_matches_reference_autograd() {
    let mut rng = Rng(30);
    let inputs = [
        rng.tensor(&[2, 7, 5], -2.0, 2.0),
        rng.tensor(&[4, 5], -1.0, 1.0),
        rng.tensor(&[4], -1.0, 1.0),
        rng.tensor(&[2, 7, 4], -1.0, 1.0),
    ];
    check_reference(
        "linear + gelu + residual",
        &|t| fused::linear(&t[0], &t[1], Some(&t[2]), Activation::GeluErf, Some(&t[3])),
        &|t| fused::linear_reference(&t[0], &t[1], Some(&t[2]), Activation::GeluErf, Some(&t[3])),
        &inputs,
        31,
    );
    check_reference(
        "linear, strided weight, no bias",
        &|t| fused::linear(&t[0], &t[1].t()?.contiguous()?.t()?, None, Activation::Identity, None),
        &|t| fused::linear_reference(&t[0], &t[1].t()?.contiguous()?.t()?, None, Activation::Identity, None),
        &inputs[..2],
        32,
    );

    let inputs = [rng.tensor(&[3, 4, 9], -2.0, 2.0), rng.tensor(&[9], 0.5, 1.5), rng.tensor(&[9], -1.0, 1.0)];
    check_reference(
        "layer_norm",
        &|t| fused::layer_norm(&t[0], &t[1], &t[2], 1e-5),
        &|t| fused::layer_norm_reference(&t[0], &t[1], &t[2], 1e-5),
        &inputs,
        33,
    );

    let (b, h, lq, lk, hd) = (4, 2, 3, 5, 3);
    let inputs = [
        rng.tensor(&[b, h, lq, hd], -1.0, 1.0),
        rng.tensor(&[b, h, lk, hd], -1.0, 1.0),
        rng.tensor(&[b, h, lk, hd], -1.0, 1.0),
        rng.tensor(&[2, h, lq, lk], -1.0, 1.0), // trainable, per window group
    ];
    // a constant padding bias (no gradient): the last key of image 1 masked
    let mut pad = vec![0f64; b * lk];
    pad[lk + lk - 1] = -1e4;
    let pad = Tensor::from_vec(pad, (b, 1, 1, lk), &Device::Cpu).unwrap();
    let with_pad = |t: &[Tensor], f: fn(&Tensor, &Tensor, &Tensor, f64, &[&Tensor]) -> Result<Tensor>| {
        f(&t[0], &t[1], &t[2], 0.6, &[&t[3], &pad.to_dtype(t[0].dtype())?])
    };
    check_reference(
        "attention (trainable + constant bias)",
        &|t| with_pad(t, fused::attention),
        &|t| with_pad(t, fused::attention_reference),
        &inputs,
        34,
    );

    use deris_kernels::fused::window::PAD;
    let windows = [0, 1, 3, 4, 2, PAD, 5, PAD];
    let (b, l, h, hd, n) = (2, 6, 2, 2, 4);
    let inputs =
        [rng.tensor(&[b, l, 3 * h * hd], -1.0, 1.0), rng.tensor(&[3 * h * hd], -1.0, 1.0), rng.tensor(&[1, h, n, n], -1.0, 1.0)];
    let mask = rng.tensor(&[2, 1, n, n], -1.0, 1.0);
    check_reference(
        "window_attention (+ constant mask)",
        &|t| fused::window_attention(&t[0], Some(&t[1]), &windows, 2, h, 0.7, &[&t[2], &mask.to_dtype(t[0].dtype())?]),
        &|t| fused::window_attention_reference(&t[0], Some(&t[1]), &windows, 2, h, 0.7, &[&t[2], &mask.to_dtype(t[0].dtype())?]),
        &inputs,
        35,
    );

    let inputs = [rng.tensor(&[2, 3, 4, 5], -1.0, 1.0), rng.tensor(&[4, 3, 3, 3], -1.0, 1.0), rng.tensor(&[4], -1.0, 1.0)];
    check_reference(
        "conv2d 3×3",
        &|t| deris_kernels::conv2d(&t[0], &t[1], Some(&t[2]), 1),
        &|t| deris_kernels::conv2d_reference(&t[0], &t[1], Some(&t[2]), 1),
        &inputs,
        36,
    );

    for relu in [false, true] {
        let inputs = [rng.tensor(&[2, 6, 3, 4], -2.0, 2.0), rng.tensor(&[6], 0.5, 1.5), rng.tensor(&[6], -0.5, 0.5)];
        check_reference(
            &format!("group_norm relu {relu}"),
            &|t| deris_kernels::group_norm(&t[0], 3, &t[1], &t[2], 1e-5, relu),
            &|t| deris_kernels::group_norm_reference(&t[0], 3, &t[1], &t[2], 1e-5, relu),
            &inputs,
            37,
        );
    }

    for (ac, (hh, ww)) in [(false, (7, 3)), (true, (2, 9))] {
        let inputs = [rng.tensor(&[2, 3, 5, 4], -1.0, 1.0)];
        check_reference(
            &format!("resize 5×4 → {hh}×{ww} align_corners {ac}"),
            &|t| deris_kernels::resize_bilinear(&t[0], hh, ww, ac),
            &|t| deris_kernels::resize_bilinear_reference(&t[0], hh, ww, ac),
            &inputs,
            38,
        );
    }
}
