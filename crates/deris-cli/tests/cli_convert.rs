//! `deris convert`: converts the tiny-a `.pth` into an equal `.safetensors`, unwraps a training
//! checkpoint, and fails cleanly (exit 2, the path in the message, no output left behind).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use deris::checkpoint::{bit_identical, Checkpoint};

fn fixtures() -> PathBuf {
    match std::env::var("DERIS_FIXTURES") {
        Ok(p) => PathBuf::from(p),
        Err(_) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures"),
    }
}

fn fixture(rel: &str) -> PathBuf {
    let p = fixtures().join(rel);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}

/// Our own committed checkpoint fixtures.
fn ckpt_fixture(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/checkpoints").join(name);
    assert!(p.exists(), "fixture missing: {}", p.display());
    p
}

fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("deris-cli-convert-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn convert(args: &[&Path]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_deris")).arg("convert").args(args).output().unwrap();
    println!("stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn assert_same_checkpoints(got: &Checkpoint, want: &Checkpoint) {
    assert_eq!(got.names().collect::<Vec<_>>(), want.names().collect::<Vec<_>>());
    for name in want.names() {
        let (a, b) = (got.get(name, &Device::Cpu).unwrap(), want.get(name, &Device::Cpu).unwrap());
        assert!(bit_identical(&a, &b).unwrap(), "{name} differs");
    }
}

#[test]
fn converts_tiny_a_pth_to_an_equal_safetensors() {
    let dir = temp_dir("tiny-a");
    let out_path = dir.join("tiny-a.safetensors");
    let out = convert(&[&fixture("tiny-a/weights.pth"), &out_path]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("562 tensors (553 parameters + 9 buffers)"), "{stdout}");
    assert!(stdout.contains("801,874 parameter values"), "{stdout}");
    let got = Checkpoint::open(&out_path).unwrap();
    assert_same_checkpoints(&got, &Checkpoint::open(&fixture("tiny-a/weights.safetensors")).unwrap());
    assert_eq!(files_in(&dir), ["tiny-a.safetensors"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unwraps_a_training_checkpoint() {
    let dir = temp_dir("nested");
    let out_path = dir.join("clean.safetensors");
    let out = convert(&[&ckpt_fixture("nested.pth"), &out_path]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("weights under 'state_dict'") && stdout.contains("dropped: epoch, optimizer"), "{stdout}");
    // Only model tensors, under the model's names: the safetensors header says so directly.
    let raw = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    assert_eq!(raw.len(), 27);
    assert!(raw.keys().all(|k| !k.starts_with("module.")));
    assert_same_checkpoints(
        &Checkpoint::open(&out_path).unwrap(),
        &Checkpoint::open(&ckpt_fixture("nested.pth")).unwrap(),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refuses_to_overwrite_its_input() {
    let dir = temp_dir("same");
    let path = dir.join("w.safetensors");
    std::fs::copy(fixture("tiny-a/weights.safetensors"), &path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Also through a path that differs in spelling.
    let spelled = dir.join(".").join("w.safetensors");
    for output in [&path, &spelled] {
        let out = convert(&[&path, output]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite the input"));
    }
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(files_in(&dir), ["w.safetensors"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failures_exit_2_name_the_path_and_leave_no_output() {
    let dir = temp_dir("fail");
    let out_path = dir.join("out.safetensors");
    let missing = dir.join("no-such-checkpoint.pth");
    for input in [
        missing,
        ckpt_fixture("truncated.pth"),
        ckpt_fixture("not_a_checkpoint.pth"),
        ckpt_fixture("short_storage.pth"),
    ] {
        let out = convert(&[&input, &out_path]);
        assert_eq!(out.status.code(), Some(2), "{}", input.display());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&input.display().to_string()), "{stderr}");
        assert!(files_in(&dir).is_empty(), "output left after failing on {}", input.display());
    }
    // An output that is not .safetensors.
    let out = convert(&[&fixture("tiny-a/weights.pth"), &dir.join("out.pth")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(files_in(&dir).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--config` checks every key and shape against the real model: tiny-a passes against its own
/// config and fails against DeRIS-B, leaving no output.
#[test]
fn config_audit_uses_the_model() {
    let dir = temp_dir("config");
    let out = dir.join("ok.safetensors");
    let cfg = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/tiny-a.json");
    let r = Command::new(env!("CARGO_BIN_EXE_deris"))
        .arg("convert")
        .arg(fixture("tiny-a/weights.pth"))
        .arg(&out)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let bad = dir.join("bad.safetensors");
    let r = Command::new(env!("CARGO_BIN_EXE_deris"))
        .arg("convert")
        .arg(fixture("tiny-a/weights.pth"))
        .arg(&bad)
        .args(["--config", "deris-b-refcoco"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("does not match the model"));
    assert!(!bad.exists());
}
