//! Shared helpers for the fixture tests: where the fixtures are, loading golden tensors, and one
//! `assert_close` that reports the worst element.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The fixtures folder: `$DERIS_FIXTURES`, else the repository's `fixtures/` (a copy of the
/// tiny-a, gold and keys sets), else `../shared/fixtures` beside the checkout.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(p) = std::env::var("DERIS_FIXTURES") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let in_repo = root.join("fixtures");
    if in_repo.join("tiny-a").exists() {
        return in_repo;
    }
    root.join("../shared/fixtures")
}

/// Path of a fixture file; panics with the path when it is missing (tests never pass silently).
pub fn fixture(rel: &str) -> PathBuf {
    let p = fixtures_dir().join(rel);
    assert!(p.exists(), "fixture missing: {} (set DERIS_FIXTURES to the fixtures folder)", p.display());
    p
}

/// An optional fixture that is not in git (e.g. `images/`, which come from the authors'
/// repository). Under `CI=true` a missing one fails; elsewhere the test says it skips.
pub fn optional_fixture(rel: &str) -> Option<PathBuf> {
    let candidates = [fixtures_dir().join(rel), PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures").join(rel)];
    if let Some(p) = candidates.iter().find(|p| p.exists()) {
        return Some(p.clone());
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("fixture missing under CI: {}", candidates[0].display());
    }
    eprintln!("SKIPPED: fixture {} not found (it is not in git; it lives in ../shared/fixtures)", rel);
    None
}

/// All tensors of a safetensors file, by name, on the CPU.
pub fn load_tensors(rel: &str) -> HashMap<String, Tensor> {
    let p = fixture(rel);
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// The golden tensors of the tiny-a fixture.
pub fn golden() -> HashMap<String, Tensor> {
    load_tensors("tiny-a/golden.safetensors")
}

/// One named tensor from a map, with a clear panic if absent.
pub fn get<'a>(m: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    m.get(name).unwrap_or_else(|| panic!("golden tensor '{name}' missing"))
}

/// Max |got − want| and its flat index; shapes must agree.
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> (f32, usize) {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let g = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut worst = (0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(w.iter()).enumerate() {
        let d = (a - b).abs();
        if d > worst.0 || d.is_nan() {
            worst = (d, i);
        }
    }
    worst
}

/// Asserts `|got − want| ≤ tol · max(1, max|want|)` elementwise; reports shape, max |Δ| and where.
/// Returns the max |Δ| so tests can print it.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{name}: shape {:?} vs golden {:?}", got.dims(), want.dims());
    let scale = want.to_dtype(DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1.0);
    let (d, i) = max_abs_diff(got, want);
    println!("{name:50} max|Δ| = {d:.3e} (scale {scale:.2})");
    assert!(d <= tol * scale, "{name}: max |Δ| = {d:e} at flat index {i} exceeds {tol:e}·{scale}");
    d
}

/// Fraction of differing entries between two binary tensors (any dtype, nonzero = 1).
pub fn flip_fraction(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let g = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let flips = g.iter().zip(&w).filter(|(a, b)| (**a != 0.0) != (**b != 0.0)).count();
    flips as f64 / g.len().max(1) as f64
}

/// A VarBuilder over the tiny-a weights (plain safetensors, no audit): for module-level tests.
pub fn tiny_a_vb() -> candle_nn::VarBuilder<'static> {
    let p = fixture("tiny-a/weights.safetensors");
    // SAFETY: the fixture file is not modified while the test runs.
    unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[p], DType::F32, &Device::Cpu).unwrap() }
}

/// The tiny-a model config from `configs/tiny-a.json`.
pub fn tiny_a_config() -> deris::DerisConfig {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny-a.json");
    deris::DerisConfig::from_file(&p).unwrap()
}

/// A model small enough to train in seconds on two cores (64² / 32² images, 8 Swin channels,
/// 4 queries), as a model config's JSON.
pub fn tiny_train_model() -> serde_json::Value {
    serde_json::json!({
        "name": "ci-tiny",
        "beit3": {"embed_dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2, "vocab_size": 128, "max_source_positions": 24, "patch_size": 8},
        "swin": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4},
        "understanding": {"hidden_channels": 32, "num_queries": 4, "aligner_layers": 1, "aligner_heads": 2, "aligner_ffn_dim": 32},
        "pixel_decoder": {"conv_dim": 32, "mask_dim": 32, "num_encoder_layers": 1, "num_heads": 2, "ffn_dim": 32, "groupnorm_groups": 4},
        "predictor": {"hidden_dim": 32, "num_heads": 2, "dim_feedforward": 32, "dec_layers": 3, "num_queries": 4, "q2tca_heads": 2},
        "runtime": {"hier_img_size": 64, "img_mini_size": 32, "max_token": 16, "score_threshold": 0.7}
    })
}
