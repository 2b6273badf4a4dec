//! [`fused::linear`] and the post-norm blocks in bf16 mode against their `_reference` twins on
//! inputs rounded to bf16 by candle (`to_dtype(BF16)`, round to nearest even): the tiles, the
//! row blocks of tiles past the first, strided weights, the epilogue and the row count where the
//! f32 products take over; and f32 mode unchanged around them. [`fused::linear_bf16`] on a
//! prepacked weight against `linear` in bf16 mode, bit for bit.
//!
//! Its own test binary: the precision is process-wide, so one test function runs the steps in
//! order. Skips (with the reason printed) on CPUs without AVX512-BF16.

use candle_core::{DType, Result, Tensor};
use deris_kernels::fused::{self, Activation};
use deris_kernels::post_norm::{self, Dense, DenseWeight, Norm};
use deris_kernels::{set_precision, Precision};

mod common;
use common::rand;


fn to_bf16(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::BF16)?.to_dtype(DType::F32)
}

fn max_abs(t: &Tensor) -> Result<f32> {
    t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

#[test]
fn bf16_products_match_rounded_references() -> Result<()> {
    if !deris_kernels::bf16::available() {
        eprintln!("skipped: this CPU lacks AVX512-BF16");
        assert!(set_precision(Precision::Bf16).is_err(), "bf16 must be refused without AVX512-BF16");
        return Ok(());
    }
    linear_cases()?;
    post_norm_cases()?;
    prepacked_cases()
}

fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().map(|v| v.to_bits()).collect())
}

/// `linear_bf16` on a prepacked weight gives the bits of `linear` in bf16 mode, whatever the
/// precision when it runs, on 2 threads: there `linear` cuts 600×400 into column tiles of 112
/// (starting off the 32-column panels) and `linear_bf16` into tiles of 128. Every row count
/// 8..=20 (row blocks and tails), odd k, k past the 256-value slices, n past and under 32, a
/// transposed weight, with and without the epilogue. Below 8 rows (where `linear` stays f32) it
/// still computes in bf16: against the reference on rounded inputs.
fn prepacked_cases() -> Result<()> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().map_err(candle_core::Error::wrap)?;
    let mut cases = vec![(600usize, 64usize, 400usize, false), (300, 129, 700, false), (217, 96, 288, true), (37, 768, 100, false), (9, 3, 5, true)];
    cases.extend((8..=20).map(|m| (m, 259, 47, false)));
    for (i, &(m, k, n, transposed)) in cases.iter().enumerate() {
        let seed = 500 + 10 * i as u64;
        let x = rand(&[1, m, k], seed, 2.0)?;
        let w = if transposed { rand(&[k, n], seed + 1, 0.2)?.t()? } else { rand(&[n, k], seed + 1, 0.2)? };
        let b = rand(&[n], seed + 2, 0.5)?;
        let r = rand(&[1, m, n], seed + 3, 1.0)?;
        let packed = fused::pack_weight(&w)?;
        for (act, bias, res) in [(Activation::GeluErf, Some(&b), Some(&r)), (Activation::Identity, None, None)] {
            set_precision(Precision::Bf16)?;
            let want = pool.install(|| fused::linear(&x, &w, bias, act, res))?;
            let got = pool.install(|| fused::linear_bf16(&x, &packed, bias, act, res))?;
            set_precision(Precision::F32)?;
            let later = fused::linear_bf16(&x, &packed, bias, act, res)?;
            let what = format!("m {m} k {k} n {n} transposed {transposed} {act:?}");
            assert_eq!(bits(&got)?, bits(&want)?, "{what}: prepacked differs from packing per call");
            assert_eq!(bits(&later)?, bits(&want)?, "{what}: prepacked in f32 mode differs");
        }
    }
    for m in [1, 3, 7] {
        let (k, n) = (70, 40);
        let x = rand(&[m, k], 900 + m as u64, 2.0)?;
        let w = rand(&[n, k], 901, 0.2)?;
        let got = fused::linear_bf16(&x, &fused::pack_weight(&w)?, None, Activation::Identity, None)?;
        let want = fused::linear_reference(&to_bf16(&x)?, &to_bf16(&w)?, None, Activation::Identity, None)?;
        let d = max_abs(&(&got - &want)?)?;
        println!("prepacked m {m}: |bf16 − rounded reference| {d:.2e}");
        assert!(d < 2e-5 * (k as f32).sqrt(), "m {m}: max |Δ| {d:e}");
    }
    let packed = fused::pack_weight(&rand(&[6, 4], 1, 1.0)?)?;
    let empty = fused::linear_bf16(&Tensor::zeros((0, 4), DType::F32, &candle_core::Device::Cpu)?, &packed, None, Activation::Identity, None)?;
    assert_eq!(empty.dims(), [0, 6]);
    let tracked = candle_core::Var::from_tensor(&rand(&[8, 4], 2, 1.0)?)?;
    assert!(fused::linear_bf16(tracked.as_tensor(), &packed, None, Activation::Identity, None).is_err(), "no gradient through a packed weight");
    assert!(fused::linear_bf16(&rand(&[8, 3], 3, 1.0)?, &packed, None, Activation::Identity, None).is_err(), "k mismatch");
    Ok(())
}

/// `ffn_residual_norm` and `linear_residual_norm` (blocks of rows: 700 rows make several; 5 rows
/// stay f32); the FFN's reference rounds its hidden activations too. With packed weights: bf16
/// for every block, the bits of bf16 mode where it runs bf16 too.
fn post_norm_cases() -> Result<()> {
    for (i, &(m, c, f)) in [(700usize, 64usize, 129usize), (40, 96, 256), (5, 32, 64)].iter().enumerate() {
        let seed = 100 + 10 * i as u64;
        let x = rand(&[m, c], seed, 2.0)?;
        let (w1, b1) = (rand(&[f, c], seed + 1, 0.3)?, rand(&[f], seed + 2, 0.5)?);
        let (w2, b2) = (rand(&[c, f], seed + 3, 0.3)?, rand(&[c], seed + 4, 0.5)?);
        let (g, beta) = ((rand(&[c], seed + 5, 0.5)? + 1.0)?, rand(&[c], seed + 6, 0.5)?);
        let norm = Norm { weight: &g, bias: Some(&beta), eps: 1e-5 };
        let (l1, l2) = (Dense { weight: (&w1).into(), bias: Some(&b1) }, Dense { weight: (&w2).into(), bias: Some(&b2) });
        let f32_ffn = post_norm::ffn_residual_norm(&x, l1, l2, norm)?;
        let hidden = rand(&[m, f], seed + 7, 1.0)?;
        let lin_f32 = post_norm::linear_residual_norm(&hidden, l2, &x, norm)?;
        set_precision(Precision::Bf16)?;
        let ffn = post_norm::ffn_residual_norm(&x, l1, l2, norm)?;
        let lin = post_norm::linear_residual_norm(&hidden, l2, &x, norm)?;
        set_precision(Precision::F32)?;
        let (w1r, w2r) = (to_bf16(&w1)?, to_bf16(&w2)?);
        let h = fused::linear_reference(&to_bf16(&x)?, &w1r, Some(&b1), Activation::Identity, None)?.relu()?;
        let ffn_rounded = post_norm::linear_residual_norm_reference(&to_bf16(&h)?, Dense { weight: (&w2r).into(), bias: Some(&b2) }, &x, norm)?;
        let lin_rounded = post_norm::linear_residual_norm_reference(&to_bf16(&hidden)?, Dense { weight: (&w2r).into(), bias: Some(&b2) }, &x, norm)?;
        let (ffn_want, lin_want) = if m < 8 { (f32_ffn.clone(), lin_f32.clone()) } else { (ffn_rounded.clone(), lin_rounded.clone()) };
        // Packed weights (here in f32 mode): the bf16 product for every block, so the bits of
        // bf16 mode where its blocks have 8 rows or more (700 rows: below 88 threads).
        let (p1, p2) = (fused::pack_weight(&w1)?, fused::pack_weight(&w2)?);
        let (pl1, pl2) = (Dense { weight: DenseWeight::Bf16(&p1), bias: Some(&b1) }, Dense { weight: DenseWeight::Bf16(&p2), bias: Some(&b2) });
        let ffn_packed = post_norm::ffn_residual_norm(&x, pl1, pl2, norm)?;
        let lin_packed = post_norm::linear_residual_norm(&hidden, pl2, &x, norm)?;
        for (what, got, want) in [("ffn", &ffn_packed, &ffn_rounded), ("linear", &lin_packed, &lin_rounded)] {
            let d = max_abs(&(got - want)?)?;
            assert!(d < 2e-5, "packed {what} m {m}: max |Δ| {d:e} from the rounded reference");
        }
        if m >= 8 * 2 * rayon::current_num_threads() {
            assert_eq!(bits(&ffn_packed)?, bits(&ffn)?, "packed ffn m {m}: not the bits of bf16 mode");
            assert_eq!(bits(&lin_packed)?, bits(&lin)?, "packed linear m {m}: not the bits of bf16 mode");
        }
        let tracked = candle_core::Var::from_tensor(&x)?;
        assert!(post_norm::ffn_residual_norm(tracked.as_tensor(), pl1, pl2, norm).is_err(), "no gradient through a packed weight");
        assert!(post_norm::linear_residual_norm(&hidden.to_dtype(DType::F64)?, pl2, &x.to_dtype(DType::F64)?, norm).is_err(), "f32 only");
        for (what, got, want, f32_out) in [("ffn", &ffn, &ffn_want, &f32_ffn), ("linear", &lin, &lin_want, &lin_f32)] {
            let d = max_abs(&(got - want)?)?;
            let moved = max_abs(&(got - f32_out)?)?;
            println!("post-norm {what} m {m} c {c} f {f}: |bf16 − rounded reference| {d:.2e}, |bf16 − f32| {moved:.2e}");
            // Normalised outputs (scale ~1), f32 sums in another order (measured ≤ 1e-6).
            assert!(d < 2e-5, "{what} m {m}: max |Δ| {d:e}");
            if m >= 8 {
                assert!(moved > 1e-3, "{what} m {m}: bf16 mode gave the f32 result");
            } else {
                assert_eq!(moved, 0.0, "{what} m {m}: few rows stay f32");
            }
        }
    }
    Ok(())
}

fn linear_cases() -> Result<()> {
    // (rows, k, n, weight stored transposed): row tiles past the first (m > 256), odd k and n,
    // one row block (8 rows: bf16), and 5 rows (the f32 skinny product).
    let cases = [(300, 129, 700, false), (217, 96, 288, true), (37, 768, 100, false), (8, 33, 65, false), (5, 64, 96, false)];
    for (i, &(m, k, n, transposed)) in cases.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = rand(&[1, m, k], seed, 2.0)?;
        let w = if transposed { rand(&[k, n], seed + 1, 0.2)?.t()? } else { rand(&[n, k], seed + 1, 0.2)? };
        let b = rand(&[n], seed + 2, 0.5)?;
        let r = rand(&[1, m, n], seed + 3, 1.0)?;
        let f32_out = fused::linear(&x, &w, Some(&b), Activation::GeluErf, Some(&r))?;
        set_precision(Precision::Bf16)?;
        let got = fused::linear(&x, &w, Some(&b), Activation::GeluErf, Some(&r))?;
        set_precision(Precision::F32)?;
        let want = if m < 8 { f32_out.clone() } else { fused::linear_reference(&to_bf16(&x)?, &to_bf16(&w)?, Some(&b), Activation::GeluErf, Some(&r))? };
        let d = max_abs(&(&got - &want)?)?;
        let moved = max_abs(&(&got - &f32_out)?)?;
        println!("m {m} k {k} n {n}: |bf16 − rounded reference| {d:.2e}, |bf16 − f32| {moved:.2e}");
        // Only the order of the f32 sums differs from the reference (GELU has slope ≤ 1.13).
        assert!(d < 2e-5 * (k as f32).sqrt(), "m {m} k {k} n {n}: max |Δ| {d:e}");
        if m >= 8 {
            assert!(moved > 1e-4, "m {m}: bf16 mode gave the f32 result");
        } else {
            assert_eq!(moved, 0.0, "m {m}: few rows stay f32");
        }
        let again = fused::linear(&x, &w, Some(&b), Activation::GeluErf, Some(&r))?;
        assert_eq!(max_abs(&(&again - &f32_out)?)?, 0.0, "f32 mode changed after a bf16 run");
    }
    Ok(())
}

