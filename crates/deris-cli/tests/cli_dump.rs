//! `deris dump`: writes every golden tensor name from the tiny-a inputs, and rejects bad inputs
//! (missing or mistyped tensors, sizes the model cannot take, text longer than max_token, weights
//! of another model) with exit 2, a message naming the problem, and no output file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(rel: &str) -> PathBuf {
    let base = std::env::var("DERIS_FIXTURES").map(PathBuf::from).unwrap_or_else(|_| root().join("fixtures"));
    let p = base.join(rel);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}

fn dump(config: &str, weights: &Path, inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_deris"))
        .args(["dump", "--config", config, "--weights"])
        .arg(weights)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    println!("stderr: {}", String::from_utf8_lossy(&out.stderr));
    out
}

fn tiny_config() -> String {
    root().join("configs/tiny-a.json").display().to_string()
}

fn golden_inputs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("tiny-a/golden.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.starts_with("input.") && !k.starts_with("input.raw"))
        .collect()
}

#[test]
fn dump_writes_every_golden_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump.safetensors");
    let r = dump(&tiny_config(), &fixture("tiny-a/weights.pth"), &fixture("tiny-a/golden.safetensors"), &out, &[]);
    assert!(r.status.success());
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let golden = candle_core::safetensors::load(fixture("tiny-a/golden.safetensors"), &Device::Cpu).unwrap();
    let missing: Vec<_> = golden.keys().filter(|k| !k.starts_with("input.raw") && !got.contains_key(*k)).collect();
    assert!(missing.is_empty(), "dump lacks golden tensors {missing:?}");
    for (k, want) in &golden {
        if let Some(t) = got.get(k) {
            assert_eq!(t.dims(), want.dims(), "{k}");
            assert_eq!(t.dtype(), want.dtype(), "{k}");
        }
    }
}

/// Writes `inputs` with one tensor changed (or removed) and checks dump's refusal.
fn rejects(change: impl FnOnce(&mut HashMap<String, Tensor>), config: &str, weights: &Path, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("in.safetensors");
    let mut t = golden_inputs();
    change(&mut t);
    candle_core::safetensors::save(&t, &inputs).unwrap();
    let out = dir.path().join("out.safetensors");
    let r = dump(config, weights, &inputs, &out, &[]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(2), "{err}");
    assert!(err.contains(needle), "stderr should mention '{needle}': {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out.exists(), "no output may be left after a failure");
}

#[test]
fn bad_inputs_are_refused() {
    let cfg = tiny_config();
    let w = fixture("tiny-a/weights.safetensors");
    rejects(|t| drop(t.remove("input.img_mini")), &cfg, &w, "input.img_mini");
    rejects(
        |t| {
            let v = t["input.ref_expr_inds"].to_dtype(DType::F32).unwrap();
            t.insert("input.ref_expr_inds".into(), v);
        },
        &cfg,
        &w,
        "dtype",
    );
    rejects(
        |t| {
            let v = t["input.img"].narrow(3, 0, 120).unwrap().contiguous().unwrap();
            t.insert("input.img".into(), v);
        },
        &cfg,
        &w,
        "multiple",
    );
    rejects(
        |t| {
            let long = Tensor::zeros((1, 11), DType::I64, &Device::Cpu).unwrap();
            t.insert("input.ref_expr_inds".into(), long.clone());
            t.insert("input.text_attention_mask".into(), long);
        },
        &cfg,
        &w,
        "max_token",
    );
    rejects(
        |t| {
            let v = t["input.img"].reshape((3, 128, 128)).unwrap();
            t.insert("input.img".into(), v);
        },
        &cfg,
        &w,
        "shape",
    );
}

#[test]
fn weights_of_another_model_are_refused() {
    // The tiny weights against the DeRIS-B architecture: one error listing the mismatches.
    rejects(|_| {}, "deris-b-refcoco", &fixture("tiny-a/weights.safetensors"), "does not match the model");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let r = dump(&tiny_config(), &dir.path().join("nope.pth"), &fixture("tiny-a/golden.safetensors"), &out, &[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("nope.pth"));
    let r = dump(&tiny_config(), &fixture("tiny-a/weights.pth"), &dir.path().join("none.safetensors"), &out, &[]);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("none.safetensors"));
    assert!(!out.exists());
}
